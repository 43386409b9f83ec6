//! Anthropic Messages usage.
//!
//! Anthropic's counts are disjoint: `input_tokens` excludes `cache_creation_input_tokens` and
//! `cache_read_input_tokens`, so total input is their sum; `output_tokens` includes thinking.
//! A stream starts from `message_start.message.usage` (input side, a placeholder output) and
//! each `message_delta` carries cumulative counts that replace, never add to, what came before.

use serde_json::Value;

use super::sse::SseEvent;
use super::{Observed, Usage, Verdict, count};

/// Anthropic's own counters, kept as reported so that deltas can replace them one by one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnthropicCounts {
    input: u64,
    cache_creation: u64,
    cache_read: u64,
    /// The 5-minute / 1-hour split of `cache_creation`, when the reply gives it.
    split: Option<(u64, u64)>,
    output: u64,
    thinking: u64,
    web_searches: u64,
}

impl AnthropicCounts {
    /// Replaces every counter the usage object carries (non-null), keeping the others. A count
    /// that is not one leaves every counter as it was and is returned as the error.
    pub fn update(&mut self, usage: &Value) -> Result<(), String> {
        let mut next = self.clone();
        let set = |slot: &mut u64, v: Option<&Value>, field: &str| -> Result<(), String> {
            if let Some(n) = v.filter(|v| !v.is_null()) {
                *slot = count(Some(n), field)?;
            }
            Ok(())
        };
        set(&mut next.input, usage.get("input_tokens"), "input_tokens")?;
        set(&mut next.cache_creation, usage.get("cache_creation_input_tokens"), "cache_creation_input_tokens")?;
        set(&mut next.cache_read, usage.get("cache_read_input_tokens"), "cache_read_input_tokens")?;
        set(&mut next.output, usage.get("output_tokens"), "output_tokens")?;
        set(&mut next.thinking, usage.pointer("/output_tokens_details/thinking_tokens"), "thinking_tokens")?;
        set(&mut next.web_searches, usage.pointer("/server_tool_use/web_search_requests"), "web_search_requests")?;
        if let Some(split) = usage.get("cache_creation").filter(|c| c.is_object()) {
            next.split = Some((
                count(split.get("ephemeral_5m_input_tokens"), "ephemeral_5m_input_tokens")?,
                count(split.get("ephemeral_1h_input_tokens"), "ephemeral_1h_input_tokens")?,
            ));
        }
        *self = next;
        Ok(())
    }

    /// In the normalised form: total input, with cache reads and writes as its subsets. Without
    /// a TTL split every cache write is billed at the 5-minute rate, as Anthropic documents.
    pub fn usage(&self) -> Usage {
        let (write_5m, write_1h) = match self.split {
            Some((m5, h1)) if m5.saturating_add(h1) == self.cache_creation => (m5, h1),
            Some((_, h1)) if h1 <= self.cache_creation => (self.cache_creation - h1, h1),
            _ => (self.cache_creation, 0),
        };
        Usage {
            input_tokens: self.input.saturating_add(self.cache_creation).saturating_add(self.cache_read),
            cached_input_tokens: self.cache_read,
            cache_write_5m_tokens: write_5m,
            cache_write_1h_tokens: write_1h,
            output_tokens: self.output,
            reasoning_tokens: self.thinking.min(self.output),
            web_search_requests: self.web_searches,
            reported_cost: None,
        }
    }
}

/// Observes a complete non-streamed Messages reply.
pub fn observe_json(observed: &mut Observed, counts: &mut AnthropicCounts, body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    if value.get("type").and_then(Value::as_str) == Some("error") {
        observed.error = Some(super::openai::error_message(value.get("error").unwrap_or(&Value::Null)));
        return;
    }
    if let Some(model) = value.get("model").and_then(Value::as_str) {
        observed.model = Some(model.to_string());
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        observed.usage_final = observed.take_usage(counts.update(usage).map(|()| counts.usage()));
        observed.complete = true;
    }
    for block in value.get("content").and_then(Value::as_array).into_iter().flatten() {
        for field in ["text", "thinking"] {
            if let Some(text) = block.get(field).and_then(Value::as_str) {
                observed.output_text_bytes += text.len() as u64;
            }
        }
    }
}

/// Observes one event of a streamed Messages reply.
pub fn observe_event(observed: &mut Observed, counts: &mut AnthropicCounts, event: &SseEvent) -> Verdict {
    let Ok(value) = serde_json::from_str::<Value>(&event.data) else {
        return Verdict::Forward;
    };
    let kind = value.get("type").and_then(Value::as_str).or(event.name.as_deref()).unwrap_or("");
    match kind {
        "message_start" => {
            let message = value.get("message").unwrap_or(&Value::Null);
            if let Some(model) = message.get("model").and_then(Value::as_str) {
                observed.model = Some(model.to_string());
            }
            if let Some(usage) = message.get("usage").filter(|u| u.is_object()) {
                observed.input_stated = observed.take_usage(counts.update(usage).map(|()| counts.usage()));
            }
        }
        "message_delta" => {
            if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
                observed.usage_final = observed.take_usage(counts.update(usage).map(|()| counts.usage()));
            }
        }
        "content_block_delta" => {
            let delta = value.get("delta").unwrap_or(&Value::Null);
            for field in ["text", "thinking", "partial_json"] {
                if let Some(text) = delta.get(field).and_then(Value::as_str) {
                    observed.output_text_bytes += text.len() as u64;
                }
            }
        }
        "message_stop" => observed.complete = true,
        "error" => observed.error = Some(super::openai::error_message(value.get("error").unwrap_or(&Value::Null))),
        _ => {}
    }
    Verdict::Forward
}

#[cfg(test)]
mod tests {
    use crate::providers::MeteredApi;
    use crate::usage::test_support::{every_split_agrees, meter_chunks};

    const JSON: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",
"content":[{"type":"thinking","thinking":"hmm","signature":"x"},{"type":"text","text":"Hi!"}],"stop_reason":"end_turn","stop_sequence":null,
"usage":{"input_tokens":50,"cache_creation_input_tokens":2048,"cache_read_input_tokens":10000,
"cache_creation":{"ephemeral_5m_input_tokens":1024,"ephemeral_1h_input_tokens":1024},
"output_tokens":420,"output_tokens_details":{"thinking_tokens":300},
"server_tool_use":{"web_search_requests":1,"web_fetch_requests":0},"service_tier":"standard"}}"#;

    const STREAM: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-haiku-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":50,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":10000,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_start\r\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\r\n\r\n\
event: ping\r\ndata: {\"type\":\"ping\"}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi!\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":200}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":420}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    #[test]
    fn json_reply_counts_cache_writes_by_ttl_and_searches() {
        let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, false, false, &[JSON.as_bytes()]);
        let usage = observed.usage.unwrap();
        assert_eq!(usage.input_tokens, 50 + 2048 + 10000);
        assert_eq!((usage.cached_input_tokens, usage.cache_write_5m_tokens, usage.cache_write_1h_tokens), (10000, 1024, 1024));
        assert_eq!((usage.output_tokens, usage.reasoning_tokens, usage.web_search_requests), (420, 300, 1));
        assert_eq!(observed.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert!(observed.usage_final);
        assert_eq!(observed.output_text_bytes, 6);
    }

    #[test]
    fn stream_takes_message_start_and_the_last_delta_for_every_split() {
        let observed = every_split_agrees(MeteredApi::AnthropicMessages, STREAM.as_bytes());
        let usage = observed.usage.unwrap();
        assert_eq!(usage.input_tokens, 10150);
        assert_eq!((usage.cached_input_tokens, usage.cache_write_5m_tokens), (10000, 100));
        assert_eq!(usage.output_tokens, 420, "deltas replace, never add");
        assert!(observed.complete && observed.usage_final);
    }

    #[test]
    fn a_stream_cut_after_message_start_has_partial_usage() {
        let cut = STREAM.find("event: content_block_delta").unwrap();
        let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, true, false, &[&STREAM.as_bytes()[..cut]]);
        assert_eq!(observed.usage.unwrap().input_tokens, 10150);
        assert!(!observed.usage_final && !observed.complete);
    }

    #[test]
    fn message_start_states_the_input_and_bad_counts_are_no_usage() {
        let cut = STREAM.find("event: content_block_start").unwrap();
        let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, true, false, &[&STREAM.as_bytes()[..cut]]);
        assert!(observed.input_stated && !observed.usage_final);
        let bad = STREAM.replace("\"output_tokens\":420", "\"output_tokens\":-420");
        let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, true, false, &[bad.as_bytes()]);
        assert!(observed.invalid_usage.as_deref().is_some_and(|w| w.contains("output_tokens")), "{observed:?}");
        assert!(!observed.usage_final, "a stream whose last count is no count is not metered");
        for bad in ["1.5", "\"50\"", "1e30"] {
            let body = JSON.replace("\"input_tokens\":50", &format!("\"input_tokens\":{bad}"));
            let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, false, false, &[body.as_bytes()]);
            assert!(observed.invalid_usage.is_some() && observed.usage.is_none(), "{bad}: {observed:?}");
        }
    }

    #[test]
    fn error_events_and_bodies() {
        let stream = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, true, false, &[stream.as_bytes()]);
        assert_eq!(observed.error.as_deref(), Some("Overloaded"));
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let (observed, _) = meter_chunks(MeteredApi::AnthropicMessages, false, false, &[body]);
        assert_eq!((observed.error.as_deref(), observed.usage), (Some("slow down"), None));
    }
}
