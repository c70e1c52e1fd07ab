//! One SSH session to an installed node: host key pinned, provision's own key, commands with
//! timeouts. russh accepts no server key unless `check_server_key` says so; ours accepts
//! exactly the keys the node posted at phone-home and nothing else (no trust on first use:
//! first use was the phone-home, behind a one-time install token).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::ChannelMsg;

use super::output::Tail;

/// Why a session could not be opened or a command not run.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// TCP connect failed or timed out: worth retrying (the node may still be booting).
    #[error("cannot reach {addr}: {why}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// What the socket said.
        why: String,
    },
    /// The server presented a key that is not pinned: never retried, nothing executed.
    #[error("{addr} presented SSH host key {got}, which is not the key pinned at phone-home ({pinned}); nothing was executed. If the node was reinstalled outside provision, reprovision it")]
    HostKeyMismatch {
        /// host:port.
        addr: String,
        /// The presented key's SHA-256 fingerprint.
        got: String,
        /// The pinned keys' fingerprints.
        pinned: String,
    },
    /// The node did not accept provision's key.
    #[error("{addr} refused provision's SSH key for user {user}: is DATA/ssh/id_ed25519.pub in its authorized_keys?")]
    AuthRefused {
        /// host:port.
        addr: String,
        /// The login.
        user: String,
    },
    /// A command did not finish in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Anything else from the SSH layer.
    #[error("SSH: {0}")]
    Protocol(String),
}

impl SshError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SshError::Unreachable { .. } | SshError::Timeout(_) | SshError::Protocol(_)
        )
    }
}

/// The outcome of one remote command.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status; `None` if the server sent none (killed by a signal).
    pub status: Option<u32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

struct Pinned {
    keys: Vec<PublicKey>,
    /// The key the server offered, kept for the mismatch message.
    offered: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Host certificates are not pinned at phone-home; only plain keys can match.
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        *self.offered.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        Ok(self.keys.iter().any(|k| k.key_data() == key.key_data()))
    }
}

/// An authenticated session.
pub struct Session {
    handle: Handle<Pinned>,
}

fn fp(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

impl Session {
    /// Connects to `addr` (host:port), checks the host key against `pinned` (OpenSSH lines),
    /// and logs in as `user` with `key`.
    pub async fn open(
        addr: &str,
        user: &str,
        pinned: &[String],
        key: Arc<PrivateKey>,
        timeout: Duration,
    ) -> Result<Session, SshError> {
        let keys: Vec<PublicKey> = pinned
            .iter()
            .filter_map(|l| PublicKey::from_openssh(l).ok())
            .collect();
        if keys.is_empty() {
            return Err(SshError::Protocol(
                "no SSH host key is pinned for this machine (it has not phoned home)".into(),
            ));
        }
        let pinned_fps = keys.iter().map(fp).collect::<Vec<_>>().join(", ");
        let offered = Arc::new(Mutex::new(None));
        let handler = Pinned {
            keys,
            offered: offered.clone(),
        };
        let config = Arc::new(client::Config {
            // A quiet step (ovs-pki generating a key) is not a dead session: each command has
            // its own timeout instead.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            nodelay: true,
            ..Default::default()
        });
        let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(SshError::Unreachable {
                    addr: addr.into(),
                    why: format!("no TCP answer within {timeout:?}"),
                })
            }
            Ok(Err(e)) => {
                return Err(SshError::Unreachable {
                    addr: addr.into(),
                    why: e.to_string(),
                })
            }
            Ok(Ok(s)) => s,
        };
        let mut handle =
            match tokio::time::timeout(timeout, client::connect_stream(config, tcp, handler)).await
            {
                Err(_) => return Err(SshError::Timeout(timeout)),
                Ok(Err(russh::Error::UnknownKey)) => {
                    let got = offered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map(|k| format!("{} {}", k.algorithm().as_str(), fp(k)))
                        .unwrap_or_else(|| "(a certificate)".into());
                    return Err(SshError::HostKeyMismatch {
                        addr: addr.into(),
                        got,
                        pinned: pinned_fps,
                    });
                }
                Ok(Err(e)) => return Err(SshError::Protocol(e.to_string())),
                Ok(Ok(h)) => h,
            };
        let hash = match handle.best_supported_rsa_hash().await {
            Ok(h) => h.flatten(),
            Err(_) => None,
        };
        let auth = tokio::time::timeout(
            timeout,
            handle.authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash)),
        )
        .await
        .map_err(|_| SshError::Timeout(timeout))?
        .map_err(|e| SshError::Protocol(e.to_string()))?;
        if !auth.success() {
            return Err(SshError::AuthRefused {
                addr: addr.into(),
                user: user.into(),
            });
        }
        Ok(Session { handle })
    }

    /// Runs `command` (a shell command line, run by the login shell) with no input, and
    /// collects its output and exit status within `timeout`.
    pub async fn run(&self, command: &str, timeout: Duration) -> Result<Output, SshError> {
        tokio::time::timeout(timeout, self.run_inner(command))
            .await
            .map_err(|_| SshError::Timeout(timeout))?
    }

    async fn run_inner(&self, command: &str) -> Result<Output, SshError> {
        let p = |e: russh::Error| SshError::Protocol(e.to_string());
        let mut ch = self.handle.channel_open_session().await.map_err(p)?;
        ch.exec(true, command).await.map_err(p)?;
        ch.eof().await.map_err(p)?;
        // Each stream keeps its last MiB: a node printing without end costs no more.
        let (mut out, mut err, mut status) = (Tail::default(), Tail::default(), None);
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.push(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => err.push(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
        Ok(Output {
            status,
            stdout: out.into_string(),
            stderr: err.into_string(),
        })
    }

    /// Says goodbye; errors are irrelevant by then.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// The daemon's SSH key pair in `dir/id_ed25519` (OpenSSH format, private key 0600, so
/// `ssh -i` and russh read the same file), generated on first start. Returns the public key
/// line (rendered into installs) and the private key (for the registrar's logins).
pub fn daemon_key(dir: &std::path::Path) -> anyhow::Result<(String, Arc<PrivateKey>)> {
    use anyhow::Context;
    use russh::keys::ssh_key::{private::Ed25519Keypair, LineEnding};
    let private = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if !private.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment("provision");
        let pem = key
            .to_openssh(LineEnding::LF)
            .context("encoding the SSH key")?;
        crate::keys::write_private(&private, pem.as_bytes())?;
        let _ = std::fs::remove_file(&public);
    }
    crate::keys::check_private(&private)?;
    let key = russh::keys::load_secret_key(&private, None)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", private.display()))?;
    let line = key
        .public_key()
        .to_openssh()
        .context("encoding the public key")?;
    if !public.exists() {
        std::fs::write(&public, format!("{line}\n"))?;
    }
    Ok((line, Arc::new(key)))
}

/// Parses an OpenSSH public key line as a node posts it at phone-home: returns the algorithm
/// name and the key without its comment (the form pinned and written to known_hosts).
pub fn host_key_line(line: &str) -> Result<(String, String), String> {
    let mut k = PublicKey::from_openssh(line).map_err(|e| e.to_string())?;
    k.set_comment("");
    let text = k.to_openssh().map_err(|e| e.to_string())?;
    Ok((k.algorithm().as_str().to_string(), text))
}

/// A pinned host key line's algorithm and SHA-256 fingerprint as `ssh-keygen -l` prints it
/// (`SHA256:…`), for people comparing it with the node's console.
pub fn host_key_fingerprint(line: &str) -> Result<(String, String), String> {
    let k = PublicKey::from_openssh(line).map_err(|e| e.to_string())?;
    Ok((k.algorithm().as_str().to_string(), fp(&k)))
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn daemon_key_is_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let (k, _) = daemon_key(&d.path().join("ssh")).unwrap();
        assert!(k.starts_with("ssh-ed25519 "), "{k}");
        assert_eq!(daemon_key(&d.path().join("ssh")).unwrap().0, k);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("ssh/id_ed25519"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn host_key_lines_lose_their_comment() {
        let (alg, text) = host_key_line(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 root@node",
        )
        .unwrap();
        assert_eq!(alg, "ssh-ed25519");
        assert!(!text.contains("root@node"), "{text}");
        let (alg, fp) = host_key_fingerprint(&text).unwrap();
        assert_eq!(alg, "ssh-ed25519");
        assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
        assert!(host_key_line("ssh-ed25519 nope").is_err());
    }
}
