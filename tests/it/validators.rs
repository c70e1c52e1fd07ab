//! Every built-in profile's artifacts, fetched over HTTP with a live install token, checked by
//! the real tools: `cloud-init schema`, `ignition-validate`, `debconf-set-selections -c`.

use std::process::Command;

use crate::support::{token_of, tool, Daemon};

/// Checks a user-data file against tests/schemas/autoinstall.json (the autoinstall keys our
/// templates render, with subiquity's published types and limits) with python3-jsonschema; the
/// schema itself is checked first.
fn autoinstall_schema_check(file: &std::path::Path) -> Command {
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/schemas/autoinstall.json"
    );
    let mut c = Command::new(tool("python3"));
    c.args([
        "-c",
        "import json, sys, yaml, jsonschema\n\
         schema = json.load(open(sys.argv[1]))\n\
         jsonschema.Draft7Validator.check_schema(schema)\n\
         jsonschema.Draft7Validator(schema).validate(yaml.safe_load(open(sys.argv[2])))\n",
        schema,
    ])
    .arg(file);
    c
}

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
    // The shipped profiles, and the test installer's (which render shipped templates with
    // their own values: the real-OS profile's runcmd, for one).
    let test_templates =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/installer/templates");
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &["--templates-dir", test_templates.to_str().unwrap()],
    );
    let work = tempfile::tempdir().unwrap();
    let profiles = d.cli_ok(&["profiles", "--json"]);
    let profiles: Vec<serde_json::Value> = serde_json::from_str(&profiles).unwrap();
    let mut checked = 0;
    let mut autoinstalls = 0;
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
                "cloud-config" => run_check(
                    Command::new(&cloud_init)
                        .args(["schema", "--config-file"])
                        .arg(&file),
                    &what,
                    &body,
                ),
                // cloud-init knows `autoinstall:` only as a key with a version; the schema
                // checks what subiquity will read.
                "autoinstall" => {
                    run_check(
                        Command::new(&cloud_init)
                            .args(["schema", "--config-file"])
                            .arg(&file),
                        &what,
                        &body,
                    );
                    run_check(&mut autoinstall_schema_check(&file), &what, &body);
                    autoinstalls += 1;
                }
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
    assert!(autoinstalls >= 1, "no autoinstall user-data checked");
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
    // The autoinstall schema refuses a version subiquity does not know, a layout it has not,
    // a command that is neither a string nor an argv list, and a misspelt key; and accepts
    // the same file with those mended.
    let autoinstall = |ai: &str| {
        let f = work.path().join("user-data");
        std::fs::write(&f, format!("#cloud-config\nautoinstall:\n{ai}")).unwrap();
        autoinstall_schema_check(&f).output().unwrap()
    };
    let good =
        "  version: 1\n  storage: {layout: {name: lvm}}\n  late-commands: [[sh, -c, x], y]\n";
    let out = autoinstall(good);
    assert!(out.status.success(), "{out:?}");
    for bad in [
        "  version: 2\n",
        "  version: 1\n  storage: {layout: {name: raid}}\n",
        "  version: 1\n  late-commands: [{sh: x}]\n",
        "  version: 1\n  late-comands: [x]\n",
        "  version: 1\n  keyboard: {variant: x}\n",
    ] {
        let out = autoinstall(bad);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("ValidationError"),
            "{bad}: {out:?}"
        );
    }
    let bad_preseed = work.path().join("bad.cfg");
    std::fs::write(&bad_preseed, "d-i netcfg/get_hostname\n").unwrap();
    assert!(!Command::new(tool("debconf-set-selections"))
        .arg("-c")
        .arg(&bad_preseed)
        .status()
        .unwrap()
        .success());
}

/// Questions the preseed sets whose templates this machine's package mirror does not serve
/// (tests/d-i/templates.sh says why): not checked, and the test fails if one of them appears
/// in the templates, so the list only shrinks.
const UNCHECKED_QUESTIONS: &[&str] = &[
    "clock-setup/utc",
    "clock-setup/ntp",
    "time/zone",
    "grub-installer/only_debian",
    "grub-installer/bootdev",
    "finish-install/reboot_in_progress",
    "partman-partitioning/confirm_write_new_label",
];

/// Every question the rendered Debian preseed answers exists in the installer's (or the
/// target package's) debconf templates with the type the preseed gives it, and a boolean or a
/// fixed-choice select gets a value it can take. d-i ignores a misspelt question without a
/// word; `debconf-set-selections -c` checks only the syntax.
#[test]
fn the_preseed_answers_only_questions_the_installer_has() {
    let dir = crate::support::cached_build(
        "tests/d-i/templates.sh",
        "TEST_DI_TEMPLATES_DIR",
        "d-i-templates",
    );
    let text = std::fs::read_to_string(dir.join("templates")).unwrap();
    // name → (type, fixed choices in their C form, if any)
    let mut templates = std::collections::HashMap::new();
    for stanza in text.split("\n\n") {
        let field = |f: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(f).map(|v| v.trim().to_string()))
        };
        if let (Some(name), Some(ty)) = (field("Template:"), field("Type:")) {
            let choices = field("Choices-C:")
                .or_else(|| field("Choices:"))
                .filter(|c| !c.contains("${"))
                .map(|c| c.split(", ").map(str::to_string).collect::<Vec<_>>());
            templates.insert(name, (ty, choices));
        }
    }
    assert!(
        templates.len() > 400,
        "only {} templates read",
        templates.len()
    );
    // Questions a component makes at run time from a template (`db_register`).
    let registered = std::fs::read_to_string(dir.join("registered")).unwrap();
    for line in registered.lines() {
        let (question, template) = line.split_once(' ').unwrap();
        if let Some(t) = templates.get(template).cloned() {
            templates.entry(question.to_string()).or_insert(t);
        }
    }
    for q in UNCHECKED_QUESTIONS {
        assert!(
            !templates.contains_key(*q),
            "{q} is in the templates now: check it (remove it from UNCHECKED_QUESTIONS)"
        );
    }

    let d = Daemon::start();
    d.cli_ok(&[
        "enroll",
        "52:54:00:00:11:01",
        "--profile",
        "debian-12",
        "--hostname",
        "node1",
    ]);
    let (s, script) = d.get("/ipxe?mac=52-54-00-00-11-01&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    let (s, preseed) = d.get(&format!("/config/{}/preseed.cfg", token_of(&script)));
    assert_eq!(s, 200, "{preseed}");
    let mut checked = 0;
    // A line ending in a backslash continues on the next (debconf-set-selections).
    for line in preseed.replace("\\\n", "").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.splitn(4, char::is_whitespace);
        let (owner, question, ty) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let value = f.next().unwrap_or("").trim();
        assert!(
            owner == "d-i" || question.starts_with(&format!("{owner}/")),
            "{line}"
        );
        if UNCHECKED_QUESTIONS.contains(&question) {
            continue;
        }
        let (want, choices) = templates.get(question).unwrap_or_else(|| {
            panic!("the preseed sets {question}, which no installer template has: {line}")
        });
        assert_eq!(
            ty, want,
            "{question}: the preseed's type is not the template's"
        );
        match ty {
            "boolean" => assert!(value == "true" || value == "false", "{line}"),
            "select" => {
                if let Some(c) = choices {
                    assert!(
                        c.iter().any(|c| c == value),
                        "{question}: {value:?} is not one of {c:?}"
                    );
                }
            }
            _ => {}
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} questions checked");
}
