//! What applying a declared inventory changes: the stored groups, rules and machines set
//! against the declared ones, field by field. Pure, so the plan a dry run prints is computed by
//! the same function, in the same transaction, as the changes an apply makes.
//!
//! What an inventory file declares of a machine is what an operator gives at enroll: its own
//! profile, hostname, variables and labels (what its groups give is not declared per machine),
//! and optionally its UUID and serial. UUID and serial are also what the firmware reports, so
//! a file that leaves them out leaves them as they are; the other values converge to the file,
//! absent ones cleared. Discovered machines are observations, not declarations: they are never
//! pruned, and a file naming one enrolls it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{Machine, NewMachine};
use crate::mac::Mac;
use crate::policy::{Group, Rule, State};

/// The inventory a file declares; a kind the file does not mention (`None`) is left alone,
/// also by a prune.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Groups, by name.
    pub groups: Option<Vec<Group>>,
    /// Discovery rules (their counts are the daemon's, not the file's).
    pub rules: Option<Vec<Rule>>,
    /// Machines: what each would be enrolled with.
    pub machines: Option<Vec<NewMachine>>,
}

/// The inventory as stored, with machines' own values (not resolved against groups).
pub struct Current<'a> {
    /// Every group.
    pub groups: &'a [Group],
    /// Every rule.
    pub rules: &'a [Rule],
    /// Every machine the file names, and (for a prune) every one past discovery.
    pub machines: &'a HashMap<Mac, Machine>,
}

/// What happens to one group, rule or machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// It is created.
    Create,
    /// A discovered machine is enrolled.
    Enroll,
    /// Some of its values change.
    Update,
    /// It is deleted (only with prune).
    Delete,
}

/// One value before and after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// `profile`, `vars.ip`, `match.mac`, …
    pub field: String,
    /// The value before (none: not set).
    pub before: Option<String>,
    /// The value after (none: not set).
    pub after: Option<String>,
}

/// One change of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `group`, `rule` or `machine`.
    pub kind: String,
    /// The group's or rule's name, the machine's MAC.
    pub name: String,
    /// What happens to it.
    pub action: Action,
    /// The values that change (none for a delete).
    pub fields: Vec<FieldChange>,
}

/// How many of each kind the file declares that need no change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unchanged {
    /// Groups.
    pub groups: usize,
    /// Rules.
    pub rules: usize,
    /// Machines.
    pub machines: usize,
}

/// The plan: groups first, then rules, then machines; each kind in name order, deletions
/// last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// What changes.
    pub changes: Vec<Change>,
    /// What the file declares as it already is.
    pub unchanged: Unchanged,
}

type Fields = BTreeMap<String, Option<String>>;

fn put(f: &mut Fields, key: &str, v: Option<&str>) {
    f.insert(key.to_string(), v.map(str::to_string));
}

fn put_map(f: &mut Fields, prefix: &str, m: &BTreeMap<String, String>) {
    for (k, v) in m {
        f.insert(format!("{prefix}.{k}"), Some(v.clone()));
    }
}

fn group_fields(g: &Group) -> Fields {
    let mut f = Fields::new();
    put_map(&mut f, "selector", &g.selector);
    put(&mut f, "profile", g.profile.as_deref());
    put_map(&mut f, "vars", &g.vars);
    put_map(&mut f, "labels", &g.labels);
    f
}

fn rule_fields(r: &Rule) -> Fields {
    let mut f = Fields::new();
    put(&mut f, "priority", Some(&r.priority.to_string()));
    put(
        &mut f,
        "enabled",
        Some(if r.enabled { "true" } else { "false" }),
    );
    put(&mut f, "mode", Some(r.mode.as_str()));
    put_map(&mut f, "match", &r.conditions);
    put(&mut f, "profile", r.profile.as_deref());
    put(&mut f, "hostname", r.hostname.as_deref());
    put_map(&mut f, "labels", &r.labels);
    put_map(&mut f, "vars", &r.vars);
    put(&mut f, "max", r.max.map(|m| m.to_string()).as_deref());
    f
}

/// A machine's own values as the plan compares them: `uuid` and `serial` only where the
/// declared machine `like` gives them (see the module).
fn own_fields(
    like: &NewMachine,
    profile: &Option<String>,
    hostname: &Option<String>,
    uuid: &Option<String>,
    serial: &Option<String>,
    vars: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Fields {
    let mut f = Fields::new();
    put(&mut f, "profile", profile.as_deref());
    put(&mut f, "hostname", hostname.as_deref());
    if like.uuid.is_some() {
        put(&mut f, "uuid", uuid.as_deref());
    }
    if like.serial.is_some() {
        put(&mut f, "serial", serial.as_deref());
    }
    put_map(&mut f, "vars", vars);
    put_map(&mut f, "labels", labels);
    f
}

/// What the file declares of machine `d`.
fn declared_fields(d: &NewMachine) -> Fields {
    own_fields(
        d,
        &d.profile,
        &d.hostname,
        &d.uuid,
        &d.serial,
        &d.vars,
        &d.labels,
    )
}

/// Stored machine `m`'s own values, compared with declared `d`.
fn stored_fields(m: &Machine, d: &NewMachine) -> Fields {
    own_fields(
        d,
        &m.profile,
        &m.hostname,
        &m.uuid,
        &m.serial,
        &m.vars,
        &m.labels,
    )
}

/// The values that differ, in field order; a value unset on both sides is no change.
fn diff(before: &Fields, after: &Fields) -> Vec<FieldChange> {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let b = before.get(k).cloned().flatten();
            let a = after.get(k).cloned().flatten();
            (b != a).then(|| FieldChange {
                field: k.clone(),
                before: b,
                after: a,
            })
        })
        .collect()
}

fn change(kind: &str, name: String, action: Action, fields: Vec<FieldChange>) -> Change {
    Change {
        kind: kind.into(),
        name,
        action,
        fields,
    }
}

/// Plans one kind: `declared` against `stored` by name; `None` declared leaves it alone.
fn plan_kind<T>(
    kind: &str,
    stored: &[T],
    declared: Option<&[T]>,
    prune: bool,
    name: impl Fn(&T) -> &str,
    fields: impl Fn(&T) -> Fields,
    changes: &mut Vec<Change>,
) -> usize {
    let Some(declared) = declared else {
        return 0;
    };
    let by_name: HashMap<&str, &T> = stored.iter().map(|t| (name(t), t)).collect();
    let mut unchanged = 0;
    let mut sorted: Vec<&T> = declared.iter().collect();
    sorted.sort_by(|a, b| name(a).cmp(name(b)));
    for d in sorted {
        let after = fields(d);
        match by_name.get(name(d)) {
            None => changes.push(change(
                kind,
                name(d).into(),
                Action::Create,
                diff(&Fields::new(), &after),
            )),
            Some(s) => {
                let f = diff(&fields(s), &after);
                if f.is_empty() {
                    unchanged += 1;
                } else {
                    changes.push(change(kind, name(d).into(), Action::Update, f));
                }
            }
        }
    }
    if prune {
        let keep: std::collections::HashSet<&str> = declared.iter().map(&name).collect();
        let mut gone: Vec<&str> = stored
            .iter()
            .map(&name)
            .filter(|n| !keep.contains(n))
            .collect();
        gone.sort();
        for n in gone {
            changes.push(change(kind, n.into(), Action::Delete, vec![]));
        }
    }
    unchanged
}

/// What applying `desired` to `current` changes (`prune`: also what the file leaves out).
pub fn plan(current: &Current<'_>, desired: &Desired, prune: bool) -> Plan {
    let mut changes = Vec::new();
    let mut unchanged = Unchanged {
        groups: plan_kind(
            "group",
            current.groups,
            desired.groups.as_deref(),
            prune,
            |g| g.name.as_str(),
            group_fields,
            &mut changes,
        ),
        rules: plan_kind(
            "rule",
            current.rules,
            desired.rules.as_deref(),
            prune,
            |r| r.name.as_str(),
            rule_fields,
            &mut changes,
        ),
        machines: 0,
    };
    let Some(machines) = &desired.machines else {
        return Plan { changes, unchanged };
    };
    let mut sorted: Vec<&NewMachine> = machines.iter().collect();
    sorted.sort_by_key(|m| m.mac);
    for d in &sorted {
        let after = declared_fields(d);
        let name = d.mac.to_string();
        match current.machines.get(&d.mac) {
            None => changes.push(change(
                "machine",
                name,
                Action::Create,
                diff(&Fields::new(), &after),
            )),
            Some(s) => {
                let f = diff(&stored_fields(s, d), &after);
                if s.state == State::Discovered {
                    changes.push(change("machine", name, Action::Enroll, f));
                } else if f.is_empty() {
                    unchanged.machines += 1;
                } else {
                    changes.push(change("machine", name, Action::Update, f));
                }
            }
        }
    }
    if prune {
        let keep: std::collections::HashSet<Mac> = machines.iter().map(|m| m.mac).collect();
        let mut gone: Vec<Mac> = current
            .machines
            .values()
            .filter(|m| m.state != State::Discovered && !keep.contains(&m.mac))
            .map(|m| m.mac)
            .collect();
        gone.sort();
        for mac in gone {
            changes.push(change("machine", mac.to_string(), Action::Delete, vec![]));
        }
    }
    Plan { changes, unchanged }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, profile: Option<&str>) -> Group {
        Group {
            name: name.into(),
            profile: profile.map(str::to_string),
            ..Default::default()
        }
    }

    fn new_machine(mac: &str, hostname: Option<&str>) -> NewMachine {
        NewMachine {
            mac: mac.parse().unwrap(),
            profile: Some("debian-12".into()),
            hostname: hostname.map(str::to_string),
            uuid: None,
            serial: None,
            vars: BTreeMap::from([("ip".to_string(), "10.0.0.5".to_string())]),
            labels: BTreeMap::new(),
        }
    }

    fn stored(new: &NewMachine, state: State) -> Machine {
        let mut m = crate::admin::probe(new);
        m.state = state;
        m
    }

    fn fc(field: &str, before: Option<&str>, after: Option<&str>) -> FieldChange {
        FieldChange {
            field: field.into(),
            before: before.map(str::to_string),
            after: after.map(str::to_string),
        }
    }

    #[test]
    fn the_same_inventory_plans_nothing_and_counts_it() {
        let a = new_machine("52:54:00:00:00:01", Some("a"));
        let machines = HashMap::from([(a.mac, stored(&a, State::Installed))]);
        let groups = [group("rack", Some("debian-12"))];
        let current = Current {
            groups: &groups,
            rules: &[],
            machines: &machines,
        };
        let desired = Desired {
            groups: Some(groups.to_vec()),
            rules: Some(vec![]),
            machines: Some(vec![a]),
        };
        let p = plan(&current, &desired, true);
        assert_eq!(p.changes, vec![]);
        assert_eq!(
            p.unchanged,
            Unchanged {
                groups: 1,
                rules: 0,
                machines: 1
            }
        );
    }

    #[test]
    fn creates_updates_enrolls_and_only_a_prune_deletes() {
        let a = new_machine("52:54:00:00:00:01", Some("a"));
        let b = new_machine("52:54:00:00:00:02", None);
        let c = new_machine("52:54:00:00:00:03", None);
        let gone = new_machine("52:54:00:00:00:09", None);
        let seen = new_machine("52:54:00:00:00:0a", None);
        let mut b_stored = stored(&b, State::Registered);
        b_stored.hostname = Some("old".into());
        b_stored.vars.insert("extra".into(), "x".into());
        let mut c_seen = stored(&c, State::Discovered);
        c_seen.profile = None;
        c_seen.vars.clear();
        c_seen.serial = Some("S3".into());
        let machines: HashMap<Mac, Machine> = [
            b_stored,
            c_seen,
            stored(&gone, State::Installed),
            stored(&seen, State::Discovered),
        ]
        .into_iter()
        .map(|m| (m.mac, m))
        .collect();
        let groups = [group("old", None), group("rack", Some("debian-12"))];
        let current = Current {
            groups: &groups,
            rules: &[],
            machines: &machines,
        };
        let desired = Desired {
            groups: Some(vec![
                group("rack", Some("ubuntu-24.04")),
                group("new", None),
            ]),
            rules: None,
            machines: Some(vec![c.clone(), b.clone(), a.clone()]),
        };
        let kept = plan(&current, &desired, false);
        let summary: Vec<(&str, &str, Action)> = kept
            .changes
            .iter()
            .map(|c| (c.kind.as_str(), c.name.as_str(), c.action))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("group", "new", Action::Create),
                ("group", "rack", Action::Update),
                ("machine", "52:54:00:00:00:01", Action::Create),
                ("machine", "52:54:00:00:00:02", Action::Update),
                ("machine", "52:54:00:00:00:03", Action::Enroll),
            ]
        );
        assert_eq!(
            kept.changes[1].fields,
            vec![fc("profile", Some("debian-12"), Some("ubuntu-24.04"))]
        );
        assert_eq!(
            kept.changes[2].fields,
            vec![
                fc("hostname", None, Some("a")),
                fc("profile", None, Some("debian-12")),
                fc("vars.ip", None, Some("10.0.0.5")),
            ]
        );
        assert_eq!(
            kept.changes[3].fields,
            vec![
                fc("hostname", Some("old"), None),
                fc("vars.extra", Some("x"), None)
            ]
        );
        // The serial it reported stays: the file does not declare one.
        assert_eq!(
            kept.changes[4].fields,
            vec![
                fc("profile", None, Some("debian-12")),
                fc("vars.ip", None, Some("10.0.0.5"))
            ]
        );
        let pruned = plan(&current, &desired, true);
        let deleted: Vec<(&str, &str)> = pruned
            .changes
            .iter()
            .filter(|c| c.action == Action::Delete)
            .map(|c| (c.kind.as_str(), c.name.as_str()))
            .collect();
        // Rules were not declared, the discovered machine was never declared.
        assert_eq!(
            deleted,
            vec![("group", "old"), ("machine", "52:54:00:00:00:09")]
        );
    }

    #[test]
    fn a_declared_serial_is_converged_an_undeclared_one_kept() {
        let mut d = new_machine("52:54:00:00:00:01", None);
        let mut s = stored(&d, State::Installed);
        s.serial = Some("REPORTED".into());
        s.uuid = Some("reported-uuid".into());
        let machines = HashMap::from([(d.mac, s)]);
        let current = Current {
            groups: &[],
            rules: &[],
            machines: &machines,
        };
        let mut desired = Desired {
            machines: Some(vec![d.clone()]),
            ..Default::default()
        };
        assert_eq!(plan(&current, &desired, false).unchanged.machines, 1);
        d.serial = Some("DECLARED".into());
        desired.machines = Some(vec![d]);
        assert_eq!(
            plan(&current, &desired, false).changes[0].fields,
            vec![fc("serial", Some("REPORTED"), Some("DECLARED"))]
        );
    }

    #[test]
    fn a_rule_plans_on_what_it_says_not_on_its_count() {
        let declared = Rule {
            name: "oui".into(),
            priority: 10,
            enabled: true,
            max: Some(4),
            ..Default::default()
        };
        let stored = Rule {
            used: 3,
            ..declared.clone()
        };
        let current = Current {
            groups: &[],
            rules: std::slice::from_ref(&stored),
            machines: &HashMap::new(),
        };
        let mut desired = Desired {
            rules: Some(vec![declared.clone()]),
            ..Default::default()
        };
        assert_eq!(plan(&current, &desired, true).unchanged.rules, 1);
        desired.rules = Some(vec![Rule {
            max: None,
            ..declared
        }]);
        assert_eq!(
            plan(&current, &desired, true).changes[0].fields,
            vec![fc("max", Some("4"), None)]
        );
    }
}
