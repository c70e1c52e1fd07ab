//! End to end with real firmware: network namespaces, `dnsmasq` as the site's DHCP server
//! (addresses only, no boot options), `provision serve` as ProxyDHCP + TFTP + HTTP, and two
//! QEMU VMs under TCG — SeaBIOS (its NIC ROM is iPXE) and OVMF (EDK2's own PXE client, which
//! loads ipxe.efi over TFTP) — booting in parallel until each has fetched `/ipxe` for its own
//! MAC. Needs root (namespaces, taps); CI runs as root.
//!
//! Topology: namespace `site` (dnsmasq on 10.77.0.2) — veth — namespace `lab` (bridge br0,
//! 10.77.0.1, provision, and one tap per VM). A test of two segments makes two such labs,
//! the second on 10.77.1.0/24.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{tool, BIN};

mod realos;

const BIOS_MAC: &str = "52:54:00:77:00:01";
const UEFI_MAC: &str = "52:54:00:77:00:02";

/// Namespaces and processes of one lab; everything is stopped by PID and deleted on drop,
/// also when the test fails.
struct Lab {
    site: String,
    lab: String,
    /// Further namespaces on the lab's bridge (`Lab::host`).
    hosts: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
    /// The third octet of the lab's subnet, 10.77.N.0/24.
    net: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new(tool("ip")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// The lab; with `site`, a second namespace for the site's DHCP server.
    fn new(tag: &str, site: bool) -> Lab {
        Lab::on(tag, site, 0)
    }

    /// The lab on subnet 10.77.`net`.0/24 (provision on .1, the site's DHCP server on .2).
    fn on(tag: &str, site: bool, net: u8) -> Lab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the firmware lab needs root (network namespaces and tap devices)"
        );
        crate::support::sweep_stale_namespaces();
        let id = std::process::id();
        let lab = Lab {
            site: format!("pv{tag}s{id}"),
            lab: format!("pv{tag}l{id}"),
            hosts: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            net,
        };
        let (s, l) = (lab.site.as_str(), lab.lab.as_str());
        ip(&["netns", "add", l]);
        ip(&["-n", l, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", l, "addr", "add", &lab.ip4(1, "/24"), "dev", "br0"]);
        ip(&["-n", l, "link", "set", "br0", "up"]);
        ip(&["-n", l, "link", "set", "lo", "up"]);
        if site {
            ip(&["netns", "add", s]);
            ip(&["-n", s, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", "vs0", "netns", s, "type", "veth", "peer", "name", "vs1", "netns", l,
            ]);
            ip(&["-n", s, "addr", "add", &lab.ip4(2, "/24"), "dev", "vs0"]);
            ip(&["-n", s, "link", "set", "vs0", "up"]);
            ip(&["-n", l, "link", "set", "vs1", "master", "br0"]);
            ip(&["-n", l, "link", "set", "vs1", "up"]);
        }
        for tap in ["tap0", "tap1", "tap2", "tap3", "tap4"] {
            ip(&["-n", l, "tuntap", "add", tap, "mode", "tap"]);
            ip(&["-n", l, "link", "set", tap, "master", "br0"]);
            ip(&["-n", l, "link", "set", tap, "up"]);
        }
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Address `host` of the lab's subnet, followed by `suffix` (a port or a prefix length).
    fn ip4(&self, host: u8, suffix: &str) -> String {
        format!("10.77.{}.{host}{suffix}", self.net)
    }

    /// A namespace plugged into the lab's bridge by a veth whose end in it is `ifname`, with
    /// `mac`; returns the namespace's name.
    fn host(&mut self, ifname: &str, mac: &str) -> String {
        let ns = format!("{}{ifname}", self.lab);
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let peer = format!("{ifname}p");
        ip(&[
            "link", "add", ifname, "netns", &ns, "address", mac, "type", "veth", "peer", "name",
            &peer, "netns", &self.lab,
        ]);
        ip(&["-n", &self.lab, "link", "set", &peer, "master", "br0"]);
        ip(&["-n", &self.lab, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", ifname, "up"]);
        ns
    }

    /// Starts a process inside namespace `ns`, its output in `log`; returns its index for
    /// `Lab::stop`.
    fn spawn(&mut self, ns: &str, log: &str, program: &Path, args: &[&str]) -> usize {
        let out = std::fs::File::create(self.path(log)).unwrap();
        let child = Command::new(tool("ip"))
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Stops (SIGKILL) the process `Lab::spawn` returned `index` for, and reaps it.
    fn stop(&mut self, index: usize) {
        let c = &mut self.children[index];
        let _ = c.kill();
        let _ = c.wait();
    }

    fn cli(&self, args: &[&str]) -> String {
        let server = format!("https://{}", self.ip4(1, ":8443"));
        let out = Command::new(tool("ip"))
            .args([
                "netns",
                "exec",
                &self.lab,
                BIN,
                "--server",
                &server,
                "--token-file",
            ])
            .arg(self.path("data/admin-token"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn log(&self, name: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.path(name)).unwrap_or_default()).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.hosts.iter().chain([&self.lab, &self.site]) {
            if Path::new("/run/netns").join(ns).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
}

/// Starts provision in the lab namespace and waits until all its listeners are up.
fn start_provision(lab: &mut Lab, extra: &[&str]) {
    let data = lab.path("data").to_str().unwrap().to_string();
    let ns = lab.lab.clone();
    let (http, admin) = (lab.ip4(1, ":8080"), lab.ip4(1, ":8443"));
    let mut args = vec![
        "serve",
        "--data-dir",
        &data,
        "--http",
        &http,
        "--admin",
        &admin,
    ];
    args.extend_from_slice(extra);
    lab.spawn(&ns, "provision.log", Path::new(BIN), &args);
    wait_for(
        &lab.path("provision.log"),
        "listening for PXE on",
        Duration::from_secs(20),
    );
}

/// Which firmware a VM boots.
#[derive(Clone, Copy, PartialEq)]
enum Firmware {
    /// SeaBIOS; its virtio NIC ROM is iPXE.
    Bios,
    /// OVMF (EDK2) with its own PXE client.
    Uefi,
}

/// QEMU arguments for a VM on `tap`: the same as `provision lab` uses
/// (`provision::lab::qemu_args`), with its console in the lab directory.
fn vm(
    lab: &Lab,
    fw: Firmware,
    tap: &str,
    mac: &str,
    disk: Option<&Path>,
    reboot: bool,
) -> Vec<String> {
    vm_with(lab, fw, tap, mac, disk, None, 512, reboot)
}

/// [`vm`] with its disk on SATA and an install medium (a second, read-only virtio disk), and
/// `memory` MiB: a VM that boots a real system from its disk.
#[allow(clippy::too_many_arguments)]
fn vm_with(
    lab: &Lab,
    fw: Firmware,
    tap: &str,
    mac: &str,
    disk: Option<&Path>,
    medium: Option<&Path>,
    memory: u32,
    reboot: bool,
) -> Vec<String> {
    let vars = lab.path(&format!("OVMF_VARS-{tap}.fd"));
    if fw == Firmware::Uefi {
        std::fs::copy(provision::lab::OVMF_VARS, &vars).unwrap();
    }
    let mut args = provision::lab::qemu_args(&provision::lab::VmSpec {
        uefi: fw == Firmware::Uefi,
        tap,
        mac,
        memory,
        disk,
        sata: medium.is_some(),
        medium,
        vars: (fw == Firmware::Uefi).then_some(vars.as_path()),
        console: &lab.path(&format!("{tap}.serial")),
        reboot,
    });
    let at = args.iter().position(|a| a == "-accel").unwrap() + 1;
    args[at] = crate::support::accel();
    args
}

/// VM tests share two cores: one lab at a time, so each gets the CPU its timeouts assume.
static VM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The site-DHCP recipe `name` as docs/site-dhcp.md writes it (the fenced block after its
/// `<!-- recipe: NAME -->` marker), for the site namespace: the interface is the site's
/// veth, and `lease_file` replaces the documented lease file's path.
fn recipe(name: &str, documented_leases: &str, lease_file: &Path) -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/site-dhcp.md"))
            .unwrap();
    let marker = format!("<!-- recipe: {name} -->");
    let after = doc
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in docs/site-dhcp.md"))
        .1;
    let block = after
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("no code block after {marker}"))
        .0;
    assert!(
        block.contains("eno1") && block.contains(documented_leases),
        "{block}"
    );
    block
        .replace("eno1", "vs0")
        .replace(documented_leases, lease_file.to_str().unwrap())
}

/// Starts dnsmasq in the site namespace as the site's DHCP server, configured by the recipe
/// in docs/site-dhcp.md: addresses only, no boot options, so every boot instruction a VM
/// gets comes from provision. Leases in `lab.path("leases")`.
fn start_site_dhcp(lab: &mut Lab) {
    let conf = lab.path("dnsmasq.conf");
    let text = recipe(
        "dnsmasq",
        "/var/lib/misc/dnsmasq.leases",
        &lab.path("leases"),
    )
    .replace("10.77.0.", &format!("10.77.{}.", lab.net));
    std::fs::write(&conf, text).unwrap();
    let site = lab.site.clone();
    let conf = format!("--conf-file={}", conf.display());
    lab.spawn(
        &site,
        "dnsmasq.log",
        &tool("dnsmasq"),
        &["--no-daemon", &conf],
    );
}

/// Starts Kea in the site namespace as the site's DHCP server, configured by the recipe in
/// docs/site-dhcp.md, and waits until it serves. Leases in `lab.path("leases")`.
fn start_site_kea(lab: &mut Lab) {
    let conf = lab.path("kea-dhcp4.conf");
    let text = recipe("kea", "/var/lib/kea/kea-leases4.csv", &lab.path("leases"));
    std::fs::write(&conf, text).unwrap();
    // The configuration as Kea itself reads it (where its interface exists).
    let checked = Command::new(tool("ip"))
        .args(["netns", "exec", &lab.site])
        .arg(tool("kea-dhcp4"))
        .arg("-t")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "kea-dhcp4 -t: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let log = lab.path("kea.log");
    let out = std::fs::File::create(&log).unwrap();
    // Its PID and lock files in the lab, not /run/kea.
    let child = Command::new(tool("ip"))
        .args(["netns", "exec", &lab.site])
        .arg(tool("kea-dhcp4"))
        .arg("-c")
        .arg(&conf)
        .env("KEA_PIDFILE_DIR", lab.dir.path())
        .env("KEA_LOCKFILE_DIR", lab.dir.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    lab.children.push(child);
    wait_for(&log, "DHCP4_STARTED", Duration::from_secs(20));
}

/// Starts a daemon command with its output in `log`, and waits until all its listeners are up.
fn start_daemon(cmd: &mut Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    wait_for(log, "listening for PXE on", Duration::from_secs(20));
    child
}

/// Waits until the file at `path` contains `needle`.
fn wait_for(path: &Path, needle: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "no {needle:?} in {} after {limit:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kinds of a machine's events, oldest first.
fn kinds(events: &str) -> Vec<String> {
    events
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|k| k.trim_end_matches(':').to_string())
        .collect()
}

#[test]
fn bios_and_uefi_vms_pxe_boot_into_the_ipxe_chain() {
    let _one_lab_at_a_time = vm_lock();
    let mut lab = Lab::new("p", true);
    let ns = lab.lab.clone();
    start_site_dhcp(&mut lab);
    start_provision(&mut lab, &[]);
    let qemu = tool("qemu-system-x86_64");
    let bios_args = vm(&lab, Firmware::Bios, "tap0", BIOS_MAC, None, false);
    let uefi_args = vm(&lab, Firmware::Uefi, "tap1", UEFI_MAC, None, false);
    lab.spawn(&ns, "bios-vm.log", &qemu, &refs(&bios_args));
    lab.spawn(&ns, "uefi-vm.log", &qemu, &refs(&uefi_args));

    // Both reach /ipxe for their own MAC: TCG boots take a minute or two.
    let deadline = Instant::now() + Duration::from_secs(420);
    let (bios, uefi) = loop {
        let bios = lab.cli(&["events", BIOS_MAC]);
        let uefi = lab.cli(&["events", UEFI_MAC]);
        // For OVMF, wait for the /ipxe that follows the TFTP download.
        let after_tftp = uefi
            .split_once("tftp_served")
            .is_some_and(|(_, rest)| rest.contains("ipxe_served"));
        if bios.contains("ipxe_served") && after_tftp {
            break (bios, uefi);
        }
        assert!(
            Instant::now() < deadline,
            "VMs did not reach /ipxe in time.\nBIOS events:\n{bios}\nUEFI events:\n{uefi}\nprovision:\n{}\ndnsmasq:\n{}",
            lab.log("provision.log"),
            lab.log("dnsmasq.log")
        );
        std::thread::sleep(Duration::from_secs(2));
    };

    // The site's DHCP server gave the addresses; provision gave only boot instructions.
    let leases = std::fs::read_to_string(lab.path("leases")).unwrap_or_default();
    assert!(
        leases.contains(BIOS_MAC) && leases.contains(UEFI_MAC),
        "dnsmasq leases: {leases}"
    );

    // SeaBIOS: the NIC ROM is iPXE, so the proxy offer is the HTTP chain itself.
    let k = kinds(&bios);
    assert_eq!(k[0], "discovered", "{bios}");
    let offered = k
        .iter()
        .position(|x| x == "dhcp_offered")
        .expect("a proxy offer");
    let served = k.iter().position(|x| x == "ipxe_served").expect("/ipxe");
    assert!(offered < served, "{bios}");
    assert!(bios.contains("dhcp_offered: http://10.77.0.1:8080/boot.ipxe via proxy offer from 10.77.0.1 (x86 BIOS iPXE)"), "{bios}");
    assert!(
        bios.contains("ipxe_served: local boot (discovered, pcbios)"),
        "{bios}"
    );

    // OVMF (no NIC ROM): EDK2's PXE client gets ipxe.efi from the proxy (offer on 67, ack on
    // 4011), loads it over TFTP, and the iPXE it loaded asks DHCP again and chains to /ipxe.
    let line = |needle: &str| {
        uefi.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in\n{uefi}"))
    };
    let pxe_offer = line("dhcp_offered: ipxe.efi via proxy offer from 10.77.0.1 (x64 UEFI PXE)");
    let pxe_ack = line(
        "dhcp_offered: ipxe.efi via PXE boot server ack (port 4011) from 10.77.0.1 (x64 UEFI PXE)",
    );
    let tftp = line("tftp_served: ipxe.efi (");
    let chain = uefi
        .lines()
        .enumerate()
        .position(|(i, l)| i > tftp && l.contains("dhcp_offered: http://10.77.0.1:8080/boot.ipxe"))
        .unwrap_or_else(|| panic!("no iPXE offer after TFTP:\n{uefi}"));
    let ipxe = uefi
        .lines()
        .enumerate()
        .position(|(i, l)| i > chain && l.contains("ipxe_served: local boot (discovered, efi)"))
        .unwrap_or_else(|| panic!("no /ipxe after the chain:\n{uefi}"));
    assert!(
        pxe_offer < pxe_ack && pxe_ack < tftp && tftp < chain && chain < ipxe,
        "{uefi}"
    );
    let m = lab.cli(&["machines", "show", UEFI_MAC]);
    assert!(
        m.contains("platform    efi") && m.contains("state       discovered"),
        "{m}"
    );
}

/// Kea as the site's DHCP server, configured as docs/site-dhcp.md says: a SeaBIOS VM gets its
/// address from Kea and its boot instructions from provision, and reaches `/ipxe`.
#[test]
fn beside_kea_as_documented_a_vm_boots_through_provision() {
    let _one_lab_at_a_time = vm_lock();
    let mut lab = Lab::new("k", true);
    let ns = lab.lab.clone();
    start_site_kea(&mut lab);
    start_provision(&mut lab, &[]);
    let qemu = tool("qemu-system-x86_64");
    let args = vm(&lab, Firmware::Bios, "tap0", BIOS_MAC, None, false);
    lab.spawn(&ns, "bios-vm.log", &qemu, &refs(&args));
    let deadline = Instant::now() + Duration::from_secs(300);
    let events = loop {
        let events = lab.cli(&["events", BIOS_MAC]);
        if events.contains("ipxe_served") {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the VM did not reach /ipxe beside Kea.\nevents:\n{events}\nprovision:\n{}\nkea:\n{}",
            lab.log("provision.log"),
            lab.log("kea.log")
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        events.contains("dhcp_offered: http://10.77.0.1:8080/boot.ipxe via proxy offer from 10.77.0.1 (x86 BIOS iPXE)"),
        "{events}"
    );
    // The address is Kea's: its lease file holds the VM's MAC with an address from the pool.
    let leases = std::fs::read_to_string(lab.path("leases")).unwrap_or_default();
    let lease = leases
        .lines()
        .find(|l| l.contains(BIOS_MAC))
        .unwrap_or_else(|| panic!("no Kea lease for {BIOS_MAC}:\n{leases}"));
    let addr: std::net::Ipv4Addr = lease.split(',').next().unwrap().parse().unwrap();
    assert!(
        (100..=200).contains(&addr.octets()[3]) && addr.octets()[..3] == [10, 77, 0],
        "{lease}"
    );
    // And /ipxe came from that address.
    let m = lab.cli(&["machines", "show", BIOS_MAC]);
    assert!(m.contains(&addr.to_string()), "{m}");
}

#[test]
fn address_mode_boots_a_vm_with_no_other_dhcp_server() {
    let _one_lab_at_a_time = vm_lock();
    let mut lab = Lab::new("a", false);
    start_provision(
        &mut lab,
        &[
            "--dhcp-mode",
            "full",
            "--dhcp-range",
            "10.77.0.150-10.77.0.160",
            "--dhcp-router",
            "10.77.0.1",
            // Limited to the bridge: exercises SO_BINDTODEVICE sockets.
            "--dhcp-interface",
            "br0",
        ],
    );
    let (ns, qemu) = (lab.lab.clone(), tool("qemu-system-x86_64"));
    let args = vm(&lab, Firmware::Bios, "tap0", BIOS_MAC, None, false);
    lab.spawn(&ns, "bios-vm.log", &qemu, &refs(&args));
    let deadline = Instant::now() + Duration::from_secs(300);
    let events = loop {
        let e = lab.cli(&["events", BIOS_MAC]);
        if e.contains("ipxe_served") {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the VM did not reach /ipxe:\n{e}\n{}",
            lab.log("provision.log")
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    // provision gave the address (DORA) and the boot instructions in the same exchange.
    let lease = events
        .lines()
        .position(|l| l.contains("dhcp_lease: 10.77.0.150 until"))
        .unwrap_or_else(|| panic!("no lease:\n{events}"));
    let offered = events
        .lines()
        .position(|l| {
            l.contains("dhcp_offered: http://10.77.0.1:8080/boot.ipxe via DHCP offer/ack")
        })
        .unwrap_or_else(|| panic!("no offer:\n{events}"));
    let served = events
        .lines()
        .position(|l| l.contains("ipxe_served: local boot (discovered, pcbios)"))
        .unwrap();
    assert!(offered < lease && lease < served, "{events}");
    let m = lab.cli(&["machines", "show", BIOS_MAC]);
    assert!(
        m.contains("boot_ip     10.77.0.150"),
        "the VM used its leased address for HTTP: {m}"
    );
    // A boot request is not where provision SSHes to: that is set by a phone-home.
    assert!(m.contains("last_ip     -"), "{m}");
}

/// The IPv4 addresses on `ifname` in namespace `ns`.
fn addresses(ns: &str, ifname: &str) -> String {
    let out = Command::new(tool("ip"))
        .args(["-n", ns, "-4", "-o", "addr", "show", "dev", ifname])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `what` holds, or fails with `why()`.
fn until(limit: Duration, mut what: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !what() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Address mode against a real DHCP client — dhcpcd, each client in its own namespace on the
/// lab's bridge — for the messages firmware never sends: DHCPRELEASE frees the address for the
/// next client, DHCPDECLINE (dhcpcd's RFC 5227 probe found the offered address in use by
/// another host) quarantines it, and DHCPINFORM from a host with its own address is answered
/// without taking one. The pool has two addresses, so every effect shows in who gets what.
#[test]
fn address_mode_answers_a_real_clients_release_decline_and_inform() {
    let mut lab = Lab::new("d", false);
    start_provision(
        &mut lab,
        &[
            "--dhcp-mode",
            "full",
            "--dhcp-range",
            "10.77.0.150-10.77.0.151",
            "--dhcp-router",
            "10.77.0.1",
            "--dhcp-interface",
            "br0",
            "--tftp",
            "off",
        ],
    );
    let dhcpcd = tool("dhcpcd");
    // dhcpcd keeps leases by interface name in /var/lib/dhcpcd and would ask for an old one.
    for i in ["pvdca", "pvdcb", "pvdcc"] {
        let _ = std::fs::remove_file(format!("/var/lib/dhcpcd/{i}.lease"));
    }
    // Its own config (none), no hooks (nothing touches this host's resolv.conf), no IPv4LL,
    // in the foreground; `how`: how long it asks, and what for.
    let client = |how: &[&str], ifname: &str| -> Vec<String> {
        [
            "-4",
            "-B",
            "-d",
            "-f",
            "/dev/null",
            "-c",
            "/bin/true",
            "--noipv4ll",
        ]
        .iter()
        .chain(how)
        .chain([&ifname])
        .map(|s| s.to_string())
        .collect()
    };
    let forever: &[&str] = &["-t", "0"];
    let (mac_a, mac_b, mac_c) = (
        "52:54:00:77:0d:01",
        "52:54:00:77:0d:02",
        "52:54:00:77:0d:03",
    );
    let a = lab.host("pvdca", mac_a);
    let b = lab.host("pvdcb", mac_b);
    let squatter = lab.host("pvdcs", "52:54:00:77:0d:09");
    let c = lab.host("pvdcc", mac_c);

    // A takes the first address.
    let args = client(forever, "pvdca");
    lab.spawn(&a, "dhcpcd-a.log", &dhcpcd, &refs(&args));
    until(
        Duration::from_secs(60),
        || addresses(&a, "pvdca").contains("10.77.0.150/24"),
        || format!("A got no address: {}", lab.log("dhcpcd-a.log")),
    );
    assert!(
        lab.cli(&["events", mac_a])
            .contains("dhcp_lease: 10.77.0.150 until"),
        "{}",
        lab.cli(&["events", mac_a])
    );

    // B is offered the other one, which a host B cannot see from DHCP already uses: dhcpcd's
    // probe finds it, B declines it, and with nothing left B gets nothing.
    ip(&[
        "-n",
        &squatter,
        "addr",
        "add",
        "10.77.0.151/24",
        "dev",
        "pvdcs",
    ]);
    let args = client(forever, "pvdcb");
    lab.spawn(&b, "dhcpcd-b.log", &dhcpcd, &refs(&args));
    until(
        Duration::from_secs(60),
        || {
            lab.cli(&["events", mac_b])
                .contains("dhcp_decline: 10.77.0.151 is in use by someone else; quarantined until")
        },
        || {
            format!(
                "no decline from B: {}\n{}",
                lab.cli(&["events", mac_b]),
                lab.log("dhcpcd-b.log")
            )
        },
    );
    assert!(
        lab.log("dhcpcd-b.log").contains("10.77.0.151"),
        "{}",
        lab.log("dhcpcd-b.log")
    );
    // Its next two DISCOVERs go unanswered (a MAC that is no machine gets no event for that:
    // the inventory does not grow with what the LAN sends).
    let after_decline = |log: String| -> String {
        log.split_once("sending DECLINE")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or_default()
    };
    until(
        Duration::from_secs(60),
        || {
            after_decline(lab.log("dhcpcd-b.log"))
                .matches("sending DISCOVER")
                .count()
                >= 3
        },
        || format!("B stopped asking: {}", lab.log("dhcpcd-b.log")),
    );
    let asked = after_decline(lab.log("dhcpcd-b.log"));
    assert!(
        !asked.contains("offered"),
        "offered after the decline:\n{asked}"
    );
    assert!(
        !addresses(&b, "pvdcb").contains("10.77.0."),
        "{}",
        addresses(&b, "pvdcb")
    );

    // A releases its lease; B, asking again, gets that address.
    // Tells the dhcpcd running in `ns` what to do.
    let control = |ns: &str, args: &[&str]| {
        let out = Command::new(tool("ip"))
            .args(["netns", "exec", ns])
            .arg(&dhcpcd)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dhcpcd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    control(&a, &["-4", "-k", "pvdca"]);
    until(
        Duration::from_secs(30),
        || !addresses(&a, "pvdca").contains("10.77.0.150"),
        || format!("A kept its address: {}", lab.log("dhcpcd-a.log")),
    );
    assert!(
        lab.log("dhcpcd-a.log").contains("releasing lease"),
        "{}",
        lab.log("dhcpcd-a.log")
    );
    control(&b, &["-4", "-n", "pvdcb"]);
    until(
        Duration::from_secs(60),
        || addresses(&b, "pvdcb").contains("10.77.0.150/24"),
        || {
            format!(
                "B did not get the released address: {}\n{}",
                lab.cli(&["events", mac_b]),
                lab.log("dhcpcd-b.log")
            )
        },
    );

    // C has its own address and only asks for its parameters: an ACK, and no lease.
    ip(&["-n", &c, "addr", "add", "10.77.0.170/24", "dev", "pvdcc"]);
    let args = client(&["-1", "-t", "30", "-s", "10.77.0.170/24"], "pvdcc");
    let inform = Command::new(tool("ip"))
        .args(["netns", "exec", &c])
        .arg(&dhcpcd)
        .args(&args)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&inform.stdout),
        String::from_utf8_lossy(&inform.stderr)
    );
    assert!(inform.status.success(), "{said}");
    // dhcpcd's words for the ACK of an INFORM, and the router option provision put in it.
    assert!(said.contains("received approval for 10.77.0.170"), "{said}");
    assert!(
        said.contains("adding default route via 10.77.0.1"),
        "{said}"
    );
    assert!(
        !lab.cli(&["events", mac_c]).contains("dhcp_lease"),
        "{}",
        lab.cli(&["events", mac_c])
    );
}

/// Builds (or reuses) the test installer: tests/installer/build.sh, in `TEST_INSTALLER_DIR`
/// (`make it` builds it there before any test) or the target dir.
pub(crate) fn test_installer() -> PathBuf {
    crate::support::cached_build(
        "tests/installer/build.sh",
        "TEST_INSTALLER_DIR",
        "test-installer",
    )
}

/// The arguments that serve the test installer (its kernel and initrd copied into the lab's
/// assets directory) with its templates (tests/installer/templates).
fn installer_args(lab: &Lab, installer: &Path) -> Vec<String> {
    let assets = lab.path("assets");
    std::fs::create_dir_all(assets.join("test-installer")).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(installer.join(f), assets.join("test-installer").join(f)).unwrap();
    }
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/installer/templates");
    vec![
        "--assets-dir".into(),
        assets.to_str().unwrap().into(),
        "--templates-dir".into(),
        templates.to_str().unwrap().into(),
    ]
}

/// A lab with the site's DHCP server, and provision serving the test installer.
fn installer_lab(tag: &str, installer: &Path) -> Lab {
    let mut lab = Lab::new(tag, true);
    start_site_dhcp(&mut lab);
    let serve = installer_args(&lab, installer);
    start_provision(&mut lab, &refs(&serve));
    lab
}

/// Whether a machine's timeline (`provision events MAC`) has a local boot after its phone-home.
fn booted_local_after_install(events: &str) -> bool {
    events
        .split_once("phoned_home")
        .is_some_and(|(_, after)| after.contains("local boot (installed"))
}

/// Waits until the VM on `tap` ran the boot code the test installer wrote to its disk: the
/// code prints its marker on the console (SeaBIOS runs the MBR, OVMF the ESP's GRUB), after
/// `after` (what the console said before that boot).
fn wait_disk_boot(lab: &Lab, tap: &str, fw: Firmware, mac: &str, after: &str) {
    let marker = match fw {
        Firmware::Bios => "provision-test-disk: booted from disk (BIOS)",
        Firmware::Uefi => "provision-test-disk: booted from disk (UEFI)",
    };
    let booted = Instant::now() + Duration::from_secs(180);
    loop {
        let console = lab.log(&format!("{tap}.serial"));
        if console
            .split_once(after)
            .is_some_and(|(_, rest)| rest.contains(marker))
        {
            return;
        }
        assert!(
            Instant::now() < booted,
            "{mac}: answered with a local boot, but its disk did not boot:\n{console}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The whole install loop, once per config kind, BIOS and UEFI in parallel: PXE → ProxyDHCP
/// → (TFTP) → iPXE → /ipxe → kernel and initrd from /assets → config by install token →
/// checked and written to disk → phone-home with a fresh SSH host key → `installed` → the
/// VM reboots, and its next network boot is local: no second install, and the firmware runs
/// the boot code on the disk the installer wrote.
#[test]
fn vms_install_phone_home_and_then_boot_local() {
    let installer = test_installer();
    let _one_lab_at_a_time = vm_lock();
    let mut lab = installer_lab("i", &installer);
    let ns = lab.lab.clone();

    // (tap, firmware, MAC, profile, what the installer wrote to disk)
    let machines = [
        (
            "tap0",
            Firmware::Bios,
            "52:54:00:77:01:01",
            "test-nocloud",
            "./user-data",
        ),
        (
            "tap1",
            Firmware::Uefi,
            "52:54:00:77:01:02",
            "test-ignition",
            "./config.ign",
        ),
        (
            "tap2",
            Firmware::Bios,
            "52:54:00:77:01:03",
            "test-preseed",
            "./preseed.cfg",
        ),
        (
            "tap3",
            Firmware::Uefi,
            "52:54:00:77:01:04",
            "test-cloud-config",
            "./cloud-config",
        ),
    ];
    // One machine nobody enrolls: a group selects it by the serial number its firmware
    // reports (SMBIOS, `${serial}` in iPXE) and gives it its profile and a variable.
    const GROUPED: &str = "52:54:00:77:01:03";
    const SERIAL: &str = "SN-LAB-0003";
    lab.cli(&[
        "groups",
        "create",
        "lab-rack",
        "--selector",
        &format!("serial={SERIAL}"),
        "--profile",
        "test-preseed",
        "--var",
        "timezone=Europe/Oslo",
    ]);
    // Another nobody enrolls: a discovery rule takes the first discovered machine of the lab's
    // OUI range (one place), and gives it its profile and a hostname from a pattern. A fifth
    // VM of the same range, started once the rule is full, stays discovered.
    const RULED: &str = "52:54:00:77:01:04";
    const LEFT_OVER: &str = "52:54:00:77:01:05";
    lab.cli(&[
        "rules",
        "create",
        "lab-range",
        "--match",
        "mac=52:54:00:77:01:*",
        "--profile",
        "test-cloud-config",
        "--hostname",
        "lab-{index:02}",
        "--max",
        "1",
    ]);
    let qemu = tool("qemu-system-x86_64");
    for (i, (tap, fw, mac, profile, _)) in machines.iter().enumerate() {
        if *mac != GROUPED && *mac != RULED {
            lab.cli(&[
                "enroll",
                mac,
                "--profile",
                profile,
                "--hostname",
                &format!("node{i}"),
            ]);
        }
        let disk = lab.path(&format!("{tap}.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut args = vm(&lab, *fw, tap, mac, Some(&disk), true);
        if *mac == GROUPED {
            args.extend(["-smbios".into(), format!("type=1,serial={SERIAL}")]);
        }
        lab.spawn(&ns, &format!("{tap}.log"), &qemu, &refs(&args));
    }
    let enrolled_by_rule = Instant::now() + Duration::from_secs(600);
    while !lab.cli(&["events", RULED]).contains("by rule lab-range") {
        assert!(
            Instant::now() < enrolled_by_rule,
            "the rule did not enroll {RULED}:\n{}",
            lab.cli(&["events", RULED])
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let args = vm(&lab, Firmware::Bios, "tap4", LEFT_OVER, None, false);
    lab.spawn(&ns, "tap4.log", &qemu, &refs(&args));

    // Done when each machine's timeline has a local boot after its phone-home.
    let deadline = Instant::now() + Duration::from_secs(900);
    let timelines = loop {
        let t: Vec<String> = machines.iter().map(|m| lab.cli(&["events", m.2])).collect();
        if t.iter().all(|e| booted_local_after_install(e)) {
            break t;
        }
        if Instant::now() > deadline {
            let consoles: String = machines
                .iter()
                .map(|m| {
                    format!(
                        "--- {} console ---\n{}\n",
                        m.0,
                        lab.log(&format!("{}.serial", m.0))
                    )
                })
                .collect();
            panic!(
                "not every VM installed and booted local in time:\n{}\n{consoles}",
                t.join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    };

    // The local-boot answer really booted each VM's disk: the boot code the installer wrote
    // prints its marker on the console (SeaBIOS runs the MBR, OVMF the ESP's GRUB) after the
    // installer's last words. Shortly after the local boot event, so this waits for it.
    for (tap, fw, mac, ..) in &machines {
        wait_disk_boot(
            &lab,
            tap,
            *fw,
            mac,
            "provision-test-installer: phoned home: installed",
        );
    }

    for ((tap, fw, mac, profile, written), events) in machines.iter().zip(&timelines) {
        let k = kinds(events);
        let count = |kind: &str| k.iter().filter(|x| *x == kind).count();
        assert_eq!(count("install_started"), 1, "{mac} ({profile}):\n{events}");
        assert_eq!(count("phoned_home"), 1, "{mac}:\n{events}");
        let phoned = k.iter().position(|x| x == "phoned_home").unwrap();
        assert!(
            !k[phoned..]
                .iter()
                .any(|x| x == "install_restarted" || x == "install_started"),
            "reinstalled after phone-home:\n{events}"
        );
        assert!(k[..phoned].iter().any(|x| x == "config_served"), "{events}");
        if *fw == Firmware::Uefi {
            assert!(events.contains("tftp_served: ipxe.efi"), "{events}");
        }
        let show = lab.cli(&["machines", "show", mac]);
        assert!(
            show.contains("state       installed") && show.contains("host key   ssh-ed25519 "),
            "{show}"
        );
        let console = lab.log(&format!("{tap}.serial"));
        assert!(
            console.contains("provision-test-installer: phoned home: installed"),
            "{console}"
        );
        // The config really reached the disk (a tar stream at 4 MiB, past the boot files).
        let disk = std::fs::read(lab.path(&format!("{tap}.img"))).unwrap();
        let head = String::from_utf8_lossy(&disk[4 << 20..(4 << 20) + (64 << 10)]);
        assert!(head.contains(written), "{mac}: {written} not on the disk");
        if *mac == RULED {
            assert!(
                events.contains("enrolled")
                    && events.contains("by rule lab-range (machine 1 of 1), hostname lab-01"),
                "{events}"
            );
            assert!(show.contains("hostname    lab-01"), "{show}");
        }
        if *mac == GROUPED {
            // Enrolled by its group at its first install boot, with the group's values.
            let enrolled = events
                .lines()
                .find(|l| l.contains("enrolled"))
                .unwrap_or_else(|| panic!("{events}"));
            assert!(
                enrolled.contains("profile test-preseed from group lab-rack"),
                "{events}"
            );
            assert!(
                show.contains(&format!("serial      {SERIAL}"))
                    && show.contains("(group lab-rack)")
                    && show.contains("var        timezone=Europe/Oslo   (group lab-rack)"),
                "{show}"
            );
            assert!(
                head.contains("d-i time/zone string Europe/Oslo"),
                "{mac}: the group's timezone is not in the preseed on the disk"
            );
        }
    }
    // The fifth VM reached /ipxe, found the rule full, and stays discovered.
    let left_over = Instant::now() + Duration::from_secs(300);
    let events = loop {
        let e = lab.cli(&["events", LEFT_OVER]);
        if e.contains("ipxe_served") {
            break e;
        }
        assert!(
            Instant::now() < left_over,
            "{LEFT_OVER} never reached /ipxe:\n{e}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        events.contains("rule_full")
            && events
                .contains("rule lab-range matches but is full: it has enrolled 1 of 1 machines"),
        "{events}"
    );
    let show = lab.cli(&["machines", "show", LEFT_OVER]);
    assert!(show.contains("state       discovered"), "{show}");
    let rules = lab.cli(&["rules", "list"]);
    assert!(
        rules.contains("lab-range") && rules.contains("1/1"),
        "{rules}"
    );
}

/// Two segments, two daemons, one inventory on PostgreSQL (docs/scale-out.md): each daemon
/// in its own namespace on its own subnet answers only its segment and advertises its own URL;
/// a BIOS VM installs on one, a UEFI VM on the other, and either daemon's CLI shows both
/// installed with their whole timelines. Then the BIOS VM is moved, disk and all, to the other
/// segment: the other daemon answers it as installed (a local boot, no second install), and
/// it keeps its one inventory row and its history.
#[test]
fn two_segments_two_daemons_one_inventory_on_postgres() {
    const BIOS: &str = "52:54:00:77:05:01";
    const UEFI: &str = "52:54:00:77:05:02";
    let installer = test_installer();
    let _one_lab_at_a_time = vm_lock();
    let cluster = crate::pg_cluster::shared();
    let db = cluster.create_db();
    // Over the cluster's Unix socket: the daemons run in namespaces of their own.
    let url = cluster.socket_url(&db);
    let key = crate::scaleout::the_key().to_str().unwrap();
    let mut a = Lab::on("sa", true, 0);
    let mut b = Lab::on("sb", true, 1);
    for lab in [&mut a, &mut b] {
        start_site_dhcp(lab);
        let mut serve = installer_args(lab, &installer);
        serve.extend([
            "--database".into(),
            url.clone(),
            "--secret-key-file".into(),
            key.into(),
        ]);
        start_provision(lab, &refs(&serve));
    }
    a.cli(&[
        "enroll",
        BIOS,
        "--profile",
        "test-nocloud",
        "--hostname",
        "seg-a",
    ]);
    b.cli(&[
        "enroll",
        UEFI,
        "--profile",
        "test-ignition",
        "--hostname",
        "seg-b",
    ]);
    let qemu = tool("qemu-system-x86_64");
    let disk_of = |lab: &Lab| {
        let disk = lab.path("tap0.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        disk
    };
    let bios_disk = disk_of(&a);
    let args = vm(&a, Firmware::Bios, "tap0", BIOS, Some(&bios_disk), true);
    let (ns_a, ns_b) = (a.lab.clone(), b.lab.clone());
    let bios_vm = a.spawn(&ns_a, "tap0.log", &qemu, &refs(&args));
    let uefi_disk = disk_of(&b);
    let args = vm(&b, Firmware::Uefi, "tap0", UEFI, Some(&uefi_disk), true);
    b.spawn(&ns_b, "tap0.log", &qemu, &refs(&args));

    // Each installs through its own segment's daemon; the other daemon's CLI sees it happen.
    let deadline = Instant::now() + Duration::from_secs(900);
    while ![b.cli(&["events", BIOS]), a.cli(&["events", UEFI])]
        .iter()
        .all(|e| booted_local_after_install(e))
    {
        assert!(
            Instant::now() < deadline,
            "not both VMs installed and booted local in time:\n{}\n{}\n--- BIOS console ---\n{}\n--- UEFI console ---\n{}",
            b.cli(&["events", BIOS]),
            a.cli(&["events", UEFI]),
            a.log("tap0.serial"),
            b.log("tap0.serial")
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    let installed = "provision-test-installer: phoned home: installed";
    wait_disk_boot(&a, "tap0", Firmware::Bios, BIOS, installed);
    wait_disk_boot(&b, "tap0", Firmware::Uefi, UEFI, installed);
    for (mac, hostname, daemon) in [(BIOS, "seg-a", "10.77.0.1"), (UEFI, "seg-b", "10.77.1.1")] {
        for lab in [&a, &b] {
            let show = lab.cli(&["machines", "show", mac]);
            assert!(
                show.contains("state       installed")
                    && show.contains(&format!("hostname    {hostname}"))
                    && show.contains("host key   ssh-ed25519 "),
                "{show}"
            );
            let events = lab.cli(&["events", mac]);
            let k = kinds(&events);
            for kind in ["enrolled", "install_started", "phoned_home"] {
                assert_eq!(
                    k.iter().filter(|x| *x == kind).count(),
                    1,
                    "{kind}:\n{events}"
                );
            }
            assert!(k.iter().any(|x| x == "config_served"), "{events}");
            // Offered by its own segment's daemon only: the other never heard it.
            assert!(
                events
                    .lines()
                    .filter(|l| l.contains("dhcp_offered"))
                    .all(|l| l.contains(&format!("from {daemon} "))),
                "{events}"
            );
        }
    }

    // Moved: the BIOS VM is powered off on segment a and its disk boots on segment b.
    a.stop(bios_vm);
    let before = b.cli(&["events", BIOS]);
    let args = vm(&b, Firmware::Bios, "tap1", BIOS, Some(&bios_disk), true);
    b.spawn(&ns_b, "tap1.log", &qemu, &refs(&args));
    let moved = Instant::now() + Duration::from_secs(300);
    let events = loop {
        let e = a.cli(&["events", BIOS]);
        let new = e
            .strip_prefix(before.as_str())
            .unwrap_or_else(|| panic!("the timeline before the move changed:\n{before}\n---\n{e}"));
        if new.contains("local boot (installed") {
            break e;
        }
        assert!(
            Instant::now() < moved,
            "{BIOS} on segment b was not answered with a local boot:\n{e}\n--- console ---\n{}",
            b.log("tap1.serial")
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let new = &events[before.len()..];
    assert!(
        new.contains("dhcp_offered: http://10.77.1.1:8080/boot.ipxe via proxy offer from 10.77.1.1 (x86 BIOS iPXE)"),
        "segment b's daemon answered it:\n{events}"
    );
    assert!(
        !new.contains("install_started") && !new.contains("config_served"),
        "no second install:\n{events}"
    );
    wait_disk_boot(&b, "tap1", Firmware::Bios, BIOS, "");
    let list = b.cli(&["machines", "list"]);
    assert_eq!(list.matches(BIOS).count(), 1, "one row:\n{list}");
    let show = a.cli(&["machines", "show", BIOS]);
    assert!(show.contains("state       installed"), "{show}");
    drop((a, b));
    cluster.drop_db(&db);
}

/// `provision lab` as an operator runs it: in an "operator host" namespace with a running
/// daemon, it builds its own lab, installs a BIOS and a UEFI VM, and removes everything; a
/// Ctrl-C in the middle also removes everything.
#[test]
fn provision_lab_installs_vms_and_cleans_up() {
    let installer = test_installer();
    let _one_lab_at_a_time = vm_lock();
    crate::support::sweep_stale_namespaces();
    let id = std::process::id();
    let host = format!("pvo{id}");
    ip(&["netns", "add", &host]);
    ip(&["-n", &host, "link", "set", "lo", "up"]);
    struct Host(String, Vec<Child>);
    impl Drop for Host {
        fn drop(&mut self) {
            for c in &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let mut guard = Host(host.clone(), Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("assets/test-installer");
    std::fs::create_dir_all(&assets).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(installer.join(f), assets.join(f)).unwrap();
    }
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/installer/templates");
    let data = dir.path().join("data");
    guard.1.push(start_daemon(
        Command::new("ip")
            .args(["netns", "exec", &host, BIN, "serve", "--data-dir"])
            .arg(&data)
            .arg("--assets-dir")
            .arg(dir.path().join("assets"))
            .arg("--templates-dir")
            .arg(&templates),
        &dir.path().join("daemon.log"),
    ));
    let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let lab_cmd = |extra: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host, BIN, "--token-file"])
            .arg(data.join("admin-token"))
            .args(["lab", "--profile", "test-nocloud", "--timeout", "12m"])
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    let namespaces = || {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
    };

    let out = lab_cmd(&["--bios", "1", "--uefi", "1"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon_log()
    );
    assert!(
        stdout.contains("all 2 VMs installed (BIOS, UEFI)"),
        "{stdout}"
    );
    assert!(
        !namespaces().contains("provision-lab-"),
        "lab namespace left behind: {}",
        namespaces()
    );
    let links = Command::new("ip")
        .args(["-n", &host, "-o", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("pvlab"),
        "veth left behind"
    );
    let list = Command::new("ip")
        .args(["netns", "exec", &host, BIN, "--token-file"])
        .arg(data.join("admin-token"))
        .args(["machines", "list", "--state", "installed"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).lines().count(),
        3,
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );

    // Ctrl-C while VMs boot: the lab removes what it made and says so.
    let child = lab_cmd(&["--bios", "1", "--uefi", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Waits until the lab has started QEMU (a qemu-system process whose parent is the lab):
    // the VMs are booting.
    let lab_pid = child.id().to_string();
    let qemu_in_lab = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let dir = e.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // Field 4 of /proc/PID/stat, after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            comm.starts_with("qemu-system") && ppid == Some(lab_pid.as_str())
        })
    };
    let start = Instant::now();
    while !qemu_in_lab() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the lab never started a VM: {}",
            namespaces()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted; the lab was removed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !namespaces().contains("provision-lab-"),
        "lab namespace left behind after Ctrl-C: {}",
        namespaces()
    );
}

/// `virt-install --pxe`, as an operator's CI would run it: libvirt's QEMU driver (TCG) boots a
/// VM on an isolated bridge where provision runs in address mode, and the VM installs.
#[test]
fn virt_install_pxe_installs_a_vm() {
    let installer = test_installer();
    let _one_lab_at_a_time = vm_lock();
    let virsh_ok = || {
        Command::new(tool("virsh"))
            .args(["-c", "qemu:///system", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let id = std::process::id();
    let bridge = format!("pvv{}", id % 100_000);
    let domain = format!("provision-test-{id}");
    let mac = "52:54:00:78:00:01";
    struct Cleanup {
        children: Vec<Child>,
        bridge: String,
        domain: String,
    }
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "destroy", &self.domain])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "undefine", &self.domain])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            for c in self.children.iter_mut().rev() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .status();
        }
    }
    let mut c = Cleanup {
        children: Vec::new(),
        bridge: bridge.clone(),
        domain: domain.clone(),
    };
    // No init system starts libvirt here: run the daemons in the foreground for this test.
    if !virsh_ok() {
        for d in ["virtlogd", "libvirtd"] {
            c.children.push(
                Command::new(tool(d))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        let start = Instant::now();
        while !virsh_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "libvirtd did not come up"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["addr", "add", "10.78.0.1/24", "dev", &bridge]);
    ip(&["link", "set", &bridge, "up"]);

    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("assets/test-installer");
    std::fs::create_dir_all(&assets).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(installer.join(f), assets.join(f)).unwrap();
    }
    let data = dir.path().join("data");
    // Everything bound to the isolated bridge only.
    c.children.push(start_daemon(
        Command::new(BIN)
            .args([
                "serve",
                "--http",
                "10.78.0.1:8080",
                "--admin",
                "10.78.0.1:8443",
                "--tftp",
                "10.78.0.1:69",
                "--dhcp-interface",
                &bridge,
            ])
            .args([
                "--dhcp-mode",
                "full",
                "--dhcp-range",
                "10.78.0.100-10.78.0.150",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--assets-dir")
            .arg(dir.path().join("assets"))
            .arg("--templates-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/installer/templates")),
        &dir.path().join("daemon.log"),
    ));
    let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--server", "https://10.78.0.1:8443", "--token-file"])
            .arg(data.join("admin-token"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&[
        "enroll",
        mac,
        "--profile",
        "test-nocloud",
        "--hostname",
        "virt1",
    ]);
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = Command::new(tool("virt-install"))
        .args([
            "--connect",
            "qemu:///system",
            "--name",
            &domain,
            "--memory",
            "512",
            "--vcpus",
            "1",
            "--virt-type",
            if crate::support::accel() == "kvm" {
                "kvm"
            } else {
                "qemu"
            },
            "--pxe",
        ])
        .args([
            "--network",
            &format!("bridge={bridge},mac={mac},model=virtio"),
        ])
        .args([
            "--disk",
            &format!("path={},format=raw,bus=virtio", disk.display()),
        ])
        .args([
            "--osinfo",
            "detect=on,require=off",
            "--graphics",
            "none",
            "--noautoconsole",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virt-install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let events = loop {
        let e = cli(&["events", mac]);
        if e.contains("phoned_home") {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the libvirt VM did not install:\n{e}\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_secs(3));
    };
    assert!(
        events.contains("dhcp_lease: 10.78.0.100") && events.contains("config_served: user-data"),
        "{events}"
    );
    assert!(cli(&["machines", "show", mac]).contains("state       installed"));
}
