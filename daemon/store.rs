//! The durable state in one redb file: master keys, providers, grants, price overrides, the
//! ledger and its running totals. The only module that knows redb.
//!
//! Invariants:
//! - All writes go through one writer thread, which commits every job waiting in its queue in
//!   one transaction (`Durability::Immediate`: fsync before anyone is told it is done). So one
//!   commit serves every request that settled meanwhile, and no async thread waits on a disk.
//! - A ledger entry and its grant's running total are written in the same transaction, so the
//!   totals always equal the sum of the entries.
//! - A failed disk is an outage, not a loss: after an I/O error (a full disk) the writer keeps
//!   every write that records what already happened (settlements, released holds), refuses the
//!   rest at once (new holds, control changes), reopens the database with backoff until a write
//!   commits again, and then commits what it kept. Every commit numbers itself, so a commit that
//!   landed although it reported an error is never applied twice.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::oneshot;

use crate::grants::{Grant, GrantId};
use crate::ledger::{LedgerEntry, Totals};
use crate::pricing::{Price, Provenance};
use crate::providers::Provider;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const MASTER_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("master_keys");
/// Provider name → the key that manages the provider's keys (OpenRouter's management key).
const MANAGEMENT_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("management_keys");
const PROVIDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("providers");
const GRANTS: TableDefinition<u64, &[u8]> = TableDefinition::new("grants");
const PRICES: TableDefinition<&str, &[u8]> = TableDefinition::new("prices");
/// Model → where its row in PRICES came from (`price set`, `price import FILE`) and when.
const PRICE_ORIGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("price_origins");
/// The fetched price list (`capitctl price update`), replaced whole each time; its origin is
/// kept in META under `PRICE_LIST_ORIGIN`.
const PRICE_LIST: TableDefinition<&str, &[u8]> = TableDefinition::new("price_list");
const PRICE_LIST_ORIGIN: &str = "price_list_origin";
/// (grant id, ledger sequence number) → entry. Sequence numbers are global and never reused.
const LEDGER: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("ledger");
/// (grant id, window start in Unix seconds; 0 for a total cap) → running totals.
const TOTALS: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("totals");
/// The window start under which a grant's totals over its whole life are kept (a total cap's
/// own window, which starts at 0, is the same sum and is used as is).
pub const LIFETIME: i64 = 0;

/// Request id → the hold of an admitted request not yet settled. What is left here after a
/// crash was in flight, and is charged at its amount on the next start.
const RESERVATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("reservations");

/// Grant id → its admission lease: what it has durably set aside for requests in flight (a
/// decimal's 16 bytes). What is left here after a crash is charged as `interrupted` on the next
/// start. Older versions kept one hold per request in RESERVATIONS instead; those are read too.
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
/// Pool name → this daemon's membership of a team pool: the database's URL and password (a
/// secret, like a master key).
const TEAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("teams");

const SCHEMA_VERSION: &[u8] = b"1";
const NEXT_SEQ: &str = "next_ledger_seq";
/// A random id of this database, made once, that tells this capit's provider keys from another
/// installation's on the same provider account.
const INSTALLATION_ID: &str = "installation_id";
/// The number of the last committed transaction, written by every commit: after an error whose
/// outcome is unknown, the writer reads it to tell whether its batch landed.
const BATCH_SEQ: &str = "batch_seq";

/// The first wait between attempts to write again during an outage, doubled up to the longest.
const PROBE_FIRST: Duration = Duration::from_millis(50);
const PROBE_LONGEST: Duration = Duration::from_secs(2);
/// How often a lasting outage is logged again.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);

/// At most this many jobs share one commit, so one batch cannot grow without bound.
const MAX_BATCH: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Redb(#[from] redb::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the database at {0} is in use by another capitd")]
    InUse(PathBuf),
    #[error("database record {what} is unreadable: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("database schema version {0:?} is not one this capitd knows")]
    Schema(String),
    #[error("the store is closed")]
    Closed,
    /// The database cannot be written (a full or failing disk); the writer is probing for its
    /// return. Carries the error that began the outage.
    #[error("the database cannot be written (disk full?): {0}")]
    Unavailable(String),
    #[error("{0}")]
    Batch(Arc<StoreError>),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Redb(e.into()) }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// A master key as stored: sealed under the keyring's data key, or else as text (the database
/// file is 0600 in a 0700 directory). Exactly one of the two is set.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<zeroize::Zeroizing<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<crate::keyring::SealedKey>,
    pub added_at: i64,
}

/// A hold as stored, enough to charge it if its request never settles.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredReservation {
    pub grant: GrantId,
    pub amount: rust_decimal::Decimal,
    pub model: String,
    pub api: String,
    pub at_ms: i64,
}

/// A team membership as stored. The database password is kept like a master key: sealed
/// under the keyring's data key where there is one (named [`StoredTeam::seal_name`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredTeam {
    pub pool: String,
    /// The database URL, without a password.
    pub url: String,
    pub password: Option<StoredKey>,
    pub joined_at: i64,
}

impl StoredTeam {
    /// The name the password is sealed under, apart from every provider's key.
    pub fn seal_name(pool: &str) -> String {
        format!("team pool {pool} (database password)")
    }
}

/// Everything the daemon holds in memory, read once at start.
pub struct Snapshot {
    pub keys: Vec<(String, StoredKey)>,
    pub management_keys: Vec<(String, StoredKey)>,
    pub installation_id: String,
    pub providers: Vec<Provider>,
    pub grants: Vec<Grant>,
    pub prices: Vec<(String, Price)>,
    pub price_origins: Vec<(String, Provenance)>,
    pub price_list: Vec<(String, Price)>,
    pub price_list_origin: Option<Provenance>,
    /// Holds left by requests that were in flight when an older capitd last stopped uncleanly.
    pub reservations: Vec<(u64, StoredReservation)>,
    /// Each grant's admission lease, as last committed (non-zero after an unclean stop).
    pub leases: Vec<(GrantId, rust_decimal::Decimal)>,
    /// The team pools this daemon is a member of.
    pub teams: Vec<StoredTeam>,
}

/// One write. The writer applies a batch of these in a single transaction.
pub enum WriteOp {
    PutKey {
        provider: String,
        key: StoredKey,
    },
    DeleteKey {
        provider: String,
    },
    PutManagementKey {
        provider: String,
        key: StoredKey,
    },
    DeleteManagementKey {
        provider: String,
    },
    PutProvider(Provider),
    PutGrant(Grant),
    /// Several grants in one transaction (a grant replaced by its successor).
    PutGrants(Vec<Grant>),
    PutPrice {
        model: String,
        price: Price,
        origin: Provenance,
    },
    /// Many prices in one transaction (an import is all or nothing).
    PutPrices {
        prices: Vec<(String, Price)>,
        origin: Provenance,
    },
    /// The fetched price list, in place of the previous one, in one transaction.
    ReplacePriceList {
        prices: Vec<(String, Price)>,
        origin: Provenance,
    },
    /// Appends an entry and adds it to the totals of the window starting at `window_start`,
    /// removing the request's hold in the same transaction.
    AppendEntry {
        entry: LedgerEntry,
        window_start: i64,
        reservation: Option<u64>,
    },
    PutReservation {
        id: u64,
        reservation: StoredReservation,
    },
    /// Sets a grant's admission lease (what a crash would charge for its requests in flight).
    PutLease {
        grant: GrantId,
        amount: rust_decimal::Decimal,
    },
    /// Counts one refused request of `grant` in its window's totals and its lifetime's.
    CountRefusal {
        grant: GrantId,
        window_start: i64,
        reason: String,
    },
    DeleteReservation {
        id: u64,
    },
    PutTeam(StoredTeam),
    DeleteTeam {
        pool: String,
    },
    /// Writes nothing: it commits after every write queued before it, so awaiting it means
    /// those are durable (a reader's barrier).
    Barrier,
}

struct Job {
    op: WriteOp,
    done: Done,
}

/// Who is told how a write ended: a waiting receiver, or a callback the writer thread runs
/// (short, and never waiting on the store itself).
enum Done {
    Channel(oneshot::Sender<Result<(), StoreError>>),
    Callback(Box<dyn FnOnce(Result<(), StoreError>) + Send>),
}

impl Done {
    fn finish(self, result: Result<(), StoreError>) {
        match self {
            Done::Channel(done) => drop(done.send(result)),
            Done::Callback(callback) => callback(result),
        }
    }
}

/// A cheap handle to the database and its writer thread.
#[derive(Clone)]
pub struct Store {
    db: Arc<DbSlot>,
    writer: Arc<Writer>,
    health: Arc<Health>,
}

type Opener = Box<dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// The open database, which the writer replaces when it reopens the file after an I/O error
/// (redb refuses every operation after one until it is reopened).
struct DbSlot {
    path: PathBuf,
    opener: Opener,
    current: RwLock<Option<Arc<Database>>>,
}

impl DbSlot {
    fn get(&self) -> Result<Arc<Database>, StoreError> {
        let current = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        current.clone().ok_or_else(|| StoreError::Unavailable("the database is being reopened".into()))
    }

    /// Closes the database (waiting briefly for readers to let go of it) and opens it again.
    fn reopen(&self) -> Result<(), StoreError> {
        let old = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(mut old) = old {
            let deadline = Instant::now() + Duration::from_secs(5);
            // A reader holds a clone only for one read, which fails fast after an I/O error.
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(shared) => {
                        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(shared);
                        return Err(StoreError::Unavailable("a reader kept the database open".into()));
                    }
                }
            }
        }
        let db = (self.opener)(&self.path)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(db));
        Ok(())
    }
}

/// Whether the store can be written, for the proxy (which refuses metered requests while it
/// cannot) and for `capitctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// When the current outage began (Unix ms); `None` while writes commit.
    pub failing_since_ms: Option<i64>,
    /// The error that began it.
    pub error: String,
    /// Writes kept through the outage, to be committed when it ends.
    pub waiting_writes: usize,
    /// Outages recovered from since the daemon started.
    pub outages_recovered: u64,
}

#[derive(Default)]
struct Health {
    writable: AtomicBool,
    detail: Mutex<StoreHealth>,
}

impl Health {
    fn update(&self, f: impl FnOnce(&mut StoreHealth)) {
        let mut detail = self.detail.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut detail);
        self.writable.store(detail.failing_since_ms.is_none(), Ordering::Release);
    }

    fn snapshot(&self) -> StoreHealth {
        self.detail.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

struct Writer {
    /// `None` once closed; sending under the lock never blocks (the channel is unbounded).
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    /// Opens (creating, 0600) the database and starts the writer thread.
    pub fn open(path: &Path) -> Result<(Store, Snapshot), StoreError> {
        Store::open_with(path, Box::new(|path: &Path| Database::create(path)))
    }

    /// Opens through `opener`, which the writer also calls to reopen the file after an I/O
    /// error (tests pass one whose storage fails on demand).
    fn open_with(path: &Path, opener: Opener) -> Result<(Store, Snapshot), StoreError> {
        let io = |source| StoreError::Io { path: path.to_path_buf(), source };
        OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let db = match opener(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse(path.to_path_buf())),
            Err(e) => return Err(e.into()),
        };
        init_schema(&db)?;
        let snapshot = read_snapshot(&db)?;
        let db = Arc::new(DbSlot { path: path.to_path_buf(), opener, current: RwLock::new(Some(Arc::new(db))) });
        let health = Arc::new(Health::default());
        health.update(|_| {});
        let (jobs, rx) = mpsc::channel();
        let (writer_db, writer_health) = (db.clone(), health.clone());
        let writer = std::thread::Builder::new()
            .name("capit-store-writer".into())
            .spawn(move || writer_loop(&writer_db, &writer_health, rx))
            .map_err(io)?;
        let writer = Writer { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(writer)) };
        Ok((Store { db, writer: Arc::new(writer), health }, snapshot))
    }

    /// False while the database cannot be written (a full or failing disk). Cheap: the proxy
    /// asks before it admits each metered request.
    pub fn writable(&self) -> bool {
        self.health.writable.load(Ordering::Acquire)
    }

    pub fn health(&self) -> StoreHealth {
        self.health.snapshot()
    }

    /// Queues a write and waits until it is committed to disk.
    pub async fn write(&self, op: WriteOp) -> Result<(), StoreError> {
        self.submit(op).await.unwrap_or(Err(StoreError::Closed))
    }

    /// Queues a write; the returned receiver resolves once it is committed. Usable from sync
    /// code (a response body's last poll) without blocking.
    pub fn submit(&self, op: WriteOp) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = oneshot::channel();
        self.enqueue(Job { op, done: Done::Channel(done) });
        rx
    }

    /// Queues a write and has the writer thread run `then` with how it ended, once it is
    /// committed (or has failed for good). `then` must be short and must not wait on the store.
    pub fn submit_then(&self, op: WriteOp, then: impl FnOnce(Result<(), StoreError>) + Send + 'static) {
        self.enqueue(Job { op, done: Done::Callback(Box::new(then)) });
    }

    fn enqueue(&self, job: Job) {
        let unsent = match self.writer.jobs.lock() {
            Ok(guard) => match guard.as_ref() {
                Some(jobs) => jobs.send(job).err().map(|mpsc::SendError(job)| job),
                None => Some(job),
            },
            Err(_) => Some(job),
        };
        if let Some(job) = unsent {
            job.done.finish(Err(StoreError::Closed));
        }
    }

    /// Finishes every queued write and stops the writer. Later writes fail with `Closed`.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.writer.jobs.lock() {
            jobs.take();
        }
        let thread = self.writer.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// Applies writes in one transaction on the calling thread, for start-up work done before
    /// the daemon serves anything (charging the holds a crash left behind).
    pub fn apply_now(&self, ops: &[WriteOp]) -> Result<(), StoreError> {
        apply_ops(&*self.db.get()?, ops.iter(), &mut None)
    }

    /// The running totals of `grant` for the window starting at `window_start`.
    pub fn totals(&self, grant: GrantId, window_start: i64) -> Result<Totals, StoreError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(TOTALS)?;
        match table.get((grant.0, window_start))? {
            Some(value) => decode_totals(value.value()),
            None => Ok(Totals::default()),
        }
    }

    /// Ledger entries of one grant (or all) settled at or after `since_ms`, oldest first per grant.
    pub fn entries(&self, grant: Option<GrantId>, since_ms: i64) -> Result<Vec<LedgerEntry>, StoreError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(LEDGER)?;
        let range = match grant {
            Some(g) => table.range((g.0, 0)..=(g.0, u64::MAX))?,
            None => table.range::<(u64, u64)>(..)?,
        };
        let mut out = Vec::new();
        for item in range {
            let (_, value) = item?;
            let entry = decode_entry(value.value())?;
            if entry.at_ms >= since_ms {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Ledger entries of `grants` with a sequence number after `after` (all with `None`), in
    /// sequence order, at most `limit`: what a team member has yet to report. Committed entries
    /// always form a prefix of the sequence, so a reader that resumes after the last number it
    /// saw misses nothing.
    pub fn entries_after(&self, grants: &[GrantId], after: Option<u64>, limit: usize) -> Result<Vec<(u64, LedgerEntry)>, StoreError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(LEDGER)?;
        let first = after.map_or(0, |seq| seq.saturating_add(1));
        let mut out = Vec::new();
        for grant in grants {
            for item in table.range((grant.0, first)..=(grant.0, u64::MAX))?.take(limit) {
                let (key, value) = item?;
                out.push((key.value().1, decode_entry(value.value())?));
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        out.truncate(limit);
        Ok(out)
    }

    /// The sequence number the next ledger entry will get: every entry committed so far has a
    /// smaller one.
    pub fn next_ledger_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.get()?.begin_read()?;
        match txn.open_table(META)?.get(NEXT_SEQ)? {
            Some(v) => decode("ledger sequence", v.value()),
            None => Ok(0),
        }
    }

    pub fn ledger_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.get()?.begin_read()?;
        Ok(txn.open_table(LEDGER)?.len()?)
    }
}

fn init_schema(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let existing = meta.get("schema_version")?.map(|v| v.value().to_vec());
        match existing {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => return Err(StoreError::Schema(String::from_utf8_lossy(&v).into_owned())),
        }
        if meta.get(INSTALLATION_ID)?.is_none() {
            let id = crate::secret::random_token("", 8, b"0123456789abcdefghijklmnopqrstuvwxyz")
                .map_err(|e| StoreError::Corrupt { what: "installation id".into(), detail: e.to_string() })?;
            meta.insert(INSTALLATION_ID, id.expose().as_bytes())?;
        }
        txn.open_table(MASTER_KEYS)?;
        txn.open_table(MANAGEMENT_KEYS)?;
        txn.open_table(PROVIDERS)?;
        txn.open_table(GRANTS)?;
        txn.open_table(PRICES)?;
        txn.open_table(PRICE_ORIGINS)?;
        txn.open_table(PRICE_LIST)?;
        txn.open_table(LEDGER)?;
        txn.open_table(TOTALS)?;
        txn.open_table(RESERVATIONS)?;
        txn.open_table(LEASES)?;
        txn.open_table(TEAMS)?;
    }
    txn.commit()?;
    Ok(())
}

fn read_snapshot(db: &Database) -> Result<Snapshot, StoreError> {
    let txn = db.begin_read()?;
    let mut keys = Vec::new();
    for item in txn.open_table(MASTER_KEYS)?.iter()? {
        let (name, value) = item?;
        keys.push((name.value().to_string(), decode("master key", value.value())?));
    }
    let mut management_keys = Vec::new();
    for item in txn.open_table(MANAGEMENT_KEYS)?.iter()? {
        let (name, value) = item?;
        management_keys.push((name.value().to_string(), decode("management key", value.value())?));
    }
    let installation_id = match txn.open_table(META)?.get(INSTALLATION_ID)? {
        Some(v) => String::from_utf8_lossy(v.value()).into_owned(),
        None => return Err(StoreError::Corrupt { what: "installation id".into(), detail: "missing".into() }),
    };
    let mut providers = Vec::new();
    for item in txn.open_table(PROVIDERS)?.iter()? {
        providers.push(decode("provider", item?.1.value())?);
    }
    let mut grants = Vec::new();
    for item in txn.open_table(GRANTS)?.iter()? {
        grants.push(decode("grant", item?.1.value())?);
    }
    let mut prices = Vec::new();
    for item in txn.open_table(PRICES)?.iter()? {
        let (model, value) = item?;
        prices.push((model.value().to_string(), decode("price", value.value())?));
    }
    let mut price_origins = Vec::new();
    for item in txn.open_table(PRICE_ORIGINS)?.iter()? {
        let (model, value) = item?;
        price_origins.push((model.value().to_string(), decode("price origin", value.value())?));
    }
    let mut price_list = Vec::new();
    for item in txn.open_table(PRICE_LIST)?.iter()? {
        let (model, value) = item?;
        price_list.push((model.value().to_string(), decode("listed price", value.value())?));
    }
    let price_list_origin = match txn.open_table(META)?.get(PRICE_LIST_ORIGIN)? {
        Some(v) => Some(decode("price list origin", v.value())?),
        None => None,
    };
    let mut reservations = Vec::new();
    for item in txn.open_table(RESERVATIONS)?.iter()? {
        let (id, value) = item?;
        reservations.push((id.value(), decode("reservation", value.value())?));
    }
    let mut leases = Vec::new();
    for item in txn.open_table(LEASES)?.iter()? {
        let (grant, value) = item?;
        let bytes: [u8; 16] = value
            .value()
            .try_into()
            .map_err(|_| StoreError::Corrupt { what: "lease".into(), detail: "not a decimal's 16 bytes".into() })?;
        leases.push((GrantId(grant.value()), rust_decimal::Decimal::deserialize(bytes)));
    }
    let mut teams = Vec::new();
    for item in txn.open_table(TEAMS)?.iter()? {
        teams.push(decode("team membership", item?.1.value())?);
    }
    Ok(Snapshot {
        teams,
        keys,
        management_keys,
        installation_id,
        providers,
        grants,
        prices,
        price_origins,
        price_list,
        price_list_origin,
        reservations,
        leases,
    })
}

/// A ledger entry as stored: the binary form, or the JSON of records written before it.
fn decode_entry(bytes: &[u8]) -> Result<LedgerEntry, StoreError> {
    if crate::codec::is_binary(bytes) {
        crate::codec::decode_entry(bytes).map_err(|e| StoreError::Corrupt { what: "ledger entry".into(), detail: e.to_string() })
    } else {
        decode("ledger entry", bytes)
    }
}

/// Running totals as stored: the binary form, or the JSON of records written before it.
fn decode_totals(bytes: &[u8]) -> Result<Totals, StoreError> {
    if crate::codec::is_binary(bytes) {
        crate::codec::decode_totals(bytes).map_err(|e| StoreError::Corrupt { what: "totals".into(), detail: e.to_string() })
    } else {
        decode("totals", bytes)
    }
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: what.to_string(), detail: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records serialise: plain structs of strings and numbers")
}

impl WriteOp {
    /// Whether the write records something that already happened (a settled request, a released
    /// hold), so that it must wait out an outage rather than fail: its caller cannot undo it.
    /// Every other write fails at once during an outage, and its caller changes nothing.
    fn must_land(&self) -> bool {
        matches!(self, WriteOp::AppendEntry { .. } | WriteOp::DeleteReservation { .. })
    }
}

/// True for the errors of a failing disk (redb then refuses everything until reopened).
fn is_io_failure(error: &StoreError) -> bool {
    match error {
        StoreError::Redb(e) => matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed),
        StoreError::Io { .. } | StoreError::Unavailable(_) => true,
        StoreError::Batch(inner) => is_io_failure(inner),
        _ => false,
    }
}

fn reply(jobs: Vec<Job>, result: impl Fn() -> Result<(), StoreError>) {
    for job in jobs {
        job.done.finish(result());
    }
}

fn writer_loop(slot: &DbSlot, health: &Health, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut seen_batch = None;
        let result = slot.get().and_then(|db| apply_ops(&db, batch.iter().map(|job| &job.op), &mut seen_batch));
        match result {
            Ok(()) => reply(batch, || Ok(())),
            Err(e) if is_io_failure(&e) => {
                let kept = begin_outage(health, &e, batch);
                if !ride_out_outage(slot, health, &jobs, kept, seen_batch.map(|n| n + 1)) {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "store write failed");
                let shared = Arc::new(e);
                reply(batch, || Err(StoreError::Batch(shared.clone())));
            }
        }
    }
}

/// Marks the store unwritable, answers the writes that can fail, and returns those that must land.
fn begin_outage(health: &Health, error: &StoreError, batch: Vec<Job>) -> Vec<Job> {
    let (kept, refused): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|job| job.op.must_land());
    let text = error.to_string();
    tracing::error!(
        error = %text,
        kept = kept.len(),
        "capit cannot write its ledger (disk full?); metered requests are refused until it can, and settlements wait in memory"
    );
    health.update(|h| {
        h.failing_since_ms = Some(chrono::Utc::now().timestamp_millis());
        h.error = text.clone();
        h.waiting_writes = kept.len();
    });
    reply(refused, || Err(StoreError::Unavailable(text.clone())));
    kept
}

/// Probes with backoff until a write commits again: reopens the database, commits the kept
/// writes (or, with none, a probe), and answers them. Meanwhile new writes that can fail are
/// refused at once and the others kept. `attempted` is the batch number of a commit that failed
/// with `kept` in it: if the reopened database shows it, it landed after all and is not applied
/// again. Returns false when the store was closed before the disk came back.
fn ride_out_outage(slot: &DbSlot, health: &Health, jobs: &mpsc::Receiver<Job>, mut kept: Vec<Job>, mut attempted: Option<u64>) -> bool {
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut wait = PROBE_FIRST;
    let mut closing = false;
    // How many of `kept` were in the attempt numbered `attempted`.
    let mut in_attempt = kept.len();
    loop {
        let deadline = Instant::now() + wait;
        while !closing {
            let left = deadline.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(left) {
                Ok(job) if job.op.must_land() => kept.push(job),
                Ok(job) => {
                    let text = health.snapshot().error;
                    job.done.finish(Err(StoreError::Unavailable(text)));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => closing = true,
            }
        }
        health.update(|h| h.waiting_writes = kept.len());
        let mut seen_batch = None;
        let mut landed = Vec::new();
        let result = slot.reopen().and_then(|()| {
            let db = slot.get()?;
            if let Some(number) = attempted {
                if last_batch(&db)? == number {
                    // The failed commit landed (its error came after the data was safe).
                    landed = kept.drain(..in_attempt).collect();
                }
                attempted = None;
            }
            apply_ops(&db, kept.iter().map(|job| &job.op), &mut seen_batch)
        });
        match result {
            Ok(()) => {
                let waited = kept.len() + landed.len();
                health.update(|h| {
                    h.failing_since_ms = None;
                    h.error.clear();
                    h.waiting_writes = 0;
                    h.outages_recovered += 1;
                });
                reply(landed, || Ok(()));
                reply(std::mem::take(&mut kept), || Ok(()));
                tracing::info!(
                    after_s = started.elapsed().as_secs(),
                    committed = waited,
                    "the ledger can be written again; metered requests resume"
                );
                return true;
            }
            Err(e) => {
                // What landed is answered; the rest waits for the next attempt.
                reply(landed, || Ok(()));
                if let Some(number) = seen_batch {
                    attempted = Some(number + 1);
                    in_attempt = kept.len();
                }
                if closing {
                    tracing::error!(
                        error = %e,
                        lost = kept.len(),
                        "stopping while the ledger cannot be written: these settlements are not saved; their requests are charged at their holds on the next start"
                    );
                    reply(std::mem::take(&mut kept), || Err(StoreError::Closed));
                    return false;
                }
                if last_log.elapsed() >= OUTAGE_LOG_EVERY {
                    last_log = Instant::now();
                    tracing::error!(error = %e, waiting = kept.len(), for_s = started.elapsed().as_secs(), "the ledger still cannot be written");
                }
                wait = (wait * 2).min(PROBE_LONGEST);
            }
        }
    }
}

/// The number of the last committed batch.
fn last_batch(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    match meta.get(BATCH_SEQ)? {
        Some(v) => decode("batch sequence", v.value()),
        None => Ok(0),
    }
}

/// Applies `ops` in one transaction, which also numbers itself: `seen_batch` is set to the
/// number of the last commit before it, so that after an error the writer knows which number
/// this one would have written.
fn apply_ops<'a>(db: &Database, ops: impl Iterator<Item = &'a WriteOp>, seen_batch: &mut Option<u64>) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let batch: u64 = match meta.get(BATCH_SEQ)? {
            Some(v) => decode("batch sequence", v.value())?,
            None => 0,
        };
        *seen_batch = Some(batch);
        meta.insert(BATCH_SEQ, encode(&(batch + 1)).as_slice())?;
        let mut next_seq = match meta.get(NEXT_SEQ)? {
            Some(v) => decode::<u64>("ledger sequence", v.value())?,
            None => 0,
        };
        let seq_before = next_seq;
        let mut master_keys = txn.open_table(MASTER_KEYS)?;
        let mut management_keys = txn.open_table(MANAGEMENT_KEYS)?;
        let mut providers = txn.open_table(PROVIDERS)?;
        let mut grants = txn.open_table(GRANTS)?;
        let mut prices = txn.open_table(PRICES)?;
        let mut price_origins = txn.open_table(PRICE_ORIGINS)?;
        let mut price_list = txn.open_table(PRICE_LIST)?;
        let mut ledger = txn.open_table(LEDGER)?;
        let mut totals = txn.open_table(TOTALS)?;
        let mut reservations = txn.open_table(RESERVATIONS)?;
        let mut leases = txn.open_table(LEASES)?;
        let mut teams = txn.open_table(TEAMS)?;
        for op in ops {
            match op {
                WriteOp::PutKey { provider, key } => {
                    // The record may hold the key as text: its encoded copy is zeroed too.
                    master_keys.insert(provider.as_str(), zeroize::Zeroizing::new(encode(key)).as_slice())?;
                }
                WriteOp::DeleteKey { provider } => {
                    master_keys.remove(provider.as_str())?;
                }
                WriteOp::PutManagementKey { provider, key } => {
                    management_keys.insert(provider.as_str(), encode(key).as_slice())?;
                }
                WriteOp::DeleteManagementKey { provider } => {
                    management_keys.remove(provider.as_str())?;
                }
                WriteOp::PutProvider(p) => {
                    providers.insert(p.name.as_str(), encode(p).as_slice())?;
                }
                WriteOp::PutGrant(g) => {
                    grants.insert(g.id.0, encode(g).as_slice())?;
                }
                WriteOp::PutGrants(all) => {
                    for g in all {
                        grants.insert(g.id.0, encode(g).as_slice())?;
                    }
                }
                WriteOp::PutPrice { model, price, origin } => {
                    prices.insert(model.as_str(), encode(price).as_slice())?;
                    price_origins.insert(model.as_str(), encode(origin).as_slice())?;
                }
                WriteOp::PutPrices { prices: all, origin } => {
                    for (model, price) in all {
                        prices.insert(model.as_str(), encode(price).as_slice())?;
                        price_origins.insert(model.as_str(), encode(origin).as_slice())?;
                    }
                }
                WriteOp::ReplacePriceList { prices: all, origin } => {
                    price_list.retain(|_, _| false)?;
                    for (model, price) in all {
                        price_list.insert(model.as_str(), encode(price).as_slice())?;
                    }
                    meta.insert(PRICE_LIST_ORIGIN, encode(origin).as_slice())?;
                }
                WriteOp::PutReservation { id, reservation } => {
                    reservations.insert(*id, encode(reservation).as_slice())?;
                }
                WriteOp::DeleteReservation { id } => {
                    reservations.remove(*id)?;
                }
                WriteOp::PutLease { grant, amount } if amount.is_zero() => {
                    leases.remove(grant.0)?;
                }
                WriteOp::PutLease { grant, amount } => {
                    leases.insert(grant.0, amount.serialize().as_slice())?;
                }
                WriteOp::Barrier => {}
                WriteOp::PutTeam(team) => {
                    teams.insert(team.pool.as_str(), encode(team).as_slice())?;
                }
                WriteOp::DeleteTeam { pool } => {
                    teams.remove(pool.as_str())?;
                }
                WriteOp::AppendEntry { entry, window_start, reservation } => {
                    let mut keys = vec![(entry.grant.0, *window_start)];
                    if *window_start != LIFETIME {
                        keys.push((entry.grant.0, LIFETIME));
                    }
                    let mut sums = Vec::with_capacity(keys.len());
                    for key in &keys {
                        let mut sum: Totals = match totals.get(*key)? {
                            Some(v) => decode_totals(v.value())?,
                            None => Totals::default(),
                        };
                        if sum.add(entry).is_err() {
                            break;
                        }
                        sums.push(sum);
                    }
                    if sums.len() != keys.len() {
                        // Unreachable with validated costs (each at most $10,000): a total that
                        // would overflow is never stored. The entry is dropped, loudly; in memory
                        // the grant's spend has saturated, so it admits nothing more.
                        tracing::error!(grant = entry.grant.0, cost = %entry.cost, "refused a ledger entry whose total would overflow");
                        continue;
                    }
                    if let Some(id) = reservation {
                        reservations.remove(*id)?;
                    }
                    ledger.insert((entry.grant.0, next_seq), crate::codec::encode_entry(entry).as_slice())?;
                    next_seq += 1;
                    for (key, sum) in keys.into_iter().zip(sums) {
                        totals.insert(key, crate::codec::encode_totals(&sum).as_slice())?;
                    }
                }
                WriteOp::CountRefusal { grant, window_start, reason } => {
                    let mut keys = vec![(grant.0, *window_start)];
                    if *window_start != LIFETIME {
                        keys.push((grant.0, LIFETIME));
                    }
                    for key in keys {
                        let mut sum: Totals = match totals.get(key)? {
                            Some(v) => decode_totals(v.value())?,
                            None => Totals::default(),
                        };
                        sum.count_refusal(reason);
                        totals.insert(key, crate::codec::encode_totals(&sum).as_slice())?;
                    }
                }
            }
        }
        if next_seq != seq_before {
            meta.insert(NEXT_SEQ, encode(&next_seq).as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;
    use std::sync::atomic::{AtomicU32, AtomicU64};

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    use super::*;
    use crate::ledger::EntryStatus;

    /// A file whose writes fail on demand (a full disk), or whose `fail_sync_at`-th sync fails
    /// after the data reached the file (an error whose commit landed anyway).
    #[derive(Debug)]
    struct Faulty {
        file: FileBackend,
        disk: Arc<Disk>,
    }

    #[derive(Debug, Default)]
    struct Disk {
        full: AtomicBool,
        syncs: AtomicU64,
        fail_sync_at: AtomicU64,
    }

    fn no_space() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }

    impl StorageBackend for Faulty {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            if self.disk.full.load(Ordering::SeqCst) && len > self.file.len()? {
                return Err(no_space());
            }
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.file.sync_data()?;
            let n = self.disk.syncs.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.disk.fail_sync_at.load(Ordering::SeqCst) { Err(std::io::Error::other("injected: fsync failed")) } else { Ok(()) }
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            if self.disk.full.load(Ordering::SeqCst) {
                return Err(no_space());
            }
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.file.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_range(start, end)
        }
        fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.file.unlock_range(start, end)
        }
        fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.file.query_lock_range(start, end)
        }
    }

    fn faulty_store() -> (Store, Arc<Disk>, PathBuf) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("capit-store-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = Arc::new(Disk::default());
        let opened = disk.clone();
        let opener: Opener = Box::new(move |path: &Path| {
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            redb::Builder::new().create_with_backend(Faulty { file: FileBackend::new(file)?, disk: opened.clone() })
        });
        let (store, _) = Store::open_with(&dir.join("capit.redb"), opener).unwrap();
        (store, disk, dir)
    }

    fn entry(cost: &str) -> WriteOp {
        let entry = LedgerEntry {
            grant: GrantId(1),
            at_ms: 1,
            model: "m".into(),
            api: "chat.completions".into(),
            usage: crate::usage::Usage::default(),
            cost: cost.parse().unwrap(),
            status: EntryStatus::Metered,
            http_status: 200,
            error: None,
        };
        WriteOp::AppendEntry { entry, window_start: LIFETIME, reservation: None }
    }

    /// A control change: it fails at once during an outage.
    fn control_change() -> WriteOp {
        WriteOp::PutProvider(crate::providers::builtin_providers().remove(0))
    }

    #[track_caller]
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A ledger entry and running totals exactly as a capitd before the binary codec wrote them.
    const OLD_ENTRY_JSON: &str = r#"{"grant":1,"at_ms":1764600000123,"model":"gpt-4o-mini","api":"chat.completions","usage":{"input_tokens":1200,"cached_input_tokens":1024,"output_tokens":42},"cost":"0.0001234","status":"metered","http_status":200}"#;
    const OLD_TOTALS_JSON: &str = r#"{"spent":"0.0001234","requests":1,"input_tokens":1200,"cached_input_tokens":1024,"cache_write_tokens":0,"output_tokens":42,"reasoning_tokens":0,"estimated":0,"errors":0,"refused":{"would_exceed_cap":1}}"#;

    #[tokio::test]
    async fn json_records_of_an_older_capitd_are_read_and_new_binary_ones_add_to_them() {
        let dir = std::env::temp_dir().join(format!("capit-store-json-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("capit.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(LEDGER).unwrap().insert((1, 0), OLD_ENTRY_JSON.as_bytes()).unwrap();
            tx.open_table(TOTALS).unwrap().insert((1, LIFETIME), OLD_TOTALS_JSON.as_bytes()).unwrap();
            tx.open_table(META).unwrap().insert(NEXT_SEQ, encode(&1u64).as_slice()).unwrap();
            tx.commit().unwrap();
        }
        let (store, _) = Store::open(&path).unwrap();
        let old = store.entries(Some(GrantId(1)), 0).unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(
            (old[0].model.as_str(), old[0].usage.cached_input_tokens, old[0].cost),
            ("gpt-4o-mini", 1024, "0.0001234".parse().unwrap())
        );
        assert_eq!(store.totals(GrantId(1), LIFETIME).unwrap().refused.get("would_exceed_cap"), Some(&1));

        store.write(entry("0.10")).await.unwrap();
        let all = store.entries(Some(GrantId(1)), 0).unwrap();
        assert_eq!(all.iter().map(|e| e.cost).sum::<rust_decimal::Decimal>(), "0.1001234".parse().unwrap());
        let totals = store.totals(GrantId(1), LIFETIME).unwrap();
        assert_eq!((totals.spent, totals.requests, totals.input_tokens), ("0.1001234".parse().unwrap(), 2, 1200));
        assert_eq!(totals.refused.get("would_exceed_cap"), Some(&1), "the old record's refusals are kept");
        store.close();
        drop(store);
        let (store, _) = Store::open(&path).unwrap();
        assert_eq!(store.totals(GrantId(1), LIFETIME).unwrap(), totals, "and the rewritten totals read back in binary");
        store.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_full_disk_keeps_settlements_refuses_the_rest_and_heals_by_itself() {
        let (store, disk, dir) = faulty_store();
        store.write(entry("0.10")).await.unwrap();
        assert!(store.writable());

        disk.full.store(true, Ordering::SeqCst);
        let mut kept = store.submit(entry("0.20"));
        wait_until("the outage to be noticed", || !store.writable());
        let health = store.health();
        assert!(health.failing_since_ms.is_some() && health.error.contains("space"), "{health:?}");
        // A write whose caller can give up is refused at once; a settlement waits.
        assert!(matches!(store.write(control_change()).await, Err(StoreError::Unavailable(_))));
        assert!(matches!(store.write(WriteOp::Barrier).await, Err(StoreError::Unavailable(_))));
        let mut also_kept = store.submit(entry("0.30"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(kept.try_recv().is_err() && also_kept.try_recv().is_err(), "settlements wait out the outage");
        wait_until("both settlements to be counted as waiting", || store.health().waiting_writes == 2);

        disk.full.store(false, Ordering::SeqCst);
        kept.await.unwrap().unwrap();
        also_kept.await.unwrap().unwrap();
        assert!(store.writable());
        assert_eq!(store.health(), StoreHealth { outages_recovered: 1, ..StoreHealth::default() });
        store.write(control_change()).await.unwrap();
        assert_eq!(store.ledger_len().unwrap(), 3, "nothing lost, nothing twice");
        assert_eq!(store.totals(GrantId(1), LIFETIME).unwrap().spent, "0.60".parse().unwrap());
        store.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_commit_that_landed_despite_its_error_is_not_applied_again() {
        let (store, disk, dir) = faulty_store();
        store.write(entry("0.10")).await.unwrap();
        let before = disk.syncs.load(Ordering::SeqCst);
        store.write(entry("0.10")).await.unwrap();
        let per_commit = disk.syncs.load(Ordering::SeqCst) - before;
        // The last sync of the next commit fails after its data and header are on disk.
        disk.fail_sync_at.store(disk.syncs.load(Ordering::SeqCst) + per_commit, Ordering::SeqCst);
        store.write(entry("0.25")).await.unwrap();
        assert!(store.writable());
        assert_eq!(store.health().outages_recovered, 1, "the error was seen");
        assert_eq!(store.ledger_len().unwrap(), 3);
        assert_eq!(store.totals(GrantId(1), LIFETIME).unwrap().spent, "0.45".parse().unwrap());
        store.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn closing_during_an_outage_gives_up_on_what_could_not_be_written() {
        let (store, disk, dir) = faulty_store();
        disk.full.store(true, Ordering::SeqCst);
        let kept = store.submit(entry("0.20"));
        wait_until("the outage", || !store.writable());
        let closer = store.clone();
        let closing = std::thread::spawn(move || closer.close());
        assert!(matches!(kept.await.unwrap(), Err(StoreError::Closed)));
        closing.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
