//! Typed template contexts and the [`Renderer`], which renders a machine's scripts and configs
//! from the current [`Catalog`]. Callers hand it inventory types (`Machine`, `Profile`) and get
//! text back: minijinja values never leave this module tree.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use minijinja::Value;
use serde::Serialize;

use super::{ArtifactKind, Catalog, Profile, RenderError, Sources, NO_ROLE};
use crate::mac::Mac;
use crate::policy::Platform;
use crate::store::Machine;

/// The token text placed in previews instead of a live install token.
pub const REDACTED_TOKEN: &str = "REDACTED-INSTALL-TOKEN";

/// The base URL used when proving at enroll that every artifact renders.
const PROBE_BASE: &str = "http://provision.invalid";

/// Template variables by name. Built by this module from domain types; other modules may add
/// serialisable values (the registrar adds `reg`, `cert`, `ca_cert`).
#[derive(Clone, Debug, Default)]
pub struct Context(BTreeMap<&'static str, Value>);

impl Context {
    /// Sets `name` to a serialisable value (a string, a list, a map, a number...).
    pub fn set(&mut self, name: &'static str, value: &impl Serialize) {
        self.0.insert(name, Value::from_serialize(value));
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.remove(name);
    }

    pub(super) fn value(&self) -> Value {
        Value::from(self.0.clone())
    }
}

/// Quotes `s` as one POSIX shell word (for wrapping a rendered command in `sh -c`).
pub fn shell_quote(s: &str) -> String {
    super::filters::shell_words(&Value::from(s)).expect("a string always quotes")
}

/// Renders with the current catalog; `reload` swaps the catalog whole, so a render never
/// sees half of an old and half of a new set of templates.
pub struct Renderer {
    catalog: RwLock<Arc<Catalog>>,
    sources: Sources,
    ssh_public_key: String,
}

impl Renderer {
    /// Loads profiles and templates from `sources`; `ssh_public_key` is the daemon's key,
    /// rendered into installs so the registrar can log in.
    pub fn new(sources: Sources, ssh_public_key: String) -> Result<Renderer, RenderError> {
        Ok(Renderer {
            catalog: RwLock::new(Arc::new(Catalog::load(sources.clone())?)),
            sources,
            ssh_public_key,
        })
    }

    /// The current catalog snapshot.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads profiles and templates from disk; on error the old catalog stays in service.
    /// Returns the number of profiles.
    pub fn reload(&self) -> Result<usize, RenderError> {
        let new = Catalog::load(self.sources.clone())?;
        let n = new.profiles().len();
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(n)
    }

    /// The daemon's SSH public key.
    pub fn ssh_public_key(&self) -> &str {
        &self.ssh_public_key
    }

    /// The template context for a machine: its inventory data, the profile's default vars
    /// overridden by the machine's, and the daemon's URLs with `token` in them.
    pub fn context(
        &self,
        m: &Machine,
        profile: Option<&Profile>,
        base_url: &str,
        token: &str,
    ) -> Context {
        let mut vars = profile.map(|p| p.vars.clone()).unwrap_or_default();
        vars.extend(m.vars.clone());
        let bare = m.mac.to_string().replace(':', "");
        let mut keys = vec![self.ssh_public_key.clone()];
        if let Some(k) = vars.get("ssh_authorized_key").filter(|k| !k.is_empty()) {
            keys.push(k.clone());
        }
        let opt = |v: &Option<String>| v.clone().map(Value::from).unwrap_or(Value::from(()));
        // Plain (not "safe") strings throughout: JSON/YAML templates escape them, and iPXE
        // lines check them like any other value.
        Context(BTreeMap::from([
            ("mac", Value::from(m.mac.to_string())),
            ("mac_hyphen", Value::from(m.mac.hyphenated())),
            ("mac_bare", Value::from(bare.clone())),
            ("hostname", Value::from(crate::inventory::host_name(m))),
            ("uuid", opt(&m.uuid)),
            ("serial", opt(&m.serial)),
            (
                "profile",
                Value::from(m.profile.clone().unwrap_or_default()),
            ),
            (
                "role",
                Value::from(
                    profile
                        .and_then(|p| p.role.clone())
                        .unwrap_or_else(|| NO_ROLE.into()),
                ),
            ),
            ("generation", Value::from(m.generation)),
            (
                "instance_id",
                Value::from(format!("provision-{bare}-{}", m.generation)),
            ),
            ("vars", Value::from_serialize(&vars)),
            ("labels", Value::from_serialize(&m.labels)),
            ("base_url", Value::from(base_url)),
            ("assets_url", Value::from(format!("{base_url}/assets"))),
            (
                "config_url",
                Value::from(format!("{base_url}/config/{token}")),
            ),
            (
                "phone_home_url",
                Value::from(format!("{base_url}/phone-home/{token}")),
            ),
            ("ssh_public_key", Value::from(self.ssh_public_key.clone())),
            ("ssh_authorized_keys", Value::from_serialize(&keys)),
        ]))
    }

    /// Renders the whole install script for `m` (boot files + install.ipxe) with `token`.
    pub fn install_script(
        &self,
        cat: &Catalog,
        m: &Machine,
        profile: &str,
        base_url: &str,
        token: &str,
    ) -> Result<String, RenderError> {
        let p = cat.profile(profile)?;
        let mut ctx = self.context(m, Some(p), base_url, token);
        let files = cat.render_boot_files(profile, &ctx)?;
        // Already checked word by word by render_boot_files: placed as they are.
        let boot = BTreeMap::from([
            ("kernel", Value::from_safe_string(files.kernel)),
            (
                "initrds",
                Value::from(
                    files
                        .initrds
                        .into_iter()
                        .map(Value::from_safe_string)
                        .collect::<Vec<_>>(),
                ),
            ),
            ("cmdline", Value::from_safe_string(files.cmdline)),
        ]);
        ctx.0.insert("boot", Value::from(boot));
        cat.render_ipxe("install.ipxe", &ctx)
    }

    /// Renders the local-boot script.
    pub fn local_script(
        &self,
        cat: &Catalog,
        mac: Mac,
        platform: Platform,
        reason: &str,
        base_url: &str,
    ) -> Result<String, RenderError> {
        let ctx = Context(BTreeMap::from([
            ("mac", Value::from(mac.to_string())),
            ("platform", Value::from(platform.as_str())),
            ("reason", Value::from(reason)),
            ("base_url", Value::from(base_url)),
        ]));
        cat.render_ipxe("local.ipxe", &ctx)
    }

    /// The static first script (`/boot.ipxe`).
    pub fn boot_ipxe(&self, base_url: &str) -> Result<String, RenderError> {
        let ctx = Context(BTreeMap::from([("base_url", Value::from(base_url))]));
        self.catalog().render_ipxe("boot.ipxe", &ctx)
    }

    /// Renders one of the machine's profile artifacts.
    pub fn artifact(
        &self,
        cat: &Catalog,
        m: &Machine,
        artifact: &str,
        base_url: &str,
        token: &str,
    ) -> Result<(ArtifactKind, String), RenderError> {
        let profile = m.profile.as_deref().unwrap_or_default();
        let p = cat.profile(profile)?;
        let ctx = self.context(m, Some(p), base_url, token);
        cat.render_artifact(profile, artifact, &ctx)
    }

    /// Proves that every artifact of `m`'s profile, and its install script, render with its
    /// data: a value no output can hold is refused when it is entered, not at boot.
    pub fn check_renders(&self, m: &Machine) -> Result<(), RenderError> {
        let cat = self.catalog();
        let profile = m.profile.clone().unwrap_or_default();
        let p = cat.profile(&profile)?;
        self.install_script(&cat, m, &profile, PROBE_BASE, REDACTED_TOKEN)?;
        for a in p.artifacts.keys() {
            self.artifact(&cat, m, a, PROBE_BASE, REDACTED_TOKEN)?;
        }
        Ok(())
    }

    /// The context role steps and hand-off hooks render with: the machine's template context
    /// without install URLs (the token is burnt), plus `role` and `ssh_host`.
    pub fn registration_context(&self, m: &Machine, role: &str) -> Context {
        let cat = self.catalog();
        let profile = m.profile.as_deref().and_then(|p| cat.profile(p).ok());
        let mut ctx = self.context(m, profile, "", REDACTED_TOKEN);
        for k in ["base_url", "assets_url", "config_url", "phone_home_url"] {
            ctx.remove(k);
        }
        ctx.set("role", &role);
        ctx.set("ssh_host", &m.last_ip.clone().unwrap_or_default());
        ctx
    }
}
