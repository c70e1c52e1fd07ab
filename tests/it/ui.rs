//! The web UI in a real browser: Debian's Chromium, headless, driven over WebDriver by
//! chromedriver, against the real daemon on its TLS admin listener. Screenshots of each step
//! go to `target/tmp/ui-screenshots/` (test output; docs/ui.md shows copies).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::support::{token_of, tool, Daemon};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@ui";
/// How long a live update may take to show before the test fails (it normally takes well
/// under a second; the VM is slow and shared).
const LIVE: Duration = Duration::from_secs(20);

/// chromedriver and the Chromium it starts, stopped by their own PIDs on drop: chromedriver
/// leads its own process group, and every Chromium process carries this test's fresh
/// profile directory on its command line.
struct Browser {
    driver: Child,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let me = self.profile.path().to_string_lossy().into_owned();
        let _ = nix_kill_group(self.driver.id());
        let _ = self.driver.wait();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&me) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn nix_kill_group(pid: u32) -> std::io::Result<()> {
    if unsafe { libc::kill(-(pid as i32), libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The base64 SHA-256 of the daemon certificate's public key, which Chromium is told to
/// trust (and nothing else): the test checks the real TLS listener, not a plain one.
fn spki_pin(d: &Daemon) -> String {
    let cert = d.dir.path().join("admin-tls/cert.pem");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            cert.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn browser(d: &Daemon) -> (Browser, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(tool("chromedriver"));
    cmd.arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut driver = cmd.spawn().expect("starting chromedriver");
    let out = driver.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    // chromedriver says when it listens; no sleeping and retrying.
    loop {
        let line = lines
            .next()
            .expect("chromedriver exited before it started")
            .unwrap();
        if line.contains("started successfully") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let profile = tempfile::tempdir().unwrap();
    let guard = Browser { driver, profile };
    let args = vec![
        "--headless=new".to_string(),
        // As root Chromium refuses to start without this; the test machine is throwaway.
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--no-first-run".into(),
        "--disable-quic".into(),
        "--window-size=1280,1000".into(),
        format!("--user-data-dir={}", guard.profile.path().display()),
        // Nothing outside this machine is looked up.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1".into(),
        format!("--ignore-certificate-errors-spki-list={}", spki_pin(d)),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": tool("chromium"), "args": args }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("connecting to chromedriver");
    (guard, client)
}

fn shots() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&p).unwrap();
    p
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// The text of `css`, once it is on the page (a click that submits a form returns before
/// the next page has loaded).
async fn text(c: &Client, css: &str) -> String {
    wait_for(c, css).await.text().await.unwrap()
}

async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(LIVE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear within {LIVE:?}: {e}"))
}

async fn fill(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Waits until the page's live link is open (the script marks the body).
async fn live(c: &Client) {
    wait_for(c, "body[data-live=up]").await;
}

async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

fn api_machine(d: &Daemon, mac: &str) -> Option<serde_json::Value> {
    let token = std::fs::read_to_string(d.token_file()).unwrap();
    let (s, body) = d.admin_get(&format!("/api/v1/machines/{mac}"), Some(token.trim()));
    (s == 200).then(|| serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drives_the_ui_in_a_real_browser() {
    let mut d = Daemon::start();
    let (_guard, c) = browser(&d).await;
    let ui = format!("{}/ui", d.admin_url());
    let token = std::fs::read_to_string(d.token_file())
        .unwrap()
        .trim()
        .to_string();

    // Log in: a page without a session goes to the login form; a wrong token is refused.
    c.goto(&format!("{ui}/")).await.unwrap();
    assert_eq!(path(&c).await, "/ui/login");
    fill(&c, "#token", "not-the-token").await;
    click(&c, "button[type=submit]").await;
    let refused = text(&c, "#login-error").await;
    assert!(refused.contains("wrong admin token"), "{refused}");
    shot(&c, "01-login-refused").await;
    fill(&c, "#token", &token).await;
    click(&c, "button[type=submit]").await;
    wait_for(&c, "#count-all").await;
    assert_eq!(path(&c).await, "/ui/");
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|k| k.name() == "provision_session")
        .expect("session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.secure(), Some(true));
    let session = session.value().to_string();

    // Enroll from the form (a MAC in dotted notation), with a hostile label, and see the row.
    c.goto(&format!("{ui}/enroll")).await.unwrap();
    fill(&c, "#f-mac", "5254.0000.0011").await;
    click(&c, "#f-profile option[value='debian-12']").await;
    fill(&c, "#f-hostname", "web1").await;
    fill(
        &c,
        "#f-labels",
        "rack=r1\nnote=<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">",
    )
    .await;
    shot(&c, "02-enroll").await;
    click(&c, "#enroll-submit").await;
    wait_for(&c, "#machine-live").await;
    assert_eq!(path(&c).await, "/ui/machines/52:54:00:00:00:11");
    // The hostile label is text on the page, in the facts and in the edit form.
    let labels = text(&c, "#facts").await;
    assert!(
        labels.contains("<script>window.pwned=1</script>"),
        "{labels}"
    );
    let pwned = c
        .execute(
            "return window.pwned === undefined && document.scripts.length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        pwned,
        json!(2),
        "only the UI's own two scripts are on the page"
    );
    shot(&c, "03-machine-enrolled").await;
    c.goto(&format!("{ui}/machines")).await.unwrap();
    let row = text(&c, "#row-525400000011").await;
    assert!(row.contains("web1") && row.contains("enrolled"), "{row}");
    // Search in another notation finds it.
    c.goto(&format!("{ui}/machines?q=52-54-00-00-00-11"))
        .await
        .unwrap();
    assert!(text(&c, "#machine-total").await.starts_with("1 machine"));
    c.goto(&format!("{ui}/machines?q=rack%3Dr1")).await.unwrap();
    assert!(text(&c, "#machine-total").await.starts_with("1 machine"));

    // A machine that boots unknown appears in the inbox live, and is enrolled from it.
    c.goto(&format!("{ui}/discovered")).await.unwrap();
    live(&c).await;
    let (s, _) = d.get("/ipxe?mac=52:54:00:00:00:22&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200);
    let row = wait_for(&c, "#row-525400000022").await;
    assert!(row.text().await.unwrap().contains("pcbios"));
    shot(&c, "04-discovered-live").await;
    click(&c, "#d-profile option[value='debian-12']").await;
    fill(&c, "#d-hostname", "node-{n}").await;
    click(&c, "#enroll-525400000022").await;
    let summary = text(&c, "#results-summary").await;
    assert_eq!(summary, "1 of 1 done.");
    let m = api_machine(&d, "52:54:00:00:00:22").unwrap();
    assert_eq!(
        (m["state"].as_str(), m["hostname"].as_str()),
        (Some("enrolled"), Some("node-1"))
    );

    // The machine page's timeline fills live as the machine installs (driven as the
    // installer would: the boot script, the config, the phone-home).
    c.goto(&format!("{ui}/machines/52:54:00:00:00:22"))
        .await
        .unwrap();
    live(&c).await;
    let (s, script) = d.get("/ipxe?mac=52:54:00:00:00:22&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    let install_token = token_of(&script);
    wait_for(&c, "#timeline li.done[data-stage='iPXE install']").await;
    assert!(text(&c, "#token-state").await.starts_with("live"));
    let (s, _) = d.get(&format!("/config/{install_token}/preseed.cfg"));
    assert_eq!(s, 200);
    wait_for(&c, "#timeline li.done[data-stage='config fetched']").await;
    let (s, body) = d.post(
        &format!("/phone-home/{install_token}"),
        "text/plain",
        &format!("{HOST_KEY}\n"),
    );
    assert_eq!(s, 200, "{body}");
    wait_for(&c, "#timeline li.done[data-stage='phone-home']").await;
    wait_for(&c, "#machine-live .badge.s-installed").await;
    let page = text(&c, "#machine-live").await;
    assert!(page.contains("burnt"), "token shown burnt: {page}");
    assert!(
        !page.contains(&install_token),
        "the token itself is never shown"
    );
    assert!(text(&c, "#host-keys").await.contains("SHA256:"));
    shot(&c, "05-machine-installed").await;

    // Reprovision asks first, naming the machine; nothing changes until it is confirmed.
    click(&c, "#action-reprovision").await;
    let q = text(&c, "#confirm-what").await;
    assert!(q.contains("Reinstall machine 52:54:00:00:00:22"), "{q}");
    shot(&c, "06-reprovision-confirm").await;
    assert_eq!(
        api_machine(&d, "52:54:00:00:00:22").unwrap()["state"],
        "installed"
    );
    click(&c, "#confirm-yes").await;
    wait_for(&c, "#machine-live .badge.s-enrolled").await;
    assert_eq!(
        api_machine(&d, "52:54:00:00:00:22").unwrap()["state"],
        "enrolled"
    );

    // A POST without the CSRF token is refused, even with the session cookie.
    let status = c
        .execute_async(
            "const done = arguments[0];
             fetch('/ui/enroll', {method: 'POST', credentials: 'same-origin',
               headers: {'Content-Type': 'application/x-www-form-urlencoded'},
               body: 'mac=52:54:00:00:00:33&profile=debian-12'})
             .then(r => done(r.status), e => done(String(e)));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
    assert!(api_machine(&d, "52:54:00:00:00:33").is_none());

    // The dashboard and the machine list, for the docs; then on a narrow screen.
    c.goto(&format!("{ui}/")).await.unwrap();
    live(&c).await;
    shot(&c, "07-dashboard").await;
    c.goto(&format!("{ui}/machines")).await.unwrap();
    shot(&c, "08-machines").await;
    c.set_window_size(390, 844).await.unwrap();
    shot(&c, "09-machines-narrow").await;
    c.set_window_size(1280, 1000).await.unwrap();

    // Logout ends the session: the browser is back at the login form, and the old cookie
    // no longer opens anything.
    click(&c, "#logout").await;
    wait_for(&c, "#token").await;
    c.goto(&format!("{ui}/machines")).await.unwrap();
    assert_eq!(path(&c).await, "/ui/login");
    let old = crate::support::admin_agent(&d.dir.path().join("admin-tls/cert.pem"))
        .get(&format!("{ui}/machines"))
        .header("Cookie", &format!("provision_session={session}"))
        .config()
        .max_redirects(0)
        .build()
        .call()
        .unwrap();
    assert_eq!(old.status().as_u16(), 303);

    // The live link says when it drops.
    fill(&c, "#token", &token).await;
    click(&c, "button[type=submit]").await;
    live(&c).await;
    d.terminate();
    let banner = wait_for(&c, "#live:not([hidden])").await;
    assert!(banner.text().await.unwrap().contains("reconnecting"));
    shot(&c, "10-live-link-lost").await;
    c.close().await.unwrap();
}
