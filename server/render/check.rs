//! Validation of every render before it is served: a config that an installer cannot parse
//! fails here, with a message, rather than an hour later on a machine's console.

use serde::Deserialize;
use serde_json::Value as Json;

use super::ArtifactKind;

/// Checks `body` as an artifact of `kind`; the error says what is wrong.
pub fn check(kind: ArtifactKind, body: &str) -> Result<(), String> {
    match kind {
        ArtifactKind::Ipxe => ipxe(body),
        ArtifactKind::CloudConfig => cloud_config(body).map(|_| ()),
        ArtifactKind::Autoinstall => autoinstall(body),
        ArtifactKind::MetaData => meta_data(body),
        ArtifactKind::Yaml => yaml_doc(body).map(|_| ()),
        ArtifactKind::Ignition => ignition(body),
        ArtifactKind::Preseed => preseed(body),
        ArtifactKind::Text => Ok(()),
    }
}

fn ipxe(body: &str) -> Result<(), String> {
    if !body.starts_with("#!ipxe\n") {
        return Err("an iPXE script must start with the line #!ipxe".into());
    }
    if let Some(c) = body.chars().find(|c| c.is_control() && *c != '\n') {
        return Err(format!("iPXE script contains the control character {c:?}"));
    }
    Ok(())
}

fn yaml_doc(body: &str) -> Result<serde_norway::Value, String> {
    serde_norway::from_str(body).map_err(|e| format!("not valid YAML: {e}"))
}

fn yaml_mapping(body: &str, what: &str) -> Result<serde_norway::Mapping, String> {
    match yaml_doc(body)? {
        serde_norway::Value::Mapping(m) => Ok(m),
        other => Err(format!(
            "{what} must be a YAML mapping, got {}",
            yaml_type(&other)
        )),
    }
}

fn yaml_type(v: &serde_norway::Value) -> &'static str {
    match v {
        serde_norway::Value::Null => "nothing",
        serde_norway::Value::Bool(_) => "a boolean",
        serde_norway::Value::Number(_) => "a number",
        serde_norway::Value::String(_) => "a string",
        serde_norway::Value::Sequence(_) => "a list",
        serde_norway::Value::Mapping(_) => "a mapping",
        serde_norway::Value::Tagged(_) => "a tagged value",
    }
}

/// cloud-init only treats user-data as cloud-config when its first line is `#cloud-config`
/// (cloud-init docs, "User data formats"); without it the file is silently ignored.
fn cloud_config(body: &str) -> Result<serde_norway::Mapping, String> {
    if body.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Err("cloud-config must start with the line #cloud-config".into());
    }
    yaml_mapping(body, "cloud-config")
}

/// Subiquity refuses an autoinstall section without `version: 1` (Ubuntu autoinstall
/// reference, "version").
fn autoinstall(body: &str) -> Result<(), String> {
    let m = cloud_config(body)?;
    let Some(ai) = m.get("autoinstall") else {
        return Err("autoinstall user-data has no autoinstall: section".into());
    };
    let version = ai.get("version").and_then(|v| v.as_u64());
    if version != Some(1) {
        return Err("the autoinstall: section must have version: 1".into());
    }
    Ok(())
}

/// NoCloud meta-data needs an instance-id: cloud-init uses it to decide whether this is a
/// first boot.
fn meta_data(body: &str) -> Result<(), String> {
    let m = yaml_mapping(body, "meta-data")?;
    match m.get("instance-id") {
        Some(serde_norway::Value::String(s)) if !s.is_empty() => Ok(()),
        _ => Err("meta-data must have a non-empty instance-id".into()),
    }
}

/// debconf-set-selections format: `owner question type value`, `#` comments, a trailing
/// backslash continues the line.
fn preseed(body: &str) -> Result<(), String> {
    const TYPES: &[&str] = &[
        "string",
        "boolean",
        "select",
        "multiselect",
        "note",
        "password",
        "text",
        "title",
        "error",
        "seen",
    ];
    let mut logical = String::new();
    for (n, line) in body.lines().enumerate() {
        if let Some(c) = line.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(format!("line {}: control character {c:?}", n + 1));
        }
        if let Some(cont) = line.strip_suffix('\\') {
            logical.push_str(cont);
            continue;
        }
        logical.push_str(line);
        let l = std::mem::take(&mut logical);
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = t.split_whitespace().collect();
        if fields.len() < 3 || !TYPES.contains(&fields[2]) {
            return Err(format!(
                "line {}: {t:?} is not `owner question type value` with a debconf type",
                n + 1
            ));
        }
        if fields[2] == "boolean" && !matches!(fields.get(3), Some(&"true") | Some(&"false")) {
            return Err(format!(
                "line {}: a boolean answer must be true or false",
                n + 1
            ));
        }
    }
    if !logical.is_empty() {
        return Err("the last line ends with a backslash".into());
    }
    Ok(())
}

// Ignition v3: the parts of the config spec (coreos/ignition docs, configuration-v3_x) that a
// provisioning config uses, with unknown keys refused as Ignition itself refuses them.
// `ignition-validate` checks the whole spec in the test suite.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnConfig {
    ignition: IgnMeta,
    #[serde(default)]
    storage: Option<IgnStorage>,
    #[serde(default)]
    systemd: Option<IgnSystemd>,
    #[serde(default)]
    passwd: Option<IgnPasswd>,
    #[serde(default, rename = "kernelArguments")]
    kernel_arguments: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnMeta {
    version: String,
    #[serde(default)]
    config: Option<Json>,
    #[serde(default)]
    timeouts: Option<Json>,
    #[serde(default)]
    security: Option<Json>,
    #[serde(default)]
    proxy: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct IgnStorage {
    #[serde(default)]
    files: Vec<IgnFile>,
    #[serde(default)]
    directories: Vec<IgnNode>,
    #[serde(default)]
    links: Vec<IgnLink>,
    #[serde(default)]
    disks: Option<Json>,
    #[serde(default)]
    raid: Option<Json>,
    #[serde(default)]
    filesystems: Option<Json>,
    #[serde(default)]
    luks: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnFile {
    path: String,
    #[serde(default)]
    contents: Option<IgnResource>,
    #[serde(default)]
    append: Vec<IgnResource>,
    #[serde(default)]
    mode: Option<u32>,
    #[serde(default)]
    overwrite: Option<bool>,
    #[serde(default)]
    user: Option<Json>,
    #[serde(default)]
    group: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnNode {
    path: String,
    #[serde(default)]
    mode: Option<u32>,
    #[serde(default)]
    overwrite: Option<bool>,
    #[serde(default)]
    user: Option<Json>,
    #[serde(default)]
    group: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnLink {
    path: String,
    target: String,
    #[serde(default)]
    hard: Option<bool>,
    #[serde(default)]
    overwrite: Option<bool>,
    #[serde(default)]
    user: Option<Json>,
    #[serde(default)]
    group: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct IgnResource {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default)]
    verification: Option<Json>,
    #[serde(default)]
    http_headers: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnSystemd {
    #[serde(default)]
    units: Vec<IgnUnit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnUnit {
    name: String,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    mask: Option<bool>,
    #[serde(default)]
    contents: Option<String>,
    #[serde(default)]
    dropins: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct IgnPasswd {
    #[serde(default)]
    users: Vec<IgnUser>,
    #[serde(default)]
    groups: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct IgnUser {
    name: String,
    #[serde(default)]
    ssh_authorized_keys: Vec<String>,
    #[serde(default)]
    password_hash: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    home_dir: Option<String>,
    #[serde(default)]
    shell: Option<String>,
    #[serde(default)]
    uid: Option<i64>,
    #[serde(default)]
    gecos: Option<String>,
    #[serde(default)]
    no_create_home: Option<bool>,
    #[serde(default)]
    primary_group: Option<String>,
    #[serde(default)]
    no_user_group: Option<bool>,
    #[serde(default)]
    no_log_init: Option<bool>,
    #[serde(default)]
    system: Option<bool>,
    #[serde(default)]
    should_exist: Option<bool>,
}

fn ignition(body: &str) -> Result<(), String> {
    let cfg: IgnConfig =
        serde_json::from_str(body).map_err(|e| format!("not a valid Ignition v3 config: {e}"))?;
    let v = &cfg.ignition.version;
    let parts: Vec<&str> = v.split('.').collect();
    let numeric = parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok());
    if !numeric || parts[0] != "3" {
        return Err(format!(
            "ignition.version {v:?} is not a v3 spec version (3.0.0 to 3.5.0)"
        ));
    }
    let minor: u32 = parts[1].parse().unwrap_or(99);
    if minor > 5 || parts[2] != "0" {
        return Err(format!(
            "ignition.version {v:?} is not a released v3 spec version (3.0.0 to 3.5.0)"
        ));
    }
    for f in cfg.storage.iter().flat_map(|s| &s.files) {
        if !f.path.starts_with('/') {
            return Err(format!("storage file path {:?} must be absolute", f.path));
        }
        if let Some(src) = f.contents.as_ref().and_then(|c| c.source.as_deref()) {
            let known = [
                "data:", "http://", "https://", "tftp://", "s3://", "gs://", "arn:",
            ];
            if !known.iter().any(|p| src.starts_with(p)) {
                return Err(format!(
                    "storage file {} has an unsupported source URL",
                    f.path
                ));
            }
        }
    }
    for u in cfg.systemd.iter().flat_map(|s| &s.units) {
        let ok = [
            ".service",
            ".socket",
            ".target",
            ".timer",
            ".mount",
            ".path",
            ".device",
            ".swap",
            ".slice",
            ".scope",
            ".automount",
        ];
        if !ok.iter().any(|s| u.name.ends_with(s)) {
            return Err(format!("systemd unit {:?} has no unit type suffix", u.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignition_checks() {
        check(
            ArtifactKind::Ignition,
            r#"{"ignition":{"version":"3.4.0"}}"#,
        )
        .unwrap();
        for bad in [
            r#"{"ignition":{"version":"2.2.0"}}"#,
            r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"etc/x"}]}}"#,
            r#"{"ignition":{"version":"3.4.0"},"bogus":1}"#,
            r#"{"ignition":{"version":"3.4.0"},"systemd":{"units":[{"name":"x"}]}}"#,
            r#"{"ignition":{"version":"3.4.0"},"passwd":{"users":[{"name":"core","sshAuthorizedKeys":"k"}]}}"#,
            "{",
        ] {
            assert!(check(ArtifactKind::Ignition, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cloud_config_checks() {
        check(ArtifactKind::CloudConfig, "#cloud-config\nhostname: x\n").unwrap();
        assert!(check(ArtifactKind::CloudConfig, "hostname: x\n").is_err());
        assert!(check(ArtifactKind::CloudConfig, "#cloud-config\n- a\n").is_err());
        check(
            ArtifactKind::Autoinstall,
            "#cloud-config\nautoinstall:\n  version: 1\n",
        )
        .unwrap();
        assert!(check(
            ArtifactKind::Autoinstall,
            "#cloud-config\nautoinstall:\n  version: 2\n"
        )
        .is_err());
        check(ArtifactKind::MetaData, "instance-id: i-1\n").unwrap();
        assert!(check(ArtifactKind::MetaData, "local-hostname: x\n").is_err());
    }

    #[test]
    fn preseed_checks() {
        check(
            ArtifactKind::Preseed,
            "# c\nd-i netcfg/get_hostname string node1\nd-i preseed/late_command string \\\n  echo hi\nd-i x/y boolean true\n",
        )
        .unwrap();
        for bad in [
            "d-i netcfg/get_hostname\n",
            "d-i a/b strin x\n",
            "d-i a/b boolean yes\n",
            "d-i a/b string x \\",
        ] {
            assert!(check(ArtifactKind::Preseed, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipxe_checks() {
        check(ArtifactKind::Ipxe, "#!ipxe\nexit\n").unwrap();
        assert!(check(ArtifactKind::Ipxe, "exit\n").is_err());
        assert!(check(ArtifactKind::Ipxe, "#!ipxe\necho a\rb\n").is_err());
    }
}
