//! The one handle the protocol servers hold: boot decision, render, record.
//!
//! HTTP handlers (and, later, DHCP and TFTP) call methods here; this module asks `policy`
//! what to do, records it through `store` (on a blocking thread: SQLite with
//! `synchronous=FULL` waits for the disk), and renders through `render`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use minijinja::Value;
use serde::Deserialize;

use crate::keys;
use crate::mac::Mac;
use crate::policy::{self, BootDecision, BootRequest, DiscoverAnswer, MachineFacts, State};
use crate::render::{ArtifactKind, Catalog, Profile, RenderError, Sources};
use crate::store::{self, Event, Machine, MachinePatch, NewMachine, Sighting, Store, StoreError};
use crate::validate;

/// What went wrong, classified for the HTTP layer's status codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the store (not found, illegal transition, token refused, database).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From rendering.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Input that fails validation.
    #[error("{0}")]
    Invalid(String),
    /// A request that does not fit the machine as it is.
    #[error("{0}")]
    Conflict(String),
    /// A failure of the daemon itself (a panicked blocking task).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<validate::Invalid> for Error {
    fn from(e: validate::Invalid) -> Self {
        Error::Invalid(e.0)
    }
}

/// Result type of the provisioner.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Behaviour settings from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long an install token lives.
    pub install_token_ttl: Duration,
    /// What unknown machines are told.
    pub discover: DiscoverAnswer,
}

/// An enroll request, as the API receives it.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// MAC in any accepted form.
    pub mac: String,
    /// Profile name.
    pub profile: String,
    /// Hostname (RFC 1123).
    #[serde(default)]
    pub hostname: Option<String>,
    /// SMBIOS UUID.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Serial.
    #[serde(default)]
    pub serial: Option<String>,
    /// Variables.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A change to a machine, as the API receives it.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// New profile.
    #[serde(default)]
    pub profile: Option<String>,
    /// New hostname; an empty string clears it.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Replaces all variables.
    #[serde(default)]
    pub vars: Option<BTreeMap<String, String>>,
    /// Variables to set, keeping the others.
    #[serde(default)]
    pub set_vars: Option<BTreeMap<String, String>>,
    /// Variable names to remove.
    #[serde(default)]
    pub unset_vars: Option<Vec<String>>,
    /// Replaces all labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// The daemon's shared state and logic.
pub struct Provisioner {
    /// Client IPv4 addresses seen in DHCP (requested address, or the source on port 4011),
    /// so a TFTP transfer, which carries only an IP, lands on the right machine. An
    /// observation cache, not machine state: losing it on restart loses nothing.
    client_ips: std::sync::Mutex<std::collections::HashMap<std::net::Ipv4Addr, Mac>>,
    store: Store,
    catalog: RwLock<Arc<Catalog>>,
    sources: Sources,
    settings: Settings,
    ssh_public_key: String,
    /// The registrar's queue, once the daemon has started it.
    register_queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Mac>>,
}

/// The answer to an ignored machine that is already running iPXE: hand control back to the
/// firmware, which tries its next boot device.
pub const IGNORE_SCRIPT: &str = "#!ipxe\nexit\n";

/// The token text placed in previews instead of a live install token.
pub const REDACTED_TOKEN: &str = "REDACTED-INSTALL-TOKEN";

impl Provisioner {
    /// Builds the provisioner, loading profiles and templates from `sources`.
    pub fn new(
        store: Store,
        sources: Sources,
        settings: Settings,
        ssh_public_key: String,
    ) -> Result<Provisioner, RenderError> {
        let catalog = Catalog::load(sources.clone())?;
        Ok(Provisioner {
            client_ips: Default::default(),
            store,
            catalog: RwLock::new(Arc::new(catalog)),
            sources,
            settings,
            ssh_public_key,
            register_queue: std::sync::OnceLock::new(),
        })
    }

    /// The current catalog snapshot.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads profiles and templates from disk; on error the old catalog stays in service.
    /// Returns the number of profiles.
    pub fn reload(&self) -> Result<usize, RenderError> {
        let new = Catalog::load(self.sources.clone())?;
        let n = new.profiles().len();
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(n)
    }

    /// The daemon's SSH public key (rendered into installs).
    pub fn ssh_public_key(&self) -> &str {
        &self.ssh_public_key
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(Error::from)
    }

    /// Records an event; a failure to record is logged, never turned into a failed boot.
    async fn note(&self, mac: Option<Mac>, kind: &'static str, detail: String) {
        let d = detail.clone();
        if let Err(e) = self
            .db(move |s| s.event(mac, kind, &d, store::now_ms()))
            .await
        {
            tracing::error!(?mac, kind, %detail, "recording event failed: {e}");
        }
    }

    /// The template context for a machine: its inventory data, the profile's default vars
    /// overridden by the machine's, and the daemon's URLs with `token` in them.
    fn context(
        &self,
        m: &Machine,
        profile: Option<&Profile>,
        base_url: &str,
        token: &str,
    ) -> BTreeMap<&'static str, Value> {
        let mut vars = profile.map(|p| p.vars.clone()).unwrap_or_default();
        vars.extend(m.vars.clone());
        let bare = m.mac.to_string().replace(':', "");
        let hostname = crate::inventory::host_name(m);
        let mut keys = vec![self.ssh_public_key.clone()];
        if let Some(k) = vars.get("ssh_authorized_key").filter(|k| !k.is_empty()) {
            keys.push(k.clone());
        }
        let config_url = format!("{base_url}/config/{token}");
        let opt = |v: &Option<String>| v.clone().map(Value::from).unwrap_or(Value::from(()));
        BTreeMap::from([
            ("mac", Value::from(m.mac.to_string())),
            ("mac_hyphen", Value::from(m.mac.hyphenated())),
            ("mac_bare", Value::from(bare.clone())),
            ("hostname", Value::from(hostname)),
            ("uuid", opt(&m.uuid)),
            ("serial", opt(&m.serial)),
            (
                "profile",
                Value::from(m.profile.clone().unwrap_or_default()),
            ),
            (
                "role",
                Value::from(
                    profile
                        .map(|p| p.role.clone())
                        .unwrap_or_else(|| crate::render::NO_ROLE.into()),
                ),
            ),
            ("generation", Value::from(m.generation)),
            (
                "instance_id",
                Value::from(format!("provision-{bare}-{}", m.generation)),
            ),
            ("vars", Value::from_serialize(&vars)),
            ("labels", Value::from_serialize(&m.labels)),
            // Plain (not "safe") strings: JSON/YAML templates escape them, and iPXE lines
            // check them like any other value.
            ("base_url", Value::from(base_url.to_string())),
            ("assets_url", Value::from(format!("{base_url}/assets"))),
            ("config_url", Value::from(config_url)),
            (
                "phone_home_url",
                Value::from(format!("{base_url}/phone-home/{token}")),
            ),
            ("ssh_public_key", Value::from(self.ssh_public_key.clone())),
            ("ssh_authorized_keys", Value::from_serialize(&keys)),
        ])
    }

    /// Renders the whole install script for `m` (boot files + install.ipxe) with `token`.
    fn install_script(
        &self,
        cat: &Catalog,
        m: &Machine,
        profile: &str,
        base_url: &str,
        token: &str,
    ) -> Result<String> {
        let p = cat.profile(profile)?;
        let mut ctx = self.context(m, Some(p), base_url, token);
        let files = cat.render_boot_files(profile, &Value::from(ctx.clone()))?;
        let boot = BTreeMap::from([
            ("kernel", Value::from_safe_string(files.kernel)),
            (
                "initrds",
                Value::from(
                    files
                        .initrds
                        .into_iter()
                        .map(Value::from_safe_string)
                        .collect::<Vec<_>>(),
                ),
            ),
            ("cmdline", Value::from_safe_string(files.cmdline)),
        ]);
        ctx.insert("boot", Value::from(boot));
        Ok(cat.render_ipxe("install.ipxe", &Value::from(ctx))?)
    }

    fn local_script(
        &self,
        cat: &Catalog,
        mac: Mac,
        platform: policy::Platform,
        reason: &str,
        base_url: &str,
    ) -> Result<String> {
        let ctx = minijinja::context! {
            mac => mac.to_string(),
            platform => platform.as_str(),
            reason => reason,
            base_url => base_url,
        };
        Ok(cat.render_ipxe("local.ipxe", &ctx)?)
    }

    /// The static first script (`/boot.ipxe`).
    pub fn boot_ipxe(&self, base_url: &str) -> Result<String> {
        let ctx = minijinja::context! { base_url => base_url };
        Ok(self.catalog().render_ipxe("boot.ipxe", &ctx)?)
    }

    /// Answers `/ipxe` for one machine: records the sighting (an unknown MAC becomes
    /// `discovered`), decides, and returns the script; an install mints a new install token
    /// and moves the machine to `installing` only once the script has rendered.
    /// `Ok(None)` means "ignore this machine".
    pub async fn boot(
        &self,
        mac: Mac,
        req: BootRequest,
        sighting: Sighting,
        base_url: &str,
    ) -> Result<Option<String>> {
        let now = store::now_ms();
        let m = self.db(move |s| s.sighted(mac, &sighting, now)).await?;
        let facts = MachineFacts {
            state: m.state,
            profile: m.profile.as_deref(),
            installer_done: m.installer_done_at.is_some(),
        };
        let decision = policy::decide(Some(&facts), &req, self.settings.discover);
        let cat = self.catalog();
        match decision {
            BootDecision::Ignore => {
                self.note(
                    Some(mac),
                    "ipxe_ignored",
                    "discovery answer is ignore".into(),
                )
                .await;
                Ok(None)
            }
            BootDecision::LocalBoot { platform, reason } => {
                let word = reason.as_str();
                let script = self.local_script(&cat, mac, platform, word, base_url);
                match &script {
                    Ok(_) => {
                        self.note(
                            Some(mac),
                            "ipxe_served",
                            format!("local boot ({word}, {})", platform.as_str()),
                        )
                        .await
                    }
                    Err(e) => {
                        self.note(Some(mac), "render_failed", format!("local.ipxe: {e}"))
                            .await
                    }
                }
                script.map(Some)
            }
            BootDecision::Install { profile } => {
                let token = keys::random_token();
                let script = match self.install_script(&cat, &m, &profile, base_url, &token) {
                    Ok(s) => s,
                    Err(e) => {
                        self.note(
                            Some(mac),
                            "render_failed",
                            format!("install script for profile {profile}: {e}"),
                        )
                        .await;
                        return Err(e);
                    }
                };
                let hash = keys::token_hash(&token);
                let expires = now + self.settings.install_token_ttl.as_millis() as i64;
                self.db(move |s| s.start_install(mac, &hash, expires, now))
                    .await?;
                Ok(Some(script))
            }
        }
    }

    /// Serves a profile artifact to the installer holding a live install token.
    pub async fn config(
        &self,
        token: &str,
        artifact: &str,
        base_url: &str,
    ) -> Result<(ArtifactKind, String)> {
        let hash = keys::token_hash(token);
        let now = store::now_ms();
        let m = match self.db(move |s| s.machine_by_token(&hash, now)).await {
            Ok(m) => m,
            Err(Error::Store(StoreError::Token(problem, Some(mac)))) => {
                self.note(
                    Some(mac),
                    "config_refused",
                    format!("{artifact}: {problem}"),
                )
                .await;
                return Err(Error::Store(StoreError::Token(problem, Some(mac))));
            }
            Err(e) => return Err(e),
        };
        let cat = self.catalog();
        let profile = m.profile.clone().unwrap_or_default();
        let result = cat
            .profile(&profile)
            .map(|p| self.context(&m, Some(p), base_url, token))
            .and_then(|ctx| cat.render_artifact(&profile, artifact, &Value::from(ctx)));
        match &result {
            Ok((kind, body)) => {
                self.note(
                    Some(m.mac),
                    "config_served",
                    format!("{artifact} ({}, {} bytes)", kind.as_str(), body.len()),
                )
                .await;
                let last = cat
                    .profile(&profile)
                    .ok()
                    .and_then(|p| p.local_boot_after.clone());
                if last.as_deref() == Some(artifact) {
                    let (mac, now) = (m.mac, store::now_ms());
                    let detail = format!(
                        "installer fetched {artifact}; network boots go to the local disk until it phones home"
                    );
                    self.db(move |s| s.installer_done(mac, &detail, now))
                        .await?;
                }
            }
            Err(e @ RenderError::NoArtifact { .. }) => {
                self.note(Some(m.mac), "config_refused", e.to_string())
                    .await
            }
            Err(e) => {
                self.note(Some(m.mac), "render_failed", format!("{artifact}: {e}"))
                    .await
            }
        }
        Ok(result?)
    }

    /// Phone-home: pins the posted SSH host keys and moves the machine to `installed`,
    /// burning its token. `key_lines` are OpenSSH public key lines; each must parse.
    pub async fn phone_home(
        &self,
        token: &str,
        key_lines: Vec<String>,
        from: Option<std::net::IpAddr>,
    ) -> Result<Machine> {
        let mut keys = Vec::new();
        for line in key_lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
            let k = ssh_key::PublicKey::from_openssh(line).map_err(|e| {
                Error::Invalid(format!(
                    "phone-home: {:?} is not an OpenSSH public key: {e}",
                    truncate(line, 60)
                ))
            })?;
            let alg = k.algorithm().as_str().to_string();
            let mut k = k;
            k.set_comment("");
            let text = k.to_openssh().map_err(|e| Error::Invalid(e.to_string()))?;
            keys.push((alg, text));
        }
        if keys.is_empty() {
            return Err(Error::Invalid(
                "phone-home carried no SSH host public key: post the lines of /etc/ssh/ssh_host_*_key.pub (text/plain) or cloud-init's pub_key_* form fields".into(),
            ));
        }
        let algs: Vec<_> = keys.iter().map(|(a, _)| a.clone()).collect();
        let detail = format!("{} SSH host key(s) pinned: {}", keys.len(), algs.join(", "));
        let hash = keys::token_hash(token);
        let now = store::now_ms();
        let ip = from.map(|ip| ip.to_canonical().to_string());
        let result = self
            .db(move |s| s.phone_home(&hash, &keys, ip.as_deref(), &detail, now))
            .await;
        if let Ok(m) = &result {
            if self.role_name(m).is_some() {
                // Registration starts now; the installer's HTTP request does not wait for it.
                if let Err(e) = self.register(m.mac).await {
                    tracing::warn!(mac = %m.mac, "registration not started: {e}");
                }
                return self.machine(m.mac).await;
            }
        }
        match result {
            Err(Error::Store(StoreError::Token(problem, Some(mac)))) => {
                self.note(Some(mac), "phone_home_refused", problem.to_string())
                    .await;
                Err(Error::Store(StoreError::Token(problem, Some(mac))))
            }
            other => other,
        }
    }

    fn check_renders(&self, m: &Machine) -> Result<()> {
        let cat = self.catalog();
        let profile = m.profile.clone().unwrap_or_default();
        let p = cat.profile(&profile)?;
        let ctx = self.context(m, Some(p), "http://provision.invalid", REDACTED_TOKEN);
        self.install_script(
            &cat,
            m,
            &profile,
            "http://provision.invalid",
            REDACTED_TOKEN,
        )?;
        for a in p.artifacts.keys() {
            cat.render_artifact(&profile, a, &Value::from(ctx.clone()))?;
        }
        Ok(())
    }

    /// Enrolls a machine after validating every field and proving that every artifact of
    /// its profile renders with its data; a value that cannot be placed safely is refused
    /// here, at the API, rather than at boot.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<Machine> {
        let mac: Mac = req
            .mac
            .parse()
            .map_err(|e: crate::mac::MacError| Error::Invalid(e.to_string()))?;
        validate::profile_name(&req.profile)?;
        self.catalog().profile(&req.profile)?;
        if let Some(h) = &req.hostname {
            validate::hostname(h)?;
        }
        if let Some(u) = &req.uuid {
            validate::uuid(u)?;
        }
        if let Some(s) = &req.serial {
            validate::text("serial", s)?;
        }
        validate::vars(&req.vars)?;
        check_ip_var(&req.vars)?;
        validate::vars(&req.labels)?;
        let new = NewMachine {
            mac: Some(mac),
            profile: req.profile,
            hostname: req.hostname,
            uuid: req.uuid.map(|u| u.to_lowercase()),
            serial: req.serial,
            vars: req.vars,
            labels: req.labels,
        };
        let probe = Machine {
            mac,
            uuid: new.uuid.clone(),
            serial: new.serial.clone(),
            hostname: new.hostname.clone(),
            profile: Some(new.profile.clone()),
            state: State::Enrolled,
            vars: new.vars.clone(),
            labels: new.labels.clone(),
            generation: 0,
            arch: None,
            platform: None,
            last_ip: None,
            failed_step: None,
            failed_reason: None,
            host_keys: vec![],
            register_steps: vec![],
            cert_fingerprint: None,
            created_at: 0,
            updated_at: 0,
            installer_done_at: None,
        };
        self.check_renders(&probe)?;
        self.check_ip_unique(mac, &new.vars).await?;
        let now = store::now_ms();
        self.db(move |s| s.enroll(&new, now)).await
    }

    /// Changes a machine's profile, hostname, vars or labels, with the same checks as enroll.
    pub async fn update(&self, mac: Mac, req: UpdateRequest) -> Result<Machine> {
        let current = self.machine(mac).await?;
        let mut patch = MachinePatch::default();
        if let Some(p) = req.profile {
            validate::profile_name(&p)?;
            self.catalog().profile(&p)?;
            patch.profile = Some(p);
        }
        if let Some(h) = req.hostname {
            if h.is_empty() {
                patch.hostname = Some(None);
            } else {
                validate::hostname(&h)?;
                patch.hostname = Some(Some(h));
            }
        }
        let mut vars = req.vars.unwrap_or_else(|| current.vars.clone());
        vars.extend(req.set_vars.unwrap_or_default());
        for k in req.unset_vars.unwrap_or_default() {
            vars.remove(&k);
        }
        validate::vars(&vars)?;
        check_ip_var(&vars)?;
        if vars != current.vars {
            patch.vars = Some(vars);
        }
        if let Some(l) = req.labels {
            validate::vars(&l)?;
            patch.labels = Some(l);
        }
        let mut probe = current.clone();
        if let Some(l) = &patch.labels {
            probe.labels = l.clone();
        }
        if let Some(p) = &patch.profile {
            probe.profile = Some(p.clone());
        }
        if let Some(h) = &patch.hostname {
            probe.hostname = h.clone();
        }
        if let Some(v) = &patch.vars {
            probe.vars = v.clone();
        }
        if probe.profile.is_some() {
            self.check_renders(&probe)?;
        }
        self.check_ip_unique(mac, &probe.vars).await?;
        let now = store::now_ms();
        self.db(move |s| s.update(mac, &patch, now)).await
    }

    /// A DHCP reservation (`ip` variable) belongs to one machine only.
    async fn check_ip_unique(&self, mac: Mac, vars: &BTreeMap<String, String>) -> Result<()> {
        let Some(ip) = vars.get("ip") else {
            return Ok(());
        };
        let ip: std::net::Ipv4Addr = ip
            .parse()
            .map_err(|_| Error::Invalid(format!("variable ip {ip:?} must be an IPv4 address")))?;
        if let Some((holder, _)) = self
            .db(|s| s.reservations())
            .await?
            .into_iter()
            .find(|(m, r)| *m != mac && *r == ip)
        {
            return Err(Error::Invalid(format!(
                "variable ip {ip} is already reserved for machine {holder}"
            )));
        }
        Ok(())
    }

    /// One machine, or NotFound.
    pub async fn machine(&self, mac: Mac) -> Result<Machine> {
        self.db(move |s| s.machine(mac)?.ok_or(StoreError::NotFound(mac)))
            .await
    }

    /// All machines, optionally in one state.
    pub async fn machines(&self, state: Option<State>) -> Result<Vec<Machine>> {
        self.db(move |s| s.machines(state)).await
    }

    /// Deletes a machine (its events stay).
    pub async fn delete(&self, mac: Mac) -> Result<()> {
        let now = store::now_ms();
        self.db(move |s| s.delete(mac, now)).await
    }

    /// Reprovision: back to `enrolled` with a new generation; the next boot reinstalls.
    pub async fn reprovision(&self, mac: Mac) -> Result<Machine> {
        let now = store::now_ms();
        self.db(move |s| s.reprovision(mac, now)).await
    }

    /// Events, oldest first.
    pub async fn events(&self, mac: Option<Mac>, after: i64, limit: i64) -> Result<Vec<Event>> {
        self.db(move |s| s.events(mac, after, limit)).await
    }

    /// Renders what a machine would be served now, with the install token redacted and
    /// nothing recorded. `artifact` is `ipxe` (its `/ipxe` script) or a profile artifact.
    pub async fn preview(
        &self,
        mac: Mac,
        artifact: &str,
        base_url: &str,
    ) -> Result<(ArtifactKind, String)> {
        let m = self.machine(mac).await?;
        let cat = self.catalog();
        if artifact == "ipxe" {
            let facts = MachineFacts {
                state: m.state,
                profile: m.profile.as_deref(),
                installer_done: m.installer_done_at.is_some(),
            };
            let platform = policy::Platform::from_ipxe(m.platform.as_deref().unwrap_or(""));
            let req = BootRequest {
                platform,
                arch: m.arch.clone(),
            };
            let body = match policy::decide(Some(&facts), &req, self.settings.discover) {
                BootDecision::Install { profile } => {
                    self.install_script(&cat, &m, &profile, base_url, REDACTED_TOKEN)?
                }
                BootDecision::LocalBoot { platform, reason } => {
                    self.local_script(&cat, mac, platform, reason.as_str(), base_url)?
                }
                BootDecision::Ignore => IGNORE_SCRIPT.to_string(),
            };
            return Ok((ArtifactKind::Ipxe, body));
        }
        let Some(profile) = m.profile.clone() else {
            return Err(Error::Invalid(format!(
                "machine {mac} has no profile; enroll it first"
            )));
        };
        let p = cat.profile(&profile)?;
        let ctx = self.context(&m, Some(p), base_url, REDACTED_TOKEN);
        Ok(cat.render_artifact(&profile, artifact, &Value::from(ctx))?)
    }

    /// Remembers that `mac` uses (or is taking) `ip`, from DHCP.
    pub fn client_ip(&self, ip: std::net::Ipv4Addr, mac: Mac) {
        let mut map = self.client_ips.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= 65_536 {
            map.clear();
        }
        map.insert(ip, mac);
    }

    fn mac_of_ip(&self, ip: std::net::IpAddr) -> Option<Mac> {
        let seen = match ip {
            std::net::IpAddr::V4(v4) => self
                .client_ips
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&v4)
                .copied(),
            _ => None,
        };
        seen.or_else(|| crate::neighbors::mac_of(ip))
    }

    /// Asks policy whether a DHCP boot client gets an answer: the request is recorded (an
    /// unknown MAC becomes `discovered`), and "ignore" means no reply at all.
    pub async fn dhcp_answer(&self, mac: Mac, uuid: Option<String>, what: &str) -> bool {
        let now = store::now_ms();
        let sighting = Sighting {
            uuid,
            ..Default::default()
        };
        let m = match self.db(move |s| s.sighted(mac, &sighting, now)).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(%mac, "recording a DHCP request failed: {e}");
                return false;
            }
        };
        let facts = MachineFacts {
            state: m.state,
            profile: m.profile.as_deref(),
            installer_done: m.installer_done_at.is_some(),
        };
        // The platform does not matter here: only "answer or not" is decided at DHCP time;
        // what to boot is decided again when iPXE asks /ipxe.
        let req = BootRequest {
            platform: policy::Platform::Pcbios,
            arch: None,
        };
        if policy::decide(Some(&facts), &req, self.settings.discover) == BootDecision::Ignore {
            self.note(
                Some(mac),
                "dhcp_ignored",
                format!("{what}: discovery answer is ignore"),
            )
            .await;
            return false;
        }
        true
    }

    /// The address reserved for `mac` (its `ip` variable) and the addresses reserved for
    /// every other machine.
    async fn reservations(
        &self,
        mac: Mac,
    ) -> (
        Option<std::net::Ipv4Addr>,
        std::collections::HashSet<std::net::Ipv4Addr>,
    ) {
        let all = self.db(|s| s.reservations()).await.unwrap_or_else(|e| {
            tracing::error!("reading DHCP reservations: {e}");
            Vec::new()
        });
        let mut mine = None;
        let mut others = std::collections::HashSet::new();
        for (m, ip) in all {
            if m == mac {
                mine = Some(ip);
            } else {
                others.insert(ip);
            }
        }
        (mine, others)
    }

    async fn pool(
        &self,
        mac: Mac,
        a: &crate::dhcp::AddressMode,
    ) -> (Option<std::net::Ipv4Addr>, store::Pool) {
        let (mine, others) = self.reservations(mac).await;
        (
            mine,
            store::Pool {
                start: a.start,
                end: a.end,
                reserved_for_others: others,
            },
        )
    }

    /// Address mode: the address to offer `mac`, held briefly until its REQUEST.
    pub async fn lease_offer(
        &self,
        mac: Mac,
        requested: Option<std::net::Ipv4Addr>,
        a: &crate::dhcp::AddressMode,
    ) -> Option<std::net::Ipv4Addr> {
        let (mine, pool) = self.pool(mac, a).await;
        let now = store::now_ms();
        // RFC 2131 section 4.3.1: the server may reserve the offered address; a minute is
        // plenty for the REQUEST that follows.
        let hold = now + 60_000;
        match self
            .db(move |s| s.lease_offer(mac, mine, requested, &pool, hold, now))
            .await
        {
            Ok(Some(ip)) => Some(ip),
            Ok(None) => {
                self.note(
                    Some(mac),
                    "dhcp_pool_exhausted",
                    format!("no free address in {}-{}", a.start, a.end),
                )
                .await;
                None
            }
            Err(e) => {
                tracing::error!(%mac, "lease offer: {e}");
                None
            }
        }
    }

    /// Address mode: binds `ip` to `mac` on REQUEST; false means NAK.
    pub async fn lease_bind(
        &self,
        mac: Mac,
        ip: std::net::Ipv4Addr,
        a: &crate::dhcp::AddressMode,
    ) -> bool {
        let (mine, pool) = self.pool(mac, a).await;
        let now = store::now_ms();
        let until = now + a.lease_time.as_millis() as i64;
        match self
            .db(move |s| s.lease_bind(mac, ip, &pool, mine, until, now))
            .await
        {
            Ok(true) => {
                self.note(
                    Some(mac),
                    "dhcp_lease",
                    format!("{ip} until {}", store::fmt_time(until)),
                )
                .await;
                true
            }
            Ok(false) => {
                self.note(
                    Some(mac),
                    "dhcp_nak",
                    format!("{ip} is not this machine's to use"),
                )
                .await;
                false
            }
            Err(e) => {
                tracing::error!(%mac, "lease bind: {e}");
                false
            }
        }
    }

    /// Address mode: a RELEASE (or a client that chose another server, `ip` None).
    pub async fn lease_release(&self, mac: Mac, ip: Option<std::net::Ipv4Addr>) {
        if let Err(e) = self.db(move |s| s.lease_release(mac, ip)).await {
            tracing::error!(%mac, "lease release: {e}");
        }
    }

    /// Address mode: a DECLINE quarantines the address for ten minutes.
    pub async fn lease_decline(&self, mac: Mac, ip: std::net::Ipv4Addr) {
        let now = store::now_ms();
        match self
            .db(move |s| s.lease_decline(mac, ip, now + 600_000, now))
            .await
        {
            Ok(true) => {
                self.note(
                    Some(mac),
                    "dhcp_decline",
                    format!("{ip} is in use by someone else; quarantined for 10 minutes"),
                )
                .await
            }
            Ok(false) => {
                tracing::warn!(%mac, %ip, "ignored a DHCPDECLINE for an address this MAC does not hold")
            }
            Err(e) => tracing::error!(%mac, "lease decline: {e}"),
        }
    }

    /// Records a DHCP event on a machine.
    pub async fn dhcp_event(&self, mac: Mac, kind: &'static str, detail: String) {
        self.note(Some(mac), kind, detail).await;
    }

    /// Records an iPXE binary served over HTTP (UEFI HTTP Boot) on the machine behind `ip`.
    pub async fn record_http_boot(&self, ip: std::net::IpAddr, file: &str, bytes: usize) {
        let mac = self.mac_of_ip(ip);
        self.note(
            mac,
            "http_boot_served",
            format!("{file} ({bytes} bytes) to {ip}"),
        )
        .await;
    }

    /// Records a TFTP transfer as an event on the machine behind the client's IP address
    /// (seen in DHCP, or the kernel's neighbour table), or as an unattributed event.
    pub async fn record_tftp(&self, t: crate::tftp::Transfer) {
        let mac = self.mac_of_ip(t.peer.ip());
        let (kind, detail) = match &t.outcome {
            Ok(()) => (
                "tftp_served",
                format!("{} ({} bytes) to {}", t.file, t.size, t.peer.ip()),
            ),
            Err(why) => (
                "tftp_failed",
                format!("{} to {}: {why}", t.file, t.peer.ip()),
            ),
        };
        match &t.outcome {
            Ok(()) => {
                tracing::info!(?mac, peer = %t.peer, file = %t.file, bytes = t.size, "TFTP served")
            }
            Err(why) => tracing::warn!(?mac, peer = %t.peer, file = %t.file, "TFTP failed: {why}"),
        }
        self.note(mac, kind, detail).await;
    }

    /// Connects the registrar's queue (once, at daemon start).
    pub fn set_register_queue(&self, tx: tokio::sync::mpsc::UnboundedSender<Mac>) {
        let _ = self.register_queue.set(tx);
    }

    /// The role `m`'s profile registers with, or `None` for role `none` (or no profile).
    fn role_name(&self, m: &Machine) -> Option<String> {
        let cat = self.catalog();
        let p = cat.profile(m.profile.as_deref()?).ok()?;
        (p.role != crate::render::NO_ROLE).then(|| p.role.clone())
    }

    /// Starts a fresh registration run (phone-home, or `provision register`): refuses a
    /// machine without a role or without pinned host keys, moves it to `registering`, and
    /// queues it for the registrar.
    pub async fn register(&self, mac: Mac) -> Result<Machine> {
        let m = self.machine(mac).await?;
        let profile = m.profile.clone().unwrap_or_default();
        if self.role_name(&m).is_none() {
            return Err(Error::Conflict(format!(
                "{mac} uses profile {profile:?}, whose role is none: there is nothing to register; set `role` in the profile"
            )));
        }
        if m.host_keys.is_empty() {
            return Err(Error::Conflict(format!(
                "{mac} has no pinned SSH host key (state {}): it registers after its installed OS phones home",
                m.state
            )));
        }
        let Some(queue) = self.register_queue.get() else {
            return Err(Error::Internal("the registrar is not running".into()));
        };
        let m = self
            .db(move |s| s.start_registration(mac, "registration queued", store::now_ms()))
            .await?;
        let _ = queue.send(mac);
        Ok(m)
    }

    /// At daemon start: re-queues runs a stop or crash interrupted (they resume at their
    /// first unfinished step) and starts the ones phone-home could not queue.
    pub async fn resume_registrations(&self) -> Result<usize> {
        let mut n = 0;
        for m in self.machines(Some(State::Registering)).await? {
            if let Some(q) = self.register_queue.get() {
                let _ = q.send(m.mac);
                n += 1;
            }
        }
        for m in self.machines(Some(State::Installed)).await? {
            if self.role_name(&m).is_some() && self.register(m.mac).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The context role steps and hand-off hooks render with: the machine's template
    /// context (without install URLs: the token is burnt) plus `role`.
    pub fn registration_context(&self, m: &Machine, role: &str) -> BTreeMap<&'static str, Value> {
        let cat = self.catalog();
        let profile = m.profile.as_deref().and_then(|p| cat.profile(p).ok());
        let mut ctx = self.context(m, profile, "", REDACTED_TOKEN);
        for k in ["base_url", "assets_url", "config_url", "phone_home_url"] {
            ctx.remove(k);
        }
        ctx.insert("role", Value::from(role.to_string()));
        ctx.insert(
            "ssh_host",
            Value::from(m.last_ip.clone().unwrap_or_default()),
        );
        ctx
    }

    /// Profile name → role name, for inventories.
    pub fn roles_by_profile(&self) -> BTreeMap<String, String> {
        self.catalog()
            .profiles()
            .iter()
            .map(|(n, p)| (n.clone(), p.role.clone()))
            .collect()
    }

    /// Moves a machine through `t` (registrar outcomes).
    pub async fn transition(
        &self,
        mac: Mac,
        t: policy::Transition,
        detail: String,
    ) -> Result<Machine> {
        self.db(move |s| s.transition(mac, t, &detail, store::now_ms()))
            .await
    }

    /// Records an event that is not a state change (registrar retries).
    pub async fn note_event(&self, mac: Mac, kind: &'static str, detail: String) {
        self.note(Some(mac), kind, detail).await
    }

    /// Records a finished registration step with its event.
    pub async fn record_step(
        &self,
        mac: Mac,
        step: store::StepRecord,
        detail: String,
    ) -> Result<()> {
        self.db(move |s| s.record_step(mac, &step, &detail)).await
    }

    /// The node certificate signed for `mac`: (PEM, fingerprint).
    pub async fn node_cert(&self, mac: Mac) -> Result<Option<(String, String)>> {
        self.db(move |s| s.node_cert(mac)).await
    }

    /// Keeps a node certificate signed for `mac`.
    pub async fn save_node_cert(&self, mac: Mac, c: crate::pki::Signed) -> Result<()> {
        self.db(move |s| {
            s.save_node_cert(
                mac,
                &c.cert_pem,
                &c.fingerprint,
                &c.subject,
                store::now_ms(),
            )
        })
        .await
    }

    /// Fails machines whose install token expired before they phoned home.
    pub async fn expire_installs(&self) -> Result<Vec<Mac>> {
        let now = store::now_ms();
        self.db(move |s| s.expire_installs(now)).await
    }
}

/// The `ip` variable is the machine's DHCP reservation in address mode: it must be an IPv4
/// address.
fn check_ip_var(vars: &BTreeMap<String, String>) -> Result<()> {
    if let Some(ip) = vars.get("ip") {
        ip.parse::<std::net::Ipv4Addr>().map_err(|_| {
            Error::Invalid(format!(
                "variable ip {ip:?} must be an IPv4 address (it is the machine's DHCP reservation)"
            ))
        })?;
    }
    Ok(())
}

/// The first `n` characters of `s` (and an ellipsis if there were more), for messages that
/// quote input.
pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

#[cfg(test)]
impl Provisioner {
    /// The SSH public key test provisioners render into installs.
    pub(crate) const TEST_KEY: &'static str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 provision";

    /// A provisioner on an in-memory store with the built-in profiles, for tests.
    pub(crate) fn for_tests(discover: DiscoverAnswer) -> Provisioner {
        let settings = Settings {
            install_token_ttl: Duration::from_secs(3600),
            discover,
        };
        let store = Store::open_in_memory().expect("an in-memory store");
        Provisioner::new(store, Sources::default(), settings, Self::TEST_KEY.into())
            .expect("the built-in profiles load")
    }
}

#[cfg(test)]
#[path = "provisioner_tests.rs"]
mod tests;
