//! Validation of inventory values at the API boundary.
//!
//! This is the first of two defences: values are checked here
//! when they enter the inventory, and escaped or refused again by the context filters in
//! [`crate::render`] when they reach an output. Messages say what was wrong and what is allowed,
//! because they are shown to the operator as they are.

use std::collections::BTreeMap;

/// A value that may not enter the inventory, with the reason in words for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// Checks a hostname against RFC 1123 section 2.1 (as refined by RFC 952): dot-separated
/// labels of letters, digits and hyphens, 1-63 characters each, not starting or ending with a
/// hyphen, 253 characters in all.
pub fn hostname(h: &str) -> Result<(), Invalid> {
    if h.is_empty() || h.len() > 253 {
        return Err(invalid(format!(
            "hostname {h:?} must be 1 to 253 characters long"
        )));
    }
    for label in h.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if label.is_empty()
            || label.len() > 63
            || !ok_chars
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(invalid(format!(
                "hostname {h:?} is not a valid RFC 1123 name: each dot-separated label must be 1-63 letters, digits or hyphens, not starting or ending with a hyphen"
            )));
        }
    }
    Ok(())
}

/// Checks a variable or label name: an identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 64
/// characters), so it can be used as `vars.NAME` in a template and never needs quoting.
pub fn var_name(k: &str) -> Result<(), Invalid> {
    let mut bytes = k.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || k.len() > 64 || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(invalid(format!(
            "variable name {k:?} must start with a letter or underscore and contain only letters, digits and underscores (at most 64)"
        )));
    }
    Ok(())
}

/// Checks free text (a variable value, a label value, a serial): no control characters at all,
/// so no value can add a line to any output, and at most 4096 bytes. Spaces, quotes and `$` are
/// allowed here; each output context escapes them or refuses them when rendering.
pub fn text(what: &str, v: &str) -> Result<(), Invalid> {
    if v.len() > 4096 {
        return Err(invalid(format!("{what} is longer than 4096 bytes")));
    }
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "{what} {v:?} contains the control character {c:?}; newlines, tabs and other control characters are not allowed"
        )));
    }
    Ok(())
}

/// Checks a map of variables: every name an identifier, every value free text.
pub fn vars(vars: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for (k, v) in vars {
        var_name(k)?;
        text(&format!("variable {k}"), v)?;
    }
    Ok(())
}

/// Checks a machine's labels: named like variables, free-text values, and none named like
/// a fact a group selector reads (`mac`, `uuid`, `serial`, …): a selector key then means one
/// thing.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for (k, v) in labels {
        var_name(k).map_err(|_| {
            invalid(format!(
                "label name {k:?} must start with a letter or underscore and contain only letters, digits and underscores (at most 64)"
            ))
        })?;
        if crate::policy::FACT_KEYS.contains(&k.as_str()) {
            return Err(invalid(format!(
                "label name {k:?} is taken: group selectors read {k} from the machine itself; name the label otherwise (e.g. {k}_label)"
            )));
        }
        text(&format!("label {k}"), v)?;
    }
    Ok(())
}

/// Checks a group name: as a profile name (1-64 letters, digits, `.`, `_`, `-`).
pub fn group_name(g: &str) -> Result<(), Invalid> {
    profile_name(g).map_err(|_| {
        invalid(format!(
            "group name {g:?} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    })
}

/// Checks a group selector and returns it normalised: each key a machine fact (`mac`,
/// `uuid`, `serial`, `hostname`, `arch`, `platform`) or a label name, each value non-empty;
/// a MAC in any accepted form becomes the inventory's form and a UUID lower case, so the
/// selector compares equal to what the inventory stores.
pub fn selector(sel: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, Invalid> {
    let mut out = BTreeMap::new();
    for (k, v) in sel {
        var_name(k).map_err(|_| {
            invalid(format!(
                "selector key {k:?} must be one of {} or a label name (letters, digits, underscores)",
                crate::policy::FACT_KEYS.join(", ")
            ))
        })?;
        if v.is_empty() {
            return Err(invalid(format!(
                "selector {k}= has no value; a selector matches exact values (leave the key out to match any)"
            )));
        }
        let v = match k.as_str() {
            "mac" => v
                .parse::<crate::mac::Mac>()
                .map_err(|e| invalid(format!("selector mac={v}: {e}")))?
                .to_string(),
            "uuid" => {
                uuid(v)?;
                v.to_lowercase()
            }
            "hostname" => {
                hostname(v)?;
                v.clone()
            }
            _ => {
                text(&format!("selector {k}"), v)?;
                v.clone()
            }
        };
        out.insert(k.clone(), v);
    }
    Ok(out)
}

/// Checks a rule's conditions and returns them normalised: each key a fact a rule reads
/// (`mac`, `uuid`, `serial`, `arch`, `platform`, `vendor_class`, `user_class`, `interface`,
/// `relay`) or a label name, each value non-empty text, a trailing `*` meaning a prefix. A MAC
/// (or a prefix of whole octets, `52:54:00:*`, in any notation) becomes the inventory's form
/// and a UUID lower case, so a condition compares equal to what the inventory stores.
pub fn conditions(c: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, Invalid> {
    let mut out = BTreeMap::new();
    for (k, v) in c {
        var_name(k).map_err(|_| {
            invalid(format!(
                "match key {k:?} must be one of {} or a label name (letters, digits, underscores)",
                crate::policy::RULE_FACTS.join(", ")
            ))
        })?;
        if v.is_empty() {
            return Err(invalid(format!(
                "match {k}= has no value; leave the key out to match any"
            )));
        }
        text(&format!("match {k}"), v)?;
        let v = match (k.as_str(), v.strip_suffix('*')) {
            ("mac", Some(prefix)) => {
                let hex: String = prefix
                    .chars()
                    .filter(|c| !matches!(c, ':' | '-' | '.'))
                    .collect::<String>()
                    .to_ascii_lowercase();
                if hex.is_empty()
                    || hex.len() % 2 != 0
                    || hex.len() > 10
                    || !hex.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(invalid(format!(
                        "match mac={v}: a MAC prefix is whole octets followed by *, e.g. 52:54:00:* (an OUI)"
                    )));
                }
                let octets: Vec<&str> = (0..hex.len()).step_by(2).map(|i| &hex[i..i + 2]).collect();
                format!("{}:*", octets.join(":"))
            }
            ("mac", None) => v
                .parse::<crate::mac::Mac>()
                .map_err(|e| invalid(format!("match mac={v}: {e}")))?
                .to_string(),
            ("uuid", None) => {
                uuid(v)?;
                v.to_lowercase()
            }
            ("uuid", Some(_)) => v.to_lowercase(),
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    Ok(out)
}

/// Checks a group's variables: as a machine's, except those only one machine may have.
pub fn group_vars(vars: &BTreeMap<String, String>) -> Result<(), Invalid> {
    self::vars(vars)?;
    if let Some(k) = crate::policy::MACHINE_ONLY_VARS
        .iter()
        .find(|k| vars.contains_key(**k))
    {
        return Err(invalid(format!(
            "variable {k} belongs to one machine (a DHCP reservation or SSH address), not to a group: set it on the machine"
        )));
    }
    Ok(())
}

/// Checks a SMBIOS UUID as iPXE prints `${uuid}`: 8-4-4-4-12 hex digits.
pub fn uuid(u: &str) -> Result<(), Invalid> {
    let groups: Vec<&str> = u.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(invalid(format!(
            "UUID {u:?} must look like 8-4-4-4-12 hex digits, e.g. 4c4c4544-0038-4410-8051-b4c04f4d4e32"
        )));
    }
    Ok(())
}

/// Checks a profile name: letters, digits, `.`, `_` and `-`, as used for file names.
pub fn profile_name(p: &str) -> Result<(), Invalid> {
    if p.is_empty()
        || p.len() > 64
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || p.starts_with('.')
    {
        return Err(invalid(format!(
            "profile name {p:?} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )));
    }
    Ok(())
}

/// The first `n` characters of `s` (and an ellipsis if there were more), for messages that
/// quote input.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["node1", "node-1.lab.example", "a", "1host", &"a".repeat(63)] {
            hostname(ok).unwrap();
        }
        for bad in [
            "",
            "-node",
            "node-",
            "no_de",
            "a..b",
            "node 1",
            "node\n1",
            "n${x}",
            "node\"",
            &"a".repeat(64),
        ] {
            assert!(hostname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn var_names_and_text() {
        var_name("ntp_server").unwrap();
        var_name("_x1").unwrap();
        for bad in ["", "1x", "a-b", "a b", "a.b", "${x}"] {
            assert!(var_name(bad).is_err(), "{bad:?}");
        }
        text("v", "a b 'c' \"d\" ${e}").unwrap();
        for bad in ["a\nb", "a\rb", "a\tb", "\u{0}", "\u{7f}", "a\u{85}b"] {
            assert!(text("v", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuids() {
        uuid("4c4c4544-0038-4410-8051-b4c04f4d4e32").unwrap();
        assert!(uuid("4c4c4544003844108051b4c04f4d4e32").is_err());
        assert!(uuid("4c4c4544-0038-4410-8051-b4c04f4d4e3z").is_err());
    }
}
