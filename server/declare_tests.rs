use super::*;

const YAML: &str = "\
# a rack
groups:
  - name: rack3
    selector:
      serial: CZ1
    profile: debian-12
    vars: {vlan: 100, tagged: true}
rules:
  - name: oui
    priority: 10
    match:
      mac: '52:54:00:*'
    hostname: rack3-{index:02}
    max: 4
machines:
  - mac: 52:54:00:00:00:01
    hostname: a
    vars:
      ip: 10.0.0.5
  - mac: 52-54-00-00-00-02
    labels: {rack: r3}
";

#[test]
fn yaml_values_and_the_line_of_each() {
    let p = parse(YAML, Format::Yaml).unwrap();
    let groups = p.doc.groups.as_ref().unwrap();
    // Unquoted numbers and booleans are kept as the text they read as.
    assert_eq!(groups[0].vars["vlan"], "100");
    assert_eq!(groups[0].vars["tagged"], "true");
    let rules = p.doc.rules.as_ref().unwrap();
    assert_eq!(
        (rules[0].priority, rules[0].enabled, rules[0].mode.as_str()),
        (10, true, "enroll")
    );
    let machines = p.doc.machines.as_ref().unwrap();
    assert_eq!(machines[0].mac, "52:54:00:00:00:01");
    for (path, line) in [
        ("groups", 2),
        ("groups[0]", 3),
        ("groups[0].name", 3),
        ("groups[0].selector.serial", 5),
        ("groups[0].vars.vlan", 7),
        ("rules[0].match.mac", 12),
        ("rules[0].max", 14),
        ("machines[0]", 16),
        ("machines[0].vars.ip", 19),
        ("machines[1]", 20),
        ("machines[1].labels.rack", 21),
        // Not in the file: the nearest enclosing value.
        ("machines[1].profile", 20),
        ("machines[0].vars.gone", 18),
    ] {
        assert_eq!(p.line(path), Some(line), "{path}");
    }
}

#[test]
fn toml_values_and_the_line_of_each() {
    let text = "\
[[groups]]
name = \"rack3\"
profile = \"debian-12\"
selector = { serial = \"CZ1\" }

[[machines]]
mac = \"52:54:00:00:00:01\"
hostname = \"a\"

[[machines]]
mac = \"52:54:00:00:00:02\"
[machines.vars]
vlan = 100
";
    let p = parse(text, Format::Toml).unwrap();
    assert!(p.doc.rules.is_none());
    assert_eq!(p.doc.machines.as_ref().unwrap()[1].vars["vlan"], "100");
    for (path, line) in [
        ("groups[0]", 1),
        ("groups[0].profile", 3),
        ("groups[0].selector.serial", 4),
        ("machines[0].hostname", 8),
        ("machines[1]", 10),
        ("machines[1].vars.vlan", 13),
    ] {
        assert_eq!(p.line(path), Some(line), "{path}");
    }
}

#[test]
fn csv_rows_are_machines_with_vars_and_labels_columns() {
    let text = "mac,hostname,vars.ip,labels.rack\n\
                52:54:00:00:00:01,a,10.0.0.5,r3\n\
                \"52:54:00:00:00:02\",,,\"r,4\"\n";
    let p = parse(text, Format::Csv).unwrap();
    let m = p.doc.machines.as_ref().unwrap();
    assert!(p.doc.groups.is_none() && p.doc.rules.is_none());
    assert_eq!(m[0].vars["ip"], "10.0.0.5");
    assert_eq!(m[1].hostname, None, "an empty cell is no value");
    assert!(m[1].vars.is_empty());
    assert_eq!(m[1].labels["rack"], "r,4");
    assert_eq!(p.line("machines[1].labels.rack"), Some(3));
    let bad = parse("mac,colour\n52:54:00:00:00:01,red\n", Format::Csv).unwrap_err();
    assert_eq!(bad.line, Some(1));
    assert!(bad.message.contains("\"colour\""), "{bad}");
    let none = parse("hostname\na\n", Format::Csv).unwrap_err();
    assert!(none.message.contains("no mac column"), "{none}");
}

#[test]
fn a_file_that_does_not_parse_says_where() {
    let e = parse(
        "machines:\n  - mac: 52:54:00:00:00:01\n    colour: red\n",
        Format::Yaml,
    )
    .unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    assert!(!e.to_string().contains(" at line "), "said once: {e}");
    let e = parse("[[rules]]\nname = \"r\"\nmax = \"ten\"\n", Format::Toml).unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = parse("machines:\n  - mac: [1, 2]\n", Format::Yaml).unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    // Nothing at all declares nothing.
    assert_eq!(
        parse("# empty\n", Format::Yaml).unwrap().doc,
        Document::default()
    );
}

#[test]
fn what_is_written_reads_back_the_same_in_every_format() {
    let doc = parse(YAML, Format::Yaml).unwrap().doc;
    for format in [Format::Yaml, Format::Toml] {
        let text = write(&doc, format).unwrap();
        assert!(text.starts_with(HEADER));
        let again = parse(&text, format).unwrap().doc;
        assert_eq!(again, doc, "{format}:\n{text}");
        assert_eq!(write(&again, format).unwrap(), text, "{format}");
    }
    let machines_only = Document {
        machines: doc.machines.clone(),
        ..Default::default()
    };
    let text = write(&doc, Format::Csv).unwrap();
    assert_eq!(
        text.lines().next(),
        Some("mac,profile,hostname,uuid,serial,vars.ip,labels.rack")
    );
    assert_eq!(parse(&text, Format::Csv).unwrap().doc, machines_only);
}

#[test]
fn formats_by_name_and_by_file_name() {
    assert_eq!(Format::of_path("inv/site.yml"), Some(Format::Yaml));
    assert_eq!(Format::of_path("site.TOML"), Some(Format::Toml));
    assert_eq!(Format::of_path("rack3.csv"), Some(Format::Csv));
    assert_eq!(Format::of_path("inventory"), None);
    assert!("json".parse::<Format>().is_err());
}
