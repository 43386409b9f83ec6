//! The proxy's side of the state: authenticating a key, admitting a request against its
//! grant (holding the most it can cost, fitting it, or making it wait), trueing its hold up,
//! settling it and counting refusals.
//!
//! Invariant: check and hold happen under the grant's one mutex, so concurrent requests can
//! never together be admitted past the cap.

use super::*;

/// How long and how many requests may wait for holds in flight to settle, per grant.
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    pub timeout: std::time::Duration,
    pub depth: usize,
}

/// An admitted request's hold on its grant's budget. Settling it swaps the hold for the
/// metered cost; dropping it unsettled (a request that never reached the upstream) releases it.
pub struct Reservation {
    pub(super) slot: Arc<GrantSlot>,
    pub(super) amount: Decimal,
    pub(super) tokens: u64,
    pub(super) settled: bool,
    /// What the request must wait for before its body may go upstream: a committed lease that
    /// covers its hold (none when the lease already did at admission).
    pub(super) gate: Option<super::leases::LeaseGate>,
    /// When the request was admitted, for the latency its settlement reports.
    pub(super) admitted_at: Instant,
    /// The hold under the team pool the grant draws on, if it does (`state/pools.rs`).
    pub(super) pool: Option<crate::team::pool_lease::PoolHold>,
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

    /// The wait the request's body must pass before it goes upstream, taken once: a committed
    /// lease that covers its hold, so that a crash after the upstream could bill it charges at
    /// least its hold. `None` when the lease covered it already.
    pub fn take_gate(&mut self) -> Option<super::leases::LeaseWait> {
        self.gate.take().map(super::leases::LeaseGate::wait)
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
            let lower = self.slot.lease_give_back(&mut live, self.amount);
            let waiting = !live.queue.is_empty();
            drop(live);
            if waiting {
                self.slot.changed.notify_waiters();
            }
            if let Some(lower) = lower {
                self.slot.commit_lease(lower);
            }
        }
    }
}

/// A request that has arrived for a grant and is not yet admitted or refused; while it lives it
/// counts among those a fitted request shares what is left with.
pub struct Arrival {
    pub(super) slot: Arc<GrantSlot>,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut live = self.slot.lock();
        live.arriving = live.arriving.saturating_sub(1);
    }
}

/// A place in a grant's queue of requests waiting for holds in flight to settle. Leaving it
/// (admitted, refused, timed out, or the client gone) wakes the others.
pub(super) struct QueueTicket {
    pub(super) slot: Arc<GrantSlot>,
    pub(super) id: u64,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        let mut live = self.slot.lock();
        live.queue.retain(|t| *t != self.id);
        let waiting = !live.queue.is_empty();
        drop(live);
        if waiting {
            self.slot.changed.notify_waiters();
        }
    }
}

/// One admission attempt's outcome.
pub(super) enum Attempt {
    Admitted(Reservation, Hold),
    Wait(Refusal),
    Refused(Refusal),
}

impl Attempt {
    /// The outcome for a caller that does not wait: a request that would wait gets the refusal
    /// it would time out with.
    fn into_result(self) -> Result<(Reservation, Hold), Refusal> {
        match self {
            Attempt::Admitted(reservation, hold) => Ok((reservation, hold)),
            Attempt::Wait(refusal) | Attempt::Refused(refusal) => Err(refusal),
        }
    }
}

impl State {
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
        let busy = match self.try_admit(slot, model, demand, None) {
            Attempt::Wait(busy) => busy,
            decided => return self.with_pool(decided.into_result()).await,
        };
        let ticket = {
            let mut live = slot.lock();
            if live.queue.len() >= wait.depth {
                return Err(busy.with_wait(0, Some(wait.depth)));
            }
            let id = live.next_ticket;
            live.next_ticket += 1;
            live.queue.push_back(id);
            QueueTicket { slot: slot.clone(), id }
        };
        loop {
            // Listen first, then look again: a change between the two cannot be missed.
            let changed = slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let busy = match self.try_admit(slot, model, demand, Some(ticket.id)) {
                Attempt::Wait(busy) => busy,
                decided => {
                    drop(ticket);
                    return self.with_pool(decided.into_result()).await;
                }
            };
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(started + wait.timeout) => {
                    return Err(busy.with_wait(started.elapsed().as_secs(), None));
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
        self.try_admit(slot, model, demand, None).into_result()
    }

    /// One attempt under the grant's lock. A request that is not at the head of the queue (or,
    /// not queued yet, finds a queue) waits its turn.
    pub(super) fn try_admit(&self, slot: &Arc<GrantSlot>, model: &str, demand: &Demand, ticket: Option<u64>) -> Attempt {
        let now_ms = self.clock.now_millis();
        let now = now_ms.div_euclid(1000);
        let mut live = slot.lock();
        live.roll(now, slot.id, &self.store);
        if let Err(refusal) = live.grant.check_alive(now).and_then(|()| live.grant.check_model(model)) {
            return Attempt::Refused(refusal);
        }
        let mut room = Room {
            cap: live.grant.cap,
            spent: live.spent,
            reserved: live.reserved,
            in_flight: live.counts.in_flight,
            competing: live.arriving.max(1),
        };
        // A grant that draws on a team pool is fitted to the tighter of the two.
        let pool = match self.pool_room(&live.grant, &mut room) {
            Ok(pool) => pool,
            Err(refusal) => return Attempt::Refused(refusal),
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
        let decision = crate::admission::decide(&room, demand);
        if let Some((lease, true)) = &pool
            && !matches!(decision, Decision::Admit(_))
        {
            return Attempt::Refused(lease.refusal_for(demand.cost_least()).into());
        }
        let hold = match decision {
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
        let pool = match pool.map(|(lease, _)| lease.take(hold.amount)).transpose() {
            Ok(pool) => pool,
            Err(refusal) => return Attempt::Refused(refusal.into()),
        };
        live.reserved += hold.amount;
        let (gate, raise) = slot.lease_take(&mut live, hold.amount);
        let counts = &mut live.counts;
        counts.requests += 1;
        counts.tokens = counts.tokens.saturating_add(hold.tokens);
        counts.in_flight += 1;
        let inner = &mut *live;
        inner.counts.note_request(now_ms, &inner.grant.limits);
        drop(live);
        if let Some(raise) = raise {
            slot.commit_lease(raise);
        }
        let reservation = Reservation {
            slot: slot.clone(),
            amount: hold.amount,
            tokens: hold.tokens,
            settled: false,
            gate,
            admitted_at: Instant::now(),
            pool,
        };
        Attempt::Admitted(reservation, hold)
    }

    /// Changes an admitted request's hold to `amount` once its reply has said more about its
    /// cost (its input, stated first). Shrinking always succeeds and gives the room back at once;
    /// growing succeeds only if the room is there, and raises the lease to cover it (the body
    /// has gone already, so nothing waits for that raise: until it lands, a crash charges the
    /// smaller lease, which covered everything the request had been held for).
    pub fn resize_hold(&self, reservation: &mut Reservation, amount: Decimal) -> bool {
        if amount == reservation.amount || amount.is_sign_negative() {
            return amount == reservation.amount;
        }
        let slot = reservation.slot.clone();
        // The pool's hold changes first: growing it can fail, shrinking it cannot.
        let before = reservation.amount;
        if let Some(hold) = reservation.pool.as_mut() {
            let lease = hold.pool().clone();
            if !lease.resize(hold, amount) {
                return false;
            }
        }
        let mut live = slot.lock();
        let (raise, lower) = if amount > reservation.amount {
            let more = amount - reservation.amount;
            let free = live.grant.cap.checked_sub(live.spent).and_then(|f| f.checked_sub(live.reserved)).unwrap_or(Decimal::ZERO);
            if more > free {
                drop(live);
                if let Some(hold) = reservation.pool.as_mut() {
                    let lease = hold.pool().clone();
                    lease.resize(hold, before);
                }
                return false;
            }
            live.reserved += more;
            (slot.lease_take(&mut live, more).1, None)
        } else {
            let less = reservation.amount - amount;
            live.reserved -= less;
            (None, slot.lease_give_back(&mut live, less))
        };
        let waiting = !live.queue.is_empty();
        drop(live);
        reservation.amount = amount;
        if let Some(change) = raise.or(lower) {
            slot.commit_lease(change);
        }
        if waiting {
            slot.changed.notify_waiters();
        }
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
    /// its running totals) is written with the next batch; the returned receiver resolves then.
    /// Nobody needs to wait for it: until it commits, the cost stays under the grant's lease, so
    /// a crash charges it (as part of the lease) if the entry never landed.
    pub fn settle(&self, mut reservation: Reservation, entry: LedgerEntry) -> tokio::sync::oneshot::Receiver<Result<(), StoreError>> {
        let slot = reservation.slot.clone();
        let (hold, cost) = (reservation.amount, entry.cost);
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
            let inner = &mut *live;
            inner.counts.note_tokens(entry.at_ms, used, &inner.grant.limits);
            // The cost stays under the lease until its entry is durable (else a crash in between
            // would find it in neither); only what the hold had beyond it goes back now.
            let change =
                if hold >= cost { slot.lease_give_back(&mut live, hold - cost) } else { slot.lease_take(&mut live, cost - hold).1 };
            live.unrecorded = live.unrecorded.saturating_add(cost);
            (live.window.start, change, !live.queue.is_empty())
        };
        let (window_start, change, waiting) = window_start;
        reservation.settled = true;
        // The cost stays under the pool's lease until the pool has the entry's copy.
        if let Some(hold) = reservation.pool.take() {
            let lease = hold.pool().clone();
            lease.settle(hold, entry.cost);
        }
        self.events.settled(slot.standing(), &entry, reservation.admitted_at.elapsed());
        // Waiters listen before they look, so one that joins after this check sees this spend.
        if waiting {
            slot.changed.notify_waiters();
        }
        if let Some(change) = change {
            slot.commit_lease(change);
        }
        // Once the entry is durable its cost leaves the lease (which may then be lowered: any
        // lowering is queued after the entry, so a crash never finds the cost gone from both).
        let (told, committed) = tokio::sync::oneshot::channel();
        let covered = slot.clone();
        self.store.submit_then(WriteOp::AppendEntry { entry, window_start, reservation: None }, move |result| {
            if result.is_ok() {
                let mut live = covered.lock();
                live.unrecorded = (live.unrecorded - cost).max(Decimal::ZERO);
                let lower = covered.lease_give_back(&mut live, cost);
                drop(live);
                if let Some(lower) = lower {
                    covered.commit_lease(lower);
                }
            }
            let _ = told.send(result);
        });
        committed
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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

    /// An entry stamped just before midnight and settled after the day turned over counts in the
    /// new day, and the window never steps back (which would re-read totals lacking it).
    #[test]
    fn a_settlement_stamped_before_the_turn_never_rolls_the_window_back() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let clock = Clock::default();
        let (state, dir) = temp_state(clock.clone());
        runtime.block_on(state.create_grant(grant_spec(Period::Day, None))).unwrap();
        let slot = state.find_grant("g").unwrap();
        let late = state.admit_now(&slot, "m", &hold_of(dollars("0.10"))).unwrap().0;
        let stamped = entry(&state, slot.id, dollars("0.05"));
        let midnight = state.grant_view(&slot).window.end.unwrap();
        clock.advance(std::time::Duration::from_secs((midnight - clock.now_seconds()) as u64));
        let other = state.admit_now(&slot, "m", &hold_of(dollars("0.20"))).unwrap().0;
        drop(state.settle(late, stamped));
        let view = state.grant_view(&slot);
        assert_eq!((view.window.start, view.spent), (midnight, dollars("0.05")), "counted in the day it settled");
        drop(state.settle(other, entry(&state, slot.id, dollars("0.20"))));
        assert_eq!(state.grant_view(&slot).spent, dollars("0.25"), "nothing settled in the new day is lost");
        state.store().close();
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
        // The ledger, once durable, says the same as memory (a clean stop leaves no lease).
        state.lower_leases_to_holds();
        state.store().close();
        drop((state, slot));
        let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
        let reopened = State::new(store, snapshot, dir.clone()).unwrap();
        assert_eq!(reopened.grant_view(&reopened.find_grant("g").unwrap()).spent, model_spent);
        reopened.store().close();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Leases against a reference model: random admissions, settlements and releases, then a
    /// crash (the store closed with requests still in flight, nothing settled or released), a
    /// restart, and again. Every hold in flight is covered by the committed lease; a restart
    /// charges exactly that lease, once; so the ledger never falls below what was settled plus
    /// what was in flight, and the over-charge is at most the lease.
    #[test]
    fn leases_admit_settle_crash_and_recover_against_a_reference_model() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (state, dir) = temp_state(Clock::default());
        let cap = dollars("10");
        runtime.block_on(state.create_grant(GrantSpec { cap, ..grant_spec(Period::Total, None) })).unwrap();
        drop(runtime);
        let mut state = Some(state);
        let mut seed = 0x51ED_2701_A3C4_9B57u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut model_spent = Decimal::ZERO;
        for crash in 0..5 {
            let live_state = state.take().unwrap();
            let slot = live_state.find_grant("g").unwrap();
            assert_eq!(live_state.grant_view(&slot).spent, model_spent, "crash {crash}: the restart charged what the model says");
            let mut open: Vec<Reservation> = Vec::new();
            let mut model_held = Decimal::ZERO;
            for step in 0..400 {
                match next(3) {
                    0 => {
                        let hold = Decimal::new(next(20_001) as i64, 5); // $0 to $0.20000
                        if let Ok((reservation, _)) = live_state.admit_now(&slot, "m", &hold_of(hold)) {
                            model_held += hold;
                            open.push(reservation);
                            assert!(model_spent + model_held <= cap, "crash {crash}, step {step}: admitted past the cap");
                        }
                    }
                    1 if !open.is_empty() => {
                        let reservation = open.swap_remove(next(open.len() as u64) as usize);
                        let cost = reservation.amount() * Decimal::new(next(101) as i64, 2);
                        model_held -= reservation.amount();
                        model_spent += cost;
                        drop(live_state.settle(reservation, entry(&live_state, slot.id, cost)));
                    }
                    _ if !open.is_empty() => {
                        let reservation = open.swap_remove(next(open.len() as u64) as usize);
                        model_held -= reservation.amount();
                        drop(reservation);
                    }
                    _ => {}
                }
                let view = live_state.grant_view(&slot);
                assert_eq!((view.spent, view.reserved), (model_spent, model_held), "crash {crash}, step {step}");
                // Settled costs whose entries are not durable yet stay covered too.
                let (covered, unrecorded) = {
                    let live = slot.lock();
                    (live.lease.covered(), live.unrecorded)
                };
                assert!(covered >= view.reserved + unrecorded, "crash {crash}, step {step}: {covered} covers holds and unrecorded spend");
                assert!(view.lease >= covered, "crash {crash}, step {step}: the lease {} covers {covered}", view.lease);
            }
            // The crash: whatever was queued is on disk, nothing in flight settles or releases.
            let lease = live_state.grant_view(&slot).lease;
            live_state.store().close();
            // Gone with the process: no release runs.
            open.iter_mut().for_each(|reservation| reservation.settled = true);
            drop(open);
            drop((live_state, slot));
            let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
            assert_eq!(
                snapshot.leases.iter().map(|(_, l)| *l).sum::<Decimal>(),
                lease,
                "crash {crash}: the lease in memory is the one on disk"
            );
            // In flight at the crash: at most their holds were billed; the lease covers them.
            assert!(lease >= model_held, "crash {crash}: lease {lease} < held {model_held}");
            model_spent += lease;
            state = Some(State::new(store, snapshot, dir.clone()).unwrap());
        }
        let last = state.unwrap();
        assert_eq!(last.grant_view(&last.find_grant("g").unwrap()).spent, model_spent);
        last.store().close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
