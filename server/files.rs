//! Boot files: names that clients ask for (over TFTP, or HTTP at `/boot/`) resolved beneath
//! the configured roots, never outside them. Used by `tftp` and `http` alike.

use std::path::{Component, Path, PathBuf};

/// Why a file was not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `..`, an absolute path, a backslash or a NUL.
    #[error("{0:?} is not a plain relative path (no '..', leading '/', backslash or NUL)")]
    BadPath(String),
    /// Not under any root.
    #[error("{0:?} not found")]
    NotFound(String),
    /// Resolves (through a symlink) outside its root.
    #[error("{0:?} leads outside its boot file root")]
    Escapes(String),
    /// A directory or special file.
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
}

/// Resolves a requested name beneath the first root that has it, refusing anything that
/// would leave the root: `..` components, absolute paths, backslashes (a Windows-style
/// separator some firmware sends, which would otherwise be a file name character here), and
/// symlinks whose target is outside the root. Returns the canonical path.
pub fn resolve(roots: &[PathBuf], name: &str) -> Result<PathBuf, Refusal> {
    check_name(name)?;
    let rel = Path::new(name);
    for root in roots {
        let candidate = root.join(rel);
        if std::fs::symlink_metadata(&candidate).is_err() {
            continue;
        }
        let Ok(real_root) = root.canonicalize() else {
            continue;
        };
        let real = candidate
            .canonicalize()
            .map_err(|_| Refusal::NotFound(name.to_string()))?;
        if !real.starts_with(&real_root) && !package_link(root, rel, &real) {
            return Err(Refusal::Escapes(name.to_string()));
        }
        if !real.is_file() {
            return Err(Refusal::NotAFile(name.to_string()));
        }
        return Ok(real);
    }
    Err(Refusal::NotFound(name.to_string()))
}

/// The directory the Debian `ipxe` package installs its binaries into.
pub const SYSTEM_ROOT: &str = "/usr/lib/ipxe";

/// The one exception to "symlinks may not leave the root": in the package-managed
/// [`SYSTEM_ROOT`], Debian links `ipxe.efi` and `ipxe.lkrn` to `/boot/`. Those links are
/// root-owned files put there by dpkg, not something a client or an operator's directory can
/// plant; a name directly in that root whose link is owned by root may resolve to a
/// root-owned regular file elsewhere.
fn package_link(root: &Path, rel: &Path, real: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if root != Path::new(SYSTEM_ROOT) || rel.components().count() != 1 {
        return false;
    }
    let link = std::fs::symlink_metadata(root.join(rel));
    let target = std::fs::metadata(real);
    matches!((link, target), (Ok(l), Ok(t)) if l.uid() == 0 && t.uid() == 0 && t.is_file())
}

/// Checks that a requested name is a plain relative path: not empty, no `..`, no leading
/// `/`, no backslash, no NUL.
pub fn check_name(name: &str) -> Result<(), Refusal> {
    let plain = Path::new(name)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if name.is_empty() || name.contains('\\') || name.contains('\0') || !plain {
        return Err(Refusal::BadPath(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
