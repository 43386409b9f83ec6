//! A cap an agent can actually spend: holds as tight as each request allows (cache breakpoints,
//! exact counts near the cap, true-up on the stated input, fitted output), waiting instead of
//! refusing while only holds in flight are in the way, and nothing sent upstream left
//! unmetered. Always against the fake's own bill: never a cent over the cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ::http::Method;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::metering::MASTER;
use crate::support::daemon::Daemon;
use crate::support::http::{self, client};
use crate::support::upstream::{Failure, Fake, FakePrice};
use crate::support::{TempDir, dec, runtime, wait_for, without_colour};

/// Sonnet's list prices, written independently of the daemon's table.
fn sonnet() -> FakePrice {
    FakePrice {
        input: dec("3"),
        cached_input: dec("0.30"),
        cache_write_5m: dec("3.75"),
        cache_write_1h: dec("6"),
        output: dec("15"),
        web_search_per_1k: dec("10"),
    }
}

/// A request shaped like Claude Code's (about 130 KB): a long system prompt and 16 tools, a
/// long conversation, cache breakpoints on the system prompt and the last turn (5 minutes, as
/// Claude Code asks), `max_tokens` 64000, streamed.
fn claude_code_body() -> String {
    let words = |n: usize, seed: &str| (0..n).map(|i| format!("{seed}{}", i % 97)).collect::<Vec<_>>().join(" ");
    let tools: Vec<Value> = (0..16)
        .map(|i| {
            json!({
                "name": format!("Tool{i}"),
                "description": words(220, "describe"),
                "input_schema": {"type": "object", "properties": {"path": {"type": "string", "description": words(20, "p")}, "limit": {"type": "integer"}}, "required": ["path"]},
            })
        })
        .collect();
    let mut messages: Vec<Value> = (0..59)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": [{"type": "text", "text": words(190, "turn")}]}))
        .collect();
    messages.push(json!({"role": "user", "content": [{"type": "text", "text": words(60, "ask"), "cache_control": {"type": "ephemeral"}}]}));
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64000,
        "stream": true,
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}, {"type": "text", "text": words(1800, "system"), "cache_control": {"type": "ephemeral"}}],
        "tools": tools,
        "messages": messages,
        "metadata": {"user_id": "user_0123456789abcdef"},
        "temperature": 1,
    });
    body.to_string()
}

/// What each Claude-Code-shaped request really costs at the fake: 300 plain input tokens,
/// 25,000 read from the cache, 2,000 written to it, 700 output tokens: $0.0264.
fn script_claude_code(fake: &Fake) {
    fake.set_full_price("claude-sonnet-4-5", sonnet());
    fake.script(|s| {
        s.prompt_tokens = 300;
        s.cached_tokens = 25_000;
        s.cache_write_5m = 2_000;
        s.cache_split = true;
        s.completion_tokens = 700;
        s.text = "I read the file and made the change you asked for".into();
    });
}

/// Runs `clients` agents, each sending Claude-Code-shaped requests one after another, against a
/// fresh grant of `cap` with default settings, until the first refusal; returns the share of
/// the cap the fake billed (the requests admitted before that refusal included), after
/// checking that the bill never passed the cap and the ledger equals it.
fn effective_budget(cap: &str, clients: usize) -> Decimal {
    let fake = Fake::openai();
    let daemon = Daemon::start_logging(&[], "info");
    daemon.setup_provider("anthropic", &fake.base_url(), MASTER);
    script_claude_code(&fake);
    let key = daemon.grant("claude", cap, &["--provider", "anthropic"]);
    let body = Arc::new(claude_code_body());
    assert!((120_000..140_000).contains(&body.len()), "a body of about 130 KB: {}", body.len());
    let refused = Arc::new(AtomicBool::new(false));
    let url = daemon.url("/anthropic/v1/messages?beta=true");
    let rt = runtime();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (url, key, body, refused) = (url.clone(), key.clone(), body.clone(), refused.clone());
            rt.spawn(async move {
                let client = client();
                let headers = [("x-api-key", key.as_str()), ("anthropic-version", "2023-06-01"), ("content-type", "application/json")];
                let mut served = 0;
                while !refused.load(Ordering::SeqCst) {
                    let request = http::request(Method::POST, &url, &headers, body.as_bytes().to_vec());
                    let reply = http::send_with(&client, request).await;
                    match reply.status {
                        200 => {
                            assert!(reply.text().contains("event: message_stop"), "a whole reply: {}", reply.text());
                            served += 1;
                        }
                        429 => {
                            refused.store(true, Ordering::SeqCst);
                            let message = reply.json()["error"]["message"].as_str().unwrap_or_default().to_string();
                            assert!(message.contains("left of its"), "refused only when the budget cannot pay: {message}");
                        }
                        other => panic!("unexpected {other}: {}", reply.text()),
                    }
                }
                served
            })
        })
        .collect();
    let served: usize = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).sum();
    let cap = dec(cap);
    let bill = fake.bill();
    assert!(bill <= cap, "the upstream billed {bill} against a cap of {cap}");
    assert_eq!(daemon.spent("claude"), bill, "the ledger equals the bill");
    assert_eq!(fake.billed_requests(), served);
    bill / cap
}

#[test]
fn claude_code_shaped_requests_can_spend_almost_all_of_the_cap() {
    let mut rows = Vec::new();
    for (cap, least) in [("1.00", dec("0.85")), ("5.00", dec("0.95")), ("20.00", dec("0.95"))] {
        let alone = effective_budget(cap, 1);
        let six = effective_budget(cap, 6);
        rows.push(format!("| ${cap} | {:.1} % | {:.1} % |", alone * dec("100"), six * dec("100")));
        assert!(alone >= least, "one at a time at ${cap}: only {alone} of the cap was spent before the first refusal");
        assert!(six >= least, "six at once at ${cap}: only {six} of the cap was spent before the first refusal");
    }
    eprintln!("share of the cap spent before the first refusal (Claude-Code-shaped requests, $0.0264 each):");
    eprintln!("| cap | one at a time | 6 at once |\n|---|---|---|\n{}", rows.join("\n"));
}

/// A daemon whose anthropic provider points at a fresh fake priced like Sonnet.
fn anthropic_setup(flags: &[&str]) -> (Daemon, Fake, String) {
    let fake = Fake::openai();
    let daemon = Daemon::start_with(flags);
    daemon.setup_provider("anthropic", &fake.base_url(), MASTER);
    fake.set_full_price("claude-sonnet-4-5", sonnet());
    let key = daemon.grant("agent", "5", &["--provider", "anthropic"]);
    (daemon, fake, key)
}

const SMALL: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

fn post_anthropic(daemon: &Daemon, key: &str, body: &str) -> http::Reply {
    let headers = [("x-api-key", key), ("anthropic-version", "2023-06-01"), ("content-type", "application/json")];
    runtime().block_on(http::send(Method::POST, &daemon.url("/anthropic/v1/messages"), &headers, body.to_string()))
}

#[test]
fn a_5xx_after_the_body_is_an_error_entry_at_what_it_reports() {
    let (daemon, fake, key) = anthropic_setup(&[]);
    fake.script(|s| s.status = 529);
    let reply = post_anthropic(&daemon, &key, SMALL);
    assert_eq!(reply.status, 529, "the upstream's error is passed on: {}", reply.text());
    assert_eq!(reply.json()["error"]["message"], "The fake refuses this request");
    let usage = wait_for("the error entry", Duration::from_secs(10), || {
        let u = daemon.ctl_json(&["usage", "agent"]);
        (u["requests"] == 1).then_some(u)
    });
    assert_eq!((usage["errors"].as_u64(), usage["spent"].as_str()), (Some(1), Some("0")));
    assert_eq!(fake.bill(), dec("0"), "nothing was generated, nothing billed");
    assert_eq!(daemon.ctl_json(&["ls"])[0]["reserved"], "0", "the hold is released");
}

#[test]
fn no_reply_after_the_body_is_charged_at_the_hold() {
    // A stall past --upstream-timeout, and a reset: the upstream billed, the reply never came.
    let (daemon, fake, key) = anthropic_setup(&["--upstream-timeout", "1"]);
    for (i, failure) in [Failure::Stall(Duration::from_secs(3)), Failure::Reset].into_iter().enumerate() {
        fake.script(|s| {
            s.failure = Some(failure);
            s.prompt_tokens = 20;
            s.completion_tokens = 900;
        });
        let reply = post_anthropic(&daemon, &key, SMALL);
        let status = if i == 0 { 504 } else { 502 };
        assert_eq!(reply.status, status, "{failure:?}: {}", reply.text());
        let usage = wait_for("the interrupted entry", Duration::from_secs(10), || {
            let u = daemon.ctl_json(&["usage", "agent"]);
            (u["requests"] == i + 1).then_some(u)
        });
        let ledger = dec(usage["spent"].as_str().unwrap());
        // The hold: (body bytes + 1024) × $3 + 1000 × $15 per million.
        let hold = (dec(&(SMALL.len() as u64 + 1024).to_string()) * dec("3") + dec("15000")) / dec("1000000");
        assert_eq!(ledger, hold * dec(&(i + 1).to_string()), "{failure:?}: charged at the hold");
        assert!(ledger >= fake.bill(), "{failure:?}: the ledger ({ledger}) never falls below the bill ({})", fake.bill());
        assert_eq!(usage["estimated"], i + 1, "marked interrupted");
    }
    let entries = daemon.ctl_json(&["ls"]);
    assert_eq!(entries[0]["reserved"], "0");
}

#[test]
fn a_client_that_leaves_before_the_head_does_not_stop_the_metering() {
    let (daemon, fake, key) = anthropic_setup(&[]);
    fake.script(|s| {
        s.head_delay = Duration::from_millis(800);
        s.prompt_tokens = 1200;
        s.completion_tokens = 300;
    });
    let rt = runtime();
    let url = daemon.url("/anthropic/v1/messages");
    let stream = SMALL.replace("\"messages\"", "\"stream\":true,\"messages\"");
    let gone = rt.spawn(async move {
        let headers = [("x-api-key", key.as_str()), ("anthropic-version", "2023-06-01")];
        http::send(Method::POST, &url, &headers, stream).await
    });
    wait_for("the request to reach the fake", Duration::from_secs(10), || (!fake.received().is_empty()).then_some(()));
    gone.abort();
    drop(rt);
    let usage = wait_for("the abandoned reply to settle", Duration::from_secs(10), || {
        let u = daemon.ctl_json(&["usage", "agent"]);
        (u["requests"] == 1).then_some(u)
    });
    assert_eq!(fake.bill(), dec("0.0081"), "1,200 × $3 + 300 × $15 per million");
    assert_eq!(dec(usage["spent"].as_str().unwrap()), fake.bill(), "metered exactly, as if the client had stayed");
    assert_eq!(usage["estimated"], 0);
}

#[test]
fn the_hold_is_trued_up_to_the_stated_input_at_once() {
    let (daemon, fake, key) = anthropic_setup(&[]);
    fake.script(|s| {
        s.prompt_tokens = 10;
        s.completion_tokens = 20;
        s.hold_after_first_event = true;
    });
    let big = claude_code_body().replace("64000", "2000");
    let rt = runtime();
    let url = daemon.url("/anthropic/v1/messages");
    let task = {
        let key = key.clone();
        rt.spawn(async move {
            let headers = [("x-api-key", key.as_str()), ("anthropic-version", "2023-06-01")];
            http::send(Method::POST, &url, &headers, big).await
        })
    };
    // Held after message_start: 10 input tokens at $3 and 2,000 output at $15 per million, not the
    // 130 KB the bytes allowed at the write rate.
    let held = wait_for("the hold to be trued up", Duration::from_secs(10), || {
        let held = dec(daemon.ctl_json(&["ls"])[0]["reserved"].as_str().unwrap());
        (held == dec("0.03003")).then_some(held)
    });
    assert_eq!(held, dec("0.03003"));
    fake.release();
    assert_eq!(rt.block_on(task).unwrap().status, 200);
    assert_eq!(daemon.spent("agent"), fake.bill());
}

#[test]
fn a_request_waits_for_holds_in_flight_then_goes_or_is_told_when_to_retry() {
    let (daemon, fake) = crate::metering::setup();
    let body = r#"{"model":"test-model","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    let bound = (dec(&(body.len() as u64 + 1024).to_string()) * dec("1.10") + dec("2200")) / dec("1000000");
    // Room for one at its most, and a little: the second must wait for the first.
    let cap = (bound * dec("1.2")).round_dp_with_strategy(6, rust_decimal::RoundingStrategy::ToZero);
    let key = daemon.grant("one-at-a-time", &cap.to_string(), &["--provider", "openai", "--fit", "false"]);
    fake.script(|s| {
        s.prompt_tokens = 10;
        s.completion_tokens = 5;
        s.hold_after_first_event = true;
    });
    let rt = runtime();
    let url = crate::metering::chat_url(&daemon);
    let send = |rt: &tokio::runtime::Runtime| {
        let (url, key) = (url.clone(), key.clone());
        rt.spawn(async move { http::post_json(&url, &key, body).await })
    };
    let first = send(&rt);
    wait_for("the first to be in flight", Duration::from_secs(10), || (fake.received().len() == 1).then_some(()));
    let second = send(&rt);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fake.received().len(), 1, "the second waits in capit");
    assert!(!second.is_finished(), "and is not refused");
    fake.release();
    assert_eq!(rt.block_on(first).unwrap().status, 200);
    assert_eq!(rt.block_on(second).unwrap().status, 200, "it went once the first settled");
    assert_eq!(fake.received().len(), 2);
    drop((daemon, fake));

    // With a short queue timeout, a waiter is told when to retry; past the queue's depth at once.
    let fake = Fake::openai();
    let daemon = Daemon::start_with(&["--queue-timeout", "1", "--queue-depth", "1"]);
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--output", "4.40"]);
    fake.set_price("test-model", "1.10", "0.275", "4.40");
    let key = daemon.grant("one-at-a-time", &cap.to_string(), &["--provider", "openai", "--fit", "false"]);
    fake.script(|s| s.hold_after_first_event = true);
    let url = crate::metering::chat_url(&daemon);
    let first = {
        let (url, key) = (url.clone(), key.clone());
        rt.spawn(async move { http::post_json(&url, &key, body).await })
    };
    wait_for("the first to be in flight", Duration::from_secs(10), || (fake.received().len() == 1).then_some(()));
    let waiting = {
        let (url, key) = (url.clone(), key.clone());
        rt.spawn(async move { http::post_json(&url, &key, body).await })
    };
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let full = rt.block_on(http::post_json(&url, &key, body));
    assert_eq!(full.status, 429);
    assert!(started.elapsed() < Duration::from_millis(900), "past the queue's depth it is refused at once");
    assert!(full.error_message().contains("1 requests are already waiting for room"), "{}", full.text());
    let timed_out = rt.block_on(waiting).unwrap();
    assert_eq!(timed_out.status, 429);
    assert_eq!(timed_out.headers["retry-after"], "2");
    assert!(timed_out.error_message().contains("requests in flight hold $"), "{}", timed_out.text());
    assert!(timed_out.error_message().contains("it waited 1 s"), "{}", timed_out.text());
    fake.release();
    assert_eq!(rt.block_on(first).unwrap().status, 200);
    let listed = daemon.ctl_json(&["ls"]);
    assert_eq!(listed[0]["refused"], json!({"queue_full": 1, "queue_timeout": 1}));
    let usage = daemon.ctl_json(&["usage", "one-at-a-time"]);
    assert_eq!(usage["refused"], json!({"queue_full": 1, "queue_timeout": 1}));
    let log = without_colour(&daemon.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("refused:") && l.contains("queue_timeout"))
        .unwrap_or_else(|| panic!("refusals are logged at info: {log}"));
    assert!(line.contains(" INFO ") && line.contains("grant=one-at-a-time") && line.contains("model=\"test-model\""), "{line}");
}

/// A daemon whose openrouter provider points at a fresh fake that lists `model`.
fn openrouter_setup(cap: &str) -> (Daemon, Fake, String) {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider("openrouter", &fake.base_url(), MASTER);
    fake.list_model("anthropic/claude-sonnet-4.5", "0.000003", "0.000015");
    let key = daemon.grant("router", cap, &["--provider", "openrouter"]);
    (daemon, fake, key)
}

fn post_openrouter(daemon: &Daemon, key: &str, body: &str) -> http::Reply {
    runtime().block_on(http::post_json(&daemon.url("/openrouter/v1/chat/completions"), key, body))
}

const ROUTED: &str = r#"{"model":"anthropic/claude-sonnet-4.5","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn openrouter_models_are_bounded_by_its_own_list_and_refused_without_a_price() {
    let (daemon, fake, key) = openrouter_setup("5");
    let unlisted = post_openrouter(&daemon, &key, &ROUTED.replace("anthropic/claude-sonnet-4.5", "nobody/unpriced-model"));
    assert_eq!(unlisted.status, 400);
    assert!(unlisted.error_message().contains("neither OpenRouter's model list nor capit's table has it"), "{}", unlisted.text());
    fake.script(|s| s.report_cost = Some("0.0021"));
    assert_eq!(post_openrouter(&daemon, &key, ROUTED).status, 200);
    assert_eq!(daemon.spent("router"), dec("0.0021"), "the cost it reports is billed");
    let models_fetched = fake.received().iter().filter(|r| r.path == "/v1/models").count();
    assert_eq!(models_fetched, 1, "fetched once, when first needed, and kept");
}

#[test]
fn forty_openrouter_requests_at_once_never_pass_a_small_cap() {
    let body = r#"{"model":"anthropic/claude-sonnet-4.5","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    // The hold: (bytes + 1024) × $3 + 500 × $15 per million; each reports (and is billed) less.
    let bound = (dec(&(body.len() as u64 + 1024).to_string()) * dec("3") + dec("7500")) / dec("1000000");
    let cap = (bound * dec("10.5")).round_dp_with_strategy(6, rust_decimal::RoundingStrategy::ToZero);
    let (daemon, fake, key) = openrouter_setup(&cap.to_string());
    fake.script(|s| {
        // Each reports (and is billed) its tokens at the list's prices: the most input its bytes
        // allow and all the output it may have.
        s.report_listed_cost = true;
        s.prompt_tokens = body.len() as u64 + 1024;
        s.output_at_limit = true;
        s.hold_after_first_event = true;
    });
    let rt = runtime();
    let url = daemon.url("/openrouter/v1/chat/completions");
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (url, key) = (url.clone(), key.clone());
            rt.spawn(async move { http::post_json(&url, &key, body).await })
        })
        .collect();
    wait_for("ten in flight", Duration::from_secs(30), || {
        (fake.received().iter().filter(|r| r.method == "POST").count() == 10).then_some(())
    });
    fake.release();
    let statuses: Vec<u16> = tasks.into_iter().map(|t| rt.block_on(t).unwrap().status).collect();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(fake.bill() <= cap, "billed {} against {cap}", fake.bill());
    assert_eq!(daemon.spent("router"), fake.bill());
}

#[test]
fn openrouter_costs_that_are_no_costs_are_never_credited() {
    let (mut daemon, fake, key) = openrouter_setup("5");
    let hold = (dec(&(ROUTED.len() as u64 + 1024).to_string()) * dec("3") + dec("7500")) / dec("1000000");
    for (i, reported) in ["-5", "\"0.001\"", "1e30", "79228162514264337593543950335"].into_iter().enumerate() {
        fake.script(|s| {
            s.report_cost = Some(reported);
            s.billed_cost = Some("0.001");
        });
        assert_eq!(post_openrouter(&daemon, &key, ROUTED).status, 200, "{reported}");
        let usage = daemon.ctl_json(&["usage", "router"]);
        assert_eq!(dec(usage["spent"].as_str().unwrap()), hold * dec(&(i + 1).to_string()), "{reported}: charged at its hold");
        assert_eq!(usage["estimated"], i + 1);
    }
    // A reply with no cost at all is priced from its tokens at OpenRouter's list prices.
    fake.script(|s| {
        s.report_cost = None;
        s.billed_cost = Some("0.000081");
        s.prompt_tokens = 12;
        s.completion_tokens = 3;
    });
    assert_eq!(post_openrouter(&daemon, &key, ROUTED).status, 200);
    let spent = daemon.spent("router");
    assert_eq!(spent, hold * dec("4") + dec("0.000081"), "12 × $3 + 3 × $15 per million");
    assert!(spent >= fake.bill());
    // A second grant with a huge report: totals across grants still add up, also after a restart.
    let other = daemon.grant("other", "5", &["--provider", "openrouter"]);
    fake.script(|s| s.report_cost = Some("79228162514264337593543950335"));
    assert_eq!(post_openrouter(&daemon, &other, ROUTED).status, 200);
    daemon.restart();
    let all = daemon.ctl_json(&["usage"]);
    assert_eq!(dec(all["spent"].as_str().unwrap()), hold * dec("5") + dec("0.000081"));
    assert!(daemon.log_text().contains("is not valid (usage.cost"), "each bad figure is logged");
}

#[test]
fn kill_9_with_openrouter_streams_in_flight_charges_every_one() {
    let (mut daemon, fake, key) = openrouter_setup("5");
    let body = r#"{"model":"anthropic/claude-sonnet-4.5","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    let hold = (dec(&(body.len() as u64 + 1024).to_string()) * dec("3") + dec("7500")) / dec("1000000");
    fake.script(|s| {
        s.report_cost = Some("0.002");
        s.hold_after_first_event = true;
    });
    let rt = runtime();
    let url = daemon.url("/openrouter/v1/chat/completions");
    for _ in 0..5 {
        let (url, key) = (url.clone(), key.clone());
        rt.spawn(async move { http::post_json(&url, &key, body).await });
    }
    wait_for("five in flight", Duration::from_secs(10), || {
        (fake.received().iter().filter(|r| r.method == "POST").count() == 5).then_some(())
    });
    // The lease that covers them, committed before their bodies went upstream.
    let listed = daemon.ctl_json(&["ls"]);
    let (held, lease) = (dec(listed[0]["reserved"].as_str().unwrap()), dec(listed[0]["lease"].as_str().unwrap()));
    assert_eq!(held, hold * dec("5"));
    assert!(lease >= held, "the lease {lease} covers the holds {held}");
    daemon.crash_and_restart();
    let usage = daemon.ctl_json(&["usage", "router"]);
    let spent = dec(usage["spent"].as_str().unwrap());
    assert_eq!(spent, lease, "the whole lease is charged, once");
    assert!(spent >= fake.bill(), "never less than was billed");
    assert!(spent - held <= lease, "over-charged by at most the lease: {}", spent - held);
    eprintln!("kill -9 with 5 OpenRouter streams in flight: held {held}, lease {lease}, charged {spent}, billed {}", fake.bill());
    assert_eq!(usage["estimated"], 1, "one interrupted entry for the lease");
    fake.release();
}

#[test]
fn input_given_by_reference_is_bounded_and_background_is_refused() {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    fake.set_price("gpt-5", "1.25", "0.125", "10.00");
    // Each request continues a long conversation held upstream: 50,000 tokens it does not carry.
    fake.script(|s| {
        s.prompt_tokens = 50_000;
        s.completion_tokens = 800;
        s.hold_after_first_event = true;
    });
    let key = daemon.grant("codex", "0.20", &["--provider", "openai"]);
    let body = r#"{"model":"gpt-5","previous_response_id":"resp_earlier","input":"go on","max_output_tokens":1000,"stream":true}"#;
    let rt = runtime();
    let url = daemon.url("/openai/v1/responses");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (url, key) = (url.clone(), key.clone());
            rt.spawn(async move { http::post_json(&url, &key, body).await })
        })
        .collect();
    wait_for("the admitted ones to be held", Duration::from_secs(10), || {
        (fake.received().iter().any(|r| r.path == "/v1/responses")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    fake.release();
    let statuses: Vec<u16> = tasks.into_iter().map(|t| rt.block_on(t).unwrap().status).collect();
    assert!(statuses.contains(&200) && statuses.contains(&429), "{statuses:?}");
    assert!(fake.bill() <= dec("0.20"), "billed {} against $0.20", fake.bill());
    assert_eq!(daemon.spent("codex"), fake.bill());
    assert!(fake.received().iter().any(|r| r.path == "/v1/responses/input_tokens"), "near the cap the input was counted");

    let background = rt.block_on(http::post_json(&url, &key, r#"{"model":"gpt-5","input":"hi","background":true}"#));
    assert_eq!(background.status, 400);
    assert!(background.error_message().contains("background responses"), "{}", background.text());
}

#[test]
fn token_counts_that_are_no_counts_are_never_metered_at_zero() {
    let (daemon, fake) = crate::metering::setup();
    let key = daemon.grant("script", "5", &["--provider", "openai"]);
    let body = r#"{"model":"test-model","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
    let hold = (dec(&(body.len() as u64 + 1024).to_string()) * dec("1.10") + dec("4400")) / dec("1000000");
    let rt = runtime();
    for (i, raw) in ["1e30", "150.0", "\"100\"", "-100", "100000000000000000000"].into_iter().enumerate() {
        fake.script(|s| s.raw_completion_tokens = Some(raw));
        assert_eq!(rt.block_on(http::post_json(&crate::metering::chat_url(&daemon), &key, body)).status, 200);
        let usage = daemon.ctl_json(&["usage", "script"]);
        assert_eq!(dec(usage["spent"].as_str().unwrap()), hold * dec(&(i + 1).to_string()), "{raw}: settled at its hold");
        assert_eq!(usage["estimated"], i + 1, "{raw}: marked estimated, never metered");
    }
    assert!(daemon.spent("script") >= fake.bill());
}

/// The real Claude Code on a $1.00 grant with default settings: its first request (about 124 KB,
/// `max_tokens` 64000) fits, fitted if need be, and it answers.
#[test]
fn the_real_claude_code_answers_on_a_one_dollar_grant() {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider("anthropic", &fake.base_url(), MASTER);
    let home = TempDir::new();
    // Its default model and the ones it routes to, at Opus-, Sonnet- and Haiku-like prices,
    // set on both sides (the daemon's table may not know the newest names yet).
    for (model, input, output) in [("claude-opus-4-8", "5", "25"), ("claude-sonnet-5", "3", "15"), ("claude-haiku-4-5", "1", "5")] {
        let price = FakePrice {
            input: dec(input),
            cached_input: dec(input) / dec("10"),
            cache_write_5m: dec(input) * dec("1.25"),
            cache_write_1h: dec(input) * dec("2"),
            output: dec(output),
            web_search_per_1k: dec("10"),
        };
        fake.set_full_price(model, price);
        let (w5, w1, cached) =
            ((dec(input) * dec("1.25")).to_string(), (dec(input) * dec("2")).to_string(), (dec(input) / dec("10")).to_string());
        daemon.ctl_ok(&[
            "price",
            "set",
            model,
            "--input",
            input,
            "--output",
            output,
            "--cached-input",
            &cached,
            "--cache-write",
            &w5,
            "--cache-write-1h",
            &w1,
        ]);
    }
    fake.script(|s| {
        s.prompt_tokens = 4000;
        s.cached_tokens = 20_000;
        s.completion_tokens = 400;
    });
    crate::consumers::ok(daemon.ctl_home(home.path(), &["grant", "claude", "1.00"]));
    let unset = ["CLAUDE_CONFIG_DIR", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_MODEL"];
    let Some((stdout, stderr)) = crate::consumers::run_agent("claude", &["-p", "say hello"], home.path(), &[], &unset) else { return };
    let calls = crate::consumers::calls(&fake);
    assert!(calls.iter().any(|c| c.starts_with("POST /v1/messages")), "claude called {calls:?}\nstdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("Hello from the fake"), "stdout: {stdout}\nstderr: {stderr}\ncalls: {calls:?}");
    let usage = daemon.ctl_json(&["usage", "claude"]);
    assert_eq!(dec(usage["spent"].as_str().unwrap()), fake.bill());
    assert!(fake.bill() <= dec("1"));
    let refused = usage["refused"].as_object().unwrap();
    for budget in ["would_exceed_cap", "cap_spent", "queue_timeout", "queue_full"] {
        assert!(!refused.contains_key(budget), "no request was refused for its budget: {refused:?}");
    }
}
