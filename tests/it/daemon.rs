//! The daemon's life: configuration checks, first start, shutdown, crash, privileged ports.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::support::{Daemon, BIN};

#[test]
fn first_start_creates_private_secrets() {
    let d = Daemon::start();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.token_file()), 0o600);
    assert_eq!(mode(&d.dir.path().join("ssh/id_ed25519")), 0o600);
    assert_eq!(mode(d.dir.path()), 0o700);
    for f in ["provision.db", "provision.db-wal", "provision.db-shm"] {
        assert_eq!(mode(&d.dir.path().join(f)), 0o600, "{f}");
    }
    assert!(d.dir.path().join("assets").is_dir());
    let pubkey = std::fs::read_to_string(d.dir.path().join("ssh/id_ed25519.pub")).unwrap();
    // The daemon's key is rendered into installs.
    d.cli_ok(&["enroll", "52:54:00:00:00:01", "--profile", "ubuntu-24.04"]);
    let ud = d.cli_ok(&["render", "52:54:00:00:00:01", "user-data"]);
    assert!(ud.contains(pubkey.trim()), "{ud}");
    // The API is not on the machine listener; on the admin listener it needs the token.
    let (s, body) = d.get("/api/v1/machines");
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("admin listener"), "{body}");
    let (s, body) = d.admin_get("/api/v1/machines", None);
    assert_eq!(s, 401, "{body}");
    assert_eq!(mode(&d.dir.path().join("admin-tls/key.pem")), 0o600);
}

#[test]
fn a_data_dir_left_readable_is_made_private_again() {
    // An earlier version (or a restore) left the data dir 0755 and the database 0644.
    let dir = tempfile::tempdir().unwrap();
    let set = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut d = Daemon::start_in(dir, &[]);
    d.terminate();
    let dir = d.take_dir();
    set(dir.path(), 0o755);
    set(&dir.path().join("provision.db"), 0o644);
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(mode(d.dir.path()), 0o700);
    assert_eq!(mode(&d.dir.path().join("provision.db")), 0o600);
}

#[test]
fn check_config_validates_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("provision.toml");
    std::fs::write(&cfg, "http = \"127.0.0.1:0\"\ninstall_token_ttl = \"2h\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--config"])
        .arg(&cfg)
        .args(["--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("configuration OK") && stdout.contains("install token ttl: 2h"),
        "{stdout}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "--check-config writes nothing"
    );

    std::fs::write(&cfg, "http = \"127.0.0.1:0\"\ntftp_port = 69\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `tftp_port`"));

    let out = Command::new(BIN)
        .args(["serve", "--check-config"])
        .env("PROVISION_HTPP", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("unknown environment variable PROVISION_HTPP"));

    // A broken operator template is caught at check time, naming the file.
    let tdir = dir.path().join("templates/profiles");
    std::fs::create_dir_all(&tdir).unwrap();
    std::fs::write(
        tdir.join("broken.toml"),
        "description = \"x\"\nkernel = \"{{ assets_url }\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--templates-dir"])
        .arg(dir.path().join("templates"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml") && err.contains("kernel"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_gracefully() {
    let mut d = Daemon::start();
    let boot = |d: &Daemon| {
        let (s, body) = d.get("/ipxe?mac=52-54-00-00-00-31&platform=pcbios");
        assert_eq!(s, 200, "{body}");
    };
    // ipxe_served occurrences on the timeline: a row stands for 1, or for n when it says (×n).
    let served = |ev: &str| -> u32 {
        ev.lines()
            .filter(|l| l.contains("ipxe_served"))
            .map(|l| {
                l.split("(×")
                    .nth(1)
                    .and_then(|n| n.trim_end_matches(')').parse().ok())
                    .unwrap_or(1)
            })
            .sum()
    };
    // The first boot discovers the machine; the events read writes its ipxe_served.
    boot(&d);
    let ev = d.cli_ok(&["events", "52:54:00:00:00:31"]);
    assert_eq!(served(&ev), 1, "{ev}");
    // The second, within the minute, is only queued or counted in memory when SIGTERM comes.
    boot(&d);
    let st = d.terminate();
    assert!(st.success(), "{st:?}");
    d.wait_log("SIGTERM: shutting down");
    d.wait_log("provision stopped");
    // A graceful stop wrote it: nothing the daemon saw is lost.
    let d = Daemon::start_in(d.take_dir(), &[]);
    let ev = d.cli_ok(&["events", "52:54:00:00:00:31"]);
    assert_eq!(served(&ev), 2, "{ev}");
}

#[test]
fn acknowledged_writes_survive_a_crash() {
    let d = Daemon::start();
    d.cli_ok(&[
        "enroll",
        "52:54:00:00:00:07",
        "--profile",
        "flatcar",
        "--hostname",
        "n7",
    ]);
    let (_, script) = d.get("/ipxe?mac=52-54-00-00-00-07&platform=efi");
    let token = crate::support::token_of(&script);
    let dir = d.crash();
    let d = Daemon::start_in(dir, &[]);
    let show = d.cli_ok(&["machines", "show", "52:54:00:00:00:07"]);
    assert!(show.contains("installing") && show.contains("n7"), "{show}");
    // The token issued before the crash still works after it.
    let (s, body) = d.get(&format!("/config/{token}/install.ign"));
    assert_eq!(s, 200, "{body}");
}

#[test]
fn privileged_port_without_permission_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = dir.path().join("data");
    // As root: in a network namespace of its own, where ports below 1024 are privileged
    // whatever the host's net.ipv4.ip_unprivileged_port_start says (the setting is per
    // namespace), drop to nobody for this one command (setpriv from util-linux). Otherwise the
    // test user already lacks the permission. `timeout`: were the bind to succeed after all,
    // the daemon would run on and the test would hang instead of failing.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("unshare");
        c.args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && echo 1024 > /proc/sys/net/ipv4/ip_unprivileged_port_start \
             && exec timeout 30 setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" \"$@\"",
            BIN,
        ]);
        c
    } else {
        let mut c = Command::new("timeout");
        c.args(["30", BIN]);
        c
    };
    let out = cmd
        .args(["serve", "--http", "127.0.0.1:81", "--data-dir"])
        .arg(&data)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied")
            && err.contains("CAP_NET_BIND_SERVICE")
            && err.contains("--http"),
        "{err}"
    );
}

#[test]
fn dhcp_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["serve", "--check-config"])
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, err, _) = check(&["--dhcp", "10.254.254.254"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is not on any interface"), "{err}");
    let (code, err, _) = check(&["--dhcp-mode", "full"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("needs dhcp_range"), "{err}");
    let (code, err, _) = check(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.0.0.200-10.0.0.100",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("from low to high"), "{err}");
    let (code, err, _) = check(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.0.0.100-10.0.0.200",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("limit it to the lab's interface"), "{err}");
    let (code, err, _) = check(&["--install-token-ttl", "10000y"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("over a year"), "{err}");
    let (code, err, _) = check(&["--dhcp-range", "10.0.0.1-10.0.0.9"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("only used with dhcp_mode"), "{err}");
    let (code, _, out) = check(&[
        "--dhcp",
        "127.0.0.1",
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.0.0.100-10.0.0.200",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("dhcp: full (addresses 10.0.0.100-10.0.0.200) on interface(s) lo"),
        "{out}"
    );
}

#[test]
fn a_missing_dhcp_interface_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--tftp",
            "off",
            "--dhcp-interface",
            "nosuch0",
            "--dhcp-port",
            "0",
            "--pxe-port",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nosuch0"), "{err}");
}

/// A flood of unknown MACs asking for `/ipxe` leaves the inventory at its discovered cap; the
/// status the CLI prints says what was evicted, and the last ones seen are still there.
#[test]
fn a_flood_of_unknown_macs_stays_at_the_discovered_cap() {
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &["--max-discovered", "20"]);
    for i in 0..120u32 {
        let (s, body) = d.get(&format!(
            "/ipxe?mac=02-00-00-00-{:02x}-{:02x}",
            i >> 8,
            i & 0xff
        ));
        assert_eq!(s, 200, "{body}");
        assert!(body.contains("sanboot"), "{body}");
    }
    // The cap is enforced at most once a second by the writer; a boot after that is
    // recorded and evicts again, so poll the status until the count settles at the cap.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let status = d.cli_ok(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        if v["machines"]["discovered"] == 20 || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(status["machines"]["discovered"], 20, "{status}");
    assert_eq!(status["inventory"]["discovered_evicted"], 100, "{status}");
    let list = d.cli_ok(&["machines", "list", "--state", "discovered"]);
    assert!(
        list.contains("02:00:00:00:00:77"),
        "the last one seen stays: {list}"
    );
    assert!(
        !list.contains("02:00:00:00:00:00"),
        "the first one seen went: {list}"
    );
    let text = d.cli_ok(&["status"]);
    assert!(
        text.contains("discovered evicted") && text.contains("100"),
        "{text}"
    );
}

#[test]
fn one_address_cannot_take_every_http_connection() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let d = Daemon::start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", d.port).parse().unwrap();
    let healthz = |s: &mut TcpStream| -> String {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let held: Vec<TcpStream> = (0..provision::http::MAX_PER_ADDRESS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // One more from the same address is closed unanswered, and the daemon says why.
    let mut extra = TcpStream::connect(addr).unwrap();
    assert_eq!(healthz(&mut extra), "");
    d.wait_log("connections from 127.0.0.1 open");
    // Another address is served meanwhile.
    let from_other = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(
            &"127.0.0.2:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.connect(&addr.into()).unwrap();
        TcpStream::from(s)
    };
    let mut from_other = from_other;
    assert!(healthz(&mut from_other).contains("200 OK"));
    // The held connections closed, the address is served again.
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut again = TcpStream::connect(addr).unwrap();
        if healthz(&mut again).contains("200 OK") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the address's slots were not given back"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Install tokens are stored only as their SHA-256: after one finished install and one live
/// token, neither token (nor the admin token) is anywhere in the database or its WAL, while
/// the live token's hash is — so the search looked where a token would be. Checked while the
/// daemon runs (recent commits are in the WAL) and after it stopped.
#[test]
fn install_tokens_are_never_in_the_database_or_its_wal_only_their_hashes() {
    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@t";
    let mut d = Daemon::start();
    let mut tokens = Vec::new();
    for mac in ["52:54:00:00:0b:01", "52:54:00:00:0b:02"] {
        d.cli_ok(&["enroll", mac, "--profile", "debian-12"]);
        let (s, script) = d.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
        assert_eq!(s, 200, "{script}");
        tokens.push(crate::support::token_of(&script));
    }
    let (used, live) = (&tokens[0], &tokens[1]);
    let (s, body) = d.get(&format!("/config/{used}/preseed.cfg"));
    assert_eq!(s, 200, "{body}");
    let (s, body) = d.post(&format!("/phone-home/{used}"), "text/plain", KEY);
    assert_eq!(s, 200, "{body}");
    let admin = std::fs::read_to_string(d.token_file()).unwrap();
    let admin = admin.trim();
    let stored = |dir: &std::path::Path| -> Vec<u8> {
        ["provision.db", "provision.db-wal"]
            .iter()
            .flat_map(|f| std::fs::read(dir.join(f)).unwrap_or_default())
            .collect()
    };
    let has = |bytes: &[u8], s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
    let check = |bytes: &[u8], when: &str| {
        assert!(bytes.len() > 4096, "{when}: nothing read");
        for (what, secret) in [
            ("used install", used.as_str()),
            ("live install", live),
            ("admin", admin),
        ] {
            assert!(
                !has(bytes, secret),
                "{when}: the {what} token is stored in clear"
            );
        }
        assert!(
            has(bytes, &provision::keys::token_hash(live)),
            "{when}: the live token's hash is not in the database: the search looked in the wrong place"
        );
    };
    check(&stored(d.dir.path()), "while running");
    d.terminate();
    check(&stored(d.dir.path()), "after stopping");
}

/// `--ipxe-dir` overrides the built-in iPXE scripts file by file: a site's `local.ipxe` is
/// what a machine booting its disk gets (rendered with the machine's values), the built-in
/// `boot.ipxe` stays, and a changed file is served after SIGHUP.
#[test]
fn an_ipxe_dir_overrides_the_built_in_scripts_file_by_file_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let ipxe = dir.path().join("site-ipxe");
    std::fs::create_dir(&ipxe).unwrap();
    let local = ipxe.join("local.ipxe");
    std::fs::write(
        &local,
        "#!ipxe\necho site local boot for {{ mac }}\nsanboot --drive 0x80 || exit\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(data, &["--ipxe-dir", ipxe.to_str().unwrap()]);
    let (s, body) = d.get("/ipxe?mac=52-54-00-00-0c-01&platform=pcbios");
    assert_eq!(s, 200, "{body}");
    assert!(
        body.contains("echo site local boot for 52:54:00:00:0c:01"),
        "{body}"
    );
    // Not overridden: the built-in chain script.
    let (s, chain) = d.get("/boot.ipxe");
    assert!(s == 200 && chain.contains("/ipxe?mac="), "{chain}");

    std::fs::write(&local, "#!ipxe\necho changed {{ mac }}\nexit\n").unwrap();
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    d.wait_log("reloaded");
    let (_, body) = d.get("/ipxe?mac=52-54-00-00-0c-01&platform=pcbios");
    assert!(body.contains("echo changed 52:54:00:00:0c:01"), "{body}");
}

/// An install whose token runs out before its phone-home fails the machine: while the daemon
/// runs (the sweeper, every 30 s) and when the token ran out while it was down (at start,
/// before anything is served). The shortest token lifetime is a minute, so this takes two.
#[test]
fn expired_install_tokens_fail_their_machines_by_the_sweeper_and_at_start() {
    use std::time::{Duration, Instant};
    let state = |d: &Daemon, mac: &str| -> serde_json::Value {
        serde_json::from_str(&d.cli_ok(&["machines", "show", mac, "--json"])).unwrap()
    };
    let install = |d: &Daemon, mac: &str| -> Instant {
        d.cli_ok(&["enroll", mac, "--profile", "debian-12"]);
        let (s, script) = d.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
        assert!(s == 200 && script.contains("kernel"), "{script}");
        Instant::now()
    };
    let mut d = Daemon::start_in(tempfile::tempdir().unwrap(), &["--install-token-ttl", "1m"]);
    let (a, b) = ("52:54:00:00:0f:01", "52:54:00:00:0f:02");
    let issued = install(&d, a);
    assert_eq!(state(&d, a)["state"], "installing");
    // The sweeper: failed within the lifetime plus one sweep (and not before the lifetime).
    let failed = loop {
        let m = state(&d, a);
        if m["state"] == "failed" {
            break m;
        }
        assert!(issued.elapsed() < Duration::from_secs(100), "still {m}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(issued.elapsed() >= Duration::from_secs(60));
    assert_eq!(failed["failed_step"], "install");
    assert!(
        failed["failed_reason"]
            .as_str()
            .unwrap()
            .contains("install token expired before the machine phoned home"),
        "{failed}"
    );

    // At start: the token ran out while the daemon was stopped.
    let issued = install(&d, b);
    d.terminate();
    let dir = d.take_dir();
    std::thread::sleep(Duration::from_secs(61).saturating_sub(issued.elapsed()));
    let d = Daemon::start_in(dir, &["--install-token-ttl", "1m"]);
    let m = state(&d, b);
    assert_eq!(m["state"], "failed", "{m}");
    assert_eq!(m["failed_step"], "install");
}
