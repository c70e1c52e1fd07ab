//! A running daemon for one test, stopped by its own PID on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_provision");

/// A `provision serve` child process with its temp data dir.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    /// The admin listener's port (TLS, self-signed).
    pub admin_port: u16,
    /// The TFTP port, when TFTP is on.
    pub tftp_port: Option<u16>,
    pub dir: tempfile::TempDir,
    pub log: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts the daemon on 127.0.0.1:0 with a fresh data dir.
    pub fn start() -> Daemon {
        Self::start_in(tempfile::tempdir().unwrap(), &[])
    }

    /// Starts the daemon with `dir` as its data dir and extra serve flags.
    /// HTTP and TFTP listen on 127.0.0.1:0 unless `extra` says otherwise.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        Self::start_with(dir, extra, &[])
    }

    /// [`Daemon::start_in`] with environment changes after the defaults (`PROVISION_LOG=info`,
    /// `NO_COLOR=1`): a value sets the variable, `None` removes it.
    pub fn start_with(
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Daemon {
        let tftp_default: &[&str] = if extra.contains(&"--tftp") {
            &[]
        } else {
            &["--tftp", "127.0.0.1:0"]
        };
        // ProxyDHCP binds fixed ports (67, 4011): off unless a test asks for it.
        let dhcp_default: &[&str] = if extra.contains(&"--dhcp") {
            &[]
        } else {
            &["--dhcp", "off"]
        };
        // The tests play machines with HTTP requests from 127.0.0.1, where nothing the daemon
        // observes vouches for the MAC a request claims; the default (claims need evidence)
        // is tested in claims.rs, with machines in namespaces of their own.
        let claims_default: &[&str] = if extra.contains(&"--claims") {
            &[]
        } else {
            &["--claims", "any"]
        };
        let http_default: &[&str] = if extra.contains(&"--http") {
            &[]
        } else {
            &["--http", "127.0.0.1:0"]
        };
        let admin_default: &[&str] = if extra.contains(&"--admin") {
            &[]
        } else {
            &["--admin", "127.0.0.1:0"]
        };
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(http_default)
            .args(admin_default)
            .arg("--data-dir")
            .arg(dir.path())
            .args(tftp_default)
            .args(dhcp_default)
            .args(claims_default)
            .args(extra)
            .env("PROVISION_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd.spawn().expect("spawning provision serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want_tftp = !extra.windows(2).any(|w| w == ["--tftp", "off"]);
        let want_admin = !extra.windows(2).any(|w| w == ["--admin", "off"]);
        let (mut port, mut tftp_port, mut admin_port) = (None, None, None);
        while port.is_none()
            || (want_tftp && tftp_port.is_none())
            || (want_admin && admin_port.is_none())
        {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the daemon did not log its listening addresses within 30 s");
            let addr = |proto: &str| {
                line.split(&format!("listening for {proto} on "))
                    .nth(1)
                    .map(|rest| {
                        // Text or JSON: the address ends at a space or the closing quote.
                        let a: std::net::SocketAddr = rest
                            .split(|c: char| c.is_whitespace() || c == '"')
                            .next()
                            .and_then(|a| a.parse().ok())
                            .expect("address in log line");
                        a.port()
                    })
            };
            port = port.or(addr("HTTP"));
            tftp_port = tftp_port.or(addr("TFTP"));
            admin_port = admin_port.or(addr("the admin API"));
        }
        Daemon {
            child,
            port: port.unwrap(),
            admin_port: admin_port.unwrap_or(0),
            tftp_port,
            dir,
            log: rx,
        }
    }

    /// The daemon's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The admin listener's URL, what the CLI talks to.
    pub fn admin_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.admin_port)
    }

    /// The admin certificate's fingerprint, as `serve` wrote it beside the token.
    pub fn fingerprint(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin-cert.sha256"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The admin token file.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("admin-token")
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("PROVISION_URL", self.admin_url())
            .env("PROVISION_TOKEN_FILE", self.token_file())
            .env_remove("PROVISION_TOKEN")
            .env_remove("PROVISION_FINGERPRINT")
            .env_remove("PROVISION_CA_FILE")
            .output()
            .expect("running the CLI")
    }

    /// Runs the CLI and returns stdout, panicking with stderr on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "provision {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// GET a machine-facing path; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut res = agent()
            .get(&format!("{}{path}", self.url()))
            .call()
            .unwrap();
        (
            res.status().as_u16(),
            res.body_mut().read_to_string().unwrap(),
        )
    }

    /// POST a body to a machine-facing path; returns (status, body).
    pub fn post(&self, path: &str, content_type: &str, body: &str) -> (u16, String) {
        let mut res = agent()
            .post(&format!("{}{path}", self.url()))
            .header("Content-Type", content_type)
            .send(body)
            .unwrap();
        (
            res.status().as_u16(),
            res.body_mut().read_to_string().unwrap(),
        )
    }

    /// GET an admin API path over TLS (trusting the daemon's self-signed certificate, which
    /// names 127.0.0.1), with `token` as the bearer token; returns (status, body).
    pub fn admin_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = admin_agent(&self.dir.path().join("admin-tls/cert.pem"))
            .get(&format!("{}{path}", self.admin_url()));
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut res = req.call().unwrap();
        (
            res.status().as_u16(),
            res.body_mut().read_to_string().unwrap(),
        )
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the daemon did not stop within 10 s of SIGTERM");
    }

    /// The data dir (a fresh empty one takes its place), to start again on it after
    /// `terminate`.
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Kills the process (SIGKILL) and returns its data dir, as a crash would leave it.
    pub fn crash(mut self) -> tempfile::TempDir {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        loop {
            let line = self
                .log
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// An HTTPS agent that trusts only the certificates in `ca` (PEM).
pub fn admin_agent(ca: &Path) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let pem = std::fs::read(ca).unwrap();
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|i| match i.unwrap() {
            ureq::tls::PemItem::Certificate(c) => Some(c),
            _ => None,
        })
        .collect::<Vec<Certificate<'static>>>();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::new_with_certs(&certs))
                .build(),
        )
        .build()
        .into()
}

/// Removes the network namespaces of the lab tests ("pv" + letters + the PID of the test
/// process that made them, maybe more after it: `pvil1234`, `pvdl1234eth1`, `pvo1234`,
/// `pvpc1234`) whose test process is gone, with
/// every process still in them: a run killed by SIGKILL or a timeout cannot run Drop, and its
/// VMs would go on taking the CPU the next run's VMs need. Only for PIDs that no longer exist:
/// a concurrent test binary's namespaces are left alone.
pub fn sweep_stale_namespaces() {
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("pv") else {
            continue;
        };
        let after_letters = rest.trim_start_matches(|c: char| c.is_ascii_lowercase());
        let digits: String = after_letters
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if after_letters.len() == rest.len() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("removing namespace {name}, left by test process {pid}, which is gone");
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: kill(2) of a process left in a namespace only tests create.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
}

/// The QEMU accelerator for the VM tests: `LAB_ACCEL` (`make it` sets it from
/// tests/installer/accel.sh, which boots a guest with KVM to see whether it really runs), else
/// TCG, which works everywhere.
pub fn accel() -> String {
    match std::env::var("LAB_ACCEL").as_deref() {
        Ok("kvm") => "kvm".into(),
        _ => "tcg".into(),
    }
}

/// Runs a build script of the tests (`SCRIPT OUT`: the test installer, the d-i templates) and
/// returns OUT: where the environment variable `var` says (`make it` builds there, outside the
/// checkout, while the tests compile; not a `PROVISION_` name, which the daemons the tests
/// start would refuse as unknown), else `name` in the target dir. The scripts key their output
/// by their inputs and take a lock, so a reuse is always of the same inputs and two tests
/// never build at once.
pub fn cached_build(script: &str, var: &str, name: &str) -> PathBuf {
    let out = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join(name));
    let status = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "{script} {} failed", out.display());
    out
}

/// The install token in an install script's config URL.
pub fn token_of(script: &str) -> String {
    let i = script.find("/config/").expect("script has a config URL") + "/config/".len();
    script[i..i + 64].to_string()
}

/// Path of a required external tool; a missing tool fails the test (install it with
/// `make deps`), it never skips.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed; run `make deps` (it installs the Debian packages the tests need)"
    );
}

/// A new EC P-256 key at `key` (mode 0600) and a self-signed certificate for it at `cert`,
/// made by openssl, with `subject` (`/CN=…`) and, if given, a subjectAltName (`IP:127.0.0.1`).
pub fn self_signed_pair(cert: &Path, key: &Path, subject: &str, san: Option<&str>) {
    let mut c = Command::new(tool("openssl"));
    c.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ])
    .args(["-subj", subject, "-days", "30"]);
    if let Some(san) = san {
        c.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let out = c
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// Ansible (`program`: `ansible` or `ansible-playbook`, run in network namespace `netns` if
/// given) as docs/registration.md runs it: provision's dynamic inventory (an executable script
/// running `provision inventory` against `server` with `token_file`, written to `dir`), the
/// daemon's SSH key `key`, and host-key checking on against `known_hosts` (provision's export).
/// HOME is `dir`: nothing of this machine's own ~/.ansible or ~/.ssh takes part.
pub fn ansible(
    program: &str,
    netns: Option<&str>,
    dir: &Path,
    (server, token_file): (&str, &Path),
    key: &Path,
    known_hosts: &Path,
) -> Command {
    let script = dir.join("inventory.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {BIN} --server {server} --token-file {} inventory \"$@\"\n",
            token_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new(tool("ip"));
            c.args(["netns", "exec", ns]).arg(tool(program));
            c
        }
        None => Command::new(tool(program)),
    };
    c.arg("-i")
        .arg(&script)
        .arg("--private-key")
        .arg(key)
        .env("HOME", dir)
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env(
            "ANSIBLE_SSH_ARGS",
            format!(
                "-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o ControlMaster=no",
                known_hosts.display()
            ),
        )
        .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
        .env("ANSIBLE_NOCOLOR", "1");
    c
}
