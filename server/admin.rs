//! The admin service: what operators ask, through the REST API (and so the CLI and, later,
//! the web UI). Every input is validated here and every profile artifact is trial-rendered
//! with the machine's data before anything is written, so a value no output can hold is
//! refused at the API rather than at boot.
//!
//! Reads first flush the observation queue, so what an operator sees includes what the
//! machines just did.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::declare::{self, Format, Parsed, Problem};
use crate::dto::{EnrollRequest, UpdateRequest};
use crate::error::{at, Error, Result};
use crate::mac::Mac;
use crate::policy::{
    self, BootDecision, BootRequest, DiscoverAnswer, GroupSet, MachineFacts, State,
};
use crate::registrar;
use crate::render::{ArtifactKind, Catalog, Renderer, NO_ROLE, REDACTED_TOKEN};
use crate::store::plan::{self, Desired};
use crate::store::{
    self, ApplyRun, Event, EventQuery, Inventory, Machine, MachinePage, MachinePatch, MachineQuery,
    MachineSearch, NewMachine, SearchTerm, Stats, StoreError, TokenInfo,
};
use crate::validate;

/// The operator-facing service.
pub struct AdminService {
    inv: Arc<dyn Inventory>,
    renderer: Arc<Renderer>,
    discover: DiscoverAnswer,
    registrar: registrar::Handle,
}

/// The `ip` variable is the machine's DHCP reservation in address mode: it must be an IPv4
/// address.
fn check_ip_var(vars: &BTreeMap<String, String>) -> Result<Option<Ipv4Addr>> {
    vars.get("ip")
        .map(|ip| {
            ip.parse::<Ipv4Addr>().map_err(|_| {
                Error::Invalid(format!(
                    "variable ip {ip:?} must be an IPv4 address (it is the machine's DHCP reservation)"
                ))
            })
        })
        .transpose()
}

/// An enroll request checked as the API checks it, with no inventory but the `groups`: every
/// value validated, the profile (its own, or the one its groups give it) known, and every
/// artifact of it trial-rendered with the machine's data (also the fuzz target for the API's
/// bodies and template rendering).
pub fn checked_enrollment(
    renderer: &Renderer,
    groups: &GroupSet,
    req: EnrollRequest,
) -> Result<NewMachine> {
    let new = checked_machine(renderer, req)?;
    let probe = probe(&new).resolve(groups);
    if probe.profile.is_none() {
        return Err(StoreError::NoProfile(new.mac).into());
    }
    renderer.check_renders(&probe).map_err(at("profile"))?;
    Ok(new)
}

/// Checks each value of `map` with `check`, naming the one refused (`vars.ip`).
fn each_value(
    prefix: &str,
    map: &BTreeMap<String, String>,
    check: impl Fn(&BTreeMap<String, String>) -> Result<(), validate::Invalid>,
) -> Result<()> {
    for (k, v) in map {
        check(&BTreeMap::from([(k.clone(), v.clone())])).map_err(at(format!("{prefix}.{k}")))?;
    }
    Ok(())
}

/// An enroll request's values validated and normalised, each error naming its field; no
/// trial render.
pub fn checked_machine(renderer: &Renderer, req: EnrollRequest) -> Result<NewMachine> {
    let mac: Mac = req
        .mac
        .parse()
        .map_err(|e: crate::mac::MacError| Error::Invalid(e.to_string()))
        .map_err(at("mac"))?;
    if let Some(p) = &req.profile {
        validate::profile_name(p).map_err(at("profile"))?;
        renderer.catalog().profile(p).map_err(at("profile"))?;
    }
    if let Some(h) = &req.hostname {
        validate::hostname(h).map_err(at("hostname"))?;
    }
    if let Some(u) = &req.uuid {
        validate::uuid(u).map_err(at("uuid"))?;
    }
    if let Some(s) = &req.serial {
        validate::text("serial", s).map_err(at("serial"))?;
    }
    each_value("vars", &req.vars, validate::vars)?;
    check_ip_var(&req.vars).map_err(at("vars.ip"))?;
    each_value("labels", &req.labels, validate::labels)?;
    Ok(NewMachine {
        mac,
        profile: req.profile,
        hostname: req.hostname,
        uuid: req.uuid.map(|u| u.to_lowercase()),
        serial: req.serial,
        vars: req.vars,
        labels: req.labels,
    })
}

/// When dropped, returns the heap freed since to the system. Applying or exporting 10,000
/// machines holds some 60-80 MB for a second or two (the file, its line index, the stored
/// machines, the plan; measured with heaptrack); glibc keeps freed memory in its arenas, so
/// without this the daemon would stay that size until it restarts.
struct GiveBackMemory;

impl Drop for GiveBackMemory {
    fn drop(&mut self) {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// At most this many problems of an inventory file are reported at once.
pub const MAX_PROBLEMS: usize = 50;

/// Refuses with every problem, one per line.
fn refuse(problems: Vec<Problem>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let mut lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    if lines.len() >= MAX_PROBLEMS {
        lines.push(format!("(stopped after {MAX_PROBLEMS} problems)"));
    }
    Err(Error::Invalid(lines.join("\n")))
}

/// An entry's name given twice in one file: the second is refused, naming the first's line.
fn once(
    parsed: &Parsed,
    first: &mut HashMap<String, String>,
    name: String,
    path: &str,
    kind: &str,
) -> Option<Error> {
    match first.get(&name) {
        Some(there) => Some(Error::Invalid(format!(
            "{kind} {name} is declared twice{}",
            parsed
                .line(there)
                .map(|l| format!(" (first at line {l})"))
                .unwrap_or_default()
        ))),
        None => {
            first.insert(name, path.to_string());
            None
        }
    }
}

/// A store's refusal of an apply, at the line of the machine it names, if it names one.
fn at_machine(parsed: &Parsed, desired: &Desired, e: StoreError) -> Error {
    let mac = match &e {
        StoreError::NoProfile(mac) | StoreError::AlreadyEnrolled(mac, _) => *mac,
        _ => return e.into(),
    };
    match desired.machines.iter().flatten().position(|m| m.mac == mac) {
        Some(i) => Error::Invalid(
            parsed
                .problem(format!("machines[{i}].profile"), e.to_string())
                .to_string(),
        ),
        None => e.into(),
    }
}

/// The machine `new` would be once enrolled (its own values: resolve it against the groups
/// for what it gets from them), for trial renders.
pub fn probe(new: &NewMachine) -> Machine {
    Machine {
        mac: new.mac,
        uuid: new.uuid.clone(),
        serial: new.serial.clone(),
        hostname: new.hostname.clone(),
        profile: new.profile.clone(),
        state: State::Enrolled,
        vars: new.vars.clone(),
        labels: new.labels.clone(),
        inherited: Default::default(),
        generation: 0,
        arch: None,
        platform: None,
        last_ip: None,
        boot_ip: None,
        last_seen: None,
        failure: None,
        host_keys: vec![],
        register_steps: vec![],
        cert_fingerprint: None,
        created_at: 0,
        updated_at: 0,
        state_at: 0,
        installer_done_at: None,
        dhcp: Default::default(),
        proposed_rule: None,
    }
}

/// What a search box's text asks for: a whole MAC in any notation, an address, a label
/// (`key=value`, or `key=` for any value), or else text matched against hostnames, profiles
/// and label values (and, if it could be part of a MAC, MACs). Empty: everything.
pub fn search_term(q: &str) -> Result<Option<SearchTerm>> {
    let q = q.trim();
    if q.is_empty() {
        return Ok(None);
    }
    if q.len() > 256 {
        return Err(Error::Invalid(
            "a search term is at most 256 characters".into(),
        ));
    }
    if let Ok(mac) = q.parse::<Mac>() {
        return Ok(Some(SearchTerm::Mac(mac)));
    }
    if let Ok(ip) = q.parse::<std::net::IpAddr>() {
        return Ok(Some(SearchTerm::Ip(ip.to_string())));
    }
    if let Some((k, v)) = q.split_once('=') {
        let (k, v) = (k.trim(), v.trim());
        validate::vars(&[(k.to_string(), v.to_string())].into())
            .map_err(|e| Error::Invalid(format!("label search {q:?}: {}", e.0)))?;
        return Ok(Some(SearchTerm::Label(
            k.into(),
            (!v.is_empty()).then(|| v.into()),
        )));
    }
    let hex: String = q
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect::<String>()
        .to_ascii_lowercase();
    let mac_hex =
        (!hex.is_empty() && hex.len() <= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(hex);
    Ok(Some(SearchTerm::Text {
        text: q.into(),
        mac_hex,
    }))
}

/// A hostname from a bulk enroll's pattern: `{n}` is the machine's place in the selection
/// (from 1), `{mac}` its 12 hex digits. The result is validated as any hostname is.
pub fn hostname_from_pattern(pattern: &str, n: usize, mac: Mac) -> Result<Option<String>> {
    let pattern = pattern.trim();
    if pattern.is_empty() {
        return Ok(None);
    }
    let name = pattern
        .replace("{n}", &n.to_string())
        .replace("{mac}", &mac.to_string().replace(':', ""));
    validate::hostname(&name).map_err(|e| {
        Error::Invalid(format!(
            "hostname pattern {pattern:?} gives {name:?}: {}",
            e.0
        ))
    })?;
    Ok(Some(name))
}

/// The state of a machine's install token, in words: `live`, `expired`, `burnt`, or `stale`
/// (minted for an earlier install generation).
pub fn token_state(t: &TokenInfo, generation: i64, now: i64) -> &'static str {
    if t.burnt_at.is_some() {
        "burnt"
    } else if t.generation != generation {
        "stale"
    } else if t.expires_at <= now {
        "expired"
    } else {
        "live"
    }
}

impl AdminService {
    /// The service over `inv`.
    pub fn new(
        inv: Arc<dyn Inventory>,
        renderer: Arc<Renderer>,
        discover: DiscoverAnswer,
        registrar: registrar::Handle,
    ) -> AdminService {
        AdminService {
            inv,
            renderer,
            discover,
            registrar,
        }
    }

    /// Node certificates revoked and not yet expired.
    pub async fn revoked_certs(&self) -> Result<Vec<crate::store::RevokedCert>> {
        Ok(self.inv.revoked_certs().await?)
    }

    /// The current profiles and templates.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.renderer.catalog()
    }

    /// Reloads profiles and templates; on error the old ones stay. Returns the profile count.
    pub fn reload(&self) -> Result<usize> {
        Ok(self.renderer.reload()?)
    }

    /// Enrolls a machine after validating every field and proving that every artifact of its
    /// profile renders with its data.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<Machine> {
        let new = checked_enrollment(&self.renderer, &self.inv.groups(), req)?;
        let mac = new.mac;
        self.check_ip_unique(mac, &new.vars).await?;
        Ok(self.inv.enroll(new, store::now_ms()).await?)
    }

    /// Changes a machine's profile, hostname, vars or labels, with the same checks as enroll.
    pub async fn update(&self, mac: Mac, req: UpdateRequest) -> Result<Machine> {
        let current = self.machine(mac).await?;
        let mut patch = MachinePatch::default();
        if let Some(p) = req.profile {
            validate::profile_name(&p)?;
            self.catalog().profile(&p)?;
            patch.profile = Some(Some(p));
        }
        if let Some(h) = req.hostname {
            if h.is_empty() {
                patch.hostname = Some(None);
            } else {
                validate::hostname(&h)?;
                patch.hostname = Some(Some(h));
            }
        }
        // The machine's own values change; what its groups give is added again after.
        let own_vars = current.own_vars();
        let mut vars = req.vars.unwrap_or_else(|| own_vars.clone());
        vars.extend(req.set_vars.unwrap_or_default());
        for k in req.unset_vars.unwrap_or_default() {
            vars.remove(&k);
        }
        validate::vars(&vars)?;
        check_ip_var(&vars)?;
        if vars != own_vars {
            patch.vars = Some(vars);
        }
        if let Some(l) = req.labels {
            validate::labels(&l)?;
            patch.labels = Some(l);
        }
        let mut probe = Machine {
            profile: current.own_profile().map(str::to_string),
            vars: own_vars,
            labels: current.own_labels(),
            inherited: Default::default(),
            ..current
        };
        if let Some(l) = &patch.labels {
            probe.labels = l.clone();
        }
        if let Some(p) = &patch.profile {
            probe.profile = p.clone();
        }
        if let Some(h) = &patch.hostname {
            probe.hostname = h.clone();
        }
        if let Some(v) = &patch.vars {
            probe.vars = v.clone();
        }
        let probe = probe.resolve(&self.inv.groups());
        if probe.profile.is_some() {
            self.renderer.check_renders(&probe)?;
        } else if probe.state != State::Discovered {
            // Its labels or hostname chose its groups, and with them its profile.
            return Err(Error::Invalid(format!(
                "after this change machine {mac} would have no profile (no profile of its own, and no group that selects it gives one); set one with --profile"
            )));
        }
        self.check_ip_unique(mac, &probe.vars).await?;
        Ok(self.inv.update(mac, patch, store::now_ms()).await?)
    }

    /// A DHCP reservation (`ip` variable) belongs to one machine only.
    async fn check_ip_unique(&self, mac: Mac, vars: &BTreeMap<String, String>) -> Result<()> {
        let Some(ip) = check_ip_var(vars)? else {
            return Ok(());
        };
        if let Some((holder, _)) = self
            .inv
            .reservations()
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

    /// Every group, by name.
    pub fn groups(&self) -> Vec<crate::policy::Group> {
        self.inv.groups().groups().to_vec()
    }

    /// The group called `name`.
    pub fn group(&self, name: &str) -> Result<crate::policy::Group> {
        self.inv
            .groups()
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NoGroup(name.to_string()).into())
    }

    /// Creates a group (`replace`: or replaces the one of its name) after validating every
    /// value and trial-rendering its profile with its values; returns whether it was created.
    pub async fn put_group(&self, g: crate::dto::Group, replace: bool) -> Result<bool> {
        let group = self.checked_group(g)?;
        Ok(self.inv.put_group(group, replace, store::now_ms()).await?)
    }

    /// Deletes a group.
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        Ok(self
            .inv
            .delete_group(name.to_string(), store::now_ms())
            .await?)
    }

    /// A group as the API gave it, validated and normalised (selector MACs and UUIDs in the
    /// inventory's form), its profile known and rendered with its values for a machine it
    /// selects.
    pub fn checked_group(&self, g: crate::dto::Group) -> Result<crate::policy::Group> {
        validate::group_name(&g.name).map_err(at("name"))?;
        let selector = validate::selector(&g.selector).map_err(at("selector"))?;
        if let Some(p) = &g.profile {
            validate::profile_name(p).map_err(at("profile"))?;
            self.catalog().profile(p).map_err(at("profile"))?;
        }
        each_value("vars", &g.vars, validate::group_vars)?;
        each_value("labels", &g.labels, validate::labels)?;
        let group = crate::policy::Group {
            name: g.name,
            selector,
            profile: g.profile,
            vars: g.vars,
            labels: g.labels,
        };
        if group.profile.is_some() {
            let given = |k: &str| group.selector.get(k).cloned();
            let mac = given("mac")
                .and_then(|m| m.parse().ok())
                .unwrap_or(Mac([0x52, 0x54, 0, 0, 0, 1]));
            let probe = probe(&NewMachine {
                mac,
                profile: group.profile.clone(),
                hostname: given("hostname"),
                uuid: given("uuid"),
                serial: given("serial"),
                vars: group.vars.clone(),
                labels: group.labels.clone(),
            });
            self.renderer
                .check_renders(&probe)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "group {}: profile {} does not render with the group's values: {e}",
                        group.name,
                        group.profile.as_deref().unwrap_or_default()
                    ))
                })
                .map_err(at("profile"))?;
        }
        Ok(group)
    }

    /// Every discovery rule, in the order they are tried.
    pub fn rules(&self) -> Vec<crate::policy::Rule> {
        self.inv.rules().rules().to_vec()
    }

    /// The rule called `name`.
    pub fn rule(&self, name: &str) -> Result<crate::policy::Rule> {
        self.inv
            .rules()
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NoRule(name.to_string()).into())
    }

    /// Creates a rule (`replace`: or replaces the one of its name, keeping its count) after
    /// validating every value; returns whether it was created.
    pub async fn put_rule(&self, r: crate::dto::Rule, replace: bool) -> Result<bool> {
        let rule = self.checked_rule(r)?;
        Ok(self.inv.put_rule(rule, replace, store::now_ms()).await?)
    }

    /// Deletes a rule.
    pub async fn delete_rule(&self, name: &str) -> Result<()> {
        Ok(self
            .inv
            .delete_rule(name.to_string(), store::now_ms())
            .await?)
    }

    /// Confirms the proposal of a propose-mode rule for a discovered machine: enrolls it as
    /// the rule says (with the rule's next index).
    pub async fn confirm(&self, mac: Mac) -> Result<Machine> {
        let m = self.machine(mac).await?;
        let Some(rule) = m.proposed_rule.clone() else {
            return Err(Error::Conflict(format!(
                "no rule proposes machine {mac}; enroll it with `provision enroll {mac}`"
            )));
        };
        match self
            .inv
            .apply_rule(mac, rule.clone(), Default::default(), true, store::now_ms())
            .await?
        {
            store::RuleOutcome::Enrolled(m) => Ok(*m),
            store::RuleOutcome::Full(why) => Err(Error::Conflict(format!(
                "{why}; raise its max (`provision rules update {rule} --max N`) to confirm more"
            ))),
            store::RuleOutcome::Skipped(why) => Err(Error::Conflict(why)),
            // Only without `confirm`; never here.
            store::RuleOutcome::Proposed => Err(Error::Internal(format!(
                "rule {rule} proposed machine {mac} again instead of enrolling it"
            ))),
        }
    }

    /// A rule as the API gave it, validated and normalised (MAC conditions in the
    /// inventory's form), its profile known and rendered with its values, its hostname
    /// pattern giving a valid hostname.
    pub fn checked_rule(&self, r: crate::dto::Rule) -> Result<crate::policy::Rule> {
        self.checked_rule_with(r, &self.inv.groups())
    }

    /// [`AdminService::checked_rule`] with these groups (an inventory file's) for the
    /// profile of the machines it enrolls.
    pub fn checked_rule_with(
        &self,
        r: crate::dto::Rule,
        groups: &GroupSet,
    ) -> Result<crate::policy::Rule> {
        validate::group_name(&r.name)
            .map_err(|_| {
                Error::Invalid(format!(
                    "rule name {:?} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'",
                    r.name
                ))
            })
            .map_err(at("name"))?;
        let mode: crate::policy::RuleMode =
            r.mode.parse().map_err(Error::Invalid).map_err(at("mode"))?;
        let conditions = validate::conditions(&r.conditions).map_err(at("match"))?;
        if let Some(p) = &r.profile {
            validate::profile_name(p).map_err(at("profile"))?;
            self.catalog().profile(p).map_err(at("profile"))?;
        }
        each_value("vars", &r.vars, validate::group_vars)?;
        each_value("labels", &r.labels, validate::labels)?;
        if r.max == Some(0) {
            return Err(at("max")(Error::Invalid(
                "max 0 would enroll nothing: leave it out for no limit, or disable the rule".into(),
            )));
        }
        let rule = crate::policy::Rule {
            name: r.name,
            priority: r.priority,
            enabled: r.enabled,
            mode,
            conditions,
            profile: r.profile,
            hostname: r.hostname.filter(|h| !h.is_empty()),
            labels: r.labels,
            vars: r.vars,
            max: r.max,
            used: 0,
        };
        // What a machine it enrolls would be: the pattern's hostname, the rule's values, the
        // facts its conditions name exactly; resolved against the groups for the profile.
        let given = |k: &str| {
            rule.conditions
                .get(k)
                .filter(|v| !v.ends_with('*'))
                .cloned()
        };
        let mac = given("mac")
            .and_then(|m| m.parse().ok())
            .unwrap_or(Mac([0x52, 0x54, 0, 0, 0, 1]));
        let mac_text = mac.to_string();
        let serial = given("serial").unwrap_or_else(|| "SERIAL1".into());
        let reported = crate::policy::Reported {
            mac: &mac_text,
            serial: Some(&serial),
            ..Default::default()
        };
        let hostname = rule
            .hostname_for(1, &reported)
            .map_err(|e| Error::Invalid(format!("rule {}: {e}", rule.name)))
            .map_err(at("hostname"))?;
        if let Some(h) = &hostname {
            validate::hostname(h)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "rule {}: its hostname pattern gives {h:?}: {}",
                        rule.name, e.0
                    ))
                })
                .map_err(at("hostname"))?;
        }
        let mut labels = rule.labels.clone();
        for (k, v) in &rule.conditions {
            if !crate::policy::RULE_FACTS.contains(&k.as_str()) && !v.ends_with('*') {
                labels.insert(k.clone(), v.clone());
            }
        }
        let probe = probe(&NewMachine {
            mac,
            profile: rule.profile.clone(),
            hostname,
            uuid: given("uuid"),
            serial: Some(serial),
            vars: rule.vars.clone(),
            labels,
        })
        .resolve(groups);
        match &probe.profile {
            None => {
                return Err(Error::Invalid(format!(
                    "rule {} gives no profile, and no group gives one to the machines it enrolls: give it --profile, or labels a group with a profile selects",
                    rule.name
                )))
            }
            Some(p) => self
                .renderer
                .check_renders(&probe)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "rule {}: profile {p} does not render with the rule's values: {e}",
                        rule.name
                    ))
                })
                .map_err(at("profile"))?,
        }
        Ok(rule)
    }

    /// Converges the inventory to an inventory file (`provision apply`): every entry checked
    /// as the API checks it, each problem (all of them, up to [`MAX_PROBLEMS`]) named by line
    /// and field; then planned and checked whole in a rolled-back transaction, the machines
    /// that change trial-rendered; then, unless `dry_run`, applied in one transaction that is
    /// refused if its plan is no longer the checked one.
    pub async fn apply(
        &self,
        text: &str,
        format: Format,
        prune: bool,
        dry_run: bool,
    ) -> Result<crate::dto::ApplyReport> {
        // Dropped last, after everything below, on every way out.
        let _give_back = GiveBackMemory;
        let mut parsed = declare::parse(text, format).map_err(|p| Error::Invalid(p.to_string()))?;
        let doc = std::mem::take(&mut parsed.doc);
        let mut problems = Vec::new();
        let desired = self.declared(&parsed, doc, prune, &mut problems);
        refuse(problems)?;
        let checked = self
            .inv
            .apply_inventory(desired.clone(), prune, ApplyRun::DryRun, store::now_ms())
            .await
            .map_err(|e| at_machine(&parsed, &desired, e))?;
        let mut problems = Vec::new();
        self.trial_render(&parsed, &desired, &checked, &mut problems)
            .await?;
        refuse(problems)?;
        if dry_run {
            return Ok(crate::dto::ApplyReport {
                dry_run,
                changes: checked.plan.changes,
                unchanged: checked.plan.unchanged,
            });
        }
        let run = ApplyRun::Apply {
            expect: Some(checked.plan),
        };
        let done = self
            .inv
            .apply_inventory(desired.clone(), prune, run, store::now_ms())
            .await
            .map_err(|e| at_machine(&parsed, &desired, e))?;
        Ok(crate::dto::ApplyReport {
            dry_run,
            changes: done.plan.changes,
            unchanged: done.plan.unchanged,
        })
    }

    /// The inventory `doc` (of `parsed`, whose lines name where) declares, each entry
    /// checked; what is wrong is added to `problems`.
    fn declared(
        &self,
        parsed: &Parsed,
        doc: declare::Document,
        prune: bool,
        problems: &mut Vec<Problem>,
    ) -> Desired {
        let mut report = |path: String, e: Error| {
            if problems.len() < MAX_PROBLEMS {
                let path = match &e {
                    Error::At { field, .. } => format!("{path}.{field}"),
                    _ => path,
                };
                problems.push(parsed.problem(path, e.to_string()));
            }
        };
        let groups = doc.groups.map(|entries| {
            let mut first = HashMap::new();
            let mut out = Vec::new();
            for (i, g) in entries.into_iter().enumerate() {
                let path = format!("groups[{i}]");
                if let Some(e) = once(parsed, &mut first, g.name.clone(), &path, "group") {
                    report(path.clone(), e);
                }
                match self.checked_group(g.into()) {
                    Ok(g) => out.push(g),
                    Err(e) => report(path, e),
                }
            }
            out
        });
        // The groups after the apply: the rules' trial renders resolve against them.
        let current = self.inv.groups();
        let after = match &groups {
            None => current.groups().to_vec(),
            Some(declared) => {
                let mut all = declared.clone();
                if !prune {
                    all.extend(
                        current
                            .groups()
                            .iter()
                            .filter(|g| !declared.iter().any(|d| d.name == g.name))
                            .cloned(),
                    );
                }
                all
            }
        };
        let after = GroupSet::new(after);
        let rules = doc.rules.map(|entries| {
            let mut first = HashMap::new();
            let mut out = Vec::new();
            for (i, r) in entries.into_iter().enumerate() {
                let path = format!("rules[{i}]");
                if let Some(e) = once(parsed, &mut first, r.name.clone(), &path, "rule") {
                    report(path.clone(), e);
                }
                match self.checked_rule_with(r.into(), &after) {
                    Ok(r) => out.push(r),
                    Err(e) => report(path, e),
                }
            }
            out
        });
        let machines = doc.machines.map(|entries| {
            let mut first = HashMap::new();
            let mut reserved: HashMap<String, (Mac, String)> = HashMap::new();
            let mut out = Vec::new();
            for (i, m) in entries.into_iter().enumerate() {
                let path = format!("machines[{i}]");
                if let Ok(mac) = m.mac.parse::<Mac>() {
                    if let Some(e) = once(parsed, &mut first, mac.to_string(), &path, "machine") {
                        report(path.clone(), e);
                    }
                }
                let new = match checked_machine(&self.renderer, m.into()) {
                    Ok(new) => new,
                    Err(e) => {
                        report(path, e);
                        continue;
                    }
                };
                if let Some(ip) = new.vars.get("ip") {
                    let here = format!("{path}.vars.ip");
                    if let Some((mac, there)) = reserved.get(ip) {
                        report(
                            here,
                            Error::Invalid(format!(
                                "variable ip {ip} is already the reservation of machine {mac}{}",
                                parsed
                                    .line(there)
                                    .map(|l| format!(" (line {l})"))
                                    .unwrap_or_default()
                            )),
                        );
                    } else {
                        reserved.insert(ip.clone(), (new.mac, here));
                    }
                }
                out.push(new);
            }
            out
        });
        Desired {
            groups,
            rules,
            machines,
        }
    }

    /// Trial-renders every machine the plan creates, enrolls or changes, as it will be (its
    /// groups' values from the groups after the apply).
    async fn trial_render(
        &self,
        parsed: &Parsed,
        desired: &Desired,
        checked: &store::Applied,
        problems: &mut Vec<Problem>,
    ) -> Result<()> {
        let changed: std::collections::HashSet<&str> = checked
            .plan
            .changes
            .iter()
            .filter(|c| c.kind == "machine" && c.action != plan::Action::Delete)
            .map(|c| c.name.as_str())
            .collect();
        let jobs: Vec<(usize, Machine)> = desired
            .machines
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, m)| changed.contains(m.mac.to_string().as_str()))
            .map(|(i, m)| (i, probe(m)))
            .collect();
        let groups = GroupSet::new(checked.groups.clone());
        let renderer = self.renderer.clone();
        // Renders are CPU work (a few hundred microseconds each): on the blocking pool, split
        // over the cores, so applying thousands of machines neither stalls the runtime nor
        // waits for one core.
        let failed = tokio::task::spawn_blocking(move || {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let chunk = jobs.len().div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let handles: Vec<_> = jobs
                    .chunks(chunk)
                    .map(|part| {
                        let (renderer, groups) = (&renderer, &groups);
                        s.spawn(move || {
                            part.iter()
                                .filter_map(|(i, m)| {
                                    let m = m.clone().resolve(groups);
                                    renderer.check_renders(&m).err().map(|e| (*i, e))
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("trial renders: {e}")))?;
        for (i, e) in failed.into_iter().take(MAX_PROBLEMS) {
            problems.push(parsed.problem(format!("machines[{i}].profile"), e.to_string()));
        }
        Ok(())
    }

    /// The inventory as an inventory file: every group and rule, and every machine past
    /// discovery with its own values, sorted, so an export applied and exported again gives
    /// the same bytes.
    pub async fn export(&self, format: Format) -> Result<String> {
        let _give_back = GiveBackMemory;
        self.inv.flush().await?;
        let mut machines = Vec::new();
        for state in policy::ALL_STATES {
            if state != State::Discovered {
                machines.extend(store::all_in_state(self.inv.as_ref(), state).await?);
            }
        }
        machines.sort_by_key(|m| m.mac);
        let doc = declare::Document {
            groups: (format != Format::Csv)
                .then(|| self.inv.groups().groups().iter().map(Into::into).collect()),
            rules: (format != Format::Csv)
                .then(|| self.inv.rules().rules().iter().map(Into::into).collect()),
            machines: Some(machines.iter().map(Into::into).collect()),
        };
        declare::write(&doc, format).map_err(Error::Internal)
    }

    /// One machine, or NotFound.
    pub async fn machine(&self, mac: Mac) -> Result<Machine> {
        self.inv.flush().await?;
        Ok(self
            .inv
            .machine(mac)
            .await?
            .ok_or(StoreError::NotFound(mac))?)
    }

    /// A page of machines.
    pub async fn machines(&self, q: MachineQuery) -> Result<Vec<Machine>> {
        self.inv.flush().await?;
        Ok(self.inv.machines(q).await?)
    }

    /// Every machine with an installed OS (the states an Ansible inventory lists), page by
    /// page.
    pub async fn installed_machines(&self) -> Result<Vec<Machine>> {
        let mut out = Vec::new();
        for state in [
            State::Installed,
            State::Registering,
            State::Registered,
            State::HandedOff,
            State::Failed,
        ] {
            out.extend(store::all_in_state(self.inv.as_ref(), state).await?);
        }
        out.sort_by_key(|m| m.mac);
        Ok(out)
    }

    /// Profile name → its role (`none` for no role) and its registration login, for
    /// inventories.
    pub fn profile_facts(&self) -> crate::inventory::Profiles {
        let cat = self.catalog();
        cat.profiles()
            .iter()
            .map(|(n, p)| {
                // The login the registrar uses: the profile's `[register]` over the role's
                // defaults (a machine's own `ssh_user` var is the inventory's to apply).
                let ssh_user = cat.role_of(n).ok().flatten().and_then(|role| {
                    p.register
                        .get("ssh_user")
                        .or_else(|| role.defaults.get("ssh_user"))
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                });
                let role = p.role.clone().unwrap_or_else(|| NO_ROLE.into());
                (n.clone(), crate::inventory::ProfileFacts { role, ssh_user })
            })
            .collect()
    }

    /// Deletes a machine (its events stay).
    pub async fn delete(&self, mac: Mac) -> Result<()> {
        Ok(self.inv.delete(mac, store::now_ms()).await?)
    }

    /// Reprovision: back to `enrolled` with a new generation; the next boot reinstalls.
    pub async fn reprovision(&self, mac: Mac) -> Result<Machine> {
        Ok(self.inv.reprovision(mac, store::now_ms()).await?)
    }

    /// Starts a fresh registration run.
    pub async fn register(&self, mac: Mac) -> Result<Machine> {
        self.registrar.start(mac).await
    }

    /// A page of events, oldest first.
    pub async fn events(&self, q: EventQuery) -> Result<Vec<Event>> {
        self.inv.flush().await?;
        Ok(self.inv.events(q).await?)
    }

    /// A page of events as committed, without flushing the observation queue first: for
    /// live streams, which a commit wakes — a flush per stream per commit would turn the
    /// writer's batches into a commit per wake-up under a boot storm.
    pub async fn committed_events(&self, q: EventQuery) -> Result<Vec<Event>> {
        Ok(self.inv.events(q).await?)
    }

    /// Machines by state and what the inventory's bounds did since start.
    pub async fn status(&self) -> Result<(BTreeMap<State, u64>, Stats)> {
        self.inv.flush().await?;
        Ok((self.inv.count_by_state().await?, self.inv.stats()))
    }

    /// A filtered, searched, sorted page of machines with the total.
    pub async fn search(&self, q: MachineSearch) -> Result<MachinePage> {
        self.inv.flush().await?;
        Ok(self.inv.search_machines(q).await?)
    }

    /// The machine's install token as the operator may see it, with its state now.
    pub async fn token_status(&self, m: &Machine) -> Result<Option<crate::dto::TokenStatus>> {
        let now = store::now_ms();
        Ok(self
            .inv
            .install_token(m.mac)
            .await?
            .map(|t| crate::dto::TokenStatus {
                state: token_state(&t, m.generation, now).into(),
                generation: t.generation,
                created_at: t.created_at,
                expires_at: t.expires_at,
                burnt_at: t.burnt_at,
                ip: t.ip,
            }))
    }

    /// The newest committed event id, for live views (see [`Inventory::event_feed`]).
    pub fn event_feed(&self) -> tokio::sync::watch::Receiver<i64> {
        self.inv.event_feed()
    }

    /// Why `action` (`reprovision`, `register`) cannot be done to `m` now, in words, or
    /// `None` if it can: the checks the action itself makes, asked before it is offered.
    pub fn why_not(&self, m: &Machine, action: &str) -> Option<String> {
        let t = match action {
            "reprovision" => policy::Transition::Reprovision,
            "register" => {
                if m.profile.is_none() {
                    return Some("not enrolled: it has no profile".into());
                }
                if !self.registrar.has_role(m) {
                    return Some(format!(
                        "profile {} has no registration role",
                        m.profile.as_deref().unwrap_or("")
                    ));
                }
                if m.host_keys.is_empty() {
                    return Some("no pinned host keys yet: it has not phoned home".into());
                }
                policy::Transition::StartRegistration
            }
            _ => return None,
        };
        policy::transition(m.state, &t).err().map(|e| {
            if m.state == State::Discovered {
                "not enrolled yet: enroll it first".into()
            } else {
                e.to_string()
            }
        })
    }

    /// Renders what a machine would be served now, with the install token redacted and
    /// nothing recorded. `artifact` is `ipxe` (its `/ipxe` script) or a profile artifact.
    pub async fn preview(
        &self,
        mac: Mac,
        artifact: &str,
        base_url: &str,
    ) -> Result<(ArtifactKind, String)> {
        self.preview_as(mac, None, artifact, base_url).await
    }

    /// [`AdminService::preview`], as if the machine had `profile` (enrolled with it, if it is
    /// only discovered): how a profile renders for a real machine before it is given it.
    pub async fn preview_as(
        &self,
        mac: Mac,
        profile: Option<&str>,
        artifact: &str,
        base_url: &str,
    ) -> Result<(ArtifactKind, String)> {
        let mut m = self.machine(mac).await?;
        let cat = self.catalog();
        if let Some(p) = profile {
            validate::profile_name(p)?;
            cat.profile(p)?;
            m.profile = Some(p.to_string());
            if m.state == State::Discovered {
                m.state = State::Enrolled;
            }
        }
        if artifact == "ipxe" {
            let facts = MachineFacts {
                state: m.state,
                profile: m.profile.as_deref(),
                installer_done: m.installer_done_at.is_some(),
            };
            let req = BootRequest {
                platform: policy::Platform::from_ipxe(m.platform.as_deref().unwrap_or("")),
                arch: m.arch.clone(),
            };
            let body = match policy::decide(Some(&facts), &req, self.discover) {
                BootDecision::Install { profile } => {
                    self.renderer
                        .install_script(&cat, &m, &profile, base_url, REDACTED_TOKEN)?
                }
                BootDecision::LocalBoot { platform, reason } => {
                    self.renderer
                        .local_script(&cat, mac, platform, reason.as_str(), base_url)?
                }
                BootDecision::Ignore => crate::boot::IGNORE_SCRIPT.to_string(),
            };
            return Ok((ArtifactKind::Ipxe, body));
        }
        if m.profile.is_none() {
            return Err(Error::Invalid(format!(
                "machine {mac} has no profile; enroll it first"
            )));
        }
        Ok(self
            .renderer
            .artifact(&cat, &m, artifact, base_url, REDACTED_TOKEN)?)
    }
}
