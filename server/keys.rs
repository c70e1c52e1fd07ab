//! Secrets kept in the data directory: the admin API token and install tokens (the daemon's
//! SSH key pair is the registrar's, in `registrar::ssh`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// 256 random bits as 64 lower-case hex digits: an install or admin token. Hex keeps it a
/// single safe word in URLs, iPXE lines and kernel command lines.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source failed");
    hex::encode(b)
}

/// The SHA-256 of a token, hex: the only form in which install tokens are stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Writes `contents` to a new file with mode 0600, refusing to replace an existing one.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// Writes `contents` to `path` through a temporary file and a rename, so a reader never sees
/// half a file.
pub(crate) fn replace_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Refuses a secret file others can read: a leaked admin token or private key is not a
/// warning-level problem.
pub(crate) fn check_private(path: &Path) -> anyhow::Result<()> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// Reads the admin token from `path`, creating it (0600) on first start. Returns the token
/// and whether it was created now.
pub fn admin_token(path: &Path) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        check_private(path)?;
        let t = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t = t.trim().to_string();
        if t.len() < 32 {
            bail!(
                "{} holds a token shorter than 32 characters; delete it to generate a new one",
                path.display()
            );
        }
        return Ok((t, false));
    }
    let t = random_token();
    write_private(path, format!("{t}\n").as_bytes())?;
    Ok((t, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_hex_and_hash_stably() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_token());
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn admin_token_is_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin-token");
        let (t, created) = admin_token(&p).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(admin_token(&p).unwrap(), (t, false));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(admin_token(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
    }
}
