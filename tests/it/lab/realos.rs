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
    let known = format!("UserKnownHostsFile={}", known_hosts.display());
    ssh_with(
        lab,
        &[&known, "StrictHostKeyChecking=yes"],
        user,
        host,
        command,
    )
}

/// [`ssh`] with `options` (`-o` each) for the host key.
fn ssh_with(
    lab: &Lab,
    options: &[&str],
    user: &str,
    host: &str,
    command: &str,
) -> std::process::Output {
    let mut c = Command::new(tool("ip"));
    c.args(["netns", "exec", &lab.lab])
        .arg(tool("ssh"))
        .arg("-i")
        .arg(lab.path("data/ssh/id_ed25519"));
    for o in options
        .iter()
        .chain(&["BatchMode=yes", "ConnectTimeout=20"])
    {
        c.args(["-o", o]);
    }
    c.arg(format!("{user}@{host}"))
        .arg(command)
        .output()
        .unwrap()
}

/// stdout and stderr of `out`, one after the other.
fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a real system that did not get as far as it should says of itself, for a failure
/// message: over SSH at the address the lab's DHCP server last leased to `mac`, as `user` (who
/// the config gave the daemon's key; the host key is not pinned yet, so it is not checked: this
/// is only read, never trusted), cloud-init's own status and the ends of its logs, the units
/// that failed, and the phone-home unit's journal.
fn diagnose(lab: &Lab, mac: &str, user: &str) -> String {
    let leases = lab.log("leases");
    // dnsmasq's lease file: `EXPIRY MAC IP NAME CLIENT-ID`, a line per client id (the
    // installer's DHCP client and the installed system's are two); the newest expires last.
    let Some(ip) = leases
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 2 && f[1] == mac)
        .max_by_key(|f| f[0].parse::<u64>().unwrap_or(0))
        .map(|f| f[2].to_string())
    else {
        return format!("(no DHCP lease for {mac}: {leases})");
    };
    let out = ssh_with(
        lab,
        &["UserKnownHostsFile=/dev/null", "StrictHostKeyChecking=no"],
        user,
        &ip,
        "sudo -n sh -c 'cloud-init status --long; tail -n 30 /var/log/cloud-init-output.log; \
         grep -e WARNING -e ERROR -e Traceback /var/log/cloud-init.log | tail -n 20; \
         systemctl --failed --no-legend; journalctl -b -u provision-phone-home --no-pager | tail -n 20'",
    );
    format!("--- {mac} at {ip}, over SSH ---\n{}", said(&out))
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
/// real host keys (cloud-init's phone_home module; the unit Ignition wrote) → `installed` → the
/// registrar SSHes in with the pinned key (as root; as `core` through sudo) and runs the
/// hypervisor role on the system's own Open vSwitch → `registered`. Then over SSH, host keys
/// checked against the pinned ones, what the configs asked for (the hostname, the admin user
/// and its keys, the profile's runcmd and `cloud-init status` done; Ignition's files, user and
/// enabled unit) and what registration did (`br-int` on the kernel datapath, SSL with the node
/// certificate, which chains to provision's CA); last, `ansible -m ping` and a play through
/// provision's inventory, host-key checking on.
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

    // The end of each console (the whole of both is more than a failure message can show).
    let consoles = || -> String {
        machines
            .iter()
            .map(|m| {
                let console = lab.log(&format!("{}.serial", m.0));
                format!(
                    "--- {} console, its end ---\n{}\n",
                    m.0,
                    last_lines(&console, 60)
                )
            })
            .collect()
    };
    let diagnoses = || -> String {
        machines
            .iter()
            .map(|m| {
                diagnose(
                    &lab,
                    m.2,
                    if m.5 == Consumer::CloudInit {
                        "root"
                    } else {
                        "core"
                    },
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Until both are registered: installed, phoned home, and the registrar's run on them done.
    // A failed registration fails at once; so does a cloud-init that finished its first boot
    // (it says so on the console) without the phone-home reaching provision.
    let deadline = Instant::now() + Duration::from_secs(1500);
    let mut finished_at: Option<Instant> = None;
    let timelines = loop {
        let t: Vec<String> = machines.iter().map(|m| lab.cli(&["events", m.2])).collect();
        let states: Vec<String> = machines
            .iter()
            .map(|m| {
                let show = lab.cli(&["machines", "show", m.2]);
                shown(&show, "state").unwrap_or_default().to_string()
            })
            .collect();
        if states.iter().all(|s| s == "registered") {
            break t;
        }
        if let Some(i) = states.iter().position(|s| s == "failed") {
            panic!(
                "{} failed:\n{}\n{}",
                machines[i].2,
                lab.cli(&["machines", "show", machines[i].2]),
                diagnoses()
            );
        }
        let cloud_init = lab.log("tap0.serial");
        if cloud_init.contains("Cloud-init v.")
            && cloud_init.contains(" finished at ")
            && !t[0].contains("phoned_home")
        {
            let since = *finished_at.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(120) {
                panic!(
                    "cloud-init finished its first boot, but its phone-home did not reach provision:\n{}\n{}\n{}",
                    t[0],
                    consoles(),
                    diagnoses()
                );
            }
        }
        if Instant::now() > deadline {
            panic!(
                "the real systems were not registered in time (states {states:?}):\n{}\n{}\n{}",
                t.join("\n"),
                consoles(),
                diagnoses()
            );
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    eprintln!(
        "real-OS loop: both VMs installed, booted their disks, phoned home and were registered in {:?}",
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
        assert_eq!(count("registration_started"), 1, "{mac}:\n{events}");
        assert_eq!(count("registered"), 1, "{mac}:\n{events}");
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
        assert_eq!(shown(&show, "state"), Some("registered"), "{show}");
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

        // Registered on the system's own Open vSwitch, by the registrar logged in as the
        // profile says (root; `core` through sudo), every step of the hypervisor role done.
        let json: serde_json::Value =
            serde_json::from_str(&lab.cli(&["machines", "show", mac, "--json"])).unwrap();
        let steps: Vec<(&str, &str)> = json["register_steps"]
            .as_array()
            .unwrap_or_else(|| panic!("{json}"))
            .iter()
            .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            steps,
            crate::register::HYPERVISOR_STEPS.map(|n| (n, "ok")),
            "{mac}: {json}"
        );
        // What an operator on the node sees: the integration bridge on the kernel datapath.
        // One SSH session for all of it (each login costs seconds on a TCG guest), each
        // command's output after a `=== NAME` line.
        let commands = [
            ("show", "ovs-vsctl show"),
            ("datapath_type", "ovs-vsctl get bridge br-int datapath_type"),
            ("dpctl", "ovs-dpctl show"),
            ("bridge_id", "ovs-vsctl br-get-external-id br-int bridge-id"),
            ("ssl", "ovs-vsctl get-ssl"),
            ("cert", "cat /etc/openvswitch/provision-cert.pem"),
            ("key", "head -n 1 /etc/openvswitch/provision-privkey.pem"),
        ];
        let script: String = commands
            .iter()
            .map(|(name, c)| format!("echo '=== {name}'; {c}; "))
            .collect();
        let out = ssh(
            &lab,
            &known_hosts,
            user,
            &address,
            &format!("sudo -n sh -ec \"{script}\""),
        );
        assert!(out.status.success(), "{mac}: {script}: {}", said(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let section = |name: &str| -> String {
            text.split(&format!("=== {name}\n"))
                .nth(1)
                .and_then(|rest| rest.split("\n=== ").next())
                .unwrap_or_else(|| panic!("{mac}: no {name} in:\n{text}"))
                .to_string()
        };
        assert!(section("show").contains("Bridge br-int"), "{mac}:\n{text}");
        assert_eq!(section("datapath_type").trim(), "system", "{mac}");
        let dp = section("dpctl");
        assert!(
            dp.contains("system@ovs-system") && dp.contains("br-int"),
            "{mac}: the kernel datapath:\n{dp}"
        );
        assert_eq!(section("bridge_id").trim(), "br-int", "{mac}");
        assert!(
            section("ssl").contains("Certificate: /etc/openvswitch/provision-cert.pem"),
            "{mac}:\n{text}"
        );
        // The node's private key is there (and only there: provision got a request).
        assert!(section("key").contains("PRIVATE KEY"), "{mac}:\n{text}");
        // The node's certificate chains to provision's CA, and is the one the inventory names.
        let cert = lab.path(&format!("{host}-cert.pem"));
        std::fs::write(&cert, section("cert")).unwrap();
        let verify = Command::new(tool("openssl"))
            .args(["verify", "-CAfile"])
            .arg(lab.path("data/pki/ca-cert.pem"))
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            said(&verify).trim_end().ends_with(": OK"),
            "{mac}: {}",
            said(&verify)
        );
        let fp = Command::new(tool("openssl"))
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        let fp_inventory = json["cert_fingerprint"]
            .as_str()
            .unwrap_or_else(|| panic!("{json}"));
        assert!(
            said(&fp).contains(fp_inventory),
            "{mac}: {} vs {fp_inventory}",
            said(&fp)
        );
    }

    // Handed to Ansible: provision's inventory (both in role_hypervisor, each with the login
    // its registration used), host-key checking on against the keys provision pinned.
    let ansible_dir = lab.path("ansible");
    std::fs::create_dir_all(&ansible_dir).unwrap();
    let server = format!("https://{}", lab.ip4(1, ":8443"));
    let token_file = lab.path("data/admin-token");
    let ansible = |program: &str, args: &[&str]| {
        let out = crate::support::ansible(
            program,
            Some(&lab.lab),
            &ansible_dir,
            (&server, &token_file),
            &lab.path("data/ssh/id_ed25519"),
            &known_hosts,
        )
        .args(args)
        .output()
        .expect("ansible runs");
        let text = said(&out);
        assert!(out.status.success(), "{program} {args:?}:\n{text}");
        text
    };
    let ping = ansible("ansible", &["role_hypervisor", "-m", "ping"]);
    for (.., host, _, _, _) in &machines {
        assert!(ping.contains(&format!("{host} | SUCCESS")), "{ping}");
    }
    // One real play: as root (become, through sudo where the login is not root), it reads the
    // integration bridge's datapath and leaves a file saying who ran it and what it found.
    let playbook = ansible_dir.join("site.yml");
    std::fs::write(
        &playbook,
        r#"- hosts: role_hypervisor
  gather_facts: false
  become: true
  tasks:
    - name: the integration bridge's datapath
      command: ovs-vsctl get bridge br-int datapath_type
      register: datapath
      changed_when: false
    - name: a note of the play's visit
      copy:
        dest: /var/lib/provision-ansible
        content: "{{ inventory_hostname }} {{ ansible_user }} {{ datapath.stdout }}\n"
"#,
    )
    .unwrap();
    let play = ansible("ansible-playbook", &[playbook.to_str().unwrap()]);
    for (.., mac, host, _, consumer, user) in &machines {
        let login = if *consumer == Consumer::CloudInit {
            "root"
        } else {
            "core"
        };
        assert!(
            play.lines().any(|l| l.starts_with(host)
                && l.contains("ok=2")
                && l.contains("changed=1")
                && l.contains("failed=0")),
            "{mac}: the play's recap:\n{play}"
        );
        let address = shown(&lab.cli(&["machines", "show", mac]), "last_ip")
            .unwrap()
            .to_string();
        let out = ssh(
            &lab,
            &known_hosts,
            user,
            &address,
            "cat /var/lib/provision-ansible",
        );
        assert_eq!(said(&out).trim(), format!("{host} {login} system"), "{mac}");
    }
}
