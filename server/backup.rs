//! `provision backup` and `provision restore`: the data directory as one file, taken while the
//! daemon runs, put back into a directory no daemon uses.
//!
//! The file is a tar archive (the `tar` crate) of a consistent copy of the database (see
//! `store::snapshot`) and the secrets beside it: the admin token, the admin listener's
//! certificate and key with the fingerprint file, the daemon's SSH key pair, and the node CA.
//! `assets/` (kernels and initrds, re-downloadable and large) is not in it. The archive holds
//! secrets, so it is written 0600, and restore puts every file back with the mode the daemon
//! itself would give it.
//!
//! A running daemon holds an exclusive `flock` on `DATA/serve.lock` for its whole life; that is
//! how restore (and a second `serve` on the same directory) knows the directory is in use. The
//! kernel drops the lock when the process dies, however it dies.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

/// The lock file a running daemon holds.
pub const LOCK_FILE: &str = "serve.lock";
/// The database's file name in the data directory and in the archive.
const DB: &str = "provision.db";
/// The archive member that says what the file is.
const MANIFEST: &str = "provision-backup.txt";

/// What goes into a backup besides the database, relative to the data directory, with the
/// mode each is restored with: secrets 0600, the rest 0644. Directories are 0700.
const FILES: &[(&str, u32)] = &[
    ("admin-token", 0o600),
    ("admin-cert.sha256", 0o644),
    ("admin-tls/cert.pem", 0o644),
    ("admin-tls/key.pem", 0o600),
    ("ssh/id_ed25519", 0o600),
    ("ssh/id_ed25519.pub", 0o644),
    ("pki/ca-cert.pem", 0o644),
    ("pki/ca-key.pem", 0o600),
];

/// The data directory held by this process: the lock goes when it is dropped (or the
/// process dies).
pub struct DataDirLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Takes the data directory's lock, or says which directory is in use by another daemon.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DataDirLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "another provision serve is running on {} (it holds {}); stop it first, or give this one its own --data-dir",
            data_dir.display(),
            path.display()
        ),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// What a backup or restore did, for the operator.
#[derive(Debug)]
pub struct Summary {
    /// Machines in the database copied.
    pub machines: u64,
    /// Files besides the database.
    pub files: Vec<String>,
}

/// Writes a backup of `data_dir` to `file` (replaced whole; 0600). Works while a daemon runs
/// on `data_dir`: the database copy is one consistent snapshot.
pub fn backup(data_dir: &Path, file: &Path) -> anyhow::Result<Summary> {
    let db = data_dir.join(DB);
    if !db.exists() {
        bail!(
            "{} has no {DB}: is it provision's data directory (--data-dir)? A daemon whose \
             inventory is on PostgreSQL (--database) keeps none here: back the database up \
             with PostgreSQL's own tools (pg_dump, or a base backup with WAL archiving; see \
             docs/scale-out.md)",
            data_dir.display()
        );
    }
    let work = tempfile::tempdir().context("a temporary directory for the database copy")?;
    let copy = work.path().join(DB);
    crate::store::snapshot(&db, &copy).with_context(|| format!("copying {}", db.display()))?;
    let machines = crate::store::verify(&copy)?;

    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".provision-backup")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(parent)
        .with_context(|| format!("creating a file in {}", parent.display()))?;
    let mut files = Vec::new();
    {
        let mut tar = tar::Builder::new(tmp.as_file_mut());
        tar.mode(tar::HeaderMode::Deterministic);
        let manifest = format!(
            "provision backup\nversion {}\ndata_dir {}\nmachines {machines}\n",
            env!("CARGO_PKG_VERSION"),
            data_dir.display()
        );
        append(&mut tar, MANIFEST, manifest.as_bytes(), 0o644)?;
        let db_bytes = fs::read(&copy)?;
        append(&mut tar, DB, &db_bytes, 0o600)?;
        for (name, mode) in FILES {
            let p = data_dir.join(name);
            match fs::read(&p) {
                Ok(bytes) => {
                    append(&mut tar, name, &bytes, *mode)?;
                    files.push(name.to_string());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            }
        }
        tar.finish()?;
    }
    tmp.as_file_mut().sync_all()?;
    tmp.persist(file)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(Summary { machines, files })
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes)
        .with_context(|| format!("adding {name} to the backup"))
}

/// Restores the backup `file` into `data_dir`, which must not hold a database and must not
/// be in use by a daemon. Every member is checked before anything is put in place: its name
/// must be one a backup writes, and the database must pass SQLite's integrity check.
pub fn restore(file: &Path, data_dir: &Path) -> anyhow::Result<Summary> {
    fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))?;
    let _lock = lock_data_dir(data_dir)?;
    if data_dir.join(DB).exists() {
        bail!(
            "{} already holds a database ({DB}); restore into an empty data directory, or move that one away first",
            data_dir.display()
        );
    }
    let archive = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".restore")
        .tempdir_in(data_dir)?;
    let mut seen_manifest = false;
    let mut files = Vec::new();
    let mut ar = tar::Archive::new(archive);
    for entry in ar
        .entries()
        .with_context(|| format!("{} is not a provision backup (tar)", file.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", file.display()))?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mode = if name == MANIFEST {
            seen_manifest = true;
            continue;
        } else if name == DB {
            0o600
        } else if let Some((_, m)) = FILES.iter().find(|(n, _)| *n == name) {
            files.push(name.clone());
            *m
        } else {
            bail!(
                "{} holds {name:?}, which no provision backup contains; refusing it",
                file.display()
            );
        };
        let dest = staging.path().join(safe(&name)?);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&dest)?;
        std::io::copy(&mut entry, &mut out)?;
        out.sync_all()?;
    }
    if !seen_manifest || !staging.path().join(DB).exists() {
        bail!(
            "{} is not a provision backup (no manifest or no database in it)",
            file.display()
        );
    }
    let machines = crate::store::verify(&staging.path().join(DB))?;
    // Everything checked: move into place, the database last, so an interrupted restore
    // leaves no database and can simply be run again.
    for name in &files {
        let to = data_dir.join(name);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        fs::rename(staging.path().join(name), &to)
            .with_context(|| format!("putting {} in place", to.display()))?;
    }
    fs::rename(staging.path().join(DB), data_dir.join(DB))?;
    fs::File::open(data_dir)?.sync_all()?;
    Ok(Summary { machines, files })
}

/// `name` as a relative path of plain components (the archive is checked against the list of
/// known names first; this is the second guard).
fn safe(name: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(name);
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(p.to_path_buf())
    } else {
        bail!("archive member {name:?} is not a plain relative path")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_of_the_data_dir_is_refused_and_the_lock_goes_with_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_data_dir(d.path()).unwrap();
        let err = lock_data_dir(d.path()).err().unwrap().to_string();
        assert!(err.contains("another provision serve"), "{err}");
        drop(held);
        lock_data_dir(d.path()).unwrap();
    }

    #[test]
    fn restore_refuses_an_archive_with_anything_else_in_it() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("evil.tar");
        {
            let f = fs::File::create(&file).unwrap();
            let mut tar = tar::Builder::new(f);
            append(&mut tar, MANIFEST, b"provision backup\n", 0o644).unwrap();
            append(&mut tar, "ssh/authorized_keys", b"ssh-ed25519 AAAA", 0o644).unwrap();
            tar.finish().unwrap();
        }
        let err = restore(&file, &d.path().join("data"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("authorized_keys"), "{err}");
        assert!(!d.path().join("data/ssh").exists());
        assert!(safe("../x").is_err() && safe("/etc/x").is_err() && safe("pki/ca.pem").is_ok());
    }
}
