//! The closed set of event kinds: what can appear on a machine's timeline.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! event_kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal; )*) => {
        /// What an event records. Stored and shown as its snake_case name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum EventKind {
            $( $(#[$doc])* $variant, )*
        }

        impl EventKind {
            /// Every kind, for documentation and tests.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            /// The snake_case name used in the database, the API and the CLI.
            pub fn as_str(self) -> &'static str {
                match self { $( EventKind::$variant => $name, )* }
            }
        }
    };
}

event_kinds! {
    /// The operator enrolled the machine.
    Enrolled = "enrolled";
    /// The operator changed profile, hostname, vars or labels.
    Updated = "updated";
    /// The operator deleted the machine.
    Deleted = "deleted";
    /// The operator created, changed or deleted a group (an event of no machine).
    GroupChanged = "group_changed";
    /// The operator created, changed or deleted a discovery rule (an event of no machine).
    RuleChanged = "rule_changed";
    /// A propose-mode rule matches the discovered machine; an operator confirms.
    RuleProposed = "rule_proposed";
    /// Rules match the discovered machine, but each has enrolled its most machines.
    RuleFull = "rule_full";
    /// A rule matched the discovered machine but could not enroll it (its hostname pattern
    /// or profile did not work for it).
    RuleFailed = "rule_failed";
    /// First boot request from an unknown MAC.
    Discovered = "discovered";
    /// A boot handed the installer an install token.
    InstallStarted = "install_started";
    /// The installer booted again before phoning home: a fresh token.
    InstallRestarted = "install_restarted";
    /// The installed OS phoned home; host keys pinned.
    PhonedHome = "phoned_home";
    /// The registrar started.
    RegistrationStarted = "registration_started";
    /// The registrar finished every step.
    Registered = "registered";
    /// Hand-off to configuration management succeeded.
    HandedOff = "handed_off";
    /// The operator reprovisioned the machine.
    Reprovisioned = "reprovisioned";
    /// A step failed.
    Failed = "failed";
    /// The installer fetched its last artifact; boots go to the local disk.
    InstallerDone = "installer_done";
    /// A config artifact was served by install token.
    ConfigServed = "config_served";
    /// A config request was refused (token unknown, expired, used; no such artifact).
    ConfigRefused = "config_refused";
    /// A template failed to render.
    RenderFailed = "render_failed";
    /// A phone-home was refused.
    PhoneHomeRefused = "phone_home_refused";
    /// An install claim (`/ipxe` for a machine due to install) was refused: no evidence, or
    /// contrary evidence, that the address asking is that machine's; or a live token is held
    /// by another address.
    ClaimRefused = "claim_refused";
    /// A live install token now serves another address: the daemon has evidence that it is
    /// the same machine (an installer that took a new DHCP lease).
    TokenMoved = "token_moved";
    /// An iPXE script was served.
    IpxeServed = "ipxe_served";
    /// The machine got the ignore answer over HTTP.
    IpxeIgnored = "ipxe_ignored";
    /// A DHCP offer (or PXE ack) with boot instructions.
    DhcpOffered = "dhcp_offered";
    /// A DHCP boot request was not answered.
    DhcpIgnored = "dhcp_ignored";
    /// Address mode: a lease was bound.
    DhcpLease = "dhcp_lease";
    /// Address mode: a REQUEST was refused.
    DhcpNak = "dhcp_nak";
    /// Address mode: the client declined its address.
    DhcpDecline = "dhcp_decline";
    /// Address mode: no free address.
    DhcpPoolExhausted = "dhcp_pool_exhausted";
    /// A TFTP transfer finished.
    TftpServed = "tftp_served";
    /// A TFTP request or transfer failed.
    TftpFailed = "tftp_failed";
    /// An iPXE binary was served over HTTP (UEFI HTTP Boot).
    HttpBootServed = "http_boot_served";
    /// A registration step finished.
    RegisterStep = "register_step";
    /// A registration step failed.
    RegisterStepFailed = "register_step_failed";
    /// The registrar could not connect yet and will retry.
    RegisterRetry = "register_retry";
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        EventKind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown event kind {s:?}"))
    }
}
