//! Every wire format metered exactly: Anthropic Messages, OpenAI Responses and embeddings,
//! Gemini (JSON, SSE, JSON-array streams), OpenRouter's reported cost, and named
//! OpenAI-compatible servers. Each grant's ledger must equal the fake upstream's bill.

use std::time::Duration;

use ::http::Method;
use serde_json::Value;

use crate::metering::MASTER;
use crate::support::daemon::Daemon;
use crate::support::http::{self, Reply, next_data};
use crate::support::upstream::{Fake, FakePrice};
use crate::support::{dec, runtime, wait_for};

/// A daemon with `provider` pointed at a fresh fake, and a grant for it.
fn setup(provider: &str) -> (Daemon, Fake, String) {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider(provider, &fake.base_url(), MASTER);
    let key = daemon.grant("agent", "10", &["--provider", provider]);
    (daemon, fake, key)
}

/// Claude Haiku 4.5 list prices, written here independently of the daemon's built-in table.
fn haiku() -> FakePrice {
    FakePrice {
        input: dec("1.00"),
        cached_input: dec("0.10"),
        cache_write_5m: dec("1.25"),
        cache_write_1h: dec("2.00"),
        output: dec("5.00"),
        web_search_per_1k: dec("10"),
    }
}

fn post(url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    runtime().block_on(http::send(Method::POST, url, headers, body.to_string()))
}

const CLAUDE: &str = r#"{"model":"claude-haiku-4-5","max_tokens":1024,"messages":[{"role":"user","content":"hi"}]}"#;
const CLAUDE_STREAM: &str = r#"{"model":"claude-haiku-4-5","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// A request whose body is as large as the cached prompt the fake reports, as a real one is
/// (a token is at least a byte): `body` with a long system prompt added.
fn with_system_prompt(body: &str) -> String {
    body.replacen('{', &format!("{{\"system\":\"{}\",", "cached context ".repeat(1000)), 1)
}

#[test]
fn anthropic_json_and_streams_with_cache_writes_and_searches() {
    let (daemon, fake, key) = setup("anthropic");
    fake.set_full_price("claude-haiku-4-5", haiku());
    let url = daemon.url("/anthropic/v1/messages?beta=true");
    let headers = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "interleaved-thinking-2025-05-14,context-1m-2025-08-07"),
    ];
    let cases: [(&str, bool, bool); 4] =
        [(CLAUDE, false, false), (CLAUDE, true, false), (CLAUDE_STREAM, true, true), (CLAUDE_STREAM, false, true)];
    for (i, (body, split, byte_by_byte)) in cases.into_iter().enumerate() {
        fake.script(|s| {
            s.prompt_tokens = 50 + i as u64;
            s.cached_tokens = 10_000;
            s.cache_write_5m = 1024;
            s.cache_write_1h = if split { 2048 } else { 0 };
            s.cache_split = split;
            s.completion_tokens = 420;
            s.web_searches = 1;
            s.byte_by_byte = byte_by_byte;
            s.crlf = byte_by_byte;
        });
        let reply = post(&url, &headers, &with_system_prompt(body));
        assert_eq!(reply.status, 200, "case {i}: {}", reply.text());
        assert_eq!(daemon.spent("agent"), fake.bill(), "case {i}");
    }
    let stream =
        post(&url, &[("authorization", &format!("Bearer {key}")), ("anthropic-version", "2023-06-01")], &with_system_prompt(CLAUDE_STREAM));
    assert!(stream.text().contains("event: message_stop"));
    assert_eq!(daemon.spent("agent"), fake.bill(), "Bearer, as Claude Code sends it");
    let received = fake.received();
    let first = &received[0];
    assert_eq!(first.path, "/v1/messages");
    assert_eq!(first.query.as_deref(), Some("beta=true"));
    assert_eq!(first.header("x-api-key").as_deref(), Some(MASTER));
    assert_eq!(first.header("authorization"), None);
    assert_eq!(first.header("anthropic-version").as_deref(), Some("2023-06-01"));
    assert_eq!(first.header("anthropic-beta").as_deref(), Some("interleaved-thinking-2025-05-14,context-1m-2025-08-07"));
    let usage = daemon.ctl_json(&["usage", "agent"]);
    assert_eq!(usage["requests"], 5);
    assert_eq!(usage["cached_input_tokens"], 50_000);
}

#[test]
fn anthropic_free_calls_local_telemetry_and_errors_in_its_format() {
    let (daemon, fake, key) = setup("anthropic");
    let auth = [("x-api-key", key.as_str()), ("anthropic-version", "2023-06-01")];
    let count = post(&daemon.url("/anthropic/v1/messages/count_tokens"), &auth, r#"{"model":"claude-haiku-4-5","messages":[]}"#);
    assert_eq!(count.json()["input_tokens"], 12);
    let rt = runtime();
    let models = rt.block_on(http::send(Method::GET, &daemon.url("/anthropic/v1/models"), &auth, ""));
    assert_eq!(models.status, 200, "model lists are forwarded, unmetered");
    assert_eq!(fake.received()[1].header("x-api-key").as_deref(), Some(MASTER));
    let telemetry = post(&daemon.url("/anthropic/api/event_logging/batch"), &auth, r#"{"events":[]}"#);
    assert_eq!(telemetry.status, 200);
    assert_eq!(fake.received().len(), 2, "telemetry never goes upstream");
    assert_eq!(daemon.ctl_json(&["usage", "agent"])["requests"], 0);

    let bad = post(&daemon.url("/anthropic/v1/messages"), &[("x-api-key", "sk-capit-nope")], CLAUDE);
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["type"], "error");
    assert_eq!(bad.json()["error"]["type"], "authentication_error");
    let unpriced = post(&daemon.url("/anthropic/v1/messages"), &auth, r#"{"model":"claude-unknown-9","max_tokens":5,"messages":[]}"#);
    assert_eq!(unpriced.status, 400);
    assert!(unpriced.json()["error"]["message"].as_str().unwrap().contains("claude-unknown-9"));
}

#[test]
fn anthropic_error_event_and_cut_stream_are_charged_what_is_known() {
    let (daemon, fake, key) = setup("anthropic");
    fake.set_full_price("claude-haiku-4-5", haiku());
    let auth = [("x-api-key", key.as_str()), ("anthropic-version", "2023-06-01")];
    fake.script(|s| s.error_event = true);
    let reply = post(&daemon.url("/anthropic/v1/messages"), &auth, CLAUDE_STREAM);
    assert!(reply.text().contains("overloaded_error"));
    assert_eq!(daemon.spent("agent"), fake.bill());

    // Cut after the content, before message_delta: input is known from message_start.
    fake.script(|s| {
        s.error_event = false;
        s.cut_before_usage = true;
        s.prompt_tokens = 100_000;
        s.chunk_delay = Duration::from_millis(10);
    });
    let before = daemon.spent("agent");
    runtime().block_on(async {
        let response = http::open(Method::POST, &daemon.url("/anthropic/v1/messages"), &auth, CLAUDE_STREAM).await;
        let mut body = response.into_body();
        while let Some(Ok(_)) = next_data(&mut body).await {}
    });
    let usage = wait_for("the cut stream to settle", Duration::from_secs(10), || {
        let u = daemon.ctl_json(&["usage", "agent"]);
        (u["requests"] == 2).then_some(u)
    });
    assert_eq!(usage["estimated"], 1);
    // 100,000 input tokens at $1 per million: at least $0.10, never zero.
    assert!(daemon.spent("agent") - before >= dec("0.1"), "{}", usage);
}

#[test]
fn openai_responses_and_embeddings() {
    let (daemon, fake, key) = setup("openai");
    fake.set_price("gpt-5", "1.25", "0.125", "10.00");
    fake.set_price("text-embedding-3-small", "0.02", "0.02", "0");
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    fake.script(|s| {
        s.prompt_tokens = 2000;
        s.cached_tokens = 1536;
        s.completion_tokens = 900;
        s.reasoning_tokens = 640;
        s.reply_model = Some("gpt-5-2025-08-07".into());
    });
    let json = post(&daemon.url("/openai/v1/responses"), &headers, r#"{"model":"gpt-5","input":"hi"}"#);
    assert_eq!(json.json()["usage"]["output_tokens"], 900);
    fake.script(|s| s.byte_by_byte = true);
    let stream = post(&daemon.url("/openai/v1/responses"), &headers, r#"{"model":"gpt-5","input":"hi","stream":true}"#);
    assert!(stream.text().contains("event: response.completed"));
    assert_eq!(fake.received()[1].body, r#"{"model":"gpt-5","input":"hi","stream":true}"#.as_bytes(), "Responses bodies go up unchanged");
    fake.script(|s| {
        s.prompt_tokens = 8;
        s.reply_model = None;
    });
    let embedded = post(&daemon.url("/openai/v1/embeddings"), &headers, r#"{"model":"text-embedding-3-small","input":"hello"}"#);
    assert_eq!(embedded.json()["usage"]["prompt_tokens"], 8);
    // (464 × 1.25 + 1536 × 0.125 + 900 × 10) × 2 + 8 × 0.02 = 9772 × 2 + 0.16, per million.
    assert_eq!(fake.bill(), dec("0.01954416"));
    assert_eq!(daemon.spent("agent"), fake.bill());
    let usage = daemon.ctl_json(&["usage", "agent"]);
    assert_eq!(usage["reasoning_tokens"], 1280);
}

#[test]
fn gemini_every_call_shape_with_thoughts_billed_as_output() {
    let (daemon, fake, key) = setup("gemini");
    // Gemini 2.5 Flash list prices, written independently.
    fake.set_price("gemini-2.5-flash", "0.30", "0.03", "2.50");
    fake.script(|s| {
        s.prompt_tokens = 1200;
        s.cached_tokens = 1024;
        s.completion_tokens = 40;
        s.reasoning_tokens = 310;
        s.text = "one two three four".into();
    });
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"generationConfig":{"maxOutputTokens":1024}}"#;
    let header = [("x-goog-api-key", key.as_str())];
    let base = daemon.url("/gemini");
    let calls = [
        (format!("{base}/v1beta/models/gemini-2.5-flash:generateContent"), &header[..]),
        (format!("{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"), &header[..]),
        (format!("{base}/v1/models/gemini-2.5-flash:streamGenerateContent"), &header[..]),
        (format!("{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={key}"), &[][..]),
    ];
    for (i, (url, headers)) in calls.iter().enumerate() {
        fake.script(|s| {
            s.crlf = i == 1;
            s.byte_by_byte = i >= 1;
        });
        let reply = post(url, headers, body);
        assert_eq!(reply.status, 200, "call {i}: {}", reply.text());
        assert_eq!(daemon.spent("agent"), fake.bill(), "call {i}");
    }
    // (176 × 0.30 + 1024 × 0.03 + 350 × 2.50) × 4 = 958.52 × 4, per million: thoughts are output too.
    assert_eq!(fake.bill(), dec("0.00383408"));
    let received = fake.received();
    assert!(received.iter().all(|r| r.header("x-goog-api-key").as_deref() == Some(MASTER)));
    assert_eq!(received[3].query.as_deref(), Some("alt=sse"), "the key parameter never goes upstream");
    let count = post(&format!("{base}/v1beta/models/gemini-2.5-flash:countTokens"), &header, body);
    assert_eq!(count.json()["totalTokens"], 1200);
    assert_eq!(daemon.ctl_json(&["usage", "agent"])["requests"], 4);

    let bad = post(&format!("{base}/v1beta/models/gemini-2.5-flash:generateContent"), &[("x-goog-api-key", "wrong")], body);
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["error"]["status"], "UNAUTHENTICATED");
    assert!(!daemon.log_text().contains(&key), "the ?key= parameter never reaches the log");
}

#[test]
fn openrouter_bills_the_cost_it_reports() {
    let (daemon, fake, key) = setup("openrouter");
    fake.script(|s| s.report_cost = Some("0.00095"));
    // The bound comes from OpenRouter's own model list; the bill is the cost it reports.
    fake.list_model("anthropic/claude-sonnet-4.5", "0.000003", "0.000015");
    let auth = format!("Bearer {key}");
    let body = r#"{"model":"anthropic/claude-sonnet-4.5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = post(&daemon.url("/openrouter/v1/chat/completions"), &[("authorization", &auth)], body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let received = fake.received();
    assert_eq!((received[0].method.as_str(), received[0].path.as_str()), ("GET", "/v1/models"), "the list is fetched when first needed");
    assert_eq!(received[0].header("authorization").as_deref(), Some(format!("Bearer {MASTER}").as_str()));
    let sent = received[1].json();
    assert_eq!(sent["stream_options"]["include_usage"], Value::Bool(true));
    fake.script(|s| s.report_cost = Some("1.5e-5"));
    post(&daemon.url("/openrouter/v1/chat/completions"), &[("authorization", &auth)], &body.replace(",\"stream\":true", ""));
    assert_eq!(fake.bill(), dec("0.000965"));
    assert_eq!(daemon.spent("agent"), fake.bill());
}

#[test]
fn named_openai_compatible_servers() {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.ctl_ok(&["provider", "add", "ollama", "--kind", "openai-compatible", "--base-url", &fake.base_url(), "--price-zero"]);
    daemon.ctl_ok(&["provider", "add", "vllm", "--kind", "openai-compatible", "--base-url", &fake.base_url()]);
    let stdin = daemon.ctl_stdin(&["key", "add", "vllm"], "vllm-server-token-123456");
    assert!(stdin.status.success());
    // A zero-priced local server needs no key and no price.
    let local = daemon.grant("local", "1", &["--provider", "ollama"]);
    fake.set_price("llama3.3", "0", "0", "0");
    let reply = post(
        &daemon.url("/ollama/v1/chat/completions"),
        &[("authorization", &format!("Bearer {local}"))],
        r#"{"model":"llama3.3","messages":[]}"#,
    );
    assert_eq!(reply.status, 503, "no key stored for ollama yet: {}", reply.text());
    let out = daemon.ctl_stdin(&["key", "add", "ollama"], "ollama");
    assert!(out.status.success());
    let reply = post(
        &daemon.url("/ollama/v1/chat/completions"),
        &[("authorization", &format!("Bearer {local}"))],
        r#"{"model":"llama3.3","messages":[]}"#,
    );
    assert_eq!(reply.status, 200);
    let usage = daemon.ctl_json(&["usage", "local"]);
    assert_eq!((usage["spent"].as_str(), usage["input_tokens"].as_u64()), (Some("0"), Some(12)));

    let key = daemon.grant("gpu", "1", &["--provider", "vllm"]);
    let auth = format!("Bearer {key}");
    let unpriced = post(&daemon.url("/vllm/v1/chat/completions"), &[("authorization", &auth)], r#"{"model":"qwen3-32b","messages":[]}"#);
    assert_eq!(unpriced.status, 400);
    daemon.ctl_ok(&["price", "set", "qwen3-32b", "--input", "0.2", "--output", "0.6"]);
    fake.set_price("qwen3-32b", "0.2", "0.2", "0.6");
    let reply = post(&daemon.url("/vllm/v1/chat/completions"), &[("authorization", &auth)], r#"{"model":"qwen3-32b","messages":[]}"#);
    assert_eq!(reply.status, 200);
    assert_eq!(daemon.spent("gpu"), dec("0.0000042"));
    assert_eq!(fake.received().last().unwrap().header("authorization").as_deref(), Some("Bearer vllm-server-token-123456"));
}
