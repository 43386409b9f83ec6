//! `capitctl watch`: the daemon's live events. A full-screen view on a terminal
//! ([`crate::dashboard`]), one JSON document per line with `--json`, and one plain line per
//! event when stdout is not a terminal. A reader that falls behind loses events at the daemon
//! (never slowing it); each loss is reported as a `dropped` line with its count.

use std::io::{IsTerminal, Write};

use serde_json::{Value, json};

use capit::proto::v1 as pb;
use capit::proto::v1::watch_event::Event as E;

use crate::cmd::rpc;
use crate::output::dollars_short as dollars;

/// The most a watch connection buffers on this side: small, so that a reader that falls behind
/// holds the daemon's sender back at once, and the daemon drops (and counts) the events rather
/// than this process keeping megabytes of old ones.
const WINDOW_BYTES: u32 = 64 * 1024;

pub async fn watch(socket: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let mut client = crate::cmd::connect_with(socket, |endpoint| {
        endpoint.initial_stream_window_size(Some(WINDOW_BYTES)).initial_connection_window_size(Some(WINDOW_BYTES))
    })
    .await?;
    let mut stream = client.watch(pb::WatchRequest {}).await.map_err(rpc)?.into_inner();
    if !json && std::io::stdout().is_terminal() {
        return crate::dashboard::run(client.clone(), stream).await;
    }
    let mut out = std::io::stdout().lock();
    while let Some(event) = stream.message().await.map_err(rpc)? {
        let mut lines = Vec::new();
        if event.dropped > 0 {
            lines.push(if json { json!({"type": "dropped", "count": event.dropped}).to_string() } else { dropped_line(event.dropped) });
        }
        lines.push(if json { event_json(&event).to_string() } else { event_line(&event) });
        for line in lines {
            // A reader that went away (a closed pipe) ends the watch quietly.
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn time_json(at_ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(at_ms).map_or(Value::Null, |t| Value::String(t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()))
}

/// Local wall-clock time of an event, for people.
pub fn clock(at_ms: i64) -> String {
    use chrono::TimeZone;
    chrono::Local.timestamp_millis_opt(at_ms).single().map_or_else(String::new, |t| t.format("%H:%M:%S").to_string())
}

pub fn event_json(event: &pb::WatchEvent) -> Value {
    let mut doc = match &event.event {
        Some(E::Hello(h)) => json!({
            "type": "hello", "version": h.version, "listen_addr": h.listen_addr,
            "history_start": time_json(h.history_start * 1000), "bucket_seconds": h.bucket_seconds,
            "spent": h.spent, "requests": h.requests,
        }),
        Some(E::Settled(s)) => json!({
            "type": "settled", "grant": s.grant, "provider": s.provider, "model": s.model, "api": s.api,
            "input_tokens": s.input_tokens, "cached_input_tokens": s.cached_input_tokens,
            "output_tokens": s.output_tokens, "reasoning_tokens": s.reasoning_tokens,
            "cost": s.cost, "status": s.status, "http_status": s.http_status, "latency_ms": s.latency_ms,
            "spent": s.spent, "cap": s.cap, "reserved": s.reserved, "period": s.period,
        }),
        Some(E::Refused(r)) => json!({
            "type": "refused", "grant": r.grant, "model": if r.model.is_empty() { Value::Null } else { json!(r.model) },
            "reason": r.reason, "message": r.message,
        }),
        Some(E::Alert(a)) => json!({
            "type": "alert", "grant": a.grant, "provider": a.provider, "percent": a.percent,
            "spent": a.spent, "cap": a.cap, "period": a.period,
        }),
        None => json!({"type": "unknown"}),
    };
    doc["seq"] = json!(event.seq);
    doc["at"] = time_json(event.at_ms);
    doc
}

pub fn dropped_line(count: u64) -> String {
    format!("-- {count} events dropped: this watcher read more slowly than they came --")
}

pub fn period_word(period: &str) -> &str {
    match period {
        "day" => "today",
        "week" => "this week",
        "month" => "this month",
        _ => "in total",
    }
}

/// One event in words, as the plain output and the full-screen list show it.
pub fn describe(event: &pb::WatchEvent) -> String {
    match &event.event {
        Some(E::Hello(h)) => format!("watching capitd {} (proxy on http://{})", h.version, h.listen_addr),
        Some(E::Settled(s)) => {
            let cached = if s.cached_input_tokens > 0 { format!(" ({} cached)", s.cached_input_tokens) } else { String::new() };
            format!(
                "{} {} {} in{cached} / {} out {} {} {} {:.1} s; {} of {} {}",
                s.grant,
                s.model,
                s.input_tokens,
                s.output_tokens,
                dollars(&s.cost),
                s.status,
                s.http_status,
                s.latency_ms as f64 / 1000.0,
                dollars(&s.spent),
                dollars(&s.cap),
                period_word(&s.period)
            )
        }
        Some(E::Refused(r)) => {
            let model = if r.model.is_empty() { String::new() } else { format!(" {}", r.model) };
            format!("{}{model} REFUSED ({}): {}", r.grant, r.reason, r.message)
        }
        Some(E::Alert(a)) => {
            format!("{} ALERT {}% of its cap: {} of {} {}", a.grant, a.percent, dollars(&a.spent), dollars(&a.cap), period_word(&a.period))
        }
        None => "an event this capitctl does not know".to_string(),
    }
}

fn event_line(event: &pb::WatchEvent) -> String {
    format!("{} {}", clock(event.at_ms), describe(event))
}
