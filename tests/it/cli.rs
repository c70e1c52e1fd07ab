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
