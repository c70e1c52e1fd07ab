//! `/metrics` for real: a walk-through over DHCP, TFTP and HTTP moves each counter by exactly
//! what it did, the label sets exist before anything happened, no MAC, hostname or token is
//! in the output, and `promtool check metrics` (Debian's `prometheus`) accepts it.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{token_of, tool, Daemon};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@m1";

/// The value of `series` (name and labels exactly as exposed), which must be there.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the exposition:\n{text}"))
}

fn scrape(d: &Daemon, path: &str) -> String {
    let (s, text) = d.get(path);
    assert_eq!(s, 200, "{text}");
    text
}

/// `promtool check metrics` on `text`: no error and no lint problem.
fn promtool(text: &str) {
    use std::io::Write;
    let mut p = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UDP port free now (the daemon binds it right after).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every counter the walk-through moves, with how much it must move.
const MOVED: &[(&str, f64)] = &[
    (
        r#"provision_dhcp_packets_received_total{port="4011",result="answered",type="request"}"#,
        1.0,
    ),
    (
        r#"provision_dhcp_replies_sent_total{client="pxe",type="ack"}"#,
        1.0,
    ),
    (
        r#"provision_dhcp_packets_received_total{port="67",result="not_for_us",type="request"}"#,
        1.0,
    ),
    (
        r#"provision_dhcp_packets_received_total{port="67",result="malformed",type="unknown"}"#,
        1.0,
    ),
    (r#"provision_tftp_requests_total{result="served"}"#, 1.0),
    (r#"provision_tftp_requests_total{result="not_found"}"#, 1.0),
    ("provision_tftp_sent_bytes_total", 20480.0),
    ("provision_tftp_transfer_duration_seconds_count", 1.0),
    (r#"provision_boot_decisions_total{decision="install"}"#, 1.0),
    (
        r#"provision_boot_decisions_total{decision="local_boot"}"#,
        2.0,
    ),
    // The PXE client's MAC (from DHCP) and the unknown machine's (from /ipxe).
    ("provision_machines_discovered_total", 2.0),
    (r#"provision_configs_served_total{kind="preseed"}"#, 1.0),
    (r#"provision_configs_refused_total{reason="used"}"#, 1.0),
    (r#"provision_phone_homes_total{result="installed"}"#, 1.0),
    (r#"provision_phone_homes_total{result="invalid"}"#, 1.0),
    (
        r#"provision_install_duration_seconds_count{profile="debian-12"}"#,
        1.0,
    ),
    (
        r#"provision_http_requests_total{code="2xx",listener="machine",route="/ipxe"}"#,
        3.0,
    ),
    (
        r#"provision_http_requests_total{code="2xx",listener="machine",route="/config/{token}/{artifact}"}"#,
        1.0,
    ),
    (
        r#"provision_http_requests_total{code="4xx",listener="machine",route="/config/{token}/{artifact}"}"#,
        1.0,
    ),
    (
        r#"provision_http_requests_total{code="2xx",listener="machine",route="/phone-home/{token}"}"#,
        1.0,
    ),
    (
        r#"provision_http_requests_total{code="4xx",listener="machine",route="/phone-home/{token}"}"#,
        1.0,
    ),
    (
        r#"provision_http_requests_total{code="4xx",listener="machine",route="unmatched"}"#,
        1.0,
    ),
    (
        r#"provision_http_request_duration_seconds_count{listener="machine",route="/ipxe"}"#,
        3.0,
    ),
    // enroll (POST), and the list's two pages (GET: the machines, then the empty page).
    (
        r#"provision_http_requests_total{code="2xx",listener="admin",route="/api/v1/machines"}"#,
        3.0,
    ),
    (r#"provision_machines{state="installed"}"#, 1.0),
    (r#"provision_machines{state="discovered"}"#, 2.0),
];

#[test]
fn a_walk_through_moves_each_counter_by_what_it_did_and_promtool_accepts_the_output() {
    let (dhcp_port, pxe_port) = (free_udp_port(), free_udp_port());
    let (dhcp_s, pxe_s) = (dhcp_port.to_string(), pxe_port.to_string());
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[
            "--dhcp",
            "127.0.0.1",
            "--dhcp-port",
            &dhcp_s,
            "--pxe-port",
            &pxe_s,
        ],
    );
    let before = scrape(&d, "/metrics");
    promtool(&before);
    // Every label set exists at zero before anything happened (rates from the first scrape).
    for (series, _) in MOVED {
        let v = value(&before, series);
        assert!(v == 0.0, "{series} is {v} before the walk-through");
    }
    assert_eq!(
        value(
            &before,
            &format!(
                "provision_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    // DHCP: a UEFI PXE client's request to the boot server port (answered back to us), the
    // same firmware's REQUEST on port 67 (the site server's business), and garbage.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dhcp");
    let request = std::fs::read(data.join("ovmf-pxe-request-port4011.bin")).unwrap();
    client.send_to(&request, ("127.0.0.1", pxe_port)).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("the PXE boot server's ack");
    assert!(n > 240);
    let on_67 = std::fs::read(data.join("ovmf-pxe-request-port67.bin")).unwrap();
    client.send_to(&on_67, ("127.0.0.1", dhcp_port)).unwrap();
    client
        .send_to(b"not a BOOTREQUEST", ("127.0.0.1", dhcp_port))
        .unwrap();

    // HTTP: enroll, install, config, phone-home (one refused for carrying no key), local
    // boot, a used token, an unknown machine, a path nobody serves.
    d.cli_ok(&[
        "enroll",
        "52:54:00:00:09:01",
        "--profile",
        "debian-12",
        "--hostname",
        "metrics-host-1",
    ]);
    let (s, script) = d.get("/ipxe?mac=52-54-00-00-09-01&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    let (s, body) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200, "{body}");
    let (s, body) = d.post(&format!("/phone-home/{token}"), "text/plain", "no key here");
    assert_eq!(s, 422, "{body}");
    let (s, body) = d.post(&format!("/phone-home/{token}"), "text/plain", HOST_KEY);
    assert_eq!(s, 200, "{body}");
    let (s, _) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 410);
    let (s, body) = d.get("/ipxe?mac=52-54-00-00-09-01&platform=pcbios");
    assert!(s == 200 && body.contains("sanboot"), "{body}");
    let (s, body) = d.get("/ipxe?mac=52-54-00-00-09-02&platform=pcbios");
    assert!(s == 200 && body.contains("sanboot"), "{body}");
    let (s, _) = d.get("/no/such/52:54:00:00:09:01");
    assert_eq!(s, 404);
    d.cli_ok(&["machines", "list"]);

    // TFTP: an iPXE binary (20 KiB of it), and a name that is not there.
    let work = tempfile::tempdir().unwrap();
    let root = d.dir.path().join("ipxe");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("undionly.kpxe"), vec![7u8; 20480]).unwrap();
    let port = d.tftp_port.unwrap().to_string();
    for (name, ok) in [("undionly.kpxe", true), ("missing.efi", false)] {
        let out = Command::new(tool("tftp"))
            .args(["-m", "binary", "127.0.0.1", &port, "-c", "get", name])
            .arg(work.path().join(name))
            .output()
            .unwrap();
        // tftp-hpa exits 0 either way; it prints the server's error.
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(!said.contains("not found"), ok, "{out:?}");
    }

    // A TFTP transfer is counted when it ends, which its client saw first, and a DHCP
    // sighting is written with its batch (within 250 ms): poll until all is there.
    let moved = |after: &str| {
        MOVED
            .iter()
            .all(|(series, by)| value(after, series) - value(&before, series) == *by)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = scrape(&d, "/metrics");
        if moved(&after) || std::time::Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for (series, by) in MOVED {
        assert_eq!(
            value(&after, series) - value(&before, series),
            *by,
            "{series}"
        );
    }
    // The scrape itself is counted: every earlier one, under its own route.
    assert!(
        value(
            &after,
            r#"provision_http_requests_total{code="2xx",listener="machine",route="/metrics"}"#
        ) >= 1.0
    );
    promtool(&after);
    for secret in [
        token.as_str(),
        "52:54:00:00:09:01",
        "52-54-00-00-09-01",
        "metrics-host-1",
        "/no/such",
    ] {
        assert!(!after.contains(secret), "{secret} in the exposition");
    }
}

#[test]
fn metrics_can_have_a_listener_of_their_own_or_none() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let at = format!("127.0.0.1:{port}");
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &["--metrics", &at]);
    // Not on the machine listener then.
    let (s, _) = d.get("/metrics");
    assert_eq!(s, 404);
    let own = std::process::Command::new("curl")
        .args(["-sS", "--fail", &format!("http://{at}/metrics")])
        .output()
        .unwrap();
    assert!(own.status.success(), "{own:?}");
    let text = String::from_utf8(own.stdout).unwrap();
    assert!(text.contains("provision_build_info"), "{text}");
    promtool(&text);
    drop(d);

    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &["--metrics", "off"]);
    assert_eq!(d.get("/metrics").0, 404);

    // A wrong value is refused with what to write instead.
    let out = std::process::Command::new(crate::support::BIN)
        .args(["serve", "--check-config", "--metrics", "9100"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ADDR:PORT") && err.contains("off"), "{err}");
}

/// Waits until the daemon's `/metrics` shows each series at its value (the registrar counts a
/// run when its task ends, just after the state the test waited for).
pub fn wait_for(d: &Daemon, want: &[(&str, f64)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(d, "/metrics");
        let off: Vec<_> = want
            .iter()
            .filter(|(series, v)| value(&text, series) != *v)
            .collect();
        if off.is_empty() {
            promtool(&text);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never reached {off:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_sample_alerting_rules_pass_promtool_and_name_only_metrics_the_daemon_exports() {
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/provision-alerts.yml");
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every provision_* name the rules use is one the daemon exports (a renamed metric
    // would leave an alert that never fires).
    let d = Daemon::start();
    let text = scrape(&d, "/metrics");
    let yaml = std::fs::read_to_string(&rules).unwrap();
    let mut names: Vec<&str> = yaml
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("provision_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])),
            "{name} is in the rules but not exported"
        );
    }
}

/// A template that stops rendering after an install began (an operator's edit, reloaded): the
/// installer's config request is refused with the reason, the machine's timeline gets a
/// `render_failed` event, the metrics count it, and nothing half-rendered is served.
#[test]
fn a_config_that_no_longer_renders_is_refused_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(templates.join("debian")).unwrap();
    let preseed = templates.join("debian/preseed.cfg");
    std::fs::write(&preseed, "d-i debian-installer/locale string en_US.UTF-8\n").unwrap();
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &["--templates-dir", templates.to_str().unwrap()],
    );
    let mac = "52:54:00:00:0e:01";
    d.cli_ok(&["enroll", mac, "--profile", "debian-12"]);
    let (s, script) = d.get("/ipxe?mac=52-54-00-00-0e-01&platform=pcbios");
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    let (s, body) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert!(
        s == 200 && body.contains("d-i debian-installer/locale"),
        "{body}"
    );

    // The edit: no longer a preseed (the render check refuses it), reloaded.
    std::fs::write(&preseed, "this is not a preseed line\n").unwrap();
    d.cli_ok(&["reload"]);
    let before = scrape(&d, "/metrics");
    let (s, body) = d.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 422, "{body}");
    // An error that says what is wrong, not a config.
    assert!(
        body.starts_with("provision: rendered debian/preseed.cfg is not valid: line 1:"),
        "{body}"
    );
    let after = scrape(&d, "/metrics");
    let series = r#"provision_configs_refused_total{reason="render_failed"}"#;
    assert_eq!(value(&after, series) - value(&before, series), 1.0);
    let events = d.cli_ok(&["events", mac]);
    assert!(events.contains("render_failed: preseed.cfg"), "{events}");
}
