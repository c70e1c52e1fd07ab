//! TLS for the admin listener and the CLI that talks to it.
//!
//! The daemon serves the admin API with either the operator's certificate and key
//! (`--admin-cert`, `--admin-key`) or a self-signed certificate it makes on first start in
//! `DATA_DIR/admin-tls/`. Either way it writes the certificate's SHA-256 fingerprint to
//! `DATA_DIR/admin-cert.sha256`, beside the admin token, and logs it.
//!
//! The CLI verifies the daemon one of two ways: against CA certificates (`--ca-file`, the
//! usual web PKI check with the host name), or by that fingerprint (`--fingerprint`, or the
//! fingerprint file beside its token file). A self-signed certificate cannot name every
//! address an operator may use to reach the daemon, so a pin checks the one thing that
//! matters — this is the certificate `serve` made — and ignores names, as SSH host keys do.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// The fingerprint file's name, in the data directory beside `admin-token`.
pub const FINGERPRINT_FILE: &str = "admin-cert.sha256";

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The admin listener's TLS: the server configuration and its certificate's fingerprint.
pub struct AdminTls {
    /// What the acceptor uses.
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate, `AA:BB:…` (as `openssl x509 -fingerprint -sha256`).
    pub fingerprint: String,
    /// Where the certificate came from, for the log.
    pub source: String,
}

/// The admin listener's TLS configuration as it is now: replaced whole by a reload (SIGHUP),
/// read by each new connection.
pub struct CurrentTls(std::sync::RwLock<Arc<ServerConfig>>);

impl CurrentTls {
    /// Starts with `config`.
    pub fn new(config: Arc<ServerConfig>) -> CurrentTls {
        CurrentTls(std::sync::RwLock::new(config))
    }

    /// The configuration for a new connection.
    pub fn get(&self) -> Arc<ServerConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `config` in force for the connections after this call.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

/// Loads the operator's certificate chain and key, or the self-signed pair in
/// `DATA_DIR/admin-tls/` (made now if missing), and writes the fingerprint file.
/// `names` are the host names and addresses a new self-signed certificate lists.
pub fn admin_tls(
    data_dir: &Path,
    operator: Option<(&Path, &Path)>,
    names: &[String],
) -> anyhow::Result<AdminTls> {
    let (cert_path, key_path, source) = match operator {
        Some((c, k)) => (c.to_path_buf(), k.to_path_buf(), "operator-supplied"),
        None => {
            let dir = data_dir.join("admin-tls");
            let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !c.exists() && !k.exists() {
                self_signed(&dir, &c, &k, names)?;
            }
            (c, k, "self-signed")
        }
    };
    crate::keys::check_private(&key_path)
        .with_context(|| format!("the admin TLS key {}", key_path.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        bail!(
            "{} holds no certificate (a PEM file with -----BEGIN CERTIFICATE----- blocks, leaf first)",
            cert_path.display()
        );
    };
    let fingerprint = crate::pki::fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| {
        format!(
            "{} is not a PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key_path.display()
        )
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "the admin TLS key {} does not fit the certificate {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    let fp_path = data_dir.join(FINGERPRINT_FILE);
    crate::keys::replace_file(&fp_path, format!("{fingerprint}\n").as_bytes(), 0o644)?;
    Ok(AdminTls {
        config: Arc::new(config),
        fingerprint,
        source: format!("{source} {}", cert_path.display()),
    })
}

/// A new ECDSA P-256 key and a self-signed certificate naming `names` (DNS names and IP
/// addresses as the strings parse). The key is written first (0600) so a crash between the two
/// leaves a key without a certificate, which the next start reports, never a certificate
/// without its key.
fn self_signed(dir: &Path, cert: &Path, key: &Path, names: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let (cert_pem, key_pem) = crate::pki::self_signed_server("provision admin API", names)?;
    crate::keys::write_private(key, key_pem.as_bytes())?;
    crate::keys::replace_file(cert, cert_pem.as_bytes(), 0o644)?;
    tracing::info!(cert = %cert.display(), "made a self-signed admin TLS certificate");
    Ok(())
}

/// Parses a SHA-256 fingerprint: 64 hex digits, with or without `:` separators, any case,
/// optionally prefixed `sha256:` or `SHA256 Fingerprint=` (openssl's output).
pub fn parse_fingerprint(s: &str) -> anyhow::Result<[u8; 32]> {
    let t = s.trim();
    let t = t
        .strip_prefix("sha256 Fingerprint=")
        .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
        .or_else(|| t.strip_prefix("sha256:"))
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&digits).ok().filter(|b| b.len() == 32);
    match bytes {
        Some(b) => Ok(b.try_into().expect("length checked")),
        None => bail!(
            "{s:?} is not a SHA-256 fingerprint (64 hex digits, `AA:BB:...` as `serve` prints it)"
        ),
    }
}

/// How the CLI checks the daemon's certificate.
pub enum Verify {
    /// Against these CA certificates, with the host name.
    Roots(PathBuf),
    /// The leaf certificate's SHA-256, whatever it names.
    Pin([u8; 32]),
}

/// A client configuration for `verify`.
pub fn client_config(verify: &Verify) -> anyhow::Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let config = match verify {
        Verify::Roots(file) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(file)
                .with_context(|| format!("reading the CA file {}", file.display()))?
            {
                let c = c.with_context(|| format!("{} is not PEM", file.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("a certificate in {}", file.display()))?;
            }
            if roots.is_empty() {
                bail!("{} holds no certificate", file.display());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Verify::Pin(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                fingerprint: *fp,
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The handshake-signature half of a [`ServerCertVerifier`] whose `provider` field is the
/// crypto provider: whatever a verifier decides about the certificate, the server must prove it
/// holds the certificate's key.
macro_rules! signatures_checked_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Accepts exactly the certificate with this fingerprint, and still checks that the server
/// holds its key (the handshake signatures), so a copied certificate is not enough.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use sha2::{Digest, Sha256};
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            &got[..],
            &self.fingerprint[..],
        )) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {}, not the pinned {}",
                crate::pki::fingerprint(end_entity),
                self.fingerprint
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<Vec<_>>()
                    .join(":")
            )))
        }
    }

    signatures_checked_by_provider!();
}

/// Accepts any certificate, and still checks that the server holds its key (the handshake
/// signatures): an encrypted connection to whoever answers, for PostgreSQL's `sslmode=prefer`
/// and `require` without a root certificate, as libpq makes them.
#[derive(Debug)]
pub(crate) struct AnyCertificate {
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signatures_checked_by_provider!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_every_common_spelling() {
        let fp = [0xABu8; 32];
        let colons = fp
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        for s in [
            colons.clone(),
            colons.to_lowercase(),
            colons.replace(':', ""),
            format!("sha256:{colons}"),
            format!("SHA256 Fingerprint={colons}\n"),
        ] {
            assert_eq!(parse_fingerprint(&s).unwrap(), fp, "{s}");
        }
        let e = parse_fingerprint("AB:CD").unwrap_err().to_string();
        assert!(e.contains("not a SHA-256 fingerprint"), "{e}");
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_self_signed_pair_is_made_once_private_and_its_fingerprint_written() {
        let d = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let a = admin_tls(d.path(), None, &names).unwrap();
        let key = d.path().join("admin-tls/key.pem");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let written = fs::read_to_string(d.path().join(FINGERPRINT_FILE)).unwrap();
        assert_eq!(written.trim(), a.fingerprint);
        // The second start keeps the certificate: the CLI's pin stays valid.
        let b = admin_tls(d.path(), None, &names).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        // A key others can read is refused, naming the fix.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", admin_tls(d.path(), None, &names).err().unwrap());
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn an_operator_pair_that_does_not_fit_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        admin_tls(d.path(), None, &names).unwrap();
        let other = tempfile::tempdir().unwrap();
        admin_tls(other.path(), None, &names).unwrap();
        let e = format!(
            "{:#}",
            admin_tls(
                d.path(),
                Some((
                    &d.path().join("admin-tls/cert.pem"),
                    &other.path().join("admin-tls/key.pem")
                )),
                &names
            )
            .err()
            .unwrap()
        );
        assert!(e.contains("does not fit"), "{e}");
    }
}
