//! Admission leases: an amount of a budget durably set aside for this daemon's requests in
//! flight, so that a request is admitted in memory, with no disk wait (or round trip to a
//! shared budget), while the holds in flight fit inside the lease. Only when they would not does
//! a request wait for one commit that raises it.
//!
//! Two sources lease room: a grant's own cap, kept in the local store (the daemon's memory
//! decides, the store makes it durable), and a team pool shared by many daemons (a database
//! decides: a raise succeeds only if the pool's spend, every member's lease and the raise fit its
//! cap). Both are a [`LeaseSource`]; the bookkeeping in memory, [`LeaseBook`], is the same.
//!
//! Invariant (see ARCHITECTURE.md): the durable lease always covers what this daemon may owe
//! and the budget has not recorded yet: the holds of requests whose bodies may have gone
//! upstream, and (for a shared pool) settled spend not yet reported. A request's body goes
//! upstream only once a committed lease covers its hold. So after a crash, charging the whole
//! committed lease as `interrupted` never charges less than was billed, and over-charges by at
//! most the lease.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

/// A boxed future, so that lease sources can be trait objects.
pub type LeaseFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The budget has no room for the raise; `available` is what it could still lease.
    #[error("the budget has only ${available} left to lease")]
    NoRoom { available: Decimal },
    /// Where the budget is kept cannot be reached; what is already leased keeps serving.
    #[error("the budget cannot be reached: {0}")]
    Unreachable(String),
}

/// Where a budget is kept, as a daemon that leases room from it sees it.
pub trait LeaseSource: Send + Sync {
    /// Makes `amount` this daemon's lease on the budget, durably, and resolves once a crash
    /// would charge it. A raise succeeds only while the budget has room for it; a lowering
    /// always succeeds (it may be applied lazily, since a larger lease is the conservative one).
    /// The commit is under way when this returns (the future owns what it needs), so commits
    /// land in the order they were asked for.
    fn commit_lease(&self, amount: Decimal) -> LeaseFuture<'static, Result<(), LeaseError>>;
}

/// How leases are sized: raised to the peak of the holds in flight over `window`, times
/// `headroom`, never past what the budget has left; lowered lazily to that when it has stayed
/// larger for a whole window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    pub window: Duration,
    /// In percent: 200 leases twice the recent peak.
    pub headroom_percent: u32,
}

impl Default for LeasePolicy {
    fn default() -> LeasePolicy {
        LeasePolicy { window: Duration::from_secs(10), headroom_percent: 200 }
    }
}

/// One budget's lease, in memory: what is committed, what is asked for, what is held.
///
/// Commits are numbered as they are asked for and land on disk in that order, but may be
/// reported back in any order; the book takes the value of the latest-numbered commit that
/// landed, so its `committed` is never more than what is on disk. A lowering counts as landed
/// at once (a larger lease on disk than in memory is the safe way round).
#[derive(Clone, Debug)]
pub struct LeaseBook {
    policy: LeasePolicy,
    /// Durable, or less: a crash charges at least this.
    committed: Decimal,
    /// The number of the commit `committed` came from.
    applied: u64,
    /// Numbers given out so far.
    asked: u64,
    /// The latest raise under way.
    raising: Option<Commit>,
    /// What the lease must cover now: holds in flight (and unreported spend, for a pool).
    covered: Decimal,
    /// The largest `covered` seen since `peak_since`.
    peak: Decimal,
    peak_since: Instant,
    /// Since when the lease has been larger than it needs to be.
    oversized_since: Option<Instant>,
}

/// One commit of a lease: its amount, and its place in the order commits were asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    pub amount: Decimal,
    pub seq: u64,
}

/// What admitting a hold asks of the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cover {
    /// The committed lease covers it: the request may go at once.
    Now,
    /// A raise under way (or `raise`, to start now) will cover it once committed ≥ `needed`.
    After { raise: Option<Commit>, needed: Decimal },
}

impl LeaseBook {
    pub fn new(policy: LeasePolicy, committed: Decimal, now: Instant) -> LeaseBook {
        LeaseBook {
            policy,
            committed,
            applied: 0,
            asked: 0,
            raising: None,
            covered: Decimal::ZERO,
            peak: Decimal::ZERO,
            peak_since: now,
            oversized_since: None,
        }
    }

    pub fn committed(&self) -> Decimal {
        self.committed
    }

    pub fn covered(&self) -> Decimal {
        self.covered
    }

    /// Whether a hold that needed the lease at `needed` when it was taken is covered now. A
    /// report since lowers the committed lease and what it covers alike, so once the lease
    /// covers everything it has to, it covers that hold too, even below `needed`.
    pub fn covers(&self, needed: Decimal) -> bool {
        self.committed >= needed.min(self.covered)
    }

    fn ask(&mut self, amount: Decimal) -> Commit {
        self.asked += 1;
        Commit { amount, seq: self.asked }
    }

    /// Takes `amount` under the lease (a hold admitted; for a pool, spend not yet reported).
    /// `room` is the most the budget could lease in all (what its cap has left). The caller has
    /// already checked the hold against the cap.
    pub fn take(&mut self, amount: Decimal, room: Decimal, now: Instant) -> Cover {
        self.covered = self.covered.saturating_add(amount);
        self.note_peak(now);
        let needed = self.covered;
        if needed <= self.committed {
            return Cover::Now;
        }
        if self.raising.is_some_and(|r| r.amount >= needed) {
            return Cover::After { raise: None, needed };
        }
        let wanted = self.peak.saturating_mul(Decimal::from(self.policy.headroom_percent)) / Decimal::ONE_HUNDRED;
        let raise = self.ask(wanted.max(needed).min(room.max(needed)));
        self.raising = Some(raise);
        Cover::After { raise: Some(raise), needed }
    }

    /// Gives `amount` back (a hold settled or released, spend reported).
    pub fn give_back(&mut self, amount: Decimal, now: Instant) {
        self.covered = (self.covered - amount).max(Decimal::ZERO);
        self.note_peak(now);
    }

    /// A raise came back: landed (`ok`) or failed. Only the latest-numbered commit that landed
    /// counts, whatever order they come back in.
    pub fn landed(&mut self, commit: Commit, ok: bool) {
        if ok && commit.seq > self.applied {
            self.committed = commit.amount;
            self.applied = commit.seq;
        }
        if self.raising.is_some_and(|r| r.seq == commit.seq) {
            self.raising = None;
        }
    }

    /// Spend the budget has recorded where it is kept (a pool's report, which lowered the lease
    /// there by as much): it leaves what the lease must cover and the committed lease alike. A
    /// raise under way still lands at its own amount.
    pub fn reported(&mut self, amount: Decimal, now: Instant) {
        self.covered = (self.covered - amount).max(Decimal::ZERO);
        self.committed = (self.committed - amount).max(Decimal::ZERO);
        self.note_peak(now);
    }

    /// Lowers the lease to exactly `amount` now (at a clean stop: what is still held); the
    /// returned commit is to be written, and counts as landed already.
    pub fn lower_to(&mut self, amount: Decimal) -> Commit {
        let commit = self.ask(amount);
        self.committed = amount;
        self.applied = commit.seq;
        self.raising = None;
        commit
    }

    /// The lowering to write, when the lease has stayed larger than the recent peak with
    /// headroom for a whole window (never below what it covers now, and never while a raise is
    /// under way); it counts as landed at once.
    pub fn shrink_to(&mut self, now: Instant) -> Option<Commit> {
        self.note_peak(now);
        if self.raising.is_some() {
            return None;
        }
        let wanted = (self.peak.saturating_mul(Decimal::from(self.policy.headroom_percent)) / Decimal::ONE_HUNDRED).max(self.covered);
        if self.committed <= wanted {
            self.oversized_since = None;
            return None;
        }
        let since = *self.oversized_since.get_or_insert(now);
        if now.duration_since(since) < self.policy.window {
            return None;
        }
        self.oversized_since = None;
        Some(self.lower_to(wanted))
    }

    /// The peak decays to what is covered now once a window has passed without a larger one.
    fn note_peak(&mut self, now: Instant) {
        if now.duration_since(self.peak_since) >= self.policy.window {
            self.peak = self.covered;
            self.peak_since = now;
        } else {
            self.peak = self.peak.max(self.covered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn raise(cover: Cover) -> Commit {
        match cover {
            Cover::After { raise: Some(raise), .. } => raise,
            other => panic!("expected a raise: {other:?}"),
        }
    }

    #[test]
    fn a_report_lowers_the_lease_and_what_it_covers_and_a_raise_under_way_still_lands_whole() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LeasePolicy::default(), d("1"), t0);
        assert_eq!(book.take(d("0.8"), d("10"), t0), Cover::Now);
        let up = raise(book.take(d("0.5"), d("10"), t0));
        // The pool recorded 0.3 of settled spend: its lease there went down by as much.
        book.reported(d("0.3"), t0);
        assert_eq!((book.committed(), book.covered()), (d("0.7"), d("1.0")));
        book.landed(up, true);
        assert_eq!(book.committed(), up.amount, "the raise sets the lease it asked for");
        book.reported(d("5"), t0);
        assert_eq!((book.committed(), book.covered()), (d("0"), d("0")), "never below nothing");
    }

    #[test]
    fn a_hold_stays_covered_when_a_report_lowers_the_lease_after_its_raise_landed() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LeasePolicy { window: Duration::from_secs(10), headroom_percent: 100 }, Decimal::ZERO, t0);
        // Settled spend not yet reported, then a request that needs a raise to cover both.
        assert!(matches!(book.take(d("0.5"), d("10"), t0), Cover::After { .. }));
        book.landed(Commit { amount: d("0.5"), seq: 1 }, true);
        let Cover::After { raise: Some(up), needed } = book.take(d("0.2"), d("10"), t0) else { panic!("expected a raise") };
        assert_eq!((up.amount, needed), (d("0.7"), d("0.7")));
        book.landed(up, true);
        assert!(book.covers(needed));
        // The next transaction reports the settled 0.5 before the waiter looks: the lease there
        // is 0.2, exactly this hold, so it is covered though below what it needed at first.
        book.reported(d("0.5"), t0);
        assert_eq!((book.committed(), book.covered()), (d("0.2"), d("0.2")));
        assert!(book.covers(needed), "a report after the raise must not leave the hold waiting");
        // A hold taken later and not yet raised for is not covered by a smaller lease.
        let Cover::After { needed, .. } = book.take(d("0.3"), d("10"), t0) else { panic!("expected to wait") };
        assert!(!book.covers(needed));
    }

    #[test]
    fn holds_inside_the_committed_lease_go_at_once() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LeasePolicy::default(), d("1"), t0);
        assert_eq!(book.take(d("0.4"), d("10"), t0), Cover::Now);
        assert_eq!(book.take(d("0.6"), d("10"), t0), Cover::Now, "exactly the lease fits");
        // Past it: one raise, to twice the peak, and the next request rides on that raise.
        let first = book.take(d("0.5"), d("10"), t0);
        assert_eq!(first, Cover::After { raise: Some(Commit { amount: d("3"), seq: 1 }), needed: d("1.5") });
        assert_eq!(book.take(d("0.5"), d("10"), t0), Cover::After { raise: None, needed: d("2.0") });
        book.landed(raise(first), true);
        assert_eq!(book.committed(), d("3"));
        assert_eq!(book.take(d("0.9"), d("10"), t0), Cover::Now);
    }

    #[test]
    fn near_the_cap_the_lease_is_what_is_held() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LeasePolicy::default(), Decimal::ZERO, t0);
        // Only 0.25 left to lease: the raise is exactly the holds, never past the room.
        let first = raise(book.take(d("0.2"), d("0.25"), t0));
        assert_eq!(first.amount, d("0.25"));
        book.landed(first, true);
        book.give_back(d("0.2"), t0);
        assert_eq!(raise(book.take(d("0.3"), d("0.3"), t0)).amount, d("0.3"));
    }

    #[test]
    fn commits_coming_back_out_of_order_never_raise_memory_past_the_disk() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LeasePolicy { window: Duration::from_secs(10), headroom_percent: 100 }, Decimal::ZERO, t0);
        let small = raise(book.take(d("1"), d("100"), t0));
        let large = raise(book.take(d("2"), d("100"), t0));
        assert!(large.seq > small.seq);
        book.landed(large, true);
        assert_eq!(book.committed(), d("3"));
        // Quiet now: the lease is lowered (on disk after both raises), then the small raise comes
        // back late. It must not undo the lowering, which the disk will end on.
        book.give_back(d("3"), t0);
        let later = t0 + Duration::from_secs(11);
        book.shrink_to(later);
        let lowered = book.shrink_to(later + Duration::from_secs(10)).expect("a lowering");
        assert_eq!(lowered.amount, Decimal::ZERO);
        book.landed(small, true);
        assert_eq!(book.committed(), Decimal::ZERO, "the late raise is older than the lowering");
    }

    #[test]
    fn an_oversized_lease_shrinks_after_a_quiet_window_never_below_what_it_covers() {
        let t0 = Instant::now();
        let policy = LeasePolicy { window: Duration::from_secs(10), headroom_percent: 200 };
        let mut book = LeaseBook::new(policy, d("5"), t0);
        book.take(d("0.5"), d("10"), t0);
        assert_eq!(book.shrink_to(t0), None, "not before a whole window");
        let quiet = t0 + Duration::from_secs(11);
        assert_eq!(book.shrink_to(quiet).map(|c| c.amount), Some(d("1.0")), "twice what is held, after a window too large");
        assert_eq!(book.committed(), d("1.0"), "applied at once");
        assert_eq!(book.shrink_to(quiet + Duration::from_secs(30)), None, "now the right size");
        assert_eq!(book.lower_to(d("0.5")).amount, d("0.5"));
        assert_eq!(book.committed(), d("0.5"));
    }

    #[test]
    fn a_failed_raise_is_abandoned() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LeasePolicy::default(), Decimal::ZERO, t0);
        let target = raise(book.take(d("1"), d("5"), t0));
        book.landed(target, false);
        assert_eq!(book.committed(), Decimal::ZERO);
        book.give_back(d("1"), t0);
        assert!(matches!(book.take(d("1"), d("5"), t0), Cover::After { raise: Some(_), .. }), "the next request asks again");
    }
}
