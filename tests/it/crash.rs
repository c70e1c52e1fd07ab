//! Crash rounds: the daemon under concurrent enroll, boot and phone-home load, killed with
//! SIGKILL at a random point, 200 times on one data directory. After every restart:
//!
//! - every write the daemon acknowledged is there: an enroll answered 201 is a machine; a
//!   phone-home answered 200 is `installed` (or past it); an install script handed out left
//!   the machine `installing` or further;
//! - every machine the round touched is in the state its last transition event says;
//! - no install token works for a machine that is not `installing`, and of a machine's tokens
//!   only the last one handed out can;
//! - no machine stays `registering`: each has its job again and ends it.
//!
//! SIGKILL keeps the kernel's page cache, so this shows that what was acknowledged was
//! committed, not that it reached the disk (that needs a power cut).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{admin_agent, token_of, Daemon};

const ROUNDS: usize = 200;
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 crash";

/// Where a daemon under test answers: its machine listener, its admin listener (and an agent
/// that trusts it) and its admin token.
pub struct Endpoint {
    pub machine: String,
    pub admin: String,
    pub api: ureq::Agent,
    pub token: String,
}

impl Endpoint {
    fn of(d: &Daemon) -> Endpoint {
        Endpoint {
            machine: d.url(),
            admin: d.admin_url(),
            api: admin_agent(&d.dir.path().join("admin-tls/cert.pem")),
            token: std::fs::read_to_string(d.token_file())
                .unwrap()
                .trim()
                .to_string(),
        }
    }

    /// GET a machine-facing path: (status, body), or status 0 if the request failed.
    pub fn machine_get(&self, path: &str) -> (u16, String) {
        match plain_agent().get(&format!("{}{path}", self.machine)).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }
}

pub fn plain_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// What the daemon acknowledged, over all rounds.
#[derive(Default)]
pub struct Acked {
    pub enrolled: BTreeSet<String>,
    /// Every token handed out per machine, in order.
    pub tokens: BTreeMap<String, Vec<String>>,
    pub installed: BTreeSet<String>,
    /// Machines a request of this round was about (acknowledged or not).
    pub touched: BTreeSet<String>,
}

/// A small deterministic generator (xorshift64*): the seed is printed, so a failing round
/// can be replayed.
pub struct Rng(pub u64);

impl Rng {
    fn step(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.step() % n
    }
}

fn mac(i: u32) -> String {
    format!("52:54:00:c0:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff)
}

pub fn templates(dir: &Path) {
    // A Debian profile whose machines register as hypervisors over SSH to a port where
    // nothing listens (the machine's ssh_port var): registration fails at once, so machines
    // pass through `registering` while the load runs.
    let debian = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/profiles/debian-12.toml"),
    )
    .unwrap();
    let hv = debian.replace("role = \"none\"", "role = \"hypervisor\"");
    assert_ne!(hv, debian);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(dir.join("profiles/crash-hv.toml"), hv).unwrap();
}

#[test]
fn two_hundred_sigkills_under_load_lose_no_acknowledged_write() {
    let work = tempfile::tempdir().unwrap();
    let tdir = work.path().join("templates");
    templates(&tdir);
    let extra = [
        "--templates-dir",
        tdir.to_str().unwrap(),
        "--register-attempts",
        "1",
        "--ssh-timeout",
        "1s",
    ];
    let seed = seed("crash rounds");
    let mut rng = Rng(seed);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let next_mac = Arc::new(AtomicU32::new(0));
    let mut dir = tempfile::tempdir().unwrap();
    let mut kills_mid_load = 0;
    for round in 0..ROUNDS {
        let d = Daemon::start_in(dir, &extra);
        check(&Endpoint::of(&d), &acked.lock().unwrap(), round, seed);
        acked.lock().unwrap().touched.clear();
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(&Endpoint::of(&d), &acked, &stop, &next_mac, seed, round);
        // Kill at a random point: mostly while the load runs, sometimes right away.
        let wait = match rng.below(10) {
            0 => 0,
            _ => 5 + rng.below(150),
        };
        std::thread::sleep(Duration::from_millis(wait));
        if wait > 0 {
            kills_mid_load += 1;
        }
        dir = d.crash();
        stop.store(true, Ordering::Relaxed);
        for t in load {
            t.join().unwrap();
        }
    }
    let d = Daemon::start_in(dir, &extra);
    check(&Endpoint::of(&d), &acked.lock().unwrap(), ROUNDS, seed);
    acked.lock().unwrap().report(
        &format!("crash rounds: {ROUNDS} SIGKILLs ({kills_mid_load} mid-load)"),
        200,
        50,
    );
}

/// A seed for the rounds' random points, printed so a failing run can be replayed.
pub fn seed(what: &str) -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("{what}: seed {seed}");
    seed
}

impl Acked {
    /// Prints what the rounds acknowledged and fails if it is too little to mean anything.
    pub fn report(&self, rounds: &str, min_enrolls: usize, min_installs: usize) {
        eprintln!(
            "{rounds}; acknowledged {} enrolls, {} install scripts, {} phone-homes",
            self.enrolled.len(),
            self.tokens.values().map(Vec::len).sum::<usize>(),
            self.installed.len()
        );
        assert!(
            self.enrolled.len() > min_enrolls && self.installed.len() > min_installs,
            "too little load to mean anything"
        );
    }
}

/// Three threads of load until `stop`: enrolls (a third of them role machines), install
/// scripts for enrolled machines, phone-homes with their last token; each records what the
/// daemon acknowledged.
pub fn start_load(
    ep: &Endpoint,
    acked: &Arc<Mutex<Acked>>,
    stop: &Arc<AtomicBool>,
    next_mac: &Arc<AtomicU32>,
    seed: u64,
    round: usize,
) -> Vec<std::thread::JoinHandle<u32>> {
    let mut load = Vec::new();
    for role in 0..3 {
        let (acked, stop, next_mac) = (acked.clone(), stop.clone(), next_mac.clone());
        let (machine, admin, token, api) = (
            ep.machine.clone(),
            ep.admin.clone(),
            ep.token.clone(),
            ep.api.clone(),
        );
        let mut rng = Rng(seed ^ ((round as u64 + 1) << 8) ^ (role + 1));
        load.push(std::thread::spawn(move || {
                let plain = plain_agent();
                let mut done = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    match role {
                        0 => {
                            let i = next_mac.fetch_add(1, Ordering::Relaxed);
                            let m = mac(i);
                            let profile = if i % 3 == 0 { "crash-hv" } else { "debian-12" };
                            acked.lock().unwrap().touched.insert(m.clone());
                            let body = serde_json::json!({"mac": m, "profile": profile, "hostname": format!("n{i}"), "vars": {"ssh_port": "1"}});
                            let r = api
                                .post(&format!("{admin}/api/v1/machines"))
                                .header("Authorization", &format!("Bearer {token}"))
                                .send_json(&body);
                            if matches!(&r, Ok(res) if res.status() == 201) {
                                acked.lock().unwrap().enrolled.insert(m);
                            }
                        }
                        1 => {
                            let pick = {
                                let a = acked.lock().unwrap();
                                let open: Vec<&String> =
                                    a.enrolled.iter().filter(|m| !a.installed.contains(*m)).collect();
                                (!open.is_empty()).then(|| open[rng.below(open.len() as u64) as usize].clone())
                            };
                            let Some(m) = pick else {
                                std::thread::sleep(Duration::from_millis(2));
                                continue;
                            };
                            acked.lock().unwrap().touched.insert(m.clone());
                            let r = plain
                                .get(&format!("{machine}/ipxe?mac={}&platform=pcbios", m.replace(':', "-")))
                                .call();
                            if let Ok(mut res) = r {
                                let text = res.body_mut().read_to_string().unwrap_or_default();
                                if res.status() == 200 && text.contains("/config/") {
                                    acked.lock().unwrap().tokens.entry(m).or_default().push(token_of(&text));
                                }
                            }
                        }
                        _ => {
                            let pick = {
                                let a = acked.lock().unwrap();
                                let open: Vec<(&String, &Vec<String>)> = a
                                    .tokens
                                    .iter()
                                    .filter(|(m, _)| !a.installed.contains(*m))
                                    .collect();
                                (!open.is_empty()).then(|| {
                                    let (m, t) = open[rng.below(open.len() as u64) as usize];
                                    (m.clone(), t.last().unwrap().clone())
                                })
                            };
                            let Some((m, t)) = pick else {
                                std::thread::sleep(Duration::from_millis(2));
                                continue;
                            };
                            acked.lock().unwrap().touched.insert(m.clone());
                            let r = plain
                                .post(&format!("{machine}/phone-home/{t}"))
                                .header("Content-Type", "text/plain")
                                .send(HOST_KEY);
                            if matches!(&r, Ok(res) if res.status() == 200) {
                                acked.lock().unwrap().installed.insert(m);
                            }
                        }
                    }
                    done += 1;
                }
                done
            }));
    }
    load
}

/// The checks after a restart.
pub fn check(ep: &Endpoint, a: &Acked, round: usize, seed: u64) {
    let get = |path: &str| -> Value {
        let mut r = ep
            .api
            .get(&format!("{}/api/v1{path}", ep.admin))
            .header("Authorization", &format!("Bearer {}", ep.token))
            .call()
            .unwrap();
        assert_eq!(r.status(), 200, "round {round} (seed {seed}): GET {path}");
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    let ctx = |what: String| format!("round {round} (seed {seed}): {what}");
    // Nothing stays registering: each machine left there has its job back and ends it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stuck = get("/machines?state=registering");
        if stuck.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            ctx(format!("still registering: {stuck}"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let machines: BTreeMap<String, Value> = {
        let mut all = BTreeMap::new();
        let mut after = String::new();
        loop {
            let page = get(&format!("/machines?limit=1000{after}"));
            let page = page.as_array().unwrap();
            if page.is_empty() {
                break;
            }
            for m in page {
                all.insert(m["mac"].as_str().unwrap().to_string(), m.clone());
            }
            after = format!("&after={}", page.last().unwrap()["mac"].as_str().unwrap());
        }
        all
    };
    let state = |m: &str| {
        machines
            .get(m)
            .map(|v| v["state"].as_str().unwrap().to_string())
    };
    for m in &a.enrolled {
        assert!(
            state(m).is_some(),
            "{}",
            ctx(format!("acknowledged enroll of {m} lost"))
        );
    }
    for m in &a.installed {
        let s = state(m).unwrap();
        assert!(
            matches!(
                s.as_str(),
                "installed" | "registering" | "registered" | "failed"
            ),
            "{}",
            ctx(format!("{m} phoned home (acknowledged) but is {s}"))
        );
        if s == "failed" {
            // Only the registration may fail it (nothing listens on its SSH port).
            let f = &machines[m]["failed_step"];
            assert_eq!(
                f,
                "connect",
                "{}",
                ctx(format!("{m} failed: {}", machines[m]))
            );
        }
    }
    // Tokens of the machines the last round touched (all of them would be thousands of
    // requests per round; every machine is some round's).
    for (m, tokens) in a.tokens.iter().filter(|(m, _)| a.touched.contains(*m)) {
        let s = state(m).unwrap();
        assert_ne!(
            s,
            "enrolled",
            "{}",
            ctx(format!("{m} was handed an install script but is enrolled"))
        );
        // Of a machine's tokens only the last handed out can work, and only while installing.
        for (i, t) in tokens.iter().enumerate() {
            let (code, _) = ep.machine_get(&format!("/config/{t}/preseed.cfg"));
            let may = s == "installing" && i + 1 == tokens.len();
            assert!(
                code != 200 || may,
                "{}",
                ctx(format!(
                    "token {i} of {} of {m} works while it is {s}",
                    tokens.len()
                ))
            );
        }
    }
    // Every machine the last round touched is in the state of its last transition event.
    for m in &a.touched {
        let Some(s) = state(m) else { continue };
        let events = get(&format!("/machines/{m}/events?tail=true&limit=1000"));
        let last = events
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find_map(|e| e["to_state"].as_str().map(str::to_string));
        assert_eq!(
            last.as_deref(),
            Some(s.as_str()),
            "{}",
            ctx(format!("{m}: events {events}"))
        );
    }
}
