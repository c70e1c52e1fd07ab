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

/// How long a node certificate is valid: 13 months. Short enough that a certificate nobody
/// revoked (a node retired outside provision) dies on its own within the year; a node is
/// given a new one whenever it is registered within [`RENEW_BEFORE`] of the end, so a yearly
/// `provision register` keeps a fleet current.
const NODE_CERT_VALIDITY: Duration = Duration::from_secs(397 * 86400);
/// A stored certificate this close to its end is signed anew at registration.
const RENEW_BEFORE: Duration = Duration::from_secs(60 * 86400);
/// How long a CRL is good for: a manager that loads it should fetch it again before then.
const CRL_VALIDITY: Duration = Duration::from_secs(7 * 86400);
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
    /// The subject, from the inventory.
    pub subject: String,
}

/// Who a node certificate is for, from the inventory: the certificate names these, never
/// what the node's request asked for.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    /// The machine's MAC, in the subject's serialNumber.
    pub mac: String,
    /// Its hostname: the CN and the one DNS subjectAltName (without one, the CN is the MAC).
    pub hostname: Option<String>,
    /// Its registration role, the OU.
    pub role: String,
}

impl NodeIdentity {
    fn common_name(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.mac)
    }

    fn distinguished_name(&self) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "provision");
        dn.push(DnType::OrganizationalUnitName, self.role.as_str());
        dn.push(DnType::CommonName, self.common_name());
        // serialNumber (RFC 4519 §2.31), the X.500 attribute for a device's serial.
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 5]), self.mac.as_str());
        dn
    }
}

/// A revoked node certificate, as the inventory keeps it.
#[derive(Clone, Debug)]
pub struct Revoked {
    /// The certificate, PEM (its serial is read from it).
    pub cert_pem: String,
    /// When it was revoked, Unix milliseconds.
    pub at_ms: i64,
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

/// A new ECDSA P-256 key and a self-signed TLS server certificate for `names` (DNS names, and
/// IP addresses where a name parses as one), valid ten years: the admin listener's when the
/// operator brings none. Returns (certificate PEM, PKCS#8 key PEM).
pub fn self_signed_server(common_name: &str, names: &[String]) -> anyhow::Result<(String, String)> {
    let pair = KeyPair::generate().context("generating a TLS key")?;
    let mut params = CertificateParams::new(names.to_vec()).context("the certificate's names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(10 * 365);
    let cert = params
        .self_signed(&pair)
        .context("signing the certificate")?;
    Ok((cert.pem(), pair.serialize_pem()))
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

    /// Whether `cert_pem` was signed by this CA for `who` and is not within [`RENEW_BEFORE`]
    /// of its end (a changed CA, hostname or role, or an old cert, means signing anew).
    pub fn issued(&self, cert_pem: &str, who: &NodeIdentity) -> bool {
        let (Ok(ca), Ok(cert)) = (pem_der(&self.cert_pem, "CA"), pem_der(cert_pem, "cert")) else {
            return false;
        };
        let (Ok((_, ca)), Ok((_, cert))) = (
            x509_parser::parse_x509_certificate(&ca),
            x509_parser::parse_x509_certificate(&cert),
        ) else {
            return false;
        };
        let renew_at = x509_parser::time::ASN1Time::from_timestamp(
            time::OffsetDateTime::now_utc().unix_timestamp() + RENEW_BEFORE.as_secs() as i64,
        );
        let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
        };
        let subject = cert.subject();
        let names_match = first(&mut subject.iter_common_name()).as_deref()
            == Some(who.common_name())
            && first(&mut subject.iter_organizational_unit()).as_deref() == Some(who.role.as_str());
        cert.verify_signature(Some(ca.public_key())).is_ok()
            && renew_at.is_ok_and(|t| cert.validity().not_after > t)
            && names_match
    }

    /// The CA certificate, PEM: what nodes install as their CA cert and controllers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a node's CSR for `who`. Only the public key comes from the CSR (whose signature
    /// must verify, and whose key must be RSA of 2048 bits or more, or ECDSA P-256/P-384);
    /// everything else is ours: the subject and subjectAltName from the inventory, never a
    /// CA, TLS client use only, 13 months, a random serial. A CSR naming another node or the
    /// manager, or asking for CA:TRUE or server use, gets none of it.
    ///
    /// Client use only: a node connects out to its manager (OVSDB `ssl:`), so it needs no
    /// more; and since nodes trust this CA to check the manager's certificate, a node
    /// certificate good for servers could stand in for the manager. OpenSSL (OVS) checks the
    /// purpose, so a clientAuth-only certificate cannot.
    pub fn sign(&self, csr_pem: &str, who: &NodeIdentity) -> anyhow::Result<Signed> {
        let csr_pem = csr_pem.trim();
        if !csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            bail!(
                "expected a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----), got {:?}",
                crate::validate::truncate(csr_pem, 120)
            );
        }
        check_csr_key(csr_pem)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("the certificate request is not valid: {e}"))?;
        let now = time::OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.distinguished_name = who.distinguished_name();
        p.subject_alt_names = match &who.hostname {
            Some(h) => vec![rcgen::SanType::DnsName(
                h.as_str()
                    .try_into()
                    .with_context(|| format!("hostname {h:?} as a DNS name"))?,
            )],
            None => vec![],
        };
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.name_constraints = None;
        p.crl_distribution_points = vec![];
        p.custom_extensions = vec![];
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + NODE_CERT_VALIDITY;
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let subject = dn_text(&p.distinguished_name);
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| anyhow::anyhow!("signing the certificate request: {e}"))?;
        Ok(Signed {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            subject,
        })
    }

    /// The CA's revocation list (PEM) of `revoked`, good for [`CRL_VALIDITY`]: what a
    /// manager loads to refuse certificates of nodes reprovisioned or deleted.
    pub fn crl(&self, revoked: &[Revoked]) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc();
        let mut certs = Vec::with_capacity(revoked.len());
        for r in revoked {
            let der = pem_der(&r.cert_pem, "a revoked certificate")?;
            let (_, c) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| anyhow::anyhow!("a revoked certificate does not parse: {e}"))?;
            certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(c.raw_serial()),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(r.at_ms / 1000)
                    .unwrap_or(now),
                reason_code: Some(rcgen::RevocationReason::Superseded),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + CRL_VALIDITY,
            // Increases with time, as RFC 5280 §5.2.3 asks, without a counter to keep.
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .context("signing the CRL")?
            .pem()
            .context("encoding the CRL")
    }
}

/// Refuses a CSR whose key is weak or of a kind OVS's OpenSSL peers may not take: RSA below
/// 2048 bits, DSA, or an EC curve other than P-256/P-384.
fn check_csr_key(csr_pem: &str) -> anyhow::Result<()> {
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    let der = pem_der(csr_pem, "the certificate request")?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| anyhow::anyhow!("the certificate request is not valid: {e}"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let parsed = spki
        .parsed()
        .map_err(|e| anyhow::anyhow!("the certificate request's key does not parse: {e}"))?;
    let curve = || {
        spki.algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string())
    };
    match parsed {
        PublicKey::RSA(k) if k.key_size() >= 2048 => Ok(()),
        PublicKey::RSA(k) => bail!(
            "the certificate request's key is RSA of {} bits; 2048 or more is needed (ovs-pki req makes 2048)",
            k.key_size()
        ),
        PublicKey::EC(_)
            if matches!(
                curve().as_deref(),
                Some("1.2.840.10045.3.1.7" | "1.3.132.0.34")
            ) =>
        {
            Ok(())
        }
        PublicKey::EC(_) => bail!(
            "the certificate request's key is on EC curve {}; P-256 or P-384 is needed",
            curve().unwrap_or_else(|| "(unnamed)".into())
        ),
        other => bail!(
            "the certificate request's key is {}; RSA (2048 bits or more) or ECDSA P-256/P-384 is needed",
            match other {
                PublicKey::DSA(_) => "DSA",
                PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_) => "GOST",
                _ => "of an unsupported kind",
            }
        ),
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
                DnType::CustomDnType(oid) if oid == &[2, 5, 4, 5] => "serialNumber".to_string(),
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
        let s = ca.sign(&csr, &hv1()).unwrap();
        assert_eq!(
            s.subject,
            "O=provision, OU=hypervisor, CN=hv1, serialNumber=52:54:00:00:00:01"
        );
        fs::write(d.path().join("node-cert.pem"), &s.cert_pem).unwrap();
        fs::write(d.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let v = openssl(d.path(), &["verify", "-CAfile", "ca.pem", "node-cert.pem"]);
        assert!(v.contains("node-cert.pem: OK"), "{v}");
        assert!(ca.issued(&s.cert_pem, &hv1()));
        assert!(same_key(&csr, &s.cert_pem));
        let other = Ca::load_or_create(&d.path().join("other")).unwrap();
        assert!(!other.issued(&s.cert_pem, &hv1()));
        // A renamed node or a changed role gets a new certificate.
        let renamed = NodeIdentity {
            hostname: Some("hv9".into()),
            ..hv1()
        };
        assert!(!ca.issued(&s.cert_pem, &renamed));
        let gateway = NodeIdentity {
            role: "gateway".into(),
            ..hv1()
        };
        assert!(!ca.issued(&s.cert_pem, &gateway));
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
        assert!(!text.contains("TLS Web Server Authentication"), "{text}");
        assert!(
            text.contains("DNS:hv1") && !text.contains("id:1234"),
            "{text}"
        );
    }

    fn hv1() -> NodeIdentity {
        NodeIdentity {
            mac: "52:54:00:00:00:01".into(),
            hostname: Some("hv1".into()),
            role: "hypervisor".into(),
        }
    }

    /// A CSR made by openssl in `dir` with `args` after `req -new -nodes`.
    fn csr(dir: &Path, name: &str, args: &[&str]) -> String {
        let (key, req) = (format!("{name}-key.pem"), format!("{name}-req.pem"));
        let mut a = vec!["req", "-new", "-nodes", "-keyout", &key, "-out", &req];
        a.extend_from_slice(args);
        openssl(dir, &a);
        fs::read_to_string(dir.join(&req)).unwrap()
    }

    #[test]
    fn a_csr_asking_for_another_name_a_ca_or_server_use_gets_only_the_inventorys_client_cert() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&d.path().join("pki")).unwrap();
        fs::write(d.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let hostile = csr(
            d.path(),
            "hostile",
            &[
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-subj",
                "/CN=manager/O=Open vSwitch",
                "-addext",
                "subjectAltName=DNS:manager,DNS:hv2,IP:10.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=keyCertSign,cRLSign",
                "-addext",
                "extendedKeyUsage=serverAuth,codeSigning",
            ],
        );
        let s = ca.sign(&hostile, &hv1()).unwrap();
        fs::write(d.path().join("got.pem"), &s.cert_pem).unwrap();
        let text = openssl(d.path(), &["x509", "-in", "got.pem", "-noout", "-text"]);
        for absent in [
            "manager",
            "hv2",
            "10.0.0.1",
            "CA:TRUE",
            "Certificate Sign",
            "Server Authentication",
            "Code Signing",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        for present in [
            "CN = hv1",
            "OU = hypervisor",
            "DNS:hv1",
            "CA:FALSE",
            "TLS Web Client Authentication",
        ] {
            assert!(text.contains(present), "{present} not in\n{text}");
        }
        // As a server certificate, OpenSSL refuses it: it cannot stand in for the manager.
        let v = Command::new("openssl")
            .args([
                "verify",
                "-purpose",
                "sslserver",
                "-CAfile",
                "ca.pem",
                "got.pem",
            ])
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            !v.status.success(),
            "{}",
            String::from_utf8_lossy(&v.stdout)
        );
        let v = openssl(
            d.path(),
            &[
                "verify",
                "-purpose",
                "sslclient",
                "-CAfile",
                "ca.pem",
                "got.pem",
            ],
        );
        assert!(v.contains("got.pem: OK"), "{v}");
        // 13 months: valid in 396 days, gone in 398 (`-checkend` exits 1 if it will expire).
        let ends_within = |days: u64| {
            !Command::new("openssl")
                .args([
                    "x509",
                    "-in",
                    "got.pem",
                    "-noout",
                    "-checkend",
                    &(days * 86400).to_string(),
                ])
                .current_dir(d.path())
                .status()
                .unwrap()
                .success()
        };
        assert!(!ends_within(396) && ends_within(398));
        // No hostname: the MAC is the name, and no DNS name is claimed.
        let anon = NodeIdentity {
            hostname: None,
            ..hv1()
        };
        let s = ca.sign(&hostile, &anon).unwrap();
        fs::write(d.path().join("anon.pem"), &s.cert_pem).unwrap();
        let text = openssl(d.path(), &["x509", "-in", "anon.pem", "-noout", "-text"]);
        assert!(
            text.contains("CN = 52:54:00:00:00:01") && !text.contains("DNS:"),
            "{text}"
        );
    }

    #[test]
    fn weak_or_unusual_csr_keys_are_refused_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&d.path().join("pki")).unwrap();
        openssl(d.path(), &["dsaparam", "-out", "dsa-params.pem", "1024"]);
        for (name, args, want) in [
            ("rsa1024", vec!["-newkey", "rsa:1024"], "RSA of 1024 bits"),
            (
                "p521",
                vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
                "EC curve 1.3.132.0.35",
            ),
            ("dsa", vec!["-newkey", "dsa:dsa-params.pem"], "key is DSA"),
        ] {
            let mut a = args.clone();
            a.extend_from_slice(&["-subj", "/CN=hv1"]);
            let req = csr(d.path(), name, &a);
            let e = format!("{:#}", ca.sign(&req, &hv1()).unwrap_err());
            assert!(e.contains(want), "{name}: {e}");
        }
        let ok = csr(
            d.path(),
            "p384",
            &[
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-subj",
                "/CN=x",
            ],
        );
        assert!(ca.sign(&ok, &hv1()).is_ok());
    }

    #[test]
    fn the_crl_lists_revoked_certificates_and_openssl_refuses_them() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&d.path().join("pki")).unwrap();
        fs::write(d.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-subj",
            "/CN=x",
        ];
        let old = ca.sign(&csr(d.path(), "old", &ec), &hv1()).unwrap();
        let new = ca.sign(&csr(d.path(), "new", &ec), &hv1()).unwrap();
        fs::write(d.path().join("old.pem"), &old.cert_pem).unwrap();
        fs::write(d.path().join("new.pem"), &new.cert_pem).unwrap();
        let crl = ca
            .crl(&[Revoked {
                cert_pem: old.cert_pem.clone(),
                at_ms: 1_700_000_000_000,
            }])
            .unwrap();
        fs::write(d.path().join("crl.pem"), &crl).unwrap();
        let verify = |cert: &str| {
            Command::new("openssl")
                .args([
                    "verify",
                    "-crl_check",
                    "-CRLfile",
                    "crl.pem",
                    "-CAfile",
                    "ca.pem",
                    cert,
                ])
                .current_dir(d.path())
                .output()
                .unwrap()
        };
        let v = verify("old.pem");
        let said =
            String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr);
        assert!(
            !v.status.success() && said.contains("certificate revoked"),
            "{said}"
        );
        assert!(verify("new.pem").status.success());
        // An empty list is a valid CRL too (a manager can load it before anything is revoked).
        fs::write(d.path().join("crl.pem"), ca.crl(&[]).unwrap()).unwrap();
        assert!(verify("old.pem").status.success());
    }

    #[test]
    fn bad_csrs_and_mismatched_keys_are_refused_with_reasons() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path()).unwrap();
        let e = ca
            .sign("ovs-pki: command not found", &hv1())
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a PEM certificate request"), "{e}");
        let e = ca
            .sign(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
                &hv1(),
            )
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
            .sign(&fs::read_to_string(d.path().join("r.pem")).unwrap(), &hv1())
            .unwrap();
        fs::write(d.path().join("c.pem"), &s.cert_pem).unwrap();
        let v = openssl(d.path(), &["verify", "-CAfile", "cacert.pem", "c.pem"]);
        assert!(v.contains("c.pem: OK"), "{v}");
    }
}
