//! Inventory files: the groups, discovery rules and machines of an inventory as one YAML or
//! TOML document, or machines alone as a CSV spreadsheet — what `provision apply` reads and
//! `provision export` writes, so an inventory can be kept in git.
//!
//! Parsing keeps where each key was: the values go through serde (whose errors already say
//! where), but a value that parses and is then refused (a bad hostname, a tie between groups)
//! must be reported at its line too, and neither serde_norway nor toml says where a value came
//! from. So the text is read a second time, as events (YAML, saphyr-parser) or a span-keeping
//! document (TOML, toml_edit), into a map from a value's path (`machines[3].vars.ip`) to its
//! line. Writing is deterministic (sorted, no timestamps): export, apply, export gives the same
//! bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// An inventory file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// YAML (`.yaml`, `.yml`).
    Yaml,
    /// TOML (`.toml`).
    Toml,
    /// CSV (`.csv`): machines only, one per row.
    Csv,
}

impl Format {
    /// The format a file name's extension says, if it says one.
    pub fn of_path(path: &str) -> Option<Format> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        ext.parse().ok()
    }

    /// The name used on the command line and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Yaml => "yaml",
            Format::Toml => "toml",
            Format::Csv => "csv",
        }
    }

    /// The media type of a file in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Yaml => "application/yaml",
            Format::Toml => "application/toml",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "yaml" | "yml" => Ok(Format::Yaml),
            "toml" => Ok(Format::Toml),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("inventory format {s:?}: yaml, toml or csv")),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A whole inventory file. Its entries are the file's own types, not the API's bodies (`dto`):
/// a file leaves out empty maps, defaults and a rule's count (the daemon's, not the operator's),
/// so an export reads as a person would write it.
///
/// A kind left out is not declared: an apply leaves it alone, even
/// with `--prune`; `machines: []` declares that there are none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupEntry>>,
    /// Discovery rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleEntry>>,
    /// Machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines: Option<Vec<MachineEntry>>,
}

/// A group as a file gives it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    /// Unique name.
    pub name: String,
    /// Fact or label → the exact value; none: every machine.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub selector: BTreeMap<String, String>,
    /// Profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Variables.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub vars: BTreeMap<String, String>,
    /// Labels.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub labels: BTreeMap<String, String>,
}

/// A discovery rule as a file gives it (its count is the daemon's: not in the file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    /// Unique name.
    pub name: String,
    /// Lower is tried first (default 100).
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// Default true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// `enroll` (default) or `propose`.
    #[serde(default = "enroll", skip_serializing_if = "is_enroll")]
    pub mode: String,
    /// Conditions: fact or label → value (a trailing `*`: a prefix).
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub conditions: BTreeMap<String, String>,
    /// Profile (none: the machines' groups').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Hostname pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Labels.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub labels: BTreeMap<String, String>,
    /// Variables.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub vars: BTreeMap<String, String>,
    /// Most machines it enrolls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

/// A machine as a file gives it: what `provision enroll` takes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineEntry {
    /// MAC, in any accepted notation.
    pub mac: String,
    /// Its own profile (none: its groups').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// SMBIOS UUID (none: as reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Serial (none: as reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Variables.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub vars: BTreeMap<String, String>,
    /// Labels.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub labels: BTreeMap<String, String>,
}

fn default_priority() -> i64 {
    100
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn enroll() -> String {
    "enroll".into()
}

fn is_enroll(m: &str) -> bool {
    m == "enroll"
}

/// A variable, label or selector value: text, or a number or boolean a person wrote without
/// quotes (`vlan: 100`), kept as the text it reads as.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let m: BTreeMap<String, Scalar> = BTreeMap::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

impl From<GroupEntry> for crate::dto::Group {
    fn from(g: GroupEntry) -> Self {
        crate::dto::Group {
            name: g.name,
            selector: g.selector,
            profile: g.profile,
            vars: g.vars,
            labels: g.labels,
        }
    }
}

impl From<&crate::policy::Group> for GroupEntry {
    fn from(g: &crate::policy::Group) -> Self {
        GroupEntry {
            name: g.name.clone(),
            selector: g.selector.clone(),
            profile: g.profile.clone(),
            vars: g.vars.clone(),
            labels: g.labels.clone(),
        }
    }
}

impl From<RuleEntry> for crate::dto::Rule {
    fn from(r: RuleEntry) -> Self {
        crate::dto::Rule {
            name: r.name,
            priority: r.priority,
            enabled: r.enabled,
            mode: r.mode,
            conditions: r.conditions,
            profile: r.profile,
            hostname: r.hostname,
            labels: r.labels,
            vars: r.vars,
            max: r.max,
            used: 0,
        }
    }
}

impl From<&crate::policy::Rule> for RuleEntry {
    fn from(r: &crate::policy::Rule) -> Self {
        RuleEntry {
            name: r.name.clone(),
            priority: r.priority,
            enabled: r.enabled,
            mode: r.mode.as_str().into(),
            conditions: r.conditions.clone(),
            profile: r.profile.clone(),
            hostname: r.hostname.clone(),
            labels: r.labels.clone(),
            vars: r.vars.clone(),
            max: r.max,
        }
    }
}

impl From<MachineEntry> for crate::dto::EnrollRequest {
    fn from(m: MachineEntry) -> Self {
        crate::dto::EnrollRequest {
            mac: m.mac,
            profile: m.profile,
            hostname: m.hostname,
            uuid: m.uuid,
            serial: m.serial,
            vars: m.vars,
            labels: m.labels,
        }
    }
}

impl From<&crate::store::Machine> for MachineEntry {
    /// Its own values (not its groups').
    fn from(m: &crate::store::Machine) -> Self {
        MachineEntry {
            mac: m.mac.to_string(),
            profile: m.own_profile().map(str::to_string),
            hostname: m.hostname.clone(),
            uuid: m.uuid.clone(),
            serial: m.serial.clone(),
            vars: m.own_vars(),
            labels: m.own_labels(),
        }
    }
}

/// Something wrong in an inventory file, where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The value's path (`machines[3].vars.ip`); empty for the file as a whole.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.line {
            write!(f, "line {l}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A parsed file and where its values were.
#[derive(Debug)]
pub struct Parsed {
    /// What it says.
    pub doc: Document,
    lines: HashMap<String, usize>,
}

impl Parsed {
    /// The line of the value at `path`, or of the nearest enclosing value the file has (a
    /// field left out is reported at its entry).
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// A problem with the value at `path`.
    pub fn problem(&self, path: impl Into<String>, message: impl Into<String>) -> Problem {
        let path = path.into();
        Problem {
            line: self.line(&path),
            path,
            message: message.into(),
        }
    }
}

/// Reads an inventory file.
pub fn parse(text: &str, format: Format) -> Result<Parsed, Problem> {
    let whole = |line: Option<usize>, message: String| Problem {
        line,
        path: String::new(),
        message,
    };
    match format {
        Format::Yaml => {
            // An empty file (or only comments) declares nothing.
            let doc: Document = if text.trim().is_empty() {
                Document::default()
            } else {
                serde_norway::from_str::<Option<Document>>(text)
                    .map_err(|e| {
                        let line = e.location().map(|l| l.line());
                        let mut m = e.to_string();
                        if let Some(i) = m.rfind(" at line ") {
                            m.truncate(i);
                        }
                        whole(line, m)
                    })?
                    .unwrap_or_default()
            };
            Ok(Parsed {
                doc,
                lines: yaml_lines(text),
            })
        }
        Format::Toml => {
            let doc: Document = toml::from_str(text).map_err(|e| {
                let line = e.span().map(|s| line_of(text, s.start));
                whole(line, e.message().to_string())
            })?;
            Ok(Parsed {
                doc,
                lines: toml_lines(text),
            })
        }
        Format::Csv => csv_parse(text),
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Where each key and sequence item of a YAML document starts.
fn yaml_lines(text: &str) -> HashMap<String, usize> {
    use saphyr_parser::{Event, Parser};
    enum Frame {
        Seq(String, usize),
        Map(String, Option<String>),
    }
    // The path of the node about to start under the innermost frame.
    fn child(stack: &[Frame]) -> Option<String> {
        match stack.last()? {
            Frame::Seq(p, i) => Some(format!("{p}[{i}]")),
            Frame::Map(p, Some(k)) if p.is_empty() => Some(k.clone()),
            Frame::Map(p, Some(k)) => Some(format!("{p}.{k}")),
            Frame::Map(_, None) => None,
        }
    }
    // A node under the innermost frame is done: the next one is the next item, or a key.
    fn done(stack: &mut [Frame]) {
        match stack.last_mut() {
            Some(Frame::Seq(_, i)) => *i += 1,
            Some(Frame::Map(_, k)) => *k = None,
            None => {}
        }
    }
    let mut lines = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    for ev in Parser::new_from_str(text) {
        // serde_norway has read the same text: an error here it reported already.
        let Ok((ev, span)) = ev else { break };
        let line = span.start.line();
        match ev {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = if stack.is_empty() {
                    String::new()
                } else {
                    let p = child(&stack).unwrap_or_default();
                    lines.entry(p.clone()).or_insert(line);
                    p
                };
                stack.push(match ev {
                    Event::MappingStart(..) => Frame::Map(path, None),
                    _ => Frame::Seq(path, 0),
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                done(&mut stack);
            }
            Event::Scalar(v, ..) => match stack.last_mut() {
                Some(Frame::Map(p, key @ None)) => {
                    let path = if p.is_empty() {
                        v.to_string()
                    } else {
                        format!("{p}.{v}")
                    };
                    lines.insert(path, line);
                    *key = Some(v.to_string());
                }
                _ => {
                    if let Some(p) = child(&stack) {
                        lines.entry(p).or_insert(line);
                    }
                    done(&mut stack);
                }
            },
            Event::Alias(_) => done(&mut stack),
            _ => {}
        }
    }
    lines
}

/// Where each key and array item of a TOML document starts.
fn toml_lines(text: &str) -> HashMap<String, usize> {
    use toml_edit::{Item, Value};
    fn join(p: &str, k: &str) -> String {
        if p.is_empty() {
            k.to_string()
        } else {
            format!("{p}.{k}")
        }
    }
    fn value(v: &Value, path: &str, text: &str, lines: &mut HashMap<String, usize>) {
        if let Some(s) = v.span() {
            lines
                .entry(path.to_string())
                .or_insert(line_of(text, s.start));
        }
        match v {
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    value(v, &format!("{path}[{i}]"), text, lines);
                }
            }
            Value::InlineTable(t) => {
                for (k, v) in t.iter() {
                    let p = join(path, k);
                    if let Some(s) = t.key(k).and_then(|k| k.span()) {
                        lines.insert(p.clone(), line_of(text, s.start));
                    }
                    value(v, &p, text, lines);
                }
            }
            _ => {}
        }
    }
    fn table(t: &toml_edit::Table, path: &str, text: &str, lines: &mut HashMap<String, usize>) {
        if let Some(s) = t.span() {
            lines
                .entry(path.to_string())
                .or_insert(line_of(text, s.start));
        }
        for (k, item) in t.iter() {
            let p = join(path, k);
            if let Some(s) = t.key(k).and_then(|k| k.span()) {
                lines.insert(p.clone(), line_of(text, s.start));
            }
            match item {
                Item::Table(t) => table(t, &p, text, lines),
                Item::ArrayOfTables(a) => {
                    for (i, t) in a.iter().enumerate() {
                        table(t, &format!("{p}[{i}]"), text, lines);
                    }
                }
                Item::Value(v) => value(v, &p, text, lines),
                Item::None => {}
            }
        }
    }
    let mut lines = HashMap::new();
    if let Ok(doc) = toml_edit::ImDocument::parse(text) {
        table(doc.as_table(), "", text, &mut lines);
    }
    lines
}

/// The fixed columns of a machines CSV; the others are `vars.NAME` and `labels.NAME`.
const CSV_COLUMNS: [&str; 5] = ["mac", "profile", "hostname", "uuid", "serial"];

/// Reads a machines CSV: a header row, then one machine per row; an empty cell is a value
/// not set.
fn csv_parse(text: &str) -> Result<Parsed, Problem> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let problem = |line: Option<u64>, path: String, message: String| Problem {
        line: line.map(|l| l as usize),
        path,
        message,
    };
    let csv_error = |e: csv::Error| {
        let line = e.position().map(|p| p.line());
        problem(line, String::new(), e.to_string())
    };
    let header: Vec<String> = r
        .headers()
        .map_err(csv_error)?
        .iter()
        .map(str::to_string)
        .collect();
    let mut seen = BTreeSet::new();
    for h in &header {
        let known = CSV_COLUMNS.contains(&h.as_str())
            || h.strip_prefix("vars.").is_some_and(|k| !k.is_empty())
            || h.strip_prefix("labels.").is_some_and(|k| !k.is_empty());
        if !known {
            return Err(problem(
                Some(1),
                String::new(),
                format!(
                    "column {h:?}: the columns are mac, profile, hostname, uuid, serial, vars.NAME and labels.NAME"
                ),
            ));
        }
        if !seen.insert(h.as_str()) {
            return Err(problem(
                Some(1),
                String::new(),
                format!("column {h:?} twice"),
            ));
        }
    }
    if !seen.contains("mac") {
        return Err(problem(
            Some(1),
            String::new(),
            "no mac column: the first row names the columns (mac, profile, hostname, …)".into(),
        ));
    }
    let mut machines = Vec::new();
    let mut lines = HashMap::new();
    for (i, row) in r.records().enumerate() {
        let row = row.map_err(csv_error)?;
        let line = row.position().map_or(i + 2, |p| p.line() as usize);
        let path = format!("machines[{i}]");
        lines.insert(path.clone(), line);
        let mut m = MachineEntry::default();
        for (h, cell) in header.iter().zip(row.iter()) {
            lines.insert(format!("{path}.{h}"), line);
            if cell.is_empty() {
                continue;
            }
            let v = Some(cell.to_string());
            match h.as_str() {
                "mac" => m.mac = cell.to_string(),
                "profile" => m.profile = v,
                "hostname" => m.hostname = v,
                "uuid" => m.uuid = v,
                "serial" => m.serial = v,
                other => {
                    let (map, k) = match other.split_once('.') {
                        Some(("vars", k)) => (&mut m.vars, k),
                        Some((_, k)) => (&mut m.labels, k),
                        None => unreachable!("checked with the header"),
                    };
                    map.insert(k.to_string(), cell.to_string());
                }
            }
        }
        machines.push(m);
    }
    Ok(Parsed {
        doc: Document {
            machines: Some(machines),
            ..Default::default()
        },
        lines,
    })
}

/// The first line of a YAML or TOML export.
pub const HEADER: &str =
    "# provision inventory: `provision apply -f FILE` converges the daemon to it; `provision export` writes it.\n";

/// Writes `doc` in `format` (CSV: its machines only).
pub fn write(doc: &Document, format: Format) -> Result<String, String> {
    match format {
        Format::Yaml => serde_norway::to_string(doc)
            .map(|s| format!("{HEADER}{s}"))
            .map_err(|e| e.to_string()),
        Format::Toml => toml::to_string(doc)
            .map(|s| format!("{HEADER}{s}"))
            .map_err(|e| e.to_string()),
        Format::Csv => csv_write(doc.machines.as_deref().unwrap_or_default()),
    }
}

fn csv_write(machines: &[MachineEntry]) -> Result<String, String> {
    let vars: BTreeSet<&String> = machines.iter().flat_map(|m| m.vars.keys()).collect();
    let labels: BTreeSet<&String> = machines.iter().flat_map(|m| m.labels.keys()).collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = CSV_COLUMNS.iter().map(|c| c.to_string()).collect();
    header.extend(vars.iter().map(|k| format!("vars.{k}")));
    header.extend(labels.iter().map(|k| format!("labels.{k}")));
    w.write_record(&header).map_err(|e| e.to_string())?;
    for m in machines {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let mut row = vec![
            m.mac.clone(),
            text(&m.profile),
            text(&m.hostname),
            text(&m.uuid),
            text(&m.serial),
        ];
        row.extend(
            vars.iter()
                .map(|k| m.vars.get(*k).cloned().unwrap_or_default()),
        );
        row.extend(
            labels
                .iter()
                .map(|k| m.labels.get(*k).cloned().unwrap_or_default()),
        );
        w.write_record(&row).map_err(|e| e.to_string())?;
    }
    let bytes = w.into_inner().map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
#[path = "declare_tests.rs"]
mod tests;
