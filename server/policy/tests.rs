use super::*;
use State::*;

#[test]
fn lifecycle_happy_path() {
    let mut s = Discovered;
    for (t, want) in [
        (Transition::Enroll, Enrolled),
        (Transition::StartInstall, Installing),
        (Transition::PhoneHome, Installed),
        (Transition::StartRegistration, Registering),
        (Transition::FinishRegistration, Registered),
        (Transition::HandOff, HandedOff),
        (Transition::Reprovision, Enrolled),
    ] {
        s = transition(s, &t).unwrap();
        assert_eq!(s, want);
    }
}

#[test]
fn transition_table() {
    // (from, transition, legal?)
    let fail = || Transition::Fail(Failure::default());
    let legal: &[(State, Transition)] = &[
        (Discovered, Transition::Enroll),
        (Enrolled, Transition::StartInstall),
        (Installing, Transition::PhoneHome),
        (Installed, Transition::StartRegistration),
        (Registered, Transition::StartRegistration),
        (HandedOff, Transition::StartRegistration),
        (Failed, Transition::StartRegistration),
        (Registering, Transition::FinishRegistration),
        (Installed, Transition::HandOff),
        (Registered, Transition::HandOff),
        (Enrolled, Transition::Reprovision),
        (Installing, Transition::Reprovision),
        (Installed, Transition::Reprovision),
        (Registering, Transition::Reprovision),
        (Registered, Transition::Reprovision),
        (HandedOff, Transition::Reprovision),
        (Failed, Transition::Reprovision),
        (Enrolled, fail()),
        (Installing, fail()),
        (Registering, fail()),
        (Registered, fail()),
    ];
    for from in ALL_STATES {
        for t in &ALL_TRANSITIONS {
            let want = legal.contains(&(from, t.clone()));
            assert_eq!(transition(from, t).is_ok(), want, "{from} {t:?}");
        }
    }
}

#[test]
fn illegal_transition_names_state_and_moves() {
    let e = transition(Installed, &Transition::PhoneHome).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("state installed"), "{msg}");
    assert!(msg.contains("reprovision (→ enrolled)"), "{msg}");
    assert!(msg.contains("register (→ registering)"), "{msg}");
    let e = transition(Discovered, &Transition::Reprovision).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot reprovision a machine in state discovered; from discovered the allowed moves are: enroll (→ enrolled)"
    );
}

#[test]
fn state_names_round_trip() {
    for s in ALL_STATES {
        assert_eq!(s.as_str().parse::<State>().unwrap(), s);
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
    assert!("bogus".parse::<State>().unwrap_err().contains("handed_off"));
}

fn req(platform: Platform) -> BootRequest {
    BootRequest {
        platform,
        arch: Some("x86_64".into()),
    }
}

#[test]
fn decision_table() {
    let local = |platform, reason| BootDecision::LocalBoot { platform, reason };
    let install = BootDecision::Install {
        profile: "p".into(),
    };
    for platform in [Platform::Pcbios, Platform::Efi] {
        let r = req(platform);
        assert_eq!(
            decide(None, &r, DiscoverAnswer::LocalBoot),
            local(platform, LocalReason::Discovered)
        );
        assert_eq!(
            decide(None, &r, DiscoverAnswer::Ignore),
            BootDecision::Ignore
        );
        let table = [
            (Discovered, local(platform, LocalReason::Discovered)),
            (Enrolled, install.clone()),
            (Installing, install.clone()),
            (Installed, local(platform, LocalReason::Installed)),
            (Registering, local(platform, LocalReason::Installed)),
            (Registered, local(platform, LocalReason::Installed)),
            (HandedOff, local(platform, LocalReason::Installed)),
            (Failed, local(platform, LocalReason::Failed)),
        ];
        for (state, want) in table {
            let facts = MachineFacts {
                state,
                profile: Some("p"),
                installer_done: false,
            };
            assert_eq!(
                decide(Some(&facts), &r, DiscoverAnswer::LocalBoot),
                want,
                "{state}"
            );
        }
        let ignored = MachineFacts {
            state: Discovered,
            profile: None,
            installer_done: false,
        };
        let done = MachineFacts {
            state: Installing,
            profile: Some("p"),
            installer_done: true,
        };
        assert_eq!(
            decide(Some(&done), &r, DiscoverAnswer::LocalBoot),
            local(platform, LocalReason::InstallerDone)
        );
        assert_eq!(
            decide(Some(&ignored), &r, DiscoverAnswer::Ignore),
            BootDecision::Ignore
        );
    }
}

#[test]
fn enrolled_without_profile_never_installs() {
    let facts = MachineFacts {
        state: Enrolled,
        profile: None,
        installer_done: false,
    };
    assert!(matches!(
        decide(Some(&facts), &req(Platform::Efi), DiscoverAnswer::LocalBoot),
        BootDecision::LocalBoot { .. }
    ));
}

#[test]
fn platform_from_ipxe() {
    assert_eq!(Platform::from_ipxe("efi"), Platform::Efi);
    assert_eq!(Platform::from_ipxe("pcbios"), Platform::Pcbios);
    assert_eq!(Platform::from_ipxe(""), Platform::Pcbios);
}

#[test]
fn only_the_ignore_answer_ignores() {
    for discover in [DiscoverAnswer::LocalBoot, DiscoverAnswer::Ignore] {
        let mut answers = vec![decide(None, &req(Platform::Pcbios), discover)];
        for state in ALL_STATES {
            for installer_done in [false, true] {
                let f = MachineFacts {
                    state,
                    profile: Some("p"),
                    installer_done,
                };
                answers.push(decide(Some(&f), &req(Platform::Efi), discover));
            }
        }
        let ignored = answers.contains(&BootDecision::Ignore);
        assert_eq!(ignored, !always_answers(discover), "{discover:?}");
    }
}
