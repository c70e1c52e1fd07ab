//! Router tests in-process: requests through the real route table with `oneshot`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::{admin_router, router, AppState};
use crate::policy::DiscoverAnswer;
use crate::testkit::stack;

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 host";

/// Both listeners' routes in one router: the admin API, and the machine routes behind it.
fn app(assets: &std::path::Path) -> Router {
    let state = state(assets);
    admin_router(state.clone())
        .fallback_service(router(state, assets, true))
        .layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 5555))))
}

/// The machine listener's routes alone.
fn machine_app(assets: &std::path::Path) -> Router {
    router(state(assets), assets, true)
        .layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 5555))))
}

fn state(assets: &std::path::Path) -> AppState {
    let st = stack(DiscoverAnswer::LocalBoot);
    AppState {
        boot: st.boot,
        admin: st.admin,
        auth: Arc::new(super::auth::AdminAuth::for_tests(TOKEN)),
        advertise: None,
        machine_port: 8080,
        ca: Arc::new(crate::pki::Ca::load_or_create(&assets.join("pki")).unwrap()),
        boot_roots: Arc::new(vec![assets.join("boot-root")]),
        ui: Arc::new(super::ui::Ui::new(true, vec![], Default::default()).unwrap()),
    }
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, String) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::HOST, "10.0.0.1:8080")
        .body(Body::empty())
        .unwrap()
}

fn api(method: &str, uri: &str, body: Option<serde_json::Value>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "10.0.0.1:8080")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
        .unwrap()
}

#[tokio::test]
async fn admin_api_needs_the_token() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (s, body) = send(&app, get("/api/v1/machines")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let wrong = Request::get("/api/v1/machines")
        .header(header::AUTHORIZATION, "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, wrong).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(&app, api("GET", "/api/v1/machines", None)).await,
        (StatusCode::OK, "[]".into())
    );
    // Unknown API paths are 404 only after auth, so they reveal nothing.
    assert_eq!(
        send(&app, get("/api/v1/nope")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, api("GET", "/api/v1/nope", None)).await.0,
        StatusCode::NOT_FOUND
    );
    // The machine listener has no API, even with the token, and says where it is.
    let (s, body) = send(&machine_app(d.path()), api("GET", "/api/v1/machines", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body.contains("admin listener"), "{body}");
}

#[tokio::test]
async fn wrong_tokens_are_rate_limited_per_address_and_the_token_rotates() {
    let d = tempfile::tempdir().unwrap();
    let st = state(d.path());
    let file = d.path().join("admin-token");
    std::fs::write(&file, TOKEN).unwrap();
    let st = AppState {
        auth: Arc::new(super::auth::AdminAuth::new(TOKEN.into(), file.clone())),
        ..st
    };
    let from =
        |ip: [u8; 4]| admin_router(st.clone()).layer(MockConnectInfo(SocketAddr::from((ip, 5555))));
    let guesser = from([10, 0, 0, 66]);
    let guess = || {
        Request::get("/api/v1/machines")
            .header(header::AUTHORIZATION, "Bearer guess")
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..super::auth::ALLOWED_FAILURES {
        assert_eq!(send(&guesser, guess()).await.0, StatusCode::UNAUTHORIZED);
    }
    let res = guesser
        .clone()
        .oneshot(api("GET", "/api/v1/machines", None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = res.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Another address is not locked out by the guesser.
    let operator = from([10, 0, 0, 7]);
    assert_eq!(
        send(&operator, api("GET", "/api/v1/machines", None))
            .await
            .0,
        StatusCode::OK
    );
    // Rotation: the answer carries the new token, the file holds it, the old one is dead.
    let (s, body) = send(&operator, api("POST", "/api/v1/token/rotate", None)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let new = v["token"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new);
    assert_eq!(
        send(&operator, api("GET", "/api/v1/machines", None))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let with_new = Request::get("/api/v1/machines")
        .header(header::AUTHORIZATION, format!("Bearer {new}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&operator, with_new).await.0, StatusCode::OK);
}

#[tokio::test]
async fn api_errors_are_json_with_a_message() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let cases = [
        (
            api(
                "POST",
                "/api/v1/machines",
                Some(serde_json::json!({"mac": "52:54:00:00:00:01"})),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "has no profile and no group gives it one",
        ),
        (
            api(
                "POST",
                "/api/v1/machines",
                Some(serde_json::json!({"mac": "x", "profile": "debian-12"})),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not a MAC address",
        ),
        (
            api(
                "POST",
                "/api/v1/machines",
                Some(
                    serde_json::json!({"mac": "52:54:00:00:00:01", "profile": "debian-12", "hostnme": "x"}),
                ),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field `hostnme`",
        ),
        (
            api(
                "POST",
                "/api/v1/machines",
                Some(serde_json::json!({"mac": "52:54:00:00:00:01", "profile": "nope"})),
            ),
            StatusCode::NOT_FOUND,
            "no profile named",
        ),
        (
            api("GET", "/api/v1/machines/52:54:00:00:00:09", None),
            StatusCode::NOT_FOUND,
            "no machine with MAC 52:54:00:00:00:09",
        ),
        (
            api("GET", "/api/v1/machines?state=bogus", None),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown state",
        ),
        (
            api(
                "POST",
                "/api/v1/machines/52:54:00:00:00:09/reprovision",
                None,
            ),
            StatusCode::NOT_FOUND,
            "no machine",
        ),
    ];
    for (req, status, want) in cases {
        let (s, body) = send(&app, req).await;
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert_eq!(s, status, "{body}");
        assert!(v["error"].as_str().unwrap().contains(want), "{body}");
    }
}

#[tokio::test]
async fn enroll_chain_config_phone_home_local() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (s, body) = send(
        &app,
        api("POST", "/api/v1/machines", Some(serde_json::json!({"mac": "52-54-00-00-00-01", "profile": "ubuntu-24.04", "hostname": "node1"}))),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, again) = send(
        &app,
        api(
            "POST",
            "/api/v1/machines",
            Some(serde_json::json!({"mac": "52:54:00:00:00:01", "profile": "ubuntu-24.04"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{again}");

    let (s, chain) = send(&app, get("/boot.ipxe")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(chain.contains("chain --autofree http://10.0.0.1:8080/ipxe?mac=${mac:hexhyp}&uuid=${uuid}&serial=${serial:uristring}&arch=${buildarch}&platform=${platform}"), "{chain}");

    let (s, script) = send(
        &app,
        get("/ipxe?mac=52-54-00-00-00-01&uuid=&arch=x86_64&platform=efi"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{script}");
    let i = script.find("/config/").unwrap() + 8;
    let token = &script[i..i + 64];
    let (s, ud) = send(&app, get(&format!("/config/{token}/user-data"))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ud.starts_with("#cloud-config\n"));
    let (s, _) = send(&app, get(&format!("/config/{}/user-data", "f".repeat(64)))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // cloud-init's phone_home module posts a form.
    let form = Request::post(format!("/phone-home/{token}"))
        .header(header::HOST, "10.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(
            serde_urlencoded::to_string([
                ("pub_key_ed25519", KEY),
                ("pub_key_rsa", "N/A"),
                ("instance_id", "i-1"),
            ])
            .unwrap(),
        ))
        .unwrap();
    let (s, body) = send(&app, form).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("is installed"), "{body}");
    let (s, _) = send(&app, get(&format!("/config/{token}/user-data"))).await;
    assert_eq!(s, StatusCode::GONE);

    let (_, local) = send(&app, get("/ipxe?mac=52-54-00-00-00-01&platform=efi")).await;
    assert!(
        local.contains("\nexit\n") && !local.contains("kernel"),
        "{local}"
    );

    let (_, m) = send(&app, api("GET", "/api/v1/machines/525400000001", None)).await;
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["state"], "installed");
    assert_eq!(m["last_ip"], "10.0.0.7");
    assert_eq!(m["platform"], "efi");
    let (_, ev) = send(
        &app,
        api("GET", "/api/v1/machines/52:54:00:00:00:01/events", None),
    )
    .await;
    let kinds: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&ev)
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "enrolled",
            "install_started",
            "config_served",
            "phoned_home",
            "config_refused",
            "ipxe_served"
        ]
    );

    // Preview redacts the token.
    let (s, preview) = send(
        &app,
        api(
            "GET",
            "/api/v1/machines/52:54:00:00:00:01/render/user-data",
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(preview.contains("REDACTED-INSTALL-TOKEN") && !preview.contains(token));
}

#[tokio::test]
async fn hostile_requests_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    for uri in [
        "/ipxe",
        "/ipxe?mac=zz",
        "/ipxe?mac=52-54-00-00-00-01%0Aexit",
    ] {
        let (s, body) = send(&app, get(uri)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {body}");
    }
    // A Host header is a claim from the network; it must not reach a script unchecked.
    let evil = Request::get("/boot.ipxe")
        .header(header::HOST, "x\"$(y)")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, evil).await.0, StatusCode::BAD_REQUEST);
    let evil = Request::get("/boot.ipxe")
        .header(header::HOST, "a b")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, evil).await.0, StatusCode::BAD_REQUEST);
    // Junk firmware claims are not stored.
    let (s, _) = send(
        &app,
        get("/ipxe?mac=52-54-00-00-00-02&uuid=%22%3B&arch=x%20y&platform=efi"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, m) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:00:02", None)).await;
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(
        (m["uuid"].clone(), m["arch"].clone(), m["state"].clone()),
        (
            serde_json::Value::Null,
            serde_json::Value::Null,
            "discovered".into()
        )
    );
    // Phone-home with garbage is a 422 and changes nothing; with an unknown token a 403.
    let (s, _) = send(
        &app,
        Request::post(format!("/phone-home/{}", "0".repeat(64)))
            .header(header::HOST, "h")
            .body(Body::from(KEY))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn assets_are_served_with_ranges_and_confined() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("debian-12")).unwrap();
    std::fs::write(d.path().join("debian-12/linux"), b"0123456789").unwrap();
    std::fs::write(d.path().parent().unwrap().join("outside-secret"), b"x").ok();
    let app = app(d.path());
    let (s, body) = send(&app, get("/assets/debian-12/linux")).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "0123456789"));
    let ranged = Request::get("/assets/debian-12/linux")
        .header(header::RANGE, "bytes=2-5")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        send(&app, ranged).await,
        (StatusCode::PARTIAL_CONTENT, "2345".into())
    );
    assert_eq!(
        send(&app, get("/assets/../outside-secret")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&app, get("/assets/%2e%2e/outside-secret")).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn profiles_reload_and_preview() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (s, body) = send(&app, api("GET", "/api/v1/profiles", None)).await;
    assert_eq!(s, StatusCode::OK);
    let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "coreos-cloud-config",
            "debian-12",
            "fedora-coreos",
            "flatcar",
            "ubuntu-24.04"
        ]
    );
    let (s, body) = send(&app, api("GET", "/api/v1/profiles/flatcar", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("install.ign"));
    assert_eq!(
        send(&app, api("GET", "/api/v1/profiles/none", None))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, body) = send(&app, api("POST", "/api/v1/reload", None)).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, r#"{"profiles":5}"#));
}

#[tokio::test]
async fn boot_binaries_for_uefi_http_boot_are_confined_and_recorded() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("boot-root");
    std::fs::create_dir_all(root.join("arm64")).unwrap();
    std::fs::write(root.join("ipxe.efi"), b"MZ-efi").unwrap();
    std::fs::write(root.join("arm64/ipxe.efi"), b"MZ-arm").unwrap();
    std::fs::write(d.path().join("secret"), b"x").unwrap();
    std::os::unix::fs::symlink(d.path().join("secret"), root.join("escape")).unwrap();
    let app = app(d.path());
    assert_eq!(
        send(&app, get("/boot/ipxe.efi")).await,
        (StatusCode::OK, "MZ-efi".into())
    );
    assert_eq!(
        send(&app, get("/boot/arm64/ipxe.efi")).await,
        (StatusCode::OK, "MZ-arm".into())
    );
    assert_eq!(
        send(&app, get("/boot/escape")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&app, get("/boot/missing.efi")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&app, get("/boot/%2e%2e/secret")).await.0,
        StatusCode::FORBIDDEN
    );
    let (_, ev) = send(&app, api("GET", "/api/v1/events", None)).await;
    assert!(ev.contains("ipxe.efi (6 bytes) to 10.0.0.7"), "{ev}");
}

#[test]
fn previews_through_the_admin_listener_point_at_the_machine_port() {
    let d = tempfile::tempdir().unwrap();
    let st = state(d.path());
    let base = |host: &str| {
        let mut h = axum::http::HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        super::machine_base_url(&st, &h).map_err(|e| e.message)
    };
    assert_eq!(base("10.0.0.1:8443").unwrap(), "http://10.0.0.1:8080");
    assert_eq!(base("[fd00::1]:8443").unwrap(), "http://[fd00::1]:8080");
    assert_eq!(base("[fd00::1]").unwrap(), "http://[fd00::1]:8080");
    assert_eq!(base("prov.lab").unwrap(), "http://prov.lab:8080");
    assert!(base("a b").is_err());
    let advertised = AppState {
        advertise: Some(Arc::new("http://10.9.9.9:80".into())),
        ..st.clone()
    };
    let mut h = axum::http::HeaderMap::new();
    h.insert(header::HOST, "10.0.0.1:8443".parse().unwrap());
    assert_eq!(
        super::machine_base_url(&advertised, &h).ok().as_deref(),
        Some("http://10.9.9.9:80")
    );
}

// --- the web UI ----------------------------------------------------------------------------

/// The login form posted with `token`.
fn ui_login_form(token: &str) -> Request<Body> {
    Request::post("/ui/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}")))
        .unwrap()
}

/// Logs in to the UI; returns the `provision_session=…` cookie and the page's CSRF token.
async fn ui_login(app: &Router) -> (String, String) {
    let res = app.clone().oneshot(ui_login_form(TOKEN)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let set = res.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    let (s, page) = send(app, ui_get("/ui/enroll", &cookie)).await;
    assert_eq!(s, StatusCode::OK);
    let i = page.find("name=\"_csrf\" value=\"").unwrap() + 20;
    (cookie, page[i..i + 64].to_string())
}

fn ui_get(uri: &str, cookie: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::HOST, "10.0.0.1:8443")
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

fn ui_post(uri: &str, cookie: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::HOST, "10.0.0.1:8443")
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn ui_pages_need_a_session_and_carry_strict_headers() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let res = app.clone().oneshot(get("/ui/machines")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()[header::LOCATION], "/ui/login");
    let csp = res.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(res.headers()[header::X_FRAME_OPTIONS], "DENY");
    // An htmx fragment request is not redirected into the page it would replace.
    let res = app
        .clone()
        .oneshot(
            Request::get("/ui/machines")
                .header("hx-request", "true")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()["hx-redirect"], "/ui/login");
    // The stream too needs a session.
    assert_eq!(
        send(&app, ui_get("/ui/stream", "provision_session=forged"))
            .await
            .0,
        StatusCode::SEE_OTHER
    );
    // A made-up cookie opens nothing; a real one opens every page, none cached.
    let (cookie, _) = ui_login(&app).await;
    for page in [
        "/ui/",
        "/ui/machines",
        "/ui/discovered",
        "/ui/enroll",
        "/ui/profiles",
    ] {
        let res = app.clone().oneshot(ui_get(page, &cookie)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{page}");
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store", "{page}");
    }
    // Static files: cached, and htmx gzipped for a browser that takes it.
    let res = app
        .clone()
        .oneshot(
            Request::get("/ui/static/htmx.min.js")
                .header(header::ACCEPT_ENCODING, "gzip, deflate, br")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
    assert!(res.headers()[header::CACHE_CONTROL]
        .to_str()
        .unwrap()
        .contains("max-age"));
    assert_eq!(
        send(&app, get("/ui/static/htmx.min.js.gz")).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn ui_login_sets_a_strict_cookie_and_shares_the_guessing_limit() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let wrong = || ui_login_form("guess");
    let (s, page) = send(&app, wrong()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(page.contains("wrong admin token"), "{page}");
    let res = app.clone().oneshot(ui_login_form(TOKEN)).await.unwrap();
    let cookie = res.headers()[header::SET_COOKIE].to_str().unwrap();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Path=/ui",
        "Max-Age=28800",
    ] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    // A login form posted from another site's page is refused, token or not.
    let mut cross = ui_login_form(TOKEN);
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    let res = app.clone().oneshot(cross).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(!res.headers().contains_key(header::SET_COOKIE));
    for _ in 1..super::auth::ALLOWED_FAILURES {
        assert_eq!(send(&app, wrong()).await.0, StatusCode::UNAUTHORIZED);
    }
    let (s, page) = send(&app, wrong()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(page.contains("too many wrong tokens"), "{page}");
}

#[tokio::test]
async fn ui_changes_need_the_csrf_token_from_the_same_site() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (cookie, csrf) = ui_login(&app).await;
    let enroll = "mac=52-54-00-00-00-41&profile=debian-12&hostname=web1";
    let (s, page) = send(&app, ui_post("/ui/enroll", &cookie, enroll)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(page.contains("CSRF"), "{page}");
    let stale = format!("{enroll}&_csrf={}", "0".repeat(64));
    assert_eq!(
        send(&app, ui_post("/ui/enroll", &cookie, &stale)).await.0,
        StatusCode::FORBIDDEN
    );
    let mut cross = ui_post("/ui/enroll", &cookie, &format!("{enroll}&_csrf={csrf}"));
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(send(&app, cross).await.0, StatusCode::FORBIDDEN);
    let (s, _) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:00:41", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing refused was enrolled");

    // The header htmx sends does as well as the form field.
    let mut ok = ui_post("/ui/enroll", &cookie, enroll);
    ok.headers_mut()
        .insert("x-csrf-token", csrf.parse().unwrap());
    let res = app.clone().oneshot(ok).await.unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        res.headers()[header::LOCATION],
        "/ui/machines/52:54:00:00:00:41"
    );
    // The API's refusal, in the API's words, on the form.
    let dup = format!("{enroll}&_csrf={csrf}");
    let (s, page) = send(&app, ui_post("/ui/enroll", &cookie, &dup)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(page.contains("already enrolled"), "{page}");

    // Destructive actions ask first, and change nothing until confirmed.
    let del = format!("mac=52:54:00:00:00:41&action=delete&_csrf={csrf}");
    let (s, page) = send(&app, ui_post("/ui/machines/bulk", &cookie, &del)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("Delete machine 52:54:00:00:00:41 from the inventory?"),
        "{page}"
    );
    let (s, _) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:00:41", None)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, page) = send(
        &app,
        ui_post("/ui/machines/bulk", &cookie, &format!("{del}&confirm=yes")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("1 of 1 done."), "{page}");
    let (s, _) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:00:41", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Logout ends the session on the server, not only in the browser.
    let out = format!("_csrf={csrf}");
    assert_eq!(
        send(&app, ui_post("/ui/logout", &cookie, &out)).await.0,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        send(&app, ui_get("/ui/", &cookie)).await.0,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn ui_stream_replays_what_the_browser_missed() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (cookie, _) = ui_login(&app).await;
    for m in ["52:54:00:00:00:51", "52:54:00:00:00:52"] {
        let body = serde_json::json!({ "mac": m, "profile": "debian-12" });
        assert_eq!(
            send(&app, api("POST", "/api/v1/machines", Some(body)))
                .await
                .0,
            StatusCode::CREATED
        );
    }
    // Reads the stream until `want` is in it (it never ends by itself).
    async fn read_until(res: axum::response::Response, want: &str) -> String {
        let mut body = res.into_body();
        let mut seen = String::new();
        while !seen.contains(want) {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("the stream said nothing for 10 s")
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        seen
    }
    let mut req = ui_get("/ui/stream", &cookie);
    req.headers_mut()
        .insert("last-event-id", "1".parse().unwrap());
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let seen = read_until(res, "52:54:00:00:00:52").await;
    assert!(!seen.contains("id: 1\n"), "{seen}");
    assert!(seen.contains("id: 2\nevent: event\ndata: {"), "{seen}");
    // Without a cursor it starts from now, and follows new events as they commit.
    let res = app
        .clone()
        .oneshot(ui_get("/ui/stream", &cookie))
        .await
        .unwrap();
    let follow = tokio::spawn(read_until(res, "52:54:00:00:00:53"));
    let body = serde_json::json!({ "mac": "52:54:00:00:00:53", "profile": "debian-12" });
    send(&app, api("POST", "/api/v1/machines", Some(body))).await;
    let seen = follow.await.unwrap();
    assert!(!seen.contains("52:54:00:00:00:51"), "{seen}");
}

#[tokio::test]
async fn the_api_searches_as_the_ui_does_and_shows_token_states() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    for (i, rack) in ["r1", "r2", "r1"].iter().enumerate() {
        let body = serde_json::json!({
            "mac": format!("52:54:00:00:01:0{i}"),
            "profile": "debian-12",
            "hostname": format!("web{i}"),
            "labels": { "rack": rack },
        });
        assert_eq!(
            send(&app, api("POST", "/api/v1/machines", Some(body)))
                .await
                .0,
            StatusCode::CREATED
        );
    }
    let res = app
        .clone()
        .oneshot(api(
            "GET",
            "/api/v1/machines?q=rack%3Dr1&sort=hostname&dir=desc&limit=1",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-total-count"], "2");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let page: Vec<crate::dto::Machine> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].hostname.as_deref(), Some("web2"));
    // Any MAC notation finds the machine; part of one too.
    for q in ["5254.0000.0101", "00-01-01", "web1"] {
        let (s, body) = send(&app, api("GET", &format!("/api/v1/machines?q={q}"), None)).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            body.contains("52:54:00:00:01:01") && !body.contains("01:02"),
            "{q}: {body}"
        );
    }
    let (s, body) = send(&app, api("GET", "/api/v1/machines?sort=size", None)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("last_seen"), "{body}");
    let (s, body) = send(
        &app,
        api(
            "GET",
            "/api/v1/machines?q=web&after=52:54:00:00:01:00",
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("offset"), "{body}");

    // The install token: none, then live (never the token itself), then burnt.
    let (s, body) = send(
        &app,
        api("GET", "/api/v1/machines/52:54:00:00:01:00/token", None),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body.contains("minted when it boots"), "{body}");
    let (s, script) = send(&app, get("/ipxe?mac=52-54-00-00-01-00&platform=pcbios")).await;
    assert_eq!(s, StatusCode::OK);
    let i = script.find("/config/").unwrap() + 8;
    let token = &script[i..i + 64];
    let (s, body) = send(
        &app,
        api("GET", "/api/v1/machines/52:54:00:00:01:00/token", None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let t: crate::dto::TokenStatus = serde_json::from_str(&body).unwrap();
    assert_eq!(t.state, "live");
    assert!(!body.contains(token), "{body}");
}

#[tokio::test]
async fn ui_bulk_enroll_checks_the_whole_form_before_enrolling_any() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (cookie, csrf) = ui_login(&app).await;
    for m in ["52-54-00-00-02-01", "52-54-00-00-02-02"] {
        let (s, _) = send(&app, get(&format!("/ipxe?mac={m}&platform=efi"))).await;
        assert_eq!(s, StatusCode::OK);
    }
    let macs = "mac=52:54:00:00:02:01&mac=52:54:00:00:02:02";
    // From the machine list: the enroll form, naming both.
    let (s, page) = send(
        &app,
        ui_post(
            "/ui/machines/bulk",
            &cookie,
            &format!("{macs}&action=enroll&_csrf={csrf}"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("Enroll 2 machines") && page.contains("52:54:00:00:02:02"),
        "{page}"
    );
    // A pattern that gives a bad hostname for one of them enrolls neither.
    let bad = format!("{macs}&profile=debian-12&hostname=-node{{n}}&vars=&labels=&_csrf={csrf}");
    let (s, page) = send(&app, ui_post("/ui/discovered/enroll", &cookie, &bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("hostname pattern"), "{page}");
    let (_, body) = send(&app, api("GET", "/api/v1/machines?state=discovered", None)).await;
    assert!(body.contains("02:01") && body.contains("02:02"), "{body}");
    let good = format!(
        "{macs}&profile=debian-12&hostname=node-{{n}}&vars=ntp%3Dpool.ntp.org&labels=rack%3Dr9&_csrf={csrf}"
    );
    let (s, page) = send(&app, ui_post("/ui/discovered/enroll", &cookie, &good)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("2 of 2 done."), "{page}");
    let (_, body) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:02:02", None)).await;
    let m: crate::dto::Machine = serde_json::from_str(&body).unwrap();
    assert_eq!(m.hostname.as_deref(), Some("node-2"));
    assert_eq!(m.labels.get("rack").map(String::as_str), Some("r9"));
    assert_eq!(m.vars.get("ntp").map(String::as_str), Some("pool.ntp.org"));
}

/// A request for each route pattern of both listeners, with its placeholders filled in.
fn filled(pattern: &str) -> String {
    let mut uri = pattern.to_string();
    for (from, to) in [
        ("{mac}", "52:54:00:00:00:01"),
        ("{token}", "install-token-7e57"),
        ("{artifact}", "user-data"),
        ("{*file}", "ipxe.efi"),
        ("{*path}", "vmlinuz"),
        ("{*rest}", "x"),
        ("{file}", "ui.css"),
        ("{name}", "debian"),
        ("{action}", "reprovision"),
    ] {
        uri = uri.replace(from, to);
    }
    uri
}

#[tokio::test]
async fn every_route_is_counted_under_its_pattern_and_no_path_becomes_a_label() {
    use super::{ADMIN_ROUTES, MACHINE_ROUTES};
    let d = tempfile::tempdir().unwrap();
    let st = state(d.path());
    let peer = MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 5555)));
    let machine = router(st.clone(), d.path(), true).layer(peer);
    let admin = admin_router(st.clone()).layer(peer);
    let count = |text: &str, listener: &str, route: &str| -> u64 {
        let series = format!(
            "provision_http_request_duration_seconds_count{{listener=\"{listener}\",route=\"{route}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    for (app, routes, listener) in [
        (&machine, MACHINE_ROUTES, "machine"),
        (&admin, ADMIN_ROUTES, "admin"),
    ] {
        for pattern in routes {
            let before = st.boot.scrape().await.unwrap();
            let uri = filled(pattern);
            let req = Request::get(&uri)
                .header(header::HOST, "10.0.0.1:8080")
                .body(Body::empty())
                .unwrap();
            let res = app.clone().oneshot(req).await.unwrap();
            let status = res.status();
            drop(res);
            let after = st.boot.scrape().await.unwrap();
            assert_eq!(
                count(&after, listener, pattern),
                count(&before, listener, pattern) + 1,
                "GET {uri} ({status}) on the {listener} listener is not counted as {pattern}"
            );
        }
    }
    // A path no route takes is `unmatched`; the path itself (a MAC, a token) is no label.
    let before = st.boot.scrape().await.unwrap();
    send(&machine, get("/nowhere/52:54:00:aa:bb:cc")).await;
    send(&admin, get("/api/v1/nowhere/secret-token-value")).await;
    let after = st.boot.scrape().await.unwrap();
    for listener in ["machine", "admin"] {
        assert_eq!(
            count(&after, listener, "unmatched"),
            count(&before, listener, "unmatched") + 1,
            "{listener}"
        );
    }
    for leak in [
        "nowhere",
        "52:54:00",
        "secret-token-value",
        "install-token-7e57",
    ] {
        assert!(!after.contains(leak), "{leak} in\n{after}");
    }
}

#[tokio::test]
async fn patch_changes_what_it_names_keeps_the_rest_and_refuses_bad_input_changing_nothing() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let (s, body) = send(
        &app,
        api(
            "POST",
            "/api/v1/machines",
            Some(serde_json::json!({
                "mac": "52-54-00-00-0d-01", "profile": "debian-12", "hostname": "web1",
                "vars": {"domain": "lab", "install_disk": "/dev/sda"}, "labels": {"rack": "r1"}
            })),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let patch =
        |body: serde_json::Value| api("PATCH", "/api/v1/machines/52:54:00:00:0d:01", Some(body));
    let (s, body) = send(
        &app,
        patch(serde_json::json!({
            "hostname": "web2", "set_vars": {"install_disk": "/dev/nvme0n1"},
            "unset_vars": ["domain"], "labels": {"rack": "r2", "role": "web"}
        })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["hostname"], "web2");
    assert_eq!(m["profile"], "debian-12", "not named: kept");
    assert_eq!(
        m["vars"],
        serde_json::json!({"install_disk": "/dev/nvme0n1"})
    );
    assert_eq!(
        m["labels"],
        serde_json::json!({"rack": "r2", "role": "web"})
    );
    assert_eq!(m["state"], "enrolled", "PATCH does not change the state");

    // Refused, with the reason, and nothing changed: an unknown profile (404), a hostname no
    // output can hold (422), an unknown machine (404).
    for (body, status, says) in [
        (
            serde_json::json!({"profile": "no-such", "hostname": "web3"}),
            StatusCode::NOT_FOUND,
            "no-such",
        ),
        (
            serde_json::json!({"hostname": "web 3; reboot"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "hostname",
        ),
    ] {
        let (s, text) = send(&app, patch(body)).await;
        assert_eq!(s, status, "{text}");
        assert!(text.contains(says), "{text}");
    }
    let (s, text) = send(
        &app,
        api(
            "PATCH",
            "/api/v1/machines/52:54:00:00:0d:99",
            Some(serde_json::json!({"hostname": "x"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{text}");
    let (_, body) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:0d:01", None)).await;
    let after: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(after, m, "a refused PATCH changed the machine");
}

/// The groups API: create, replace, read, delete with their statuses; the machine object
/// and the UI's machine page say which values came from a group, and the UI's edit form holds
/// only the machine's own values (saving it never copies a group's into the machine).
#[tokio::test]
async fn groups_through_the_api_and_the_machine_page() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let rack = serde_json::json!({"name": "rack3", "selector": {"rack": "3"},
        "profile": "debian-12", "vars": {"timezone": "Europe/Oslo"}, "labels": {"row": "b"}});
    let (s, body) = send(&app, api("POST", "/api/v1/groups", Some(rack.clone()))).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = send(&app, api("POST", "/api/v1/groups", Some(rack))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let site = serde_json::json!({"vars": {"domain": "site.example"}});
    let (s, body) = send(&app, api("PUT", "/api/v1/groups/site", Some(site.clone()))).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = send(&app, api("PUT", "/api/v1/groups/site", Some(site))).await;
    assert_eq!(s, StatusCode::OK, "replaced: {body}");
    let (s, body) = send(
        &app,
        api(
            "PUT",
            "/api/v1/groups/site",
            Some(serde_json::json!({"name": "other"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (s, body) = send(
        &app,
        api(
            "PUT",
            "/api/v1/groups/x",
            Some(serde_json::json!({"selectr": {}})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("unknown field `selectr`"), "{body}");
    let (s, body) = send(&app, api("GET", "/api/v1/groups", None)).await;
    assert_eq!(s, StatusCode::OK);
    let list: Vec<crate::dto::Group> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["rack3", "site"]
    );
    let (s, _) = send(&app, api("GET", "/api/v1/groups/nope", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let enroll = serde_json::json!({"mac": "52:54:00:00:00:61", "labels": {"rack": "3"},
        "vars": {"install_disk": "/dev/sdb"}});
    let (s, body) = send(&app, api("POST", "/api/v1/machines", Some(enroll))).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let m: crate::dto::Machine = serde_json::from_str(&body).unwrap();
    assert_eq!(m.profile.as_deref(), Some("debian-12"));
    assert_eq!(m.groups, ["rack3", "site"]);
    assert_eq!(m.inherited["profile"], "rack3");
    assert_eq!(m.inherited["vars.domain"], "site");
    assert!(!m.inherited.contains_key("vars.install_disk"));

    let (cookie, csrf) = ui_login(&app).await;
    let (s, page) = send(&app, ui_get("/ui/machines/52:54:00:00:00:61", &cookie)).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(
        page.contains("debian-12</a> <span class=\"muted from-group\">(group rack3)</span>"),
        "{page}"
    );
    assert!(
        page.contains("domain=site.example <span class=\"muted from-group\">(group site)</span>"),
        "{page}"
    );
    assert!(
        page.contains("<dd id=\"groups\">rack3, site</dd>"),
        "{page}"
    );
    let form = page.split_once("id=\"edit\"").unwrap().1;
    assert!(form.contains("install_disk=&#x2f;dev&#x2f;sdb"), "{form}");
    assert!(
        !form.contains("domain=site.example") && !form.contains("timezone"),
        "{form}"
    );
    // Saving the form as shown keeps the group's values the group's.
    let save =
        format!("_csrf={csrf}&hostname=&profile=&vars=install_disk%3D%2Fdev%2Fsdb&labels=rack%3D3");
    let (s, _) = send(
        &app,
        ui_post("/ui/machines/52:54:00:00:00:61/edit", &cookie, &save),
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, body) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:00:61", None)).await;
    let m: crate::dto::Machine = serde_json::from_str(&body).unwrap();
    assert_eq!(m.inherited["profile"], "rack3");
    assert_eq!(m.inherited["vars.timezone"], "rack3");

    let (s, page) = send(&app, ui_get("/ui/groups", &cookie)).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(
        page.contains("<tr id=\"group-rack3\"><td>rack3</td>"),
        "{page}"
    );
    assert!(
        page.contains("rack=3<br>") && page.contains("every machine"),
        "{page}"
    );

    let (s, body) = send(&app, api("DELETE", "/api/v1/groups/rack3", None)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("without a profile"), "{body}");
    let (s, _) = send(&app, api("DELETE", "/api/v1/groups/site", None)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = send(&app, api("DELETE", "/api/v1/groups/site", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// The rules API: create, replace (the count kept), read, delete with their statuses, the
/// read-only count ignored when given, and confirm of a proposal.
#[tokio::test]
async fn rules_through_the_api() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let rule = serde_json::json!({"name": "oui", "match": {"mac": "52-54-00-*"},
        "profile": "debian-12", "hostname": "n-{index:02}", "max": 3, "mode": "propose"});
    let (s, body) = send(&app, api("POST", "/api/v1/rules", Some(rule.clone()))).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let r: crate::dto::Rule = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (r.conditions["mac"].as_str(), r.priority, r.enabled, r.used),
        ("52:54:00:*", 100, true, 0)
    );
    let (s, _) = send(&app, api("POST", "/api/v1/rules", Some(rule))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, body) = send(
        &app,
        api(
            "PUT",
            "/api/v1/rules/oui",
            Some(serde_json::json!({"match": {"mac": "52:54:00:*"},
            "profile": "debian-12", "mode": "propose", "used": 99})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let r: crate::dto::Rule = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (r.used, r.max, r.hostname),
        (0, None, None),
        "replaced whole; used ignored"
    );
    let (s, body) = send(
        &app,
        api(
            "PUT",
            "/api/v1/rules/x",
            Some(serde_json::json!({"matches": {}})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (s, _) = send(&app, api("GET", "/api/v1/rules/nope", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A machine boots, is proposed, and is confirmed through the API.
    let (s, _) = send(&app, get("/ipxe?mac=52:54:00:00:0c:01&platform=pcbios")).await;
    assert_eq!(s, StatusCode::OK);
    let (_, body) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:0c:01", None)).await;
    let m: crate::dto::Machine = serde_json::from_str(&body).unwrap();
    assert_eq!(m.proposed_rule.as_deref(), Some("oui"));
    let (s, body) = send(
        &app,
        api("POST", "/api/v1/machines/52:54:00:00:0c:01/confirm", None),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let m: crate::dto::Machine = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (m.state, m.proposed_rule),
        (crate::policy::State::Enrolled, None)
    );
    let (s, body) = send(
        &app,
        api("POST", "/api/v1/machines/52:54:00:00:0c:01/confirm", None),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (_, body) = send(&app, api("GET", "/api/v1/rules", None)).await;
    let list: Vec<crate::dto::Rule> = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0].used, 1);

    // The web UI: the inbox shows the proposal with its button, which enrolls.
    let (s, _) = send(&app, get("/ipxe?mac=52:54:00:00:0c:02&platform=pcbios")).await;
    assert_eq!(s, StatusCode::OK);
    let (cookie, csrf) = ui_login(&app).await;
    let (s, page) = send(&app, ui_get("/ui/discovered", &cookie)).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("rule oui proposes it"), "{page}");
    assert!(
        page.contains("formaction=\"/ui/machines/52:54:00:00:0c:02/confirm\""),
        "{page}"
    );
    let (s, page) = send(&app, ui_get("/ui/machines/52:54:00:00:0c:02", &cookie)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("id=\"action-confirm\""), "{page}");
    let (s, _) = send(
        &app,
        ui_post(
            "/ui/machines/52:54:00:00:0c:02/confirm",
            &cookie,
            &format!("_csrf={csrf}"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, body) = send(&app, api("GET", "/api/v1/machines/52:54:00:00:0c:02", None)).await;
    let m: crate::dto::Machine = serde_json::from_str(&body).unwrap();
    assert_eq!(m.state, crate::policy::State::Enrolled);
    let (s, page) = send(&app, ui_get("/ui/rules", &cookie)).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(
        page.contains("<tr id=\"rule-oui\"><td>100</td><td>oui</td>"),
        "{page}"
    );
    assert!(page.contains("<td>2</td>"), "two enrolled: {page}");

    let (s, _) = send(&app, api("DELETE", "/api/v1/rules/oui", None)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = send(&app, api("DELETE", "/api/v1/rules/oui", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

fn file_request(uri: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(uri)
        .header(header::HOST, "10.0.0.1:8080")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/yaml")
        .body(Body::from(body))
        .unwrap()
}

/// The inventory file routes: an apply answers its changes as JSON and an export the file; a
/// problem is 422 with its line, a body that is not UTF-8 or over the limit is refused before
/// anything reads it, an unknown format is named.
#[tokio::test]
async fn inventory_files_through_the_api() {
    let d = tempfile::tempdir().unwrap();
    let app = app(d.path());
    let file = b"machines:\n  - mac: 52:54:00:00:00:01\n    profile: debian-12\n".to_vec();
    let (s, body) = send(
        &app,
        file_request("/api/v1/inventory?dry_run=true", file.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let report: crate::dto::ApplyReport = serde_json::from_str(&body).unwrap();
    assert!(report.dry_run && report.changes.len() == 1, "{body}");
    let (s, body) = send(&app, file_request("/api/v1/inventory", file)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = send(&app, api("GET", "/api/v1/inventory?format=csv", None)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        "mac,profile,hostname,uuid,serial\n52:54:00:00:00:01,debian-12,,,\n"
    );
    let (s, body) = send(
        &app,
        file_request(
            "/api/v1/inventory",
            b"machines:\n  - mac: 52:54:00:00:00:02\n    profile: nope\n".to_vec(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body.contains("line 3: machines[0].profile: no profile named"),
        "{body}"
    );
    let (s, body) = send(&app, file_request("/api/v1/inventory", vec![0xff, 0xfe])).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("UTF-8"), "{body}");
    let (s, _) = send(
        &app,
        file_request(
            "/api/v1/inventory",
            vec![b'#'; super::INVENTORY_FILE_MAX + 1],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, body) = send(&app, api("GET", "/api/v1/inventory?format=json", None)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("yaml, toml or csv"), "{body}");
    let (s, body) = send(&app, api("GET", "/api/v1/machines", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !body.contains("00:00:00:02"),
        "nothing of the refused file: {body}"
    );
}
