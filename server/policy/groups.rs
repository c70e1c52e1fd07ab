//! Groups: values many machines share, chosen by a label selector (matchbox's model).
//!
//! A group selects machines by exact values of their facts (`mac`, `uuid`, `serial`,
//! `hostname`, `arch`, `platform`) and their own labels; a group without a selector is a
//! default and selects every machine. What a machine gets is resolved per value: its own
//! value, else the most specific matching group's (the one with the most selector labels),
//! else a less specific one's. Two groups that can select one machine, with the same number
//! of selector labels, that set one value differently would leave it to chance: such a pair
//! is refused when the second group is created or changed ([`GroupSet::conflict`]), so
//! resolution never meets a tie.
//!
//! Selection reads a machine's own labels only, never the labels groups give it: a group's
//! membership cannot depend on another group's.

use std::collections::{BTreeMap, HashMap};

/// The machine facts a selector may name; any other key names one of the machine's labels.
/// A machine label cannot take one of these names (the API refuses it), so a key means one
/// thing.
pub const FACT_KEYS: [&str; 6] = ["mac", "uuid", "serial", "hostname", "arch", "platform"];

/// Group variables that only a machine of its own may have: `ip` is a machine's DHCP
/// reservation (one address, one machine) and `ssh_host` its SSH address.
pub const MACHINE_ONLY_VARS: [&str; 2] = ["ip", "ssh_host"];

/// A group as stored.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Group {
    /// Unique name.
    pub name: String,
    /// Fact or label → the exact value a machine must have. Empty: every machine.
    pub selector: BTreeMap<String, String>,
    /// The profile its machines install, unless they have their own.
    pub profile: Option<String>,
    /// Template variables its machines inherit.
    pub vars: BTreeMap<String, String>,
    /// Labels its machines inherit (for inventories and templates; not for selection).
    pub labels: BTreeMap<String, String>,
}

impl Group {
    /// How specific the selector is: the number of values it requires.
    pub fn specificity(&self) -> usize {
        self.selector.len()
    }

    /// The values this group sets, by field name (`profile`, `vars.KEY`, `labels.KEY`).
    fn fields(&self) -> BTreeMap<String, &str> {
        self.profile
            .iter()
            .map(|p| ("profile".to_string(), p.as_str()))
            .chain(
                self.vars
                    .iter()
                    .map(|(k, v)| (format!("vars.{k}"), v.as_str())),
            )
            .chain(
                self.labels
                    .iter()
                    .map(|(k, v)| (format!("labels.{k}"), v.as_str())),
            )
            .collect()
    }
}

/// What a selector can see of a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selectable<'a> {
    /// Normalised MAC.
    pub mac: &'a str,
    /// SMBIOS UUID, lower case.
    pub uuid: Option<&'a str>,
    /// Serial number.
    pub serial: Option<&'a str>,
    /// Hostname.
    pub hostname: Option<&'a str>,
    /// `${buildarch}`.
    pub arch: Option<&'a str>,
    /// `${platform}`.
    pub platform: Option<&'a str>,
    /// The machine's own labels.
    pub labels: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Selectable<'a> {
    /// The (key, value) pairs a selector can require of this machine.
    fn pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        let facts = [
            ("mac", Some(self.mac)),
            ("uuid", self.uuid),
            ("serial", self.serial),
            ("hostname", self.hostname),
            ("arch", self.arch),
            ("platform", self.platform),
        ];
        facts
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .chain(
                self.labels
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| !FACT_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
    }
}

/// Where a machine's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Its own (enrolled or updated with it).
    Own,
    /// The named group.
    Group(String),
}

/// A machine's values once its groups are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The profile, if it has one of its own or from a group.
    pub profile: Option<String>,
    /// The group that gave the profile (none: its own, or no profile).
    pub profile_from: Option<String>,
    /// Every variable.
    pub vars: BTreeMap<String, String>,
    /// Every label.
    pub labels: BTreeMap<String, String>,
    /// The variables and labels that came from a group, as `vars.KEY` / `labels.KEY` → the
    /// group.
    pub inherited: BTreeMap<String, String>,
    /// The groups that select the machine, most specific first.
    pub groups: Vec<String>,
}

impl Resolved {
    /// Where the value of `field` (`profile`, `vars.KEY`, `labels.KEY`) came from.
    pub fn source(&self, field: &str) -> Source {
        let group = if field == "profile" {
            self.profile_from.as_ref()
        } else {
            self.inherited.get(field)
        };
        group.map_or(Source::Own, |g| Source::Group(g.clone()))
    }
}

/// Every group, indexed for selection: a machine is matched by looking up each of its
/// (key, value) pairs, not by trying every group, so a thousand groups cost a boot request
/// what its handful of labels costs.
#[derive(Clone, Debug, Default)]
pub struct GroupSet {
    /// By name.
    groups: Vec<Group>,
    /// key → value → the groups whose selector requires it (two levels, so a lookup borrows
    /// the machine's strings instead of copying them).
    index: HashMap<String, HashMap<String, Vec<usize>>>,
    /// Groups with an empty selector.
    defaults: Vec<usize>,
}

impl GroupSet {
    /// The set of `groups` (any order; names are unique).
    pub fn new(mut groups: Vec<Group>) -> GroupSet {
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        let mut index: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        let mut defaults = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            if g.selector.is_empty() {
                defaults.push(i);
            }
            for (k, v) in &g.selector {
                index
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(i);
            }
        }
        GroupSet {
            groups,
            index,
            defaults,
        }
    }

    /// Every group, by name.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The group called `name`.
    pub fn get(&self, name: &str) -> Option<&Group> {
        self.groups
            .binary_search_by(|g| g.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.groups[i])
    }

    /// Whether there are no groups (resolution is then the machine's own values).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The groups that select `m`, most specific first (equal ones by name).
    pub fn matching(&self, m: &Selectable<'_>) -> Vec<&Group> {
        let mut hits: HashMap<usize, usize> = HashMap::new();
        for (k, v) in m.pairs() {
            if let Some(gs) = self.index.get(k).and_then(|by_value| by_value.get(v)) {
                for &i in gs {
                    *hits.entry(i).or_default() += 1;
                }
            }
        }
        let mut out: Vec<usize> = hits
            .into_iter()
            .filter(|&(i, n)| self.groups[i].selector.len() == n)
            .map(|(i, _)| i)
            .chain(self.defaults.iter().copied())
            .collect();
        out.sort_by(|&a, &b| {
            let (a, b) = (&self.groups[a], &self.groups[b]);
            b.specificity()
                .cmp(&a.specificity())
                .then_with(|| a.name.cmp(&b.name))
        });
        out.into_iter().map(|i| &self.groups[i]).collect()
    }

    /// The profile `m` installs: its own, else its most specific group's that sets one; with
    /// the group it came from.
    pub fn profile(
        &self,
        m: &Selectable<'_>,
        own: Option<&str>,
    ) -> (Option<String>, Option<String>) {
        if let Some(p) = own {
            return (Some(p.to_string()), None);
        }
        if self.is_empty() {
            return (None, None);
        }
        self.matching(m)
            .into_iter()
            .find_map(|g| g.profile.clone().map(|p| (Some(p), Some(g.name.clone()))))
            .unwrap_or((None, None))
    }

    /// `m`'s values: each its own, else from the most specific group that sets it.
    pub fn resolve(
        &self,
        m: &Selectable<'_>,
        own_profile: Option<&str>,
        own_vars: &BTreeMap<String, String>,
        own_labels: &BTreeMap<String, String>,
    ) -> Resolved {
        let mut r = Resolved {
            profile: own_profile.map(str::to_string),
            vars: own_vars.clone(),
            labels: own_labels.clone(),
            ..Resolved::default()
        };
        if self.is_empty() {
            return r;
        }
        for g in self.matching(m) {
            r.groups.push(g.name.clone());
            if r.profile.is_none() {
                if let Some(p) = &g.profile {
                    r.profile = Some(p.clone());
                    r.profile_from = Some(g.name.clone());
                }
            }
            for (prefix, theirs, ours) in [
                ("vars", &g.vars, &mut r.vars),
                ("labels", &g.labels, &mut r.labels),
            ] {
                for (k, v) in theirs {
                    if !ours.contains_key(k) {
                        ours.insert(k.clone(), v.clone());
                        r.inherited.insert(format!("{prefix}.{k}"), g.name.clone());
                    }
                }
            }
        }
        r
    }

    /// Why `candidate` (new, or replacing the group of its name) cannot join the set: another
    /// group can select the same machine with the same specificity and sets a value it sets
    /// to something else, so which one a machine gets would be a tie. `None`: it can.
    pub fn conflict(&self, candidate: &Group) -> Option<String> {
        let ours = candidate.fields();
        for g in &self.groups {
            if g.name == candidate.name
                || g.specificity() != candidate.specificity()
                || !compatible(&g.selector, &candidate.selector)
            {
                continue;
            }
            let theirs = g.fields();
            // The same value from both is no choice to make.
            let shared: Vec<&String> = ours
                .iter()
                .filter(|(f, v)| theirs.get(*f).is_some_and(|w| w != *v))
                .map(|(f, _)| f)
                .collect();
            if shared.is_empty() {
                continue;
            }
            let example: Vec<String> = candidate
                .selector
                .iter()
                .chain(&g.selector)
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let which = if candidate.selector.is_empty() {
                "are both defaults (no selector)".to_string()
            } else {
                format!(
                    "can select the same machine (one with {}) with the same specificity ({} selector label{})",
                    example.join(", "),
                    candidate.specificity(),
                    if candidate.specificity() == 1 { "" } else { "s" }
                )
            };
            return Some(format!(
                "groups {} and {} {which}, and set {} differently: a machine would get one of \
                 them by chance. Make one selector more specific (add a label to it), or set \
                 each value in only one of the groups (or to the same value in both)",
                candidate.name,
                g.name,
                shared
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        None
    }
}

/// Whether one machine can satisfy both selectors: no key requires two different values.
fn compatible(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}
