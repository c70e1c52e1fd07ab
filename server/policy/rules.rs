//! Discovery rules: what to do with a machine nobody enrolled, decided from what it reported
//! (Foreman's discovery rules, Razor's policies).
//!
//! A rule has conditions on what the inventory knows of a discovered machine — its MAC (a
//! trailing `*` matches a prefix, so `52:54:00:*` is an OUI), UUID, serial, arch, platform,
//! the DHCP vendor and user class it sent, the interface or relay its DHCP request came
//! through, and its labels — and what a matching machine gets: a profile, labels (which may
//! put it in groups), variables, a hostname from a pattern. Rules are tried in priority order
//! (lower first, then by name); a disabled rule, or one that has enrolled its `max` machines,
//! is skipped. In `propose` mode a match is only marked, for an operator to confirm.
//!
//! The count is kept by the inventory, which takes a rule's next index and enrolls the machine
//! in one transaction (a compare-and-set on the count), so two machines discovered at once
//! never take one index or pass the count; what is here only chooses.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The facts a rule condition may name; any other key names one of the machine's labels.
pub const RULE_FACTS: [&str; 9] = [
    "mac",
    "uuid",
    "serial",
    "arch",
    "platform",
    "vendor_class",
    "user_class",
    "interface",
    "relay",
];

/// What a matching machine is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuleMode {
    /// Enrolled at once.
    #[default]
    Enroll,
    /// Marked as matching; an operator confirms, which enrolls it.
    Propose,
}

impl RuleMode {
    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleMode::Enroll => "enroll",
            RuleMode::Propose => "propose",
        }
    }
}

impl fmt::Display for RuleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RuleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enroll" => Ok(RuleMode::Enroll),
            "propose" => Ok(RuleMode::Propose),
            _ => Err(format!("rule mode {s:?}: enroll or propose")),
        }
    }
}

/// A discovery rule as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// Lower is tried first.
    pub priority: i64,
    /// A disabled rule matches nothing.
    pub enabled: bool,
    /// Enroll, or only propose.
    pub mode: RuleMode,
    /// Fact or label → the value it must have (a trailing `*`: a prefix). Empty: every
    /// discovered machine.
    pub conditions: BTreeMap<String, String>,
    /// The profile a matching machine is enrolled with (none: its groups').
    pub profile: Option<String>,
    /// Hostname pattern: `{index}` (or `{index:02}`, zero-padded), `{serial}`, `{mac}`.
    pub hostname: Option<String>,
    /// Labels the machine is enrolled with (beside its own).
    pub labels: BTreeMap<String, String>,
    /// Variables the machine is enrolled with (beside its own).
    pub vars: BTreeMap<String, String>,
    /// Most machines it enrolls (none: no limit).
    pub max: Option<u64>,
    /// Machines it has enrolled so far; the last one got this as its index.
    pub used: u64,
}

/// What the inventory knows of a discovered machine, for conditions.
#[derive(Clone, Debug, Default)]
pub struct Reported<'a> {
    /// Normalised MAC.
    pub mac: &'a str,
    /// SMBIOS UUID.
    pub uuid: Option<&'a str>,
    /// Serial number.
    pub serial: Option<&'a str>,
    /// `${buildarch}`.
    pub arch: Option<&'a str>,
    /// `${platform}`.
    pub platform: Option<&'a str>,
    /// DHCP option 60 of its last DHCP request.
    pub vendor_class: Option<&'a str>,
    /// DHCP option 77 of its last DHCP request.
    pub user_class: Option<&'a str>,
    /// The interface its last direct DHCP request arrived on.
    pub interface: Option<&'a str>,
    /// The relay (giaddr) its last relayed DHCP request came through.
    pub relay: Option<&'a str>,
    /// Its own labels.
    pub labels: Option<&'a BTreeMap<String, String>>,
}

impl Reported<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "mac" => Some(self.mac),
            "uuid" => self.uuid,
            "serial" => self.serial,
            "arch" => self.arch,
            "platform" => self.platform,
            "vendor_class" => self.vendor_class,
            "user_class" => self.user_class,
            "interface" => self.interface,
            "relay" => self.relay,
            label => self.labels.and_then(|l| l.get(label)).map(String::as_str),
        }
    }
}

/// Whether `value` is what `pattern` asks for: equal, or with a trailing `*`, starting with
/// what comes before it.
pub fn glob(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    }
}

impl Rule {
    /// Whether `m` meets every condition (regardless of `enabled` and the count).
    pub fn matches(&self, m: &Reported<'_>) -> bool {
        self.conditions
            .iter()
            .all(|(k, p)| m.get(k).is_some_and(|v| glob(p, v)))
    }

    /// Whether it has enrolled its `max` machines.
    pub fn full(&self) -> bool {
        self.max.is_some_and(|max| self.used >= max)
    }

    /// The hostname its `index`th machine gets, if it has a pattern: lower case, checked by
    /// the caller.
    pub fn hostname_for(&self, index: u64, m: &Reported<'_>) -> Result<Option<String>, String> {
        self.hostname
            .as_deref()
            .map(|p| hostname(p, index, m))
            .transpose()
    }
}

/// `pattern` with its placeholders filled: `{index}`, `{index:0N}` (zero-padded to N digits,
/// N from 1 to 9), `{serial}` and `{mac}` (12 hex digits); lower case. An unknown placeholder
/// or a missing serial is an error in words.
pub fn hostname(pattern: &str, index: u64, m: &Reported<'_>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(format!(
                "hostname pattern {pattern:?}: a '{{' without its '}}'"
            ));
        };
        let name = &rest[open + 1..open + close];
        match name {
            "index" => out.push_str(&index.to_string()),
            "serial" => out.push_str(m.serial.ok_or_else(|| {
                "the machine reported no serial number for {serial}".to_string()
            })?),
            "mac" => out.push_str(&m.mac.replace(':', "")),
            _ => match name.strip_prefix("index:0").and_then(|w| w.parse::<usize>().ok()) {
                Some(w @ 1..=9) => out.push_str(&format!("{index:0w$}")),
                _ => {
                    return Err(format!(
                        "hostname pattern {pattern:?}: unknown placeholder {{{name}}}; use {{index}}, {{index:02}}, {{serial}} or {{mac}}"
                    ))
                }
            },
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out.to_ascii_lowercase())
}

/// Which rule a discovered machine gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice<'a> {
    /// No enabled rule matches it.
    None,
    /// The first enabled rule that matches it and has room.
    Rule(&'a Rule),
    /// Enabled rules match it, but each has enrolled its `max` machines: the first of them.
    Full(&'a Rule),
}

/// Every rule, in the order they are tried.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// The set of `rules` (any order; names are unique).
    pub fn new(mut rules: Vec<Rule>) -> RuleSet {
        rules.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        RuleSet { rules }
    }

    /// Every rule, in the order they are tried.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule called `name`.
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Whether no rule is enabled (discovered machines then just wait).
    pub fn is_idle(&self) -> bool {
        !self.rules.iter().any(|r| r.enabled)
    }

    /// The rule `m` gets: the first enabled one, in priority order, that matches it and has
    /// room.
    pub fn choose(&self, m: &Reported<'_>) -> Choice<'_> {
        let mut full = None;
        for r in self.rules.iter().filter(|r| r.enabled && r.matches(m)) {
            if !r.full() {
                return Choice::Rule(r);
            }
            full.get_or_insert(r);
        }
        full.map_or(Choice::None, Choice::Full)
    }
}
