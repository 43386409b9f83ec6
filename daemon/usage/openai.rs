//! OpenAI Chat Completions usage (also OpenRouter's and every OpenAI-compatible server's).
//!
//! `prompt_tokens` includes `prompt_tokens_details.cached_tokens` (and `cache_write_tokens`);
//! `completion_tokens` includes `completion_tokens_details.reasoning_tokens`. A stream carries
//! usage only when `stream_options.include_usage` was set, on one chunk just before
//! `data: [DONE]` whose `choices` is empty; some servers put it on the last content chunk.

use std::borrow::Cow;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;

use super::sse::SseEvent;
use super::{Observed, Usage, Verdict, count};

/// Reads a Chat Completions `usage` object.
pub fn parse_chat_usage(usage: &Value) -> Usage {
    let prompt = usage.get("prompt_tokens");
    let prompt_details = usage.get("prompt_tokens_details");
    let completion_details = usage.get("completion_tokens_details");
    Usage {
        input_tokens: count(prompt),
        cached_input_tokens: count(prompt_details.and_then(|d| d.get("cached_tokens"))),
        cache_write_5m_tokens: count(prompt_details.and_then(|d| d.get("cache_write_tokens"))),
        cache_write_1h_tokens: 0,
        output_tokens: count(usage.get("completion_tokens")),
        reasoning_tokens: count(completion_details.and_then(|d| d.get("reasoning_tokens"))),
        reported_cost: usage.get("cost").and_then(decimal_from_json),
    }
}

/// A JSON number as an exact decimal: the digits as written, never through a binary float
/// rounding that the text did not have.
pub(crate) fn decimal_from_json(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => {
            let text = n.to_string();
            text.parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&text).ok())
        }
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Observes a complete non-streamed `chat.completion` body.
pub fn observe_chat_json(observed: &mut Observed, body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        observed.error = Some(error_message(error));
    }
    if let Some(model) = value.get("model").and_then(Value::as_str) {
        observed.model = Some(model.to_string());
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        observed.usage = Some(parse_chat_usage(usage));
    }
    if let Some(choices) = value.get("choices").and_then(Value::as_array) {
        for choice in choices {
            if let Some(content) = choice.pointer("/message/content").and_then(Value::as_str) {
                observed.output_text_bytes += content.len() as u64;
            }
        }
        observed.complete = observed.error.is_none();
    }
}

/// The fields of a `chat.completion.chunk` the meter reads; everything else is skipped
/// without being allocated.
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(borrow, default)]
    delta: Option<DeltaView<'a>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

/// Observes one event of a streamed chat completion; says whether the client may see it.
pub fn observe_chat_event(observed: &mut Observed, event: &SseEvent) -> Verdict {
    let data = event.data.trim();
    if data.is_empty() {
        return Verdict::Forward;
    }
    if data == "[DONE]" {
        observed.complete = true;
        return Verdict::Forward;
    }
    let Ok(chunk) = serde_json::from_str::<ChunkView<'_>>(data) else {
        return Verdict::Forward;
    };
    if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
        observed.error = Some(error_message(&error));
        return Verdict::Forward;
    }
    if observed.model.is_none() {
        if let Some(model) = chunk.model.filter(|m| !m.is_empty()) {
            observed.model = Some(model.into_owned());
        }
    }
    let mut choices_empty = true;
    for choice in chunk.choices.iter().flatten() {
        choices_empty = false;
        if let Some(delta) = &choice.delta {
            let text = delta.content.as_deref().map_or(0, str::len)
                + delta.reasoning_content.as_deref().map_or(0, str::len);
            let tools: usize = delta
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|t| t.pointer("/function/arguments").and_then(Value::as_str))
                .map(str::len)
                .sum();
            observed.output_text_bytes += (text + tools) as u64;
        }
    }
    match chunk.usage.filter(Value::is_object) {
        Some(usage) => {
            observed.usage = Some(parse_chat_usage(&usage));
            // The usage-only chunk the proxy asked for; a chunk that also carries choices stays.
            if choices_empty { Verdict::Hide } else { Verdict::Forward }
        }
        None => Verdict::Forward,
    }
}

pub(crate) fn error_message(error: &Value) -> String {
    let message = error.get("message").and_then(Value::as_str).unwrap_or("");
    let mut text = if message.is_empty() { error.to_string() } else { message.to_string() };
    text.truncate(500);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::MeteredApi;
    use crate::usage::test_support::{meter_chunks, split_at_positions};

    const JSON: &str = r#"{"id":"chatcmpl-abc","object":"chat.completion","created":1760000000,"model":"gpt-5-mini-2025-08-07",
"choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}],
"usage":{"prompt_tokens":1200,"completion_tokens":300,"total_tokens":1500,
"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
"completion_tokens_details":{"reasoning_tokens":256,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},
"service_tier":"default","system_fingerprint":"fp_x"}"#;

    const STREAM: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-5-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-5-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi! \\u00e9\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-5-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-5-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":2},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n\
data: [DONE]\n\n";

    fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Usage {
        Usage { input_tokens: input, cached_input_tokens: cached, output_tokens: output, reasoning_tokens: reasoning, ..Usage::default() }
    }

    #[test]
    fn json_body() {
        let (observed, out) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[JSON.as_bytes()]);
        assert_eq!(out, JSON.as_bytes());
        assert_eq!(observed.usage, Some(usage(1200, 1024, 300, 256)));
        assert_eq!(observed.model.as_deref(), Some("gpt-5-mini-2025-08-07"));
        assert!(observed.complete);
    }

    #[test]
    fn stream_gives_the_same_usage_for_every_split() {
        let stream = STREAM.as_bytes();
        let expected = Some(usage(12, 2, 3, 1));
        for cut in 0..=stream.len() {
            let (observed, out) = meter_chunks(MeteredApi::OpenAiChat, true, false, &split_at_positions(stream, &[cut]));
            assert_eq!(observed.usage, expected, "cut at {cut}");
            assert!(observed.complete);
            assert_eq!(out, stream);
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(meter_chunks(MeteredApi::OpenAiChat, true, false, &bytes).0.usage, expected);
        // Two cuts at a time, over a coarse grid of positions.
        for a in (0..stream.len()).step_by(7) {
            for b in (a..stream.len()).step_by(11) {
                let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, true, true, &split_at_positions(stream, &[a, b]));
                assert_eq!(observed.usage, expected, "cuts at {a}, {b}");
            }
        }
    }

    #[test]
    fn injected_usage_chunk_is_hidden_from_the_client() {
        let stream = STREAM.as_bytes();
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (observed, out) = meter_chunks(MeteredApi::OpenAiChat, true, true, &bytes);
        assert_eq!(observed.usage, Some(usage(12, 2, 3, 1)));
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("prompt_tokens"), "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(out.matches("data: ").count(), 4);
        assert_eq!(observed.output_text_bytes, "Hi! é".len() as u64);
    }

    #[test]
    fn usage_on_a_content_chunk_is_kept_and_counted() {
        let stream = "data: {\"model\":\"gemini-2.5-flash\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
        let (observed, out) = meter_chunks(MeteredApi::OpenAiChat, true, true, &[stream.as_bytes()]);
        assert_eq!(observed.usage, Some(usage(5, 0, 7, 0)));
        assert_eq!(out, stream.as_bytes());
    }

    #[test]
    fn stream_without_usage_and_error_events() {
        let stream = "data: {\"model\":\"gpt-5\",\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\ndata: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
        let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, true, false, &[stream.as_bytes()]);
        assert_eq!(observed.usage, None);
        assert_eq!(observed.error.as_deref(), Some("overloaded"));
        assert_eq!(observed.output_text_bytes, 4);
        assert!(!observed.complete);
    }

    #[test]
    fn malformed_counts_do_not_panic() {
        let body = br#"{"model":"m","choices":[],"usage":{"prompt_tokens":-5,"completion_tokens":1.5,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":"x"}}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body]);
        assert_eq!(observed.usage, Some(Usage::default()));
        for garbage in [&b"{"[..], b"[]", b"null", b"\xff\xfe", b""] {
            let _ = meter_chunks(MeteredApi::OpenAiChat, false, false, &[garbage]);
            let _ = meter_chunks(MeteredApi::OpenAiChat, true, true, &[b"data: ", garbage, b"\n\n"]);
        }
    }

    #[test]
    fn openrouter_cost_is_exact() {
        let body = br#"{"model":"x","choices":[],"usage":{"prompt_tokens":194,"completion_tokens":2,"cost":0.00095}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body]);
        assert_eq!(observed.usage.unwrap().reported_cost, Some("0.00095".parse().unwrap()));
    }
}
