//! provision's certificate authority for Open vSwitch nodes.
//!
//! A node makes its own key and CSR (`ovs-pki req`) and sends only the CSR; the CA here signs
//! it, so no node private key ever crosses the wire. The CA lives in `DATA/pki/`:
//! `ca-cert.pem` and `ca-key.pem` (0600). It is created on first start, or an existing
//! `ovs-pki` CA is used by copying its `switchca/cacert.pem` and `switchca/private/cakey.pem`
//! there before the first start (rcgen signs with its RSA key as well as with our ECDSA one).
//!
//! X.509 is rcgen's job (building and signing) and x509-parser's (reading back); nothing here
//! encodes ASN.1 by hand.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SerialNumber,
};
use sha2::{Digest, Sha256};

/// How long a node certificate is valid. Long, like ovs-pki's default (10 years for the CA,
/// 10 years for switch certs): a hypervisor whose cert expires silently drops off its
/// manager, and provision re-signs on every `provision register`.
const NODE_CERT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86400);
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86400);

/// The CA: its certificate (PEM, what nodes install as their CA cert) and signing key.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A node certificate signed by the CA.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// SHA-256 of the certificate's DER, `AA:BB:…` upper-case hex as `openssl x509
    /// -fingerprint -sha256` prints it, so an operator can compare the two by eye.
    pub fingerprint: String,
    /// The subject, as the node asked for it.
    pub subject: String,
}

fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// SHA-256 fingerprint of a DER certificate in `AA:BB:…` form.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pem_der(pem_text: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    let p = pem::parse(pem_text).with_context(|| format!("{what} is not PEM"))?;
    Ok(p.contents().to_vec())
}

impl Ca {
    /// Loads the CA from `dir` (`ca-cert.pem`, `ca-key.pem`), creating a new one on first
    /// start. Refuses a key file others can read and a key that does not match the cert.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Ca> {
        let cert_path = dir.join("ca-cert.pem");
        let key_path = dir.join("ca-key.pem");
        if !cert_path.exists() && !key_path.exists() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            let (cert, key) = Self::generate()?;
            write_new(&key_path, &key, 0o600)?;
            write_new(&cert_path, &cert, 0o644)?;
            tracing::info!(dir = %dir.display(), "created the node CA");
        }
        for p in [&cert_path, &key_path] {
            if !p.exists() {
                bail!(
                    "{} is missing but its partner is there; put both ca-cert.pem and ca-key.pem in {} (an ovs-pki CA: switchca/cacert.pem and switchca/private/cakey.pem), or remove both to create a new CA",
                    p.display(),
                    dir.display()
                );
            }
        }
        let mode = fs::metadata(&key_path)?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
                key_path.display(),
                mode & 0o777,
                key_path.display()
            );
        }
        let cert_pem = fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        Self::from_pem(&cert_pem, &key_pem).with_context(|| format!("the CA in {}", dir.display()))
    }

    /// A CA from PEM texts (its cert and its PKCS#8 private key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::from_pem(key_pem).context(
            "the CA key must be a PKCS#8 PEM private key (ECDSA P-256/P-384, Ed25519 or RSA); convert with `openssl pkcs8 -topk8 -nocrypt`",
        )?;
        let der = pem_der(cert_pem, "the CA certificate")?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("the CA certificate does not parse: {e}"))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            bail!("the CA key does not belong to the CA certificate");
        }
        if !x509.is_ca() {
            bail!(
                "the CA certificate is not a CA certificate (basicConstraints CA:TRUE is missing)"
            );
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| anyhow::anyhow!("reading the CA certificate: {e}"))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    fn generate() -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "provision");
        dn.push(DnType::CommonName, "provision node CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Whether `cert_pem` was signed by this CA and is not about to expire (a changed CA or
    /// an old cert means signing anew).
    pub fn issued(&self, cert_pem: &str) -> bool {
        let (Ok(ca), Ok(cert)) = (pem_der(&self.cert_pem, "CA"), pem_der(cert_pem, "cert")) else {
            return false;
        };
        let (Ok((_, ca)), Ok((_, cert))) = (
            x509_parser::parse_x509_certificate(&ca),
            x509_parser::parse_x509_certificate(&cert),
        ) else {
            return false;
        };
        let month_ahead = x509_parser::time::ASN1Time::from_timestamp(
            time::OffsetDateTime::now_utc().unix_timestamp() + 30 * 86400,
        );
        cert.verify_signature(Some(ca.public_key())).is_ok()
            && month_ahead.is_ok_and(|t| cert.validity().not_after > t)
    }

    /// The CA certificate, PEM: what nodes install as their CA cert and controllers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a node's CSR. The subject and public key come from the CSR (whose signature
    /// must verify); everything else is ours: never a CA, TLS client and server use, our
    /// validity and a random serial — a CSR cannot ask for more.
    pub fn sign(&self, csr_pem: &str) -> anyhow::Result<Signed> {
        let csr_pem = csr_pem.trim();
        if !csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            bail!(
                "expected a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----), got {:?}",
                crate::validate::truncate(csr_pem, 120)
            );
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("the certificate request is not valid: {e}"))?;
        let subject = dn_text(&csr.params.distinguished_name);
        let now = time::OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + NODE_CERT_VALIDITY;
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| anyhow::anyhow!("signing the certificate request: {e}"))?;
        Ok(Signed {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            subject,
        })
    }
}

/// Whether a certificate request and a certificate carry the same public key (the node
/// kept its key, so the certificate already issued for it still fits).
pub fn same_key(csr_pem: &str, cert_pem: &str) -> bool {
    use x509_parser::prelude::FromDer;
    let (Ok(csr), Ok(cert)) = (pem_der(csr_pem, "CSR"), pem_der(cert_pem, "certificate")) else {
        return false;
    };
    let Ok((_, csr)) = x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
    else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&cert) else {
        return false;
    };
    csr.certification_request_info.subject_pki.raw == cert.public_key().raw
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source failed");
    b[0] &= 0x7f; // positive INTEGER (RFC 5280 §4.1.2.2)
    SerialNumber::from_slice(&b)
}

fn dn_text(dn: &DistinguishedName) -> String {
    dn.iter()
        .map(|(t, v)| {
            let name = match t {
                DnType::CommonName => "CN".to_string(),
                DnType::OrganizationName => "O".to_string(),
                DnType::OrganizationalUnitName => "OU".to_string(),
                DnType::CountryName => "C".to_string(),
                DnType::StateOrProvinceName => "ST".to_string(),
                DnType::LocalityName => "L".to_string(),
                other => format!("{other:?}"),
            };
            let value = match v {
                rcgen::DnValue::PrintableString(s) => s.to_string(),
                rcgen::DnValue::Utf8String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            format!("{name}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn signs_an_openssl_csr_that_openssl_verifies_and_stays_the_same_ca() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&d.path().join("pki")).unwrap();
        let mode = fs::metadata(d.path().join("pki/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The same CA on the next start.
        let again = Ca::load_or_create(&d.path().join("pki")).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());

        openssl(
            d.path(),
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "node-key.pem",
                "-out",
                "node-req.pem",
                "-subj",
                "/O=Open vSwitch/CN=hv1 id:1234",
            ],
        );
        let csr = fs::read_to_string(d.path().join("node-req.pem")).unwrap();
        let s = ca.sign(&csr).unwrap();
        assert!(s.subject.contains("CN=hv1 id:1234"), "{}", s.subject);
        fs::write(d.path().join("node-cert.pem"), &s.cert_pem).unwrap();
        fs::write(d.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let v = openssl(d.path(), &["verify", "-CAfile", "ca.pem", "node-cert.pem"]);
        assert!(v.contains("node-cert.pem: OK"), "{v}");
        assert!(ca.issued(&s.cert_pem));
        assert!(same_key(&csr, &s.cert_pem));
        let other = Ca::load_or_create(&d.path().join("other")).unwrap();
        assert!(!other.issued(&s.cert_pem));
        let fp = openssl(
            d.path(),
            &[
                "x509",
                "-in",
                "node-cert.pem",
                "-noout",
                "-fingerprint",
                "-sha256",
            ],
        );
        assert!(fp.contains(&s.fingerprint), "{fp} vs {}", s.fingerprint);
        let text = openssl(
            d.path(),
            &["x509", "-in", "node-cert.pem", "-noout", "-text"],
        );
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }

    #[test]
    fn bad_csrs_and_mismatched_keys_are_refused_with_reasons() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path()).unwrap();
        let e = ca
            .sign("ovs-pki: command not found")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a PEM certificate request"), "{e}");
        let e = ca
            .sign("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid"), "{e}");

        let other = tempfile::tempdir().unwrap();
        Ca::load_or_create(other.path()).unwrap();
        let key = fs::read_to_string(other.path().join("ca-key.pem")).unwrap();
        let e = Ca::from_pem(ca.cert_pem(), &key).err().unwrap().to_string();
        assert!(e.contains("does not belong"), "{e}");

        fs::remove_file(d.path().join("ca-key.pem")).unwrap();
        let e = Ca::load_or_create(d.path()).err().unwrap().to_string();
        assert!(e.contains("ca-key.pem is missing"), "{e}");
    }

    #[test]
    fn an_ovs_pki_ca_can_be_used() {
        // An RSA CA as `ovs-pki init` makes one, here with plain openssl so the unit tests
        // need nothing but openssl; tests/it registers real nodes against a real ovs-pki CA.
        let d = tempfile::tempdir().unwrap();
        openssl(
            d.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "cakey.pem",
                "-out",
                "cacert.pem",
                "-days",
                "3650",
                "-subj",
                "/O=Open vSwitch/CN=OVS switchca CA Certificate",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        );
        let pki = d.path().join("pki");
        fs::create_dir(&pki).unwrap();
        fs::copy(d.path().join("cacert.pem"), pki.join("ca-cert.pem")).unwrap();
        fs::copy(d.path().join("cakey.pem"), pki.join("ca-key.pem")).unwrap();
        fs::set_permissions(pki.join("ca-key.pem"), fs::Permissions::from_mode(0o600)).unwrap();
        let ca = Ca::load_or_create(&pki).unwrap();
        openssl(
            d.path(),
            &[
                "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out",
                "r.pem", "-subj", "/CN=hv2",
            ],
        );
        let s = ca
            .sign(&fs::read_to_string(d.path().join("r.pem")).unwrap())
            .unwrap();
        fs::write(d.path().join("c.pem"), &s.cert_pem).unwrap();
        let v = openssl(d.path(), &["verify", "-CAfile", "cacert.pem", "c.pem"]);
        assert!(v.contains("c.pem: OK"), "{v}");
    }
}
