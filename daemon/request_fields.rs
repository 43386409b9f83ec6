//! The fields of a billable request body that admission needs, read in one parse: the model,
//! whether it streams, its output limit, how many of its input bytes could be billed at which
//! input rate, input given by reference, and asks capit cannot meter yet.
//!
//! Invariant: nothing here can make the hold smaller than the worst case. Every input byte is
//! counted in the dearest rate class the request makes possible (a token is at least one byte of
//! text), content the body only points at is flagged so that the context window bounds it, and
//! a field this module cannot read as it should makes the request malformed rather than cheap.
//! Pure: bytes in, fields out; no IO, and no input can make it panic.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::providers::MeteredApi;

/// Why a request body was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    Malformed(String),
    MissingModel,
    /// A request whose cost capit could not meter (its reply is fetched later, elsewhere).
    Unmeterable(String),
}

/// Input bytes by the dearest rate each could be billed at.
///
/// `write_5m` bytes may be written to a cache (a 5-minute write, or OpenAI's automatic cache);
/// `write_1h` bytes may be written with a 1-hour TTL; `base` bytes can only be billed as plain
/// (or cheaper, cached) input. The classes are disjoint and sum to the body's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputBytes {
    pub base: u64,
    pub write_5m: u64,
    pub write_1h: u64,
}

impl InputBytes {
    pub fn total(&self) -> u64 {
        self.base.saturating_add(self.write_5m).saturating_add(self.write_1h)
    }
}

/// What a Chat Completions request says about usage in its stream, for the proxy's rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamOptions {
    /// No `stream_options` member anywhere in the text: one can be spliced in.
    Absent,
    /// `include_usage` is already true.
    IncludesUsage,
    /// Present without `include_usage: true` (or the member name occurs in the text): rewrite.
    Other,
}

/// A billable request as admission sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFields {
    pub model: String,
    pub stream: bool,
    /// The most output the request allows (`max_completion_tokens`, `max_tokens`,
    /// `max_output_tokens`, `maxOutputTokens` plus a thinking budget), times its choices.
    pub max_output_tokens: Option<u64>,
    /// How many replies it asks for (`n`, `candidateCount`): without a limit of its own, the
    /// model's largest output counts once for each.
    pub choices: u64,
    /// Input bytes by rate class.
    pub input: InputBytes,
    /// Some input is given by reference (an image or file by URL or id, a previous response, a
    /// conversation, a stored prompt, a Gemini cached content), so only the context window
    /// bounds it.
    pub external_input: bool,
    /// Anthropic extended thinking with a budget: fitting must leave room for it.
    pub thinking_budget: bool,
    /// The reply may add input as it goes (Anthropic server tools, Gemini tools): the input a
    /// reply states first is not its last word.
    pub input_may_grow: bool,
    pub stream_options: StreamOptions,
}

/// The top-level members any billable API uses; everything else is skipped unread. Borrowed
/// raw values keep each member's bytes as sent, so sizes need no re-serialisation.
#[derive(Deserialize, Default)]
struct Members<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow, default)]
    thinking: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_control: Option<&'a RawValue>,
    #[serde(borrow, default)]
    mcp_servers: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    conversation: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    background: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    parallel_tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default)]
    truncation: Option<&'a RawValue>,
    #[serde(borrow, default)]
    contents: Option<&'a RawValue>,
    #[serde(rename = "systemInstruction", borrow, default)]
    system_instruction: Option<&'a RawValue>,
    #[serde(rename = "toolConfig", borrow, default)]
    tool_config: Option<&'a RawValue>,
    #[serde(rename = "cachedContent", borrow, default)]
    cached_content: Option<&'a RawValue>,
    #[serde(rename = "generationConfig", borrow, default)]
    generation_config: Option<&'a RawValue>,
}

fn malformed(detail: impl std::fmt::Display) -> BodyError {
    BodyError::Malformed(detail.to_string())
}

fn value(raw: Option<&RawValue>) -> Result<Value, BodyError> {
    match raw {
        Some(raw) => serde_json::from_str(raw.get()).map_err(malformed),
        None => Ok(Value::Null),
    }
}

/// A token limit: absent or null is no limit; anything but a non-negative integer is an error.
fn limit(raw: Option<&RawValue>, name: &str) -> Result<Option<u64>, BodyError> {
    match value(raw)? {
        Value::Null => Ok(None),
        v => v.as_u64().map(Some).ok_or_else(|| malformed(format!("\"{name}\" must be a non-negative integer"))),
    }
}

fn is_present(raw: Option<&RawValue>) -> bool {
    raw.is_some_and(|r| r.get().trim() != "null")
}

/// Reads a billable request body once. Gemini names the model in the path (`path_model`).
pub fn read(api: MeteredApi, body: &[u8], path_model: Option<&str>) -> Result<RequestFields, BodyError> {
    let members: Members<'_> = serde_json::from_slice(body).map_err(malformed)?;
    let model = match (path_model, value(members.model)?) {
        (Some(model), _) => model.to_string(),
        (None, Value::String(m)) if !m.trim().is_empty() => m,
        (None, Value::String(_) | Value::Null) => return Err(BodyError::MissingModel),
        (None, _) => return Err(malformed("\"model\" must be a string")),
    };
    let stream = match value(members.stream)? {
        Value::Null => false,
        Value::Bool(b) => b,
        _ => return Err(malformed("\"stream\" must be true or false")),
    };
    if api == MeteredApi::OpenAiResponses && value(members.background)? == Value::Bool(true) {
        return Err(BodyError::Unmeterable(
            "capit: background responses are fetched later, outside the stream capit meters, so they cannot be capped yet; send the request without \"background\": true".into(),
        ));
    }
    let (max_output_tokens, choices) = output_limit(api, &members)?;
    let total = body.len() as u64;
    let input = match api {
        MeteredApi::AnthropicMessages => anthropic_input(&members, total)?,
        // OpenAI caches any long prompt by itself (and prices the write on newer models), so any
        // input byte may be a write; Gemini's implicit cache only reads.
        MeteredApi::OpenAiChat | MeteredApi::OpenAiResponses | MeteredApi::OpenAiEmbeddings => {
            InputBytes { write_5m: total, ..InputBytes::default() }
        }
        MeteredApi::GeminiGenerate => InputBytes { base: total, ..InputBytes::default() },
    };
    let by_reference = is_present(members.previous_response_id)
        || is_present(members.conversation)
        || value(members.prompt)?.get("id").is_some_and(|id| !id.is_null())
        || is_present(members.cached_content);
    let thinking = value(members.thinking)?;
    let thinking_budget = api == MeteredApi::AnthropicMessages
        && thinking.get("type").and_then(Value::as_str) == Some("enabled")
        && thinking.get("budget_tokens").is_some();
    let input_may_grow = match api {
        MeteredApi::AnthropicMessages => is_present(members.mcp_servers) || has_server_tool(&value(members.tools)?),
        MeteredApi::GeminiGenerate => is_present(members.tools),
        _ => false,
    };
    let stream_options = match value(members.stream_options)? {
        Value::Null if !mentions(body, "\"stream_options\"") => StreamOptions::Absent,
        Value::Object(o) if o.get("include_usage") == Some(&Value::Bool(true)) => StreamOptions::IncludesUsage,
        Value::Object(_) | Value::Null => StreamOptions::Other,
        _ => return Err(malformed("\"stream_options\" must be an object")),
    };
    Ok(RequestFields {
        model,
        stream,
        max_output_tokens,
        choices,
        input,
        external_input: by_reference || references_external_input(body),
        thinking_budget,
        input_may_grow,
        stream_options,
    })
}

/// The request's own output limit in all (times its choices), and how many choices it asks for.
fn output_limit(api: MeteredApi, m: &Members<'_>) -> Result<(Option<u64>, u64), BodyError> {
    Ok(match api {
        MeteredApi::OpenAiChat => {
            let n = limit(m.n, "n")?.unwrap_or(1).max(1);
            let max = match limit(m.max_completion_tokens, "max_completion_tokens")? {
                Some(max) => Some(max),
                None => limit(m.max_tokens, "max_tokens")?,
            };
            (max.map(|max| max.saturating_mul(n)), n)
        }
        MeteredApi::OpenAiResponses => (limit(m.max_output_tokens, "max_output_tokens")?, 1),
        MeteredApi::OpenAiEmbeddings => (Some(0), 1),
        MeteredApi::AnthropicMessages => (limit(m.max_tokens, "max_tokens")?, 1),
        MeteredApi::GeminiGenerate => {
            let config = value(m.generation_config)?;
            let number = |v: Option<&Value>, name: &str| match v {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| malformed(format!("\"{name}\" must be a non-negative integer"))),
            };
            let candidates = number(config.get("candidateCount"), "candidateCount")?.unwrap_or(1).max(1);
            let thinking = match config.pointer("/thinkingConfig/thinkingBudget") {
                // -1 asks the model to choose: only maxOutputTokens bounds it then.
                Some(v) if v.as_i64() == Some(-1) => 0,
                v => number(v, "thinkingBudget")?.unwrap_or(0),
            };
            let max = number(config.get("maxOutputTokens"), "maxOutputTokens")?;
            (max.map(|m| m.saturating_add(thinking).saturating_mul(candidates)), candidates)
        }
    })
}

/// Anthropic writes to its cache only the prefix up to a `cache_control` breakpoint, at the TTL
/// the breakpoint names (5 minutes unless it says `1h`). The prompt is rendered tools, then
/// system, then messages; every byte up to the last 1-hour breakpoint may be a 1-hour write,
/// every byte after it up to the last breakpoint a 5-minute write, and the rest plain input.
/// A top-level `cache_control` (automatic caching) may write the whole prompt.
fn anthropic_input(m: &Members<'_>, total: u64) -> Result<InputBytes, BodyError> {
    let mut segments: Vec<&RawValue> = Vec::new();
    for raw in [m.tools, m.system, m.messages].into_iter().flatten() {
        match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
            Ok(items) => segments.extend(items),
            // `system` may be a plain string: one segment.
            Err(_) => segments.push(raw),
        }
    }
    let prompt_bytes: u64 = segments.iter().map(|s| s.get().len() as u64).sum();
    if let Some(ttl) = m.cache_control.filter(|r| r.get().trim() != "null").map(|r| breakpoint_ttl(r.get())) {
        let base = total.saturating_sub(prompt_bytes);
        return Ok(match ttl {
            Ttl::OneHour => InputBytes { base, write_5m: 0, write_1h: prompt_bytes },
            Ttl::FiveMinutes => InputBytes { base, write_5m: prompt_bytes, write_1h: 0 },
        });
    }
    let (mut upto_1h, mut upto_any, mut seen) = (0u64, 0u64, 0u64);
    for segment in &segments {
        seen += segment.get().len() as u64;
        if let Some(ttl) = segment_breakpoint(segment.get()) {
            upto_any = seen;
            if ttl == Ttl::OneHour {
                upto_1h = seen;
            }
        }
    }
    Ok(InputBytes { base: total.saturating_sub(upto_any), write_5m: upto_any - upto_1h, write_1h: upto_1h })
}

/// A cache breakpoint's TTL, cheaper first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ttl {
    FiveMinutes,
    OneHour,
}

/// The longest TTL of any `cache_control` object inside one prompt segment, if it has one.
/// Only segments whose text mentions the key are parsed.
fn segment_breakpoint(segment: &str) -> Option<Ttl> {
    if !may_name(segment.as_bytes(), "\"cache_control\"") {
        return None;
    }
    let value: Value = serde_json::from_str(segment).ok()?;
    let mut found = None;
    visit_cache_controls(&value, &mut |ttl| found = found.max(Some(ttl)));
    found
}

fn visit_cache_controls(value: &Value, found: &mut impl FnMut(Ttl)) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if key == "cache_control" && v.is_object() {
                    found(ttl_of(v));
                } else {
                    visit_cache_controls(v, found);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| visit_cache_controls(v, found)),
        _ => {}
    }
}

fn breakpoint_ttl(raw: &str) -> Ttl {
    serde_json::from_str::<Value>(raw).map_or(Ttl::OneHour, |v| ttl_of(&v))
}

fn ttl_of(cache_control: &Value) -> Ttl {
    match cache_control.get("ttl").and_then(Value::as_str) {
        None | Some("5m") => Ttl::FiveMinutes,
        // "1h", or a TTL this module does not know: the dearest.
        Some(_) => Ttl::OneHour,
    }
}

/// Anthropic's server-side tools run within the request and add input as they go.
fn has_server_tool(tools: &Value) -> bool {
    const SERVER: [&str; 4] = ["web_search", "web_fetch", "code_execution", "tool_search"];
    tools
        .as_array()
        .into_iter()
        .flatten()
        .any(|tool| tool.get("type").and_then(Value::as_str).is_some_and(|t| SERVER.iter().any(|s| t.starts_with(s))))
}

fn mentions(haystack: &[u8], needle: &str) -> bool {
    memchr::memmem::find(haystack, needle.as_bytes()).is_some()
}

/// Whether the JSON text may name `key` (a member name written plainly, e.g. `cache_control`):
/// it does if it says so, and may if it escapes anything (`"cache\u005fcontrol"` is the same
/// key to the upstream), so only a text with neither skips the parse.
fn may_name(text: &[u8], key: &str) -> bool {
    mentions(text, key) || mentions(text, "\\u")
}

/// True when some part of the request is an image or file given by URL or id. Only bodies that
/// mention such a member are parsed for it.
fn references_external_input(body: &[u8]) -> bool {
    const MARKERS: [&str; 6] = ["image_url", "file_id", "file_url", "fileUri", "file_uri", "\"url\""];
    // As in `may_name`: a body that escapes anything may spell a marker with escapes.
    if !mentions(body, "\\u") && !MARKERS.iter().any(|m| mentions(body, m)) {
        return false;
    }
    serde_json::from_slice::<Value>(body).is_ok_and(|v| has_reference(&v))
}

fn has_reference(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, v)| {
            let by_url = |v: &Value| {
                let url = v.as_str().or_else(|| v.get("url").and_then(Value::as_str)).unwrap_or("");
                // Schemes are case-insensitive (RFC 3986): "HTTPS://" fetches just the same.
                let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
                matches!(scheme.as_deref(), Some("http" | "https" | "gs"))
            };
            match key.as_str() {
                "file_id" | "file_url" | "fileUri" | "file_uri" => !v.is_null(),
                "image_url" | "url" => by_url(v),
                _ => has_reference(v),
            }
        }),
        Value::Array(items) => items.iter().any(has_reference),
        _ => false,
    }
}

/// The body of the provider's free call that counts a request's input exactly, built from the
/// members that call accepts: Anthropic `POST /v1/messages/count_tokens`, OpenAI
/// `POST /v1/responses/input_tokens`, Gemini `POST …:countTokens`. `None` where the API has no
/// such call (Chat Completions, embeddings).
pub fn count_body(api: MeteredApi, body: &[u8], model: &str) -> Option<Vec<u8>> {
    let m: Members<'_> = serde_json::from_slice(body).ok()?;
    let model_json = serde_json::to_string(model).ok()?;
    let mut out = String::with_capacity(body.len() + 64);
    let push = |out: &mut String, name: &str, raw: Option<&RawValue>| {
        if let Some(raw) = raw.filter(|r| r.get().trim() != "null") {
            out.push_str(if out.len() > 1 { "," } else { "" });
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
            out.push_str(raw.get());
        }
    };
    match api {
        MeteredApi::AnthropicMessages => {
            out.push_str("{\"model\":");
            out.push_str(&model_json);
            for (name, raw) in [
                ("messages", m.messages),
                ("system", m.system),
                ("tools", m.tools),
                ("tool_choice", m.tool_choice),
                ("thinking", m.thinking),
                ("mcp_servers", m.mcp_servers),
            ] {
                push(&mut out, name, raw);
            }
            out.push('}');
        }
        // A stored prompt is not something the count call takes: such a request keeps the
        // context window as its bound.
        MeteredApi::OpenAiResponses if is_present(m.prompt) => return None,
        MeteredApi::OpenAiResponses => {
            out.push_str("{\"model\":");
            out.push_str(&model_json);
            for (name, raw) in [
                ("input", m.input),
                ("instructions", m.instructions),
                ("tools", m.tools),
                ("tool_choice", m.tool_choice),
                ("previous_response_id", m.previous_response_id),
                ("conversation", m.conversation),
                ("reasoning", m.reasoning),
                ("text", m.text),
                ("parallel_tool_calls", m.parallel_tool_calls),
                ("truncation", m.truncation),
            ] {
                push(&mut out, name, raw);
            }
            out.push('}');
        }
        MeteredApi::GeminiGenerate => {
            let resource = serde_json::to_string(&format!("models/{model}")).ok()?;
            let mut inner = String::from("{\"model\":");
            inner.push_str(&resource);
            for (name, raw) in [
                ("contents", m.contents),
                ("systemInstruction", m.system_instruction),
                ("tools", m.tools),
                ("toolConfig", m.tool_config),
                ("cachedContent", m.cached_content),
            ] {
                push(&mut inner, name, raw);
            }
            inner.push('}');
            out.push_str("{\"generateContentRequest\":");
            out.push_str(&inner);
            out.push('}');
        }
        MeteredApi::OpenAiChat | MeteredApi::OpenAiEmbeddings => return None,
    }
    Some(out.into_bytes())
}

/// Reads the input count from the reply of the call [`count_body`] built. Any figure that is not
/// a non-negative integer is no count.
pub fn counted_input(api: MeteredApi, reply: &[u8]) -> Option<u64> {
    let value: Value = serde_json::from_slice(reply).ok()?;
    match api {
        MeteredApi::AnthropicMessages | MeteredApi::OpenAiResponses => value.get("input_tokens")?.as_u64(),
        MeteredApi::GeminiGenerate => {
            // The cached part is counted apart from the prompt by some versions: take both.
            let total = value.get("totalTokens")?.as_u64()?;
            let cached = match value.get("cachedContentTokenCount") {
                None | Some(Value::Null) => 0,
                Some(v) => v.as_u64()?,
            };
            total.checked_add(cached)
        }
        MeteredApi::OpenAiChat | MeteredApi::OpenAiEmbeddings => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_ok(api: MeteredApi, body: &str) -> RequestFields {
        read(api, body.as_bytes(), None).unwrap_or_else(|e| panic!("{e:?}: {body}"))
    }

    #[test]
    fn models_streams_and_limits() {
        let chat = read_ok(MeteredApi::OpenAiChat, r#"{"model":"gpt-5","max_completion_tokens":50,"max_tokens":100,"n":3,"stream":true}"#);
        assert_eq!((chat.model.as_str(), chat.stream, chat.max_output_tokens), ("gpt-5", true, Some(150)));
        assert_eq!(read_ok(MeteredApi::OpenAiChat, r#"{"model":"m","max_tokens":100}"#).max_output_tokens, Some(100));
        assert_eq!(read_ok(MeteredApi::OpenAiChat, r#"{"model":"m"}"#).max_output_tokens, None);
        let many = read_ok(MeteredApi::OpenAiChat, r#"{"model":"m","n":64}"#);
        assert_eq!((many.max_output_tokens, many.choices), (None, 64), "no limit of its own, 64 choices");
        assert_eq!((chat.choices, read_ok(MeteredApi::AnthropicMessages, r#"{"model":"m","max_tokens":5}"#).choices), (3, 1));
        assert_eq!(read_ok(MeteredApi::OpenAiResponses, r#"{"model":"m","max_output_tokens":7}"#).max_output_tokens, Some(7));
        assert_eq!(read_ok(MeteredApi::OpenAiEmbeddings, r#"{"model":"m","input":"x"}"#).max_output_tokens, Some(0));
        let g = read(
            MeteredApi::GeminiGenerate,
            br#"{"generationConfig":{"maxOutputTokens":100,"candidateCount":2,"thinkingConfig":{"thinkingBudget":50}}}"#,
            Some("g"),
        )
        .unwrap();
        assert_eq!((g.model.as_str(), g.max_output_tokens), ("g", Some(300)));
        let unlimited = read(MeteredApi::GeminiGenerate, br#"{"generationConfig":{"candidateCount":4}}"#, Some("g")).unwrap();
        assert_eq!((unlimited.max_output_tokens, unlimited.choices), (None, 4));
        let dynamic = read(
            MeteredApi::GeminiGenerate,
            br#"{"generationConfig":{"maxOutputTokens":100,"thinkingConfig":{"thinkingBudget":-1}}}"#,
            Some("g"),
        )
        .unwrap();
        assert_eq!(dynamic.max_output_tokens, Some(100));
    }

    #[test]
    fn bad_bodies_are_malformed_never_cheap() {
        let bad = |api, body: &str| read(api, body.as_bytes(), None).unwrap_err();
        assert_eq!(bad(MeteredApi::OpenAiChat, r#"{"messages":[]}"#), BodyError::MissingModel);
        assert_eq!(bad(MeteredApi::OpenAiChat, r#"{"model":"  "}"#), BodyError::MissingModel);
        for body in [
            r#"{"model":5}"#,
            "{",
            "[1]",
            r#"{"model":"m","stream":"yes"}"#,
            r#"{"model":"m","model":"n"}"#,
            r#"{"model":"m","max_tokens":-5}"#,
            r#"{"model":"m","max_tokens":1.5}"#,
            r#"{"model":"m","max_tokens":"100"}"#,
            r#"{"model":"m","stream_options":7}"#,
        ] {
            assert!(matches!(bad(MeteredApi::OpenAiChat, body), BodyError::Malformed(_)), "{body}");
        }
        assert!(matches!(bad(MeteredApi::OpenAiResponses, r#"{"model":"m","background":true}"#), BodyError::Unmeterable(_)));
        assert!(read(MeteredApi::OpenAiResponses, br#"{"model":"m","background":false}"#, None).is_ok());
    }

    #[test]
    fn without_a_breakpoint_anthropic_input_is_plain() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"system":"be brief","messages":[{"role":"user","content":"hi"}]}"#;
        let f = read_ok(MeteredApi::AnthropicMessages, body);
        assert_eq!(f.input, InputBytes { base: body.len() as u64, write_5m: 0, write_1h: 0 });
    }

    #[test]
    fn breakpoints_make_the_prefix_writable_at_their_ttl() {
        let tools = r#"[{"name":"a","input_schema":{}},{"name":"b","input_schema":{},"cache_control":{"type":"ephemeral","ttl":"1h"}}]"#;
        let system = r#"[{"type":"text","text":"long system prompt","cache_control":{"type":"ephemeral"}}]"#;
        let m1 = r#"{"role":"user","content":"one"}"#;
        let m2 = r#"{"role":"assistant","content":"two"}"#;
        let body = format!(r#"{{"model":"c","max_tokens":10,"tools":{tools},"system":{system},"messages":[{m1},{m2}]}}"#);
        let f = read_ok(MeteredApi::AnthropicMessages, &body);
        let tool_bytes = (tools.len() - 3) as u64; // less the brackets and the comma
        let system_bytes = (system.len() - 2) as u64;
        assert_eq!(f.input.write_1h, tool_bytes, "up to the 1-hour breakpoint on the last tool");
        assert_eq!(f.input.write_5m, system_bytes, "then up to the 5-minute breakpoint on the system prompt");
        assert_eq!(f.input.total(), body.len() as u64, "every byte is in one class");
        assert!(f.input.base >= (m1.len() + m2.len()) as u64, "messages after the last breakpoint are plain input");

        // A breakpoint on the last message makes the whole prompt writable.
        let m2_marked = r#"{"role":"user","content":[{"type":"text","text":"two","cache_control":{"type":"ephemeral","ttl":"5m"}}]}"#;
        let body = format!(r#"{{"model":"c","max_tokens":10,"system":"s","messages":[{m1},{m2_marked}]}}"#);
        let f = read_ok(MeteredApi::AnthropicMessages, &body);
        assert_eq!(f.input.write_5m, (3 + m1.len() + m2_marked.len()) as u64);
        assert_eq!(f.input.write_1h, 0);

        // Text that merely mentions the key is not a breakpoint.
        let body = r#"{"model":"c","max_tokens":10,"messages":[{"role":"user","content":"what is \"cache_control\"?"}]}"#;
        assert_eq!(read_ok(MeteredApi::AnthropicMessages, body).input.write_5m, 0);

        // Automatic caching (a top-level cache_control) may write the whole prompt.
        let body =
            r#"{"model":"c","max_tokens":10,"cache_control":{"type":"ephemeral","ttl":"1h"},"messages":[{"role":"user","content":"hi"}]}"#;
        let f = read_ok(MeteredApi::AnthropicMessages, body);
        assert_eq!(f.input.write_1h, r#"{"role":"user","content":"hi"}"#.len() as u64);

        // A key spelt with escapes is the same key to the upstream.
        let escaped = r#"{"role":"user","content":[{"type":"text","text":"two","cache\u005fcontrol":{"type":"ephemeral","ttl":"1h"}}]}"#;
        let body = format!(r#"{{"model":"c","max_tokens":10,"messages":[{escaped}]}}"#);
        assert_eq!(read_ok(MeteredApi::AnthropicMessages, &body).input.write_1h, escaped.len() as u64);
    }

    #[test]
    fn other_apis_classes() {
        let body = r#"{"model":"gpt-5","input":"hi"}"#;
        assert_eq!(read_ok(MeteredApi::OpenAiResponses, body).input, InputBytes { write_5m: body.len() as u64, ..InputBytes::default() });
        let g = read(MeteredApi::GeminiGenerate, br#"{"contents":[]}"#, Some("g")).unwrap();
        assert_eq!(g.input, InputBytes { base: 15, ..InputBytes::default() });
    }

    #[test]
    fn input_by_reference() {
        let chat = |s: &str| read_ok(MeteredApi::OpenAiChat, s);
        assert!(!chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#).external_input);
        assert!(
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/cat.png"}}]}]}"#)
                .external_input
        );
        assert!(
            !chat(r#"{"model":"m","messages":[{"role":"user","content":"see https://x/y"}]}"#).external_input,
            "a URL in the text is only text"
        );
        let responses = |s: &str| read_ok(MeteredApi::OpenAiResponses, s);
        assert!(responses(r#"{"model":"m","input":[{"type":"input_file","file_id":"file-1"}]}"#).external_input);
        assert!(responses(r#"{"model":"m","previous_response_id":"resp_1","input":"go on"}"#).external_input);
        assert!(responses(r#"{"model":"m","conversation":"conv_1","input":"go on"}"#).external_input);
        assert!(responses(r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#).external_input);
        assert!(!responses(r#"{"model":"m","previous_response_id":null,"input":"hi"}"#).external_input);
        let a = read_ok(
            MeteredApi::AnthropicMessages,
            r#"{"model":"m","max_tokens":9,"messages":[{"content":[{"type":"image","source":{"type":"url","url":"https://x/a.png"}}]}]}"#,
        );
        assert!(a.external_input);
        let g = read(MeteredApi::GeminiGenerate, br#"{"cachedContent":"cachedContents/abc","contents":[]}"#, Some("g")).unwrap();
        assert!(g.external_input);
        let g =
            read(MeteredApi::GeminiGenerate, br#"{"contents":[{"parts":[{"fileData":{"fileUri":"gs://b/f.pdf"}}]}]}"#, Some("g")).unwrap();
        assert!(g.external_input);
        // Escaped member names and upper-case schemes name the same input.
        assert!(responses(r#"{"model":"m","input":[{"type":"input_file","file\u005fid":"file-1"}]}"#).external_input);
        assert!(
            chat(
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"u\u0072l":"https://x/a.png"}}]}]}"#
            )
            .external_input
        );
        assert!(
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"HTTPS://x/a.png"}}]}]}"#)
                .external_input
        );
    }

    #[test]
    fn thinking_server_tools_and_stream_options() {
        let a = |s: &str| read_ok(MeteredApi::AnthropicMessages, s);
        assert!(a(r#"{"model":"m","max_tokens":9000,"thinking":{"type":"enabled","budget_tokens":8000}}"#).thinking_budget);
        assert!(!a(r#"{"model":"m","max_tokens":9000,"thinking":{"type":"disabled"}}"#).thinking_budget);
        assert!(a(r#"{"model":"m","max_tokens":9,"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#).input_may_grow);
        assert!(!a(r#"{"model":"m","max_tokens":9,"tools":[{"name":"get_weather","input_schema":{}}]}"#).input_may_grow);
        let chat = |s: &str| read_ok(MeteredApi::OpenAiChat, s).stream_options;
        assert_eq!(chat(r#"{"model":"m","stream":true}"#), StreamOptions::Absent);
        assert_eq!(chat(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#), StreamOptions::IncludesUsage);
        assert_eq!(chat(r#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#), StreamOptions::Other);
        // Inside a string the quotes are escaped, so the name there is no member.
        assert_eq!(chat(r#"{"model":"m","messages":[{"content":"\"stream_options\""}]}"#), StreamOptions::Absent);
        assert_eq!(chat(r#"{"model":"m","stream":true,"stream_options":null}"#), StreamOptions::Other);
    }

    #[test]
    fn count_bodies_keep_only_what_the_count_call_accepts() {
        let body = br#"{"model":"claude-x","max_tokens":64000,"stream":true,"temperature":1,"system":"s","messages":[{"role":"user","content":"hi"}],"tools":[],"metadata":{"user_id":"u"}}"#;
        let count: Value = serde_json::from_slice(&count_body(MeteredApi::AnthropicMessages, body, "claude-x").unwrap()).unwrap();
        assert_eq!(count, serde_json::json!({"model":"claude-x","messages":[{"role":"user","content":"hi"}],"system":"s","tools":[]}));
        let body = br#"{"model":"gpt-5","input":"hi","stream":true,"max_output_tokens":5,"previous_response_id":"resp_1","store":true}"#;
        let count: Value = serde_json::from_slice(&count_body(MeteredApi::OpenAiResponses, body, "gpt-5").unwrap()).unwrap();
        assert_eq!(count, serde_json::json!({"model":"gpt-5","input":"hi","previous_response_id":"resp_1"}));
        let body =
            br#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"maxOutputTokens":5},"cachedContent":"cachedContents/c"}"#;
        let count: Value = serde_json::from_slice(&count_body(MeteredApi::GeminiGenerate, body, "gemini-x").unwrap()).unwrap();
        assert_eq!(
            count,
            serde_json::json!({"generateContentRequest":{"model":"models/gemini-x","contents":[{"parts":[{"text":"hi"}]}],"cachedContent":"cachedContents/c"}})
        );
        assert!(count_body(MeteredApi::OpenAiChat, br#"{"model":"m"}"#, "m").is_none());
        assert!(
            count_body(MeteredApi::OpenAiResponses, br#"{"model":"m","prompt":{"id":"pmpt_1"}}"#, "m").is_none(),
            "a stored prompt is not counted"
        );

        assert_eq!(counted_input(MeteredApi::AnthropicMessages, br#"{"input_tokens":1234}"#), Some(1234));
        assert_eq!(counted_input(MeteredApi::OpenAiResponses, br#"{"object":"response.input_tokens","input_tokens":7}"#), Some(7));
        assert_eq!(counted_input(MeteredApi::GeminiGenerate, br#"{"totalTokens":10,"cachedContentTokenCount":90}"#), Some(100));
        for bad in [&br#"{"input_tokens":-1}"#[..], br#"{"input_tokens":1.5}"#, br#"{"input_tokens":"9"}"#, b"nope", br#"{}"#] {
            assert_eq!(counted_input(MeteredApi::AnthropicMessages, bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
