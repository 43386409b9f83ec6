//! A pool's lease on this daemon, in memory: one [`LeaseBook`] per pool, shared by every grant
//! that draws on it, over the pool's [`Member`]. A request of such a grant takes its hold here
//! as well as under its grant; its body goes upstream only once both committed leases cover it.
//!
//! What the book covers: the holds of requests in flight, and the cost of settled requests until
//! the pool has their ledger copies (a settlement swaps its hold for its cost; a report gives the
//! cost back). So the committed cover always covers what this daemon may owe the pool and the
//! pool has not recorded, which is the lease invariant of [`crate::lease`].
//!
//! Kept in step with the database: after every committed transaction the book's committed lease
//! is what the database now holds for this member (reports lower it, as they lower the lease
//! there). A lowering is applied to the book before it is sent, so a lowering whose reply is lost
//! never leaves the book above the database. While the member's last transaction is older than
//! the lease time, nothing new is admitted from the committed lease: a request then needs a
//! transaction to succeed first, and is refused ("the team budget cannot be reached") if none does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

use super::member::{Member, SyncListener};
use super::pg::Synced;
use crate::grants::money;
use crate::lease::{Commit, Cover, LeaseBook, LeaseError, LeasePolicy};

/// How long a request may wait for the pool to raise this daemon's lease.
pub const RAISE_WAIT: Duration = Duration::from_secs(10);
/// For this long after a transaction, the room it reported is taken as is: a request it cannot
/// fit is refused without asking the database again.
const ROOM_FRESH: Duration = Duration::from_secs(1);

/// Why the pool refuses a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolRefusal {
    /// The pool has no room for the request's hold.
    NoRoom { pool: String, left: Decimal, cap: Decimal, period: String, least: Decimal },
    /// The pool's database cannot be reached and what this daemon holds does not cover the request.
    Unreachable { pool: String, detail: String },
}

impl std::fmt::Display for PoolRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolRefusal::NoRoom { pool, left, cap, period, least } if left.is_zero() => {
                write!(f, "capit: team pool \"{pool}\" has spent its ${} {} cap", money(*cap), period_word(period))?;
                write!(f, " (this request could cost up to ${})", money(*least))
            }
            PoolRefusal::NoRoom { pool, left, cap, period, least } => write!(
                f,
                "capit: team pool \"{pool}\" has ${} left of its ${} {} cap and this request could cost up to ${}",
                money(*left),
                money(*cap),
                period_word(period),
                money(*least)
            ),
            PoolRefusal::Unreachable { pool, detail } => {
                write!(f, "capit: the team budget cannot be reached (pool \"{pool}\": {detail})")
            }
        }
    }
}

fn period_word(period: &str) -> &str {
    match period {
        "day" => "daily",
        "week" => "weekly",
        "month" => "monthly",
        _ => "total",
    }
}

struct Inner {
    book: LeaseBook,
    /// Raises sent to the member and not yet applied or failed, by their number.
    raising: BTreeMap<u64, Commit>,
    /// A transaction asked for only to renew a lease that ran out locally.
    renewing: bool,
    /// Failed raises (and renewals) so far: a waiter that saw fewer had the one it waited on fail.
    failures: u64,
    last_failure: Option<LeaseError>,
    /// From the last transaction: the most the cover could be (and when), the pool's cap and period.
    room: Option<Decimal>,
    room_at: Option<Instant>,
    cap: Decimal,
    period: String,
}

pub struct PoolLease {
    this: Weak<PoolLease>,
    pool: String,
    member: Arc<Member>,
    inner: Mutex<Inner>,
    changed: tokio::sync::Notify,
    /// Ledger entries numbered below this settled in an earlier run and were never in the book.
    first_seq: u64,
}

/// A request's hold under the pool. Dropped unsettled, it gives its amount back.
pub struct PoolHold {
    lease: Arc<PoolLease>,
    amount: Decimal,
    needed: Decimal,
    failures_seen: u64,
    settled: bool,
}

impl std::fmt::Debug for PoolHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolHold").field("pool", &self.lease.pool).field("amount", &self.amount).finish()
    }
}

impl PoolHold {
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// The pool this hold is under.
    pub fn pool(&self) -> &Arc<PoolLease> {
        &self.lease
    }
}

impl Drop for PoolHold {
    fn drop(&mut self) {
        if !self.settled {
            let mut inner = self.lease.lock();
            inner.book.give_back(self.amount, Instant::now());
            drop(inner);
            self.lease.changed.notify_waiters();
        }
    }
}

impl PoolLease {
    /// The book for `member`'s pool; `first_seq` is the local ledger's next sequence number at
    /// start (entries before it are reported without ever having been in the book).
    pub fn new(member: Arc<Member>, policy: LeasePolicy, first_seq: u64) -> Arc<PoolLease> {
        let inner = Inner {
            book: LeaseBook::new(policy, Decimal::ZERO, Instant::now()),
            raising: BTreeMap::new(),
            renewing: false,
            failures: 0,
            last_failure: None,
            room: None,
            room_at: None,
            cap: Decimal::ZERO,
            period: String::new(),
        };
        let lease = Arc::new_cyclic(|this| PoolLease {
            this: this.clone(),
            pool: member.pool().to_string(),
            member: member.clone(),
            inner: Mutex::new(inner),
            changed: Default::default(),
            first_seq,
        });
        member.set_listener(lease.clone());
        lease
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The committed lease and what it covers now, for listings.
    pub fn figures(&self) -> (Decimal, Decimal) {
        let inner = self.lock();
        (inner.book.committed(), inner.book.covered())
    }

    /// Lowers the lease to nothing through the book (so a later raise is numbered after it),
    /// when this daemon leaves the pool with nothing covered here any more.
    pub async fn lower_to_nothing(&self) -> Result<(), LeaseError> {
        let commit = self.lock().book.lower_to(Decimal::ZERO);
        self.member.commit_numbered(commit.amount, Some(commit.seq)).await
    }

    /// What the pool has left for this daemon beyond what it holds here, when a transaction
    /// told it within the last second (`None` otherwise: then only the database can say).
    pub fn free_if_fresh(&self) -> Option<Decimal> {
        let inner = self.lock();
        let fresh = inner.room_at.is_some_and(|at| at.elapsed() < ROOM_FRESH);
        inner.room.filter(|_| fresh).map(|room| (room - inner.book.covered()).max(Decimal::ZERO))
    }

    /// The refusal for a request that could cost up to `least` and does not fit what is left.
    pub fn refusal_for(&self, least: Decimal) -> PoolRefusal {
        let inner = self.lock();
        let mut refusal = self.refusal(&inner, Decimal::ZERO, None);
        if let PoolRefusal::NoRoom { least: l, .. } = &mut refusal {
            *l = least;
        }
        refusal
    }

    /// Changes an admitted request's hold to `amount` (its reply said more about its cost).
    /// Shrinking always succeeds; growing only within the room the pool was last known to have,
    /// and raises the lease in the background (the body has gone already).
    pub fn resize(&self, hold: &mut PoolHold, amount: Decimal) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        if amount <= hold.amount {
            inner.book.give_back(hold.amount - amount, now);
            hold.amount = amount;
            drop(inner);
            self.changed.notify_waiters();
            return true;
        }
        let more = amount - hold.amount;
        let room = inner.room.unwrap_or(Decimal::ZERO);
        if inner.book.covered().saturating_add(more) > room {
            return false;
        }
        hold.amount = amount;
        self.cover_without_waiting(inner, more, room, now);
        true
    }

    /// Covers `amount` more of what has gone upstream already: nobody waits for the raise this
    /// may need, which is sent in the background.
    fn cover_without_waiting(&self, mut inner: MutexGuard<'_, Inner>, amount: Decimal, room: Decimal, now: Instant) {
        let raise = match inner.book.take(amount, room, now) {
            Cover::After { raise: Some(raise), .. } => {
                inner.raising.insert(raise.seq, raise);
                Some(raise)
            }
            _ => None,
        };
        drop(inner);
        if let Some(raise) = raise {
            self.send(raise, true);
        }
    }

    fn refusal(&self, inner: &Inner, least: Decimal, error: Option<&LeaseError>) -> PoolRefusal {
        let room = match error {
            Some(LeaseError::Unreachable(detail)) => {
                return PoolRefusal::Unreachable { pool: self.pool.clone(), detail: detail.clone() };
            }
            Some(LeaseError::NoRoom { available }) => Some(*available),
            None => inner.room,
        };
        // What is left for this request: the room, less what the others here hold.
        let others = (inner.book.covered() - least).max(Decimal::ZERO);
        let left = room.map_or(Decimal::ZERO, |room| (room - others).max(Decimal::ZERO));
        PoolRefusal::NoRoom { pool: self.pool.clone(), left, cap: inner.cap, period: inner.period.clone(), least }
    }

    /// Takes `amount` under the pool for a request. Refused at once when the pool is known to
    /// have no room for it, or cannot be reached while what this daemon leased has run out;
    /// otherwise the hold is taken and [`wait`](Self::wait) says when its body may go.
    pub fn take(self: &Arc<Self>, amount: Decimal) -> Result<PoolHold, PoolRefusal> {
        let now = Instant::now();
        let usable = self.member.usable(now);
        let standing_error = if usable { None } else { self.member.standing().error };
        let mut inner = self.lock();
        let fresh = inner.room_at.is_some_and(|at| now.duration_since(at) < ROOM_FRESH);
        let room = match inner.room {
            Some(room) if inner.book.covered().saturating_add(amount) > room => {
                if fresh {
                    return Err(self.refusal(&inner, amount, None));
                }
                // The pool may have room again (others gave theirs back, a new period): ask.
                Decimal::MAX
            }
            Some(room) => room,
            None => Decimal::MAX,
        };
        if let Some(error) = standing_error.filter(|_| !inner.book.committed().is_zero()) {
            // The lease ran out unrenewed and the database does not answer: never on credit.
            // The member is asked to try again, so that the pool comes back by itself.
            let refusal = self.refusal(&inner, amount, Some(&LeaseError::Unreachable(error)));
            let renew = !inner.renewing;
            inner.renewing = true;
            drop(inner);
            if renew {
                self.renew();
            }
            return Err(refusal);
        }
        let failures_seen = inner.failures;
        let needed = match inner.book.take(amount, room, now) {
            Cover::Now => {
                let renew = !usable && !inner.renewing;
                inner.renewing |= renew;
                let needed = inner.book.covered();
                drop(inner);
                if renew {
                    // Covered by a lease that has run out locally: renew it before the body goes.
                    self.renew();
                }
                needed
            }
            Cover::After { raise, needed } => {
                if let Some(raise) = raise {
                    inner.raising.insert(raise.seq, raise);
                    drop(inner);
                    self.send(raise, true);
                }
                needed
            }
        };
        Ok(PoolHold { lease: self.clone(), amount, needed, failures_seen, settled: false })
    }

    /// Sends a commit to the member. A raise lands in the book when the transaction that applied
    /// it commits ([`SyncListener::synced`], in commit order); here only its failure is noted. A
    /// lowering is in the book already. A raise past the room the pool has is tried once more at
    /// that room.
    fn send(&self, commit: Commit, raise: bool) {
        let Some(lease) = self.this.upgrade() else { return };
        let sent = self.member.commit_numbered(commit.amount, Some(commit.seq));
        tokio::spawn(async move {
            let mut result = sent.await;
            if let Err(LeaseError::NoRoom { available }) = &result
                && raise
            {
                let retry = {
                    let mut inner = lease.lock();
                    let worth_it = *available > inner.book.committed() && *available < commit.amount;
                    inner.book.landed(commit, false);
                    inner.raising.remove(&commit.seq);
                    // Waiters the room cannot cover are refused now; the others ride on the retry.
                    inner.failures += 1;
                    inner.last_failure = result.clone().err();
                    match inner.book.take(Decimal::ZERO, *available, Instant::now()) {
                        Cover::After { raise: Some(again), .. } if worth_it => {
                            inner.raising.insert(again.seq, again);
                            Some(again)
                        }
                        _ => None,
                    }
                };
                if let Some(again) = retry {
                    result = lease.member.commit_numbered(again.amount, Some(again.seq)).await;
                    if result.is_err() {
                        let mut inner = lease.lock();
                        inner.book.landed(again, false);
                        inner.raising.remove(&again.seq);
                    }
                }
            }
            if let Err(e) = result {
                let mut inner = lease.lock();
                if inner.raising.remove(&commit.seq).is_some() {
                    inner.book.landed(commit, false);
                }
                if raise {
                    inner.failures += 1;
                    inner.last_failure = Some(e);
                } else {
                    tracing::debug!(pool = %lease.pool, error = %e, "lowering the team lease failed; the next one lowers it");
                }
            }
            lease.changed.notify_waiters();
        });
    }

    /// Asks for a transaction only to renew the lease (it ran out locally while covering holds).
    fn renew(&self) {
        let Some(lease) = self.this.upgrade() else { return };
        tokio::spawn(async move {
            let result = lease.member.flush().await;
            let mut inner = lease.lock();
            inner.renewing = false;
            if let Err(e) = result {
                inner.failures += 1;
                inner.last_failure = Some(LeaseError::Unreachable(e.to_string()));
            }
            drop(inner);
            lease.changed.notify_waiters();
        });
    }

    /// Resolves once the committed lease covers `hold` (its body may go upstream), or with the
    /// refusal if the pool cannot raise this daemon's lease that far.
    pub async fn wait(&self, hold: &PoolHold) -> Result<(), PoolRefusal> {
        let deadline = tokio::time::Instant::now() + RAISE_WAIT;
        loop {
            let notified = self.changed.notified();
            {
                let mut inner = self.lock();
                let usable = self.member.usable(Instant::now());
                if inner.book.covers(hold.needed) && usable {
                    return Ok(());
                }
                let pending = !inner.raising.is_empty() || inner.renewing;
                if inner.failures > hold.failures_seen && !pending {
                    return Err(self.refusal(&inner, hold.amount, inner.last_failure.as_ref()));
                }
                if !usable && !pending {
                    // The lease ran out here after the hold was taken: nothing else would renew it.
                    inner.renewing = true;
                    drop(inner);
                    self.renew();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let inner = self.lock();
                let waiting_on = if !inner.raising.is_empty() {
                    "a raise of this machine's lease is still waiting on the team database"
                } else if inner.renewing {
                    "a renewal of this machine's lease is still waiting on the team database"
                } else {
                    "the lease does not cover it yet"
                };
                let error = LeaseError::Unreachable(format!("no lease within {RAISE_WAIT:?}: {waiting_on}"));
                return Err(self.refusal(&inner, hold.amount, Some(&error)));
            }
        }
    }

    /// A request settled at `cost`: its hold is given back and the cost stays covered until the
    /// pool has its ledger copy.
    pub fn settle(&self, mut hold: PoolHold, cost: Decimal) {
        hold.settled = true;
        let now = Instant::now();
        let mut inner = self.lock();
        inner.book.give_back(hold.amount, now);
        let room = inner.room.unwrap_or(Decimal::MAX);
        // A raise only when the request cost more than its hold (already billed): cover it too.
        self.cover_without_waiting(inner, cost, room, now);
        self.changed.notify_waiters();
    }
}

impl SyncListener for PoolLease {
    fn synced(&self, reported: &[(u64, Decimal)], commits: &[u64], synced: &Synced) {
        let now = Instant::now();
        let in_book: Decimal = reported.iter().filter(|(seq, _)| *seq >= self.first_seq).map(|(_, cost)| *cost).sum();
        let spec = self.member.standing().spec;
        let mut inner = self.lock();
        // In the transaction's own order: its report lowered the lease, then it set the cover.
        inner.book.reported(in_book, now);
        for seq in commits {
            if let Some(raise) = inner.raising.remove(seq) {
                inner.book.landed(raise, synced.refused.is_none());
                if let Some(refusal) = &synced.refused {
                    inner.failures += 1;
                    inner.last_failure = Some(refusal.clone());
                }
            }
        }
        inner.room = Some(synced.room);
        inner.room_at = Some(now);
        inner.cap = synced.cap;
        if let Some(spec) = spec {
            inner.period = spec.period.as_str().to_string();
        }
        // A lease larger than the recent peak for a whole window is lowered (in the book at once).
        let lower = inner.book.shrink_to(now);
        drop(inner);
        self.changed.notify_waiters();
        if let Some(lower) = lower {
            self.send(lower, false);
        }
    }
}
