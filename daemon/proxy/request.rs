//! What the proxy reads from and changes in a client's request: the presented key, the fields
//! metering needs, and the rewritten body and headers that go upstream.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use serde::Deserialize;
use serde_json::Value;

use crate::providers::{AuthStyle, MeteredApi};
use crate::secret::Secret;

/// Headers that carry a client credential; every one is removed before forwarding.
const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "x-api-key", "x-goog-api-key", "api-key"];

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1), plus those the proxy sets
/// itself.
const HOP_HEADERS: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Client headers that would pick the account context upstream; the master key decides it.
const ACCOUNT_HEADERS: [&str; 2] = ["openai-organization", "openai-project"];

/// The virtual key the client presented: `Authorization: Bearer`, `x-api-key`,
/// `x-goog-api-key`, or the `key` query parameter, preferring one shaped like a capit key.
pub fn presented_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<String> {
    let mut found: Vec<String> = Vec::new();
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let token = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v);
        found.push(token.trim().to_string());
    }
    for name in ["x-api-key", "x-goog-api-key", "api-key"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            found.push(v.trim().to_string());
        }
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(value) = pair.strip_prefix("key=") {
                found.push(value.to_string());
            }
        }
    }
    found.retain(|k| !k.is_empty());
    let best = found.iter().position(|k| crate::secret::looks_like_virtual_key(k)).unwrap_or(0);
    found.into_iter().nth(best)
}

/// The query string without any `key=` parameter, so that a credential never goes upstream.
pub fn scrub_query(query: Option<&str>) -> Option<String> {
    let query = query?;
    let kept: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && !p.starts_with("key=") && *p != "key").collect();
    if kept.is_empty() { None } else { Some(kept.join("&")) }
}

/// The headers to send upstream: the client's, less credentials, hop-by-hop and account
/// headers, with the master key set the provider's way and compression refused, so that the
/// reply can be metered as it streams past.
pub fn upstream_headers(client: &HeaderMap, auth: AuthStyle, key: &Secret) -> Result<HeaderMap, http::header::InvalidHeaderValue> {
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        let n = name.as_str();
        if CREDENTIAL_HEADERS.contains(&n) || HOP_HEADERS.contains(&n) || ACCOUNT_HEADERS.contains(&n) || n == "accept-encoding" {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let (name, text) = match auth {
        AuthStyle::Bearer => (header::AUTHORIZATION, format!("Bearer {}", key.expose())),
        AuthStyle::XApiKey => (HeaderName::from_static("x-api-key"), key.expose().to_string()),
        AuthStyle::XGoogApiKey => (HeaderName::from_static("x-goog-api-key"), key.expose().to_string()),
    };
    let mut value = HeaderValue::from_str(&text)?;
    value.set_sensitive(true);
    out.insert(name, value);
    Ok(out)
}

/// Response headers to pass back: the upstream's, less hop-by-hop ones (and the length when the
/// proxy changes the body).
pub fn client_headers(upstream: &HeaderMap, body_changes: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        let n = name.as_str();
        if HOP_HEADERS[..9].contains(&n) || (body_changes && n == "content-length") {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Why a request body was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    Malformed(String),
    MissingModel,
}

/// The Chat Completions request fields metering needs; the rest is skipped unread.
#[derive(Deserialize)]
struct ChatFields {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    stream_options: Option<Value>,
}

/// A billable request as the proxy will forward it.
#[derive(Debug)]
pub struct Prepared {
    pub model: String,
    /// The most output the request allows (`max_completion_tokens`, `max_tokens`,
    /// `max_output_tokens`, `maxOutputTokens` plus a thinking budget), times its choices.
    pub max_output_tokens: Option<u64>,
    /// The body points at content the proxy cannot measure (an image or file by URL or id),
    /// so its input can only be bounded by the model's context window.
    pub external_input: bool,
    /// The body to send upstream (with `include_usage` added when the client did not ask).
    pub body: Bytes,
    /// The proxy added `include_usage`, so the usage chunk must be hidden from the client.
    pub injected_usage: bool,
}

/// The fields every other billable API's body needs: a model (unless the path names it).
#[derive(Deserialize)]
struct ModelFields {
    #[serde(default)]
    model: Option<Value>,
}

/// Reads a billable request body. Chat Completions streams get `include_usage` added; other
/// APIs' bodies go upstream unchanged. Gemini names the model in the path (`path_model`).
pub fn prepare(api: MeteredApi, body: Bytes, path_model: Option<&str>) -> Result<Prepared, BodyError> {
    if api == MeteredApi::OpenAiChat {
        return prepare_chat(body);
    }
    let fields: ModelFields = serde_json::from_slice(&body).map_err(|e| BodyError::Malformed(e.to_string()))?;
    let model = match (path_model, fields.model) {
        (Some(model), _) => model.to_string(),
        (None, Some(Value::String(m))) if !m.trim().is_empty() => m,
        (None, Some(Value::String(_)) | Some(Value::Null) | None) => return Err(BodyError::MissingModel),
        (None, Some(_)) => return Err(BodyError::Malformed("\"model\" must be a string".into())),
    };
    let limits = output_limits(api, &body);
    Ok(Prepared { model, max_output_tokens: limits.0, external_input: limits.1, body, injected_usage: false })
}

/// The output limit a request sets and whether it references unmeasurable input. Only bodies
/// that mention a limit or a reference are parsed a second time.
fn output_limits(api: MeteredApi, body: &[u8]) -> (Option<u64>, bool) {
    const MARKERS: [&str; 9] = [
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "maxOutputTokens",
        "image_url",
        "file_id",
        "file_url",
        "fileUri",
        "\"url\"",
    ];
    if !MARKERS.iter().any(|m| contains(body, m)) {
        return (None, false);
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (None, false);
    };
    let number = |v: Option<&Value>| v.and_then(Value::as_u64);
    let max = match api {
        MeteredApi::OpenAiChat => {
            let n = number(value.get("n")).unwrap_or(1).max(1);
            number(value.get("max_completion_tokens")).or(number(value.get("max_tokens"))).map(|m| m.saturating_mul(n))
        }
        MeteredApi::OpenAiResponses => number(value.get("max_output_tokens")),
        MeteredApi::OpenAiEmbeddings => Some(0),
        MeteredApi::AnthropicMessages => number(value.get("max_tokens")),
        MeteredApi::GeminiGenerate => {
            let config = value.get("generationConfig");
            let candidates = number(config.and_then(|c| c.get("candidateCount"))).unwrap_or(1).max(1);
            let thinking = number(config.and_then(|c| c.pointer("/thinkingConfig/thinkingBudget"))).unwrap_or(0);
            number(config.and_then(|c| c.get("maxOutputTokens"))).map(|m| m.saturating_add(thinking).saturating_mul(candidates))
        }
    };
    (max, references_external_input(&value))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// True when some part of the request is an image or file given by URL or id.
fn references_external_input(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, v)| {
            let by_url = |v: &Value| {
                let url = v.as_str().or_else(|| v.get("url").and_then(Value::as_str)).unwrap_or("");
                url.starts_with("http://") || url.starts_with("https://") || url.starts_with("gs://")
            };
            match key.as_str() {
                "file_id" | "file_url" | "fileUri" | "file_uri" => true,
                "image_url" | "url" => by_url(v),
                _ => references_external_input(v),
            }
        }),
        Value::Array(items) => items.iter().any(references_external_input),
        _ => false,
    }
}

/// Sets a request's max output tokens to `tokens` in all (shared among its choices), the way its
/// API names the limit. Used only to fit a request into what is left of a cap.
pub fn set_max_output(api: MeteredApi, body: &[u8], tokens: u64) -> Result<Bytes, BodyError> {
    use serde_json::json;
    let mut value: Value = serde_json::from_slice(body).map_err(|e| BodyError::Malformed(e.to_string()))?;
    let object = value.as_object_mut().ok_or_else(|| BodyError::Malformed("the body is not a JSON object".into()))?;
    match api {
        MeteredApi::OpenAiChat => {
            let choices = object.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
            let field = if object.contains_key("max_tokens") && !object.contains_key("max_completion_tokens") {
                "max_tokens"
            } else {
                "max_completion_tokens"
            };
            object.insert(field.into(), json!(tokens / choices));
        }
        MeteredApi::OpenAiResponses => {
            object.insert("max_output_tokens".into(), json!(tokens));
        }
        MeteredApi::AnthropicMessages => {
            object.insert("max_tokens".into(), json!(tokens));
            // Thinking counts toward max_tokens and must stay below it.
            if let Some(budget) = object.get_mut("thinking").and_then(|t| t.get_mut("budget_tokens"))
                && budget.as_u64().is_some_and(|b| b >= tokens)
            {
                *budget = json!(tokens / 2);
            }
        }
        MeteredApi::GeminiGenerate => {
            let config = object.entry("generationConfig").or_insert_with(|| json!({}));
            let candidates = config.get("candidateCount").and_then(Value::as_u64).unwrap_or(1).max(1);
            let per_candidate = tokens / candidates;
            let thinking = config.pointer("/thinkingConfig/thinkingBudget").and_then(Value::as_u64);
            let (output, thinking) = match thinking {
                Some(t) => {
                    let t = t.min(per_candidate / 2);
                    (per_candidate - t, Some(t))
                }
                None => (per_candidate, None),
            };
            config["maxOutputTokens"] = json!(output);
            if let Some(t) = thinking {
                config["thinkingConfig"]["thinkingBudget"] = json!(t);
            }
        }
        MeteredApi::OpenAiEmbeddings => {}
    }
    serde_json::to_vec(&value).map(Bytes::from).map_err(|e| BodyError::Malformed(e.to_string()))
}

/// Reads a Chat Completions body and, for a stream without `include_usage`, asks for usage.
fn prepare_chat(body: Bytes) -> Result<Prepared, BodyError> {
    let fields: ChatFields = serde_json::from_slice(&body).map_err(|e| BodyError::Malformed(e.to_string()))?;
    let model = match fields.model {
        Some(Value::String(m)) if !m.trim().is_empty() => m,
        Some(Value::Null) | None => return Err(BodyError::MissingModel),
        Some(Value::String(_)) => return Err(BodyError::MissingModel),
        Some(_) => return Err(BodyError::Malformed("\"model\" must be a string".into())),
    };
    let stream = match fields.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(BodyError::Malformed("\"stream\" must be true or false".into())),
    };
    let (max_output_tokens, external_input) = output_limits(MeteredApi::OpenAiChat, &body);
    let prepared =
        |body: Bytes, injected_usage: bool| Prepared { model: model.clone(), max_output_tokens, external_input, body, injected_usage };
    if !stream {
        return Ok(prepared(body, false));
    }
    match fields.stream_options {
        None | Some(Value::Null) if fields_absent(&body, "stream_options") => {
            let body = splice_first_member(&body, br#""stream_options":{"include_usage":true}"#)
                .ok_or_else(|| BodyError::Malformed("the body is not a JSON object".into()))?;
            Ok(prepared(body, true))
        }
        Some(Value::Object(opts)) if opts.get("include_usage") == Some(&Value::Bool(true)) => Ok(prepared(body, false)),
        Some(Value::Object(_)) | Some(Value::Null) | None => {
            // Rare: options present without include_usage. Rewrite the whole object.
            let mut value: Value = serde_json::from_slice(&body).map_err(|e| BodyError::Malformed(e.to_string()))?;
            let object = value.as_object_mut().ok_or_else(|| BodyError::Malformed("the body is not a JSON object".into()))?;
            let options = object.entry("stream_options").or_insert_with(|| Value::Object(Default::default()));
            if !options.is_object() {
                *options = Value::Object(Default::default());
            }
            if let Some(options) = options.as_object_mut() {
                options.insert("include_usage".into(), Value::Bool(true));
            }
            let body = serde_json::to_vec(&value).map_err(|e| BodyError::Malformed(e.to_string()))?;
            Ok(prepared(Bytes::from(body), true))
        }
        Some(_) => Err(BodyError::Malformed("\"stream_options\" must be an object".into())),
    }
}

/// True when `key` does not occur as a member name anywhere in the text; a cheap guard that
/// keeps the splice below from creating a duplicate member.
fn fields_absent(body: &[u8], key: &str) -> bool {
    let needle = format!("\"{key}\"");
    !body.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Inserts `member` as the first member of the top-level JSON object in `body`.
fn splice_first_member(body: &[u8], member: &[u8]) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(body.len() + member.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(member);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Prepared, BodyError> {
        prepare(MeteredApi::OpenAiChat, Bytes::copy_from_slice(body.as_bytes()), None)
    }

    #[test]
    fn other_apis_need_a_model_unless_the_path_names_it() {
        let body = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let r =
            prepare(MeteredApi::AnthropicMessages, body(r#"{"model":"claude-haiku-4-5","max_tokens":10,"stream":true}"#), None).unwrap();
        assert_eq!((r.model.as_str(), r.injected_usage), ("claude-haiku-4-5", false));
        assert_eq!(prepare(MeteredApi::OpenAiResponses, body(r#"{"input":"hi"}"#), None).unwrap_err(), BodyError::MissingModel);
        let r = prepare(MeteredApi::GeminiGenerate, body(r#"{"contents":[]}"#), Some("gemini-2.5-flash")).unwrap();
        assert_eq!(r.model, "gemini-2.5-flash");
        assert!(matches!(prepare(MeteredApi::GeminiGenerate, body("[1"), Some("g")), Err(BodyError::Malformed(_))));
    }

    fn json(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn plain_requests_pass_unchanged() {
        let body = r#"{"model":"gpt-5","messages":[]}"#;
        let r = parse(body).unwrap();
        assert_eq!((r.model.as_str(), r.injected_usage), ("gpt-5", false));
        assert_eq!(r.body, body.as_bytes());
    }

    #[test]
    fn streams_get_include_usage() {
        let r = parse(r#" {"model":"gpt-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert!(r.injected_usage);
        let v = json(&r.body);
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["messages"][0]["content"], "hi");

        let r = parse(r#"{"model":"gpt-5","stream":true,"stream_options":{"include_obfuscation":false}}"#).unwrap();
        assert!(r.injected_usage);
        let v = json(&r.body);
        assert_eq!(v["stream_options"], serde_json::json!({"include_obfuscation":false,"include_usage":true}));

        let asked = r#"{"model":"gpt-5","stream":true,"stream_options":{"include_usage":true}}"#;
        let r = parse(asked).unwrap();
        assert!(!r.injected_usage);
        assert_eq!(r.body, asked.as_bytes());

        // A message that merely mentions the member name takes the rewriting path, still valid.
        let r = parse(r#"{"model":"gpt-5","stream":true,"messages":[{"content":"\"stream_options\""}]}"#).unwrap();
        assert_eq!(json(&r.body)["stream_options"]["include_usage"], Value::Bool(true));
    }

    #[test]
    fn output_limits_and_external_input() {
        let body = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let chat = |s: &str| prepare(MeteredApi::OpenAiChat, body(s), None).unwrap();
        assert_eq!(chat(r#"{"model":"m","max_tokens":100}"#).max_output_tokens, Some(100));
        assert_eq!(chat(r#"{"model":"m","max_completion_tokens":50,"max_tokens":100,"n":3}"#).max_output_tokens, Some(150));
        assert_eq!(chat(r#"{"model":"m"}"#).max_output_tokens, None);
        let inline = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
        );
        assert!(!inline.external_input);
        let linked =
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/cat.png"}}]}]}"#);
        assert!(linked.external_input);
        let text_link = chat(r#"{"model":"m","messages":[{"role":"user","content":"see https://x/y"}]}"#);
        assert!(!text_link.external_input, "a URL in the text is only text");
        let r = prepare(
            MeteredApi::OpenAiResponses,
            body(r#"{"model":"m","max_output_tokens":7,"input":[{"type":"input_file","file_id":"file-1"}]}"#),
            None,
        )
        .unwrap();
        assert_eq!((r.max_output_tokens, r.external_input), (Some(7), true));
        let a = prepare(MeteredApi::AnthropicMessages, body(r#"{"model":"m","max_tokens":9,"messages":[{"content":[{"type":"image","source":{"type":"url","url":"https://x/a.png"}}]}]}"#), None).unwrap();
        assert_eq!((a.max_output_tokens, a.external_input), (Some(9), true));
        let g = prepare(MeteredApi::GeminiGenerate, body(r#"{"contents":[{"parts":[{"fileData":{"fileUri":"gs://b/f.pdf"}}]}],"generationConfig":{"maxOutputTokens":100,"candidateCount":2,"thinkingConfig":{"thinkingBudget":50}}}"#), Some("g")).unwrap();
        assert_eq!((g.max_output_tokens, g.external_input), (Some(300), true));
    }

    #[test]
    fn max_output_is_set_the_way_each_api_names_it() {
        let set = |api, body: &str, n| json(&set_max_output(api, body.as_bytes(), n).unwrap());
        assert_eq!(set(MeteredApi::OpenAiChat, r#"{"model":"m"}"#, 300)["max_completion_tokens"], 300);
        assert_eq!(set(MeteredApi::OpenAiChat, r#"{"model":"m","max_tokens":9000,"n":3}"#, 300)["max_tokens"], 100);
        assert_eq!(set(MeteredApi::OpenAiResponses, r#"{"model":"m"}"#, 300)["max_output_tokens"], 300);
        let claude = set(
            MeteredApi::AnthropicMessages,
            r#"{"model":"m","max_tokens":9000,"thinking":{"type":"enabled","budget_tokens":8000}}"#,
            300,
        );
        assert_eq!((claude["max_tokens"].as_u64(), claude["thinking"]["budget_tokens"].as_u64()), (Some(300), Some(150)));
        let gemini =
            set(MeteredApi::GeminiGenerate, r#"{"contents":[],"generationConfig":{"thinkingConfig":{"thinkingBudget":1000}}}"#, 300);
        assert_eq!(
            (
                gemini["generationConfig"]["maxOutputTokens"].as_u64(),
                gemini["generationConfig"]["thinkingConfig"]["thinkingBudget"].as_u64()
            ),
            (Some(150), Some(150))
        );
    }

    #[test]
    fn bad_bodies() {
        assert_eq!(parse(r#"{"messages":[]}"#).unwrap_err(), BodyError::MissingModel);
        assert_eq!(parse(r#"{"model":"  "}"#).unwrap_err(), BodyError::MissingModel);
        assert!(matches!(parse(r#"{"model":5}"#), Err(BodyError::Malformed(_))));
        assert!(matches!(parse("{"), Err(BodyError::Malformed(_))));
        assert!(matches!(parse("[1]"), Err(BodyError::Malformed(_))));
        assert!(matches!(parse(r#"{"model":"m","stream":"yes"}"#), Err(BodyError::Malformed(_))));
        assert!(matches!(parse(r#"{"model":"m","model":"n"}"#), Err(BodyError::Malformed(_))));
    }

    #[test]
    fn keys_are_found_and_stripped() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer sk-other"));
        h.insert("x-api-key", HeaderValue::from_static("sk-capit-0123456789abcdef0123456789abcdefXYZ"));
        h.insert("openai-organization", HeaderValue::from_static("org-x"));
        h.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        assert_eq!(presented_key(&h, None).as_deref(), Some("sk-capit-0123456789abcdef0123456789abcdefXYZ"));
        let out = upstream_headers(&h, AuthStyle::Bearer, &Secret::new("sk-master".into())).unwrap();
        assert_eq!(out.get("authorization").unwrap(), "Bearer sk-master");
        assert!(out.get("x-api-key").is_none() && out.get("openai-organization").is_none());
        assert_eq!(out.get("accept-encoding").unwrap(), "identity");
        assert_eq!(out.get("x-custom").unwrap(), "kept");
        assert_eq!(presented_key(&HeaderMap::new(), Some("alt=sse&key=abc")).as_deref(), Some("abc"));
        assert_eq!(scrub_query(Some("alt=sse&key=abc")).as_deref(), Some("alt=sse"));
        assert_eq!(scrub_query(Some("key=abc")), None);
    }
}
