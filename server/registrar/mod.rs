//! The registrar: after phone-home, SSH into the node with its pinned host key and run its
//! role's steps (`templates/roles/*.toml`), then hand it off.
//!
//! A queue of MACs feeds a bounded pool of workers. Each run is resumable: a finished step
//! is a `register_steps` row written with its event in one transaction, so after a crash
//! the daemon re-queues every `registering` machine and the run continues at its first
//! unfinished step. Steps are idempotent anyway (the role files make sure of it); resuming
//! only avoids doing work twice. Nothing stays `registering` without a worker: either it
//! finishes, or it fails with the step and the reason.
//!
//! Several daemons may share one inventory (PostgreSQL), and each may be handed the same
//! machine (its phone-home reached one, another restarted and resumed it). A run therefore
//! begins by claiming the machine's registration in the inventory for a while
//! ([`Settings::claim`], a minute by default), renewed while it goes on: of several daemons exactly one runs it. A daemon that dies
//! holding a claim stops renewing it; once it runs out, the others' sweep
//! ([`Handle::sweep`]) finds the run unclaimed and one of them takes it over, at its first
//! unfinished step.

mod output;
pub mod ssh;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::PrivateKey;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::mac::Mac;
use crate::metrics::{Metrics, Registration};
use crate::pki::Ca;
use crate::policy::{EventKind, Failure, State, Transition};
use crate::render::{shell_quote, Renderer, RoleDef, RoleStep};
use crate::store::{self, Inventory, Machine, StepRecord, StepStatus};
use crate::validate::truncate;

/// Registrar settings from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Machines registered at once.
    pub workers: usize,
    /// Connect, handshake and login timeout.
    pub ssh_timeout: Duration,
    /// Connection attempts before the machine fails (the node may still be booting).
    pub attempts: u32,
    /// How long a hand-off hook may run.
    pub handoff_timeout: Duration,
    /// How long a claim on a run lasts unless renewed (renewed every third of it).
    pub claim: Duration,
}

impl Settings {
    /// How often the sweep looks for runs nobody holds: twice a claim, at most every half
    /// minute.
    pub fn sweep_every(&self) -> Duration {
        (self.claim / 2).min(Duration::from_secs(30))
    }
}

/// The registrar's inbox, handed to the services at construction: they start runs through
/// it, and the daemon's [`Registrar`] serves the queue.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Mac>,
    inv: Arc<dyn Inventory>,
    renderer: Arc<Renderer>,
    metrics: Arc<Metrics>,
}

/// The receiving end of a [`Handle`], for [`Registrar::run`].
pub type Queue = mpsc::UnboundedReceiver<Mac>;

/// A registrar inbox over `inv`: the handle for the services and the queue for the worker
/// pool; queued runs are counted in `metrics`.
pub fn channel(
    inv: Arc<dyn Inventory>,
    renderer: Arc<Renderer>,
    metrics: Arc<Metrics>,
) -> (Handle, Queue) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Handle {
            tx,
            inv,
            renderer,
            metrics,
        },
        rx,
    )
}

impl Handle {
    /// The role `m`'s profile registers with, if any.
    pub fn role_of(&self, m: &Machine) -> Option<String> {
        let cat = self.renderer.catalog();
        cat.profile(m.profile.as_deref()?).ok()?.role.clone()
    }

    /// Whether `m`'s profile has a role (registration follows phone-home).
    pub fn has_role(&self, m: &Machine) -> bool {
        self.role_of(m).is_some()
    }

    /// Starts a fresh registration run (phone-home, or `provision register`): refuses a
    /// machine without a role or without pinned host keys, moves it to `registering`, and
    /// queues it.
    pub async fn start(&self, mac: Mac) -> Result<Machine, Error> {
        let m = self
            .inv
            .machine(mac)
            .await?
            .ok_or(store::StoreError::NotFound(mac))?;
        if !self.has_role(&m) {
            return Err(Error::Conflict(format!(
                "{mac} uses profile {:?}, whose role is none: there is nothing to register; set `role` in the profile",
                m.profile.as_deref().unwrap_or_default()
            )));
        }
        if m.host_keys.is_empty() {
            return Err(Error::Conflict(format!(
                "{mac} has no pinned SSH host key (state {}): it registers after its installed OS phones home",
                m.state
            )));
        }
        let m = self
            .inv
            .start_registration(mac, "registration queued".into(), store::now_ms())
            .await?;
        self.queue(mac)?;
        Ok(m)
    }

    /// Puts a run on the queue.
    fn queue(&self, mac: Mac) -> Result<(), Error> {
        // Counted before it is sent: the worker may take it (and count it out) at once.
        self.metrics.registration_queued();
        self.tx.send(mac).map_err(|_| {
            self.metrics.registration_unqueued();
            Error::Internal("the registrar is not running".into())
        })
    }

    /// Queues the runs nobody holds a claim on: interrupted by a daemon that stopped or died
    /// (its claim ran out). Returns how many it queued. Run every half minute.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let mut n = 0;
        for mac in self.inv.unclaimed_registrations(store::now_ms()).await? {
            if self.queue(mac).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// At daemon start: re-queues runs a stop or crash interrupted (they resume at their
    /// first unfinished step) and starts the ones phone-home could not queue.
    pub async fn resume(&self) -> Result<usize, Error> {
        let mut n = 0;
        for state in [State::Registering, State::Installed] {
            for m in store::all_in_state(self.inv.as_ref(), state).await? {
                if state == State::Registering {
                    if self.queue(m.mac).is_ok() {
                        n += 1;
                    }
                } else if self.has_role(&m) && self.start(m.mac).await.is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// The registrar's long-lived parts.
pub struct Registrar {
    inv: Arc<dyn Inventory>,
    renderer: Arc<Renderer>,
    ca: Arc<Ca>,
    key: Arc<PrivateKey>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// This daemon, as its claims name it (the same across its restarts: see `daemon.rs`).
    daemon: String,
    /// The runs this daemon has in progress: one per machine, whatever the queue holds.
    running: Mutex<HashSet<Mac>>,
}

fn fail(step: &str, reason: impl Into<String>) -> Failure {
    Failure::new(step, reason)
}

/// The end of a command's output, where errors are: for events and step records.
fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        format!("…{}", s.chars().skip(count - n).collect::<String>())
    }
}

/// Registration parameters: the role's defaults, overlaid by the profile's `[register]`,
/// overlaid by machine vars of the same name (parsed to the default's type: a list from a
/// comma-separated string, a boolean from true/false). A var that does not parse is an error.
pub fn parameters(
    role: &RoleDef,
    profile: &BTreeMap<String, toml::Value>,
    vars: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, toml::Value>, String> {
    let mut reg = role.defaults.clone();
    reg.extend(profile.clone());
    for (k, v) in reg.iter_mut() {
        let Some(s) = vars.get(k) else { continue };
        *v = match v {
            toml::Value::Array(_) => toml::Value::Array(
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(|x| toml::Value::String(x.to_string()))
                    .collect(),
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(s.parse().map_err(|_| {
                format!(
                    "variable {k} must be true or false (it overrides the role's {k}), not {s:?}"
                )
            })?),
            toml::Value::Integer(_) => toml::Value::Integer(s.parse().map_err(|_| {
                format!("variable {k} must be an integer (it overrides the role's {k}), not {s:?}")
            })?),
            _ => toml::Value::String(s.clone()),
        };
    }
    Ok(reg)
}

/// Whether every non-empty line of `expect` is a whole line of `output`; the first one
/// missing otherwise.
fn missing_line<'a>(expect: &'a str, output: &str) -> Option<&'a str> {
    let have: Vec<&str> = output.lines().map(str::trim).collect();
    expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .find(|l| !have.contains(l))
}

/// The node's SSH address: the `ssh_host` var, else the address it phoned home from.
fn ssh_addr(m: &Machine) -> Result<String, String> {
    let host = crate::inventory::ssh_host(m)
        .ok_or("no address is known for the machine: set its ssh_host variable")?;
    let port: u16 = match m.vars.get("ssh_port") {
        Some(p) => p
            .parse()
            .map_err(|_| format!("variable ssh_port {p:?} is not a port number"))?,
        None => 22,
    };
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    })
}

impl Registrar {
    /// A registrar over `inv`, signing with `ca` and logging in with `key`; its claims on
    /// runs name it `daemon`.
    pub fn new(
        inv: Arc<dyn Inventory>,
        renderer: Arc<Renderer>,
        ca: Arc<Ca>,
        key: Arc<PrivateKey>,
        settings: Settings,
        metrics: Arc<Metrics>,
        daemon: String,
    ) -> Registrar {
        Registrar {
            inv,
            renderer,
            ca,
            key,
            settings,
            metrics,
            daemon,
            running: Mutex::new(HashSet::new()),
        }
    }

    /// Serves the queue until `shutdown`; runs in flight then stop where they are and are
    /// resumed on the next start.
    pub async fn run(self, mut queue: Queue, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let slots = Arc::new(Semaphore::new(me.settings.workers.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = queue.recv() => {
                    let Some(mac) = next else { break };
                    let Ok(slot) = slots.clone().acquire_owned().await else { break };
                    let me = me.clone();
                    me.metrics.registration_started();
                    tasks.spawn(async move {
                        let began = std::time::Instant::now();
                        let ran = me.claimed(mac, me.register(mac)).await;
                        let (role, result) = match ran {
                            Some(Some((role, result))) => (Some(role), result),
                            Some(None) => (None, Registration::Failed),
                            None => {
                                // Another daemon (or this one) has it: not a run of ours.
                                me.metrics.registration_skipped();
                                drop(slot);
                                return;
                            }
                        };
                        me.metrics
                            .registration_ended(role.as_deref(), result, began.elapsed());
                        drop(slot);
                    });
                }
            }
        }
        tasks.shutdown().await;
    }

    /// Runs `run` holding the claim on `mac`'s registration, renewed every third of the
    /// claim's length (so one renewal delayed by a slow database does not lose it) and given
    /// up at its end; `None`, without running it, if another daemon holds the
    /// claim or this one already runs it.
    async fn claimed<T>(&self, mac: Mac, run: impl std::future::Future<Output = T>) -> Option<T> {
        if !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mac)
        {
            return None;
        }
        let claim = |now: i64| {
            self.inv.claim_registration(
                mac,
                self.daemon.clone(),
                now + self.settings.claim.as_millis() as i64,
                now,
            )
        };
        let out = match claim(store::now_ms()).await {
            Ok(true) => {
                let renew = async {
                    let mut tick = tokio::time::interval(self.settings.claim / 3);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        match claim(store::now_ms()).await {
                            Ok(true) => {}
                            // Lost (the database was away past the lease, and another daemon
                            // took it over) or not renewable now: the run goes on, its steps
                            // are idempotent; the log says so.
                            Ok(false) => {
                                tracing::warn!(%mac, "registration claim lost to another daemon")
                            }
                            Err(e) => tracing::warn!(%mac, "renewing the registration claim: {e}"),
                        }
                    }
                };
                let out = tokio::select! {
                    out = run => Some(out),
                    _ = renew => None,
                };
                if let Err(e) = self
                    .inv
                    .release_registration(mac, self.daemon.clone())
                    .await
                {
                    tracing::info!(%mac, "releasing the registration claim: {e} (it runs out by itself)");
                }
                out
            }
            Ok(false) => {
                tracing::info!(%mac, "registration is run by another daemon (it holds the claim)");
                None
            }
            Err(e) => {
                tracing::warn!(%mac, "claiming the registration: {e}; the sweep tries again");
                None
            }
        };
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&mac);
        out
    }

    /// Runs `mac`'s registration; returns its role and how it ended, or `None` for a run
    /// that had nothing to do (the machine was deleted, or is no longer registering).
    async fn register(&self, mac: Mac) -> Option<(String, Registration)> {
        let m = match self.inv.machine(mac).await {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(%mac, "registration: {e}");
                return None;
            }
        };
        if m.state != State::Registering {
            return None;
        }
        let role = m
            .profile
            .as_deref()
            .and_then(|p| {
                self.renderer
                    .catalog()
                    .role_of(p)
                    .ok()
                    .flatten()
                    .map(|r| r.name.clone())
            })
            .unwrap_or_else(|| "none".into());
        tracing::info!(%mac, "registration started");
        let outcome = self.steps(&m).await;
        let result = match outcome {
            Ok(n) => {
                let r = self
                    .inv
                    .transition(
                        mac,
                        Transition::FinishRegistration,
                        format!("{n} step(s) ok"),
                        store::now_ms(),
                    )
                    .await;
                match r {
                    Ok(m) => self.hand_off(&m).await,
                    Err(e) => Err(fail("finish", e.to_string())),
                }
            }
            Err(f) => Err(f),
        };
        let Err(f) = result else {
            return Some((role, Registration::Registered));
        };
        tracing::warn!(%mac, step = %f.step, "registration failed: {}", f.reason);
        let detail = f.to_string();
        let r = self
            .inv
            .transition(mac, Transition::Fail(f), detail, store::now_ms())
            .await;
        if let Err(e) = r {
            // Reprovisioned or deleted meanwhile: the run is moot.
            tracing::info!(%mac, "registration outcome not recorded: {e}");
        }
        Some((role, Registration::Failed))
    }

    /// Connects (with bounded retries) and runs every unfinished step; returns how many ran.
    async fn steps(&self, m: &Machine) -> Result<usize, Failure> {
        let cat = self.renderer.catalog();
        let profile_name = m.profile.clone().unwrap_or_default();
        let profile = cat
            .profile(&profile_name)
            .map_err(|e| fail("role", e.to_string()))?;
        let role = cat
            .role_of(&profile_name)
            .map_err(|e| fail("role", e.to_string()))?
            .ok_or_else(|| fail("role", format!("profile {profile_name} has role none")))?
            .clone();
        let reg = parameters(&role, &profile.register, &m.vars).map_err(|e| fail("role", e))?;
        let user = reg
            .get("ssh_user")
            .and_then(|v| v.as_str())
            .unwrap_or("root")
            .to_string();
        let addr = ssh_addr(m).map_err(|e| fail("connect", e))?;
        let session = self.connect(m.mac, &addr, &user, &m.host_keys).await?;
        let mut ran = 0;
        let result = async {
            for (seq, step) in role.steps.iter().enumerate() {
                let done = m
                    .register_steps
                    .iter()
                    .any(|s| s.name == step.name && s.status == StepStatus::Ok);
                if done {
                    continue;
                }
                self.step(m, &role, &reg, &user, &session, seq as i64, step)
                    .await?;
                ran += 1;
            }
            Ok(())
        }
        .await;
        session.close().await;
        result.map(|()| ran)
    }

    async fn connect(
        &self,
        mac: Mac,
        addr: &str,
        user: &str,
        pinned: &[String],
    ) -> Result<ssh::Session, Failure> {
        let attempts = self.settings.attempts.max(1);
        for attempt in 1..=attempts {
            let err = match ssh::Session::open(
                addr,
                user,
                pinned,
                self.key.clone(),
                self.settings.ssh_timeout,
            )
            .await
            {
                Ok(s) => return Ok(s),
                Err(e) => e,
            };
            let step = match err {
                ssh::SshError::HostKeyMismatch { .. } => "host-key",
                ssh::SshError::AuthRefused { .. } => "auth",
                _ => "connect",
            };
            if !err.retryable() || attempt == attempts {
                let why = if err.retryable() {
                    format!("{err} (after {attempt} attempt(s))")
                } else {
                    err.to_string()
                };
                return Err(fail(step, why));
            }
            let wait = Duration::from_secs(2u64.saturating_pow(attempt).min(30));
            let detail = format!("attempt {attempt}/{attempts}: {err}; next in {wait:?}");
            if let Err(e) = self
                .inv
                .record_event(Some(mac), EventKind::RegisterRetry, detail, store::now_ms())
                .await
            {
                tracing::warn!(%mac, "recording a registration retry failed: {e}");
            }
            tokio::time::sleep(wait).await;
        }
        unreachable!("the last attempt returns")
    }

    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        m: &Machine,
        role: &RoleDef,
        reg: &BTreeMap<String, toml::Value>,
        user: &str,
        session: &ssh::Session,
        seq: i64,
        step: &RoleStep,
    ) -> Result<(), Failure> {
        let cat = self.renderer.catalog();
        let name = step.name.as_str();
        let cert = self
            .inv
            .node_cert(m.mac)
            .await
            .map_err(|e| fail(name, e.to_string()))?;
        let mut ctx = self.renderer.registration_context(m, &role.name);
        ctx.set("reg", reg);
        ctx.set("ca_cert", &self.ca.cert_pem().trim());
        if let Some((pem, _)) = &cert {
            ctx.set("cert", &pem.trim());
        }
        let mut cmd = cat
            .render_step(&role.name, name, "run", &step.run, &ctx)
            .map_err(|e| fail(name, e.to_string()))?;
        if user != "root" {
            cmd = format!("sudo -n sh -c {}", shell_quote(&cmd));
        }
        let out = session
            .run(&cmd, Duration::from_secs(step.timeout))
            .await
            .map_err(|e| fail(name, e.to_string()))?;
        let combined = format!("{}\n{}", out.stdout.trim_end(), out.stderr.trim_end());
        let record = |status: StepStatus, output: String| StepRecord {
            seq,
            name: name.to_string(),
            status,
            exit_code: out.status.map(i64::from),
            output,
            at: store::now_ms(),
        };
        let code = out
            .status
            .map(|c| format!("exit {c}"))
            .unwrap_or_else(|| "no exit status".into());
        let problem = if out.status != Some(0) {
            Some(format!("{code}: {}", tail(&combined, 300)))
        } else if step.sign {
            let who = crate::pki::NodeIdentity {
                mac: m.mac.to_string(),
                hostname: m.hostname.clone(),
                role: role.name.clone(),
            };
            match self.sign(m.mac, &who, &out.stdout, cert).await {
                Ok(note) => {
                    let r = record(StepStatus::Ok, note.clone());
                    return self
                        .record(m.mac, r, format!("{name}: {code}: {note}"))
                        .await;
                }
                Err(why) => Some(why),
            }
        } else if let Some(src) = &step.expect {
            let expect = cat
                .render_step(&role.name, name, "expect", src, &ctx)
                .map_err(|e| fail(name, e.to_string()))?;
            missing_line(&expect, &out.stdout).map(|l| {
                format!(
                    "{code} but the read-back lacks the line {l:?}; output: {}",
                    tail(&out.stdout, 300)
                )
            })
        } else {
            None
        };
        match problem {
            None => {
                let r = record(StepStatus::Ok, tail(&combined, 2000));
                let detail = format!("{name}: {code}: {}", tail(&combined, 200));
                self.record(m.mac, r, detail).await
            }
            Some(why) => {
                let r = record(StepStatus::Failed, why.clone());
                let _ = self.record(m.mac, r, format!("{name}: {why}")).await;
                Err(fail(name, why))
            }
        }
    }

    async fn record(&self, mac: Mac, r: StepRecord, detail: String) -> Result<(), Failure> {
        let name = r.name.clone();
        self.inv
            .record_step(mac, r, detail)
            .await
            .map_err(|e| fail(&name, e.to_string()))
    }

    /// Signs the CSR a `sign` step printed for `who`, or re-issues the stored certificate
    /// when it is for the same node key, names, and CA, and not near its end (so registering
    /// again changes nothing, and renews what needs renewing).
    async fn sign(
        &self,
        mac: Mac,
        who: &crate::pki::NodeIdentity,
        csr: &str,
        stored: Option<(String, String)>,
    ) -> Result<String, String> {
        if let Some((pem, fp)) = stored {
            if crate::pki::same_key(csr, &pem) && self.ca.issued(&pem, who) {
                return Ok(format!(
                    "certificate for this node key already issued: SHA256 {fp}"
                ));
            }
        }
        let s = self.ca.sign(csr, who).map_err(|e| format!("{e:#}"))?;
        let note = format!("signed {}: SHA256 {}", s.subject, s.fingerprint);
        self.inv
            .save_node_cert(mac, s.cert_pem, s.fingerprint, s.subject, store::now_ms())
            .await
            .map_err(|e| e.to_string())?;
        Ok(note)
    }

    /// Runs the profile's hand-off hook, if any (`reg.handoff`, a shell command line on the
    /// provision host): success → `handed_off`; failure → `failed` at step `handoff`.
    async fn hand_off(&self, m: &Machine) -> Result<(), Failure> {
        let cat = self.renderer.catalog();
        let profile = m.profile.clone().unwrap_or_default();
        let Ok(p) = cat.profile(&profile) else {
            return Ok(());
        };
        let Some(src) = p.register.get("handoff").and_then(|v| v.as_str()) else {
            return Ok(());
        };
        let role = p
            .role
            .clone()
            .unwrap_or_else(|| crate::render::NO_ROLE.into());
        let ctx = self.renderer.registration_context(m, &role);
        let cmd = cat
            .render_shell("handoff", src, &ctx)
            .map_err(|e| fail("handoff", e.to_string()))?;
        let addr = ssh_addr(m).unwrap_or_default();
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c")
            .arg(&cmd)
            .env("PROVISION_MAC", m.mac.to_string())
            .env("PROVISION_HOST", crate::inventory::host_name(m))
            .env("PROVISION_SSH_ADDR", addr)
            .env("PROVISION_PROFILE", &profile)
            .env("PROVISION_ROLE", &role)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let run = async {
            let mut child = c.spawn()?;
            let (so, se) = (child.stdout.take(), child.stderr.take());
            let (so, se) = tokio::join!(
                async { output::Tail::read_all(so.expect("piped")).await },
                async { output::Tail::read_all(se.expect("piped")).await }
            );
            let status = child.wait().await?;
            std::io::Result::Ok((status, so?, se?))
        };
        let (status, so, se) = tokio::time::timeout(self.settings.handoff_timeout, run)
            .await
            .map_err(|_| {
                fail(
                    "handoff",
                    format!(
                        "the hook ran longer than {:?}",
                        self.settings.handoff_timeout
                    ),
                )
            })?
            .map_err(|e| fail("handoff", format!("cannot run /bin/sh: {e}")))?;
        let combined = format!(
            "{}\n{}",
            so.into_string().trim_end(),
            se.into_string().trim_end()
        );
        if !status.success() {
            return Err(fail(
                "handoff",
                format!("{status}: {}", tail(&combined, 300)),
            ));
        }
        self.inv
            .transition(
                m.mac,
                Transition::HandOff,
                format!("hook {}: {}", truncate(&cmd, 80), tail(&combined, 200)),
                store::now_ms(),
            )
            .await
            .map(|_| ())
            .map_err(|e| fail("handoff", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_layer_role_profile_and_vars() {
        let role: RoleDef = toml::from_str(
            r#"description = "x"
               [defaults]
               uplinks = []
               ssl_bootstrap = false
               datapath_type = "system"
               port = 6632"#,
        )
        .unwrap();
        let profile: BTreeMap<String, toml::Value> =
            toml::from_str(r#"datapath_type = "netdev""#).unwrap();
        let vars = BTreeMap::from([
            (
                "uplinks".to_string(),
                "br-eth1:eth1, br-eth2:eth2,".to_string(),
            ),
            ("ssl_bootstrap".to_string(), "true".to_string()),
            ("unrelated".to_string(), "x".to_string()),
        ]);
        let reg = parameters(&role, &profile, &vars).unwrap();
        assert_eq!(reg["datapath_type"].as_str(), Some("netdev"));
        assert_eq!(reg["ssl_bootstrap"].as_bool(), Some(true));
        let up: Vec<_> = reg["uplinks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(up, ["br-eth1:eth1", "br-eth2:eth2"]);
        assert!(!reg.contains_key("unrelated"));
        let bad = BTreeMap::from([("port".to_string(), "x".to_string())]);
        assert!(parameters(&role, &profile, &bad)
            .unwrap_err()
            .contains("must be an integer"));
    }

    /// Every step of every built-in role renders to a command `sh -n` accepts, with
    /// parameters on and off, and hostile values stay single words.
    #[test]
    fn builtin_roles_render_to_valid_shell_with_values_quoted() {
        let cat = crate::render::Catalog::load(crate::render::Sources::default()).unwrap();
        let names: Vec<_> = cat.roles().keys().cloned().collect();
        assert_eq!(names, ["gateway", "hypervisor", "service"]);
        let hostile = BTreeMap::from([
            (
                "uplinks".to_string(),
                "br-x:eth1;reboot,br-y:$(id)".to_string(),
            ),
            (
                "managers".to_string(),
                "ssl:192.0.2.1:6632,ssl:'q'".to_string(),
            ),
            ("controllers".to_string(), "tcp:192.0.2.2:6653".to_string()),
            ("ssl_bootstrap".to_string(), "true".to_string()),
        ]);
        for vars in [BTreeMap::new(), hostile] {
            for role in cat.roles().values() {
                let reg = parameters(role, &BTreeMap::new(), &vars).unwrap();
                let mut ctx = crate::render::Context::default();
                ctx.set("reg", &reg);
                ctx.set("role", &role.name);
                ctx.set("hostname", &"hv1");
                ctx.set(
                    "cert",
                    &"-----BEGIN CERTIFICATE-----\nMIIB'x\n-----END CERTIFICATE-----",
                );
                ctx.set(
                    "ca_cert",
                    &"-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----",
                );
                for st in &role.steps {
                    let cmd = cat
                        .render_step(&role.name, &st.name, "run", &st.run, &ctx)
                        .unwrap_or_else(|e| panic!("{} {}: {e}", role.name, st.name));
                    let check = std::process::Command::new("sh")
                        .args(["-n", "-c", &cmd])
                        .output()
                        .unwrap();
                    assert!(
                        check.status.success(),
                        "{} {}: {}\n{cmd}",
                        role.name,
                        st.name,
                        String::from_utf8_lossy(&check.stderr)
                    );
                    if st.name == "bridges" && vars.contains_key("uplinks") {
                        assert!(cmd.contains("'eth1;reboot'"), "{cmd}");
                        assert!(cmd.contains("'$(id)'"), "{cmd}");
                    }
                    if let Some(x) = &st.expect {
                        cat.render_step(&role.name, &st.name, "expect", x, &ctx)
                            .unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn expect_lines_must_be_whole_lines() {
        let out = "br-int\nbr-eth1\nssl:10.0.0.1:6632\n";
        assert_eq!(missing_line("br-int\n\n  ssl:10.0.0.1:6632\n", out), None);
        assert_eq!(missing_line("br-in\n", out), Some("br-in"));
    }
}
