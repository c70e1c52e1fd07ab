use super::*;

fn mac(s: &str) -> Mac {
    s.parse().unwrap()
}

fn new(m: &str) -> NewMachine {
    NewMachine {
        mac: Some(mac(m)),
        profile: "debian-12".into(),
        hostname: Some("node1".into()),
        vars: [("ntp".to_string(), "pool.ntp.org".to_string())].into(),
        ..Default::default()
    }
}

fn kinds(store: &Store, m: Mac) -> Vec<String> {
    store
        .events(Some(m), 0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[test]
fn enroll_creates_and_refuses_twice() {
    let s = Store::open_in_memory().unwrap();
    let m = s.enroll(&new("52:54:00:00:00:01"), 1).unwrap();
    assert_eq!(m.state, State::Enrolled);
    assert_eq!(m.vars["ntp"], "pool.ntp.org");
    let err = s.enroll(&new("52:54:00:00:00:01"), 2).unwrap_err();
    assert!(
        err.to_string()
            .contains("already enrolled (state enrolled)"),
        "{err}"
    );
    assert_eq!(kinds(&s, m.mac), ["enrolled"]);
}

#[test]
fn discovered_then_enrolled() {
    let s = Store::open_in_memory().unwrap();
    let m = mac("52:54:00:00:00:02");
    let sighting = Sighting {
        uuid: Some("4c4c4544-0038-4410-8051-b4c04f4d4e32".into()),
        arch: Some("x86_64".into()),
        platform: Some("efi".into()),
        ip: Some("10.0.0.5".into()),
    };
    let d = s.sighted(m, &sighting, 1).unwrap();
    assert_eq!(d.state, State::Discovered);
    assert_eq!(d.profile, None);
    // A second sighting adds no second `discovered` event.
    s.sighted(m, &sighting, 2).unwrap();
    let e = s.enroll(&new("52:54:00:00:00:02"), 3).unwrap();
    assert_eq!(e.state, State::Enrolled);
    assert_eq!(
        e.uuid.as_deref(),
        Some("4c4c4544-0038-4410-8051-b4c04f4d4e32")
    );
    assert_eq!(e.platform.as_deref(), Some("efi"));
    let ev = s.events(Some(m), 0, 100).unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].from_state.as_deref(), Some("discovered"));
    assert_eq!(ev[1].to_state.as_deref(), Some("enrolled"));
}

#[test]
fn token_lifecycle() {
    let s = Store::open_in_memory().unwrap();
    let m = s.enroll(&new("52:54:00:00:00:03"), 1).unwrap().mac;
    assert!(matches!(
        s.machine_by_token("h1", 2),
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
    s.start_install(m, "h1", 100, 2).unwrap();
    assert_eq!(s.machine_by_token("h1", 3).unwrap().mac, m);
    // A second boot replaces the token.
    let again = s.start_install(m, "h2", 100, 4).unwrap();
    assert_eq!(again.state, State::Installing);
    assert!(matches!(
        s.machine_by_token("h1", 5),
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
    assert!(matches!(
        s.machine_by_token("h2", 100),
        Err(StoreError::Token(TokenProblem::Expired, _))
    ));
    let keys = vec![("ssh-ed25519".to_string(), "ssh-ed25519 AAAA k".to_string())];
    let done = s
        .phone_home("h2", &keys, Some("10.0.0.9"), "1 host key", 6)
        .unwrap();
    assert_eq!(done.state, State::Installed);
    assert_eq!(done.host_keys, ["ssh-ed25519 AAAA k"]);
    assert!(matches!(
        s.phone_home("h2", &keys, None, "", 7),
        Err(StoreError::Token(TokenProblem::Used, _))
    ));
    assert_eq!(
        kinds(&s, m),
        [
            "enrolled",
            "install_started",
            "install_restarted",
            "phoned_home"
        ]
    );
}

#[test]
fn reprovision_kills_token_and_keys() {
    let s = Store::open_in_memory().unwrap();
    let m = s.enroll(&new("52:54:00:00:00:04"), 1).unwrap().mac;
    s.start_install(m, "h1", 100, 2).unwrap();
    let keys = vec![("ssh-ed25519".to_string(), "ssh-ed25519 AAAA k".to_string())];
    s.phone_home("h1", &keys, None, "", 3).unwrap();
    let r = s.reprovision(m, 4).unwrap();
    assert_eq!((r.state, r.generation), (State::Enrolled, 1));
    assert!(r.host_keys.is_empty());
    assert!(matches!(
        s.machine_by_token("h1", 5),
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
    // Reprovision during an install invalidates the live token too.
    s.start_install(m, "h2", 100, 6).unwrap();
    s.reprovision(m, 7).unwrap();
    assert!(s.machine_by_token("h2", 8).is_err());
}

#[test]
fn illegal_transitions_change_nothing() {
    let s = Store::open_in_memory().unwrap();
    let m = mac("52:54:00:00:00:05");
    s.sighted(m, &Sighting::default(), 1).unwrap();
    let err = s.reprovision(m, 2).unwrap_err();
    assert!(err.to_string().contains("state discovered"), "{err}");
    let after = s.machine(m).unwrap().unwrap();
    assert_eq!((after.state, after.generation), (State::Discovered, 0));
    assert_eq!(kinds(&s, m), ["discovered"]);
}

#[test]
fn expired_installs_fail_with_reason() {
    let s = Store::open_in_memory().unwrap();
    let a = s.enroll(&new("52:54:00:00:00:06"), 1).unwrap().mac;
    let b = s.enroll(&new("52:54:00:00:00:07"), 1).unwrap().mac;
    s.start_install(a, "ha", 50, 2).unwrap();
    s.start_install(b, "hb", 500, 2).unwrap();
    assert_eq!(s.expire_installs(100).unwrap(), vec![a]);
    let fa = s.machine(a).unwrap().unwrap();
    assert_eq!(fa.state, State::Failed);
    assert_eq!(fa.failed_step.as_deref(), Some("install"));
    assert!(fa.failed_reason.unwrap().contains("expired"));
    assert_eq!(s.machine(b).unwrap().unwrap().state, State::Installing);
}

#[test]
fn update_delete_and_history_survives() {
    let s = Store::open_in_memory().unwrap();
    let m = s.enroll(&new("52:54:00:00:00:08"), 1).unwrap().mac;
    let patch = MachinePatch {
        hostname: Some(Some("node9".into())),
        vars: Some(BTreeMap::new()),
        ..Default::default()
    };
    let u = s.update(m, &patch, 2).unwrap();
    assert_eq!(u.hostname.as_deref(), Some("node9"));
    assert!(u.vars.is_empty());
    s.delete(m, 3).unwrap();
    assert!(s.machine(m).unwrap().is_none());
    assert_eq!(kinds(&s, m), ["enrolled", "updated", "deleted"]);
    assert!(matches!(s.delete(m, 4), Err(StoreError::NotFound(_))));
}

#[test]
fn file_database_keeps_writes_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("provision.db");
    {
        let s = Store::open(&path).unwrap();
        s.enroll(&new("52:54:00:00:00:09"), 1).unwrap();
    }
    let s = Store::open(&path).unwrap();
    let all = s.machines(Some(State::Enrolled)).unwrap();
    assert_eq!(all.len(), 1);
    assert!(s.machines(Some(State::Installed)).unwrap().is_empty());
    let conn = s.lock();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    let sync: i64 = conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap();
    let fk: i64 = conn
        .pragma_query_value(None, "foreign_keys", |r| r.get(0))
        .unwrap();
    assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1));
}
