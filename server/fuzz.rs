//! What the fuzz targets in `fuzz/` run, and the test that runs each target over its corpus
//! in `make test` (stable Rust, seconds), so a regression a fuzzer once found fails CI.
//!
//! Each entry point takes untrusted bytes the way the daemon does and asserts what must hold
//! for any input; a panic is a finding.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::dhcp::packet::{self, BootFiles};
use crate::dto::{EnrollRequest, UpdateRequest};

/// A DHCP packet through validate → classify → boot target → reply, in both ports' shapes.
/// Holds: a ProxyDHCP reply never carries an address, and every reply parses back as DHCP.
pub fn dhcp(data: &[u8]) {
    let Ok(req) = packet::classify(data) else {
        return;
    };
    let server = std::net::Ipv4Addr::new(10, 0, 0, 1);
    let files = BootFiles::default();
    for base in ["http://10.0.0.1:8080", "http://[fd00::1]:8080/pxe"] {
        let Ok(target) = packet::boot_target(&req, &files, base) else {
            continue;
        };
        let reply = packet::reply(&req, server, &target);
        let back = packet::parse_reply_for_fuzz(&reply);
        assert_eq!(
            back,
            Some(std::net::Ipv4Addr::UNSPECIFIED),
            "a proxy reply hands out no address"
        );
    }
    let nak = packet::nak(&req, server);
    assert!(packet::parse_reply_for_fuzz(&nak).is_some());
}

/// A TFTP request through parse → resolve → option negotiation, against a root that holds a
/// file, a subdirectory and a symlink out of it.
pub fn tftp(data: &[u8]) {
    static ROOT: OnceLock<(tempfile::TempDir, Vec<PathBuf>)> = OnceLock::new();
    let (_, roots) = ROOT.get_or_init(|| {
        let d = tempfile::tempdir().expect("a temporary directory");
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("arm64")).unwrap();
        std::fs::write(root.join("undionly.kpxe"), vec![0u8; 70_000]).unwrap();
        std::fs::write(root.join("arm64/ipxe.efi"), b"MZ").unwrap();
        std::fs::write(d.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("link")).unwrap();
        let roots = vec![root];
        (d, roots)
    });
    crate::tftp::fuzz_request(roots, data);
}

/// An API body: an enroll request (validated and trial-rendered with every artifact of its
/// profile, as `POST /machines` does) or an update request. Holds: no panic, and what the
/// checks accept renders.
pub fn api(data: &[u8]) {
    api_accepts(data);
}

/// [`api`], saying whether the body was an enroll request the checks accepted.
fn api_accepts(data: &[u8]) -> bool {
    static RENDERER: OnceLock<crate::render::Renderer> = OnceLock::new();
    let r = RENDERER.get_or_init(|| {
        crate::render::Renderer::new(
            crate::render::Sources::default(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 fuzz"
                .into(),
        )
        .expect("the built-in catalog loads")
    });
    let _ = serde_json::from_slice::<UpdateRequest>(data);
    match serde_json::from_slice::<EnrollRequest>(data) {
        Ok(req) => crate::admin::checked_enrollment(r, &Default::default(), req).is_ok(),
        Err(_) => false,
    }
}

/// An inventory file, as `POST /inventory` reads it, in each format. Holds: no panic, and a
/// file that parses is written and read back as the same document (what `export` then
/// `apply` relies on).
pub fn inventory(data: &[u8]) {
    use crate::declare::{parse, write, Format};
    let text = String::from_utf8_lossy(data);
    for format in [Format::Yaml, Format::Toml, Format::Csv] {
        let Ok(parsed) = parse(&text, format) else {
            continue;
        };
        let written = write(&parsed.doc, format).expect("a parsed document writes");
        let back = parse(&written, format)
            .unwrap_or_else(|e| panic!("{format} written does not read back: {e}\n{written}"));
        assert_eq!(back.doc, parsed.doc, "{format} round trip:\n{written}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of every corpus in `fuzz/corpus/<target>/` through its target.
    #[test]
    fn every_fuzz_corpus_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 4] = [
            ("dhcp", dhcp),
            ("tftp", tftp),
            ("api", api),
            ("inventory", inventory),
        ];
        for (name, run) in targets {
            let dir = root.join(name);
            let mut n = 0;
            for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let p = e.unwrap().path();
                let data = std::fs::read(&p).unwrap();
                let r = std::panic::catch_unwind(|| run(&data));
                assert!(r.is_ok(), "fuzz target {name} panics on {}", p.display());
                n += 1;
            }
            assert!(n >= 5, "{name}: only {n} corpus files");
        }
        // The API corpus reaches rendering: every built-in profile's plain enroll passes.
        let accepted = std::fs::read_dir(root.join("api"))
            .unwrap()
            .filter(|e| {
                let p = e.as_ref().unwrap().path();
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("enroll-")
                    && api_accepts(&std::fs::read(&p).unwrap())
            })
            .count();
        assert_eq!(
            accepted, 5,
            "every built-in profile's enroll seed is accepted"
        );
    }
}
