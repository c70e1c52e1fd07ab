//! Hand-off to configuration management: an Ansible dynamic inventory and a `known_hosts` of
//! the pinned host keys, both derived from the inventory and nothing else (pure functions).
//!
//! Ansible's script inventory protocol: `--list` prints `{group: {hosts: [...]}, ...,
//! "_meta": {"hostvars": {host: {...}}}}`; `--host H` prints H's variables. Group names must be
//! valid Python identifiers for Ansible not to warn, so `-` and `.` become `_`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::policy::State;
use crate::store::Machine;

/// What the inventory needs to know of a profile: its role (for the `role_*` group), and the
/// login its role's registration uses (`ssh_user`: the role's default, or the profile's
/// `[register]` value), so that Ansible logs in as the registrar did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileFacts {
    /// The role name, `none` for none.
    pub role: String,
    /// The registration login, if the profile has a role.
    pub ssh_user: Option<String>,
}

/// Profile name → its [`ProfileFacts`].
pub type Profiles = BTreeMap<String, ProfileFacts>;

/// Machines that belong in an inventory: they have an installed OS (host keys pinned) and an
/// address to reach it.
fn listed(m: &Machine) -> bool {
    !m.host_keys.is_empty()
        && (m.last_ip.is_some() || m.vars.contains_key("ssh_host"))
        && !matches!(
            m.state,
            State::Discovered | State::Enrolled | State::Installing
        )
}

/// The inventory name of a machine: its hostname, or `node-<mac without colons>`.
pub fn host_name(m: &Machine) -> String {
    m.hostname
        .clone()
        .unwrap_or_else(|| format!("node-{}", m.mac.to_string().replace(':', "")))
}

/// Where the machine's SSH server is: the `ssh_host` var, else the address its installed OS
/// phoned home from. The registrar and Ansible use the same answer.
pub fn ssh_host(m: &Machine) -> Option<String> {
    m.vars
        .get("ssh_host")
        .cloned()
        .or_else(|| m.last_ip.clone())
}

fn address(m: &Machine) -> String {
    ssh_host(m).unwrap_or_default()
}

fn group_name(prefix: &str, value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}_{clean}")
}

/// One host's variables, its profile's facts from `profiles`. `ansible_user` is the machine's
/// `ssh_user` var, else its profile's registration login: who the registrar logged in as.
pub fn hostvars(m: &Machine, profiles: &Profiles) -> Value {
    let profile = m.profile.clone().unwrap_or_default();
    let facts = profiles.get(&profile);
    let mut v = json!({
        "ansible_host": address(m),
        "mac": m.mac.to_string(),
        "profile": profile,
        "role": facts.map_or("none", |f| f.role.as_str()),
        "state": m.state.as_str(),
        "vars": m.vars,
        "labels": m.labels,
        "cert_fingerprint": m.cert_fingerprint,
    });
    if let Some(p) = m.vars.get("ssh_port") {
        v["ansible_port"] = json!(p.parse::<u16>().ok());
    }
    if let Some(u) = m
        .vars
        .get("ssh_user")
        .or_else(|| facts.and_then(|f| f.ssh_user.as_ref()))
    {
        v["ansible_user"] = json!(u);
    }
    v
}

/// The whole `--list` answer.
pub fn ansible(machines: &[Machine], profiles: &Profiles) -> Value {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut hostvars_map = Map::new();
    for m in machines.iter().filter(|m| listed(m)) {
        let name = host_name(m);
        let profile = m.profile.clone().unwrap_or_default();
        let role = profiles.get(&profile).map_or("none", |f| f.role.as_str());
        for g in [
            group_name("profile", &profile),
            group_name("role", role),
            group_name("state", m.state.as_str()),
        ] {
            groups.entry(g).or_default().push(name.clone());
        }
        hostvars_map.insert(name, hostvars(m, profiles));
    }
    let mut out = Map::new();
    out.insert(
        "all".into(),
        json!({ "children": groups.keys().collect::<Vec<_>>() }),
    );
    for (g, hosts) in groups {
        out.insert(g, json!({ "hosts": hosts }));
    }
    out.insert("_meta".into(), json!({ "hostvars": hostvars_map }));
    Value::Object(out)
}

/// One host's variables by inventory name, for `--host H` (Ansible wants `{}` for unknown).
pub fn ansible_host(machines: &[Machine], profiles: &Profiles, host: &str) -> Value {
    machines
        .iter()
        .filter(|m| listed(m))
        .find(|m| host_name(m) == host)
        .map(|m| hostvars(m, profiles))
        .unwrap_or_else(|| json!({}))
}

/// `known_hosts` lines for every listed machine: `NAME,ADDR KEY` (`[ADDR]:PORT` off port 22,
/// as OpenSSH writes it), so ssh and Ansible keep strict host-key checking on.
pub fn known_hosts(machines: &[Machine]) -> String {
    let mut out = String::new();
    for m in machines.iter().filter(|m| listed(m)) {
        let addr = address(m);
        let port = m.vars.get("ssh_port").and_then(|p| p.parse::<u16>().ok());
        let hosts = match port {
            Some(p) if p != 22 => format!("[{}]:{p},[{addr}]:{p}", host_name(m)),
            _ => format!("{},{addr}", host_name(m)),
        };
        for k in &m.host_keys {
            out.push_str(&format!("{hosts} {k}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(mac: &str, state: State, host: Option<&str>, ip: Option<&str>) -> Machine {
        Machine {
            mac: mac.parse().unwrap(),
            uuid: None,
            serial: None,
            hostname: host.map(str::to_string),
            profile: Some("hv-24.04".into()),
            inherited: Default::default(),
            dhcp: Default::default(),
            proposed_rule: None,
            state,
            vars: BTreeMap::new(),
            labels: BTreeMap::new(),
            generation: 0,
            arch: None,
            platform: None,
            last_ip: ip.map(str::to_string),
            boot_ip: None,
            last_seen: None,
            failure: None,
            host_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2"
                    .into(),
            ],
            register_steps: vec![],
            cert_fingerprint: Some("AB:CD".into()),
            installer_done_at: None,
            created_at: 0,
            updated_at: 0,
            state_at: 0,
        }
    }

    #[test]
    fn groups_hostvars_and_known_hosts() {
        let roles = Profiles::from([(
            "hv-24.04".to_string(),
            ProfileFacts {
                role: "hypervisor".into(),
                ssh_user: Some("core".into()),
            },
        )]);
        let mut b = machine(
            "52:54:00:00:00:02",
            State::Installed,
            None,
            Some("10.0.0.2"),
        );
        b.vars.insert("ssh_port".into(), "2222".into());
        b.vars.insert("ssh_user".into(), "admin".into());
        let mut pending = machine(
            "52:54:00:00:00:03",
            State::Installing,
            Some("c"),
            Some("10.0.0.3"),
        );
        pending.host_keys.clear();
        let ms = vec![
            machine(
                "52:54:00:00:00:01",
                State::Registered,
                Some("hv1"),
                Some("10.0.0.1"),
            ),
            b,
            pending,
        ];
        let inv = ansible(&ms, &roles);
        assert_eq!(
            inv["role_hypervisor"]["hosts"],
            json!(["hv1", "node-525400000002"])
        );
        assert_eq!(
            inv["profile_hv_24_04"]["hosts"],
            json!(["hv1", "node-525400000002"])
        );
        assert_eq!(inv["state_registered"]["hosts"], json!(["hv1"]));
        let hv1 = &inv["_meta"]["hostvars"]["hv1"];
        assert_eq!(hv1["ansible_host"], "10.0.0.1");
        assert_eq!(hv1["cert_fingerprint"], "AB:CD");
        assert_eq!(hv1["role"], "hypervisor");
        // Ansible logs in as the registrar did: the profile's login, or the machine's own.
        assert_eq!(hv1["ansible_user"], "core");
        let b = &inv["_meta"]["hostvars"]["node-525400000002"];
        assert_eq!(
            (&b["ansible_user"], &b["ansible_port"]),
            (&json!("admin"), &json!(2222))
        );
        assert!(inv["_meta"]["hostvars"].get("c").is_none());
        assert_eq!(ansible_host(&ms, &roles, "hv1"), *hv1);
        assert_eq!(ansible_host(&ms, &roles, "nope"), json!({}));
        let kh = known_hosts(&ms);
        assert!(kh.starts_with("hv1,10.0.0.1 ssh-ed25519 AAAA"), "{kh}");
        assert!(
            kh.contains("[node-525400000002]:2222,[10.0.0.2]:2222 ssh-ed25519"),
            "{kh}"
        );
        assert_eq!(kh.lines().count(), 2);
    }
}
