//! The loop with a real installed system: the test installer copies a real Debian 12 (the
//! medium tests/realos/build.sh makes with debootstrap) to the VM's disk and installs GRUB;
//! provision's config reaches its real consumer — Debian's own cloud-init, which at the first
//! boot fetches user-data, meta-data and vendor-data from provision by the install token and
//! runs them, or real Ignition, which the installer runs on the new root as CoreOS's initramfs
//! does; after the reboot provision answers the VM's network boot with a local boot, the
//! firmware boots the disk, and the system phones home with its real SSH host keys.
//! Everything is checked from outside: provision's events, and the running system over SSH with
//! the daemon's key and the host keys provision pinned.

use super::*;

/// Builds (or reuses) the real-OS medium: tests/realos/build.sh, in `REALOS_DIR` (`make it`
/// builds it there) or the target dir. Returns the filesystem image.
pub(crate) fn realos_medium() -> PathBuf {
    crate::support::cached_build("tests/realos/build.sh", "REALOS_DIR", "realos").join("root.img")
}

/// Runs `command` on `host` (an address in the lab) as `user` over SSH with the daemon's key,
/// the host checked against `known_hosts` only; returns its output.
fn ssh(
    lab: &Lab,
    known_hosts: &Path,
    user: &str,
    host: &str,
    command: &str,
) -> std::process::Output {
    Command::new(tool("ip"))
        .args(["netns", "exec", &lab.lab])
        .arg(tool("ssh"))
        .arg("-i")
        .arg(lab.path("data/ssh/id_ed25519"))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=20",
            &format!("{user}@{host}"),
            command,
        ])
        .output()
        .unwrap()
}

/// The value of `key` on its line of `machines show` (`key   value`).
fn shown<'a>(show: &'a str, key: &str) -> Option<&'a str> {
    show.lines()
        .find_map(|l| l.strip_prefix(key).filter(|r| r.starts_with(' ')))
        .map(str::trim)
}

/// How a real system is configured, and what is checked on it.
#[derive(Clone, Copy, PartialEq)]
enum Consumer {
    /// Debian's cloud-init, NoCloud seeded from provision.
    CloudInit,
    /// Real Ignition, run by the installer on the new root.
    Ignition,
}

/// In parallel, a BIOS VM configured by cloud-init and a UEFI VM configured by Ignition: PXE →
/// the test installer writes a real Debian and GRUB (for both firmware kinds), hands the config
/// to its real consumer, and reboots → PXE → local boot → GRUB → Debian → phone-home with the
/// real host keys (cloud-init's phone_home module; the unit Ignition wrote) → `installed`. Then
/// over SSH, host keys checked against the pinned ones, what the configs asked for: the
/// hostname, the admin user and its keys, the profile's runcmd and `cloud-init status` done;
/// Ignition's files, user and enabled unit.
#[test]
fn real_debian_boots_from_disk_configured_by_cloud_init_and_by_ignition() {
    let installer = test_installer();
    let medium = realos_medium();
    let _one_lab_at_a_time = vm_lock();
    let mut lab = installer_lab("r", &installer);
    let ns = lab.lab.clone();
    let started = Instant::now();

    // (tap, firmware, MAC, hostname, profile, consumer, admin user)
    let machines = [
        (
            "tap0",
            Firmware::Bios,
            "52:54:00:77:03:01",
            "deb-cloud-init",
            "test-debian-nocloud",
            Consumer::CloudInit,
            "debian",
        ),
        (
            "tap1",
            Firmware::Uefi,
            "52:54:00:77:03:02",
            "deb-ignition",
            "test-debian-ignition",
            Consumer::Ignition,
            "core",
        ),
    ];
    let qemu = tool("qemu-system-x86_64");
    for (tap, fw, mac, host, profile, ..) in machines {
        lab.cli(&["enroll", mac, "--profile", profile, "--hostname", host]);
        let disk = lab.path(&format!("{tap}.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        let args = vm_with(&lab, fw, tap, mac, Some(&disk), Some(&medium), 1024, true);
        lab.spawn(&ns, &format!("{tap}.log"), &qemu, &refs(&args));
    }

    let consoles = || -> String {
        machines
            .iter()
            .map(|m| {
                format!(
                    "--- {} console ---\n{}\n",
                    m.0,
                    lab.log(&format!("{}.serial", m.0))
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    let timelines = loop {
        let t: Vec<String> = machines.iter().map(|m| lab.cli(&["events", m.2])).collect();
        if t.iter().all(|e| e.contains("phoned_home")) {
            break t;
        }
        if Instant::now() > deadline {
            panic!(
                "the real systems did not phone home in time:\n{}\n{}",
                t.join("\n"),
                consoles()
            );
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    eprintln!(
        "real-OS loop: both VMs installed, booted their disks and phoned home in {:?}",
        started.elapsed()
    );

    let known_hosts = lab.path("known_hosts");
    std::fs::write(&known_hosts, lab.cli(&["inventory", "--known-hosts"])).unwrap();
    let daemon_key = std::fs::read_to_string(lab.path("data/ssh/id_ed25519.pub")).unwrap();
    let daemon_key = daemon_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    for ((tap, _, mac, host, _, consumer, user), events) in machines.iter().zip(&timelines) {
        let console = lab.log(&format!("{tap}.serial"));
        let k = kinds(events);
        let count = |kind: &str| k.iter().filter(|x| *x == kind).count();
        assert_eq!(count("install_started"), 1, "{mac}:\n{events}");
        assert_eq!(count("phoned_home"), 1, "{mac}:\n{events}");
        // The disk was written and handed over, then booted locally before the phone-home:
        // the phone-home came from the installed system, not from the installer.
        let done = k.iter().position(|x| x == "installer_done");
        let phoned = k.iter().position(|x| x == "phoned_home").unwrap();
        assert!(
            done.is_some_and(|d| d < phoned),
            "{mac}: no installer_done before the phone-home:\n{events}"
        );
        assert!(
            events
                .split_once("installer_done")
                .is_some_and(|(_, rest)| rest.contains("local boot (installer-done")),
            "{mac}: not answered with a local boot after the installer finished:\n{events}"
        );
        assert!(
            console.contains("provision-test-installer: Debian installed on /dev/sda")
                && console.contains("Debian GNU/Linux 12"),
            "{mac}: console:\n{console}"
        );
        let show = lab.cli(&["machines", "show", mac]);
        assert_eq!(shown(&show, "state"), Some("installed"), "{show}");
        // Where the phone-home came from: where provision (and Ansible) SSH to.
        let address = shown(&show, "last_ip")
            .filter(|a| *a != "-")
            .unwrap_or_else(|| panic!("{mac}: no address from the phone-home:\n{show}"))
            .to_string();

        // On the running system, host keys checked against those provision pinned.
        let checks = match consumer {
            Consumer::CloudInit => {
                "hostname; cloud-init status --long; cat /var/lib/provision-test/runcmd; \
                 id debian; cat /home/debian/.ssh/authorized_keys; \
                 cat /etc/ssh/ssh_host_ed25519_key.pub"
            }
            Consumer::Ignition => {
                "hostname; id core; cat /home/core/.ssh/authorized_keys \
                 /home/core/.ssh/authorized_keys.d/* 2>/dev/null; \
                 ls /etc/systemd/system/multi-user.target.wants/provision-phone-home.service; \
                 ls /var/lib/provision/phoned-home; ls /etc/cloud/cloud-init.disabled; \
                 cat /etc/ssh/ssh_host_ed25519_key.pub"
            }
        };
        let out = ssh(&lab, &known_hosts, user, &address, checks);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{mac}: ssh {user}@{address}: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.lines().next(), Some(*host), "{mac}: hostname:\n{text}");
        assert!(
            text.contains(&format!("({user})")),
            "{mac}: no user {user}:\n{text}"
        );
        assert!(
            text.contains(&daemon_key),
            "{mac}: {user} lacks the daemon's key:\n{text}"
        );
        match consumer {
            Consumer::CloudInit => {
                assert!(
                    text.contains("\nstatus: done\n"),
                    "{mac}: cloud-init on the real system (`cloud-init status --long`):\n{text}"
                );
                assert!(
                    text.contains("configured-by-cloud-init"),
                    "{mac}: the profile's runcmd did not run:\n{text}"
                );
            }
            Consumer::Ignition => {
                assert!(
                    text.contains("multi-user.target.wants/provision-phone-home.service")
                        && text.contains("/var/lib/provision/phoned-home")
                        && text.contains("/etc/cloud/cloud-init.disabled"),
                    "{mac}: what Ignition wrote:\n{text}"
                );
                assert!(
                    console.contains("provision-test-installer: Ignition: files stage done"),
                    "{console}"
                );
            }
        }
        // The key the system has is the key provision pinned from its phone-home (the host
        // key file is printed last; the authorized keys before it are the daemon's).
        let real = text
            .lines()
            .rfind(|l| l.starts_with("ssh-ed25519 "))
            .unwrap_or_else(|| panic!("{text}"));
        let real: Vec<&str> = real.split_whitespace().take(2).collect();
        assert!(
            show.contains(&real.join(" ")),
            "{mac}: pinned keys are not the system's:\n{show}"
        );
    }
}
