//! A grant's live slot: the grant, its spend in the current window (rolled over at the
//! window's end from the store's running totals), and what its count and rate limits count.

use super::*;

/// One grant and its spend in the current window.
pub struct GrantSlot {
    pub id: GrantId,
    pub(super) live: Mutex<GrantLive>,
    /// Woken whenever room may have come free (a hold settled, released or shrunk, a waiter
    /// left), so that waiting requests try again.
    pub(super) changed: tokio::sync::Notify,
    /// Where the grant's admission lease is made durable (the local store).
    pub(super) lease_source: Arc<dyn crate::lease::LeaseSource>,
    /// The committed lease, for requests waiting for a raise to land.
    pub(super) lease_state: tokio::sync::watch::Sender<super::leases::LeaseState>,
}

pub(super) struct GrantLive {
    pub(super) grant: Grant,
    pub(super) window: Window,
    pub(super) spent: Decimal,
    /// The sum of the bounds of admitted requests not yet settled. It belongs to no window:
    /// a request admitted before a reset still holds its amount until it settles.
    pub(super) reserved: Decimal,
    /// Counts for the grant's count and rate limits.
    pub(super) counts: Counts,
    /// Requests refused, by reason, over the grant's life.
    pub(super) refusals: BTreeMap<String, u64>,
    /// Requests arrived and not yet admitted or refused.
    pub(super) arriving: u64,
    /// Tickets of requests waiting for room, first come first served.
    pub(super) queue: VecDeque<u64>,
    pub(super) next_ticket: u64,
    /// The admission lease: what is committed for holds in flight, and what they hold.
    pub(super) lease: crate::lease::LeaseBook,
    /// Settled costs whose ledger entries are not durable yet: the lease still covers them.
    pub(super) unrecorded: Decimal,
}

/// What count and rate limits are checked against, kept beside the money.
#[derive(Default)]
pub(super) struct Counts {
    /// Requests admitted over the grant's life, in flight included.
    pub(super) requests: u64,
    /// Tokens settled over the grant's life plus the token bounds of requests in flight.
    pub(super) tokens: u64,
    pub(super) in_flight: u64,
    /// Admission times (Unix ms) within the last minute, kept only while the grant has a
    /// requests-per-minute limit (then at most that many are kept).
    pub(super) recent_requests: VecDeque<i64>,
    /// Settlement times and token counts within the last minute, kept only while the grant has
    /// a tokens-per-minute limit, and their sum (so that no check walks the window).
    pub(super) recent_tokens: VecDeque<(i64, u64)>,
    pub(super) recent_token_sum: u64,
}

const MINUTE_MS: i64 = 60_000;

impl Counts {
    pub(super) fn from_lifetime(totals: &Totals) -> Counts {
        Counts { requests: totals.requests, tokens: totals.input_tokens.saturating_add(totals.output_tokens), ..Counts::default() }
    }

    /// Records an admission for the requests-per-minute window, when the grant has that limit.
    pub(super) fn note_request(&mut self, now_ms: i64, limits: &Limits) {
        if limits.rpm.is_some() {
            self.recent_requests.push_back(now_ms);
        }
    }

    /// Records a settlement's tokens for the tokens-per-minute window, when the grant has that
    /// limit.
    pub(super) fn note_tokens(&mut self, at_ms: i64, tokens: u64, limits: &Limits) {
        if limits.tpm.is_some() {
            self.recent_tokens.push_back((at_ms, tokens));
            self.recent_token_sum = self.recent_token_sum.saturating_add(tokens);
        }
    }

    /// Forgets what left the last minute, then says where the grant stands.
    pub(super) fn usage(&mut self, now_ms: i64) -> crate::grants::Usage {
        while self.recent_requests.front().is_some_and(|&at| at <= now_ms - MINUTE_MS) {
            self.recent_requests.pop_front();
        }
        while let Some(&(at, tokens)) = self.recent_tokens.front().filter(|(at, _)| *at <= now_ms - MINUTE_MS) {
            let _ = at;
            self.recent_tokens.pop_front();
            self.recent_token_sum = self.recent_token_sum.saturating_sub(tokens);
        }
        let tokens_last_minute = self.recent_token_sum;
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
    /// The admission lease committed for requests in flight (what a crash would charge).
    pub lease: Decimal,
}

impl GrantSlot {
    /// A grant's slot, with no lease yet (a start has charged whatever lease a crash left).
    pub(super) fn new(
        grant: Grant,
        window: Window,
        spent: Decimal,
        counts: Counts,
        refusals: BTreeMap<String, u64>,
        store: &Store,
    ) -> GrantSlot {
        let id = grant.id;
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
            lease: crate::lease::LeaseBook::new(crate::lease::LeasePolicy::default(), Decimal::ZERO, Instant::now()),
            unrecorded: Decimal::ZERO,
        };
        GrantSlot {
            id,
            live: Mutex::new(live),
            changed: tokio::sync::Notify::new(),
            lease_source: Arc::new(super::leases::LocalLease::new(store.clone(), id)),
            lease_state: tokio::sync::watch::Sender::new(super::leases::LeaseState::default()),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, GrantLive> {
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

    pub(super) fn view(&self, now: i64, store: &Store) -> GrantView {
        let mut live = self.lock();
        live.roll(now, self.id, store);
        GrantView {
            grant: live.grant.clone(),
            spent: live.spent,
            reserved: live.reserved,
            state: live.grant.state(now, live.spent),
            window: live.window,
            refusals: live.refusals.clone(),
            lease: live.lease.committed(),
        }
    }
}

impl GrantLive {
    /// Moves to the window containing `at` when the period has turned over, taking that
    /// window's spend from the store's running totals (zero for a window not yet used). Never
    /// backwards: a time read just before the turn (or a clock stepped back) stays in the
    /// current window, since rolling back and forth again would re-read totals that lack the
    /// settlements still queued.
    pub(super) fn roll(&mut self, at: i64, id: GrantId, store: &Store) {
        if self.window.contains(at) || at < self.window.start {
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
