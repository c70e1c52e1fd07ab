//! The web UI's pages: minijinja templates from `web/templates/`, embedded in the binary.
//!
//! They live here because this is minijinja's one home; the handlers (`http/ui/`) build the
//! values and never see the engine. Every page template ends in `.html`, so minijinja
//! HTML-escapes every `{{ }}` (inventory values are untrusted: a hostname or label may hold
//! markup); nothing in the templates marks a value `safe`, and `ui::tests` renders a hostile
//! value to prove it. Undefined values are errors, as for installer templates: a typo fails
//! the page in tests instead of showing an empty cell.

use include_dir::{include_dir, Dir};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::RenderError;

static PAGES: Dir = include_dir!("$CARGO_MANIFEST_DIR/web/templates");

/// The UI's templates, parsed once at start.
pub struct Pages {
    env: Environment<'static>,
}

/// Unix ms as UTC `YYYY-MM-DD HH:MM:SS`.
fn time(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

/// How long ago Unix ms `ms` was, in the largest unit that fits (`42 s`, `5 min`, `3 h`,
/// `2 d`).
fn age(ms: i64) -> String {
    let secs = (crate::store::now_ms() - ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

impl Pages {
    /// Parses every template; a template that does not parse is a build defect, found by
    /// the tests, so this fails loudly.
    pub fn new() -> Result<Pages, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_filter("time", time);
        env.add_filter("age", age);
        for f in PAGES.files() {
            let name = f.path().to_string_lossy().into_owned();
            let text = f.contents_utf8().ok_or_else(|| RenderError::Template {
                what: name.clone(),
                message: "not UTF-8".into(),
            })?;
            env.add_template_owned(name.clone(), text.to_string())
                .map_err(|e| RenderError::Template {
                    what: name,
                    message: format!("{e:#}"),
                })?;
        }
        Ok(Pages { env })
    }

    /// Renders page `name` (a file under `web/templates/`) with `ctx`.
    pub fn render(&self, name: &str, ctx: impl Serialize) -> Result<String, RenderError> {
        let t = self
            .env
            .get_template(name)
            .map_err(|e| RenderError::Template {
                what: name.into(),
                message: e.to_string(),
            })?;
        t.render(ctx).map_err(|e| RenderError::Template {
            what: name.into(),
            message: format!("{e:#}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_parses_and_values_are_html_escaped() {
        let p = Pages::new().unwrap();
        let hostile = "<script>alert(1)</script>\"'&";
        let out = p
            .render(
                "error.html",
                serde_json::json!({
                    "title": hostile, "nav": "", "csrf": null, "version": "0",
                    "flash": hostile, "message": hostile, "back": hostile,
                }),
            )
            .unwrap();
        assert!(
            out.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;&quot;&#x27;&amp;"),
            "{out}"
        );
        assert!(!out.contains("<script>alert"), "{out}");
    }

    #[test]
    fn times_and_ages_read_as_people_read_them() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_796_083_200_000), "2026-12-01 00:00:00");
        let now = crate::store::now_ms();
        assert_eq!(age(now - 5_000), "5 s");
        assert_eq!(age(now - 600_000), "10 min");
        assert_eq!(age(now - 3 * 3_600_000), "3 h");
        assert_eq!(age(now - 3 * 86_400_000), "3 d");
        // A clock step backwards is not a negative age.
        assert_eq!(age(now + 60_000), "0 s");
    }
}
