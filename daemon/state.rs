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

mod provider_keys;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// The daemon's time: the system clock plus an offset that is zero in the daemon and that
/// tests advance to cross period boundaries and expiries without waiting.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now_millis(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn now_seconds(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }

    /// Moves this clock (and every `State` sharing it) forward.
    pub fn advance(&self, by: std::time::Duration) {
        self.offset_ms.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// The spend window of `period` containing `at` in the user's local time zone.
pub fn local_window(period: Period, at: i64) -> Window {
    use chrono::TimeZone;
    match chrono::Local.timestamp_opt(at, 0).single() {
        Some(local) => period.window(&local),
        None => Window { start: 0, end: None },
    }
}

/// A master key in memory.
#[derive(Clone)]
pub struct MasterKey {
    pub secret: Arc<Secret>,
    pub added_at: i64,
    /// Stored sealed under the keyring's data key (else as text in the database).
    pub sealed: bool,
}

/// One grant and its spend in the current window.
pub struct GrantSlot {
    pub id: GrantId,
    live: Mutex<GrantLive>,
    /// Woken whenever room may have come free (a hold settled, released or shrunk, a waiter
    /// left), so that waiting requests try again.
    changed: tokio::sync::Notify,
}

struct GrantLive {
    grant: Grant,
    window: Window,
    spent: Decimal,
    /// The sum of the bounds of admitted requests not yet settled. It belongs to no window:
    /// a request admitted before a reset still holds its amount until it settles.
    reserved: Decimal,
    /// Counts for the grant's count and rate limits.
    counts: Counts,
    /// Requests refused, by reason, over the grant's life.
    refusals: BTreeMap<String, u64>,
    /// Requests arrived and not yet admitted or refused.
    arriving: u64,
    /// Tickets of requests waiting for room, first come first served.
    queue: VecDeque<u64>,
    next_ticket: u64,
}

/// What count and rate limits are checked against, kept beside the money.
#[derive(Default)]
struct Counts {
    /// Requests admitted over the grant's life, in flight included.
    requests: u64,
    /// Tokens settled over the grant's life plus the token bounds of requests in flight.
    tokens: u64,
    in_flight: u64,
    /// Admission times (Unix ms) within the last minute.
    recent_requests: VecDeque<i64>,
    /// Settlement times and token counts within the last minute.
    recent_tokens: VecDeque<(i64, u64)>,
}

const MINUTE_MS: i64 = 60_000;

impl Counts {
    fn from_lifetime(totals: &Totals) -> Counts {
        Counts { requests: totals.requests, tokens: totals.input_tokens.saturating_add(totals.output_tokens), ..Counts::default() }
    }

    /// Forgets what left the last minute, then says where the grant stands.
    fn usage(&mut self, now_ms: i64) -> crate::grants::Usage {
        while self.recent_requests.front().is_some_and(|&at| at <= now_ms - MINUTE_MS) {
            self.recent_requests.pop_front();
        }
        while self.recent_tokens.front().is_some_and(|&(at, _)| at <= now_ms - MINUTE_MS) {
            self.recent_tokens.pop_front();
        }
        let tokens_last_minute = self.recent_tokens.iter().map(|(_, n)| n).sum();
        crate::grants::Usage {
            requests: self.requests,
            tokens: self.tokens,
            in_flight: self.in_flight,
            requests_last_minute: self.recent_requests.len() as u64,
            requests_free_at: self.recent_requests.front().map_or(now_ms, |at| at + MINUTE_MS),
            tokens_last_minute,
            tokens_free_at: self.recent_tokens.front().map_or(now_ms, |(at, _)| at + MINUTE_MS),
        }
    }
}

/// How long and how many requests may wait for holds in flight to settle, per grant.
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    pub timeout: std::time::Duration,
    pub depth: usize,
}

/// An admitted request's hold on its grant's budget. Settling it swaps the hold for the
/// metered cost; dropping it unsettled (a request that never reached the upstream) releases it.
pub struct Reservation {
    slot: Arc<GrantSlot>,
    amount: Decimal,
    tokens: u64,
    settled: bool,
    /// The hold's id in the store and what was written there, once it was (holds of $0 are not).
    durable: Option<(u64, StoredReservation)>,
    store: Store,
    /// When the request was admitted, for the latency its settlement reports.
    admitted_at: Instant,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("grant", &self.slot.id).field("amount", &self.amount).field("tokens", &self.tokens).finish()
    }
}

impl Reservation {
    pub fn grant(&self) -> GrantId {
        self.slot.id
    }

    pub fn amount(&self) -> Decimal {
        self.amount
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            let mut live = self.slot.lock();
            live.reserved -= self.amount;
            live.counts.in_flight -= 1;
            live.counts.tokens = live.counts.tokens.saturating_sub(self.tokens);
            live.counts.requests -= 1;
            drop(live);
            self.slot.changed.notify_waiters();
            if let Some((id, _)) = &self.durable {
                drop(self.store.submit(WriteOp::DeleteReservation { id: *id }));
            }
        }
    }
}

/// A request that has arrived for a grant and is not yet admitted or refused; while it lives it
/// counts among those a fitted request shares what is left with.
pub struct Arrival {
    slot: Arc<GrantSlot>,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut live = self.slot.lock();
        live.arriving = live.arriving.saturating_sub(1);
    }
}

/// A place in a grant's queue of requests waiting for holds in flight to settle. Leaving it
/// (admitted, refused, timed out, or the client gone) wakes the others.
struct QueueTicket {
    slot: Arc<GrantSlot>,
    id: u64,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.slot.lock().queue.retain(|t| *t != self.id);
        self.slot.changed.notify_waiters();
    }
}

/// One admission attempt's outcome.
enum Attempt {
    Admitted(Reservation, Hold),
    Wait(Refusal),
    Refused(Refusal),
}

/// What an import or update of prices did.
#[derive(Debug)]
pub struct PriceUpdate {
    pub imported: usize,
    /// Entries of other modes or without token prices.
    pub skipped: usize,
    /// Every model whose effective price moved, by name.
    pub changes: Vec<PriceChange>,
}

/// A grant as listings show it.
#[derive(Clone, Debug)]
pub struct GrantView {
    pub grant: Grant,
    pub spent: Decimal,
    /// Held by admitted requests still in flight.
    pub reserved: Decimal,
    pub state: GrantState,
    pub window: Window,
    /// Requests refused over the grant's life, by reason.
    pub refusals: BTreeMap<String, u64>,
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
    /// Ids for durable holds; unique within one run (a start clears every earlier hold).
    next_request_id: AtomicU64,
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
        charge_interrupted(&store, &snapshot.grants, snapshot.reservations, now)?;
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
            let slot = GrantSlot::new(grant, window, spent, counts, lifetime.refused);
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
            next_request_id: AtomicU64::new(1),
            clock,
            access: crate::access::AccessRequests::new(crate::access::AccessConfig::default()),
            installation_id: snapshot.installation_id,
            events: crate::events::Events::new(),
            audit,
            key_protection: OnceLock::new(),
            refusal_log: crate::log_throttle::KeyedLogThrottle::new(std::time::Duration::from_secs(1)),
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

    // ---- master keys ----

    /// Says how master keys are kept at rest from now on (set once, at start).
    pub fn set_key_protection(&self, protection: crate::keyring::KeyProtection) {
        let _ = self.key_protection.set(protection);
    }

    /// Where new master keys go at rest: `("keyring" | "file", a sentence saying why)`.
    pub fn key_storage(&self) -> (&'static str, String) {
        match self.key_protection.get() {
            Some(protection) => (protection.at_rest(), protection.detail.clone()),
            None => ("file", "master keys are stored as text in the 0600 database".into()),
        }
    }

    /// A provider key as it is stored: sealed under the keyring's data key when there is one.
    fn stored_key(&self, name: &str, secret: &Secret, added_at: i64) -> Result<StoredKey, StateError> {
        match self.key_protection.get().and_then(|p| p.sealer.as_ref()) {
            Some(sealer) => Ok(StoredKey {
                secret: None,
                sealed: Some(sealer.seal(name, secret).map_err(|e| StateError::Invalid(e.to_string()))?),
                added_at,
            }),
            None => Ok(StoredKey { secret: Some(zeroize::Zeroizing::new(secret.expose().to_string())), sealed: None, added_at }),
        }
    }

    pub async fn add_key(&self, provider: &str, secret: Secret) -> Result<(String, i64), StateError> {
        let secret = provider_key_text(&secret)?;
        let _admin = self.admin.lock().await;
        if !self.read().providers.contains_key(provider) {
            return Err(StateError::UnknownProvider(provider.to_string()));
        }
        let added_at = self.clock.now_seconds();
        let stored = self.stored_key(provider, &secret, added_at)?;
        let sealed = stored.sealed.is_some();
        self.store.write(WriteOp::PutKey { provider: provider.to_string(), key: stored }).await?;
        let fingerprint = secret.fingerprint();
        let key = MasterKey { secret: Arc::new(secret), added_at, sealed };
        self.write().keys.insert(provider.to_string(), key);
        Ok((fingerprint, added_at))
    }

    pub async fn remove_key(&self, provider: &str) -> Result<(), StateError> {
        let _admin = self.admin.lock().await;
        if !self.read().keys.contains_key(provider) {
            return Err(StateError::NoKey(provider.to_string()));
        }
        self.store.write(WriteOp::DeleteKey { provider: provider.to_string() }).await?;
        self.write().keys.remove(provider);
        Ok(())
    }

    /// (provider, fingerprint, added_at, sealed in the keyring) of every stored key.
    pub fn list_keys(&self) -> Vec<(String, String, i64, bool)> {
        self.read().keys.iter().map(|(p, k)| (p.clone(), k.secret.fingerprint(), k.added_at, k.sealed)).collect()
    }

    // ---- providers ----

    pub fn list_providers(&self) -> Vec<(Provider, bool)> {
        let registry = self.read();
        registry.providers.values().map(|p| (p.clone(), registry.keys.contains_key(&p.name))).collect()
    }

    pub fn provider(&self, name: &str) -> Option<Provider> {
        self.read().providers.get(name).cloned()
    }

    pub async fn set_provider(&self, name: &str, base_url: Option<&str>, price_zero: Option<bool>) -> Result<Provider, StateError> {
        let _admin = self.admin.lock().await;
        let mut provider = self.provider(name).ok_or_else(|| StateError::UnknownProvider(name.to_string()))?;
        if let Some(url) = base_url {
            provider.base_url = providers::normalize_base_url(url)?;
        }
        if let Some(zero) = price_zero {
            provider.price_zero = zero;
        }
        self.store.write(WriteOp::PutProvider(provider.clone())).await?;
        self.write().providers.insert(name.to_string(), provider.clone());
        Ok(provider)
    }

    pub async fn add_provider(&self, name: &str, kind: &str, base_url: &str, price_zero: bool) -> Result<Provider, StateError> {
        providers::validate_name(name)?;
        let kind = match ProviderKind::parse(kind) {
            Some(ProviderKind::OpenAiCompatible) => ProviderKind::OpenAiCompatible,
            _ => return Err(ProviderError::BadKind(kind.to_string()).into()),
        };
        let base_url = providers::normalize_base_url(base_url)?;
        let _admin = self.admin.lock().await;
        if self.read().providers.contains_key(name) {
            return Err(StateError::ProviderExists(name.to_string()));
        }
        let provider = Provider { name: name.to_string(), kind, base_url, price_zero };
        self.store.write(WriteOp::PutProvider(provider.clone())).await?;
        self.write().providers.insert(name.to_string(), provider.clone());
        Ok(provider)
    }

    // ---- prices ----

    /// Every priced model with the layer its price comes from and, above the built-in rows,
    /// where and when it was set.
    pub fn list_prices(&self) -> Vec<(String, Price, PriceSource, Option<Provenance>)> {
        self.read().prices.entries().into_iter().map(|r| (r.model.to_string(), r.price.clone(), r.source, r.origin.cloned())).collect()
    }

    /// Where the fetched price list came from, if there is one.
    pub fn price_list_origin(&self) -> Option<Provenance> {
        self.read().prices.list_origin().cloned()
    }

    pub fn price(&self, model: &str) -> Option<(String, Price)> {
        self.read().prices.lookup(model).map(|(name, price)| (name.to_string(), price.clone()))
    }

    pub async fn set_price(&self, model: &str, price: Price) -> Result<Price, StateError> {
        crate::pricing::validate_model_name(model)?;
        price.validate()?;
        let origin = Provenance { source: "price set".into(), at: self.clock.now_seconds() };
        let _admin = self.admin.lock().await;
        self.store.write(WriteOp::PutPrice { model: model.to_string(), price: price.clone(), origin: origin.clone() }).await?;
        self.write().prices.set_override(model.to_string(), price.clone(), origin);
        Ok(price)
    }

    /// Imports a LiteLLM price file as the user's own prices: every row or none.
    pub async fn import_prices(&self, litellm_json: &str, source: &str) -> Result<PriceUpdate, StateError> {
        let (prices, skipped) = crate::pricing::litellm::parse(litellm_json)?;
        let origin = Provenance { source: format!("import {source}"), at: self.clock.now_seconds() };
        let _admin = self.admin.lock().await;
        let (before, mut after) = {
            let registry = self.read();
            (registry.prices.clone(), registry.prices.clone())
        };
        for (model, price) in &prices {
            after.set_override(model.clone(), price.clone(), origin.clone());
        }
        let changes = before.changes(&after);
        let imported = prices.len();
        self.store.write(WriteOp::PutPrices { prices, origin }).await?;
        self.write().prices = after;
        Ok(PriceUpdate { imported, skipped, changes })
    }

    /// Puts a fetched LiteLLM price list in place of the previous one: every row or none. The
    /// user's own prices stay on top of it.
    pub async fn update_prices(&self, litellm_json: &str, source: &str) -> Result<PriceUpdate, StateError> {
        let (prices, skipped) = crate::pricing::litellm::parse(litellm_json)?;
        let origin = Provenance { source: source.to_string(), at: self.clock.now_seconds() };
        let _admin = self.admin.lock().await;
        let (before, mut after) = {
            let registry = self.read();
            (registry.prices.clone(), registry.prices.clone())
        };
        after.replace_list(prices.iter().cloned().collect(), Some(origin.clone()));
        let changes = before.changes(&after);
        let imported = prices.len();
        self.store.write(WriteOp::ReplacePriceList { prices, origin }).await?;
        self.write().prices = after;
        Ok(PriceUpdate { imported, skipped, changes })
    }

    // ---- grants ----

    /// Checks a new grant as [`create_grant`](Self::create_grant) will, without making it: for
    /// callers that must do something first (make the provider's key) only for a valid grant.
    /// Returns the id the grant will get and its models, cleaned.
    pub fn check_new_grant(&self, spec: &GrantSpec) -> Result<(GrantId, Vec<String>), StateError> {
        self.check_grant(spec, false)
    }

    /// Checks a grant meant to replace the active one of its name, without making it.
    pub fn check_replacement(&self, spec: &GrantSpec) -> Result<(), StateError> {
        self.check_grant(spec, true).map(|_| ())
    }

    /// As `check_new_grant`; with `replace`, an active grant of the same name is no obstacle.
    fn check_grant(&self, spec: &GrantSpec, replace: bool) -> Result<(GrantId, Vec<String>), StateError> {
        crate::grants::validate_name(&spec.name)?;
        let now = self.clock.now_seconds();
        if spec.expires_at.is_some_and(|at| at <= now) {
            return Err(GrantError::ExpiryInPast.into());
        }
        let models: Vec<String> = spec.models.iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
        for model in &models {
            crate::pricing::validate_model_name(model)?;
        }
        if spec.note.len() > 1000 || spec.created_by.len() > 200 {
            return Err(StateError::Invalid("the note must be at most 1000 bytes".into()));
        }
        let registry = self.read();
        if !registry.providers.contains_key(&spec.provider) {
            return Err(StateError::UnknownProvider(spec.provider.clone()));
        }
        if registry.by_name.contains_key(&spec.name) && !replace {
            return Err(StateError::GrantExists(spec.name.clone()));
        }
        Ok((GrantId(registry.next_grant_id), models))
    }

    /// Mints a grant and its virtual key; the key is returned once and only its hash is kept.
    pub async fn create_grant(&self, spec: GrantSpec) -> Result<(GrantView, Secret), StateError> {
        self.mint(spec, false).await.map(|(view, key, _)| (view, key))
    }

    /// Like `create_grant`, but an active grant of the same name is revoked in the same write,
    /// once the new one has passed every check: a bad cap, period or model changes nothing.
    /// Returns the grant replaced, if there was one.
    pub async fn replace_grant(&self, spec: GrantSpec) -> Result<(GrantView, Secret, Option<GrantView>), StateError> {
        self.mint(spec, true).await
    }

    async fn mint(&self, spec: GrantSpec, replace: bool) -> Result<(GrantView, Secret, Option<GrantView>), StateError> {
        let now = self.clock.now_seconds();
        let _admin = self.admin.lock().await;
        let (id, models) = self.check_grant(&spec, replace)?;
        let key = secret::generate_virtual_key()?;
        let old = if replace { self.active_slot(&spec.name).ok() } else { None };
        let grant = Grant {
            id,
            name: spec.name,
            provider: spec.provider,
            cap: spec.cap,
            period: spec.period,
            expires_at: spec.expires_at,
            models,
            key_hash: KeyHash::of(key.expose()),
            created_at: now,
            created_by: spec.created_by,
            note: spec.note,
            revoked_at: None,
            limits: spec.limits,
            installs: Vec::new(),
            apis: spec.apis,
            provider_key: spec.provider_key.map(Box::new),
            direct: spec.direct,
            alerts: match spec.alerts {
                Some(alerts) => crate::grants::validate_alerts(&alerts)?,
                None => crate::grants::DEFAULT_ALERTS.to_vec(),
            },
        };
        let revoked = old.as_ref().map(|slot| Grant { revoked_at: Some(now), ..slot.grant() });
        match &revoked {
            Some(revoked) => self.store.write(WriteOp::PutGrants(vec![revoked.clone(), grant.clone()])).await?,
            None => self.store.write(WriteOp::PutGrant(grant.clone())).await?,
        }
        let window = local_window(grant.period, now);
        let view = GrantView {
            state: grant.state(now, Decimal::ZERO),
            spent: Decimal::ZERO,
            reserved: Decimal::ZERO,
            window,
            grant: grant.clone(),
            refusals: BTreeMap::new(),
        };
        let mut registry = self.write();
        if let (Some(slot), Some(revoked)) = (&old, revoked) {
            registry.by_hash.remove(&revoked.key_hash);
            registry.by_name.remove(&revoked.name);
            slot.lock().grant = revoked;
        }
        registry.next_grant_id = id.0 + 1;
        registry.by_hash.insert(grant.key_hash, id);
        registry.by_name.insert(grant.name.clone(), id);
        let slot = GrantSlot::new(grant, window, Decimal::ZERO, Counts::default(), BTreeMap::new());
        registry.grants.insert(id, Arc::new(slot));
        drop(registry);
        let replaced = old.map(|slot| self.grant_view(&slot));
        Ok((view, key, replaced))
    }

    pub fn list_grants(&self, include_revoked: bool) -> Vec<GrantView> {
        let now = self.clock.now_seconds();
        let slots: Vec<Arc<GrantSlot>> = self.read().grants.values().cloned().collect();
        slots.iter().map(|slot| slot.view(now, &self.store)).filter(|view| include_revoked || view.state != GrantState::Revoked).collect()
    }

    /// The grant by name: the active one, or else the most recent revoked one.
    pub fn find_grant(&self, name: &str) -> Option<Arc<GrantSlot>> {
        let registry = self.read();
        if let Some(id) = registry.by_name.get(name) {
            return registry.grants.get(id).cloned();
        }
        registry.grants.values().rev().find(|slot| slot.name() == name).cloned()
    }

    pub fn grant_view(&self, slot: &GrantSlot) -> GrantView {
        slot.view(self.clock.now_seconds(), &self.store)
    }

    /// The grant as [`update_grant`](Self::update_grant) would leave it, without changing it.
    pub fn preview_update(&self, name: &str, update: &GrantUpdate) -> Result<Grant, StateError> {
        let slot = self.active_slot(name)?;
        apply_update(slot.grant(), update.clone(), self.clock.now_seconds())
    }

    /// Changes a grant's limits in place; its key, spend and ledger stay.
    pub async fn update_grant(&self, name: &str, update: GrantUpdate) -> Result<GrantView, StateError> {
        let now = self.clock.now_seconds();
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let grant = apply_update(slot.grant(), update, now)?;
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        {
            let mut live = slot.lock();
            let period_changed = live.grant.period != grant.period;
            live.grant = grant;
            if period_changed {
                // The new period's window and its spend so far, from the ledger's totals.
                live.window = Window { start: 0, end: Some(0) };
                live.roll(now, slot.id, &self.store);
            }
        }
        self.events.spend_changed(&slot.standing(), self.clock.now_millis());
        Ok(self.grant_view(&slot))
    }

    /// Mints a new key for a grant; the old key stops working at once. Spend and limits stay.
    pub async fn rotate_grant(&self, name: &str) -> Result<(GrantView, Secret), StateError> {
        self.rotate_grant_with(name, None).await
    }

    /// As [`rotate_grant`](Self::rotate_grant), replacing the grant's provider key in the same
    /// write when one is given.
    pub async fn rotate_grant_with(
        &self,
        name: &str,
        provider_key: Option<crate::backstop::ProviderKey>,
    ) -> Result<(GrantView, Secret), StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let key = secret::generate_virtual_key()?;
        let mut grant = slot.grant();
        let old_hash = grant.key_hash;
        grant.key_hash = KeyHash::of(key.expose());
        if let Some(key) = provider_key {
            grant.provider_key = Some(Box::new(key));
        }
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        {
            let mut registry = self.write();
            registry.by_hash.remove(&old_hash);
            registry.by_hash.insert(grant.key_hash, slot.id);
        }
        slot.lock().grant = grant;
        Ok((self.grant_view(&slot), key))
    }

    /// Remembers (or, when empty, forgets) the files capitctl changed for a grant.
    pub async fn record_install(&self, name: &str, installs: Vec<crate::grants::InstallRecord>) -> Result<(), StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let mut grant = slot.grant();
        grant.installs = installs;
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        slot.lock().grant = grant;
        Ok(())
    }

    fn active_slot(&self, name: &str) -> Result<Arc<GrantSlot>, StateError> {
        let registry = self.read();
        let id = registry.by_name.get(name).ok_or_else(|| StateError::UnknownGrant(name.to_string()))?;
        registry.grants.get(id).cloned().ok_or_else(|| StateError::UnknownGrant(name.to_string()))
    }

    /// Kills a grant's key at once. The record and its ledger stay.
    pub async fn revoke_grant(&self, name: &str) -> Result<GrantView, StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let mut revoked = slot.grant();
        revoked.revoked_at = Some(self.clock.now_seconds());
        self.store.write(WriteOp::PutGrant(revoked.clone())).await?;
        {
            let mut registry = self.write();
            registry.by_hash.remove(&revoked.key_hash);
            registry.by_name.remove(&revoked.name);
        }
        slot.lock().grant = revoked;
        Ok(self.grant_view(&slot))
    }

    // ---- the proxy's side ----

    /// Finds the grant a presented virtual key belongs to, for a request to `provider`.
    pub fn authenticate(&self, presented: Option<&str>, provider: &str) -> Result<Arc<GrantSlot>, AuthFailure> {
        let presented = presented.ok_or(AuthFailure::Missing)?;
        let hash = KeyHash::of(presented);
        let registry = self.read();
        let id = registry.by_hash.get(&hash).ok_or(AuthFailure::Unknown)?;
        let slot = registry.grants.get(id).ok_or(AuthFailure::Unknown)?;
        let live = slot.lock();
        if !live.grant.key_hash.ct_eq(&hash) {
            return Err(AuthFailure::Unknown);
        }
        if live.grant.provider != provider {
            return Err(AuthFailure::WrongProvider { grant: live.grant.name.clone(), provider: live.grant.provider.clone() });
        }
        drop(live);
        Ok(slot.clone())
    }

    /// The provider and its master key, for forwarding.
    pub fn upstream(&self, provider: &str) -> Result<Upstream, StateError> {
        let registry = self.read();
        let provider = registry.providers.get(provider).cloned().ok_or_else(|| StateError::UnknownProvider(provider.to_string()))?;
        let key = registry.keys.get(&provider.name).map(|k| k.secret.clone()).ok_or_else(|| StateError::NoKey(provider.name.clone()))?;
        Ok(Upstream { provider, key })
    }

    /// Counts a request among those arriving for `slot` until the returned guard is dropped
    /// (admitted, refused, or gone): a fitted request shares what is left with them.
    pub fn arrive(&self, slot: &Arc<GrantSlot>) -> Arrival {
        slot.lock().arriving += 1;
        Arrival { slot: slot.clone() }
    }

    /// Admits a request for `model` asking `demand`, holding its hold against the cap until it
    /// settles. When only holds in flight are in the way it waits, first come first served, for
    /// at most `wait.timeout` (and only `wait.depth` may wait at once), then gives up with a
    /// refusal that says when to retry. Check and hold happen under the grant's one mutex, so
    /// concurrent requests can never together be admitted past the cap.
    pub async fn admit(
        &self,
        slot: &Arc<GrantSlot>,
        model: &str,
        demand: &Demand,
        wait: WaitPolicy,
    ) -> Result<(Reservation, Hold), Refusal> {
        let started = tokio::time::Instant::now();
        let mut ticket: Option<QueueTicket> = None;
        loop {
            let changed = slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_admit(slot, model, demand, ticket.as_ref().map(|t| t.id)) {
                Attempt::Admitted(reservation, hold) => {
                    drop(ticket);
                    return Ok((reservation, hold));
                }
                Attempt::Refused(refusal) => return Err(refusal),
                Attempt::Wait(busy) => {
                    if ticket.is_none() {
                        let mut live = slot.lock();
                        if live.queue.len() >= wait.depth {
                            return Err(busy.with_wait(0, Some(wait.depth)));
                        }
                        let id = live.next_ticket;
                        live.next_ticket += 1;
                        live.queue.push_back(id);
                        drop(live);
                        ticket = Some(QueueTicket { slot: slot.clone(), id });
                        continue;
                    }
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = tokio::time::sleep_until(started + wait.timeout) => {
                            return Err(busy.with_wait(started.elapsed().as_secs(), None));
                        }
                    }
                }
            }
        }
    }

    /// True when `demand` would be admitted now with its output as asked: then the bound from
    /// its bytes is good enough, and nobody needs to count its input exactly.
    pub fn would_admit_whole(&self, slot: &GrantSlot, demand: &Demand) -> bool {
        let mut live = slot.lock();
        live.roll(self.clock.now_seconds(), slot.id, &self.store);
        let room = Room {
            cap: live.grant.cap,
            spent: live.spent,
            reserved: live.reserved,
            in_flight: live.counts.in_flight,
            competing: live.arriving.max(1),
        };
        matches!(crate::admission::decide(&room, demand), Decision::Admit(Hold { fitted: false, .. })) && live.queue.is_empty()
    }

    /// Admits a request now or refuses it, never waiting (what a request that would have to
    /// wait gets is the refusal it would time out with).
    pub fn admit_now(&self, slot: &Arc<GrantSlot>, model: &str, demand: &Demand) -> Result<(Reservation, Hold), Refusal> {
        match self.try_admit(slot, model, demand, None) {
            Attempt::Admitted(reservation, hold) => Ok((reservation, hold)),
            Attempt::Wait(refusal) | Attempt::Refused(refusal) => Err(refusal),
        }
    }

    /// One attempt under the grant's lock. A request that is not at the head of the queue (or,
    /// not queued yet, finds a queue) waits its turn.
    fn try_admit(&self, slot: &Arc<GrantSlot>, model: &str, demand: &Demand, ticket: Option<u64>) -> Attempt {
        let now_ms = self.clock.now_millis();
        let now = now_ms.div_euclid(1000);
        let mut live = slot.lock();
        live.roll(now, slot.id, &self.store);
        if let Err(refusal) = live.grant.check_alive(now).and_then(|()| live.grant.check_model(model)) {
            return Attempt::Refused(refusal);
        }
        let room = Room {
            cap: live.grant.cap,
            spent: live.spent,
            reserved: live.reserved,
            in_flight: live.counts.in_flight,
            competing: live.arriving.max(1),
        };
        let busy = |least: Decimal, live: &GrantLive| Refusal::Busy {
            grant: live.grant.name.clone(),
            left: room.free_when_idle(),
            held: live.reserved,
            least,
            waited_seconds: 0,
            queue_full: None,
        };
        let my_turn = match (ticket, live.queue.front()) {
            (Some(mine), Some(head)) => mine == *head,
            (None, head) => head.is_none(),
            (Some(_), None) => true,
        };
        let hold = match crate::admission::decide(&room, demand) {
            Decision::Spent => {
                return Attempt::Refused(Refusal::Exhausted {
                    grant: live.grant.name.clone(),
                    spent: live.spent,
                    cap: live.grant.cap,
                    period: live.grant.period,
                    resets_at: live.window.end,
                });
            }
            Decision::TooBig { left, least, output_tokens } => {
                return Attempt::Refused(Refusal::WouldExceed {
                    grant: live.grant.name.clone(),
                    left,
                    least,
                    cap: live.grant.cap,
                    period: live.grant.period,
                    resets_at: live.window.end,
                    output_tokens: demand.fit_at_least.map(|_| output_tokens),
                });
            }
            Decision::Wait => return Attempt::Wait(busy(demand.cost_least(), &live)),
            Decision::Admit(_) if !my_turn => return Attempt::Wait(busy(demand.cost_least(), &live)),
            Decision::Admit(hold) => hold,
        };
        let used = live.counts.usage(now_ms);
        if let Err(refusal) = live.grant.check_limits(now_ms, &used, hold.tokens) {
            return Attempt::Refused(refusal);
        }
        live.reserved += hold.amount;
        let counts = &mut live.counts;
        counts.requests += 1;
        counts.tokens = counts.tokens.saturating_add(hold.tokens);
        counts.in_flight += 1;
        counts.recent_requests.push_back(now_ms);
        drop(live);
        let reservation = Reservation {
            slot: slot.clone(),
            amount: hold.amount,
            tokens: hold.tokens,
            settled: false,
            durable: None,
            store: self.store.clone(),
            admitted_at: Instant::now(),
        };
        Attempt::Admitted(reservation, hold)
    }

    /// Queues a hold for the store and returns the receiver that resolves once it is committed
    /// (with the next batch); `None` for a hold of $0, which is not written. The request must not
    /// be billable upstream before then: a crash after the commit charges the hold.
    pub fn make_durable(
        &self,
        reservation: &mut Reservation,
        model: &str,
        api: &str,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>> {
        if reservation.amount.is_zero() || reservation.durable.is_some() {
            return None;
        }
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let stored = StoredReservation {
            grant: reservation.grant(),
            amount: reservation.amount,
            model: model.to_string(),
            api: api.to_string(),
            at_ms: self.clock.now_millis(),
        };
        reservation.durable = Some((id, stored.clone()));
        Some(self.store.submit(WriteOp::PutReservation { id, reservation: stored }))
    }

    /// Changes an admitted request's hold to `amount` once its reply has said more about its
    /// cost (its input, stated first). Shrinking always succeeds and gives the room back at once;
    /// growing succeeds only if the room is there. The stored hold follows with the next batch,
    /// before any hold admitted into the freed room can commit.
    pub fn resize_hold(&self, reservation: &mut Reservation, amount: Decimal) -> bool {
        if amount == reservation.amount || amount.is_sign_negative() {
            return amount == reservation.amount;
        }
        let mut live = reservation.slot.lock();
        if amount > reservation.amount {
            let more = amount - reservation.amount;
            let free = live.grant.cap.checked_sub(live.spent).and_then(|f| f.checked_sub(live.reserved)).unwrap_or(Decimal::ZERO);
            if more > free {
                return false;
            }
            live.reserved += more;
        } else {
            live.reserved -= reservation.amount - amount;
        }
        drop(live);
        reservation.amount = amount;
        if let Some((id, stored)) = reservation.durable.as_mut() {
            stored.amount = amount;
            drop(self.store.submit(WriteOp::PutReservation { id: *id, reservation: stored.clone() }));
        }
        reservation.slot.changed.notify_waiters();
        true
    }

    /// Leaves a trace of a request refused (or failed by the daemon) after its grant was known:
    /// counted by reason for `ls` and `usage` (kept in the store with the next batch), and
    /// logged with what the refusal said.
    pub fn note_refusal(&self, slot: &GrantSlot, model: Option<&str>, reason: &'static str, message: &str) {
        let mut live = slot.lock();
        live.roll(self.clock.now_seconds(), slot.id, &self.store);
        *live.refusals.entry(reason.to_string()).or_default() += 1;
        let grant = live.grant.name.clone();
        let window_start = live.window.start;
        drop(live);
        drop(self.store.submit(WriteOp::CountRefusal { grant: slot.id, window_start, reason: reason.to_string() }));
        // An agent retrying a refused request would repeat the line at its retry rate: once a
        // second per grant and reason, with how many were held back (all are counted above).
        if let Some(held_back) = self.refusal_log.allow((slot.id.0, reason)) {
            tracing::info!(grant = %grant, model = model.unwrap_or("-"), reason, held_back, "refused: {message}");
        }
        self.events.refused(grant, model, reason, message, self.clock.now_millis());
    }

    /// Checks that a grant may make free calls (model lists): not revoked, not expired.
    pub fn admit_free(&self, slot: &GrantSlot, now: i64) -> Result<(), Refusal> {
        slot.lock().grant.check_alive(now)
    }

    /// Refuses a billable API outside the grant's scope.
    pub fn check_api(&self, slot: &GrantSlot, api: crate::providers::MeteredApi) -> Result<(), Refusal> {
        slot.lock().grant.check_api(Api::of(api))
    }

    /// The grant's own answer before any pricing: alive, and the model allowed.
    pub fn precheck(&self, slot: &GrantSlot, model: &str, now: i64) -> Result<(), Refusal> {
        let live = slot.lock();
        live.grant.check_alive(now)?;
        live.grant.check_model(model)
    }

    /// Records a finished request: its hold is swapped for its cost at once, and the entry (with
    /// its running total, removing the stored hold) is written with the next batch; the returned
    /// receiver resolves then. Nobody needs to wait for it: until it commits, a crash charges the
    /// stored hold, which is never less than the cost.
    pub fn settle(&self, mut reservation: Reservation, entry: LedgerEntry) -> tokio::sync::oneshot::Receiver<Result<(), StoreError>> {
        let slot = reservation.slot.clone();
        let window_start = {
            let mut live = slot.lock();
            live.roll(entry.at_seconds(), slot.id, &self.store);
            live.reserved -= reservation.amount;
            // Costs are validated before they get here (pricing saturates, usage is bounded);
            // a spend that would overflow stays at the largest amount, exhausting the grant.
            live.spent = live.spent.checked_add(entry.cost).unwrap_or(Decimal::MAX);
            let used = entry.usage.input_tokens.saturating_add(entry.usage.output_tokens);
            let counts = &mut live.counts;
            counts.in_flight -= 1;
            counts.tokens = counts.tokens.saturating_sub(reservation.tokens).saturating_add(used);
            counts.recent_tokens.push_back((entry.at_ms, used));
            live.window.start
        };
        reservation.settled = true;
        self.events.settled(slot.standing(), &entry, reservation.admitted_at.elapsed());
        slot.changed.notify_waiters();
        let stored = reservation.durable.as_ref().map(|(id, _)| *id);
        self.store.submit(WriteOp::AppendEntry { entry, window_start, reservation: stored })
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

/// Charges every hold a crash left in the store at its amount, as `interrupted` ledger entries,
/// in one transaction, before the daemon loads spend and serves anything.
fn charge_interrupted(store: &Store, grants: &[Grant], holds: Vec<(u64, StoredReservation)>, now: i64) -> Result<(), StateError> {
    if holds.is_empty() {
        return Ok(());
    }
    let mut ops = Vec::with_capacity(holds.len());
    for (id, hold) in holds {
        let Some(grant) = grants.iter().find(|g| g.id == hold.grant) else {
            ops.push(WriteOp::DeleteReservation { id });
            continue;
        };
        let entry = LedgerEntry {
            grant: hold.grant,
            at_ms: now.saturating_mul(1000),
            model: hold.model,
            api: hold.api,
            usage: crate::usage::Usage::default(),
            cost: hold.amount,
            status: crate::ledger::EntryStatus::Interrupted,
            http_status: 0,
            error: Some("capitd stopped while the request was in flight; charged at its reservation".into()),
        };
        ops.push(WriteOp::AppendEntry { entry, window_start: local_window(grant.period, now).start, reservation: Some(id) });
    }
    tracing::warn!(requests = ops.len(), "charging requests that were in flight when capitd last stopped at their reservations");
    store.apply_now(&ops)?;
    Ok(())
}

/// A change to a grant: `None` leaves a field as it is. For the limits, `Some(0)` removes one.
#[derive(Clone, Debug, Default)]
pub struct GrantUpdate {
    pub cap: Option<Decimal>,
    pub period: Option<Period>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<i64>>,
    pub models: Option<Vec<String>>,
    pub note: Option<String>,
    pub max_requests: Option<u64>,
    pub max_tokens: Option<u64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u64>,
    pub fit: Option<bool>,
    /// `Some(empty)` removes the scope.
    pub apis: Option<Vec<Api>>,
    /// A new provider key (replacing the old one on the provider's side is the caller's part).
    pub provider_key: Option<crate::backstop::ProviderKey>,
    /// New alert thresholds in percent of the cap; empty turns alerts off.
    pub alerts: Option<Vec<u32>>,
}

/// A grant with `update` applied, checked.
fn apply_update(mut grant: Grant, update: GrantUpdate, now: i64) -> Result<Grant, StateError> {
    if let Some(cap) = update.cap {
        grant.cap = cap;
    }
    if let Some(period) = update.period {
        grant.period = period;
    }
    if let Some(expires_at) = update.expires_at {
        if expires_at.is_some_and(|at| at <= now) {
            return Err(GrantError::ExpiryInPast.into());
        }
        grant.expires_at = expires_at;
    }
    if let Some(models) = update.models {
        for model in &models {
            crate::pricing::validate_model_name(model)?;
        }
        grant.models = models;
    }
    if let Some(note) = update.note {
        grant.note = note;
    }
    let l = &mut grant.limits;
    for (slot_value, new) in [
        (&mut l.max_requests, update.max_requests),
        (&mut l.max_tokens, update.max_tokens),
        (&mut l.rpm, update.rpm),
        (&mut l.tpm, update.tpm),
        (&mut l.concurrency, update.concurrency),
    ] {
        if let Some(new) = new {
            *slot_value = (new > 0).then_some(new);
        }
    }
    if let Some(fit) = update.fit {
        grant.limits.fit = fit;
    }
    if let Some(apis) = update.apis {
        grant.apis = apis;
    }
    if let Some(key) = update.provider_key {
        grant.provider_key = Some(Box::new(key));
    }
    if let Some(alerts) = update.alerts {
        grant.alerts = crate::grants::validate_alerts(&alerts)?;
    }
    Ok(grant)
}

/// What a new grant is made of, as the control API hands it over (validated by `create_grant`).
#[derive(Clone, Debug)]
pub struct GrantSpec {
    pub name: String,
    pub provider: String,
    pub cap: Decimal,
    pub period: Period,
    pub expires_at: Option<i64>,
    pub models: Vec<String>,
    pub note: String,
    pub created_by: String,
    pub limits: Limits,
    pub apis: Vec<Api>,
    /// The provider's own capped key for the grant, made before the grant is.
    pub provider_key: Option<crate::backstop::ProviderKey>,
    /// The agent gets `provider_key` itself (no proxy).
    pub direct: bool,
    /// Alert thresholds in percent of the cap; `None` for the default (80 and 100).
    pub alerts: Option<Vec<u32>>,
}

/// A provider key's text, checked: one token, and not a capit key.
/// The key as pasted, trimmed and checked; itself a `Secret`, so no plain copy is made.
fn provider_key_text(secret: &Secret) -> Result<Secret, StateError> {
    let secret = secret.trimmed();
    let text = secret.expose();
    if text.is_empty() || text.len() > 4096 || text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(StateError::Invalid("the key is empty or has spaces or control characters".into()));
    }
    if secret::looks_like_virtual_key(text) {
        return Err(StateError::Invalid("that is a capit virtual key, not the provider's own key".into()));
    }
    Ok(secret)
}

impl GrantSlot {
    fn new(grant: Grant, window: Window, spent: Decimal, counts: Counts, refusals: BTreeMap<String, u64>) -> GrantSlot {
        let live = GrantLive {
            grant,
            window,
            spent,
            reserved: Decimal::ZERO,
            counts,
            refusals,
            arriving: 0,
            queue: VecDeque::new(),
            next_ticket: 0,
        };
        GrantSlot { id: live.grant.id, live: Mutex::new(live), changed: tokio::sync::Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GrantLive> {
        self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn grant(&self) -> Grant {
        self.lock().grant.clone()
    }

    pub fn name(&self) -> String {
        self.lock().grant.name.clone()
    }

    /// The grant lets a request's output be lowered to fit what is left (`--fit`).
    pub fn fit(&self) -> bool {
        self.lock().grant.limits.fit
    }

    /// The grant's spend as it stands, for the event hub and its alerts.
    pub fn standing(&self) -> crate::events::Standing {
        let live = self.lock();
        crate::events::Standing {
            id: self.id,
            name: live.grant.name.clone(),
            provider: live.grant.provider.clone(),
            cap: live.grant.cap,
            spent: live.spent,
            reserved: live.reserved,
            period: live.grant.period,
            window_start: live.window.start,
            alerts: live.grant.alerts.clone(),
        }
    }

    fn view(&self, now: i64, store: &Store) -> GrantView {
        let mut live = self.lock();
        live.roll(now, self.id, store);
        GrantView {
            grant: live.grant.clone(),
            spent: live.spent,
            reserved: live.reserved,
            state: live.grant.state(now, live.spent),
            window: live.window,
            refusals: live.refusals.clone(),
        }
    }
}

impl GrantLive {
    /// Moves to the window containing `at` when the period has turned over, taking that
    /// window's spend from the store's running totals (zero for a window not yet used).
    fn roll(&mut self, at: i64, id: GrantId, store: &Store) {
        if self.window.contains(at) {
            return;
        }
        self.window = local_window(self.grant.period, at);
        self.spent = match store.totals(id, self.window.start) {
            Ok(Totals { spent, .. }) => spent,
            Err(e) => {
                tracing::error!(error = %e, grant = id.0, "reading a grant's totals failed; counting from zero");
                Decimal::ZERO
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::EntryStatus;
    use crate::usage::Usage;

    fn temp_state(clock: Clock) -> (State, std::path::PathBuf) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!("capit-state-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
        (State::with_clock(store, snapshot, dir.clone(), clock).unwrap(), dir)
    }

    fn entry(state: &State, grant: GrantId, cost: Decimal) -> LedgerEntry {
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

    fn grant_spec(period: Period, expires_at: Option<i64>) -> GrantSpec {
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
        }
    }

    fn dollars(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    /// A request that holds exactly `cost`.
    fn hold_of(cost: Decimal) -> Demand {
        Demand { input_cost: cost, input_tokens: 0, output_tokens: 0, output_rate: Decimal::ZERO, fit_at_least: None }
    }

    #[test]
    fn a_day_rolls_over_at_local_midnight_and_an_expiry_bites_at_its_second() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let clock = Clock::default();
        let (state, dir) = temp_state(clock.clone());
        let expires_at = clock.now_seconds() + 3 * 86_400;
        runtime.block_on(state.create_grant(grant_spec(Period::Day, Some(expires_at)))).unwrap();
        let slot = state.find_grant("g").unwrap();
        let bound = |cost: &str| hold_of(dollars(cost));

        let first = state.admit_now(&slot, "m", &bound("0.95")).unwrap().0;
        drop(state.settle(first, entry(&state, slot.id, dollars("0.90"))));
        // A request admitted before midnight and settled after it.
        let straddling = state.admit_now(&slot, "m", &bound("0.10")).unwrap().0;
        let refused = state.admit_now(&slot, "m", &bound("0.01")).unwrap_err();
        assert!(matches!(refused, Refusal::Busy { .. }), "only the hold in flight is in the way: {refused}");
        let refused = state.admit_now(&slot, "m", &bound("0.11")).unwrap_err();
        assert!(matches!(refused, Refusal::WouldExceed { .. }), "more than is left even when idle: {refused}");
        let today = state.grant_view(&slot).window;
        let midnight = today.end.unwrap();
        assert_eq!(state.grant_view(&slot).state, GrantState::Active);

        clock.advance(std::time::Duration::from_secs((midnight - clock.now_seconds()) as u64));
        let tomorrow = state.grant_view(&slot);
        assert_eq!(tomorrow.window.start, midnight, "the new day starts at local midnight");
        assert_eq!((tomorrow.spent, tomorrow.reserved), (Decimal::ZERO, dollars("0.10")), "spend resets; holds in flight stay");
        drop(state.settle(straddling, entry(&state, slot.id, dollars("0.05"))));
        assert_eq!(state.grant_view(&slot).spent, dollars("0.05"), "it counts in the day it settled");
        let again = state.admit_now(&slot, "m", &bound("0.95")).unwrap().0;
        drop(again);

        // Expiry: admitted up to the second before, refused from the second itself.
        clock.advance(std::time::Duration::from_secs((expires_at - 1 - clock.now_seconds()) as u64));
        assert!(state.admit_now(&slot, "m", &bound("0")).is_ok());
        clock.advance(std::time::Duration::from_secs(1));
        assert!(matches!(state.admit_now(&slot, "m", &bound("0")), Err(Refusal::Expired { .. })));
        assert_eq!(state.grant_view(&slot).state, GrantState::Expired);

        // The ledger keeps both days, each window's totals its own.
        state.store().close();
        assert_eq!(state.store().totals(slot.id, today.start).unwrap().spent, dollars("0.90"));
        assert_eq!(state.store().totals(slot.id, midnight).unwrap().spent, dollars("0.05"));
        drop((state, slot));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Random admissions, settlements (at most the bound) and releases, checked step by step
    /// against a reference model written as plainly as possible.
    #[test]
    fn reservations_match_a_reference_model() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (state, dir) = temp_state(Clock::default());
        let cap = Decimal::ONE;
        runtime.block_on(state.create_grant(grant_spec(Period::Total, None))).unwrap();
        let slot = state.find_grant("g").unwrap();

        let (mut model_spent, mut model_reserved) = (Decimal::ZERO, Decimal::ZERO);
        let mut open: Vec<Reservation> = Vec::new();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..3000 {
            match next(3) {
                0 => {
                    let bound = Decimal::new(next(30_001) as i64, 5); // $0 to $0.30000
                    let fits = model_spent < cap && model_spent + model_reserved + bound <= cap;
                    match state.admit_now(&slot, "m", &Demand { input_tokens: 10, ..hold_of(bound) }) {
                        Ok((reservation, _)) => {
                            assert!(fits, "step {step}: admitted {bound} with {model_spent} spent, {model_reserved} held");
                            model_reserved += bound;
                            open.push(reservation);
                        }
                        Err(refusal) => assert!(!fits, "step {step}: refused {bound}: {refusal}"),
                    }
                }
                1 if !open.is_empty() => {
                    let reservation = open.swap_remove(next(open.len() as u64) as usize);
                    let bound = reservation.amount();
                    let cost = bound * Decimal::new(next(101) as i64, 2); // 0% to 100% of the bound
                    model_reserved -= bound;
                    model_spent += cost;
                    drop(state.settle(reservation, entry(&state, slot.id, cost)));
                }
                _ if !open.is_empty() => {
                    let reservation = open.swap_remove(next(open.len() as u64) as usize);
                    model_reserved -= reservation.amount();
                    drop(reservation);
                }
                _ => {}
            }
            let view = state.grant_view(&slot);
            assert_eq!((view.spent, view.reserved), (model_spent, model_reserved), "step {step}");
            assert!(view.spent + view.reserved <= cap, "step {step}: the cap holds");
        }
        drop(open);
        assert_eq!(state.grant_view(&slot).reserved, Decimal::ZERO, "every hold is released");
        // The ledger, once durable, says the same as memory.
        state.store().close();
        drop(state);
        let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
        let reopened = State::new(store, snapshot, dir.clone()).unwrap();
        assert_eq!(reopened.grant_view(&reopened.find_grant("g").unwrap()).spent, model_spent);
        reopened.store().close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_grant_is_replaced_only_by_one_that_passes_every_check_and_prices_persist() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let clock = Clock::default();
        let (state, dir) = temp_state(clock.clone());
        let (_, old_key) = runtime.block_on(state.create_grant(grant_spec(Period::Month, None))).unwrap();
        let past = GrantSpec { expires_at: Some(clock.now_seconds() - 1), ..grant_spec(Period::Month, None) };
        assert!(runtime.block_on(state.replace_grant(past)).is_err());
        let bad_model = GrantSpec { models: vec!["a model".into()], ..grant_spec(Period::Month, None) };
        assert!(runtime.block_on(state.replace_grant(bad_model)).is_err());
        assert!(state.authenticate(Some(old_key.expose()), "openai").is_ok(), "a refused replacement changes nothing");
        assert!(matches!(runtime.block_on(state.create_grant(grant_spec(Period::Month, None))), Err(StateError::GrantExists(_))));
        let (new, new_key, replaced) = runtime.block_on(state.replace_grant(grant_spec(Period::Week, None))).unwrap();
        assert_eq!(replaced.unwrap().state, GrantState::Revoked);
        assert!(state.authenticate(Some(old_key.expose()), "openai").is_err());
        assert!(state.authenticate(Some(new_key.expose()), "openai").is_ok());

        let list = r#"{"listed-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "mode": "chat"}}"#;
        let done = runtime.block_on(state.update_prices(list, "http://prices.example/list.json")).unwrap();
        assert_eq!((done.imported, done.changes.len()), (1, 1));
        runtime.block_on(state.set_price("gpt-5", state.price("gpt-5").unwrap().1)).unwrap();
        state.store().close();
        drop(state);
        let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
        let state = State::with_clock(store, snapshot, dir.clone(), clock).unwrap();
        let names: Vec<(String, GrantState)> = state.list_grants(true).into_iter().map(|v| (v.grant.name, v.state)).collect();
        assert_eq!(names, [("g".to_string(), GrantState::Revoked), ("g".to_string(), GrantState::Active)]);
        assert_eq!(state.find_grant("g").unwrap().id, new.grant.id);
        let rows = state.list_prices();
        let row = |m: &str| rows.iter().find(|r| r.0 == m).cloned().unwrap();
        assert_eq!(
            (row("listed-model").2, row("listed-model").3.unwrap().source),
            (PriceSource::List, "http://prices.example/list.json".to_string())
        );
        assert_eq!((row("gpt-5").2, row("gpt-5").3.unwrap().source), (PriceSource::Override, "price set".to_string()));
        assert_eq!(state.price_list_origin().unwrap().source, "http://prices.example/list.json");
        state.store().close();
        drop(state);
        let _ = std::fs::remove_dir_all(dir);
    }
}
