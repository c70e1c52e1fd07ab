//! Context filters: each output language gets the escaping it needs, or a refusal.
//!
//! minijinja escapes only by file extension (JSON for .json/.yaml), so iPXE scripts, kernel
//! command lines, preseed lines and shell snippets would otherwise receive values raw, and a
//! hostname with a newline would become an iPXE command. These filters are the
//! second defence behind API validation (`crate::validate`).

use minijinja::{Error, ErrorKind, Value};

/// Bytes that may appear in a value placed in an iPXE script line or kernel command line.
///
/// iPXE splits a line on whitespace *after* expanding `${...}` settings, has no quoting that
/// survives expansion, and treats a whole `&&`, `||` or `;` token as a command separator
/// (src/core/exec.c). The kernel splits its command line on spaces and gives `"` a meaning.
/// So a value is safe only if it is a single word of this set; anything else is refused, never
/// rewritten, because a guessed rewrite would boot the machine with a different value.
fn ipxe_safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._-:/=,+@%~[]".contains(&b)
}

/// A template value as text: strings as they are, anything else in its display form.
fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// Refuses a value with a control character for the output named by `place`.
fn no_control(s: &str, place: &str) -> Result<(), Error> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "value {s:?} cannot be placed in {place}: it contains the control character {c:?}"
            ),
        )),
        None => Ok(()),
    }
}

/// Checks one value for an iPXE line or kernel command line (see [`ipxe_safe_byte`]).
pub fn check_ipxe_word(v: &str) -> Result<(), Error> {
    if v.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "an empty value cannot be placed in an iPXE script or kernel command line",
        ));
    }
    if let Some(c) = v.bytes().find(|b| !ipxe_safe_byte(*b)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "value {v:?} cannot be placed in an iPXE script or kernel command line: it contains {:?}; only letters, digits and . _ - : / = , + @ % ~ [ ] are allowed there",
                c as char
            ),
        ));
    }
    Ok(())
}

/// `{{ v | ipxe }}`: the value, if it is one safe word for an iPXE line; an error otherwise.
/// In `.ipxe` templates this check also runs on every `{{ }}` without the filter.
pub fn ipxe(v: &Value) -> Result<Value, Error> {
    let s = text(v);
    check_ipxe_word(&s)?;
    Ok(Value::from_safe_string(s))
}

/// `{{ v | cmdline }}`: the value, if it is one safe word for a kernel command line parameter
/// (which is itself inside an iPXE `kernel` line); an error otherwise.
pub fn cmdline(v: &Value) -> Result<Value, Error> {
    ipxe(v)
}

/// `{{ v | preseed }}`: the value for the end of a debconf preseed line.
///
/// debconf-set-selections reads `owner question type value` up to the end of the line and
/// joins a line ending in a backslash with the next; so a value may hold spaces and quotes,
/// but never a control character (a newline would start a new answer) or a trailing backslash.
pub fn preseed(v: &Value) -> Result<Value, Error> {
    let s = text(v);
    no_control(&s, "a preseed line")?;
    if s.ends_with('\\') {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("value {s:?} cannot end a preseed line with a backslash (debconf would join the next line)"),
        ));
    }
    // Not marked safe: in a YAML or JSON template the result is still JSON-escaped.
    Ok(Value::from(s))
}

/// `{{ v | shell }}`: the value as one POSIX shell word, single-quoted.
///
/// Inside single quotes nothing is special except the closing quote (POSIX.1-2017 XCU
/// 2.2.2), so `'` becomes `'\''`. NUL cannot be passed through a shell at all and is refused.
pub fn shell(state: &minijinja::State, v: &Value) -> Result<Value, Error> {
    let quoted = shell_quote(v)?;
    // In a shell template the auto-escaper would quote the quoted word again.
    if matches!(state.auto_escape(), minijinja::AutoEscape::Custom("shell")) {
        return Ok(Value::from_safe_string(quoted.to_string()));
    }
    Ok(quoted)
}

fn shell_quote(v: &Value) -> Result<Value, Error> {
    let s = text(v);
    if s.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "a value with a NUL byte cannot be passed to a shell",
        ));
    }
    // Not marked safe: in a YAML or JSON template the quoted word is still JSON-escaped.
    Ok(Value::from(format!("'{}'", s.replace('\'', r"'\''"))))
}

/// A value placed by `{{ }}` in a shell template (role steps, hand-off hooks): one quoted
/// word, or one quoted word per item for a list; `|safe` values and values already through
/// `|shell` go in as they are. None and undefined are refused: an empty word where a bridge
/// name belongs would run a different command.
pub fn shell_words(v: &Value) -> Result<String, Error> {
    if v.is_safe() {
        return Ok(v.to_string());
    }
    if v.is_none() || v.is_undefined() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "a missing (none) value cannot be placed in a shell command",
        ));
    }
    if v.kind() == minijinja::value::ValueKind::Seq {
        let words = v
            .try_iter()?
            .map(|item| shell_quote(&item).map(|w| w.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(words.join(" "));
    }
    Ok(shell_quote(v)?.to_string())
}

/// `{{ v | systemd }}`: the value as one argument of a systemd `ExecStart=` line.
///
/// systemd does not run a shell there: it splits on whitespace, honours single and double
/// quotes, and expands `%` specifiers and `$VAR` even inside quotes (systemd.service(5),
/// "Command lines"; systemd.unit(5), "Specifiers"). So `%` becomes `%%`, `$` becomes `$$`,
/// and the result is single-quoted as for a shell; control characters are refused.
pub fn systemd(v: &Value) -> Result<Value, Error> {
    let s = text(v);
    no_control(&s, "a systemd command line")?;
    let escaped = s
        .replace('%', "%%")
        .replace('$', "$$")
        .replace('\\', "\\\\")
        .replace('\'', "\\'");
    Ok(Value::from(format!("'{escaped}'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::from(v)
    }

    #[test]
    fn ipxe_accepts_words_refuses_the_rest() {
        for ok in [
            "node1",
            "http://10.0.0.1:8080/a/b",
            "a=b,c+d@e%41~",
            "52-54-00-ab-cd-ef",
        ] {
            assert_eq!(ipxe(&s(ok)).unwrap().as_str(), Some(ok));
        }
        for bad in [
            "", "a b", "a\nb", "${x}", "a\"b", "a'b", "a;b", "&&", "a|b", "#", "a\\b", "a\tb",
        ] {
            assert!(ipxe(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn preseed_values() {
        assert_eq!(
            preseed(&s("a b 'c' \"d\"")).unwrap().as_str(),
            Some("a b 'c' \"d\"")
        );
        for bad in ["a\nb", "a\rb", "ab\\"] {
            assert!(preseed(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn systemd_arguments() {
        assert_eq!(
            systemd(&s("/dev/sda")).unwrap().as_str(),
            Some("'/dev/sda'")
        );
        assert_eq!(
            systemd(&s("/dev/x%h$HOME")).unwrap().as_str(),
            Some("'/dev/x%%h$$HOME'")
        );
        assert_eq!(systemd(&s("it's")).unwrap().as_str(), Some(r"'it\'s'"));
        assert!(systemd(&s("a\nb")).is_err());
    }

    #[test]
    fn shell_quotes() {
        assert_eq!(shell_quote(&s("plain")).unwrap().as_str(), Some("'plain'"));
        assert_eq!(
            shell_quote(&s("it's $(x)")).unwrap().as_str(),
            Some(r"'it'\''s $(x)'")
        );
        assert!(shell_quote(&s("a\0b")).is_err());
    }
}
