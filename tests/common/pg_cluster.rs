//! A PostgreSQL cluster for tests: Debian's server binaries run unprivileged on a temporary
//! directory with their own port and socket directory (no systemd, no system cluster).
//! Shared by the store's unit tests and the integration tests (`#[path]`-included by both).
//!
//! A cluster's postmaster gets SIGQUIT when the thread that started it ends
//! (`PR_SET_PDEATHSIG`): that thread reads the server's log for as long as the server runs,
//! so a test process that dies leaves no server behind. A cluster's directory is removed when
//! it is dropped, and by the next run when its process is gone.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

/// Where clusters' directories go: `pvpg-<pid>-<n>` each.
const PREFIX: &str = "pvpg-";

/// A running cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
    /// Extra server settings it runs with (`-c name=value`), kept for restarts.
    settings: Vec<String>,
}

/// The directory of the newest installed PostgreSQL server's binaries.
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server is installed (make deps installs the postgresql package)")
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql/*/bin")
        .1
}

/// The uid and gid the server runs as: `postgres` when we are root (initdb refuses root),
/// else ourselves.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .expect("id runs");
    let uid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a postgres user (the postgresql package makes it)");
    let out = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .expect("id runs");
    let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    Some((uid, gid))
}

fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Gives `path` to the user the server runs as (a TLS key the server reads must be its own,
/// mode 0600).
pub fn chown(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

/// A free TCP port on loopback (bound, then let go: the server binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the directories of clusters whose test process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A new cluster directory (0700, the server's), with its socket directory.
fn new_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir.join("sock")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    chown(&dir);
    chown(&dir.join("sock"));
    dir
}

impl Cluster {
    /// initdb and start a new cluster with `settings` (`name=value`, as `-c` takes them).
    pub fn start(settings: &[&str]) -> Cluster {
        sweep_stale();
        let dir = new_dir();
        let bin = bin_dir();
        let out = as_server_user(Command::new(bin.join("initdb")).args([
            "-D",
            dir.join("data").to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]))
        .output()
        .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster {
            dir,
            port: free_port(),
            bin,
            child: Mutex::new(None),
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        c.run();
        c
    }

    /// A new cluster that streams from `primary` as its standby (`pg_basebackup -R`: the
    /// standby signal and primary_conninfo written for it), started.
    pub fn standby_of(primary: &Cluster, name: &str, settings: &[&str]) -> Cluster {
        let dir = new_dir();
        let out = as_server_user(Command::new(primary.bin.join("pg_basebackup")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            dir.join("data").to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-d",
            &format!("application_name={name}"),
        ]))
        .output()
        .expect("pg_basebackup runs");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster {
            dir,
            port: free_port(),
            bin: primary.bin.clone(),
            child: Mutex::new(None),
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        c.run();
        c
    }

    /// Starts the server and waits for it to say it is ready (its own log line, not a poll).
    /// The postmaster is started from a thread of its own that waits for it: the parent-death
    /// signal follows that thread, which lives as long as the server.
    fn run(&self) {
        let mut args: Vec<String> = vec![
            "-D".into(),
            self.dir.join("data").to_str().unwrap().into(),
            "-p".into(),
            self.port.to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!(
                "unix_socket_directories={}",
                self.dir.join("sock").display()
            ),
            "-c".into(),
            "max_connections=200".into(),
        ];
        for s in &self.settings {
            args.push("-c".into());
            args.push(s.clone());
        }
        let bin = self.bin.join("postgres");
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        std::thread::spawn(move || {
            let mut cmd = Command::new(bin);
            // A process group of its own: a crash kills the postmaster and its backends at once.
            as_server_user(&mut cmd)
                .process_group(0)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("postgres starts");
            let stderr = child.stderr.take().unwrap();
            let _ = tx.send(child);
            // Read the log to its end: the first ready line is reported, the rest drained so
            // the server never blocks on a full pipe.
            let mut ready = false;
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !ready {
                    log.push(line.clone());
                    if line.contains("ready to accept") {
                        ready = true;
                        let _ = ready_tx.send(Ok(()));
                    }
                }
            }
            if !ready {
                let _ = ready_tx.send(Err(log.join("\n")));
            }
        });
        let child = rx.recv().expect("the server's thread reports its process");
        *self.child.lock().unwrap() = Some(child);
        // The thread sees the ready line, or the server exit first.
        ready_rx
            .recv()
            .expect("the server's thread reports")
            .unwrap_or_else(|log| panic!("postgres did not start:\n{log}"));
    }

    /// Stops the server at once: SIGKILL to the postmaster and every backend (a crash; a
    /// postmaster killed alone leaves its backends finishing their sessions), and waits.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            // SAFETY: signalling the server's own process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
            // The backends are gone with the group; the port is free once the kernel has
            // closed their sockets.
            for _ in 0..500 {
                if TcpListener::bind(("127.0.0.1", self.port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Stops the server the way an operator's fast shutdown does (SIGINT), and waits.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    /// Starts a stopped or killed server again on the same port.
    pub fn restart(&self) {
        self.run();
    }

    /// `pg_ctl promote`: a standby becomes a primary.
    pub fn promote(&self) {
        let out = as_server_user(Command::new(self.bin.join("pg_ctl")).args([
            "promote",
            "-w",
            "-D",
            self.dir.join("data").to_str().unwrap(),
        ]))
        .output()
        .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL for database `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection string for database `db` over the Unix socket (reachable from another
    /// network namespace).
    pub fn socket_url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.join("sock").display(),
            self.port
        )
    }

    /// Runs `sql` with psql on database `db`; returns its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new, empty database; returns its name.
    pub fn create_db(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}", N.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Drops database `name`, closing its connections first.
    pub fn drop_db(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster every test of this process shares (each test makes its own database in it).
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    // Never dropped: its directory goes with the next run's sweep.
    SHARED.get_or_init(|| Cluster::start(&["fsync=off"]))
}
