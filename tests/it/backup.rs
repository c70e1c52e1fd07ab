//! `provision backup` while the daemon writes, `provision restore` into a new directory, and a
//! daemon on the restored directory that shows what the original showed at the backup.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::{admin_agent, token_of, Daemon, BIN};

const ADVERTISE: &str = "http://prov.example:8080";
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@bk";

fn provision(args: &[&str], data: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn api(d: &Daemon, path: &str) -> String {
    let token = std::fs::read_to_string(d.token_file()).unwrap();
    let (s, body) = d.admin_get(path, Some(token.trim()));
    assert_eq!(s, 200, "{path}: {body}");
    body
}

fn mac(i: usize) -> String {
    format!("52:54:00:00:0b:{:02x}", i)
}

#[test]
fn a_backup_taken_under_writes_restores_into_a_daemon_that_shows_the_same() {
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &["--advertise", ADVERTISE]);
    // One machine installed (host key pinned, token burnt), the rest enrolled.
    d.cli_ok(&[
        "enroll",
        &mac(0),
        "--profile",
        "debian-12",
        "--hostname",
        "bk0",
    ]);
    let (s, script) = d.get(&format!("/ipxe?mac={}&platform=pcbios", mac(0)));
    assert_eq!(s, 200);
    let token = token_of(&script);
    assert_eq!(d.get(&format!("/config/{token}/preseed.cfg")).0, 200);
    assert_eq!(
        d.post(&format!("/phone-home/{token}"), "text/plain", HOST_KEY)
            .0,
        200
    );

    // Enrolls go on, one after another, while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let enrolled = Arc::new(AtomicUsize::new(1));
    let writer = {
        let (stop, enrolled) = (stop.clone(), enrolled.clone());
        let agent = admin_agent(&d.dir.path().join("admin-tls/cert.pem"));
        let url = format!("{}/api/v1/machines", d.admin_url());
        let token = std::fs::read_to_string(d.token_file())
            .unwrap()
            .trim()
            .to_string();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && enrolled.load(Ordering::Relaxed) < 250 {
                let i = enrolled.load(Ordering::Relaxed);
                let body = format!(r#"{{"mac": "{}", "profile": "debian-12"}}"#, mac(i));
                let r = agent
                    .post(&url)
                    .header("Authorization", &format!("Bearer {token}"))
                    .header("Content-Type", "application/json")
                    .send(body)
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                enrolled.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while enrolled.load(Ordering::Relaxed) < 20 {
        std::thread::yield_now();
    }
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("provision.backup");
    let out = provision(&["backup", file.to_str().unwrap()], d.dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let during = enrolled.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(mode(&file), 0o600, "the backup holds secrets");

    // Not into a directory a daemon holds, nor over a database.
    let out = provision(&["restore", file.to_str().unwrap()], d.dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another provision serve"),
        "{err}"
    );

    // Into an empty directory that exists (restore makes it 0700).
    let restored = tempfile::tempdir().unwrap();
    let target = restored.path().to_path_buf();
    let out = provision(&["restore", file.to_str().unwrap()], &target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&target), 0o700);
    for (f, m) in [
        ("provision.db", 0o600),
        ("admin-token", 0o600),
        ("ssh/id_ed25519", 0o600),
        ("pki/ca-key.pem", 0o600),
        ("admin-tls/key.pem", 0o600),
        ("pki/ca-cert.pem", 0o644),
    ] {
        assert_eq!(mode(&target.join(f)), m, "{f}");
    }
    let out = provision(&["restore", file.to_str().unwrap()], &target);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a database"));

    // A daemon on the restored directory: the same secrets, and the inventory as it was at
    // one moment during the enrolls — a prefix of them, with the same events and renders.
    let r = Daemon::start_in(restored, &["--advertise", ADVERTISE]);
    assert_eq!(
        std::fs::read_to_string(r.token_file()).unwrap(),
        std::fs::read_to_string(d.token_file()).unwrap()
    );
    assert_eq!(r.fingerprint(), d.fingerprint());
    assert_eq!(r.get("/pki/ca.pem").1, d.get("/pki/ca.pem").1);

    let list = |d: &Daemon| -> Vec<serde_json::Value> {
        serde_json::from_str(&api(d, "/api/v1/machines")).unwrap()
    };
    let (orig, back) = (list(&d), list(&r));
    let n = back.len();
    assert!(
        n >= 20 && n <= during,
        "{n} machines restored, {during} enrolled by the end of the backup"
    );
    // Enrolled in MAC order, one at a time: the copy holds the first n, exactly as they were.
    assert_eq!(back, orig[..n].to_vec());
    let events = |d: &Daemon| -> Vec<serde_json::Value> {
        serde_json::from_str(&api(d, "/api/v1/events?limit=1000")).unwrap()
    };
    let (orig_ev, back_ev) = (events(&d), events(&r));
    assert_eq!(back_ev, orig_ev[..back_ev.len()].to_vec());
    let render = format!("/api/v1/machines/{}/render/preseed.cfg", mac(0));
    assert_eq!(api(&r, &render), api(&d, &render));
    let keys = "/api/v1/inventory/known_hosts";
    assert_eq!(api(&r, keys), api(&d, keys));
}
