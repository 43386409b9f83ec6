//! Requests through the proxy are forwarded with the master key and metered to the last digit:
//! the ledger equals what the fake upstream billed.

use std::time::Duration;

use ::http::Method;
use serde_json::Value;

use crate::support::daemon::Daemon;
use crate::support::http::{self, next_data, post_json};
use crate::support::upstream::Fake;
use crate::support::{dec, runtime, wait_for};

pub const MASTER: &str = "sk-proj-MASTERkey0123456789abcdefWXYZ";

/// A daemon whose openai provider points at a fresh fake, with `test-model` priced the same on
/// both sides.
pub fn setup() -> (Daemon, Fake) {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--cached-input", "0.275", "--output", "4.40"]);
    fake.set_price("test-model", "1.10", "0.275", "4.40");
    (daemon, fake)
}

pub fn chat_url(daemon: &Daemon) -> String {
    daemon.url("/openai/v1/chat/completions")
}

const PLAIN: &str = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"test-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_WITH_USAGE: &str =
    r#"{"model":"test-model","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;

/// The SSE `data:` payloads of a reply, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

#[test]
fn json_chat_is_forwarded_with_the_master_key_and_metered_exactly() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| {
        s.prompt_tokens = 1200;
        s.cached_tokens = 1024;
        s.completion_tokens = 300;
        s.reasoning_tokens = 256;
    });
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "Hello from the fake");
    assert_eq!(reply.json()["usage"]["prompt_tokens"], 1200);

    let received = fake.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path, "/v1/chat/completions");
    assert_eq!(received[0].header("authorization").as_deref(), Some(format!("Bearer {MASTER}").as_str()));
    assert!(received.iter().all(|r| !String::from_utf8_lossy(&r.body).contains("sk-capit") && !format!("{:?}", r.headers).contains(&key)));
    assert_eq!(received[0].body, PLAIN.as_bytes(), "a plain request is forwarded byte for byte");

    // 176 uncached × 1.10 + 1024 cached × 0.275 + 300 output × 4.40, per million tokens.
    assert_eq!(fake.bill(), dec("0.0017952"));
    let usage = daemon.ctl_json(&["usage", "script"]);
    assert_eq!(dec(usage["spent"].as_str().unwrap()), fake.bill());
    assert_eq!(usage["requests"], 1);
    assert_eq!(usage["input_tokens"], 1200);
    assert_eq!(usage["cached_input_tokens"], 1024);
    assert_eq!(usage["output_tokens"], 300);
    assert_eq!(usage["reasoning_tokens"], 256);
    assert_eq!(usage["by_model"][0]["model"], "test-model");
    let listed = daemon.ctl_json(&["ls"]);
    assert_eq!(dec(listed[0]["spent"].as_str().unwrap()), fake.bill());
}

#[test]
fn stream_without_include_usage_is_metered_and_the_injected_chunk_hidden() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| {
        s.prompt_tokens = 40;
        s.completion_tokens = 7;
        s.byte_by_byte = true;
    });
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, STREAM));
    assert_eq!(reply.status, 200);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = reply.text();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(!text.contains("prompt_tokens"), "the usage chunk the client did not ask for is hidden: {text}");
    let content: String = data[..data.len() - 1]
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(content, "Hello from the fake");

    let sent = fake.received()[0].json();
    assert_eq!(sent["stream_options"]["include_usage"], Value::Bool(true), "usage was asked for upstream");
    assert_eq!(sent["messages"][0]["content"], "hi");
    assert_eq!(daemon.spent("script"), fake.bill());
    assert_eq!(fake.bill(), dec("0.0000748"));
}

#[test]
fn stream_with_include_usage_passes_the_usage_chunk_through() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, STREAM_WITH_USAGE));
    assert_eq!(reply.status, 200);
    let data = sse_data(&reply.text());
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 12);
    assert_eq!(usage_chunk["choices"], Value::Array(vec![]));
    assert_eq!(fake.received()[0].body, STREAM_WITH_USAGE.as_bytes());
    assert_eq!(daemon.spent("script"), fake.bill());
}

#[test]
fn streams_reach_the_client_chunk_by_chunk_without_buffering() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| s.hold_after_first_event = true);
    let rt = runtime();
    rt.block_on(async {
        let auth = format!("Bearer {key}");
        let response = http::open(Method::POST, &chat_url(&daemon), &[("authorization", &auth)], STREAM).await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        // The fake holds everything after its first event until released: the first event can
        // only arrive here if the proxy forwards without waiting for more.
        let first =
            tokio::time::timeout(Duration::from_secs(10), next_data(&mut body)).await.expect("first event arrives while the rest is held");
        let first = String::from_utf8(first.unwrap().unwrap().to_vec()).unwrap();
        assert!(first.starts_with("data: ") && first.contains("\"role\":\"assistant\""), "{first}");
        assert_eq!(fake.finished_streams(), 0);
        fake.release();
        let mut rest = String::new();
        while let Some(chunk) = next_data(&mut body).await {
            rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        assert!(rest.ends_with("data: [DONE]\n\n"));
    });
    assert_eq!(daemon.spent("script"), fake.bill());
}

#[test]
fn dated_snapshot_in_the_reply_is_priced_from_the_builtin_table() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    // gpt-5-mini list prices, written here independently of the daemon's table.
    fake.set_price("gpt-5-mini", "0.25", "0.025", "2.00");
    fake.script(|s| {
        s.reply_model = Some("gpt-5-mini-2025-08-07".into());
        s.prompt_tokens = 1200;
        s.cached_tokens = 1024;
        s.completion_tokens = 300;
    });
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, r#"{"model":"gpt-5-mini","messages":[]}"#));
    assert_eq!(reply.status, 200);
    assert_eq!(fake.bill(), dec("0.0006696"));
    assert_eq!(daemon.spent("script"), fake.bill());
    assert_eq!(daemon.ctl_json(&["usage", "script"])["by_model"][0]["model"], "gpt-5-mini-2025-08-07");
}

#[test]
fn concurrent_requests_are_each_metered_once() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "100", &["--provider", "openai"]);
    fake.script(|s| {
        s.prompt_tokens = 333;
        s.cached_tokens = 111;
        s.completion_tokens = 77;
        s.chunk_delay = Duration::from_millis(2);
    });
    let rt = runtime();
    let url = chat_url(&daemon);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (url, key) = (url.clone(), key.clone());
            let body = if i % 2 == 0 { STREAM } else { PLAIN };
            tasks.push(tokio::spawn(async move { post_json(&url, &key, body).await.status }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), 200);
        }
    });
    assert_eq!(fake.billed_requests(), 40);
    let usage = daemon.ctl_json(&["usage", "script"]);
    assert_eq!(usage["requests"], 40);
    assert_eq!(dec(usage["spent"].as_str().unwrap()), fake.bill());
}

#[test]
fn upstream_errors_pass_through_and_bill_nothing() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| s.status = 400);
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "fake_refusal");
    let usage = daemon.ctl_json(&["usage", "script"]);
    assert_eq!(usage["requests"], 1);
    assert_eq!(usage["errors"], 1);
    assert_eq!(dec(usage["spent"].as_str().unwrap()), dec("0"));
}

#[test]
fn an_error_event_after_200_is_recorded_with_its_usage() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| s.error_event = true);
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, STREAM));
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("server_error"), "the error event reaches the client");
    assert_eq!(daemon.spent("script"), fake.bill());
}

#[test]
fn a_stream_cut_before_its_usage_is_charged_an_estimate_never_zero() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| {
        s.cut_before_usage = true;
        // Paced like a real stream, so the head and first events are on the wire before the cut.
        s.chunk_delay = Duration::from_millis(20);
    });
    let rt = runtime();
    rt.block_on(async {
        let auth = format!("Bearer {key}");
        let response = http::open(Method::POST, &chat_url(&daemon), &[("authorization", &auth)], STREAM).await;
        let mut body = response.into_body();
        let mut broke = false;
        while let Some(chunk) = next_data(&mut body).await {
            if chunk.is_err() {
                broke = true;
                break;
            }
        }
        assert!(broke, "the client sees the stream break, not a clean end");
    });
    let usage = wait_for("the cut stream to settle", Duration::from_secs(10), || {
        let u = daemon.ctl_json(&["usage", "script"]);
        (u["requests"] == 1).then_some(u)
    });
    assert_eq!(usage["estimated"], 1);
    assert!(dec(usage["spent"].as_str().unwrap()) > dec("0"));
}

#[test]
fn a_client_that_leaves_mid_stream_is_still_charged_the_full_usage() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| {
        s.hold_after_first_event = true;
        s.completion_tokens = 900;
    });
    let rt = runtime();
    rt.block_on(async {
        let auth = format!("Bearer {key}");
        let response = http::open(Method::POST, &chat_url(&daemon), &[("authorization", &auth)], STREAM).await;
        let mut body = response.into_body();
        next_data(&mut body).await.unwrap().unwrap();
        drop(body); // The client goes away after the first event.
    });
    // Let the upstream finish only after the client has gone.
    std::thread::sleep(Duration::from_millis(100));
    fake.release();
    let spent = wait_for("the abandoned stream to settle", Duration::from_secs(10), || {
        let u = daemon.ctl_json(&["usage", "script"]);
        (u["requests"] == 1).then(|| (dec(u["spent"].as_str().unwrap()), u["estimated"].clone()))
    });
    assert_eq!(spent.0, fake.bill(), "the final usage was read after the client left");
    assert_eq!(spent.1, 0);
}

#[test]
fn model_lists_are_forwarded_unmetered() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    let auth = format!("Bearer {key}");
    let reply = rt.block_on(http::send(Method::GET, &daemon.url("/openai/v1/models"), &[("authorization", &auth)], ""));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["data"][0]["id"], "gpt-5");
    assert_eq!(fake.received()[0].header("authorization").as_deref(), Some(format!("Bearer {MASTER}").as_str()));
    assert_eq!(daemon.ctl_json(&["usage", "script"])["requests"], 0);
}

#[test]
fn a_compressed_reply_is_forwarded_as_sent_and_metered_from_a_decoded_copy() {
    use std::io::Read;
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| {
        s.gzip = true;
        s.prompt_tokens = 321;
        s.completion_tokens = 54;
    });
    let rt = runtime();
    for body in [PLAIN, STREAM] {
        let reply = rt.block_on(post_json(&chat_url(&daemon), &key, body));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["content-encoding"], "gzip", "the bytes keep the headers they came with");
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&reply.body[..]).read_to_string(&mut text).unwrap();
        assert!(text.contains("Hello") || text.contains("fake"), "{text}");
    }
    assert_eq!(fake.received()[0].header("accept-encoding").as_deref(), Some("identity"));
    let usage = daemon.ctl_json(&["usage", "script"]);
    assert_eq!(usage["estimated"], 0);
    assert_eq!(daemon.spent("script"), fake.bill());
}

#[test]
fn an_http2_upstream_over_tls_is_metered_the_same() {
    let (fake, ca_pem) = Fake::tls();
    fake.set_price("test-model", "1.10", "0.275", "4.40");
    let dir = crate::support::TempDir::new();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let daemon = Daemon::start_with(&["--upstream-ca", ca.to_str().unwrap()]);
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--cached-input", "0.275", "--output", "4.40"]);
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    for body in [PLAIN, STREAM, STREAM_WITH_USAGE] {
        let reply = rt.block_on(post_json(&chat_url(&daemon), &key, body));
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let received = fake.received();
    assert!(received.iter().all(|r| r.version == ::http::Version::HTTP_2), "ALPN chose h2");
    assert_eq!(received[1].json()["stream_options"]["include_usage"], Value::Bool(true));
    assert_eq!(daemon.spent("script"), fake.bill());

    // Without the CA the upstream's certificate is not trusted: 502, nothing billed.
    let untrusting = Daemon::start();
    untrusting.setup_provider("openai", &fake.base_url(), MASTER);
    untrusting.ctl_ok(&["price", "set", "test-model", "--input", "1", "--output", "1"]);
    let key = untrusting.grant("script", "5.00", &["--provider", "openai"]);
    let reply = rt.block_on(post_json(&chat_url(&untrusting), &key, PLAIN));
    assert_eq!(reply.status, 502);
    assert!(reply.error_message().to_lowercase().contains("certificate"), "{}", reply.text());
    assert_eq!(fake.received().len(), 3);
}

#[test]
fn a_stream_that_ignores_its_max_tokens_is_cut_off_in_the_provider_s_format() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| {
        s.text = vec!["word"; 600].join(" ");
        s.chunk_delay = Duration::from_millis(1);
    });
    let rt = runtime();
    let body = r#"{"model":"test-model","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, body));
    assert_eq!(reply.status, 200);
    let text = reply.text();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the stream ends cleanly: {text}");
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "capit_stream_cut");
    assert!(error["error"]["message"].as_str().unwrap().contains("passed the $"), "{error}");
    let words = text.matches("word").count();
    assert!(words > 100 && words < 550, "cut part-way: {words} words arrived");
    // Every event before the cut is whole JSON.
    for event in &data[..data.len() - 2] {
        serde_json::from_str::<Value>(event).unwrap_or_else(|e| panic!("{e}: {event}"));
    }
    let usage = wait_for("the cut stream to settle", Duration::from_secs(10), || {
        let u = daemon.ctl_json(&["usage", "script"]);
        (u["requests"] == 1).then_some(u)
    });
    assert_eq!(usage["estimated"], 1);
    assert!(dec(usage["spent"].as_str().unwrap()) > dec("0"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.finished_streams(), 0, "the upstream was stopped, not read to its end");
}
