//! A grant's admission lease on its own cap: the local store is its [`LeaseSource`], the
//! grant's slot keeps its [`LeaseBook`], and a watch channel tells requests waiting for a raise
//! when it has landed (or failed).
//!
//! Requests are admitted in memory. One whose hold the committed lease covers goes upstream at
//! once; one that needs more waits for the one commit that raises the lease (every request that
//! needs it rides on the same commit), and is not sent if that commit fails.

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::lease::{Commit, Cover, LeaseError, LeaseFuture, LeaseSource};

/// The local store as a grant's lease source: the daemon's memory decides whether the cap has
/// room (it is the only one spending the grant), the store makes the lease durable.
pub struct LocalLease {
    store: Store,
    grant: GrantId,
}

impl LocalLease {
    pub fn new(store: Store, grant: GrantId) -> LocalLease {
        LocalLease { store, grant }
    }
}

impl LeaseSource for LocalLease {
    fn commit_lease(&self, amount: Decimal) -> LeaseFuture<'static, Result<(), LeaseError>> {
        // Queued now, so that commits land in the order they were asked for.
        let committed = self.store.submit(WriteOp::PutLease { grant: self.grant, amount });
        Box::pin(async move {
            match committed.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(LeaseError::Unreachable(e.to_string())),
                Err(_) => Err(LeaseError::Unreachable("the store is closed".into())),
            }
        })
    }
}

/// What waiting requests watch: the committed lease, and how many raises have failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    pub committed: Decimal,
    pub failures: u64,
}

/// A request's wait for a committed lease that covers its hold.
pub struct LeaseGate {
    watch: tokio::sync::watch::Receiver<LeaseState>,
    needed: Decimal,
    failures_before: u64,
}

/// The wait of a [`LeaseGate`], as the request body polls it.
pub type LeaseWait = Pin<Box<dyn Future<Output = Result<(), LeaseError>> + Send>>;

impl LeaseGate {
    /// Resolves once the committed lease covers the hold, or fails if a raise failed first.
    pub fn wait(mut self) -> LeaseWait {
        Box::pin(async move {
            loop {
                {
                    let state = self.watch.borrow_and_update();
                    if state.committed >= self.needed {
                        return Ok(());
                    }
                    if state.failures > self.failures_before {
                        return Err(LeaseError::Unreachable("the lease could not be raised".into()));
                    }
                }
                if self.watch.changed().await.is_err() {
                    return Err(LeaseError::Unreachable("the grant is gone".into()));
                }
            }
        })
    }
}

impl State {
    /// Lowers every grant's lease to what requests still in flight hold (nothing, when none
    /// are), at a clean stop: queued before the store closes and after every settlement's
    /// entry, so a clean stop leaves nothing to charge as interrupted.
    pub fn lower_leases_to_holds(&self) {
        let slots: Vec<Arc<GrantSlot>> = self.read().grants.values().cloned().collect();
        for slot in slots {
            let mut live = slot.lock();
            let held = (live.lease.covered() - live.unrecorded).max(Decimal::ZERO);
            if live.lease.committed() > held {
                live.lease.lower_to(held);
                // Queued under the lock, after any commit numbered before it.
                drop(slot.lease_source.commit_lease(held));
                drop(live);
                slot.lease_state.send_modify(|s| s.committed = held);
            }
        }
    }
}

/// A lease commit whose write was queued under the grant's lock: commits are numbered under that
/// lock, so queueing there too is what makes them reach the store in the order of their numbers
/// (queued after the lock is released, a lowering could land after a later raise, leaving memory
/// trusting a larger lease than the disk holds). [`GrantSlot::commit_lease`] sees it through.
#[must_use = "a raise lands in memory only through GrantSlot::commit_lease"]
pub(super) struct LeaseCommit {
    commit: Commit,
    raise: bool,
    write: LeaseFuture<'static, Result<(), LeaseError>>,
}

impl GrantSlot {
    fn start_commit(&self, commit: Commit, raise: bool) -> LeaseCommit {
        LeaseCommit { commit, raise, write: self.lease_source.commit_lease(commit.amount) }
    }

    /// Takes `amount` under the grant's lease (the caller holds the lock and has checked the
    /// cap). Returns the gate the request must pass before its body goes upstream, if any, and
    /// the raise, queued already, to see through once the lock is released.
    pub(super) fn lease_take(&self, live: &mut GrantLive, amount: Decimal) -> (Option<LeaseGate>, Option<LeaseCommit>) {
        if amount.is_zero() {
            return (None, None);
        }
        let room = live.grant.cap.checked_sub(live.spent).unwrap_or(Decimal::ZERO).max(Decimal::ZERO);
        match live.lease.take(amount, room, std::time::Instant::now()) {
            Cover::Now => (None, None),
            Cover::After { raise, needed } => {
                let watch = self.lease_state.subscribe();
                let failures_before = watch.borrow().failures;
                (Some(LeaseGate { watch, needed, failures_before }), raise.map(|raise| self.start_commit(raise, true)))
            }
        }
    }

    /// Gives `amount` back to the lease, and lowers the lease lazily when it has stayed larger
    /// than recent demand; returns the lowering, queued already.
    pub(super) fn lease_give_back(&self, live: &mut GrantLive, amount: Decimal) -> Option<LeaseCommit> {
        if amount.is_zero() {
            return None;
        }
        let now = std::time::Instant::now();
        live.lease.give_back(amount, now);
        // A smaller lease in memory than on disk is the safe way round: it applies at once.
        let lower = live.lease.shrink_to(now)?;
        self.lease_state.send_modify(|s| s.committed = lower.amount);
        Some(self.start_commit(lower, false))
    }

    /// Sees a queued lease commit through: a raise lands in memory (and wakes its waiters) only
    /// once durable; a lowering is already in memory. Runs on the runtime when there is one, else
    /// (tests, benches) at once. Call it once the grant's lock is released.
    pub(super) fn commit_lease(self: &Arc<Self>, started: LeaseCommit) {
        let LeaseCommit { commit, raise, write: committed } = started;
        if !raise {
            // The write is under way, and nothing waits on it (so this may run anywhere, the
            // store's writer thread included).
            drop(committed);
            return;
        }
        let slot = self.clone();
        let commit = async move {
            let ok = committed.await.is_ok();
            let mut live = slot.lock();
            live.lease.landed(commit, ok);
            let committed = live.lease.committed();
            drop(live);
            slot.lease_state.send_modify(|s| {
                s.committed = committed;
                if !ok {
                    s.failures += 1;
                }
            });
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(commit)),
            Err(_) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(commit),
                Err(e) => tracing::error!(error = %e, "no runtime to commit a lease on"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use super::super::test_support::*;
    use super::*;

    /// A lease source that records writes in the order they are queued; the first is slow to
    /// queue, as a thread preempted just after taking its commit's number would be.
    #[derive(Default)]
    struct Recorder {
        queued: Mutex<Vec<Decimal>>,
        first_asked: AtomicBool,
    }

    impl LeaseSource for Recorder {
        fn commit_lease(&self, amount: Decimal) -> LeaseFuture<'static, Result<(), LeaseError>> {
            if !self.first_asked.swap(true, Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            self.queued.lock().unwrap().push(amount);
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn lease_writes_are_queued_in_the_order_of_their_numbers() {
        let (state, dir) = temp_state(Clock::default());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(state.create_grant(GrantSpec { cap: dollars("100"), ..grant_spec(Period::Total, None) })).unwrap();
        drop(runtime);
        let registered = state.find_grant("g").unwrap();
        let (grant, window) = {
            let live = registered.lock();
            (live.grant.clone(), live.window)
        };
        let recorder = Arc::new(Recorder::default());
        let mut slot = GrantSlot::new(grant, window, Decimal::ZERO, Counts::default(), BTreeMap::new(), state.store());
        slot.lease_source = recorder.clone();
        let (state, slot) = (Arc::new(state), Arc::new(slot));

        // The first request's raise (to twice its hold) is slow to queue; meanwhile a larger
        // request outgrows it and raises again.
        let first = {
            let (state, slot) = (state.clone(), slot.clone());
            std::thread::spawn(move || state.admit_now(&slot, "m", &hold_of(dollars("1"))).unwrap().0)
        };
        while !recorder.first_asked.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let second = state.admit_now(&slot, "m", &hold_of(dollars("10"))).unwrap().0;
        let first = first.join().unwrap();

        let committed = slot.lock().lease.committed();
        let queued = recorder.queued.lock().unwrap().clone();
        assert_eq!(queued.last(), Some(&committed), "the disk ends at the lease memory trusts (writes queued: {queued:?})");
        assert!(committed >= dollars("11"), "{committed} covers both holds");
        drop((first, second));
        state.store().close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
