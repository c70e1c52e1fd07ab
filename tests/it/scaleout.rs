//! Several daemons, one inventory on PostgreSQL: each daemon its own data directory and
//! listeners, the machines, their tokens and their history shared.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use crate::pg_cluster::{self, Cluster};
use crate::support::{token_of, Daemon, BIN};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@so";

/// A secret key file (mode 0600), as an operator makes one.
fn secret_key(dir: &std::path::Path, byte: u8) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("secret-{byte}.key"));
    std::fs::write(&path, format!("{byte:02x}").repeat(32)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The key every daemon of these tests is given.
pub fn the_key() -> &'static std::path::Path {
    static KEY: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    &KEY.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = secret_key(d.path(), 0x5c);
        (d, p)
    })
    .1
}

fn daemon_on(url: &str) -> Daemon {
    Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[
            "--database",
            url,
            "--secret-key-file",
            the_key().to_str().unwrap(),
        ],
    )
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

/// `provision serve --check-config` on `database` with a fresh data directory and the shared
/// key: (exit code, stdout, stderr).
fn check(database: &str) -> (Option<i32>, String, String) {
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
        .arg("--secret-key-file")
        .arg(the_key())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--check-config` connects and says what it found; a database it cannot use is an error
/// that names it (without its password) and says what to do.
#[test]
fn check_config_connects_and_reads_the_schema_version() {
    let cluster = pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
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
    // PostgreSQL without the key the daemons share their secrets with: refused, with how
    // to make one.
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--database", &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("needs --secret-key-file") && err.contains("/dev/urandom"),
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

/// While PostgreSQL is down, machine-facing answers that need the inventory degrade: every
/// machine's iPXE asks get its disk (an installed machine comes up; nothing is wiped), configs
/// and phone-homes are refused with 503; once it is back, the daemon answers as before and
/// the local boots it served meanwhile are in the machines' timelines.
#[test]
fn installed_machines_boot_locally_while_postgres_is_down() {
    let cluster = Cluster::start(&[]);
    let d = daemon_on(&cluster.url("postgres"));
    let (installed, enrolled) = ("52:54:00:5c:02:01", "52:54:00:5c:02:02");
    d.cli_ok(&["enroll", installed, "--profile", "debian-12"]);
    d.cli_ok(&["enroll", enrolled, "--profile", "debian-12"]);
    let (_, script) = d.get(&format!("/ipxe?mac={installed}&platform=pcbios"));
    let token = token_of(&script);
    let (s, _) = d.post(
        &format!("/phone-home/{token}"),
        "text/plain",
        &format!("{HOST_KEY}\n"),
    );
    assert_eq!(s, 200);
    let (_, script) = d.get(&format!("/ipxe?mac={enrolled}&platform=efi"));
    let pending = token_of(&script);

    cluster.kill();
    for (mac, platform) in [
        (installed, "pcbios"),
        (enrolled, "efi"),
        ("52:54:00:5c:02:03", "pcbios"),
    ] {
        let (s, body) = d.get(&format!("/ipxe?mac={mac}&platform={platform}"));
        assert_eq!(s, 200, "{mac}: {body}");
        assert!(
            !body.contains("kernel") && body.contains("inventory-unreachable"),
            "{mac} boots its disk: {body}"
        );
    }
    let (s, body) = d.get(&format!("/config/{pending}/preseed.cfg"));
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");

    cluster.restart();
    // Back: the enrolled machine installs on its next boot, the installed one boots locally
    // for its own reason again.
    let (s, body) = d.get(&format!("/ipxe?mac={enrolled}&platform=efi"));
    assert!(s == 200 && body.contains("kernel"), "{s}: {body}");
    let (_, body) = d.get(&format!("/ipxe?mac={installed}&platform=pcbios"));
    assert!(
        body.contains("sanboot") && !body.contains("inventory-unreachable"),
        "{body}"
    );
    let events = d.cli_ok(&["events", installed]);
    assert!(
        events.contains("local boot (inventory-unreachable, pcbios)"),
        "the outage's answer is in the timeline: {events}"
    );
}

/// A primary with a synchronous streaming standby, both Debian's PostgreSQL started here: the
/// primary dies, the standby is promoted, and the daemon, given both hosts, follows it
/// (`target_session_attrs=read-write`) without a restart; every enroll it acknowledged before
/// is on the new primary (a synchronous standby has each commit before it is acknowledged).
#[test]
fn a_daemon_follows_a_promoted_standby_and_loses_no_acknowledged_write() {
    let primary = Cluster::start(&["wal_level=replica"]);
    let standby = Cluster::standby_of(&primary, "s1", &[]);
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = 's1'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    // A commit now returns only once the standby has it: this one waits for it to stream.
    primary.psql(
        "postgres",
        "CREATE TABLE sync_probe (); DROP TABLE sync_probe",
    );
    let streaming = primary.psql(
        "postgres",
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 's1'",
    );
    assert_eq!(streaming, "sync", "the standby is synchronous");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let d = daemon_on(&url);
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let mac = format!("52:54:00:5c:03:{i:02x}");
        d.cli_ok(&["enroll", &mac, "--profile", "debian-12"]);
        acknowledged.push(mac);
    }
    primary.kill();
    standby.promote();
    for i in 10..15 {
        let mac = format!("52:54:00:5c:03:{i:02x}");
        d.cli_ok(&["enroll", &mac, "--profile", "debian-12"]);
        acknowledged.push(mac);
    }
    let on_new_primary = standby.psql(
        "postgres",
        "SELECT string_agg(mac, ' ' ORDER BY mac) FROM machines",
    );
    assert_eq!(on_new_primary, acknowledged.join(" "));
    let list = d.cli_ok(&["machines", "list"]);
    for mac in &acknowledged {
        assert!(list.contains(mac.as_str()), "{mac} missing from {list}");
    }
}

/// The daemons sharing one database share one identity, through it and sealed: the node CA,
/// the SSH key every node trusts and the admin token. The first daemon's (here, a SQLite
/// daemon's data directory moved to PostgreSQL) are kept; a daemon given another key is
/// refused before it serves anything.
#[test]
fn daemons_share_one_ca_one_ssh_key_and_one_admin_token_sealed_in_the_database() {
    let cluster = pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    // A lone SQLite daemon's data directory, with its CA, key and token.
    let mut lone = Daemon::start();
    lone.terminate();
    let first_dir = lone.take_dir();
    let read = |dir: &std::path::Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let ca = read(first_dir.path(), "pki/ca-cert.pem");
    let token = read(first_dir.path(), "admin-token");
    let ssh = read(first_dir.path(), "ssh/id_ed25519.pub");
    let key = the_key().to_str().unwrap();
    let a = Daemon::start_in(first_dir, &["--database", &url, "--secret-key-file", key]);
    let b = daemon_on(&url);
    for d in [&a, &b] {
        assert_eq!(read(d.dir.path(), "pki/ca-cert.pem"), ca);
        assert_eq!(read(d.dir.path(), "admin-token"), token);
        assert_eq!(read(d.dir.path(), "ssh/id_ed25519.pub"), ssh);
        // What nodes are handed: the one CA.
        let (s, pem) = d.get("/pki/ca.pem");
        assert_eq!((s, pem), (200, ca.clone()));
    }
    // a's token opens b's admin API (whose TLS certificate is b's own: it names b's host).
    let out = Command::new(BIN)
        .args(["machines", "list"])
        .env("PROVISION_URL", b.admin_url())
        .env("PROVISION_TOKEN_FILE", a.token_file())
        .env("PROVISION_FINGERPRINT", b.fingerprint())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Sealed: neither the CA key nor the token is in the database in clear.
    let ca_key = read(a.dir.path(), "pki/ca-key.pem");
    let body = ca_key.lines().nth(1).unwrap();
    let dump = cluster.psql(&db, "SELECT encode(sealed, 'escape') FROM shared_files");
    assert!(
        !dump.contains(body) && !dump.contains(token.trim()),
        "sealed, not plain"
    );
    assert_eq!(
        cluster.psql(
            &db,
            "SELECT string_agg(name, ' ' ORDER BY name) FROM shared_files"
        ),
        "admin-token pki/ca-cert.pem pki/ca-key.pem ssh/id_ed25519"
    );
    // Another key: refused at start, saying why.
    let other = tempfile::tempdir().unwrap();
    let wrong = secret_key(other.path(), 0x99);
    let out = Command::new(BIN)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--tftp",
            "off",
        ])
        .args(["--dhcp", "off", "--database", &url, "--secret-key-file"])
        .arg(&wrong)
        .arg("--data-dir")
        .arg(other.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("does not open with this --secret-key-file"),
        "{err}"
    );
    drop((a, b));
    cluster.drop_db(&db);
}

/// A daemon killed (SIGKILL) in the middle of an install loses nothing: the token it issued
/// is the database's, so the installer finishes against the other daemon of its segment; and
/// the killed daemon, restarted, answers the machine as the inventory says.
#[test]
fn a_daemon_killed_mid_install_loses_nothing() {
    let cluster = pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let a = daemon_on(&url);
    let b = daemon_on(&url);
    let mac = "52:54:00:5c:04:01";
    a.cli_ok(&["enroll", mac, "--profile", "debian-12"]);
    let (s, script) = a.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
    assert_eq!(s, 200, "{script}");
    let token = token_of(&script);
    let (s, _) = a.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200);
    let a_dir = a.crash();
    let (s, preseed) = b.get(&format!("/config/{token}/preseed.cfg"));
    assert_eq!(s, 200, "{preseed}");
    let (s, body) = b.post(
        &format!("/phone-home/{token}"),
        "text/plain",
        &format!("{HOST_KEY}\n"),
    );
    assert_eq!(s, 200, "{body}");
    let a = Daemon::start_in(
        a_dir,
        &[
            "--database",
            &url,
            "--secret-key-file",
            the_key().to_str().unwrap(),
        ],
    );
    let (s, local) = a.get(&format!("/ipxe?mac={mac}&platform=pcbios"));
    assert_eq!(s, 200);
    assert!(local.contains("sanboot"), "{local}");
    let events = a.cli_ok(&["events", mac]);
    assert_eq!(events.matches("config_served").count(), 2, "{events}");
    assert!(events.contains("phoned_home"), "{events}");
    drop((a, b));
    cluster.drop_db(&db);
}

/// A CA for the TLS test: signs a server certificate for some names, or a client's for a
/// user (PostgreSQL's `cert` authentication takes the user from the CN).
struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = p.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// (certificate PEM, key PEM) for `cn`, naming `dns` (a server) or nothing (a client).
    fn sign(&self, cn: &str, dns: &[&str]) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if dns.is_empty() {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// TLS to PostgreSQL with libpq's keys, against a server that takes TLS only (`hostssl`):
/// `verify-full` checks the chain and the name (`host` names the server, `hostaddr` is where
/// it is), `verify-ca` the chain only, `prefer` encrypts without checking, `disable` really
/// sends plaintext; a wrong CA or a wrong name is refused with what was checked; a client
/// certificate logs in by `cert` authentication; a daemon on such a string keeps every
/// connection encrypted. Settings that cannot work are refused before anything connects.
#[test]
fn postgres_over_tls_checks_what_libpq_would() {
    use std::os::unix::fs::PermissionsExt;
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    // The server (user postgres) reads its files from here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let ca = TestCa::new("provision test database CA");
    let ca_file = write("ca.pem", &ca.pem, 0o644);
    let other_ca = write("other-ca.pem", &TestCa::new("someone else's CA").pem, 0o644);
    let (cert, key) = ca.sign("db.provision.test", &["db.provision.test"]);
    let server_cert = write("server.pem", &cert, 0o644);
    let server_key = write("server.key", &key, 0o600);
    pg_cluster::chown(std::path::Path::new(&server_key));
    let (cert, key) = ca.sign("provcert", &[]);
    let client_cert = write("client.pem", &cert, 0o644);
    let client_key = write("client.key", &key, 0o600);
    let hba = write(
        "pg_hba.conf",
        "local all all trust\n\
         hostssl all postgres 127.0.0.1/32 trust\n\
         hostssl all provcert 127.0.0.1/32 cert\n",
        0o644,
    );
    let settings = [
        "ssl=on".to_string(),
        format!("ssl_cert_file={server_cert}"),
        format!("ssl_key_file={server_key}"),
        format!("ssl_ca_file={ca_file}"),
        format!("hba_file={hba}"),
    ];
    let cluster = Cluster::start(&settings.iter().map(String::as_str).collect::<Vec<_>>());
    let db = cluster.create_db();
    cluster.psql(
        "postgres",
        &format!("CREATE ROLE provcert LOGIN; ALTER DATABASE {db} OWNER TO provcert"),
    );
    let port = cluster.port;
    let at = |user: &str, extra: &str| {
        format!(
            "host=db.provision.test hostaddr=127.0.0.1 port={port} user={user} dbname={db} {extra}"
        )
    };

    // verify-full: the chain to our CA, and the name the certificate gives.
    let (code, out, err) = check(&at(
        "postgres",
        &format!("sslmode=verify-full sslrootcert={ca_file}"),
    ));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!(
            "(TLSv1.3, sslmode=verify-full, certificate and host name checked against {ca_file})"
        )),
        "{out}"
    );
    // The same server by its address: the certificate does not name it.
    let by_address = format!(
        "postgres://postgres@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca_file}"
    );
    let (code, _, err) = check(&by_address);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("TLS handshake")
            && err.contains("certificate not valid for name \"127.0.0.1\""),
        "{err}"
    );
    // verify-ca checks the chain only: the address is fine.
    let (code, out, err) = check(&by_address.replace("verify-full", "verify-ca"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("host name not checked"), "{out}");
    // Someone else's CA: refused, saying what was checked.
    let (code, _, err) = check(&at(
        "postgres",
        &format!("sslmode=verify-full sslrootcert={other_ca}"),
    ));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("UnknownIssuer") && err.contains(&format!("checked against {other_ca}")),
        "{err}"
    );
    // prefer (the default): encrypted, unchecked.
    let (code, out, err) = check(&at("postgres", ""));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("(TLSv1.3, sslmode=prefer, server certificate not checked)"),
        "{out}"
    );
    // disable really is plaintext: this server takes none.
    let (code, _, err) = check(&at("postgres", "sslmode=disable"));
    assert_ne!(code, Some(0));
    assert!(err.contains("no encryption"), "{err}");
    // A client certificate logs in; without it the server says so.
    let client = format!(
        "sslmode=verify-full sslrootcert={ca_file} sslcert={client_cert} sslkey={client_key}"
    );
    let (code, _, err) = check(&at("provcert", &client));
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = check(&at(
        "provcert",
        &format!("sslmode=verify-full sslrootcert={ca_file}"),
    ));
    assert_ne!(code, Some(0));
    assert!(err.contains("certificate"), "{err}");
    // Refused before connecting: verify-full with no CA, a CA file that is not there, a mode
    // libpq does not have.
    for (bad, why) in [
        (
            "sslmode=verify-full".to_string(),
            "no sslrootcert names the CA",
        ),
        (
            "sslmode=verify-ca sslrootcert=/nowhere/ca.pem".to_string(),
            "/nowhere/ca.pem: no such file",
        ),
        ("sslmode=verify".to_string(), "is not one of disable"),
    ] {
        let (code, _, err) = check(&at("postgres", &bad));
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }

    // A daemon on TLS with its client certificate: it works, and every connection it holds
    // is encrypted, as the server sees them.
    let d = daemon_on(&at("provcert", &client));
    let out = d.cli_ok(&["enroll", "52:54:00:5c:00:71", "--profile", "debian-12"]);
    assert!(out.contains("enrolled 52:54:00:5c:00:71"), "{out}");
    let seen = cluster.psql(
        &db,
        "SELECT count(*), count(*) FILTER (WHERE s.ssl AND s.client_dn = '/CN=provcert') \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'provision'",
    );
    let (all, encrypted) = seen.split_once('|').unwrap();
    assert!(all.parse::<u32>().unwrap() > 0, "{seen}");
    assert_eq!(all, encrypted, "every connection encrypted: {seen}");
    assert_eq!(
        cluster.psql(
            &db,
            "SELECT state FROM machines WHERE mac = '52:54:00:5c:00:71'"
        ),
        "enrolled"
    );
    drop(d);
}
