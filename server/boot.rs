//! The boot service: what the machine-facing protocols ask. pixiecore's `Booter` question —
//! "this MAC, this firmware: what should it boot?" — plus the installer's config fetches and
//! the installed OS's phone-home.
//!
//! The hot path is reads: a machine that only gets the local-boot script (or a DHCP offer)
//! costs one point read and an [`Observation`], which is written later in a batch. Only what
//! changes state waits for the disk: a new MAC's discovery over HTTP, an install token, a
//! served config, a phone-home.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::attribution::{Attribution, Evidence, EVIDENCE_MAX_AGE};
use crate::error::{Error, Result};
use crate::keys;
use crate::mac::Mac;
use crate::metrics::{self, Metrics};
use crate::policy::{
    self, BootDecision, BootRequest, Choice, ClaimPolicy, DiscoverAnswer, EventKind, MachineFacts,
    Platform, RuleMode, State,
};
use crate::registrar;
use crate::render::{ArtifactKind, RenderError, Renderer};
use crate::store::{
    self, BootFacts, Inventory, Machine, Observation, RuleOutcome, Sighting, StoreError,
    TokenProblem,
};
use crate::validate::truncate;

/// Behaviour settings from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long an install token lives.
    pub install_token_ttl: Duration,
    /// What unknown machines are told.
    pub discover: DiscoverAnswer,
    /// Which install claims are believed (a profile may say otherwise).
    pub claims: ClaimPolicy,
}

/// The answer to an ignored machine that is already running iPXE: hand control back to the
/// firmware, which tries its next boot device.
pub const IGNORE_SCRIPT: &str = "#!ipxe\nexit\n";

/// A machine's iPXE script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    /// The script.
    pub body: String,
    /// It installs: the client's next requests are its kernel and initrds.
    pub install: bool,
}

impl std::fmt::Display for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.body)
    }
}

impl std::ops::Deref for Script {
    type Target = str;
    fn deref(&self) -> &str {
        &self.body
    }
}

/// An install claim that passed [`BootService::check_claim`].
struct Claim {
    /// Who asked (canonical form): the install token is issued to this address.
    from: IpAddr,
    /// On what evidence it was believed.
    evidence: String,
    /// What the boot request said.
    sighting: Sighting,
    /// (profile, group) when the profile to install comes from a group.
    group: Option<(String, String)>,
}

/// The machine-facing service.
pub struct BootService {
    inv: Arc<dyn Inventory>,
    renderer: Arc<Renderer>,
    settings: Settings,
    registrar: registrar::Handle,
    attribution: Arc<Attribution>,
    metrics: Arc<Metrics>,
}

/// The decision's inputs: the stored facts with `profile`, resolved against the groups.
fn facts_of<'a>(f: &BootFacts, profile: Option<&'a str>) -> MachineFacts<'a> {
    MachineFacts {
        state: f.state,
        profile,
        installer_done: f.installer_done,
    }
}

impl BootService {
    /// The service over `inv`, rendering with `renderer`, queueing registrations on
    /// `registrar`, attributing addresses with `attribution`, counting in `metrics`.
    pub fn new(
        inv: Arc<dyn Inventory>,
        renderer: Arc<Renderer>,
        settings: Settings,
        registrar: registrar::Handle,
        attribution: Arc<Attribution>,
        metrics: Arc<Metrics>,
    ) -> BootService {
        BootService {
            inv,
            renderer,
            settings,
            registrar,
            attribution,
            metrics,
        }
    }

    /// The daemon's metrics (the protocol servers count in them too).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics exposition, with the machines per state read now.
    pub async fn scrape(&self) -> Result<String> {
        let machines = self.inv.count_by_state().await?;
        Ok(self.metrics.scraped(&machines, &self.inv.stats()))
    }

    /// Client IP → MAC, as DHCP learned it.
    pub fn attribution(&self) -> &Attribution {
        &self.attribution
    }

    /// The same, shared (address mode's lease book teaches it bound addresses).
    pub fn attribution_handle(&self) -> Arc<Attribution> {
        self.attribution.clone()
    }

    fn observe(&self, mac: Option<Mac>, kind: EventKind, detail: String) {
        self.inv.observe(Observation::Event {
            mac,
            kind,
            detail,
            at: store::now_ms(),
        });
    }

    /// The static first script (`/boot.ipxe`).
    pub fn boot_ipxe(&self, base_url: &str) -> Result<String> {
        Ok(self.renderer.boot_ipxe(base_url)?)
    }

    /// Answers `/ipxe` for one machine asking from `from`: an unknown MAC is recorded
    /// `discovered` (durably), a known one's sighting is observed; then policy decides. An
    /// install mints a new install token, only for a claim backed by evidence (see
    /// [`BootService::check_claim`]), and moves the machine to `installing` only once the
    /// script has rendered. `Ok(None)` means "ignore this machine".
    pub async fn boot(
        &self,
        mac: Mac,
        req: BootRequest,
        sighting: Sighting,
        from: IpAddr,
        base_url: &str,
    ) -> Result<Option<Script>> {
        let now = store::now_ms();
        // The three columns the decision needs (usually cached): a local boot, by far the
        // most common answer, never reads the whole machine.
        let facts = match self.inv.boot_facts(mac).await {
            // The database cannot be read: what the machine should boot is unknown, and its
            // disk is the answer that wipes nothing (its event is written once it is back).
            Err(StoreError::Unavailable(why)) => {
                tracing::debug!(%mac, "inventory unreachable ({why}): local boot");
                let reason = policy::LocalReason::InventoryUnreachable;
                return self
                    .local_boot(mac, req.platform, reason, base_url)
                    .map(Some);
            }
            other => other?,
        };
        let (facts, machine) = match facts {
            Some(f) => {
                self.inv.observe(Observation::Seen {
                    mac,
                    sighting: sighting.clone(),
                    discover: false,
                    at: now,
                });
                (f, None)
            }
            None => {
                // Created with this sighting.
                let m = self.inv.discover(mac, sighting.clone(), now).await?;
                (BootFacts::of(&m), Some(Box::new(m)))
            }
        };
        // A machine without a profile of its own may get one from its groups, resolved with
        // what this request says of it (a serial reported for the first time counts now).
        let (mut profile, mut group) = facts.profile(mac, &sighting, &self.inv.groups());
        let (mut facts, mut machine) = (facts, machine);
        // One that still has none may be enrolled by a discovery rule, and from here on is
        // an enrolled machine.
        if facts.state == State::Discovered && profile.is_none() {
            if let Some(m) = self.apply_rules(mac, &facts, &sighting, now).await {
                profile = m.profile.clone();
                group = m.inherited.profile.clone();
                facts = BootFacts::of(&m);
                machine = Some(Box::new(m));
            }
        }
        let decision = policy::decide(
            Some(&facts_of(&facts, profile.as_deref())),
            &req,
            self.settings.discover,
        );
        match decision {
            BootDecision::Ignore => {
                self.metrics.boot_decision(metrics::BootDecision::Ignore);
                self.observe(
                    Some(mac),
                    EventKind::IpxeIgnored,
                    "discovery answer is ignore".into(),
                );
                Ok(None)
            }
            BootDecision::LocalBoot { platform, reason } => {
                self.local_boot(mac, platform, reason, base_url).map(Some)
            }
            BootDecision::Install { profile } => {
                let from = from.to_canonical();
                let evidence = match self.check_claim(mac, from, &profile) {
                    Ok(how) => how,
                    Err(why) => {
                        self.metrics
                            .boot_decision(metrics::BootDecision::ClaimRefused);
                        self.observe(
                            Some(mac),
                            EventKind::ClaimRefused,
                            format!("install claim from {from}: {why}"),
                        );
                        return Err(Error::Forbidden(format!(
                            "install claim for {mac} from {from} refused: {why}"
                        )));
                    }
                };
                let claim = Claim {
                    from,
                    evidence,
                    sighting,
                    group: group.map(|g| (profile.clone(), g)),
                };
                let body = self
                    .install(mac, machine, &profile, claim, base_url, now)
                    .await?;
                self.metrics.boot_decision(metrics::BootDecision::Install);
                Ok(Some(Script {
                    body,
                    install: true,
                }))
            }
        }
    }

    /// The discovery rule `facts` (a discovered machine without a profile) gets, applied:
    /// the machine if the rule enrolled it. A full rule, a proposal and a failure are
    /// recorded and leave it discovered.
    async fn apply_rules(
        &self,
        mac: Mac,
        facts: &BootFacts,
        sighting: &Sighting,
        now: i64,
    ) -> Option<Machine> {
        let rules = self.inv.rules();
        if rules.is_idle() {
            return None;
        }
        let text = mac.to_string();
        let rule = match rules.choose(&facts.reported(&text, sighting)) {
            Choice::None => return None,
            Choice::Full(r) => {
                self.observe(
                    Some(mac),
                    EventKind::RuleFull,
                    format!(
                        "rule {} matches but is full: it has enrolled {} of {} machines",
                        r.name,
                        r.used,
                        r.max.unwrap_or_default()
                    ),
                );
                return None;
            }
            Choice::Rule(r) => r,
        };
        if rule.mode == RuleMode::Propose && facts.proposed_rule.as_deref() == Some(&rule.name) {
            return None;
        }
        match self
            .inv
            .apply_rule(mac, rule.name.clone(), sighting.clone(), false, now)
            .await
        {
            Ok(RuleOutcome::Enrolled(m)) => Some(*m),
            Ok(RuleOutcome::Proposed) | Ok(RuleOutcome::Skipped(_)) => None,
            Ok(RuleOutcome::Full(why)) => {
                self.observe(Some(mac), EventKind::RuleFull, why);
                None
            }
            Err(e) => {
                tracing::warn!(%mac, rule = %rule.name, "discovery rule failed: {e}");
                self.observe(Some(mac), EventKind::RuleFailed, e.to_string());
                None
            }
        }
    }

    /// Whether to believe that `from` is `mac`, for an install of `profile`: `Ok` says on
    /// what evidence, `Err` why not. A MAC is a claim, not a credential: an install hands
    /// its claimant a token that reads every rendered config and pins host keys, so it needs
    /// something the daemon observed itself. Evidence to the contrary always refuses;
    /// no evidence refuses unless the profile (or the daemon) says `claims = "any"`.
    fn check_claim(&self, mac: Mac, from: IpAddr, profile: &str) -> Result<String, String> {
        let policy = self
            .renderer
            .catalog()
            .profile(profile)
            .ok()
            .and_then(|p| p.claims)
            .unwrap_or(self.settings.claims);
        match self.attribution.evidence(from, mac) {
            Evidence::Matches(how) => Ok(how),
            Evidence::Contradicts(why) => Err(why),
            Evidence::None if policy == ClaimPolicy::Any => {
                Ok(format!("no evidence for {from}, accepted by claims = \"any\""))
            }
            Evidence::None => Err(format!(
                "no evidence that {from} is {mac}: the neighbour table has no entry for it and DHCP saw no request of {mac} for it in the last {} minutes. A relayed or routed client needs claims = \"any\" (see docs/security.md)",
                EVIDENCE_MAX_AGE.as_secs() / 60
            )),
        }
    }

    /// Renders the install script for `mac` (from `machine` if this request already read it)
    /// and mints its token, issued to the claim's address.
    async fn install(
        &self,
        mac: Mac,
        machine: Option<Box<Machine>>,
        profile: &str,
        claim: Claim,
        base_url: &str,
        now: i64,
    ) -> Result<String> {
        let Claim {
            from,
            evidence,
            sighting,
            group,
        } = claim;
        let mut m = match machine {
            Some(m) => *m,
            None => self
                .inv
                .machine(mac)
                .await?
                .ok_or(StoreError::NotFound(mac))?,
        };
        // Render with what this request said (the same values are recorded with the token),
        // its groups chosen with it too.
        if sighting.uuid.is_some() && m.uuid.is_none()
            || sighting.serial.is_some() && m.serial.is_none()
        {
            m = m.unresolved();
            m.uuid = m.uuid.or(sighting.uuid.clone());
            m.serial = m.serial.or(sighting.serial.clone());
            m = m.resolve(&self.inv.groups());
        }
        let token = keys::random_token();
        let cat = self.renderer.catalog();
        let script = match self
            .renderer
            .install_script(&cat, &m, profile, base_url, &token)
        {
            Ok(s) => s,
            Err(e) => {
                self.observe(
                    Some(mac),
                    EventKind::RenderFailed,
                    format!("install script for profile {profile}: {e}"),
                );
                return Err(e.into());
            }
        };
        let expires = now + self.settings.install_token_ttl.as_millis() as i64;
        match self
            .inv
            .start_install(
                mac,
                keys::token_hash(&token),
                expires,
                sighting,
                from.to_string(),
                group,
                now,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(%mac, %from, "install token issued ({evidence})");
                Ok(script)
            }
            Err(e @ StoreError::TokenHeld { .. }) => {
                self.metrics
                    .boot_decision(metrics::BootDecision::ClaimRefused);
                self.observe(
                    Some(mac),
                    EventKind::ClaimRefused,
                    format!("install claim from {from}: {e}"),
                );
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The local-boot script for `mac`, said to be for `reason`, with its event (a render
    /// that fails is an event too).
    fn local_boot(
        &self,
        mac: Mac,
        platform: Platform,
        reason: policy::LocalReason,
        base_url: &str,
    ) -> Result<Script> {
        let word = reason.as_str();
        let cat = self.renderer.catalog();
        match self
            .renderer
            .local_script(&cat, mac, platform, word, base_url)
        {
            Ok(body) => {
                self.metrics.boot_decision(metrics::BootDecision::LocalBoot);
                self.observe(
                    Some(mac),
                    EventKind::IpxeServed,
                    format!("local boot ({word}, {})", platform.as_str()),
                );
                Ok(Script {
                    body,
                    install: false,
                })
            }
            Err(e) => {
                self.observe(
                    Some(mac),
                    EventKind::RenderFailed,
                    format!("local.ipxe: {e}"),
                );
                Err(e.into())
            }
        }
    }

    /// DHCP asks whether a boot client gets an answer at all. The request is observed (an
    /// unknown MAC becomes `discovered` when the batch is written: the OFFER never waits for
    /// the disk); "ignore" means no reply. Only the ignore discovery answer needs a read.
    pub async fn dhcp_answer(&self, mac: Mac, said: Sighting, what: &str) -> bool {
        self.inv.observe(Observation::Seen {
            mac,
            sighting: said.clone(),
            discover: true,
            at: store::now_ms(),
        });
        if policy::always_answers(self.settings.discover) {
            return true;
        }
        let facts = match self.inv.boot_facts(mac).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(%mac, "reading the inventory for a DHCP request failed: {e}");
                return false;
            }
        };
        // The platform does not matter here: only "answer or not" is decided at DHCP time;
        // what to boot is decided again when iPXE asks /ipxe.
        let req = BootRequest {
            platform: Platform::Pcbios,
            arch: None,
        };
        // A MAC never seen yet is a discovered machine with nothing stored: a group may
        // already give it a profile (by the UUID it sends), or a rule take it.
        let none = BootFacts::unknown();
        let f = facts.as_ref().unwrap_or(&none);
        let profile = f.profile(mac, &said, &self.inv.groups()).0;
        // A discovered machine a rule will take is answered: its /ipxe applies the rule.
        let ruled = || {
            let rules = self.inv.rules();
            let text = mac.to_string();
            f.state == State::Discovered
                && !rules.is_idle()
                && matches!(rules.choose(&f.reported(&text, &said)), Choice::Rule(_))
        };
        let decided =
            (facts.is_some() || profile.is_some()).then(|| facts_of(f, profile.as_deref()));
        if policy::decide(decided.as_ref(), &req, self.settings.discover) == BootDecision::Ignore
            && !ruled()
        {
            self.observe(
                Some(mac),
                EventKind::DhcpIgnored,
                format!("{what}: discovery answer is ignore"),
            );
            return false;
        }
        true
    }

    /// Records a DHCP event on a machine (an observation).
    pub fn dhcp_event(&self, mac: Mac, kind: EventKind, detail: String) {
        self.observe(Some(mac), kind, detail);
    }

    /// Moves the live token `hash` of `mac` to `from` if the daemon has evidence that `from`
    /// is `mac` (an installer that changed address on the same link); false if it has none.
    async fn move_token_on_evidence(
        &self,
        hash: &str,
        from: IpAddr,
        mac: Mac,
        now: i64,
    ) -> Result<bool> {
        let Evidence::Matches(why) = self.attribution.evidence(from, mac) else {
            return Ok(false);
        };
        self.inv
            .move_token(hash.to_string(), from.to_string(), why, now)
            .await?;
        Ok(true)
    }

    /// Serves a profile artifact to the installer holding a live install token, asking from
    /// the address the token was issued to (or one the daemon has evidence is the same
    /// machine: the token moves there).
    pub async fn config(
        &self,
        token: &str,
        artifact: &str,
        from: IpAddr,
        base_url: &str,
    ) -> Result<(ArtifactKind, String)> {
        let now = store::now_ms();
        let from = from.to_canonical();
        let hash = keys::token_hash(token);
        let mut found = self
            .inv
            .machine_by_token(&hash, &from.to_string(), now)
            .await;
        if let Err(StoreError::Token(TokenProblem::OtherAddress, Some(mac))) = found {
            if self.move_token_on_evidence(&hash, from, mac, now).await? {
                found = self
                    .inv
                    .machine_by_token(&hash, &from.to_string(), now)
                    .await;
            }
        }
        let m = match found {
            Ok(m) => m,
            Err(StoreError::Token(problem, Some(mac))) => {
                self.metrics.config_refused(match problem {
                    TokenProblem::Unknown => metrics::ConfigRefusal::UnknownToken,
                    TokenProblem::Expired => metrics::ConfigRefusal::Expired,
                    TokenProblem::Used => metrics::ConfigRefusal::Used,
                    TokenProblem::OtherAddress => metrics::ConfigRefusal::OtherAddress,
                });
                self.observe(
                    Some(mac),
                    EventKind::ConfigRefused,
                    format!("{artifact} from {from}: {problem}"),
                );
                return Err(StoreError::Token(problem, Some(mac)).into());
            }
            Err(e) => return Err(e.into()),
        };
        let cat = self.renderer.catalog();
        match self.renderer.artifact(&cat, &m, artifact, base_url, token) {
            Ok((kind, body)) => {
                let last = m
                    .profile
                    .as_deref()
                    .and_then(|p| cat.profile(p).ok())
                    .and_then(|p| p.local_boot_after.clone());
                let done = (last.as_deref() == Some(artifact)).then(|| {
                    format!(
                        "installer fetched {artifact}; network boots go to the local disk until it phones home"
                    )
                });
                self.inv
                    .config_served(
                        m.mac,
                        format!("{artifact} ({}, {} bytes)", kind.as_str(), body.len()),
                        done,
                        now,
                    )
                    .await?;
                self.metrics.config_served(kind);
                Ok((kind, body))
            }
            Err(e @ RenderError::NoArtifact { .. }) => {
                self.metrics
                    .config_refused(metrics::ConfigRefusal::NoArtifact);
                self.observe(Some(m.mac), EventKind::ConfigRefused, e.to_string());
                Err(e.into())
            }
            Err(e) => {
                self.metrics
                    .config_refused(metrics::ConfigRefusal::RenderFailed);
                self.observe(
                    Some(m.mac),
                    EventKind::RenderFailed,
                    format!("{artifact}: {e}"),
                );
                Err(e.into())
            }
        }
    }

    /// Phone-home: pins the posted SSH host keys and moves the machine to `installed`,
    /// burning its token, if `from` is the address the token was issued to (or the profile
    /// allows any); a machine whose profile has a role is queued for registration.
    /// `key_lines` are OpenSSH public key lines; each must parse.
    pub async fn phone_home(
        &self,
        token: &str,
        key_lines: Vec<String>,
        from: IpAddr,
    ) -> Result<Machine> {
        let ip = from.to_canonical().to_string();
        let now = store::now_ms();
        let hash = keys::token_hash(token);
        let keys = match host_keys(&key_lines) {
            Ok(k) => k,
            Err(e) => {
                self.metrics.phone_home(metrics::PhoneHome::Invalid);
                // The machine's timeline says so when the token is its own and used from its
                // address: a real system whose phone-home carries no usable key (cloud-init
                // posts `N/A` for a host key file it cannot read) otherwise fails only in its
                // own logs, and provision just waits. Nobody else can write this event: it
                // takes the live token, from the address it was issued to.
                if let Ok(m) = self.inv.machine_by_token(&hash, &ip, now).await {
                    self.observe(
                        Some(m.mac),
                        EventKind::PhoneHomeRefused,
                        format!("from {ip}: {e}"),
                    );
                }
                return Err(e);
            }
        };
        let algs: Vec<_> = keys.iter().map(|(a, _)| a.clone()).collect();
        let detail = format!("{} SSH host key(s) pinned: {}", keys.len(), algs.join(", "));
        let any_address: std::collections::BTreeSet<String> = self
            .renderer
            .catalog()
            .profiles()
            .values()
            .filter(|p| p.phone_home_any_address)
            .map(|p| p.name.clone())
            .collect();
        let home = |hash: String, keys| {
            self.inv.phone_home(
                hash,
                keys,
                ip.clone(),
                any_address.clone(),
                detail.clone(),
                now,
            )
        };
        let mut result = home(hash.clone(), keys.clone()).await;
        if let Err(StoreError::Token(TokenProblem::OtherAddress, Some(mac))) = result {
            // An installed OS that took a new DHCP lease: the token follows it there, if the
            // daemon has evidence that the new address is the same machine.
            if self.move_token_on_evidence(&hash, from, mac, now).await? {
                result = home(hash, keys).await;
            }
        }
        match result {
            Ok(m) => {
                self.metrics.phone_home(metrics::PhoneHome::Installed);
                self.observe_install_duration(&m).await;
                if self.registrar.has_role(&m) {
                    // Registration starts now; the installer's request does not wait for it.
                    match self.registrar.start(m.mac).await {
                        Ok(m) => return Ok(m),
                        Err(e) => tracing::warn!(mac = %m.mac, "registration not started: {e}"),
                    }
                }
                Ok(m)
            }
            Err(StoreError::Token(problem, Some(mac))) => {
                self.metrics.phone_home(metrics::PhoneHome::Refused);
                self.observe(
                    Some(mac),
                    EventKind::PhoneHomeRefused,
                    format!("from {ip}: {problem}"),
                );
                Err(StoreError::Token(problem, Some(mac)).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Observes how long the install of `m` (just installed) took since it was enrolled or
    /// last reprovisioned, from its events: one read, on a phone-home only. A machine whose
    /// enroll event retention already dropped is not observed.
    async fn observe_install_duration(&self, m: &Machine) {
        let Some(profile) = m.profile.as_deref() else {
            return;
        };
        let events = self
            .inv
            .events(store::EventQuery {
                mac: Some(m.mac),
                tail: true,
                limit: store::MAX_PAGE,
                ..Default::default()
            })
            .await;
        let enrolled = events.ok().and_then(|ev| {
            ev.iter()
                .rev()
                .find(|e| matches!(e.kind, EventKind::Enrolled | EventKind::Reprovisioned))
                .map(|e| e.at)
        });
        if let Some(at) = enrolled {
            let took = Duration::from_millis(u64::try_from(m.state_at - at).unwrap_or(0));
            self.metrics.install_finished(profile, took);
        }
    }

    /// Records an iPXE binary served over HTTP (UEFI HTTP Boot) on the machine behind `ip`.
    pub fn record_http_boot(&self, ip: IpAddr, file: &str, bytes: u64) {
        let mac = self.attribution.mac_of(ip);
        self.seen_at(mac, ip);
        self.observe(
            mac,
            EventKind::HttpBootServed,
            format!("{file} ({bytes} bytes) to {ip}"),
        );
    }

    /// Records a TFTP transfer on the machine behind the client's address (seen in DHCP, or
    /// the kernel's neighbour table), or as an unattributed event.
    pub fn record_tftp(&self, t: crate::tftp::Transfer) {
        let ip = t.peer.ip();
        let mac = self.attribution.mac_of(ip);
        let (kind, detail) = match &t.outcome {
            Ok(()) => {
                tracing::info!(?mac, peer = %t.peer, file = %t.file, bytes = t.size, "TFTP served");
                (
                    EventKind::TftpServed,
                    format!("{} ({} bytes) to {ip}", t.file, t.size),
                )
            }
            Err(why) => {
                tracing::warn!(?mac, peer = %t.peer, file = %t.file, "TFTP failed: {why}");
                (EventKind::TftpFailed, format!("{} to {ip}: {why}", t.file))
            }
        };
        self.seen_at(mac, ip);
        self.observe(mac, kind, detail);
    }

    /// A request from `ip` attributed to `mac` is a sighting (last seen, address).
    fn seen_at(&self, mac: Option<Mac>, ip: IpAddr) {
        if let Some(mac) = mac {
            self.inv.observe(Observation::Seen {
                mac,
                sighting: Sighting {
                    ip: Some(ip.to_canonical().to_string()),
                    ..Default::default()
                },
                discover: false,
                at: store::now_ms(),
            });
        }
    }
}

/// The `(algorithm, key)` pairs of a phone-home's OpenSSH public key lines; each must parse
/// and there must be one.
fn host_keys(lines: &[String]) -> Result<Vec<(String, String)>> {
    let mut keys = Vec::new();
    for line in lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        keys.push(registrar::ssh::host_key_line(line).map_err(|e| {
            Error::Invalid(format!(
                "phone-home: {:?} is not an OpenSSH public key: {e}",
                truncate(line, 60)
            ))
        })?);
    }
    if keys.is_empty() {
        return Err(Error::Invalid(
            "phone-home carried no SSH host public key: post the lines of /etc/ssh/ssh_host_*_key.pub (text/plain) or cloud-init's pub_key_* form fields".into(),
        ));
    }
    Ok(keys)
}
