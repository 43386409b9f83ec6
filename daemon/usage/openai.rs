//! OpenAI usage: Chat Completions (also OpenRouter's and every OpenAI-compatible server's),
//! the Responses API and embeddings.
//!
//! Chat: `prompt_tokens` includes `prompt_tokens_details.cached_tokens` (and
//! `cache_write_tokens`); `completion_tokens` includes `completion_tokens_details.reasoning_tokens`.
//! A stream carries usage only when `stream_options.include_usage` was set, on one chunk just
//! before `data: [DONE]` whose `choices` is empty; some servers put it on the last content chunk.
//! Responses: the same rules under other names, with usage on the terminal event
//! (`response.completed|incomplete|failed`, and `response.done` from some gateways).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::sse::SseEvent;
use super::{Observed, Usage, Verdict, count, reported_cost};

/// Reads a Chat Completions `usage` object; a count or cost that is not one is an error.
pub fn parse_chat_usage(usage: &Value) -> Result<Usage, String> {
    let prompt_details = usage.get("prompt_tokens_details");
    let completion_details = usage.get("completion_tokens_details");
    Ok(Usage {
        input_tokens: count(usage.get("prompt_tokens"), "prompt_tokens")?,
        cached_input_tokens: count(prompt_details.and_then(|d| d.get("cached_tokens")), "cached_tokens")?,
        cache_write_5m_tokens: count(prompt_details.and_then(|d| d.get("cache_write_tokens")), "cache_write_tokens")?,
        cache_write_1h_tokens: 0,
        output_tokens: count(usage.get("completion_tokens"), "completion_tokens")?,
        reasoning_tokens: count(completion_details.and_then(|d| d.get("reasoning_tokens")), "reasoning_tokens")?,
        web_search_requests: 0,
        reported_cost: reported_cost(usage.get("cost"))?,
    })
}

/// Observes a complete non-streamed `chat.completion` body.
pub fn observe_chat_json(observed: &mut Observed, body: &[u8]) {
    // Read into a view of the fields metering needs: the reply's text is skipped, not copied.
    let Ok(reply) = serde_json::from_slice::<ReplyView<'_>>(body) else {
        return;
    };
    let field = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<Value>(r.get()).ok());
    if let Some(error) = field(reply.error).filter(|e| !e.is_null()) {
        observed.error = Some(error_message(&error));
    }
    if let Some(model) = reply.model.and_then(|r| serde_json::from_str::<Cow<'_, str>>(r.get()).ok()) {
        observed.model = Some(model.into_owned());
    }
    if let Some(usage) = field(reply.usage).filter(Value::is_object) {
        observed.usage_final = observed.take_usage(parse_chat_usage(&usage));
    }
    if let Some(choices) = reply.choices.and_then(|r| serde_json::from_str::<Vec<ReplyChoice<'_>>>(r.get()).ok()) {
        for choice in choices {
            if let Some(content) = choice.message.and_then(|m| m.content) {
                observed.output_text_bytes += content.len() as u64;
            }
        }
        observed.complete = observed.error.is_none();
    }
}

/// The members of a whole `chat.completion` the meter reads, each read on its own (so that an
/// odd one spoils only itself).
#[derive(Deserialize)]
struct ReplyView<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ReplyChoice<'a> {
    #[serde(borrow, default)]
    message: Option<ReplyMessage<'a>>,
}

#[derive(Deserialize)]
struct ReplyMessage<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
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
    if observed.model.is_none()
        && let Some(model) = chunk.model.filter(|m| !m.is_empty())
    {
        observed.model = Some(model.into_owned());
    }
    let mut choices_empty = true;
    for choice in chunk.choices.iter().flatten() {
        choices_empty = false;
        if let Some(delta) = &choice.delta {
            let text = delta.content.as_deref().map_or(0, str::len) + delta.reasoning_content.as_deref().map_or(0, str::len);
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
            observed.usage_final = observed.take_usage(parse_chat_usage(&usage));
            // The usage-only chunk the proxy asked for; a chunk that also carries choices stays.
            if choices_empty { Verdict::Hide } else { Verdict::Forward }
        }
        None => Verdict::Forward,
    }
}

/// Reads a Responses API `usage` object; a count that is not one is an error.
pub fn parse_responses_usage(usage: &Value) -> Result<Usage, String> {
    Ok(Usage {
        input_tokens: count(usage.get("input_tokens"), "input_tokens")?,
        cached_input_tokens: count(usage.pointer("/input_tokens_details/cached_tokens"), "cached_tokens")?,
        cache_write_5m_tokens: count(usage.pointer("/input_tokens_details/cache_write_tokens"), "cache_write_tokens")?,
        output_tokens: count(usage.get("output_tokens"), "output_tokens")?,
        reasoning_tokens: count(usage.pointer("/output_tokens_details/reasoning_tokens"), "reasoning_tokens")?,
        ..Usage::default()
    })
}

/// Observes a `response` object: a whole non-streamed reply, or the one a terminal event carries.
fn observe_response_object(observed: &mut Observed, response: &Value) {
    if let Some(model) = response.get("model").and_then(Value::as_str) {
        observed.model = Some(model.to_string());
    }
    if let Some(error) = response.get("error").filter(|e| e.is_object()) {
        observed.error = Some(error_message(error));
    }
    if let Some(usage) = response.get("usage").filter(|u| u.is_object()) {
        observed.usage_final = observed.take_usage(parse_responses_usage(usage));
        observed.complete = true;
    }
}

/// Observes a complete non-streamed Responses API reply.
pub fn observe_responses_json(observed: &mut Observed, body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    observe_response_object(observed, &value);
    for item in value.get("output").and_then(Value::as_array).into_iter().flatten() {
        for part in item.get("content").and_then(Value::as_array).into_iter().flatten() {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                observed.output_text_bytes += text.len() as u64;
            }
        }
    }
}

/// Observes one event of a streamed Responses API reply.
pub fn observe_responses_event(observed: &mut Observed, event: &SseEvent) -> Verdict {
    let Ok(value) = serde_json::from_str::<Value>(&event.data) else {
        return Verdict::Forward;
    };
    let kind = value.get("type").and_then(Value::as_str).or(event.name.as_deref()).unwrap_or("");
    match kind {
        "response.output_text.delta" | "response.reasoning_text.delta" | "response.function_call_arguments.delta" => {
            if let Some(delta) = value.get("delta").and_then(Value::as_str) {
                observed.output_text_bytes += delta.len() as u64;
            }
        }
        "response.created"
        | "response.in_progress"
        | "response.completed"
        | "response.incomplete"
        | "response.failed"
        | "response.done" => {
            if let Some(response) = value.get("response") {
                observe_response_object(observed, response);
            }
        }
        "error" => observed.error = Some(error_message(&value)),
        _ => {}
    }
    Verdict::Forward
}

/// Observes an embeddings reply: input tokens only.
pub fn observe_embeddings_json(observed: &mut Observed, body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    if let Some(model) = value.get("model").and_then(Value::as_str) {
        observed.model = Some(model.to_string());
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        let parsed = count(usage.get("prompt_tokens"), "prompt_tokens").map(|input_tokens| Usage { input_tokens, ..Usage::default() });
        observed.usage_final = observed.take_usage(parsed);
        observed.complete = true;
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
    fn malformed_counts_are_no_usage_and_never_panic() {
        for bad in ["-5", "1.5", "150.0", "1e30", "\"100\"", "1000000000000000000000000000000", "true"] {
            let body = format!(r#"{{"model":"m","choices":[],"usage":{{"prompt_tokens":10,"completion_tokens":{bad}}}}}"#);
            let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body.as_bytes()]);
            assert_eq!(observed.usage, None, "{bad}");
            assert!(!observed.usage_final, "{bad}");
            assert!(observed.invalid_usage.as_deref().is_some_and(|why| why.contains("completion_tokens")), "{bad}: {observed:?}");
        }
        // Absent or null details are fine: nothing was used of them.
        let body = br#"{"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body]);
        assert_eq!((observed.usage.map(|u| u.input_tokens), observed.invalid_usage), (Some(5), None));
        // A reported cost that is no cost (OpenRouter) is refused the same way.
        for bad in ["-5", "\"0.001\"", "1e30", "79228162514264337593543950335", "10000.01"] {
            let body = format!(r#"{{"model":"m","choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":1,"cost":{bad}}}}}"#);
            let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body.as_bytes()]);
            assert!(observed.invalid_usage.as_deref().is_some_and(|why| why.contains("usage.cost")), "{bad}: {observed:?}");
        }
        let body = br#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"cost":1.5e-5}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body]);
        assert_eq!(observed.usage.unwrap().reported_cost, Some("0.000015".parse().unwrap()));
        for garbage in [&b"{"[..], b"[]", b"null", b"\xff\xfe", b""] {
            let _ = meter_chunks(MeteredApi::OpenAiChat, false, false, &[garbage]);
            let _ = meter_chunks(MeteredApi::OpenAiChat, true, true, &[b"data: ", garbage, b"\n\n"]);
        }
    }

    const RESPONSES_STREAM: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-5\",\"output\":[],\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-5-2025-08-07\",\"output\":[],\"usage\":{\"input_tokens\":2000,\"input_tokens_details\":{\"cached_tokens\":1536},\"output_tokens\":900,\"output_tokens_details\":{\"reasoning_tokens\":640},\"total_tokens\":2900}}}\n\n";

    #[test]
    fn responses_stream_meters_the_terminal_event_for_every_split() {
        let observed = crate::usage::test_support::every_split_agrees(MeteredApi::OpenAiResponses, RESPONSES_STREAM.as_bytes());
        assert_eq!(observed.usage, Some(usage(2000, 1536, 900, 640)));
        assert_eq!(observed.model.as_deref(), Some("gpt-5-2025-08-07"));
        assert!(observed.usage_final && observed.complete);
        assert_eq!(observed.output_text_bytes, 2);
    }

    #[test]
    fn responses_json_incomplete_and_error_events() {
        let body = br#"{"id":"resp_2","object":"response","status":"incomplete","model":"gpt-5","output":[{"type":"message","content":[{"type":"output_text","text":"abc"}]}],"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiResponses, false, false, &[body]);
        assert_eq!(observed.usage, Some(usage(10, 0, 5, 0)));
        let error = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null,\"sequence_number\":3}\n\n";
        let (observed, _) = meter_chunks(MeteredApi::OpenAiResponses, true, false, &[error.as_bytes()]);
        assert_eq!(observed.error.as_deref(), Some("boom"));
    }

    #[test]
    fn embeddings_bill_input_only() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.01,-0.02]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiEmbeddings, false, false, &[body]);
        assert_eq!(observed.usage, Some(usage(8, 0, 0, 0)));
    }

    #[test]
    fn openrouter_cost_is_exact() {
        let body = br#"{"model":"x","choices":[],"usage":{"prompt_tokens":194,"completion_tokens":2,"cost":0.00095}}"#;
        let (observed, _) = meter_chunks(MeteredApi::OpenAiChat, false, false, &[body]);
        assert_eq!(observed.usage.unwrap().reported_cost, Some("0.00095".parse().unwrap()));
    }
}
