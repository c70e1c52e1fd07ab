//! Power-cut rounds: the daemon inside a QEMU VM (the test installer's kernel, a busybox
//! initramfs carrying the binary, the data directory on an ext4 virtio disk), under the crash
//! rounds' load from the host, and the VM killed at a random point: the guest's page cache
//! and everything it had not flushed are gone, as in a power cut. After each reboot the same
//! checks as the SIGKILL rounds (`crash.rs`). SIGKILL keeps the page cache, so only this shows
//! that an acknowledged write was on the disk (`synchronous=FULL`, fsync before the answer).
//!
//! The VM is on a tap in a namespace of its own, and the load comes from an address routed to
//! it (10.99.0.1 behind 10.98.0.1), as from machines behind a relay: on-link, the guest's
//! neighbour table would show the tap's MAC at the load's address, and provision rightly
//! refuses install claims that contradict it, even with `--claims any`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crash::{check, plain_agent, seed, start_load, templates, Acked, Endpoint, Rng};
use crate::support::{tool, BIN};

const ROUNDS: usize = 20;
const TOKEN: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

/// The guest's /init: modules, a static address on QEMU's user network, the disk, the token
/// (first boot only), then provision as PID 1.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1
pending=$(cat /lib/modules/load-order)
for pass in 1 2 3 4 5 6; do
    left=""
    for m in $pending; do insmod "/lib/modules/$m" 2>/dev/null || left="$left $m"; done
    pending=$left
    [ -z "$pending" ] && break
done
ip link set lo up
ip addr add 10.98.0.2/24 dev eth0
ip link set eth0 up
ip route add 10.99.0.0/16 via 10.98.0.1
mkdir -p /data
mount -t ext4 /dev/vda /data || { echo "powercut: cannot mount /dev/vda (modules left:$pending)"; poweroff -f; }
mkdir -p /data/pv
if [ ! -s /data/pv/admin-token ]; then
    (umask 077; echo TOKEN > /data/pv/admin-token)
    sync
fi
echo "powercut: starting provision"
exec /bin/provision serve --data-dir /data/pv --http 0.0.0.0:8080 --admin 0.0.0.0:8443 \
    --admin-tls off --insecure-admin --tftp off --dhcp off --claims any \
    --templates-dir /templates --register-attempts 1 --ssh-timeout 1s
"#;

fn run(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test installer's initramfs with our /init, the provision binary and its libraries,
/// and the crash rounds' profiles.
fn initramfs(installer: &Path, work: &Path) -> PathBuf {
    let root = work.join("root");
    std::fs::create_dir_all(&root).unwrap();
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "gzip -dc {} | cpio --quiet -id",
        installer.join("initrd.img").display()
    )));
    std::fs::write(root.join("init"), INIT.replace("TOKEN", TOKEN)).unwrap();
    run(Command::new("chmod").arg("755").arg(root.join("init")));
    // Without its debug info: a quarter-gigabyte initramfs would not fit the VM's memory.
    run(Command::new("strip")
        .arg("-o")
        .arg(root.join("bin/provision"))
        .arg(BIN));
    // The binary's shared libraries, from the host (the guest userland is the host's Debian).
    let ldd = Command::new("ldd").arg(BIN).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(lib) = line
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            if lib.starts_with('/') {
                let dest = root.join(lib.trim_start_matches('/'));
                std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                std::fs::copy(lib, &dest).unwrap();
            }
        }
    }
    templates(&root.join("templates"));
    let out = work.join("initrd-powercut.img");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio --quiet -o -H newc | gzip -1 > {}",
        out.display()
    )));
    out
}

/// The VM's network: a namespace with a tap (10.98.0.1, the guest is .2) and the load's
/// address 10.99.0.1 on its loopback, the source of everything sent to the guest.
struct Net {
    ns: String,
}

impl Net {
    fn new() -> Net {
        crate::support::sweep_stale_namespaces();
        let ns = format!("pvpc{}", std::process::id());
        let ip = |args: &[&str]| run(Command::new(tool("ip")).args(args));
        ip(&["netns", "add", &ns]);
        let net = Net { ns };
        let n = net.ns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", n, "addr", "add", "10.98.0.1/24", "dev", "tap0"]);
        ip(&["-n", n, "link", "set", "tap0", "up"]);
        ip(&["-n", n, "addr", "add", "10.99.0.1/32", "dev", "lo"]);
        ip(&[
            "-n",
            n,
            "route",
            "replace",
            "10.98.0.0/24",
            "dev",
            "tap0",
            "src",
            "10.99.0.1",
        ]);
        // ARP requests name the tap's own address, not the load's: otherwise the guest learns
        // 10.99.0.1 at the tap's MAC from them, as if it were on-link.
        for conf in ["all", "tap0"] {
            run(Command::new(tool("ip"))
                .args(["netns", "exec", n, "sysctl", "-qw"])
                .arg(format!("net.ipv4.conf.{conf}.arp_announce=2")));
        }
        net
    }

    /// Moves the calling thread (and the threads it starts from now on) into the namespace.
    fn enter(&self) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{}", self.ns)).unwrap();
        // SAFETY: setns(2) on a namespace file we opened; it affects only this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

struct Vm {
    child: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(net: &Net, kernel: &Path, initrd: &Path, disk: &Path, console: &Path) -> Vm {
    let child = Command::new(tool("ip"))
        .args(["netns", "exec", &net.ns])
        .arg(tool("qemu-system-x86_64"))
        .args([
            "-accel",
            &crate::support::accel(),
            "-m",
            "512",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=writeback",
            disk.display()
        ))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-system-x86_64");
    Vm { child }
}

#[test]
fn twenty_power_cuts_under_load_lose_no_acknowledged_write() {
    let installer = crate::lab::test_installer();
    let _one_vm_test_at_a_time = crate::lab::vm_lock();
    let net = Net::new();
    // The rounds run on a thread inside the VM's namespace (and so do their load threads).
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            net.enter();
            rounds(&net, &installer);
        });
        if let Err(p) = t.join() {
            std::panic::resume_unwind(p);
        }
    });
}

fn rounds(net: &Net, installer: &Path) {
    let work = tempfile::tempdir().unwrap();
    let initrd = initramfs(installer, work.path());
    let disk = work.path().join("disk.img");
    run(Command::new("truncate").args(["-s", "256M"]).arg(&disk));
    run(Command::new(tool("mkfs.ext4"))
        .args(["-q", "-F"])
        .arg(&disk));
    let seed = seed("power-cut rounds");
    let mut rng = Rng(seed);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let next_mac = Arc::new(AtomicU32::new(0));
    let mut cuts_mid_load = 0;
    for round in 0..=ROUNDS {
        let console = work.path().join(format!("console-{round}.log"));
        let vm = boot(net, &installer.join("vmlinuz"), &initrd, &disk, &console);
        let ep = Endpoint {
            machine: "http://10.98.0.2:8080".into(),
            admin: "http://10.98.0.2:8443".into(),
            api: plain_agent(),
            token: TOKEN.into(),
        };
        // Up when its admin API answers (under TCG the boot takes seconds).
        let booted = Instant::now();
        let deadline = booted + Duration::from_secs(180);
        loop {
            let up = ep
                .api
                .get(&format!("{}/api/v1/status", ep.admin))
                .header("Authorization", &format!("Bearer {TOKEN}"))
                .call()
                .is_ok_and(|r| r.status() == 200);
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the VM's daemon did not come up in 180 s; console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "power-cut round {round}: up in {:.1} s",
            booted.elapsed().as_secs_f64()
        );
        let (code, body) = ep.machine_get("/boot.ipxe");
        assert!(
            code == 200 && body.starts_with("#!ipxe"),
            "round {round}: machine listener: {code} {body}"
        );
        check(&ep, &acked.lock().unwrap(), round, seed);
        if round == ROUNDS {
            break;
        }
        acked.lock().unwrap().touched.clear();
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(&ep, &acked, &stop, &next_mac, seed, round);
        // Cut the power at a random point of the load (the guest is slow: up to 4 s).
        let wait = match rng.below(10) {
            0 => 0,
            _ => 200 + rng.below(3800),
        };
        std::thread::sleep(Duration::from_millis(wait));
        if wait > 0 {
            cuts_mid_load += 1;
        }
        drop(vm); // SIGKILL to QEMU: the guest loses power
        stop.store(true, Ordering::Relaxed);
        for t in load {
            t.join().unwrap();
        }
    }
    acked.lock().unwrap().report(
        &format!("power-cut rounds: {ROUNDS} cuts ({cuts_mid_load} mid-load)"),
        40,
        10,
    );
}
