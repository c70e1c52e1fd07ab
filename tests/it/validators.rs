//! Every built-in profile's artifacts, fetched over HTTP with a live install token, checked by
//! the real tools: `cloud-init schema`, `ignition-validate`, `debconf-set-selections -c`.

use std::process::Command;

use crate::support::{token_of, tool, Daemon};

fn run_check(cmd: &mut Command, what: &str, body: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} rejected by {cmd:?}:\n{}{}\n--- the file ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_builtin_artifact_passes_the_real_validator() {
    let cloud_init = tool("cloud-init");
    let ignition_validate = tool("ignition-validate");
    let debconf = tool("debconf-set-selections");
    let d = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let profiles = d.cli_ok(&["profiles", "--json"]);
    let profiles: Vec<serde_json::Value> = serde_json::from_str(&profiles).unwrap();
    let mut checked = 0;
    for (i, p) in profiles.iter().enumerate() {
        let name = p["name"].as_str().unwrap();
        let mac = format!("52:54:00:00:10:{i:02x}");
        d.cli_ok(&[
            "enroll",
            &mac,
            "--profile",
            name,
            "--hostname",
            &format!("node{i}"),
            "--var",
            "ssh_authorized_key=ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxop op@example",
        ]);
        let (s, script) = d.get(&format!("/ipxe?mac={}&platform=efi", mac.replace(':', "-")));
        assert_eq!(s, 200, "{script}");
        let token = token_of(&script);
        for (artifact, a) in p["artifacts"].as_object().unwrap() {
            let (s, body) = d.get(&format!("/config/{token}/{artifact}"));
            assert_eq!(s, 200, "{name}/{artifact}: {body}");
            let file = work.path().join(format!("{name}-{artifact}"));
            std::fs::write(&file, &body).unwrap();
            let what = format!("{name}/{artifact}");
            match a["kind"].as_str().unwrap() {
                "cloud-config" | "autoinstall" => run_check(
                    Command::new(&cloud_init)
                        .args(["schema", "--config-file"])
                        .arg(&file),
                    &what,
                    &body,
                ),
                "ignition" => run_check(Command::new(&ignition_validate).arg(&file), &what, &body),
                "preseed" => run_check(Command::new(&debconf).arg("-c").arg(&file), &what, &body),
                "meta-data" => {
                    let v: serde_norway::Value = serde_norway::from_str(&body).unwrap();
                    assert!(
                        v["instance-id"].as_str().is_some_and(|s| !s.is_empty()),
                        "{body}"
                    );
                }
                other => panic!("{what}: no validator for kind {other}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} artifacts checked");
}

#[test]
fn validators_catch_a_broken_config() {
    // The same checks fail on a wrong file, so a pass above means something.
    let work = tempfile::tempdir().unwrap();
    let bad_cc = work.path().join("bad.yaml");
    std::fs::write(&bad_cc, "#cloud-config\nusers: 5\nruncmd: {}\n").unwrap();
    assert!(!Command::new(tool("cloud-init"))
        .args(["schema", "--config-file"])
        .arg(&bad_cc)
        .status()
        .unwrap()
        .success());
    let bad_ign = work.path().join("bad.ign");
    std::fs::write(
        &bad_ign,
        r#"{"ignition":{"version":"3.3.0"},"storage":{"files":[{"path":"relative"}]}}"#,
    )
    .unwrap();
    assert!(!Command::new(tool("ignition-validate"))
        .arg(&bad_ign)
        .status()
        .unwrap()
        .success());
    let bad_preseed = work.path().join("bad.cfg");
    std::fs::write(&bad_preseed, "d-i netcfg/get_hostname\n").unwrap();
    assert!(!Command::new(tool("debconf-set-selections"))
        .arg("-c")
        .arg(&bad_preseed)
        .status()
        .unwrap()
        .success());
}
