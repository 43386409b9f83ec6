//! The durable state in one redb file: master keys, providers, grants, price overrides, the
//! ledger and its running totals. The only module that knows redb.
//!
//! Invariants:
//! - All writes go through one writer thread, which commits every job waiting in its queue in
//!   one transaction (`Durability::Immediate`: fsync before anyone is told it is done). So one
//!   commit serves every request that settled meanwhile, and no async thread waits on a disk.
//! - A ledger entry and its grant's running total are written in the same transaction, so the
//!   totals always equal the sum of the entries.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

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

const SCHEMA_VERSION: &[u8] = b"1";
const NEXT_SEQ: &str = "next_ledger_seq";
/// A random id of this database, made once, that tells this capit's provider keys from another
/// installation's on the same provider account.
const INSTALLATION_ID: &str = "installation_id";

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

/// A master key as stored. The database file is 0600 in a 0700 directory.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    pub secret: String,
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
    /// Holds left by requests that were in flight when the daemon last stopped uncleanly.
    pub reservations: Vec<(u64, StoredReservation)>,
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
    /// Counts one refused request of `grant` in its window's totals and its lifetime's.
    CountRefusal {
        grant: GrantId,
        window_start: i64,
        reason: String,
    },
    DeleteReservation {
        id: u64,
    },
    /// Writes nothing: it commits after every write queued before it, so awaiting it means
    /// those are durable (a reader's barrier).
    Barrier,
}

struct Job {
    op: WriteOp,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A cheap handle to the database and its writer thread.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    writer: Arc<Writer>,
}

struct Writer {
    /// `None` once closed; sending under the lock never blocks (the channel is unbounded).
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    /// Opens (creating, 0600) the database and starts the writer thread.
    pub fn open(path: &Path) -> Result<(Store, Snapshot), StoreError> {
        let io = |source| StoreError::Io { path: path.to_path_buf(), source };
        OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse(path.to_path_buf())),
            Err(e) => return Err(e.into()),
        };
        init_schema(&db)?;
        let snapshot = read_snapshot(&db)?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer =
            std::thread::Builder::new().name("capit-store-writer".into()).spawn(move || writer_loop(&writer_db, rx)).map_err(io)?;
        let writer = Writer { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(writer)) };
        Ok((Store { db, writer: Arc::new(writer) }, snapshot))
    }

    /// Queues a write and waits until it is committed to disk.
    pub async fn write(&self, op: WriteOp) -> Result<(), StoreError> {
        self.submit(op).await.unwrap_or(Err(StoreError::Closed))
    }

    /// Queues a write; the returned receiver resolves once it is committed. Usable from sync
    /// code (a response body's last poll) without blocking.
    pub fn submit(&self, op: WriteOp) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = oneshot::channel();
        let job = Job { op, done };
        let unsent = match self.writer.jobs.lock() {
            Ok(guard) => match guard.as_ref() {
                Some(jobs) => jobs.send(job).err().map(|mpsc::SendError(job)| job),
                None => Some(job),
            },
            Err(_) => Some(job),
        };
        if let Some(job) = unsent {
            let _ = job.done.send(Err(StoreError::Closed));
        }
        rx
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
        apply_ops(&self.db, ops.iter())
    }

    /// The running totals of `grant` for the window starting at `window_start`.
    pub fn totals(&self, grant: GrantId, window_start: i64) -> Result<Totals, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOTALS)?;
        match table.get((grant.0, window_start))? {
            Some(value) => decode("totals", value.value()),
            None => Ok(Totals::default()),
        }
    }

    /// Ledger entries of one grant (or all) settled at or after `since_ms`, oldest first per grant.
    pub fn entries(&self, grant: Option<GrantId>, since_ms: i64) -> Result<Vec<LedgerEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LEDGER)?;
        let range = match grant {
            Some(g) => table.range((g.0, 0)..=(g.0, u64::MAX))?,
            None => table.range::<(u64, u64)>(..)?,
        };
        let mut out = Vec::new();
        for item in range {
            let (_, value) = item?;
            let entry: LedgerEntry = decode("ledger entry", value.value())?;
            if entry.at_ms >= since_ms {
                out.push(entry);
            }
        }
        Ok(out)
    }

    pub fn ledger_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
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
    Ok(Snapshot {
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
    })
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: what.to_string(), detail: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records serialise: plain structs of strings and numbers")
}

fn writer_loop(db: &Database, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = apply_batch(db, &batch);
        match result {
            Ok(()) => {
                for job in batch {
                    let _ = job.done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "store write failed");
                let shared = Arc::new(e);
                for job in batch {
                    let _ = job.done.send(Err(StoreError::Batch(shared.clone())));
                }
            }
        }
    }
}

fn apply_batch(db: &Database, batch: &[Job]) -> Result<(), StoreError> {
    apply_ops(db, batch.iter().map(|job| &job.op))
}

fn apply_ops<'a>(db: &Database, ops: impl Iterator<Item = &'a WriteOp>) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
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
        for op in ops {
            match op {
                WriteOp::PutKey { provider, key } => {
                    master_keys.insert(provider.as_str(), encode(key).as_slice())?;
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
                WriteOp::Barrier => {}
                WriteOp::AppendEntry { entry, window_start, reservation } => {
                    let mut keys = vec![(entry.grant.0, *window_start)];
                    if *window_start != LIFETIME {
                        keys.push((entry.grant.0, LIFETIME));
                    }
                    let mut sums = Vec::with_capacity(keys.len());
                    for key in &keys {
                        let mut sum: Totals = match totals.get(*key)? {
                            Some(v) => decode("totals", v.value())?,
                            None => Totals::default(),
                        };
                        if sum.add(entry).is_err() {
                            break;
                        }
                        sums.push(sum);
                    }
                    if sums.len() != keys.len() {
                        // Unreachable with validated costs; a total that would overflow is never
                        // stored. The hold stays, and is charged at the next start.
                        tracing::error!(grant = entry.grant.0, cost = %entry.cost, "refused a ledger entry whose total would overflow");
                        continue;
                    }
                    if let Some(id) = reservation {
                        reservations.remove(*id)?;
                    }
                    ledger.insert((entry.grant.0, next_seq), encode(entry).as_slice())?;
                    next_seq += 1;
                    for (key, sum) in keys.into_iter().zip(sums) {
                        totals.insert(key, encode(&sum).as_slice())?;
                    }
                }
                WriteOp::CountRefusal { grant, window_start, reason } => {
                    let mut keys = vec![(grant.0, *window_start)];
                    if *window_start != LIFETIME {
                        keys.push((grant.0, LIFETIME));
                    }
                    for key in keys {
                        let mut sum: Totals = match totals.get(key)? {
                            Some(v) => decode("totals", v.value())?,
                            None => Totals::default(),
                        };
                        sum.count_refusal(reason);
                        totals.insert(key, encode(&sum).as_slice())?;
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
