//! The embedded inventory: one SQLite file in WAL mode.
//!
//! It owns its threads. One *writer* thread holds the only write connection and commits
//! concurrent requests together (group commit): it takes every request waiting in its queue,
//! runs each in its own savepoint inside one `BEGIN IMMEDIATE` transaction (so one request's
//! error rolls back only its own changes), commits once — one fsync for the whole batch with
//! `synchronous=FULL` — and only then answers each caller. Under load many requests share a
//! commit; alone, a request costs one commit, as before.
//!
//! Reads use a small pool of read-only connections. In WAL mode a reader never waits for the
//! writer and sees every transaction committed before it began, so a point read by primary
//! key (microseconds, no disk wait when the pages are cached) runs inline on the calling task;
//! scans that return pages run on a blocking thread.
//!
//! Observations go into a bounded in-memory queue; the writer coalesces them (one sighting
//! per MAC, identical events counted) and writes them every [`OBSERVATION_INTERVAL`], when the
//! queue is half full, or when an admin read asks for a flush. The same thread enforces the
//! bounds: the discovered-machine cap and event retention.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::db::{args, Arg, Db, Dialect, SqlRow, Val};
use super::postgres::{self, PgConn};
use super::sqlite;

use super::leases::{self, BindRequest, Lease, OfferRequest};
use super::plan;
use super::{
    Applied, ApplyRun, BootFacts, DhcpSeen, Event, EventQuery, Inventory, Limits, Machine,
    MachinePage, MachinePatch, MachineQuery, MachineSearch, NewMachine, Observation, Result,
    RevokedCert, RuleOutcome, SearchTerm, Sighting, SortKey, Stats, StepRecord, StepStatus,
    StoreError, TokenInfo, TokenProblem, MAX_PAGE,
};
use crate::mac::Mac;
use crate::policy::{
    self, EventKind, Failure, Group, GroupSet, Rule, RuleMode, RuleSet, State, Transition,
};

/// How often queued observations are written when nothing else asks.
pub const OBSERVATION_INTERVAL: Duration = Duration::from_millis(250);
/// How often the discovered cap is enforced (when something was discovered).
const CAP_INTERVAL: Duration = Duration::from_secs(1);
/// How often event retention runs.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);
/// Machines whose event count one batch checks for retention: a run over the machines touched
/// in [`RETENTION_INTERVAL`] (100,000 in a boot storm) is spread over the batches that follow,
/// so no group commit waits for all of it (perf: one run over 10,000 machines held a commit
/// up for a quarter of a second).
pub(super) const RETENTION_CHUNK: usize = 256;
/// Most requests in one group commit; more wait for the next one.
const MAX_BATCH: usize = 512;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;

/// The inventory on SQL: SQLite (the embedded default) or PostgreSQL (several daemons, one
/// inventory). Cheap to clone; the writer thread stops (after writing what is queued) when
/// the last clone is dropped.
#[derive(Clone)]
pub struct SqlInventory {
    shared: Arc<Shared>,
}

/// The writer's connection.
pub(super) enum Conn {
    Sqlite(Connection),
    /// A connection taken from the pool, kept from batch to batch and replaced when the
    /// server closed it (a restart, a failover); `down` says why there is none.
    Postgres {
        pool: deadpool_postgres::Pool,
        conn: Option<PgConn>,
        down: Unavailable,
    },
}

impl Conn {
    fn db(&self) -> &dyn Db {
        match self {
            Conn::Sqlite(c) => c,
            Conn::Postgres { conn: Some(c), .. } => c,
            Conn::Postgres {
                conn: None, down, ..
            } => down,
        }
    }

    /// Begins the batch's transaction. SQLite: IMMEDIATE takes the write lock now, so a
    /// batch never fails halfway for want of it. PostgreSQL: READ COMMITTED, the default;
    /// each operation's own compare-and-set or upsert decides a race with what other daemons
    /// read and decided outside the batch (see the store's module words), and a connection
    /// the server closed is replaced first. The batch then takes the events lock
    /// ([`postgres::EVENTS_LOCK`]) until it commits: batches of several daemons commit one
    /// at a time, so event ids grow in the order their rows become visible, and a reader that
    /// resumes after an id never skips one committed later (a sequence alone hands out ids in
    /// the order they are asked for, not committed). Taken first, before any row lock, it
    /// cannot deadlock with them.
    fn begin(&mut self) -> Result<()> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Conn::Postgres { pool, conn, down } => {
                if conn.as_ref().is_none_or(PgConn::is_closed) {
                    *conn = None;
                    match PgConn::take(pool) {
                        Ok(c) => *conn = Some(c),
                        Err(e) => {
                            down.0 = match &e {
                                StoreError::Unavailable(why) => why.clone(),
                                e => e.to_string(),
                            };
                            return Err(e);
                        }
                    }
                }
                let c = conn.as_ref().expect("taken above");
                let began = c.batch(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({})",
                    postgres::EVENTS_LOCK
                ));
                if let Err(e) = &began {
                    // Not handed back to the pool inside a transaction it may have begun.
                    let _ = c.batch("ROLLBACK");
                    down.0 = e.to_string();
                    *conn = None;
                }
                began
            }
        }
    }
}

/// The database the writer cannot reach: every statement fails with why, so each request
/// of a batch that could not begin is answered with that rather than dropped.
pub(super) struct Unavailable(String);

impl Db for Unavailable {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    fn exec(&self, _: &str, _: &[Arg<'_>]) -> Result<u64> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
    fn query(&self, _: &str, _: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
    fn query_once(&self, _: &str, _: &[Arg<'_>]) -> Result<Vec<SqlRow>> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
    fn batch(&self, _: &str) -> Result<()> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
}

/// Where reads run.
enum Readers {
    /// Read-only connections to the file, kept idle for the next read.
    Sqlite {
        path: PathBuf,
        idle: Mutex<Vec<Connection>>,
        /// Dropping it stops the checkpointer.
        to_checkpointer: Mutex<Option<mpsc::Sender<()>>>,
        checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
    },
    /// Connections from the pool, one per read, on a blocking thread.
    Postgres {
        pool: deadpool_postgres::Pool,
        url: String,
    },
}

struct Shared {
    readers: Readers,
    to_writer: Mutex<Option<mpsc::Sender<Msg>>>,
    queue: Arc<ObservationQueue>,
    counters: Arc<Counters>,
    facts: Arc<FactsCache>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The newest committed event id (see [`Inventory::event_feed`]).
    events: Arc<tokio::sync::watch::Sender<i64>>,
    /// Every group, replaced whole after a group change commits.
    groups: Arc<RwLock<Arc<GroupSet>>>,
    /// Every discovery rule with its count, replaced whole after a commit that changed one.
    rules: Arc<RwLock<Arc<RuleSet>>>,
    /// Orders the replacements of `groups` and `rules` (see [`Catalog`]).
    catalog: Arc<Catalog>,
    /// Stops the PostgreSQL watcher (dropped with the store).
    watcher: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Keeps a test database's directory alive as long as the store.
    _dir: Option<tempfile::TempDir>,
    /// Runs once the writer has stopped (tests: drops a test's PostgreSQL database).
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the channel tells the writer to write what is queued and stop.
        self.to_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        if let Some((stop, h)) = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            drop(stop);
            let _ = h.join();
        }
        if let Some(f) = self.on_drop.take() {
            f();
        }
        match &self.readers {
            Readers::Sqlite {
                to_checkpointer,
                checkpointer,
                ..
            } => {
                to_checkpointer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(h) = checkpointer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    let _ = h.join();
                }
            }
            Readers::Postgres { .. } => {}
        }
    }
}

#[derive(Default)]
struct Counters {
    /// The checkpointer asks the writer to make the WAL start over (see `checkpointer`).
    wal_restart: Arc<AtomicBool>,
    discoveries_shed: AtomicU64,
    /// A machine was created `discovered` since the cap was last enforced (set by the
    /// observation batches and by `discover`).
    discovered: AtomicBool,
    /// Machines created `discovered`, committed.
    discoveries: AtomicU64,
    observations_dropped: AtomicU64,
    observations_written: AtomicU64,
    discovered_evicted: AtomicU64,
    events_pruned: AtomicU64,
    commits: AtomicU64,
    writes: AtomicU64,
}

/// Called with the batch's commit result (`None`: durable) to answer one request.
type Completion = Box<dyn FnOnce(Option<&Failed>) + Send>;

/// When the groups and rules in memory were last replaced, as an event id: after a commit
/// of this daemon's (`committed`, kept before its requests are answered), or from a snapshot
/// the PostgreSQL watcher read. A replacement older than the one in memory is not made, so a
/// watcher's read that raced a change of this daemon's never puts the old sets back.
struct Catalog {
    at: Mutex<i64>,
    committed: AtomicI64,
}

/// Moves the event feed forward to `id` (never back: the writer and the watcher both tell it).
fn publish_event_id(events: &tokio::sync::watch::Sender<i64>, id: i64) {
    events.send_if_modified(|last| {
        let newer = id > *last;
        if newer {
            *last = id;
        }
        newer
    });
}

/// How often the PostgreSQL watcher looks for other daemons' writes.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// What one PostgreSQL daemon learns of the others' writes, by polling the newest event id
/// every [`WATCH_INTERVAL`] (one index lookup): a newer id moves this daemon's event feed
/// (live views, `events --follow`, the web UI), and makes it read the groups and rules again
/// in one snapshot, since another daemon may have changed them. Polling rather than
/// LISTEN/NOTIFY: a dedicated listening connection would need its own reconnects and would
/// still have to read after a reconnect what it missed; the pool reconnects already.
struct Watcher {
    pool: deadpool_postgres::Pool,
    events: Arc<tokio::sync::watch::Sender<i64>>,
    groups: Arc<RwLock<Arc<GroupSet>>>,
    rules: Arc<RwLock<Arc<RuleSet>>>,
    catalog: Arc<Catalog>,
}

impl Watcher {
    fn run(self, stop: mpsc::Receiver<()>) {
        let mut seen = *self.events.borrow();
        loop {
            match stop.recv_timeout(WATCH_INTERVAL) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            match self.look(seen) {
                Ok(id) => seen = id,
                // The database is away: the writer and the readers say so to their callers;
                // here there is nothing to do but look again.
                Err(e) => tracing::debug!("watching for other daemons' writes: {e}"),
            }
        }
    }

    /// One look: returns the newest event id.
    fn look(&self, seen: i64) -> Result<i64> {
        let c = PgConn::take(&self.pool)?;
        let db: &dyn Db = &c;
        let newest: i64 = db.scalar("SELECT coalesce(max(id), 0) FROM events", args![])?;
        if newest <= seen {
            return Ok(seen);
        }
        db.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        let snapshot = (|| {
            let at: i64 = db.scalar("SELECT coalesce(max(id), 0) FROM events", args![])?;
            Ok::<_, StoreError>((at, load_groups(db)?, load_rules(db)?))
        })();
        let _ = db.batch("COMMIT");
        let (at, groups, rules) = snapshot?;
        {
            let mut current = self.catalog.at.lock().unwrap_or_else(|p| p.into_inner());
            if at > *current {
                *self.groups.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(GroupSet::new(groups));
                *self.rules.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(RuleSet::new(rules));
                *current = at;
            }
        }
        publish_event_id(&self.events, at);
        Ok(at)
    }
}

/// Why a batch did not commit, told to each of its requests.
struct Failed(StoreError);

impl Failed {
    /// The error a request of the batch answers with: the database unreachable says so (the
    /// request may be tried again once it is back); any other failure of the commit is a
    /// database error.
    fn error(&self) -> StoreError {
        match &self.0 {
            StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
            e => StoreError::Database(format!("commit failed: {e}")),
        }
    }
}
/// A durable request's work.
type JobFn = Box<dyn FnOnce(&dyn Db) -> Completion + Send>;
/// One durable request: runs inside the batch's transaction, returns how to answer.
type Job = (Touch, JobFn);

/// Which machines a durable request may change: their boot facts (the cache forgets them
/// when the request commits) or their timeline (the repeats counted in memory for them are
/// written first, so the timeline keeps the order things happened in).
#[derive(Clone, Copy, Debug)]
enum Touch {
    /// No machine's facts or events: certificates, lease releases, pragmas.
    Nothing,
    /// This machine's events, not its boot facts: an event, a step, a lease.
    Timeline(Mac),
    /// This machine's facts and events.
    One(Mac),
    /// Any machine's (rare: an expiry sweep that found something; its batch first writes
    /// every repeat counted in memory).
    All,
}

impl Touch {
    /// The one machine whose timeline it writes, if it names one.
    fn timeline(self) -> Option<Mac> {
        match self {
            Touch::Timeline(m) | Touch::One(m) => Some(m),
            Touch::Nothing | Touch::All => None,
        }
    }
}

/// The boot decision's inputs, cached: every boot request reads them, and in WAL mode every
/// commit makes each reader connection drop its page cache, so at scale the read costs more
/// than the rest of the answer. The writer is the only writer of the file (one process), so it
/// invalidates exactly: in the same step as the commit that changes a machine, before the
/// request that changed it is answered. A reader inserts what it read only if no commit
/// happened since it began (the generation), so a stale value never outlives the commit that
/// made it stale.
struct FactsCache {
    inner: Mutex<(u64, HashMap<Mac, Option<BootFacts>>)>,
}

/// Most machines (known or not) whose facts are cached.
const MAX_CACHED_FACTS: usize = 262_144;

impl FactsCache {
    fn get(&self, mac: Mac) -> Result<Option<BootFacts>, u64> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.1.get(&mac) {
            Some(f) => Ok(f.clone()),
            None => Err(g.0),
        }
    }

    fn insert(&self, generation: u64, mac: Mac, facts: Option<BootFacts>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != generation {
            return;
        }
        if g.1.len() >= MAX_CACHED_FACTS {
            g.1.clear();
        }
        g.1.insert(mac, facts);
    }

    /// After a commit: forget what it may have changed.
    fn committed(&self, touched: &[Touch], created: &[Mac]) {
        if touched
            .iter()
            .all(|t| matches!(t, Touch::Nothing | Touch::Timeline(_)))
            && created.is_empty()
        {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        if touched.iter().any(|t| matches!(t, Touch::All)) {
            g.1.clear();
            return;
        }
        for t in touched {
            if let Touch::One(m) = t {
                g.1.remove(m);
            }
        }
        for m in created {
            g.1.remove(m);
        }
    }
}

enum Msg {
    Write(Job),
    /// Write the queued observations, then answer.
    Flush(oneshot::Sender<()>),
    /// The observation queue is filling up.
    Nudge,
    /// Enforce the bounds now (cap and retention), then answer.
    Maintain(oneshot::Sender<()>),
    /// Write the queued observations as the interval would, then answer (tests).
    #[cfg(test)]
    Tick(oneshot::Sender<()>),
    /// Tests: one batch, with a retention run due.
    #[cfg(test)]
    RetentionRun(oneshot::Sender<()>),
}

/// The bounded observation queue, shared by every protocol task and the writer.
struct ObservationQueue {
    items: Mutex<VecDeque<Observation>>,
    cap: usize,
    nudged: AtomicBool,
}

impl ObservationQueue {
    /// Queues `o`, dropping the oldest when full; returns (dropped one, should nudge).
    fn push(&self, o: Observation) -> (bool, bool) {
        let mut q = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = if q.len() >= self.cap {
            q.pop_front();
            true
        } else {
            false
        };
        q.push_back(o);
        let nudge = q.len() >= self.cap / 2 && !self.nudged.swap(true, Ordering::Relaxed);
        (dropped, nudge)
    }

    fn take(&self) -> VecDeque<Observation> {
        self.nudged.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts back what was taken and could not be written, before what came since, dropping
    /// the oldest past the bound; returns how many it dropped.
    fn put_back(&self, mut older: VecDeque<Observation>) -> u64 {
        let mut q = self.items.lock().unwrap_or_else(|p| p.into_inner());
        older.append(&mut q);
        let excess = older.len().saturating_sub(self.cap);
        older.drain(..excess);
        *q = older;
        excess as u64
    }
}

impl SqlInventory {
    /// Opens (creating if needed) the SQLite database at `path`, brings its schema up to date
    /// and starts the writer thread.
    pub fn open(path: &Path, limits: Limits) -> Result<SqlInventory> {
        Self::start_sqlite(path.to_path_buf(), limits, None)
    }

    /// A SQLite database in a fresh temporary directory (removed on drop), for tests.
    pub fn open_temp() -> Result<SqlInventory> {
        Self::open_temp_with(Limits::default())
    }

    /// A temporary SQLite database with the given limits, for tests.
    pub fn open_temp_with(limits: Limits) -> Result<SqlInventory> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Database(e.to_string()))?;
        Self::start_sqlite(dir.path().join("provision.db"), limits, Some(dir))
    }

    fn start_sqlite(path: PathBuf, limits: Limits, dir: Option<tempfile::TempDir>) -> Result<Self> {
        let conn = sqlite::open_writer(&path)?;
        let reader = sqlite::open_reader(&path)?;
        let cp_conn = Connection::open(&path)?;
        cp_conn.busy_timeout(sqlite::BUSY_TIMEOUT)?;
        let (cp_tx, cp_rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let restart = counters.wal_restart.clone();
        let cp = std::thread::Builder::new()
            .name("inventory-ckpt".into())
            .spawn(move || sqlite::checkpointer(cp_conn, restart, cp_rx))
            .map_err(|e| StoreError::Database(format!("starting the checkpoint thread: {e}")))?;
        let readers = Readers::Sqlite {
            path,
            idle: Mutex::new(vec![reader]),
            to_checkpointer: Mutex::new(Some(cp_tx)),
            checkpointer: Mutex::new(Some(cp)),
        };
        Self::start(Conn::Sqlite(conn), readers, counters, limits, dir)
    }

    /// Connects to the PostgreSQL database at `url` (a `postgres://` URL or a `key=value`
    /// connection string), brings its schema up to date and starts the writer thread. Other
    /// daemons may share the database.
    pub async fn connect(url: &str, limits: Limits) -> Result<SqlInventory> {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || Self::start_postgres(&url, limits, None))
            .await
            .map_err(|e| StoreError::Database(format!("connecting: {e}")))?
    }

    /// Connects to the test database at `url`, dropped with the store by `drop_db`.
    #[cfg(test)]
    pub(super) async fn connect_test(
        url: &str,
        limits: Limits,
        drop_db: Box<dyn FnOnce() + Send + Sync>,
    ) -> Result<SqlInventory> {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || Self::start_postgres(&url, limits, Some(drop_db)))
            .await
            .map_err(|e| StoreError::Database(format!("connecting: {e}")))?
    }

    fn start_postgres(
        url: &str,
        limits: Limits,
        on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Result<Self> {
        let pool = postgres::pool(url)?;
        let conn = PgConn::take(&pool)?;
        postgres::migrate(&conn)?;
        let mut store = Self::start(
            Conn::Postgres {
                pool: pool.clone(),
                conn: Some(conn),
                down: Unavailable(String::new()),
            },
            Readers::Postgres {
                pool,
                url: url.to_string(),
            },
            Arc::new(Counters::default()),
            limits,
            None,
        )?;
        let shared = Arc::get_mut(&mut store.shared).expect("a new store is not shared yet");
        shared.on_drop = on_drop;
        let Readers::Postgres { pool, .. } = &shared.readers else {
            unreachable!("started on PostgreSQL")
        };
        let watcher = Watcher {
            pool: pool.clone(),
            events: shared.events.clone(),
            groups: shared.groups.clone(),
            rules: shared.rules.clone(),
            catalog: shared.catalog.clone(),
        };
        let (stop, stopped) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("inventory-watch".into())
            .spawn(move || watcher.run(stopped))
            .map_err(|e| StoreError::Database(format!("starting the watcher thread: {e}")))?;
        *shared.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some((stop, handle));
        Ok(store)
    }

    fn start(
        conn: Conn,
        readers: Readers,
        counters: Arc<Counters>,
        limits: Limits,
        dir: Option<tempfile::TempDir>,
    ) -> Result<Self> {
        let c = conn.db();
        let discovered: i64 = c.scalar(
            "SELECT count(*) FROM machines WHERE state = 'discovered'",
            args![],
        )?;
        let last_event: i64 = c.scalar("SELECT coalesce(max(id), 0) FROM events", args![])?;
        let groups = Arc::new(RwLock::new(Arc::new(GroupSet::new(load_groups(c)?))));
        let rules = Arc::new(RwLock::new(Arc::new(RuleSet::new(load_rules(c)?))));
        let events_tx = Arc::new(tokio::sync::watch::Sender::new(last_event));
        let catalog = Arc::new(Catalog {
            at: Mutex::new(last_event),
            committed: AtomicI64::new(last_event),
        });
        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(ObservationQueue {
            items: Mutex::new(VecDeque::new()),
            cap: limits.observation_queue.max(2),
            nudged: AtomicBool::new(false),
        });
        let facts = Arc::new(FactsCache {
            inner: Mutex::new((0, HashMap::new())),
        });
        let mut writer = Writer {
            conn,
            limits,
            queue: queue.clone(),
            counters: counters.clone(),
            facts: facts.clone(),
            events: events_tx.clone(),
            catalog: catalog.clone(),
            unreachable: false,
            touched: HashSet::new(),
            retention_queue: Vec::new(),
            retention_total: false,
            retention_drain: false,
            recent: Recent::default(),
            // A database opened with a lower bound than it was written with is brought
            // under it at the first opportunity.
            retention_pending: true,
            discovered_estimate: discovered as u64,
            last_observations: Instant::now(),
            last_cap: Instant::now() - CAP_INTERVAL,
            last_retention: Instant::now() - RETENTION_INTERVAL,
        };
        counters.discovered.store(true, Ordering::Relaxed);
        let handle = std::thread::Builder::new()
            .name("inventory-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Database(format!("starting the writer thread: {e}")))?;
        Ok(SqlInventory {
            shared: Arc::new(Shared {
                readers,
                to_writer: Mutex::new(Some(tx)),
                queue,
                counters,
                facts,
                writer: Mutex::new(Some(handle)),
                events: events_tx,
                groups,
                rules,
                catalog,
                watcher: Mutex::new(None),
                _dir: dir,
                on_drop: None,
            }),
        })
    }

    /// The SQLite database file (`None` on PostgreSQL).
    pub fn path(&self) -> Option<&Path> {
        match &self.shared.readers {
            Readers::Sqlite { path, .. } => Some(path),
            Readers::Postgres { .. } => None,
        }
    }

    /// Every shared file, sealed: (its path under the data directory, its sealed bytes).
    pub async fn shared_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|c| {
            c.query(
                "SELECT name, sealed FROM shared_files ORDER BY name",
                args![],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
        })
        .await
    }

    /// Shares `name` (sealed) unless a file of that name is shared already: the first
    /// daemon's copy stays, and the others take it. Returns whether this one was kept.
    pub async fn share_file(&self, name: String, sealed: Vec<u8>, now: i64) -> Result<bool> {
        self.write(move |c| {
            Ok(c.exec(
                "INSERT INTO shared_files (name, sealed, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
                args![name, sealed, now],
            )? == 1)
        })
        .await
    }

    /// The PostgreSQL database's URL or connection string (`None` on SQLite).
    pub fn postgres_url(&self) -> Option<&str> {
        match &self.shared.readers {
            Readers::Sqlite { .. } => None,
            Readers::Postgres { url, .. } => Some(url),
        }
    }

    /// Writes queued observations and enforces the bounds (discovered cap, event retention)
    /// now rather than at their next interval.
    pub async fn maintain(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Maintain(tx))?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Writes the queued observations as the writer's interval does (repeats stay counted in
    /// memory), for tests.
    #[cfg(test)]
    pub(super) async fn maintain_observations_only(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Tick(tx)).unwrap();
        rx.await.unwrap();
    }

    /// One batch with a retention run due (as if its interval had passed), for tests.
    #[cfg(test)]
    pub(super) async fn start_retention_run(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::RetentionRun(tx)).unwrap();
        rx.await.unwrap();
    }

    /// The writer connection's journal mode, synchronous level and foreign-key setting.
    #[cfg(test)]
    pub(super) async fn writer_pragmas(&self) -> Result<(String, i64, i64)> {
        self.write(|c| {
            let get = |name: &str| c.one(&format!("PRAGMA {name}"), args![]);
            Ok((
                get("journal_mode")?.get(0)?,
                get("synchronous")?.get(0)?,
                get("foreign_keys")?.get(0)?,
            ))
        })
        .await
    }

    fn send(&self, m: Msg) -> Result<()> {
        let guard = self
            .shared
            .to_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(m)
            .map_err(|_| StoreError::Closed)
    }

    /// Runs `f` in the next group commit and returns its result once the commit is durable.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_touching(Touch::Nothing, f).await
    }

    /// Runs `f` in the next group commit, which forgets the cached boot facts `touch` names.
    async fn write_touching<T: Send + 'static>(
        &self,
        touch: Touch,
        f: impl FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let run: JobFn = Box::new(move |conn| {
            let out = in_savepoint(conn, f);
            Box::new(move |failed: Option<&Failed>| {
                let _ = tx.send(match failed {
                    None => out,
                    Some(f) => Err(f.error()),
                });
            })
        });
        let job: Job = (touch, run);
        self.send(Msg::Write(job))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` in the next group commit (forgetting the cached facts `touch` names); once
    /// it is durable, the groups or rules it returns replace the ones in memory (before its
    /// caller is answered, so the caller's next read sees them).
    async fn write_publishing<T: Send + 'static>(
        &self,
        touch: Touch,
        f: impl FnOnce(&dyn Db) -> Result<(T, Publish)> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let (groups, rules) = (self.shared.groups.clone(), self.shared.rules.clone());
        let catalog = self.shared.catalog.clone();
        let run: JobFn = Box::new(move |conn| {
            let out = in_savepoint(conn, f);
            Box::new(move |failed: Option<&Failed>| {
                let _ = tx.send(match (failed, out) {
                    (None, Ok((t, publish))) => {
                        // As of this commit (its id was kept before anyone was answered).
                        let mut at = catalog.at.lock().unwrap_or_else(|p| p.into_inner());
                        *at = (*at).max(catalog.committed.load(Ordering::Relaxed));
                        match publish {
                            Publish::Groups(set) => {
                                *groups.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set)
                            }
                            Publish::Rules(set) => {
                                *rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set)
                            }
                            Publish::Both(g, r) => {
                                *groups.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(g);
                                *rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(r);
                            }
                            Publish::Nothing => {}
                        }
                        Ok(t)
                    }
                    (None, Err(e)) => Err(e),
                    (Some(f), _) => Err(f.error()),
                });
            })
        });
        self.send(Msg::Write((touch, run)))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The machine a live token belongs to, read before a durable write that uses the token
    /// (so the write names its machine; it checks the token again inside its transaction).
    async fn token_owner(&self, token_hash: &str, now: i64) -> Result<Mac> {
        let hash = token_hash.to_string();
        self.read(move |c| token_machine(c, &hash, now).map(|(m, _)| m.mac))
            .await
    }

    /// Runs a short read: inline on a pooled SQLite read connection (a point read by key
    /// takes microseconds); on a blocking thread for PostgreSQL (a round trip to the server).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match &self.shared.readers {
            Readers::Sqlite { .. } => self.shared.read(f),
            Readers::Postgres { .. } => self.read_blocking(f).await,
        }
    }

    /// `m` as stored with its groups' values added.
    fn resolved(&self, m: Machine) -> Machine {
        m.resolve(&self.groups())
    }

    /// Runs a longer read (a page, a scan) on a blocking thread.
    async fn read_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.read(f))
            .await
            .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }
}

impl Shared {
    /// Runs `f` on a read connection, on this thread.
    fn read<T>(&self, f: impl FnOnce(&dyn Db) -> Result<T>) -> Result<T> {
        match &self.readers {
            Readers::Sqlite { path, idle, .. } => {
                let pooled = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let conn = match pooled {
                    Some(c) => c,
                    None => sqlite::open_reader(path)?,
                };
                let out = f(&conn);
                let mut pool = idle.lock().unwrap_or_else(|p| p.into_inner());
                if pool.len() < MAX_IDLE_READERS {
                    pool.push(conn);
                }
                out
            }
            Readers::Postgres { pool, .. } => f(&PgConn::take(pool)?),
        }
    }
}

/// A state change made in the current batch, logged once its commit succeeded.
struct Change {
    mac: Mac,
    from: Option<State>,
    to: Option<State>,
    kind: EventKind,
    detail: String,
}

thread_local! {
    /// The writer thread's state changes since its batch began: `apply` adds, a job rolled back
    /// to its savepoint takes its own back out, a failed commit drops them all, and a
    /// committed batch logs them. So a log line about a state change is never about one that
    /// did not happen.
    static CHANGES: std::cell::RefCell<Vec<Change>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Logs the batch's state changes (`committed`) or forgets them; returns how many of the
/// committed ones were discoveries.
fn log_changes(committed: bool) -> u64 {
    let changes = CHANGES.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if !committed {
        return 0;
    }
    let state = |s: Option<State>| s.map_or("none", State::as_str);
    // The level of a tracing event is fixed where it is written, hence one line per level.
    macro_rules! line {
        ($level:ident, $c:expr) => {
            tracing::$level!(
                target: "provision::lifecycle",
                mac = %$c.mac,
                from = state($c.from),
                to = state($c.to),
                kind = %$c.kind,
                "{}",
                $c.detail
            )
        };
    }
    let mut discoveries = 0;
    for c in changes {
        // Anything on the LAN can make discoveries (one per unknown MAC it sends): at info
        // they would let it fill the journal, so they are debug; every other change is an
        // operator's or an enrolled machine's.
        if c.kind == EventKind::Discovered {
            discoveries += 1;
            line!(debug, c);
        } else {
            line!(info, c);
        }
    }
    discoveries
}

/// Runs `f` in a savepoint: its changes are kept if it succeeds and rolled back if it fails
/// or panics, leaving the rest of the batch alone.
fn in_savepoint<T>(conn: &dyn Db, f: impl FnOnce(&dyn Db) -> Result<T>) -> Result<T> {
    let changes_before = CHANGES.with(|c| c.borrow().len());
    conn.batch("SAVEPOINT job")?;
    let out = match std::panic::catch_unwind(AssertUnwindSafe(|| f(conn))) {
        Ok(r) => r,
        Err(_) => Err(StoreError::Database(
            "internal error: a database operation panicked".into(),
        )),
    };
    if out.is_ok() {
        conn.batch("RELEASE job")?;
    } else {
        CHANGES.with(|c| c.borrow_mut().truncate(changes_before));
        conn.batch("ROLLBACK TO job; RELEASE job")?;
    }
    out
}

/// Runs `f` in a savepoint and rolls its changes back whatever it returns: a dry run.
fn rolled_back<T>(conn: &dyn Db, f: impl FnOnce(&dyn Db) -> Result<T>) -> Result<T> {
    let changes_before = CHANGES.with(|c| c.borrow().len());
    conn.batch("SAVEPOINT dry_run")?;
    let out = f(conn);
    CHANGES.with(|c| c.borrow_mut().truncate(changes_before));
    conn.batch("ROLLBACK TO dry_run; RELEASE dry_run")?;
    out
}

struct Writer {
    conn: Conn,
    limits: Limits,
    queue: Arc<ObservationQueue>,
    counters: Arc<Counters>,
    facts: Arc<FactsCache>,
    /// Tells live views the newest committed event id.
    events: Arc<tokio::sync::watch::Sender<i64>>,
    /// Where the newest committed event id is kept for the groups and rules published after
    /// the commit.
    catalog: Arc<Catalog>,
    /// The last batch could not reach the database (PostgreSQL), and that was logged.
    unreachable: bool,
    /// Machines that received observation events since the last retention run.
    touched: HashSet<String>,
    /// Machines of the current retention run not checked yet (see [`RETENTION_CHUNK`]), and
    /// whether the total is still to be checked.
    retention_queue: Vec<String>,
    retention_total: bool,
    /// Finish the retention run in this batch (an admin asked for the bounds now).
    retention_drain: bool,
    /// What was written in the last minute, so repeats are written once.
    recent: Recent,
    /// Retention has not run since start.
    retention_pending: bool,
    /// Discovered machines in the database: exact after each cap check, counted up by the
    /// observation batches in between.
    discovered_estimate: u64,
    last_observations: Instant,
    last_cap: Instant,
    last_retention: Instant,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let first = match rx.recv_timeout(OBSERVATION_INTERVAL) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // The last batch writes everything, as a flush does: queued observations
                    // and the repeats still counted in memory.
                    let (last, _) = oneshot::channel();
                    self.batch(Vec::new(), vec![last], true);
                    return;
                }
            };
            let mut jobs = Vec::new();
            let mut flushes = Vec::new();
            #[cfg(test)]
            let mut ticks = Vec::new();
            let mut nudged = false;
            let mut next = first;
            while let Some(m) = next {
                match m {
                    Msg::Write(j) => jobs.push(j),
                    Msg::Flush(f) => flushes.push(f),
                    Msg::Nudge => nudged = true,
                    #[cfg(test)]
                    Msg::RetentionRun(f) => {
                        self.last_retention = Instant::now() - RETENTION_INTERVAL;
                        nudged = true;
                        ticks.push(f);
                    }
                    #[cfg(test)]
                    Msg::Tick(f) => {
                        nudged = true;
                        ticks.push(f);
                    }
                    Msg::Maintain(f) => {
                        self.last_cap = Instant::now() - CAP_INTERVAL;
                        self.last_retention = Instant::now() - RETENTION_INTERVAL;
                        self.retention_pending = true;
                        self.retention_drain = true;
                        self.counters.discovered.store(true, Ordering::Relaxed);
                        flushes.push(f);
                    }
                }
                next = if jobs.len() < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            let observe = nudged
                || !flushes.is_empty()
                || self.last_observations.elapsed() >= OBSERVATION_INTERVAL;
            self.batch(jobs, flushes, observe);
            if self.counters.wal_restart.swap(false, Ordering::Relaxed) {
                self.restart_wal();
            }
            #[cfg(test)]
            for t in ticks {
                let _ = t.send(());
            }
        }
    }

    /// Makes the WAL start over, between two batches (see `checkpointer`): a RESTART
    /// checkpoint copies the few frames written since the last PASSIVE one and waits up to
    /// [`RESTART_WAIT`] for readers to finish with the WAL; the next write then begins at its
    /// start, and `journal_size_limit` cuts the file back.
    fn restart_wal(&self) {
        let Conn::Sqlite(conn) = &self.conn else {
            return;
        };
        let _ = conn.busy_timeout(sqlite::RESTART_WAIT);
        match sqlite::wal_checkpoint(conn, "RESTART") {
            Ok((busy, frames, done)) => tracing::debug!(busy, frames, done, "WAL restart"),
            Err(e) => tracing::warn!("WAL restart checkpoint failed: {e}"),
        }
        let _ = conn.busy_timeout(sqlite::BUSY_TIMEOUT);
    }

    /// One transaction: the queued observations (always with durable jobs, otherwise when
    /// due), the jobs, and the bounds when due; one commit.
    fn batch(&mut self, jobs: Vec<Job>, flushes: Vec<oneshot::Sender<()>>, observe: bool) {
        let observations = if observe || !jobs.is_empty() {
            self.last_observations = Instant::now();
            self.queue.take()
        } else {
            VecDeque::new()
        };
        let cap_due = self.last_cap.elapsed() >= CAP_INTERVAL
            && (self.counters.discovered.load(Ordering::Relaxed)
                || observations
                    .iter()
                    .any(|o| matches!(o, Observation::Seen { discover: true, .. })));
        // A run starts only when the last one is done (so the queue never holds a machine
        // twice and stays within the machines touched in one interval), unless an admin asked
        // for the bounds now, which finishes both in this batch.
        let run_due = (self.retention_pending || !self.touched.is_empty())
            && self.last_retention.elapsed() >= RETENTION_INTERVAL
            && (self.retention_drain || (self.retention_queue.is_empty() && !self.retention_total));
        let retention_due = run_due || self.retention_total || !self.retention_queue.is_empty();
        // Repeats counted in memory are written when their window closes; all of them for a
        // flush (an admin read) or before a durable write that may touch any machine's
        // timeline; a machine's own before a durable write of that machine (its timeline's
        // order). Not all of them before every install or phone-home: after a burst of local
        // boots that held one commit for half a second.
        let now = crate::store::now_ms();
        let write_all = !flushes.is_empty() || jobs.iter().any(|(t, _)| matches!(t, Touch::All));
        let counts_due = if write_all {
            self.recent.pending()
        } else {
            jobs.iter()
                .any(|(t, _)| t.timeline().is_some_and(|m| self.recent.pending_of(m)))
                || self.recent.closing.front().is_some_and(|(t, _)| *t <= now)
        };
        if jobs.is_empty() && observations.is_empty() && !cap_due && !retention_due && !counts_due {
            for f in flushes {
                let _ = f.send(());
            }
            return;
        }
        let began = self.conn.begin();
        let mut completions = Vec::with_capacity(jobs.len());
        let mut touched = Vec::with_capacity(jobs.len());
        let mut created = Vec::new();
        let n_jobs = jobs.len() as u64;
        if began.is_ok() {
            // Rows whose window closed first: a repeat after that starts a row of its own.
            if let Err(e) = self.recent.write_closed(self.conn.db(), now) {
                tracing::error!("writing repeated observations failed: {e}");
            }
            if !observations.is_empty() {
                let n = observations.len() as u64;
                let budget = self
                    .limits
                    .max_discovered
                    .saturating_sub(self.discovered_estimate);
                // Not in a savepoint of its own: a failed statement undoes only itself, and an
                // observation lost to an I/O error is no loss worth a savepoint per batch.
                match write_observations(self.conn.db(), observations, budget, &mut self.recent) {
                    Ok(w) => {
                        created = w.created;
                        if w.discovered > 0 {
                            self.discovered_estimate += w.discovered;
                            self.counters.discovered.store(true, Ordering::Relaxed);
                        }
                        if w.shed > 0 {
                            self.counters
                                .discoveries_shed
                                .fetch_add(w.shed, Ordering::Relaxed);
                        }
                        self.touched.extend(w.touched);
                        self.counters
                            .observations_written
                            .fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => tracing::error!("writing {n} observations failed: {e}"),
                }
            }
            let written = if write_all {
                self.recent.write_pending(self.conn.db())
            } else {
                jobs.iter().try_for_each(|(t, _)| match t.timeline() {
                    Some(m) => self.recent.write_pending_of(self.conn.db(), m),
                    None => Ok(()),
                })
            };
            if let Err(e) = written {
                tracing::error!("writing repeated observations failed: {e}");
            }
            // After the observations queued before them: a machine's timeline stays in the
            // order things happened.
            for (touch, job) in jobs {
                touched.push(touch);
                completions.push(job(self.conn.db()));
            }
            if self.last_cap.elapsed() >= CAP_INTERVAL
                && self.counters.discovered.swap(false, Ordering::Relaxed)
            {
                self.last_cap = Instant::now();
                match in_savepoint(self.conn.db(), |c| self.enforce_cap(c)) {
                    Ok((n, evicted)) => {
                        self.discovered_estimate = n;
                        if evicted {
                            touched.push(Touch::All);
                        }
                    }
                    Err(e) => tracing::error!("enforcing the discovered-machine cap failed: {e}"),
                }
            }
            if run_due {
                // A new run: this interval's machines (this batch's included).
                self.last_retention = Instant::now();
                self.retention_pending = false;
                self.retention_queue
                    .extend(std::mem::take(&mut self.touched));
                self.retention_total = true;
            }
            if retention_due {
                let take = if self.retention_drain {
                    self.retention_queue.len()
                } else {
                    RETENTION_CHUNK.min(self.retention_queue.len())
                };
                let macs: Vec<String> = self.retention_queue.drain(..take).collect();
                let total = self.retention_queue.is_empty() && self.retention_total;
                if let Err(e) = in_savepoint(self.conn.db(), |c| self.retention(c, &macs, total)) {
                    tracing::error!("event retention failed: {e}");
                }
                if total {
                    self.retention_total = false;
                }
            }
            self.retention_drain = false;
        } else if let Err(e) = &began {
            // Each request is answered with why (the database is unreachable), not dropped.
            let down = Unavailable(match e {
                StoreError::Unavailable(why) => why.clone(),
                e => e.to_string(),
            });
            for (_, job) in jobs {
                completions.push(job(&down));
            }
            // The observations wait for the next batch (the queue's bound still holds).
            let dropped = self.queue.put_back(observations);
            self.counters
                .observations_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
        let result = began.and_then(|()| {
            self.conn.db().batch("COMMIT").map_err(|e| match e {
                // Lost while committing: the transaction may or may not have committed, so
                // this is not "nothing was changed".
                StoreError::Unavailable(why) => StoreError::Database(format!(
                    "the connection to the database was lost while committing ({why}): the \
                     change may or may not have been made; look before trying again"
                )),
                e => e,
            })
        });
        let discoveries = log_changes(result.is_ok());
        self.counters
            .discoveries
            .fetch_add(discoveries, Ordering::Relaxed);
        // Before anyone is answered: a caller that reads after its write sees it.
        self.facts.committed(&touched, &created);
        let error = match &result {
            Ok(()) => {
                if std::mem::take(&mut self.unreachable) {
                    tracing::info!("the inventory's database is reachable again");
                }
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters.writes.fetch_add(n_jobs, Ordering::Relaxed);
                self.publish_last_event();
                None
            }
            Err(StoreError::Unavailable(why)) => {
                // Said once an outage, not once a batch (observations are written every
                // quarter second): the requests of each batch are told, and the watcher and
                // readers fail alike until the database is back.
                if !self.unreachable {
                    self.unreachable = true;
                    tracing::warn!(
                        "the inventory's database is unreachable: {why}; writes fail, and \
                         machine-facing answers that need it degrade, until it is back"
                    );
                }
                let _ = self.conn.db().batch("ROLLBACK");
                Some(Failed(StoreError::Unavailable(why.clone())))
            }
            Err(e) => {
                tracing::error!("inventory commit failed: {e}");
                let _ = self.conn.db().batch("ROLLBACK");
                Some(Failed(StoreError::Database(e.to_string())))
            }
        };
        for done in completions {
            done(error.as_ref());
        }
        for f in flushes {
            let _ = f.send(());
        }
    }

    /// Tells live views about the events this commit wrote (a seek to the table's end).
    fn publish_last_event(&self) {
        match self
            .conn
            .db()
            .scalar::<i64>("SELECT coalesce(max(id), 0) FROM events", args![])
        {
            Ok(id) => {
                self.catalog.committed.store(id, Ordering::Relaxed);
                publish_event_id(&self.events, id);
            }
            Err(e) => tracing::error!("reading the newest event id failed: {e}"),
        }
    }

    /// Evicts the least recently seen discovered machines over the cap, with their events
    /// (nothing else refers to a machine nobody enrolled).
    fn enforce_cap(&self, c: &dyn Db) -> Result<(u64, bool)> {
        let n: i64 = c.scalar(
            "SELECT count(*) FROM machines WHERE state = 'discovered'",
            args![],
        )?;
        let excess = n - self.limits.max_discovered as i64;
        if excess <= 0 {
            return Ok((n as u64, false));
        }
        c.batch(
            "CREATE TEMP TABLE IF NOT EXISTS evict (mac TEXT PRIMARY KEY); DELETE FROM evict;",
        )?;
        c.exec(
            "INSERT INTO evict SELECT mac FROM machines WHERE state = 'discovered'
             ORDER BY last_seen, mac LIMIT ?1",
            args![excess],
        )?;
        c.exec(
            "DELETE FROM events WHERE mac IN (SELECT mac FROM evict)",
            args![],
        )?;
        let evicted = c.exec(
            "DELETE FROM machines WHERE mac IN (SELECT mac FROM evict)",
            args![],
        )?;
        c.exec("DELETE FROM evict", args![])?;
        self.counters
            .discovered_evicted
            .fetch_add(evicted, Ordering::Relaxed);
        tracing::warn!(
            evicted,
            cap = self.limits.max_discovered,
            "discovered machines over the cap: evicted the least recently seen (see --max-discovered)"
        );
        Ok(((n as u64).saturating_sub(evicted), evicted > 0))
    }

    /// Keeps at most `events_per_machine` events for each of `macs` and (with `total`)
    /// `max_events` in all, deleting observations (events that change no state) before
    /// transitions, oldest first.
    fn retention(&self, c: &dyn Db, macs: &[String], total: bool) -> Result<()> {
        let mut pruned = 0usize;
        let per = self.limits.events_per_machine as i64;
        for mac in macs {
            let n: i64 = c.scalar("SELECT count(*) FROM events WHERE mac = ?1", args![mac])?;
            if n <= per {
                continue;
            }
            pruned += prune(c, Some(mac), n - per)?;
        }
        let max = self.limits.max_events as i64;
        // count(*) reads a whole index (tens of milliseconds at a million events); the span of
        // ids bounds it from above in two index lookups, and is enough while under the cap.
        let span = |c: &dyn Db| {
            c.scalar::<i64>(
                "SELECT coalesce(max(id) - min(id) + 1, 0) FROM events",
                args![],
            )
        };
        if total && span(c)? > max {
            let n: i64 = c.scalar("SELECT count(*) FROM events", args![])?;
            if n > max {
                pruned += prune(c, None, n - max)?;
            }
        }
        if pruned > 0 {
            self.counters
                .events_pruned
                .fetch_add(pruned as u64, Ordering::Relaxed);
            tracing::info!(pruned, "event retention deleted old events");
        }
        Ok(())
    }
}

/// Writes a batch of observations: one sighting per MAC (an unknown MAC seen with `discover`
/// becomes a discovered machine while `budget` lasts), identical events as one row with a
/// count. A machine seen again within [`WINDOW_MS`] saying nothing new is not rewritten, and a
/// repeat of an event written within the window only adds to that row's count in `recent`
/// (written out later, see [`Recent::write_closed`], [`Recent::write_pending`]). Events about a MAC the inventory does not
/// know are not kept (nobody enrolled or discovered it: noise, or a flood). Returns what it
/// created, what it shed, and the machines whose events grew.
fn write_observations(
    c: &dyn Db,
    obs: VecDeque<Observation>,
    mut budget: u64,
    recent: &mut Recent,
) -> Result<ObservationsWritten> {
    let mut seen: HashMap<Mac, (Sighting, bool, i64, i64)> = HashMap::new();
    let mut order: Vec<Mac> = Vec::new();
    let mut events: Vec<(Option<Mac>, EventKind, String, i64, i64)> = Vec::new();
    let mut event_index: HashMap<(Option<Mac>, EventKind, String), usize> = HashMap::new();
    let mut out = ObservationsWritten::default();
    for o in obs {
        match o {
            Observation::Seen {
                mac,
                sighting,
                discover,
                at,
            } => match seen.get_mut(&mac) {
                Some(e) => {
                    e.0.merge(sighting);
                    e.1 |= discover;
                    e.3 = e.3.max(at);
                }
                None => {
                    order.push(mac);
                    seen.insert(mac, (sighting, discover, at, at));
                }
            },
            Observation::Event {
                mac,
                kind,
                detail,
                at,
            } => {
                let key = (mac, kind, detail);
                match event_index.get(&key) {
                    Some(&i) => events[i].4 += 1,
                    None => {
                        event_index.insert(key.clone(), events.len());
                        events.push((key.0, key.1, key.2, at, 1));
                    }
                }
            }
        }
    }
    for mac in order {
        let (s, discover, first, last) = seen.remove(&mac).expect("ordered MACs are in the map");
        if recent.seen_recently(mac, &s, last) {
            continue;
        }
        match record_sighting(c, mac, &s, last, discover)? {
            Sighted::Updated => {
                // Its cached boot facts hold what group selectors read (uuid, serial, arch,
                // platform): forgotten at this commit, as any write of them is. At most once
                // a window per machine, unless what it says changes.
                out.created.push(mac);
                recent.written(mac, s, last)
            }
            Sighted::Unchanged => recent.written(mac, s, last),
            Sighted::Unknown if discover => {
                if budget > 0 {
                    budget -= 1;
                    create_discovered(c, mac, &s, first, "first DHCP boot request")?;
                    recent.written(mac, s, last);
                    out.created.push(mac);
                    out.discovered += 1;
                } else {
                    out.shed += 1;
                }
            }
            Sighted::Unknown => {}
        }
    }
    for (mac, kind, detail, at, count) in events {
        let Some(m) = mac else {
            insert_observed_event(c, at, None, kind, &detail, count)?;
            continue;
        };
        if recent.add_to_row(m, kind, &detail, at, count) {
            continue;
        }
        if let Some(row) = insert_observed_event(c, at, mac, kind, &detail, count)? {
            recent.new_row(m, kind, detail, row, at);
            out.touched.push(m.to_string());
        }
    }
    Ok(out)
}

/// The window within which a machine's repeated sightings and identical observations are
/// one write: a machine that keeps asking (a boot loop, a storm) costs a row a minute, not a
/// row a request.
const WINDOW_MS: i64 = 60_000;
/// Most machines and rows remembered for that; past it the oldest are written and forgotten.
const MAX_RECENT: usize = 131_072;

/// An observation row written within the window, with the repeats not yet added to it.
struct RecentRow {
    row: i64,
    first: i64,
    unwritten: i64,
    /// When the first of the `unwritten` repeats happened (the time of a row of their own).
    since: i64,
}

type RowKey = (Mac, EventKind, String);

/// What the writer wrote in the last [`WINDOW_MS`]: sightings (so they are not rewritten)
/// and observation rows (so repeats are counted in memory). Pending counts are written when
/// their window closes, a machine's before a durable write of that machine in the same
/// transaction (so its timeline keeps its order; all of them before a durable write that may
/// touch any machine), and all on every flush (so an admin read sees them).
#[derive(Default)]
struct Recent {
    sightings: HashMap<Mac, (i64, Sighting)>,
    rows: HashMap<RowKey, RecentRow>,
    /// Keys of `rows` in the order their windows close.
    closing: VecDeque<(i64, RowKey)>,
    /// The rows with repeats not yet written, by machine: what a flush must write first, and
    /// what a durable write of one machine must write of that machine's, found without walking
    /// every remembered row. A row is here exactly when its `unwritten` is not zero.
    dirty: HashMap<Mac, Vec<(EventKind, String)>>,
}

impl Recent {
    /// Whether `s` says nothing new about a machine written less than a window ago.
    fn seen_recently(&self, mac: Mac, s: &Sighting, at: i64) -> bool {
        let Some((written, last)) = self.sightings.get(&mac) else {
            return false;
        };
        let new = |a: &Option<String>, b: &Option<String>| a.is_some() && a != b;
        at - written < WINDOW_MS
            && !new(&s.uuid, &last.uuid)
            && !new(&s.arch, &last.arch)
            && !new(&s.platform, &last.platform)
            && !new(&s.ip, &last.ip)
    }

    /// Remembers a sighting that was written.
    fn written(&mut self, mac: Mac, s: Sighting, at: i64) {
        if self.sightings.len() >= MAX_RECENT {
            self.sightings.clear();
        }
        let entry = self
            .sightings
            .entry(mac)
            .or_insert((at, Sighting::default()));
        entry.0 = at;
        entry.1.merge(s);
    }

    /// Counts a repeat of a row written less than a window ago; false if there is none.
    fn add_to_row(&mut self, mac: Mac, kind: EventKind, detail: &str, at: i64, n: i64) -> bool {
        let key = (mac, kind, detail.to_string());
        match self.rows.get_mut(&key) {
            Some(r) if at - r.first < WINDOW_MS => {
                if r.unwritten == 0 {
                    r.since = at;
                    self.dirty.entry(mac).or_default().push((key.1, key.2));
                }
                r.unwritten += n;
                true
            }
            _ => false,
        }
    }

    /// Remembers a row just written.
    fn new_row(&mut self, mac: Mac, kind: EventKind, detail: String, row: i64, at: i64) {
        let key = (mac, kind, detail);
        self.closing.push_back((at + WINDOW_MS, key.clone()));
        let old = self.rows.insert(
            key,
            RecentRow {
                row,
                first: at,
                unwritten: 0,
                since: at,
            },
        );
        debug_assert!(old.is_none_or(|o| o.unwritten == 0));
    }

    /// Writes the pending counts of the rows whose window closed by `now` (and of the oldest
    /// half when more than [`MAX_RECENT`] are remembered), and forgets those rows.
    fn write_closed(&mut self, c: &dyn Db, now: i64) -> Result<()> {
        let keep = if self.rows.len() > MAX_RECENT {
            MAX_RECENT / 2
        } else {
            usize::MAX
        };
        while let Some((closes, _)) = self.closing.front() {
            if *closes > now && self.rows.len() <= keep {
                break;
            }
            let (_, key) = self.closing.pop_front().expect("checked above");
            if let Some(r) = self.rows.remove(&key) {
                if r.unwritten != 0 {
                    self.undirty(&key);
                }
                write_count(c, &key, &r)?;
            }
        }
        Ok(())
    }

    /// Writes every pending count now (before a durable write, for the timeline's order; for
    /// a flush, so an admin read sees them). The rows stay remembered until their window
    /// closes, so later repeats still add to them: an admin polling the API does not split a
    /// machine's repeats into a row per poll.
    fn write_pending(&mut self, c: &dyn Db) -> Result<()> {
        for (mac, keys) in std::mem::take(&mut self.dirty) {
            self.write_rows(c, mac, keys)?;
        }
        Ok(())
    }

    /// The same for one machine's rows (before a durable write of that machine: the order of
    /// its timeline is all that write needs).
    fn write_pending_of(&mut self, c: &dyn Db, mac: Mac) -> Result<()> {
        match self.dirty.remove(&mac) {
            Some(keys) => self.write_rows(c, mac, keys),
            None => Ok(()),
        }
    }

    fn write_rows(&mut self, c: &dyn Db, mac: Mac, keys: Vec<(EventKind, String)>) -> Result<()> {
        for (kind, detail) in keys {
            let key = (mac, kind, detail);
            if let Some(r) = self.rows.get_mut(&key) {
                if let Some(row) = write_count(c, &key, r)? {
                    r.row = row;
                }
                r.unwritten = 0;
            }
        }
        Ok(())
    }

    fn undirty(&mut self, key: &RowKey) {
        if let Some(keys) = self.dirty.get_mut(&key.0) {
            keys.retain(|(k, d)| (k, d) != (&key.1, &key.2));
            if keys.is_empty() {
                self.dirty.remove(&key.0);
            }
        }
    }

    /// Whether any repeat waits to be written.
    fn pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Whether any of `mac`'s repeats waits to be written.
    fn pending_of(&self, mac: Mac) -> bool {
        self.dirty.contains_key(&mac)
    }
}

/// Adds a row's pending repeats to it if it is still its machine's newest event; otherwise
/// they become a row of their own after what came between (its id returned: later repeats
/// add to it).
fn write_count(c: &dyn Db, key: &RowKey, r: &RecentRow) -> Result<Option<i64>> {
    if r.unwritten == 0 {
        return Ok(None);
    }
    let n = c.exec(
        "UPDATE events SET count = count + ?2
         WHERE id = ?1 AND id = (SELECT max(id) FROM events WHERE mac = ?3)",
        args![r.row, r.unwritten, key.0.to_string()],
    )?;
    if n == 0 {
        return insert_observed_event(c, r.since, Some(key.0), key.1, &key.2, r.unwritten);
    }
    Ok(None)
}

/// What a batch of observations did.
#[derive(Default)]
struct ObservationsWritten {
    /// Machines it created (discovered) or whose sighting columns it wrote: their cached boot
    /// facts are forgotten at the commit.
    created: Vec<Mac>,
    discovered: u64,
    shed: u64,
    touched: Vec<String>,
}

/// Appends an observed event: of a known machine (stamped with its state), or of none.
/// Returns the new row's id if it was kept (events of a MAC the inventory does not know are
/// not; an event of no machine is, with id 0: nothing counts repeats into it).
fn insert_observed_event(
    c: &dyn Db,
    now: i64,
    mac: Option<Mac>,
    kind: EventKind,
    detail: &str,
    count: i64,
) -> Result<Option<i64>> {
    let Some(m) = mac else {
        insert_event(c, now, None, kind, detail, count)?;
        return Ok(Some(0));
    };
    c.opt(
        "INSERT INTO events (at, mac, kind, from_state, to_state, detail, count)
         SELECT ?1, mac, ?3, state, state, ?4, ?5 FROM machines WHERE mac = ?2 RETURNING id",
        args![now, m.to_string(), kind.as_str(), detail, count],
    )?
    .map(|r| r.get(0))
    .transpose()
}

/// Deletes `n` of the oldest events (of `mac`, or of all), observations first.
fn prune(c: &dyn Db, mac: Option<&str>, n: i64) -> Result<usize> {
    let mut done = 0;
    for filter in ["from_state IS NOT DISTINCT FROM to_state", "TRUE"] {
        let left = n - done as i64;
        if left <= 0 {
            break;
        }
        done += c.exec(
            &format!(
                "DELETE FROM events WHERE id IN (SELECT id FROM events
                 WHERE (CAST(?1 AS TEXT) IS NULL OR mac = ?1) AND {filter} ORDER BY id LIMIT ?2)"
            ),
            args![mac, left],
        )? as usize;
    }
    Ok(done)
}

// --- SQL shared by the operations ---

/// The columns of a [`Machine`] (`m` is the machines table), with its host keys and
/// registration steps as JSON arrays, which each engine builds with its own functions.
macro_rules! machine_cols {
    ($keys:literal, $steps:literal) => {
        concat!(
            "m.mac, m.uuid, m.serial, m.hostname, m.profile, m.state, m.vars, m.labels, \
             m.generation, m.arch, m.platform, m.last_ip, m.last_seen, m.failed_step, \
             m.failed_reason, m.created_at, m.updated_at, \
             (SELECT t.handed_over_at FROM install_tokens t WHERE t.mac = m.mac), \
             (SELECT c.fingerprint FROM node_certs c WHERE c.mac = m.mac), ",
            $keys,
            ", ",
            $steps,
            ", m.boot_ip, m.state_at, m.vendor_class, m.user_class, m.dhcp_interface, \
             m.dhcp_relay, m.proposed_rule"
        )
    };
}

const MACHINE_COLS_SQLITE: &str = machine_cols!(
    "(SELECT json_group_array(k.key) FROM \
       (SELECT key FROM host_keys WHERE mac = m.mac ORDER BY algorithm) k)",
    "(SELECT json_group_array(json_array(s.seq, s.name, s.status, s.exit_code, s.output, s.at)) \
       FROM (SELECT * FROM register_steps WHERE mac = m.mac ORDER BY seq) s)"
);

const MACHINE_COLS_POSTGRES: &str = machine_cols!(
    "(SELECT coalesce(json_agg(k.key ORDER BY k.algorithm), '[]')::text \
       FROM host_keys k WHERE k.mac = m.mac)",
    "(SELECT coalesce(json_agg(json_build_array(s.seq, s.name, s.status, s.exit_code, \
       s.output, s.at) ORDER BY s.seq), '[]')::text FROM register_steps s WHERE s.mac = m.mac)"
);

/// The columns [`machine_from_row`] reads, for `c`'s engine.
fn machine_cols(c: &dyn Db) -> &'static str {
    match c.dialect() {
        Dialect::Sqlite => MACHINE_COLS_SQLITE,
        Dialect::Postgres => MACHINE_COLS_POSTGRES,
    }
}

fn machine_from_row(row: &SqlRow) -> Result<Machine> {
    let step: Option<String> = row.get(13)?;
    let reason: Option<String> = row.get(14)?;
    let steps: Vec<(i64, String, String, Option<i64>, String, i64)> =
        row.json(20, "register_steps")?;
    Ok(Machine {
        mac: row.parsed(0, "mac")?,
        uuid: row.get(1)?,
        serial: row.get(2)?,
        hostname: row.get(3)?,
        profile: row.get(4)?,
        inherited: Default::default(),
        state: row.parsed(5, "state")?,
        vars: row.json(6, "vars")?,
        labels: row.json(7, "labels")?,
        generation: row.get(8)?,
        arch: row.get(9)?,
        platform: row.get(10)?,
        last_ip: row.get(11)?,
        boot_ip: row.get(21)?,
        last_seen: row.get(12)?,
        failure: step.map(|step| Failure {
            step,
            reason: reason.unwrap_or_default(),
        }),
        created_at: row.get(15)?,
        updated_at: row.get(16)?,
        state_at: row.get(22)?,
        dhcp: DhcpSeen {
            vendor_class: row.get(23)?,
            user_class: row.get(24)?,
            interface: row.get(25)?,
            relay: row.get(26)?,
        },
        proposed_rule: row.get(27)?,
        installer_done_at: row.get(17)?,
        cert_fingerprint: row.get(18)?,
        host_keys: row.json(19, "host_keys")?,
        register_steps: steps
            .into_iter()
            .map(|(seq, name, status, exit_code, output, at)| {
                Ok(StepRecord {
                    seq,
                    name,
                    status: match status.as_str() {
                        "ok" => StepStatus::Ok,
                        "failed" => StepStatus::Failed,
                        other => {
                            return Err(StoreError::Corrupt(
                                "register_steps",
                                format!("step status {other:?}"),
                            ))
                        }
                    },
                    exit_code,
                    output,
                    at,
                })
            })
            .collect::<Result<_>>()?,
    })
}

fn load(c: &dyn Db, mac: Mac) -> Result<Option<Machine>> {
    c.opt(
        &format!(
            "SELECT {} FROM machines m WHERE m.mac = ?1",
            machine_cols(c)
        ),
        args![mac.to_string()],
    )?
    .as_ref()
    .map(machine_from_row)
    .transpose()
}

/// `k=v,k=v` for an event's words.
fn key_values(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What a write hands to memory once it is durable.
enum Publish {
    Groups(GroupSet),
    Rules(RuleSet),
    Both(GroupSet, RuleSet),
    Nothing,
}

/// Every discovery rule, as stored.
fn load_rules(c: &dyn Db) -> Result<Vec<Rule>> {
    c.query(
        "SELECT name, priority, enabled, mode, conditions, profile, hostname, labels, vars, max,
         used FROM rules ORDER BY priority, name",
        args![],
    )?
    .iter()
    .map(|r| {
        Ok(Rule {
            name: r.get(0)?,
            priority: r.get(1)?,
            enabled: r.get(2)?,
            mode: r.parsed(3, "rules.mode")?,
            conditions: r.json(4, "rules.conditions")?,
            profile: r.get(5)?,
            hostname: r.get(6)?,
            labels: r.json(7, "rules.labels")?,
            vars: r.json(8, "rules.vars")?,
            max: r.get::<Option<i64>>(9)?.map(|m| m.max(0) as u64),
            used: r.get::<i64>(10)?.max(0) as u64,
        })
    })
    .collect()
}

/// Every group, as stored.
fn load_groups(c: &dyn Db) -> Result<Vec<Group>> {
    c.query(
        "SELECT name, selector, profile, vars, labels FROM groups ORDER BY name",
        args![],
    )?
    .iter()
    .map(|r| {
        Ok(Group {
            name: r.get(0)?,
            selector: r.json(1, "groups.selector")?,
            profile: r.get(2)?,
            vars: r.json(3, "groups.vars")?,
            labels: r.json(4, "groups.labels")?,
        })
    })
    .collect()
}

/// Refuses a group change (`what`) after which a machine past discovery with no profile of
/// its own would have none from its groups either: an installing or installed machine must
/// know what it installs (reprovision, registration role, configs).
fn every_machine_keeps_a_profile(c: &dyn Db, next: &GroupSet, what: &str) -> Result<()> {
    let rows = c.query(
        "SELECT mac, uuid, serial, hostname, arch, platform, labels FROM machines
         WHERE state != 'discovered' AND profile IS NULL ORDER BY mac",
        args![],
    )?;
    let mut orphans: Vec<String> = Vec::new();
    for r in &rows {
        let mac: String = r.get(0)?;
        let labels: BTreeMap<String, String> = r.json(6, "labels")?;
        let text = |i: usize| r.get::<Option<String>>(i);
        let (uuid, serial, hostname) = (text(1)?, text(2)?, text(3)?);
        let (arch, platform) = (text(4)?, text(5)?);
        let sel = policy::Selectable {
            mac: &mac,
            uuid: uuid.as_deref(),
            serial: serial.as_deref(),
            hostname: hostname.as_deref(),
            arch: arch.as_deref(),
            platform: platform.as_deref(),
            labels: Some(&labels),
        };
        if next.profile(&sel, None).0.is_none() {
            orphans.push(mac);
        }
    }
    if orphans.is_empty() {
        return Ok(());
    }
    Err(StoreError::GroupConflict(format!(
        "{what} would leave {} enrolled or installed machine{} without a profile ({}{}): give \
         them a profile of their own first (`provision machines update MAC --profile P`), or \
         have another group give them one",
        orphans.len(),
        if orphans.len() == 1 { "" } else { "s" },
        orphans
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        if orphans.len() > 5 { ", …" } else { "" }
    )))
}

/// Revoked node certificates are kept this long, past the 13 months any of them is valid.
const REVOKED_KEPT_MS: i64 = 400 * 86_400_000;

/// Moves `mac`'s node certificate, if it has one, to `revoked_certs` (in the caller's
/// transaction), and drops revocations of certificates that have surely expired.
fn revoke_node_cert(c: &dyn Db, mac: Mac, now: i64, reason: &str) -> Result<()> {
    c.exec(
        "INSERT INTO revoked_certs (fingerprint, mac, cert_pem, revoked_at, reason)
         SELECT fingerprint, mac, cert_pem, ?2, ?3 FROM node_certs WHERE mac = ?1
         ON CONFLICT DO NOTHING",
        args![mac.to_string(), now, reason],
    )?;
    c.exec(
        "DELETE FROM revoked_certs WHERE revoked_at < ?1",
        args![now - REVOKED_KEPT_MS],
    )?;
    Ok(())
}

/// Enrolls `new` — a MAC never seen, or a discovered machine — in the caller's transaction;
/// the profile it will install (its own, or the one `groups` give it) must exist. `how` ends
/// the event's words (` by apply`).
fn enroll_in(
    c: &dyn Db,
    new: &NewMachine,
    groups: &GroupSet,
    now: i64,
    how: &str,
) -> Result<Machine> {
    let mac = new.mac;
    let before = load(c, mac)?;
    match &before {
        Some(m) if m.state != State::Discovered => {
            return Err(StoreError::AlreadyEnrolled(mac, m.state))
        }
        Some(_) => {
            c.exec(
                "UPDATE machines SET profile = ?2, hostname = ?3, uuid = COALESCE(?4, uuid),
                 serial = COALESCE(?5, serial), vars = ?6, labels = ?7, updated_at = ?8
                 WHERE mac = ?1",
                args![
                    mac.to_string(),
                    new.profile,
                    new.hostname,
                    new.uuid,
                    new.serial,
                    map_json(&new.vars),
                    map_json(&new.labels),
                    now
                ],
            )?;
        }
        None => {
            c.exec(
                "INSERT INTO machines (mac, uuid, serial, hostname, profile, state, vars, labels,
                 created_at, updated_at, state_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'enrolled', ?6, ?7, ?8, ?8, ?8)",
                args![
                    mac.to_string(),
                    new.uuid,
                    new.serial,
                    new.hostname,
                    new.profile,
                    map_json(&new.vars),
                    map_json(&new.labels),
                    now
                ],
            )
            // Another daemon created the row since our read (PostgreSQL): a conflict, and the
            // request made again finds it.
            .map_err(|e| match e {
                StoreError::Contended(_) => StoreError::Conflict(mac),
                e => e,
            })?;
        }
    }
    let m = must_load(c, mac)?.resolve(groups);
    let Some(profile) = m.profile.as_deref() else {
        return Err(StoreError::NoProfile(mac));
    };
    let detail = format!(
        "profile {profile}{}{}{how}",
        m.inherited
            .profile
            .as_deref()
            .map(|g| format!(" from group {g}"))
            .unwrap_or_default(),
        new.hostname
            .as_deref()
            .map(|h| format!(", hostname {h}"))
            .unwrap_or_default()
    );
    match before {
        Some(before) => {
            apply(c, now, &before, &Transition::Enroll, &detail)?;
        }
        None => {
            insert_transition(
                c,
                now,
                mac,
                EventKind::Enrolled,
                None,
                Some(State::Enrolled),
                &detail,
            )?;
        }
    }
    must_load(c, mac)
}

/// Changes what `patch` names of machine `mac` in the caller's transaction, with an
/// `updated` event naming the fields (`how` ends its words).
fn update_in(c: &dyn Db, mac: Mac, patch: &MachinePatch, now: i64, how: &str) -> Result<Machine> {
    must_load(c, mac)?;
    let key = mac.to_string();
    let mut changed = Vec::new();
    let mut set = |column: &str, value: Option<&str>, words: String| -> Result<()> {
        c.exec(
            &format!("UPDATE machines SET {column} = ?2 WHERE mac = ?1"),
            args![key, value],
        )?;
        changed.push(words);
        Ok(())
    };
    if let Some(p) = &patch.profile {
        set(
            "profile",
            p.as_deref(),
            format!("profile {}", p.as_deref().unwrap_or("(its groups')")),
        )?;
    }
    if let Some(h) = &patch.hostname {
        set(
            "hostname",
            h.as_deref(),
            format!("hostname {}", h.as_deref().unwrap_or("(none)")),
        )?;
    }
    if let Some(u) = &patch.uuid {
        set("uuid", Some(u), format!("uuid {u}"))?;
    }
    if let Some(s) = &patch.serial {
        set("serial", Some(s), format!("serial {s}"))?;
    }
    if let Some(v) = &patch.vars {
        set(
            "vars",
            Some(&map_json(v)),
            format!("vars {}", v.keys().cloned().collect::<Vec<_>>().join(",")),
        )?;
    }
    if let Some(l) = &patch.labels {
        set(
            "labels",
            Some(&map_json(l)),
            format!("labels {}", l.keys().cloned().collect::<Vec<_>>().join(",")),
        )?;
    }
    c.exec(
        "UPDATE machines SET updated_at = ?2 WHERE mac = ?1",
        args![key, now],
    )?;
    insert_event(
        c,
        now,
        Some(mac),
        EventKind::Updated,
        &format!("{}{how}", changed.join("; ")),
        1,
    )?;
    must_load(c, mac)
}

/// Deletes machine `mac` in the caller's transaction (its events stay; its node certificate
/// is revoked).
fn delete_in(c: &dyn Db, mac: Mac, now: i64, how: &str) -> Result<()> {
    let m = must_load(c, mac)?;
    revoke_node_cert(c, mac, now, "deleted")?;
    c.exec(
        "DELETE FROM machines WHERE mac = ?1",
        args![mac.to_string()],
    )?;
    insert_transition(
        c,
        now,
        mac,
        EventKind::Deleted,
        Some(m.state),
        None,
        how.trim_start(),
    )
}

/// Writes `group` (created, or replacing the one of its name: `existed`) with its
/// `group_changed` event, in the caller's transaction; the caller checked it.
fn write_group(c: &dyn Db, group: &Group, existed: bool, now: i64, how: &str) -> Result<()> {
    c.exec(
        "INSERT INTO groups (name, selector, profile, vars, labels, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (name) DO UPDATE SET selector = ?2, profile = ?3, vars = ?4,
         labels = ?5, updated_at = ?6",
        args![
            group.name,
            map_json(&group.selector),
            group.profile,
            map_json(&group.vars),
            map_json(&group.labels),
            now
        ],
    )?;
    let detail = format!(
        "group {} {}{how}: selector {{{}}}, profile {}, vars {}, labels {}",
        group.name,
        if existed { "updated" } else { "created" },
        key_values(&group.selector),
        group.profile.as_deref().unwrap_or("(none)"),
        group.vars.keys().cloned().collect::<Vec<_>>().join(","),
        group.labels.keys().cloned().collect::<Vec<_>>().join(","),
    );
    insert_event(c, now, None, EventKind::GroupChanged, &detail, 1)
}

/// Deletes group `name` with its event, in the caller's transaction; the caller checked
/// that every machine keeps a profile.
fn remove_group(c: &dyn Db, name: &str, now: i64, how: &str) -> Result<()> {
    c.exec("DELETE FROM groups WHERE name = ?1", args![name])?;
    insert_event(
        c,
        now,
        None,
        EventKind::GroupChanged,
        &format!("group {name} deleted{how}"),
        1,
    )
}

/// Writes `rule` (created, or replacing the one of its name, whose count it keeps) with its
/// `rule_changed` event, in the caller's transaction.
fn write_rule(c: &dyn Db, rule: &Rule, existed: bool, now: i64, how: &str) -> Result<()> {
    c.exec(
        "INSERT INTO rules (name, priority, enabled, mode, conditions, profile, hostname,
         labels, vars, max, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)
         ON CONFLICT (name) DO UPDATE SET priority = ?2, enabled = ?3, mode = ?4,
         conditions = ?5, profile = ?6, hostname = ?7, labels = ?8, vars = ?9, max = ?10,
         updated_at = ?11",
        args![
            rule.name,
            rule.priority,
            rule.enabled,
            rule.mode.as_str(),
            map_json(&rule.conditions),
            rule.profile,
            rule.hostname,
            map_json(&rule.labels),
            map_json(&rule.vars),
            rule.max.map(|m| m as i64),
            now
        ],
    )?;
    // A rule that proposes no more withdraws what it proposed.
    if !(rule.enabled && rule.mode == RuleMode::Propose) {
        c.exec(
            "UPDATE machines SET proposed_rule = NULL WHERE proposed_rule = ?1",
            args![&rule.name],
        )?;
    }
    let detail = format!(
        "rule {} {}{how}: priority {}, {}, {}, match {{{}}}, profile {}, hostname {}, max {}",
        rule.name,
        if existed { "updated" } else { "created" },
        rule.priority,
        if rule.enabled { "enabled" } else { "disabled" },
        rule.mode,
        key_values(&rule.conditions),
        rule.profile.as_deref().unwrap_or("(its groups')"),
        rule.hostname.as_deref().unwrap_or("(none)"),
        rule.max
            .map(|m| m.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    insert_event(c, now, None, EventKind::RuleChanged, &detail, 1)
}

/// Deletes rule `name` (withdrawing its proposals) with its event, in the caller's
/// transaction.
fn remove_rule(c: &dyn Db, name: &str, now: i64, how: &str) -> Result<()> {
    if c.exec("DELETE FROM rules WHERE name = ?1", args![name])? == 0 {
        return Err(StoreError::NoRule(name.to_string()));
    }
    c.exec(
        "UPDATE machines SET proposed_rule = NULL WHERE proposed_rule = ?1",
        args![name],
    )?;
    insert_event(
        c,
        now,
        None,
        EventKind::RuleChanged,
        &format!("rule {name} deleted{how}"),
        1,
    )
}

/// The machines an apply plans with: every one past discovery, and the discovered ones the
/// file names.
fn machines_for_apply(c: &dyn Db, desired: &plan::Desired) -> Result<HashMap<Mac, Machine>> {
    let declared = desired.machines.as_ref().map_or(0, Vec::len);
    let mut out: HashMap<Mac, Machine> = HashMap::with_capacity(declared);
    let rows = c.query(
        &format!(
            "SELECT {} FROM machines m WHERE m.state != 'discovered'",
            machine_cols(c)
        ),
        args![],
    )?;
    for row in &rows {
        let m = machine_from_row(row)?;
        out.insert(m.mac, m);
    }
    for new in desired.machines.iter().flatten() {
        if !out.contains_key(&new.mac) {
            if let Some(m) = load(c, new.mac)? {
                out.insert(m.mac, m);
            }
        }
    }
    Ok(out)
}

/// Plans `desired` against the inventory as it is in this transaction and makes the changes;
/// the result is checked whole (a tie, a machine without a profile, a reservation twice),
/// since a change may only be valid with the others. Returns what it did, and the rules
/// after it.
fn apply_desired(
    c: &dyn Db,
    desired: &plan::Desired,
    prune: bool,
    now: i64,
) -> Result<(Applied, RuleSet)> {
    const HOW: &str = " by apply";
    let stored_groups = load_groups(c)?;
    let stored_rules = load_rules(c)?;
    let machines = machines_for_apply(c, desired)?;
    let plan = plan::plan(
        &plan::Current {
            groups: &stored_groups,
            rules: &stored_rules,
            machines: &machines,
        },
        desired,
        prune,
    );
    let changes = &plan.changes;
    let find = |kind: &'static str| changes.iter().filter(move |ch| ch.kind == kind);
    // Groups first: the machines enrolled below take their profiles from them.
    let declared_groups: HashMap<&str, &Group> = desired
        .groups
        .iter()
        .flatten()
        .map(|g| (g.name.as_str(), g))
        .collect();
    for ch in find("group") {
        match ch.action {
            plan::Action::Delete => remove_group(c, &ch.name, now, HOW)?,
            action => write_group(
                c,
                declared_groups[ch.name.as_str()],
                action == plan::Action::Update,
                now,
                HOW,
            )?,
        }
    }
    let groups = GroupSet::new(load_groups(c)?);
    // Each written group against all the others (`conflict` passes over the group of the
    // candidate's own name); the ones not written were checked when they were.
    for ch in find("group").filter(|ch| ch.action != plan::Action::Delete) {
        let written = groups.get(&ch.name).ok_or_else(|| {
            StoreError::Database(format!("group {} was written but is not there", ch.name))
        })?;
        if let Some(why) = groups.conflict(written) {
            return Err(StoreError::GroupConflict(why));
        }
    }
    let declared_rules: HashMap<&str, &Rule> = desired
        .rules
        .iter()
        .flatten()
        .map(|r| (r.name.as_str(), r))
        .collect();
    for ch in find("rule") {
        match ch.action {
            plan::Action::Delete => remove_rule(c, &ch.name, now, HOW)?,
            action => write_rule(
                c,
                declared_rules[ch.name.as_str()],
                action == plan::Action::Update,
                now,
                HOW,
            )?,
        }
    }
    let declared_machines: HashMap<Mac, &NewMachine> = desired
        .machines
        .iter()
        .flatten()
        .map(|m| (m.mac, m))
        .collect();
    for ch in find("machine") {
        let mac: Mac = ch
            .name
            .parse()
            .map_err(|e| StoreError::Database(format!("planned MAC {}: {e}", ch.name)))?;
        match ch.action {
            plan::Action::Delete => delete_in(c, mac, now, HOW)?,
            plan::Action::Create | plan::Action::Enroll => {
                enroll_in(c, declared_machines[&mac], &groups, now, HOW)?;
            }
            plan::Action::Update => {
                let d = declared_machines[&mac];
                let m = &machines[&mac];
                let patch = MachinePatch {
                    profile: (m.profile != d.profile).then(|| d.profile.clone()),
                    hostname: (m.hostname != d.hostname).then(|| d.hostname.clone()),
                    vars: (m.vars != d.vars).then(|| d.vars.clone()),
                    labels: (m.labels != d.labels).then(|| d.labels.clone()),
                    uuid: d.uuid.clone().filter(|u| m.uuid.as_ref() != Some(u)),
                    serial: d.serial.clone().filter(|s| m.serial.as_ref() != Some(s)),
                };
                update_in(c, mac, &patch, now, HOW)?;
            }
        }
    }
    every_machine_keeps_a_profile(c, &groups, "this apply")?;
    reservations_unique(c)?;
    Ok((
        Applied {
            plan,
            groups: groups.groups().to_vec(),
        },
        RuleSet::new(load_rules(c)?),
    ))
}

/// Refuses an inventory in which two machines hold one DHCP reservation (`ip` variable).
fn reservations_unique(c: &dyn Db) -> Result<()> {
    let sql = match c.dialect() {
        Dialect::Sqlite => {
            "SELECT json_extract(vars, '$.ip') AS ip, group_concat(mac, ', ') FROM machines
             WHERE json_extract(vars, '$.ip') IS NOT NULL GROUP BY ip HAVING count(*) > 1
             ORDER BY ip LIMIT 1"
        }
        Dialect::Postgres => {
            "SELECT vars::json->>'ip' AS ip, string_agg(mac, ', ' ORDER BY mac) FROM machines
             WHERE vars::json->>'ip' IS NOT NULL GROUP BY 1 HAVING count(*) > 1
             ORDER BY 1 LIMIT 1"
        }
    };
    let twice = match c.opt(sql, args![])? {
        Some(r) => Some((r.get::<String>(0)?, r.get::<String>(1)?)),
        None => None,
    };
    match twice {
        None => Ok(()),
        Some((ip, macs)) => Err(StoreError::GroupConflict(format!(
            "variable ip {ip} would be the DHCP reservation of more than one machine ({macs}); give each its own"
        ))),
    }
}

fn must_load(c: &dyn Db, mac: Mac) -> Result<Machine> {
    load(c, mac)?.ok_or(StoreError::NotFound(mac))
}

fn map_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).expect("a map of strings always serialises")
}

/// Appends an event; the state columns are the machine's current state (an observation
/// changes none). `count` identical occurrences.
pub(super) fn insert_event(
    c: &dyn Db,
    now: i64,
    mac: Option<Mac>,
    kind: EventKind,
    detail: &str,
    count: i64,
) -> Result<()> {
    c.exec(
        "INSERT INTO events (at, mac, kind, from_state, to_state, detail, count)
         SELECT ?1, ?2, ?3, s.state, s.state, ?4, ?5
         FROM (SELECT (SELECT state FROM machines WHERE mac = ?2) AS state) s",
        args![
            now,
            mac.map(|m| m.to_string()),
            kind.as_str(),
            detail,
            count
        ],
    )?;
    Ok(())
}

/// Appends a transition's event.
fn insert_transition(
    c: &dyn Db,
    now: i64,
    mac: Mac,
    kind: EventKind,
    from: Option<State>,
    to: Option<State>,
    detail: &str,
) -> Result<()> {
    c.exec(
                "INSERT INTO events (at, mac, kind, from_state, to_state, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                args![
        now,
        mac.to_string(),
        kind.as_str(),
        from.map(State::as_str),
        to.map(State::as_str),
        detail
    ],
            )?;
    CHANGES.with(|c| {
        c.borrow_mut().push(Change {
            mac,
            from,
            to,
            kind,
            detail: detail.to_string(),
        })
    });
    Ok(())
}

/// What a transition needs to know of the machine it moves: who, and the state it was read in.
trait Current {
    fn mac(&self) -> Mac;
    fn state(&self) -> State;
}

impl Current for Machine {
    fn mac(&self) -> Mac {
        self.mac
    }
    fn state(&self) -> State {
        self.state
    }
}

/// The few columns most writes decide on, without the full machine's joins.
struct Head {
    mac: Mac,
    state: State,
    generation: i64,
    profile: Option<String>,
}

impl Current for Head {
    fn mac(&self) -> Mac {
        self.mac
    }
    fn state(&self) -> State {
        self.state
    }
}

fn head(c: &dyn Db, mac: Mac) -> Result<Head> {
    let row = c
        .opt(
            "SELECT state, generation, profile FROM machines WHERE mac = ?1",
            args![mac.to_string()],
        )?
        .ok_or(StoreError::NotFound(mac))?;
    Ok(Head {
        mac,
        state: row.parsed(0, "state")?,
        generation: row.get(1)?,
        profile: row.get(2)?,
    })
}

/// Moves `m` through `t` with a compare-and-set on its state, writing the state and its
/// event; returns the new state. A machine whose state changed since it was read is a
/// conflict, not a silent overwrite.
fn apply(c: &dyn Db, now: i64, m: &impl Current, t: &Transition, detail: &str) -> Result<State> {
    let (mac, state) = (m.mac(), m.state());
    let to = policy::transition(state, t)?;
    let (step, reason) = match t {
        Transition::Fail(f) => (Some(f.step.as_str()), Some(f.reason.as_str())),
        _ => (None, None),
    };
    let n = c.exec(
            "UPDATE machines SET state = ?2, updated_at = ?3, state_at = ?3, failed_step = ?4, failed_reason = ?5
             WHERE mac = ?1 AND state = ?6",
            args![
            mac.to_string(),
            to.as_str(),
            now,
            step,
            reason,
            state.as_str()
        ],
        )?;
    if n != 1 {
        return Err(StoreError::Conflict(mac));
    }
    insert_transition(c, now, mac, t.event_kind(), Some(state), Some(to), detail)?;
    Ok(to)
}

/// What a sighting found.
enum Sighted {
    /// The machine's row was updated.
    Updated,
    /// The machine exists (or was not looked up) and the sighting said nothing new within
    /// [`WINDOW_MS`].
    Unchanged,
    /// No such machine.
    Unknown,
}

/// Keeps what a boot request said, unless it says nothing new and the machine was seen
/// within [`WINDOW_MS`] (`last_seen` has that resolution: a machine that keeps asking does
/// not rewrite its row for every request). Tells a known machine from an unknown one only if
/// `must_know`.
fn record_sighting(
    c: &dyn Db,
    mac: Mac,
    s: &Sighting,
    now: i64,
    must_know: bool,
) -> Result<Sighted> {
    let key = mac.to_string();
    let n = c.exec(
            "UPDATE machines SET uuid = COALESCE(uuid, ?2), arch = COALESCE(?3, arch),
             platform = COALESCE(?4, platform), boot_ip = COALESCE(?5, boot_ip),
             last_seen = CASE WHEN COALESCE(last_seen, 0) > ?6 THEN last_seen ELSE ?6 END, serial = COALESCE(serial, ?8),
             vendor_class = COALESCE(?9, vendor_class), user_class = COALESCE(?10, user_class),
             dhcp_interface = COALESCE(?11, dhcp_interface), dhcp_relay = COALESCE(?12, dhcp_relay)
             WHERE mac = ?1 AND (last_seen IS NULL OR last_seen < ?6 - CAST(?7 AS BIGINT)
                OR (uuid IS NULL AND CAST(?2 AS TEXT) IS NOT NULL) OR (CAST(?3 AS TEXT) IS NOT NULL AND arch IS DISTINCT FROM ?3)
                OR (CAST(?4 AS TEXT) IS NOT NULL AND platform IS DISTINCT FROM ?4) OR (CAST(?5 AS TEXT) IS NOT NULL AND boot_ip IS DISTINCT FROM ?5)
                OR (serial IS NULL AND CAST(?8 AS TEXT) IS NOT NULL)
                OR (CAST(?9 AS TEXT) IS NOT NULL AND vendor_class IS DISTINCT FROM ?9)
                OR (CAST(?10 AS TEXT) IS NOT NULL AND user_class IS DISTINCT FROM ?10)
                OR (CAST(?11 AS TEXT) IS NOT NULL AND dhcp_interface IS DISTINCT FROM ?11)
                OR (CAST(?12 AS TEXT) IS NOT NULL AND dhcp_relay IS DISTINCT FROM ?12))",
            args![
            key,
            s.uuid,
            s.arch,
            s.platform,
            s.ip,
            now,
            WINDOW_MS,
            s.serial,
            s.dhcp.vendor_class,
            s.dhcp.user_class,
            s.dhcp.interface,
            s.dhcp.relay
        ],
        )?;
    if n == 1 {
        return Ok(Sighted::Updated);
    }
    if !must_know || c.exists("SELECT 1 FROM machines WHERE mac = ?1", args![key])? {
        return Ok(Sighted::Unchanged);
    }
    Ok(Sighted::Unknown)
}

/// Creates an unknown MAC as `discovered` with its event (no-op if it exists by now).
fn create_discovered(c: &dyn Db, mac: Mac, s: &Sighting, now: i64, what: &str) -> Result<()> {
    let n = c.exec(
        "INSERT INTO machines (mac, state, uuid, arch, platform, boot_ip, last_seen, created_at,
             updated_at, state_at, serial, vendor_class, user_class, dhcp_interface, dhcp_relay)
             VALUES (?1, 'discovered', ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (mac) DO NOTHING",
        args![
            mac.to_string(),
            s.uuid,
            s.arch,
            s.platform,
            s.ip,
            now,
            s.serial,
            s.dhcp.vendor_class,
            s.dhcp.user_class,
            s.dhcp.interface,
            s.dhcp.relay
        ],
    )?;
    if n == 1 {
        let detail = format!(
            "{what}{}{}",
            s.ip.as_deref()
                .map(|ip| format!(" from {ip}"))
                .unwrap_or_default(),
            s.arch
                .as_deref()
                .map(|a| format!(", arch {a}"))
                .unwrap_or_default()
        );
        insert_transition(
            c,
            now,
            mac,
            EventKind::Discovered,
            None,
            Some(State::Discovered),
            &detail,
        )?;
    }
    Ok(())
}

/// Machines `installing` whose token expired (or is gone) by `now`.
fn expired_installs(c: &dyn Db, now: i64) -> Result<Vec<String>> {
    c.column(
        "SELECT m.mac FROM machines m LEFT JOIN install_tokens t ON t.mac = m.mac
         WHERE m.state = 'installing' AND (t.mac IS NULL OR t.expires_at <= ?1)",
        args![now],
    )
}

/// The machine behind a live token and the address the token was issued to, or why the token
/// is not live.
fn token_machine(c: &dyn Db, token_hash: &str, now: i64) -> Result<(Machine, Option<String>)> {
    let Some(row) = c.opt(
        "SELECT mac, expires_at, burnt_at, generation, ip FROM install_tokens WHERE hash = ?1",
        args![token_hash],
    )?
    else {
        return Err(StoreError::Token(TokenProblem::Unknown, None));
    };
    let (mac, expires_at, burnt_at, generation, issued_to): (
        String,
        i64,
        Option<i64>,
        i64,
        Option<String>,
    ) = (
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    );
    let mac: Mac = mac
        .parse()
        .map_err(|_| StoreError::Token(TokenProblem::Unknown, None))?;
    if burnt_at.is_some() {
        return Err(StoreError::Token(TokenProblem::Used, Some(mac)));
    }
    if now >= expires_at {
        return Err(StoreError::Token(TokenProblem::Expired, Some(mac)));
    }
    let m = must_load(c, mac)?;
    // A token names one install generation; after a reprovision it is dead even if a row
    // somehow survived.
    if m.generation != generation || m.state != State::Installing {
        return Err(StoreError::Token(TokenProblem::Unknown, Some(mac)));
    }
    Ok((m, issued_to))
}

fn event_from_row(r: &SqlRow) -> Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        at: r.get(1)?,
        mac: r.parsed_opt(2, "events.mac")?,
        kind: r.parsed(3, "events.kind")?,
        from_state: r.parsed_opt(4, "events.from_state")?,
        to_state: r.parsed_opt(5, "events.to_state")?,
        detail: r.get(6)?,
        count: r.get(7)?,
    })
}

/// A page size: 0 (unset) means the largest page.
fn page(limit: usize) -> i64 {
    if limit == 0 {
        MAX_PAGE as i64
    } else {
        limit.min(MAX_PAGE) as i64
    }
}

#[async_trait::async_trait]
impl Inventory for SqlInventory {
    async fn machine(&self, mac: Mac) -> Result<Option<Machine>> {
        Ok(self
            .read(move |c| load(c, mac))
            .await?
            .map(|m| self.resolved(m)))
    }

    async fn boot_facts(&self, mac: Mac) -> Result<Option<BootFacts>> {
        // Cached only on SQLite, where this daemon makes every write: on PostgreSQL another
        // daemon may change the machine at any time.
        let cached = matches!(self.shared.readers, Readers::Sqlite { .. });
        let generation = match self.shared.facts.get(mac) {
            Ok(f) if cached => return Ok(f),
            Ok(_) => 0,
            Err(g) => g,
        };
        let facts = self
            .read(move |c| {
                let Some(r) = c.opt(
                    "SELECT m.state, m.profile, t.handed_over_at, m.uuid, m.serial, m.hostname,
                     m.arch, m.platform, m.labels, m.vendor_class, m.user_class, m.dhcp_interface,
                     m.dhcp_relay, m.proposed_rule FROM machines m
                     LEFT JOIN install_tokens t ON t.mac = m.mac WHERE m.mac = ?1",
                    args![mac.to_string()],
                )?
                else {
                    return Ok(None);
                };
                Ok(Some(BootFacts {
                    state: r.parsed(0, "state")?,
                    profile: r.get(1)?,
                    installer_done: r.get::<Option<i64>>(2)?.is_some(),
                    uuid: r.get(3)?,
                    serial: r.get(4)?,
                    hostname: r.get(5)?,
                    arch: r.get(6)?,
                    platform: r.get(7)?,
                    labels: r.json(8, "labels")?,
                    dhcp: DhcpSeen {
                        vendor_class: r.get(9)?,
                        user_class: r.get(10)?,
                        interface: r.get(11)?,
                        relay: r.get(12)?,
                    },
                    proposed_rule: r.get(13)?,
                }))
            })
            .await?;
        if cached {
            self.shared.facts.insert(generation, mac, facts.clone());
        }
        Ok(facts)
    }

    async fn machines(&self, q: MachineQuery) -> Result<Vec<Machine>> {
        self.read_blocking(move |c| {
            c.query(
                &format!(
                    "SELECT {} FROM machines m
                     WHERE (CAST(?1 AS TEXT) IS NULL OR m.state = ?1)
                     AND (CAST(?2 AS TEXT) IS NULL OR m.mac > ?2)
                     ORDER BY m.mac LIMIT ?3",
                    machine_cols(c)
                ),
                args![
                    q.state.map(State::as_str),
                    q.after.map(|m| m.to_string()),
                    page(q.limit)
                ],
            )?
            .iter()
            .map(machine_from_row)
            .collect::<Result<Vec<_>>>()
        })
        .await
        .map(|rows| rows.into_iter().map(|m| self.resolved(m)).collect())
    }

    async fn count_by_state(&self) -> Result<BTreeMap<State, u64>> {
        self.read_blocking(|c| {
            c.query(
                "SELECT state, count(*) FROM machines GROUP BY state",
                args![],
            )?
            .iter()
            .map(|r| Ok((r.parsed(0, "state")?, r.get::<i64>(1)? as u64)))
            .collect()
        })
        .await
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<Event>> {
        self.read_blocking(move |c| {
            // Two statements rather than one `ORDER BY CASE`: an order by an expression
            // cannot walk the id index backwards, and the newest events of a large log would
            // be sorted whole (110 ms at 300,000 events).
            // Likewise one machine's events get a statement of their own, so the planner
            // uses the (mac, id) index rather than walking every event.
            const COLS: &str = "id, at, mac, kind, from_state, to_state, detail, count";
            let dir = if q.tail { "DESC" } else { "ASC" };
            let rows = match q.mac {
                Some(mac) => c.query(
                    &format!(
                        "SELECT {COLS} FROM events WHERE mac = ?1 AND id > ?2
                         ORDER BY mac {dir}, id {dir} LIMIT ?3"
                    ),
                    args![mac.to_string(), q.after, page(q.limit)],
                )?,
                None => c.query(
                    &format!("SELECT {COLS} FROM events WHERE id > ?1 ORDER BY id {dir} LIMIT ?2"),
                    args![q.after, page(q.limit)],
                )?,
            };
            let mut rows: Vec<Event> = rows.iter().map(event_from_row).collect::<Result<_>>()?;
            if q.tail {
                rows.reverse();
            }
            Ok(rows)
        })
        .await
    }

    async fn machine_by_token(&self, token_hash: &str, from: &str, now: i64) -> Result<Machine> {
        let (hash, from) = (token_hash.to_string(), from.to_string());
        self.read(move |c| {
            let (m, issued_to) = token_machine(c, &hash, now)?;
            if issued_to.as_deref().is_some_and(|ip| ip != from) {
                return Err(StoreError::Token(TokenProblem::OtherAddress, Some(m.mac)));
            }
            Ok(m)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn reservations(&self) -> Result<Vec<(Mac, Ipv4Addr)>> {
        self.read(leases::reservations).await
    }

    async fn leases(&self, now: i64) -> Result<Vec<Lease>> {
        self.read(move |c| leases::live(c, now)).await
    }

    async fn node_cert(&self, mac: Mac) -> Result<Option<(String, String)>> {
        self.read(move |c| {
            c.opt(
                "SELECT cert_pem, fingerprint FROM node_certs WHERE mac = ?1",
                args![mac.to_string()],
            )?
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .transpose()
        })
        .await
    }

    async fn revoked_certs(&self) -> Result<Vec<RevokedCert>> {
        self.read(|c| {
            c.query(
                "SELECT mac, fingerprint, cert_pem, revoked_at, reason FROM revoked_certs
                 ORDER BY revoked_at, fingerprint",
                args![],
            )?
            .iter()
            .map(|r| {
                Ok(RevokedCert {
                    mac: r.parsed(0, "revoked_certs.mac")?,
                    fingerprint: r.get(1)?,
                    cert_pem: r.get(2)?,
                    revoked_at: r.get(3)?,
                    reason: r.get(4)?,
                })
            })
            .collect()
        })
        .await
    }

    fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            observations_dropped: get(&c.observations_dropped),
            observations_written: get(&c.observations_written),
            discovered: get(&c.discoveries),
            discovered_evicted: get(&c.discovered_evicted),
            discoveries_shed: get(&c.discoveries_shed),
            events_pruned: get(&c.events_pruned),
            commits: get(&c.commits),
            writes: get(&c.writes),
        }
    }

    fn rules(&self) -> Arc<RuleSet> {
        self.shared
            .rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn groups(&self) -> Arc<GroupSet> {
        self.shared
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn enroll(&self, new: NewMachine, now: i64) -> Result<Machine> {
        let groups = self.shared.groups.clone();
        self.write_touching(Touch::One(new.mac), move |c| {
            // Checked against the groups as committed (a group change is a write too, so
            // none can slip in between).
            let groups = groups.read().unwrap_or_else(|p| p.into_inner()).clone();
            enroll_in(c, &new, &groups, now, "")
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn update(&self, mac: Mac, patch: MachinePatch, now: i64) -> Result<Machine> {
        self.write_touching(Touch::One(mac), move |c| update_in(c, mac, &patch, now, ""))
            .await
            .map(|m| self.resolved(m))
    }

    async fn delete(&self, mac: Mac, now: i64) -> Result<()> {
        self.write_touching(Touch::One(mac), move |c| delete_in(c, mac, now, ""))
            .await
    }

    async fn discover(&self, mac: Mac, sighting: Sighting, now: i64) -> Result<Machine> {
        let counters = self.shared.counters.clone();
        self.write_touching(Touch::One(mac), move |c| {
            if let Sighted::Unknown = record_sighting(c, mac, &sighting, now, true)? {
                create_discovered(c, mac, &sighting, now, "first boot request")?;
                counters.discovered.store(true, Ordering::Relaxed);
            }
            must_load(c, mac)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn start_install(
        &self,
        mac: Mac,
        token_hash: String,
        expires_at: i64,
        sighting: Sighting,
        from: String,
        group: Option<(String, String)>,
        now: i64,
    ) -> Result<()> {
        self.write_touching(Touch::One(mac), move |c| {
            record_sighting(c, mac, &sighting, now, false)?;
            let mut m = head(c, mac)?;
            if let (State::Discovered, Some((profile, group))) = (m.state, &group) {
                // The decision to install came from a group: it enrolls the machine, the
                // same step an operator's enroll is, named in its event.
                let detail = format!("profile {profile} from group {group}");
                m.state = apply(c, now, &m, &Transition::Enroll, &detail)?;
                m.profile = Some(profile.clone());
            }
            if m.state == State::Installing {
                let live: Option<(Option<String>, i64)> = c
                    .opt(
                        "SELECT ip, expires_at FROM install_tokens
                         WHERE mac = ?1 AND generation = ?2 AND burnt_at IS NULL AND expires_at > ?3",
                        args![mac.to_string(), m.generation, now],
                    )?
                    .map(|r| Ok::<_, StoreError>((r.get(0)?, r.get(1)?)))
                    .transpose()?;
                if let Some((Some(holder), expires_at)) = live {
                    if holder != from {
                        return Err(StoreError::TokenHeld {
                            mac,
                            holder,
                            expires_at,
                        });
                    }
                }
            }
            let detail = format!(
                "profile {}, generation {}, token issued to {from}, expires {}",
                m.profile
                    .as_deref()
                    .or(group.as_ref().map(|(p, _)| p.as_str()))
                    .unwrap_or("?"),
                m.generation,
                super::fmt_time(expires_at)
            );
            if m.state == State::Installing {
                insert_event(c, now, Some(mac), EventKind::InstallRestarted, &detail, 1)?;
            } else {
                apply(c, now, &m, &Transition::StartInstall, &detail)?;
            }
            c.exec(
                "INSERT INTO install_tokens (mac, hash, generation, created_at, expires_at, ip)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (mac) DO UPDATE SET hash = ?2, generation = ?3, created_at = ?4,
                 expires_at = ?5, burnt_at = NULL, handed_over_at = NULL, ip = ?6",
                args![
                mac.to_string(),
                token_hash,
                m.generation,
                now,
                expires_at,
                from
            ],
            )?;
            Ok(())
        })
        .await
    }

    async fn config_served(
        &self,
        mac: Mac,
        detail: String,
        installer_done: Option<String>,
        now: i64,
    ) -> Result<()> {
        self.write_touching(Touch::One(mac), move |c| {
            insert_event(c, now, Some(mac), EventKind::ConfigServed, &detail, 1)?;
            if let Some(done) = installer_done {
                let n = c.exec(
                    "UPDATE install_tokens SET handed_over_at = ?2
                     WHERE mac = ?1 AND handed_over_at IS NULL AND burnt_at IS NULL",
                    args![mac.to_string(), now],
                )?;
                if n > 0 {
                    insert_event(c, now, Some(mac), EventKind::InstallerDone, &done, 1)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn phone_home(
        &self,
        token_hash: String,
        host_keys: Vec<(String, String)>,
        from_ip: String,
        any_address: BTreeSet<String>,
        detail: String,
        now: i64,
    ) -> Result<Machine> {
        let owner = self.token_owner(&token_hash, now).await?;
        let groups = self.shared.groups.clone();
        self.write_touching(Touch::One(owner), move |c| {
            let (m, issued_to) = token_machine(c, &token_hash, now)?;
            if m.mac != owner {
                return Err(StoreError::Conflict(owner));
            }
            let mut detail = detail;
            if let Some(issued_to) = issued_to.filter(|ip| *ip != from_ip) {
                let groups = groups.read().unwrap_or_else(|p| p.into_inner()).clone();
                let profile = m.clone().resolve(&groups).profile;
                if !profile.as_ref().is_some_and(|p| any_address.contains(p)) {
                    return Err(StoreError::Token(TokenProblem::OtherAddress, Some(m.mac)));
                }
                detail.push_str(&format!(
                    "; from {from_ip}, not {issued_to} where the install began (the profile allows phone_home_any_address)"
                ));
            }
            let mac = m.mac.to_string();
            // Burn first: of two phone-homes with one token, exactly one gets the row.
            let burnt = c.exec("UPDATE install_tokens SET burnt_at = ?2 WHERE hash = ?1 AND burnt_at IS NULL", args![token_hash, now])?;
            if burnt != 1 {
                return Err(StoreError::Token(TokenProblem::Used, Some(m.mac)));
            }
            c.exec("DELETE FROM host_keys WHERE mac = ?1", args![&mac])?;
            for (alg, key) in &host_keys {
                c.exec("INSERT INTO host_keys (mac, algorithm, key, added_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (mac, algorithm) DO UPDATE SET key = ?3, added_at = ?4", args![mac, alg, key, now])?;
            }
            apply(c, now, &m, &Transition::PhoneHome, &detail)?;
            // The registrar's SSH target: the address the installed OS spoke from.
            c.exec("UPDATE machines SET last_ip = ?2 WHERE mac = ?1", args![mac, from_ip])?;
            must_load(c, m.mac)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn move_token(
        &self,
        token_hash: String,
        from: String,
        why: String,
        now: i64,
    ) -> Result<Machine> {
        let owner = self.token_owner(&token_hash, now).await?;
        self.write_touching(Touch::Timeline(owner), move |c| {
            let (m, issued_to) = token_machine(c, &token_hash, now)?;
            if m.mac != owner {
                return Err(StoreError::Conflict(owner));
            }
            c.exec(
                "UPDATE install_tokens SET ip = ?2 WHERE hash = ?1",
                args![token_hash, from],
            )?;
            let detail = format!(
                "install token moved from {} to {from}: {why}",
                issued_to.as_deref().unwrap_or("(no address)")
            );
            insert_event(c, now, Some(m.mac), EventKind::TokenMoved, &detail, 1)?;
            Ok(m)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn reprovision(&self, mac: Mac, now: i64) -> Result<Machine> {
        self.write_touching(Touch::One(mac), move |c| {
            let m = must_load(c, mac)?;
            let detail = format!("generation {}", m.generation + 1);
            apply(c, now, &m, &Transition::Reprovision, &detail)?;
            let key = mac.to_string();
            c.exec(
                "UPDATE machines SET generation = generation + 1 WHERE mac = ?1",
                args![&key],
            )?;
            revoke_node_cert(c, mac, now, "reprovisioned")?;
            for table in [
                "install_tokens",
                "host_keys",
                "register_steps",
                "node_certs",
            ] {
                c.exec(&format!("DELETE FROM {table} WHERE mac = ?1"), args![&key])?;
            }
            must_load(c, mac)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn transition(
        &self,
        mac: Mac,
        t: Transition,
        detail: String,
        now: i64,
    ) -> Result<Machine> {
        self.write_touching(Touch::One(mac), move |c| {
            let m = must_load(c, mac)?;
            apply(c, now, &m, &t, &detail)?;
            must_load(c, mac)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn start_registration(&self, mac: Mac, detail: String, now: i64) -> Result<Machine> {
        self.write_touching(Touch::One(mac), move |c| {
            let m = must_load(c, mac)?;
            apply(c, now, &m, &Transition::StartRegistration, &detail)?;
            // A fresh run: an old run's claim (its daemon died holding it) is moot.
            c.exec(
                "DELETE FROM register_claims WHERE mac = ?1",
                args![mac.to_string()],
            )?;
            c.exec(
                "DELETE FROM register_steps WHERE mac = ?1",
                args![mac.to_string()],
            )?;
            must_load(c, mac)
        })
        .await
        .map(|m| self.resolved(m))
    }

    async fn record_step(&self, mac: Mac, step: StepRecord, detail: String) -> Result<()> {
        self.write_touching(Touch::Timeline(mac), move |c| {
            let m = must_load(c, mac)?;
            if m.state != State::Registering {
                // Illegal from every other state: the error names the state and the moves.
                policy::transition(m.state, &Transition::FinishRegistration)?;
            }
            c.exec(
                "INSERT INTO register_steps (mac, seq, name, status, exit_code, output, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (mac, name) DO UPDATE SET seq = ?2, status = ?4, exit_code = ?5,
                 output = ?6, at = ?7",
                args![
                    mac.to_string(),
                    step.seq,
                    step.name,
                    step.status.as_str(),
                    step.exit_code,
                    step.output,
                    step.at
                ],
            )?;
            let kind = match step.status {
                StepStatus::Ok => EventKind::RegisterStep,
                StepStatus::Failed => EventKind::RegisterStepFailed,
            };
            insert_event(c, step.at, Some(mac), kind, &detail, 1)
        })
        .await
    }

    async fn claim_registration(
        &self,
        mac: Mac,
        daemon: String,
        until: i64,
        now: i64,
    ) -> Result<bool> {
        self.write(move |c| {
            // The row's own condition decides, not a read made earlier: of two daemons
            // claiming at once, one upsert goes through.
            Ok(c.exec(
                "INSERT INTO register_claims (mac, daemon, until)
                 SELECT mac, ?2, ?3 FROM machines WHERE mac = ?1 AND state = 'registering'
                 ON CONFLICT (mac) DO UPDATE SET daemon = ?2, until = ?3
                 WHERE register_claims.daemon = ?2 OR register_claims.until <= ?4",
                args![mac.to_string(), daemon, until, now],
            )? == 1)
        })
        .await
    }

    async fn release_registration(&self, mac: Mac, daemon: String) -> Result<()> {
        self.write(move |c| {
            c.exec(
                "DELETE FROM register_claims WHERE mac = ?1 AND daemon = ?2",
                args![mac.to_string(), daemon],
            )?;
            Ok(())
        })
        .await
    }

    async fn unclaimed_registrations(&self, now: i64) -> Result<Vec<Mac>> {
        self.read(move |c| {
            c.query(
                "SELECT m.mac FROM machines m LEFT JOIN register_claims r ON r.mac = m.mac
                 WHERE m.state = 'registering' AND (r.mac IS NULL OR r.until <= ?1)
                 ORDER BY m.mac",
                args![now],
            )?
            .iter()
            .map(|r| r.parsed(0, "mac"))
            .collect()
        })
        .await
    }

    async fn save_node_cert(
        &self,
        mac: Mac,
        cert_pem: String,
        fingerprint: String,
        subject: String,
        now: i64,
    ) -> Result<()> {
        self.write(move |c| {
            // A certificate for another key (or name) takes the old one's place: the old one
            // must not stay valid beside it.
            let old: Option<String> = c
                .opt(
                    "SELECT fingerprint FROM node_certs WHERE mac = ?1",
                    args![mac.to_string()],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            if old.is_some_and(|f| f != fingerprint) {
                revoke_node_cert(c, mac, now, "superseded")?;
            }
            c.exec(
                "INSERT INTO node_certs (mac, cert_pem, fingerprint, subject, signed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (mac) DO UPDATE SET cert_pem = ?2, fingerprint = ?3,
                 subject = ?4, signed_at = ?5",
                args![mac.to_string(), cert_pem, fingerprint, subject, now],
            )?;
            Ok(())
        })
        .await
    }

    async fn put_group(&self, group: Group, replace: bool, now: i64) -> Result<bool> {
        self.write_publishing(Touch::Nothing, move |c| {
            let mut all = load_groups(c)?;
            let existed = all.iter().any(|g| g.name == group.name);
            if existed && !replace {
                return Err(StoreError::GroupConflict(format!(
                    "group {} already exists; change it with `provision groups update {}`",
                    group.name, group.name
                )));
            }
            if let Some(why) = GroupSet::new(all.clone()).conflict(&group) {
                return Err(StoreError::GroupConflict(why));
            }
            all.retain(|g| g.name != group.name);
            all.push(group.clone());
            let next = GroupSet::new(all);
            every_machine_keeps_a_profile(c, &next, &format!("changing group {}", group.name))?;
            write_group(c, &group, existed, now, "")?;
            Ok((!existed, Publish::Groups(next)))
        })
        .await
    }

    async fn delete_group(&self, name: String, now: i64) -> Result<()> {
        self.write_publishing(Touch::Nothing, move |c| {
            let mut all = load_groups(c)?;
            if !all.iter().any(|g| g.name == name) {
                return Err(StoreError::NoGroup(name));
            }
            all.retain(|g| g.name != name);
            let next = GroupSet::new(all);
            every_machine_keeps_a_profile(c, &next, &format!("deleting group {name}"))?;
            remove_group(c, &name, now, "")?;
            Ok(((), Publish::Groups(next)))
        })
        .await
    }

    async fn put_rule(&self, rule: Rule, replace: bool, now: i64) -> Result<bool> {
        self.write_publishing(Touch::All, move |c| {
            let existed = c.exists("SELECT 1 FROM rules WHERE name = ?1", args![&rule.name])?;
            if existed && !replace {
                return Err(StoreError::RuleRefused(format!(
                    "rule {} already exists; change it with `provision rules update {}`",
                    rule.name, rule.name
                )));
            }
            write_rule(c, &rule, existed, now, "")?;
            Ok((!existed, Publish::Rules(RuleSet::new(load_rules(c)?))))
        })
        .await
    }

    async fn delete_rule(&self, name: String, now: i64) -> Result<()> {
        self.write_publishing(Touch::All, move |c| {
            remove_rule(c, &name, now, "")?;
            Ok(((), Publish::Rules(RuleSet::new(load_rules(c)?))))
        })
        .await
    }

    async fn apply_inventory(
        &self,
        desired: plan::Desired,
        prune: bool,
        run: ApplyRun,
        now: i64,
    ) -> Result<Applied> {
        let touch = match run {
            ApplyRun::DryRun => Touch::Nothing,
            ApplyRun::Apply { .. } => Touch::All,
        };
        self.write_publishing(touch, move |c| {
            let applying = |c: &dyn Db| apply_desired(c, &desired, prune, now);
            match run {
                ApplyRun::DryRun => {
                    let (applied, _) = rolled_back(c, applying)?;
                    Ok((applied, Publish::Nothing))
                }
                ApplyRun::Apply { expect } => {
                    let (applied, rules) = applying(c)?;
                    if expect.as_ref().is_some_and(|e| *e != applied.plan) {
                        return Err(StoreError::Changed(
                            "the inventory changed while this apply was being checked (another \
                             apply, or an operator's change); run it again"
                                .into(),
                        ));
                    }
                    let groups = GroupSet::new(applied.groups.clone());
                    Ok((applied, Publish::Both(groups, rules)))
                }
            }
        })
        .await
    }

    async fn apply_rule(
        &self,
        mac: Mac,
        rule: String,
        sighting: Sighting,
        confirm: bool,
        now: i64,
    ) -> Result<RuleOutcome> {
        let groups = self.shared.groups.clone();
        let out = self
            .write_publishing(Touch::One(mac), move |c| {
                // A boot request's; an operator's confirmation is no sighting of the machine.
                if sighting != Sighting::default() {
                    record_sighting(c, mac, &sighting, now, false)?;
                }
                let skip = |why: String| Ok((RuleOutcome::Skipped(why), Publish::Nothing));
                let m = must_load(c, mac)?;
                if m.state != State::Discovered {
                    return skip(format!("machine {mac} is {}, not discovered", m.state));
                }
                let Some(r) = load_rules(c)?.into_iter().find(|r| r.name == rule) else {
                    return skip(format!("rule {rule} no longer exists"));
                };
                if !r.enabled {
                    return skip(format!("rule {rule} is disabled"));
                }
                let text = mac.to_string();
                if !r.matches(&m.reported(&text)) {
                    return skip(format!("rule {rule} no longer matches machine {mac}"));
                }
                if r.mode == RuleMode::Propose && !confirm {
                    if m.proposed_rule.as_deref() != Some(rule.as_str()) {
                        c.exec(
                            "UPDATE machines SET proposed_rule = ?2 WHERE mac = ?1",
                            args![text, rule],
                        )?;
                        insert_event(
                            c,
                            now,
                            Some(mac),
                            EventKind::RuleProposed,
                            &format!(
                                "rule {rule} matches; `provision machines confirm {mac}` enrolls it"
                            ),
                            1,
                        )?;
                    }
                    return Ok((RuleOutcome::Proposed, Publish::Nothing));
                }
                // The next index, only while the count is below the max: of two machines
                // racing for the last place, one gets it.
                let index: Option<i64> = c
                    .opt(
                        "UPDATE rules SET used = used + 1 WHERE name = ?1 AND enabled = 1
                         AND (max IS NULL OR used < max) RETURNING used",
                        args![&rule],
                    )?
                    .map(|r| r.get(0))
                    .transpose()?;
                let Some(index) = index else {
                    let why = format!(
                        "rule {rule} matches but is full: it has enrolled {} of {} machines",
                        r.used,
                        r.max.unwrap_or_default()
                    );
                    return Ok((RuleOutcome::Full(why), Publish::Nothing));
                };
                let index = index as u64;
                let hostname = r
                    .hostname_for(index, &m.reported(&text))
                    .map_err(|e| StoreError::RuleRefused(format!("rule {rule}: {e}")))?;
                if let Some(h) = &hostname {
                    crate::validate::hostname(h).map_err(|e| {
                        StoreError::RuleRefused(format!("rule {rule}: hostname {h:?}: {}", e.0))
                    })?;
                }
                let mut labels = r.labels.clone();
                labels.extend(m.labels.clone());
                let mut vars = r.vars.clone();
                vars.extend(m.vars.clone());
                c.exec(
                    "UPDATE machines SET profile = COALESCE(profile, ?2),
                     hostname = COALESCE(hostname, ?3), labels = ?4, vars = ?5,
                     proposed_rule = NULL, updated_at = ?6 WHERE mac = ?1",
                    args![
                        text,
                        r.profile,
                        hostname,
                        map_json(&labels),
                        map_json(&vars),
                        now
                    ],
                )?;
                let groups = groups.read().unwrap_or_else(|p| p.into_inner()).clone();
                let after = must_load(c, mac)?.resolve(&groups);
                let Some(profile) = after.profile.as_deref() else {
                    return Err(StoreError::RuleRefused(format!(
                        "rule {rule} gives no profile, and no group gives machine {mac} one"
                    )));
                };
                let detail = format!(
                    "profile {profile}{} by rule {rule} (machine {index}{}){}",
                    after
                        .inherited
                        .profile
                        .as_deref()
                        .map(|g| format!(" from group {g}"))
                        .unwrap_or_default(),
                    r.max.map(|m| format!(" of {m}")).unwrap_or_default(),
                    after
                        .hostname
                        .as_deref()
                        .map(|h| format!(", hostname {h}"))
                        .unwrap_or_default(),
                );
                apply(c, now, &m, &Transition::Enroll, &detail)?;
                let m = must_load(c, mac)?;
                Ok((
                    RuleOutcome::Enrolled(Box::new(m)),
                    Publish::Rules(RuleSet::new(load_rules(c)?)),
                ))
            })
            .await?;
        Ok(match out {
            RuleOutcome::Enrolled(m) => RuleOutcome::Enrolled(Box::new(self.resolved(*m))),
            other => other,
        })
    }

    async fn expire_installs(&self, now: i64) -> Result<Vec<Mac>> {
        // Read first: the sweeper runs every 30 s and nearly always finds nothing, and a
        // durable write that may touch any machine first writes every repeat counted in
        // memory (half a second after a burst of local boots).
        if self
            .read(move |c| expired_installs(c, now))
            .await?
            .is_empty()
        {
            return Ok(Vec::new());
        }
        self.write_touching(Touch::All, move |c| {
            let macs = expired_installs(c, now)?;
            let failure = Failure::new(
                "install",
                "the install token expired before the machine phoned home",
            );
            let detail = failure.to_string();
            let fail = Transition::Fail(failure);
            let mut out = Vec::new();
            for mac in macs {
                let Ok(mac) = mac.parse::<Mac>() else {
                    continue;
                };
                let m = must_load(c, mac)?;
                if m.state != State::Installing {
                    // Another daemon's sweeper (or a phone-home) moved it after the query
                    // above: on PostgreSQL each statement sees what committed before it.
                    continue;
                }
                match apply(c, now, &m, &fail, &detail) {
                    Ok(_) => out.push(mac),
                    // Another daemon moved it first (phone-home won the race): skip it.
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_event(
        &self,
        mac: Option<Mac>,
        kind: EventKind,
        detail: String,
        now: i64,
    ) -> Result<()> {
        let touch = mac.map_or(Touch::Nothing, Touch::Timeline);
        self.write_touching(touch, move |c| insert_event(c, now, mac, kind, &detail, 1))
            .await
    }

    async fn lease_offer(&self, req: OfferRequest) -> Result<Option<Ipv4Addr>> {
        self.write_touching(Touch::Timeline(req.mac), move |c| leases::offer(c, &req))
            .await
    }

    async fn lease_bind(&self, req: BindRequest) -> Result<bool> {
        self.write_touching(Touch::Timeline(req.mac), move |c| leases::bind(c, &req))
            .await
    }

    async fn lease_release(&self, mac: Mac, ip: Option<Ipv4Addr>) -> Result<()> {
        self.write(move |c| leases::release(c, mac, ip)).await
    }

    async fn lease_decline(&self, mac: Mac, ip: Ipv4Addr, until: i64, now: i64) -> Result<bool> {
        self.write_touching(Touch::Timeline(mac), move |c| {
            leases::decline(c, mac, ip, until, now)
        })
        .await
    }

    fn observe(&self, o: Observation) {
        let (dropped, nudge) = self.shared.queue.push(o);
        if dropped {
            self.shared
                .counters
                .observations_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        if nudge {
            let _ = self.send(Msg::Nudge);
        }
    }

    async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Flush(tx))?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    async fn search_machines(&self, q: MachineSearch) -> Result<MachinePage> {
        self.read_blocking(move |c| {
            let (filter, args) = search_filter(&q, c.dialect());
            let dir = if q.descending { "DESC" } else { "ASC" };
            // The row's key: SQLite's rowid (an integer compare), PostgreSQL's MAC. `+` is
            // SQLite's way to make a column an expression (see `one_pass` below).
            let (id, plus) = match c.dialect() {
                Dialect::Sqlite => ("m.rowid", "+"),
                Dialect::Postgres => ("m.mac", ""),
            };
            // NULLs last in both directions: a machine never seen is not the most recent.
            // `p` prefixes each column; `+` makes it an expression, see `one_pass` below.
            let order = |p: &str| match q.sort {
                SortKey::Mac => format!("{p}m.mac {dir}"),
                SortKey::Hostname => {
                    format!("m.hostname IS NULL, {p}m.hostname {dir}, {p}m.mac {dir}")
                }
                SortKey::State => format!("{p}m.state {dir}, {p}m.mac {dir}"),
                // NULLS LAST said, as PostgreSQL's DESC puts them first (SQLite's, last); ties
                // by the key (a sort of every machine, with no index: last_seen moves with
                // every sighting, and an index would cost the observation batches on the boot
                // path).
                SortKey::LastSeen if q.descending => {
                    format!("{p}m.last_seen DESC NULLS LAST, {p}{id} DESC")
                }
                SortKey::LastSeen => {
                    format!("m.last_seen IS NULL, {p}m.last_seen ASC, {p}{id} ASC")
                }
                SortKey::Updated => format!("{p}m.updated_at {dir}, {p}m.mac {dir}"),
                SortKey::InState => format!("{p}m.state_at {dir}, {p}m.mac {dir}"),
            };
            // A text or label search tests every machine, and usually finds few: one pass
            // over the table collects every match, sorted afterwards (`+` keeps the planner
            // from walking the MAC index instead, a row lookup per machine: 10× slower),
            // giving the total and the page together. Any other filter is an index lookup or
            // matches densely, where counting and then reading only the page (which stops
            // after it) is cheaper.
            let one_pass = matches!(
                q.term,
                Some(SearchTerm::Text { .. } | SearchTerm::Label(..))
            );
            let args: Vec<Arg<'_>> = args.into_iter().map(Arg::from).collect();
            let (total, ids): (u64, Vec<Val>) = if one_pass {
                let all: Vec<Val> = c.column_once(
                    &format!(
                        "SELECT {id} FROM machines m WHERE {filter} ORDER BY {}",
                        order(plus)
                    ),
                    &args,
                )?;
                let ids = all
                    .iter()
                    .skip(q.offset)
                    .take(page(q.limit) as usize)
                    .cloned()
                    .collect();
                (all.len() as u64, ids)
            } else {
                let total: i64 = c
                    .query(
                        &format!("SELECT count(*) FROM machines m WHERE {filter}"),
                        &args,
                    )?
                    .first()
                    .map_or(Ok(0), |r| r.get(0))?;
                // The page is chosen reading only the filter's and the order's columns.
                let mut paged = args.clone();
                paged.push(Arg::Int(page(q.limit)));
                paged.push(Arg::Int(q.offset as i64));
                let ids = c.column(
                    &format!(
                        "SELECT {id} FROM machines m WHERE {filter} ORDER BY {}
                         LIMIT ?{} OFFSET ?{}",
                        order(""),
                        args.len() + 1,
                        args.len() + 2,
                    ),
                    &paged,
                )?;
                (total as u64, ids)
            };
            if ids.is_empty() {
                return Ok(MachinePage {
                    total,
                    machines: Vec::new(),
                });
            }
            // Only the page's rows pay for the full machine (keys, steps, certificate).
            let list = (1..=ids.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(",");
            let ids: Vec<Arg<'_>> = ids.iter().map(Arg::from).collect();
            let machines = c
                .query_once(
                    &format!(
                        "SELECT {} FROM machines m WHERE {id} IN ({list}) ORDER BY {}",
                        machine_cols(c),
                        order("")
                    ),
                    &ids,
                )?
                .iter()
                .map(machine_from_row)
                .collect::<Result<Vec<_>>>()?;
            Ok(MachinePage { total, machines })
        })
        .await
        .map(|mut p| {
            p.machines = std::mem::take(&mut p.machines)
                .into_iter()
                .map(|m| self.resolved(m))
                .collect();
            p
        })
    }

    async fn install_token(&self, mac: Mac) -> Result<Option<TokenInfo>> {
        self.read(move |c| {
            c.opt(
                "SELECT generation, created_at, expires_at, burnt_at, ip
                 FROM install_tokens WHERE mac = ?1",
                args![mac.to_string()],
            )?
            .map(|r| {
                Ok(TokenInfo {
                    generation: r.get(0)?,
                    created_at: r.get(1)?,
                    expires_at: r.get(2)?,
                    burnt_at: r.get(3)?,
                    ip: r.get(4)?,
                })
            })
            .transpose()
        })
        .await
    }

    fn event_feed(&self) -> tokio::sync::watch::Receiver<i64> {
        self.shared.events.subscribe()
    }
}

/// `term` as a LIKE pattern matching it anywhere, with LIKE's own characters escaped (`\`).
fn like_anywhere(term: &str) -> String {
    let mut p = String::with_capacity(term.len() + 2);
    p.push('%');
    for ch in term.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(ch);
    }
    p.push('%');
    p
}

/// The WHERE clause of a machine search and its parameters, in order. Values are always
/// parameters; only fixed SQL is formatted in.
fn search_filter(q: &MachineSearch, dialect: Dialect) -> (String, Vec<String>) {
    // The labels' pairs, as each engine walks a JSON object.
    let pairs = match dialect {
        Dialect::Sqlite => "json_each(m.labels)",
        Dialect::Postgres => "json_each_text(m.labels::json)",
    };
    let mut parts = vec!["TRUE".to_string()];
    let mut args: Vec<String> = Vec::new();
    if let Some(st) = q.state {
        parts.push("m.state = ?".into());
        args.push(st.as_str().into());
    }
    match &q.term {
        None => {}
        Some(SearchTerm::Mac(m)) => {
            parts.push("m.mac = ?".into());
            args.push(m.to_string());
        }
        Some(SearchTerm::Ip(ip)) => {
            parts.push("(m.last_ip = ? OR m.boot_ip = ?)".into());
            args.push(ip.clone());
            args.push(ip.clone());
        }
        // The labels column is a JSON object written by serde_json: a cheap substring test
        // of the JSON-encoded key (and value) drops nearly every row before the exact test
        // parses the few left.
        Some(SearchTerm::Label(k, None)) => {
            let key = serde_json::to_string(k).unwrap_or_default();
            parts.push(format!(
                "m.labels LIKE ? ESCAPE '\\'
                 AND EXISTS (SELECT 1 FROM {pairs} WHERE key = ?)"
            ));
            args.push(like_anywhere(&format!("{key}:")));
            args.push(k.clone());
        }
        Some(SearchTerm::Label(k, Some(v))) => {
            let pair = format!(
                "{}:{}",
                serde_json::to_string(k).unwrap_or_default(),
                serde_json::to_string(v).unwrap_or_default()
            );
            parts.push(format!(
                "m.labels LIKE ? ESCAPE '\\'
                 AND EXISTS (SELECT 1 FROM {pairs} WHERE key = ? AND value = ?)"
            ));
            args.push(like_anywhere(&pair));
            args.push(k.clone());
            args.push(v.clone());
        }
        Some(SearchTerm::Text { text, mac_hex }) => {
            parts.push("pv_text_match(?, ?, m.mac, m.hostname, m.profile, m.labels)".into());
            args.push(text.to_ascii_lowercase());
            args.push(mac_hex.clone().unwrap_or_default());
        }
    }
    (parts.join(" AND "), args)
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[test]
    fn a_state_change_is_logged_only_once_committed_and_never_after_a_rollback() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, at INTEGER, mac TEXT, kind TEXT,
             from_state TEXT, to_state TEXT, detail TEXT)",
        )
        .unwrap();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let change = |c: &dyn Db| {
            insert_transition(
                c,
                1,
                mac,
                EventKind::Enrolled,
                None,
                Some(State::Enrolled),
                "x",
            )
        };
        let pending = || CHANGES.with(|v| v.borrow().len());
        // A job that fails after its change: rolled back, and its change is forgotten.
        let failed: Result<()> = in_savepoint(&c, |c| {
            change(c)?;
            Err(StoreError::Conflict(mac))
        });
        assert!(failed.is_err());
        assert_eq!(pending(), 0);
        in_savepoint(&c, change).unwrap();
        assert_eq!(pending(), 1);
        // A failed commit drops them too; a good one logs and clears.
        log_changes(false);
        assert_eq!(pending(), 0);
        in_savepoint(&c, change).unwrap();
        log_changes(true);
        assert_eq!(pending(), 0);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_nudges_once() {
        let q = ObservationQueue {
            items: Mutex::new(VecDeque::new()),
            cap: 4,
            nudged: AtomicBool::new(false),
        };
        let ev = |i: i64| Observation::Event {
            mac: None,
            kind: EventKind::IpxeServed,
            detail: format!("n{i}"),
            at: i,
        };
        let results: Vec<(bool, bool)> = (0..6).map(|i| q.push(ev(i))).collect();
        assert_eq!(
            results,
            [
                (false, false),
                (false, true),
                (false, false),
                (false, false),
                (true, false),
                (true, false)
            ]
        );
        let left: Vec<Observation> = q.take().into_iter().collect();
        assert_eq!(left, (2..6).map(ev).collect::<Vec<_>>());
        assert!(!q.nudged.load(Ordering::Relaxed), "taking resets the nudge");
        // What a batch could not write goes back before what came since, within the bound.
        q.push(ev(6));
        q.push(ev(7));
        let dropped = q.put_back(left.into_iter().collect());
        assert_eq!(dropped, 2);
        let back: Vec<Observation> = q.take().into_iter().collect();
        assert_eq!(back, (4..8).map(ev).collect::<Vec<_>>());
    }
}
