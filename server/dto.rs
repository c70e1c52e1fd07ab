//! The REST API's request and response bodies: the contract between the daemon, the CLI and
//! `provision lab`. The inventory's own types stay behind `store`; these change only with the
//! API (docs/api.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mac::Mac;
use crate::policy::{EventKind, State};
use crate::store::{self, StepRecord};

/// A machine, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// Normalised MAC.
    pub mac: Mac,
    /// SMBIOS UUID, if known.
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
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Install generation.
    pub generation: i64,
    /// `${buildarch}` seen at the last boot.
    pub arch: Option<String>,
    /// `${platform}` seen at the last boot.
    pub platform: Option<String>,
    /// The address provision SSHes to and Ansible gets: set by the phone-home, never by a
    /// boot request.
    pub last_ip: Option<String>,
    /// Source address of the last boot request (DHCP, TFTP, `/ipxe`): an observation.
    #[serde(default)]
    pub boot_ip: Option<String>,
    /// When it last asked for anything (DHCP, TFTP, `/ipxe`), Unix ms.
    pub last_seen: Option<i64>,
    /// In state `failed`: the step that failed.
    pub failed_step: Option<String>,
    /// In state `failed`: why.
    pub failed_reason: Option<String>,
    /// Pinned SSH host public keys.
    pub host_keys: Vec<String>,
    /// When the installer fetched its last artifact (this install).
    pub installer_done_at: Option<i64>,
    /// The current registration run's finished steps.
    pub register_steps: Vec<StepRecord>,
    /// SHA-256 fingerprint of its node certificate.
    pub cert_fingerprint: Option<String>,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// When it entered its current state, Unix ms.
    #[serde(default)]
    pub state_at: i64,
    /// The groups that select it, most specific first.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The values that came from a group: `profile`, `vars.KEY`, `labels.KEY` → the group.
    /// Every other value is the machine's own.
    #[serde(default)]
    pub inherited: BTreeMap<String, String>,
    /// What its last DHCP request said: `vendor_class`, `user_class`, and the `interface` it
    /// arrived on or the `relay` it came through.
    #[serde(default)]
    pub dhcp: store::DhcpSeen,
    /// A propose-mode discovery rule that matches it, waiting for `confirm`.
    #[serde(default)]
    pub proposed_rule: Option<String>,
}

impl From<store::Machine> for Machine {
    fn from(m: store::Machine) -> Machine {
        let (failed_step, failed_reason) = match m.failure {
            Some(f) => (Some(f.step), Some(f.reason)),
            None => (None, None),
        };
        let mut inherited = m.inherited.values;
        if let Some(g) = m.inherited.profile {
            inherited.insert("profile".into(), g);
        }
        Machine {
            mac: m.mac,
            uuid: m.uuid,
            serial: m.serial,
            hostname: m.hostname,
            profile: m.profile,
            state: m.state,
            vars: m.vars,
            labels: m.labels,
            generation: m.generation,
            arch: m.arch,
            platform: m.platform,
            last_ip: m.last_ip,
            boot_ip: m.boot_ip,
            last_seen: m.last_seen,
            failed_step,
            failed_reason,
            host_keys: m.host_keys,
            installer_done_at: m.installer_done_at,
            register_steps: m.register_steps,
            cert_fingerprint: m.cert_fingerprint,
            created_at: m.created_at,
            updated_at: m.updated_at,
            state_at: m.state_at,
            groups: m.inherited.groups,
            inherited,
            dhcp: m.dhcp,
            proposed_rule: m.proposed_rule,
        }
    }
}

/// A group, as the API shows it and takes it (`POST /groups`, `PUT /groups/{name}`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Unique name (on `PUT /groups/{name}` the path's, which the body may leave out).
    #[serde(default)]
    pub name: String,
    /// Machine fact (`mac`, `uuid`, `serial`, `hostname`, `arch`, `platform`) or label →
    /// the exact value a machine must have; empty: every machine (a default group).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The profile its machines install unless they have their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Variables its machines inherit.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Labels its machines inherit.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl From<crate::policy::Group> for Group {
    fn from(g: crate::policy::Group) -> Group {
        Group {
            name: g.name,
            selector: g.selector,
            profile: g.profile,
            vars: g.vars,
            labels: g.labels,
        }
    }
}

/// An event, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Monotonic id; page with `after`.
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    /// The machine, if any.
    pub mac: Option<Mac>,
    /// What happened.
    pub kind: EventKind,
    /// State before (transitions), or the state it was in.
    pub from_state: Option<State>,
    /// State after.
    pub to_state: Option<State>,
    /// Details in words.
    pub detail: String,
    /// Identical observations this row stands for.
    pub count: i64,
}

impl From<store::Event> for Event {
    fn from(e: store::Event) -> Event {
        Event {
            id: e.id,
            at: e.at,
            mac: e.mac,
            kind: e.kind,
            from_state: e.from_state,
            to_state: e.to_state,
            detail: e.detail,
            count: e.count,
        }
    }
}

/// `POST /machines`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// MAC in any accepted form.
    pub mac: String,
    /// Profile name; none: the one its groups give it (refused if none does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Hostname (RFC 1123).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// SMBIOS UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Serial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `PATCH /machines/{mac}`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// New profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// New hostname; an empty string clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Replaces all variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vars: Option<BTreeMap<String, String>>,
    /// Variables to set, keeping the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_vars: Option<BTreeMap<String, String>>,
    /// Variable names to remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unset_vars: Option<Vec<String>>,
    /// Replaces all labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `GET /status`: machine counts and what the database bounds have done since start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Machines by state.
    pub machines: BTreeMap<State, u64>,
    /// The inventory's counters.
    pub inventory: store::Stats,
}

/// A profile, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// The file name without `.toml`.
    pub name: String,
    /// One line for `provision profiles`.
    pub description: String,
    /// Kernel URL template.
    pub kernel: String,
    /// Initrd URL templates.
    pub initrds: Vec<String>,
    /// Kernel command line template.
    pub cmdline: String,
    /// Registration role, if any.
    pub role: Option<String>,
    /// Registration parameters (and the `handoff` hook).
    pub register: BTreeMap<String, serde_json::Value>,
    /// Default variables.
    pub vars: BTreeMap<String, String>,
    /// Artifacts by name: template and kind.
    pub artifacts: BTreeMap<String, Artifact>,
    /// The artifact after which network boots go to the local disk, if any.
    pub local_boot_after: Option<String>,
}

/// One artifact of a profile.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Artifact {
    /// Template path.
    pub template: String,
    /// How it is checked and served.
    pub kind: crate::render::ArtifactKind,
}

impl Profile {
    /// Whether the profile runs a hand-off hook after registration.
    pub fn has_handoff(&self) -> bool {
        self.register.get("handoff").is_some_and(|h| h.is_string())
    }
}

impl From<&crate::render::Profile> for Profile {
    fn from(p: &crate::render::Profile) -> Profile {
        Profile {
            name: p.name.clone(),
            description: p.description.clone(),
            kernel: p.kernel.clone(),
            initrds: p.initrds.clone(),
            cmdline: p.cmdline.clone(),
            role: p.role.clone(),
            register: p
                .register
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
                    )
                })
                .collect(),
            vars: p.vars.clone(),
            artifacts: p
                .artifacts
                .iter()
                .map(|(k, a)| {
                    (
                        k.clone(),
                        Artifact {
                            template: a.template.clone(),
                            kind: a.kind,
                        },
                    )
                })
                .collect(),
            local_boot_after: p.local_boot_after.clone(),
        }
    }
}

/// `GET /machines/{mac}/token`: the machine's install token as the operator may see it —
/// never the token, never its hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenStatus {
    /// `live`, `expired`, `burnt` (by the phone-home) or `stale` (an earlier install
    /// generation's).
    pub state: String,
    /// The install generation it was minted for.
    pub generation: i64,
    /// Minted, Unix ms.
    pub created_at: i64,
    /// Expires, Unix ms.
    pub expires_at: i64,
    /// Burnt, Unix ms.
    pub burnt_at: Option<i64>,
    /// The address it serves.
    pub ip: Option<String>,
}

/// A discovery rule, as the API shows it and takes it (`POST /rules`, `PUT /rules/{name}`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name (on `PUT /rules/{name}` the path's, which the body may leave out).
    #[serde(default)]
    pub name: String,
    /// Lower is tried first (default 100).
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// A disabled rule matches nothing (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `enroll` (default) or `propose` (an operator confirms).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Fact (`mac`, `uuid`, `serial`, `arch`, `platform`, `vendor_class`, `user_class`,
    /// `interface`, `relay`) or label → the value it must have; a trailing `*` matches a
    /// prefix. Empty: every discovered machine.
    #[serde(default, rename = "match")]
    pub conditions: BTreeMap<String, String>,
    /// The profile it enrolls machines with (none: their groups').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Hostname pattern: `{index}`, `{index:02}`, `{serial}`, `{mac}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Labels it enrolls machines with.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Variables it enrolls machines with.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Most machines it enrolls (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Machines it has enrolled (read-only: ignored when given).
    #[serde(default)]
    pub used: u64,
}

fn default_priority() -> i64 {
    100
}

fn yes() -> bool {
    true
}

fn default_mode() -> String {
    "enroll".into()
}

impl Default for Rule {
    fn default() -> Rule {
        Rule {
            name: String::new(),
            priority: default_priority(),
            enabled: true,
            mode: default_mode(),
            conditions: BTreeMap::new(),
            profile: None,
            hostname: None,
            labels: BTreeMap::new(),
            vars: BTreeMap::new(),
            max: None,
            used: 0,
        }
    }
}

impl From<crate::policy::Rule> for Rule {
    fn from(r: crate::policy::Rule) -> Rule {
        Rule {
            name: r.name,
            priority: r.priority,
            enabled: r.enabled,
            mode: r.mode.as_str().into(),
            conditions: r.conditions,
            profile: r.profile,
            hostname: r.hostname,
            labels: r.labels,
            vars: r.vars,
            max: r.max,
            used: r.used,
        }
    }
}

/// `POST /inventory`: what an apply changed (or a dry run would change).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyReport {
    /// Nothing was changed: this is the plan.
    pub dry_run: bool,
    /// The changes, groups first, then rules, then machines; deletions last in each.
    pub changes: Vec<crate::store::plan::Change>,
    /// What the file declares that is already as it says.
    pub unchanged: crate::store::plan::Unchanged,
}
