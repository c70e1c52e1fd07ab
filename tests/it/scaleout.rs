//! Several daemons, one inventory on PostgreSQL: each daemon its own data directory and
//! listeners, the machines, their tokens and their history shared.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use crate::pg_cluster::{self, Cluster};
use crate::support::{token_of, Daemon, BIN};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@so";

fn daemon_on(url: &str) -> Daemon {
    Daemon::start_in(tempfile::tempdir().unwrap(), &["--database", url])
}

/// An install begun through one daemon is finished through the other: the machine, its
/// install token and its timeline are the database's, not a daemon's.
#[test]
fn two_daemons_share_machines_tokens_and_history() {
    let cluster = pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let a = daemon_on(&url);
    let b = daemon_on(&url);
    let mac = "52:54:00:5c:00:01";
    let out = a.cli_ok(&["enroll", mac, "--profile", "debian-12", "--hostname", "so1"]);
    assert!(out.contains("enrolled 52:54:00:5c:00:01"), "{out}");
    let show = b.cli_ok(&["machines", "show", mac]);
    assert!(show.contains("enrolled") && show.contains("so1"), "{show}");

    // The machine boots from b's segment: b issues the token.
    let (s, script) = b.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    assert!(
        script.contains(&b.url()),
        "b answers with its own URL: {script}"
    );
    // Its installer reaches a: the token is good there too, once.
    let (s, preseed) = a.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200, "{preseed}");
    assert!(preseed.contains("so1"), "{preseed}");
    let (s, body) = a.post(
        &format!("/phone-home/{token}"),
        "text/plain",
        &format!("{HOST_KEY}\n"),
    );
    assert_eq!(s, 200, "{body}");
    let (s, _) = b.post(
        &format!("/phone-home/{token}"),
        "text/plain",
        &format!("{HOST_KEY}\n"),
    );
    assert_eq!(s, 410, "a token is burnt for every daemon");
    // b now boots it locally, and both list it installed with its key.
    let (s, local) = b.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
    assert_eq!(s, 200);
    assert!(local.contains("sanboot"), "{local}");
    for d in [&a, &b] {
        let show = d.cli_ok(&["machines", "show", mac]);
        assert!(
            show.contains("installed") && show.contains("AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs"),
            "{show}"
        );
        let events = d.cli_ok(&["events", mac]);
        for kind in ["enrolled", "install_started", "config_served", "installed"] {
            assert!(events.contains(kind), "{kind} missing from {events}");
        }
    }
    drop((a, b));
    cluster.drop_db(&db);
}

/// `--check-config` connects and says what it found; a database it cannot use is an error
/// that names it (without its password) and says what to do.
#[test]
fn check_config_connects_and_reads_the_schema_version() {
    let cluster = pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let check = |database: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args([
                "serve",
                "--check-config",
                "--database",
                database,
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(&url);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("database: postgresql {url}: PostgreSQL "))
            && out.contains("empty (the first daemon to start makes schema"),
        "{out}"
    );
    let d = daemon_on(&url);
    drop(d);
    let (code, out, err) = check(&url);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(", this build's"), "{out}");
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM schema_version"),
        "1",
        "--check-config changed nothing"
    );

    // Nothing listens there: refused, with the database named and no password shown.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, _, err) = check(&format!("postgres://prov:s3cret@127.0.0.1:{closed}/inv"));
    assert_ne!(code, Some(0));
    assert!(
        err.contains(&format!("postgres://prov:***@127.0.0.1:{closed}/inv"))
            && !err.contains("s3cret"),
        "{err}"
    );
    let (code, _, err) = check("mysql://x@y/z");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("neither `sqlite` nor a PostgreSQL URL"),
        "{err}"
    );
    cluster.drop_db(&db);
}

/// PostgreSQL restarted under a daemon taking writes: requests while it is down fail with
/// why (nothing is acknowledged that was not written), and once it is back the daemon carries
/// on with a new connection, without a restart; every acknowledged enroll is there.
#[test]
fn a_daemon_reconnects_after_postgres_restarts_and_loses_no_acknowledged_write() {
    let cluster = Cluster::start(&[]);
    let url = cluster.url("postgres");
    let d = daemon_on(&url);
    // A client enrolling machines one after another the whole time, reporting each the
    // daemon acknowledged.
    let (admin, token_file) = (d.admin_url(), d.token_file());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, acked) = mpsc::channel::<String>();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut refused = 0;
            for i in 0u32.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mac = format!("52:54:00:5c:{:02x}:{:02x}", i >> 8, i & 0xff);
                let out = Command::new(BIN)
                    .args(["enroll", &mac, "--profile", "debian-12"])
                    .env("PROVISION_URL", &admin)
                    .env("PROVISION_TOKEN_FILE", &token_file)
                    .output()
                    .unwrap();
                if out.status.success() {
                    tx.send(mac).unwrap();
                } else {
                    refused += 1;
                }
            }
            refused
        })
    };
    let mut acknowledged: Vec<String> = acked.iter().take(5).collect();
    cluster.kill();
    let down = d.cli(&["enroll", "52:54:00:5c:ff:ff", "--profile", "debian-12"]);
    assert!(
        !down.status.success(),
        "an enroll with the database down fails"
    );
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(err.contains("PostgreSQL"), "the error says why: {err}");
    cluster.restart();
    // Writes are acknowledged again, by the same daemon.
    acknowledged.extend(acked.iter().take(5));
    stop.store(true, Ordering::Relaxed);
    let refused = writer.join().unwrap();
    acknowledged.extend(acked.try_iter());
    let list = d.cli_ok(&["machines", "list"]);
    for mac in &acknowledged {
        assert!(list.contains(mac.as_str()), "{mac} missing from {list}");
    }
    assert!(!list.contains("52:54:00:5c:ff:ff"), "{list}");
    eprintln!(
        "{} enrolls acknowledged, {refused} refused while PostgreSQL was down",
        acknowledged.len()
    );
}
