//! The `Watch` stream: one watcher's subscription to the event hub, as protobuf events. The
//! task that forwards them may wait for a slow watcher; the hub never does (it drops the oldest
//! events for it, and the next event sent says how many).

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::convert::{decimal_string, status_from};
use crate::events::{Event, EventKind};
use crate::grants::money;
use crate::proto::v1 as pb;
use crate::state::State;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// The sparkline's span and resolution.
const HISTORY_BUCKETS: i64 = 60;
const BUCKET_SECONDS: i64 = 60;

/// Subscribes first, then reads the last hour from the ledger, so nothing falls between them.
pub async fn open(state: &Arc<State>) -> Result<WatchStream, Status> {
    let mut subscription = state.events().subscribe().ok_or_else(|| Status::unavailable("capitd is stopping"))?;
    let hello = hello(state).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        if tx.send(Ok(hello)).await.is_err() {
            return;
        }
        let mut dropped = 0u64;
        loop {
            let received = tokio::select! {
                received = subscription.receiver.recv() => received,
                _ = tx.closed() => return,
            };
            match received {
                Ok(event) => {
                    let message = event_message(&event, dropped);
                    dropped = 0;
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(lost)) => dropped += lost,
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

async fn hello(state: &Arc<State>) -> Result<pb::WatchEvent, Status> {
    let now = state.clock().now_seconds();
    let start = (now.div_euclid(BUCKET_SECONDS) - (HISTORY_BUCKETS - 1)) * BUCKET_SECONDS;
    let entries = state.usage(None, start * 1000).await.map_err(status_from)?;
    let mut spent = vec![rust_decimal::Decimal::ZERO; HISTORY_BUCKETS as usize];
    let mut requests = vec![0u64; HISTORY_BUCKETS as usize];
    for entry in &entries {
        let bucket = (entry.at_seconds() - start).div_euclid(BUCKET_SECONDS);
        if let Ok(i) = usize::try_from(bucket)
            && i < spent.len()
        {
            spent[i] += entry.cost;
            requests[i] += 1;
        }
    }
    Ok(pb::WatchEvent {
        seq: 0,
        at_ms: state.clock().now_millis(),
        dropped: 0,
        event: Some(pb::watch_event::Event::Hello(pb::WatchHello {
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen_addr: state.listen_addr().map(|a| a.to_string()).unwrap_or_default(),
            history_start: start,
            bucket_seconds: BUCKET_SECONDS as u32,
            spent: spent.into_iter().map(decimal_string).collect(),
            requests,
        })),
    })
}

fn event_message(event: &Event, dropped: u64) -> pb::WatchEvent {
    use pb::watch_event::Event as E;
    let body = match &event.kind {
        EventKind::Settled(s) => E::Settled(pb::SettledEvent {
            grant: s.grant.clone(),
            provider: s.provider.clone(),
            model: s.model.clone(),
            api: s.api.clone(),
            input_tokens: s.usage.input_tokens,
            cached_input_tokens: s.usage.cached_input_tokens,
            output_tokens: s.usage.output_tokens,
            reasoning_tokens: s.usage.reasoning_tokens,
            cost: decimal_string(s.cost),
            status: s.status.as_str().to_string(),
            http_status: u32::from(s.http_status),
            latency_ms: s.latency_ms,
            spent: decimal_string(s.spent),
            cap: money(s.cap),
            reserved: decimal_string(s.reserved),
            period: s.period.as_str().to_string(),
        }),
        EventKind::Refused(r) => E::Refused(pb::RefusedEvent {
            grant: r.grant.clone(),
            model: r.model.clone().unwrap_or_default(),
            reason: r.reason.to_string(),
            message: r.message.clone(),
        }),
        EventKind::Alert(a) => E::Alert(pb::AlertEvent {
            grant: a.grant.clone(),
            provider: a.provider.clone(),
            percent: a.percent,
            spent: decimal_string(a.spent),
            cap: money(a.cap),
            period: a.period.as_str().to_string(),
        }),
    };
    pb::WatchEvent { seq: event.seq, at_ms: event.at_ms, dropped, event: Some(body) }
}
