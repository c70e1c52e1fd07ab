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

/// The lifecycle table in ARCHITECTURE.md is the specification: every state and move is
/// read from it and checked against `transition`, so the code and the document cannot drift
/// apart (a table copied into this test would only repeat the code).
#[test]
fn transition_table() {
    let doc = include_str!("../../ARCHITECTURE.md");
    let section = doc
        .split("### The lifecycle\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a lifecycle section");
    let mut rows = section
        .lines()
        .skip_while(|l| !l.starts_with("| from"))
        .take_while(|l| l.starts_with('|'));
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = cells(rows.next().expect("the table's header"));
    let fail = Transition::Fail(Failure::default());
    let moves: Vec<Transition> = header[1..]
        .iter()
        .map(|m| match m.as_str() {
            "enroll" => Transition::Enroll,
            "install" => Transition::StartInstall,
            "phone-home" => Transition::PhoneHome,
            "register" => Transition::StartRegistration,
            "finish" => Transition::FinishRegistration,
            "hand-off" => Transition::HandOff,
            "reprovision" => Transition::Reprovision,
            "fail" => fail.clone(),
            other => panic!("unknown move {other:?} in the lifecycle table"),
        })
        .collect();
    assert_eq!(
        moves.len(),
        ALL_TRANSITIONS.len(),
        "every move has a column"
    );
    let mut seen = Vec::new();
    for row in rows.skip(1) {
        let row = cells(row);
        let from: State = row[0].parse().unwrap();
        assert_eq!(row.len(), moves.len() + 1, "{row:?}");
        for (t, cell) in moves.iter().zip(&row[1..]) {
            let want = (!cell.is_empty()).then(|| cell.parse::<State>().unwrap());
            assert_eq!(transition(from, t).ok(), want, "{from} {t:?}");
        }
        seen.push(from);
    }
    assert_eq!(
        seen, ALL_STATES,
        "every state has a row, in lifecycle order"
    );
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
            // A discovered machine has a profile only from a group: it installs it.
            (Discovered, install.clone()),
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
        assert_eq!(
            decide(Some(&ignored), &r, DiscoverAnswer::LocalBoot),
            local(platform, LocalReason::Discovered)
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

fn group(
    name: &str,
    selector: &[(&str, &str)],
    profile: Option<&str>,
    vars: &[(&str, &str)],
) -> Group {
    let map = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Group {
        name: name.into(),
        selector: map(selector),
        profile: profile.map(str::to_string),
        vars: map(vars),
        labels: Default::default(),
    }
}

fn machine<'a>(labels: &'a std::collections::BTreeMap<String, String>) -> Selectable<'a> {
    Selectable {
        mac: "52:54:00:00:00:01",
        uuid: Some("4c4c4544-0001"),
        serial: Some("SN1"),
        hostname: None,
        arch: Some("x86_64"),
        platform: Some("efi"),
        labels: Some(labels),
    }
}

fn labels(kv: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn selection_needs_every_selector_value_and_a_default_selects_all() {
    let set = GroupSet::new(vec![
        group("default", &[], Some("d"), &[]),
        group("rack3", &[("rack", "3")], None, &[]),
        group(
            "rack3-efi",
            &[("rack", "3"), ("platform", "efi")],
            None,
            &[],
        ),
        group(
            "rack3-bios",
            &[("rack", "3"), ("platform", "pcbios")],
            None,
            &[],
        ),
        group("by-serial", &[("serial", "SN1")], None, &[]),
        group("other-serial", &[("serial", "SN2")], None, &[]),
        group("by-mac", &[("mac", "52:54:00:00:00:01")], None, &[]),
        // A label named like a fact never stands in for the fact.
        group("fake-serial", &[("serial", "FAKE")], None, &[]),
    ]);
    let l = labels(&[("rack", "3"), ("serial", "FAKE")]);
    let names: Vec<&str> = set
        .matching(&machine(&l))
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["rack3-efi", "by-mac", "by-serial", "rack3", "default"],
        "most specific first, then by name"
    );
    let none = labels(&[]);
    let names: Vec<&str> = set
        .matching(&machine(&none))
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(names, ["by-mac", "by-serial", "default"]);
}

#[test]
fn precedence_own_then_most_specific_then_less_then_default() {
    // (own profile, own vars) → (profile, from), each var → (value, source)
    let set = GroupSet::new(vec![
        group(
            "default",
            &[],
            Some("discovery"),
            &[("ntp", "pool"), ("tz", "UTC")],
        ),
        group(
            "rack3",
            &[("rack", "3")],
            Some("ubuntu"),
            &[("ntp", "rack3-ntp"), ("gw", "10.3.0.1")],
        ),
        group(
            "rack3-gpu",
            &[("rack", "3"), ("gpu", "yes")],
            Some("ubuntu-gpu"),
            &[("ntp", "gpu-ntp")],
        ),
    ]);
    type Want<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        &'a [(&'a str, &'a str, Option<&'a str>)],
    );
    type Case<'a> = (
        Vec<(&'a str, &'a str)>,
        Option<&'a str>,
        Vec<(&'a str, &'a str)>,
        Want<'a>,
    );
    let cases: Vec<Case> = vec![
        // Only the default selects it.
        (
            vec![],
            None,
            vec![],
            (
                Some("discovery"),
                Some("default"),
                &[
                    ("ntp", "pool", Some("default")),
                    ("tz", "UTC", Some("default")),
                ],
            ),
        ),
        // rack3 beats the default, the default still fills what rack3 does not set.
        (
            vec![("rack", "3")],
            None,
            vec![],
            (
                Some("ubuntu"),
                Some("rack3"),
                &[
                    ("gw", "10.3.0.1", Some("rack3")),
                    ("ntp", "rack3-ntp", Some("rack3")),
                    ("tz", "UTC", Some("default")),
                ],
            ),
        ),
        // The two-label group beats the one-label one.
        (
            vec![("rack", "3"), ("gpu", "yes")],
            None,
            vec![],
            (
                Some("ubuntu-gpu"),
                Some("rack3-gpu"),
                &[
                    ("gw", "10.3.0.1", Some("rack3")),
                    ("ntp", "gpu-ntp", Some("rack3-gpu")),
                    ("tz", "UTC", Some("default")),
                ],
            ),
        ),
        // The machine's own values beat every group.
        (
            vec![("rack", "3"), ("gpu", "yes")],
            Some("debian"),
            vec![("ntp", "mine")],
            (
                Some("debian"),
                None,
                &[
                    ("gw", "10.3.0.1", Some("rack3")),
                    ("ntp", "mine", None),
                    ("tz", "UTC", Some("default")),
                ],
            ),
        ),
    ];
    for (own_labels, own_profile, own_vars, (profile, from, vars)) in cases {
        let l = labels(&own_labels);
        let v = labels(&own_vars);
        let m = machine(&l);
        let r = set.resolve(&m, own_profile, &v, &Default::default());
        let ctx = format!("labels {own_labels:?}, own profile {own_profile:?}");
        assert_eq!(r.profile.as_deref(), profile, "{ctx}");
        assert_eq!(r.profile_from.as_deref(), from, "{ctx}");
        assert_eq!(
            set.profile(&m, own_profile),
            (r.profile.clone(), r.profile_from.clone()),
            "{ctx}"
        );
        let got: Vec<(String, String, Source)> = r
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), r.source(&format!("vars.{k}"))))
            .collect();
        let want: Vec<(String, String, Source)> = vars
            .iter()
            .map(|(k, v, s)| {
                (
                    k.to_string(),
                    v.to_string(),
                    s.map_or(Source::Own, |g| Source::Group(g.into())),
                )
            })
            .collect();
        assert_eq!(got, want, "{ctx}");
    }
}

#[test]
fn a_tie_is_refused_when_the_second_group_is_made() {
    let set = GroupSet::new(vec![
        group("rack3", &[("rack", "3")], Some("ubuntu"), &[("ntp", "a")]),
        group("default", &[], None, &[("tz", "UTC")]),
    ]);
    // (candidate, refused?)
    let table = [
        // Same specificity, can co-select (rack=3 and model=r640), both set the profile.
        (
            group("r640", &[("model", "r640")], Some("debian"), &[]),
            true,
        ),
        // ... both set vars.ntp.
        (
            group("r640", &[("model", "r640")], None, &[("ntp", "b")]),
            true,
        ),
        // Same selector key, another value: never the same machine.
        (
            group("rack4", &[("rack", "4")], Some("debian"), &[("ntp", "b")]),
            false,
        ),
        // More specific: wins, no tie.
        (
            group(
                "rack3-r640",
                &[("rack", "3"), ("model", "r640")],
                Some("debian"),
                &[],
            ),
            false,
        ),
        // Same specificity, nothing in common.
        (
            group("r640", &[("model", "r640")], None, &[("gw", "x")]),
            false,
        ),
        // A second default that sets what the first sets, differently.
        (group("default2", &[], None, &[("tz", "CET")]), true),
        // ... or to the same value: no choice to make.
        (group("default2", &[], None, &[("tz", "UTC")]), false),
        (
            group(
                "r640",
                &[("model", "r640")],
                Some("ubuntu"),
                &[("ntp", "a")],
            ),
            false,
        ),
        (group("default2", &[], Some("p"), &[]), false),
        // Replacing a group by its own name is not a tie with itself.
        (
            group("rack3", &[("rack", "3")], Some("debian"), &[("ntp", "c")]),
            false,
        ),
    ];
    for (candidate, refused) in table {
        let why = set.conflict(&candidate);
        assert_eq!(why.is_some(), refused, "{candidate:?}: {why:?}");
        if let Some(why) = why {
            assert!(why.contains(&candidate.name), "{why}");
            assert!(why.contains("more specific"), "{why}");
        }
    }
}

#[test]
fn no_groups_resolve_to_the_machines_own_values() {
    let set = GroupSet::new(vec![]);
    let l = labels(&[("a", "b")]);
    let v = labels(&[("x", "y")]);
    let r = set.resolve(&machine(&l), Some("p"), &v, &l);
    assert_eq!(r.profile.as_deref(), Some("p"));
    assert_eq!(r.vars, v);
    assert_eq!(r.labels, l);
    assert!(r.inherited.is_empty() && r.groups.is_empty());
}

fn rule(
    name: &str,
    priority: i64,
    conditions: &[(&str, &str)],
    max: Option<u64>,
    used: u64,
) -> Rule {
    Rule {
        name: name.into(),
        priority,
        enabled: true,
        conditions: conditions
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        max,
        used,
        ..Default::default()
    }
}

#[test]
fn rules_match_every_condition_prefixes_with_a_star_and_go_in_priority_order() {
    let l = labels(&[("site", "oslo")]);
    let m = Reported {
        mac: "52:54:00:12:34:56",
        serial: Some("SN1"),
        platform: Some("efi"),
        vendor_class: Some("PXEClient:Arch:00007:UNDI:003016"),
        interface: Some("eno1"),
        labels: Some(&l),
        ..Default::default()
    };
    // (conditions, matches?)
    let table: &[(&[(&str, &str)], bool)] = &[
        (&[], true),
        (&[("mac", "52:54:00:*")], true),
        (&[("mac", "52:54:01:*")], false),
        (&[("mac", "52:54:00:12:34:56")], true),
        (&[("mac", "52:54:00:12:34")], false),
        (&[("vendor_class", "PXEClient:Arch:00007*")], true),
        (&[("platform", "efi"), ("serial", "SN1")], true),
        (&[("platform", "efi"), ("serial", "SN2")], false),
        (&[("uuid", "*")], false),
        (&[("relay", "10.0.0.1")], false),
        (&[("interface", "eno1"), ("site", "oslo")], true),
        (&[("site", "bergen")], false),
    ];
    for (conditions, want) in table {
        assert_eq!(
            rule("r", 0, conditions, None, 0).matches(&m),
            *want,
            "{conditions:?}"
        );
    }
    let set = RuleSet::new(vec![
        rule("b-late", 50, &[("mac", "52:54:00:*")], None, 0),
        rule("a-full", 10, &[("platform", "efi")], Some(2), 2),
        rule("c-early", 10, &[("serial", "SN9")], None, 0),
        Rule {
            enabled: false,
            ..rule("d-off", 1, &[], None, 0)
        },
    ]);
    let names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["d-off", "a-full", "c-early", "b-late"]);
    // The disabled one is skipped, the full one is passed over for the next with room.
    assert!(matches!(set.choose(&m), Choice::Rule(r) if r.name == "b-late"));
    let only_full = RuleSet::new(vec![rule("a-full", 10, &[("platform", "efi")], Some(2), 2)]);
    assert!(matches!(only_full.choose(&m), Choice::Full(r) if r.name == "a-full"));
    let other = Reported {
        mac: "00:11:22:33:44:55",
        ..Default::default()
    };
    assert_eq!(set.choose(&other), Choice::None);
}

#[test]
fn hostname_patterns_fill_index_serial_and_mac() {
    let m = Reported {
        mac: "52:54:00:12:34:56",
        serial: Some("SN-R3-7"),
        ..Default::default()
    };
    for (pattern, index, want) in [
        ("rack3-{index:02}", 3, Ok("rack3-03")),
        ("rack3-{index:03}", 12, Ok("rack3-012")),
        ("n{index}", 12, Ok("n12")),
        ("{serial}", 1, Ok("sn-r3-7")),
        ("host-{mac}", 1, Ok("host-525400123456")),
        ("x-{bogus}", 1, Err("unknown placeholder {bogus}")),
        ("x-{index", 1, Err("without its")),
    ] {
        let got = hostname(pattern, index, &m);
        match want {
            Ok(w) => assert_eq!(got.as_deref(), Ok(w), "{pattern}"),
            Err(w) => assert!(
                got.as_ref().is_err_and(|e| e.contains(w)),
                "{pattern}: {got:?}"
            ),
        }
    }
    let no_serial = Reported {
        mac: "52:54:00:12:34:56",
        ..Default::default()
    };
    assert!(hostname("{serial}", 1, &no_serial)
        .unwrap_err()
        .contains("no serial"));
}
