//! The daemon's live state: providers, master keys, prices and grants in memory, with their
//! spend, kept in step with the store. The control service and the proxy both work through it.
//!
//! Invariants:
//! - A change is committed to the store before memory shows it, so a failed write leaves
//!   nothing half-done and what the daemon acts on is always what it would reload.
//! - A grant's spend lives behind its own small mutex ([`GrantSlot`]); admission and
//!   settlement lock only that grant, never a disk.
//! - Control-plane changes are serialised by one async mutex, so checks such as "this name is
//!   free" hold until the write lands.
//!
//! Layout, one file per concern: `clock` (the daemon's time and spend windows), `slot`
//! (a grant's live slot: spend, windows, counts), `admission` (admitting, holding, settling
//! and refusing requests), `admin` (keys, providers, prices and grants changed from the
//! control plane), `recovery` (charging what a crash left in flight), `leases` (a grant's lease on its own
//! cap: what requests in flight may go upstream under), `provider_keys`.

mod admin;
mod admission;
mod clock;
mod leases;
mod pools;
mod provider_keys;
mod recovery;
mod slot;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use rust_decimal::Decimal;

use crate::admission::{Decision, Demand, Hold, Room};
use crate::grants::{Api, Grant, GrantError, GrantId, GrantState, Limits, Period, Refusal, Window};
use crate::ledger::{LedgerEntry, Totals};
use crate::pricing::{Price, PriceChange, PriceError, PriceSource, PriceTable, Provenance};
use crate::providers::{self, Provider, ProviderError, ProviderKind};
use crate::secret::{self, KeyHash, Secret};
use crate::store::{Snapshot, Store, StoreError, StoredKey, StoredReservation, WriteOp};

use admin::provider_key_text;
pub use admin::{GrantSpec, GrantUpdate, PriceUpdate};
pub use admission::{Arrival, Reservation, WaitPolicy};
pub use clock::{Clock, local_window};
pub use leases::{LeaseGate, LeaseWait};
use recovery::charge_interrupted;
use slot::{Counts, GrantLive};
pub use slot::{GrantSlot, GrantView};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("unknown provider {0:?}")]
    UnknownProvider(String),
    #[error("provider {0:?} already exists")]
    ProviderExists(String),
    #[error("no master key is stored for provider {0:?}; add one with: capitctl key add {0}")]
    NoKey(String),
    #[error("unknown grant {0:?}")]
    UnknownGrant(String),
    #[error("an active grant named {0:?} already exists; revoke it first")]
    GrantExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error(transparent)]
    Price(#[from] PriceError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("generating a key: {0}")]
    Random(#[from] secret::RandomError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
}

/// A master key in memory.
#[derive(Clone)]
pub struct MasterKey {
    pub secret: Arc<Secret>,
    pub added_at: i64,
    /// Stored sealed under the keyring's data key (else as text in the database).
    pub sealed: bool,
}

struct Registry {
    providers: BTreeMap<String, Provider>,
    keys: BTreeMap<String, MasterKey>,
    /// Keys that manage a provider's keys (OpenRouter's management key), by provider.
    management_keys: BTreeMap<String, MasterKey>,
    prices: PriceTable,
    grants: BTreeMap<GrantId, Arc<GrantSlot>>,
    /// Virtual key hash → grant, for grants that are not revoked.
    by_hash: HashMap<KeyHash, GrantId>,
    /// Name → grant, for grants that are not revoked.
    by_name: HashMap<String, GrantId>,
    next_grant_id: u64,
}

pub struct State {
    store: Store,
    registry: RwLock<Registry>,
    admin: tokio::sync::Mutex<()>,
    started: Instant,
    listen_addr: OnceLock<SocketAddr>,
    home: PathBuf,
    clock: Clock,
    /// Access requests from local programs, waiting for the owner (in memory only).
    access: crate::access::AccessRequests,
    /// This database's random id (see `backstop::key_name`).
    installation_id: String,
    events: crate::events::Events,
    audit: Arc<crate::audit::AuditLog>,
    /// How new master keys are kept at rest; unset (as text) until the daemon says.
    key_protection: OnceLock<crate::keyring::KeyProtection>,
    /// Refusal log lines, at most one a second per grant and reason.
    refusal_log: crate::log_throttle::KeyedLogThrottle<(u64, &'static str)>,
    /// The lease books of the team pools this daemon is a member of, by pool (`state/pools.rs`).
    pools: RwLock<HashMap<String, Arc<crate::team::pool_lease::PoolLease>>>,
}

/// What the proxy needs to forward a request for one provider.
pub struct Upstream {
    pub provider: Provider,
    pub key: Arc<Secret>,
}

/// Why a presented virtual key does not open the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Unknown,
    WrongProvider { grant: String, provider: String },
}

impl State {
    pub fn new(store: Store, snapshot: Snapshot, home: PathBuf) -> Result<State, StateError> {
        State::with_clock(store, snapshot, home, Clock::default())
    }

    pub fn with_clock(store: Store, snapshot: Snapshot, home: PathBuf, clock: Clock) -> Result<State, StateError> {
        let mut providers: BTreeMap<String, Provider> = providers::builtin_providers().into_iter().map(|p| (p.name.clone(), p)).collect();
        for p in snapshot.providers {
            providers.insert(p.name.clone(), p);
        }
        let keys = snapshot
            .keys
            .into_iter()
            // A sealed key arrives opened (see `keyring::protect_at_rest`); its text moves, uncopied.
            .map(|(name, mut k)| {
                let text = k.secret.as_mut().map(|t| std::mem::take(&mut **t)).unwrap_or_default();
                (name, MasterKey { secret: Arc::new(Secret::new(text)), added_at: k.added_at, sealed: k.sealed.is_some() })
            })
            .collect();
        let management_keys = snapshot
            .management_keys
            .into_iter()
            .map(|(name, mut k)| {
                let text = k.secret.as_mut().map(|t| std::mem::take(&mut **t)).unwrap_or_default();
                (name, MasterKey { secret: Arc::new(Secret::new(text)), added_at: k.added_at, sealed: k.sealed.is_some() })
            })
            .collect();
        let mut prices = PriceTable::with_overrides(snapshot.prices.into_iter().collect())
            .with_override_origins(snapshot.price_origins.into_iter().collect());
        prices.replace_list(snapshot.price_list.into_iter().collect(), snapshot.price_list_origin);
        let now = clock.now_seconds();
        let mut registry = Registry {
            providers,
            keys,
            management_keys,
            prices,
            grants: BTreeMap::new(),
            by_hash: HashMap::new(),
            by_name: HashMap::new(),
            next_grant_id: 1,
        };
        charge_interrupted(&store, &snapshot.grants, snapshot.reservations, snapshot.leases, now)?;
        for grant in snapshot.grants {
            let window = local_window(grant.period, now);
            let spent = store.totals(grant.id, window.start)?.spent;
            let lifetime = store.totals(grant.id, crate::store::LIFETIME)?;
            let counts = Counts::from_lifetime(&lifetime);
            registry.next_grant_id = registry.next_grant_id.max(grant.id.0 + 1);
            if grant.revoked_at.is_none() {
                registry.by_hash.insert(grant.key_hash, grant.id);
                registry.by_name.insert(grant.name.clone(), grant.id);
            }
            let slot = GrantSlot::new(grant, window, spent, counts, lifetime.refused, &store);
            registry.grants.insert(slot.id, Arc::new(slot));
        }
        let audit = Arc::new(crate::audit::AuditLog::open(&home.join(crate::audit::FILE_NAME))?);
        let state = State {
            store,
            registry: RwLock::new(registry),
            admin: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            listen_addr: OnceLock::new(),
            home,
            clock,
            access: crate::access::AccessRequests::new(crate::access::AccessConfig::default()),
            installation_id: snapshot.installation_id,
            events: crate::events::Events::new(),
            audit,
            key_protection: OnceLock::new(),
            refusal_log: crate::log_throttle::KeyedLogThrottle::new(std::time::Duration::from_secs(1)),
            pools: RwLock::new(HashMap::new()),
        };
        // Thresholds the spend has already passed this period do not fire again after a restart.
        for slot in state.read().grants.values() {
            state.events.seed(&slot.standing());
        }
        Ok(state)
    }

    /// The live event hub: watchers subscribe to it; settlements and refusals publish to it.
    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    /// Appends a control-plane change to the audit log, durably, before the caller reports it
    /// done. Every control handler that changes something calls this once it succeeded.
    pub async fn audit(&self, actor: &crate::audit::Actor, change: crate::audit::Change) -> Result<crate::audit::AuditEntry, StateError> {
        let audit = self.audit.clone();
        let (actor, at_ms) = (actor.clone(), self.clock.now_millis());
        let entry = tokio::task::spawn_blocking(move || audit.append(&actor, change, at_ms))
            .await
            .map_err(|e| StateError::Invalid(format!("audit write failed: {e}")))??;
        Ok(entry)
    }

    /// Audit entries at or after `since_ms`, for one grant or all, oldest first.
    pub async fn audit_entries(&self, since_ms: i64, grant: Option<String>) -> Result<Vec<crate::audit::AuditEntry>, StateError> {
        let audit = self.audit.clone();
        let entries = tokio::task::spawn_blocking(move || audit.entries(since_ms, grant.as_deref()))
            .await
            .map_err(|e| StateError::Invalid(format!("audit read failed: {e}")))??;
        Ok(entries)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn set_listen_addr(&self, addr: SocketAddr) {
        let _ = self.listen_addr.set(addr);
    }

    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr.get().copied()
    }

    pub fn home(&self) -> &PathBuf {
        &self.home
    }

    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- reports ----

    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let registry = self.read();
        (registry.by_name.len(), registry.grants.len(), registry.keys.len(), registry.providers.len())
    }

    /// Ledger entries since `since_ms`, for one grant or all, including every settlement made
    /// before the call (settlements are written behind the replies they end).
    pub async fn usage(&self, grant: Option<GrantId>, since_ms: i64) -> Result<Vec<LedgerEntry>, StateError> {
        self.store.write(WriteOp::Barrier).await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.entries(grant, since_ms))
            .await
            .map_err(|e| StateError::Invalid(format!("usage query failed: {e}")))?
            .map_err(StateError::from)
    }

    pub fn grant_names(&self) -> HashMap<GrantId, String> {
        let slots: Vec<Arc<GrantSlot>> = self.read().grants.values().cloned().collect();
        slots.iter().map(|s| (s.id, s.name())).collect()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::ledger::EntryStatus;
    use crate::usage::Usage;

    pub(crate) fn temp_state(clock: Clock) -> (State, std::path::PathBuf) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!("capit-state-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
        (State::with_clock(store, snapshot, dir.clone(), clock).unwrap(), dir)
    }

    pub(crate) fn entry(state: &State, grant: GrantId, cost: Decimal) -> LedgerEntry {
        LedgerEntry {
            grant,
            at_ms: state.clock().now_millis(),
            model: "m".into(),
            api: "chat.completions".into(),
            usage: Usage::default(),
            cost,
            status: EntryStatus::Metered,
            http_status: 200,
            error: None,
        }
    }

    pub(crate) fn grant_spec(period: Period, expires_at: Option<i64>) -> GrantSpec {
        GrantSpec {
            name: "g".into(),
            provider: "openai".into(),
            cap: Decimal::ONE,
            period,
            expires_at,
            models: vec![],
            note: String::new(),
            created_by: "t".into(),
            limits: Limits::default(),
            apis: vec![],
            provider_key: None,
            direct: false,
            alerts: None,
            team: None,
        }
    }

    pub(crate) fn dollars(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    /// A request that holds exactly `cost`.
    pub(crate) fn hold_of(cost: Decimal) -> Demand {
        Demand { input_cost: cost, input_tokens: 0, output_tokens: 0, output_rate: Decimal::ZERO, fit_at_least: None }
    }
}
