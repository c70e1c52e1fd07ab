//! Registration against real hosts: network namespaces with a real sshd and a real Open
//! vSwitch (userspace datapath) each (`nodes.rs`), registered by the real daemon over SSH,
//! checked with `ovs-vsctl show`, `openssl verify` and `ansible -m ping`.
//!
//! The installs themselves are simulated the way the install loop would drive them: enroll,
//! the boot that mints an install token, and a phone-home with the node's real sshd host key
//! sent from inside the node's namespace (so the daemon learns its address the real way).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::nodes::{self, Fabric, Manager, Node};
use crate::support::{token_of, tool, Daemon};

const MANAGER_PORT: u16 = 16632;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A templates dir with the test profiles: `test-hv` (the built-in hypervisor role on the
/// userspace datapath, one uplink, the test manager, a hand-off hook writing `handoff_log`)
/// and `test-pause` (a three-step role whose middle step waits for a file on the node). Both
/// accept the phone-home from another address than the install's: the tests play the boot
/// request from the root namespace and phone home from the node.
fn templates(dir: &Path, handoff_log: &Path) {
    write(
        &dir.join("profiles/test-hv.toml"),
        &format!(
            r#"description = "test hypervisor"
kernel = "{{{{ assets_url }}}}/k"
cmdline = "url={{{{ config_url }}}}/"
role = "hypervisor"
phone_home_any_address = true

[register]
datapath_type = "netdev"
uplinks = ["br-eth1:eth1"]
managers = ["ssl:10.79.0.1:{MANAGER_PORT}"]
handoff = "echo {{{{ hostname }}}} {{{{ role }}}} >> {}"
"#,
            handoff_log.display()
        ),
    );
    write(
        &dir.join("profiles/test-pause.toml"),
        r#"description = "test: a role that pauses"
kernel = "{{ assets_url }}/k"
cmdline = "url={{ config_url }}/"
role = "test-pause"
phone_home_any_address = true
"#,
    );
    write(
        &dir.join("roles/test-pause.toml"),
        r#"description = "three steps; the middle one waits for /etc/openvswitch/go"
[[steps]]
name = "first"
run = "echo ran >> /etc/openvswitch/first.log"
[[steps]]
name = "pause"
run = "echo ran >> /etc/openvswitch/pause.log; touch /etc/openvswitch/pause-started; while [ ! -e /etc/openvswitch/go ]; do sleep 0.2; done"
[[steps]]
name = "last"
run = "echo ran >> /etc/openvswitch/last.log"
"#,
    );
}

fn start_daemon(dir: tempfile::TempDir, templates_dir: &Path) -> Daemon {
    start_daemon_with(dir, templates_dir, &[])
}

fn start_daemon_with(dir: tempfile::TempDir, templates_dir: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--http",
        "0.0.0.0:0",
        "--tftp",
        "off",
        "--templates-dir",
        templates_dir.to_str().unwrap(),
        "--register-attempts",
        "2",
        "--ssh-timeout",
        "3s",
    ];
    args.extend_from_slice(extra);
    Daemon::start_in(dir, &args)
}

fn machine(d: &Daemon, mac: &str) -> Value {
    serde_json::from_str(&d.cli_ok(&["machines", "show", mac, "--json"])).unwrap()
}

/// Polls until the machine is in `want`; panics with its events if it fails or times out.
fn wait_state(d: &Daemon, mac: &str, want: &str) -> Value {
    let start = Instant::now();
    loop {
        let m = machine(d, mac);
        if m["state"] == want {
            return m;
        }
        if m["state"] == "failed" && want != "failed" || start.elapsed() > Duration::from_secs(120)
        {
            panic!(
                "{mac} is {} (wanted {want}): {} {}\n{}",
                m["state"],
                m["failed_step"],
                m["failed_reason"],
                d.cli_ok(&["events", mac])
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Enrolls `mac`, has it boot (minting its install token), and phones home from inside
/// `node`'s namespace posting `host_key`.
fn install(d: &Daemon, node: &Node, mac: &str, profile: &str, host_key: &str, extra: &[&str]) {
    let mut args = vec![
        "enroll",
        mac,
        "--profile",
        profile,
        "--hostname",
        &node.hostname,
    ];
    args.extend_from_slice(extra);
    d.cli_ok(&args);
    let (s, script) = d.get(&format!(
        "/ipxe?mac={}&platform=pcbios",
        mac.replace(':', "-")
    ));
    assert_eq!(s, 200, "{script}");
    let url = format!(
        "http://10.79.0.1:{}/phone-home/{}",
        d.port,
        token_of(&script)
    );
    let out = node.sh(&format!(
        "curl -fsS -H 'Content-Type: text/plain' --data-binary '{host_key}' {url}"
    ));
    assert!(
        out.status.success(),
        "phone-home: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the test-pause role's pause step has started on `node`.
fn wait_paused(node: &Node) {
    let start = Instant::now();
    while !node
        .sh("test -e /etc/openvswitch/pause-started")
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pause step never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A manager key and cert signed with provision's CA (as an operator would issue one for
/// the controller), so both ends of the OVSDB SSL session trust each other through it.
fn manager_cert(data: &Path, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (key, csr, cert) = (
        dir.join("mgr-key.pem"),
        dir.join("mgr.csr"),
        dir.join("mgr-cert.pem"),
    );
    run(Command::new(tool("openssl"))
        .args(["req", "-new", "-newkey", "rsa:2048", "-nodes"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", "/CN=manager"]));
    run(Command::new(tool("openssl"))
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(data.join("pki/ca-cert.pem"))
        .arg("-CAkey")
        .arg(data.join("pki/ca-key.pem"))
        .arg("-set_serial")
        .arg("1")
        .arg("-out")
        .arg(&cert));
    (key, cert)
}

fn sh_ok(node: &Node, cmd: &str) -> String {
    let out = node.sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The hypervisor role's steps (templates/roles/hypervisor.toml), in order.
pub(crate) const HYPERVISOR_STEPS: [&str; 6] = [
    "pki-request",
    "pki-install",
    "ssl",
    "bridges",
    "manager",
    "verify",
];

#[test]
fn registers_ovs_nodes_over_ssh_hands_off_and_ansible_pings_them() {
    let _g = nodes::lock();
    let fabric = Fabric::new();
    let work = tempfile::tempdir().unwrap();
    let handoff_log = work.path().join("handoff.log");
    templates(&work.path().join("templates"), &handoff_log);
    let d = start_daemon(tempfile::tempdir().unwrap(), &work.path().join("templates"));
    let data = d.dir.path().to_path_buf();
    let key = std::fs::read_to_string(data.join("ssh/id_ed25519.pub")).unwrap();
    let (mkey, mcert) = manager_cert(&data, work.path());
    let manager = Manager::start(
        &work.path().join("manager"),
        &mkey,
        &mcert,
        &data.join("pki/ca-cert.pem"),
        MANAGER_PORT,
    );
    let hosts: Vec<Node> = (1..=2)
        .map(|i| Node::start(&fabric, i, key.trim()))
        .collect();
    let macs = ["52:54:00:79:00:01", "52:54:00:79:00:02"];
    for (node, mac) in hosts.iter().zip(macs) {
        install(&d, node, mac, "test-hv", &node.host_key, &[]);
    }
    for (node, mac) in hosts.iter().zip(macs) {
        let m = wait_state(&d, mac, "handed_off");
        assert_eq!(m["last_ip"], node.addr.to_string());
        let steps: Vec<_> = m["register_steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["status"].clone()))
            .collect();
        let names: Vec<_> = steps.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, HYPERVISOR_STEPS);
        assert!(steps.iter().all(|(_, s)| s == "ok"), "{steps:?}");

        // What an operator on the node sees.
        let show = node.ovs_show();
        assert!(show.contains("Bridge br-int"), "{show}");
        assert!(show.contains("Bridge br-eth1"), "{show}");
        assert!(show.contains("Port eth1"), "{show}");
        assert!(
            show.contains(&format!("Manager \"ssl:10.79.0.1:{MANAGER_PORT}\"")),
            "{show}"
        );
        assert_eq!(
            sh_ok(node, "ovs-vsctl br-get-external-id br-int bridge-id").trim(),
            "br-int"
        );
        let ssl = sh_ok(node, "ovs-vsctl get-ssl");
        assert!(
            ssl.contains("Certificate: /etc/openvswitch/provision-cert.pem"),
            "{ssl}"
        );
        // The node's cert verifies against provision's CA, and the inventory's fingerprint
        // is that cert's.
        let cert = sh_ok(node, "cat /etc/openvswitch/provision-cert.pem");
        let cert_path = work.path().join(format!("{}.pem", node.hostname));
        std::fs::write(&cert_path, &cert).unwrap();
        let v = run(Command::new(tool("openssl"))
            .arg("verify")
            .arg("-CAfile")
            .arg(data.join("pki/ca-cert.pem"))
            .arg(&cert_path));
        assert!(v.trim_end().ends_with(": OK"), "{v}");
        let fp = run(Command::new(tool("openssl"))
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert_path));
        let fp_api = m["cert_fingerprint"].as_str().unwrap();
        assert!(fp.contains(fp_api), "{fp} vs {fp_api}");
        // The node's private key stayed on the node.
        let key_on_node = sh_ok(node, "cat /etc/openvswitch/provision-privkey.pem");
        assert!(key_on_node.contains("PRIVATE KEY"));
        // The database and its WAL (where recent commits live until a checkpoint).
        let body: String = key_on_node.lines().nth(1).unwrap().to_string();
        for f in ["provision.db", "provision.db-wal"] {
            let db = std::fs::read(data.join(f)).unwrap_or_default();
            assert!(
                !db.windows(body.len()).any(|w| w == body.as_bytes()),
                "the node's private key reached provision's {f}"
            );
        }
        assert!(data.join("provision.db-wal").exists(), "the WAL was read");
    }
    // Both nodes talk to the manager over SSL (each side checks the other's cert against
    // provision's CA).
    for node in &hosts {
        let start = Instant::now();
        loop {
            let show = node.ovs_show();
            if show.contains("is_connected: true") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} never connected to its manager:\n{show}\n{}\n{}",
                node.hostname,
                node.logs(),
                manager.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let log = std::fs::read_to_string(&handoff_log).unwrap();
    for node in &hosts {
        assert!(
            log.contains(&format!("{} hypervisor", node.hostname)),
            "{log}"
        );
    }
    // Counted by role and result, with their durations; nothing left queued or running.
    crate::metrics::wait_for(
        &d,
        &[
            (
                r#"provision_registrations_total{result="registered",role="hypervisor"}"#,
                2.0,
            ),
            (
                r#"provision_registrations_total{result="failed",role="hypervisor"}"#,
                0.0,
            ),
            (
                r#"provision_registration_duration_seconds_count{role="hypervisor"}"#,
                2.0,
            ),
            ("provision_registrations_queued", 0.0),
            ("provision_registrations_running", 0.0),
            (r#"provision_machines{state="handed_off"}"#, 2.0),
        ],
    );
    let show = d.cli_ok(&["machines", "show", macs[0]]);
    assert!(show.contains("registration steps:"), "{show}");
    assert!(show.contains("verify"), "{show}");
    assert!(show.contains("node cert  SHA256"), "{show}");

    // Registering again changes nothing on the node: same bridges, ports, manager, SSL and
    // certificate.
    let before: Vec<_> = hosts
        .iter()
        .map(|n| {
            sh_ok(n, "ovs-vsctl list-br; ovs-vsctl list-ports br-eth1; ovs-vsctl get-manager; ovs-vsctl get-ssl; ovs-vsctl --columns=_uuid list Manager; ovs-vsctl --columns=_uuid list SSL; cat /etc/openvswitch/provision-cert.pem")
        })
        .collect();
    let fp_before = machine(&d, macs[0])["cert_fingerprint"].clone();
    let out = d.cli_ok(&["register", macs[0], "--wait", "--timeout", "2m"]);
    assert!(out.contains("handed_off"), "{out}");
    let after0 = sh_ok(&hosts[0], "ovs-vsctl list-br; ovs-vsctl list-ports br-eth1; ovs-vsctl get-manager; ovs-vsctl get-ssl; ovs-vsctl --columns=_uuid list Manager; ovs-vsctl --columns=_uuid list SSL; cat /etc/openvswitch/provision-cert.pem");
    assert_eq!(before[0], after0);
    assert_eq!(machine(&d, macs[0])["cert_fingerprint"], fp_before);
    let events = d.cli_ok(&["events", macs[0]]);
    assert!(
        events.contains("certificate for this node key already issued"),
        "{events}"
    );

    // Ansible: the dynamic inventory and the exported known_hosts, host-key checking on.
    let inv: Value = serde_json::from_str(&d.cli_ok(&["inventory", "--list"])).unwrap();
    let mut in_group: Vec<_> = inv["role_hypervisor"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    in_group.sort();
    assert_eq!(
        in_group,
        [hosts[0].hostname.clone(), hosts[1].hostname.clone()]
    );
    let hv = &inv["_meta"]["hostvars"][&hosts[1].hostname];
    assert_eq!(hv["ansible_host"], hosts[1].addr.to_string());
    assert_eq!(hv["profile"], "test-hv");
    assert!(hv["cert_fingerprint"].is_string(), "{hv}");
    let one: Value =
        serde_json::from_str(&d.cli_ok(&["inventory", "--host", &hosts[1].hostname])).unwrap();
    assert_eq!(&one, hv);

    let known_hosts = work.path().join("known_hosts");
    std::fs::write(&known_hosts, d.cli_ok(&["inventory", "--known-hosts"])).unwrap();
    let token_file = d.token_file();
    let ansible = |kh: &Path| {
        crate::support::ansible(
            "ansible",
            None,
            work.path(),
            (&d.admin_url(), &token_file),
            &data.join("ssh/id_ed25519"),
            kh,
        )
        .args(["all", "-m", "ping"])
        .output()
        .expect("ansible runs")
    };
    let out = ansible(&known_hosts);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for node in &hosts {
        assert!(
            text.contains(&format!("{} | SUCCESS", node.hostname)),
            "{text}"
        );
    }
    // Host-key checking is really on: without the exported keys Ansible refuses.
    let empty = work.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let out = ansible(&empty);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("UNREACHABLE"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Revocation: the CRL the machine listener serves lists nothing, then, once node 0 is
    // reprovisioned, its certificate, which openssl then refuses; node 1's still verifies.
    let crl_check = |node: &Node| {
        let (s, crl) = d.get("/pki/crl.pem");
        assert_eq!(s, 200, "{crl}");
        let (crl_path, cert_path) = (
            work.path().join("crl.pem"),
            work.path().join(format!("{}.pem", node.hostname)),
        );
        std::fs::write(&crl_path, crl).unwrap();
        Command::new(tool("openssl"))
            .args(["verify", "-crl_check", "-CRLfile"])
            .arg(&crl_path)
            .arg("-CAfile")
            .arg(data.join("pki/ca-cert.pem"))
            .arg(&cert_path)
            .output()
            .unwrap()
    };
    assert!(crl_check(&hosts[0]).status.success());
    d.cli_ok(&["machines", "reprovision", macs[0]]);
    let out = crl_check(&hosts[0]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("certificate revoked"),
        "{said}"
    );
    assert!(crl_check(&hosts[1]).status.success());
    let (s, ca) = d.get("/pki/ca.pem");
    assert_eq!(
        (s, ca.trim()),
        (
            200,
            std::fs::read_to_string(data.join("pki/ca-cert.pem"))
                .unwrap()
                .trim()
        )
    );
}

#[test]
fn wrong_host_key_is_refused_and_unreachable_nodes_fail_after_bounded_retries() {
    let _g = nodes::lock();
    let fabric = Fabric::new();
    let work = tempfile::tempdir().unwrap();
    templates(
        &work.path().join("templates"),
        &work.path().join("handoff.log"),
    );
    let d = start_daemon(tempfile::tempdir().unwrap(), &work.path().join("templates"));
    let key = std::fs::read_to_string(d.dir.path().join("ssh/id_ed25519.pub")).unwrap();
    let node = Node::start(&fabric, 3, key.trim());

    // Phone-home posts a key that is not the sshd's: the registrar must refuse the server.
    let other = work.path().join("other");
    run(Command::new(tool("ssh-keygen"))
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other));
    let wrong = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let wrong = wrong
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let mac = "52:54:00:79:00:03";
    let before = node.ovs_show();
    install(&d, &node, mac, "test-hv", &wrong, &[]);
    let m = wait_state(&d, mac, "failed");
    assert_eq!(m["failed_step"], "host-key");
    let reason = m["failed_reason"].as_str().unwrap();
    assert!(
        reason.contains("not the key pinned at phone-home"),
        "{reason}"
    );
    assert!(reason.contains("nothing was executed"), "{reason}");
    // Nothing ran on the host.
    assert_eq!(node.ovs_show(), before);
    let files = sh_ok(&node, "ls /etc/openvswitch");
    assert!(!files.contains("provision"), "{files}");
    assert!(m["register_steps"].as_array().unwrap().is_empty());

    // A node nobody answers for: two attempts (as configured), then failed with the reason.
    let mac2 = "52:54:00:79:00:04";
    install(
        &d,
        &node,
        mac2,
        "test-hv",
        &node.host_key,
        &["--var", "ssh_host=10.79.0.99"],
    );
    let m = wait_state(&d, mac2, "failed");
    assert_eq!(m["failed_step"], "connect");
    let reason = m["failed_reason"].as_str().unwrap();
    assert!(reason.contains("cannot reach 10.79.0.99:22"), "{reason}");
    assert!(reason.contains("after 2 attempt(s)"), "{reason}");
    let events = d.cli_ok(&["events", mac2]);
    assert_eq!(events.matches("register_retry").count(), 1, "{events}");
    crate::metrics::wait_for(
        &d,
        &[
            (
                r#"provision_registrations_total{result="failed",role="hypervisor"}"#,
                2.0,
            ),
            (
                r#"provision_registrations_total{result="registered",role="hypervisor"}"#,
                0.0,
            ),
            ("provision_registrations_running", 0.0),
        ],
    );

    // `provision register` on a machine with no role is refused with the reason (exit 2).
    d.cli_ok(&["enroll", "52:54:00:79:00:05", "--profile", "debian-12"]);
    let out = d.cli(&["register", "52:54:00:79:00:05"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("role is none"), "{err}");
}

#[test]
fn a_registration_interrupted_by_a_crash_resumes_at_the_next_step() {
    let _g = nodes::lock();
    let fabric = Fabric::new();
    let work = tempfile::tempdir().unwrap();
    let templates_dir = work.path().join("templates");
    templates(&templates_dir, &work.path().join("handoff.log"));
    let d = start_daemon(tempfile::tempdir().unwrap(), &templates_dir);
    let key = std::fs::read_to_string(d.dir.path().join("ssh/id_ed25519.pub")).unwrap();
    let node = Node::start(&fabric, 4, key.trim());
    let mac = "52:54:00:79:00:06";
    install(&d, &node, mac, "test-pause", &node.host_key, &[]);
    wait_paused(&node);
    assert_eq!(machine(&d, mac)["state"], "registering");
    let data = d.crash();
    sh_ok(&node, "touch /etc/openvswitch/go");
    let d = start_daemon(data, &templates_dir);
    let m = wait_state(&d, mac, "registered");
    let names: Vec<_> = m["register_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["first", "pause", "last"]);
    // The first step ran once (before the crash); the run went on from the pause step.
    assert_eq!(sh_ok(&node, "cat /etc/openvswitch/first.log"), "ran\n");
    assert_eq!(sh_ok(&node, "cat /etc/openvswitch/last.log"), "ran\n");
    let events = d.cli_ok(&["events", mac]);
    assert_eq!(
        events.matches("register_step: first").count(),
        1,
        "{events}"
    );
}

/// Two daemons share one inventory (PostgreSQL): the one the node phoned home to registers
/// it, the other (which resumes every `registering` machine at its start) leaves the run to
/// the claim's holder; when the holder dies mid-run, its claim runs out and the other takes
/// the run over at its first unfinished step.
#[test]
fn of_two_daemons_one_registers_and_the_other_takes_over_when_it_dies() {
    let _g = nodes::lock();
    let fabric = Fabric::new();
    let work = tempfile::tempdir().unwrap();
    let templates_dir = work.path().join("templates");
    templates(&templates_dir, &work.path().join("handoff.log"));
    let cluster = crate::pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let shared = [
        "--database",
        &url,
        "--secret-key-file",
        crate::scaleout::the_key().to_str().unwrap(),
        "--register-claim",
        "3s",
    ];
    let a = start_daemon_with(tempfile::tempdir().unwrap(), &templates_dir, &shared);
    // The daemons share one SSH key: the node authorises it once.
    let key = std::fs::read_to_string(a.dir.path().join("ssh/id_ed25519.pub")).unwrap();
    let node = Node::start(&fabric, 5, key.trim());
    let mac = "52:54:00:79:00:07";
    install(&a, &node, mac, "test-pause", &node.host_key, &[]);
    wait_paused(&node);
    // b starts mid-run and resumes what is registering: a holds the claim, so b leaves it.
    let b = start_daemon_with(tempfile::tempdir().unwrap(), &templates_dir, &shared);
    b.wait_log("registration is run by another daemon");
    assert_eq!(sh_ok(&node, "cat /etc/openvswitch/pause.log"), "ran\n");
    // a dies; once its claim has run out, b's sweep takes the run over.
    let _ = a.crash();
    sh_ok(&node, "touch /etc/openvswitch/go");
    let m = wait_state(&b, mac, "registered");
    let names: Vec<_> = m["register_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["first", "pause", "last"]);
    // The first step ran once, by a; the pause ran again (b resumed at it), then the last.
    assert_eq!(sh_ok(&node, "cat /etc/openvswitch/first.log"), "ran\n");
    assert_eq!(sh_ok(&node, "cat /etc/openvswitch/pause.log"), "ran\nran\n");
    assert_eq!(sh_ok(&node, "cat /etc/openvswitch/last.log"), "ran\n");
    drop(b);
    cluster.drop_db(&db);
}
