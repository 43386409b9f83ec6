//! One daemon's membership of one pool, at run time: a task that owns the connection and runs
//! every transaction in order (so a raise, a report and a renewal never race each other), and
//! the [`LeaseSource`] the admission path asks for room.
//!
//! - **Reports.** Every `report_interval` the task reads the local ledger's entries of the
//!   pool's grants after the last one the pool has (the pool keeps that sequence number, so a
//!   restart resumes exactly) and reports them in one transaction with any cover asked for.
//! - **Renewals.** A lease is renewed by any transaction; with nothing else to do, a heartbeat
//!   runs every third of the lease's time. The committed cover may be used only until the time
//!   of the last transaction's *start* plus the lease time, which is never later than the
//!   expiry the server set; after that the member serves nothing new from the pool.
//! - **Start.** The first transaction reports whatever the last run left unreported (requests
//!   charged as interrupted included) and lowers the cover to nothing: after a restart nothing
//!   is in flight, so what was charged for this member is reconciled at once.
//! - **Unreachable.** A raise fails with [`LeaseError::Unreachable`]; reports wait and are
//!   retried (the pool dedupes rows by sequence number); what is leased serves until it expires.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tokio::sync::{mpsc, oneshot};

use super::pg::{self, Database, LedgerCopy, Synced};
use super::url::DbUrl;
use super::{PoolSpec, TeamError};
use crate::lease::{LeaseError, LeaseFuture, LeaseSource};
use crate::secret::Secret;
use crate::state::Clock;

/// At most this many ledger copies go in one transaction.
pub const BATCH_ROWS: usize = 1000;
/// How long one transaction (or connecting) may take before the database counts as unreachable.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a member's unreported spend comes from: the local ledger, for the pool's grants.
pub trait Feed: Send + Sync + 'static {
    /// Entries after sequence number `after` (all with `None`), oldest first, at most `limit`,
    /// as copies (their `window_start` is filled in by the member).
    fn after(&self, after: Option<u64>, limit: usize) -> Result<Vec<LedgerCopy>, String>;
}

/// Told of every committed transaction, in the order they committed, before anyone waiting on
/// it hears back: what it reported (each row's sequence number and cost) and what it left.
pub trait SyncListener: Send + Sync + 'static {
    /// `commits` are the numbers of the covers asked for ([`Member::commit_numbered`]) that this
    /// transaction applied (the last one asked is the cover it set, unless `synced.refused`).
    fn synced(&self, reported: &[(u64, Decimal)], commits: &[u64], synced: &Synced);
}

/// How to reach the pool and who this member is.
#[derive(Clone)]
pub struct MemberConfig {
    pub pool: String,
    pub url: DbUrl,
    pub password: Option<Arc<Secret>>,
    /// This daemon's installation id.
    pub member: String,
    pub host: String,
    pub clock: Clock,
    pub report_interval: Duration,
}

/// What the member knows of its pool, for listings and for admission.
#[derive(Clone, Debug, Default)]
pub struct Standing {
    pub spec: Option<PoolSpec>,
    /// This member's committed cover (lease plus credits), as of the last transaction.
    pub cover: Decimal,
    /// Until when that cover may be used for new requests.
    pub usable_until: Option<Instant>,
    /// The last local ledger sequence number the pool has.
    pub reported_seq: Option<u64>,
    pub last: Option<Synced>,
    /// Why the last attempt failed, if it did, and since when (Unix ms) attempts fail.
    pub error: Option<String>,
    pub failing_since_ms: Option<i64>,
    /// Transactions committed (reports, raises, renewals).
    pub transactions: u64,
    /// The start-up reconciliation is done.
    pub reconciled: bool,
}

type CoverReply = oneshot::Sender<Result<(), LeaseError>>;

enum Op {
    Cover { target: Decimal, seq: Option<u64>, reply: CoverReply },
    Flush { reply: oneshot::Sender<Result<(), TeamError>> },
    Stop { reply: oneshot::Sender<()> },
}

pub struct Member {
    pool: String,
    ops: mpsc::UnboundedSender<Op>,
    standing: Arc<Mutex<Standing>>,
    listener: Arc<Mutex<Option<Arc<dyn SyncListener>>>>,
}

impl Member {
    /// Starts the member's task; it connects, reconciles and then reports and renews on its own.
    pub fn start(config: MemberConfig, feed: Arc<dyn Feed>) -> Arc<Member> {
        let (ops, rx) = mpsc::unbounded_channel();
        let standing = Arc::new(Mutex::new(Standing::default()));
        let listener = Arc::new(Mutex::new(None));
        let member = Arc::new(Member { pool: config.pool.clone(), ops, standing: standing.clone(), listener: listener.clone() });
        let actor = Actor { config, feed, standing, listener, db: None, rx, failures: 0, last_ok: None };
        tokio::spawn(actor.run());
        member
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Sets who is told of each committed transaction (the pool's lease book).
    pub fn set_listener(&self, listener: Arc<dyn SyncListener>) {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
    }

    pub fn standing(&self) -> Standing {
        self.standing.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The committed cover may be used now: the last transaction is younger than the lease time.
    pub fn usable(&self, now: Instant) -> bool {
        self.standing.lock().unwrap_or_else(|p| p.into_inner()).usable_until.is_some_and(|until| now < until)
    }

    /// The cover new requests may use now: the committed cover while it has not expired.
    pub fn usable_cover(&self, now: Instant) -> Decimal {
        let standing = self.standing.lock().unwrap_or_else(|p| p.into_inner());
        match standing.usable_until {
            Some(until) if now < until => standing.cover,
            _ => Decimal::ZERO,
        }
    }

    /// Reports every entry the local ledger has committed so far, in one transaction (or a few);
    /// renews the lease.
    pub async fn flush(&self) -> Result<(), TeamError> {
        let (reply, rx) = oneshot::channel();
        self.ops.send(Op::Flush { reply }).map_err(|_| TeamError::Unreachable("the member has stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(TeamError::Unreachable("the member has stopped".into())))
    }

    /// Stops the task after one last attempt to report.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.ops.send(Op::Stop { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

impl Member {
    /// As [`LeaseSource::commit_lease`], with the number the listener is told back when the
    /// transaction that applied it commits.
    pub fn commit_numbered(&self, amount: Decimal, seq: Option<u64>) -> LeaseFuture<'static, Result<(), LeaseError>> {
        let (reply, rx) = oneshot::channel();
        let gone = || LeaseError::Unreachable("the team member has stopped".into());
        let sent = self.ops.send(Op::Cover { target: amount, seq, reply }).map_err(|_| gone());
        Box::pin(async move {
            sent?;
            rx.await.unwrap_or_else(|_| Err(gone()))
        })
    }
}

impl LeaseSource for Member {
    /// Queued now, so that covers are committed in the order they were asked for.
    fn commit_lease(&self, amount: Decimal) -> LeaseFuture<'static, Result<(), LeaseError>> {
        self.commit_numbered(amount, None)
    }
}

struct Actor {
    config: MemberConfig,
    feed: Arc<dyn Feed>,
    standing: Arc<Mutex<Standing>>,
    listener: Arc<Mutex<Option<Arc<dyn SyncListener>>>>,
    db: Option<(Database, PoolSpec)>,
    rx: mpsc::UnboundedReceiver<Op>,
    failures: u32,
    last_ok: Option<Instant>,
}

fn unreachable(e: TeamError) -> LeaseError {
    match e {
        TeamError::Lease(e) => e,
        other => LeaseError::Unreachable(other.to_string()),
    }
}

impl Actor {
    fn standing(&self) -> std::sync::MutexGuard<'_, Standing> {
        self.standing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to sleep with nothing asked: the report interval, longer while failing.
    fn idle(&self) -> Duration {
        let backoff = self.config.report_interval.saturating_mul(1 << self.failures.min(4));
        backoff.min(Duration::from_secs(5)).max(self.config.report_interval)
    }

    /// A heartbeat is due: the lease would otherwise run past a third of its time unrenewed.
    fn renew_due(&self) -> bool {
        let standing = self.standing();
        let Some(spec) = &standing.spec else { return true };
        let holds = standing.last.as_ref().is_some_and(|s| !s.lease.is_zero());
        let third = Duration::from_secs(u64::from(spec.lease_seconds)) / 3;
        !standing.reconciled || (holds && self.last_ok.is_none_or(|at| at.elapsed() >= third))
    }

    async fn run(mut self) {
        loop {
            let mut covers: Vec<(Decimal, Option<u64>, CoverReply)> = Vec::new();
            let mut flushes = Vec::new();
            let mut stop = None;
            let mut take = |op: Op| match op {
                Op::Cover { target, seq, reply } => covers.push((target, seq, reply)),
                Op::Flush { reply } => flushes.push(reply),
                Op::Stop { reply } => stop = Some(reply),
            };
            let idle = self.idle();
            tokio::select! {
                op = self.rx.recv() => match op {
                    Some(op) => take(op),
                    None => return,
                },
                () = tokio::time::sleep(idle) => {}
            }
            while let Ok(op) = self.rx.try_recv() {
                take(op);
            }
            let commits: Vec<u64> = covers.iter().filter_map(|(_, seq, _)| *seq).collect();
            let target = covers.last().map(|(t, _, _)| *t);
            let outcome = self.round(target, &commits, !flushes.is_empty() || stop.is_some()).await;
            for (_, _, reply) in covers {
                let result = match &outcome {
                    Ok(Some(synced)) => synced.refused.clone().map_or(Ok(()), Err),
                    Ok(None) => Ok(()),
                    Err(e) => Err(unreachable(e.clone_lossy())),
                };
                let _ = reply.send(result);
            }
            for reply in flushes {
                let _ = reply.send(outcome.as_ref().map(drop).map_err(TeamError::clone_lossy));
            }
            if let Some(reply) = stop {
                self.db = None;
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Reports everything pending (in batches), with `target` applied in the last transaction.
    /// `None` when there was nothing to do.
    async fn round(&mut self, target: Option<Decimal>, commits: &[u64], forced: bool) -> Result<Option<Synced>, TeamError> {
        let mut last = None;
        loop {
            let result = self.batch(target, commits, forced || last.is_some()).await;
            match result {
                Ok(Some((synced, more))) => {
                    last = Some(synced);
                    if !more {
                        return Ok(last);
                    }
                }
                Ok(None) => return Ok(last),
                Err(e) => return Err(e),
            }
        }
    }

    /// One transaction, if there is anything to do. Returns what it left and whether more rows
    /// wait.
    async fn batch(&mut self, target: Option<Decimal>, commits: &[u64], forced: bool) -> Result<Option<(Synced, bool)>, TeamError> {
        let started = Instant::now();
        let result = tokio::time::timeout(TRANSACTION_TIMEOUT, self.transact(target, forced)).await;
        let result = match result {
            Ok(result) => result,
            Err(_) => Err(TeamError::Unreachable(format!("no answer within {TRANSACTION_TIMEOUT:?}"))),
        };
        match result {
            Ok(Some((synced, more, spec, rows))) => {
                self.failures = 0;
                self.last_ok = Some(started);
                let reported = rows.iter().map(|(seq, _)| *seq).max();
                let mut standing = self.standing();
                standing.cover = synced.cover;
                standing.usable_until = Some(started + Duration::from_secs(u64::from(spec.lease_seconds)));
                standing.spec = Some(spec);
                standing.reported_seq = reported.or(standing.reported_seq);
                standing.last = Some(synced.clone());
                standing.error = None;
                standing.failing_since_ms = None;
                standing.transactions += 1;
                standing.reconciled = true;
                drop(standing);
                // The target goes with the last batch of a round: only that one applied it.
                let applied: &[u64] = if more { &[] } else { commits };
                let listener = self.listener.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(listener) = listener {
                    listener.synced(&rows, applied, &synced);
                }
                Ok(Some((synced, more)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                if matches!(e, TeamError::Unreachable(_)) {
                    self.db = None;
                }
                self.failures = self.failures.saturating_add(1);
                let now_ms = self.config.clock.now_millis();
                let mut standing = self.standing();
                if standing.error.is_none() {
                    tracing::warn!(pool = %self.config.pool, error = %e, "the team database cannot be used; retrying");
                }
                standing.error = Some(e.to_string());
                standing.failing_since_ms.get_or_insert(now_ms);
                Err(e)
            }
        }
    }

    async fn connect(&mut self) -> Result<(), TeamError> {
        if self.db.is_some() {
            return Ok(());
        }
        let mut db = pg::connect(&self.config.url, self.config.password.as_deref()).await?;
        db.migrate().await?;
        let joined = db.join(&self.config.pool, &self.config.member, &self.config.host).await?;
        {
            let mut standing = self.standing();
            standing.reported_seq = joined.reported_seq;
            standing.spec = Some(joined.spec.clone());
        }
        self.db = Some((db, joined.spec));
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    async fn transact(
        &mut self,
        target: Option<Decimal>,
        forced: bool,
    ) -> Result<Option<(Synced, bool, PoolSpec, Vec<(u64, Decimal)>)>, TeamError> {
        self.connect().await?;
        let reconciled = self.standing().reconciled;
        let after = self.standing().reported_seq;
        let feed = self.feed.clone();
        let mut rows = tokio::task::spawn_blocking(move || feed.after(after, BATCH_ROWS + 1))
            .await
            .map_err(|e| TeamError::Database(format!("reading the local ledger: {e}")))?
            .map_err(|e| TeamError::Database(format!("reading the local ledger: {e}")))?;
        let more = rows.len() > BATCH_ROWS;
        rows.truncate(BATCH_ROWS);
        // After a restart nothing is in flight: once the last run's entries are reported, the
        // cover goes to nothing (what was charged for this member beyond them is refunded).
        let target = match (target, reconciled) {
            (None, false) if !more => Some(Decimal::ZERO),
            (target, _) => target.filter(|_| !more),
        };
        if rows.is_empty() && target.is_none() && !forced && !self.renew_due() {
            return Ok(None);
        }
        let (db, spec) = self.db.as_mut().expect("connected above");
        for row in &mut rows {
            row.window_start = spec.window(row.at_ms.div_euclid(1000)).start;
        }
        let window = spec.window(self.config.clock.now_seconds()).start;
        let sync = pg::Sync { pool: &self.config.pool, member: &self.config.member, window, rows: &rows, target };
        let synced = db.sync(sync).await?;
        let reported = rows.iter().map(|r| (r.seq, r.cost)).collect();
        Ok(Some((synced, more, spec.clone(), reported)))
    }
}

impl TeamError {
    /// A copy for every waiter of one outcome (the database's own error types do not clone).
    pub fn clone_lossy(&self) -> TeamError {
        match self {
            TeamError::Unreachable(m) => TeamError::Unreachable(m.clone()),
            TeamError::Lease(e) => TeamError::Lease(e.clone()),
            TeamError::UnknownPool(p) => TeamError::UnknownPool(p.clone()),
            TeamError::NotJoined(p) => TeamError::NotJoined(p.clone()),
            TeamError::Database(m) => TeamError::Database(m.clone()),
            TeamError::Invalid(m) => TeamError::Invalid(m.clone()),
            other => TeamError::Database(other.to_string()),
        }
    }
}
