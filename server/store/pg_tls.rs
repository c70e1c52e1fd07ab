//! TLS to PostgreSQL, set with libpq's keys and meaning what they mean to libpq.
//!
//! An operator writes the daemon's connection string the way psql takes it:
//! `postgres://provision@db.example/inventory?sslmode=verify-full&sslrootcert=/etc/provision/pg-ca.pem`.
//! tokio-postgres reads `sslmode` only as `disable`, `prefer` or `require` and knows no
//! `sslrootcert`, `sslcert` or `sslkey` (it refuses the string), so this module takes those
//! keys out, hands tokio-postgres the rest, and builds the rustls client they ask for. What each
//! mode does follows libpq's table ("SSL Mode Descriptions", libpq-ssl in the PostgreSQL
//! manual):
//!
//! | sslmode       | encrypted                   | server certificate checked                |
//! |---------------|-----------------------------|-------------------------------------------|
//! | `disable`     | never                       | —                                         |
//! | `allow`       | never (see [`Mode::Allow`]) | —                                         |
//! | `prefer`      | if the server offers TLS    | chain, if a root file is there; else not  |
//! | `require`     | always                      | chain, if a root file is there; else not  |
//! | `verify-ca`   | always                      | chain to `sslrootcert`                    |
//! | `verify-full` | always                      | chain to `sslrootcert`, and the host name |
//!
//! `prefer` is the default, as in libpq. Only `verify-full` (or `verify-ca` where the CA signs
//! nothing else) stops an active attacker on the path; the others protect against listening
//! only. TLS is never used over a Unix socket (PostgreSQL answers no to it there, and libpq
//! does not ask).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::{Host, SslMode};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Mode {
    Disable,
    /// libpq tries without TLS first and uses TLS only if the server refuses that; a server
    /// that refuses plaintext is configured by `hostssl` lines, which no provision database
    /// needs, so `allow` connects without TLS (tokio-postgres has no "retry with TLS").
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "disable" => Mode::Disable,
            "allow" => Mode::Allow,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            _ => {
                return Err(format!(
                    "sslmode={s:?} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Allow => "allow",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// Where the server's certificate is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    /// Not checked (libpq's `prefer` and `require` without a root file).
    None,
    /// The CA certificates in this PEM file.
    File(PathBuf),
    /// The system's CA store (`sslrootcert=system`).
    System,
}

/// The TLS a connection string asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Tls {
    mode: Mode,
    roots: Roots,
    /// `sslcert` and `sslkey`: a client certificate, for servers that authenticate by it
    /// (`cert` in pg_hba.conf).
    client: Option<(PathBuf, PathBuf)>,
}

/// The keys of ours in a connection string, as written.
#[derive(Default)]
struct Keys {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl Keys {
    /// Takes `key = value` if it is one of ours; says whether it was.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    }
}

/// Parses a `postgres://` URL or `key=value` connection string: the configuration
/// tokio-postgres connects with (its `ssl_mode` set from ours) and the TLS to connect with.
/// The errors say what was wrong; they never hold the password (callers prefix the redacted
/// string).
pub(super) fn parse(url: &str) -> Result<(tokio_postgres::Config, Tls), String> {
    let mut keys = Keys::default();
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        strip_url(url, &mut keys)?
    } else {
        strip_pairs(url, &mut keys)?
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    let tls = Tls::from_keys(keys, home().as_deref())?;
    let unix_only = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)));
    config.ssl_mode(match tls.mode {
        _ if unix_only => SslMode::Disable,
        Mode::Disable | Mode::Allow => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    Ok((config, tls))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

impl Tls {
    fn from_keys(keys: Keys, home: Option<&Path>) -> Result<Tls, String> {
        let system = keys.sslrootcert.as_deref() == Some("system");
        let mode = match keys.sslmode.as_deref() {
            Some(m) => Mode::parse(m)?,
            // libpq (PostgreSQL 16): `sslrootcert=system` makes the default verify-full.
            None if system => Mode::VerifyFull,
            None => Mode::Prefer,
        };
        if system && mode != Mode::VerifyFull {
            // As libpq: the system's store trusts every public CA, so only the host name
            // check makes it mean anything.
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full, not {}: any public CA can sign \
                 a certificate for some name, so only the host name check makes the system's \
                 store mean anything",
                mode.name()
            ));
        }
        // libpq's default root file, used whenever it exists.
        let default_root = home.map(|h| h.join(".postgresql/root.crt"));
        let roots = match keys.sslrootcert {
            Some(_) if system => Roots::System,
            Some(f) if f.is_empty() => {
                return Err(
                    "sslrootcert is empty: name a PEM file of CA certificates, or \
                            `system`"
                        .to_string(),
                )
            }
            Some(f) => {
                let f = PathBuf::from(f);
                if mode >= Mode::Prefer && !f.is_file() {
                    return Err(format!(
                        "sslrootcert {}: no such file (a PEM file of the CA certificates that \
                         sign the server's, or `system` for the system's CA store)",
                        f.display()
                    ));
                }
                Roots::File(f)
            }
            None => match default_root.filter(|f| f.is_file()) {
                Some(f) => Roots::File(f),
                None if mode >= Mode::VerifyCa => {
                    return Err(format!(
                        "sslmode={} checks the server's certificate, but no sslrootcert names \
                         the CA that signs it: add sslrootcert=/path/to/ca.pem (or \
                         sslrootcert=system for a publicly signed server), or put the CA in \
                         ~/.postgresql/root.crt",
                        mode.name()
                    ));
                }
                None => Roots::None,
            },
        };
        let client = match (keys.sslcert, keys.sslkey) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                for f in [&c, &k] {
                    if !Path::new(f).is_file() {
                        return Err(format!("{f}: no such file (sslcert and sslkey)"));
                    }
                }
                Some((PathBuf::from(c), PathBuf::from(k)))
            }
            _ => {
                return Err(
                    "sslcert and sslkey go together: the client certificate and its \
                            private key, both PEM files"
                        .to_string(),
                )
            }
        };
        Ok(Tls {
            mode,
            roots,
            client,
        })
    }

    /// Whether connections may use TLS at all (not over a Unix socket, see the module's words).
    pub(super) fn wanted(&self) -> bool {
        self.mode >= Mode::Prefer
    }

    /// For `--check-config` and the log: the mode and what is checked.
    pub(super) fn describe(&self) -> String {
        let checked = match (&self.roots, self.mode) {
            (_, Mode::Disable | Mode::Allow) => return format!("sslmode={}", self.mode.name()),
            (Roots::None, _) => "server certificate not checked".to_string(),
            (Roots::System, _) => {
                "certificate and host name checked against the system's CAs".to_string()
            }
            (Roots::File(f), Mode::VerifyFull) => {
                format!("certificate and host name checked against {}", f.display())
            }
            (Roots::File(f), _) => format!(
                "certificate checked against {} (host name not checked)",
                f.display()
            ),
        };
        format!("sslmode={}, {checked}", self.mode.name())
    }

    /// The rustls client for this TLS (call only if [`Tls::wanted`]). Reads the files now,
    /// so a missing or unreadable CA or key is an error at start, not at the first connection.
    pub(super) fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = crate::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?;
        let builder = match &self.roots {
            // libpq's `prefer` and `require` with no root file: encrypted, the certificate
            // taken as it comes (the server still proves it holds its key).
            Roots::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(crate::tls::AnyCertificate {
                    provider,
                })),
            Roots::File(f) => {
                let roots = Arc::new(roots_from_file(f)?);
                if self.mode == Mode::VerifyFull {
                    builder.with_root_certificates(roots)
                } else {
                    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| format!("sslrootcert {}: {e}", f.display()))?;
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert=system: the system's CA store holds no certificate ({}); \
                         install Debian's ca-certificates, or name a CA file",
                        found
                            .errors
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                }
                builder.with_root_certificates(roots)
            }
        };
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        format!("sslcert {}: not a PEM certificate: {e}", cert.display())
                    })?;
                if chain.is_empty() {
                    return Err(format!("sslcert {} holds no certificate", cert.display()));
                }
                crate::keys::check_private(key).map_err(|e| format!("sslkey: {e:#}"))?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "sslkey {}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                        key.display()
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("sslcert and sslkey: {e}"))
            }
        }
    }
}

fn roots_from_file(f: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(f)
        .map_err(|e| format!("sslrootcert {}: {e}", f.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("sslrootcert {}: not PEM: {e}", f.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("sslrootcert {}: {e}", f.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no certificate (a PEM file with -----BEGIN CERTIFICATE----- \
             blocks)",
            f.display()
        ));
    }
    Ok(roots)
}

/// A URL's query without our keys: `?sslmode=…&sslrootcert=…` taken out, the rest left as
/// written. The query starts at the first `?` after the user part, as tokio-postgres reads it.
fn strip_url(url: &str, keys: &mut Keys) -> Result<String, String> {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let from = after_scheme + url[after_scheme..].find('@').map(|i| i + 1).unwrap_or(0);
    let Some(q) = url[from..].find('?').map(|i| from + i) else {
        return Ok(url.to_string());
    };
    let mut kept = Vec::new();
    for pair in url[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("{pair:?} in the URL's query is not key=value"));
        };
        let decode = |s: &str| -> Result<String, String> {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(Cow::into_owned)
                .map_err(|_| format!("{s:?} in the URL's query is not UTF-8 when decoded"))
        };
        if !keys.take(&decode(k)?, &decode(v)?) {
            kept.push(pair);
        }
    }
    let base = &url[..q];
    Ok(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

/// A `key=value` connection string without our keys. libpq's grammar: pairs separated by
/// white space, white space allowed around `=`, a value either single-quoted or running to
/// the next white space, `\` escaping the next character in both. The rest is written back
/// quoted, so tokio-postgres (same grammar) reads the same values.
fn strip_pairs(s: &str, keys: &mut Keys) -> Result<String, String> {
    let mut kept = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(format!("{key:?} in the connection string has no `= value`"));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => {
                        return Err(format!(
                            "the value of {key:?} in the connection string has no closing quote"
                        ))
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        if !keys.take(&key, &value) {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok(kept.join(" "))
}

/// libpq's `verify-ca`: the chain must reach a root in the file, the name is not checked.
/// rustls's verifier checks the chain (validity, signatures, usage) before the name, so a
/// name error means the chain passed.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(url: &str) -> (String, Keys) {
        let mut k = Keys::default();
        let rest = if url.starts_with("postgres") {
            strip_url(url, &mut k)
        } else {
            strip_pairs(url, &mut k)
        }
        .unwrap();
        (rest, k)
    }

    #[test]
    fn libpq_tls_keys_are_taken_out_of_urls_and_the_rest_left_as_written() {
        let (rest, k) = keys_of(
            "postgres://prov:p%3Fw@db.example:5433/inv?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://prov:p%3Fw@db.example:5433/inv?application_name=a&connect_timeout=3"
        );
        assert_eq!(k.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(k.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, k) = keys_of("postgresql://db/inv?sslmode=disable");
        assert_eq!(rest, "postgresql://db/inv");
        assert_eq!(k.sslmode.as_deref(), Some("disable"));
        // A '?' in the password is before the '@': not the query.
        let (rest, k) = keys_of("postgres://u:a?b@db/inv");
        assert_eq!(rest, "postgres://u:a?b@db/inv");
        assert!(k.sslmode.is_none());
    }

    #[test]
    fn libpq_tls_keys_are_taken_out_of_connection_strings_with_quotes_and_escapes() {
        let (rest, k) = keys_of(
            "host=db  dbname = inv sslmode=verify-ca sslrootcert='/etc/my ca.pem' password='it\\'s' user=a\\ b",
        );
        assert_eq!(k.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(k.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        assert_eq!(rest, "host='db' dbname='inv' password='it\\'s' user='a b'");
        // tokio-postgres reads back the same values.
        let c: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(c.get_password(), Some(&b"it's"[..]));
        assert_eq!(c.get_user(), Some("a b"));
        let mut k = Keys::default();
        let e = strip_pairs("host=db sslrootcert='/x", &mut k).unwrap_err();
        assert!(e.contains("no closing quote"), "{e}");
        let e = strip_pairs("host=db dbname", &mut k).unwrap_err();
        assert!(
            e.contains("\"dbname\" in the connection string has no `= value`"),
            "{e}"
        );
    }

    #[test]
    fn modes_mean_what_they_mean_to_libpq() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let tls = |mode: Option<&str>, root: Option<&str>, home: Option<&Path>| {
            Tls::from_keys(
                Keys {
                    sslmode: mode.map(str::to_string),
                    sslrootcert: root.map(str::to_string),
                    ..Keys::default()
                },
                home,
            )
        };
        let ca_s = ca.to_str().unwrap();
        // The default is prefer, unchecked unless a root file is there.
        let t = tls(None, None, None).unwrap();
        assert_eq!((t.mode, &t.roots), (Mode::Prefer, &Roots::None));
        assert!(t.wanted());
        assert!(!tls(Some("disable"), None, None).unwrap().wanted());
        assert!(!tls(Some("allow"), None, None).unwrap().wanted());
        let t = tls(Some("require"), Some(ca_s), None).unwrap();
        assert_eq!(t.roots, Roots::File(ca.clone()));
        // ~/.postgresql/root.crt, when there, is used by every mode that may use TLS.
        std::fs::create_dir(d.path().join(".postgresql")).unwrap();
        std::fs::write(d.path().join(".postgresql/root.crt"), "x").unwrap();
        let t = tls(Some("require"), None, Some(d.path())).unwrap();
        assert_eq!(t.roots, Roots::File(d.path().join(".postgresql/root.crt")));
        // verify-* need a root.
        let e = tls(Some("verify-full"), None, None).unwrap_err();
        assert!(e.contains("no sslrootcert names the CA"), "{e}");
        let e = tls(Some("verify-ca"), Some("/nowhere/ca.pem"), None).unwrap_err();
        assert!(e.contains("/nowhere/ca.pem: no such file"), "{e}");
        // system: verify-full by default, nothing weaker.
        let t = tls(None, Some("system"), None).unwrap();
        assert_eq!((t.mode, &t.roots), (Mode::VerifyFull, &Roots::System));
        let e = tls(Some("require"), Some("system"), None).unwrap_err();
        assert!(e.contains("needs sslmode=verify-full"), "{e}");
        let e = tls(Some("verify-everything"), None, None).unwrap_err();
        assert!(e.contains("is not one of disable"), "{e}");
        let e = Tls::from_keys(
            Keys {
                sslcert: Some(ca_s.to_string()),
                ..Keys::default()
            },
            None,
        )
        .unwrap_err();
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let (c, t) = parse("host=/run/postgresql dbname=inv sslmode=require").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Disable);
        assert_eq!(t.mode, Mode::Require);
        let (c, _) = parse("postgres://db.example/inv?sslmode=require").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        let (c, _) = parse("postgres://db.example/inv").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Prefer);
    }
}
