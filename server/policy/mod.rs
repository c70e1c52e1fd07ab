//! Pure policy: machine lifecycle and the boot decision.
//!
//! Nothing in here does IO, takes a lock, or reads a clock: every function is a value in, a
//! value out, so the tables in `tests.rs` pin the whole behaviour. The protocol servers may ask
//! [`decide`] several times per boot (pixiecore's `Booter` taught us that), so its answer must
//! depend only on the stored machine and the request.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod events;
mod groups;
mod rules;
#[cfg(test)]
mod tests;

pub use events::EventKind;
pub use groups::{Group, GroupSet, Resolved, Selectable, Source, FACT_KEYS, MACHINE_ONLY_VARS};
pub use rules::{glob, hostname, Choice, Reported, Rule, RuleMode, RuleSet, RULE_FACTS};

/// Where a machine is in its life. Every change is an event row written in the same
/// transaction as the change (see `store`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Seen booting, not enrolled: boots the configured discovery answer.
    Discovered,
    /// Enrolled with a profile; its next network boot installs.
    Enrolled,
    /// Its installer has been handed an install token and is running.
    Installing,
    /// The installed OS phoned home with its SSH host keys; boots from local disk.
    Installed,
    /// The registrar is running the profile role's steps over SSH.
    Registering,
    /// Registration finished.
    Registered,
    /// Handed to configuration management.
    HandedOff,
    /// A step failed; the event log says which and why.
    Failed,
}

/// Every state, in lifecycle order.
pub const ALL_STATES: [State; 8] = [
    State::Discovered,
    State::Enrolled,
    State::Installing,
    State::Installed,
    State::Registering,
    State::Registered,
    State::HandedOff,
    State::Failed,
];

impl State {
    /// The snake_case name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Discovered => "discovered",
            State::Enrolled => "enrolled",
            State::Installing => "installing",
            State::Installed => "installed",
            State::Registering => "registering",
            State::Registered => "registered",
            State::HandedOff => "handed_off",
            State::Failed => "failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL_STATES
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ALL_STATES.iter().map(|s| s.as_str()).collect();
                format!("unknown state {s:?}; states are {}", names.join(", "))
            })
    }
}

/// What is asking a machine to change state. The same pair of states can be legal for one
/// cause and not another (only the operator may reprovision; only a boot may start an install).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The operator enrolls a machine (new, or discovered) with a profile.
    Enroll,
    /// A network boot hands the installer an install token.
    StartInstall,
    /// The installed OS phoned home with a live install token.
    PhoneHome,
    /// The registrar starts (or restarts) the role's steps.
    StartRegistration,
    /// The registrar finished every step.
    FinishRegistration,
    /// Hand-off to configuration management succeeded.
    HandOff,
    /// The operator asks for a fresh install: back to enrolled, new token, generation + 1.
    Reprovision,
    /// Something went wrong (install timed out, a registration step failed): which step, and
    /// why, kept in the machine's own columns.
    Fail(Failure),
}

/// Why a machine failed: the step (`install`, `connect`, `host-key`, a role step, `handoff`)
/// and the reason in words.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The step that failed.
    pub step: String,
    /// Why, for the operator.
    pub reason: String,
}

impl Failure {
    /// A failure at `step` for `reason`.
    pub fn new(step: impl Into<String>, reason: impl Into<String>) -> Failure {
        Failure {
            step: step.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.reason)
    }
}

impl Transition {
    /// The event kind recorded for this transition.
    pub fn event_kind(&self) -> EventKind {
        match self {
            Transition::Enroll => EventKind::Enrolled,
            Transition::StartInstall => EventKind::InstallStarted,
            Transition::PhoneHome => EventKind::PhonedHome,
            Transition::StartRegistration => EventKind::RegistrationStarted,
            Transition::FinishRegistration => EventKind::Registered,
            Transition::HandOff => EventKind::HandedOff,
            Transition::Reprovision => EventKind::Reprovisioned,
            Transition::Fail(_) => EventKind::Failed,
        }
    }

    /// The states this transition may start from, and where it goes.
    fn rule(&self) -> (&'static [State], State) {
        use State::*;
        match self {
            Transition::Enroll => (&[Discovered], Enrolled),
            Transition::StartInstall => (&[Enrolled], Installing),
            Transition::PhoneHome => (&[Installing], Installed),
            Transition::StartRegistration => {
                (&[Installed, Registered, HandedOff, Failed], Registering)
            }
            Transition::FinishRegistration => (&[Registering], Registered),
            Transition::HandOff => (&[Installed, Registered], HandedOff),
            Transition::Reprovision => (
                &[
                    Enrolled,
                    Installing,
                    Installed,
                    Registering,
                    Registered,
                    HandedOff,
                    Failed,
                ],
                Enrolled,
            ),
            Transition::Fail(_) => (&[Enrolled, Installing, Registering, Registered], Failed),
        }
    }
}

/// A transition refused because the machine is in the wrong state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a machine in state {from}; from {from} the allowed moves are: {allowed}")]
pub struct IllegalTransition {
    /// The state the machine is in.
    pub from: State,
    /// What was asked, in words.
    pub action: &'static str,
    /// The moves that are legal from `from`, in words.
    pub allowed: String,
}

fn action_words(t: &Transition) -> &'static str {
    match t {
        Transition::Enroll => "enroll",
        Transition::StartInstall => "start installing",
        Transition::PhoneHome => "accept phone-home from",
        Transition::StartRegistration => "register",
        Transition::FinishRegistration => "finish registering",
        Transition::HandOff => "hand off",
        Transition::Reprovision => "reprovision",
        Transition::Fail(_) => "fail",
    }
}

const ALL_TRANSITIONS: [Transition; 8] = [
    Transition::Enroll,
    Transition::StartInstall,
    Transition::PhoneHome,
    Transition::StartRegistration,
    Transition::FinishRegistration,
    Transition::HandOff,
    Transition::Reprovision,
    Transition::Fail(Failure {
        step: String::new(),
        reason: String::new(),
    }),
];

/// The moves legal from `from`, as "verb (→ state)" phrases for error messages.
pub fn allowed_from(from: State) -> Vec<String> {
    ALL_TRANSITIONS
        .iter()
        .filter(|t| t.rule().0.contains(&from))
        .map(|t| format!("{} (→ {})", action_words(t), t.rule().1))
        .collect()
}

/// The state `t` leads to from `from`, or why it may not happen.
pub fn transition(from: State, t: &Transition) -> Result<State, IllegalTransition> {
    let (sources, to) = t.rule();
    if sources.contains(&from) {
        Ok(to)
    } else {
        let allowed = allowed_from(from);
        Err(IllegalTransition {
            from,
            action: action_words(t),
            allowed: if allowed.is_empty() {
                "none".into()
            } else {
                allowed.join(", ")
            },
        })
    }
}

/// The firmware platform iPXE reports in `${platform}`; it decides how to boot the local disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Legacy BIOS (iPXE `pcbios`).
    Pcbios,
    /// UEFI (iPXE `efi`).
    Efi,
}

impl Platform {
    /// iPXE's name for the platform.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Pcbios => "pcbios",
            Platform::Efi => "efi",
        }
    }

    /// Reads iPXE's `${platform}`; anything unknown or empty is treated as BIOS, which is
    /// what iPXE builds without the setting (pre-2012) are.
    pub fn from_ipxe(s: &str) -> Platform {
        if s.eq_ignore_ascii_case("efi") {
            Platform::Efi
        } else {
            Platform::Pcbios
        }
    }
}

/// What the machine-facing servers know about one boot request.
#[derive(Clone, Debug)]
pub struct BootRequest {
    /// iPXE `${platform}`.
    pub platform: Platform,
    /// iPXE `${buildarch}` (i386, x86_64, arm64), if given.
    pub arch: Option<String>,
}

/// What an unknown machine is told, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiscoverAnswer {
    /// Boot from local disk (the default: an unknown machine is never wiped).
    #[default]
    LocalBoot,
    /// Do not answer at all.
    Ignore,
}

/// Which install claims are believed: a request for `/ipxe?mac=M` that would mint M's install
/// token says "I am M", and a MAC is a claim, not a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClaimPolicy {
    /// Only with evidence the daemon observed that the asking address is M's (the kernel's
    /// neighbour table, provision's own lease, a recent DHCP request of M for that address).
    #[default]
    Evidence,
    /// Also without evidence, for relayed or routed clients where none can exist (evidence
    /// to the contrary still refuses).
    Any,
}

impl ClaimPolicy {
    /// The configuration word.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimPolicy::Evidence => "evidence",
            ClaimPolicy::Any => "any",
        }
    }
}

impl FromStr for ClaimPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "evidence" => Ok(ClaimPolicy::Evidence),
            "any" => Ok(ClaimPolicy::Any),
            _ => Err(format!(
                "claims {s:?} must be evidence (the default) or any (relayed or routed clients; see docs/security.md)"
            )),
        }
    }
}

/// The stored facts `decide` reads about a machine.
#[derive(Clone, Debug)]
pub struct MachineFacts<'a> {
    /// Lifecycle state.
    pub state: State,
    /// The profile it installs: its own, or its groups' (see [`GroupSet::profile`]).
    pub profile: Option<&'a str>,
    /// The installer has fetched everything it needs and is writing the disk (the profile's
    /// `local_boot_after` artifact was served): the OS phones home from its own first boot.
    pub installer_done: bool,
}

/// Why a machine boots its local disk; shown in events and as a comment in the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReason {
    /// Unknown or discovered machine, and discovery answers local boot.
    Discovered,
    /// The OS is installed; never reinstall without an operator's reprovision.
    Installed,
    /// A step failed; the operator decides (reprovision), the machine is not wiped again.
    Failed,
    /// Still `installing`, but the installer has written the disk; the installed OS will
    /// phone home from its first boot.
    InstallerDone,
    /// The inventory's database cannot be read (PostgreSQL down or unreachable): what the
    /// machine should boot is unknown, and the one answer that never wipes a disk and lets
    /// installed machines come up is its disk.
    InventoryUnreachable,
}

impl LocalReason {
    /// One word for events and scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::Discovered => "discovered",
            LocalReason::Installed => "installed",
            LocalReason::Failed => "failed",
            LocalReason::InstallerDone => "installer-done",
            LocalReason::InventoryUnreachable => "inventory-unreachable",
        }
    }
}

/// The answer to "this machine, this request: what should it boot?"
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootDecision {
    /// Boot the local disk.
    LocalBoot {
        /// BIOS: `sanboot --drive 0x80`; UEFI: `exit` back to `/boot.ipxe`, whose `exit 1` sends the
        /// firmware to its next boot entry.
        platform: Platform,
        /// Why.
        reason: LocalReason,
    },
    /// Install the named profile (an install token is minted for it).
    Install {
        /// The machine's profile.
        profile: String,
    },
    /// Say nothing: "ignore this machine" is a value, not an error.
    Ignore,
}

/// Whether every boot client gets an answer whatever the inventory says about it. Only the
/// `ignore` discovery answer ever makes [`decide`] return `Ignore` (the tests check every
/// state), so with any other answer the DHCP path needs no read at all.
pub fn always_answers(discover: DiscoverAnswer) -> bool {
    discover != DiscoverAnswer::Ignore
}

/// Decides what a machine boots, from its stored facts (or none: never seen) and the request.
///
/// enrolled and installing → install (an installer that rebooted before phoning home gets a
/// fresh token), except an installing machine whose installer is done, which boots the disk it
/// wrote and phones home from there; installed and later → local boot, never a reinstall loop;
/// failed → local boot until the operator reprovisions; unknown and discovered → the
/// configured discovery answer, except a discovered machine a group gives a profile, which
/// installs it as if it had been enrolled with it (the install enrolls it).
pub fn decide(
    machine: Option<&MachineFacts<'_>>,
    req: &BootRequest,
    discover: DiscoverAnswer,
) -> BootDecision {
    let local = |reason| BootDecision::LocalBoot {
        platform: req.platform,
        reason,
    };
    let discovered = || match discover {
        DiscoverAnswer::LocalBoot => local(LocalReason::Discovered),
        DiscoverAnswer::Ignore => BootDecision::Ignore,
    };
    let Some(m) = machine else {
        return discovered();
    };
    match m.state {
        State::Discovered => match m.profile {
            Some(p) => BootDecision::Install {
                profile: p.to_string(),
            },
            None => discovered(),
        },
        State::Installing if m.installer_done => local(LocalReason::InstallerDone),
        State::Enrolled | State::Installing => match m.profile {
            Some(p) => BootDecision::Install {
                profile: p.to_string(),
            },
            // An enrolled machine always has a profile, its own or a group's (the store
            // refuses a group change that would take the last one away); if one ever does
            // not, wiping it with a guess would be worse than booting its disk.
            None => local(LocalReason::Failed),
        },
        State::Installed | State::Registering | State::Registered | State::HandedOff => {
            local(LocalReason::Installed)
        }
        State::Failed => local(LocalReason::Failed),
    }
}
