//! `provision lab`: the install loop of the test suite, on the operator's machine. It builds a
//! network namespace with a bridge, a site DHCP server (dnsmasq, addresses only) and one QEMU
//! VM per requested firmware, all wired to the running daemon through a veth pair; enrolls the
//! VMs with a profile; shows each VM's progress from its state and events until it is
//! installed; and removes everything it created on this host (namespace, links, processes,
//! files) — on success, on failure and on Ctrl-C. The enrolled machines stay in the
//! inventory, with their event history.
//!
//! Needs root (namespaces, taps), qemu-system-x86, ovmf for UEFI VMs, and dnsmasq. QEMU runs
//! with TCG (software emulation), so it also works where nested KVM does not.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::Client;

/// `provision lab` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LabArgs {
    /// Profile the VMs install (it must boot a kernel the daemon can serve, e.g. the test
    /// installer's profiles in tests/installer/templates).
    #[arg(long, short)]
    pub profile: String,
    /// Number of SeaBIOS VMs.
    #[arg(long, default_value_t = 1)]
    pub bios: u8,
    /// Number of OVMF (UEFI) VMs.
    #[arg(long, default_value_t = 1)]
    pub uefi: u8,
    /// The lab subnet's first three octets; the daemon's side of the link is .1.
    #[arg(long, default_value = "10.77.0")]
    pub subnet: String,
    /// Give up after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Memory per VM, MiB [default: 512; 1024 with --real-os].
    #[arg(long)]
    pub memory: Option<u32>,
    /// A real system to install: the root filesystem image `tests/realos/build.sh` makes (a
    /// Debian 12 with its kernel, GRUB, cloud-init, Ignition, sshd and Open vSwitch). It is
    /// attached read-only to every VM as a second disk, and each VM's own disk is then 4 GiB
    /// on SATA, where a real-OS profile (tests/installer/templates/profiles/test-debian-*)
    /// copies it and installs GRUB; the VMs then boot it, are configured by cloud-init or
    /// Ignition and phone home. The lab waits until the profile's role has registered them.
    #[arg(long, value_name = "ROOT_IMG")]
    pub real_os: Option<PathBuf>,
}

impl LabArgs {
    /// Memory per VM, MiB: a real Debian (systemd, cloud-init in Python) needs more than the
    /// test installer.
    pub fn memory(&self) -> u32 {
        self.memory
            .unwrap_or(if self.real_os.is_some() { 1024 } else { 512 })
    }
}

/// Everything the lab created, removed on drop (in reverse order).
struct Lab {
    ns: String,
    host_if: String,
    /// Only what this lab actually created is deleted: a name that clashed with another
    /// lab's must not take that lab down.
    made_ns: bool,
    made_if: bool,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} is not installed (Debian: apt-get install {})",
        match name {
            "qemu-system-x86_64" => "qemu-system-x86 ipxe-qemu",
            "dnsmasq" => "dnsmasq-base",
            "ip" => "iproute2",
            other => other,
        }
    )
}

impl Lab {
    fn create(subnet: &str, taps: usize) -> anyhow::Result<Lab> {
        let id = std::process::id();
        let mut lab = Lab {
            ns: format!("provision-lab-{id}"),
            // IFNAMSIZ is 16: "pvlab" + the PID in hex (pid_max is at most 2^22) fits.
            host_if: format!("pvlab{id:x}"),
            made_ns: false,
            made_if: false,
            children: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("provision-lab-")
                .tempdir()?,
        };
        let (ns, h) = (lab.ns.clone(), lab.host_if.clone());
        let (ns, h) = (ns.as_str(), h.as_str());
        run("ip", &["netns", "add", ns])?;
        lab.made_ns = true;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{subnet}.2/24"),
                "dev",
                "br0",
            ],
        )?;
        run("ip", &["-n", ns, "link", "set", "br0", "up"])?;
        // The daemon's side: a veth end in this (the caller's) namespace.
        run(
            "ip",
            &[
                "link", "add", h, "type", "veth", "peer", "name", "uplink", "netns", ns,
            ],
        )?;
        lab.made_if = true;
        run("ip", &["addr", "add", &format!("{subnet}.1/24"), "dev", h])?;
        run("ip", &["link", "set", h, "up"])?;
        run("ip", &["-n", ns, "link", "set", "uplink", "master", "br0"])?;
        run("ip", &["-n", ns, "link", "set", "uplink", "up"])?;
        for i in 0..taps {
            let tap = format!("tap{i}");
            run("ip", &["-n", ns, "tuntap", "add", &tap, "mode", "tap"])?;
            run("ip", &["-n", ns, "link", "set", &tap, "master", "br0"])?;
            run("ip", &["-n", ns, "link", "set", &tap, "up"])?;
        }
        Ok(lab)
    }

    fn spawn(&mut self, log: &str, program: &Path, args: &[String]) -> anyhow::Result<()> {
        let out = std::fs::File::create(self.dir.path().join(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        self.children.push(child);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stopped by their own PIDs, never by name.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes the veth pair and the taps with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// One VM of the lab.
struct Vm {
    mac: String,
    uefi: bool,
    bar: indicatif::ProgressBar,
}

/// The firmware image OVMF boots from (Debian package `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The variable store template; each UEFI VM gets its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// One lab VM, as QEMU should run it.
pub struct VmSpec<'a> {
    /// OVMF (UEFI) rather than SeaBIOS.
    pub uefi: bool,
    /// The tap device it is plugged into.
    pub tap: &'a str,
    /// Its NIC's MAC.
    pub mac: &'a str,
    /// Memory, MiB.
    pub memory: u32,
    /// A raw disk, if any: virtio, or SATA (below).
    pub disk: Option<&'a Path>,
    /// The disk on a SATA (AHCI) controller instead of virtio. SeaBIOS serves a virtio disk to
    /// a boot loader through int13 so slowly under TCG that GRUB takes minutes to read a
    /// 14 MB kernel (seen with Debian's); its AHCI driver reads it in seconds. Real servers'
    /// disks are SATA or NVMe anyway.
    pub sata: bool,
    /// A second disk, read-only and never booted: an install medium (the real-OS test
    /// installer copies the system on it to `disk`).
    pub medium: Option<&'a Path>,
    /// Its own copy of the OVMF variable store (UEFI only).
    pub vars: Option<&'a Path>,
    /// Where the serial console goes.
    pub console: &'a Path,
    /// A guest reboot restarts the VM (to see its next network boot) instead of ending QEMU.
    pub reboot: bool,
}

/// QEMU arguments for a lab VM: TCG (nested KVM is not assumed), network boot first (the NIC
/// has boot index 0, the disk 1, as a provisioned server's boot order has it: every boot asks
/// provision, whose local-boot answer then hands over to the disk — BIOS by `sanboot`, UEFI by
/// `exit` back to the boot manager, which tries the next entry; with the disk first, an
/// installed UEFI VM would boot it without asking), no display, serial console to a file. UEFI VMs get no NIC option ROM, so OVMF's own
/// VirtioNetDxe and EDK2 PXE client do the first DHCP, as on a stock server, and iPXE arrives
/// over TFTP; with the ROM, OVMF would try the ROM's iPXE boot entry first.
pub fn qemu_args(v: &VmSpec<'_>) -> Vec<String> {
    let mut a: Vec<String> = ["-accel", "tcg", "-display", "none"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["-m".into(), v.memory.to_string()]);
    if !v.reboot {
        a.push("-no-reboot".into());
    }
    if let (true, Some(vars)) = (v.uefi, v.vars) {
        a.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            format!("if=pflash,format=raw,file={}", vars.display()),
            // The lab is IPv4 only. OVMF makes PXEv6 and HTTPv6 boot entries for the NIC too,
            // and after iPXE's `exit` it would spend their DHCPv6 timeouts before the disk
            // (OvmfPkg/RUNTIME_CONFIG.md: opt/org.tianocore/IPv6Support).
            "-fw_cfg".into(),
            "name=opt/org.tianocore/IPv6Support,string=no".into(),
        ]);
    }
    if let Some(d) = v.disk {
        a.extend([
            "-drive".into(),
            format!("file={},if=none,id=d0,format=raw", d.display()),
        ]);
        if v.sata {
            a.extend([
                "-device".into(),
                "ahci,id=sata0".into(),
                "-device".into(),
                "ide-hd,drive=d0,bus=sata0.0,bootindex=1".into(),
            ]);
        } else {
            a.extend([
                "-device".into(),
                "virtio-blk-pci,drive=d0,bootindex=1".into(),
            ]);
        }
    }
    if let Some(m) = v.medium {
        a.extend([
            "-drive".into(),
            format!("file={},if=none,id=m0,format=raw,readonly=on", m.display()),
            "-device".into(),
            "virtio-blk-pci,drive=m0".into(),
        ]);
    }
    a.extend([
        "-serial".into(),
        format!("file:{}", v.console.display()),
        "-netdev".into(),
        format!("tap,id=n0,ifname={},script=no,downscript=no", v.tap),
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=n0,mac={},bootindex=0{}",
            v.mac,
            if v.uefi { ",romfile=" } else { "" }
        ),
    ]);
    a
}

/// The states a lab VM is done in: installed, or, when its profile registers machines (a
/// role), registered by it.
fn done_states(registers: bool) -> &'static [crate::policy::State] {
    use crate::policy::State::*;
    if registers {
        &[Registered, HandedOff]
    } else {
        &[Installed, Registering, Registered, HandedOff]
    }
}

/// Checks the options before anything is touched; the message is for the operator.
pub fn check_args(a: &LabArgs) -> Result<(), String> {
    let octets: Vec<&str> = a.subnet.split('.').collect();
    if octets.len() != 3 || octets.iter().any(|o| o.parse::<u8>().is_err()) {
        return Err(format!(
            "--subnet {:?} must be three octets, e.g. 10.77.0",
            a.subnet
        ));
    }
    if a.bios as usize + a.uefi as usize == 0 || a.bios as usize + a.uefi as usize > 16 {
        return Err("ask for 1 to 16 VMs with --bios N and --uefi N".into());
    }
    if let Some(m) = &a.real_os {
        if !m.is_file() {
            return Err(format!(
                "--real-os {}: no such file; build the medium with `bash tests/realos/build.sh DIR` (as root, about 6 minutes) and pass DIR/root.img",
                m.display()
            ));
        }
    }
    Ok(())
}

/// The last lines of each VM's serial console, for an error message (the lab directory is
/// removed with the lab).
fn consoles(dir: &Path, n: usize) -> String {
    (0..n)
        .map(|i| {
            let text =
                std::fs::read_to_string(dir.join(format!("vm{i}.console"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            format!("--- vm{i} console (last lines) ---\n{tail}\n")
        })
        .collect()
}

/// Runs the lab; returns when every VM is installed (registered, if its profile has a role),
/// one failed, the timeout passed, or the operator pressed Ctrl-C. Everything created on this
/// host is removed before it returns.
pub fn lab(client: &Client, a: &LabArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "provision lab needs root (it creates a network namespace, a bridge and tap devices)"
        );
    }
    let qemu = which("qemu-system-x86_64")?;
    let dnsmasq = which("dnsmasq")?;
    which("ip")?;
    if a.uefi > 0 && !Path::new(OVMF_CODE).exists() {
        bail!("UEFI VMs need {OVMF_CODE} (Debian: apt-get install ovmf)");
    }
    // The profile must exist before anything is built.
    let profile = client
        .profile(&a.profile)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let registers = profile.role.as_deref().is_some_and(|r| r != "none");
    let done = done_states(registers);
    let goal = if registers { "registered" } else { "installed" };

    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // A second Ctrl-C while cleaning up is ignored; the first one stops the wait loop.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));

    let n = a.bios as usize + a.uefi as usize;
    let mut lab = Lab::create(&a.subnet, n)?;
    let leases = lab.dir.path().join("leases");
    lab.spawn(
        "dnsmasq.log",
        &dnsmasq,
        &[
            "--no-daemon".into(),
            "--conf-file=/dev/null".into(),
            "--port=0".into(),
            "--interface=br0".into(),
            "--bind-interfaces".into(),
            format!("--dhcp-range={0}.100,{0}.200,255.255.255.0,1h", a.subnet),
            format!("--dhcp-leasefile={}", leases.display()),
        ],
    )?;

    let multi = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} [{elapsed}]")
            .expect("a valid template");
    let id = std::process::id();
    let mut vms = Vec::new();
    for i in 0..n {
        let uefi = i >= a.bios as usize;
        // 52:54 (QEMU's locally administered prefix), the whole PID (at most 2^22), the VM.
        let mac = format!(
            "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
            (id >> 16) & 0xff,
            (id >> 8) & 0xff,
            id & 0xff,
            i
        );
        let req = crate::dto::EnrollRequest {
            mac: mac.clone(),
            profile: Some(a.profile.clone()),
            // The PID too, like the MAC: two labs at once must not give two machines one
            // name (the inventory's host name, and Ansible's).
            hostname: Some(format!("lab-{id}-{i}")),
            ..Default::default()
        };
        match client.enroll(&req) {
            Ok(_) => {}
            Err(e) if e.message.contains("already enrolled") => {
                let m: crate::mac::Mac = mac.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
                client.reprovision(m).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            Err(e) => bail!("enrolling {mac}: {e}"),
        }
        let disk = lab.dir.path().join(format!("vm{i}.img"));
        // Sparse: only what the installer writes takes space.
        let size = if a.real_os.is_some() {
            4 << 30
        } else {
            1 << 30
        };
        std::fs::File::create(&disk)?.set_len(size)?;
        let vars = lab.dir.path().join(format!("vm{i}-vars.fd"));
        if uefi {
            std::fs::copy(OVMF_VARS, &vars)?;
        }
        let console = lab.dir.path().join(format!("vm{i}.console"));
        let args = qemu_args(&VmSpec {
            uefi,
            tap: &format!("tap{i}"),
            mac: &mac,
            memory: a.memory(),
            disk: Some(&disk),
            sata: a.real_os.is_some(),
            medium: a.real_os.as_deref(),
            vars: uefi.then_some(vars.as_path()),
            console: &console,
            reboot: true,
        });
        lab.spawn(&format!("vm{i}.log"), &qemu, &args)?;
        let bar = multi.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(format!("{mac} {}", if uefi { "UEFI" } else { "BIOS" }));
        bar.set_message("powered on");
        bar.enable_steady_tick(Duration::from_millis(200));
        vms.push(Vm { mac, uefi, bar });
    }

    let start = Instant::now();
    let mut failed = None;
    loop {
        let mut all_done = true;
        for vm in &vms {
            let mac: crate::mac::Mac = vm.mac.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let m = client.machine(mac).map_err(|e| anyhow::anyhow!("{e}"))?;
            let state = m.state;
            let what = client
                .events(Some(mac), 1)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .last()
                .map(|e| format!("{}: {}", e.kind, e.detail))
                .unwrap_or_default();
            if done.contains(&state) {
                if !vm.bar.is_finished() {
                    vm.bar.finish_with_message(format!("{state} ({what})"));
                }
                continue;
            }
            all_done = false;
            if state == crate::policy::State::Failed {
                failed.get_or_insert(format!(
                    "{} failed at {}: {}",
                    vm.mac,
                    m.failed_step.as_deref().unwrap_or("?"),
                    m.failed_reason.as_deref().unwrap_or("?")
                ));
            }
            vm.bar.set_message(format!("{state} — {what}"));
        }
        if all_done {
            break;
        }
        if let Some(f) = &failed {
            bail!("{f}\n{}", consoles(lab.dir.path(), vms.len()));
        }
        if interrupted.load(Ordering::SeqCst) {
            for vm in &vms {
                vm.bar.abandon_with_message("interrupted");
            }
            bail!("interrupted; the lab was removed");
        }
        if start.elapsed() > a.timeout {
            bail!(
                "not every VM {goal} within {}\n{}",
                humantime::format_duration(a.timeout),
                consoles(lab.dir.path(), vms.len())
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let kinds: Vec<&str> = vms
        .iter()
        .map(|v| if v.uefi { "UEFI" } else { "BIOS" })
        .collect();
    println!(
        "all {} VMs {goal} ({}) in {}; removing the lab",
        vms.len(),
        kinds.join(", "),
        humantime::format_duration(Duration::from_secs(start.elapsed().as_secs()))
    );
    drop(lab);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real-OS VM: its own disk on SATA at boot index 1 (SeaBIOS's AHCI driver loads GRUB's
    /// kernel and initrd in seconds, its virtio int13 in minutes), the medium a read-only
    /// virtio disk that is never booted, and the NIC still first.
    #[test]
    fn a_real_os_vm_boots_the_network_then_its_sata_disk_with_the_medium_read_only() {
        let (disk, medium, console) = (
            Path::new("/l/vm0.img"),
            Path::new("/m/root.img"),
            Path::new("/l/vm0.console"),
        );
        let args = qemu_args(&VmSpec {
            uefi: false,
            tap: "tap0",
            mac: "52:54:00:00:00:01",
            memory: 1024,
            disk: Some(disk),
            sata: true,
            medium: Some(medium),
            vars: None,
            console,
            reboot: true,
        })
        .join(" ");
        for want in [
            "-m 1024",
            "-drive file=/l/vm0.img,if=none,id=d0,format=raw",
            "-device ahci,id=sata0 -device ide-hd,drive=d0,bus=sata0.0,bootindex=1",
            "-drive file=/m/root.img,if=none,id=m0,format=raw,readonly=on -device virtio-blk-pci,drive=m0 ",
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,bootindex=0",
        ] {
            assert!(args.contains(want), "{want} not in {args}");
        }
        assert!(!args.contains("-no-reboot"), "{args}");
        assert_eq!(args.matches("bootindex").count(), 2, "{args}");
    }

    #[test]
    fn real_os_labs_get_more_memory_and_wait_for_registration_when_there_is_a_role() {
        let mut a = LabArgs {
            profile: "p".into(),
            bios: 1,
            uefi: 1,
            subnet: "10.77.0".into(),
            timeout: Duration::from_secs(60),
            memory: None,
            real_os: None,
        };
        assert_eq!(a.memory(), 512);
        a.real_os = Some("/m/root.img".into());
        assert_eq!(a.memory(), 1024);
        a.memory = Some(2048);
        assert_eq!(a.memory(), 2048);
        use crate::policy::State::*;
        assert!(done_states(false).contains(&Installed));
        assert!(!done_states(true).contains(&Installed));
        assert!(!done_states(true).contains(&Registering));
        assert!(done_states(true).contains(&Registered));
    }
}
