//! The daemon as a systemd service, without systemd as PID 1: the unit checked by
//! `systemd-analyze verify` and `security --offline`, the readiness protocol heard on a
//! `NOTIFY_SOCKET` the test owns, and the sample configuration checked by `--check-config`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{self_signed_pair, tool, Daemon, BIN};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's unit with this build's binary and sample configuration in ExecStart.
fn unit_here(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(Path::new(REPO).join("contrib/provision.service"))
        .unwrap()
        .replace("/usr/bin/provision", BIN)
        .replace(
            "/etc/provision/provision.toml",
            &format!("{REPO}/contrib/provision.toml"),
        );
    let path = dir.join("provision.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn the_unit_verifies_and_its_sandbox_rates_ok() {
    let d = tempfile::tempdir().unwrap();
    let unit = unit_here(d.path());
    // Documentation= names the manual pages the package installs; verify looks them up
    // with man(1), so they are generated here and found through MANPATH.
    let man = d.path().join("man");
    let made = Command::new(BIN)
        .arg("man")
        .arg(man.join("man1"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let out = Command::new(tool("systemd-analyze"))
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", &man)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(tool("systemd-analyze"))
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let verdict = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no verdict: {text}"));
    eprintln!("{verdict}");
    // "0.0 SAFE" … "1.9 OK"; "MEDIUM", "EXPOSED" and "UNSAFE" are worse.
    assert!(
        verdict.contains(" OK") || verdict.contains(" SAFE"),
        "{verdict}"
    );
}

#[test]
fn the_sample_configuration_is_valid_with_every_key_set() {
    let d = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(Path::new(REPO).join("contrib/provision.toml")).unwrap();
    // Every commented-out setting, switched on (the files it names need not exist for a
    // check of the keys: the certificate pair is made here).
    let mut on: String = sample
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(kv) if kv.contains(" = ") => kv.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cert = d.path().join("admin.crt");
    let key = d.path().join("admin.key");
    self_signed_pair(&cert, &key, "/CN=provision", None);
    on = on
        .replace("/etc/provision/admin.crt", cert.to_str().unwrap())
        .replace("/etc/provision/admin.key", key.to_str().unwrap())
        .replace("/etc/provision/templates", d.path().to_str().unwrap());
    let file = d.path().join("provision.toml");
    std::fs::write(&file, &on).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--config"])
        .arg(&file)
        .arg("--data-dir")
        .arg(d.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{on}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads notifications until one contains `want`; returns everything read.
fn until(sock: &UnixDatagram, want: &str, got: &mut Vec<String>) {
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want:?} within 30 s; heard {got:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want:?} ({e}); heard {got:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        got.push(msg.clone());
        if msg.lines().any(|l| l == want) {
            return;
        }
    }
}

#[test]
fn the_service_manager_hears_ready_watchdog_reloading_and_stopping_in_order() {
    let sockdir = tempfile::tempdir().unwrap();
    let path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut d = Daemon::start_with(
        tempfile::tempdir().unwrap(),
        &[],
        &[
            ("NOTIFY_SOCKET", Some(path.to_str().unwrap())),
            // A 2 s watchdog: pings every second while the writer answers.
            ("WATCHDOG_USEC", Some("2000000")),
        ],
    );
    let mut got = Vec::new();
    until(&sock, "READY=1", &mut got);
    let ready = got.last().unwrap().clone();
    assert!(
        ready.contains("STATUS=") && ready.contains("Machine HTTP 127.0.0.1:"),
        "{ready}"
    );
    until(&sock, "WATCHDOG=1", &mut got);
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    until(&sock, "RELOADING=1", &mut got);
    assert!(got.last().unwrap().contains("MONOTONIC_USEC="), "{got:?}");
    until(&sock, "READY=1", &mut got);
    let reloaded = got.last().unwrap();
    // What was reloaded (profiles, the admin certificate), then the listeners again.
    assert!(
        reloaded.contains("STATUS=reloaded ")
            && reloaded.contains(" profiles; admin certificate SHA-256 ")
            && reloaded.contains("; Machine HTTP 127.0.0.1:"),
        "{got:?}"
    );
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    until(&sock, "STOPPING=1", &mut got);
    assert!(d.terminate().success());
}
