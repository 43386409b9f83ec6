//! Every refusal answers in OpenAI's error format with a readable message and a fitting status,
//! and a refused request never reaches the upstream.

use std::time::Duration;

use rust_decimal::Decimal;

use ::http::Method;

use crate::metering::{chat_url, setup};
use crate::support::daemon::Daemon;
use crate::support::http::{self, post_json};
use crate::support::upstream::Fake;
use crate::support::{dec, runtime, wait_for};

const PLAIN: &str = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn bad_keys_are_refused_with_401() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    let url = chat_url(&daemon);
    let none = rt.block_on(http::send(Method::POST, &url, &[], PLAIN));
    assert_eq!(none.status, 401);
    assert!(none.error_message().contains("no key"), "{}", none.text());
    let wrong = rt.block_on(post_json(&url, "sk-capit-0000000000000000000000000000000000000000000", PLAIN));
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    let master = rt.block_on(post_json(&url, crate::metering::MASTER, PLAIN));
    assert_eq!(master.status, 401, "the master key itself does not open the proxy");
    // x-api-key works as well as Bearer.
    let via_header = rt.block_on(http::send(Method::POST, &url, &[("x-api-key", &key)], PLAIN));
    assert_eq!(via_header.status, 200);
    assert_eq!(fake.received().len(), 1);

    daemon.ctl_ok(&["revoke", "script"]);
    let revoked = rt.block_on(post_json(&url, &key, PLAIN));
    assert_eq!(revoked.status, 401);
    assert_eq!(fake.received().len(), 1, "refused requests never reach the upstream");
    let listed = daemon.ctl_json(&["ls", "--all"]);
    assert_eq!(listed[0]["state"], "revoked");
    assert!(daemon.ctl_json(&["ls"]).as_array().unwrap().is_empty());
}

#[test]
fn an_expired_grant_is_refused() {
    let (daemon, fake) = setup();
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let key = daemon.grant("script", "5.00", &["--provider", "openai", "--expires", &expires.to_rfc3339()]);
    let rt = runtime();
    let url = chat_url(&daemon);
    assert_eq!(rt.block_on(post_json(&url, &key, PLAIN)).status, 200);
    let reply = wait_for("the grant to expire", Duration::from_secs(10), || {
        let reply = rt.block_on(post_json(&url, &key, PLAIN));
        (reply.status != 200).then_some(reply)
    });
    assert_eq!(reply.status, 401);
    assert!(reply.error_message().contains("expired"), "{}", reply.text());
    assert_eq!(daemon.ctl_json(&["ls"])[0]["state"], "expired");
    let billed = fake.billed_requests();
    assert_eq!(rt.block_on(post_json(&url, &key, PLAIN)).status, 401);
    assert_eq!(fake.billed_requests(), billed);
}

#[test]
fn models_outside_the_grant_are_refused_with_403() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai", "--models", "test-model,gpt-5-mini"]);
    let rt = runtime();
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, r#"{"model":"gpt-5","messages":[]}"#));
    assert_eq!(reply.status, 403);
    let message = reply.error_message();
    assert!(message.contains("gpt-5") && message.contains("test-model, gpt-5-mini"), "{message}");
    assert!(fake.received().is_empty());
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN)).status, 200);
}

#[test]
fn a_spent_budget_is_refused_with_429_naming_spent_cap_and_reset() {
    let (daemon, fake) = setup();
    // Each request costs 1000 × 1.10 + 1000 × 4.40 per million = $0.0055, and may cost at most
    // (body bytes + 1024) × 1.10 + 1000 × 4.40 per million, about $0.0056: three fit in $0.02.
    let key = daemon.grant("script", "0.02", &["--provider", "openai", "--period", "day", "--fit", "false"]);
    fake.script(|s| {
        s.prompt_tokens = 1000;
        s.completion_tokens = 1000;
    });
    let body = r#"{"model":"test-model","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
    let rt = runtime();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(rt.block_on(post_json(&chat_url(&daemon), &key, body)));
    }
    let codes: Vec<u16> = statuses.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    let message = statuses[3].error_message();
    assert!(message.contains("has $0.0035 left of its $0.02 daily cap and this request could cost up to $0.0056"), "{message}");
    assert!(message.contains("; it resets on"), "{message}");
    assert_eq!(statuses[3].json()["error"]["type"], "insufficient_quota");
    assert_eq!(fake.billed_requests(), 3);
    assert_eq!(daemon.spent("script"), fake.bill());
    assert!(fake.bill() <= dec("0.02"));
    let listed = daemon.ctl_json(&["ls"]);
    assert!(listed[0]["resets_at"].is_string());

    // Requests that cost exactly their bound spend the cap exactly, and the grant reads
    // "exhausted". At $1 per million tokens the bound is (body bytes + 1024 + 1000) micro-dollars.
    daemon.ctl_ok(&["price", "set", "round-model", "--input", "1", "--output", "1"]);
    fake.set_price("round-model", "1", "1", "1");
    let round = r#"{"model":"round-model","max_tokens":1000,"messages":[]}"#;
    let bound_tokens = round.len() as u64 + 1024 + 1000;
    fake.script(|s| {
        s.prompt_tokens = round.len() as u64 + 1024;
        s.completion_tokens = 1000;
    });
    let cap = format!("0.{:06}", 2 * bound_tokens);
    let exact = daemon.grant("exact", &cap, &["--provider", "openai", "--fit", "false"]);
    for _ in 0..2 {
        assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &exact, round)).status, 200);
    }
    let refused = rt.block_on(post_json(&chat_url(&daemon), &exact, round));
    let spent = format!("${}", dec(&cap).normalize());
    assert!(refused.error_message().contains(&format!("has spent {spent} of its {spent} monthly cap")), "{}", refused.text());
    assert_eq!(daemon.ctl_json(&["ls"]).as_array().unwrap().iter().find(|g| g["name"] == "exact").unwrap()["state"], "exhausted");
}

#[test]
fn unknown_prices_paths_and_providers_are_refused() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];

    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, r#"{"model":"mystery-model-9","messages":[]}"#));
    assert_eq!(reply.status, 400);
    let message = reply.error_message();
    assert!(message.contains("mystery-model-9"), "{}", reply.text());
    for way in ["capitctl price update", "capitctl price set mystery-model-9", "capitctl price import"] {
        assert!(message.contains(way), "the refusal names {way}: {message}");
    }

    let reply = rt.block_on(http::send(Method::POST, &daemon.url("/openai/v1/images/generations"), &headers, "{}"));
    assert_eq!(reply.status, 403);
    assert!(reply.error_message().contains("not an API capit meters"));

    let reply = rt.block_on(http::send(Method::POST, &daemon.url("/nowhere/v1/chat/completions"), &headers, PLAIN));
    assert_eq!(reply.status, 404);
    assert!(reply.error_message().contains("unknown provider \"nowhere\""));

    let reply = rt.block_on(http::send(Method::POST, &daemon.url("/openrouter/v1/chat/completions"), &headers, PLAIN));
    assert_eq!(reply.status, 403, "a grant works only for its own provider: {}", reply.text());

    assert!(fake.received().is_empty());
}

#[test]
fn malformed_bodies_are_refused_with_400_and_huge_ones_with_413() {
    let fake = Fake::openai();
    let daemon = Daemon::start_with(&["--max-body-mib", "1"]);
    daemon.setup_provider("openai", &fake.base_url(), crate::metering::MASTER);
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    let url = chat_url(&daemon);
    let bad = rt.block_on(post_json(&url, &key, r#"{"model":"gpt-5","messages":["#));
    assert_eq!(bad.status, 400);
    assert!(bad.error_message().contains("not valid JSON"));
    let missing = rt.block_on(post_json(&url, &key, r#"{"messages":[]}"#));
    assert_eq!(missing.status, 400);
    assert!(missing.error_message().contains("model"));
    let big = format!(r#"{{"model":"gpt-5","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(2 * 1024 * 1024));
    let huge = rt.block_on(post_json(&url, &key, &big));
    assert_eq!(huge.status, 413);
    assert!(fake.received().is_empty());
    assert_eq!(daemon.ctl_json(&["usage", "script"])["requests"], 0);
}

#[test]
fn an_unreachable_upstream_is_502_and_a_silent_one_504() {
    let (daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    let rt = runtime();
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    daemon.ctl_ok(&["provider", "set", "openai", "--base-url", &format!("http://{closed}")]);
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
    assert_eq!(reply.status, 502);
    assert!(reply.error_message().contains("could not reach openai"), "{}", reply.text());
    assert_eq!(daemon.spent("script"), dec("0"));
    drop((daemon, fake));

    let fake = Fake::openai();
    let daemon = Daemon::start_with(&["--upstream-timeout", "1"]);
    daemon.setup_provider("openai", &fake.base_url(), crate::metering::MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1", "--output", "1"]);
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| s.head_delay = Duration::from_secs(3));
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
    assert_eq!(reply.status, 504);
    assert!(reply.error_message().contains("did not answer within 1 s"), "{}", reply.text());
}

/// 40 streams at once against a cap that fits 10 at their most: 10 are admitted, the other 30
/// wait for them instead of being refused, and as holds settle the rest go through (fitted when
/// what is left is small) until what is left cannot pay for a request even with nothing in
/// flight. The upstream's bill never passes the cap and the ledger equals it.
fn forty_streams_against_a_cap_that_fits_ten(output_at_limit: bool) -> (Decimal, Decimal, usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (daemon, fake) = setup();
    let body = r#"{"model":"test-model","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    // The most each request can cost: (body bytes + 1024 hidden) × $1.10 + 500 × $4.40 per million.
    let bound = (dec(&(body.len() as u64 + 1024).to_string()) * dec("1.10") + dec("2200")) / dec("1000000");
    let cap = (bound * dec("10.5")).round_dp_with_strategy(6, rust_decimal::RoundingStrategy::ToZero);
    let key = daemon.grant("swarm", &cap.to_string(), &["--provider", "openai"]);
    fake.script(|s| {
        // The most input the bound allows, and (when asked) the most output the request allows.
        s.prompt_tokens = if output_at_limit { body.len() as u64 + 1024 } else { 1000 };
        s.completion_tokens = 500;
        s.output_at_limit = output_at_limit;
        s.hold_after_first_event = true;
    });
    let rt = runtime();
    let url = chat_url(&daemon);
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (url, key, done) = (url.clone(), key.clone(), done.clone());
            rt.spawn(async move {
                let reply = post_json(&url, &key, body).await;
                done.fetch_add(1, Ordering::SeqCst);
                reply
            })
        })
        .collect();
    // Ten are held at the upstream at once; the other thirty wait in capit rather than fail.
    wait_for("ten requests in flight", Duration::from_secs(30), || (fake.received().len() == 10).then_some(()));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.received().len(), 10, "exactly as many as fit at their most were admitted");
    assert_eq!(done.load(Ordering::SeqCst), 0, "nobody was refused while only holds in flight were in the way");
    let held = dec(daemon.ctl_json(&["ls"])[0]["reserved"].as_str().unwrap());
    assert_eq!(held, bound * dec("10"));
    fake.release();
    let replies: Vec<_> = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + refused.len(), 40, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    if output_at_limit {
        // Each cost all its hold: what is left after ten (half a hold) pays for no request.
        assert_eq!(ok, 10);
    } else {
        assert!(ok > 10, "requests went through as holds settled: {ok}");
    }
    for r in &refused {
        let message = r.error_message();
        assert!(
            message.contains("even with its output lowered to") || message.contains("has spent"),
            "refused only when nothing could pay: {message}"
        );
    }
    assert!(fake.bill() <= cap, "the upstream billed {} against a cap of {cap}", fake.bill());
    assert_eq!(fake.billed_requests(), ok);
    assert_eq!(daemon.spent("swarm"), fake.bill());
    (fake.bill(), cap, ok)
}

#[test]
fn forty_concurrent_streams_never_take_the_bill_past_the_cap() {
    let (bill, cap, ok) = forty_streams_against_a_cap_that_fits_ten(false);
    eprintln!("40 streams, cap fits 10: {ok} served, bill {bill} of {cap}");
}

#[test]
fn forty_streams_that_each_use_all_they_may_never_pass_the_cap() {
    let (bill, cap, ok) = forty_streams_against_a_cap_that_fits_ten(true);
    eprintln!("40 streams at their limit, cap fits 10: {ok} served, bill {bill} of {cap}, overshoot {}", (bill - cap).max(Decimal::ZERO));
}
