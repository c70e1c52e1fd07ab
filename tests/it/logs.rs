//! The daemon's logs: JSON lines for a collector, plain text off a terminal, and never a
//! token in either — checked over a whole install at debug level.

use crate::support::{token_of, Daemon};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@logs";

/// Enrolls, installs and phones home one machine, as the walk-through does; returns the
/// install token it used.
fn walk_through(d: &Daemon) -> String {
    d.cli_ok(&[
        "enroll",
        "52:54:00:00:07:01",
        "--profile",
        "debian-12",
        "--hostname",
        "log1",
    ]);
    let (s, script) = d.get("/ipxe?mac=52-54-00-00-07-01&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    let (s, body) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200, "{body}");
    let (s, body) = d.post(&format!("/phone-home/{token}"), "text/plain", HOST_KEY);
    assert_eq!(s, 200, "{body}");
    d.cli_ok(&["machines", "show", "52:54:00:00:07:01"]);
    d.cli_ok(&["render", "52:54:00:00:07:01", "preseed.cfg"]);
    // A refused config request, which logs and records what was refused.
    let (s, _) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 410);
    token
}

/// Every line the daemon wrote, once it has stopped.
fn lines(mut d: Daemon) -> (Vec<String>, String) {
    let admin = std::fs::read_to_string(d.token_file())
        .unwrap()
        .trim()
        .to_string();
    d.terminate();
    let mut out = Vec::new();
    while let Ok(l) = d.log.recv_timeout(std::time::Duration::from_secs(5)) {
        out.push(l);
    }
    (out, admin)
}

#[test]
fn json_logs_are_one_object_a_line_with_fields_and_no_secret() {
    let d = Daemon::start_with(
        tempfile::tempdir().unwrap(),
        &["--log-format", "json"],
        &[("PROVISION_LOG", Some("debug"))],
    );
    let install = walk_through(&d);
    let (lines, admin) = lines(d);
    assert!(lines.len() > 10, "{lines:?}");
    let mut with_mac = 0;
    let mut changes = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(v.get(key).is_some(), "no {key} in {l}");
        }
        assert!(v["fields"]["message"].is_string(), "{l}");
        if v["fields"]["mac"] == "52:54:00:00:07:01" {
            with_mac += 1;
        }
        if v["target"] == "provision::lifecycle" {
            let f = |k: &str| v["fields"][k].as_str().unwrap_or("?").to_string();
            changes.push(format!(
                "{} {} {}→{}",
                f("mac"),
                f("kind"),
                f("from"),
                f("to")
            ));
        }
    }
    assert!(with_mac > 0, "the install's lines carry the MAC as a field");
    // Every state change, once committed, is a line with the MAC, kind and states as fields.
    assert_eq!(
        changes,
        [
            "52:54:00:00:07:01 enrolled none→enrolled",
            "52:54:00:00:07:01 install_started enrolled→installing",
            "52:54:00:00:07:01 phoned_home installing→installed",
        ]
    );
    for l in &lines {
        assert!(!l.contains(&install), "install token in the log: {l}");
        assert!(!l.contains(&admin), "admin token in the log: {l}");
    }
}

#[test]
fn text_logs_off_a_terminal_have_no_colour_codes_and_no_secret() {
    // NO_COLOR unset: stderr being a pipe alone must turn colours off.
    let d = Daemon::start_with(
        tempfile::tempdir().unwrap(),
        &[],
        &[("NO_COLOR", None), ("PROVISION_LOG", Some("debug"))],
    );
    let install = walk_through(&d);
    let (lines, admin) = lines(d);
    assert!(
        lines.iter().any(|l| l.contains("install token issued")),
        "{lines:?}"
    );
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "colour code in {l:?}");
        assert!(
            !l.contains(&install) && !l.contains(&admin),
            "secret in {l}"
        );
    }
}
