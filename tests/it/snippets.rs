//! The built-in profiles' own phone-home snippets, run for real. Each is taken from the config
//! the daemon serves behind an install token and run the way its consumer runs it: d-i's
//! `preseed/late_command` (a shell line whose `in-target` runs in the installed system),
//! subiquity's `late-commands` (argv lists, the installed system mounted at `/target`), and the
//! installed system's phone-home service from Ignition (Fedora CoreOS, Flatcar) or cloud-config
//! (CoreOS): its files written where the config says, its `ExecStart=` run. They run in a
//! sandbox (a mount namespace whose root is a temp dir with the host's `/usr` read-only and its
//! own `/etc`, `/root`, `/home`, `/var`), so what they write lands there, with the host's curl,
//! getent and ssh-keygen. Each machine must become `installed` with exactly the host keys the
//! sandbox holds, and the keys it was told to trust must be where sshd reads them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{token_of, tool, Daemon};

/// A stand-in for an installed system's root.
struct Sandbox {
    dir: Option<tempfile::TempDir>,
}

impl Drop for Sandbox {
    /// The host's `/usr` and `/dev` are bound into the sandbox only inside the runs' private
    /// mount namespaces. Should one ever be visible here, deleting the directory would go
    /// through it into the host's files: keep the directory then, and say so.
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mounts.contains(dir.path().to_str().unwrap()) {
            eprintln!(
                "{} has mounts in the test's namespace: left in place",
                dir.keep().display()
            );
        }
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the phone-home snippets run in a chroot of their own: the test needs root"
        );
        let s = Sandbox {
            dir: Some(tempfile::tempdir().unwrap()),
        };
        for d in [
            "usr", "dev", "etc/ssh", "root", "home", "tmp", "var/lib", "target",
        ] {
            std::fs::create_dir_all(s.path(d)).unwrap();
        }
        std::fs::set_permissions(s.path("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        // Debian 12 is merged-/usr: the top-level binary and library directories are links.
        for l in ["bin", "sbin", "lib", "lib64"] {
            std::os::unix::fs::symlink(format!("usr/{l}"), s.path(l)).unwrap();
        }
        for f in ["passwd", "group", "nsswitch.conf", "ld.so.cache", "hosts"] {
            std::fs::copy(Path::new("/etc").join(f), s.path(&format!("etc/{f}"))).unwrap();
        }
        s
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root().join(p.trim_start_matches('/'))
    }

    /// Adds a user (the profile's admin user) with a home directory, as the installer would.
    fn add_user(&self, name: &str, uid: u32) {
        let append = |file: &str, line: String| {
            let p = self.path(file);
            let mut s = std::fs::read_to_string(&p).unwrap();
            s.push_str(&line);
            std::fs::write(p, s).unwrap();
        };
        append(
            "etc/passwd",
            format!("{name}:x:{uid}:{uid}::/home/{name}:/bin/sh\n"),
        );
        append("etc/group", format!("{name}:x:{uid}:\n"));
        let home = self.path(&format!("home/{name}"));
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
    }

    /// An ed25519 host key in `dir` (as an installed system has before its first boot's sshd);
    /// its public line.
    fn host_key(&self, dir: &str) -> String {
        let key = self.path(&format!("{dir}/ssh_host_ed25519_key"));
        std::fs::create_dir_all(key.parent().unwrap()).unwrap();
        let out = Command::new(tool("ssh-keygen"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@sandbox", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read_to_string(key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The public host keys under `dir`, sorted.
    fn host_keys(&self, dir: &str) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.path(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .map(|p| std::fs::read_to_string(p).unwrap().trim().to_string())
            .collect();
        keys.sort();
        keys
    }

    /// Runs `argv` chrooted into the sandbox, in a mount namespace of its own (unshare's
    /// default propagation is private: nothing mounted here is seen outside).
    fn run(&self, argv: &[&str]) -> Output {
        Command::new(tool("unshare"))
            .args(["--mount", "--", "/bin/sh", "-c"])
            .arg(
                "set -e; r=$1; shift; \
                 mount --bind /usr \"$r/usr\"; mount -o remount,bind,ro \"$r/usr\"; \
                 mount --rbind /dev \"$r/dev\"; \
                 exec chroot \"$r\" \"$@\"",
            )
            .arg("sh")
            .arg(self.root())
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .output()
            .unwrap()
    }

    fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} failed in the sandbox: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a file an Ignition config or a cloud-config puts on the installed system.
    fn write(&self, path: &str, contents: &[u8], mode: u32) {
        let p = self.path(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Enrolls `mac` with `profile`, boots it once (the install answer mints a token) and returns
/// the token.
fn install(d: &Daemon, mac: &str, profile: &str) -> String {
    d.cli_ok(&["enroll", mac, "--profile", profile, "--hostname", "node1"]);
    let (s, script) = d.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
    assert_eq!(s, 200, "{script}");
    token_of(&script)
}

fn config(d: &Daemon, token: &str, artifact: &str) -> String {
    let (s, body) = d.get(&format!("/config/{token}/{artifact}"));
    assert_eq!(s, 200, "{artifact}: {body}");
    body
}

/// The machine is installed and its pinned host keys are exactly `keys`.
fn assert_installed_with(d: &Daemon, mac: &str, keys: &[String]) {
    let show = d.cli_ok(&["machines", "show", mac]);
    assert!(show.contains("state       installed"), "{show}");
    let pinned: Vec<&str> = show
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("host key   "))
        .collect();
    // Pinned keys are stored without their comment.
    let mut want: Vec<String> = keys
        .iter()
        .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    want.sort();
    let mut got: Vec<String> = pinned.iter().map(|k| k.to_string()).collect();
    got.sort();
    assert_eq!(got, want, "{show}");
}

/// The daemon's own public key without its comment, which every install must authorize.
fn daemon_key(d: &Daemon) -> String {
    std::fs::read_to_string(d.dir.path().join("ssh/id_ed25519.pub"))
        .unwrap()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A config's list of keys to trust (JSON or YAML read as JSON) holds the daemon's key.
fn trusts_daemon(keys: &serde_json::Value, d: &Daemon) -> bool {
    let key = daemon_key(d);
    keys.as_array()
        .unwrap_or_else(|| panic!("not a list of keys: {keys}"))
        .iter()
        .any(|k| k.as_str().is_some_and(|k| k.starts_with(&key)))
}

/// Debian: d-i runs `preseed/late_command` with `sh -c`; its `in-target` runs the rest inside
/// the installed system, which the sandbox is.
#[test]
fn the_debian_preseed_late_command_phones_home_and_authorizes_the_key() {
    let d = Daemon::start();
    let mac = "52:54:00:5a:00:01";
    let token = install(&d, mac, "debian-12");
    let preseed = config(&d, &token, "preseed.cfg");
    let late = preseed
        .lines()
        .find_map(|l| l.strip_prefix("d-i preseed/late_command string "))
        .expect("the preseed has a late_command");
    let in_target = late
        .strip_prefix("in-target ")
        .expect("the late_command runs in the target");
    let sb = Sandbox::new();
    sb.add_user("debian", 1000);
    let key = sb.host_key("etc/ssh");
    // in-target is chroot /target "$@"; here the sandbox is the target already.
    sb.run_ok(&[
        "/bin/sh",
        "-c",
        &format!("in_target() {{ \"$@\"; }}\nin_target {in_target}"),
    ]);
    assert_installed_with(&d, mac, &[key]);
    for (dir, uid) in [("root", 0), ("home/debian", 1000)] {
        let ak = sb.path(&format!("{dir}/.ssh/authorized_keys"));
        let text = std::fs::read_to_string(&ak).unwrap();
        assert!(text.contains(&daemon_key(&d)), "{dir}: {text}");
        let meta = std::fs::metadata(&ak).unwrap();
        assert_eq!(
            (meta.mode() & 0o777, meta.uid()),
            (0o600, uid),
            "{}",
            ak.display()
        );
    }
}

/// Ubuntu: subiquity runs each of `autoinstall.late-commands` as an argv list, with the
/// installed system at `/target`.
#[test]
fn the_ubuntu_autoinstall_late_commands_phone_home() {
    let d = Daemon::start();
    let mac = "52:54:00:5a:00:02";
    let token = install(&d, mac, "ubuntu-24.04");
    let user_data: serde_json::Value =
        serde_norway::from_str(&config(&d, &token, "user-data")).unwrap();
    let commands = user_data["autoinstall"]["late-commands"]
        .as_array()
        .expect("the autoinstall has late-commands");
    assert!(!commands.is_empty());
    let sb = Sandbox::new();
    let key = sb.host_key("target/etc/ssh");
    for c in commands {
        let argv: Vec<&str> = c
            .as_array()
            .unwrap_or_else(|| panic!("a late-command that is not an argv list: {c}"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        sb.run_ok(&argv);
    }
    assert_installed_with(&d, mac, &[key]);
    // The keys to trust go to the installed system's cloud-init, for root and the admin user.
    let users = user_data["autoinstall"]["user-data"]["users"]
        .as_array()
        .unwrap();
    for u in users {
        assert!(trusts_daemon(&u["ssh_authorized_keys"], &d), "{u}");
    }
}

/// The installed system's phone-home service, as Ignition or cloud-config left it: `files`
/// are (path, contents, mode), `unit` the service's text. Runs its `ExecStart=`, checks the
/// machine is installed with the keys `ssh-keygen -A` made, and that a second start is a no-op.
fn run_phone_home_service(d: &Daemon, mac: &str, files: &[(String, Vec<u8>, u32)], unit: &str) {
    let sb = Sandbox::new();
    for (path, contents, mode) in files {
        sb.write(path, contents, *mode);
    }
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("the phone-home unit has no ExecStart:\n{unit}"));
    assert!(
        unit.contains("ConditionPathExists=!/var/lib/provision/phoned-home"),
        "{unit}"
    );
    let argv: Vec<&str> = exec.split_whitespace().collect();
    sb.run_ok(&argv);
    let keys = sb.host_keys("etc/ssh");
    assert!(
        keys.len() >= 2,
        "ssh-keygen -A made the system's host keys: {keys:?}"
    );
    assert_installed_with(d, mac, &keys);
    assert!(sb.path("var/lib/provision/phoned-home").exists());
    // The mark makes a second start (a later boot, or Restart=) post nothing: the token is
    // burnt, so a post would fail the unit.
    sb.run_ok(&argv);
}

/// Fedora CoreOS and Flatcar: the installed system's Ignition config carries the script as a
/// data URL and the unit that runs it.
#[test]
fn the_ignition_phone_home_service_phones_home_once() {
    let d = Daemon::start();
    for (mac, profile, artifact) in [
        ("52:54:00:5a:00:03", "fedora-coreos", "config.ign"),
        ("52:54:00:5a:00:04", "flatcar", "installed.ign"),
    ] {
        let token = install(&d, mac, profile);
        let ign: serde_json::Value = serde_json::from_str(&config(&d, &token, artifact)).unwrap();
        let files: Vec<(String, Vec<u8>, u32)> = ign["storage"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let source = f["contents"]["source"].as_str().unwrap();
                let data = source
                    .strip_prefix("data:,")
                    .unwrap_or_else(|| panic!("not a plain data URL: {source}"));
                let bytes = percent_encoding::percent_decode_str(data).collect::<Vec<u8>>();
                (
                    f["path"].as_str().unwrap().to_string(),
                    bytes,
                    f["mode"].as_u64().unwrap() as u32,
                )
            })
            .collect();
        let unit = ign["systemd"]["units"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "provision-phone-home.service")
            .unwrap_or_else(|| panic!("{profile}: no phone-home unit in {ign}"));
        assert_eq!(unit["enabled"], true);
        run_phone_home_service(&d, mac, &files, unit["contents"].as_str().unwrap());
        let user = &ign["passwd"]["users"][0];
        assert!(
            trusts_daemon(&user["sshAuthorizedKeys"], &d),
            "{profile}: {user}"
        );
    }
}

/// CoreOS Container Linux: the installed system's cloud-config writes the script and starts
/// the unit.
#[test]
fn the_cloud_config_phone_home_service_phones_home_once() {
    let d = Daemon::start();
    let mac = "52:54:00:5a:00:05";
    let token = install(&d, mac, "coreos-cloud-config");
    let cc: serde_json::Value =
        serde_norway::from_str(&config(&d, &token, "cloud-config")).unwrap();
    let files: Vec<(String, Vec<u8>, u32)> = cc["write_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["content"].as_str().unwrap().as_bytes().to_vec(),
                u32::from_str_radix(f["permissions"].as_str().unwrap(), 8).unwrap(),
            )
        })
        .collect();
    let unit = cc["coreos"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "provision-phone-home.service")
        .unwrap_or_else(|| panic!("no phone-home unit in {cc}"));
    assert_eq!(unit["command"], "start");
    run_phone_home_service(&d, mac, &files, unit["content"].as_str().unwrap());
    assert!(trusts_daemon(&cc["ssh_authorized_keys"], &d), "{cc}");
}
