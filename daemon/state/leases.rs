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
                drop(live);
                slot.lease_state.send_modify(|s| s.committed = held);
                drop(slot.lease_source.commit_lease(held));
            }
        }
    }
}

impl GrantSlot {
    /// Takes `amount` under the grant's lease (the caller holds the lock and has checked the
    /// cap). Returns the gate the request must pass before its body goes upstream, if any, and
    /// the raise to start once the lock is released.
    pub(super) fn lease_take(&self, live: &mut GrantLive, amount: Decimal) -> (Option<LeaseGate>, Option<Commit>) {
        if amount.is_zero() {
            return (None, None);
        }
        let room = live.grant.cap.checked_sub(live.spent).unwrap_or(Decimal::ZERO).max(Decimal::ZERO);
        match live.lease.take(amount, room, std::time::Instant::now()) {
            Cover::Now => (None, None),
            Cover::After { raise, needed } => {
                let watch = self.lease_state.subscribe();
                let failures_before = watch.borrow().failures;
                (Some(LeaseGate { watch, needed, failures_before }), raise)
            }
        }
    }

    /// Gives `amount` back to the lease, and lowers the lease lazily when it has stayed larger
    /// than recent demand; returns the lowering to commit once the lock is released.
    pub(super) fn lease_give_back(&self, live: &mut GrantLive, amount: Decimal) -> Option<Commit> {
        if amount.is_zero() {
            return None;
        }
        let now = std::time::Instant::now();
        live.lease.give_back(amount, now);
        // A smaller lease in memory than on disk is the safe way round: it applies at once.
        let lower = live.lease.shrink_to(now)?;
        self.lease_state.send_modify(|s| s.committed = lower.amount);
        Some(lower)
    }

    /// Commits the lease at `amount`: a raise lands in memory (and wakes its waiters) only once
    /// durable; a lowering is already in memory. Runs on the runtime when there is one, else
    /// (tests, benches) at once.
    pub(super) fn commit_lease(self: &Arc<Self>, commit: Commit, raise: bool) {
        if !raise {
            // Already in memory; the write is under way once asked for, and nothing waits on it
            // (so this may run anywhere, the store's writer thread included).
            drop(self.lease_source.commit_lease(commit.amount));
            return;
        }
        let slot = self.clone();
        let committed = self.lease_source.commit_lease(commit.amount);
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
