//! The admin listener: TLS by default with a self-signed certificate the CLI pins, an
//! operator's certificate checked against its CA, plain HTTP refused off loopback, token
//! rotation, and the guessing limit.

use std::process::Command;

use crate::support::{admin_agent, self_signed_pair, tool, Daemon, BIN};

fn run(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CLI with exactly these settings (no PROVISION_* from the test's environment).
fn cli(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("PROVISION_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied()).args(args).output().unwrap()
}

#[test]
fn the_cli_pins_the_self_signed_certificate_and_refuses_any_other() {
    let d = Daemon::start();
    let fp = d.fingerprint();
    // What `serve` logged is what it wrote, and what openssl reads off the certificate.
    let openssl = run(Command::new(tool("openssl"))
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(d.dir.path().join("admin-tls/cert.pem")));
    assert_eq!(openssl.trim().rsplit('=').next().unwrap(), fp);
    let token_file = d.token_file();
    let token_file = token_file.to_str().unwrap();
    let url = d.admin_url();
    // The pin beside the token file: the default.
    let out = cli(
        &[
            ("PROVISION_URL", &url),
            ("PROVISION_TOKEN_FILE", token_file),
        ],
        &["machines", "list"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another certificate's fingerprint: the TLS handshake fails, nothing is sent.
    let wrong = "00:".repeat(31) + "00";
    let out = cli(
        &[
            ("PROVISION_URL", &url),
            ("PROVISION_TOKEN_FILE", token_file),
            ("PROVISION_FINGERPRINT", &wrong),
        ],
        &["machines", "list"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("fingerprint {fp}, not the pinned")),
        "{err}"
    );
    // A token from elsewhere and no pin anywhere: the CLI says how to get one.
    let token = std::fs::read_to_string(d.token_file()).unwrap();
    let out = cli(
        &[
            ("PROVISION_URL", &url),
            ("PROVISION_TOKEN", token.trim()),
            ("PROVISION_TOKEN_FILE", "/nonexistent/admin-token"),
        ],
        &["machines", "list"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot verify the daemon") && err.contains("--fingerprint"),
        "{err}"
    );
    // The certificate as a CA file works too: it names 127.0.0.1.
    let cert = d.dir.path().join("admin-tls/cert.pem");
    let out = cli(
        &[
            ("PROVISION_URL", &url),
            ("PROVISION_TOKEN", token.trim()),
            ("PROVISION_CA_FILE", cert.to_str().unwrap()),
        ],
        &["machines", "list"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP to the admin port gets no API; the CLI will not send the token in clear to a
    // non-loopback address at all.
    let plain = ureq::get(&format!(
        "http://127.0.0.1:{}/api/v1/machines",
        d.admin_port
    ))
    .header("Authorization", &format!("Bearer {}", token.trim()))
    .call();
    assert!(
        plain.is_err(),
        "plain HTTP on the TLS port answered: {plain:?}"
    );
    let out = cli(
        &[
            ("PROVISION_URL", "http://10.1.2.3:8443"),
            ("PROVISION_TOKEN", "x"),
        ],
        &["machines", "list"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to send the admin token in clear"),
        "{err}"
    );
}

#[test]
fn an_operator_certificate_is_served_and_checked_against_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let openssl = tool("openssl");
    self_signed_pair(&p("ca.pem"), &p("ca-key.pem"), "/CN=Site CA", None);
    run(Command::new(&openssl)
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=provision.lab", "-keyout"])
        .arg(p("key.pem"))
        .arg("-out")
        .arg(p("req.pem")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:provision.lab,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new(&openssl)
        .args(["x509", "-req", "-days", "30", "-in"])
        .arg(p("req.pem"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca-key.pem"))
        .args(["-CAcreateserial", "-extfile"])
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("cert.pem")));
    // A key others can read is refused at start, naming the fix.
    std::fs::set_permissions(
        p("key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--tftp",
            "off",
            "--dhcp",
            "off",
            "--data-dir",
        ])
        .arg(data.path())
        .arg("--admin-cert")
        .arg(p("cert.pem"))
        .arg("--admin-key")
        .arg(p("key.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(
        p("key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();

    let (cert, key) = (p("cert.pem"), p("key.pem"));
    let d = Daemon::start_in(
        data,
        &[
            "--admin-cert",
            cert.to_str().unwrap(),
            "--admin-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        !d.dir.path().join("admin-tls").exists(),
        "no self-signed pair is made"
    );
    let token = std::fs::read_to_string(d.token_file()).unwrap();
    let out = cli(
        &[
            ("PROVISION_URL", &d.admin_url()),
            ("PROVISION_TOKEN", token.trim()),
            ("PROVISION_CA_FILE", p("ca.pem").to_str().unwrap()),
        ],
        &["machines", "list"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not the issuing CA: refused by the usual chain check.
    let out = cli(
        &[
            ("PROVISION_URL", &d.admin_url()),
            ("PROVISION_TOKEN", token.trim()),
            ("PROVISION_CA_FILE", cert.to_str().unwrap()),
        ],
        &["machines", "list"],
    );
    // (The leaf is not its own issuer, so as a "CA file" it anchors nothing.)
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("TLS"), "{err}");
    let (s, _) = {
        let mut r = admin_agent(&p("ca.pem"))
            .get(&format!("{}/api/v1/status", d.admin_url()))
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(s, 200);
}

#[test]
fn plain_admin_http_is_refused_off_loopback_unless_insecure() {
    let data = tempfile::tempdir().unwrap();
    for extra in [&["--check-config"][..], &[][..]] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--admin",
                "0.0.0.0:0",
                "--admin-tls",
                "off",
                "--http",
                "127.0.0.1:0",
            ])
            .args(["--tftp", "off", "--dhcp", "off", "--data-dir"])
            .arg(data.path())
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("in clear") && err.contains("--insecure-admin"),
            "{err}"
        );
    }
    assert!(
        std::fs::read_dir(data.path()).unwrap().next().is_none(),
        "a refused start writes nothing"
    );
    // On loopback, plain HTTP is allowed and the CLI uses it.
    let d = Daemon::start_in(data, &["--admin", "127.0.0.1:0", "--admin-tls", "off"]);
    let out = cli(
        &[
            (
                "PROVISION_URL",
                &format!("http://127.0.0.1:{}", d.admin_port),
            ),
            ("PROVISION_TOKEN_FILE", d.token_file().to_str().unwrap()),
        ],
        &["status"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.dir.path().join("admin-cert.sha256").exists());
}

#[test]
fn token_rotation_takes_effect_at_once_and_guessing_is_rate_limited() {
    let d = Daemon::start();
    let old = std::fs::read_to_string(d.token_file())
        .unwrap()
        .trim()
        .to_string();
    // A remote operator's copy of the token file, with the pin beside it.
    let remote = tempfile::tempdir().unwrap();
    let copy = remote.path().join("admin-token");
    std::fs::write(&copy, format!("{old}\n")).unwrap();
    std::fs::write(remote.path().join("admin-cert.sha256"), d.fingerprint()).unwrap();
    let url = d.admin_url();
    let out = cli(
        &[
            ("PROVISION_URL", &url),
            ("PROVISION_TOKEN_FILE", copy.to_str().unwrap()),
        ],
        &["token", "rotate"],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = std::fs::read_to_string(d.token_file())
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(new, old);
    assert!(
        said.contains("admin token rotated") && said.contains(&copy.display().to_string()),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&copy).unwrap().trim(),
        new,
        "the CLI's copy is rewritten"
    );
    assert_eq!(d.admin_get("/api/v1/status", Some(&old)).0, 401);
    assert_eq!(d.admin_get("/api/v1/status", Some(&new)).0, 200);
    // The daemon's own file: the next command just works.
    d.cli_ok(&["status"]);
    // A token given in the environment: the new one is printed, nowhere else to put it.
    let out = cli(
        &[
            ("PROVISION_URL", &url),
            ("PROVISION_TOKEN", &new),
            ("PROVISION_FINGERPRINT", &d.fingerprint()),
        ],
        &["token", "rotate"],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let newest = std::fs::read_to_string(d.token_file())
        .unwrap()
        .trim()
        .to_string();
    assert!(
        said.contains(&format!(
            "new token (the old one no longer works): {newest}"
        )),
        "{said}"
    );

    // Ten wrong tokens (the old one above was the first), then even the right one is
    // refused from this address for a while.
    for _ in 1..10 {
        assert_eq!(d.admin_get("/api/v1/status", Some("guess")).0, 401);
    }
    let (s, body) = d.admin_get("/api/v1/status", Some(&newest));
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("too many wrong admin tokens"), "{body}");
}

/// A new key pair for 127.0.0.1 renamed into place at `cert`/`key`, as a certificate
/// manager would replace them.
fn new_pair(cert: &std::path::Path, key: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    self_signed_pair(&c, &k, "/CN=provision", Some("IP:127.0.0.1"));
    std::fs::rename(&k, key).unwrap();
    std::fs::rename(&c, cert).unwrap();
}

#[test]
fn sighup_reloads_the_admin_certificate_and_a_broken_one_changes_nothing() {
    let d = Daemon::start();
    let first = d.fingerprint();
    let (cert, key) = (
        d.dir.path().join("admin-tls/cert.pem"),
        d.dir.path().join("admin-tls/key.pem"),
    );
    let token_file = d.token_file();
    let list = |fp: Option<&str>| {
        let mut env = vec![
            ("PROVISION_URL", d.admin_url()),
            (
                "PROVISION_TOKEN_FILE",
                token_file.to_str().unwrap().to_string(),
            ),
        ];
        if let Some(fp) = fp {
            env.push(("PROVISION_FINGERPRINT", fp.to_string()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cli(&env, &["machines", "list"])
    };
    new_pair(&cert, &key);
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let line = d.wait_log("admin TLS reloaded");
    let second = d.fingerprint();
    assert_ne!(first, second);
    assert!(line.contains(&second), "{line}");
    // New connections get the new certificate: the old pin is refused, the new one (the
    // rewritten fingerprint file, the CLI's default) works.
    assert!(!list(Some(&first)).status.success());
    let out = list(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A key that does not fit the certificate: the reload says why and keeps the old pair.
    let other = tempfile::tempdir().unwrap();
    new_pair(&other.path().join("c.pem"), &other.path().join("k.pem"));
    std::fs::copy(other.path().join("k.pem"), &key).unwrap();
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let line = d.wait_log("admin TLS reload failed");
    assert!(line.contains("does not fit"), "{line}");
    assert_eq!(d.fingerprint(), second);
    let out = list(Some(&second));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
