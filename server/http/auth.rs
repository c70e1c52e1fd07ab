//! The admin API's bearer token: checked in constant time, rotated without a restart, and
//! guessed at a bounded rate; and the web UI's sessions, which the token opens and its
//! rotation ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// Wrong tokens an address may send in one [`WINDOW`] before it is refused outright.
pub const ALLOWED_FAILURES: u32 = 10;
/// The window wrong tokens are counted in; an address that used them up waits out the rest.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are tracked at once. Past it the oldest entry goes, so many
/// addresses cannot grow memory; each still gets only [`ALLOWED_FAILURES`] per entry.
const MAX_TRACKED: usize = 4096;

/// Why a request was not let in.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token, but not this one.
    Wrong,
    /// Too many wrong tokens from this address; try again after this long.
    TooMany(Duration),
}

struct Failures {
    count: u32,
    since: Instant,
}

/// How long a web UI session lasts from login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions held at once; past it the one closest to its end goes, so logins cannot grow
/// memory.
const MAX_SESSIONS: usize = 1024;

/// A web UI session: only the hash of its id is kept, with its CSRF token and end.
struct Session {
    csrf: String,
    ends: Instant,
}

/// The token and the failure counts.
pub struct AdminAuth {
    token: RwLock<String>,
    /// Where the token lives; `rotate` replaces it there.
    file: PathBuf,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Web UI sessions by the SHA-256 of their id: a leaked memory dump or log line of the
    /// table gives no usable cookie.
    sessions: Mutex<HashMap<String, Session>>,
}

impl AdminAuth {
    /// The token as read from (or written to) `file`.
    pub fn new(token: String, file: PathBuf) -> AdminAuth {
        AdminAuth {
            token: RwLock::new(token),
            file,
            failures: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Lets a request from `peer` with bearer token `given` in, or says why not. An address
    /// that sent [`ALLOWED_FAILURES`] wrong tokens within [`WINDOW`] is refused without its
    /// token being compared, until the window ends: at most 10 guesses a minute per address
    /// against 256 bits.
    pub fn check(&self, peer: IpAddr, given: Option<&str>) -> Result<(), Refusal> {
        let now = Instant::now();
        {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = f.get(&peer) {
                let age = now.duration_since(e.since);
                if age >= WINDOW {
                    f.remove(&peer);
                } else if e.count >= ALLOWED_FAILURES {
                    return Err(Refusal::TooMany(WINDOW - age));
                }
            }
        }
        let Some(given) = given else {
            return Err(Refusal::Missing);
        };
        let ok = {
            let t = self.token.read().unwrap_or_else(|p| p.into_inner());
            bool::from(given.as_bytes().ct_eq(t.as_bytes()))
        };
        if ok {
            return Ok(());
        }
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= MAX_TRACKED && !f.contains_key(&peer) {
            f.retain(|_, e| now.duration_since(e.since) < WINDOW);
            if f.len() >= MAX_TRACKED {
                if let Some(oldest) = f.iter().min_by_key(|(_, e)| e.since).map(|(k, _)| *k) {
                    f.remove(&oldest);
                }
            }
        }
        let e = f.entry(peer).or_insert(Failures {
            count: 0,
            since: now,
        });
        e.count += 1;
        if e.count == ALLOWED_FAILURES {
            tracing::warn!(%peer, "{ALLOWED_FAILURES} wrong admin tokens within {}s: this address is refused until the minute is over", WINDOW.as_secs());
        }
        Err(Refusal::Wrong)
    }

    /// Opens a web UI session for a caller that showed the token: returns the cookie's
    /// random id and the session's CSRF token.
    pub fn start_session(&self) -> (String, String) {
        let (id, csrf) = (crate::keys::random_token(), crate::keys::random_token());
        let now = Instant::now();
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() >= MAX_SESSIONS {
            s.retain(|_, v| v.ends > now);
            if s.len() >= MAX_SESSIONS {
                if let Some(k) = s.iter().min_by_key(|(_, v)| v.ends).map(|(k, _)| k.clone()) {
                    s.remove(&k);
                }
            }
        }
        s.insert(
            crate::keys::token_hash(&id),
            Session {
                csrf: csrf.clone(),
                ends: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The CSRF token of the live session with cookie id `id`, if there is one.
    pub fn session(&self, id: &str) -> Option<String> {
        let key = crate::keys::token_hash(id);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match s.get(&key) {
            Some(v) if v.ends > Instant::now() => Some(v.csrf.clone()),
            Some(_) => {
                s.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session with cookie id `id` (logout).
    pub fn end_session(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&crate::keys::token_hash(id));
    }

    /// Replaces the token with a new random one: the file first (written whole, 0600), then
    /// the one requests are checked against, so a failed write changes nothing. Returns the
    /// new token and the file it is in.
    pub fn rotate(&self) -> anyhow::Result<(String, PathBuf)> {
        let t = crate::keys::random_token();
        crate::keys::replace_file(&self.file, format!("{t}\n").as_bytes(), 0o600)?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = t.clone();
        // A session is the old token's stand-in: it ends with it.
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::info!(file = %self.file.display(), "admin token rotated; web UI sessions ended");
        Ok((t, self.file.clone()))
    }

    #[cfg(test)]
    pub fn for_tests(token: &str) -> AdminAuth {
        AdminAuth::new(
            token.into(),
            std::env::temp_dir().join("provision-test-admin-token"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn ten_wrong_tokens_lock_an_address_out_for_the_window_and_only_it() {
        let a = AdminAuth::for_tests(T);
        let (bad, good): (IpAddr, IpAddr) =
            ("10.0.0.9".parse().unwrap(), "10.0.0.1".parse().unwrap());
        assert_eq!(a.check(bad, None), Err(Refusal::Missing));
        for _ in 0..ALLOWED_FAILURES {
            assert_eq!(a.check(bad, Some("guess")), Err(Refusal::Wrong));
        }
        // Now even the right token is not compared: the guesser learns nothing more.
        match a.check(bad, Some(T)) {
            Err(Refusal::TooMany(left)) => {
                assert!(left <= WINDOW && left > Duration::from_secs(50))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.check(good, Some(T)), Ok(()));
        // The window over, the address is heard again.
        a.failures.lock().unwrap().get_mut(&bad).unwrap().since -= WINDOW;
        assert_eq!(a.check(bad, Some(T)), Ok(()));
    }

    #[test]
    fn many_guessing_addresses_cannot_grow_the_table() {
        let a = AdminAuth::for_tests(T);
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(a.check(ip, Some("guess")), Err(Refusal::Wrong));
        }
        assert_eq!(a.failures.lock().unwrap().len(), MAX_TRACKED);
    }

    #[test]
    fn rotation_replaces_the_file_and_the_token_checked() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("admin-token");
        std::fs::write(&file, format!("{T}\n")).unwrap();
        let a = AdminAuth::new(T.into(), file.clone());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (new, path) = a.rotate().unwrap();
        assert_eq!(path, file);
        assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(a.check(ip, Some(T)), Err(Refusal::Wrong));
        assert_eq!(a.check(ip, Some(&new)), Ok(()));
    }

    #[test]
    fn sessions_end_at_logout_expiry_and_rotation_and_stay_bounded() {
        let d = tempfile::tempdir().unwrap();
        let a = AdminAuth::new(T.into(), d.path().join("admin-token"));
        let (id, csrf) = a.start_session();
        assert_ne!(id, csrf);
        assert_eq!(a.session(&id), Some(csrf));
        assert_eq!(a.session("not-a-session"), None);
        a.end_session(&id);
        assert_eq!(a.session(&id), None);

        let (id, _) = a.start_session();
        // Only the hash of the id is kept.
        assert!(!a.sessions.lock().unwrap().contains_key(&id));
        a.sessions
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|s| s.ends = Instant::now());
        assert_eq!(a.session(&id), None);

        let (id, _) = a.start_session();
        a.rotate().unwrap();
        assert_eq!(a.session(&id), None);

        for _ in 0..MAX_SESSIONS + 10 {
            a.start_session();
        }
        assert_eq!(a.sessions.lock().unwrap().len(), MAX_SESSIONS);
    }
}
