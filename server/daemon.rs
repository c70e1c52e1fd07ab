//! `provision serve`: creates the data directory, opens the store, binds the sockets and runs
//! the servers under one cancellation token. Every task it spawns lives in one `JoinSet` and
//! is awaited before `run` returns.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminService;
use crate::attribution::Attribution;
use crate::boot::{BootService, Settings};
use crate::config::Config;
use crate::http::{self, AppState};
use crate::keys;
use crate::render::{Catalog, Renderer, Sources};
use crate::store::{Database, Inventory, SqlInventory};

fn sources(cfg: &Config) -> Sources {
    Sources {
        templates_dir: cfg.templates_dir.clone(),
        ipxe_dir: cfg.ipxe_dir.clone(),
    }
}

/// `--check-config`: validates configuration, profiles and templates without touching the
/// data directory or binding anything (on PostgreSQL it connects, and reads the schema
/// version); returns a summary for the operator.
pub fn check_config(cfg: &Config) -> anyhow::Result<String> {
    let cat = Catalog::load(sources(cfg))?;
    let names: Vec<_> = cat.profiles().keys().cloned().collect();
    Ok(format!(
        "configuration OK\n  data dir: {}\n  database: {}\n  http: {}\n  admin API: {}\n  dhcp: {}\n  tftp: {}\n  metrics: {}\n  advertise: {}\n  assets: {}\n  install token ttl: {}\n  discover: {:?}\n  claims: {}\n  profiles: {}\n",
        cfg.data_dir.display(),
        match &cfg.database {
            Database::Sqlite => cfg.database.to_string(),
            Database::Postgres(url) => format!(
                "{}: {}",
                cfg.database,
                crate::store::postgres::check_connection(url)
                    .with_context(|| format!("database {}", cfg.database))?
            ),
        },
        cfg.http,
        match &cfg.admin {
            None => "off".to_string(),
            Some(a) => format!(
                "{}://{} ({})",
                a.scheme(),
                a.addr,
                match &a.tls {
                    crate::config::AdminTls::SelfSigned => "self-signed certificate in DATA_DIR/admin-tls".to_string(),
                    crate::config::AdminTls::Operator { cert, .. } => format!("certificate {}", cert.display()),
                    crate::config::AdminTls::Off if a.addr.ip().is_loopback() => "plain HTTP, loopback".to_string(),
                    crate::config::AdminTls::Off => "plain HTTP: --insecure-admin".to_string(),
                }
            ),
        },
        match cfg.dhcp {
                        Some(_) if !cfg.dhcp_interfaces.is_empty() => format!(
                "{} on interface(s) {}",
                match &cfg.dhcp_mode {
                    crate::dhcp::Mode::Proxy => "proxy".to_string(),
                    crate::dhcp::Mode::Full(a) => format!("full (addresses {}-{})", a.start, a.end),
                },
                cfg.dhcp_interfaces.join(", ")
            ),
            Some(ip) => match &cfg.dhcp_mode {
                crate::dhcp::Mode::Proxy => format!("proxy on {ip}:{} and {ip}:{}", cfg.dhcp_port, cfg.pxe_port),
                crate::dhcp::Mode::Full(a) => format!(
                    "full (addresses {}-{}) on {ip}:{} and {ip}:{}",
                    a.start, a.end, cfg.dhcp_port, cfg.pxe_port
                ),
            },
            None => "off".into(),
        },
        match cfg.tftp {
            Some(a) => format!(
                "{a}, serving {}",
                cfg.tftp_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(" then ")
            ),
            None => "off".into(),
        },
        match cfg.metrics {
            crate::config::MetricsAt::Off => "off".to_string(),
            crate::config::MetricsAt::Http => format!("http://{}/metrics", cfg.http),
            crate::config::MetricsAt::Listen(a) => format!("http://{a}/metrics"),
        },
        cfg.advertise.as_deref().unwrap_or("(from each request's Host header)"),
        cfg.assets_dir.display(),
        humantime::format_duration(cfg.install_token_ttl),
        cfg.discover,
        cfg.claims.as_str(),
        names.join(", ")
    ))
}

/// The files of the data directory every daemon sharing one inventory holds the same copy
/// of, with their modes: one node CA (nodes trust one chain), one SSH key (every installed
/// node authorises it), one admin token (the CLI works against any daemon).
const SHARED_FILES: &[(&str, u32)] = &[
    ("admin-token", 0o600),
    ("ssh/id_ed25519", 0o600),
    ("pki/ca-key.pem", 0o600),
    ("pki/ca-cert.pem", 0o644),
];

/// Makes this daemon's shared files the ones in the database (PostgreSQL): the database's
/// copies, opened with `key`, replace the data directory's; what the database does not have
/// yet (the first daemon) is made here as a lone daemon makes it, or taken from the data
/// directory (a SQLite daemon moving to PostgreSQL keeps its CA and key), and shared. Of two
/// daemons sharing at once, the first row written stays and both take it.
async fn share_identity(
    store: &SqlInventory,
    data_dir: &std::path::Path,
    key: &keys::SecretKey,
) -> anyhow::Result<()> {
    let take = |shared: Vec<(String, Vec<u8>)>| -> anyhow::Result<()> {
        for (name, sealed) in shared {
            let Some((_, mode)) = SHARED_FILES.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            let plain = key.open(&name, &sealed)?;
            let path = data_dir.join(&name);
            if fs::read(&path).ok().as_deref() == Some(&plain[..]) {
                continue;
            }
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            }
            keys::replace_file(&path, &plain, *mode)?;
            if name == "ssh/id_ed25519" {
                // Made again from the private key by the next load.
                let _ = fs::remove_file(data_dir.join("ssh/id_ed25519.pub"));
            }
            tracing::info!(file = %path.display(), "took the shared copy from the database");
        }
        Ok(())
    };
    take(store.shared_files().await?)?;
    // What the database did not have: made (or kept) here, then offered.
    keys::admin_token(&data_dir.join("admin-token"))?;
    crate::registrar::ssh::daemon_key(&data_dir.join("ssh"))?;
    crate::pki::Ca::load_or_create(&data_dir.join("pki"))?;
    let have: Vec<String> = store
        .shared_files()
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (name, _) in SHARED_FILES {
        if have.iter().any(|h| h == name) {
            continue;
        }
        let plain = fs::read(data_dir.join(name))
            .with_context(|| format!("reading {}", data_dir.join(name).display()))?;
        if store
            .share_file(
                name.to_string(),
                key.seal(name, &plain),
                crate::store::now_ms(),
            )
            .await?
        {
            tracing::info!(
                file = name,
                "shared with the other daemons through the database"
            );
        }
    }
    // Another daemon may have shared first.
    take(store.shared_files().await?)
}

/// The data directory holds the admin token, the SSH and CA private keys and the inventory
/// (install token hashes, host keys): on every start it is made 0700 and the database files
/// 0600, whatever an earlier version, a restore or an operator left. The database file is
/// created 0600 before SQLite opens it, because SQLite gives its -wal and -shm files the
/// database file's mode.
fn make_private(
    data_dir: &std::path::Path,
    db_path: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tighten = |p: &std::path::Path, mode: u32| -> anyhow::Result<()> {
        let now = match fs::metadata(p) {
            Ok(m) => m.permissions().mode() & 0o777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        if now != mode {
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).with_context(|| {
                format!(
                    "{} is mode {now:o}; making it {mode:o} failed (is it owned by another user?)",
                    p.display()
                )
            })?;
            tracing::warn!(path = %p.display(), "mode was {now:o}; made it {mode:o} (it holds secrets)");
        }
        Ok(())
    };
    tighten(data_dir, 0o700)?;
    let Some(db_path) = db_path else {
        return Ok(());
    };
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db_path)
        .with_context(|| format!("creating {}", db_path.display()))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db_path.as_os_str().to_owned();
        p.push(suffix);
        tighten(std::path::Path::new(&p), 0o600)?;
    }
    Ok(())
}

/// The admin listener's TLS, or `None` for plain HTTP. A self-signed certificate names the
/// loopback addresses, this host's name, the admin bind address and the advertised host.
fn load_admin_tls(
    cfg: &Config,
    a: &crate::config::Admin,
) -> anyhow::Result<Option<crate::tls::AdminTls>> {
    use crate::config::AdminTls;
    let operator = match &a.tls {
        AdminTls::Off => return Ok(None),
        AdminTls::SelfSigned => None,
        AdminTls::Operator { cert, key } => Some((cert.as_path(), key.as_path())),
    };
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    // uname(2), not /proc/sys/kernel/hostname: the unit's ProcSubset=pid hides /proc/sys.
    if let Ok(h) = nix::unistd::gethostname() {
        names.push(h.to_string_lossy().trim().to_string());
    }
    if !a.addr.ip().is_unspecified() {
        names.push(a.addr.ip().to_string());
    }
    if let Some(host) = cfg.advertise.as_deref().and_then(|u| {
        let rest = u.split_once("://")?.1;
        let authority = rest.split('/').next()?;
        Some(match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next()?.to_string(),
            None => authority
                .rsplit_once(':')
                .map_or(authority, |(h, _)| h)
                .to_string(),
        })
    }) {
        names.push(host);
    }
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    crate::tls::admin_tls(&cfg.data_dir, operator, &names).map(Some)
}

/// Explains a bind failure: what happened and what to do about it.
fn bind_error(e: std::io::Error, addr: SocketAddr, what: &str, flag: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        anyhow::anyhow!(
                "binding {what} on {addr}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE \
                 (`sudo setcap cap_net_bind_service=+ep $(which provision)`), or choose another port with {flag}"
            )
    } else if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!("binding {what} on {addr}: address already in use; stop the other server or choose another port with {flag}")
    } else {
        anyhow::anyhow!("binding {what} on {addr}: {e}")
    }
}

/// Binds a TCP listener.
async fn bind_tcp(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(e, addr, what, flag))
}

/// Raises the soft limit on open files to the hard limit: every TFTP transfer holds a socket
/// and a file, every HTTP connection a socket, and the default soft limit (1024) is below what
/// a boot storm needs. Returns the limit in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let files = raise_open_files_limit();
    // A TFTP transfer holds a socket and a file; an HTTP connection a socket (and a file
    // while it sends one); the database and the rest a few dozen.
    let needed = 2 * crate::tftp::MAX_TRANSFERS as u64
        + 2 * http::MAX_CONNECTIONS as u64
        + http::MAX_ADMIN_CONNECTIONS as u64
        + 256;
    if files < needed {
        tracing::warn!(
            "open files limit is {files}; {needed} lets {} TFTP transfers and {} HTTP connections run at once (raise it with ulimit -n or LimitNOFILE=)",
            crate::tftp::MAX_TRANSFERS,
            http::MAX_CONNECTIONS
        );
    }
    fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    fs::create_dir_all(&cfg.assets_dir)
        .with_context(|| format!("creating assets directory {}", cfg.assets_dir.display()))?;
    // Held until the daemon ends: a second daemon, or a restore, on this directory is refused.
    let _data_dir_lock = crate::backup::lock_data_dir(&cfg.data_dir)?;
    let db_path = cfg.data_dir.join("provision.db");
    let store = match &cfg.database {
        Database::Sqlite => {
            make_private(&cfg.data_dir, Some(&db_path))?;
            SqlInventory::open(&db_path, cfg.limits.clone())
                .with_context(|| format!("opening {}", db_path.display()))?
        }
        Database::Postgres(url) => {
            make_private(&cfg.data_dir, None)?;
            let key_file = cfg
                .secret_key_file
                .as_deref()
                .context("a PostgreSQL database needs --secret-key-file")?;
            let key = keys::SecretKey::load(key_file)?;
            let store = SqlInventory::connect(url, cfg.limits.clone())
                .await
                .with_context(|| format!("opening the inventory on {}", cfg.database))?;
            share_identity(&store, &cfg.data_dir, &key).await?;
            store
        }
    };
    let inv: Arc<dyn Inventory> = Arc::new(store);
    let token_path = cfg.data_dir.join("admin-token");
    let (admin_token, new_token) = keys::admin_token(&token_path)?;
    let (ssh_public_key, ssh_private) =
        crate::registrar::ssh::daemon_key(&cfg.data_dir.join("ssh"))?;
    let ca = Arc::new(crate::pki::Ca::load_or_create(&cfg.data_dir.join("pki"))?);
    let renderer = Arc::new(Renderer::new(sources(&cfg), ssh_public_key)?);
    let metrics = {
        let cat = renderer.catalog();
        Arc::new(crate::metrics::Metrics::new(&crate::metrics::Known {
            machine_routes: http::MACHINE_ROUTES.to_vec(),
            admin_routes: if cfg.admin.is_some() {
                http::ADMIN_ROUTES.to_vec()
            } else {
                Vec::new()
            },
            profiles: cat.profiles().keys().cloned().collect(),
            roles: cat.roles().keys().cloned().collect(),
        }))
    };
    let (registrar_handle, register_queue) =
        crate::registrar::channel(inv.clone(), renderer.clone(), metrics.clone());
    let attribution = Arc::new(Attribution::default());
    let boot = Arc::new(BootService::new(
        inv.clone(),
        renderer.clone(),
        Settings {
            install_token_ttl: cfg.install_token_ttl,
            discover: cfg.discover,
            claims: cfg.claims,
        },
        registrar_handle.clone(),
        attribution,
        metrics.clone(),
    ));
    let admin = Arc::new(AdminService::new(
        inv.clone(),
        renderer.clone(),
        cfg.discover,
        registrar_handle.clone(),
    ));
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        profiles = renderer.catalog().profiles().len(),
        "provision starting"
    );
    if new_token {
        tracing::info!("generated the admin API token in {}", token_path.display());
    } else {
        tracing::info!("admin API token in {}", token_path.display());
    }
    // Restart resumes: an install whose token ran out while we were down is failed now.
    for mac in inv.expire_installs(crate::store::now_ms()).await? {
        tracing::warn!(%mac, "install token expired before phone-home: machine failed");
    }

    // Bind everything before serving anything, so a port problem stops the start cleanly.
    let listener = bind_tcp(cfg.http, "HTTP", "--http").await?;
    let http_addr = listener.local_addr()?;
    let admin_listener = match &cfg.admin {
        Some(a) => Some(bind_tcp(a.addr, "the admin API", "--admin").await?),
        None => None,
    };
    let metrics_listener = match cfg.metrics {
        crate::config::MetricsAt::Listen(addr) => {
            Some(bind_tcp(addr, "metrics", "--metrics (or --metrics http)").await?)
        }
        _ => None,
    };
    let tftp_socket = match cfg.tftp {
        Some(addr) => Some(
            std::net::UdpSocket::bind(addr)
                .map_err(|e| bind_error(e, addr, "TFTP", "--tftp (or --tftp off)"))?,
        ),
        None => None,
    };
    // One socket per port, or per port and interface when DHCP is limited to interfaces.
    let mut dhcp_sockets = Vec::new();
    if cfg.dhcp.is_some() {
        let devices: Vec<Option<&str>> = if cfg.dhcp_interfaces.is_empty() {
            vec![None]
        } else {
            cfg.dhcp_interfaces
                .iter()
                .map(|d| Some(d.as_str()))
                .collect()
        };
        for device in devices {
            for (port, kind, what, flag) in [
                (
                    cfg.dhcp_port,
                    crate::dhcp::Port::Dhcp,
                    "DHCP",
                    "--dhcp-port (or --dhcp off)",
                ),
                (
                    cfg.pxe_port,
                    crate::dhcp::Port::Pxe,
                    "PXE",
                    "--pxe-port (or --dhcp off)",
                ),
            ] {
                let addr = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
                let sock = crate::dhcp::bind(addr, device)
                    .map_err(|e| bind_error(e, addr.into(), what, flag))?;
                dhcp_sockets.push((sock, kind, what, device.map(str::to_string)));
            }
        }
    }
    tracing::info!("listening for HTTP on {http_addr}");

    let admin_tls = match &cfg.admin {
        Some(a) => load_admin_tls(&cfg, a)?,
        None => None,
    };
    let current_tls = admin_tls
        .as_ref()
        .map(|t| Arc::new(crate::tls::CurrentTls::new(t.config.clone())));
    let mut listeners = vec![("Machine HTTP".to_string(), http_addr.to_string())];
    if let Some(l) = &admin_listener {
        let scheme = if admin_tls.is_some() { "https" } else { "http" };
        listeners.push((
            "Admin API and UI".into(),
            format!("{scheme}://{}", l.local_addr()?),
        ));
    }
    match (&cfg.metrics, &metrics_listener) {
        (_, Some(l)) => listeners.push((
            "Metrics".into(),
            format!("http://{}/metrics", l.local_addr()?),
        )),
        (crate::config::MetricsAt::Http, _) => {
            listeners.push(("Metrics".into(), format!("http://{http_addr}/metrics")))
        }
        _ => {}
    }
    if let Some(t) = &tftp_socket {
        listeners.push(("TFTP".into(), t.local_addr()?.to_string()));
    }
    for (sock, _, what, device) in &dhcp_sockets {
        let on = device
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        listeners.push((what.to_string(), format!("{}{on}", sock.local_addr()?)));
    }
    let state = AppState {
        boot: boot.clone(),
        admin: admin.clone(),
        auth: Arc::new(http::auth::AdminAuth::new(admin_token, token_path.clone())),
        advertise: cfg.advertise.clone().map(Arc::new),
        machine_port: http_addr.port(),
        ca: ca.clone(),
        boot_roots: Arc::new(cfg.tftp_roots.clone()),
        ui: Arc::new(http::ui::Ui::new(
            admin_tls.is_some(),
            listeners.clone(),
            shutdown.clone(),
        )?),
    };
    let app = http::router(
        state.clone(),
        &cfg.assets_dir,
        cfg.metrics == crate::config::MetricsAt::Http,
    );
    let metrics_app = http::metrics_router(state.clone());
    let admin_app = http::admin_router(state.clone());
    let statics = Arc::new(http::Statics {
        assets: cfg.assets_dir.clone(),
        state,
    });
    let mut tasks = JoinSet::new();

    // This daemon, as its registration claims name it: its host and data directory. One
    // daemon holds a data directory at a time (its lock), so a restarted daemon takes its own
    // interrupted runs back at once, and two daemons never share a name.
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let claimer = format!("{host}:{}", cfg.data_dir.display());
    let registrar = crate::registrar::Registrar::new(
        inv.clone(),
        renderer.clone(),
        ca,
        ssh_private,
        cfg.register.clone(),
        metrics.clone(),
        claimer,
    );
    let sd = shutdown.clone();
    tasks.spawn(async move {
        registrar.run(register_queue, sd).await;
        Ok(())
    });
    // Restart resumes: registrations a stop or crash interrupted continue where they were.
    let resumed = registrar_handle.resume().await?;
    if resumed > 0 {
        tracing::info!("resumed {resumed} registration(s)");
    }

    let sd = shutdown.clone();
    tasks.spawn(async move {
        http::serve(listener, app, statics, sd)
            .await
            .context("HTTP server")
    });

    if let (Some(l), Some(a)) = (admin_listener, &cfg.admin) {
        let addr = l.local_addr()?;
        match &admin_tls {
            Some(t) => tracing::info!(
                "listening for the admin API on {addr} (https, {} certificate SHA-256 {}, also in {})",
                t.source,
                t.fingerprint,
                cfg.data_dir.join(crate::tls::FINGERPRINT_FILE).display()
            ),
            None if addr.ip().is_loopback() => {
                tracing::info!("listening for the admin API on {addr} (http, loopback only)")
            }
            None => tracing::warn!(
                "listening for the admin API on {addr} (http: --insecure-admin, the admin token crosses the network in clear)"
            ),
        }
        debug_assert_eq!(a.tls == crate::config::AdminTls::Off, admin_tls.is_none());
        let (tls, sd) = (current_tls.clone(), shutdown.clone());
        tasks.spawn(async move {
            http::serve_admin(l, admin_app, tls, sd)
                .await
                .context("admin listener")
        });
    }

    if let Some(l) = metrics_listener {
        tracing::info!("serving metrics on http://{}/metrics", l.local_addr()?);
        let sd = shutdown.clone();
        tasks.spawn(async move {
            // Plain HTTP with the admin listener's caps (connections, head deadline).
            http::serve_admin(l, metrics_app, None, sd)
                .await
                .context("metrics listener")
        });
    }

    if let Some(sock) = tftp_socket {
        tracing::info!("listening for TFTP on {}", sock.local_addr()?);
        let (roots, sd) = (cfg.tftp_roots.clone(), shutdown.clone());
        // Transfers become observations on the machines' timelines; never waited for.
        let b = boot.clone();
        let report: crate::tftp::Report = Arc::new(move |t| b.record_tftp(t));
        tasks.spawn(crate::tftp::run(sock, roots, report, metrics.clone(), sd));
    }

    if !dhcp_sockets.is_empty() {
        let ctx = Arc::new(crate::dhcp::Context::new(
            boot.clone(),
            inv.clone(),
            cfg.dhcp_mode.clone(),
            cfg.boot_files.clone(),
            cfg.advertise.clone(),
            cfg.dhcp,
            http_addr.port(),
        ));
        tasks.spawn({
            let (a, sd) = (ctx.ifaddrs.clone(), shutdown.clone());
            async move {
                // Returns early only if notifications are unavailable; the task must still
                // live until shutdown (the first task to end stops the daemon).
                a.watch(sd.clone()).await;
                sd.cancelled().await;
                Ok(())
            }
        });
        for (sock, port, what, device) in dhcp_sockets {
            match &device {
                Some(d) => tracing::info!("listening for {what} on {} ({d})", sock.local_addr()?),
                None => tracing::info!("listening for {what} on {}", sock.local_addr()?),
            }
            tasks.spawn(crate::dhcp::run(sock, port, ctx.clone(), shutdown.clone()));
        }
    }

    // Sweeper: no machine stays `installing` past its token's lifetime, and no registration
    // stays without a daemon running it (another daemon's claim ran out: it stopped or died).
    let (i, sd, reg) = (inv.clone(), shutdown.clone(), registrar_handle.clone());
    let every = cfg.register.sweep_every();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = sd.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    match i.expire_installs(crate::store::now_ms()).await {
                        Ok(macs) => for mac in macs {
                            tracing::warn!(%mac, "install token expired before phone-home: machine failed");
                        },
                        Err(e) => tracing::error!("expiring installs: {e}"),
                    }
                    match reg.sweep().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!("took over {n} registration(s) nobody was running"),
                        Err(e) => tracing::error!("looking for unclaimed registrations: {e}"),
                    }
                }
            }
        }
    });

    // What the service manager shows as the daemon's status.
    let status = listeners
        .iter()
        .map(|(what, addr)| format!("{what} {addr}"))
        .collect::<Vec<_>>()
        .join(", ");

    // SIGHUP reloads profiles and templates, as the API's POST /reload does, and the admin
    // listener's certificate and key (a renewed certificate needs no restart). Each part that
    // fails to load keeps what it had and says why.
    let (r, sd, st) = (renderer.clone(), shutdown.clone(), status.clone());
    let (tls_now, cfg_now) = (current_tls.clone(), cfg.clone());
    tasks.spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = sd.cancelled() => return Ok(()),
                _ = hup.recv() => {
                    crate::notify::reloading();
                    let mut said = Vec::new();
                    match r.reload() {
                        Ok(n) => {
                            tracing::info!("reloaded {n} profiles");
                            said.push(format!("reloaded {n} profiles"));
                        }
                        Err(e) => {
                            tracing::error!("reload failed, keeping the previous profiles: {e}");
                            said.push(format!("profile reload failed, previous kept: {e}"));
                        }
                    }
                    if let (Some(current), Some(a)) = (&tls_now, &cfg_now.admin) {
                        match load_admin_tls(&cfg_now, a) {
                            Ok(Some(t)) => {
                                current.set(t.config);
                                tracing::info!(
                                    "admin TLS reloaded: {} certificate SHA-256 {}",
                                    t.source,
                                    t.fingerprint
                                );
                                said.push(format!("admin certificate SHA-256 {}", t.fingerprint));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::error!(
                                    "admin TLS reload failed, keeping the previous certificate: {e:#}"
                                );
                                said.push(format!("admin TLS reload failed, previous kept: {e:#}"));
                            }
                        }
                    }
                    crate::notify::ready(&format!("{}; {st}", said.join("; ")));
                }
            }
        }
    });

    // The watchdog hears from a task only while the inventory's writer answers it: a wedged
    // writer (or runtime) stops the pings, and the service manager restarts the daemon.
    if let Some(every) = crate::notify::watchdog_interval() {
        let (i, sd) = (inv.clone(), shutdown.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return Ok(()),
                    _ = tick.tick() => match tokio::time::timeout(every, i.flush()).await {
                        Ok(Ok(())) => crate::notify::watchdog(),
                        Ok(Err(e)) => tracing::error!("watchdog: the inventory did not answer: {e}"),
                        Err(_) => tracing::error!("watchdog: the inventory did not answer within {every:?}"),
                    },
                }
            }
        });
    }

    let sd = shutdown.clone();
    tasks.spawn(async move {
        sd.cancelled().await;
        crate::notify::stopping();
        Ok(())
    });
    crate::notify::ready(&status);

    // The first task to end (normally or not) stops the others.
    let mut first_err = None;
    while let Some(res) = tasks.join_next().await {
        shutdown.cancel();
        let err = match res {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(anyhow::anyhow!("task failed: {e}")),
        };
        if first_err.is_none() {
            first_err = err;
        }
    }
    tracing::info!("provision stopped");
    first_err.map_or(Ok(()), Err)
}
