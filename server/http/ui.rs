//! The web UI at `/ui/` on the admin listener: server-rendered pages (`render::ui`), htmx and
//! a small live-link script from `web/static/`, all embedded in the binary.
//!
//! Every action calls the admin service as the REST API does, so the UI can do nothing the
//! API cannot, and its errors are the API's words (`AppError`), shown on the page.
//!
//! Security, in the order a request meets it:
//! - Login turns the admin token (checked by `AdminAuth::check`, with its guessing limit)
//!   into a session cookie: random id, `HttpOnly`, `SameSite=Strict`, `Path=/ui`, an
//!   8-hour `Max-Age`, and `Secure` when the listener is TLS. Token rotation ends sessions.
//! - Every state-changing request is a POST that must carry the session's CSRF token (form
//!   field `_csrf`, or the `X-CSRF-Token` header htmx sends) and must not say it came from
//!   another site (`Sec-Fetch-Site`); the login form too, so a page elsewhere cannot log a
//!   browser into a session of its choosing.
//! - Every response carries a Content-Security-Policy that allows scripts, styles and
//!   connections from this origin only, no inline script or style, no eval, no framing.
//! - Every value in a page is HTML-escaped by the templates (`render::ui`); the live stream
//!   carries JSON that the script never inserts as HTML.

// Handlers answer with a `Response` either way; the helpers' `Err` is the page to send, and
// boxing it would only move it.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use include_dir::{include_dir, Dir};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::{Refusal, SESSION_TTL};
use super::{machine_base_url, AppError, AppState};
use crate::admin::{hostname_from_pattern, search_term};
use crate::dto::{self, EnrollRequest, UpdateRequest};
use crate::error::Error;
use crate::mac::Mac;
use crate::policy::{State as MState, ALL_STATES};
use crate::render::ui::Pages;
use crate::store::{EventQuery, MachineSearch, SortKey};

static STATIC: Dir = include_dir!("$CARGO_MANIFEST_DIR/web/static");

/// The session cookie's name.
const COOKIE: &str = "provision_session";
/// Machines per page in lists.
const PER_PAGE: usize = 50;
/// Live streams open at once (each is one admin connection); past it a browser is told to
/// come back later (503) and its script retries.
const MAX_STREAMS: usize = 64;
/// A stream sends a comment this often when nothing happens, so proxies and the browser
/// keep the connection and a dead one is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Largest form body (a bulk action over a page of machines is ~3 KiB).
const MAX_FORM: usize = 256 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the UI holds besides the services.
pub struct Ui {
    pages: Pages,
    /// Cookies get `Secure` (the admin listener speaks TLS).
    secure: bool,
    /// What the daemon listens on, for the dashboard: (what, address).
    listeners: Vec<(String, String)>,
    /// When the daemon started, Unix ms.
    started: i64,
    streams: Arc<tokio::sync::Semaphore>,
    /// Ends the live streams when the daemon stops (a browser would otherwise hold its
    /// connection, and the admin listener's graceful shutdown, open).
    shutdown: tokio_util::sync::CancellationToken,
}

impl Ui {
    /// The UI's state: `secure` when the admin listener is TLS; `listeners` as the dashboard
    /// should list them.
    pub fn new(
        secure: bool,
        listeners: Vec<(String, String)>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Ui, Error> {
        Ok(Ui {
            shutdown,
            pages: Pages::new()?,
            secure,
            listeners,
            started: crate::store::now_ms(),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        })
    }
}

/// The UI's routes, merged into the admin router, with the security headers on each.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(dashboard))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/static/{file}", get(static_file))
        .route("/ui/stream", get(stream))
        .route("/ui/machines", get(machines))
        .route("/ui/machines/bulk", post(bulk))
        .route("/ui/machines/{mac}", get(machine))
        .route("/ui/machines/{mac}/edit", post(edit))
        .route("/ui/machines/{mac}/{action}", post(machine_action))
        .route("/ui/machines/{mac}/preview/{artifact}", get(preview))
        .route("/ui/discovered", get(discovered))
        .route("/ui/discovered/enroll", post(enroll_discovered))
        .route("/ui/enroll", get(enroll_page).post(enroll))
        .route("/ui/groups", get(groups))
        .route("/ui/rules", get(rules))
        .route("/ui/profiles", get(profiles))
        .route("/ui/profiles/{name}", get(profile))
        .route("/ui/profiles/{name}/preview", get(profile_preview))
        .route("/ui/reload", post(reload))
        .route("/ui/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::from_fn(headers))
}

/// Headers every UI response carries.
async fn headers(req: Request, next: Next) -> Response {
    let is_static = req.uri().path().starts_with("/ui/static/");
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !is_static {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

// ---------------------------------------------------------------------------------------
// Sessions and forms

/// A request's logged-in session: its CSRF token, for the forms the page renders.
struct Session {
    csrf: String,
}

fn cookie_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The session, or the answer for a request without one: a page (and the stream, which the
/// script then reopens with backoff) goes to the login form; an htmx fragment request gets
/// 401 with `HX-Redirect`, since following a redirect would swap the login form into a table.
fn session(st: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    if let Some(csrf) = cookie_id(headers).and_then(|id| st.auth.session(id)) {
        return Ok(Session { csrf });
    }
    if headers.contains_key("hx-request") {
        let mut r = (StatusCode::UNAUTHORIZED, "session ended; log in again").into_response();
        r.headers_mut()
            .insert("hx-redirect", HeaderValue::from_static("/ui/login"));
        return Err(r);
    }
    Err(Redirect::to("/ui/login").into_response())
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Response> {
        session(st, &parts.headers)
    }
}

impl FromRequest<AppState> for Form {
    type Rejection = Response;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, Response> {
        let headers = req.headers().clone();
        let body = axum::body::to_bytes(req.into_body(), MAX_FORM)
            .await
            .map_err(|_| forbidden(st, "the form is too large"))?;
        form(st, &headers, &body)
    }
}

/// A POST's fields, after the session and its CSRF token are checked.
struct Form {
    session: Session,
    fields: Vec<(String, String)>,
}

impl Form {
    fn get(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn forbidden(st: &AppState, why: &str) -> Response {
    let mut r = error_page(st, None, StatusCode::FORBIDDEN, "Refused", why, "/ui/");
    *r.status_mut() = StatusCode::FORBIDDEN;
    r
}

/// A request another site made the browser send.
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site")
}

fn parse_fields(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    serde_urlencoded::from_bytes(body).map_err(|e| format!("the form did not parse: {e}"))
}

/// Checks the session and the CSRF token of a POST and parses its form body.
fn form(st: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Form, Response> {
    let session = session(st, headers)?;
    if cross_site(headers) {
        return Err(forbidden(
            st,
            "this request came from another site; the UI accepts changes only from its own pages",
        ));
    }
    if body.len() > MAX_FORM {
        return Err(forbidden(st, "the form is too large"));
    }
    let fields = parse_fields(body).map_err(|e| forbidden(st, &e))?;
    let given = fields
        .iter()
        .find(|(k, _)| k == "_csrf")
        .map(|(_, v)| v.as_str())
        .or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()));
    let ok = given.is_some_and(|g| {
        use subtle::ConstantTimeEq;
        bool::from(g.as_bytes().ct_eq(session.csrf.as_bytes()))
    });
    if !ok {
        return Err(forbidden(
            st,
            "the form's CSRF token is missing or stale (the page was opened before a new login); reload the page and try again",
        ));
    }
    Ok(Form { session, fields })
}

// ---------------------------------------------------------------------------------------
// Rendering

/// Renders `template` with the fields every page has and `data`.
fn page(
    st: &AppState,
    session: Option<&Session>,
    template: &str,
    title: &str,
    nav: &str,
    data: Value,
) -> Response {
    let mut ctx = json!({
        "title": title,
        "nav": nav,
        "csrf": session.map(|s| s.csrf.clone()),
        "version": env!("CARGO_PKG_VERSION"),
        "flash": null,
    });
    if let (Value::Object(base), Value::Object(extra)) = (&mut ctx, data) {
        base.extend(extra);
    }
    match st.ui.pages.render(template, ctx) {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => {
            // A page that does not render is our defect; say so without the page.
            tracing::error!("web UI page {template}: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("provision: the page {template} failed to render: {e}\n"),
            )
                .into_response()
        }
    }
}

fn error_page(
    st: &AppState,
    session: Option<&Session>,
    status: StatusCode,
    title: &str,
    message: &str,
    back: &str,
) -> Response {
    let mut r = page(
        st,
        session,
        "error.html",
        title,
        "",
        json!({ "message": message, "back": back }),
    );
    *r.status_mut() = status;
    r
}

/// A service error as a page: the API's status code and words.
fn failed(st: &AppState, s: &Session, e: impl Into<AppError>, back: &str) -> Response {
    let e: AppError = e.into();
    let title = e.status.canonical_reason().unwrap_or("Error").to_string();
    error_page(st, Some(s), e.status, &title, &e.message, back)
}

fn see_other(to: &str) -> Response {
    // 303: the browser GETs the page after a POST, so reload does not repeat the action.
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

fn pairs_text(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// `key=value` lines (blank lines skipped) as a map, or which line is not one.
fn parse_pairs(what: &str, text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            Error::Invalid(format!("{what}, line {}: {line:?} is not key=value", i + 1))
        })?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn profile_names(st: &AppState) -> Vec<String> {
    st.admin.catalog().profiles().keys().cloned().collect()
}

fn parse_mac(s: &str) -> Result<Mac, Error> {
    s.parse()
        .map_err(|e: crate::mac::MacError| Error::Invalid(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// Login

async fn login_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if session(&st, &headers).is_ok() {
        return see_other("/ui/");
    }
    page(
        &st,
        None,
        "login.html",
        "Log in",
        "",
        json!({ "error": null }),
    )
}

async fn login(State(st): State<AppState>, req: Request) -> Response {
    let who = super::peer_ip(req.extensions());
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), MAX_FORM).await {
        Ok(b) => b,
        Err(_) => return forbidden(&st, "the form is too large"),
    };
    let fail = |status: StatusCode, msg: &str| {
        let mut r = page(
            &st,
            None,
            "login.html",
            "Log in",
            "",
            json!({ "error": msg }),
        );
        *r.status_mut() = status;
        r
    };
    if cross_site(&headers) {
        return fail(
            StatusCode::FORBIDDEN,
            "this login came from another site's page; log in from this page",
        );
    }
    let fields = parse_fields(&body).unwrap_or_default();
    let token = fields
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim())
        .filter(|t| !t.is_empty());
    match st.auth.check(who, token) {
        Ok(()) => {
            let (id, _) = st.auth.start_session();
            let mut cookie = format!(
                "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            if st.ui.secure {
                cookie.push_str("; Secure");
            }
            let mut r = see_other("/ui/");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(Refusal::Missing) => fail(StatusCode::UNAUTHORIZED, "paste the admin token"),
        Err(Refusal::Wrong) => fail(
            StatusCode::UNAUTHORIZED,
            "wrong admin token; it is in the daemon's data directory, file admin-token",
        ),
        Err(Refusal::TooMany(wait)) => fail(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many wrong tokens from {who}; try again in {} s",
                wait.as_secs().max(1)
            ),
        ),
    }
}

async fn logout(State(st): State<AppState>, headers: HeaderMap, _: Form) -> Response {
    if let Some(id) = cookie_id(&headers) {
        st.auth.end_session(id);
    }
    let mut r = see_other("/ui/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "provision_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

// ---------------------------------------------------------------------------------------
// Static files

/// The embedded assets. Written out here rather than with `tower_http::ServeDir` because
/// they are compiled into the binary, not on disk; htmx is served gzipped when the browser
/// takes it (its gzip file ships beside it).
async fn static_file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(f) = STATIC.get_file(&file).filter(|_| !file.ends_with(".gz")) else {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    };
    let ctype = match file.rsplit('.').next() {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    let gzip_ok = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let gz = STATIC.get_file(format!("{file}.gz"));
    let (body, encoding) = match gz {
        Some(g) if gzip_ok => (g.contents(), Some("gzip")),
        _ => (f.contents(), None),
    };
    let mut r = (
        [
            (header::CONTENT_TYPE, ctype),
            // URLs carry the version (`?v=`), so a new binary is a new URL.
            (header::CACHE_CONTROL, "public, max-age=86400"),
            (header::VARY, "Accept-Encoding"),
        ],
        body,
    )
        .into_response();
    if let Some(e) = encoding {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
    }
    r
}

async fn not_found(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = session(&st, &headers).ok();
    error_page(
        &st,
        s.as_ref(),
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
        "/ui/",
    )
}

// ---------------------------------------------------------------------------------------
// Live stream

#[derive(Deserialize)]
struct StreamQuery {
    after: Option<i64>,
}

/// `GET /ui/stream`: server-sent events, one per inventory event after the last one the
/// browser saw (`Last-Event-ID` on the browser's own reconnect, `?after=` on the script's),
/// or from now. Each stream keeps only its cursor: it reads the next events from the
/// inventory when the writer says there are some and when the socket takes more, so a slow
/// browser holds no queue, and if it falls behind the retention bounds it skips what was
/// pruned. At most [`MAX_STREAMS`] at once.
async fn stream(
    State(st): State<AppState>,
    _: Session,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    let Ok(permit) = st.ui.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "too many live views open\n",
        )
            .into_response();
    };
    let mut feed = st.admin.event_feed();
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let start = match from_header.or(q.after) {
        Some(id) => id.max(0),
        None => *feed.borrow_and_update(),
    };
    let live = Live {
        last: start,
        opened: false,
        feed,
        admin: st.admin.clone(),
        cookie: cookie_id(&headers).map(str::to_string),
        auth: st.auth.clone(),
        shutdown: st.ui.shutdown.clone(),
        _permit: permit,
    };
    let body = futures_lite::stream::unfold(live, |mut live| async move {
        let chunk = live.next().await?;
        Some((Ok::<_, Infallible>(chunk), live))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// One browser's live stream: its cursor and what it needs to read on.
struct Live {
    /// The last event id sent.
    last: i64,
    opened: bool,
    feed: tokio::sync::watch::Receiver<i64>,
    admin: Arc<crate::admin::AdminService>,
    cookie: Option<String>,
    auth: Arc<super::auth::AdminAuth>,
    shutdown: tokio_util::sync::CancellationToken,
    /// Counts this stream against [`MAX_STREAMS`] while it lives.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Live {
    /// The next chunk of the stream, or `None` to end it.
    async fn next(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            // Tells the browser how soon to reconnect, and opens the stream at once.
            return Some(Bytes::from("retry: 2000\n: live\n\n"));
        }
        loop {
            // A session that ended (logout, rotation, expiry) ends its stream.
            let c = self.cookie.as_deref()?;
            self.auth.session(c)?;
            // Marked seen before the read: a commit after the read wakes the wait below.
            self.feed.borrow_and_update();
            let events = self
                .admin
                .committed_events(EventQuery {
                    after: self.last,
                    limit: 200,
                    ..Default::default()
                })
                .await
                .ok()?;
            if !events.is_empty() {
                let mut out = String::new();
                for e in events {
                    self.last = e.id;
                    let e = dto::Event::from(e);
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    out.push_str(&format!("id: {}\nevent: event\ndata: {data}\n\n", e.id));
                }
                return Some(Bytes::from(out));
            }
            let changed = tokio::select! {
                c = tokio::time::timeout(KEEPALIVE, self.feed.changed()) => c,
                _ = self.shutdown.cancelled() => return None,
            };
            match changed {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return None,
                Err(_) => return Some(Bytes::from(": ping\n\n")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dashboard

#[derive(Serialize)]
struct Problem {
    mac: Mac,
    hostname: Option<String>,
    state: MState,
    why: String,
    since: i64,
}

/// Failed machines (newest first) and installs running past their profile's install time.
async fn problems(st: &AppState) -> Result<(Vec<Problem>, bool), Error> {
    const SHOWN: usize = 20;
    let now = crate::store::now_ms();
    let failed = st
        .admin
        .search(MachineSearch {
            state: Some(MState::Failed),
            sort: SortKey::InState,
            descending: true,
            limit: SHOWN,
            ..Default::default()
        })
        .await?;
    let mut out: Vec<Problem> = failed
        .machines
        .into_iter()
        .map(|m| Problem {
            why: match &m.failure {
                Some(f) => format!("failed at {}: {}", f.step, f.reason),
                None => "failed".into(),
            },
            mac: m.mac,
            hostname: m.hostname,
            state: m.state,
            since: m.state_at,
        })
        .collect();
    let mut more = failed.total as usize > SHOWN;
    let cat = st.admin.catalog();
    for (state, sort) in [
        (MState::Installing, SortKey::InState),
        (MState::Registering, SortKey::InState),
    ] {
        let page = st
            .admin
            .search(MachineSearch {
                state: Some(state),
                sort,
                limit: SHOWN,
                ..Default::default()
            })
            .await?;
        for m in page.machines {
            let expected = m
                .profile
                .as_deref()
                .and_then(|p| cat.profile(p).ok())
                .map_or(crate::render::DEFAULT_INSTALL_TIME, |p| p.install_time());
            let took = Duration::from_millis((now - m.state_at).max(0) as u64);
            let token = if state == MState::Installing {
                st.admin.token_status(&m).await?
            } else {
                None
            };
            let why = match token {
                Some(t) if t.state == "expired" => {
                    "install token expired before the phone-home; the sweeper fails it within 30 s"
                        .to_string()
                }
                _ if took > expected => format!(
                    "{state} for {} (the profile expects {})",
                    humantime::format_duration(Duration::from_secs(took.as_secs() / 60 * 60)),
                    humantime::format_duration(expected)
                ),
                _ => continue,
            };
            if out.len() >= 2 * SHOWN {
                more = true;
                break;
            }
            out.push(Problem {
                mac: m.mac,
                hostname: m.hostname,
                state: m.state,
                why,
                since: m.state_at,
            });
        }
    }
    Ok((out, more))
}

async fn dashboard(State(st): State<AppState>, s: Session) -> Response {
    dashboard_page(&st, &s, None).await
}

async fn dashboard_page(st: &AppState, s: &Session, flash: Option<String>) -> Response {
    let result = async {
        let (counts, stats) = st.admin.status().await?;
        let (problems, more) = problems(st).await?;
        let events = st
            .admin
            .events(EventQuery {
                tail: true,
                limit: 15,
                ..Default::default()
            })
            .await?;
        Ok::<_, Error>((counts, stats, problems, more, events))
    }
    .await;
    let (counts, stats, problems, more, events) = match result {
        Ok(v) => v,
        Err(e) => return failed(st, s, e, "/ui/"),
    };
    let events: Vec<dto::Event> = events.into_iter().rev().map(Into::into).collect();
    let total: u64 = counts.values().sum();
    let counts: Vec<Value> = ALL_STATES
        .iter()
        .map(|st| json!({ "state": st, "n": counts.get(st).copied().unwrap_or(0) }))
        .collect();
    let listeners: Vec<Value> = st
        .ui
        .listeners
        .iter()
        .map(|(w, a)| json!({ "what": w, "addr": a }))
        .collect();
    page(
        st,
        Some(s),
        "dashboard.html",
        "Dashboard",
        "dashboard",
        json!({
            "flash": flash,
            "total": total,
            "counts": counts,
            "problems": problems,
            "problems_more": more,
            "events": events,
            "listeners": listeners,
            "started": st.ui.started,
            "profiles": st.admin.catalog().profiles().len(),
            "stats": stats,
        }),
    )
}

async fn reload(State(st): State<AppState>, f: Form) -> Response {
    match st.admin.reload() {
        Ok(n) => dashboard_page(&st, &f.session, Some(format!("Reloaded: {n} profiles."))).await,
        Err(e) => failed(&st, &f.session, e, "/ui/"),
    }
}

// ---------------------------------------------------------------------------------------
// Machines

#[derive(Deserialize, Default)]
struct ListQuery {
    state: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    dir: Option<String>,
    page: Option<usize>,
}

/// A list URL with these parameters (empty ones left out).
fn list_url(path: &str, params: &[(&str, &str)]) -> String {
    let q: Vec<(&str, &str)> = params
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .copied()
        .collect();
    if q.is_empty() {
        return path.to_string();
    }
    format!(
        "{path}?{}",
        serde_urlencoded::to_string(&q).unwrap_or_default()
    )
}

async fn machines(State(st): State<AppState>, s: Session, Query(q): Query<ListQuery>) -> Response {
    let state_s = q.state.clone().unwrap_or_default();
    let state = match state_s.as_str() {
        "" => None,
        x => match x.parse::<MState>() {
            Ok(v) => Some(v),
            Err(e) => return failed(&st, &s, Error::Invalid(e), "/ui/machines"),
        },
    };
    let text = q.q.clone().unwrap_or_default();
    let (term, search_error) = match search_term(&text) {
        Ok(t) => (t, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let sort_s = q.sort.clone().unwrap_or_else(|| "mac".into());
    let sort: SortKey = match sort_s.parse() {
        Ok(k) => k,
        Err(e) => return failed(&st, &s, Error::Invalid(e), "/ui/machines"),
    };
    let desc = q.dir.as_deref() == Some("desc");
    let page_no = q.page.unwrap_or(1).max(1);
    let result = async {
        let counts = st.admin.status().await?.0;
        let found = if search_error.is_some() {
            Default::default()
        } else {
            st.admin
                .search(MachineSearch {
                    state,
                    term,
                    sort,
                    descending: desc,
                    offset: (page_no - 1) * PER_PAGE,
                    limit: PER_PAGE,
                })
                .await?
        };
        Ok::<_, Error>((counts, found))
    }
    .await;
    let (counts, found) = match result {
        Ok(v) => v,
        Err(e) => return failed(&st, &s, e, "/ui/machines"),
    };
    let pages = (found.total as usize).div_ceil(PER_PAGE).max(1);
    let dir_s = if desc { "desc" } else { "" };
    let url = |state: &str, sort: &str, dir: &str, page: usize| {
        let p = page.to_string();
        list_url(
            "/ui/machines",
            &[
                ("state", state),
                ("q", &text),
                ("sort", if sort == "mac" { "" } else { sort }),
                ("dir", dir),
                ("page", if page > 1 { &p } else { "" }),
            ],
        )
    };
    let sort_link = |key: &str| {
        // A second click on the current column turns the order round.
        let dir = if sort_s == key && !desc { "desc" } else { "" };
        url(&state_s, key, dir, 1)
    };
    let mut tabs = vec![json!({
        "label": "all",
        "n": counts.values().sum::<u64>(),
        "href": url("", &sort_s, dir_s, 1),
        "current": state.is_none(),
    })];
    for s in ALL_STATES {
        tabs.push(json!({
            "label": s.as_str().replace('_', " "),
            "n": counts.get(&s).copied().unwrap_or(0),
            "href": url(s.as_str(), &sort_s, dir_s, 1),
            "current": state == Some(s),
        }));
    }
    let machines: Vec<dto::Machine> = found.machines.into_iter().map(Into::into).collect();
    let first = (page_no - 1) * PER_PAGE + 1;
    page(
        &st,
        Some(&s),
        "machines.html",
        "Machines",
        "machines",
        json!({
            "tabs": tabs,
            "state": state_s,
            "q": text,
            "search_error": search_error,
            "total": found.total,
            "first": first,
            "last": first + machines.len().saturating_sub(1),
            "machines": machines,
            "page": page_no,
            "pages": pages,
            "prev": (page_no > 1).then(|| url(&state_s, &sort_s, dir_s, page_no - 1)),
            "next": (page_no < pages).then(|| url(&state_s, &sort_s, dir_s, page_no + 1)),
            "self_url": url(&state_s, &sort_s, dir_s, page_no),
            "sort": {
                "mac": sort_link("mac"),
                "hostname": sort_link("hostname"),
                "state": sort_link("state"),
                "in_state": sort_link("in_state"),
                "last_seen": sort_link("last_seen"),
            },
        }),
    )
}

/// The machines a bulk form names, each looked up (unknown ones are errors to show).
async fn selected(st: &AppState, f: &Form) -> Result<Vec<dto::Machine>, Error> {
    let macs = f.all("mac");
    if macs.is_empty() {
        return Err(Error::Invalid(
            "no machine selected: tick the machines first".into(),
        ));
    }
    if macs.len() > crate::store::MAX_PAGE {
        return Err(Error::Invalid(format!(
            "at most {} machines at once",
            crate::store::MAX_PAGE
        )));
    }
    let mut out = Vec::with_capacity(macs.len());
    for m in macs {
        out.push(st.admin.machine(parse_mac(m)?).await?.into());
    }
    Ok(out)
}

/// The confirmation page for `action` on `machines`, which posts back to `to` with
/// `confirm=yes`.
fn confirm(
    st: &AppState,
    s: &Session,
    to: &str,
    action: &str,
    machines: &[dto::Machine],
    back: &str,
) -> Response {
    let n = machines.len();
    let (them, each, its) = if n == 1 {
        (format!("machine {}", machines[0].mac), "It", "Its")
    } else {
        (format!("these {n} machines"), "Each", "Each one's")
    };
    let (title, question, button) = match action {
        "reprovision" => (
            "Reprovision",
            format!("Reinstall {them}? {each} goes back to enrolled with a new install generation: its current install token stops working, its node certificate is revoked, and its next network boot wipes its disk and installs its profile."),
            format!("Reprovision {n}"),
        ),
        "delete" => (
            "Delete",
            format!("Delete {them} from the inventory? {its} host keys, token and certificate go (the certificate is revoked); the events stay. A deleted machine that boots again shows up as discovered."),
            format!("Delete {n}"),
        ),
        _ => (
            "Register again",
            format!("Run registration again on {them}? Every step runs over SSH against the pinned host key; the steps are idempotent."),
            format!("Register {n}"),
        ),
    };
    let mut hidden: Vec<Value> = machines
        .iter()
        .map(|m| json!({ "name": "mac", "value": m.mac }))
        .collect();
    hidden.push(json!({ "name": "action", "value": action }));
    page(
        st,
        Some(s),
        "confirm.html",
        title,
        "machines",
        json!({
            "question": question,
            "button": button,
            "action": to,
            "hidden": hidden,
            "machines": machines,
            "back": back,
        }),
    )
}

/// Runs `action` on each machine through the admin service; one result line each.
async fn run_action(st: &AppState, action: &str, macs: &[Mac]) -> Vec<Value> {
    let mut out = Vec::new();
    for &mac in macs {
        let r = match action {
            "reprovision" => st.admin.reprovision(mac).await.map(|m| {
                format!(
                    "reprovisioned: generation {}, installs at its next boot",
                    m.generation
                )
            }),
            "delete" => st.admin.delete(mac).await.map(|()| "deleted".to_string()),
            "confirm" => st.admin.confirm(mac).await.map(|m| {
                format!(
                    "enrolled with profile {}: installs at its next boot",
                    m.profile.as_deref().unwrap_or("?")
                )
            }),
            "register" => st
                .admin
                .register(mac)
                .await
                .map(|m| format!("registration started ({})", m.state)),
            other => Err(Error::Invalid(format!("no such action {other:?}"))),
        };
        out.push(match r {
            Ok(msg) => json!({ "mac": mac, "ok": true, "message": msg }),
            Err(e) => json!({ "mac": mac, "ok": false, "message": AppError::from(e).message }),
        });
    }
    out
}

fn results(st: &AppState, s: &Session, title: &str, results: Vec<Value>, back: &str) -> Response {
    let ok = results.iter().filter(|r| r["ok"] == true).count();
    let summary = format!("{ok} of {} done.", results.len());
    page(
        st,
        Some(s),
        "results.html",
        title,
        "machines",
        json!({ "summary": summary, "results": results, "back": back }),
    )
}

const ACTIONS: [&str; 4] = ["reprovision", "delete", "register", "confirm"];

async fn bulk(State(st): State<AppState>, f: Form) -> Response {
    let action = f.get("action").to_string();
    if action == "enroll" {
        // Enrolling needs a profile and the rest: the inbox's form, for these machines.
        return match selected(&st, &f).await {
            Ok(machines) => page(
                &st,
                Some(&f.session),
                "enroll_many.html",
                "Enroll",
                "machines",
                json!({ "machines": machines, "profiles": profile_names(&st) }),
            ),
            Err(e) => failed(&st, &f.session, e, "/ui/machines"),
        };
    }
    if !ACTIONS.contains(&action.as_str()) {
        return failed(
            &st,
            &f.session,
            Error::Invalid(format!("no such action {action:?}")),
            "/ui/machines",
        );
    }
    let machines = match selected(&st, &f).await {
        Ok(m) => m,
        Err(e) => return failed(&st, &f.session, e, "/ui/machines"),
    };
    if f.get("confirm") != "yes" {
        return confirm(
            &st,
            &f.session,
            "/ui/machines/bulk",
            &action,
            &machines,
            "/ui/machines",
        );
    }
    let macs: Vec<Mac> = machines.iter().map(|m| m.mac).collect();
    let out = run_action(&st, &action, &macs).await;
    results(&st, &f.session, "Done", out, "/ui/machines")
}

async fn machine_action(
    State(st): State<AppState>,
    Path((mac, action)): Path<(String, String)>,
    f: Form,
) -> Response {
    let back = format!("/ui/machines/{mac}");
    if !ACTIONS.contains(&action.as_str()) {
        return failed(
            &st,
            &f.session,
            Error::Invalid(format!("no such action {action:?}")),
            &back,
        );
    }
    let m = match async { st.admin.machine(parse_mac(&mac)?).await }.await {
        Ok(m) => m,
        Err(e) => return failed(&st, &f.session, e, &back),
    };
    // Reinstalling and deleting ask first; registering again changes nothing on the node,
    // and confirming a rule's proposal is itself the operator's answer.
    if !matches!(action.as_str(), "register" | "confirm") && f.get("confirm") != "yes" {
        let to = format!("/ui/machines/{}/{action}", m.mac);
        return confirm(&st, &f.session, &to, &action, &[m.into()], &back);
    }
    let out = run_action(&st, &action, &[m.mac]).await;
    if out[0]["ok"] == true && action != "delete" {
        return see_other(&format!("/ui/machines/{}", m.mac));
    }
    results(&st, &f.session, "Done", out, "/ui/machines")
}

async fn machine(State(st): State<AppState>, s: Session, Path(mac): Path<String>) -> Response {
    machine_page(&st, &s, &mac, None, None).await
}

/// The machine page; after a refused edit, with the operator's input and the API's error.
async fn machine_page(
    st: &AppState,
    s: &Session,
    mac: &str,
    form_in: Option<Value>,
    edit_error: Option<String>,
) -> Response {
    let loaded = async {
        let mac = parse_mac(mac)?;
        let m = st.admin.machine(mac).await?;
        let events = st
            .admin
            .events(EventQuery {
                mac: Some(mac),
                tail: true,
                ..Default::default()
            })
            .await?;
        let token = st.admin.token_status(&m).await?;
        Ok::<_, Error>((m, events, token))
    }
    .await;
    let (m, events, token) = match loaded {
        Ok(v) => v,
        Err(e) => return failed(st, s, e, "/ui/machines"),
    };
    let timeline = crate::timeline::timeline(&events);
    let keys: Vec<Value> = m
        .host_keys
        .iter()
        .map(|k| match crate::registrar::ssh::host_key_fingerprint(k) {
            Ok((alg, fp)) => json!({ "algorithm": alg, "fingerprint": fp }),
            Err(e) => json!({ "algorithm": "?", "fingerprint": format!("unreadable key: {e}") }),
        })
        .collect();
    let proposed = m.proposed_rule.is_some();
    let actions: Vec<Value> = [
        ("confirm", "Confirm the rule's enrollment", "primary"),
        ("reprovision", "Reprovision…", "danger"),
        ("register", "Register again", ""),
        ("delete", "Delete…", "danger"),
    ]
    .iter()
    .filter(|(name, _, _)| *name != "confirm" || proposed)
    .map(|(name, label, class)| {
        json!({ "name": name, "label": label, "class": class, "why": st.admin.why_not(&m, name) })
    })
    .collect();
    let register_why = st.admin.why_not(&m, "register");
    let artifacts: Vec<String> = std::iter::once("ipxe".to_string())
        .chain(
            m.profile
                .as_deref()
                .and_then(|p| {
                    st.admin
                        .catalog()
                        .profile(p)
                        .ok()
                        .map(|p| p.artifacts.keys().cloned().collect::<Vec<_>>())
                })
                .unwrap_or_default(),
        )
        .collect();
    // The machine's own values: a save replaces them, and its groups' are added again when
    // it is read (copying them in would pin them to the machine).
    let form = form_in.unwrap_or_else(|| {
        json!({
            "hostname": m.hostname.clone().unwrap_or_default(),
            "profile": m.own_profile().unwrap_or_default(),
            "vars": pairs_text(&m.own_vars()),
            "labels": pairs_text(&m.own_labels()),
        })
    });
    let topic = format!("pv-m-{}", m.mac.to_string().replace(':', ""));
    let title = m.mac.to_string();
    let events: Vec<dto::Event> = events.into_iter().rev().take(100).map(Into::into).collect();
    page(
        st,
        Some(s),
        "machine.html",
        &title,
        "machines",
        json!({
            "m": dto::Machine::from(m),
            "topic": topic,
            "timeline": timeline,
            "token": token,
            "keys": keys,
            "actions": actions,
            "register_why": register_why,
            "artifacts": artifacts,
            "profiles": profile_names(st),
            "form": form,
            "edit_error": edit_error,
            "events": events,
        }),
    )
}

async fn edit(State(st): State<AppState>, Path(mac): Path<String>, f: Form) -> Response {
    let result = async {
        let mac = parse_mac(&mac)?;
        let req = UpdateRequest {
            profile: Some(f.get("profile").to_string()).filter(|p| !p.is_empty()),
            hostname: Some(f.get("hostname").trim().to_string()),
            vars: Some(parse_pairs("variables", f.get("vars"))?),
            labels: Some(parse_pairs("labels", f.get("labels"))?),
            ..Default::default()
        };
        st.admin.update(mac, req).await
    }
    .await;
    match result {
        Ok(m) => see_other(&format!("/ui/machines/{}", m.mac)),
        Err(e) => {
            let e = AppError::from(e);
            let input = json!({
                "hostname": f.get("hostname"),
                "profile": f.get("profile"),
                "vars": f.get("vars"),
                "labels": f.get("labels"),
            });
            let mut r = machine_page(&st, &f.session, &mac, Some(input), Some(e.message)).await;
            if r.status() == StatusCode::OK {
                *r.status_mut() = e.status;
            }
            r
        }
    }
}

async fn preview(
    State(st): State<AppState>,
    s: Session,
    headers: HeaderMap,
    Path((mac, artifact)): Path<(String, String)>,
) -> Response {
    render_preview(&st, &s, &headers, &mac, None, &artifact).await
}

#[derive(Deserialize)]
struct ProfilePreviewQuery {
    mac: String,
    artifact: String,
}

async fn profile_preview(
    State(st): State<AppState>,
    s: Session,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<ProfilePreviewQuery>,
) -> Response {
    render_preview(&st, &s, &headers, &q.mac, Some(&name), &q.artifact).await
}

/// A preview page: the render with the token redacted, or the reason it does not render
/// (the same check a boot makes). Only a machine that does not exist or an artifact the
/// profile lacks is an error page.
async fn render_preview(
    st: &AppState,
    s: &Session,
    headers: &HeaderMap,
    mac: &str,
    profile: Option<&str>,
    artifact: &str,
) -> Response {
    let back = format!("/ui/machines/{mac}");
    let result = async {
        let mac = parse_mac(mac)?;
        let base = machine_base_url(st, headers).map_err(|e| Error::Invalid(e.message))?;
        Ok::<_, Error>((
            mac,
            st.admin.preview_as(mac, profile, artifact, &base).await,
        ))
    }
    .await;
    let (mac, rendered) = match result {
        Ok(v) => v,
        Err(e) => return failed(st, s, e, &back),
    };
    let title = format!("{artifact} for {mac}");
    let data = match rendered {
        Ok((kind, body)) => {
            json!({ "mac": mac, "artifact": artifact, "kind": kind, "body": body, "error": null })
        }
        Err(e @ Error::Render(crate::render::RenderError::Template { .. }))
        | Err(e @ Error::Render(crate::render::RenderError::Invalid { .. })) => {
            json!({ "mac": mac, "artifact": artifact, "kind": null, "body": null, "error": e.to_string() })
        }
        Err(e) => return failed(st, s, e, &back),
    };
    page(st, Some(s), "preview.html", &title, "machines", data)
}

// ---------------------------------------------------------------------------------------
// Discovered inbox and enroll

#[derive(Deserialize, Default)]
struct PageQuery {
    page: Option<usize>,
}

async fn discovered(
    State(st): State<AppState>,
    s: Session,
    Query(q): Query<PageQuery>,
) -> Response {
    let form = json!({ "profile": "", "hostname": "", "vars": "", "labels": "" });
    discovered_page(&st, &s, q.page.unwrap_or(1), form, None).await
}

async fn discovered_page(
    st: &AppState,
    s: &Session,
    page_no: usize,
    form: Value,
    error: Option<String>,
) -> Response {
    let page_no = page_no.max(1);
    let found = match st
        .admin
        .search(MachineSearch {
            state: Some(MState::Discovered),
            sort: SortKey::LastSeen,
            descending: true,
            offset: (page_no - 1) * PER_PAGE,
            limit: PER_PAGE,
            ..Default::default()
        })
        .await
    {
        Ok(f) => f,
        Err(e) => return failed(st, s, e, "/ui/"),
    };
    let pages = (found.total as usize).div_ceil(PER_PAGE).max(1);
    let url = |p: usize| {
        let n = p.to_string();
        list_url("/ui/discovered", &[("page", if p > 1 { &n } else { "" })])
    };
    let machines: Vec<dto::Machine> = found.machines.into_iter().map(Into::into).collect();
    page(
        st,
        Some(s),
        "discovered.html",
        "Discovered",
        "discovered",
        json!({
            "total": found.total,
            "machines": machines,
            "page": page_no,
            "pages": pages,
            "prev": (page_no > 1).then(|| url(page_no - 1)),
            "next": (page_no < pages).then(|| url(page_no + 1)),
            "self_url": url(page_no),
            "profiles": profile_names(st),
            "form": form,
            "error": error,
        }),
    )
}

async fn enroll_discovered(State(st): State<AppState>, f: Form) -> Response {
    let macs: Vec<String> = if f.get("one").is_empty() {
        f.all("mac").into_iter().map(str::to_string).collect()
    } else {
        vec![f.get("one").to_string()]
    };
    let input = json!({
        "profile": f.get("profile"),
        "hostname": f.get("hostname"),
        "vars": f.get("vars"),
        "labels": f.get("labels"),
    });
    // Everything that can be checked before the first enroll is: a refused form enrolls
    // nothing.
    let checked = (|| {
        if macs.is_empty() {
            return Err(Error::Invalid(
                "no machine selected: tick the machines first, or use a row's Enroll button".into(),
            ));
        }
        let vars = parse_pairs("variables", f.get("vars"))?;
        let labels = parse_pairs("labels", f.get("labels"))?;
        let mut reqs = Vec::new();
        for (i, m) in macs.iter().enumerate() {
            let mac = parse_mac(m)?;
            reqs.push(EnrollRequest {
                mac: mac.to_string(),
                profile: Some(f.get("profile").to_string()).filter(|p| !p.is_empty()),
                hostname: hostname_from_pattern(f.get("hostname"), i + 1, mac)?,
                uuid: None,
                serial: None,
                vars: vars.clone(),
                labels: labels.clone(),
            });
        }
        Ok(reqs)
    })();
    let reqs = match checked {
        Ok(r) => r,
        Err(e) => {
            let e = AppError::from(e);
            let mut r = discovered_page(&st, &f.session, 1, input, Some(e.message)).await;
            *r.status_mut() = e.status;
            return r;
        }
    };
    let mut out = Vec::new();
    for req in reqs {
        let mac = req.mac.clone();
        out.push(match st.admin.enroll(req).await {
            Ok(m) => json!({ "mac": mac, "ok": true, "message": format!("enrolled with {}", m.profile.unwrap_or_default()) }),
            Err(e) => json!({ "mac": mac, "ok": false, "message": AppError::from(e).message }),
        });
    }
    results(&st, &f.session, "Enrolled", out, "/ui/discovered")
}

#[derive(Deserialize)]
struct EnrollQuery {
    mac: Option<String>,
}

/// `GET /ui/enroll[?mac=]`: the form, the MAC filled in when coming from a machine's page.
async fn enroll_page(
    State(st): State<AppState>,
    s: Session,
    Query(q): Query<EnrollQuery>,
) -> Response {
    let mac = q.mac.unwrap_or_default();
    let form = json!({ "mac": mac, "profile": "", "hostname": "", "uuid": "", "serial": "", "vars": "", "labels": "" });
    page(
        &st,
        Some(&s),
        "enroll.html",
        "Enroll",
        "enroll",
        json!({ "form": form, "profiles": profile_names(&st), "error": null }),
    )
}

async fn enroll(State(st): State<AppState>, f: Form) -> Response {
    let opt = |k: &str| Some(f.get(k).trim().to_string()).filter(|v| !v.is_empty());
    let result = async {
        let req = EnrollRequest {
            mac: f.get("mac").trim().to_string(),
            profile: Some(f.get("profile").to_string()).filter(|p| !p.is_empty()),
            hostname: opt("hostname"),
            uuid: opt("uuid"),
            serial: opt("serial"),
            vars: parse_pairs("variables", f.get("vars"))?,
            labels: parse_pairs("labels", f.get("labels"))?,
        };
        st.admin.enroll(req).await
    }
    .await;
    match result {
        Ok(m) => see_other(&format!("/ui/machines/{}", m.mac)),
        Err(e) => {
            let e = AppError::from(e);
            let form: BTreeMap<&str, &str> = [
                "mac", "profile", "hostname", "uuid", "serial", "vars", "labels",
            ]
            .into_iter()
            .map(|k| (k, f.get(k)))
            .collect();
            let mut r = page(
                &st,
                Some(&f.session),
                "enroll.html",
                "Enroll",
                "enroll",
                json!({ "form": form, "profiles": profile_names(&st), "error": e.message }),
            );
            *r.status_mut() = e.status;
            r
        }
    }
}

// ---------------------------------------------------------------------------------------
// Profiles

async fn rules(State(st): State<AppState>, s: Session) -> Response {
    let list: Vec<dto::Rule> = st.admin.rules().into_iter().map(Into::into).collect();
    page(
        &st,
        Some(&s),
        "rules.html",
        "Discovery rules",
        "rules",
        json!({ "rules": list }),
    )
}

async fn groups(State(st): State<AppState>, s: Session) -> Response {
    let list: Vec<dto::Group> = st.admin.groups().into_iter().map(Into::into).collect();
    page(
        &st,
        Some(&s),
        "groups.html",
        "Groups",
        "groups",
        json!({ "groups": list }),
    )
}

async fn profiles(State(st): State<AppState>, s: Session) -> Response {
    let cat = st.admin.catalog();
    let list: Vec<Value> = cat
        .profiles()
        .values()
        .map(|p| {
            json!({
                "name": p.name,
                "description": p.description,
                "role": p.role,
                "artifacts": p.artifacts.keys().collect::<Vec<_>>(),
                "install_time": humantime::format_duration(p.install_time()).to_string(),
            })
        })
        .collect();
    page(
        &st,
        Some(&s),
        "profiles.html",
        "Profiles",
        "profiles",
        json!({ "profiles": list }),
    )
}

async fn profile(State(st): State<AppState>, s: Session, Path(name): Path<String>) -> Response {
    let cat = st.admin.catalog();
    let p = match cat.profile(&name) {
        Ok(p) => p,
        Err(e) => return failed(&st, &s, Error::from(e), "/ui/profiles"),
    };
    let install_time = humantime::format_duration(p.install_time()).to_string();
    page(
        &st,
        Some(&s),
        "profile.html",
        &format!("Profile {name}"),
        "profiles",
        json!({ "p": dto::Profile::from(p), "install_time": install_time }),
    )
}
