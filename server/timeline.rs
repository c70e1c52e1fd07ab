//! A machine's boot timeline for people: its events folded into the stages an install goes
//! through (DHCP → TFTP → iPXE → config → phone-home → local boot → registration → hand-off),
//! each with when it happened and whether it failed. Pure: the web UI hands it the events.

use serde::Serialize;

use crate::policy::EventKind;
use crate::store::Event;

/// How far a stage got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not reached in this install.
    Pending,
    /// Happened.
    Done,
    /// Went wrong; the detail says how.
    Failed,
}

/// One stage of the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stage {
    /// What the stage is, in words.
    pub name: String,
    /// Its status.
    pub status: Status,
    /// When it last happened or failed, Unix ms.
    pub at: Option<i64>,
    /// The event's detail.
    pub detail: String,
}

/// The stages, in order, of the kinds that make them.
const STAGES: &[(&str, &[EventKind], &[EventKind])] = &[
    (
        "DHCP",
        &[EventKind::DhcpOffered, EventKind::DhcpLease],
        &[EventKind::DhcpNak, EventKind::DhcpPoolExhausted],
    ),
    (
        "TFTP / HTTP boot",
        &[EventKind::TftpServed, EventKind::HttpBootServed],
        &[EventKind::TftpFailed],
    ),
    (
        "iPXE install",
        &[EventKind::InstallStarted, EventKind::InstallRestarted],
        &[EventKind::ClaimRefused],
    ),
    (
        "config fetched",
        &[EventKind::ConfigServed, EventKind::InstallerDone],
        &[EventKind::ConfigRefused, EventKind::RenderFailed],
    ),
    (
        "phone-home",
        &[EventKind::PhonedHome],
        &[EventKind::PhoneHomeRefused],
    ),
    ("local boot", &[EventKind::IpxeServed], &[]),
    (
        "registration",
        &[
            EventKind::RegistrationStarted,
            EventKind::RegisterStep,
            EventKind::Registered,
        ],
        &[EventKind::RegisterStepFailed],
    ),
    ("hand-off", &[EventKind::HandedOff], &[]),
];

/// The current install's timeline from a machine's events (oldest first). Only events since
/// the last enroll or reprovision count; a `failed` event marks the stage it failed in (by
/// its step name) or, if the step names none of them, the first stage not done.
pub fn timeline(events: &[Event]) -> Vec<Stage> {
    let start = events
        .iter()
        .rposition(|e| matches!(e.kind, EventKind::Enrolled | EventKind::Reprovisioned))
        .unwrap_or(0);
    let mut stages: Vec<Stage> = STAGES
        .iter()
        .map(|(name, _, _)| Stage {
            name: (*name).into(),
            status: Status::Pending,
            at: None,
            detail: String::new(),
        })
        .collect();
    let mut installed = false;
    for e in &events[start..] {
        if e.kind == EventKind::Failed {
            let after_last_done = stages
                .iter()
                .rposition(|s| s.status == Status::Done)
                .map_or(0, |i| i + 1);
            let i = stage_of_failure(&e.detail)
                .unwrap_or(after_last_done)
                .min(stages.len() - 1);
            stages[i].status = Status::Failed;
            stages[i].at = Some(e.at);
            stages[i].detail = e.detail.clone();
            continue;
        }
        if matches!(e.kind, EventKind::PhonedHome | EventKind::InstallerDone) {
            installed = true;
        }
        // A script served before the install ended is the install's chain, not a local boot.
        if e.kind == EventKind::IpxeServed && !installed {
            continue;
        }
        for (i, (_, done, failed)) in STAGES.iter().enumerate() {
            let s = &mut stages[i];
            if done.contains(&e.kind) {
                // Registration stays failed if a later step of the same run failed; a new
                // run (`registration_started`) begins again.
                if s.status != Status::Failed || e.kind == EventKind::RegistrationStarted {
                    s.status = Status::Done;
                }
                s.at = Some(e.at);
                s.detail = e.detail.clone();
            } else if failed.contains(&e.kind) {
                s.status = Status::Failed;
                s.at = Some(e.at);
                s.detail = e.detail.clone();
            }
        }
    }
    stages
}

/// The stage a `failed` event's detail (`step: reason`) names, if it names one: the
/// registrar's own steps and a role's steps are registration, `handoff` is the hand-off; an
/// install that never phoned home (`install`) failed wherever it had got to.
fn stage_of_failure(detail: &str) -> Option<usize> {
    match detail.split(':').next().unwrap_or("").trim() {
        "" | "install" => None,
        "handoff" => Some(7),
        _ => Some(6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, kind: EventKind, detail: &str) -> Event {
        Event {
            id,
            at: id * 1000,
            mac: None,
            kind,
            from_state: None,
            to_state: None,
            detail: detail.into(),
            count: 1,
        }
    }

    fn statuses(t: &[Stage]) -> Vec<(&str, Status)> {
        t.iter().map(|s| (s.name.as_str(), s.status)).collect()
    }

    #[test]
    fn an_install_fills_the_stages_in_order_and_a_reprovision_starts_again() {
        use EventKind::*;
        let mut events = vec![
            ev(1, Enrolled, ""),
            ev(2, DhcpOffered, "offer"),
            ev(3, TftpServed, "undionly.kpxe"),
            ev(4, InstallStarted, "debian-12"),
            ev(5, ConfigServed, "preseed"),
            ev(6, PhonedHome, "2 host keys"),
            ev(7, IpxeServed, "local boot (installed, pcbios)"),
        ];
        let t = timeline(&events);
        assert_eq!(
            statuses(&t),
            vec![
                ("DHCP", Status::Done),
                ("TFTP / HTTP boot", Status::Done),
                ("iPXE install", Status::Done),
                ("config fetched", Status::Done),
                ("phone-home", Status::Done),
                ("local boot", Status::Done),
                ("registration", Status::Pending),
                ("hand-off", Status::Pending),
            ]
        );
        assert_eq!((t[3].at, t[3].detail.as_str()), (Some(5000), "preseed"));
        events.push(ev(8, Reprovisioned, ""));
        events.push(ev(9, DhcpOffered, "offer"));
        let t = timeline(&events);
        assert_eq!(t[0].status, Status::Done);
        assert!(t[1..].iter().all(|s| s.status == Status::Pending));
    }

    #[test]
    fn the_failed_step_is_highlighted() {
        use EventKind::*;
        let base = [
            ev(1, Enrolled, ""),
            ev(2, InstallStarted, ""),
            ev(3, PhonedHome, ""),
            ev(4, RegistrationStarted, ""),
            ev(5, RegisterStep, "ovs-pki ok"),
        ];
        let mut events = base.to_vec();
        events.push(ev(6, RegisterStepFailed, "bridges: exit 1"));
        events.push(ev(7, Failed, "bridges: exit 1"));
        let t = timeline(&events);
        assert_eq!(t[6].status, Status::Failed);
        assert_eq!(t[6].detail, "bridges: exit 1");
        // An install whose token ran out fails where it had got to.
        let t = timeline(&[
            ev(1, Enrolled, ""),
            ev(2, InstallStarted, ""),
            ev(
                3,
                Failed,
                "install: the install token expired before the machine phoned home",
            ),
        ]);
        assert_eq!(t[3].status, Status::Failed);
        assert_eq!(t[2].status, Status::Done);
        // A new registration run clears the failed mark once it gets going.
        events.push(ev(8, RegistrationStarted, "again"));
        assert_eq!(timeline(&events)[6].status, Status::Done);
    }

    #[test]
    fn an_ipxe_script_before_the_install_ends_is_not_a_local_boot() {
        use EventKind::*;
        let t = timeline(&[ev(1, Enrolled, ""), ev(2, IpxeServed, "install")]);
        assert_eq!(t[5].status, Status::Pending);
    }
}
