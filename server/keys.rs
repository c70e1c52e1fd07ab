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

/// The key every daemon sharing one PostgreSQL inventory is given (`--secret-key-file`): the
/// files they must share (the node CA, the daemon's SSH key, the admin token) are stored in
/// the database sealed with it, so the database alone (a dump, a backup, a replica, its
/// administrator) does not give them away.
pub struct SecretKey(ring::aead::LessSafeKey);

impl SecretKey {
    /// Reads the key: 64 hex digits (32 random bytes), in a file only its owner may read.
    pub fn load(path: &Path) -> anyhow::Result<SecretKey> {
        let text = fs::read_to_string(path).with_context(|| {
            format!(
                "reading the secret key {}; make one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {}` (mode 0600) and give every daemon the same file",
                path.display(),
                path.display()
            )
        })?;
        check_private(path)?;
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} must hold 64 hex digits (32 random bytes), nothing else",
                    path.display()
                )
            })?;
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8]) -> SecretKey {
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, bytes)
            .expect("32 bytes is a ChaCha20-Poly1305 key");
        SecretKey(ring::aead::LessSafeKey::new(key))
    }

    /// `plain` sealed (ChaCha20-Poly1305, a random nonce first) and bound to `name`: a sealed
    /// file put back under another name does not open.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the OS random source failed");
        let mut out = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(name.as_bytes()),
                &mut out,
            )
            .expect("sealing fits in memory");
        let mut sealed = nonce.to_vec();
        sealed.extend(out);
        sealed
    }

    /// What [`SecretKey::seal`] sealed under `name`; an error if another key sealed it or it
    /// was changed.
    pub fn open(&self, name: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        let wrong = || {
            anyhow::anyhow!(
                "{name} in the database does not open with this --secret-key-file: it was \
                 sealed with another key (every daemon sharing the database must be given the \
                 same key file), or changed"
            )
        };
        if sealed.len() < 12 + 16 {
            return Err(wrong());
        }
        let (nonce, body) = sealed.split_at(12);
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(
                ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?,
                ring::aead::Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_its_name() {
        let key = SecretKey::from_bytes(&[7; 32]);
        let sealed = key.seal("pki/ca-key.pem", b"-----BEGIN PRIVATE KEY-----");
        assert!(
            !sealed.windows(5).any(|w| w == b"BEGIN"),
            "sealed, not plain"
        );
        assert_eq!(
            key.open("pki/ca-key.pem", &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert_ne!(
            sealed,
            key.seal("pki/ca-key.pem", b"-----BEGIN PRIVATE KEY-----")
        );
        let e = key.open("admin-token", &sealed).unwrap_err().to_string();
        assert!(
            e.contains("does not open with this --secret-key-file"),
            "{e}"
        );
        let other = SecretKey::from_bytes(&[8; 32]);
        assert!(other.open("pki/ca-key.pem", &sealed).is_err());
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(key.open("pki/ca-key.pem", &changed).is_err());
        assert!(key.open("pki/ca-key.pem", b"short").is_err());
    }

    #[test]
    fn a_secret_key_file_is_64_hex_digits_only_its_owner_reads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret.key");
        fs::write(&p, "ab".repeat(32)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretKey::load(&p).err().unwrap().to_string();
        assert!(e.contains("readable by other users"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        SecretKey::load(&p).unwrap();
        fs::write(&p, "abcd\n").unwrap();
        let e = SecretKey::load(&p).err().unwrap().to_string();
        assert!(e.contains("must hold 64 hex digits"), "{e}");
        let e = SecretKey::load(&d.path().join("none"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("make one with"), "{e}");
    }

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
