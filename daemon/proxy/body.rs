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
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

use crate::ledger::{EntryStatus, LedgerEntry};
use crate::providers::MeteredApi;
use crate::state::{Reservation, State};
use crate::store::StoreError;
use crate::usage::{Observed, ResponseMeter, Usage};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A request body held back until its reservation is durable. The request head goes out at
/// once (connecting and TLS proceed meanwhile), but an upstream cannot bill a request whose body
/// it has not received, so a crash can never leave a billed request without its hold.
pub struct GatedBody {
    gate: Option<oneshot::Receiver<Result<(), StoreError>>>,
    data: Option<Bytes>,
}

impl GatedBody {
    pub fn new(data: Bytes, gate: Option<oneshot::Receiver<Result<(), StoreError>>>) -> GatedBody {
        GatedBody { gate, data: Some(data).filter(|d| !d.is_empty()) }
    }
}

impl Body for GatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(gate) = self.gate.as_mut() {
            match Pin::new(gate).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(()))) => self.gate = None,
                Poll::Ready(_) => {
                    self.gate = None;
                    self.data = None;
                    return Poll::Ready(Some(Err("the request's reservation could not be recorded; not sending it".into())));
                }
            }
        }
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.gate.is_none() && self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Everything needed to turn what was observed into a ledger entry.
pub struct Settlement {
    pub state: Arc<State>,
    /// The request's hold on its grant, swapped for the cost when it settles.
    pub reservation: Reservation,
    pub api: MeteredApi,
    pub request_model: String,
    /// The provider prices nothing (a local server).
    pub price_zero: bool,
    /// The provider reports the cost itself (OpenRouter), and that figure is billed.
    pub trust_reported_cost: bool,
    /// Size of the request body, for estimating input when usage never arrives.
    pub request_bytes: u64,
    pub http_status: u16,
    /// The request model's price, for the running cost of a stream (the cutoff).
    pub price: Option<crate::pricing::Price>,
}

/// Bytes of generated text counted as one token when judging a running stream against its
/// hold. Generous (real text runs nearer 4), so that a reply within its limit is never cut.
const CUTOFF_BYTES_PER_TOKEN: u64 = 6;

impl Settlement {
    /// What the reply has cost so far by what was seen, when that can be judged.
    fn running_cost(&self, observed: &Observed) -> Option<rust_decimal::Decimal> {
        let price = self.price.as_ref()?;
        let mut usage = observed.usage.clone().unwrap_or_default();
        usage.output_tokens = usage.output_tokens.max(observed.output_text_bytes / CUTOFF_BYTES_PER_TOKEN);
        Some(crate::pricing::cost(&usage, price))
    }
}

impl Settlement {
    /// Prices what was observed and records it; the receiver resolves once it is durable.
    pub fn settle(self, observed: Observed) -> oneshot::Receiver<Result<(), StoreError>> {
        let entry = self.entry(observed);
        tracing::debug!(grant = entry.grant.0, model = %entry.model, cost = %entry.cost, reserved = %self.reservation.amount(), status = entry.status.as_str(), "settled");
        self.state.settle(self.reservation, entry)
    }

    /// Records a request the upstream refused with an error status: nothing generated, no cost.
    pub fn settle_upstream_error(self) -> oneshot::Receiver<Result<(), StoreError>> {
        let entry = LedgerEntry {
            grant: self.reservation.grant(),
            at_ms: self.state.clock().now_millis(),
            model: self.request_model.clone(),
            api: self.api.as_str().to_string(),
            usage: Usage::default(),
            cost: rust_decimal::Decimal::ZERO,
            status: EntryStatus::UpstreamError,
            http_status: self.http_status,
            error: None,
        };
        self.state.settle(self.reservation, entry)
    }

    fn entry(&self, observed: Observed) -> LedgerEntry {
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
        let model = observed.model.clone().unwrap_or_else(|| self.request_model.clone());
        let cost = if self.price_zero {
            rust_decimal::Decimal::ZERO
        } else if let (true, Some(reported)) = (self.trust_reported_cost, usage.reported_cost) {
            reported
        } else {
            let price = self.state.price(&model).or_else(|| self.state.price(&self.request_model));
            match price {
                Some((_, price)) => crate::pricing::cost(&usage, &price),
                None => {
                    tracing::warn!(model = %model, "no price for the model a response named; recorded as estimated at zero");
                    status = EntryStatus::Estimated;
                    rust_decimal::Decimal::ZERO
                }
            }
        };
        LedgerEntry {
            grant: self.reservation.grant(),
            at_ms: self.state.clock().now_millis(),
            model,
            api: self.api.as_str().to_string(),
            usage,
            cost,
            status,
            http_status: self.http_status,
            error: observed.error,
        }
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
        let api = settlement.api;
        let message = format!(
            "capit: this reply passed the ${} held for it (its max output tokens); the upstream was stopped",
            crate::grants::money(hold)
        );
        self.upstream = None;
        let (mut observed, _) = self.finish_meter();
        observed.error = Some("cut off: the reply passed its reservation".into());
        if let Some(settlement) = self.settlement.take() {
            drop(settlement.settle(observed));
        }
        tracing::warn!(api = api.as_str(), "cut a stream that passed its reservation");
        Some(crate::usage::cutoff_event(api, &message))
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
                            if let Some(event) = this.cut_if_over() {
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
