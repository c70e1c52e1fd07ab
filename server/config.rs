//! Configuration: flags, `PROVISION_*` environment variables and an optional TOML file, merged
//! into one validated [`Config`]. Reading configuration binds nothing and writes nothing;
//! `provision serve --check-config` stops right after it.
//!
//! Precedence: a flag, then its environment variable (clap reads both), then the file, then
//! the embedded default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::policy::{ClaimPolicy, DiscoverAnswer};

/// `provision serve` flags. Each may also come from `PROVISION_<NAME>` or the config file.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file (keys as the flags, with underscores: data_dir, http, ...).
    #[arg(long, env = "PROVISION_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory: SQLite database, admin token, SSH key, assets [default: /var/lib/provision as root, else $XDG_DATA_HOME/provision or ~/.local/share/provision].
    #[arg(long, env = "PROVISION_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the inventory lives: `sqlite` (DATA_DIR/provision.db, this daemon's alone), or a
    /// PostgreSQL database several daemons share, as a `postgres://user@host/db` URL or a
    /// `host=… dbname=…` connection string, with libpq's TLS keys (`sslmode=verify-full
    /// sslrootcert=CA.pem`) [default: sqlite].
    #[arg(long, env = "PROVISION_DATABASE", value_name = "sqlite|postgres://...")]
    pub database: Option<String>,
    /// With a PostgreSQL database: the key (a file of 64 hex digits, mode 0600) the daemons
    /// sharing it seal their shared node CA, SSH key and admin token with; every daemon
    /// must be given the same one.
    #[arg(long, env = "PROVISION_SECRET_KEY_FILE", value_name = "PATH")]
    pub secret_key_file: Option<PathBuf>,
    /// HTTP listen address; port 0 picks a free port [default: 0.0.0.0:8080].
    #[arg(long, env = "PROVISION_HTTP", value_name = "ADDR:PORT")]
    pub http: Option<String>,
    /// Admin API listen address (the REST API, the CLI's and the web UI's), or `off`; port 0
    /// picks a free port [default: 0.0.0.0:8443].
    #[arg(long, env = "PROVISION_ADMIN", value_name = "ADDR:PORT|off")]
    pub admin: Option<String>,
    /// TLS on the admin listener: `on`, or `off` for plain HTTP (allowed on a loopback address,
    /// elsewhere only with --insecure-admin) [default: on].
    #[arg(long, env = "PROVISION_ADMIN_TLS", value_name = "on|off")]
    pub admin_tls: Option<String>,
    /// The admin listener's certificate chain (PEM, leaf first) [default: a self-signed
    /// certificate made on first start in DATA_DIR/admin-tls/].
    #[arg(long, env = "PROVISION_ADMIN_CERT", requires = "admin_key")]
    pub admin_cert: Option<PathBuf>,
    /// The private key of --admin-cert (PEM, mode 0600).
    #[arg(long, env = "PROVISION_ADMIN_KEY", requires = "admin_cert")]
    pub admin_key: Option<PathBuf>,
    /// Allow --admin-tls off on a non-loopback address: the admin token then crosses the
    /// network in clear.
    #[arg(long, env = "PROVISION_INSECURE_ADMIN")]
    pub insecure_admin: bool,
    /// Prometheus metrics at /metrics: `http` on the machine HTTP listener, `ADDR:PORT` on a
    /// listener of their own (port 0 picks a free port), or `off` [default: http].
    #[arg(long, env = "PROVISION_METRICS", value_name = "http|ADDR:PORT|off")]
    pub metrics: Option<String>,
    /// TFTP listen address, or `off` [default: 0.0.0.0:69].
    #[arg(long, env = "PROVISION_TFTP", value_name = "ADDR:PORT|off")]
    pub tftp: Option<String>,
    /// Directory TFTP serves iPXE binaries from [default: DATA_DIR/ipxe, then /usr/lib/ipxe].
    #[arg(long, env = "PROVISION_TFTP_ROOT")]
    pub tftp_root: Option<PathBuf>,
    /// DHCP: `0.0.0.0` answers on every interface; an interface address answers only on the
    /// interface that holds it; `off` disables DHCP (UDP 67 and 4011) [default: 0.0.0.0].
    #[arg(long, env = "PROVISION_DHCP", value_name = "ADDR|off")]
    pub dhcp: Option<String>,
    /// proxy: boot instructions beside the site's DHCP server; full: also hand out addresses
    /// from --dhcp-range (isolated labs with no other DHCP server) [default: proxy].
    #[arg(long, env = "PROVISION_DHCP_MODE", value_name = "proxy|full")]
    pub dhcp_mode: Option<String>,
    /// Address pool for full mode, e.g. 10.0.0.100-10.0.0.200.
    #[arg(long, env = "PROVISION_DHCP_RANGE", value_name = "START-END")]
    pub dhcp_range: Option<String>,
    /// Subnet mask handed out in full mode [default: 255.255.255.0].
    #[arg(long, env = "PROVISION_DHCP_NETMASK")]
    pub dhcp_netmask: Option<String>,
    /// Default router handed out in full mode.
    #[arg(long, env = "PROVISION_DHCP_ROUTER")]
    pub dhcp_router: Option<String>,
    /// DNS servers handed out in full mode, comma-separated.
    #[arg(long, env = "PROVISION_DHCP_DNS")]
    pub dhcp_dns: Option<String>,
    /// Lease time in full mode [default: 1h].
    #[arg(long, env = "PROVISION_DHCP_LEASE_TIME", value_name = "DURATION")]
    pub dhcp_lease_time: Option<String>,
    /// Answer DHCP only on this interface (repeatable); default: every interface.
    #[arg(
        long = "dhcp-interface",
        env = "PROVISION_DHCP_INTERFACE",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub dhcp_interfaces: Vec<String>,
    /// DHCP server port [default: 67]. Firmware and relays always send to 67; another value is
    /// only useful for tests.
    #[arg(long, env = "PROVISION_DHCP_PORT")]
    pub dhcp_port: Option<u16>,
    /// PXE boot server port [default: 4011]. UEFI firmware always asks on 4011; another value is
    /// only useful for tests.
    #[arg(long, env = "PROVISION_PXE_PORT")]
    pub pxe_port: Option<u16>,
    /// Boot file for x64 UEFI PXE clients: ipxe.efi (its own drivers) or snponly.efi (the
    /// firmware's network driver) [default: ipxe.efi].
    #[arg(long, env = "PROVISION_EFI_BOOT_FILE")]
    pub efi_boot_file: Option<String>,
    /// Base URL machines use to reach this daemon, e.g. http://10.0.0.1:8080 [default: taken from each request's Host header].
    #[arg(long, env = "PROVISION_ADVERTISE", value_name = "URL")]
    pub advertise: Option<String>,
    /// Directory of templates and profiles/ overriding the built-in ones.
    #[arg(long, env = "PROVISION_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// Directory of iPXE scripts overriding the built-in ones.
    #[arg(long, env = "PROVISION_IPXE_DIR")]
    pub ipxe_dir: Option<PathBuf>,
    /// Directory served at /assets/ (kernels, initrds) [default: DATA_DIR/assets].
    #[arg(long, env = "PROVISION_ASSETS_DIR")]
    pub assets_dir: Option<PathBuf>,
    /// Lifetime of an install token, e.g. 6h, 90m [default: 6h].
    #[arg(long, env = "PROVISION_INSTALL_TOKEN_TTL", value_name = "DURATION")]
    pub install_token_ttl: Option<String>,
    /// What unknown machines are told: local_boot or ignore [default: local_boot].
    #[arg(long, env = "PROVISION_DISCOVER", value_name = "ANSWER")]
    pub discover: Option<String>,
    /// Which install claims are believed: evidence (the asking address is the MAC's, as the
    /// neighbour table or DHCP showed) or any (also relayed/routed clients; see
    /// docs/security.md) [default: evidence].
    #[arg(long, env = "PROVISION_CLAIMS", value_name = "POLICY")]
    pub claims: Option<String>,
    /// Machines the registrar registers at once [default: 4].
    #[arg(long, env = "PROVISION_REGISTER_WORKERS", value_name = "N")]
    pub register_workers: Option<usize>,
    /// SSH connection attempts before a registration fails [default: 5].
    #[arg(long, env = "PROVISION_REGISTER_ATTEMPTS", value_name = "N")]
    pub register_attempts: Option<u32>,
    /// Timeout of one SSH connect, handshake and login, e.g. 10s [default: 10s].
    #[arg(long, env = "PROVISION_SSH_TIMEOUT", value_name = "DURATION")]
    pub ssh_timeout: Option<String>,
    /// How long a profile's hand-off hook may run, e.g. 10m [default: 10m].
    #[arg(long, env = "PROVISION_HANDOFF_TIMEOUT", value_name = "DURATION")]
    pub handoff_timeout: Option<String>,
    /// How long a daemon's claim on a registration run lasts without renewal: when daemons
    /// share a PostgreSQL inventory, how soon another takes over the runs of one that died
    /// [default: 60s].
    #[arg(long, env = "PROVISION_REGISTER_CLAIM", value_name = "DURATION")]
    pub register_claim: Option<String>,
    /// Discovered machines kept (never enrolled); past this the least recently seen are
    /// evicted [default: 10000].
    #[arg(long, env = "PROVISION_MAX_DISCOVERED", value_name = "N")]
    pub max_discovered: Option<u64>,
    /// Events kept per machine; older observations go first, state changes last
    /// [default: 1000].
    #[arg(long, env = "PROVISION_EVENTS_PER_MACHINE", value_name = "N")]
    pub events_per_machine: Option<u64>,
    /// Events kept in all, the same way [default: 1000000].
    #[arg(long, env = "PROVISION_MAX_EVENTS", value_name = "N")]
    pub max_events: Option<u64>,
    /// Validate the configuration, templates and profiles, print a summary, and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The config file's keys: the same names as the flags. Unknown keys are errors, so a typo
/// is caught instead of silently ignored.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database: Option<String>,
    secret_key_file: Option<PathBuf>,
    http: Option<String>,
    admin: Option<String>,
    admin_tls: Option<String>,
    admin_cert: Option<PathBuf>,
    admin_key: Option<PathBuf>,
    insecure_admin: Option<bool>,
    metrics: Option<String>,
    tftp: Option<String>,
    tftp_root: Option<PathBuf>,
    dhcp: Option<String>,
    dhcp_port: Option<u16>,
    pxe_port: Option<u16>,
    dhcp_interfaces: Option<Vec<String>>,
    dhcp_mode: Option<String>,
    dhcp_range: Option<String>,
    dhcp_netmask: Option<String>,
    dhcp_router: Option<String>,
    dhcp_dns: Option<String>,
    dhcp_lease_time: Option<String>,
    efi_boot_file: Option<String>,
    advertise: Option<String>,
    templates_dir: Option<PathBuf>,
    ipxe_dir: Option<PathBuf>,
    assets_dir: Option<PathBuf>,
    install_token_ttl: Option<String>,
    discover: Option<String>,
    claims: Option<String>,
    register_workers: Option<usize>,
    register_attempts: Option<u32>,
    ssh_timeout: Option<String>,
    handoff_timeout: Option<String>,
    register_claim: Option<String>,
    max_discovered: Option<u64>,
    events_per_machine: Option<u64>,
    max_events: Option<u64>,
}

/// Every `PROVISION_*` variable the program reads (serve flags and client settings).
const KNOWN_ENV: &[&str] = &[
    "PROVISION_CONFIG",
    "PROVISION_DATA_DIR",
    "PROVISION_DATABASE",
    "PROVISION_SECRET_KEY_FILE",
    "PROVISION_HTTP",
    "PROVISION_ADMIN",
    "PROVISION_ADMIN_TLS",
    "PROVISION_ADMIN_CERT",
    "PROVISION_ADMIN_KEY",
    "PROVISION_INSECURE_ADMIN",
    "PROVISION_MAX_DISCOVERED",
    "PROVISION_EVENTS_PER_MACHINE",
    "PROVISION_MAX_EVENTS",
    "PROVISION_TFTP",
    "PROVISION_METRICS",
    "PROVISION_TFTP_ROOT",
    "PROVISION_REGISTER_WORKERS",
    "PROVISION_REGISTER_ATTEMPTS",
    "PROVISION_SSH_TIMEOUT",
    "PROVISION_HANDOFF_TIMEOUT",
    "PROVISION_REGISTER_CLAIM",
    "PROVISION_DHCP",
    "PROVISION_DHCP_PORT",
    "PROVISION_DHCP_INTERFACE",
    "PROVISION_DHCP_MODE",
    "PROVISION_DHCP_RANGE",
    "PROVISION_DHCP_NETMASK",
    "PROVISION_DHCP_ROUTER",
    "PROVISION_DHCP_DNS",
    "PROVISION_DHCP_LEASE_TIME",
    "PROVISION_PXE_PORT",
    "PROVISION_EFI_BOOT_FILE",
    "PROVISION_ADVERTISE",
    "PROVISION_TEMPLATES_DIR",
    "PROVISION_IPXE_DIR",
    "PROVISION_ASSETS_DIR",
    "PROVISION_INSTALL_TOKEN_TTL",
    "PROVISION_DISCOVER",
    "PROVISION_CLAIMS",
    "PROVISION_URL",
    "PROVISION_TOKEN",
    "PROVISION_TOKEN_FILE",
    "PROVISION_CA_FILE",
    "PROVISION_FINGERPRINT",
    "PROVISION_LOG",
    "PROVISION_LOG_FORMAT",
];

/// The validated configuration of `provision serve`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Where the inventory lives.
    pub database: crate::store::Database,
    /// The key shared files are sealed with (PostgreSQL).
    pub secret_key_file: Option<PathBuf>,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// The admin listener; `None` is off.
    pub admin: Option<Admin>,
    /// Where `/metrics` is served.
    pub metrics: MetricsAt,
    /// TFTP listen address; `None` is off.
    pub tftp: Option<SocketAddr>,
    /// TFTP roots, searched in order.
    pub tftp_roots: Vec<PathBuf>,
    /// ProxyDHCP address; `None` is off.
    pub dhcp: Option<std::net::Ipv4Addr>,
    /// ProxyDHCP port.
    pub dhcp_port: u16,
    /// PXE boot server port.
    pub pxe_port: u16,
    /// Proxy or address mode.
    pub dhcp_mode: crate::dhcp::Mode,
    /// Interfaces DHCP is limited to; empty means all.
    pub dhcp_interfaces: Vec<String>,
    /// Boot file names by firmware.
    pub boot_files: crate::dhcp::packet::BootFiles,
    /// Advertised base URL (no trailing slash), if set.
    pub advertise: Option<String>,
    /// Templates override directory.
    pub templates_dir: Option<PathBuf>,
    /// iPXE scripts override directory.
    pub ipxe_dir: Option<PathBuf>,
    /// Directory served at /assets/.
    pub assets_dir: PathBuf,
    /// Install token lifetime.
    pub install_token_ttl: Duration,
    /// Discovery answer.
    pub discover: DiscoverAnswer,
    /// Which install claims are believed.
    pub claims: ClaimPolicy,
    /// Registrar settings.
    pub register: crate::registrar::Settings,
    /// The bounds on what the network can make the database hold.
    pub limits: crate::store::Limits,
}

/// Where Prometheus metrics are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAt {
    /// Not at all.
    Off,
    /// `/metrics` on the machine HTTP listener.
    Http,
    /// `/metrics` on a listener of its own.
    Listen(SocketAddr),
}

impl std::str::FromStr for MetricsAt {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<MetricsAt> {
        Ok(match s {
            "off" => MetricsAt::Off,
            "http" => MetricsAt::Http,
            s => MetricsAt::Listen(s.parse().map_err(|_| {
                anyhow::anyhow!(
                    "metrics {s:?} must be http (the machine HTTP listener), ADDR:PORT (a listener of its own, e.g. 127.0.0.1:9469) or off"
                )
            })?),
        })
    }
}

/// Where and how the admin API is served.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Listen address.
    pub addr: SocketAddr,
    /// TLS, or plain HTTP.
    pub tls: AdminTls,
}

/// The admin listener's transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminTls {
    /// TLS with a certificate made on first start in the data directory.
    SelfSigned,
    /// TLS with the operator's certificate chain and key.
    Operator {
        /// PEM chain, leaf first.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
    /// Plain HTTP (loopback, or `--insecure-admin`).
    Off,
}

impl Admin {
    /// The URL scheme clients use.
    pub fn scheme(&self) -> &'static str {
        if self.tls == AdminTls::Off {
            "http"
        } else {
            "https"
        }
    }
}

/// The admin listener from its settings: TLS unless turned off, and off only where the token
/// cannot be read on the wire (loopback) or the operator said so.
fn admin_listener(
    addr: Option<String>,
    tls: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure: bool,
    http: SocketAddr,
) -> anyhow::Result<Option<Admin>> {
    let addr_s = addr.unwrap_or_else(|| "0.0.0.0:8443".into());
    if addr_s == "off" {
        return Ok(None);
    }
    let addr: SocketAddr = addr_s.parse().with_context(|| {
        format!(
            "admin address {addr_s:?} must be ADDR:PORT (e.g. 0.0.0.0:8443 or 127.0.0.1:0) or off"
        )
    })?;
    if addr.port() != 0
        && addr.port() == http.port()
        && (addr.ip() == http.ip() || addr.ip().is_unspecified() || http.ip().is_unspecified())
    {
        bail!("admin address {addr} and http address {http} overlap; the admin API needs a port of its own (e.g. --admin 0.0.0.0:8443)");
    }
    let tls_on = match tls.as_deref().unwrap_or("on") {
        "on" => true,
        "off" => false,
        other => bail!("admin_tls {other:?} must be on or off"),
    };
    let tls = match (tls_on, cert, key) {
        (true, None, None) => AdminTls::SelfSigned,
        (true, Some(cert), Some(key)) => {
            for (what, p) in [("admin_cert", &cert), ("admin_key", &key)] {
                if !p.is_file() {
                    bail!("{what} {} is not a readable file", p.display());
                }
            }
            AdminTls::Operator { cert, key }
        }
        (true, _, _) => bail!("admin_cert and admin_key go together: give both, or neither for a self-signed certificate"),
        (false, None, None) => AdminTls::Off,
        (false, _, _) => bail!("admin_tls is off but admin_cert/admin_key are set; drop one or the other"),
    };
    if tls == AdminTls::Off && !addr.ip().is_loopback() && !insecure {
        bail!(
            "the admin API on {addr} without TLS would send the admin token in clear over the network; keep TLS (admin_tls on, the default), bind it to loopback (--admin 127.0.0.1:8443), or accept the risk with --insecure-admin"
        );
    }
    Ok(Some(Admin { addr, tls }))
}

/// Subdirectories of the data directory that hold secrets (the SSH key, the node CA's key, the
/// admin TLS key); the data directory itself holds the admin token and the database.
const SECRET_SUBDIRS: &[&str] = &["ssh", "pki", "admin-tls"];

/// `p` made absolute with symlinks resolved as far as it exists (the rest appended as
/// written, `..` and `.` folded), so two spellings of one directory compare equal before
/// either is created.
fn resolved(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => {
                out.push(other);
                if let Ok(real) = out.canonicalize() {
                    out = real;
                }
            }
        }
    }
    out
}

/// Refuses a served directory (`/assets/`, TFTP and `/boot/`) that would serve the data
/// directory's secrets: the data directory itself or one of its ancestors, or a secret
/// subdirectory. (The default assets directory, `DATA_DIR/assets`, is inside the data
/// directory and holds no secret.)
fn served_dirs_hold_no_secrets(
    data_dir: &Path,
    assets: &Path,
    tftp_roots: &[PathBuf],
) -> anyhow::Result<()> {
    let data = resolved(data_dir);
    let served = std::iter::once(("assets_dir", assets))
        .chain(tftp_roots.iter().map(|r| ("tftp_root", r.as_path())));
    for (what, dir) in served {
        let d = resolved(dir);
        let secret =
            data.starts_with(&d) || SECRET_SUBDIRS.iter().any(|s| d.starts_with(data.join(s)));
        if secret {
            bail!(
                "{what} {} would serve the data directory's secrets ({} holds the admin token, the database and the private keys); serve a directory outside it, or one of its own such as {}",
                dir.display(),
                data_dir.display(),
                data_dir.join("assets").display()
            );
        }
    }
    Ok(())
}

/// The default data directory: `/var/lib/provision` for root, else the XDG data directory.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return PathBuf::from("/var/lib/provision");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("provision");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/provision"),
        None => PathBuf::from("provision-data"),
    }
}

/// Checks a base URL: `http://` or `https://`, a host, optional port and path, no query, and
/// only characters that are safe on an iPXE line. Returns it without a trailing slash.
pub fn check_base_url(u: &str) -> anyhow::Result<String> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .with_context(|| format!("advertise URL {u:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        bail!("advertise URL {u:?} has no host");
    }
    if let Some(c) = u
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || b"._-:/[]~".contains(b)))
    {
        bail!(
            "advertise URL {u:?} contains {:?}; use a plain http://HOST[:PORT][/PATH] URL",
            c as char
        );
    }
    Ok(u.trim_end_matches('/').to_string())
}

/// Parses a registrar duration option (`ssh_timeout`, `handoff_timeout`) within bounds.
fn parse_bounded(key: &str, s: &str, min: Duration, max: Duration) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s)
        .with_context(|| format!("{key} {s:?} is not a duration such as 10s or 5m"))?;
    if d < min || d > max {
        bail!(
            "{key} {s:?} is out of range: between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        );
    }
    Ok(d)
}

/// Parses `install_token_ttl` (humantime: "6h", "90m", "1h 30m").
fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s)
        .with_context(|| format!("install_token_ttl {s:?} is not a duration such as 6h or 90m"))?;
    if d < Duration::from_secs(60) {
        bail!("install_token_ttl {s:?} is under a minute; an installer could not finish");
    }
    if d > Duration::from_secs(366 * 86_400) {
        bail!("install_token_ttl {s:?} is over a year; an install token should not outlive its install");
    }
    Ok(d)
}

fn parse_discover(s: &str) -> anyhow::Result<DiscoverAnswer> {
    match s {
        "local_boot" | "local-boot" => Ok(DiscoverAnswer::LocalBoot),
        "ignore" => Ok(DiscoverAnswer::Ignore),
        _ => bail!("discover {s:?} must be local_boot or ignore"),
    }
}

fn ipv4(what: &str, s: &str) -> anyhow::Result<std::net::Ipv4Addr> {
    s.trim()
        .parse()
        .with_context(|| format!("{what} {s:?} is not an IPv4 address"))
}

/// Builds the DHCP mode from its settings; full mode needs a range inside one subnet.
fn dhcp_mode(
    mode: Option<String>,
    range: Option<String>,
    netmask: Option<String>,
    router: Option<String>,
    dns: Option<String>,
    lease_time: Option<String>,
) -> anyhow::Result<crate::dhcp::Mode> {
    match mode.as_deref().unwrap_or("proxy") {
        "proxy" => {
            if range.is_some() {
                bail!("dhcp_range is only used with dhcp_mode = \"full\"");
            }
            Ok(crate::dhcp::Mode::Proxy)
        }
        "full" => {
            let range = range
                .context("dhcp_mode = \"full\" needs dhcp_range, e.g. 10.0.0.100-10.0.0.200")?;
            let (a, b) = range
                .split_once('-')
                .with_context(|| format!("dhcp_range {range:?} must be START-END"))?;
            let (start, end) = (ipv4("dhcp_range start", a)?, ipv4("dhcp_range end", b)?);
            let netmask = ipv4(
                "dhcp_netmask",
                netmask.as_deref().unwrap_or("255.255.255.0"),
            )?;
            let m = u32::from(netmask);
            if m.leading_ones() + m.trailing_zeros() != 32 {
                bail!("dhcp_netmask {netmask} is not a contiguous mask");
            }
            if u32::from(start) > u32::from(end) || (u32::from(start) & m) != (u32::from(end) & m) {
                bail!("dhcp_range {range:?} must run from low to high within one {netmask} subnet");
            }
            let router = router
                .as_deref()
                .map(|r| ipv4("dhcp_router", r))
                .transpose()?;
            let dns = dns
                .as_deref()
                .map(|d| {
                    d.split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| ipv4("dhcp_dns", s))
                        .collect()
                })
                .transpose()?
                .unwrap_or_default();
            let lease_time = humantime::parse_duration(lease_time.as_deref().unwrap_or("1h"))
                .context("dhcp_lease_time must be a duration such as 1h")?;
            if lease_time < std::time::Duration::from_secs(60)
                || lease_time > std::time::Duration::from_secs(366 * 86_400)
            {
                bail!("dhcp_lease_time must be between a minute and a year");
            }
            Ok(crate::dhcp::Mode::Full(crate::dhcp::AddressMode {
                start,
                end,
                netmask,
                router,
                dns,
                lease_time,
            }))
        }
        other => bail!("dhcp_mode {other:?} must be proxy or full"),
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

impl Config {
    /// Merges flags/env over the file over defaults, and validates the result.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Config> {
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("PROVISION_") && !KNOWN_ENV.contains(&k) {
                    bail!(
                        "unknown environment variable {k}; known ones are {}",
                        KNOWN_ENV.join(", ")
                    );
                }
            }
        }
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir);
        let database = crate::store::Database::parse(
            args.database
                .as_deref()
                .or(file.database.as_deref())
                .unwrap_or("sqlite"),
        )
        .map_err(|e| anyhow::anyhow!("database: {e}"))?;
        let secret_key_file = args.secret_key_file.clone().or(file.secret_key_file);
        match (&database, &secret_key_file) {
            (crate::store::Database::Postgres(_), None) => bail!(
                "a PostgreSQL database needs --secret-key-file: the daemons sharing it share the \
                 node CA, their SSH key and the admin token through it, sealed with that key. \
                 Make one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > \
                 /etc/provision/secret.key; chmod 600 /etc/provision/secret.key` and give every \
                 daemon the same file"
            ),
            (crate::store::Database::Sqlite, Some(_)) => bail!(
                "--secret-key-file is for a PostgreSQL database several daemons share; with \
                 SQLite the daemon's secrets stay in its data directory"
            ),
            _ => {}
        }
        let http_s = args
            .http
            .clone()
            .or(file.http)
            .unwrap_or_else(|| "0.0.0.0:8080".into());
        let http: SocketAddr = http_s.parse().with_context(|| {
            format!("http address {http_s:?} must be ADDR:PORT, e.g. 0.0.0.0:8080 or 127.0.0.1:0")
        })?;
        let admin = admin_listener(
            args.admin.clone().or(file.admin),
            args.admin_tls.clone().or(file.admin_tls),
            args.admin_cert.clone().or(file.admin_cert),
            args.admin_key.clone().or(file.admin_key),
            args.insecure_admin || file.insecure_admin.unwrap_or(false),
            http,
        )?;
        let tftp_s = args
            .tftp
            .clone()
            .or(file.tftp)
            .unwrap_or_else(|| "0.0.0.0:69".into());
        let tftp = match tftp_s.as_str() {
            "off" => None,
            s => Some(s.parse::<SocketAddr>().with_context(|| {
                format!("tftp address {s:?} must be ADDR:PORT (e.g. 0.0.0.0:69) or off")
            })?),
        };
        let metrics: MetricsAt = args
            .metrics
            .clone()
            .or(file.metrics)
            .as_deref()
            .unwrap_or("http")
            .parse()?;
        let tftp_roots = match args.tftp_root.clone().or(file.tftp_root) {
            Some(r) => {
                if !r.is_dir() {
                    bail!("tftp_root {} is not a directory", r.display());
                }
                vec![r]
            }
            // The Debian `ipxe` package puts undionly.kpxe, ipxe.efi and snponly.efi here.
            None => vec![data_dir.join("ipxe"), PathBuf::from("/usr/lib/ipxe")],
        };
        let dhcp_s = args
            .dhcp
            .clone()
            .or(file.dhcp)
            .unwrap_or_else(|| "0.0.0.0".into());
        let dhcp = match dhcp_s.as_str() {
            "off" => None,
            s => Some(s.parse::<std::net::Ipv4Addr>().with_context(|| {
                format!("dhcp address {s:?} must be an IPv4 address (e.g. 0.0.0.0) or off")
            })?),
        };
        let dhcp_port = args.dhcp_port.or(file.dhcp_port).unwrap_or(67);
        let mut dhcp_interfaces = if args.dhcp_interfaces.is_empty() {
            file.dhcp_interfaces.unwrap_or_default()
        } else {
            args.dhcp_interfaces.clone()
        };
        if let Some(ip) = dhcp.filter(|ip| !ip.is_unspecified()) {
            // A socket bound to an address never receives broadcasts; limit to the
            // interface holding it instead.
            let ifname = crate::dhcp::interface_with(ip).with_context(|| {
                format!("dhcp address {ip} is not on any interface; use 0.0.0.0, an address of this host, or --dhcp-interface NAME")
            })?;
            if !dhcp_interfaces.contains(&ifname) {
                dhcp_interfaces.push(ifname);
            }
        }
        for name in &dhcp_interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                bail!("dhcp interface {name:?} is not an interface name");
            }
        }
        let pxe_port = args.pxe_port.or(file.pxe_port).unwrap_or(4011);
        let dhcp_mode = dhcp_mode(
            args.dhcp_mode.clone().or(file.dhcp_mode),
            args.dhcp_range.clone().or(file.dhcp_range),
            args.dhcp_netmask.clone().or(file.dhcp_netmask),
            args.dhcp_router.clone().or(file.dhcp_router),
            args.dhcp_dns.clone().or(file.dhcp_dns),
            args.dhcp_lease_time.clone().or(file.dhcp_lease_time),
        )?;
        if dhcp.is_some()
            && matches!(dhcp_mode, crate::dhcp::Mode::Full(_))
            && dhcp_interfaces.is_empty()
        {
            bail!(
                "dhcp_mode = \"full\" hands out addresses: limit it to the lab's interface with --dhcp-interface NAME (or --dhcp ADDR), so it never answers on the site network"
            );
        }
        let mut boot_files = crate::dhcp::packet::BootFiles::default();
        if let Some(f) = args.efi_boot_file.clone().or(file.efi_boot_file) {
            if crate::files::check_name(&f).is_err() || f.contains(char::is_whitespace) {
                bail!("efi_boot_file {f:?} must be a file name relative to the TFTP root, such as snponly.efi");
            }
            boot_files.efi_x64 = f;
        }
        let advertise = args
            .advertise
            .clone()
            .or(file.advertise)
            .map(|u| check_base_url(&u))
            .transpose()?;
        let assets_dir = args
            .assets_dir
            .clone()
            .or(file.assets_dir)
            .unwrap_or_else(|| data_dir.join("assets"));
        let install_token_ttl = parse_ttl(
            &args
                .install_token_ttl
                .clone()
                .or(file.install_token_ttl)
                .unwrap_or_else(|| "6h".into()),
        )?;
        let discover = parse_discover(
            &args
                .discover
                .clone()
                .or(file.discover)
                .unwrap_or_else(|| "local_boot".into()),
        )?;
        let claims: ClaimPolicy = args
            .claims
            .clone()
            .or(file.claims)
            .map(|s| s.parse().map_err(anyhow::Error::msg))
            .transpose()?
            .unwrap_or_default();
        let workers = args.register_workers.or(file.register_workers).unwrap_or(4);
        if !(1..=256).contains(&workers) {
            bail!("register_workers {workers} is out of range: between 1 and 256");
        }
        let attempts = args
            .register_attempts
            .or(file.register_attempts)
            .unwrap_or(5);
        if !(1..=100).contains(&attempts) {
            bail!("register_attempts {attempts} is out of range: between 1 and 100");
        }
        let register = crate::registrar::Settings {
            workers,
            attempts,
            ssh_timeout: parse_bounded(
                "ssh_timeout",
                &args
                    .ssh_timeout
                    .clone()
                    .or(file.ssh_timeout)
                    .unwrap_or_else(|| "10s".into()),
                Duration::from_secs(1),
                Duration::from_secs(600),
            )?,
            handoff_timeout: parse_bounded(
                "handoff_timeout",
                &args
                    .handoff_timeout
                    .clone()
                    .or(file.handoff_timeout)
                    .unwrap_or_else(|| "10m".into()),
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            )?,
            claim: parse_bounded(
                "register_claim",
                &args
                    .register_claim
                    .clone()
                    .or(file.register_claim)
                    .unwrap_or_else(|| "60s".into()),
                Duration::from_secs(3),
                Duration::from_secs(3_600),
            )?,
        };
        let defaults = crate::store::Limits::default();
        let bounded = |name: &str, v: Option<u64>, default: u64, min: u64| -> anyhow::Result<u64> {
            let v = v.unwrap_or(default);
            if v < min || v > 1_000_000_000 {
                bail!("{name} {v} is out of range: between {min} and 1000000000");
            }
            Ok(v)
        };
        let limits = crate::store::Limits {
            max_discovered: bounded(
                "max_discovered",
                args.max_discovered.or(file.max_discovered),
                defaults.max_discovered,
                1,
            )?,
            events_per_machine: bounded(
                "events_per_machine",
                args.events_per_machine.or(file.events_per_machine),
                defaults.events_per_machine,
                10,
            )?,
            max_events: bounded(
                "max_events",
                args.max_events.or(file.max_events),
                defaults.max_events,
                1000,
            )?,
            ..defaults
        };
        let templates_dir = args.templates_dir.clone().or(file.templates_dir);
        let ipxe_dir = args.ipxe_dir.clone().or(file.ipxe_dir);
        for (what, d) in [("templates_dir", &templates_dir), ("ipxe_dir", &ipxe_dir)] {
            if let Some(d) = d {
                if !d.is_dir() {
                    bail!("{what} {} is not a directory", d.display());
                }
            }
        }
        served_dirs_hold_no_secrets(&data_dir, &assets_dir, &tftp_roots)?;
        Ok(Config {
            data_dir,
            database,
            secret_key_file,
            http,
            admin,
            metrics,
            tftp,
            tftp_roots,
            dhcp,
            dhcp_port,
            pxe_port,
            dhcp_mode,
            dhcp_interfaces,
            boot_files,
            advertise,
            limits,
            templates_dir,
            ipxe_dir,
            assets_dir,
            install_token_ttl,
            discover,
            claims,
            register,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.toml");
        std::fs::write(
            &f,
            "http = \"127.0.0.1:9000\"\ninstall_token_ttl = \"2h\"\ndiscover = \"ignore\"\nclaims = \"any\"\n",
        )
        .unwrap();
        let mut args = ServeArgs {
            config: Some(f.clone()),
            data_dir: Some(d.path().into()),
            ..Default::default()
        };
        let c = Config::from_args(&args).unwrap();
        assert_eq!(c.http.to_string(), "127.0.0.1:9000");
        assert_eq!(c.install_token_ttl, Duration::from_secs(7200));
        assert_eq!(c.discover, DiscoverAnswer::Ignore);
        assert_eq!(c.claims, ClaimPolicy::Any);
        assert_eq!(c.assets_dir, d.path().join("assets"));
        args.http = Some("127.0.0.1:0".into());
        assert_eq!(Config::from_args(&args).unwrap().http.port(), 0);
        // Without a word on it, install claims need evidence.
        let plain = ServeArgs {
            data_dir: Some(d.path().into()),
            ..Default::default()
        };
        assert_eq!(
            Config::from_args(&plain).unwrap().claims,
            ClaimPolicy::Evidence
        );
    }

    #[test]
    fn bad_input_is_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.toml");
        std::fs::write(&f, "htp = \"127.0.0.1:9000\"\n").unwrap();
        let args = ServeArgs {
            config: Some(f),
            ..Default::default()
        };
        let e = format!("{:#}", Config::from_args(&args).unwrap_err());
        assert!(e.contains("unknown field `htp`"), "{e}");
        for (args, want) in [
            (
                ServeArgs {
                    http: Some("nope".into()),
                    ..Default::default()
                },
                "ADDR:PORT",
            ),
            (
                ServeArgs {
                    advertise: Some("10.0.0.1".into()),
                    ..Default::default()
                },
                "http://",
            ),
            (
                ServeArgs {
                    advertise: Some("http://a b".into()),
                    ..Default::default()
                },
                "contains ' '",
            ),
            (
                ServeArgs {
                    install_token_ttl: Some("soon".into()),
                    ..Default::default()
                },
                "duration",
            ),
            (
                ServeArgs {
                    discover: Some("wipe".into()),
                    ..Default::default()
                },
                "local_boot or ignore",
            ),
            (
                ServeArgs {
                    claims: Some("trust".into()),
                    ..Default::default()
                },
                "must be evidence (the default) or any",
            ),
        ] {
            let e = format!("{:#}", Config::from_args(&args).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_admin_listener_is_tls_unless_plain_http_cannot_leak_the_token() {
        let d = tempfile::tempdir().unwrap();
        let with = |f: &dyn Fn(&mut ServeArgs)| {
            let mut a = ServeArgs {
                data_dir: Some(d.path().into()),
                ..Default::default()
            };
            f(&mut a);
            Config::from_args(&a).map_err(|e| format!("{e:#}"))
        };
        let c = with(&|_| {}).unwrap().admin.unwrap();
        assert_eq!(c.addr.to_string(), "0.0.0.0:8443");
        assert_eq!(c.tls, AdminTls::SelfSigned);
        assert_eq!(c.scheme(), "https");
        assert!(with(&|a| a.admin = Some("off".into()))
            .unwrap()
            .admin
            .is_none());
        let plain = with(&|a| {
            a.admin = Some("127.0.0.1:0".into());
            a.admin_tls = Some("off".into());
        })
        .unwrap()
        .admin
        .unwrap();
        assert_eq!((plain.scheme(), plain.tls), ("http", AdminTls::Off));
        let e = with(&|a| a.admin_tls = Some("off".into())).unwrap_err();
        assert!(
            e.contains("in clear") && e.contains("--insecure-admin"),
            "{e}"
        );
        assert!(with(&|a| {
            a.admin_tls = Some("off".into());
            a.insecure_admin = true;
        })
        .is_ok());
        let e = with(&|a| a.admin = Some("0.0.0.0:8080".into())).unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let e = with(&|a| a.admin_cert = Some(d.path().join("c.pem"))).unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = with(&|a| {
            a.admin_cert = Some(d.path().join("c.pem"));
            a.admin_key = Some(d.path().join("k.pem"));
        })
        .unwrap_err();
        assert!(e.contains("is not a readable file"), "{e}");
        let e = with(&|a| a.admin_tls = Some("maybe".into())).unwrap_err();
        assert!(e.contains("on or off"), "{e}");
    }

    /// Every environment variable a flag reads is known, so setting it is not refused as a
    /// typo.
    #[test]
    fn every_flag_environment_variable_is_known() {
        use clap::{Args, CommandFactory};
        let serve = ServeArgs::augment_args(clap::Command::new("serve"));
        let cli = crate::cli::Cli::command();
        let mut seen = 0;
        for arg in serve.get_arguments().chain(cli.get_arguments()) {
            if let Some(env) = arg.get_env() {
                let env = env.to_str().unwrap();
                assert!(KNOWN_ENV.contains(&env), "{env} is not in KNOWN_ENV");
                seen += 1;
            }
        }
        assert!(seen > 30, "{seen}");
    }

    #[test]
    fn served_directories_that_reach_the_secrets_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("pki")).unwrap();
        std::fs::create_dir_all(d.path().join("other")).unwrap();
        let with = |assets: Option<PathBuf>, tftp: Option<PathBuf>| {
            Config::from_args(&ServeArgs {
                data_dir: Some(data.clone()),
                assets_dir: assets,
                tftp_root: tftp,
                ..Default::default()
            })
            .map_err(|e| format!("{e:#}"))
        };
        // The defaults, and directories of their own, are fine.
        assert!(with(None, None).is_ok());
        assert!(with(Some(d.path().join("other")), Some(d.path().join("other"))).is_ok());
        for (assets, tftp) in [
            (Some(data.clone()), None),
            (Some(d.path().to_path_buf()), None),
            (Some(data.join("assets/..")), None),
            (Some(data.join("pki")), None),
            (None, Some(data.join("pki"))),
            (None, Some(d.path().join("other/../data/pki/."))),
        ] {
            let e = with(assets.clone(), tftp.clone()).unwrap_err();
            assert!(
                e.contains("would serve the data directory's secrets"),
                "{assets:?} {tftp:?}: {e}"
            );
        }
        // Through a symlink too.
        std::os::unix::fs::symlink(&data, d.path().join("link")).unwrap();
        let e = with(Some(d.path().join("link")), None).unwrap_err();
        assert!(e.contains("secrets"), "{e}");
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            check_base_url("http://10.0.0.1:8080/").unwrap(),
            "http://10.0.0.1:8080"
        );
        assert_eq!(
            check_base_url("http://[fd00::1]:8080/pxe").unwrap(),
            "http://[fd00::1]:8080/pxe"
        );
        assert!(check_base_url("http://x/${y}").is_err());
        assert!(check_base_url("http://x/a?b=c").is_err());
    }
}
