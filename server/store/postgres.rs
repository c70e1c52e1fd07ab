//! PostgreSQL, for several daemons sharing one inventory: the connections (a pool, from which
//! the writer takes one per group commit and readers one per read), the schema migrations, and
//! the store's SQL on it ([`Db`]). The operations themselves are in `engine`, the same code
//! SQLite runs.
//!
//! The store's operations are synchronous code (they run inside the writer's transaction,
//! one savepoint per request), so a PostgreSQL call is made from a blocking thread that waits
//! for the async driver (tokio-postgres, pooled by deadpool). The driver's connections live on
//! a runtime of their own, [`io`]: a blocking thread can wait on it whatever runtime (or none)
//! called the store, and a store dropped inside a caller's runtime can still write what it
//! has queued.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::db::{numbered, Arg, Db, Dialect, SqlRow, Val};
use super::pg_tls;
use super::sqlite::MIGRATIONS_DIR;
use super::{Result, StoreError};

/// Connections the pool keeps at most: the writer's one, and readers.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection from the pool, or for a new one to be made,
/// before it fails (the database is down or unreachable): the machine-facing paths answer
/// what they can without it rather than hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a session may sit idle inside a transaction before the server ends it (a batch
/// never waits on anything but the database between its statements).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(30);
/// The advisory lock that serialises migrations: daemons starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7072_6f76_6973_696f; // "provisio"
/// The advisory lock each daemon's write batch holds until it commits, so event ids grow in
/// commit order across daemons (see the writer's `Conn::begin`).
pub(super) const EVENTS_LOCK: i64 = 0x7072_6f76_6576_7473; // "provevts"

/// The runtime PostgreSQL connections run on (see the module's words).
pub(super) fn io() -> &'static tokio::runtime::Runtime {
    static IO: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    IO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("inventory-pg")
            .enable_all()
            .build()
            .expect("a runtime for the PostgreSQL connections")
    })
}

impl From<tokio_postgres::Error> for StoreError {
    /// By SQLSTATE: a lost connection or a server shutting down is [`StoreError::Unavailable`]
    /// (class 08, class 57P, or a closed or failed connection); a race lost to another daemon (a
    /// unique key, a serialization failure, a deadlock) is [`StoreError::Contended`].
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let Some(db) = e.as_db_error() else {
            // No answer from a server (the connection closed, reset, refused) is the
            // database away; anything else (a value that does not convert) is an error.
            let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
            return if e.is_closed() || io {
                StoreError::Unavailable(format!("PostgreSQL: {}", with_causes(&e)))
            } else {
                StoreError::Database(format!("PostgreSQL: {}", with_causes(&e)))
            };
        };
        let code = db.code();
        let message = format!(
            "PostgreSQL: {} (SQLSTATE {}){}",
            db.message(),
            code.code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        );
        if code.code().starts_with("08") || code.code().starts_with("57P") {
            StoreError::Unavailable(message)
        } else if [
            SqlState::UNIQUE_VIOLATION,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ]
        .contains(code)
        {
            StoreError::Contended(message)
        } else {
            StoreError::Database(message)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(format!("PostgreSQL: no connection: {}", with_causes(&e)))
    }
}

/// `e` and the errors under it: tokio-postgres writes only its own layer ("error performing
/// TLS handshake"), and the reason ("invalid peer certificate: UnknownIssuer") is its source.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
        next = cause.source();
    }
    text
}

/// The pool for `url` (a `postgres://` URL or `key=value` connection string, with libpq's TLS
/// keys: see `pg_tls`). Connects nothing yet; reads the TLS files now.
pub(super) fn pool(url: &str) -> Result<Pool> {
    let bad = |e: String| StoreError::Database(format!("database {}: {e}", redacted(url)));
    let (mut config, tls) = pg_tls::parse(url).map_err(bad)?;
    if config.get_application_name().is_none() {
        config.application_name("provision");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // A daemon that stops answering inside a transaction (a network partition, a hung
    // process) holds the write batches' lock (`EVENTS_LOCK`), and every other daemon's writes
    // wait behind it: the server ends such a session after this long, and TCP keepalives
    // notice a peer gone without a word well before the kernel's two hours.
    let options = format!(
        "{} -c idle_in_transaction_session_timeout={}",
        config.get_options().unwrap_or_default(),
        IDLE_IN_TRANSACTION.as_millis()
    );
    config.options(options.trim());
    config.keepalives_idle(Duration::from_secs(30));
    let manager_config = || ManagerConfig {
        // A connection the server dropped (a restart, a failover) is replaced, not handed
        // out: `Fast` checks that the connection is still open.
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = if tls.wanted() {
        let client = tls.client_config().map_err(bad)?;
        Manager::from_config(config, MakeRustlsConnect::new(client), manager_config())
    } else {
        Manager::from_config(config, NoTls, manager_config())
    };
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Database(format!("database pool: {e}")))
}

/// Checks a URL or connection string without connecting: its keys and values, that it names
/// a host, and that the TLS files it names are there.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    let (config, _) = pg_tls::parse(url).map_err(|e| format!("{}: {e}", redacted(url)))?;
    if config.get_hosts().is_empty() {
        return Err(format!(
            "{} names no host: add one (postgres://user@HOST/db, or host=HOST)",
            redacted(url)
        ));
    }
    Ok(())
}

/// `provision serve --check-config` on PostgreSQL: connects, and reads the schema version
/// against this build's. Call from outside any runtime (it waits on [`io`]).
pub fn check_connection(url: &str) -> Result<String> {
    let pool = pool(url)?;
    let tls = pg_tls::parse(url)
        .map(|(_, tls)| tls.describe())
        .unwrap_or_default();
    // A refused certificate reads "error performing TLS handshake: invalid peer certificate:
    // UnknownIssuer"; with the mode and the CA file beside it the operator sees which to fix.
    let c = PgConn::take(&pool).map_err(|e| match e {
        StoreError::Unavailable(m) if m.contains("TLS") => {
            StoreError::Unavailable(format!("{m} ({tls})"))
        }
        e => e,
    })?;
    let db: &dyn Db = &c;
    let server: String = db.scalar("SELECT current_setting('server_version')", &[])?;
    // What this connection really is: `prefer` may have ended up unencrypted.
    let transport: String = db.scalar(
        "SELECT COALESCE((SELECT version FROM pg_stat_ssl \
          WHERE pid = pg_backend_pid() AND ssl), '')",
        &[],
    )?;
    let transport = if transport.is_empty() {
        "not encrypted".to_string()
    } else {
        format!("{transport}, {tls}")
    };
    let have = version(&c)?;
    let known = known_version();
    let schema = match have {
        0 => format!("empty (the first daemon to start makes schema {known})"),
        v if v == known => format!("schema {v}, this build's"),
        v if v < known => format!("schema {v}; the first daemon to start migrates it to {known}"),
        v => {
            return Err(StoreError::Migration(format!(
                "the database has schema version {v}, newer than this provision's {known}: it \
                 was written by a newer provision. Run that version"
            )))
        }
    };
    Ok(format!("PostgreSQL {server} ({transport}), {schema}"))
}

/// `url` without its password, for messages.
pub fn redacted(url: &str) -> Cow<'_, str> {
    // postgres://user:password@host/... → postgres://user:***@host/... (the user and
    // password end at the authority's last '@', which ends before the first '/').
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((auth, host)) = authority.rsplit_once('@') {
            if let Some((user, _)) = auth.split_once(':') {
                return Cow::Owned(format!("{scheme}://{user}:***@{host}{path}"));
            }
        }
    }
    // key=value form: password=... anywhere.
    if url.contains("password") {
        return Cow::Owned(
            url.split_whitespace()
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=***"
                    } else {
                        kv
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    Cow::Borrowed(url)
}

/// One pooled connection, used from a blocking thread.
pub(super) struct PgConn {
    client: Object,
}

impl PgConn {
    /// A connection from `pool`, waiting on [`io`] (call from a blocking thread).
    pub(super) fn take(pool: &Pool) -> Result<PgConn> {
        let client = io().block_on(pool.get())?;
        Ok(PgConn { client })
    }

    /// Whether the server closed it (a restart, a failover, a network error).
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn params<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
        args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
    }
}

impl Db for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn exec(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
        let sql = numbered(sql);
        io().block_on(async {
            let st = self.client.prepare_cached(&sql).await?;
            Ok(self.client.execute(&st, &Self::params(args)).await?)
        })
    }

    fn query(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
        let sql = numbered(sql);
        let rows = io().block_on(async {
            let st = self.client.prepare_cached(&sql).await?;
            self.client.query(&st, &Self::params(args)).await
        })?;
        rows.iter().map(row_of).collect()
    }

    fn query_once(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
        let sql = numbered(sql);
        let rows = io().block_on(self.client.query(&sql, &Self::params(args)))?;
        rows.iter().map(row_of).collect()
    }

    fn batch(&self, sql: &str) -> Result<()> {
        Ok(io().block_on(self.client.batch_execute(sql))?)
    }
}

/// A row as [`Val`]s, by each column's type. JSON columns are read as text by the statements
/// (`::text`), so the types here are the few the schema and its expressions have.
fn row_of(row: &tokio_postgres::Row) -> Result<SqlRow> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Val::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Val::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Val::Int(v.into())),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Val::Int(v.into())),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Val::Real),
            Type::FLOAT4 => row
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Val::Real(v.into())),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                row.try_get::<_, Option<String>>(i)?.map(Val::Text)
            }
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Val::Blob),
            ref other => {
                return Err(StoreError::Database(format!(
                    "column {} is of PostgreSQL type {other}, which the store does not read \
                     (cast it in the statement)",
                    col.name()
                )))
            }
        };
        out.push(v.unwrap_or(Val::Null));
    }
    Ok(SqlRow(out))
}

impl ToSql for Arg<'_> {
    /// A parameter takes the type PostgreSQL gave it in the statement: an integer may be
    /// `BIGINT`, `INTEGER`, `SMALLINT` or `BOOLEAN` (SQLite's booleans are integers); anything
    /// else is refused with the types named rather than sent as something it is not.
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (self, ty) {
            (Arg::Null, _) => Ok(IsNull::Yes),
            (Arg::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Arg::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Arg::Int(i), &Type::INT2) => i16::try_from(*i)?.to_sql(ty, out),
            (Arg::Int(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Arg::Int(i), &Type::FLOAT8) => (*i as f64).to_sql(ty, out),
            (Arg::Text(t), &Type::TEXT | &Type::VARCHAR | &Type::BPCHAR | &Type::NAME) => {
                t.as_ref().to_sql(ty, out)
            }
            (Arg::Real(r), &Type::FLOAT8) => r.to_sql(ty, out),
            (Arg::Blob(b), &Type::BYTEA) => b.as_ref().to_sql(ty, out),
            (arg, ty) => Err(format!("a parameter {arg:?} where PostgreSQL expects {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// The migrations PostgreSQL has, in order: `NN-name/postgres.sql` beside SQLite's `up.sql`
/// of the same number.
fn migrations() -> Result<Vec<(i64, &'static str, &'static str)>> {
    let mut dirs: Vec<_> = MIGRATIONS_DIR.dirs().collect();
    dirs.sort_by_key(|d| d.path());
    dirs.iter()
        .enumerate()
        .map(|(i, d)| {
            let name = d.path().to_str().unwrap_or_default();
            let sql = d
                .get_file(d.path().join("postgres.sql"))
                .and_then(|f| f.contents_utf8())
                .ok_or_else(|| {
                    StoreError::Migration(format!("migration {name} has no postgres.sql"))
                })?;
            Ok((i as i64 + 1, name, sql))
        })
        .collect()
}

/// The schema version the build knows (its newest migration).
pub(crate) fn known_version() -> i64 {
    MIGRATIONS_DIR.dirs().count() as i64
}

/// Brings the schema up to date, each migration in its own transaction under an advisory
/// lock, so that daemons starting together migrate once; refuses a schema newer than this
/// build's (a downgrade). Why by hand: rusqlite_migration is SQLite's, and the crates that
/// migrate PostgreSQL want their own file names and take no lock across daemons.
pub(super) fn migrate(c: &PgConn) -> Result<i64> {
    c.batch(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
    let out = migrate_locked(c);
    let unlocked = c.batch(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"));
    let version = out?;
    unlocked?;
    Ok(version)
}

fn migrate_locked(c: &PgConn) -> Result<i64> {
    c.batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
             version BIGINT NOT NULL
         )",
    )?;
    let db: &dyn Db = c;
    let mut version: i64 = db
        .opt("SELECT version FROM schema_version", &[])?
        .map(|r| r.get(0))
        .transpose()?
        .unwrap_or(0);
    let all = migrations()?;
    if version > all.len() as i64 {
        return Err(StoreError::Migration(format!(
            "the database has schema version {version}, newer than this provision's {}: it \
             was written by a newer provision. Run that version again",
            all.len()
        )));
    }
    for (n, name, sql) in all.into_iter().skip(version as usize) {
        let step = || -> Result<()> {
            c.batch("BEGIN")?;
            c.batch(sql)
                .map_err(|e| StoreError::Migration(format!("{name}: {e}")))?;
            db.exec(
                "INSERT INTO schema_version (one, version) VALUES (TRUE, ?1)
                 ON CONFLICT (one) DO UPDATE SET version = ?1",
                &[Arg::Int(n)],
            )?;
            c.batch("COMMIT")
        };
        if let Err(e) = step() {
            let _ = c.batch("ROLLBACK");
            return Err(e);
        }
        version = n;
    }
    Ok(version)
}

/// The schema version of the database at `pool` (0: none yet).
fn version(c: &PgConn) -> Result<i64> {
    let db: &dyn Db = c;
    if !db.exists(
        "SELECT 1 FROM information_schema.tables WHERE table_name = 'schema_version'
         AND table_schema = current_schema()",
        &[],
    )? {
        return Ok(0);
    }
    Ok(db
        .opt("SELECT version FROM schema_version", &[])?
        .map(|r| r.get(0))
        .transpose()?
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows_in_messages() {
        assert_eq!(
            redacted("postgres://prov:s3cret@db.example/inv"),
            "postgres://prov:***@db.example/inv"
        );
        assert_eq!(
            redacted("host=db user=prov password=s3cret dbname=inv"),
            "host=db user=prov password=*** dbname=inv"
        );
        assert_eq!(redacted("postgres://prov@db/inv"), "postgres://prov@db/inv");
        assert_eq!(
            redacted("postgres://prov:p@ss@db1,db2/inv?x=@"),
            "postgres://prov:***@db1,db2/inv?x=@"
        );
    }
}
