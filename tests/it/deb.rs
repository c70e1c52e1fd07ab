//! The Debian package for real: built by `contrib/deb/build.sh` (what `make deb` runs) from
//! the binary under test, checked by lintian, and installed with dpkg into a debootstrapped
//! Debian 12 directory, where the binary runs, the user and data directory exist, the
//! configuration checks, and removal and purge behave.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{tool, BIN};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A minimal Debian 12 (debootstrap minbase, plus adduser, which the package depends on),
/// made once and kept in the target directory: later runs copy it.
fn bookworm_base() -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bookworm-minbase");
    if base.join("etc/debian_version").exists() {
        return base;
    }
    let partial = base.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    run(Command::new(tool("debootstrap"))
        .args(["--variant=minbase", "--include=adduser", "bookworm"])
        .arg(&partial)
        .arg("http://deb.debian.org/debian"));
    std::fs::rename(&partial, &base).unwrap();
    base
}

/// Runs `args` inside `root` (chroot), failing the test if it fails.
fn chroot(root: &Path, args: &[&str]) -> Output {
    run(Command::new(tool("chroot"))
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env_remove("PROVISION_DATA_DIR"))
}

#[test]
fn the_package_passes_lintian_and_installs_runs_and_purges_in_a_debian_12_chroot() {
    let work = tempfile::tempdir().unwrap();
    let built = run(Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/deb/build.sh"))
        .arg(BIN)
        .arg(work.path()));
    let deb = PathBuf::from(text(&built).trim());
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        deb.ends_with(format!("provision_{version}_amd64.deb")),
        "{}",
        deb.display()
    );

    // What is in it.
    let contents = text(&run(Command::new(tool("dpkg-deb"))
        .arg("--contents")
        .arg(&deb)));
    for path in [
        "./usr/bin/provision",
        "./lib/systemd/system/provision.service",
        "./etc/provision/provision.toml",
        "./usr/share/man/man1/provision.1.gz",
        "./usr/share/man/man1/provision-serve.1.gz",
        "./usr/share/man/man1/provision-machines-list.1.gz",
        "./usr/share/doc/provision/copyright",
        "./usr/share/doc/provision/changelog.gz",
        "./usr/share/provision/provision-alerts.yml",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    assert!(
        !contents.contains("provision-man.1"),
        "the hidden command got a page"
    );
    let info = text(&run(Command::new(tool("dpkg-deb")).arg("--info").arg(&deb)));
    assert!(info.contains(&format!("Version: {version}")), "{info}");
    assert!(info.contains("Depends: libc6"), "{info}");
    assert!(info.contains("adduser"), "{info}");

    // lintian: no errors (warnings and info are reported by the run, not failed on).
    let lint = Command::new(tool("lintian"))
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    eprintln!("lintian says:\n{said}");
    assert!(lint.status.success(), "lintian found errors:\n{said}");
    assert!(!said.lines().any(|l| l.starts_with("E: ")), "{said}");

    // Installed into a fresh Debian 12.
    let root = work.path().join("root");
    run(Command::new("cp").arg("-a").arg(bookworm_base()).arg(&root));
    std::fs::copy(&deb, root.join("tmp/provision.deb")).unwrap();
    chroot(&root, &["dpkg", "-i", "/tmp/provision.deb"]);
    let v = text(&chroot(&root, &["provision", "--version"]));
    assert_eq!(v.trim(), format!("provision {version}"));
    let checked = chroot(
        &root,
        &[
            "provision",
            "serve",
            "--config",
            "/etc/provision/provision.toml",
            "--check-config",
        ],
    );
    let summary = text(&checked);
    assert!(summary.contains("configuration OK"), "{summary}");
    assert!(
        summary.contains("data dir: /var/lib/provision"),
        "{summary}"
    );
    let user = text(&chroot(&root, &["getent", "passwd", "provision"]));
    assert!(user.contains(":/var/lib/provision:"), "{user}");
    assert!(user.trim_end().ends_with("/usr/sbin/nologin"), "{user}");
    let dir = text(&chroot(
        &root,
        &["stat", "-c", "%a %U %G", "/var/lib/provision"],
    ));
    assert_eq!(dir.trim(), "700 provision provision");
    let man = text(&chroot(
        &root,
        &["zcat", "/usr/share/man/man1/provision-serve.1.gz"],
    ));
    assert!(
        man.contains("check\\-config") || man.contains("check-config"),
        "{man}"
    );

    // Installing again (an upgrade to the same version) keeps the user and the directory.
    chroot(&root, &["dpkg", "-i", "/tmp/provision.deb"]);
    let dir = text(&chroot(
        &root,
        &["stat", "-c", "%a %U", "/var/lib/provision"],
    ));
    assert_eq!(dir.trim(), "700 provision");

    // Purge: the binary and the configuration go; the data directory (inventory, CA) stays.
    std::fs::write(root.join("var/lib/provision/provision.db"), b"kept").unwrap();
    chroot(&root, &["dpkg", "--purge", "provision"]);
    assert!(!root.join("usr/bin/provision").exists());
    assert!(!root.join("etc/provision/provision.toml").exists());
    assert_eq!(
        std::fs::read(root.join("var/lib/provision/provision.db")).unwrap(),
        b"kept"
    );
}
