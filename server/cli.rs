//! The command line: `serve` runs the daemon; everything else talks to it over the REST API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError};
use crate::config::{Config, ServeArgs};
use crate::mac::Mac;
use crate::policy::State;

/// provision: bare-metal provisioning from power-on to a registered node.
#[derive(Parser, Debug)]
#[command(name = "provision", version, about)]
pub struct Cli {
    /// The daemon's admin listener, for every command but serve.
    #[arg(
        long,
        global = true,
        env = "PROVISION_URL",
        default_value = "https://127.0.0.1:8443"
    )]
    pub server: String,
    /// CA certificates (PEM) the daemon's certificate must chain to, for an admin certificate
    /// from your own CA.
    #[arg(long, global = true, env = "PROVISION_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the daemon's admin certificate, as `serve` logs it
    /// [default: read from admin-cert.sha256 beside the token file].
    #[arg(long, global = true, env = "PROVISION_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// Allow an http:// --server that is not loopback (a daemon run with --insecure-admin).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// File holding the admin API token [default: DATA_DIR/admin-token].
    #[arg(long, global = true, env = "PROVISION_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The admin API token itself (instead of a file).
    #[arg(long, global = true, env = "PROVISION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Log lines as text (coloured only on a terminal, and never with NO_COLOR set) or as
    /// one JSON object per line (level, target, fields, span) for a log collector. What is
    /// logged is set by PROVISION_LOG (e.g. `info`, `provision=debug`).
    #[arg(
        long,
        global = true,
        env = "PROVISION_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up logging to stderr as `format` says, filtered by `PROVISION_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROVISION_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            // Colour codes are for a person at a terminal; in a journal or a file they are
            // noise (https://no-color.org).
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Serve(Box<ServeArgs>),
    /// Write the manual pages (provision.1 and one per subcommand) into DIR; the Debian
    /// package is built with them.
    #[command(hide = true)]
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Enroll a machine: its next network boot installs the profile.
    Enroll(EnrollArgs),
    /// List, show, change, delete or reprovision machines.
    #[command(subcommand)]
    Machines(MachinesCmd),
    /// Groups: a profile, variables and labels for every machine a label selector picks.
    #[command(subcommand)]
    Groups(GroupsCmd),
    /// Discovery rules: enroll discovered machines by what they report, in priority order,
    /// up to a count.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Make the inventory what a file says: its groups, rules and machines created or
    /// changed (and with --prune, what it leaves out deleted), all in one transaction.
    Apply(ApplyArgs),
    /// Write the inventory as a file `apply` takes: groups, rules and every machine past
    /// discovery with its own values (CSV: the machines only).
    Export(ExportArgs),
    /// Show events: all, or one machine's timeline.
    Events {
        /// Only this machine.
        mac: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Show at most this many (the newest).
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
    /// Render an artifact for a machine as it would be served (install token redacted);
    /// `ipxe` is its boot script.
    Render {
        /// The machine.
        mac: String,
        /// `ipxe`, or an artifact of its profile (user-data, preseed.cfg, config.ign, ...).
        artifact: String,
    },
    /// List profiles, or show one.
    Profiles {
        /// Show this profile in full.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register an installed machine again (its role's steps over SSH; each step is
    /// idempotent), e.g. after fixing what made it fail.
    Register {
        /// The machine.
        mac: String,
        /// Wait until it is registered (and handed off, if its profile has a hook) or failed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Ansible dynamic inventory of installed machines (use as `ansible -i SCRIPT` through a
    /// two-line wrapper), or their pinned SSH host keys as known_hosts.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["list", "host", "known_hosts"])))]
    Inventory {
        /// Every group and host (Ansible's `--list`).
        #[arg(long)]
        list: bool,
        /// One host's variables (Ansible's `--host`).
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        /// known_hosts lines of the pinned host keys (for UserKnownHostsFile).
        #[arg(long)]
        known_hosts: bool,
    },
    /// Reload profiles and templates in the running daemon.
    Reload,
    /// Machines by state, and what the inventory's bounds dropped since the daemon started.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The admin token.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Write the data directory (a consistent copy of the database, the admin token, TLS,
    /// SSH and CA keys; not assets/) to FILE, mode 0600. Works while the daemon runs.
    Backup {
        /// The backup file to write (replaced whole).
        file: PathBuf,
        /// The daemon's data directory [default: as `serve`'s].
        #[arg(long, env = "PROVISION_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Put a backup into a data directory that holds no database and no running daemon.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The data directory to restore into [default: as `serve`'s].
        #[arg(long, env = "PROVISION_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Build a VM lab against the running daemon and install VMs until each is installed
    /// (needs root and QEMU; everything created is removed afterwards, also on Ctrl-C).
    Lab(crate::lab::LabArgs),
}

/// `provision token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Replace the admin token: the daemon writes the new one to its token file and the old
    /// one stops working at once. A token file this CLI read from is rewritten too; a token
    /// given with --token/PROVISION_TOKEN is replaced by the one printed.
    Rotate,
}

/// `provision apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// The inventory file (`-`: standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: String,
    /// yaml, toml or csv [default: from FILE's extension; yaml for `-`].
    #[arg(long)]
    format: Option<crate::declare::Format>,
    /// Print what would change, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also delete the groups, rules and machines the file leaves out (of the kinds it
    /// declares; discovered machines are never deleted).
    #[arg(long)]
    prune: bool,
    /// Print the changes as JSON.
    #[arg(long)]
    json: bool,
}

/// `provision export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// yaml, toml or csv [default: from --output's extension; yaml].
    #[arg(long)]
    format: Option<crate::declare::Format>,
    /// Write to this file (replaced whole, mode 0600) instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// `provision enroll`.
#[derive(clap::Args, Debug)]
pub struct EnrollArgs {
    /// MAC address (aa:bb:cc:dd:ee:ff, aa-bb-.., aabb.ccdd.eeff or aabbccddeeff).
    pub mac: String,
    /// Profile to install (`provision profiles` lists them); without it, the profile a group
    /// that selects the machine gives it.
    #[arg(long, short)]
    pub profile: Option<String>,
    /// Hostname (RFC 1123).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Template variable NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Label NAME=VALUE (repeatable).
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub labels: Vec<String>,
    /// SMBIOS UUID.
    #[arg(long)]
    pub uuid: Option<String>,
    /// Serial number.
    #[arg(long)]
    pub serial: Option<String>,
    /// Wait until the machine has installed (or failed).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `provision machines ...`.
#[derive(Subcommand, Debug)]
pub enum MachinesCmd {
    /// List machines.
    List {
        /// Only machines in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only machines this finds: a MAC in any notation, an IP address, `key=value` for a
        /// label, or text in hostnames, profiles and label values (the web UI's search).
        #[arg(long)]
        search: Option<String>,
        /// Show at most this many (in MAC order, or the search's); the rest is not read.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one machine with its recent events.
    Show {
        /// The machine.
        mac: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change profile, hostname or vars.
    Update {
        /// The machine.
        mac: String,
        /// New profile.
        #[arg(long)]
        profile: Option<String>,
        /// New hostname ("" clears it).
        #[arg(long)]
        hostname: Option<String>,
        /// Set a variable NAME=VALUE (repeatable).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Remove a variable (repeatable).
        #[arg(long = "unset-var", value_name = "NAME")]
        unset: Vec<String>,
    },
    /// Delete a machine (its event history is kept).
    Delete {
        /// The machine.
        mac: String,
    },
    /// Reinstall a machine at its next boot (new token, generation + 1).
    Reprovision {
        /// The machine.
        mac: String,
    },
    /// Enroll a discovered machine as the propose-mode rule that matches it says.
    Confirm {
        /// The machine.
        mac: String,
    },
}

/// `provision groups ...`.
#[derive(Subcommand, Debug)]
pub enum GroupsCmd {
    /// List groups.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one group.
    Show {
        /// The group.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a group. Its machines get each value it sets unless they have their own or a
    /// more specific group (more selector labels) sets it.
    Create {
        /// The group's name.
        name: String,
        #[command(flatten)]
        values: GroupValues,
    },
    /// Change a group: what is given replaces what it had (--selector replaces the whole
    /// selector; --var and --label add or change one value each).
    Update {
        /// The group.
        name: String,
        #[command(flatten)]
        values: GroupValues,
        /// Select every machine (a default group).
        #[arg(long, conflicts_with = "selector")]
        no_selector: bool,
        /// Take the group's profile away.
        #[arg(long, conflicts_with = "profile")]
        no_profile: bool,
        /// Remove a variable (repeatable).
        #[arg(long = "unset-var", value_name = "NAME")]
        unset_vars: Vec<String>,
        /// Remove a label (repeatable).
        #[arg(long = "unset-label", value_name = "NAME")]
        unset_labels: Vec<String>,
    },
    /// Delete a group (refused while it gives the only profile of an enrolled or installed
    /// machine).
    Delete {
        /// The group.
        name: String,
    },
}

/// `provision rules ...`.
#[derive(Subcommand, Debug)]
pub enum RulesCmd {
    /// List rules in the order they are tried.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one rule.
    Show {
        /// The rule.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a rule. A discovered machine that meets every --match is enrolled by the first
    /// such rule (lowest priority first) that has not enrolled its --max machines.
    Create {
        /// The rule's name.
        name: String,
        #[command(flatten)]
        values: RuleValues,
        /// Only mark matching machines; `provision machines confirm MAC` enrolls one.
        #[arg(long)]
        propose: bool,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change a rule: what is given replaces what it had (--match replaces every
    /// condition; --label and --var add or change one value each). Its count is kept.
    Update {
        /// The rule.
        name: String,
        #[command(flatten)]
        values: RuleValues,
        /// `enroll` or `propose`.
        #[arg(long)]
        mode: Option<String>,
        /// Enable it.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disable it: it matches nothing, and withdraws its proposals.
        #[arg(long)]
        disable: bool,
        /// Match every discovered machine.
        #[arg(long, conflicts_with = "conditions")]
        no_match: bool,
        /// No limit on the machines it enrolls.
        #[arg(long, conflicts_with = "max")]
        no_max: bool,
        /// Remove a label (repeatable).
        #[arg(long = "unset-label", value_name = "NAME")]
        unset_labels: Vec<String>,
        /// Remove a variable (repeatable).
        #[arg(long = "unset-var", value_name = "NAME")]
        unset_vars: Vec<String>,
    },
    /// Delete a rule (machines it enrolled stay; its proposals are withdrawn).
    Delete {
        /// The rule.
        name: String,
    },
}

/// What `rules create` and `rules update` set.
#[derive(clap::Args, Debug)]
pub struct RuleValues {
    /// A condition KEY=VALUE (repeatable): mac (52:54:00:* for an OUI), uuid, serial, arch,
    /// platform, vendor_class, user_class, interface, relay, or a label; a trailing * matches
    /// a prefix.
    #[arg(long = "match", short = 'm', value_name = "KEY=VALUE")]
    conditions: Vec<String>,
    /// Lower is tried first [create's default: 100].
    #[arg(long)]
    priority: Option<i64>,
    /// The profile matching machines are enrolled with (none: their groups').
    #[arg(long, short)]
    profile: Option<String>,
    /// Hostname pattern: {index}, {index:02} (zero-padded), {serial}, {mac}.
    #[arg(long)]
    hostname: Option<String>,
    /// A label NAME=VALUE enrolled machines get (repeatable).
    #[arg(long = "label", value_name = "NAME=VALUE")]
    labels: Vec<String>,
    /// A variable NAME=VALUE enrolled machines get (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// Most machines it enrolls.
    #[arg(long)]
    max: Option<u64>,
}

/// What `groups create` and `groups update` set.
#[derive(clap::Args, Debug)]
pub struct GroupValues {
    /// A selector value KEY=VALUE (repeatable): a fact (mac, uuid, serial, hostname, arch,
    /// platform) or a label of the machine. None: every machine.
    #[arg(long = "selector", short = 's', value_name = "KEY=VALUE")]
    selector: Vec<String>,
    /// The profile its machines install, unless they have their own.
    #[arg(long, short)]
    profile: Option<String>,
    /// A variable NAME=VALUE its machines inherit (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// A label NAME=VALUE its machines inherit (repeatable).
    #[arg(long = "label", value_name = "NAME=VALUE")]
    labels: Vec<String>,
}

/// A CLI failure: message and exit code (2 for bad input, 1 otherwise).
struct Fail(String, u8);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        Fail(e.message, if e.bad_input { 2 } else { 1 })
    }
}

/// `provision token rotate`. The daemon writes its own token file; when this CLI read its
/// token from a file the daemon did not rewrite (the CLI runs elsewhere, with a copy), the
/// copy is rewritten here, so the next command works. A token given on the command line or in
/// the environment can only be printed.
fn rotate_token(c: &Client) -> Result<(), Fail> {
    #[derive(serde::Deserialize)]
    struct Rotated {
        token: String,
        token_file: PathBuf,
    }
    let r: Rotated = c.send("POST", "/token/rotate", None::<&()>)?;
    println!(
        "admin token rotated; the daemon wrote the new one to {}",
        r.token_file.display()
    );
    match c.token_file() {
        Some(f) => {
            let now = std::fs::read_to_string(f).unwrap_or_default();
            if now.trim() != r.token {
                crate::keys::replace_file(f, format!("{}\n", r.token).as_bytes(), 0o600)
                    .map_err(|e| {
                        Fail(
                            format!(
                                "the token was rotated, but writing it to {} failed: {e:#}; copy it from the daemon's {}",
                                f.display(),
                                r.token_file.display()
                            ),
                            1,
                        )
                    })?;
                println!("and this CLI's copy in {}", f.display());
            }
        }
        None => println!("new token (the old one no longer works): {}", r.token),
    }
    Ok(())
}

fn bad(msg: impl Into<String>) -> Fail {
    Fail(msg.into(), 2)
}

fn parse_mac(s: &str) -> Result<Mac, Fail> {
    s.parse::<Mac>().map_err(|e| bad(e.to_string()))
}

fn parse_pairs(what: &str, pairs: &[String]) -> Result<BTreeMap<String, String>, Fail> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            return Err(bad(format!("{what} {p:?} must be NAME=VALUE")));
        };
        crate::validate::var_name(k).map_err(|e| bad(e.0))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Writes the manual pages generated from the command definitions (clap_mangen), so they
/// say exactly what `--help` says: `provision.1`, and `provision-SUBCOMMAND.1` for each
/// visible subcommand (`provision-machines-list.1`, ...).
fn man_pages(dir: &std::path::Path) -> Result<(), Fail> {
    use clap::CommandFactory;
    let io = |e: std::io::Error| Fail(format!("writing manual pages to {}: {e}", dir.display()), 1);
    std::fs::create_dir_all(dir).map_err(io)?;
    // Hidden subcommands (this one) get no page.
    clap_mangen::generate_to(Cli::command(), dir).map_err(io)
}

/// Runs the CLI; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Man { dir } => man_pages(&dir),
        Command::Backup { file, data_dir } => {
            let dir = data_dir.unwrap_or_else(crate::config::default_data_dir);
            crate::backup::backup(&dir, &file)
                .map(|s| {
                    println!(
                        "backed up {} ({} machines; {}) to {}",
                        dir.display(),
                        s.machines,
                        s.files.join(", "),
                        file.display()
                    )
                })
                .map_err(|e| Fail(format!("backup: {e:#}"), 1))
        }
        Command::Restore { file, data_dir } => {
            let dir = data_dir.unwrap_or_else(crate::config::default_data_dir);
            crate::backup::restore(&file, &dir)
                .map(|s| {
                    println!(
                        "restored {} ({} machines; {}) into {}; start provision serve --data-dir {} on it",
                        file.display(),
                        s.machines,
                        s.files.join(", "),
                        dir.display(),
                        dir.display()
                    )
                })
                .map_err(|e| Fail(format!("restore: {e:#}"), 1))
        }
        cmd => {
            let client = match Client::new(crate::client::Connect {
                server: cli.server,
                token: cli.token,
                token_file: cli.token_file,
                ca_file: cli.ca_file,
                fingerprint: cli.fingerprint,
                insecure: cli.insecure,
            }) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("provision: {e}");
                    return ExitCode::from(1);
                }
            };
            command(&client, cmd)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg, code)) => {
            eprintln!("provision: {msg}");
            ExitCode::from(code)
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Fail> {
    let cfg = Config::from_args(&args).map_err(|e| bad(format!("{e:#}")))?;
    if args.check_config {
        let summary = crate::daemon::check_config(&cfg).map_err(|e| bad(format!("{e:#}")))?;
        print!("{summary}");
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| Fail(e.to_string(), 1))?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = sd.cancelled() => {}
            }
            sd.cancel();
        });
        crate::daemon::run(cfg, shutdown).await
    })
    .map_err(|e| Fail(format!("{e:#}"), 1))
}

fn command(c: &Client, cmd: Command) -> Result<(), Fail> {
    match cmd {
        Command::Serve(_)
        | Command::Man { .. }
        | Command::Backup { .. }
        | Command::Restore { .. } => {
            unreachable!("handled in run")
        }
        Command::Enroll(a) => enroll(c, a),
        Command::Machines(m) => machines(c, m),
        Command::Groups(g) => groups(c, g),
        Command::Apply(a) => apply(c, a),
        Command::Export(a) => export(c, a),
        Command::Rules(r) => rules(c, r),
        Command::Events { mac, json, limit } => {
            let mac = mac.as_deref().map(parse_mac).transpose()?;
            let tail = c.events(mac, limit)?;
            if json {
                print_json(&tail);
            } else {
                print_events(&tail, mac.is_none());
            }
            Ok(())
        }
        Command::Render { mac, artifact } => {
            let mac = parse_mac(&mac)?;
            let body = c.call(
                "GET",
                &format!("/machines/{mac}/render/{artifact}"),
                None::<&()>,
            )?;
            print!("{body}");
            Ok(())
        }
        Command::Profiles { name, json } => {
            match name {
                Some(n) => print_json(&c.profile(&n)?),
                None => {
                    let list: Vec<crate::dto::Profile> = c.get("/profiles")?;
                    if json {
                        print_json(&list);
                    } else {
                        println!("{:<24} {:<11} DESCRIPTION", "PROFILE", "ROLE");
                        for p in list {
                            println!(
                                "{:<24} {:<11} {}",
                                p.name,
                                p.role.as_deref().unwrap_or(crate::render::NO_ROLE),
                                p.description
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Token(TokenCmd::Rotate) => rotate_token(c),
        Command::Lab(a) => {
            crate::lab::check_args(&a).map_err(bad)?;
            crate::lab::lab(c, &a).map_err(|e| Fail(format!("{e:#}"), 1))
        }
        Command::Register { mac, wait, timeout } => {
            let mac = parse_mac(&mac)?;
            let m = c.register(mac)?;
            println!("{mac}: {} (registration queued)", m.state);
            if !wait {
                return Ok(());
            }
            let hook = c
                .profile(m.profile.as_deref().unwrap_or_default())?
                .has_handoff();
            wait_for(c, mac, timeout, |st| {
                st == State::HandedOff || (st == State::Registered && !hook)
            })
        }
        Command::Inventory {
            list: _,
            host,
            known_hosts,
        } => {
            if known_hosts {
                print!("{}", c.call("GET", "/inventory/known_hosts", None::<&()>)?);
                return Ok(());
            }
            let path = match host {
                Some(h) => format!(
                    "/inventory/ansible?host={}",
                    percent_encoding::utf8_percent_encode(&h, percent_encoding::NON_ALPHANUMERIC)
                ),
                None => "/inventory/ansible".to_string(),
            };
            // Ansible's own format: passed through as it is.
            let v: serde_json::Value = c.get(&path)?;
            print_json(&v);
            Ok(())
        }
        Command::Reload => {
            let v: serde_json::Value = c.send("POST", "/reload", None::<&()>)?;
            println!("reloaded {} profiles", v["profiles"]);
            Ok(())
        }
        Command::Status { json } => {
            let st: crate::dto::Status = c.get("/status")?;
            if json {
                print_json(&st);
                return Ok(());
            }
            println!("machines:");
            for (state, n) in &st.machines {
                println!("  {:<12} {n}", state.as_str());
            }
            let i = &st.inventory;
            println!("inventory since start:");
            for (what, n) in [
                ("writes", i.writes),
                ("commits", i.commits),
                ("observations written", i.observations_written),
                ("observations dropped", i.observations_dropped),
                ("discovered evicted", i.discovered_evicted),
                ("discoveries shed", i.discoveries_shed),
                ("events pruned", i.events_pruned),
            ] {
                println!("  {what:<22} {n}");
            }
            Ok(())
        }
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn opt(v: &Option<impl std::fmt::Display>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

fn time(ms: i64) -> String {
    crate::store::fmt_time(ms)
}

/// Event details can quote what a client sent; control characters are shown escaped so
/// nothing from the network reaches the operator's terminal as an escape sequence.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_events(events: &[crate::dto::Event], with_mac: bool) {
    for e in events {
        let states = match (e.from_state, e.to_state) {
            (f, Some(t)) if f != Some(t) => format!(
                " {} → {t}",
                f.map(|f| f.to_string()).unwrap_or_else(|| "(new)".into())
            ),
            (Some(f), None) => format!(" {f} → (deleted)"),
            _ => String::new(),
        };
        let mac = if with_mac {
            format!("{} ", opt(&e.mac))
        } else {
            String::new()
        };
        let detail = if e.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", e.detail)
        };
        let count = if e.count > 1 {
            format!(" (×{})", e.count)
        } else {
            String::new()
        };
        println!(
            "{} {mac}{}{states}{}{count}",
            time(e.at),
            e.kind,
            printable(&detail)
        );
    }
}

fn enroll(c: &Client, a: EnrollArgs) -> Result<(), Fail> {
    let mac = parse_mac(&a.mac)?;
    let req = crate::dto::EnrollRequest {
        mac: mac.to_string(),
        profile: a.profile,
        hostname: a.hostname,
        uuid: a.uuid,
        serial: a.serial,
        vars: parse_pairs("--var", &a.vars)?,
        labels: parse_pairs("--label", &a.labels)?,
    };
    let m = c.enroll(&req)?;
    println!(
        "enrolled {} with profile {}: its next network boot installs",
        m.mac,
        opt(&m.profile)
    );
    if !a.wait {
        return Ok(());
    }
    wait_for(c, mac, a.timeout, |st| {
        matches!(
            st,
            State::Installed | State::Registering | State::Registered | State::HandedOff
        )
    })
}

/// Polls the machine until `done(state)`, failed, or the timeout passes, printing each state
/// change.
fn wait_for(
    c: &Client,
    mac: Mac,
    timeout: Duration,
    done: impl Fn(State) -> bool,
) -> Result<(), Fail> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let m = c.machine(mac)?;
        if last != Some(m.state) {
            println!("{mac}: {}", m.state);
            last = Some(m.state);
        }
        if done(m.state) {
            return Ok(());
        }
        if m.state == State::Failed {
            return Err(Fail(
                format!(
                    "{mac} failed at {}: {}",
                    opt(&m.failed_step),
                    opt(&m.failed_reason)
                ),
                1,
            ));
        }
        if start.elapsed() > timeout {
            return Err(Fail(
                format!(
                    "{mac} is still {} after {}",
                    m.state,
                    humantime::format_duration(timeout)
                ),
                1,
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// `provision apply`: sends the file as it is (the daemon reads it, so its errors name the
/// file's lines), then prints the plan as a diff: `+` created, `~` changed, `-` deleted, each
/// value that changes as `-` before and `+` after.
fn apply(c: &Client, a: ApplyArgs) -> Result<(), Fail> {
    use crate::declare::Format;
    use crate::store::plan::Action;
    use std::io::Read;
    let format = match a.format {
        Some(f) => f,
        None if a.file == "-" => Format::Yaml,
        None => Format::of_path(&a.file).ok_or_else(|| {
            bad(format!(
                "{}: cannot tell the format from the name; give --format yaml, toml or csv",
                a.file
            ))
        })?,
    };
    let mut text = Vec::new();
    let read = if a.file == "-" {
        std::io::stdin().read_to_end(&mut text).map(|_| ())
    } else {
        std::fs::File::open(&a.file).and_then(|mut f| f.read_to_end(&mut text).map(|_| ()))
    };
    read.map_err(|e| bad(format!("{}: {e}", a.file)))?;
    let path = format!(
        "/inventory?format={format}&dry_run={}&prune={}",
        a.dry_run, a.prune
    );
    let answer = c
        .call_with("POST", &path, Some((format.content_type(), text)))
        .map_err(|e| {
            let name = if a.file == "-" { "<stdin>" } else { &a.file };
            // "line 12: machines[3].vars.ip: ..." as compilers say it: "FILE:12: ...".
            let message = e
                .message
                .lines()
                .map(
                    |l| match l.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
                        Some((n, rest)) if n.bytes().all(|b| b.is_ascii_digit()) => {
                            format!("{name}:{n}: {rest}")
                        }
                        _ => format!("{name}: {l}"),
                    },
                )
                .collect::<Vec<_>>()
                .join("\n");
            Fail(message, if e.bad_input { 2 } else { 1 })
        })?;
    let report: crate::dto::ApplyReport = serde_json::from_str(&answer)
        .map_err(|e| Fail(format!("the daemon's answer to apply: {e}"), 1))?;
    if a.json {
        print_json(&report);
        return Ok(());
    }
    let count = |act: Action| report.changes.iter().filter(|c| c.action == act).count();
    for ch in &report.changes {
        let (mark, what) = match ch.action {
            Action::Create => ('+', ""),
            Action::Enroll => ('~', " (discovered: enrolled)"),
            Action::Update => ('~', ""),
            Action::Delete => ('-', ""),
        };
        println!("{mark} {} {}{what}", ch.kind, ch.name);
        for f in &ch.fields {
            if let Some(b) = &f.before {
                println!("-     {}: {}", f.field, printable(b));
            }
            if let Some(v) = &f.after {
                println!("+     {}: {}", f.field, printable(v));
            }
        }
    }
    let u = report.unchanged;
    let unchanged = u.groups + u.rules + u.machines;
    if report.changes.is_empty() {
        let n = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        println!(
            "no changes: the inventory is as the file says ({}, {}, {})",
            n(u.groups, "group"),
            n(u.rules, "rule"),
            n(u.machines, "machine")
        );
        return Ok(());
    }
    println!(
        "{}: {} to create, {} to enroll, {} to change, {} to delete; {unchanged} unchanged",
        if report.dry_run {
            "dry run, nothing changed"
        } else {
            "applied"
        },
        count(Action::Create),
        count(Action::Enroll),
        count(Action::Update),
        count(Action::Delete),
    );
    Ok(())
}

/// `provision export`.
fn export(c: &Client, a: ExportArgs) -> Result<(), Fail> {
    use crate::declare::Format;
    let format = a
        .format
        .or_else(|| {
            a.output
                .as_ref()
                .and_then(|o| Format::of_path(&o.to_string_lossy()))
        })
        .unwrap_or(Format::Yaml);
    let text = c.call("GET", &format!("/inventory?format={format}"), None::<&()>)?;
    match &a.output {
        None => print!("{text}"),
        // Variables may hold what only operators should read: the file is the owner's.
        Some(path) => crate::keys::replace_file(path, text.as_bytes(), 0o600)
            .map_err(|e| Fail(format!("{}: {e:#}", path.display()), 1))?,
    }
    Ok(())
}

fn print_group(g: &crate::dto::Group) {
    let pairs = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={}", printable(v)))
            .collect::<Vec<_>>()
    };
    let selector = pairs(&g.selector);
    println!("name       {}", g.name);
    println!(
        "selector   {}",
        if selector.is_empty() {
            "(none: every machine)".to_string()
        } else {
            selector.join(" ")
        }
    );
    println!("profile    {}", opt(&g.profile));
    for v in pairs(&g.vars) {
        println!("var        {v}");
    }
    for l in pairs(&g.labels) {
        println!("label      {l}");
    }
}

fn print_rule(r: &crate::dto::Rule) {
    let pairs = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={}", printable(v)))
            .collect::<Vec<_>>()
    };
    let conditions = pairs(&r.conditions);
    println!("name       {}", r.name);
    println!(
        "state      {}, {}, priority {}",
        if r.enabled { "enabled" } else { "disabled" },
        r.mode,
        r.priority
    );
    println!(
        "match      {}",
        if conditions.is_empty() {
            "(every discovered machine)".to_string()
        } else {
            conditions.join(" ")
        }
    );
    println!("profile    {}", opt(&r.profile));
    println!("hostname   {}", opt(&r.hostname));
    println!(
        "enrolled   {}{}",
        r.used,
        r.max.map(|m| format!(" of {m}")).unwrap_or_default()
    );
    for v in pairs(&r.vars) {
        println!("var        {v}");
    }
    for l in pairs(&r.labels) {
        println!("label      {l}");
    }
}

/// `/{kind}/{name}` with the name escaped.
fn named_path(kind: &str, name: &str) -> String {
    format!(
        "/{kind}/{}",
        percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
    )
}

fn rules(c: &Client, cmd: RulesCmd) -> Result<(), Fail> {
    match cmd {
        RulesCmd::List { json } => {
            let all: Vec<crate::dto::Rule> = c.get("/rules")?;
            if json {
                print_json(&all);
                return Ok(());
            }
            println!(
                "{:<20} {:>8} {:<8} {:<20} {:<9} MATCH",
                "RULE", "PRIORITY", "MODE", "PROFILE", "ENROLLED"
            );
            for r in &all {
                let conditions: Vec<String> = r
                    .conditions
                    .iter()
                    .map(|(k, v)| format!("{k}={}", printable(v)))
                    .collect();
                println!(
                    "{:<20} {:>8} {:<8} {:<20} {:<9} {}",
                    r.name,
                    r.priority,
                    if r.enabled {
                        r.mode.as_str()
                    } else {
                        "disabled"
                    },
                    opt(&r.profile),
                    format!(
                        "{}{}",
                        r.used,
                        r.max.map(|m| format!("/{m}")).unwrap_or_default()
                    ),
                    if conditions.is_empty() {
                        "(every discovered machine)".to_string()
                    } else {
                        conditions.join(" ")
                    }
                );
            }
            Ok(())
        }
        RulesCmd::Show { name, json } => {
            let r: crate::dto::Rule = c.get(&named_path("rules", &name))?;
            if json {
                print_json(&r);
            } else {
                print_rule(&r);
            }
            Ok(())
        }
        RulesCmd::Create {
            name,
            values,
            propose,
            disabled,
        } => {
            let r = crate::dto::Rule {
                name,
                priority: values.priority.unwrap_or(100),
                enabled: !disabled,
                mode: if propose { "propose" } else { "enroll" }.into(),
                conditions: parse_pairs("--match", &values.conditions)?,
                profile: values.profile,
                hostname: values.hostname,
                labels: parse_pairs("--label", &values.labels)?,
                vars: parse_pairs("--var", &values.vars)?,
                max: values.max,
                used: 0,
            };
            let r: crate::dto::Rule = c.send("POST", "/rules", Some(&r))?;
            println!("created rule {}", r.name);
            print_rule(&r);
            Ok(())
        }
        RulesCmd::Update {
            name,
            values,
            mode,
            enable,
            disable,
            no_match,
            no_max,
            unset_labels,
            unset_vars,
        } => {
            let path = named_path("rules", &name);
            let mut r: crate::dto::Rule = c.get(&path)?;
            if no_match {
                r.conditions.clear();
            } else if !values.conditions.is_empty() {
                r.conditions = parse_pairs("--match", &values.conditions)?;
            }
            if let Some(p) = values.priority {
                r.priority = p;
            }
            if values.profile.is_some() {
                r.profile = values.profile;
            }
            if values.hostname.is_some() {
                r.hostname = values.hostname;
            }
            if no_max {
                r.max = None;
            } else if values.max.is_some() {
                r.max = values.max;
            }
            if let Some(m) = mode {
                r.mode = m;
            }
            if enable || disable {
                r.enabled = enable;
            }
            r.labels.extend(parse_pairs("--label", &values.labels)?);
            for k in unset_labels {
                r.labels.remove(&k);
            }
            r.vars.extend(parse_pairs("--var", &values.vars)?);
            for k in unset_vars {
                r.vars.remove(&k);
            }
            let r: crate::dto::Rule = c.send("PUT", &path, Some(&r))?;
            println!("updated rule {}", r.name);
            print_rule(&r);
            Ok(())
        }
        RulesCmd::Delete { name } => {
            c.call("DELETE", &named_path("rules", &name), None::<&()>)?;
            println!("deleted rule {name}");
            Ok(())
        }
    }
}

fn groups(c: &Client, cmd: GroupsCmd) -> Result<(), Fail> {
    let path = |name: &str| named_path("groups", name);
    match cmd {
        GroupsCmd::List { json } => {
            let all: Vec<crate::dto::Group> = c.get("/groups")?;
            if json {
                print_json(&all);
                return Ok(());
            }
            println!("{:<24} {:<22} {:<5} SELECTOR", "GROUP", "PROFILE", "VARS");
            for g in &all {
                let selector: Vec<String> = g
                    .selector
                    .iter()
                    .map(|(k, v)| format!("{k}={}", printable(v)))
                    .collect();
                println!(
                    "{:<24} {:<22} {:<5} {}",
                    g.name,
                    opt(&g.profile),
                    g.vars.len(),
                    if selector.is_empty() {
                        "(every machine)".to_string()
                    } else {
                        selector.join(" ")
                    }
                );
            }
            Ok(())
        }
        GroupsCmd::Show { name, json } => {
            let g: crate::dto::Group = c.get(&path(&name))?;
            if json {
                print_json(&g);
            } else {
                print_group(&g);
            }
            Ok(())
        }
        GroupsCmd::Create { name, values } => {
            let g = crate::dto::Group {
                name,
                selector: parse_pairs("--selector", &values.selector)?,
                profile: values.profile,
                vars: parse_pairs("--var", &values.vars)?,
                labels: parse_pairs("--label", &values.labels)?,
            };
            let g: crate::dto::Group = c.send("POST", "/groups", Some(&g))?;
            println!("created group {}", g.name);
            print_group(&g);
            Ok(())
        }
        GroupsCmd::Update {
            name,
            values,
            no_selector,
            no_profile,
            unset_vars,
            unset_labels,
        } => {
            let mut g: crate::dto::Group = c.get(&path(&name))?;
            if no_selector {
                g.selector.clear();
            } else if !values.selector.is_empty() {
                g.selector = parse_pairs("--selector", &values.selector)?;
            }
            if no_profile {
                g.profile = None;
            } else if values.profile.is_some() {
                g.profile = values.profile;
            }
            g.vars.extend(parse_pairs("--var", &values.vars)?);
            for k in unset_vars {
                g.vars.remove(&k);
            }
            g.labels.extend(parse_pairs("--label", &values.labels)?);
            for k in unset_labels {
                g.labels.remove(&k);
            }
            let g: crate::dto::Group = c.send("PUT", &path(&name), Some(&g))?;
            println!("updated group {}", g.name);
            print_group(&g);
            Ok(())
        }
        GroupsCmd::Delete { name } => {
            c.call("DELETE", &path(&name), None::<&()>)?;
            println!("deleted group {name}");
            Ok(())
        }
    }
}

fn machines(c: &Client, cmd: MachinesCmd) -> Result<(), Fail> {
    match cmd {
        MachinesCmd::List {
            state,
            search,
            limit,
            json,
        } => {
            let state = state
                .map(|st| st.parse::<State>().map_err(bad))
                .transpose()?;
            // One more than asked, to say whether the list goes on.
            let ask = limit.map(|l| l.saturating_add(1));
            let mut all = match &search {
                Some(q) => c.search(q, state, ask)?,
                None => c.machines(state, ask)?,
            };
            let more = limit.is_some_and(|l| all.len() > l);
            if let Some(l) = limit {
                all.truncate(l);
            }
            if json {
                print_json(&all);
                return Ok(());
            }
            println!(
                "{:<17} {:<12} {:<22} {:<24} UPDATED",
                "MAC", "STATE", "PROFILE", "HOSTNAME"
            );
            for m in &all {
                println!(
                    "{:<17} {:<12} {:<22} {:<24} {}",
                    m.mac.to_string(),
                    m.state.as_str(),
                    opt(&m.profile),
                    opt(&m.hostname),
                    time(m.updated_at)
                );
            }
            if more {
                eprintln!(
                    "(the first {}; more machines match: raise --limit, or narrow with --state or --search)",
                    all.len()
                );
            }
            Ok(())
        }
        MachinesCmd::Show { mac, json } => {
            let mac = parse_mac(&mac)?;
            let m = c.machine(mac)?;
            if json {
                print_json(&m);
                return Ok(());
            }
            // A value from a group says which; every other value is the machine's own.
            let from = |field: &str| {
                m.inherited
                    .get(field)
                    .map(|g| format!("   (group {g})"))
                    .unwrap_or_default()
            };
            for (k, v) in [
                ("mac", m.mac.to_string()),
                ("state", m.state.to_string()),
                ("profile", format!("{}{}", opt(&m.profile), from("profile"))),
                ("hostname", opt(&m.hostname)),
                ("uuid", opt(&m.uuid)),
                ("serial", opt(&m.serial)),
                ("generation", m.generation.to_string()),
                ("arch", opt(&m.arch)),
                ("platform", opt(&m.platform)),
                ("last_ip", opt(&m.last_ip)),
                ("boot_ip", opt(&m.boot_ip)),
                (
                    "last_seen",
                    m.last_seen.map(time).unwrap_or_else(|| "-".into()),
                ),
            ] {
                println!("{k:<11} {}", printable(&v));
            }
            if m.state == State::Failed {
                println!(
                    "{:<11} {}: {}",
                    "failed",
                    opt(&m.failed_step),
                    printable(&opt(&m.failed_reason))
                );
            }
            if !m.groups.is_empty() {
                println!("{:<11} {}", "groups", m.groups.join(", "));
            }
            let dhcp = [
                ("vendor", &m.dhcp.vendor_class),
                ("user class", &m.dhcp.user_class),
                ("on", &m.dhcp.interface),
                ("relay", &m.dhcp.relay),
            ]
            .iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| format!("{k} {}", printable(v))))
            .collect::<Vec<_>>();
            if !dhcp.is_empty() {
                println!("{:<11} {}", "dhcp", dhcp.join(", "));
            }
            if let Some(r) = &m.proposed_rule {
                println!(
                    "{:<11} rule {r} matches; `provision machines confirm {}` enrolls it",
                    "proposed", m.mac
                );
            }
            for (k, v) in &m.vars {
                println!(
                    "var        {k}={}{}",
                    printable(v),
                    from(&format!("vars.{k}"))
                );
            }
            for (k, v) in &m.labels {
                println!(
                    "label      {k}={}{}",
                    printable(v),
                    from(&format!("labels.{k}"))
                );
            }
            for k in &m.host_keys {
                println!("host key   {k}");
            }
            if let Some(fp) = &m.cert_fingerprint {
                println!("node cert  SHA256 {fp}");
            }
            if !m.register_steps.is_empty() {
                println!("registration steps:");
                for st in &m.register_steps {
                    let code = st
                        .exit_code
                        .map(|c| format!("exit {c}"))
                        .unwrap_or_else(|| "-".into());
                    let last_line = st.output.lines().last().unwrap_or("").trim();
                    let status = match st.status {
                        crate::store::StepStatus::Ok => "ok",
                        crate::store::StepStatus::Failed => "failed",
                    };
                    println!(
                        "  {:<12} {:<7} {:<8} {}",
                        st.name,
                        status,
                        code,
                        printable(last_line)
                    );
                }
            }
            println!("events:");
            print_events(&c.events(Some(mac), 20)?, false);
            Ok(())
        }
        MachinesCmd::Update {
            mac,
            profile,
            hostname,
            vars,
            unset,
        } => {
            let mac = parse_mac(&mac)?;
            let req = crate::dto::UpdateRequest {
                profile,
                hostname,
                set_vars: Some(parse_pairs("--var", &vars)?),
                unset_vars: Some(unset),
                ..Default::default()
            };
            let m = c.update(mac, &req)?;
            println!("updated {} ({})", m.mac, m.state);
            Ok(())
        }
        MachinesCmd::Delete { mac } => {
            let mac = parse_mac(&mac)?;
            c.delete(mac)?;
            println!("deleted {mac}");
            Ok(())
        }
        MachinesCmd::Confirm { mac } => {
            let mac = parse_mac(&mac)?;
            let m: crate::dto::Machine =
                c.send("POST", &format!("/machines/{mac}/confirm"), None::<&()>)?;
            println!(
                "{} is {} with profile {}{}: its next network boot installs",
                m.mac,
                m.state,
                opt(&m.profile),
                m.hostname
                    .as_deref()
                    .map(|h| format!(", hostname {h}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        MachinesCmd::Reprovision { mac } => {
            let mac = parse_mac(&mac)?;
            let m = c.reprovision(mac)?;
            println!(
                "{} is {} (generation {}): its next network boot reinstalls",
                m.mac, m.state, m.generation
            );
            Ok(())
        }
    }
}
