//! Fake installed hypervisors for the registration tests: each [`Node`] is a network namespace
//! plus a private mount and UTS namespace in which a real `ovsdb-server`, `ovs-vswitchd` and
//! `sshd` run, started the way Debian's `ovs-ctl` and `ssh.service` start them. provision's
//! daemon, in the root namespace, reaches a node over SSH on the [`Fabric`] bridge (10.79.0.0/24)
//! and runs plain `ovs-vsctl` / `ovs-pki` there exactly as on a real host: the per-node bind
//! mounts over /etc/openvswitch, /run/openvswitch, /var/lib/openvswitch and /var/log/openvswitch
//! make the default paths (db.sock, conf.db, the PKI dir, logs) that node's own.
//!
//! Needs root (namespaces, veths, mounts) and the Debian packages openssh-server,
//! openssh-client, openvswitch-switch (ovs-pki is in its openvswitch-common) and openssl.
//! Everything is stopped by PID (checked to be inside the node's own network namespace) and
//! deleted on drop, also when a test fails: other tests and the machine may run OVS and sshd
//! of their own.

use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::support::tool;

/// The fabric's subnet; nodes are .11 to .19, the root namespace is .1.
const FABRIC_ADDR: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);

/// PATH for the setup script and for [`Node::sh`]: sshd's own default for root on Debian, so
/// what a test runs through `sh` finds the same programs an SSH session does.
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static LOCK: Mutex<()> = Mutex::new(());

/// A lock that serialises tests using the shared bridge: the fabric's name and its address
/// 10.79.0.1 are per process, so two fabrics in one test binary would collide. Poison-tolerant,
/// so one failed test does not fail every later one.
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The root-namespace side of the test network: a Linux bridge named from the test process's
/// PID (so concurrent test binaries never delete each other's) holding 10.79.0.1/24, where
/// provision's daemon and the [`Manager`] live. Every [`Node`]'s eth0 is a port of it.
/// Dropping it deletes the bridge.
pub struct Fabric {
    /// The bridge's name, "pvn" + the PID in hex (at most 9 characters).
    pub bridge: String,
    /// 10.79.0.1, the root namespace's address on the fabric and the nodes' default gateway.
    pub addr: Ipv4Addr,
}

impl Fabric {
    /// Creates the bridge with 10.79.0.1/24 and brings it up, after removing what a killed
    /// earlier run of this harness left (see [`sweep_stale`]). Panics if 10.79.0.1 is still on
    /// some interface (named in the message), since routing to 10.79.0.0/24 would then be
    /// ambiguous: e.g. another test binary running these tests right now.
    pub fn new() -> Fabric {
        require_root();
        sweep_stale();
        let bridge = format!("pvn{:x}", std::process::id());
        let taken = ip_out(&["-o", "-4", "addr", "show", "to", "10.79.0.1/32"]);
        assert!(
            taken.trim().is_empty(),
            "10.79.0.1 is already assigned in the root namespace (a leftover of an earlier run? \
             delete that interface with `ip link del NAME`):\n{taken}"
        );
        ip(&["link", "add", &bridge, "type", "bridge"]);
        // From here on, a panic deletes the bridge.
        let fabric = Fabric {
            bridge,
            addr: FABRIC_ADDR,
        };
        ip(&["addr", "add", "10.79.0.1/24", "dev", &fabric.bridge]);
        ip(&["link", "set", &fabric.bridge, "up"]);
        fabric
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if link_exists(&self.bridge) {
            ip_quiet(&["link", "del", &self.bridge]);
        }
    }
}

/// One fake hypervisor: its own network namespace (eth0 on the fabric, eth1 as a spare uplink
/// NIC), its own mount namespace (per-node Open vSwitch dirs), its own hostname, and real
/// `ovsdb-server`, `ovs-vswitchd` and `sshd` processes.
pub struct Node {
    /// 1..=9; the address and names derive from it.
    pub index: u8,
    /// The network namespace, "provision-node-<pid>-<index>" (visible in `ip netns list`).
    pub ns: String,
    /// 10.79.0.(10 + index), eth0's address and where sshd listens (port 22).
    pub addr: Ipv4Addr,
    /// The node's hostname ("node<index>", in its own UTS namespace): what `hostname` prints
    /// over SSH and what `external_ids:hostname` holds, as on a real host.
    pub hostname: String,
    /// sshd's ed25519 host public key as "ssh-ed25519 AAAA..." (no comment): what a
    /// known_hosts line or provision's pinned host key holds.
    pub host_key: String,
    /// Per-node state: the host key, authorized_keys, console.log (setup trace and sshd's log)
    /// and the sources of the bind mounts (etc/, run/, lib/, log/).
    pub dir: tempfile::TempDir,
    /// The root end of eth0's veth pair, a port of the fabric bridge.
    veth: String,
    /// `sshd -D`; it also holds the namespaces and reaps the detached OVS daemons.
    sshd: Option<Child>,
    /// ovsdb-server and ovs-vswitchd, from their pidfiles.
    pids: Vec<u32>,
}

impl Node {
    /// Starts host `index` (1..=9) on `fabric` with `authorized_key` (one OpenSSH public key
    /// line) allowed to log in as root, and returns once its sshd accepts TCP connections from
    /// the root namespace. Panics with the setup log (a shell trace with the failing command's
    /// stderr) on any failure, after cleaning up what was already made.
    pub fn start(fabric: &Fabric, index: u8, authorized_key: &str) -> Node {
        require_root();
        assert!(
            (1..=9).contains(&index),
            "node index {index} is not in 1..=9"
        );
        let key = authorized_key.trim();
        assert!(
            !key.is_empty() && !key.contains('\n'),
            "authorized_key must be one OpenSSH public key line, got {authorized_key:?}"
        );
        // The tools the script runs; a missing one fails here with the install hint.
        for t in [
            "ovsdb-tool",
            "ovsdb-server",
            "ovs-vswitchd",
            "ovs-vsctl",
            "ovs-pki",
            "sshd",
            "ssh-keygen",
            "unshare",
            "nsenter",
        ] {
            tool(t);
        }
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("provision-node-{index}-"))
            .tempdir()
            .expect("creating the node's temp dir");
        // From here on, a panic runs Drop, which undoes whatever was made.
        let mut node = Node {
            index,
            ns: format!("provision-node-{pid}-{index}"),
            addr: Ipv4Addr::new(10, 79, 0, 10 + index),
            hostname: format!("node{index}"),
            host_key: String::new(),
            dir,
            veth: format!("{}v{index}", fabric.bridge),
            sshd: None,
            pids: Vec::new(),
        };
        let (ns, veth) = (node.ns.clone(), node.veth.clone());
        let cidr = format!("{}/24", node.addr);

        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &veth, "master", &fabric.bridge]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", "10.79.0.1"]);
        // The spare NIC for an uplink bridge. No dummy module on every kernel, so a veth pair
        // whose other end stays inside the namespace too (both up, so eth1 has carrier).
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "eth1-peer",
        ]);
        ip(&["-n", &ns, "link", "set", "eth1", "up"]);
        ip(&["-n", &ns, "link", "set", "eth1-peer", "up"]);

        let d = node.dir.path().to_path_buf();
        for sub in ["etc", "run", "lib", "log"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        // sshd's privilege-separation dir; Debian's ssh.service makes it (RuntimeDirectory).
        if !Path::new("/run/sshd").is_dir() {
            fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
            fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();
        }
        let hostkey = d.join("ssh_host_ed25519_key");
        run_ok(
            Command::new(tool("ssh-keygen"))
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
                .arg(&hostkey),
        );
        let public = fs::read_to_string(hostkey.with_extension("pub")).unwrap();
        node.host_key = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        fs::write(d.join("authorized_keys"), format!("{key}\n")).unwrap();

        let script = setup_script(&node, &d);
        fs::write(d.join("setup.sh"), &script).unwrap();
        let console = fs::File::create(d.join("console.log")).unwrap();
        let mut cmd = Command::new(tool("ip"));
        cmd.args(["netns", "exec", &ns])
            .arg(tool("unshare"))
            .args(["--mount", "--uts", "--propagation", "private", "/bin/sh"])
            .arg(d.join("setup.sh"))
            .env_clear()
            .env("PATH", ROOT_PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console);
        // `ip netns exec`, `unshare` and the script all exec in place, so this PID becomes
        // sshd's. As a child subreaper (kept across execve) it inherits the OVS daemons when
        // they --detach and reaps them when they stop, so no zombies are left to PID 1.
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        node.sshd = Some(cmd.spawn().expect("spawning the node's setup"));

        let target = SocketAddr::from((node.addr, 22));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(st) = node.sshd.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "node {index}: setup exited ({st}) before sshd listened on {target}:\n{}",
                    node.logs()
                );
            }
            if TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {index}: sshd did not accept connections on {target} within 90 s:\n{}",
                node.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for daemon in ["ovsdb-server", "ovs-vswitchd"] {
            let pidfile = d.join("run").join(format!("{daemon}.pid"));
            let pid = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "node {index}: no pid in {}:\n{}",
                        pidfile.display(),
                        node.logs()
                    )
                });
            node.pids.push(pid);
        }
        node
    }

    /// Runs `sh -c cmd` inside this host's network, mount and UTS namespaces (entered through
    /// sshd's PID), with root's PATH and HOME and nothing else from the test's environment,
    /// as an operator logged in on the host would. Returns the Output whatever the status.
    pub fn sh(&self, cmd: &str) -> Output {
        let pid = self
            .sshd
            .as_ref()
            .expect("node not started")
            .id()
            .to_string();
        Command::new(tool("nsenter"))
            .args(["-t", &pid, "-n", "-m", "-u", "--", "/bin/sh", "-c", cmd])
            .env_clear()
            .env("PATH", ROOT_PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("running nsenter")
    }

    /// `ovs-vsctl show` on the host: its own database. Panics with stderr on failure.
    pub fn ovs_show(&self) -> String {
        let out = self.sh("ovs-vsctl show");
        assert!(
            out.status.success(),
            "node {}: ovs-vsctl show failed: {}",
            self.index,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node's logs for a failure message: the setup trace with sshd's log (console.log),
    /// then the ends of ovsdb-server's and ovs-vswitchd's log files.
    pub fn logs(&self) -> String {
        let d = self.dir.path();
        let mut s = String::new();
        for (name, path) in [
            ("setup + sshd", d.join("console.log")),
            ("ovsdb-server", d.join("log/ovsdb-server.log")),
            ("ovs-vswitchd", d.join("log/ovs-vswitchd.log")),
        ] {
            s += &format!("--- node {} {name} ({}):\n", self.index, path.display());
            s += &tail(&path, 60);
        }
        s
    }

    /// Stops every process of this node: the OVS daemons, any SSH session, then sshd.
    fn stop(&mut self) {
        let Some(ns) = netns_id(&self.ns) else {
            // No namespace: nothing can be running in it; just reap sshd if it was spawned.
            if let Some(mut c) = self.sshd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            return;
        };
        let sshd = self.sshd.as_ref().map(|c| c.id());
        // The daemons and sessions first, while sshd still reaps them.
        let mut victims: Vec<u32> = self.pids.clone();
        victims.extend(pids_in(ns));
        victims.retain(|p| Some(*p) != sshd);
        victims.sort_unstable();
        victims.dedup();
        terminate(&victims, ns);
        if let Some(mut c) = self.sshd.take() {
            signal(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Anything still there (orphans now reparented away from sshd).
        terminate(&pids_in(ns), ns);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        if link_exists(&self.veth) {
            ip_quiet(&["link", "del", &self.veth]);
        }
        if Path::new("/run/netns").join(&self.ns).exists() {
            ip_quiet(&["netns", "del", &self.ns]);
        }
    }
}

/// The node's setup, run by /bin/sh inside its namespaces; it ends by exec'ing sshd.
fn setup_script(node: &Node, d: &Path) -> String {
    let q = |p: &Path| shq(&p.to_string_lossy());
    let sshd_opts = [
        format!("HostKey={}", d.join("ssh_host_ed25519_key").display()),
        format!("ListenAddress={}:22", node.addr),
        format!("AuthorizedKeysFile={}", d.join("authorized_keys").display()),
        "PermitRootLogin=prohibit-password".into(),
        "PubkeyAuthentication=yes".into(),
        "PasswordAuthentication=no".into(),
        "KbdInteractiveAuthentication=no".into(),
        "UsePAM=no".into(),
        "StrictModes=no".into(),
        "PidFile=none".into(),
        // Debian's sshd_config has these; scp in OpenSSH 9 needs the sftp subsystem.
        "PrintMotd=no".into(),
        "AcceptEnv=LANG LC_*".into(),
        "Subsystem=sftp internal-sftp".into(),
    ];
    let sshd_args: String = sshd_opts
        .iter()
        .map(|o| format!(" -o {}", shq(o)))
        .collect();
    format!(
        r#"set -eux
D={dir}
# Per-host Open vSwitch state: the mount namespace is private, so these bind mounts are seen
# only by this node's daemons and SSH sessions.
mkdir -p /run/openvswitch /etc/openvswitch /var/lib/openvswitch /var/log/openvswitch
mount --bind "$D/etc" /etc/openvswitch
mount --bind "$D/run" /run/openvswitch
if [ "$(readlink -f /var/run/openvswitch)" != /run/openvswitch ]; then
    mkdir -p /var/run/openvswitch
    mount --bind "$D/run" /var/run/openvswitch
fi
mount --bind "$D/lib" /var/lib/openvswitch
mount --bind "$D/log" /var/log/openvswitch
hostname {hostname}

# As Debian's ovs-ctl starts them (with the manager remote from the start, which ovs-ctl adds
# right after ovs-vswitchd), minus --monitor: the pidfile is then the daemon itself.
ovsdb-tool create /etc/openvswitch/conf.db /usr/share/openvswitch/vswitch.ovsschema
ovsdb-server /etc/openvswitch/conf.db -vconsole:emer -vsyslog:err -vfile:info \
    --remote=punix:/var/run/openvswitch/db.sock \
    --remote=db:Open_vSwitch,Open_vSwitch,manager_options \
    --private-key=db:Open_vSwitch,SSL,private_key \
    --certificate=db:Open_vSwitch,SSL,certificate \
    --bootstrap-ca-cert=db:Open_vSwitch,SSL,ca_cert \
    --no-chdir --log-file=/var/log/openvswitch/ovsdb-server.log \
    --pidfile=/var/run/openvswitch/ovsdb-server.pid --detach
ovs-vsctl --no-wait -- init -- set Open_vSwitch . \
    db-version="$(ovsdb-tool schema-version /usr/share/openvswitch/vswitch.ovsschema)"
cat /proc/sys/kernel/random/uuid > /etc/openvswitch/system-id.conf
ovs-vsctl --no-wait set Open_vSwitch . \
    ovs-version="$(ovs-vswitchd --version | awk '/Open vSwitch/{{print $NF}}')" \
    external-ids:system-id="\"$(cat /etc/openvswitch/system-id.conf)\"" \
    external-ids:rundir='"/var/run/openvswitch"' \
    system-type={system_type} system-version={system_version}
ovs-vswitchd unix:/var/run/openvswitch/db.sock -vconsole:emer -vsyslog:err -vfile:info \
    --no-chdir --log-file=/var/log/openvswitch/ovs-vswitchd.log \
    --pidfile=/var/run/openvswitch/ovs-vswitchd.pid --detach
ovs-vsctl --no-wait add Open_vSwitch . external-ids hostname={hostname}
# No `ovs-pki init`: that is openvswitch-pki's postinst, a CA host's package. A hypervisor has
# only openvswitch-switch, whose openvswitch-common brings ovs-pki but no /var/lib/.../pki.

exec /usr/sbin/sshd -D -e -f /dev/null{sshd_args}
"#,
        dir = q(d),
        hostname = shq(&node.hostname),
        system_type = shq(&format!("\"{}\"", os_release("ID"))),
        system_version = shq(&format!("\"{}\"", os_release("VERSION_ID"))),
    )
}

/// An OVSDB "manager" in the root namespace: an `ovsdb-server` with a fresh database of its
/// own, listening on pssl:<port>:10.79.0.1 with the given PEM key, certificate and CA. A node
/// whose ovsdb-server has `set-ssl` done and `set-manager ssl:10.79.0.1:<port>` connects to it
/// (and then shows `is_connected: true` under the Manager), which is how a registered host
/// reaches its controller. Needs a [`Fabric`] (for 10.79.0.1). Stopped by PID on drop.
pub struct Manager {
    /// The TCP port it listens on at 10.79.0.1.
    pub port: u16,
    /// Its conf.db, db.sock (punix remote, for `ovsdb-client`), control socket and log.
    pub dir: PathBuf,
    child: Child,
}

impl Manager {
    /// Starts the manager with its files in `dir` (created if missing; an old conf.db is
    /// replaced) on `port`, or on a free port when `port` is 0. Returns once it listens.
    pub fn start(dir: &Path, key: &Path, cert: &Path, ca: &Path, port: u16) -> Manager {
        require_root();
        fs::create_dir_all(dir).unwrap();
        let port = if port == 0 {
            TcpListener::bind((FABRIC_ADDR, 0))
                .expect("binding 10.79.0.1:0 (is there a Fabric?)")
                .local_addr()
                .unwrap()
                .port()
        } else {
            port
        };
        let db = dir.join("conf.db");
        let _ = fs::remove_file(&db);
        run_ok(
            Command::new(tool("ovsdb-tool"))
                .arg("create")
                .arg(&db)
                .arg("/usr/share/openvswitch/vswitch.ovsschema"),
        );
        let console = fs::File::create(dir.join("console.log")).unwrap();
        let arg = |flag: &str, p: &Path| format!("{flag}{}", p.display());
        // Not --detach: a child of the test, so it is stopped and reaped by its own PID.
        let child = Command::new(tool("ovsdb-server"))
            .arg(&db)
            .arg(format!("--remote=pssl:{port}:{FABRIC_ADDR}"))
            .arg(arg("--remote=punix:", &dir.join("db.sock")))
            .arg(arg("--private-key=", key))
            .arg(arg("--certificate=", cert))
            .arg(arg("--ca-cert=", ca))
            .arg(arg("--unixctl=", &dir.join("ovsdb-server.ctl")))
            .arg(arg("--log-file=", &dir.join("ovsdb-server.log")))
            .args(["--no-chdir", "-vconsole:emer", "-vfile:info"])
            // Keep every default path (rundir, logdir, dbdir) out of the system's.
            .env("OVS_RUNDIR", dir)
            .env("OVS_LOGDIR", dir)
            .env("OVS_DBDIR", dir)
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("spawning the manager's ovsdb-server");
        let mut m = Manager {
            port,
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !listening(FABRIC_ADDR, port) {
            if let Some(st) = m.child.try_wait().unwrap() {
                panic!("the manager's ovsdb-server exited ({st}):\n{}", m.log());
            }
            assert!(
                Instant::now() < deadline,
                "the manager did not listen on {FABRIC_ADDR}:{port} within 30 s:\n{}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    /// Its console output and log file, for failure messages.
    pub fn log(&self) -> String {
        let mut s = tail(&self.dir.join("console.log"), 20);
        s += &tail(&self.dir.join("ovsdb-server.log"), 60);
        s
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the namespaces ("provision-node-<pid>-<i>", with every process in them) and fabric
/// bridges ("pvn<hex pid>") whose test process is gone: a run killed by SIGKILL or a timeout
/// cannot run Drop, and its bridge would keep 10.79.0.1. Only names this harness makes, only
/// for PIDs that no longer exist; a live process's (maybe a concurrent test binary's) are left.
fn sweep_stale() {
    let dead = |pid: u32| !Path::new("/proc").join(pid.to_string()).exists();
    for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("provision-node-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if dead(pid) {
            eprintln!("removing namespace {name}, left by test process {pid}, which is gone");
            if let Some(ns) = netns_id(&name) {
                terminate(&pids_in(ns), ns);
            }
            ip_quiet(&["netns", "del", &name]);
        }
    }
    for entry in fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pvn")
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        if dead(pid) {
            eprintln!("removing bridge {name}, left by test process {pid}, which is gone");
            ip_quiet(&["link", "del", &name]);
        }
    }
}

/// A value from /etc/os-release, which is how ovs-ctl fills system-type (ID) and system-version
/// (VERSION_ID).
fn os_release(key: &str) -> String {
    fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn require_root() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the node harness needs root (network namespaces, veths, bind mounts)"
    );
}

/// Single-quotes `s` for sh.
fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `cmd`, panicking with its stderr on failure; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run_ok(Command::new(tool("ip")).args(args));
}

fn ip_out(args: &[&str]) -> String {
    run_ok(Command::new(tool("ip")).args(args))
}

/// For Drop: never panics, reports a failure on stderr.
fn ip_quiet(args: &[&str]) {
    match Command::new("ip").args(args).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "cleanup: ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("cleanup: ip {args:?}: {e}"),
    }
}

/// Whether a link of that name exists in the root namespace.
fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Identity (device, inode) of a named network namespace.
fn netns_id(ns: &str) -> Option<(u64, u64)> {
    let m = fs::metadata(Path::new("/run/netns").join(ns)).ok()?;
    Some((m.dev(), m.ino()))
}

/// Whether `pid` is alive (not a zombie) inside network namespace `ns`. A process's namespace
/// links vanish when it exits, so this also guards against a reused PID.
fn in_netns(pid: u32, ns: (u64, u64)) -> bool {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| (m.dev(), m.ino()) == ns)
        .unwrap_or(false)
}

/// Every process in network namespace `ns` (what `ip netns pids` prints).
fn pids_in(ns: (u64, u64)) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| in_netns(p, ns))
        .collect()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a PID this harness started (callers check it).
    unsafe { libc::kill(pid as i32, sig) };
}

/// SIGTERM to those of `pids` still in `ns`, then SIGKILL to any left after 10 s; then waits
/// (a little) until their parents have reaped them, so no zombie outlives the node.
fn terminate(pids: &[u32], ns: (u64, u64)) {
    let mut left: Vec<u32> = pids.iter().copied().filter(|&p| in_netns(p, ns)).collect();
    let stopped = left.clone();
    for &p in &left {
        signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() {
        left.retain(|&p| in_netns(p, ns));
        if Instant::now() > deadline {
            for &p in &left {
                eprintln!("cleanup: pid {p} ignored SIGTERM, killing it");
                signal(p, libc::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Dead but maybe not yet reaped: the daemons' parent is sshd (the subreaper), which must
    // collect them before it is stopped itself, or they end up as PID 1's zombies.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stopped
        .iter()
        .any(|p| Path::new("/proc").join(p.to_string()).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether something listens on `addr:port` (TCP) in the test's own network namespace, read
/// from /proc/net/tcp so that probing leaves no failed-handshake noise in the server's log.
fn listening(addr: Ipv4Addr, port: u16) -> bool {
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(addr.octets()));
    fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == want && f[3] == "0A"
            })
        })
        .unwrap_or(false)
}

/// The last `n` lines of a file, or a note that it is missing.
fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            let mut s = lines[lines.len().saturating_sub(n)..].join("\n");
            s.push('\n');
            s
        }
        Err(e) => format!("({}: {e})\n", path.display()),
    }
}

/// A CA (self-signed) and a key + certificate signed by it for each of `names`, as PEM files
/// `ca.pem`, `<name>-privkey.pem` and `<name>-cert.pem` in `dir`.
fn make_pki(dir: &Path, names: &[&str]) {
    let openssl = tool("openssl");
    run_ok(
        Command::new(&openssl)
            .current_dir(dir)
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args(["-keyout", "ca-privkey.pem", "-out", "ca.pem", "-days", "30"])
            .args(["-subj", "/CN=provision test CA"]),
    );
    for name in names {
        run_ok(
            Command::new(&openssl)
                .current_dir(dir)
                .args(["req", "-newkey", "rsa:2048", "-nodes"])
                .args(["-keyout", &format!("{name}-privkey.pem")])
                .args(["-out", &format!("{name}-req.pem")])
                .args(["-subj", &format!("/CN={name}")]),
        );
        run_ok(
            Command::new(&openssl)
                .current_dir(dir)
                .args(["x509", "-req", "-in", &format!("{name}-req.pem")])
                .args([
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca-privkey.pem",
                    "-CAcreateserial",
                ])
                .args(["-out", &format!("{name}-cert.pem"), "-days", "30"]),
        );
    }
}

#[test]
fn nodes_harness_smoke() {
    let started = Instant::now();
    let _guard = lock();
    let fabric = Fabric::new();
    assert_eq!(fabric.addr, FABRIC_ADDR);

    let keys = tempfile::tempdir().unwrap();
    let id = keys.path().join("id_ed25519");
    run_ok(
        Command::new(tool("ssh-keygen"))
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "provision-test",
                "-f",
            ])
            .arg(&id),
    );
    let public = fs::read_to_string(id.with_extension("pub")).unwrap();
    let n1 = Node::start(&fabric, 1, &public);
    let n2 = Node::start(&fabric, 2, &public);
    eprintln!("two nodes up in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!((n1.index, n1.addr), (1, Ipv4Addr::new(10, 79, 0, 11)));
    assert!(
        n1.host_key.starts_with("ssh-ed25519 AAAA"),
        "{}",
        n1.host_key
    );
    assert_eq!(n1.host_key.split(' ').count(), 2, "{}", n1.host_key);
    assert_ne!(n1.host_key, n2.host_key);
    assert!(n1.ns.starts_with("provision-node-"));
    assert!(n1.dir.path().join("authorized_keys").exists());

    let known_hosts = keys.path().join("known_hosts");
    let mut f = fs::File::create(&known_hosts).unwrap();
    for n in [&n1, &n2] {
        writeln!(f, "{} {}", n.addr, n.host_key).unwrap();
    }
    drop(f);
    let ssh = |node: &Node, cmd: &str| -> String {
        let out = Command::new(tool("ssh"))
            .arg("-i")
            .arg(&id)
            .args(["-F", "/dev/null", "-o", "IdentitiesOnly=yes"])
            .arg(format!("-oUserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=20"])
            .arg(format!("root@{}", node.addr))
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh root@{} {cmd:?} failed ({}): {}\n{}",
            node.addr,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            node.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // Plain commands over SSH reach the host's own ovsdb.
    let brs = ssh(
        &n1,
        "ovs-vsctl --may-exist add-br br-int -- set bridge br-int datapath_type=netdev \
         && ovs-vsctl list-br",
    );
    assert!(brs.lines().any(|l| l == "br-int"), "list-br: {brs}");
    assert!(
        !n2.ovs_show().contains("br-int"),
        "node 2 sees node 1's bridge"
    );
    assert_eq!(ssh(&n1, "hostname").trim(), n1.hostname);
    assert_eq!(ssh(&n2, "hostname").trim(), n2.hostname);
    let ids = |n: &Node| ssh(n, "ovs-vsctl get Open_vSwitch . external_ids:system-id");
    assert_ne!(ids(&n1), ids(&n2), "system-ids must be per host");
    // ovs-pki is there but, as on a hypervisor without openvswitch-pki, no CA of its own;
    // `ovs-pki req` (a key and CSR in the current dir) needs none.
    let req = ssh(
        &n2,
        "test ! -e /var/lib/openvswitch/pki && cd /etc/openvswitch && ovs-pki req sc >/dev/null \
         && ls",
    );
    assert!(
        req.contains("sc-privkey.pem") && req.contains("sc-req.pem"),
        "{req}"
    );
    let sys = ssh(&n1, "ovs-vsctl list Open_vSwitch");
    for want in [
        "hostname=node1",
        "system-id=",
        "system_type",
        "db_version",
        "ovs_version",
    ] {
        assert!(sys.contains(want), "no {want:?} in\n{sys}");
    }

    // scp (SFTP in OpenSSH 9) works, as the sftp subsystem of Debian's sshd_config is set.
    let scp = Command::new(tool("scp"))
        .arg("-i")
        .arg(&id)
        .args(["-F", "/dev/null", "-o", "IdentitiesOnly=yes"])
        .arg(format!("-oUserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg(id.with_extension("pub"))
        .arg(format!("root@{}:/etc/openvswitch/scp-test", n2.addr))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        scp.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&scp.stderr)
    );
    assert_eq!(
        n2.sh("cat /etc/openvswitch/scp-test").stdout,
        public.as_bytes()
    );

    // The spare NIC, added to a netdev bridge.
    let eth1 = n1.sh("ip link show eth1");
    assert!(
        eth1.status.success(),
        "ip link show eth1: {}",
        String::from_utf8_lossy(&eth1.stderr)
    );
    ssh(&n1, "ovs-vsctl add-port br-int eth1");
    let show = n1.ovs_show();
    assert!(show.contains("Port eth1"), "{show}");
    assert!(!show.contains("error:"), "{show}");

    // An SSL manager: the host's ovsdb-server connects out to it once set-ssl and set-manager
    // are done, as after a registration.
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path(), &["manager", "node1"]);
    let p = |name: &str| pki.path().join(name);
    let manager = Manager::start(
        &pki.path().join("manager"),
        &p("manager-privkey.pem"),
        &p("manager-cert.pem"),
        &p("ca.pem"),
        0,
    );
    let copy = n1.sh(&format!(
        "cp {} {} {} /etc/openvswitch/",
        shq(&p("node1-privkey.pem").to_string_lossy()),
        shq(&p("node1-cert.pem").to_string_lossy()),
        shq(&p("ca.pem").to_string_lossy()),
    ));
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let n2_etc = n2.sh("ls /etc/openvswitch");
    assert!(
        !String::from_utf8_lossy(&n2_etc.stdout).contains("ca.pem"),
        "node 2 sees node 1's files"
    );
    ssh(
        &n1,
        &format!(
            "ovs-vsctl set-ssl /etc/openvswitch/node1-privkey.pem \
             /etc/openvswitch/node1-cert.pem /etc/openvswitch/ca.pem \
             && ovs-vsctl set-manager ssl:{}:{}",
            fabric.addr, manager.port
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let show = n1.ovs_show();
        let connected = show
            .split_once(&format!("Manager \"ssl:{}:{}\"", fabric.addr, manager.port))
            .map(|(_, rest)| {
                rest.lines()
                    .skip(1)
                    .take_while(|l| l.starts_with("        "))
                    .any(|l| l.trim() == "is_connected: true")
            })
            .unwrap_or(false);
        if connected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 did not connect to the manager within 30 s:\n{show}\n{}\n--- manager:\n{}",
            n1.logs(),
            manager.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!n2.ovs_show().contains("Manager"));
    drop(manager);
    drop(n2);
    drop(n1);
    eprintln!(
        "nodes_harness_smoke took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
