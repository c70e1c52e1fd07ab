//! The inventory: the only module that speaks SQL.
//!
//! SQLite is the single source of truth; nothing keeps an in-memory copy of machines to go
//! stale. The database runs in WAL mode with `synchronous=FULL`, so a write that returned is on
//! disk (a crash loses no acknowledged write), with foreign keys on. Every read-then-write runs
//! in a `BEGIN IMMEDIATE` transaction, and every state change writes its event row in the same
//! transaction as the change.
//!
//! The connection sits behind a `std::sync::Mutex`: the lock is never held across an `.await`
//! (callers in async code go through `spawn_blocking`, see `provisioner`), so an async mutex
//! would buy nothing (mini-redis's db.rs makes the same argument).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use include_dir::{include_dir, Dir};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use rusqlite_migration::Migrations;
use serde::Serialize;

use crate::mac::Mac;
use crate::policy::{self, IllegalTransition, State, Transition};

mod leases;
#[cfg(test)]
mod tests;

pub use leases::{Lease, Pool};

static MIGRATIONS_DIR: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations");

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No machine with that MAC.
    #[error("no machine with MAC {0}")]
    NotFound(Mac),
    /// Enrolling a MAC that is already enrolled.
    #[error("machine {0} is already enrolled (state {1}); change it with `machines update`, or `machines reprovision` it")]
    AlreadyEnrolled(Mac, State),
    /// The lifecycle refuses the change.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// An install token that is unknown, expired or already used; with the machine it was
    /// issued to, when that is known.
    #[error("{0}")]
    Token(TokenProblem, Option<Mac>),
    /// SQLite itself failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// A stored JSON column did not parse (the file was edited by hand?).
    #[error("corrupt JSON in column {0}: {1}")]
    Json(&'static str, serde_json::Error),
}

/// Why an install token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    /// No token with that hash exists (never issued, or replaced by a newer one).
    Unknown,
    /// The token's lifetime ran out.
    Expired,
    /// The token was burnt by a phone-home.
    Used,
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenProblem::Unknown => {
                "unknown install token (never issued, or replaced by a newer boot or a reprovision)"
            }
            TokenProblem::Expired => "install token expired; reprovision the machine",
            TokenProblem::Used => "install token already used by a phone-home",
        })
    }
}

/// Result type of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A machine as stored.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Machine {
    /// The key: normalised MAC.
    pub mac: Mac,
    /// SMBIOS UUID as iPXE reports it, if known.
    pub uuid: Option<String>,
    /// Serial number, if known.
    pub serial: Option<String>,
    /// Hostname given at enroll.
    pub hostname: Option<String>,
    /// The profile it installs.
    pub profile: Option<String>,
    /// Lifecycle state.
    pub state: State,
    /// Template variables.
    pub vars: BTreeMap<String, String>,
    /// Labels (for group selectors and inventory grouping).
    pub labels: BTreeMap<String, String>,
    /// Install generation: bumped on every reprovision.
    pub generation: i64,
    /// `${buildarch}` seen at the last boot.
    pub arch: Option<String>,
    /// `${platform}` seen at the last boot.
    pub platform: Option<String>,
    /// Source address of the last boot request.
    pub last_ip: Option<String>,
    /// The step that failed, in state `failed`.
    pub failed_step: Option<String>,
    /// Why it failed, in state `failed`.
    pub failed_reason: Option<String>,
    /// SSH host public keys pinned at phone-home (OpenSSH one-line form).
    pub host_keys: Vec<String>,
    /// When the installer fetched its profile's `local_boot_after` artifact (this install).
    pub installer_done_at: Option<i64>,
    /// The current registration run's finished steps, in role order.
    pub register_steps: Vec<StepRecord>,
    /// SHA-256 fingerprint of the node certificate provision's CA signed for it.
    pub cert_fingerprint: Option<String>,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last change, Unix ms.
    pub updated_at: i64,
}

/// One finished step of a registration run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepRecord {
    /// Position in the role.
    pub seq: i64,
    /// Step name from the role definition.
    pub name: String,
    /// `ok` or `failed`.
    pub status: String,
    /// The remote command's exit status, if it ran.
    pub exit_code: Option<i64>,
    /// An excerpt of its output (or why it did not run).
    pub output: String,
    /// When it finished, Unix ms.
    pub at: i64,
}

/// One row of the append-only history.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// Monotonic id; page with `after`.
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    /// The machine, if the event is about one.
    pub mac: Option<String>,
    /// What happened (`enrolled`, `ipxe_served`, `config_served`, ...).
    pub kind: String,
    /// State before, for transitions.
    pub from_state: Option<String>,
    /// State after, for transitions.
    pub to_state: Option<String>,
    /// Details in words.
    pub detail: String,
}

/// What the operator gives at enroll.
#[derive(Clone, Debug, Default)]
pub struct NewMachine {
    /// The MAC.
    pub mac: Option<Mac>,
    /// Profile name (already checked to exist by the caller).
    pub profile: String,
    /// Hostname (validated by the caller).
    pub hostname: Option<String>,
    /// SMBIOS UUID.
    pub uuid: Option<String>,
    /// Serial.
    pub serial: Option<String>,
    /// Variables.
    pub vars: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A change to an existing machine; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct MachinePatch {
    /// New profile.
    pub profile: Option<String>,
    /// New hostname (`Some(None)` clears it).
    pub hostname: Option<Option<String>>,
    /// Replaces all variables.
    pub vars: Option<BTreeMap<String, String>>,
    /// Replaces all labels.
    pub labels: Option<BTreeMap<String, String>>,
}

/// What a boot request said about the machine, kept for the operator.
#[derive(Clone, Debug, Default)]
pub struct Sighting {
    /// `${uuid}`.
    pub uuid: Option<String>,
    /// `${buildarch}`.
    pub arch: Option<String>,
    /// `${platform}`.
    pub platform: Option<String>,
    /// Source IP.
    pub ip: Option<String>,
}

/// A handle on the inventory database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

const MACHINE_COLS: &str =
    "mac, uuid, serial, hostname, profile, state, vars, labels, generation, \
     arch, platform, last_ip, failed_step, failed_reason, created_at, updated_at, \
     (SELECT t.handed_over_at FROM install_tokens t WHERE t.mac = machines.mac), \
     (SELECT c.fingerprint FROM node_certs c WHERE c.mac = machines.mac)";

fn json_map(col: &'static str, s: String) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(&s).map_err(|e| StoreError::Json(col, e))
}

fn map_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).expect("a map of strings always serialises")
}

/// A machine row before its host keys are attached.
fn machine_from_row(row: &Row<'_>) -> rusqlite::Result<(Machine, String, String)> {
    let mac: String = row.get(0)?;
    let state: String = row.get(5)?;
    let conv = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    Ok((
        Machine {
            mac: mac
                .parse()
                .map_err(|e: crate::mac::MacError| conv(0, e.to_string()))?,
            uuid: row.get(1)?,
            serial: row.get(2)?,
            hostname: row.get(3)?,
            profile: row.get(4)?,
            state: state.parse().map_err(|e| conv(5, e))?,
            vars: BTreeMap::new(),
            labels: BTreeMap::new(),
            generation: row.get(8)?,
            arch: row.get(9)?,
            platform: row.get(10)?,
            last_ip: row.get(11)?,
            failed_step: row.get(12)?,
            failed_reason: row.get(13)?,
            host_keys: Vec::new(),
            register_steps: Vec::new(),
            cert_fingerprint: row.get(17)?,
            created_at: row.get(14)?,
            updated_at: row.get(15)?,
            installer_done_at: row.get(16)?,
        },
        row.get(6)?,
        row.get(7)?,
    ))
}

fn finish_machine(conn: &Connection, parts: (Machine, String, String)) -> Result<Machine> {
    let (mut m, vars, labels) = parts;
    m.vars = json_map("vars", vars)?;
    m.labels = json_map("labels", labels)?;
    let mut stmt =
        conn.prepare_cached("SELECT key FROM host_keys WHERE mac = ?1 ORDER BY algorithm")?;
    m.host_keys = stmt
        .query_map([m.mac.to_string()], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT seq, name, status, exit_code, output, at FROM register_steps WHERE mac = ?1 ORDER BY seq",
    )?;
    m.register_steps = stmt
        .query_map([m.mac.to_string()], |r| {
            Ok(StepRecord {
                seq: r.get(0)?,
                name: r.get(1)?,
                status: r.get(2)?,
                exit_code: r.get(3)?,
                output: r.get(4)?,
                at: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(m)
}

fn load(conn: &Connection, mac: Mac) -> Result<Option<Machine>> {
    let parts = conn
        .query_row(
            &format!("SELECT {MACHINE_COLS} FROM machines WHERE mac = ?1"),
            [mac.to_string()],
            machine_from_row,
        )
        .optional()?;
    parts.map(|p| finish_machine(conn, p)).transpose()
}

fn must_load(conn: &Connection, mac: Mac) -> Result<Machine> {
    load(conn, mac)?.ok_or(StoreError::NotFound(mac))
}

fn insert_event(
    tx: &Connection,
    now: i64,
    mac: Option<Mac>,
    kind: &str,
    from: Option<State>,
    to: Option<State>,
    detail: &str,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO events (at, mac, kind, from_state, to_state, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now,
        mac.map(|m| m.to_string()),
        kind,
        from.map(State::as_str),
        to.map(State::as_str),
        detail
    ])?;
    Ok(())
}

/// Moves `mac` through `t`, writing the state and its event; returns the new state.
fn apply(
    tx: &Transaction<'_>,
    now: i64,
    m: &Machine,
    t: Transition,
    detail: &str,
) -> Result<State> {
    let to = policy::transition(m.state, t)?;
    let (step, reason) = if to == State::Failed {
        let (s, r) = detail.split_once(": ").unwrap_or(("", detail));
        (Some(s), Some(r))
    } else {
        (None, None)
    };
    tx.execute(
        "UPDATE machines SET state = ?2, updated_at = ?3, failed_step = ?4, failed_reason = ?5 WHERE mac = ?1",
        params![m.mac.to_string(), to.as_str(), now, step, reason],
    )?;
    insert_event(
        tx,
        now,
        Some(m.mac),
        t.event_kind(),
        Some(m.state),
        Some(to),
        detail,
    )?;
    Ok(to)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        // WAL lets readers proceed during a write; FULL syncs the WAL on every commit, so an
        // acknowledged write survives power loss (NORMAL would not, in WAL mode).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let migrations = Migrations::from_directory(&MIGRATIONS_DIR)?;
        migrations.to_latest(&mut conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (an open
        // transaction rolls back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// The machine with this MAC, if any.
    pub fn machine(&self, mac: Mac) -> Result<Option<Machine>> {
        load(&self.lock(), mac)
    }

    /// All machines, optionally only those in `state`, ordered by MAC.
    pub fn machines(&self, state: Option<State>) -> Result<Vec<Machine>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE ?1 IS NULL OR state = ?1 ORDER BY mac"
        ))?;
        let parts: Vec<_> = stmt
            .query_map([state.map(State::as_str)], machine_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        parts
            .into_iter()
            .map(|p| finish_machine(&conn, p))
            .collect()
    }

    /// Enrolls a machine: creates it, or moves a discovered one to `enrolled`.
    pub fn enroll(&self, new: &NewMachine, now: i64) -> Result<Machine> {
        let mac = new.mac.expect("enroll needs a MAC");
        self.write(|tx| {
            let detail = format!(
                "profile {}{}",
                new.profile,
                new.hostname
                    .as_deref()
                    .map(|h| format!(", hostname {h}"))
                    .unwrap_or_default()
            );
            match load(tx, mac)? {
                Some(m) if m.state != State::Discovered => {
                    return Err(StoreError::AlreadyEnrolled(mac, m.state))
                }
                Some(m) => {
                    tx.execute(
                        "UPDATE machines SET profile = ?2, hostname = ?3, uuid = COALESCE(?4, uuid),
                         serial = COALESCE(?5, serial), vars = ?6, labels = ?7, updated_at = ?8
                         WHERE mac = ?1",
                        params![
                            mac.to_string(),
                            new.profile,
                            new.hostname,
                            new.uuid,
                            new.serial,
                            map_json(&new.vars),
                            map_json(&new.labels),
                            now
                        ],
                    )?;
                    apply(tx, now, &m, Transition::Enroll, &detail)?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO machines (mac, uuid, serial, hostname, profile, state, vars, labels,
                         created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, 'enrolled', ?6, ?7, ?8, ?8)",
                        params![
                            mac.to_string(),
                            new.uuid,
                            new.serial,
                            new.hostname,
                            new.profile,
                            map_json(&new.vars),
                            map_json(&new.labels),
                            now
                        ],
                    )?;
                    insert_event(tx, now, Some(mac), "enrolled", None, Some(State::Enrolled), &detail)?;
                }
            }
            must_load(tx, mac)
        })
    }

    /// Changes profile, hostname, vars or labels of a machine; records an `updated` event.
    pub fn update(&self, mac: Mac, patch: &MachinePatch, now: i64) -> Result<Machine> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            let mut changed = Vec::new();
            if let Some(p) = &patch.profile {
                tx.execute(
                    "UPDATE machines SET profile = ?2 WHERE mac = ?1",
                    params![mac.to_string(), p],
                )?;
                changed.push(format!("profile {p}"));
            }
            if let Some(h) = &patch.hostname {
                tx.execute(
                    "UPDATE machines SET hostname = ?2 WHERE mac = ?1",
                    params![mac.to_string(), h],
                )?;
                changed.push(format!("hostname {}", h.as_deref().unwrap_or("(none)")));
            }
            if let Some(v) = &patch.vars {
                tx.execute(
                    "UPDATE machines SET vars = ?2 WHERE mac = ?1",
                    params![mac.to_string(), map_json(v)],
                )?;
                changed.push(format!(
                    "vars {}",
                    v.keys().cloned().collect::<Vec<_>>().join(",")
                ));
            }
            if let Some(l) = &patch.labels {
                tx.execute(
                    "UPDATE machines SET labels = ?2 WHERE mac = ?1",
                    params![mac.to_string(), map_json(l)],
                )?;
                changed.push(format!(
                    "labels {}",
                    l.keys().cloned().collect::<Vec<_>>().join(",")
                ));
            }
            tx.execute(
                "UPDATE machines SET updated_at = ?2 WHERE mac = ?1",
                params![mac.to_string(), now],
            )?;
            insert_event(
                tx,
                now,
                Some(mac),
                "updated",
                Some(m.state),
                Some(m.state),
                &changed.join("; "),
            )?;
            must_load(tx, mac)
        })
    }

    /// Deletes a machine with its token and host keys; its events stay, plus a `deleted` one.
    pub fn delete(&self, mac: Mac, now: i64) -> Result<()> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            tx.execute("DELETE FROM machines WHERE mac = ?1", [mac.to_string()])?;
            insert_event(tx, now, Some(mac), "deleted", Some(m.state), None, "")
        })
    }

    /// Records a boot request from a MAC: creates it as `discovered` (with a `discovered`
    /// event) if it was never seen, and keeps what the request said. Returns the machine.
    pub fn sighted(&self, mac: Mac, s: &Sighting, now: i64) -> Result<Machine> {
        self.write(|tx| {
            let existed = load(tx, mac)?.is_some();
            if !existed {
                tx.execute(
                    "INSERT INTO machines (mac, state, created_at, updated_at) VALUES (?1, 'discovered', ?2, ?2)",
                    params![mac.to_string(), now],
                )?;
                let detail = format!(
                    "first boot request{}{}",
                    s.ip.as_deref().map(|ip| format!(" from {ip}")).unwrap_or_default(),
                    s.arch.as_deref().map(|a| format!(", arch {a}")).unwrap_or_default()
                );
                insert_event(tx, now, Some(mac), "discovered", None, Some(State::Discovered), &detail)?;
            }
            tx.execute(
                "UPDATE machines SET uuid = COALESCE(uuid, ?2), arch = COALESCE(?3, arch),
                 platform = COALESCE(?4, platform), last_ip = COALESCE(?5, last_ip) WHERE mac = ?1",
                params![mac.to_string(), s.uuid, s.arch, s.platform, s.ip],
            )?;
            must_load(tx, mac)
        })
    }

    /// Hands the installer of `mac` a new install token (only its hash is given here):
    /// `enrolled → installing`, or, for a machine already `installing` whose installer booted
    /// again before phoning home, an `install_restarted` event. Any older token is replaced.
    pub fn start_install(
        &self,
        mac: Mac,
        token_hash: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<Machine> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            let detail = format!(
                "profile {}, generation {}, token expires {}",
                m.profile.as_deref().unwrap_or("?"),
                m.generation,
                crate::store::fmt_time(expires_at)
            );
            if m.state == State::Installing {
                insert_event(
                    tx,
                    now,
                    Some(mac),
                    "install_restarted",
                    Some(m.state),
                    Some(m.state),
                    &detail,
                )?;
            } else {
                apply(tx, now, &m, Transition::StartInstall, &detail)?;
            }
            tx.execute(
                "INSERT INTO install_tokens (mac, hash, generation, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (mac) DO UPDATE SET hash = ?2, generation = ?3, created_at = ?4,
                 expires_at = ?5, burnt_at = NULL, handed_over_at = NULL",
                params![mac.to_string(), token_hash, m.generation, now, expires_at],
            )?;
            must_load(tx, mac)
        })
    }

    fn token_machine(conn: &Connection, token_hash: &str, now: i64) -> Result<Machine> {
        let row: Option<(String, i64, Option<i64>, i64)> = conn
            .query_row(
                "SELECT t.mac, t.expires_at, t.burnt_at, t.generation FROM install_tokens t
                 WHERE t.hash = ?1",
                [token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((mac, expires_at, burnt_at, generation)) = row else {
            return Err(StoreError::Token(TokenProblem::Unknown, None));
        };
        let mac: Mac = mac
            .parse()
            .map_err(|_| StoreError::Token(TokenProblem::Unknown, None))?;
        if burnt_at.is_some() {
            return Err(StoreError::Token(TokenProblem::Used, Some(mac)));
        }
        if now >= expires_at {
            return Err(StoreError::Token(TokenProblem::Expired, Some(mac)));
        }
        let m = must_load(conn, mac)?;
        // A token names one install generation; after a reprovision it is dead even if a row
        // somehow survived.
        if m.generation != generation || m.state != State::Installing {
            return Err(StoreError::Token(TokenProblem::Unknown, Some(mac)));
        }
        Ok(m)
    }

    /// The machine a live install token belongs to, or why the token is not live.
    pub fn machine_by_token(&self, token_hash: &str, now: i64) -> Result<Machine> {
        Self::token_machine(&self.lock(), token_hash, now)
    }

    /// Phone-home: with a live token, pins the posted SSH host keys (`(algorithm, key)`
    /// pairs), moves `installing → installed`, and burns the token, all in one transaction.
    pub fn phone_home(
        &self,
        token_hash: &str,
        host_keys: &[(String, String)],
        from_ip: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Machine> {
        self.write(|tx| {
            let m = Self::token_machine(tx, token_hash, now)?;
            let mac = m.mac.to_string();
            tx.execute("DELETE FROM host_keys WHERE mac = ?1", [&mac])?;
            for (alg, key) in host_keys {
                tx.execute(
                    "INSERT OR REPLACE INTO host_keys (mac, algorithm, key, added_at) VALUES (?1, ?2, ?3, ?4)",
                    params![mac, alg, key, now],
                )?;
            }
            apply(tx, now, &m, Transition::PhoneHome, detail)?;
            if let Some(ip) = from_ip {
                // The registrar's SSH target: the address the installed OS spoke from.
                tx.execute("UPDATE machines SET last_ip = ?2 WHERE mac = ?1", params![mac, ip])?;
            }
            tx.execute("UPDATE install_tokens SET burnt_at = ?2 WHERE mac = ?1", params![mac, now])?;
            must_load(tx, m.mac)
        })
    }

    /// Records that the installer of an `installing` machine fetched its last artifact, so
    /// its next network boots go to the disk it is writing. Returns true if this was news.
    pub fn installer_done(&self, mac: Mac, detail: &str, now: i64) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE install_tokens SET handed_over_at = ?2
                 WHERE mac = ?1 AND handed_over_at IS NULL AND burnt_at IS NULL",
                params![mac.to_string(), now],
            )?;
            if n > 0 {
                insert_event(
                    tx,
                    now,
                    Some(mac),
                    "installer_done",
                    Some(State::Installing),
                    Some(State::Installing),
                    detail,
                )?;
            }
            Ok(n > 0)
        })
    }

    /// Reprovision: back to `enrolled`, generation + 1, the old token and pinned keys gone
    /// (the next boot mints a new token; a reinstalled OS has new host keys).
    pub fn reprovision(&self, mac: Mac, now: i64) -> Result<Machine> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            apply(
                tx,
                now,
                &m,
                Transition::Reprovision,
                &format!("generation {}", m.generation + 1),
            )?;
            tx.execute(
                "UPDATE machines SET generation = generation + 1 WHERE mac = ?1",
                [mac.to_string()],
            )?;
            tx.execute(
                "DELETE FROM install_tokens WHERE mac = ?1",
                [mac.to_string()],
            )?;
            tx.execute("DELETE FROM host_keys WHERE mac = ?1", [mac.to_string()])?;
            tx.execute(
                "DELETE FROM register_steps WHERE mac = ?1",
                [mac.to_string()],
            )?;
            tx.execute("DELETE FROM node_certs WHERE mac = ?1", [mac.to_string()])?;
            must_load(tx, mac)
        })
    }

    /// Moves a machine through a lifecycle transition with a detail line. For `Fail`, the
    /// detail is `"step: reason"`.
    pub fn transition(&self, mac: Mac, t: Transition, detail: &str, now: i64) -> Result<Machine> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            apply(tx, now, &m, t, detail)?;
            must_load(tx, mac)
        })
    }

    /// Starts a fresh registration run: `→ registering` and the previous run's step rows
    /// gone, in one transaction.
    pub fn start_registration(&self, mac: Mac, detail: &str, now: i64) -> Result<Machine> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            apply(tx, now, &m, Transition::StartRegistration, detail)?;
            tx.execute(
                "DELETE FROM register_steps WHERE mac = ?1",
                [mac.to_string()],
            )?;
            must_load(tx, mac)
        })
    }

    /// Records a finished registration step and its event, in one transaction. Refused
    /// unless the machine is still `registering` (a reprovision may have overtaken the run).
    pub fn record_step(&self, mac: Mac, step: &StepRecord, detail: &str) -> Result<()> {
        self.write(|tx| {
            let m = must_load(tx, mac)?;
            if m.state != State::Registering {
                // Illegal from every other state: the error names the state and the moves.
                policy::transition(m.state, Transition::FinishRegistration)?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO register_steps (mac, seq, name, status, exit_code, output, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![mac.to_string(), step.seq, step.name, step.status, step.exit_code, step.output, step.at],
            )?;
            let kind = if step.status == "ok" { "register_step" } else { "register_step_failed" };
            insert_event(tx, step.at, Some(mac), kind, Some(m.state), Some(m.state), detail)
        })
    }

    /// The node certificate signed for `mac`, if any: (PEM, fingerprint).
    pub fn node_cert(&self, mac: Mac) -> Result<Option<(String, String)>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT cert_pem, fingerprint FROM node_certs WHERE mac = ?1",
                [mac.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Keeps the node certificate signed for `mac`.
    pub fn save_node_cert(
        &self,
        mac: Mac,
        cert_pem: &str,
        fingerprint: &str,
        subject: &str,
        now: i64,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO node_certs (mac, cert_pem, fingerprint, subject, signed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![mac.to_string(), cert_pem, fingerprint, subject, now],
            )?;
            Ok(())
        })
    }

    /// Fails every machine left `installing` whose install token has expired (or that has
    /// none): no machine stays in a middle state without an owner. Returns their MACs.
    pub fn expire_installs(&self, now: i64) -> Result<Vec<Mac>> {
        self.write(|tx| {
            let macs: Vec<String> = tx
                .prepare(
                    "SELECT m.mac FROM machines m LEFT JOIN install_tokens t ON t.mac = m.mac
                     WHERE m.state = 'installing' AND (t.mac IS NULL OR t.expires_at <= ?1)",
                )?
                .query_map([now], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::new();
            for mac in macs {
                let Ok(mac) = mac.parse::<Mac>() else {
                    continue;
                };
                let m = must_load(tx, mac)?;
                apply(
                    tx,
                    now,
                    &m,
                    Transition::Fail,
                    "install: the install token expired before the machine phoned home",
                )?;
                out.push(mac);
            }
            Ok(out)
        })
    }

    /// Appends an event that is not a state change (a script served, a config refused...).
    pub fn event(&self, mac: Option<Mac>, kind: &str, detail: &str, now: i64) -> Result<()> {
        let conn = self.lock();
        let state = match mac {
            Some(m) => load(&conn, m)?.map(|m| m.state),
            None => None,
        };
        insert_event(&conn, now, mac, kind, state, state, detail)
    }

    /// Events, oldest first: of one machine or all, with `id > after`, at most `limit`.
    pub fn events(&self, mac: Option<Mac>, after: i64, limit: i64) -> Result<Vec<Event>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at, mac, kind, from_state, to_state, detail FROM events
             WHERE (?1 IS NULL OR mac = ?1) AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![mac.map(|m| m.to_string()), after, limit], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    mac: r.get(2)?,
                    kind: r.get(3)?,
                    from_state: r.get(4)?,
                    to_state: r.get(5)?,
                    detail: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A Unix-ms time as RFC 3339 (UTC, seconds).
pub fn fmt_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
