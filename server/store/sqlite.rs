//! SQLite, the embedded inventory: one file in WAL mode. This module opens its connections
//! (the writer's, the readers', the checkpointer's), migrates it, checks and copies it, and
//! runs the store's SQL on it ([`Db`]); the operations themselves are in `engine`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use include_dir::{include_dir, Dir};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use rusqlite_migration::Migrations;

use super::db::{Arg, Db, Dialect, SqlRow, Val};
use super::{Result, StoreError};

/// Every migration: `NN-name/up.sql` is SQLite's, `NN-name/postgres.sql` PostgreSQL's.
pub(super) static MIGRATIONS_DIR: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations");

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ToSqlOutput;
        Ok(match self {
            Arg::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Arg::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Arg::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Arg::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(*r)),
            Arg::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

fn row_of(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<SqlRow> {
    (0..n)
        .map(|i| {
            Ok(match r.get_ref(i)? {
                ValueRef::Null => Val::Null,
                ValueRef::Integer(v) => Val::Int(v),
                ValueRef::Real(v) => Val::Real(v),
                ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Val::Blob(b.to_vec()),
            })
        })
        .collect::<rusqlite::Result<_>>()
        .map(SqlRow)
}

/// Every row of `stmt` run with `args`.
fn rows(stmt: &mut rusqlite::Statement<'_>, args: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
    let n = stmt.column_count();
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), |r| row_of(r, n))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

impl Db for Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn exec(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
        Ok(self
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn query(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
        rows(&mut *self.prepare_cached(sql)?, args)
    }

    fn query_once(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
        rows(&mut self.prepare(sql)?, args)
    }

    fn batch(&self, sql: &str) -> Result<()> {
        Ok(self.execute_batch(sql)?)
    }
}

/// How often the checkpointer looks at the WAL.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// WAL size (in frames, as bytes) past which the WAL is made to start over (RESTART) once a
/// PASSIVE checkpoint has copied it all.
pub(super) const RESTART_AT: i64 = 64 << 20;
/// How long a RESTART may wait for readers to leave the WAL. It runs on the writer thread, so
/// writes wait meanwhile: it gives up quickly, and is asked for again a second later.
pub(super) const RESTART_WAIT: Duration = Duration::from_millis(20);
/// The writer's busy timeout otherwise (only another process could hold the write lock).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The WAL file is cut back to this size when it starts over (`journal_size_limit`): without
/// it the file keeps its largest size forever, and every read of a page still in it is a
/// pread(2) instead of a mapped page.
pub(super) const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Copies the WAL into the database on its own thread and connection. SQLite would otherwise
/// checkpoint inside the commit that crosses its threshold, on the writer thread, holding up
/// every request in the next group commit.
///
/// Every second a PASSIVE checkpoint copies what it can without waiting for anybody (cheap
/// when there is nothing to copy). PASSIVE never makes the WAL start over, and under a
/// constant write load the WAL is never wholly copied at the moment a write begins, so it
/// would grow without end, and every read of a page in it is a pread(2) and a WAL-index
/// search instead of a mapped page (perf at 100,000 machines: half the CPU of an install
/// answer's machine read, with a 500 MB WAL). So once the WAL holds more than
/// [`RESTART_AT`] and PASSIVE has copied it all, the checkpointer asks the writer for a
/// RESTART between two batches (`Writer::restart_wal`): from the checkpointer thread it would
/// first wait for the busy writer, holding up every write while it waits.
pub(super) fn checkpointer(conn: Connection, restart: Arc<AtomicBool>, stop: mpsc::Receiver<()>) {
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap_or(4096);
    loop {
        match stop.recv_timeout(CHECKPOINT_INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        match wal_checkpoint(&conn, "PASSIVE") {
            Ok((busy, frames, done)) => {
                if busy == 0 && frames > 0 && frames == done && frames * page_size >= RESTART_AT {
                    restart.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!("WAL checkpoint failed: {e}"),
        }
    }
}

/// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames copied into the database).
pub(super) fn wal_checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    // WAL lets readers proceed during a write; FULL syncs the WAL on every commit, so an
    // acknowledged write survives power loss (NORMAL would not, in WAL mode).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Off while migrating: a migration that rebuilds a table (SQLite's way to change a
    // constraint) drops the old one, which would cascade to the rows that reference it.
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
    // Checkpoints run on their own thread (see `checkpointer`).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    // A group commit touches pages all over the machines table and its indexes; with
    // SQLite's default 2 MiB cache a large batch spilled dirty pages into the WAL before its
    // commit and read them back (perf: a quarter of the writer's time at 100,000 machines).
    // Memory is taken only as pages are used.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    schema_not_newer(
        &conn,
        path,
        "Run that version again, or restore a backup taken with this version (provision restore)",
    )?;
    let migrations = Migrations::from_directory(&MIGRATIONS_DIR)
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    migrations
        .to_latest(&mut conn)
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    let broken: Vec<String> = conn
        .prepare("PRAGMA foreign_key_check")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if !broken.is_empty() {
        return Err(StoreError::Migration(format!(
            "rows of {} refer to rows that do not exist",
            broken.join(", ")
        )));
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The writer's page cache, in KiB as `PRAGMA cache_size` takes it (negative: KiB).
const WRITER_CACHE_KIB: i64 = -(32 << 10);

/// Bytes of the database file mapped into memory: reads of the main file are then page-cache
/// lookups instead of pread(2) copies (the WAL is still read with pread).
const MMAP_SIZE: i64 = 256 << 20;

pub(super) fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    register_text_match(&conn)?;
    Ok(conn)
}

/// `pv_text_match(needle, mac_hex, mac, hostname, profile, labels)`: whether the search text
/// `needle` (lower case) is in the hostname, the profile or the labels' JSON, ignoring ASCII
/// case, or `mac_hex` (lower-case hex digits, or NULL) is in the MAC without its colons.
///
/// Why a function of ours: the same test written as five `LIKE '%…%'`s took SQLite about
/// 60 ms per scan of 110,000 machines on the test machine (sqlite3 `.timer`; each LIKE is a
/// call that parses its pattern again); one call of this per row, borrowing the text, keeps a
/// whole text search with its count under 50 ms there (`bench/run.py --only ui`).
fn register_text_match(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    fn has(hay: &[u8], needle: &[u8]) -> bool {
        needle.is_empty()
            || hay
                .windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
    }
    conn.create_scalar_function(
        "pv_text_match",
        6,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            // Borrowed, never copied: this runs once per machine.
            let text = |i: usize| match ctx.get_raw(i) {
                rusqlite::types::ValueRef::Text(t) => Some(t),
                _ => None,
            };
            let needle = text(0).unwrap_or_default();
            if let (Some(hex), Some(mac)) = (text(1).filter(|h| !h.is_empty()), text(2)) {
                let mut digits = [0u8; 12];
                let n = mac
                    .iter()
                    .filter(|b| **b != b':')
                    .zip(digits.iter_mut())
                    .map(|(b, d)| *d = *b)
                    .count();
                if digits[..n].windows(hex.len()).any(|w| w == hex) {
                    return Ok(true);
                }
            }
            Ok((3..6).any(|i| text(i).is_some_and(|v| has(v, needle))))
        },
    )
}

/// Writes a consistent copy of the database at `db` to the new file `out` while a daemon may
/// be writing it: `VACUUM INTO` reads one snapshot (WAL: the writer goes on meanwhile) and
/// writes it compacted, without its WAL. The copy holds every commit made before it began.
pub fn snapshot(db: &Path, out: &Path) -> Result<()> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(BUSY_TIMEOUT)?;
    let out = out
        .to_str()
        .ok_or_else(|| StoreError::Database(format!("{} is not UTF-8", out.display())))?;
    c.execute("VACUUM INTO ?1", [out])?;
    Ok(())
}

/// Refuses a database whose schema is newer than this build's migrations (a downgrade):
/// migrations only go forward, and a schema this build does not know may hold what it would
/// misread. The error says so and `what_to_do`, rather than rusqlite_migration's "database
/// too far ahead".
fn schema_not_newer(c: &Connection, path: &Path, what_to_do: &str) -> Result<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS_DIR.dirs().count() as i64;
    if version > known {
        return Err(StoreError::Migration(format!(
            "{} has schema version {version}, newer than this provision's {known}: it was written by a newer provision. {what_to_do}",
            path.display()
        )));
    }
    Ok(())
}

/// Checks a database file before it is put in service: SQLite's integrity check, and a
/// schema this build knows (not newer than its migrations). Returns the machine count.
pub fn verify(db: &Path) -> Result<u64> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let verdict: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(StoreError::Database(format!(
            "{} fails SQLite's integrity check: {verdict}",
            db.display()
        )));
    }
    schema_not_newer(&c, db, "Restore it with that version")?;
    let machines: i64 = c.query_row("SELECT count(*) FROM machines", [], |r| r.get(0))?;
    Ok(machines as u64)
}
