//! Install claims on a LAN with somebody hostile on it: a victim machine and an attacker, each
//! in a network namespace of its own with its own MAC, on one bridge with the daemon (root
//! namespace, 10.80.0.1). The daemon runs with its default: a claim needs evidence it
//! observed itself (here, the kernel's neighbour table).
//!
//! Needs root (namespaces, veths, a bridge) and curl.

use std::process::{Command, Output};

use crate::support::{token_of, tool, Daemon};

const VICTIM_MAC: &str = "52:54:00:80:00:10";

/// The test LAN: a bridge holding 10.80.0.1/24 and hosts behind veths. Dropping it deletes
/// the hosts' namespaces and the bridge.
struct Lan {
    bridge: String,
    hosts: Vec<String>,
}

impl Lan {
    fn new() -> Lan {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the claims test needs root (network namespaces, veths, a bridge)"
        );
        let bridge = format!("pvc{:x}", std::process::id());
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let lan = Lan {
            bridge,
            hosts: Vec::new(),
        };
        ip(&["addr", "add", "10.80.0.1/24", "dev", &lan.bridge]);
        ip(&["link", "set", &lan.bridge, "up"]);
        lan
    }

    /// A host namespace with eth0 = `mac`, `addr`/24, on the bridge; returns its name.
    fn host(&mut self, name: &str, mac: &str, addr: &str) -> String {
        let ns = format!("provision-claims-{}-{name}", std::process::id());
        let veth = format!("{}{}", self.bridge, self.hosts.len());
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &ns, "link", "set", "eth0", "address", mac]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new(tool("ip")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// curl inside `ns`: (HTTP status, body).
fn curl(ns: &str, args: &[&str]) -> (u16, String) {
    let out: Output = Command::new(tool("ip"))
        .args(["netns", "exec", ns])
        .arg(tool("curl"))
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn events(d: &Daemon) -> String {
    d.cli_ok(&["events", VICTIM_MAC])
}

fn show(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.cli_ok(&["machines", "show", VICTIM_MAC, "--json"])).unwrap()
}

#[test]
fn a_hostile_host_cannot_claim_an_enrolled_machine() {
    let mut lan = Lan::new();
    let victim = lan.host("victim", VICTIM_MAC, "10.80.0.10");
    let attacker = lan.host("attacker", "52:54:00:80:00:66", "10.80.0.66");
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[
            "--http",
            "0.0.0.0:0",
            "--tftp",
            "off",
            "--claims",
            "evidence",
        ],
    );
    let base = format!("http://10.80.0.1:{}", d.port);
    let ipxe = format!("{base}/ipxe?mac=52-54-00-80-00-10&platform=pcbios");
    d.cli_ok(&[
        "enroll",
        VICTIM_MAC,
        "--profile",
        "debian-12",
        "--hostname",
        "victim",
    ]);

    // The attacker claims the victim's MAC from its own address: the neighbour table says
    // that address is the attacker's MAC.
    let (s, body) = curl(&attacker, &[&ipxe]);
    assert_eq!(s, 403, "{body}");
    assert!(
        body.contains("the neighbour table has 10.80.0.66 at 52:54:00:80:00:66"),
        "{body}"
    );
    assert!(!body.contains("config/"), "no token handed out: {body}");
    // The host itself has no evidence either (loopback: no neighbour entry, no DHCP).
    let (s, body) = d.get("/ipxe?mac=52-54-00-80-00-10&platform=pcbios");
    assert_eq!(s, 403, "{body}");
    assert!(
        body.contains("no evidence that 127.0.0.1 is 52:54:00:80:00:10"),
        "{body}"
    );
    assert_eq!(show(&d)["state"], "enrolled");
    let ev = events(&d);
    assert_eq!(ev.matches("claim_refused").count(), 2, "{ev}");
    assert!(!ev.contains("install_started"), "{ev}");

    // The victim's own claim: its address is its MAC in the neighbour table.
    let (s, script) = curl(&victim, &[&ipxe]);
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    assert_eq!(show(&d)["state"], "installing");
    assert!(
        events(&d).contains("token issued to 10.80.0.10"),
        "{}",
        events(&d)
    );

    // The token, stolen, is useless from the attacker's address; and the attacker cannot
    // get one of its own while the victim's is live.
    let config = format!("{base}/config/{token}/preseed.cfg");
    let (s, body) = curl(&attacker, &[&config]);
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("another address"), "{body}");
    let phone_home = format!("{base}/phone-home/{token}");
    let attacker_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2";
    let (s, body) = curl(
        &attacker,
        &[
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            attacker_key,
            &phone_home,
        ],
    );
    assert_eq!(s, 403, "{body}");
    let (s, _) = curl(&attacker, &[&ipxe]);
    assert_eq!(s, 403);
    let m = show(&d);
    assert_eq!(m["state"], "installing");
    assert!(m["host_keys"].as_array().unwrap().is_empty(), "{m}");
    let ev = events(&d);
    assert!(ev.contains("config_refused"), "{ev}");
    assert!(ev.contains("phone_home_refused"), "{ev}");

    // The real installer is undisturbed: its config and its phone-home work.
    let (s, preseed) = curl(&victim, &[&config]);
    assert_eq!(s, 200, "{preseed}");
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("host_key");
    let out = Command::new(tool("ssh-keygen"))
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let victim_key = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let (s, body) = curl(
        &victim,
        &[
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            victim_key.trim(),
            &phone_home,
        ],
    );
    assert_eq!(s, 200, "{body}");

    // A later boot request from the attacker changes neither the SSH address nor what
    // Ansible is told.
    let (s, local) = curl(&attacker, &[&ipxe]);
    assert_eq!(s, 200, "{local}");
    assert!(!local.contains("config/"), "{local}");
    let m = show(&d);
    assert_eq!(
        (m["state"].as_str(), m["last_ip"].as_str()),
        (Some("installed"), Some("10.80.0.10"))
    );
    let known = d.cli_ok(&["inventory", "--known-hosts"]);
    assert!(known.contains("10.80.0.10"), "{known}");
    assert!(!known.contains("10.80.0.66"), "{known}");
}
