use super::*;
use std::os::unix::fs::symlink;

fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let fallback = d.path().join("fallback");
    std::fs::create_dir_all(root.join("efi")).unwrap();
    std::fs::create_dir_all(&fallback).unwrap();
    std::fs::write(root.join("undionly.kpxe"), b"bios").unwrap();
    std::fs::write(root.join("efi/ipxe.efi"), b"efi").unwrap();
    std::fs::write(fallback.join("snponly.efi"), b"snp").unwrap();
    std::fs::write(d.path().join("secret"), b"secret").unwrap();
    symlink(d.path().join("secret"), root.join("escape")).unwrap();
    symlink("undionly.kpxe", root.join("alias.kpxe")).unwrap();
    (d, root, fallback)
}

#[test]
fn resolves_inside_roots_in_order() {
    let (_d, root, fallback) = tree();
    let roots = vec![root.clone(), fallback.clone()];
    assert_eq!(
        resolve(&roots, "undionly.kpxe").unwrap(),
        root.join("undionly.kpxe").canonicalize().unwrap()
    );
    assert_eq!(
        resolve(&roots, "efi/ipxe.efi").unwrap(),
        root.join("efi/ipxe.efi").canonicalize().unwrap()
    );
    assert_eq!(
        resolve(&roots, "./efi/ipxe.efi").unwrap(),
        root.join("efi/ipxe.efi").canonicalize().unwrap()
    );
    assert_eq!(
        resolve(&roots, "snponly.efi").unwrap(),
        fallback.join("snponly.efi").canonicalize().unwrap()
    );
    // A symlink that stays inside the root is fine.
    assert_eq!(
        resolve(&roots, "alias.kpxe").unwrap(),
        root.join("undionly.kpxe").canonicalize().unwrap()
    );
}

#[test]
fn refuses_everything_that_leaves_the_root() {
    let (_d, root, fallback) = tree();
    let roots = vec![root, fallback];
    for (name, want) in [
        ("../secret", Refusal::BadPath("../secret".into())),
        (
            "efi/../../secret",
            Refusal::BadPath("efi/../../secret".into()),
        ),
        ("/etc/passwd", Refusal::BadPath("/etc/passwd".into())),
        ("..\\secret", Refusal::BadPath("..\\secret".into())),
        ("efi\\ipxe.efi", Refusal::BadPath("efi\\ipxe.efi".into())),
        ("a\0b", Refusal::BadPath("a\0b".into())),
        ("", Refusal::BadPath("".into())),
        ("escape", Refusal::Escapes("escape".into())),
        ("efi", Refusal::NotAFile("efi".into())),
        ("missing.efi", Refusal::NotFound("missing.efi".into())),
    ] {
        assert_eq!(resolve(&roots, name), Err(want), "{name:?}");
    }
}

#[test]
fn debian_package_links_in_the_system_root_are_followed() {
    // /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi in the Debian ipxe package (installed by
    // `make deps`).
    let roots = vec![PathBuf::from(SYSTEM_ROOT)];
    let p = resolve(&roots, "ipxe.efi").expect("the ipxe package is installed");
    assert!(p.is_file());
    assert!(resolve(&roots, "undionly.kpxe").is_ok());
    // The exception is for that root only.
    let (_d, root, _) = tree();
    assert_eq!(
        resolve(&[root], "escape"),
        Err(Refusal::Escapes("escape".into()))
    );
}
