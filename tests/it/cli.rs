//! The README walk-through, through the real CLI and HTTP, and the CLI's handling of bad input.

use crate::support::{token_of, Daemon};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@node1";

#[test]
fn walkthrough_enroll_install_phone_home_local_boot() {
    let d = Daemon::start();
    let out = d.cli_ok(&["profiles"]);
    for p in [
        "ubuntu-24.04",
        "debian-12",
        "flatcar",
        "fedora-coreos",
        "coreos-cloud-config",
    ] {
        assert!(out.contains(p), "{out}");
    }
    let out = d.cli_ok(&[
        "enroll",
        "52-54-00-12-34-56",
        "--profile",
        "debian-12",
        "--hostname",
        "node1",
        "--var",
        "domain=lab.example",
    ]);
    assert!(out.contains("enrolled 52:54:00:12:34:56"), "{out}");

    let (s, chain) = d.get("/boot.ipxe");
    assert_eq!(s, 200);
    assert!(chain.starts_with("#!ipxe\n"));
    assert!(chain.contains(&format!(
        "chain --autofree {}/ipxe?mac=${{mac:hexhyp}}",
        d.url()
    )));

    let (s, script) = d.get("/ipxe?mac=52-54-00-12-34-56&uuid=&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    assert!(script.contains(&format!("kernel {}/assets/debian-12/linux initrd=initrd0 auto=true priority=critical url={}/config/{token}/preseed.cfg hostname=node1 domain=lab.example", d.url(), d.url())), "{script}");
    assert!(script.contains(&format!(
        "initrd --name initrd0 {}/assets/debian-12/initrd.gz",
        d.url()
    )));

    let (s, preseed) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200);
    assert!(preseed.contains("d-i netcfg/get_domain string lab.example"));
    // Only the token's hash is stored: not in the database, its WAL, nor the log so far.
    // (Every file of the data dir is read: the WAL holds the commit that minted it.)
    let (s, health) = d.get("/healthz");
    assert_eq!((s, health.as_str()), (200, "ok\n"));
    let logged: Vec<String> = d.log.try_iter().collect();
    assert!(!logged.iter().any(|l| l.contains(&token)), "{logged:?}");
    let hash = provision::keys::token_hash(&token);
    let mut hash_seen = false;
    for entry in std::fs::read_dir(d.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            let has = |s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(
                !has(&token),
                "the install token is in {} in clear",
                path.display()
            );
            hash_seen |= has(&hash);
        }
    }
    assert!(
        hash_seen,
        "the files read hold the token's hash: the search works"
    );
    let (s, refused) = d.get(&format!("/config/{}/preseed.cfg", "0".repeat(64)));
    assert_eq!(s, 403, "{refused}");

    let show = d.cli_ok(&["machines", "show", "5254.0012.3456"]);
    assert!(show.contains("installing"), "{show}");

    let (s, body) = d.post(
        &format!("/phone-home/{token}"),
        "text/plain",
        &format!("{HOST_KEY}\n"),
    );
    assert_eq!(s, 200, "{body}");
    let (s, local) = d.get("/ipxe?mac=52-54-00-12-34-56&platform=pcbios");
    assert_eq!(s, 200);
    assert!(
        local.contains("sanboot --no-describe --drive 0x80") && !local.contains("kernel"),
        "{local}"
    );
    let (s, _) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 410, "burnt token");

    let list = d.cli_ok(&["machines", "list", "--state", "installed"]);
    assert!(
        list.contains("52:54:00:12:34:56") && list.contains("node1"),
        "{list}"
    );
    let show = d.cli_ok(&["machines", "show", "525400123456"]);
    assert!(
        show.contains("host key   ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs"),
        "{show}"
    );

    let events = d.cli_ok(&["events", "52:54:00:12:34:56"]);
    let kinds: Vec<&str> = events
        .lines()
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or("")
                .trim_end_matches(':')
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "enrolled",
            "install_started",
            "config_served",
            "phoned_home",
            "ipxe_served",
            "config_refused"
        ],
        "{events}"
    );
    assert!(
        events.contains("install_started enrolled → installing"),
        "{events}"
    );
    assert!(
        events
            .contains("phoned_home installing → installed: 1 SSH host key(s) pinned: ssh-ed25519"),
        "{events}"
    );
    assert!(
        events.contains("local boot (installed, pcbios)"),
        "{events}"
    );

    // Reprovision: the next boot installs again with a new token.
    let out = d.cli_ok(&["machines", "reprovision", "52:54:00:12:34:56"]);
    assert!(out.contains("enrolled (generation 1)"), "{out}");
    let (_, again) = d.get("/ipxe?mac=52-54-00-12-34-56&platform=efi");
    assert_ne!(token_of(&again), token);

    let rendered = d.cli_ok(&["render", "52:54:00:12:34:56", "preseed.cfg"]);
    assert!(rendered.contains("REDACTED-INSTALL-TOKEN") && !rendered.contains(&token_of(&again)));
    d.cli_ok(&["machines", "delete", "52:54:00:12:34:56"]);
    let events = d.cli_ok(&["events", "52:54:00:12:34:56"]);
    assert!(
        events.lines().last().unwrap().contains("deleted"),
        "{events}"
    );
}

#[test]
fn enroll_wait_returns_when_installed() {
    let d = Daemon::start();
    let url = d.admin_url();
    let token_file = d.token_file();
    let waiter = std::process::Command::new(crate::support::BIN)
        .args([
            "enroll",
            "52:54:00:00:00:42",
            "--profile",
            "fedora-coreos",
            "--wait",
            "--timeout",
            "60s",
        ])
        .env("PROVISION_URL", &url)
        .env("PROVISION_TOKEN_FILE", &token_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Boot it once enrolled, then phone home.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let script = loop {
        let (s, body) = d.get("/ipxe?mac=52-54-00-00-00-42&platform=efi");
        if s == 200 && body.contains("kernel") {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "enroll --wait did not enroll the machine within 30 s: {s} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let (s, _) = d.post(
        &format!("/phone-home/{}", token_of(&script)),
        "text/plain",
        HOST_KEY,
    );
    assert_eq!(s, 200);
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.trim_end().ends_with("52:54:00:00:00:42: installed"),
        "{stdout}"
    );
}

#[test]
fn bad_input_gets_a_message_and_exit_code_2() {
    let d = Daemon::start();
    let cases: &[(&[&str], &str)] = &[
        (
            &["enroll", "52:54:00:zz:00:01", "--profile", "debian-12"],
            "is not a MAC address",
        ),
        (
            &[
                "enroll",
                "52:54:00:00:00:01",
                "--profile",
                "debian-12",
                "--var",
                "novalue",
            ],
            "must be NAME=VALUE",
        ),
        (
            &[
                "enroll",
                "52:54:00:00:00:01",
                "--profile",
                "debian-12",
                "--var",
                "a-b=1",
            ],
            "variable name",
        ),
        (
            &["enroll", "52:54:00:00:00:01", "--profile", "nope"],
            "no profile named \"nope\"",
        ),
        (
            &[
                "enroll",
                "52:54:00:00:00:01",
                "--profile",
                "debian-12",
                "--hostname",
                "bad\nname",
            ],
            "RFC 1123",
        ),
        (
            &[
                "enroll",
                "52:54:00:00:00:01",
                "--profile",
                "debian-12",
                "--var",
                "domain=a b",
            ],
            "cannot be placed in an iPXE script",
        ),
        (
            &[
                "enroll",
                "52:54:00:00:00:01",
                "--profile",
                "debian-12",
                "--var",
                "domain=${x}",
            ],
            "cannot be placed in an iPXE script",
        ),
        (
            &["machines", "show", "52:54:00:00:00:99"],
            "no machine with MAC 52:54:00:00:00:99",
        ),
        (&["machines", "list", "--state", "happy"], "unknown state"),
        (
            &["machines", "reprovision", "52:54:00:00:00:99"],
            "no machine",
        ),
        (&["render", "52:54:00:00:00:99", "ipxe"], "no machine"),
        (&["enroll"], "required"),
        (
            &["lab", "--profile", "debian-12", "--subnet", "10.1"],
            "must be three octets",
        ),
        (
            &[
                "lab",
                "--profile",
                "debian-12",
                "--bios",
                "0",
                "--uefi",
                "0",
            ],
            "ask for 1 to 16 VMs",
        ),
        (
            &[
                "lab",
                "--profile",
                "test-debian-nocloud",
                "--real-os",
                "/nonexistent/root.img",
            ],
            "--real-os /nonexistent/root.img: no such file; build the medium with `bash tests/realos/build.sh DIR`",
        ),
    ];
    for (args, want) in cases {
        let out = d.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let list = d.cli_ok(&["machines", "list"]);
    assert_eq!(list.lines().count(), 1, "nothing was enrolled: {list}");

    // A wrong token is an auth failure, not bad input.
    let out = std::process::Command::new(crate::support::BIN)
        .args(["machines", "list"])
        .env("PROVISION_URL", d.admin_url())
        .env("PROVISION_FINGERPRINT", d.fingerprint())
        .env("PROVISION_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong admin token"));
}

/// Groups through the real CLI and daemon: a default group and a rack group, a machine
/// enrolled with no profile of its own getting the rack's, `machines show` naming where each
/// value came from, a tie refused with exit code 2, update and delete.
#[test]
fn groups_give_machines_their_values_and_show_says_from_where() {
    let d = Daemon::start();
    d.cli_ok(&[
        "groups",
        "create",
        "site",
        "--var",
        "domain=site.example",
        "--var",
        "timezone=UTC",
    ]);
    let out = d.cli_ok(&[
        "groups",
        "create",
        "rack3",
        "--selector",
        "rack=3",
        "--profile",
        "debian-12",
        "--var",
        "timezone=Europe/Oslo",
        "--label",
        "row=b",
    ]);
    assert!(
        out.contains("created group rack3") && out.contains("selector   rack=3"),
        "{out}"
    );
    let list = d.cli_ok(&["groups", "list"]);
    assert!(
        list.contains("rack3") && list.contains("debian-12"),
        "{list}"
    );
    assert!(list.contains("(every machine)"), "{list}");

    let out = d.cli_ok(&[
        "enroll",
        "52:54:00:00:33:01",
        "--label",
        "rack=3",
        "--hostname",
        "r3n1",
    ]);
    assert!(out.contains("with profile debian-12"), "{out}");
    let show = d.cli_ok(&["machines", "show", "52:54:00:00:33:01"]);
    for want in [
        "profile     debian-12   (group rack3)",
        "groups      rack3, site",
        "var        domain=site.example   (group site)",
        "var        timezone=Europe/Oslo   (group rack3)",
        "label      rack=3\n",
        "label      row=b   (group rack3)",
    ] {
        assert!(show.contains(want), "{want:?} in:\n{show}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["machines", "show", "52:54:00:00:33:01", "--json"]))
            .unwrap();
    assert_eq!(json["inherited"]["profile"], "rack3");
    assert_eq!(json["inherited"]["vars.domain"], "site");
    assert_eq!(json["groups"], serde_json::json!(["rack3", "site"]));
    // What the machine is served carries the groups' values.
    let (s, script) = d.get("/ipxe?mac=52-54-00-00-33-01&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    assert!(script.contains("domain=site.example"), "{script}");

    // A tie: same specificity, can select one machine, both set the profile.
    let out = d.cli(&[
        "groups",
        "create",
        "r640",
        "-s",
        "model=r640",
        "-p",
        "ubuntu-24.04",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("groups r640 and rack3") && err.contains("more specific"),
        "{err}"
    );
    // More specific is fine, and wins.
    d.cli_ok(&[
        "groups",
        "create",
        "rack3-r640",
        "-s",
        "rack=3",
        "-s",
        "model=r640",
        "-p",
        "ubuntu-24.04",
    ]);
    d.cli_ok(&[
        "machines",
        "update",
        "52:54:00:00:33:01",
        "--var",
        "timezone=Asia/Tokyo",
    ]);
    let show = d.cli_ok(&["machines", "show", "52:54:00:00:33:01"]);
    assert!(
        show.contains("var        timezone=Asia/Tokyo\n"),
        "its own: {show}"
    );

    let out = d.cli_ok(&[
        "groups",
        "update",
        "site",
        "--unset-var",
        "timezone",
        "--var",
        "mirror_host=m.site",
    ]);
    assert!(
        out.contains("var        mirror_host=m.site") && !out.contains("timezone"),
        "{out}"
    );
    let out = d.cli(&["groups", "delete", "rack3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("without a profile") && err.contains("52:54:00:00:33:01"),
        "{err}"
    );
    d.cli_ok(&["groups", "delete", "rack3-r640"]);
    let out = d.cli(&["groups", "show", "rack3-r640"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no group named"));
    let events = d.cli_ok(&["events"]);
    assert!(events.contains("group rack3-r640 deleted"), "{events}");
}

/// The worked example in docs/fleet.md, run as written (each `provision` line of its marked
/// block through the real CLI), then the first boot request of the server known only by its
/// serial: it installs the profile its serial's group gives, with that group's values.
#[test]
fn the_fleet_example_runs_as_written() {
    let d = Daemon::start();
    let block = fleet_doc_block(&fleet_doc(), "<!-- example: groups -->");
    let mut outputs = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "provision", "{line}");
        outputs.push(d.cli_ok(&words[1..]));
    }
    assert!(outputs.len() >= 7, "{block}");
    let show = outputs.last().unwrap();
    for want in [
        "profile     debian-12   (group rack3)",
        "var        domain=site.example   (group site)",
        "var        timezone=Europe/Oslo   (group rack3)",
        "label      row=b   (group rack3)",
    ] {
        assert!(show.contains(want), "{want:?} in:\n{show}");
    }
    // SN1001 powers on: nothing enrolled, its serial in the boot request.
    let (s, script) =
        d.get("/ipxe?mac=52-54-00-00-10-01&serial=SN1001&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    assert!(script.contains("/assets/debian-12/linux"), "{script}");
    let token = token_of(&script);
    let (s, preseed) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200, "{preseed}");
    assert!(
        preseed.contains("d-i partman-auto/disk string /dev/nvme0n1"),
        "{preseed}"
    );
    let show = d.cli_ok(&["machines", "show", "52:54:00:00:10:01"]);
    for want in [
        "state       installing",
        "profile     debian-12   (group sn1001)",
        "serial      SN1001",
        "label      rack=3   (group sn1001)",
    ] {
        assert!(show.contains(want), "{want:?} in:\n{show}");
    }
    assert!(
        show.contains("profile debian-12 from group sn1001"),
        "{show}"
    );
    // SN1002 has not booted: nothing about it exists.
    let list = d.cli_ok(&["machines", "list"]);
    assert_eq!(list.lines().count(), 3, "header, r3n1, SN1001:\n{list}");
}

/// Discovery rules through the real CLI and daemon: an OUI rule with a count and a hostname
/// pattern enrolls the first machines that ask `/ipxe` and leaves the next discovered; a
/// propose-mode rule waits for `machines confirm`; bad input is exit code 2.
#[test]
fn rules_enroll_discovered_machines_up_to_their_count() {
    let d = Daemon::start();
    let out = d.cli_ok(&[
        "rules",
        "create",
        "rack7",
        "-m",
        "mac=52-54-00-77-*",
        "-p",
        "debian-12",
        "--hostname",
        "rack7-{index:02}",
        "--label",
        "rack=7",
        "--max",
        "2",
        "--priority",
        "10",
    ]);
    assert!(
        out.contains("created rule rack7") && out.contains("match      mac=52:54:00:77:*"),
        "{out}"
    );
    for i in 1..=3 {
        let (s, script) = d.get(&format!(
            "/ipxe?mac=52-54-00-77-00-0{i}&arch=x86_64&platform=pcbios"
        ));
        assert_eq!(s, 200, "{script}");
        assert_eq!(
            script.contains("/assets/debian-12/linux"),
            i <= 2,
            "{i}: {script}"
        );
    }
    let show = d.cli_ok(&["machines", "show", "52:54:00:77:00:02"]);
    assert!(
        show.contains("state       installing") && show.contains("hostname    rack7-02"),
        "{show}"
    );
    assert!(
        show.contains("by rule rack7 (machine 2 of 2), hostname rack7-02"),
        "{show}"
    );
    let show = d.cli_ok(&["machines", "show", "52:54:00:77:00:03"]);
    assert!(
        show.contains("state       discovered") && show.contains("rule_full"),
        "{show}"
    );
    let list = d.cli_ok(&["rules", "list"]);
    assert!(list.contains("rack7") && list.contains("2/2"), "{list}");

    // Propose mode, tried first: it only marks, and confirm enrolls.
    d.cli_ok(&[
        "rules",
        "create",
        "lab",
        "-m",
        "mac=52:54:00:78:*",
        "-p",
        "ubuntu-24.04",
        "--propose",
        "--priority",
        "5",
    ]);
    let (s, script) = d.get("/ipxe?mac=52-54-00-78-00-01&arch=x86_64&platform=efi");
    assert_eq!(s, 200);
    assert!(script.contains("exit"), "the discovery answer: {script}");
    let show = d.cli_ok(&["machines", "show", "52:54:00:78:00:01"]);
    assert!(show.contains("proposed    rule lab matches"), "{show}");
    let out = d.cli_ok(&["machines", "confirm", "52:54:00:78:00:01"]);
    assert!(out.contains("enrolled with profile ubuntu-24.04"), "{out}");
    let out = d.cli(&["machines", "confirm", "52:54:00:78:00:01"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rule proposes"));

    // Raising the count lets the third rack7 machine in at its next boot.
    d.cli_ok(&["rules", "update", "rack7", "--max", "3"]);
    let (_, script) = d.get("/ipxe?mac=52-54-00-77-00-03&arch=x86_64&platform=pcbios");
    assert!(script.contains("/assets/debian-12/linux"), "{script}");
    let out = d.cli_ok(&["rules", "update", "rack7", "--disable"]);
    assert!(
        out.contains("disabled") && out.contains("enrolled   3 of 3"),
        "{out}"
    );

    for (args, want) in [
        (
            &["rules", "create", "x", "-m", "mac=52:5*", "-p", "debian-12"][..],
            "whole octets",
        ),
        (
            &[
                "rules",
                "create",
                "x",
                "--hostname",
                "a_{index}",
                "-p",
                "debian-12",
            ][..],
            "RFC 1123",
        ),
        (
            &["rules", "create", "rack7", "-p", "debian-12"][..],
            "already exists",
        ),
        (&["rules", "show", "nope"][..], "no rule named"),
    ] {
        let out = d.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    d.cli_ok(&["rules", "delete", "lab"]);
    assert!(d.cli_ok(&["events"]).contains("rule lab deleted"));
}

/// `machines list --limit` reads no more pages than it shows and says when more match.
#[test]
fn machines_list_limit_shows_the_first_and_says_more_match() {
    let d = Daemon::start();
    for i in 0..5 {
        d.cli_ok(&["enroll", &format!("52:54:00:00:44:0{i}"), "-p", "debian-12"]);
    }
    let out = d.cli(&["machines", "list", "--limit", "3"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "header and three: {stdout}");
    assert!(stdout.contains("52:54:00:00:44:02") && !stdout.contains("52:54:00:00:44:03"));
    assert!(
        stderr.contains("the first 3; more machines match"),
        "{stderr}"
    );
    let out = d.cli(&["machines", "list", "--limit", "5", "--search", "52:54:00"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 6);
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
}

/// `apply` and `export` through the real CLI and daemon: a hand-written YAML file is planned
/// (`--dry-run` changes nothing), applied, and applied again with no change; a discovered
/// machine the file names is enrolled; an edit shows as a diff; only `--prune` deletes; errors
/// name the file, line and field and change nothing; export → apply → export gives the same
/// bytes in YAML, TOML and CSV; a spreadsheet enrolls machines a group gives a profile.
#[test]
fn an_inventory_file_plans_applies_prunes_and_round_trips() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    // Seen by the daemon before anyone declared it.
    let (s, _) = d.get("/ipxe?mac=52-54-00-00-20-09&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200);
    let inv = file(
        "inventory.yaml",
        "\
groups:
  - name: rack3
    selector: {rack: 3}
    profile: debian-12
    vars: {timezone: Europe/Oslo}
rules:
  - name: oui
    priority: 10
    match: {mac: '52:54:00:00:30:*'}
    hostname: 'rack3-{index:02}'
    labels: {rack: 3}
    max: 2
machines:
  - mac: 52:54:00:00:20:01
    hostname: r3n1
    labels: {rack: 3}
    vars: {ip: 10.0.0.21}
  - mac: 52-54-00-00-20-02
    profile: ubuntu-24.04
  - mac: 52:54:00:00:20:09
    labels: {rack: 3}
",
    );
    let plan = d.cli_ok(&["apply", "-f", &inv, "--dry-run"]);
    for want in [
        "+ group rack3\n",
        "+     profile: debian-12\n",
        "+ rule oui\n",
        "+ machine 52:54:00:00:20:01\n",
        "+     vars.ip: 10.0.0.21\n",
        "~ machine 52:54:00:00:20:09 (discovered: enrolled)\n",
        "dry run, nothing changed: 4 to create, 1 to enroll, 0 to change, 0 to delete; 0 unchanged",
    ] {
        assert!(plan.contains(want), "{want:?} in:\n{plan}");
    }
    assert!(d.cli_ok(&["groups", "list"]).lines().count() == 1);
    let list = d.cli_ok(&["machines", "list"]);
    assert_eq!(
        list.lines().count(),
        2,
        "header and the discovered one:\n{list}"
    );

    let applied = d.cli_ok(&["apply", "-f", &inv]);
    assert!(
        applied.contains("applied: 4 to create, 1 to enroll"),
        "{applied}"
    );
    let again = d.cli_ok(&["apply", "-f", &inv]);
    assert_eq!(
        again,
        "no changes: the inventory is as the file says (1 group, 1 rule, 3 machines)\n"
    );
    let show = d.cli_ok(&["machines", "show", "52:54:00:00:20:09"]);
    assert!(
        show.contains("state       enrolled") && show.contains("(group rack3)"),
        "{show}"
    );
    // It boots like any enrolled machine.
    let (s, script) = d.get("/ipxe?mac=52-54-00-00-20-01&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200);
    assert!(script.contains("/assets/debian-12/linux"), "{script}");

    // An edit, as a diff; without --prune the machine left out stays.
    let edited = file(
        "edited.yaml",
        &std::fs::read_to_string(&inv)
            .unwrap()
            .replace("hostname: r3n1", "hostname: r3n01")
            .replace(
                "  - mac: 52-54-00-00-20-02\n    profile: ubuntu-24.04\n",
                "",
            ),
    );
    let diff = d.cli_ok(&["apply", "-f", &edited, "--dry-run"]);
    assert!(
        diff.contains("~ machine 52:54:00:00:20:01\n-     hostname: r3n1\n+     hostname: r3n01\n"),
        "{diff}"
    );
    assert!(!diff.contains("- machine"), "{diff}");
    let pruned = d.cli_ok(&["apply", "-f", &edited, "--prune"]);
    assert!(
        pruned.contains("- machine 52:54:00:00:20:02\n")
            && pruned.contains(
                "applied: 0 to create, 0 to enroll, 1 to change, 1 to delete; 3 unchanged"
            ),
        "{pruned}"
    );
    assert!(!d
        .cli(&["machines", "show", "52:54:00:00:20:02"])
        .status
        .success());

    // Every problem, at its line and field; nothing changes.
    let bad = file(
        "bad.yaml",
        "\
machines:
  - mac: 52:54:00:00:20:01
    hostname: -r3n1-
  - mac: 52:54:00:00:20:05
    profile: debian-12
    vars: {ip: 10.0.0.21}
  - mac: 52:54:00:00:20:05
    profile: no-such-profile
",
    );
    let out = d.cli(&["apply", "-f", &bad, "--prune"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "bad.yaml:3: machines[0].hostname: hostname \"-r3n1-\" is not a valid RFC 1123 name",
        "bad.yaml:7: machines[2]: machine 52:54:00:00:20:05 is declared twice (first at line 4)",
        "bad.yaml:8: machines[2].profile: no profile named \"no-such-profile\"",
    ] {
        assert!(err.contains(want), "{want:?} in:\n{err}");
    }
    let out = d.cli(&[
        "apply",
        "-f",
        &file(
            "typo.yaml",
            "machines:\n  - mac: 52:54:00:00:20:01\n    hostnme: x\n",
        ),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("typo.yaml:3: ") && err.contains("unknown field `hostnme`"),
        "{err}"
    );
    // A reservation held by a machine outside the file.
    let out = d.cli(&[
        "apply",
        "-f",
        &file(
            "taken.csv",
            "mac,profile,vars.ip\n52:54:00:00:20:06,debian-12,10.0.0.21\n",
        ),
    ]);
    assert_eq!(out.status.code(), Some(2), "a conflict is bad input");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("10.0.0.21 would be the DHCP reservation"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        d.cli_ok(&["apply", "-f", &edited]),
        "no changes: the inventory is as the file says (1 group, 1 rule, 2 machines)\n"
    );

    // A spreadsheet: machines only; the group gives them their profile.
    let sheet = file(
        "rack3.csv",
        "mac,hostname,serial,labels.rack\n\
         52:54:00:00:20:11,r3n11,SN11,3\n\
         52:54:00:00:20:12,\"r3n12\",SN12,3\n",
    );
    let out = d.cli_ok(&["apply", "-f", &sheet]);
    assert!(out.contains("applied: 2 to create"), "{out}");
    let show = d.cli_ok(&["machines", "show", "52:54:00:00:20:12"]);
    assert!(
        show.contains("profile     debian-12   (group rack3)") && show.contains("serial      SN12"),
        "{show}"
    );

    // Export → apply → export, byte for byte, in each format.
    for format in ["yaml", "toml", "csv"] {
        let out = dir.path().join(format!("export.{format}"));
        let out = out.to_str().unwrap();
        d.cli_ok(&["export", "-o", out]);
        let first = std::fs::read_to_string(out).unwrap();
        assert!(first.contains("52:54:00:00:20:12"), "{first}");
        let again = d.cli_ok(&["apply", "-f", out, "--prune"]);
        assert!(again.starts_with("no changes: "), "{format}: {again}");
        let second = d.cli_ok(&["export", "--format", format]);
        assert_eq!(first, second, "{format}");
    }
    let yaml = d.cli_ok(&["export"]);
    assert!(
        yaml.contains("- name: oui\n  priority: 10\n") && !yaml.contains("20:02"),
        "{yaml}"
    );
}

/// docs/fleet.md.
fn fleet_doc() -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fleet.md"))
        .unwrap()
}

/// The text of the fenced block after `marker` in docs/fleet.md.
fn fleet_doc_block(doc: &str, marker: &str) -> String {
    doc.split_once(marker)
        .and_then(|(_, rest)| rest.split_once("```"))
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("docs/fleet.md has a block after {marker:?}"))
        .0
        .to_string()
}

/// The worked example of an inventory kept in git (docs/fleet.md), run as written: its file,
/// its first block of commands (dry run, apply, export, git), then three machines of the
/// batch and SN1001 boot, then its second block (export, git diff, commit, a pruning dry run
/// that finds nothing to do). The plan the page shows is the plan printed.
#[test]
fn the_inventory_example_runs_as_written() {
    let d = Daemon::start();
    let doc = fleet_doc();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("inventory.yaml"),
        fleet_doc_block(&doc, "<!-- example: inventory.yaml -->"),
    )
    .unwrap();
    let bin_dir = std::path::Path::new(crate::support::BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |block: &str| -> Vec<String> {
        block
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let out = std::process::Command::new("bash")
                    .args(["-c", line])
                    .current_dir(dir.path())
                    .env("PATH", &path)
                    .env("PROVISION_URL", d.admin_url())
                    .env("PROVISION_TOKEN_FILE", d.token_file())
                    .env_remove("PROVISION_TOKEN")
                    .env_remove("PROVISION_FINGERPRINT")
                    .env("GIT_AUTHOR_NAME", "Operator")
                    .env("GIT_AUTHOR_EMAIL", "ops@site.example")
                    .env("GIT_COMMITTER_NAME", "Operator")
                    .env("GIT_COMMITTER_EMAIL", "ops@site.example")
                    .env("GIT_CONFIG_GLOBAL", "/dev/null")
                    .output()
                    .expect("running bash");
                assert!(
                    out.status.success(),
                    "{line}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            })
            .collect()
    };
    let first = run(&fleet_doc_block(&doc, "<!-- example: inventory -->"));
    let plan = &first[0];
    let shown = doc
        .split_once("The dry run prints the plan as a diff and changes nothing:")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the page shows the plan")
        .0;
    for line in shown.lines().filter(|l| *l != "…") {
        assert!(plan.contains(&format!("{line}\n")), "{line:?} in:\n{plan}");
    }
    assert!(first[1].contains("applied: 6 to create"), "{}", first[1]);
    assert_eq!(
        d.cli_ok(&[
            "apply",
            "-f",
            dir.path().join("inventory.yaml").to_str().unwrap()
        ]),
        "no changes: the inventory is as the file says (3 groups, 1 rule, 2 machines)\n"
    );

    // Three of the batch and SN1001 power on.
    for i in 1..=3 {
        let (s, script) = d.get(&format!(
            "/ipxe?mac=3c-ec-ef-10-00-0{i}&arch=x86_64&platform=efi"
        ));
        assert_eq!(s, 200);
        assert!(script.contains("/assets/debian-12/linux"), "{script}");
    }
    let (s, script) =
        d.get("/ipxe?mac=52-54-00-00-10-01&serial=SN1001&arch=x86_64&platform=pcbios");
    assert_eq!(s, 200);
    assert!(script.contains("/assets/debian-12/linux"), "{script}");

    let second = run(&fleet_doc_block(
        &doc,
        "<!-- example: inventory, after the batch booted -->",
    ));
    assert!(second[1].contains("1 file changed"), "{}", second[1]);
    assert_eq!(
        second[3],
        "no changes: the inventory is as the file says (3 groups, 1 rule, 6 machines)\n"
    );
    let file = std::fs::read_to_string(dir.path().join("inventory.yaml")).unwrap();
    for want in [
        "- mac: 3c:ec:ef:10:00:03\n  profile: debian-12\n  hostname: r4n03\n",
        "- mac: 52:54:00:00:10:01\n  serial: SN1001\n",
    ] {
        assert!(file.contains(want), "{want:?} in:\n{file}");
    }
}
