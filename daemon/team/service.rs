//! This daemon's team memberships: made, listed and left through the control API, kept in the
//! store (the database password is a secret, like a master key), and each run by a
//! [`Member`]. Changes are serialised by one async mutex; a membership is stored only once the
//! database has accepted it (credentials checked, migrations applied, the member's row there).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rust_decimal::Decimal;

use super::member::{Feed, Member, MemberConfig, Standing};
use super::pg::{self, LedgerCopy, PoolStatus, UsageBy, UsageRow};
use super::url::DbUrl;
use super::{PoolSpec, TeamError};
use crate::grants::GrantId;
use crate::lease::LeaseSource;
use crate::secret::Secret;
use crate::state::State;
use crate::store::{Store, StoredTeam, WriteOp};

/// How often a member reports what settled and renews its lease, unless told otherwise.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// The grants of one pool on this daemon, by id (revoked ones too: their last settlements must
/// still be reported).
type PoolGrants = Arc<RwLock<BTreeMap<GrantId, String>>>;

struct Membership {
    member: Arc<Member>,
    lease: Arc<super::pool_lease::PoolLease>,
    url: DbUrl,
    password: Option<Arc<Secret>>,
    joined_at: i64,
    grants: PoolGrants,
}

/// A pool as listings show it: the database's figures when it answered, else what this daemon
/// last knew, with the error.
#[derive(Clone, Debug)]
pub struct TeamView {
    pub name: String,
    pub database: String,
    pub joined_at: i64,
    pub spec: Option<PoolSpec>,
    pub status: Option<PoolStatus>,
    pub error: Option<String>,
    pub standing: Standing,
    pub member: String,
    pub grants: Vec<String>,
    pub unreported: u64,
}

pub struct Teams {
    state: Arc<State>,
    report_interval: Duration,
    members: RwLock<BTreeMap<String, Membership>>,
    admin: tokio::sync::Mutex<()>,
}

/// The local ledger as a member's feed: the entries of the pool's grants.
struct StoreFeed {
    store: Store,
    grants: PoolGrants,
}

impl Feed for StoreFeed {
    fn after(&self, after: Option<u64>, limit: usize) -> Result<Vec<LedgerCopy>, String> {
        let names = self.grants.read().unwrap_or_else(|p| p.into_inner()).clone();
        let ids: Vec<GrantId> = names.keys().copied().collect();
        let entries = self.store.entries_after(&ids, after, limit).map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .map(|(seq, e)| LedgerCopy {
                seq,
                grant: names.get(&e.grant).cloned().unwrap_or_else(|| format!("#{}", e.grant.0)),
                model: e.model,
                api: e.api,
                cost: e.cost,
                status: e.status.as_str().to_string(),
                http_status: e.http_status,
                input_tokens: e.usage.input_tokens,
                output_tokens: e.usage.output_tokens,
                at_ms: e.at_ms,
                window_start: 0,
            })
            .collect())
    }
}

/// This machine's name, as members are shown.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() }
}

impl Teams {
    /// Starts a member for every stored membership.
    pub fn start(state: Arc<State>, stored: Vec<StoredTeam>, report_interval: Duration) -> Arc<Teams> {
        let teams = Arc::new(Teams { state, report_interval, members: RwLock::new(BTreeMap::new()), admin: tokio::sync::Mutex::new(()) });
        for team in stored {
            let url = match DbUrl::parse(&team.url) {
                Ok(url) => url,
                Err(e) => {
                    tracing::error!(pool = %team.pool, error = %e, "a stored team database URL does not parse; the pool is not used");
                    continue;
                }
            };
            let password = match team.password.as_ref().map(|p| teams.state.open_stored(&StoredTeam::seal_name(&team.pool), p)) {
                Some(Ok(secret)) => Some(Arc::new(secret)),
                Some(Err(e)) => {
                    tracing::error!(pool = %team.pool, error = %e, "the team database password cannot be opened; the pool is not used");
                    continue;
                }
                None => None,
            };
            teams.run_member(&team.pool, url, password, team.joined_at);
        }
        teams
    }

    fn run_member(&self, pool: &str, url: DbUrl, password: Option<Arc<Secret>>, joined_at: i64) {
        let grants: PoolGrants = Arc::new(RwLock::new(
            self.state
                .list_grants(true)
                .into_iter()
                .filter(|v| v.grant.team.as_deref() == Some(pool))
                .map(|v| (v.grant.id, v.grant.name))
                .collect(),
        ));
        let config = MemberConfig {
            pool: pool.to_string(),
            url: url.clone(),
            password: password.clone(),
            member: self.state.installation_id().to_string(),
            host: host_name(),
            clock: self.state.clock().clone(),
            report_interval: self.report_interval,
        };
        let feed = Arc::new(StoreFeed { store: self.state.store().clone(), grants: grants.clone() });
        // Entries numbered from here on settle in this run, under the pool's book.
        let first_seq = self.state.store().next_ledger_seq().unwrap_or(u64::MAX);
        let member = Member::start(config, feed);
        let lease = super::pool_lease::PoolLease::new(member.clone(), crate::lease::LeasePolicy::default(), first_seq);
        self.state.set_pool_lease(pool, Some(lease.clone()));
        tracing::info!(pool, database = %url.display(), "team pool member started");
        self.write().insert(pool.to_string(), Membership { member, lease, url, password, joined_at, grants });
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Membership>> {
        self.members.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Membership>> {
        self.members.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool's lease book on this daemon, for admission.
    pub fn lease(&self, pool: &str) -> Option<Arc<super::pool_lease::PoolLease>> {
        self.read().get(pool).map(|m| m.lease.clone())
    }

    /// Refuses a pool this daemon has not joined (a grant cannot draw on it).
    pub fn check_joined(&self, pool: &str) -> Result<(), TeamError> {
        if self.read().contains_key(pool) { Ok(()) } else { Err(TeamError::NotJoined(pool.to_string())) }
    }

    /// A grant made with `--team`: its settlements are reported to the pool from now on.
    pub fn attach(&self, pool: &str, grant: GrantId, name: &str) {
        if let Some(m) = self.read().get(pool) {
            m.grants.write().unwrap_or_else(|p| p.into_inner()).insert(grant, name.to_string());
        }
    }

    /// Makes a pool in the database and joins it.
    pub async fn create(&self, spec: PoolSpec, url: &str, password: Option<Secret>, created_by: &str) -> Result<TeamView, TeamError> {
        spec.validate()?;
        let url = DbUrl::parse(url).map_err(TeamError::Invalid)?;
        let _admin = self.admin.lock().await;
        if self.read().contains_key(&spec.name) {
            return Err(TeamError::AlreadyJoined(spec.name.clone()));
        }
        let password = password.map(Arc::new);
        let mut db = pg::connect(&url, password.as_deref()).await?;
        db.migrate().await?;
        db.create_pool(&spec, created_by).await?;
        tracing::info!(pool = %spec.name, cap = %spec.cap, period = spec.period.as_str(), "team pool created");
        drop(db);
        self.join_locked(&spec.name, url, password).await
    }

    /// Joins a pool that exists in the database.
    pub async fn join(&self, pool: &str, url: &str, password: Option<Secret>) -> Result<TeamView, TeamError> {
        super::validate_pool_name(pool)?;
        let url = DbUrl::parse(url).map_err(TeamError::Invalid)?;
        let _admin = self.admin.lock().await;
        if self.read().contains_key(pool) {
            return Err(TeamError::AlreadyJoined(pool.to_string()));
        }
        self.join_locked(pool, url, password.map(Arc::new)).await
    }

    async fn join_locked(&self, pool: &str, url: DbUrl, password: Option<Arc<Secret>>) -> Result<TeamView, TeamError> {
        let mut db = pg::connect(&url, password.as_deref()).await?;
        db.migrate().await?;
        db.join(pool, self.state.installation_id(), &host_name()).await?;
        drop(db);
        let joined_at = self.state.clock().now_seconds();
        let sealed = match &password {
            Some(p) => {
                Some(self.state.stored_key(&StoredTeam::seal_name(pool), p, joined_at).map_err(|e| TeamError::Invalid(e.to_string()))?)
            }
            None => None,
        };
        let stored = StoredTeam { pool: pool.to_string(), url: url.given.clone(), password: sealed, joined_at };
        self.state.store().write(WriteOp::PutTeam(stored)).await.map_err(|e| TeamError::Database(format!("local store: {e}")))?;
        self.run_member(pool, url, password, joined_at);
        Ok(self.view(pool).await)
    }

    /// Every pool this daemon is a member of, with the database's figures where it answers.
    pub async fn list(&self) -> Vec<TeamView> {
        let names: Vec<String> = self.read().keys().cloned().collect();
        let mut views = Vec::with_capacity(names.len());
        for name in names {
            views.push(self.view(&name).await);
        }
        views
    }

    /// One pool as listings show it (see [`TeamView`]).
    pub async fn view(&self, pool: &str) -> TeamView {
        let (member, url, password, joined_at, grants) = {
            let members = self.read();
            let Some(m) = members.get(pool) else {
                return TeamView {
                    name: pool.to_string(),
                    database: String::new(),
                    joined_at: 0,
                    spec: None,
                    status: None,
                    error: Some(TeamError::NotJoined(pool.to_string()).to_string()),
                    standing: Standing::default(),
                    member: String::new(),
                    grants: Vec::new(),
                    unreported: 0,
                };
            };
            (m.member.clone(), m.url.clone(), m.password.clone(), m.joined_at, m.grants.clone())
        };
        let standing = member.standing();
        let window = standing.spec.as_ref().map(|s| s.window(self.state.clock().now_seconds()).start);
        let status = async {
            let mut db = pg::connect(&url, password.as_deref()).await?;
            let spec = db.pool(pool).await?;
            let window = window.unwrap_or_else(|| spec.window(self.state.clock().now_seconds()).start);
            db.status(pool, window).await
        };
        let (status, error) = match tokio::time::timeout(super::member::TRANSACTION_TIMEOUT, status).await {
            Ok(Ok(status)) => (Some(status), standing.error.clone()),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (None, Some("the team database did not answer in time".to_string())),
        };
        let names: Vec<String> = {
            let grants = grants.read().unwrap_or_else(|p| p.into_inner());
            let mut names: Vec<String> = grants.values().cloned().collect();
            names.sort();
            names.dedup();
            names
        };
        let feed = StoreFeed { store: self.state.store().clone(), grants };
        let after = standing.reported_seq;
        let unreported =
            tokio::task::spawn_blocking(move || feed.after(after, 100_000).map(|rows| rows.len() as u64).unwrap_or(0)).await.unwrap_or(0);
        TeamView {
            name: pool.to_string(),
            database: url.display(),
            joined_at,
            spec: status.as_ref().map(|s| s.spec.clone()).or_else(|| standing.spec.clone()),
            status,
            error,
            standing,
            member: self.state.installation_id().to_string(),
            grants: names,
            unreported,
        }
    }

    /// The pool's ledger copies, grouped, after reporting everything settled here so far.
    pub async fn usage(&self, pool: &str, by: UsageBy, since_ms: Option<i64>) -> Result<(TeamView, Vec<UsageRow>, i64), TeamError> {
        let (member, url, password) = {
            let members = self.read();
            let m = members.get(pool).ok_or_else(|| TeamError::NotJoined(pool.to_string()))?;
            (m.member.clone(), m.url.clone(), m.password.clone())
        };
        self.state.store().write(WriteOp::Barrier).await.map_err(|e| TeamError::Database(format!("local store: {e}")))?;
        if let Err(e) = member.flush().await {
            tracing::debug!(pool, error = %e, "reporting before a usage query failed");
        }
        let mut db = pg::connect(&url, password.as_deref()).await?;
        let spec = db.pool(pool).await?;
        let since_ms = since_ms.unwrap_or_else(|| spec.window(self.state.clock().now_seconds()).start.saturating_mul(1000));
        let rows = db.usage(pool, by, since_ms).await?;
        drop(db);
        Ok((self.view(pool).await, rows, since_ms))
    }

    /// Leaves a pool: everything settled here is reported and the cover lowered to nothing
    /// first. Refused while a grant that is not revoked draws on it, and while requests admitted
    /// under it (a revoked grant's stream, say) are still in flight: their cost would otherwise
    /// reach the pool's ledger never, while the pool gave their room to others.
    pub async fn leave(&self, pool: &str) -> Result<TeamView, TeamError> {
        let _admin = self.admin.lock().await;
        let (member, lease, url, password) = {
            let members = self.read();
            let m = members.get(pool).ok_or_else(|| TeamError::NotJoined(pool.to_string()))?;
            (m.member.clone(), m.lease.clone(), m.url.clone(), m.password.clone())
        };
        let live: Vec<String> =
            self.state.list_grants(false).into_iter().filter(|v| v.grant.team.as_deref() == Some(pool)).map(|v| v.grant.name).collect();
        if !live.is_empty() {
            return Err(TeamError::Invalid(format!(
                "grants still draw on pool {pool:?}: {}; revoke them first (capitctl revoke NAME)",
                live.join(", ")
            )));
        }
        self.state.store().write(WriteOp::Barrier).await.map_err(|e| TeamError::Database(format!("local store: {e}")))?;
        member.flush().await?;
        let (_, covered) = lease.figures();
        if !covered.is_zero() {
            return Err(TeamError::Invalid(format!(
                "requests admitted under pool {pool:?} are still in flight (${covered} covered here); try again once they have finished"
            )));
        }
        lease.lower_to_nothing().await?;
        let view = self.view(pool).await;
        let mut db = pg::connect(&url, password.as_deref()).await?;
        // Forgotten here first: were the local delete to fail after the database let go, the
        // next start would join again without a word.
        self.state
            .store()
            .write(WriteOp::DeleteTeam { pool: pool.to_string() })
            .await
            .map_err(|e| TeamError::Database(format!("local store: {e}")))?;
        member.stop().await;
        self.state.set_pool_lease(pool, None);
        self.write().remove(pool);
        if let Err(e) = db.leave(pool, self.state.installation_id()).await {
            // This daemon's lease there is nothing already; only its membership row stays.
            tracing::warn!(pool, error = %e, "left the pool here, but marking it left in the team database failed");
            return Err(TeamError::Database(format!(
                "left pool {pool:?} on this machine (its lease there is $0), but the database did not record it: {e}"
            )));
        }
        tracing::info!(pool, "left the team pool");
        Ok(view)
    }

    /// Stops every member after one last report (at shutdown, once the proxy has drained).
    pub async fn shutdown(&self) {
        let members: Vec<Arc<Member>> = self.read().values().map(|m| m.member.clone()).collect();
        for member in members {
            // Nothing is in flight any more: once everything is reported, the room goes back to
            // the pool. Unreported spend keeps the lease that covers it until the next start.
            match member.flush().await {
                Ok(()) => {
                    if let Err(e) = member.commit_lease(Decimal::ZERO).await {
                        tracing::warn!(pool = member.pool(), error = %e, "giving the team lease back failed; it expires by itself");
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = member.pool(), error = %e, "the last report to the team database failed; it is sent at the next start")
                }
            }
            member.stop().await;
        }
    }
}
