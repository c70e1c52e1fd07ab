use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::now_ms;

/// The address the test machines ask from.
const FROM: &str = "10.0.0.9";

fn mac(s: &str) -> Mac {
    s.parse().unwrap()
}

fn nth(n: u32) -> Mac {
    let b = n.to_be_bytes();
    Mac([0x52, 0x54, b[0], b[1], b[2], b[3]])
}

fn new(m: &str) -> NewMachine {
    NewMachine {
        mac: mac(m),
        profile: Some("debian-12".into()),
        hostname: Some("node1".into()),
        uuid: None,
        serial: None,
        vars: [("ntp".to_string(), "pool.ntp.org".to_string())].into(),
        labels: BTreeMap::new(),
    }
}

/// The engine a store test runs on: each test that takes one runs on both (see [`on_both`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// A new, empty inventory on this engine.
    pub(super) async fn store(self) -> SqlInventory {
        self.open(Limits::default()).await
    }

    /// A new, empty inventory with `limits`: a temporary SQLite file, or a new database in
    /// the test process's PostgreSQL cluster (dropped with the store).
    async fn open(self, limits: Limits) -> SqlInventory {
        match self {
            Engine::Sqlite => SqlInventory::open_temp_with(limits).unwrap(),
            Engine::Postgres => {
                let cluster = crate::store::pg_cluster::shared();
                let db = cluster.create_db();
                let url = cluster.url(&db);
                let drop_db = Box::new(move || crate::store::pg_cluster::shared().drop_db(&db));
                SqlInventory::connect_test(&url, limits, drop_db)
                    .await
                    .unwrap()
            }
        }
    }
}

impl Engine {
    /// A second inventory on what `s` holds: a copy of its file (SQLite, whose file one
    /// inventory owns at a time), or a second connection to its database (PostgreSQL).
    async fn reopen(self, s: &SqlInventory) -> (SqlInventory, Option<tempfile::TempDir>) {
        match (s.path(), s.postgres_url()) {
            (Some(path), _) => {
                let dir = tempfile::tempdir().unwrap();
                let copy = dir.path().join("p.db");
                crate::store::snapshot(path, &copy).unwrap();
                let s2 = SqlInventory::open(&copy, Limits::default()).unwrap();
                (s2, Some(dir))
            }
            (None, Some(url)) => {
                let s2 = SqlInventory::connect(url, Limits::default()).await.unwrap();
                (s2, None)
            }
            (None, None) => unreachable!("a store is on SQLite or PostgreSQL"),
        }
    }
}

/// `on_both!(name, ...)`: a test module per name, running `name(engine)` on SQLite and on
/// PostgreSQL (`store::tests::name::sqlite`, `…::postgres`); `multi_thread:` before the names
/// runs them on tokio's multi-threaded runtime.
macro_rules! on_both {
    (multi_thread: $($name:ident),+ $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Engine::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(super::Engine::Postgres).await
            }
        })+
    };
    ($($name:ident),+ $(,)?) => {
        $(mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Engine::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::Engine::Postgres).await
            }
        })+
    };
}

pub(super) use on_both;

on_both!(
    enroll_creates_and_refuses_twice,
    discovered_then_enrolled,
    token_lifecycle,
    a_token_is_bound_to_the_address_it_was_issued_to,
    boot_requests_set_the_boot_address_never_the_ssh_address,
    reprovision_kills_token_and_keys,
    a_node_certificate_is_revoked_on_reprovision_delete_and_replacement,
    illegal_transitions_change_nothing,
    expired_installs_fail_with_step_and_reason,
    update_delete_and_history_survives,
    boot_facts_are_the_decision_inputs,
    observations_are_coalesced_and_written_in_order,
    dhcp_sightings_discover_unknown_machines_in_the_batch,
    observation_drops_are_counted,
    discovered_machines_stay_under_the_cap,
    retention_keeps_transitions_longest,
    a_retention_run_is_spread_over_batches,
    pages_of_machines_and_events,
    reads_between_repeats_do_not_split_their_row,
    repeats_within_a_minute_add_to_the_newest_row,
    a_durable_write_writes_its_own_machines_repeats_first_and_only_those,
    a_machine_seen_again_within_a_minute_is_not_rewritten,
    machine_searches_filter_sort_and_count,
    the_event_feed_moves_with_each_commit_and_token_info_never_shows_the_token,
    a_sighting_that_writes_what_selectors_read_is_seen_by_the_next_boot_facts,
    group_changes_keep_resolution_unambiguous_and_every_install_with_a_profile,
    concurrent_discoveries_never_share_an_index_or_pass_the_count,
    proposals_wait_for_confirmation_and_go_with_their_rule,
    a_rule_that_cannot_enroll_a_machine_changes_nothing,
    an_apply_is_all_or_nothing_and_a_dry_run_is_its_plan,
    an_apply_is_checked_as_a_whole
);
on_both!(multi_thread:
    concurrent_writes_are_group_committed_and_isolated,
    cached_boot_facts_follow_every_write,
    racing_read_then_write_calls_take_effect_once
);

async fn kinds(s: &SqlInventory, m: Mac) -> Vec<String> {
    counts(s, m).await.into_iter().map(|(k, _)| k).collect()
}

/// A machine's timeline (up to 1000 events), after a flush.
async fn timeline(s: &SqlInventory, m: Mac) -> Vec<Event> {
    s.flush().await.unwrap();
    s.events(EventQuery {
        mac: Some(m),
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A machine's timeline as (kind, count), after a flush.
async fn counts(s: &SqlInventory, m: Mac) -> Vec<(String, i64)> {
    timeline(s, m)
        .await
        .into_iter()
        .map(|e| (e.kind.as_str().to_string(), e.count))
        .collect()
}

fn key() -> Vec<(String, String)> {
    vec![("ssh-ed25519".to_string(), "ssh-ed25519 AAAA k".to_string())]
}

async fn enroll_creates_and_refuses_twice(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:01"), 1).await.unwrap();
    assert_eq!(m.state, State::Enrolled);
    assert_eq!(m.vars["ntp"], "pool.ntp.org");
    let err = s.enroll(new("52:54:00:00:00:01"), 2).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("already enrolled (state enrolled)"),
        "{err}"
    );
    assert_eq!(kinds(&s, m.mac).await, ["enrolled"]);
}

async fn discovered_then_enrolled(engine: Engine) {
    let s = engine.store().await;
    let m = mac("52:54:00:00:00:02");
    let sighting = Sighting {
        uuid: Some("4c4c4544-0038-4410-8051-b4c04f4d4e32".into()),
        serial: Some("SN-2".into()),
        dhcp: DhcpSeen {
            vendor_class: Some("PXEClient:Arch:00007:UNDI:003016".into()),
            user_class: None,
            interface: Some("eno1".into()),
            relay: None,
        },
        arch: Some("x86_64".into()),
        platform: Some("efi".into()),
        ip: Some("10.0.0.5".into()),
    };
    let d = s.discover(m, sighting.clone(), 1).await.unwrap();
    assert_eq!(
        d.serial.as_deref(),
        Some("SN-2"),
        "the reported serial is kept"
    );
    assert_eq!((d.state, d.profile.as_deref()), (State::Discovered, None));
    assert_eq!(d.last_seen, Some(1));
    // A second sighting adds no second `discovered` event.
    s.discover(m, sighting, 2).await.unwrap();
    let e = s.enroll(new("52:54:00:00:00:02"), 3).await.unwrap();
    assert_eq!(e.state, State::Enrolled);
    assert_eq!(
        e.uuid.as_deref(),
        Some("4c4c4544-0038-4410-8051-b4c04f4d4e32")
    );
    assert_eq!(e.platform.as_deref(), Some("efi"));
    let ev = s
        .events(EventQuery {
            mac: Some(m),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].from_state, Some(State::Discovered));
    assert_eq!(ev[1].to_state, Some(State::Enrolled));
}

async fn token_lifecycle(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:03"), 1).await.unwrap().mac;
    assert!(matches!(
        s.machine_by_token("h1", FROM, 2).await,
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
    s.start_install(
        m,
        "h1".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    assert_eq!(s.machine_by_token("h1", FROM, 3).await.unwrap().mac, m);
    // A second boot replaces the token.
    s.start_install(
        m,
        "h2".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        4,
    )
    .await
    .unwrap();
    assert_eq!(
        s.machine(m).await.unwrap().unwrap().state,
        State::Installing
    );
    assert!(matches!(
        s.machine_by_token("h1", FROM, 5).await,
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
    assert!(matches!(
        s.machine_by_token("h2", FROM, 100).await,
        Err(StoreError::Token(TokenProblem::Expired, _))
    ));
    let done = s
        .phone_home(
            "h2".into(),
            key(),
            FROM.into(),
            BTreeSet::new(),
            "1 host key".into(),
            6,
        )
        .await
        .unwrap();
    assert_eq!(done.state, State::Installed);
    assert_eq!(done.host_keys, ["ssh-ed25519 AAAA k"]);
    assert_eq!(done.last_ip.as_deref(), Some("10.0.0.9"));
    assert!(matches!(
        s.phone_home(
            "h2".into(),
            key(),
            FROM.into(),
            BTreeSet::new(),
            String::new(),
            7
        )
        .await,
        Err(StoreError::Token(TokenProblem::Used, _))
    ));
    assert_eq!(
        kinds(&s, m).await,
        [
            "enrolled",
            "install_started",
            "install_restarted",
            "phoned_home"
        ]
    );
}

async fn a_token_is_bound_to_the_address_it_was_issued_to(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:33"), 1).await.unwrap().mac;
    s.start_install(
        m,
        "h1".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    assert!(matches!(
        s.machine_by_token("h1", "10.0.0.66", 3).await,
        Err(StoreError::Token(TokenProblem::OtherAddress, Some(x))) if x == m
    ));
    // A live token is not replaced by a claim from another address; from its own, it is.
    let held = s
        .start_install(
            m,
            "h2".into(),
            100,
            Sighting::default(),
            "10.0.0.66".into(),
            None,
            3,
        )
        .await;
    assert!(
        matches!(&held, Err(StoreError::TokenHeld { holder, expires_at: 100, .. }) if holder == FROM),
        "{held:?}"
    );
    assert!(held
        .unwrap_err()
        .to_string()
        .contains("machines reprovision"));
    assert_eq!(s.machine_by_token("h1", FROM, 4).await.unwrap().mac, m);
    // Once it expired, another address may start over.
    s.start_install(
        m,
        "h3".into(),
        200,
        Sighting::default(),
        "10.0.0.66".into(),
        None,
        100,
    )
    .await
    .unwrap();
    // A phone-home from elsewhere is refused unless the machine's profile allows it, and
    // then the event says so; the SSH address is the phone-home's.
    assert!(matches!(
        s.phone_home(
            "h3".into(),
            key(),
            FROM.into(),
            BTreeSet::new(),
            String::new(),
            101
        )
        .await,
        Err(StoreError::Token(TokenProblem::OtherAddress, _))
    ));
    let allowed: BTreeSet<String> = ["debian-12".to_string()].into();
    let done = s
        .phone_home(
            "h3".into(),
            key(),
            FROM.into(),
            allowed,
            "1 key".into(),
            102,
        )
        .await
        .unwrap();
    assert_eq!(done.last_ip.as_deref(), Some(FROM));
    let ev = timeline(&s, m).await;
    let last = ev.last().unwrap();
    assert_eq!(last.kind, EventKind::PhonedHome);
    assert!(
        last.detail
            .contains("from 10.0.0.9, not 10.0.0.66 where the install began"),
        "{}",
        last.detail
    );
}

async fn boot_requests_set_the_boot_address_never_the_ssh_address(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:34"), 1).await.unwrap().mac;
    let at = |ip: &str| Sighting {
        ip: Some(ip.into()),
        ..Default::default()
    };
    s.start_install(
        m,
        "h".into(),
        100,
        at("10.0.0.5"),
        "10.0.0.5".into(),
        None,
        2,
    )
    .await
    .unwrap();
    s.phone_home(
        "h".into(),
        key(),
        "10.0.0.5".into(),
        BTreeSet::new(),
        String::new(),
        3,
    )
    .await
    .unwrap();
    s.observe(Observation::Seen {
        mac: m,
        sighting: at("10.0.0.77"),
        discover: false,
        at: 4,
    });
    s.flush().await.unwrap();
    let got = s.machine(m).await.unwrap().unwrap();
    assert_eq!(
        (got.last_ip.as_deref(), got.boot_ip.as_deref()),
        (Some("10.0.0.5"), Some("10.0.0.77"))
    );
}

async fn reprovision_kills_token_and_keys(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:04"), 1).await.unwrap().mac;
    s.start_install(
        m,
        "h1".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    s.phone_home(
        "h1".into(),
        key(),
        FROM.into(),
        BTreeSet::new(),
        String::new(),
        3,
    )
    .await
    .unwrap();
    let r = s.reprovision(m, 4).await.unwrap();
    assert_eq!((r.state, r.generation), (State::Enrolled, 1));
    assert!(r.host_keys.is_empty());
    assert!(matches!(
        s.machine_by_token("h1", FROM, 5).await,
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
    // Reprovision during an install invalidates the live token too.
    s.start_install(
        m,
        "h2".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        6,
    )
    .await
    .unwrap();
    s.reprovision(m, 7).await.unwrap();
    assert!(matches!(
        s.machine_by_token("h2", FROM, 8).await,
        Err(StoreError::Token(TokenProblem::Unknown, _))
    ));
}

async fn a_node_certificate_is_revoked_on_reprovision_delete_and_replacement(engine: Engine) {
    let s = engine.store().await;
    let day = 86_400_000;
    let m = s.enroll(new("52:54:00:00:00:14"), 1).await.unwrap().mac;
    let save =
        |fp: &str, at: i64| s.save_node_cert(m, format!("PEM {fp}"), fp.into(), "CN=n".into(), at);
    save("AA", 2).await.unwrap();
    // The same certificate again (a re-registration that reuses it) revokes nothing.
    save("AA", 3).await.unwrap();
    assert!(s.revoked_certs().await.unwrap().is_empty());
    // Another key: the old certificate is superseded.
    save("BB", 4).await.unwrap();
    s.reprovision(m, 5).await.unwrap();
    assert_eq!(s.node_cert(m).await.unwrap(), None);
    let got: Vec<_> = s
        .revoked_certs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.fingerprint, r.cert_pem, r.revoked_at, r.reason, r.mac))
        .collect();
    assert_eq!(
        got,
        [
            ("AA".into(), "PEM AA".into(), 4, "superseded".into(), m),
            ("BB".into(), "PEM BB".into(), 5, "reprovisioned".into(), m),
        ]
    );
    // Delete revokes too, and a revocation older than any certificate's life is dropped.
    save("CC", 6).await.unwrap();
    s.delete(m, 401 * day).await.unwrap();
    let got: Vec<_> = s
        .revoked_certs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.fingerprint, r.reason))
        .collect();
    assert_eq!(got, [("CC".to_string(), "deleted".to_string())]);
}

async fn illegal_transitions_change_nothing(engine: Engine) {
    let s = engine.store().await;
    let m = mac("52:54:00:00:00:05");
    s.discover(m, Sighting::default(), 1).await.unwrap();
    let err = s.reprovision(m, 2).await.unwrap_err();
    assert!(err.to_string().contains("state discovered"), "{err}");
    let after = s.machine(m).await.unwrap().unwrap();
    assert_eq!((after.state, after.generation), (State::Discovered, 0));
    assert_eq!(kinds(&s, m).await, ["discovered"]);
}

async fn expired_installs_fail_with_step_and_reason(engine: Engine) {
    let s = engine.store().await;
    let a = s.enroll(new("52:54:00:00:00:06"), 1).await.unwrap().mac;
    let b = s.enroll(new("52:54:00:00:00:07"), 1).await.unwrap().mac;
    s.start_install(
        a,
        "ha".into(),
        50,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    s.start_install(
        b,
        "hb".into(),
        500,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    assert_eq!(s.expire_installs(100).await.unwrap(), vec![a]);
    let fa = s.machine(a).await.unwrap().unwrap();
    assert_eq!(fa.state, State::Failed);
    let f = fa.failure.unwrap();
    assert_eq!(f.step, "install");
    assert!(f.reason.contains("expired"), "{}", f.reason);
    assert_eq!(
        s.machine(b).await.unwrap().unwrap().state,
        State::Installing
    );
}

async fn update_delete_and_history_survives(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:08"), 1).await.unwrap().mac;
    let patch = MachinePatch {
        hostname: Some(Some("node9".into())),
        vars: Some(BTreeMap::new()),
        ..Default::default()
    };
    let u = s.update(m, patch, 2).await.unwrap();
    assert_eq!(u.hostname.as_deref(), Some("node9"));
    assert!(u.vars.is_empty());
    s.delete(m, 3).await.unwrap();
    assert!(s.machine(m).await.unwrap().is_none());
    assert_eq!(kinds(&s, m).await, ["enrolled", "updated", "deleted"]);
    assert!(matches!(s.delete(m, 4).await, Err(StoreError::NotFound(_))));
}

#[tokio::test]
async fn file_database_keeps_writes_across_reopen_with_durable_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("provision.db");
    {
        let s = SqlInventory::open(&path, Limits::default()).unwrap();
        s.enroll(new("52:54:00:00:00:09"), 1).await.unwrap();
        assert_eq!(s.writer_pragmas().await.unwrap(), ("wal".into(), 2, 1));
    }
    let s = SqlInventory::open(&path, Limits::default()).unwrap();
    let q = |state| MachineQuery {
        state: Some(state),
        ..Default::default()
    };
    assert_eq!(s.machines(q(State::Enrolled)).await.unwrap().len(), 1);
    assert!(s.machines(q(State::Installed)).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_database_from_a_newer_provision_is_refused_with_what_to_do_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("provision.db");
    {
        let s = SqlInventory::open(&path, Limits::default()).unwrap();
        s.enroll(new("52:54:00:00:00:0a"), 1).await.unwrap();
    }
    let newer = {
        let c = rusqlite::Connection::open(&path).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        c.pragma_update(None, "user_version", v + 1).unwrap();
        v + 1
    };
    let e = SqlInventory::open(&path, Limits::default())
        .err()
        .expect("a newer schema is refused")
        .to_string();
    assert!(
        e.contains(&format!(
            "schema version {newer}, newer than this provision's"
        )) && e.contains("provision restore"),
        "{e}"
    );
    // A restore checks the same before it moves anything in.
    let e = crate::store::verify(&path).unwrap_err().to_string();
    assert!(
        e.contains("newer than this provision's") && e.contains("Restore it with that version"),
        "{e}"
    );
    // Untouched: still the newer version, still the machine.
    let c = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, newer);
    let n: i64 = c
        .query_row("SELECT count(*) FROM machines", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

async fn boot_facts_are_the_decision_inputs(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:0a"), 1).await.unwrap().mac;
    assert_eq!(s.boot_facts(mac("52:54:00:00:00:0b")).await.unwrap(), None);
    let f = s.boot_facts(m).await.unwrap().unwrap();
    assert_eq!(
        f,
        BootFacts {
            state: State::Enrolled,
            profile: Some("debian-12".into()),
            installer_done: false,
            uuid: None,
            serial: None,
            hostname: Some("node1".into()),
            arch: None,
            platform: None,
            labels: BTreeMap::new(),
            dhcp: DhcpSeen::default(),
            proposed_rule: None,
        }
    );
    s.start_install(
        m,
        "h".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    s.config_served(m, "x".into(), Some("done".into()), 3)
        .await
        .unwrap();
    assert!(s.boot_facts(m).await.unwrap().unwrap().installer_done);
    assert_eq!(
        kinds(&s, m).await,
        [
            "enrolled",
            "install_started",
            "config_served",
            "installer_done"
        ]
    );
}

/// Concurrent durable writes share commits (fewer commits than writes), and every caller is
/// answered with its own result after its commit; a failing request in a batch rolls back only
/// its own changes.
async fn concurrent_writes_are_group_committed_and_isolated(engine: Engine) {
    let s = Arc::new(engine.store().await);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = new("52:54:00:00:00:00");
            n.mac = nth(i);
            s.enroll(n, 1).await
        }));
    }
    // A request that fails (enrolled twice) in the middle of the others.
    let dup = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut n = new("52:54:00:00:00:00");
            n.mac = nth(0);
            s.enroll(n, 2).await
        })
    };
    let mut first = None;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        if i == 0 {
            first = Some(r.is_ok());
        } else {
            r.unwrap();
        }
    }
    let dup = dup.await.unwrap();
    let all = s.machines(MachineQuery::default()).await.unwrap();
    assert_eq!(all.len(), 200);
    let stats = s.stats();
    assert!(stats.writes >= 201, "{stats:?}");
    assert!(
        stats.commits < stats.writes,
        "writes should share commits under concurrency: {stats:?}"
    );
    // Whichever ran first, MAC 0 was enrolled once: one request won, the other was refused
    // and left nothing behind.
    assert_ne!(
        first,
        Some(dup.is_ok()),
        "exactly one enroll of MAC 0 succeeds"
    );
    assert_eq!(kinds(&s, nth(0)).await, ["enrolled"]);
}

async fn observations_are_coalesced_and_written_in_order(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:0c"), 1).await.unwrap().mac;
    for at in 10..15 {
        s.observe(Observation::Event {
            mac: Some(m),
            kind: EventKind::DhcpOffered,
            detail: "undionly.kpxe".into(),
            at,
        });
        s.observe(Observation::Seen {
            mac: m,
            sighting: Sighting {
                ip: Some(format!("10.0.0.{at}")),
                ..Default::default()
            },
            discover: false,
            at,
        });
    }
    // A durable write after them comes after them on the timeline.
    s.start_install(
        m,
        "h".into(),
        100,
        Sighting::default(),
        FROM.into(),
        None,
        20,
    )
    .await
    .unwrap();
    let ev = timeline(&s, m).await;
    let got: Vec<(&str, i64)> = ev.iter().map(|e| (e.kind.as_str(), e.count)).collect();
    assert_eq!(
        got,
        [("enrolled", 1), ("dhcp_offered", 5), ("install_started", 1)]
    );
    assert_eq!(ev[1].at, 10, "a coalesced row keeps its first time");
    let mm = s.machine(m).await.unwrap().unwrap();
    // The install's own (empty) sighting, within a minute, says nothing new.
    assert_eq!(
        (mm.boot_ip.as_deref(), mm.last_seen),
        (Some("10.0.0.14"), Some(14))
    );
    assert_eq!(s.stats().observations_written, 10);
}

async fn dhcp_sightings_discover_unknown_machines_in_the_batch(engine: Engine) {
    let s = engine.store().await;
    let m = mac("52:54:00:00:00:0d");
    s.observe(Observation::Seen {
        mac: m,
        sighting: Sighting {
            uuid: Some("u".into()),
            ..Default::default()
        },
        discover: true,
        at: 5,
    });
    s.observe(Observation::Seen {
        mac: mac("52:54:00:00:00:0e"),
        sighting: Sighting::default(),
        discover: false,
        at: 5,
    });
    s.flush().await.unwrap();
    let d = s.machine(m).await.unwrap().unwrap();
    assert_eq!((d.state, d.uuid.as_deref()), (State::Discovered, Some("u")));
    assert!(
        s.machine(mac("52:54:00:00:00:0e")).await.unwrap().is_none(),
        "a sighting without discover creates nothing"
    );
    assert_eq!(kinds(&s, m).await, ["discovered"]);
}

async fn observation_drops_are_counted(engine: Engine) {
    let s = engine
        .open(Limits {
            observation_queue: 4,
            ..Limits::default()
        })
        .await;
    let m = s.enroll(new("52:54:00:00:00:0f"), 1).await.unwrap().mac;
    for i in 0..50 {
        s.observe(Observation::Event {
            mac: Some(m),
            kind: EventKind::IpxeServed,
            detail: format!("m{i}"),
            at: i,
        });
    }
    s.flush().await.unwrap();
    let st = s.stats();
    assert_eq!(
        st.observations_dropped + st.observations_written,
        50,
        "every observation is either written or counted as dropped: {st:?}"
    );
}

async fn discovered_machines_stay_under_the_cap(engine: Engine) {
    let s = engine
        .open(Limits {
            max_discovered: 50,
            ..Limits::default()
        })
        .await;
    let enrolled = s.enroll(new("52:54:00:00:00:10"), 0).await.unwrap().mac;
    // A flood of unknown MACs in DHCP: recorded up to the cap, the rest shed (and counted),
    // with no event left behind for a MAC that was not recorded.
    for i in 0..300u32 {
        s.observe(Observation::Seen {
            mac: nth(1000 + i),
            sighting: Sighting::default(),
            discover: true,
            at: i64::from(i),
        });
        s.observe(Observation::Event {
            mac: Some(nth(1000 + i)),
            kind: EventKind::DhcpOffered,
            detail: "undionly.kpxe".into(),
            at: i64::from(i),
        });
    }
    s.maintain().await.unwrap();
    let n = s.count_by_state().await.unwrap();
    assert_eq!(n.get(&State::Discovered), Some(&50), "{n:?}");
    assert_eq!(s.stats().discoveries_shed, 250);
    assert_eq!(
        kinds(&s, nth(1000)).await,
        ["discovered", "dhcp_offered"],
        "recorded: the first 50"
    );
    assert!(kinds(&s, nth(1299)).await.is_empty(), "shed: nothing kept");
    // A boot that reaches /ipxe is always recorded: the least recently seen make room.
    for i in 0..10u32 {
        s.discover(nth(5000 + i), Sighting::default(), 1000)
            .await
            .unwrap();
    }
    s.maintain().await.unwrap();
    let n = s.count_by_state().await.unwrap();
    assert_eq!(n.get(&State::Discovered), Some(&50), "{n:?}");
    assert_eq!(
        n.get(&State::Enrolled),
        Some(&1),
        "enrolled machines are never evicted"
    );
    assert_eq!(s.stats().discovered_evicted, 10);
    assert!(s.machine(nth(5009)).await.unwrap().is_some());
    assert!(
        s.machine(nth(1000)).await.unwrap().is_none(),
        "seen longest ago"
    );
    assert!(
        kinds(&s, nth(1000)).await.is_empty(),
        "its events went with it"
    );
    assert!(s.machine(nth(1010)).await.unwrap().is_some());
    assert_eq!(kinds(&s, enrolled).await, ["enrolled"]);
}

async fn retention_keeps_transitions_longest(engine: Engine) {
    let s = engine
        .open(Limits {
            events_per_machine: 10,
            ..Limits::default()
        })
        .await;
    let m = s.enroll(new("52:54:00:00:00:11"), 1).await.unwrap().mac;
    s.start_install(
        m,
        "h".into(),
        1000,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    for i in 0..30 {
        s.observe(Observation::Event {
            mac: Some(m),
            kind: EventKind::IpxeServed,
            detail: format!("n{i}"),
            at: 10 + i,
        });
    }
    s.maintain().await.unwrap();
    let k = kinds(&s, m).await;
    assert_eq!(k.len(), 10, "{k:?}");
    assert_eq!(&k[..2], ["enrolled", "install_started"]);
    assert_eq!(s.stats().events_pruned, 22);
}

async fn a_retention_run_is_spread_over_batches(engine: Engine) {
    let s = engine
        .open(Limits {
            events_per_machine: 3,
            ..Limits::default()
        })
        .await;
    let n = super::engine::RETENTION_CHUNK as u32 * 2 + 88;
    let mut enrolls = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = s.clone();
        let mut m = new("52:54:00:00:00:00");
        m.mac = nth(i);
        enrolls.spawn(async move { s.enroll(m, 1).await.unwrap() });
    }
    while enrolls.join_next().await.is_some() {}
    // Six events each (enrolled + five served): three over the limit.
    for i in 0..n {
        for j in 0..5 {
            s.observe(Observation::Event {
                mac: Some(nth(i)),
                kind: EventKind::IpxeServed,
                detail: format!("n{j}"),
                at: 10 + j,
            });
        }
    }
    s.maintain_observations_only().await;
    assert_eq!(s.stats().events_pruned, 0);
    // One chunk of machines per batch, until the run is done.
    let chunk = super::engine::RETENTION_CHUNK as u64;
    s.start_retention_run().await;
    assert_eq!(s.stats().events_pruned, 3 * chunk);
    s.maintain_observations_only().await;
    assert_eq!(s.stats().events_pruned, 6 * chunk);
    s.maintain_observations_only().await;
    assert_eq!(s.stats().events_pruned, 3 * u64::from(n));
    for i in [0, n / 2, n - 1] {
        assert_eq!(
            kinds(&s, nth(i)).await,
            ["enrolled", "ipxe_served", "ipxe_served"]
        );
    }
}

async fn pages_of_machines_and_events(engine: Engine) {
    let s = engine.store().await;
    for i in 0..25u32 {
        let mut n = new("52:54:00:00:00:00");
        n.mac = nth(i);
        s.enroll(n, 1).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .machines(MachineQuery {
                state: None,
                after,
                limit: 10,
            })
            .await
            .unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = Some(last.mac);
        seen.extend(page.into_iter().map(|m| m.mac));
    }
    assert_eq!(seen, (0..25).map(nth).collect::<Vec<_>>());
    let ev = s
        .events(EventQuery {
            mac: None,
            after: 20,
            limit: 3,
            tail: false,
        })
        .await
        .unwrap();
    assert_eq!(ev.iter().map(|e| e.id).collect::<Vec<_>>(), [21, 22, 23]);
    let ev = s
        .events(EventQuery {
            mac: None,
            after: 20,
            limit: 3,
            tail: true,
        })
        .await
        .unwrap();
    assert_eq!(ev.iter().map(|e| e.id).collect::<Vec<_>>(), [23, 24, 25]);
}

async fn reads_between_repeats_do_not_split_their_row(engine: Engine) {
    // An admin polling the API flushes before every read: the repeats it makes visible still
    // add to one row, not a row per poll.
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:13"), 1).await.unwrap().mac;
    let t0 = now_ms();
    for dt in [0, 1_000, 2_000, 3_000] {
        s.observe(Observation::Event {
            mac: Some(m),
            kind: EventKind::IpxeServed,
            detail: "local boot (installed, pcbios)".into(),
            at: t0 + dt,
        });
        assert_eq!(
            counts(&s, m).await,
            [
                ("enrolled".to_string(), 1),
                ("ipxe_served".to_string(), dt / 1_000 + 1)
            ]
        );
    }
}

async fn repeats_within_a_minute_add_to_the_newest_row(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:12"), 1).await.unwrap().mac;
    let t0 = now_ms();
    let served = |at| Observation::Event {
        mac: Some(m),
        kind: EventKind::IpxeServed,
        detail: "local boot (installed, pcbios)".into(),
        at,
    };
    // Three batches within a minute: one row; the repeats are counted in memory and
    // written for the read.
    for dt in [1_000, 20_000, 40_000] {
        s.observe(served(t0 + dt));
        s.maintain_observations_only().await;
    }
    assert_eq!(
        s.events(EventQuery {
            mac: Some(m),
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        2,
        "enrolled + one row: the repeats were not written as rows"
    );
    // A state change in between starts a new row, so the timeline keeps its order.
    s.start_install(
        m,
        "h".into(),
        t0 + 1_000_000,
        Sighting::default(),
        FROM.into(),
        None,
        t0 + 41_000,
    )
    .await
    .unwrap();
    s.observe(served(t0 + 42_000));
    s.flush().await.unwrap();
    // More than a minute after the row began: a new row.
    s.observe(served(t0 + 200_000));
    let ev = timeline(&s, m).await;
    let got: Vec<(&str, i64, i64)> = ev
        .iter()
        .map(|e| (e.kind.as_str(), e.count, e.at - t0))
        .collect();
    assert_eq!(
        got,
        [
            ("enrolled", 1, 1 - t0),
            ("ipxe_served", 3, 1_000),
            ("install_started", 1, 41_000),
            ("ipxe_served", 1, 42_000),
            ("ipxe_served", 1, 200_000)
        ]
    );
}

async fn a_durable_write_writes_its_own_machines_repeats_first_and_only_those(engine: Engine) {
    // After a burst of local boots every machine has repeats counted in memory; an install
    // of one machine must put that machine's before its install_started (its timeline's
    // order) and need not write everybody else's in its commit.
    let s = engine.store().await;
    let a = s.enroll(new("52:54:00:00:00:21"), 1).await.unwrap().mac;
    let b = s.enroll(new("52:54:00:00:00:22"), 1).await.unwrap().mac;
    let t0 = now_ms();
    let served = |mac, at| Observation::Event {
        mac: Some(mac),
        kind: EventKind::IpxeServed,
        detail: "local boot (installed, pcbios)".into(),
        at,
    };
    for dt in [0, 1_000, 2_000] {
        s.observe(served(a, t0 + dt));
        s.observe(served(b, t0 + dt));
        s.maintain_observations_only().await;
    }
    s.start_install(
        a,
        "h".into(),
        t0 + 1_000_000,
        Sighting::default(),
        FROM.into(),
        None,
        t0 + 3_000,
    )
    .await
    .unwrap();
    let written = |m| {
        let s = &s;
        async move {
            s.events(EventQuery {
                mac: Some(m),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.kind.as_str().to_string(), e.count))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        written(a).await,
        [
            ("enrolled".to_string(), 1),
            ("ipxe_served".to_string(), 3),
            ("install_started".to_string(), 1)
        ]
    );
    assert_eq!(
        written(b).await,
        [("enrolled".to_string(), 1), ("ipxe_served".to_string(), 1)],
        "b's repeats wait for their window, a flush or a write of b"
    );
    // Nor do the sweeper finding nothing to expire, a's phone-home (its token names a), or
    // an event of a write them.
    assert!(s.expire_installs(t0 + 4_000).await.unwrap().is_empty());
    s.phone_home(
        "h".into(),
        key(),
        FROM.into(),
        BTreeSet::new(),
        String::new(),
        t0 + 5_000,
    )
    .await
    .unwrap();
    s.record_event(Some(a), EventKind::RegisterRetry, "x".into(), t0 + 6_000)
        .await
        .unwrap();
    assert_eq!(
        written(b).await,
        [("enrolled".to_string(), 1), ("ipxe_served".to_string(), 1)]
    );
    // They are not lost: a flush (an admin read) writes them.
    assert_eq!(
        counts(&s, b).await,
        [("enrolled".to_string(), 1), ("ipxe_served".to_string(), 3)]
    );
}

async fn a_machine_seen_again_within_a_minute_is_not_rewritten(engine: Engine) {
    let s = engine.store().await;
    let m = s.enroll(new("52:54:00:00:00:13"), 1).await.unwrap().mac;
    let seen = |at, ip: &str| Observation::Seen {
        mac: m,
        sighting: Sighting {
            ip: Some(ip.into()),
            ..Default::default()
        },
        discover: false,
        at,
    };
    s.observe(seen(10_000, "10.0.0.1"));
    s.flush().await.unwrap();
    s.observe(seen(30_000, "10.0.0.1"));
    s.flush().await.unwrap();
    assert_eq!(s.machine(m).await.unwrap().unwrap().last_seen, Some(10_000));
    // Something new is written at once; an old sighting is refreshed.
    s.observe(seen(31_000, "10.0.0.2"));
    s.flush().await.unwrap();
    let mm = s.machine(m).await.unwrap().unwrap();
    assert_eq!(
        (mm.last_seen, mm.boot_ip.as_deref()),
        (Some(31_000), Some("10.0.0.2"))
    );
    s.observe(seen(100_000, "10.0.0.2"));
    s.flush().await.unwrap();
    assert_eq!(
        s.machine(m).await.unwrap().unwrap().last_seen,
        Some(100_000)
    );
}

/// The cached boot facts never show what was true before a write that has returned, even
/// with readers filling the cache while the writes commit.
async fn cached_boot_facts_follow_every_write(engine: Engine) {
    let s = Arc::new(engine.store().await);
    let m = mac("52:54:00:00:00:14");
    assert_eq!(
        s.boot_facts(m).await.unwrap(),
        None,
        "unknown (and cached so)"
    );
    s.enroll(new("52:54:00:00:00:14"), 1).await.unwrap();
    let state = |f: Option<BootFacts>| f.map(|f| (f.state, f.installer_done));
    assert_eq!(
        state(s.boot_facts(m).await.unwrap()),
        Some((State::Enrolled, false))
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (s, stop) = (s.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.boot_facts(m).await.unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    for i in 0..50 {
        s.start_install(
            m,
            format!("h{i}"),
            i64::MAX,
            Sighting::default(),
            FROM.into(),
            None,
            2,
        )
        .await
        .unwrap();
        assert_eq!(
            state(s.boot_facts(m).await.unwrap()),
            Some((State::Installing, false))
        );
        s.config_served(m, "x".into(), Some("done".into()), 3)
            .await
            .unwrap();
        assert_eq!(
            state(s.boot_facts(m).await.unwrap()),
            Some((State::Installing, true))
        );
        s.reprovision(m, 4).await.unwrap();
        assert_eq!(
            state(s.boot_facts(m).await.unwrap()),
            Some((State::Enrolled, false))
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    // Phone-home (found by token) and a DHCP discovery (an observation) are seen too.
    s.start_install(
        m,
        "last".into(),
        i64::MAX,
        Sighting::default(),
        FROM.into(),
        None,
        5,
    )
    .await
    .unwrap();
    s.boot_facts(m).await.unwrap();
    s.phone_home(
        "last".into(),
        key(),
        FROM.into(),
        BTreeSet::new(),
        String::new(),
        6,
    )
    .await
    .unwrap();
    assert_eq!(
        state(s.boot_facts(m).await.unwrap()),
        Some((State::Installed, false))
    );
    let d = mac("52:54:00:00:00:15");
    assert_eq!(s.boot_facts(d).await.unwrap(), None);
    s.observe(Observation::Seen {
        mac: d,
        sighting: Sighting::default(),
        discover: true,
        at: 7,
    });
    s.flush().await.unwrap();
    assert_eq!(
        state(s.boot_facts(d).await.unwrap()),
        Some((State::Discovered, false))
    );
    s.delete(d, 8).await.unwrap();
    assert_eq!(s.boot_facts(d).await.unwrap(), None);
}

#[tokio::test]
async fn a_clean_close_writes_what_is_still_counted_in_memory() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("provision.db");
    let m = mac("52:54:00:00:00:16");
    let t0 = now_ms();
    {
        let s = SqlInventory::open(&path, Limits::default()).unwrap();
        s.enroll(new("52:54:00:00:00:16"), 1).await.unwrap();
        for dt in [0, 1_000, 2_000] {
            s.observe(Observation::Event {
                mac: Some(m),
                kind: EventKind::IpxeServed,
                detail: "local boot (installed, pcbios)".into(),
                at: t0 + dt,
            });
            s.maintain_observations_only().await;
        }
    }
    let s = SqlInventory::open(&path, Limits::default()).unwrap();
    let ev = s
        .events(EventQuery {
            mac: Some(m),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ev.last().map(|e| (e.kind, e.count)),
        Some((EventKind::IpxeServed, 3))
    );
}

async fn machine_searches_filter_sort_and_count(engine: Engine) {
    let s = engine.store().await;
    for i in 0..30u32 {
        let mut n = new("52:54:00:00:00:00");
        n.mac = nth(i);
        n.hostname = Some(format!("rack{}-node{i:02}", i % 3));
        if i % 5 == 0 {
            n.labels = [("rack".to_string(), format!("r{}", i % 3))].into();
        }
        s.enroll(n, 100 + i as i64).await.unwrap();
    }
    // A discovered machine, with an address from its boot request; 100% and _ match literally.
    let d = mac("aa:bb:cc:00:00:01");
    let seen = Sighting {
        ip: Some("10.1.2.3".into()),
        ..Default::default()
    };
    s.discover(d, seen, 500).await.unwrap();
    let search = |term: Option<SearchTerm>| MachineSearch {
        term,
        limit: 100,
        ..Default::default()
    };
    let macs = |p: &MachinePage| p.machines.iter().map(|m| m.mac).collect::<Vec<_>>();

    let all = s.search_machines(search(None)).await.unwrap();
    assert_eq!(all.total, 31);
    assert_eq!(all.machines.len(), 31);

    let one = s
        .search_machines(search(Some(SearchTerm::Mac(nth(7)))))
        .await
        .unwrap();
    assert_eq!((one.total, macs(&one)), (1, vec![nth(7)]));

    let ip = s
        .search_machines(search(Some(SearchTerm::Ip("10.1.2.3".into()))))
        .await
        .unwrap();
    assert_eq!(macs(&ip), vec![d]);

    let label = s
        .search_machines(search(Some(SearchTerm::Label("rack".into(), None))))
        .await
        .unwrap();
    assert_eq!(label.total, 6);
    let label = s
        .search_machines(search(Some(SearchTerm::Label(
            "rack".into(),
            Some("r1".into()),
        ))))
        .await
        .unwrap();
    assert_eq!(macs(&label), vec![nth(10), nth(25)]);

    let text = |t: &str, hex: Option<&str>| {
        search(Some(SearchTerm::Text {
            text: t.into(),
            mac_hex: hex.map(Into::into),
        }))
    };
    let host = s.search_machines(text("rack2-", None)).await.unwrap();
    assert_eq!(host.total, 10);
    // Part of a MAC: `bbcc` is in aa:bb:cc:00:00:01 once its colons are gone.
    let part = s
        .search_machines(text("bb:cc", Some("bbcc")))
        .await
        .unwrap();
    assert_eq!(macs(&part), vec![d]);
    // LIKE's wildcards are literal characters in a search.
    assert_eq!(s.search_machines(text("%", None)).await.unwrap().total, 0);
    assert_eq!(s.search_machines(text("_", None)).await.unwrap().total, 0);

    // State filter, sort and offset paging with the total.
    let q = MachineSearch {
        state: Some(State::Enrolled),
        sort: SortKey::Updated,
        descending: true,
        offset: 10,
        limit: 5,
        ..Default::default()
    };
    let page = s.search_machines(q).await.unwrap();
    assert_eq!(page.total, 30);
    assert_eq!(macs(&page), (15..20).rev().map(nth).collect::<Vec<_>>());
    let q = MachineSearch {
        sort: SortKey::LastSeen,
        descending: true,
        limit: 1,
        ..Default::default()
    };
    // Never-seen machines sort last in both directions.
    assert_eq!(macs(&s.search_machines(q).await.unwrap()), vec![d]);

    // An edit is a change but not a new state: time in state stays.
    let patch = MachinePatch {
        hostname: Some(Some("renamed".into())),
        ..Default::default()
    };
    let m = s.update(nth(3), patch, 900).await.unwrap();
    assert_eq!((m.updated_at, m.state_at), (900, 103));
    let q = |sort| MachineSearch {
        state: Some(State::Enrolled),
        sort,
        descending: true,
        limit: 1,
        ..Default::default()
    };
    assert_eq!(
        macs(&s.search_machines(q(SortKey::Updated)).await.unwrap()),
        vec![nth(3)]
    );
    assert_eq!(
        macs(&s.search_machines(q(SortKey::InState)).await.unwrap()),
        vec![nth(29)]
    );
    let m = s.reprovision(nth(3), 950).await.unwrap();
    assert_eq!(m.state_at, 950);
}

async fn the_event_feed_moves_with_each_commit_and_token_info_never_shows_the_token(
    engine: Engine,
) {
    let s = engine.store().await;
    let mut feed = s.event_feed();
    let before = *feed.borrow_and_update();
    let m = s.enroll(new("52:54:00:00:00:51"), 1).await.unwrap().mac;
    // The writer published before it answered the enroll.
    assert!(feed.has_changed().unwrap());
    let after = *feed.borrow_and_update();
    assert!(after > before);
    let last = s
        .events(EventQuery {
            tail: true,
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(last[0].id, after);

    assert_eq!(s.install_token(m).await.unwrap(), None);
    s.start_install(
        m,
        "hash".into(),
        1000,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    let t = s.install_token(m).await.unwrap().unwrap();
    assert_eq!(
        (t.created_at, t.expires_at, t.burnt_at, t.ip.as_deref()),
        (2, 1000, None, Some(FROM))
    );
    assert!(!format!("{t:?}").contains("hash"));
    assert!(feed.has_changed().unwrap());
}

/// What group selectors read (uuid, serial, arch, platform) is in the cached boot facts, so a
/// sighting that writes them forgets them at its commit, as any write does.
async fn a_sighting_that_writes_what_selectors_read_is_seen_by_the_next_boot_facts(engine: Engine) {
    let s = engine.store().await;
    let m = mac("52:54:00:00:00:31");
    s.observe(Observation::Seen {
        mac: m,
        sighting: Sighting::default(),
        discover: true,
        at: 1,
    });
    s.flush().await.unwrap();
    let f = s.boot_facts(m).await.unwrap().unwrap();
    assert_eq!((f.serial, f.platform), (None, None));
    s.observe(Observation::Seen {
        mac: m,
        sighting: Sighting {
            serial: Some("SN-31".into()),
            platform: Some("efi".into()),
            ..Default::default()
        },
        discover: false,
        at: 2,
    });
    s.flush().await.unwrap();
    let f = s.boot_facts(m).await.unwrap().unwrap();
    assert_eq!(
        (f.serial.as_deref(), f.platform.as_deref()),
        (Some("SN-31"), Some("efi"))
    );
}

/// The schema-8 migration rebuilds the machines table (to drop a CHECK): a version-7
/// database keeps every machine and every row that refers to one, and the references still
/// cascade afterwards.
#[tokio::test]
async fn the_groups_migration_keeps_every_machine_and_what_refers_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("provision.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        for sql in [
            include_str!("../../migrations/01-initial/up.sql"),
            include_str!("../../migrations/02-leases/up.sql"),
            include_str!("../../migrations/03-registration/up.sql"),
            include_str!("../../migrations/04-hot-path/up.sql"),
            include_str!("../../migrations/05-claims/up.sql"),
            include_str!("../../migrations/06-revocation/up.sql"),
            include_str!("../../migrations/07-state-time/up.sql"),
        ] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 7).unwrap();
        c.execute_batch(
            "PRAGMA foreign_keys = ON;
             INSERT INTO machines (mac, hostname, profile, state, vars, labels, created_at,
                updated_at, last_seen, boot_ip, state_at)
             VALUES ('52:54:00:00:00:41', 'n1', 'debian-12', 'installed', '{\"ip\":\"10.0.0.41\"}',
                '{\"rack\":\"3\"}', 1, 2, 3, '10.0.0.41', 2),
                ('52:54:00:00:00:42', NULL, NULL, 'discovered', '{}', '{}', 1, 1, 5, NULL, 1);
             INSERT INTO install_tokens (mac, hash, generation, created_at, expires_at, burnt_at)
             VALUES ('52:54:00:00:00:41', 'h41', 0, 1, 9, 2);
             INSERT INTO host_keys (mac, algorithm, key, added_at)
             VALUES ('52:54:00:00:00:41', 'ssh-ed25519', 'AAAA', 2);
             INSERT INTO register_steps (mac, seq, name, status, at)
             VALUES ('52:54:00:00:00:41', 0, 'ovs', 'ok', 3);",
        )
        .unwrap();
    }
    let s = SqlInventory::open(&path, Limits::default()).unwrap();
    let m = s.machine(mac("52:54:00:00:00:41")).await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.profile.as_deref(), m.hostname.as_deref()),
        (State::Installed, Some("debian-12"), Some("n1"))
    );
    assert_eq!(m.vars.get("ip").map(String::as_str), Some("10.0.0.41"));
    assert_eq!(m.labels.get("rack").map(String::as_str), Some("3"));
    assert_eq!(m.host_keys.len(), 1);
    assert_eq!(m.register_steps.len(), 1);
    assert_eq!(m.last_seen, Some(3));
    assert_eq!(
        s.machine(mac("52:54:00:00:00:42"))
            .await
            .unwrap()
            .unwrap()
            .state,
        State::Discovered
    );
    assert_eq!(
        s.reservations().await.unwrap().len(),
        1,
        "the index came back"
    );
    // The references still cascade: deleting the machine takes its rows with it.
    s.delete(m.mac, 10).await.unwrap();
    drop(s);
    let c = rusqlite::Connection::open(&path).unwrap();
    for table in ["install_tokens", "host_keys", "register_steps"] {
        let n: i64 = c
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
}

/// Group changes are refused inside the writer's transaction, against the groups as
/// committed: a tie, and a change that leaves a machine past discovery without a profile.
async fn group_changes_keep_resolution_unambiguous_and_every_install_with_a_profile(
    engine: Engine,
) {
    let s = engine.store().await;
    let g = |name: &str, sel: &[(&str, &str)], profile: Option<&str>| Group {
        name: name.into(),
        selector: sel
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        profile: profile.map(str::to_string),
        ..Default::default()
    };
    assert!(s
        .put_group(g("rack3", &[("rack", "3")], Some("debian-12")), true, 1)
        .await
        .unwrap());
    assert!(!s
        .put_group(g("rack3", &[("rack", "3")], Some("debian-12")), true, 2)
        .await
        .unwrap());
    let e = s
        .put_group(g("gpu", &[("gpu", "yes")], Some("ubuntu-24.04")), true, 3)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::GroupConflict(_)), "{e}");
    assert_eq!(
        s.groups().groups().len(),
        1,
        "the refused group is not in memory"
    );
    let mut n = new("52:54:00:00:00:51");
    n.profile = None;
    n.labels = [("rack".to_string(), "3".to_string())].into();
    let m = s.enroll(n, 4).await.unwrap();
    assert_eq!(m.profile.as_deref(), Some("debian-12"));
    let e = s.delete_group("rack3".into(), 5).await.unwrap_err();
    assert!(matches!(e, StoreError::GroupConflict(_)), "{e}");
    assert!(s.groups().get("rack3").is_some());
    // A group event for each change, of no machine.
    let groups: Vec<String> = s
        .events(EventQuery::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::GroupChanged)
        .map(|e| e.detail)
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert!(groups[0].starts_with("group rack3 created"), "{groups:?}");
    assert!(groups[1].starts_with("group rack3 updated"), "{groups:?}");
    // The groups survive a reopen.
    let (s2, _dir) = engine.reopen(&s).await;
    assert_eq!(
        s2.groups().get("rack3").unwrap().profile.as_deref(),
        Some("debian-12")
    );
}

fn oui_rule(max: Option<u64>) -> crate::policy::Rule {
    crate::policy::Rule {
        name: "rack7".into(),
        priority: 10,
        enabled: true,
        conditions: [("mac".to_string(), "52:54:00:*".to_string())].into(),
        profile: Some("debian-12".into()),
        hostname: Some("rack7-{index:02}".into()),
        max,
        ..Default::default()
    }
}

/// Forty machines discovered at once race for a rule's five places: exactly five are
/// enrolled, with the indexes 1 to 5 once each, and the count stops at five.
async fn concurrent_discoveries_never_share_an_index_or_pass_the_count(engine: Engine) {
    let s = Arc::new(engine.store().await);
    assert!(s.put_rule(oui_rule(Some(5)), true, 1).await.unwrap());
    let macs: Vec<Mac> = (0..40).map(|i| nth(0x7700 + i)).collect();
    for m in &macs {
        s.discover(*m, Sighting::default(), 2).await.unwrap();
    }
    let mut tasks = Vec::new();
    for m in macs.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.apply_rule(m, "rack7".into(), Sighting::default(), false, 3)
                .await
                .unwrap()
        }));
    }
    let mut hostnames = Vec::new();
    let mut full = 0;
    for t in tasks {
        match t.await.unwrap() {
            RuleOutcome::Enrolled(m) => {
                assert_eq!(m.state, State::Enrolled);
                assert_eq!(m.profile.as_deref(), Some("debian-12"));
                hostnames.push(m.hostname.unwrap());
            }
            RuleOutcome::Full(why) => {
                assert!(
                    why.contains("is full: it has enrolled 5 of 5 machines"),
                    "{why}"
                );
                full += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    hostnames.sort();
    assert_eq!(
        hostnames,
        ["rack7-01", "rack7-02", "rack7-03", "rack7-04", "rack7-05"]
    );
    assert_eq!(full, 35);
    assert_eq!(
        s.rules().get("rack7").unwrap().used,
        5,
        "the count in memory"
    );
    let enrolled = s
        .machines(MachineQuery {
            state: Some(State::Enrolled),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(enrolled.len(), 5);
    // Raising the max gives room again; the index goes on from the count.
    s.put_rule(oui_rule(Some(6)), true, 4).await.unwrap();
    let out = s
        .apply_rule(macs[0], "rack7".into(), Sighting::default(), false, 5)
        .await
        .unwrap();
    let out = match out {
        RuleOutcome::Skipped(_) => s
            .apply_rule(macs[39], "rack7".into(), Sighting::default(), false, 5)
            .await
            .unwrap(),
        other => other,
    };
    let RuleOutcome::Enrolled(m) = out else {
        panic!("{out:?}")
    };
    assert_eq!(m.hostname.as_deref(), Some("rack7-06"));
}

/// A propose-mode rule marks the machine once; confirming enrolls it; a disabled or deleted
/// rule withdraws what it proposed; a machine that no longer matches is skipped.
async fn proposals_wait_for_confirmation_and_go_with_their_rule(engine: Engine) {
    let s = engine.store().await;
    let m = nth(0x7800);
    s.discover(m, Sighting::default(), 1).await.unwrap();
    let propose = crate::policy::Rule {
        mode: crate::policy::RuleMode::Propose,
        ..oui_rule(None)
    };
    s.put_rule(propose.clone(), true, 2).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            s.apply_rule(m, "rack7".into(), Sighting::default(), false, 3)
                .await
                .unwrap(),
            RuleOutcome::Proposed
        );
    }
    let d = s.machine(m).await.unwrap().unwrap();
    assert_eq!(
        (d.state, d.proposed_rule.as_deref()),
        (State::Discovered, Some("rack7"))
    );
    assert_eq!(
        kinds(&s, m)
            .await
            .iter()
            .filter(|k| *k == "rule_proposed")
            .count(),
        1,
        "proposed once"
    );
    assert!(s
        .boot_facts(m)
        .await
        .unwrap()
        .unwrap()
        .proposed_rule
        .is_some());
    // Disabling withdraws it.
    s.put_rule(
        crate::policy::Rule {
            enabled: false,
            ..propose.clone()
        },
        true,
        4,
    )
    .await
    .unwrap();
    assert_eq!(s.machine(m).await.unwrap().unwrap().proposed_rule, None);
    assert_eq!(s.boot_facts(m).await.unwrap().unwrap().proposed_rule, None);
    assert!(matches!(
        s.apply_rule(m, "rack7".into(), Sighting::default(), true, 5)
            .await
            .unwrap(),
        RuleOutcome::Skipped(w) if w.contains("disabled")
    ));
    s.put_rule(propose, true, 6).await.unwrap();
    s.apply_rule(m, "rack7".into(), Sighting::default(), false, 7)
        .await
        .unwrap();
    let RuleOutcome::Enrolled(e) = s
        .apply_rule(m, "rack7".into(), Sighting::default(), true, 8)
        .await
        .unwrap()
    else {
        panic!("confirm enrolls")
    };
    assert_eq!(
        (e.state, e.proposed_rule.as_deref()),
        (State::Enrolled, None)
    );
    assert_eq!(e.hostname.as_deref(), Some("rack7-01"));
    let enrolled = timeline(&s, m).await;
    assert!(
        enrolled.iter().any(
            |e| e.kind == EventKind::Enrolled && e.detail.contains("by rule rack7 (machine 1)")
        ),
        "{enrolled:?}"
    );
    // Once enrolled, a rule leaves it alone.
    assert!(matches!(
        s.apply_rule(m, "rack7".into(), Sighting::default(), true, 9)
            .await
            .unwrap(),
        RuleOutcome::Skipped(w) if w.contains("not discovered")
    ));
    // A machine the conditions do not match, and a rule that is gone.
    let other = mac("00:11:22:33:44:55");
    s.discover(other, Sighting::default(), 10).await.unwrap();
    assert!(matches!(
        s.apply_rule(other, "rack7".into(), Sighting::default(), false, 11)
            .await
            .unwrap(),
        RuleOutcome::Skipped(w) if w.contains("no longer matches")
    ));
    s.delete_rule("rack7".into(), 12).await.unwrap();
    assert!(matches!(
        s.delete_rule("rack7".into(), 13).await,
        Err(StoreError::NoRule(_))
    ));
    assert!(s.rules().rules().is_empty());
}

/// A rule whose pattern gives no valid hostname for this machine, or that gives no profile
/// a group does not fill, enrolls nothing and takes no index.
async fn a_rule_that_cannot_enroll_a_machine_changes_nothing(engine: Engine) {
    let s = engine.store().await;
    let m = nth(0x7900);
    s.discover(m, Sighting::default(), 1).await.unwrap();
    s.put_rule(
        crate::policy::Rule {
            hostname: Some("{serial}".into()),
            ..oui_rule(Some(3))
        },
        true,
        2,
    )
    .await
    .unwrap();
    let e = s
        .apply_rule(m, "rack7".into(), Sighting::default(), false, 3)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no serial"), "{e}");
    s.put_rule(
        crate::policy::Rule {
            profile: None,
            ..oui_rule(Some(3))
        },
        true,
        4,
    )
    .await
    .unwrap();
    let e = s
        .apply_rule(m, "rack7".into(), Sighting::default(), false, 5)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gives no profile"), "{e}");
    assert_eq!(s.rules().get("rack7").unwrap().used, 0, "no index taken");
    let d = s.machine(m).await.unwrap().unwrap();
    assert_eq!((d.state, d.hostname), (State::Discovered, None));
}

fn labelled_group(name: &str, key: &str, value: &str, profile: Option<&str>) -> Group {
    Group {
        name: name.into(),
        selector: [(key.to_string(), value.to_string())].into(),
        profile: profile.map(str::to_string),
        ..Default::default()
    }
}

/// The events of the whole inventory, after a flush.
async fn all_events(s: &SqlInventory) -> Vec<Event> {
    s.flush().await.unwrap();
    s.events(EventQuery {
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// An apply is one transaction: a dry run leaves nothing (rows, events, groups and rules in
/// memory) and plans what the apply then does; a refusal found at its end (a machine no group
/// gives a profile, once the file's groups are written) undoes the groups written before it.
async fn an_apply_is_all_or_nothing_and_a_dry_run_is_its_plan(engine: Engine) {
    use plan::{Action, Desired};
    let s = engine.store().await;
    s.enroll(new("52:54:00:00:00:01"), 1).await.unwrap();
    let before = all_events(&s).await;
    let mut rackless = new("52:54:00:00:00:02");
    rackless.profile = None;
    rackless.labels = [("rack".to_string(), "4".to_string())].into();
    let mut racked = new("52:54:00:00:00:03");
    racked.profile = None;
    racked.labels = [("rack".to_string(), "3".to_string())].into();
    let desired = Desired {
        groups: Some(vec![labelled_group(
            "rack3",
            "rack",
            "3",
            Some("debian-12"),
        )]),
        rules: Some(vec![oui_rule(Some(2))]),
        machines: Some(vec![racked.clone(), rackless]),
    };
    let e = s
        .apply_inventory(desired.clone(), true, ApplyRun::DryRun, 2)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::NoProfile(m) if m == mac("52:54:00:00:00:02")),
        "{e}"
    );
    let e = s
        .apply_inventory(desired, true, ApplyRun::Apply { expect: None }, 2)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NoProfile(_)), "{e}");
    assert!(s.groups().groups().is_empty() && s.rules().rules().is_empty());
    assert!(s.machine(mac("52:54:00:00:00:03")).await.unwrap().is_none());
    assert!(s.machine(mac("52:54:00:00:00:01")).await.unwrap().is_some());
    assert_eq!(all_events(&s).await.len(), before.len(), "no event kept");

    let desired = Desired {
        groups: Some(vec![labelled_group(
            "rack3",
            "rack",
            "3",
            Some("debian-12"),
        )]),
        rules: Some(vec![oui_rule(Some(2))]),
        machines: Some(vec![racked]),
    };
    let dry = s
        .apply_inventory(desired.clone(), true, ApplyRun::DryRun, 3)
        .await
        .unwrap();
    let summary: Vec<(String, Action)> = dry
        .plan
        .changes
        .iter()
        .map(|c| (format!("{} {}", c.kind, c.name), c.action))
        .collect();
    assert_eq!(
        summary,
        [
            ("group rack3".to_string(), Action::Create),
            ("rule rack7".to_string(), Action::Create),
            ("machine 52:54:00:00:00:03".to_string(), Action::Create),
            ("machine 52:54:00:00:00:01".to_string(), Action::Delete),
        ]
    );
    assert!(
        s.groups().groups().is_empty(),
        "a dry run publishes nothing"
    );
    assert!(s.machine(mac("52:54:00:00:00:01")).await.unwrap().is_some());
    assert_eq!(all_events(&s).await.len(), before.len());

    // The inventory changes between the check and the apply: refused, nothing written.
    s.enroll(new("52:54:00:00:00:04"), 4).await.unwrap();
    let e = s
        .apply_inventory(
            desired.clone(),
            true,
            ApplyRun::Apply {
                expect: Some(dry.plan.clone()),
            },
            5,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Changed(_)), "{e}");
    assert!(s.machine(mac("52:54:00:00:00:01")).await.unwrap().is_some());

    let done = s
        .apply_inventory(desired.clone(), true, ApplyRun::Apply { expect: None }, 6)
        .await
        .unwrap();
    assert_eq!(done.plan.changes.len(), 5, "{:?}", done.plan);
    assert!(s.groups().get("rack3").is_some(), "published at commit");
    assert!(s.rules().get("rack7").is_some());
    let m = s.machine(mac("52:54:00:00:00:03")).await.unwrap().unwrap();
    assert_eq!(m.state, State::Enrolled);
    assert_eq!(m.inherited.profile.as_deref(), Some("rack3"));
    assert!(s.machine(mac("52:54:00:00:00:01")).await.unwrap().is_none());
    let events = all_events(&s).await;
    assert!(
        events
            .iter()
            .any(|e| e.detail == "profile debian-12 from group rack3, hostname node1 by apply"),
        "{events:#?}"
    );
    // Idempotent: the same file again changes nothing and writes no event.
    let n = events.len();
    let again = s
        .apply_inventory(desired, true, ApplyRun::Apply { expect: None }, 7)
        .await
        .unwrap();
    assert_eq!(again.plan.changes, vec![]);
    assert_eq!(
        (
            again.plan.unchanged.groups,
            again.plan.unchanged.rules,
            again.plan.unchanged.machines
        ),
        (1, 1, 1)
    );
    assert_eq!(all_events(&s).await.len(), n);
}

/// The result of an apply is checked whole: a tie between two of its groups, or one DHCP
/// reservation for two machines, is refused even though each change alone would do; a
/// value moved from one group to another in one file is no tie on the way.
async fn an_apply_is_checked_as_a_whole(engine: Engine) {
    use plan::Desired;
    let s = engine.store().await;
    let mut a = labelled_group("a", "rack", "3", Some("debian-12"));
    let b = labelled_group("b", "row", "b", None);
    let run = || ApplyRun::Apply { expect: None };
    s.apply_inventory(
        Desired {
            groups: Some(vec![a.clone(), b.clone()]),
            ..Default::default()
        },
        false,
        run(),
        1,
    )
    .await
    .unwrap();
    // Move the profile from a to b: alone, giving b one first would tie with a.
    a.profile = None;
    let mut b2 = b.clone();
    b2.profile = Some("ubuntu-24.04".into());
    s.apply_inventory(
        Desired {
            groups: Some(vec![a.clone(), b2.clone()]),
            ..Default::default()
        },
        false,
        run(),
        2,
    )
    .await
    .unwrap();
    assert_eq!(
        s.groups().get("b").unwrap().profile.as_deref(),
        Some("ubuntu-24.04")
    );
    a.profile = Some("debian-12".into());
    let e = s
        .apply_inventory(
            Desired {
                groups: Some(vec![a, b2]),
                ..Default::default()
            },
            false,
            run(),
            3,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::GroupConflict(_)), "{e}");
    assert_eq!(s.groups().get("a").unwrap().profile, None);

    let mut one = new("52:54:00:00:00:01");
    one.vars.insert("ip".into(), "10.0.0.5".into());
    let mut two = new("52:54:00:00:00:02");
    two.vars.insert("ip".into(), "10.0.0.5".into());
    let e = s
        .apply_inventory(
            Desired {
                machines: Some(vec![one, two]),
                ..Default::default()
            },
            false,
            run(),
            4,
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("10.0.0.5 would be the DHCP reservation of more than one machine"),
        "{e}"
    );
    assert!(s.machine(mac("52:54:00:00:00:01")).await.unwrap().is_none());
}

/// Read-then-write calls take effect once under concurrency: each reads and writes inside the
/// writer's `BEGIN IMMEDIATE` transaction and is a compare-and-set besides. Twenty installing
/// machines each get eight phone-homes with their token at once, with an expiry sweep (of
/// tokens that ran out by its clock) racing them: per machine exactly one phone-home succeeds
/// and the sweep leaves it alone, or the sweep fails it and every phone-home is refused — never
/// both, never two.
async fn racing_read_then_write_calls_take_effect_once(engine: Engine) {
    let s = Arc::new(engine.store().await);
    let mut macs = Vec::new();
    for i in 0..20u32 {
        let mut n = new("52:54:00:00:00:00");
        n.mac = nth(0x0a00 + i);
        let m = s.enroll(n, 1).await.unwrap().mac;
        s.start_install(
            m,
            format!("race{i}"),
            100,
            Sighting::default(),
            FROM.into(),
            None,
            2,
        )
        .await
        .unwrap();
        macs.push(m);
    }
    enum Outcome {
        Home(usize, Result<State>),
        Sweep(Result<Vec<Mac>>),
    }
    let mut tasks = Vec::new();
    for i in 0..20usize {
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let r = s
                    .phone_home(
                        format!("race{i}"),
                        key(),
                        FROM.into(),
                        BTreeSet::new(),
                        "1 host key".into(),
                        50,
                    )
                    .await;
                Outcome::Home(i, r.map(|m| m.state))
            }));
        }
        if i == 10 {
            // The sweep's clock is past every token's expiry; it races the rest.
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                Outcome::Sweep(s.expire_installs(200).await)
            }));
        }
    }
    let mut won = [0; 20];
    let mut swept = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Sweep(r) => swept = r.unwrap(),
            Outcome::Home(i, Ok(state)) => {
                assert_eq!(state, State::Installed);
                won[i] += 1;
            }
            Outcome::Home(_, Err(StoreError::Token(..) | StoreError::Illegal(_))) => {}
            Outcome::Home(_, Err(e)) => panic!("a phone-home failed for another reason: {e}"),
        }
    }
    for (i, m) in macs.iter().enumerate() {
        let was_swept = swept.contains(m);
        let state = s.machine(*m).await.unwrap().unwrap().state;
        let k = kinds(&s, *m).await;
        let count = |kind: &str| k.iter().filter(|x| *x == kind).count();
        if was_swept {
            assert_eq!((won[i], state), (0, State::Failed), "{m}: {k:?}");
            assert_eq!(
                (count("failed"), count("phoned_home")),
                (1, 0),
                "{m}: {k:?}"
            );
        } else {
            assert_eq!((won[i], state), (1, State::Installed), "{m}: {k:?}");
            assert_eq!(
                (count("failed"), count("phoned_home")),
                (0, 1),
                "{m}: {k:?}"
            );
        }
    }
}

/// A table's shape, as both engines can say it: its columns in order (name, `integer` or
/// `text`, NOT NULL, default, part of the primary key) and its indexes made by a migration
/// (name, columns or `expr`, unique).
type Shape = BTreeMap<
    String,
    (
        Vec<(String, String, bool, Option<String>, bool)>,
        BTreeSet<String>,
    ),
>;

fn sqlite_shape(c: &rusqlite::Connection) -> Shape {
    let tables: Vec<String> = c
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut shape = Shape::new();
    for t in tables {
        let cols = c
            .prepare(&format!("PRAGMA table_info({t})"))
            .unwrap()
            .query_map([], |r| {
                let ty: String = r.get(2)?;
                let pk: i64 = r.get(5)?;
                Ok((
                    r.get::<_, String>(1)?,
                    ty.to_lowercase(),
                    r.get::<_, i64>(3)? == 1 || pk > 0,
                    r.get::<_, Option<String>>(4)?,
                    pk > 0,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        let indexes: Vec<(String, bool, String)> = c
            .prepare(&format!("PRAGMA index_list({t})"))
            .unwrap()
            .query_map([], |r| Ok((r.get(1)?, r.get::<_, i64>(2)? == 1, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let mut idx = BTreeSet::new();
        for (name, unique, origin) in indexes {
            let cols: Vec<Option<String>> = c
                .prepare(&format!("PRAGMA index_info({name})"))
                .unwrap()
                .query_map([], |r| r.get(2))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let cols = cols
                .into_iter()
                .map(|c| c.unwrap_or_else(|| "expr".into()))
                .collect::<Vec<_>>()
                .join(",");
            // SQLite names the indexes of UNIQUE and PRIMARY KEY constraints itself.
            let name = if origin == "c" { name } else { origin };
            idx.insert(format!(
                "{name}({cols}){}",
                if unique { " unique" } else { "" }
            ));
        }
        // An INTEGER PRIMARY KEY is SQLite's rowid, with no index of its own.
        let pk: Vec<&(String, String, bool, Option<String>, bool)> =
            cols.iter().filter(|c| c.4).collect();
        if let [only] = pk[..] {
            if only.1 == "integer" {
                idx.insert(format!("pk({}) unique", only.0));
            }
        }
        shape.insert(t, (cols, idx));
    }
    shape
}

fn postgres_shape(cluster: &crate::store::pg_cluster::Cluster, db: &str) -> Shape {
    let psql = |sql: &str| -> Vec<Vec<String>> {
        cluster
            .psql(db, sql)
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    };
    let mut shape = Shape::new();
    for t in psql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'
         AND table_name <> 'schema_version' ORDER BY 1",
    ) {
        let t = &t[0];
        let pk: BTreeSet<String> = psql(&format!(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a
             ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = '{t}'::regclass AND i.indisprimary"
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
        let cols = psql(&format!(
            "SELECT column_name, data_type, is_nullable, coalesce(column_default, '<none>')
             FROM information_schema.columns WHERE table_name = '{t}' ORDER BY ordinal_position"
        ))
        .into_iter()
        .map(|r| {
            let ty = match r[1].as_str() {
                "bigint" => "integer".to_string(),
                "bytea" => "blob".to_string(),
                other => other.to_string(),
            };
            let default = (r[3] != "<none>").then(|| {
                r[3].trim_end_matches("::text")
                    .trim_end_matches("::bigint")
                    .to_string()
            });
            (r[0].clone(), ty, r[2] == "NO", default, pk.contains(&r[0]))
        })
        .collect();
        let idx = psql(&format!(
            "SELECT c.relname, i.indisunique, i.indisprimary,
                    con.contype IS NOT NULL,
                    (SELECT string_agg(coalesce(a.attname, 'expr'), ',' ORDER BY k.n)
                     FROM unnest(i.indkey) WITH ORDINALITY k(att, n)
                     LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att
                                              AND k.att <> 0)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid
             WHERE i.indrelid = '{t}'::regclass"
        ))
        .into_iter()
        .map(|r| {
            let (unique, primary, constraint) = (r[1] == "t", r[2] == "t", r[3] == "t");
            let name = if primary {
                "pk".to_string()
            } else if constraint {
                "u".to_string()
            } else {
                r[0].clone()
            };
            format!("{name}({}){}", r[4], if unique { " unique" } else { "" })
        })
        .collect();
        shape.insert(t.clone(), (cols, idx));
    }
    shape
}

/// Both engines' migrations make the same tables, columns (types, NOT NULL, defaults, keys)
/// and indexes, so a store test passing on one says the same of the other.
#[tokio::test]
async fn the_postgres_migrations_make_the_same_schema_as_sqlites() {
    let sqlite = Engine::Sqlite.store().await;
    let path = sqlite.path().unwrap().to_path_buf();
    let lite = sqlite_shape(&rusqlite::Connection::open(&path).unwrap());
    let cluster = crate::store::pg_cluster::shared();
    let db = cluster.create_db();
    let pg = SqlInventory::connect(&cluster.url(&db), Limits::default())
        .await
        .unwrap();
    let post = postgres_shape(cluster, &db);
    drop(pg);
    cluster.drop_db(&db);
    assert_eq!(
        lite.keys().collect::<Vec<_>>(),
        post.keys().collect::<Vec<_>>(),
        "the same tables"
    );
    for (table, (cols, idx)) in &lite {
        let (pcols, pidx) = &post[table];
        assert_eq!(cols, pcols, "the columns of {table}");
        assert_eq!(idx, pidx, "the indexes of {table}");
    }
    assert!(lite["machines"].1.contains("machines_reservation(expr)"));
}

/// Daemons starting together on a new database migrate it once (an advisory lock), and each
/// then runs on the whole schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_starting_together_migrate_once() {
    let cluster = crate::store::pg_cluster::shared();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let mut opens = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = url.clone();
        opens.spawn(async move { SqlInventory::connect(&url, Limits::default()).await });
    }
    let stores: Vec<SqlInventory> = opens
        .join_all()
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(stores.len(), 4);
    assert_eq!(
        cluster.psql(&db, "SELECT version FROM schema_version"),
        crate::store::postgres::known_version().to_string()
    );
    stores[0].enroll(new("52:54:00:00:00:71"), 1).await.unwrap();
    let seen = stores[3].machine(mac("52:54:00:00:00:71")).await.unwrap();
    assert_eq!(seen.map(|m| m.state), Some(State::Enrolled));
    drop(stores);
    cluster.drop_db(&db);
}

// --- Several daemons on one PostgreSQL database ---
//
// Each test opens two inventories on one database, as two daemons do, and races them: the
// outcome must be what one inventory doing both would give.

/// Two inventories on one new PostgreSQL database (the second opens it migrated).
async fn two_daemons() -> (Arc<SqlInventory>, Arc<SqlInventory>) {
    let a = Engine::Postgres.store().await;
    let url = a.postgres_url().expect("a PostgreSQL store").to_string();
    let b = SqlInventory::connect(&url, Limits::default())
        .await
        .unwrap();
    (Arc::new(a), Arc::new(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_never_lease_one_address_twice() {
    let (a, b) = two_daemons().await;
    let pool = Pool {
        start: "10.9.0.10".parse().unwrap(),
        end: "10.9.0.39".parse().unwrap(),
        reserved_for_others: Default::default(),
    };
    // 50 clients for 30 addresses, each asking both daemons at once (as two ProxyDHCP
    // servers on one segment hear one broadcast), then binding what it was offered.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50u32 {
        for s in [a.clone(), b.clone()] {
            let pool = pool.clone();
            tasks.spawn(async move {
                let mac = nth(0x5000 + i);
                let offered = s
                    .lease_offer(OfferRequest {
                        mac,
                        reservation: None,
                        requested: None,
                        pool: pool.clone(),
                        hold_until: 10_000,
                        now: 1,
                    })
                    .await
                    .unwrap();
                let Some(ip) = offered else {
                    return (mac, None);
                };
                let bound = s
                    .lease_bind(BindRequest {
                        mac,
                        ip,
                        pool,
                        reservation: None,
                        until: 100_000,
                        now: 2,
                    })
                    .await
                    .unwrap();
                (mac, bound.then_some(ip))
            });
        }
    }
    let mut bound: BTreeMap<Ipv4Addr, BTreeSet<Mac>> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        if let (mac, Some(ip)) = r.unwrap() {
            bound.entry(ip).or_default().insert(mac);
        }
    }
    assert!(
        bound.values().all(|macs| macs.len() == 1),
        "an address bound to two machines: {bound:?}"
    );
    let live = b.leases(3).await.unwrap();
    let ips: BTreeSet<Ipv4Addr> = live.iter().map(|l| l.ip).collect();
    assert_eq!(ips.len(), live.len(), "one row per address");
    assert_eq!(live.len(), 30, "the whole pool is leased, once: {live:?}");
    let macs: BTreeSet<Option<Mac>> = live.iter().map(|l| l.mac).collect();
    assert_eq!(macs.len(), 30, "one address per machine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_burn_a_token_once_and_sweep_an_expiry_once() {
    let (a, b) = two_daemons().await;
    let macs: Vec<Mac> = (0..20).map(|i| nth(0x5100 + i)).collect();
    for (i, m) in macs.iter().enumerate() {
        let mut n = new(&m.to_string());
        n.hostname = None;
        a.enroll(n, 1).await.unwrap();
        // Half expire at 50, half live until 500.
        let expires = if i % 2 == 0 { 50 } else { 500 };
        b.start_install(
            *m,
            format!("tok{i}"),
            expires,
            Sighting::default(),
            FROM.into(),
            None,
            2,
        )
        .await
        .unwrap();
    }
    // The live half phones home through both daemons at once.
    let mut homes = tokio::task::JoinSet::new();
    for i in (1..20).step_by(2) {
        for s in [a.clone(), b.clone()] {
            homes.spawn(async move {
                let r = s
                    .phone_home(
                        format!("tok{i}"),
                        key(),
                        FROM.into(),
                        BTreeSet::new(),
                        "1 host key".into(),
                        10,
                    )
                    .await;
                (i, r.is_ok())
            });
        }
    }
    let mut installed = BTreeMap::new();
    while let Some(r) = homes.join_next().await {
        let (i, ok) = r.unwrap();
        *installed.entry(i).or_insert(0) += ok as u32;
    }
    assert!(
        installed.values().all(|n| *n == 1),
        "each token burnt by exactly one phone-home: {installed:?}"
    );
    // Both sweepers run at once, past the first half's expiry.
    let (x, y) = tokio::join!(a.expire_installs(100), b.expire_installs(100));
    let mut failed: Vec<Mac> = x.unwrap();
    failed.extend(y.unwrap());
    failed.sort();
    let expected: Vec<Mac> = macs.iter().step_by(2).copied().collect();
    assert_eq!(failed, expected, "each expiry failed once, by one sweeper");
    for (i, m) in macs.iter().enumerate() {
        let kinds = kinds(&a, *m).await;
        let want = if i % 2 == 0 { "failed" } else { "phoned_home" };
        assert_eq!(
            kinds.iter().filter(|k| k.as_str() == want).count(),
            1,
            "{m}: {kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_enrolling_one_machine_enroll_it_once() {
    let (a, b) = two_daemons().await;
    for i in 0..20 {
        let m = nth(0x5200 + i).to_string();
        let (x, y) = tokio::join!(a.enroll(new(&m), 1), b.enroll(new(&m), 1));
        let oks = [&x, &y].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "{m}: {x:?} {y:?}");
        let err = if x.is_err() { x } else { y }.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::AlreadyEnrolled(..) | StoreError::Conflict(_)
            ),
            "the loser is told the machine is taken or changed: {err:?}"
        );
        assert_eq!(kinds(&b, nth(0x5200 + i)).await, ["enrolled"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_never_give_a_rule_index_twice() {
    let (a, b) = two_daemons().await;
    assert!(a.put_rule(oui_rule(Some(5)), true, 1).await.unwrap());
    let macs: Vec<Mac> = (0..30).map(|i| nth(0x7700 + i)).collect();
    for m in &macs {
        a.discover(*m, Sighting::default(), 2).await.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, m) in macs.iter().enumerate() {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let m = *m;
        tasks.spawn(async move {
            s.apply_rule(m, "rack7".into(), Sighting::default(), false, 3)
                .await
                .unwrap()
        });
    }
    let mut hostnames = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let RuleOutcome::Enrolled(m) = r.unwrap() {
            hostnames.push(m.hostname.unwrap());
        }
    }
    hostnames.sort();
    assert_eq!(
        hostnames,
        ["rack7-01", "rack7-02", "rack7-03", "rack7-04", "rack7-05"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_see_each_others_events_and_groups_within_a_second() {
    let (a, b) = two_daemons().await;
    let mut feed = b.event_feed();
    let before = *feed.borrow_and_update();
    let m = a.enroll(new("52:54:00:53:00:01"), 1).await.unwrap().mac;
    let newest = a
        .events(EventQuery {
            tail: true,
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .id;
    assert!(newest > before);
    // b's feed moves to a's event: its live views wake.
    tokio::time::timeout(Duration::from_secs(1), async {
        while *feed.borrow_and_update() < newest {
            feed.changed().await.unwrap();
        }
    })
    .await
    .expect("b's event feed reaches a's event within a second");
    assert_eq!(kinds(&b, m).await, ["enrolled"]);
    // A group a makes is b's to resolve machines with, within a second.
    let group = labelled_group("rack9", "rack", "9", Some("ubuntu-24.04"));
    a.put_group(group, true, 2).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), async {
        while b.groups().get("rack9").is_none() {
            feed.changed().await.unwrap();
        }
    })
    .await
    .expect("b holds a's group within a second");
    // And a group b deletes is gone from a's.
    b.delete_group("rack9".into(), 3).await.unwrap();
    let mut afeed = a.event_feed();
    tokio::time::timeout(Duration::from_secs(1), async {
        while a.groups().get("rack9").is_some() {
            afeed.changed().await.unwrap();
        }
    })
    .await
    .expect("a drops b's deleted group within a second");
}

/// A machine enrolled, installed (phoned home with a host key) and `registering`.
async fn registering(s: &SqlInventory, m: &str, token: &str) -> Mac {
    let mac = s.enroll(new(m), 1).await.unwrap().mac;
    s.start_install(
        mac,
        token.into(),
        1_000_000,
        Sighting::default(),
        FROM.into(),
        None,
        2,
    )
    .await
    .unwrap();
    s.phone_home(
        token.into(),
        key(),
        FROM.into(),
        BTreeSet::new(),
        "1 host key".into(),
        3,
    )
    .await
    .unwrap();
    s.start_registration(mac, "queued".into(), 4).await.unwrap();
    mac
}

async fn registration_claims_go_to_one_daemon_and_run_out(engine: Engine) {
    let s = engine.store().await;
    let m = registering(&s, "52:54:00:00:00:81", "rc1").await;
    let claim = |d: &str, until: i64, now: i64| s.claim_registration(m, d.into(), until, now);
    assert!(claim("d1", 100, 10).await.unwrap());
    assert!(!claim("d2", 100, 20).await.unwrap(), "held by d1");
    assert!(claim("d1", 200, 50).await.unwrap(), "d1 renews");
    assert!(s.unclaimed_registrations(150).await.unwrap().is_empty());
    assert_eq!(
        s.unclaimed_registrations(250).await.unwrap(),
        [m],
        "ran out"
    );
    assert!(claim("d2", 400, 250).await.unwrap(), "d2 takes it over");
    assert!(!claim("d1", 500, 260).await.unwrap(), "d1 lost it");
    s.release_registration(m, "d1".into()).await.unwrap();
    assert!(
        s.unclaimed_registrations(260).await.unwrap().is_empty(),
        "not d1's to give up"
    );
    s.release_registration(m, "d2".into()).await.unwrap();
    assert_eq!(s.unclaimed_registrations(260).await.unwrap(), [m]);
    // Only a registering machine's run can be claimed; a fresh run drops an old claim.
    assert!(claim("d1", 1_000, 300).await.unwrap());
    s.transition(m, Transition::FinishRegistration, "done".into(), 310)
        .await
        .unwrap();
    assert!(
        !claim("d2", 2_000, 2_000).await.unwrap(),
        "registered: nothing to run"
    );
    let other = s.enroll(new("52:54:00:00:00:82"), 1).await.unwrap().mac;
    assert!(!s
        .claim_registration(other, "d1".into(), 100, 10)
        .await
        .unwrap());
}
on_both!(registration_claims_go_to_one_daemon_and_run_out);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_claim_each_registration_once() {
    let (a, b) = two_daemons().await;
    let mut macs = Vec::new();
    for i in 0..10 {
        macs.push(registering(&a, &nth(0x5300 + i).to_string(), &format!("rt{i}")).await);
    }
    let mut claims = tokio::task::JoinSet::new();
    for m in &macs {
        for (name, s) in [("a", a.clone()), ("b", b.clone())] {
            let m = *m;
            claims.spawn(async move {
                let won = s
                    .claim_registration(m, name.into(), 10_000, 5)
                    .await
                    .unwrap();
                (m, won)
            });
        }
    }
    let mut held: BTreeMap<Mac, u32> = BTreeMap::new();
    while let Some(r) = claims.join_next().await {
        let (m, won) = r.unwrap();
        *held.entry(m).or_default() += won as u32;
    }
    assert_eq!(held.len(), 10);
    assert!(held.values().all(|n| *n == 1), "{held:?}");
}
