//! Profiles and templates: the only module that knows minijinja.
//!
//! Templates come from two layers: directories named in the configuration (an operator's git
//! checkout), and the built-in `templates/` and `ipxe/` trees embedded in the binary. A file in
//! the configured directory replaces the built-in file of the same name, so an operator can
//! override one template without copying the rest. Profiles are TOML files under
//! `profiles/`. Undefined variables are errors (strict mode): a typo in a template fails the
//! render instead of installing a machine with an empty value.
//!
//! Every `{{ }}` in an `.ipxe` template (and in a profile's kernel, initrd and cmdline
//! strings) must be a single safe word (`filters::check_ipxe_word`); `.json` and `.yaml`
//! templates get JSON escaping, which is also valid YAML; preseed and shell contexts use the
//! `preseed` and `shell` filters. Every render is then checked (`check`) before it is served.

pub mod check;
mod context;
pub mod filters;
pub mod ui;

pub use context::{shell_quote, Context, Renderer, REDACTED_TOKEN};

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use include_dir::{include_dir, Dir};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};

static BUILTIN_TEMPLATES: Dir = include_dir!("$CARGO_MANIFEST_DIR/templates");
/// The iPXE scripts. They are served on every boot, so their comments are short; the why of
/// the local boot lives here. A UEFI local boot is `exit` (status 0) from `local.ipxe` back to
/// `boot.ipxe`'s `chain`, then `exit 1` from `boot.ipxe` to the firmware: a Boot#### option
/// that returns EFI_SUCCESS may end the firmware's BootOrder processing (UEFI specification,
/// "Boot Manager"), and EDK2 firmware (OVMF, and many vendors') then opens its boot menu
/// instead of booting the disk — the lab test saw OVMF do it. The machine's own script must
/// exit 0: a non-zero exit fails `boot.ipxe`'s `chain`, which retries the network forever.
static BUILTIN_IPXE: Dir = include_dir!("$CARGO_MANIFEST_DIR/ipxe");

/// A render or profile problem, in words for the operator.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    /// A profile name that does not exist.
    #[error("no profile named {0:?}; `provision profiles` lists them")]
    NoProfile(String),
    /// An artifact the profile does not have.
    #[error("profile {profile} has no artifact {artifact:?}; it has: {have}")]
    NoArtifact {
        /// The profile.
        profile: String,
        /// What was asked for.
        artifact: String,
        /// What exists.
        have: String,
    },
    /// A profile file that does not parse or refers to missing templates.
    #[error("profile {file}: {message}")]
    BadProfile {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The template engine failed (syntax, undefined variable, a value refused by a filter).
    #[error("rendering {what} failed: {message}")]
    Template {
        /// Which template or profile field.
        what: String,
        /// What went wrong, with the line.
        message: String,
    },
    /// The render succeeded but the result is not a valid artifact of its kind.
    #[error("rendered {what} is not valid: {message}")]
    Invalid {
        /// Which artifact.
        what: String,
        /// What is wrong.
        message: String,
    },
}

/// How a rendered artifact is checked and served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// An iPXE script.
    Ipxe,
    /// cloud-init user-data starting with `#cloud-config` (also CoreOS cloud-config).
    CloudConfig,
    /// Ubuntu autoinstall user-data: cloud-config with `autoinstall: {version: 1}`.
    Autoinstall,
    /// NoCloud meta-data: YAML with an instance-id.
    MetaData,
    /// Any YAML document (vendor-data).
    Yaml,
    /// Ignition v3 JSON.
    Ignition,
    /// debconf preseed.
    Preseed,
    /// Plain text, not checked.
    Text,
}

impl ArtifactKind {
    /// Every kind.
    pub const ALL: &'static [ArtifactKind] = &[
        ArtifactKind::Ipxe,
        ArtifactKind::CloudConfig,
        ArtifactKind::Autoinstall,
        ArtifactKind::MetaData,
        ArtifactKind::Yaml,
        ArtifactKind::Ignition,
        ArtifactKind::Preseed,
        ArtifactKind::Text,
    ];

    /// The name used in profile files and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Ipxe => "ipxe",
            ArtifactKind::CloudConfig => "cloud-config",
            ArtifactKind::Autoinstall => "autoinstall",
            ArtifactKind::MetaData => "meta-data",
            ArtifactKind::Yaml => "yaml",
            ArtifactKind::Ignition => "ignition",
            ArtifactKind::Preseed => "preseed",
            ArtifactKind::Text => "text",
        }
    }

    /// The Content-Type the artifact is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            ArtifactKind::Ignition => "application/json",
            ArtifactKind::CloudConfig
            | ArtifactKind::Autoinstall
            | ArtifactKind::MetaData
            | ArtifactKind::Yaml => "text/yaml; charset=utf-8",
            _ => "text/plain; charset=utf-8",
        }
    }
}

/// The role name that means "no registration".
pub const NO_ROLE: &str = "none";

/// Reads a profile's `role`: `"none"` means no role.
impl Profile {
    /// How long an install normally takes (checked when the profile was loaded).
    pub fn install_time(&self) -> std::time::Duration {
        self.install_time
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(DEFAULT_INSTALL_TIME)
    }
}

fn role_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|r| r != NO_ROLE))
}

/// What the registrar does on a node after install: a TOML file under `roles/` with ordered
/// steps, each a shell command rendered like any template. In step commands every `{{ }}`
/// value is quoted as one shell word (a list as one word per item), so inventory data never
/// becomes shell syntax.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDef {
    /// The file name without `.toml`.
    #[serde(skip_deserializing)]
    pub name: String,
    /// One line for `provision profiles`.
    pub description: String,
    /// Another role whose defaults and steps come first (gateway and service extend
    /// hypervisor).
    #[serde(default)]
    pub extends: Option<String>,
    /// Parameter defaults, seen by steps as `{{ reg.* }}`.
    #[serde(default)]
    pub defaults: BTreeMap<String, toml::Value>,
    /// The steps, run in order over one SSH session.
    #[serde(default)]
    pub steps: Vec<RoleStep>,
}

/// Resolves `extends`: the parent's defaults overlaid by the child's, the parent's steps
/// followed by the child's. Refuses unknown parents and cycles.
fn resolve_roles(raw: &BTreeMap<String, RoleDef>) -> Result<BTreeMap<String, RoleDef>, String> {
    let mut out = BTreeMap::new();
    for name in raw.keys() {
        let mut chain = vec![name.as_str()];
        let mut cur = &raw[name];
        while let Some(parent) = &cur.extends {
            if chain.contains(&parent.as_str()) {
                return Err(format!(
                    "role {name}: `extends` loops: {} → {parent}",
                    chain.join(" → ")
                ));
            }
            cur = raw
                .get(parent)
                .ok_or_else(|| format!("role {name}: extends {parent:?}, which is not a role"))?;
            chain.push(parent);
        }
        let mut r = raw[name].clone();
        r.defaults = BTreeMap::new();
        r.steps = Vec::new();
        for ancestor in chain.iter().rev() {
            let a = &raw[*ancestor];
            r.defaults.extend(a.defaults.clone());
            r.steps.extend(a.steps.clone());
        }
        out.insert(name.clone(), r);
    }
    Ok(out)
}

/// One step of a role.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleStep {
    /// Shown in events and `provision machines show`; unique within the role.
    pub name: String,
    /// The command (a template), run by the node's shell as root; exit status 0 is success.
    pub run: String,
    /// The command prints a PEM certificate request; provision's CA signs it and later steps
    /// see the certificate as `{{ cert }}`.
    #[serde(default)]
    pub sign: bool,
    /// Lines (a template) that must each appear as a whole line of the command's output.
    #[serde(default)]
    pub expect: Option<String>,
    /// Seconds the command may take.
    #[serde(default = "default_step_timeout")]
    pub timeout: u64,
}

fn default_step_timeout() -> u64 {
    120
}

/// One rendered file a profile offers to its installer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Template path, relative to the templates root.
    pub template: String,
    /// How it is checked and served.
    pub kind: ArtifactKind,
}

/// A profile's expected install time when it sets none.
pub const DEFAULT_INSTALL_TIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// What to install: a TOML file under `templates/profiles/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The file name without `.toml`.
    #[serde(skip_deserializing)]
    pub name: String,
    /// One line for `provision profiles`.
    pub description: String,
    /// Kernel URL (a template; `{{ assets_url }}` points at the daemon's `/assets/`).
    pub kernel: String,
    /// Initrd URLs (templates), loaded in order.
    #[serde(default)]
    pub initrds: Vec<String>,
    /// Kernel command line (a template; `{{ config_url }}` is the token-bearing config base).
    #[serde(default)]
    pub cmdline: String,
    /// Registration role: a file under `roles/`; `None` (written `"none"` or left out): no
    /// registration.
    #[serde(default, deserialize_with = "role_name")]
    pub role: Option<String>,
    /// Registration parameters given to the role's steps as `{{ reg.* }}`; a machine var
    /// of the same name overrides a value (a comma-separated var for a list).
    #[serde(default)]
    pub register: BTreeMap<String, toml::Value>,
    /// Default variables; a machine's own vars override them.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Artifacts by name, served at `/config/{token}/{name}`.
    #[serde(default)]
    pub artifacts: BTreeMap<String, Artifact>,
    /// For installers whose OS phones home from its own first boot (the CoreOS family): once
    /// the installer has fetched this artifact it is writing the disk, so the machine's next
    /// network boot goes to that disk instead of installing again.
    #[serde(default)]
    pub local_boot_after: Option<String>,
    /// Which install claims are believed for this profile's machines; unset: the daemon's
    /// `--claims`. `any` is for relayed or routed clients (see docs/security.md).
    #[serde(default)]
    pub claims: Option<crate::policy::ClaimPolicy>,
    /// Accept the phone-home from another address than the one the install began from (an
    /// installer that changes address), with an event saying so.
    #[serde(default)]
    pub phone_home_any_address: bool,
    /// How long an install of this profile normally takes, from the install boot to the
    /// phone-home (`"45m"`, humantime); a machine `installing` longer is shown as a problem.
    /// Unset: [`DEFAULT_INSTALL_TIME`].
    #[serde(default)]
    pub install_time: Option<String>,
}

/// Where templates come from, besides the built-in ones.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// Operator's templates directory (profiles/ and template files), overriding built-ins.
    pub templates_dir: Option<PathBuf>,
    /// Operator's iPXE scripts directory, overriding built-ins.
    pub ipxe_dir: Option<PathBuf>,
}

impl Sources {
    /// Reads a template by name: `ipxe/NAME` from the iPXE layer, anything else from the
    /// templates layer; the operator's directory first, then the built-in tree. Names are
    /// relative paths and never leave their root.
    fn read(&self, name: &str) -> Option<String> {
        let (dir, builtin, rel) = match name.strip_prefix("ipxe/") {
            Some(rel) => (&self.ipxe_dir, &BUILTIN_IPXE, rel),
            None => (&self.templates_dir, &BUILTIN_TEMPLATES, name),
        };
        let rel_path = Path::new(rel);
        if !rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return None;
        }
        if let Some(d) = dir {
            if let Ok(s) = std::fs::read_to_string(d.join(rel_path)) {
                return Some(s);
            }
        }
        builtin
            .get_file(rel_path)
            .and_then(|f| f.contents_utf8())
            .map(str::to_string)
    }

    /// The `.toml` files of `sub` (`profiles` or `roles`): built-in ones, then the
    /// operator's, which replace same-named ones.
    fn toml_files(&self, sub: &str) -> Result<BTreeMap<String, (String, String)>, RenderError> {
        let mut out = BTreeMap::new();
        if let Some(dir) = BUILTIN_TEMPLATES.get_dir(sub) {
            for f in dir.files() {
                if let (Some(stem), Some(text)) = (
                    f.path().file_stem().and_then(|s| s.to_str()),
                    f.contents_utf8(),
                ) {
                    if f.path().extension().is_some_and(|e| e == "toml") {
                        out.insert(
                            stem.to_string(),
                            (
                                format!("(built-in) {}", f.path().display()),
                                text.to_string(),
                            ),
                        );
                    }
                }
            }
        }
        if let Some(dir) = &self.templates_dir {
            let pdir = dir.join(sub);
            if pdir.is_dir() {
                let entries = std::fs::read_dir(&pdir).map_err(|e| RenderError::BadProfile {
                    file: pdir.display().to_string(),
                    message: e.to_string(),
                })?;
                for e in entries.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|e| e == "toml") {
                        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                        let text =
                            std::fs::read_to_string(&p).map_err(|e| RenderError::BadProfile {
                                file: p.display().to_string(),
                                message: e.to_string(),
                            })?;
                        out.insert(stem.to_string(), (p.display().to_string(), text));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Profiles plus a template environment: loaded at start and on reload, then shared.
pub struct Catalog {
    profiles: BTreeMap<String, Profile>,
    roles: BTreeMap<String, RoleDef>,
    env: Environment<'static>,
}

fn template_error(what: &str, e: minijinja::Error) -> RenderError {
    let mut message = e.to_string();
    if let Some(d) = e.detail() {
        if !message.contains(d) {
            message = format!("{message}: {d}");
        }
    }
    if let Some(line) = e.line() {
        if !message.contains(&format!(":{line})")) {
            message.push_str(&format!(" (line {line})"));
        }
    }
    RenderError::Template {
        what: what.to_string(),
        message,
    }
}

fn new_env(sources: Sources) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_loader(move |name| Ok(sources.read(name)));
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".ipxe") || name.ends_with(".cmdline") {
            AutoEscape::Custom("ipxe")
        } else if name.ends_with(".sh") {
            AutoEscape::Custom("shell")
        } else if name.ends_with(".json") || name.ends_with(".yaml") || name.ends_with(".yml") {
            AutoEscape::Json
        } else {
            AutoEscape::None
        }
    });
    env.set_formatter(|out, state, value| {
        if let AutoEscape::Custom("ipxe") = state.auto_escape() {
            if value.is_safe() {
                write!(out, "{value}").map_err(minijinja::Error::from)?;
                return Ok(());
            }
            if value.is_none() || value.is_undefined() {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    "a missing (none) value cannot be placed in an iPXE script or kernel command line",
                ));
            }
            let s = value.to_string();
            filters::check_ipxe_word(&s)?;
            write!(out, "{s}").map_err(minijinja::Error::from)?;
            Ok(())
        } else if let AutoEscape::Custom("shell") = state.auto_escape() {
            let s = filters::shell_words(value)?;
            write!(out, "{s}").map_err(minijinja::Error::from)?;
            Ok(())
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env.add_filter("ipxe", filters::ipxe);
    env.add_filter("cmdline", filters::cmdline);
    env.add_filter("preseed", filters::preseed);
    env.add_filter("shell", filters::shell);
    env.add_filter("systemd", filters::systemd);
    env
}

/// The parts of an install iPXE script that come from the profile.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BootFiles {
    /// Kernel URL.
    pub kernel: String,
    /// Initrd URLs.
    pub initrds: Vec<String>,
    /// Kernel command line.
    pub cmdline: String,
}

impl Catalog {
    /// Loads every profile and compiles every template they name; any problem is an error
    /// naming the file, so a bad edit is caught at start or reload, not at a machine's boot.
    pub fn load(sources: Sources) -> Result<Catalog, RenderError> {
        let files = sources.toml_files("profiles")?;
        let role_files = sources.toml_files("roles")?;
        let mut env = new_env(sources);
        let mut roles = BTreeMap::new();
        for (name, (file, text)) in role_files {
            let bad = |message: String| RenderError::BadProfile {
                file: file.clone(),
                message,
            };
            crate::validate::profile_name(&name).map_err(|e| bad(e.0))?;
            if name == NO_ROLE {
                return Err(bad(
                    "a role may not be called \"none\" (that means no role)".into(),
                ));
            }
            let mut r: RoleDef = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            r.name = name.clone();
            if r.steps.is_empty() && r.extends.is_none() {
                return Err(bad("a role needs at least one [[steps]] entry".into()));
            }
            roles.insert(name, (file, r));
        }
        let raw: BTreeMap<String, RoleDef> = roles
            .iter()
            .map(|(k, (_, r))| (k.clone(), r.clone()))
            .collect();
        let resolved = resolve_roles(&raw).map_err(|message| RenderError::BadProfile {
            file: "roles/".into(),
            message,
        })?;
        for (name, r) in &resolved {
            let bad = |message: String| RenderError::BadProfile {
                file: roles[name].0.clone(),
                message,
            };
            let mut seen = std::collections::BTreeSet::new();
            for st in &r.steps {
                if !seen.insert(st.name.as_str()) {
                    return Err(bad(format!("step name {:?} appears twice", st.name)));
                }
                crate::validate::profile_name(&st.name)
                    .map_err(|_| bad(format!("step name {:?} must be a plain word", st.name)))?;
                env.template_from_named_str("check.sh", &st.run)
                    .map_err(|e| bad(format!("step {}: run: {e}", st.name)))?;
                if let Some(x) = &st.expect {
                    env.template_from_named_str("check.txt", x)
                        .map_err(|e| bad(format!("step {}: expect: {e}", st.name)))?;
                }
            }
        }
        let roles = resolved;
        let mut profiles = BTreeMap::new();
        for (name, (file, text)) in files {
            let bad = |message: String| RenderError::BadProfile {
                file: file.clone(),
                message,
            };
            crate::validate::profile_name(&name).map_err(|e| bad(e.0))?;
            let mut p: Profile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            p.name = name.clone();
            crate::validate::vars(&p.vars).map_err(|e| bad(e.0))?;
            if let Some(t) = &p.install_time {
                humantime::parse_duration(t).map_err(|e| {
                    bad(format!(
                        "install_time {t:?}: {e} (write a duration such as \"45m\" or \"1h 30m\")"
                    ))
                })?;
            }
            if let Some(role) = p.role.as_ref().filter(|r| !roles.contains_key(*r)) {
                return Err(bad(format!(
                    "role {role:?} is not defined; roles are \"none\" or a file under roles/: {}",
                    roles.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            if let Some(a) = &p.local_boot_after {
                if !p.artifacts.contains_key(a) {
                    return Err(bad(format!(
                        "local_boot_after names {a:?}, which is not one of its artifacts"
                    )));
                }
            }
            for (aname, a) in &p.artifacts {
                // Escaping follows the template's file name (minijinja's auto-escape), so an
                // iPXE artifact must be named .ipxe to get the safe-word check.
                if a.kind == ArtifactKind::Ipxe && !a.template.ends_with(".ipxe") {
                    return Err(bad(format!(
                        "artifact {aname}: an ipxe template's name must end in .ipxe"
                    )));
                }
                crate::validate::profile_name(aname).map_err(|_| {
                    bad(format!("artifact name {aname:?} must be a plain file name"))
                })?;
                env.get_template(&a.template)
                    .map_err(|e| bad(format!("artifact {aname}: template {}: {e}", a.template)))?;
            }
            // Compiled once here, not per install answer (compiling was a tenth of the CPU
            // of an install answer under load).
            for (field, src) in p.boot_strings() {
                env.add_template_owned(boot_string_template(&name, &field), src.to_string())
                    .map_err(|e| bad(format!("{field}: {e}")))?;
            }
            profiles.insert(name, p);
        }
        for t in ["ipxe/boot.ipxe", "ipxe/install.ipxe", "ipxe/local.ipxe"] {
            env.get_template(t).map_err(|e| RenderError::BadProfile {
                file: t.to_string(),
                message: e.to_string(),
            })?;
        }
        Ok(Catalog {
            profiles,
            roles,
            env,
        })
    }

    /// All profiles by name.
    pub fn profiles(&self) -> &BTreeMap<String, Profile> {
        &self.profiles
    }

    /// One profile.
    pub fn profile(&self, name: &str) -> Result<&Profile, RenderError> {
        self.profiles
            .get(name)
            .ok_or_else(|| RenderError::NoProfile(name.to_string()))
    }

    /// The role a profile registers with, or `None` for role `none`.
    pub fn role_of(&self, profile: &str) -> Result<Option<&RoleDef>, RenderError> {
        let p = self.profile(profile)?;
        Ok(p.role.as_ref().and_then(|r| self.roles.get(r)))
    }

    /// All roles by name.
    pub fn roles(&self) -> &BTreeMap<String, RoleDef> {
        &self.roles
    }

    /// Renders one role step's command (`what` = `run`) with every value shell-quoted, or its
    /// `expect` lines (`what` = `expect`) as plain text.
    pub fn render_step(
        &self,
        role: &str,
        step: &str,
        what: &str,
        src: &str,
        ctx: &Context,
    ) -> Result<String, RenderError> {
        let ext = if what == "run" { "sh" } else { "txt" };
        self.env
            .render_named_str(
                &format!("roles/{role}/{step}.{what}.{ext}"),
                src,
                ctx.value(),
            )
            .map_err(|e| template_error(&format!("role {role} step {step} {what}"), e))
    }

    /// Renders a command line from a profile string (a hand-off hook) with every value
    /// shell-quoted.
    pub fn render_shell(
        &self,
        what: &str,
        src: &str,
        ctx: &Context,
    ) -> Result<String, RenderError> {
        self.env
            .render_named_str(&format!("{what}.sh"), src, ctx.value())
            .map_err(|e| template_error(what, e))
    }

    /// Renders a template file by name and checks the result as `kind`.
    pub fn render_file(
        &self,
        name: &str,
        kind: ArtifactKind,
        ctx: &Context,
    ) -> Result<String, RenderError> {
        let body = self
            .env
            .get_template(name)
            .and_then(|t| t.render(ctx.value()))
            .map_err(|e| template_error(name, e))?;
        check::check(kind, &body).map_err(|message| RenderError::Invalid {
            what: name.to_string(),
            message,
        })?;
        Ok(body)
    }

    /// Renders one of the iPXE scripts (`boot.ipxe`, `install.ipxe`, `local.ipxe`).
    pub fn render_ipxe(&self, script: &str, ctx: &Context) -> Result<String, RenderError> {
        self.render_file(&format!("ipxe/{script}"), ArtifactKind::Ipxe, ctx)
    }

    /// Renders a profile's artifact for a machine context.
    pub fn render_artifact(
        &self,
        profile: &str,
        artifact: &str,
        ctx: &Context,
    ) -> Result<(ArtifactKind, String), RenderError> {
        let p = self.profile(profile)?;
        let a = p
            .artifacts
            .get(artifact)
            .ok_or_else(|| RenderError::NoArtifact {
                profile: profile.to_string(),
                artifact: artifact.to_string(),
                have: p.artifacts.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let body = self.render_file(&a.template, a.kind, ctx)?;
        Ok((a.kind, body))
    }

    /// Renders a profile's kernel, initrd and cmdline strings; each value in them must be a
    /// safe word, and the results may not contain a control character or a `$` (which iPXE
    /// would expand), so they can be placed on one iPXE line each.
    pub fn render_boot_files(
        &self,
        profile: &str,
        ctx: &Context,
    ) -> Result<BootFiles, RenderError> {
        let p = self.profile(profile)?;
        let ctx = ctx.value();
        let one = |field: &str| -> Result<String, RenderError> {
            let what = format!("profile {profile} {field}");
            let s = self
                .env
                .get_template(&boot_string_template(profile, field))
                .and_then(|t| t.render(&ctx))
                .map_err(|e| template_error(&what, e))?;
            let s = s.trim().to_string();
            if let Some(c) = s.chars().find(|c| c.is_control() || *c == '$') {
                return Err(RenderError::Invalid {
                    what,
                    message: format!("contains {c:?}, which cannot appear on an iPXE line"),
                });
            }
            Ok(s)
        };
        let kernel = one("kernel")?;
        if kernel.is_empty() || kernel.contains(char::is_whitespace) {
            return Err(RenderError::Invalid {
                what: format!("profile {profile} kernel"),
                message: format!("{kernel:?} must be one URL"),
            });
        }
        let initrds = (0..p.initrds.len())
            .map(|i| one(&format!("initrds[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let cmdline = one("cmdline")?;
        Ok(BootFiles {
            kernel,
            initrds,
            cmdline,
        })
    }
}

/// The name a profile's boot string is compiled under: not a path, so no template file can
/// shadow it, and ending in `.cmdline` for its escaping.
fn boot_string_template(profile: &str, field: &str) -> String {
    format!("profile:{profile}:{field}.cmdline")
}

impl Profile {
    fn boot_strings(&self) -> Vec<(String, &str)> {
        let mut v = vec![
            ("kernel".to_string(), self.kernel.as_str()),
            ("cmdline".to_string(), self.cmdline.as_str()),
        ];
        for (i, s) in self.initrds.iter().enumerate() {
            v.push((format!("initrds[{i}]"), s.as_str()));
        }
        v
    }
}
