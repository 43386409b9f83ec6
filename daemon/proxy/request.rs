//! What the proxy reads from and changes in a client's request: the presented key, the fields
//! metering needs, and the rewritten body and headers that go upstream.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use serde_json::Value;

use crate::providers::{AuthStyle, MeteredApi};
pub use crate::request_fields::BodyError;
use crate::request_fields::{RequestFields, StreamOptions};
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
    // The header value is the key's one copy per request (hyper owns it); the text it is built
    // from is zeroed at once.
    let mut text = zeroize::Zeroizing::new(String::with_capacity(key.expose().len() + 7));
    let name = match auth {
        AuthStyle::Bearer => {
            text.push_str("Bearer ");
            header::AUTHORIZATION
        }
        AuthStyle::XApiKey => HeaderName::from_static("x-api-key"),
        AuthStyle::XGoogApiKey => HeaderName::from_static("x-goog-api-key"),
    };
    text.push_str(key.expose());
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
            // Thinking counts toward max_tokens and must stay below it (and at 1,024 or more,
            // which is why a fitted request with thinking keeps at least 2,048).
            if let Some(budget) = object.get_mut("thinking").and_then(|t| t.get_mut("budget_tokens"))
                && budget.as_u64().is_some_and(|b| b >= tokens)
            {
                *budget = json!((tokens / 2).max(1024));
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

/// The body of a Chat Completions stream with `include_usage` asked for, when the client did
/// not ask itself (then the usage-only chunk is the proxy's, and is hidden from the client);
/// returns whether it was added. Other requests pass unchanged.
pub fn ask_for_stream_usage(api: MeteredApi, body: Bytes, fields: &RequestFields) -> Result<(Bytes, bool), BodyError> {
    if api != MeteredApi::OpenAiChat || !fields.stream {
        return Ok((body, false));
    }
    match fields.stream_options {
        StreamOptions::IncludesUsage => Ok((body, false)),
        StreamOptions::Absent => {
            let body = splice_first_member(&body, br#""stream_options":{"include_usage":true}"#)
                .ok_or_else(|| BodyError::Malformed("the body is not a JSON object".into()))?;
            Ok((body, true))
        }
        StreamOptions::Other => {
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
            Ok((Bytes::from(body), true))
        }
    }
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

    fn json(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn ask(body: &str) -> (Bytes, bool) {
        let fields = crate::request_fields::read(MeteredApi::OpenAiChat, body.as_bytes(), None).unwrap();
        ask_for_stream_usage(MeteredApi::OpenAiChat, Bytes::copy_from_slice(body.as_bytes()), &fields).unwrap()
    }

    #[test]
    fn streams_get_include_usage_and_other_requests_pass_unchanged() {
        let plain = r#"{"model":"gpt-5","messages":[]}"#;
        assert_eq!(ask(plain), (Bytes::from_static(plain.as_bytes()), false));

        let (body, injected) = ask(r#" {"model":"gpt-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
        assert!(injected);
        let v = json(&body);
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["messages"][0]["content"], "hi");

        let (body, injected) = ask(r#"{"model":"gpt-5","stream":true,"stream_options":{"include_obfuscation":false}}"#);
        assert!(injected);
        assert_eq!(json(&body)["stream_options"], serde_json::json!({"include_obfuscation":false,"include_usage":true}));

        let responses = br#"{"model":"gpt-5","input":"hi","stream":true}"#;
        let fields = crate::request_fields::read(MeteredApi::OpenAiResponses, responses, None).unwrap();
        let unchanged = ask_for_stream_usage(MeteredApi::OpenAiResponses, Bytes::from_static(responses), &fields).unwrap();
        assert_eq!(unchanged, (Bytes::from_static(responses), false), "only Chat Completions streams need asking");

        let asked = r#"{"model":"gpt-5","stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(ask(asked), (Bytes::from_static(asked.as_bytes()), false));

        // A message that merely mentions the member name is spliced into, still valid.
        let (body, _) = ask(r#"{"model":"gpt-5","stream":true,"messages":[{"content":"\"stream_options\""}]}"#);
        assert_eq!(json(&body)["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(json(&body)["messages"][0]["content"], "\"stream_options\"");
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
            3000,
        );
        assert_eq!((claude["max_tokens"].as_u64(), claude["thinking"]["budget_tokens"].as_u64()), (Some(3000), Some(1500)));
        let tight = set(
            MeteredApi::AnthropicMessages,
            r#"{"model":"m","max_tokens":9000,"thinking":{"type":"enabled","budget_tokens":8000}}"#,
            2048,
        );
        assert_eq!(tight["thinking"]["budget_tokens"].as_u64(), Some(1024), "never below Anthropic's least budget");
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
