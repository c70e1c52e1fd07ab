//! The codemap's seams, checked against the source: each third-party protocol or storage
//! crate is used only in its home module, and `policy/` stays pure (ARCHITECTURE.md,
//! "Invariants").

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every source file under `server/`, as (path relative to `server/`, code without comments).
fn code() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("server");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            let code: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            (rel, code.join("\n"))
        })
        .collect()
}

/// Whether `code` names `krate` as a path (`krate::...`, `use krate`), not merely a word.
fn uses(code: &str, krate: &str) -> bool {
    code.match_indices(krate).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = &code[i + krate.len()..];
        let boundary = !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        boundary && (after.starts_with("::") || after.starts_with(';') || after.starts_with(" as "))
    })
}

#[test]
fn each_crate_is_used_only_in_its_home() {
    // crate → the files or directories (relative to server/) that may use it.
    let homes: &[(&str, &[&str])] = &[
        ("rusqlite", &["store/"]),
        ("rusqlite_migration", &["store/"]),
        ("tokio_postgres", &["store/"]),
        ("deadpool_postgres", &["store/"]),
        ("minijinja", &["render/"]),
        ("dhcproto", &["dhcp/"]),
        ("russh", &["registrar/"]),
        ("axum", &["http/"]),
        ("tower_http", &["http/"]),
        ("hyper", &["http/", "client.rs"]),
        ("hyper_util", &["http/", "client.rs"]),
        ("rustls", &["tls.rs", "client.rs", "store/pg_tls.rs"]),
        ("tokio_postgres_rustls", &["store/"]),
        ("rustls_native_certs", &["store/pg_tls.rs"]),
        ("tokio_rustls", &["http/admin_listener.rs", "client.rs"]),
        ("httparse", &["http/"]),
        ("rcgen", &["pki.rs"]),
        ("x509_parser", &["pki.rs"]),
        ("prometheus", &["metrics.rs"]),
        ("saphyr_parser", &["declare.rs"]),
        ("toml_edit", &["declare.rs"]),
        ("csv", &["declare.rs"]),
    ];
    let mut wrong = Vec::new();
    for (file, code) in code() {
        for (krate, allowed) in homes {
            let home = allowed.iter().any(|a| file.starts_with(a));
            if !home && !file.ends_with("invariants_tests.rs") && uses(&code, krate) {
                wrong.push(format!("{file} uses {krate} (its home: {allowed:?})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "crates used outside their home:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn policy_does_no_io_and_nothing_async() {
    let forbidden = [
        "async ",
        ".await",
        "tokio",
        "std::fs",
        "std::io",
        "std::net",
        "std::thread",
        "std::process",
        "std::time",
        "std::sync",
        "crate::store",
        "crate::render",
        "crate::http",
        "crate::dhcp",
        "crate::tftp",
        "crate::registrar",
    ];
    let mut wrong = Vec::new();
    for (file, code) in code() {
        if !file.starts_with("policy/") {
            continue;
        }
        for f in forbidden {
            if code.contains(f) {
                wrong.push(format!("{file} contains {f:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "policy/ must stay pure:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_itself_sees_a_use() {
    assert!(uses("use rusqlite::Connection;", "rusqlite"));
    assert!(uses("let c = rusqlite::Connection::open(p);", "rusqlite"));
    assert!(!uses("let rusqlite_like = 1;", "rusqlite"));
    assert!(!uses("crate::store::rusqlite_x", "rusqlite"));
    assert!(!uses("rusqlite_migration::Migrations", "rusqlite"));
}

#[test]
fn the_ui_goes_through_the_admin_service() {
    // The web UI may use the admin service (as the API does) and the store's plain query
    // types, never the inventory itself, the boot service, or another way to the database.
    let (_, ui) = code()
        .into_iter()
        .find(|(f, _)| f == "http/ui.rs")
        .expect("http/ui.rs exists");
    let forbidden = [
        "Inventory",
        "st.boot",
        ".boot.",
        "SqlInventory",
        "registrar::Handle",
        "crate::render::Renderer",
    ];
    let wrong: Vec<&str> = forbidden
        .iter()
        .copied()
        .filter(|f| ui.contains(f))
        .collect();
    assert!(
        wrong.is_empty(),
        "http/ui.rs reaches past the admin service: {wrong:?}"
    );
    assert!(ui.contains("st.admin."), "the check reads the real file");
}
