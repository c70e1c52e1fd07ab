//! End to end with real firmware: network namespaces, `dnsmasq` as the site's DHCP server
//! (addresses only, no boot options), `provision serve` as ProxyDHCP + TFTP + HTTP, and two
//! QEMU VMs under TCG — SeaBIOS (its NIC ROM is iPXE) and OVMF (EDK2's own PXE client, which
//! loads ipxe.efi over TFTP) — booting in parallel until each has fetched `/ipxe` for its own
//! MAC. Needs root (namespaces, taps); CI runs as root.
//!
//! Topology: namespace `site` (dnsmasq on 10.77.0.2) — veth — namespace `lab` (bridge br0,
//! 10.77.0.1, provision, and one tap per VM).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{tool, BIN};

const BIOS_MAC: &str = "52:54:00:77:00:01";
const UEFI_MAC: &str = "52:54:00:77:00:02";

/// Namespaces and processes of one lab; everything is stopped by PID and deleted on drop,
/// also when the test fails.
struct Lab {
    site: String,
    lab: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
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
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the firmware lab needs root (network namespaces and tap devices)"
        );
        let id = std::process::id();
        let lab = Lab {
            site: format!("pv{tag}s{id}"),
            lab: format!("pv{tag}l{id}"),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let (s, l) = (lab.site.as_str(), lab.lab.as_str());
        ip(&["netns", "add", l]);
        ip(&["-n", l, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", l, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        ip(&["-n", l, "link", "set", "br0", "up"]);
        ip(&["-n", l, "link", "set", "lo", "up"]);
        if site {
            ip(&["netns", "add", s]);
            ip(&["-n", s, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", "vs0", "netns", s, "type", "veth", "peer", "name", "vs1", "netns", l,
            ]);
            ip(&["-n", s, "addr", "add", "10.77.0.2/24", "dev", "vs0"]);
            ip(&["-n", s, "link", "set", "vs0", "up"]);
            ip(&["-n", l, "link", "set", "vs1", "master", "br0"]);
            ip(&["-n", l, "link", "set", "vs1", "up"]);
        }
        for tap in ["tap0", "tap1"] {
            ip(&["-n", l, "tuntap", "add", tap, "mode", "tap"]);
            ip(&["-n", l, "link", "set", tap, "master", "br0"]);
            ip(&["-n", l, "link", "set", tap, "up"]);
        }
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a process inside namespace `ns`, its output in `log`.
    fn spawn(&mut self, ns: &str, log: &str, program: &Path, args: &[&str]) {
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
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(tool("ip"))
            .args([
                "netns",
                "exec",
                &self.lab,
                BIN,
                "--server",
                "http://10.77.0.1:8080",
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
        for ns in [&self.lab, &self.site] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Starts provision in the lab namespace and waits until all its listeners are up.
fn start_provision(lab: &mut Lab, extra: &[&str]) {
    let data = lab.path("data").to_str().unwrap().to_string();
    let ns = lab.lab.clone();
    let mut args = vec!["serve", "--data-dir", &data, "--http", "10.77.0.1:8080"];
    args.extend_from_slice(extra);
    lab.spawn(&ns, "provision.log", Path::new(BIN), &args);
    let start = Instant::now();
    while !lab.log("provision.log").contains("listening for PXE on") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "provision did not start: {}",
            lab.log("provision.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU arguments for a SeaBIOS VM on `tap`.
fn bios_vm(tap: &str, mac: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "-accel",
        "tcg",
        "-display",
        "none",
        "-boot",
        "n",
        "-no-reboot",
        "-m",
        "256",
        "-netdev",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("tap,id=n0,ifname={tap},script=no,downscript=no"));
    v.push("-device".into());
    v.push(format!("virtio-net-pci,netdev=n0,mac={mac}"));
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
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
    let mut lab = Lab::new("p", true);
    let (site, ns) = (lab.site.clone(), lab.lab.clone());
    let leases = lab.path("leases").to_str().unwrap().to_string();
    lab.spawn(
        &site,
        "dnsmasq.log",
        &tool("dnsmasq"),
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--interface=vs0",
            "--bind-interfaces",
            "--dhcp-range=10.77.0.100,10.77.0.200,255.255.255.0,1h",
            &format!("--dhcp-leasefile={leases}"),
            "--log-dhcp",
        ],
    );
    let data = lab.path("data").to_str().unwrap().to_string();
    lab.spawn(
        &ns,
        "provision.log",
        Path::new(BIN),
        &["serve", "--data-dir", &data, "--http", "10.77.0.1:8080"],
    );
    let start = Instant::now();
    while !lab.log("provision.log").contains("listening for PXE on") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "provision did not start: {}",
            lab.log("provision.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let vars = lab.path("OVMF_VARS.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    let qemu = tool("qemu-system-x86_64");
    let common = [
        "-accel",
        "tcg",
        "-display",
        "none",
        "-boot",
        "n",
        "-no-reboot",
    ];
    let bios_args: Vec<String> = common
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-m".into(),
            "256".into(),
            "-netdev".into(),
            "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={BIOS_MAC}"),
        ])
        .collect();
    let uefi_args: Vec<String> = common
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-m".into(),
            "512".into(),
            "-drive".into(),
            "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            "-drive".into(),
            format!("if=pflash,format=raw,file={}", vars.display()),
            "-netdev".into(),
            "tap,id=n1,ifname=tap1,script=no,downscript=no".into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=n1,mac={UEFI_MAC}"),
        ])
        .collect();
    lab.spawn(&ns, "bios-vm.log", &qemu, &refs(&bios_args));
    lab.spawn(&ns, "uefi-vm.log", &qemu, &refs(&uefi_args));

    // Both reach /ipxe for their own MAC: TCG boots take a minute or two.
    let deadline = Instant::now() + Duration::from_secs(420);
    let (bios, uefi) = loop {
        let bios = lab.cli(&["events", BIOS_MAC]);
        let uefi = lab.cli(&["events", UEFI_MAC]);
        // For OVMF, wait for the /ipxe that follows the TFTP download: the iPXE driver in the
        // NIC ROM may reach /ipxe first, before EDK2's own PXE client runs.
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

    // OVMF: EDK2's PXE client gets ipxe.efi from the proxy (offer on 67, ack on 4011), loads
    // it over TFTP, and the iPXE it loaded asks DHCP again and chains to /ipxe.
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

#[test]
fn address_mode_boots_a_vm_with_no_other_dhcp_server() {
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
    lab.spawn(&ns, "bios-vm.log", &qemu, &refs(&bios_vm("tap0", BIOS_MAC)));
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
        m.contains("last_ip     10.77.0.150"),
        "the VM used its leased address for HTTP: {m}"
    );
}
