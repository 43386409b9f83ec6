//! Response bodies: the metered stream that carries an upstream reply to the client, chunk by
//! chunk, and settles its cost when it ends.
//!
//! Invariants: nothing is buffered beyond one SSE event (and only when events are filtered or
//! the stream may be cut); a reply is settled (its cost counted against the grant) before its
//! end reaches the client, so the next request sees it; and a
//! client that goes away does not stop the metering: the rest of the upstream reply is read,
//! for a bounded time, to capture its usage before the request is settled.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use rust_decimal::Decimal;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

use crate::ledger::{EntryStatus, LedgerEntry};
use crate::pricing::Price;
use crate::providers::MeteredApi;
use crate::state::{Reservation, State};
use crate::store::StoreError;
use crate::usage::{Observed, ResponseMeter, Usage};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A request body held back, when its hold needed the grant's lease raised, until that raise is
/// durable. The request head goes out at once (connecting and TLS proceed meanwhile), but an
/// upstream cannot bill a request whose body it has not received, so a crash can never leave a
/// billed request uncovered by a committed lease.
pub struct GatedBody {
    gate: Option<crate::state::LeaseWait>,
    data: Option<Bytes>,
    progress: Arc<GateProgress>,
}

/// How far a gated body got, read after the exchange failed: whether the upstream may have
/// received (and so billed) the request, or its hold could not be recorded.
#[derive(Debug, Default)]
pub struct GateProgress {
    sent: AtomicBool,
    unrecorded: AtomicBool,
}

impl GateProgress {
    /// The body was handed to the connection: from here the upstream may bill the request.
    pub fn body_sent(&self) -> bool {
        self.sent.load(Ordering::SeqCst)
    }

    /// The hold could not be made durable, so the body was never sent.
    pub fn hold_unrecorded(&self) -> bool {
        self.unrecorded.load(Ordering::SeqCst)
    }
}

impl GatedBody {
    pub fn new(data: Bytes, gate: Option<crate::state::LeaseWait>) -> GatedBody {
        GatedBody { gate, data: Some(data).filter(|d| !d.is_empty()), progress: Arc::default() }
    }

    pub fn progress(&self) -> Arc<GateProgress> {
        self.progress.clone()
    }
}

impl Body for GatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(gate) = self.gate.as_mut() {
            match gate.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => self.gate = None,
                Poll::Ready(Err(_)) => {
                    self.gate = None;
                    self.data = None;
                    self.progress.unrecorded.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(Err("the request's reservation could not be recorded; not sending it".into())));
                }
            }
        }
        let data = self.data.take();
        if data.is_some() {
            self.progress.sent.store(true, Ordering::SeqCst);
        }
        Poll::Ready(data.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.gate.is_none() && self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// How a metered request's cost is established.
#[derive(Clone, Debug)]
pub enum Pricing {
    /// A provider priced at zero (a local server).
    Zero,
    /// Tokens times this price.
    Tokens(Arc<Price>),
    /// The provider reports what it charged (OpenRouter), and that is billed; the price bounds
    /// the hold and prices a reply that reports no cost.
    Reported(Arc<Price>),
}

impl Pricing {
    pub fn price(&self) -> Option<&Price> {
        match self {
            Pricing::Zero => None,
            Pricing::Tokens(price) | Pricing::Reported(price) => Some(price),
        }
    }
}

static INTERRUPTED_LOG: crate::log_throttle::LogThrottle = crate::log_throttle::LogThrottle::new(Duration::from_secs(1));
static INVALID_USAGE_LOG: crate::log_throttle::LogThrottle = crate::log_throttle::LogThrottle::new(Duration::from_secs(1));

/// Everything needed to turn what was observed into a ledger entry.
pub struct Settlement {
    pub state: Arc<State>,
    /// The request's hold on its grant, swapped for the cost when it settles.
    pub reservation: Reservation,
    pub api: MeteredApi,
    pub request_model: String,
    pub pricing: Pricing,
    /// Size of the request body, for estimating input when usage never arrives.
    pub request_bytes: u64,
    pub http_status: u16,
    /// The output the hold covers (as sent upstream), for trueing the hold up.
    pub held_output_tokens: u64,
    /// The first input the reply states is its last word (no server-side tools that add input
    /// as they run), so the hold may be trued up to it at once.
    pub may_true_up: bool,
}

/// Bytes of generated text counted as one token when judging a running stream against its
/// hold. Generous (real text runs nearer 4), so that a reply within its limit is never cut.
const CUTOFF_BYTES_PER_TOKEN: u64 = 6;

impl Settlement {
    /// What the reply has cost so far by what was seen, when that can be judged.
    fn running_cost(&self, observed: &Observed) -> Option<Decimal> {
        let price = self.pricing.price()?;
        let mut usage = observed.usage.clone().unwrap_or_default();
        usage.output_tokens = usage.output_tokens.max(observed.output_text_bytes / CUTOFF_BYTES_PER_TOKEN);
        Some(crate::pricing::cost(&usage, price))
    }

    /// The hold the request needs once its reply has stated its input: that input at its exact
    /// cost, plus the output the hold covers at the output rate of the input's tier.
    fn trued_up_hold(&self, observed: &Observed) -> Option<Decimal> {
        let price = self.pricing.price()?;
        let input = Usage { output_tokens: 0, reasoning_tokens: 0, ..observed.usage.clone()? };
        let output = Decimal::from(self.held_output_tokens).checked_mul(crate::pricing::output_rate(price, input.input_tokens))?;
        crate::pricing::cost(&input, price).checked_add(output)
    }

    /// Prices what was observed and records it; the receiver resolves once it is durable.
    pub fn settle(self, observed: Observed) -> oneshot::Receiver<Result<(), StoreError>> {
        let entry = self.entry(observed);
        tracing::debug!(grant = entry.grant.0, model = %entry.model, cost = %entry.cost, reserved = %self.reservation.amount(), status = entry.status.as_str(), "settled");
        self.state.settle(self.reservation, entry)
    }

    /// Records a request whose body went upstream but whose reply never came (a timeout, a
    /// reset, a closed connection): the upstream may have billed it, so it is charged its hold.
    pub fn settle_interrupted(self, why: String) -> oneshot::Receiver<Result<(), StoreError>> {
        // A failing upstream fails every request: the line at most once a second (each is in the ledger).
        if let Some(held_back) = INTERRUPTED_LOG.allow() {
            tracing::warn!(grant = self.reservation.grant().0, hold = %self.reservation.amount(), held_back, "{why}; charged at its hold");
        }
        let entry = LedgerEntry {
            grant: self.reservation.grant(),
            at_ms: self.state.clock().now_millis(),
            model: self.request_model.clone(),
            api: self.api.as_str().to_string(),
            usage: Usage::default(),
            cost: self.reservation.amount(),
            status: EntryStatus::Interrupted,
            http_status: 0,
            error: Some(why),
        };
        self.state.settle(self.reservation, entry)
    }

    fn entry(&self, observed: Observed) -> LedgerEntry {
        let entry = |usage: Usage, cost: Decimal, status: EntryStatus, error: Option<String>, model: String| LedgerEntry {
            grant: self.reservation.grant(),
            at_ms: self.state.clock().now_millis(),
            model,
            api: self.api.as_str().to_string(),
            usage,
            cost,
            status,
            http_status: self.http_status,
            error,
        };
        let model = observed.model.clone().unwrap_or_else(|| self.request_model.clone());
        if let Some(why) = observed.invalid_usage.clone() {
            // Never credited, never $0: a reply whose counts are no counts costs its hold.
            if let Some(held_back) = INVALID_USAGE_LOG.allow() {
                tracing::warn!(grant = self.reservation.grant().0, model = %model, held_back, "the reply's usage is not valid ({why}); charged at its hold");
            }
            let usage = observed.usage.clone().unwrap_or_else(|| self.estimate(&observed));
            return entry(usage, self.reservation.amount(), EntryStatus::Estimated, Some(format!("invalid usage: {why}")), model);
        }
        if !(200..300).contains(&self.http_status) {
            // The upstream refused: recorded at what it reports (normally nothing).
            let usage = observed.usage.clone().unwrap_or_default();
            let cost = match (&self.pricing, observed.usage.is_some()) {
                (Pricing::Reported(_), _) => usage.reported_cost.unwrap_or_default(),
                (Pricing::Tokens(price), true) => crate::pricing::cost(&usage, price),
                _ => Decimal::ZERO,
            };
            let error = observed.error.clone().or_else(|| Some(format!("the upstream answered {}", self.http_status)));
            return entry(usage, cost, EntryStatus::UpstreamError, error, model);
        }
        let estimate = self.estimate(&observed);
        let (usage, mut status) = match observed.usage.clone() {
            Some(usage) if observed.usage_final => (usage, EntryStatus::Metered),
            // A partial count (the reply was cut): what it says, and at least what was seen.
            Some(mut usage) => {
                usage.output_tokens = usage.output_tokens.max(estimate.output_tokens);
                (usage, EntryStatus::Estimated)
            }
            None => (estimate, EntryStatus::Estimated),
        };
        let cost = match &self.pricing {
            Pricing::Zero => Decimal::ZERO,
            Pricing::Reported(price) => match usage.reported_cost {
                Some(reported) => reported,
                None => {
                    if status == EntryStatus::Metered {
                        tracing::warn!(model = %model, "the reply reported no cost; priced from its tokens");
                    }
                    status = EntryStatus::Estimated;
                    crate::pricing::cost(&usage, price)
                }
            },
            Pricing::Tokens(price) => {
                // The model the reply names (a dated snapshot, often) when it has its own price.
                let named = self.state.price(&model);
                crate::pricing::cost(&usage, named.as_ref().unwrap_or(price))
            }
        };
        entry(usage, cost, status, observed.error, model)
    }

    /// A reply cut before its usage: four bytes of request body per input token and four bytes
    /// of generated text per output token (the usual ratio for text), and never less than one
    /// input token, so that an estimate is never $0.
    fn estimate(&self, observed: &Observed) -> Usage {
        Usage {
            input_tokens: self.request_bytes.div_ceil(4).max(1),
            output_tokens: observed.output_text_bytes.div_ceil(4),
            ..Usage::default()
        }
    }
}

/// Bounds on reading an upstream reply.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Longest silence between two chunks before the reply counts as broken.
    pub idle: Duration,
    /// How long to keep reading after the client left, to capture the final usage.
    pub drain: Duration,
}

pub struct MeteredBody {
    upstream: Option<Incoming>,
    meter: Option<ResponseMeter>,
    /// Held-back bytes owed to the client before the end.
    tail: Option<Bytes>,
    settlement: Option<Settlement>,
    idle_timer: Pin<Box<Sleep>>,
    limits: BodyLimits,
    tracker: TaskTracker,
    /// Text bytes seen at the last cutoff check (checks run only when more text arrives).
    checked_text_bytes: u64,
    /// The hold was trued up to the input the reply stated (or that cannot happen any more).
    trued_up: bool,
}

impl MeteredBody {
    pub fn new(upstream: Incoming, meter: ResponseMeter, settlement: Settlement, limits: BodyLimits, tracker: TaskTracker) -> MeteredBody {
        MeteredBody {
            upstream: Some(upstream),
            meter: Some(meter),
            tail: None,
            settlement: Some(settlement),
            idle_timer: Box::pin(tokio::time::sleep(limits.idle)),
            limits,
            tracker,
            checked_text_bytes: 0,
            trued_up: false,
        }
    }

    /// Ends the stream if its running cost has passed its hold (an upstream ignoring the
    /// request's max tokens): returns the error event to send last, after settling what was
    /// seen. Only between whole events, so the client's stream stays well formed.
    fn cut_if_over(&mut self) -> Option<Vec<u8>> {
        let meter = self.meter.as_ref()?;
        let observed = meter.observed();
        // A reply whose final usage has arrived is done: its cost is fixed, and cutting it would
        // only report a false error.
        if !meter.at_event_boundary() || observed.usage_final || observed.output_text_bytes == self.checked_text_bytes {
            return None;
        }
        self.checked_text_bytes = observed.output_text_bytes;
        let settlement = self.settlement.as_ref()?;
        let hold = settlement.reservation.amount();
        let running = settlement.running_cost(observed)?;
        if hold.is_zero() || running <= hold {
            return None;
        }
        let message = format!(
            "capit: this reply passed the ${} held for it (its max output tokens); the upstream was stopped",
            crate::grants::money(hold)
        );
        Some(self.cut(&message, "cut off: the reply passed its reservation"))
    }

    /// Trues the hold up once the reply has stated its input, so that what the bound assumed
    /// beyond it goes back to the grant at once. A stated input dearer than the hold (an exact
    /// count that was short) grows the hold if the budget has room, and ends the stream if not,
    /// before any output is generated.
    fn true_up(&mut self) -> Option<Vec<u8>> {
        if self.trued_up {
            return None;
        }
        let meter = self.meter.as_ref()?;
        if !meter.observed().input_stated {
            return None;
        }
        self.trued_up = true;
        let settlement = self.settlement.as_mut()?;
        if !settlement.may_true_up {
            return None;
        }
        let amount = settlement.trued_up_hold(meter.observed())?;
        let state = settlement.state.clone();
        if state.resize_hold(&mut settlement.reservation, amount) || !meter.at_event_boundary() {
            return None;
        }
        let message = format!(
            "capit: this request's input costs more than the ${} held for it and the grant has no room left for the rest; the upstream was stopped",
            crate::grants::money(settlement.reservation.amount())
        );
        Some(self.cut(&message, "cut off: the input passed its reservation"))
    }

    /// Ends the reply here: settles what was seen and returns the error event to send last.
    fn cut(&mut self, message: &str, why: &str) -> Vec<u8> {
        self.upstream = None;
        let (mut observed, _) = self.finish_meter();
        observed.error = Some(why.to_string());
        let api = self.settlement.as_ref().map_or(MeteredApi::OpenAiChat, |s| s.api);
        if let Some(settlement) = self.settlement.take() {
            drop(settlement.settle(observed));
        }
        tracing::warn!(api = api.as_str(), "{why}");
        crate::usage::cutoff_event(api, message)
    }

    fn finish_meter(&mut self) -> (Observed, Bytes) {
        match self.meter.as_mut() {
            Some(meter) => meter.finish(),
            None => (Observed::default(), Bytes::new()),
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(tail) = this.tail.take().filter(|t| !t.is_empty()) {
                return Poll::Ready(Some(Ok(Frame::data(tail))));
            }
            let Some(upstream) = this.upstream.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.idle_timer.as_mut().reset(Instant::now() + this.limits.idle);
                    match frame.into_data() {
                        Ok(data) => {
                            let out = match this.meter.as_mut() {
                                Some(meter) => meter.feed(data),
                                None => data,
                            };
                            if let Some(event) = this.true_up().or_else(|| this.cut_if_over()) {
                                let mut last = out.to_vec();
                                last.extend_from_slice(&event);
                                this.tail = Some(Bytes::from(last));
                                continue;
                            }
                            if out.is_empty() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.upstream = None;
                    let (observed, _) = this.finish_meter();
                    if let Some(settlement) = this.settlement.take() {
                        drop(settlement.settle(observed));
                    }
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(None) => {
                    this.upstream = None;
                    let (observed, tail) = this.finish_meter();
                    this.tail = Some(tail);
                    if let Some(settlement) = this.settlement.take() {
                        drop(settlement.settle(observed));
                    }
                }
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        this.upstream = None;
                        let (observed, _) = this.finish_meter();
                        if let Some(settlement) = this.settlement.take() {
                            drop(settlement.settle(observed));
                        }
                        let idle = this.limits.idle.as_secs();
                        return Poll::Ready(Some(Err(format!("the upstream sent nothing for {idle} s").into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.upstream.is_none() && self.tail.as_ref().is_none_or(Bytes::is_empty)
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let Some(settlement) = self.settlement.take() else {
            return;
        };
        // The client went away before the reply ended. Keep reading the upstream (it bills for
        // what it generates) for a bounded time, then settle with what was seen.
        let upstream = self.upstream.take();
        let meter = self.meter.take();
        let drain = self.limits.drain;
        let task = async move {
            let mut meter = meter;
            if let (Some(mut upstream), Some(meter)) = (upstream, meter.as_mut()) {
                let read_rest = async {
                    while let Some(Ok(frame)) = upstream.frame().await {
                        if let Ok(data) = frame.into_data() {
                            meter.feed(data);
                        }
                    }
                };
                if tokio::time::timeout(drain, read_rest).await.is_err() {
                    tracing::debug!("stopped draining an abandoned reply after {drain:?}");
                }
            }
            let observed = meter.map(|mut m| m.finish().0).unwrap_or_default();
            let _ = settlement.settle(observed).await;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker.spawn(task);
        } else {
            tracing::warn!("a reply was dropped outside the runtime; settling what was seen");
        }
    }
}
