//! The inventory boundary: domain operations, each one transaction, behind the async
//! [`Inventory`] trait. This module (with its submodules) is the only place that speaks SQL.
//!
//! [`sqlite::SqlInventory`] is the embedded implementation; a PostgreSQL backend (several
//! daemons, one inventory) implements the same trait. Nothing above this boundary may rely on
//! the database serialising writers, so every operation is written to stay correct when two
//! daemons run it at once:
//!
//! * a lifecycle change is a compare-and-set on the machine's state
//!   (`UPDATE … WHERE mac = ? AND state = <the state it was read in>`): of two concurrent
//!   changes one wins, the other reports [`StoreError::Conflict`] and changes nothing;
//! * an install token is burnt by `UPDATE … WHERE burnt_at IS NULL`, so exactly one
//!   phone-home can use it; a token row is keyed by MAC and names its install generation;
//! * a lease offer or bind is an upsert on the address that only takes the row if it is free
//!   or already this MAC's (the row's own condition, not a read made earlier), and the caller
//!   moves on to the next address when it lost the race;
//! * the install-expiry sweeper fails a machine with the same compare-and-set, so a
//!   phone-home racing it either lands first (the sweeper skips the machine) or finds the
//!   machine failed (the token is refused).
//!
//! Two kinds of writes cross the boundary. *State changes* (enroll, discovered, install
//! started with its token, config served, phone-home, registration steps, leases) are durable
//! before the call returns. *Observations* ([`Observation`]: sightings and events that change
//! no state, such as `ipxe_served`, `tftp_served`, `dhcp_offered`) are handed to
//! [`Inventory::observe`], which never waits: they are coalesced and written in batches behind
//! a bounded queue that drops the oldest (and counts the drops) when it overflows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::mac::Mac;
use crate::policy::{
    EventKind, Failure, Group, GroupSet, IllegalTransition, Reported, Rule, RuleSet, Selectable,
    State, Transition,
};

pub(crate) mod db;
mod engine;
mod leases;
#[cfg(test)]
#[path = "../../tests/common/pg_cluster.rs"]
pub(crate) mod pg_cluster;
mod pg_tls;
pub mod plan;
pub(crate) mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

pub use engine::SqlInventory;
pub use leases::{Lease, LeaseState, Pool};
pub use sqlite::{snapshot, verify};

/// Where the inventory lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// `DATA_DIR/provision.db`: the embedded default, one daemon's own.
    Sqlite,
    /// A PostgreSQL database several daemons share: a URL or a connection string.
    Postgres(String),
}

impl Database {
    /// `sqlite`, a `postgres://` (or `postgresql://`) URL, or a `key=value` connection
    /// string; a connection string is checked here (its keys and values), not connected to.
    pub fn parse(s: &str) -> std::result::Result<Database, String> {
        let s = s.trim();
        if s == "sqlite" {
            return Ok(Database::Sqlite);
        }
        if !(s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains('=')) {
            return Err(format!(
                "{:?} is neither `sqlite` nor a PostgreSQL URL (postgres://user@host/db) or \
                 connection string (host=… dbname=…)",
                postgres::redacted(s)
            ));
        }
        postgres::check_url(s)?;
        Ok(Database::Postgres(s.to_string()))
    }
}

impl std::fmt::Display for Database {
    /// For the operator: the file, or the database without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite => f.write_str("sqlite (DATA_DIR/provision.db)"),
            Database::Postgres(url) => write!(f, "postgresql {}", postgres::redacted(url)),
        }
    }
}

/// How [`Inventory::apply_inventory`] runs.
#[derive(Clone, Debug)]
pub enum ApplyRun {
    /// Plan and check, then roll back.
    DryRun,
    /// Apply; refused if the plan is not `expect` (when given).
    Apply {
        /// The plan the caller checked.
        expect: Option<plan::Plan>,
    },
}

/// What an apply did (or a dry run would do).
#[derive(Clone, Debug)]
pub struct Applied {
    /// The changes, and what needed none.
    pub plan: plan::Plan,
    /// Every group after it.
    pub groups: Vec<Group>,
}

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
    /// Another writer changed the machine between our read and our write.
    #[error("machine {0} changed while this request was being handled; try again")]
    Conflict(Mac),
    /// An install token that is unknown, expired or already used; with the machine it was
    /// issued to, when that is known.
    #[error("{0}")]
    Token(TokenProblem, Option<Mac>),
    /// An install claim from one address while a live install token of the machine is held
    /// by another (a MAC is a claim: the token is not handed to whoever says it next).
    #[error("{mac} is installing with a live install token issued to {holder} (until {until}); a claim from another address is refused. If the machine really moved, wait for the token to expire or start over with `provision machines reprovision {mac}`", until = fmt_time(*.expires_at))]
    TokenHeld {
        /// The machine.
        mac: Mac,
        /// The address holding the live token.
        holder: String,
        /// When the token expires, Unix ms.
        expires_at: i64,
    },
    /// The database itself failed.
    #[error("database error: {0}")]
    Database(String),
    /// The database cannot be reached (PostgreSQL down, restarting, failing over, or the
    /// network to it): nothing was changed; the same request can be made again once it is
    /// back.
    #[error("the inventory's database is unreachable: {0}")]
    Unavailable(String),
    /// Another daemon changed the same rows at the same moment (PostgreSQL: a unique key
    /// taken first, a serialization failure, a deadlock): nothing was changed; try again.
    #[error("another provision daemon changed the same inventory rows at the same time; try again ({0})")]
    Contended(String),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// A stored value did not parse (the file was edited by hand?).
    #[error("corrupt value in column {0}: {1}")]
    Corrupt(&'static str, String),
    /// The store is shutting down.
    #[error("the inventory is shutting down")]
    Closed,
    /// A group change that would make resolution ambiguous or leave machines without a
    /// profile; the words say which and what to do.
    #[error("{0}")]
    GroupConflict(String),
    /// No group with that name.
    #[error("no group named {0:?}; `provision groups list` shows them")]
    NoGroup(String),
    /// A machine enrolled without a profile that no group gives it either.
    #[error("machine {0} has no profile and no group gives it one; enroll it with --profile, or create a group that selects it with a profile")]
    NoProfile(Mac),
    /// No rule with that name.
    #[error("no rule named {0:?}; `provision rules list` shows them")]
    NoRule(String),
    /// The inventory changed between an apply's check and its write.
    #[error("{0}")]
    Changed(String),
    /// A rule could not do what was asked (full, disabled, gone, or its result not valid);
    /// the words say which and what to do.
    #[error("{0}")]
    RuleRefused(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
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
    /// The token was issued to another address than the one using it.
    OtherAddress,
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenProblem::Unknown => {
                "unknown install token (never issued, or replaced by a newer boot or a reprovision)"
            }
            TokenProblem::Expired => "install token expired; reprovision the machine",
            TokenProblem::Used => "install token already used by a phone-home",
            TokenProblem::OtherAddress => {
                "install token used from another address than the one it was issued to"
            }
        })
    }
}

/// Result type of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A machine as the inventory answers it: its own values with its groups' added (see
/// [`crate::policy::GroupSet::resolve`]); `inherited` says which values came from a group.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// The key: normalised MAC.
    pub mac: Mac,
    /// SMBIOS UUID as iPXE reports it, if known.
    pub uuid: Option<String>,
    /// Serial number, if known.
    pub serial: Option<String>,
    /// Hostname given at enroll.
    pub hostname: Option<String>,
    /// The profile it installs: its own, or its most specific group's.
    pub profile: Option<String>,
    /// Lifecycle state.
    pub state: State,
    /// Template variables: its own and its groups'.
    pub vars: BTreeMap<String, String>,
    /// Labels (for group selectors and inventory grouping): its own and its groups'.
    pub labels: BTreeMap<String, String>,
    /// What came from groups, and which groups select it.
    #[serde(default)]
    pub inherited: Inherited,
    /// Install generation: bumped on every reprovision.
    pub generation: i64,
    /// `${buildarch}` seen at the last boot.
    pub arch: Option<String>,
    /// `${platform}` seen at the last boot.
    pub platform: Option<String>,
    /// The address provision SSHes to and Ansible gets: set by the phone-home (from the
    /// address its install token was issued to), never by a boot request; `vars.ssh_host`
    /// overrides it.
    pub last_ip: Option<String>,
    /// Source address of the last boot request (DHCP, TFTP, `/ipxe`): an observation.
    #[serde(default)]
    pub boot_ip: Option<String>,
    /// When a boot request (DHCP, TFTP attribution, `/ipxe`) last came from it, Unix ms.
    pub last_seen: Option<i64>,
    /// The step that failed and why, in state `failed`.
    pub failure: Option<Failure>,
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
    /// When it entered its current state, Unix ms.
    pub state_at: i64,
    /// What its last DHCP request said and where it came from (for discovery rules).
    #[serde(default)]
    pub dhcp: DhcpSeen,
    /// A propose-mode rule that matches it (discovered), waiting for an operator.
    #[serde(default)]
    pub proposed_rule: Option<String>,
}

/// What a machine's last DHCP request said beyond its MAC and UUID.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DhcpSeen {
    /// Option 60 (vendor class identifier).
    pub vendor_class: Option<String>,
    /// Option 77 (user class).
    pub user_class: Option<String>,
    /// The interface a direct request arrived on.
    pub interface: Option<String>,
    /// The relay agent (giaddr) a relayed request came through.
    pub relay: Option<String>,
}

/// The values of a [`Machine`] that came from its groups.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inherited {
    /// The group that gave the profile (none: its own, or none at all).
    pub profile: Option<String>,
    /// `vars.KEY` / `labels.KEY` → the group that gave it.
    pub values: BTreeMap<String, String>,
    /// The groups that select the machine, most specific first.
    pub groups: Vec<String>,
}

impl Machine {
    /// What a group selector sees of the machine (`mac` is its MAC as text).
    pub fn selectable<'a>(&'a self, mac: &'a str) -> Selectable<'a> {
        Selectable {
            mac,
            uuid: self.uuid.as_deref(),
            serial: self.serial.as_deref(),
            hostname: self.hostname.as_deref(),
            arch: self.arch.as_deref(),
            platform: self.platform.as_deref(),
            labels: Some(&self.labels),
        }
    }

    /// The machine as stored (own values only) with its groups' values added. Called once,
    /// on what the database returned.
    pub fn resolve(mut self, groups: &GroupSet) -> Machine {
        if groups.is_empty() {
            return self;
        }
        let mac = self.mac.to_string();
        let r = groups.resolve(
            &self.selectable(&mac),
            self.profile.as_deref(),
            &self.vars,
            &self.labels,
        );
        self.profile = r.profile;
        self.vars = r.vars;
        self.labels = r.labels;
        self.inherited = Inherited {
            profile: r.profile_from,
            values: r.inherited,
            groups: r.groups,
        };
        self
    }

    /// The machine as stored: its own values only (what [`Machine::resolve`] added taken
    /// out), to be resolved again after a change of what selects its groups.
    pub fn unresolved(mut self) -> Machine {
        self.profile = self.own_profile().map(str::to_string);
        self.vars = self.own_vars();
        self.labels = self.own_labels();
        self.inherited = Inherited::default();
        self
    }

    /// What discovery rules' conditions read of it (`mac` is its MAC as text).
    pub fn reported<'a>(&'a self, mac: &'a str) -> Reported<'a> {
        Reported {
            mac,
            uuid: self.uuid.as_deref(),
            serial: self.serial.as_deref(),
            arch: self.arch.as_deref(),
            platform: self.platform.as_deref(),
            vendor_class: self.dhcp.vendor_class.as_deref(),
            user_class: self.dhcp.user_class.as_deref(),
            interface: self.dhcp.interface.as_deref(),
            relay: self.dhcp.relay.as_deref(),
            labels: Some(&self.labels),
        }
    }

    /// Its own profile (not a group's).
    pub fn own_profile(&self) -> Option<&str> {
        self.profile
            .as_deref()
            .filter(|_| self.inherited.profile.is_none())
    }

    /// Its own variables (not its groups').
    pub fn own_vars(&self) -> BTreeMap<String, String> {
        self.own("vars", &self.vars)
    }

    /// Its own labels (not its groups').
    pub fn own_labels(&self) -> BTreeMap<String, String> {
        self.own("labels", &self.labels)
    }

    fn own(&self, prefix: &str, all: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        all.iter()
            .filter(|(k, _)| !self.inherited.values.contains_key(&format!("{prefix}.{k}")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What the boot decision reads about a machine on every boot request: a point read of a few
/// columns, so a machine that only gets the local-boot script costs no more than that. The
/// profile is the machine's own; its groups' is resolved at each use against the current
/// groups ([`BootFacts::profile`]), so a group change needs no cached facts forgotten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFacts {
    /// Lifecycle state.
    pub state: State,
    /// The machine's own profile.
    pub profile: Option<String>,
    /// The installer of the current install fetched its last artifact.
    pub installer_done: bool,
    /// What group selectors read: facts and own labels.
    pub uuid: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// `${buildarch}` last seen.
    pub arch: Option<String>,
    /// `${platform}` last seen.
    pub platform: Option<String>,
    /// Own labels.
    pub labels: BTreeMap<String, String>,
    /// What its last DHCP request said (discovery rules read it).
    pub dhcp: DhcpSeen,
    /// A propose-mode rule already waiting for an operator about it.
    pub proposed_rule: Option<String>,
}

impl BootFacts {
    /// A machine's boot facts (from what the store answered: its own values).
    pub fn of(m: &Machine) -> BootFacts {
        BootFacts {
            state: m.state,
            profile: m.own_profile().map(str::to_string),
            installer_done: m.installer_done_at.is_some(),
            uuid: m.uuid.clone(),
            serial: m.serial.clone(),
            hostname: m.hostname.clone(),
            arch: m.arch.clone(),
            platform: m.platform.clone(),
            labels: m.own_labels(),
            dhcp: m.dhcp.clone(),
            proposed_rule: m.proposed_rule.clone(),
        }
    }

    /// The facts of a MAC the inventory does not know yet: discovered, nothing stored.
    pub fn unknown() -> BootFacts {
        BootFacts {
            state: State::Discovered,
            profile: None,
            installer_done: false,
            uuid: None,
            serial: None,
            hostname: None,
            arch: None,
            platform: None,
            labels: BTreeMap::new(),
            dhcp: DhcpSeen::default(),
            proposed_rule: None,
        }
    }

    /// What discovery rules read of the machine, with what this request says (`now`) over
    /// what is stored, as [`BootFacts::profile`] does.
    pub fn reported<'a>(&'a self, mac: &'a str, now: &'a Sighting) -> Reported<'a> {
        let latest = |n: &'a Option<String>, s: &'a Option<String>| n.as_deref().or(s.as_deref());
        Reported {
            mac,
            uuid: self.uuid.as_deref().or(now.uuid.as_deref()),
            serial: self.serial.as_deref().or(now.serial.as_deref()),
            arch: latest(&now.arch, &self.arch),
            platform: latest(&now.platform, &self.platform),
            vendor_class: latest(&now.dhcp.vendor_class, &self.dhcp.vendor_class),
            user_class: latest(&now.dhcp.user_class, &self.dhcp.user_class),
            interface: latest(&now.dhcp.interface, &self.dhcp.interface),
            relay: latest(&now.dhcp.relay, &self.dhcp.relay),
            labels: Some(&self.labels),
        }
    }

    /// The profile the machine installs and the group it comes from (none: its own), with
    /// what this request says of it (`now`) over what is stored: a group that selects by
    /// serial finds a machine on the very request that first reports its serial.
    pub fn profile(
        &self,
        mac: Mac,
        now: &Sighting,
        groups: &GroupSet,
    ) -> (Option<String>, Option<String>) {
        // Only a machine that may install needs its profile for the decision; an installed
        // one boots its disk whatever its groups say (and costs no resolution).
        let may_install = matches!(
            self.state,
            State::Discovered | State::Enrolled | State::Installing
        );
        if self.profile.is_some() || groups.is_empty() || !may_install {
            return (self.profile.clone(), None);
        }
        // The same overlay of this request on the stored facts as rules read.
        let mac = mac.to_string();
        let r = self.reported(&mac, now);
        let sel = Selectable {
            mac: r.mac,
            uuid: r.uuid,
            serial: r.serial,
            hostname: self.hostname.as_deref(),
            arch: r.arch,
            platform: r.platform,
            labels: r.labels,
        };
        groups.profile(&sel, None)
    }
}

/// How a registration step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// The step ran and its checks passed.
    Ok,
    /// The step failed; the run stopped there.
    Failed,
}

impl StepStatus {
    fn as_str(self) -> &'static str {
        match self {
            StepStatus::Ok => "ok",
            StepStatus::Failed => "failed",
        }
    }
}

/// A revoked node certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedCert {
    /// The machine it was issued to.
    pub mac: Mac,
    /// SHA-256 fingerprint, `AA:BB:…`.
    pub fingerprint: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// When it was revoked (Unix ms).
    pub revoked_at: i64,
    /// `reprovisioned`, `deleted` or `superseded`.
    pub reason: String,
}

/// One finished step of a registration run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Position in the role.
    pub seq: i64,
    /// Step name from the role definition.
    pub name: String,
    /// How it ended.
    pub status: StepStatus,
    /// The remote command's exit status, if it ran.
    pub exit_code: Option<i64>,
    /// An excerpt of its output (or why it did not run).
    pub output: String,
    /// When it finished, Unix ms.
    pub at: i64,
}

/// One row of the history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Monotonic id; page with `after`.
    pub id: i64,
    /// Unix ms (of the first occurrence, when `count` > 1).
    pub at: i64,
    /// The machine, if the event is about one.
    pub mac: Option<Mac>,
    /// What happened.
    pub kind: EventKind,
    /// State before, for transitions.
    pub from_state: Option<State>,
    /// State after, for transitions.
    pub to_state: Option<State>,
    /// Details in words.
    pub detail: String,
    /// How many identical observations this row stands for (coalesced in one batch).
    pub count: i64,
}

/// What the operator gives at enroll.
#[derive(Clone, Debug)]
pub struct NewMachine {
    /// The MAC.
    pub mac: Mac,
    /// Profile name (already checked to exist by the caller); none: its groups'.
    pub profile: Option<String>,
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
    /// New own profile (`Some(None)` clears it: its groups' then).
    pub profile: Option<Option<String>>,
    /// New hostname (`Some(None)` clears it).
    pub hostname: Option<Option<String>>,
    /// Replaces all variables.
    pub vars: Option<BTreeMap<String, String>>,
    /// Replaces all labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// New SMBIOS UUID (an inventory file's; the firmware's first report is kept otherwise).
    pub uuid: Option<String>,
    /// New serial (likewise).
    pub serial: Option<String>,
}

/// What a boot request said about the machine, kept for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sighting {
    /// `${uuid}`, or the DHCP client GUID.
    pub uuid: Option<String>,
    /// `${serial}` (SMBIOS).
    pub serial: Option<String>,
    /// What a DHCP request said beyond MAC and UUID.
    pub dhcp: DhcpSeen,
    /// `${buildarch}`.
    pub arch: Option<String>,
    /// `${platform}`.
    pub platform: Option<String>,
    /// Source IP.
    pub ip: Option<String>,
}

impl Sighting {
    /// Folds a later sighting into this one: what the later one says wins.
    fn merge(&mut self, later: Sighting) {
        let keep = |a: &mut Option<String>, b: Option<String>| {
            if b.is_some() {
                *a = b;
            }
        };
        keep(&mut self.uuid, later.uuid);
        keep(&mut self.serial, later.serial);
        keep(&mut self.dhcp.vendor_class, later.dhcp.vendor_class);
        keep(&mut self.dhcp.user_class, later.dhcp.user_class);
        keep(&mut self.dhcp.interface, later.dhcp.interface);
        keep(&mut self.dhcp.relay, later.dhcp.relay);
        keep(&mut self.arch, later.arch);
        keep(&mut self.platform, later.platform);
        keep(&mut self.ip, later.ip);
    }
}

/// Something a protocol server saw that changes no state: written in a later batch, never
/// waited for, and dropped (counted) if the queue overflows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A boot request from `mac`. With `discover`, an unknown MAC becomes `discovered` when
    /// the batch is written (DHCP: the OFFER does not wait for the disk; `/ipxe` records the
    /// discovery durably itself).
    Seen {
        /// Who.
        mac: Mac,
        /// What the request said.
        sighting: Sighting,
        /// Create the machine as discovered if it is unknown.
        discover: bool,
        /// When, Unix ms.
        at: i64,
    },
    /// An event that changes no state.
    Event {
        /// The machine, if known.
        mac: Option<Mac>,
        /// What happened.
        kind: EventKind,
        /// Details in words.
        detail: String,
        /// When, Unix ms.
        at: i64,
    },
}

/// A page of machines: in MAC order, after `after`, at most `limit`.
#[derive(Clone, Debug, Default)]
pub struct MachineQuery {
    /// Only machines in this state.
    pub state: Option<State>,
    /// Start after this MAC (the last one of the previous page).
    pub after: Option<Mac>,
    /// At most this many (0: [`MAX_PAGE`], which is also the cap).
    pub limit: usize,
}

/// A list of machines for people (the web UI): filtered, searched, sorted, and paged by
/// offset with the total, which keyset paging ([`MachineQuery`]) cannot give.
#[derive(Clone, Debug, Default)]
pub struct MachineSearch {
    /// Only machines in this state.
    pub state: Option<State>,
    /// Only machines this term finds.
    pub term: Option<SearchTerm>,
    /// The order.
    pub sort: SortKey,
    /// Largest first.
    pub descending: bool,
    /// Skip this many.
    pub offset: usize,
    /// At most this many (0: [`MAX_PAGE`], which is also the cap).
    pub limit: usize,
}

/// What a search box asked for, already classified (see `AdminService::search_term`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SearchTerm {
    /// A whole MAC address.
    Mac(Mac),
    /// An address: the SSH address or the last boot request's.
    Ip(String),
    /// A label: `key` alone, or `key=value`.
    Label(String, Option<String>),
    /// Part of a hostname, a label's value or the profile's name; or, when the term is
    /// hex digits with MAC separators, part of a MAC (`mac_hex`: lower case, separators
    /// removed).
    Text {
        /// As typed.
        text: String,
        /// The term as MAC digits, if it can be part of one.
        mac_hex: Option<String>,
    },
}

/// The orders a machine list can take; ties go by MAC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// By MAC.
    #[default]
    Mac,
    /// By hostname (none last).
    Hostname,
    /// By state name, then MAC.
    State,
    /// By when it last asked for anything.
    LastSeen,
    /// By its last change.
    Updated,
    /// By when it entered its current state.
    InState,
}

impl SortKey {
    /// The name used in URLs (`?sort=`).
    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Mac => "mac",
            SortKey::Hostname => "hostname",
            SortKey::State => "state",
            SortKey::LastSeen => "last_seen",
            SortKey::Updated => "updated",
            SortKey::InState => "in_state",
        }
    }
}

impl std::str::FromStr for SortKey {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [
            SortKey::Mac,
            SortKey::Hostname,
            SortKey::State,
            SortKey::LastSeen,
            SortKey::Updated,
            SortKey::InState,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown sort {s:?}; sort by one of mac, hostname, state, last_seen, updated, in_state"
            )
        })
    }
}

/// A page of a [`MachineSearch`] with the number of machines the whole search finds.
#[derive(Clone, Debug, Default)]
pub struct MachinePage {
    /// All machines matching, across pages.
    pub total: u64,
    /// This page.
    pub machines: Vec<Machine>,
}

/// A machine's install token as the operator may see it: never the token, never its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The install generation it belongs to.
    pub generation: i64,
    /// Minted, Unix ms.
    pub created_at: i64,
    /// Expires, Unix ms.
    pub expires_at: i64,
    /// Burnt by the phone-home, Unix ms.
    pub burnt_at: Option<i64>,
    /// The address it serves.
    pub ip: Option<String>,
}

/// A page of events: oldest first, `id > after`, at most `limit` — the first `limit` of
/// them, or with `tail` the last `limit`.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only this machine's events.
    pub mac: Option<Mac>,
    /// Start after this event id.
    pub after: i64,
    /// The newest events rather than the oldest (still returned oldest first).
    pub tail: bool,
    /// At most this many (0: [`MAX_PAGE`], which is also the cap).
    pub limit: usize,
}

/// The largest page any listing returns.
pub const MAX_PAGE: usize = 1000;

/// The bounds that keep the database from growing with what the network sends.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Discovered-but-never-enrolled machines kept; the least recently seen are evicted.
    pub max_discovered: u64,
    /// Events kept per machine; observations go before state transitions.
    pub events_per_machine: u64,
    /// Events kept in all; observations go before state transitions.
    pub max_events: u64,
    /// Observations waiting to be written; past this the oldest are dropped.
    pub observation_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_discovered: 10_000,
            events_per_machine: 1_000,
            max_events: 1_000_000,
            observation_queue: 65_536,
        }
    }
}

/// Counters of what the bounds threw away, since start.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Observations dropped because the queue was full.
    pub observations_dropped: u64,
    /// Observations written.
    pub observations_written: u64,
    /// Machines created `discovered` (by DHCP or by `/ipxe`).
    #[serde(default)]
    pub discovered: u64,
    /// Discovered machines evicted over the cap.
    pub discovered_evicted: u64,
    /// Unknown MACs seen only in DHCP while the discovered cap was full: not recorded (a
    /// boot that reaches `/ipxe` is always recorded, evicting the least recently seen).
    pub discoveries_shed: u64,
    /// Events deleted by retention.
    pub events_pruned: u64,
    /// Write transactions committed (each one fsync).
    pub commits: u64,
    /// Durable operations committed (several per commit under load: group commit).
    pub writes: u64,
}

/// The inventory: what the rest of the daemon may ask of its database.
///
/// Reads see every write that returned before them. Durable operations return only once
/// their transaction is on disk; each is one transaction. [`Inventory::observe`] never waits.
#[async_trait::async_trait]
pub trait Inventory: Send + Sync + 'static {
    // --- reads ---

    /// The machine with this MAC, if any.
    async fn machine(&self, mac: Mac) -> Result<Option<Machine>>;
    /// The boot decision's inputs for this MAC, if it is known (the hot path).
    async fn boot_facts(&self, mac: Mac) -> Result<Option<BootFacts>>;
    /// A page of machines.
    async fn machines(&self, q: MachineQuery) -> Result<Vec<Machine>>;
    /// How many machines there are, by state.
    async fn count_by_state(&self) -> Result<BTreeMap<State, u64>>;
    /// A page of events.
    async fn events(&self, q: EventQuery) -> Result<Vec<Event>>;
    /// The machine a live install token (by hash) belongs to, or why the token is not live
    /// or not `from`'s (the address it was issued to).
    async fn machine_by_token(&self, token_hash: &str, from: &str, now: i64) -> Result<Machine>;
    /// Every DHCP reservation: machines whose `ip` variable is set.
    async fn reservations(&self) -> Result<Vec<(Mac, Ipv4Addr)>>;
    /// Live leases, by address.
    async fn leases(&self, now: i64) -> Result<Vec<Lease>>;
    /// The node certificate signed for `mac`, if any: (PEM, fingerprint).
    async fn node_cert(&self, mac: Mac) -> Result<Option<(String, String)>>;
    /// Node certificates revoked and not yet surely expired, oldest first.
    async fn revoked_certs(&self) -> Result<Vec<RevokedCert>>;
    /// What the bounds have thrown away, and how writes were grouped.
    fn stats(&self) -> Stats;
    /// Every group, as of the last committed group change (held in memory: every boot
    /// request of a machine without a profile of its own resolves against it).
    fn groups(&self) -> std::sync::Arc<GroupSet>;
    /// Every discovery rule, as of the last committed change (counts included).
    fn rules(&self) -> std::sync::Arc<RuleSet>;

    // --- durable operations ---

    /// Enrolls a machine: creates it, or moves a discovered one to `enrolled`.
    async fn enroll(&self, new: NewMachine, now: i64) -> Result<Machine>;
    /// Changes profile, hostname, vars or labels; records an `updated` event.
    async fn update(&self, mac: Mac, patch: MachinePatch, now: i64) -> Result<Machine>;
    /// Deletes a machine with its token, keys, steps and cert; its events stay, plus a
    /// `deleted` one.
    async fn delete(&self, mac: Mac, now: i64) -> Result<()>;
    /// A boot request from `mac` over HTTP: an unknown MAC is created `discovered` (with its
    /// event) before this returns; a known one has the sighting recorded. Returns the machine.
    async fn discover(&self, mac: Mac, sighting: Sighting, now: i64) -> Result<Machine>;
    /// Hands the installer of `mac` a new install token (only its hash is given):
    /// `enrolled → installing`, or an `install_restarted` event for a machine already
    /// installing; a discovered machine whose `profile` comes from `group` is enrolled
    /// first (its `enrolled` event names the group), in the same transaction. An older token is replaced, unless it is live and was issued to another
    /// address than `from` ([`StoreError::TokenHeld`]); the token records `from`; what the
    /// boot request said is recorded.
    #[allow(clippy::too_many_arguments)] // one transaction's inputs, each a different thing
    async fn start_install(
        &self,
        mac: Mac,
        token_hash: String,
        expires_at: i64,
        sighting: Sighting,
        from: String,
        group: Option<(String, String)>,
        now: i64,
    ) -> Result<()>;
    /// A config artifact was served by install token: its event, and with `installer_done`
    /// the mark that the installer fetched its last artifact (network boots go to the disk
    /// it writes from then on), in one transaction.
    async fn config_served(
        &self,
        mac: Mac,
        detail: String,
        installer_done: Option<String>,
        now: i64,
    ) -> Result<()>;
    /// Moves a live install token to the address `from` (the caller has evidence that it is
    /// the token's machine), with a `token_moved` event saying `why`. Returns the machine.
    async fn move_token(
        &self,
        token_hash: String,
        from: String,
        why: String,
        now: i64,
    ) -> Result<Machine>;
    /// Phone-home: with a live token used from the address it was issued to (or from any
    /// address for a machine whose profile is in `any_address`, which the event then says),
    /// pins the host keys (`(algorithm, key)` pairs), moves `installing → installed`, records
    /// `from_ip` as the machine's SSH address and burns the token, in one transaction.
    async fn phone_home(
        &self,
        token_hash: String,
        host_keys: Vec<(String, String)>,
        from_ip: String,
        any_address: BTreeSet<String>,
        detail: String,
        now: i64,
    ) -> Result<Machine>;
    /// Reprovision: back to `enrolled`, generation + 1, token, keys, steps and cert gone.
    async fn reprovision(&self, mac: Mac, now: i64) -> Result<Machine>;
    /// Moves a machine through a lifecycle transition (`Fail` keeps its step and reason).
    async fn transition(
        &self,
        mac: Mac,
        t: Transition,
        detail: String,
        now: i64,
    ) -> Result<Machine>;
    /// Starts a fresh registration run: `→ registering`, the previous run's steps cleared.
    async fn start_registration(&self, mac: Mac, detail: String, now: i64) -> Result<Machine>;
    /// Records a finished registration step and its event. Refused unless the machine is
    /// still `registering`.
    async fn record_step(&self, mac: Mac, step: StepRecord, detail: String) -> Result<()>;
    /// Claims the run of `mac`'s registration for `daemon` until `until` (Unix ms): taken if
    /// nobody holds it, if its holder's claim ran out by `now`, or if it is `daemon`'s already
    /// (a renewal). Returns whether `daemon` holds it now. Of several daemons sharing the
    /// inventory, exactly one runs a registration at a time.
    async fn claim_registration(
        &self,
        mac: Mac,
        daemon: String,
        until: i64,
        now: i64,
    ) -> Result<bool>;
    /// Gives up `daemon`'s claim on `mac`'s registration (its run ended).
    async fn release_registration(&self, mac: Mac, daemon: String) -> Result<()>;
    /// Machines `registering` whose run nobody holds a live claim on at `now`: interrupted
    /// runs of a daemon that stopped or died, for another to take over.
    async fn unclaimed_registrations(&self, now: i64) -> Result<Vec<Mac>>;
    /// Keeps the node certificate signed for `mac`; one it replaces with another key is
    /// revoked (`superseded`). Reprovision and delete revoke the machine's certificate too.
    async fn save_node_cert(
        &self,
        mac: Mac,
        cert_pem: String,
        fingerprint: String,
        subject: String,
        now: i64,
    ) -> Result<()>;
    /// Creates the group, or replaces the one of its name; records a `group_changed` event.
    /// Refused ([`StoreError::GroupConflict`]) if another group could select one machine with
    /// the same specificity and sets a value it sets, or if a machine past discovery would
    /// be left without a profile, or (without `replace`) if the name is taken. Returns whether
    /// it was created.
    async fn put_group(&self, group: Group, replace: bool, now: i64) -> Result<bool>;
    /// Deletes a group, unless a machine past discovery would be left without a profile.
    async fn delete_group(&self, name: String, now: i64) -> Result<()>;
    /// Creates the rule, or replaces the one of its name (keeping its count); records a
    /// `rule_changed` event; without `replace`, a taken name is refused. Returns whether it
    /// was created.
    async fn put_rule(&self, rule: Rule, replace: bool, now: i64) -> Result<bool>;
    /// Deletes a rule (the machines it enrolled stay; proposals of it are withdrawn).
    async fn delete_rule(&self, name: String, now: i64) -> Result<()>;
    /// Converges groups, rules and machines to `desired` in one transaction (all of it, or
    /// nothing): creates and updates, and with `prune` deletes what the file leaves out (of
    /// the kinds it declares; never a discovered machine). Refused if the result would have a
    /// tie between groups, a machine past discovery without a profile, or one DHCP
    /// reservation for two machines. A dry run plans, checks and rolls back; an apply with
    /// `expect` is refused ([`StoreError::Changed`]) if its plan is not that one (the
    /// inventory changed since it was checked).
    async fn apply_inventory(
        &self,
        desired: plan::Desired,
        prune: bool,
        run: ApplyRun,
        now: i64,
    ) -> Result<Applied>;
    /// Applies rule `rule` to the discovered machine `mac` (what `sighting` says recorded
    /// first), in one transaction: checks the rule is enabled and matches, then enrolls the
    /// machine with its next index (a compare-and-set on the rule's count against its max), or
    /// in propose mode marks it (unless `confirm`, the operator's confirmation, which
    /// enrolls).
    async fn apply_rule(
        &self,
        mac: Mac,
        rule: String,
        sighting: Sighting,
        confirm: bool,
        now: i64,
    ) -> Result<RuleOutcome>;
    /// Fails every machine left `installing` whose token expired (or that has none).
    async fn expire_installs(&self, now: i64) -> Result<Vec<Mac>>;
    /// Appends an event that changes no state but must not be lost (a registrar retry).
    async fn record_event(
        &self,
        mac: Option<Mac>,
        kind: EventKind,
        detail: String,
        now: i64,
    ) -> Result<()>;
    /// Address mode: chooses and holds an address for `mac` (see [`leases`]).
    async fn lease_offer(&self, req: leases::OfferRequest) -> Result<Option<Ipv4Addr>>;
    /// Address mode: binds `ip` on REQUEST; false means NAK.
    async fn lease_bind(&self, req: leases::BindRequest) -> Result<bool>;
    /// Address mode: a RELEASE, or (with `ip` None) a client that chose another server.
    async fn lease_release(&self, mac: Mac, ip: Option<Ipv4Addr>) -> Result<()>;
    /// Address mode: a DECLINE of an address the MAC holds quarantines it until `until`.
    async fn lease_decline(&self, mac: Mac, ip: Ipv4Addr, until: i64, now: i64) -> Result<bool>;

    // --- observations ---

    /// Queues an observation; never waits, never fails (an overflow drops the oldest).
    fn observe(&self, o: Observation);
    /// Writes every observation queued before this call; admin reads call it so what they
    /// show includes what the machines just did.
    async fn flush(&self) -> Result<()>;

    /// A filtered, searched, sorted page of machines with the total (the web UI's lists).
    async fn search_machines(&self, q: MachineSearch) -> Result<MachinePage>;

    /// The machine's current install token, if it has one (never the token itself).
    async fn install_token(&self, mac: Mac) -> Result<Option<TokenInfo>>;

    /// The newest committed event id, updated after every commit that wrote events: live
    /// views wait on it and then read the events after the last one they showed, so a slow
    /// reader holds no queue of its own and misses nothing the retention bounds keep.
    fn event_feed(&self) -> tokio::sync::watch::Receiver<i64>;
}

/// What [`Inventory::apply_rule`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleOutcome {
    /// Enrolled with the rule's next index.
    Enrolled(Box<Machine>),
    /// Marked as matching a propose-mode rule (or already was).
    Proposed,
    /// Nothing: the rule has enrolled its max (the words say so).
    Full(String),
    /// Nothing: the machine is no longer discovered, or the rule no longer matches it, is
    /// disabled or gone (the words say which).
    Skipped(String),
}

pub use leases::{BindRequest, OfferRequest};

/// Every machine in `state`, walking the inventory's pages in MAC order.
pub async fn all_in_state(inv: &dyn Inventory, state: State) -> Result<Vec<Machine>> {
    let mut out: Vec<Machine> = Vec::new();
    loop {
        let page = inv
            .machines(MachineQuery {
                state: Some(state),
                after: out.last().map(|m| m.mac),
                limit: MAX_PAGE,
            })
            .await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A Unix-ms time as RFC 3339 (UTC, seconds); times past year 9999 (which RFC 3339 cannot
/// write) are shown as the last second of 9999.
pub fn fmt_time(ms: i64) -> String {
    const MAX_MS: i64 = 253_402_300_799_000;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.clamp(0, MAX_MS) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
