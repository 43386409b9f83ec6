//! Every limit kind refuses at its edge, in OpenAI's format, before anything goes upstream;
//! rate refusals carry `retry-after`. `set` changes limits in place and `rotate` swaps the key.

use std::time::Duration;

use ::http::Method;

use crate::metering::{chat_url, setup};
use crate::support::http::{self, post_json};
use crate::support::{dec, runtime, wait_for};

const BODY: &str = r#"{"model":"test-model","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn max_requests_counts_over_the_grant_s_life_and_survives_a_restart() {
    let (mut daemon, fake) = setup();
    let key = daemon.grant("till", "5", &["--provider", "openai", "--max-requests", "3"]);
    let rt = runtime();
    for _ in 0..2 {
        assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 200);
    }
    daemon.restart();
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 200);
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, BODY));
    assert_eq!(refused.status, 429);
    assert!(refused.error_message().contains("has used all 3 requests"), "{}", refused.text());
    assert_eq!(fake.billed_requests(), 3);
    assert_eq!(daemon.ctl_json(&["ls"])[0]["limits"]["max_requests"], 3);
    // `set` lifts the limit (0 removes it); the key and the spend stay.
    daemon.ctl_ok(&["set", "till", "--max-requests", "0"]);
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 200);
    assert_eq!(daemon.spent("till"), fake.bill());
}

#[test]
fn max_tokens_counts_settled_tokens_and_what_a_request_may_use() {
    let (daemon, fake) = setup();
    let key = daemon.grant("tokens", "5", &["--provider", "openai", "--max-tokens", "5000"]);
    fake.script(|s| {
        s.prompt_tokens = 1000;
        s.completion_tokens = 1000;
    });
    let rt = runtime();
    let codes: Vec<u16> = (0..3).map(|_| rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status).collect();
    assert_eq!(codes, [200, 200, 429]);
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, BODY));
    assert!(refused.error_message().contains("has used 4000 of its 5000 tokens"), "{}", refused.text());
}

#[test]
fn requests_and_tokens_per_minute_refuse_with_retry_after() {
    let (daemon, fake) = setup();
    let rt = runtime();
    let key = daemon.grant("rpm", "5", &["--provider", "openai", "--rpm", "2"]);
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 200);
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 200);
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, BODY));
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
    let retry: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(refused.error_message().contains(&format!("allows 2 requests per minute; try again in {retry} s")));

    fake.script(|s| {
        s.prompt_tokens = 400;
        s.completion_tokens = 200;
    });
    let key = daemon.grant("tpm", "5", &["--provider", "openai", "--tpm", "1000"]);
    let codes: Vec<u16> = (0..3).map(|_| rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status).collect();
    assert_eq!(codes, [200, 200, 429]);
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, BODY));
    assert!(refused.error_message().contains("allows 1000 tokens per minute"), "{}", refused.text());
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(fake.billed_requests(), 4);
}

#[test]
fn concurrency_limits_requests_in_flight() {
    let (daemon, fake) = setup();
    let key = daemon.grant("one", "5", &["--provider", "openai", "--concurrency", "1"]);
    fake.script(|s| s.hold_after_first_event = true);
    let rt = runtime();
    let stream = r#"{"model":"test-model","stream":true,"max_tokens":100,"messages":[]}"#;
    let (url, k) = (chat_url(&daemon), key.clone());
    let first = rt.spawn(async move { post_json(&url, &k, stream).await });
    wait_for("the first stream to be in flight", Duration::from_secs(10), || (fake.received().len() == 1).then_some(()));
    let second = rt.block_on(post_json(&chat_url(&daemon), &key, stream));
    assert_eq!(second.status, 429);
    assert_eq!(second.headers["retry-after"], "1");
    assert!(second.error_message().contains("allows 1 requests at once"));
    fake.release();
    assert_eq!(rt.block_on(first).unwrap().status, 200);
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, stream)).status, 200);
    assert_eq!(fake.received().len(), 2);
}

#[test]
fn set_changes_limits_in_place_and_rotate_swaps_the_key() {
    let (daemon, fake) = setup();
    let key = daemon.grant("agent", "0.003", &["--provider", "openai", "--models", "test-model", "--fit", "false"]);
    let rt = runtime();
    fake.script(|s| {
        s.prompt_tokens = 1000;
        s.completion_tokens = 0;
    });
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, BODY));
    assert_eq!(refused.status, 429, "the bound ($0.0056) does not fit $0.003");
    let set =
        daemon.ctl_json(&["set", "agent", "--cap", "1", "--period", "week", "--expires", "30d", "--note", "more room", "--rpm", "100"]);
    assert_eq!((set["cap"].as_str(), set["period"].as_str(), set["note"].as_str()), (Some("1.00"), Some("week"), Some("more room")));
    assert_eq!(set["limits"]["rpm"], 100);
    assert!(set["expires_at"].is_string());
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 200);
    let set = daemon.ctl_json(&["set", "agent", "--expires", "never", "--models", ""]);
    assert!(set["expires_at"].is_null());
    assert_eq!(set["models"], serde_json::json!([]));
    assert!(daemon.ctl_err(&["set", "agent"]).contains("nothing to change"));
    assert!(daemon.ctl_err(&["set", "nosuch", "--cap", "1"]).contains("unknown grant"));
    assert!(daemon.ctl_err(&["set", "agent", "--cap", "-5"]).contains("cap"));

    let rotated = daemon.ctl_json(&["rotate", "agent"]);
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, BODY)).status, 401, "the old key is dead");
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &new_key, BODY)).status, 200);
    assert_eq!(daemon.spent("agent"), fake.bill(), "spend carries over to the new key");
    assert_eq!(dec(rotated["spent"].as_str().unwrap()), dec("0.0011"));
    let auth = format!("Bearer {new_key}");
    assert_eq!(rt.block_on(http::send(Method::GET, &daemon.url("/openai/v1/models"), &[("authorization", &auth)], "")).status, 200);
}

#[test]
fn fit_lowers_max_output_to_what_is_left_instead_of_refusing() {
    let (daemon, fake) = setup();
    // test-model has no max output in its user-set price: a request without a limit may cost
    // 128,000 × $4.40 per million, far above a $0.01 cap.
    let plain = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;
    let rt = runtime();
    let strict = daemon.grant("strict", "0.01", &["--provider", "openai", "--fit", "false"]);
    let refused = rt.block_on(post_json(&chat_url(&daemon), &strict, plain));
    assert_eq!(refused.status, 429);
    assert!(refused.error_message().contains("this request could cost up to $0.56"), "{}", refused.text());
    assert_eq!(daemon.ctl_json(&["ls"]).as_array().unwrap().iter().find(|g| g["name"] == "strict").unwrap()["limits"]["fit"], false);

    // Fitting is the default.
    let key = daemon.grant("fit", "0.01", &["--provider", "openai"]);
    assert_eq!(daemon.ctl_json(&["ls"]).as_array().unwrap().iter().find(|g| g["name"] == "fit").unwrap()["limits"]["fit"], true);
    let reply = rt.block_on(post_json(&chat_url(&daemon), &key, plain));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let fitted: u64 = reply.headers["x-capit-max-output-tokens"].to_str().unwrap().parse().unwrap();
    let sent = fake.received().last().unwrap().json();
    assert_eq!(sent["max_completion_tokens"].as_u64(), Some(fitted));
    assert_eq!(sent["messages"][0]["content"], "hi", "the rest of the body is kept");
    // What is left of $0.01 after (bytes + 1024) input tokens at $1.10, at $4.40 per output token.
    let input = dec(&(plain.len() as u64 + 1024).to_string()) * dec("0.0000011");
    let expected = ((dec("0.01") - input) / dec("0.0000044")).floor();
    assert_eq!(dec(&fitted.to_string()), expected);

    // When not even 256 output tokens fit, the request is refused at once, saying so.
    fake.script(|s| {
        s.prompt_tokens = 1000;
        s.completion_tokens = 1900;
    });
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, plain)).status, 200);
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, plain));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.error_message().contains("even with its output lowered to 256 tokens"), "{}", refused.text());
    assert!(daemon.spent("fit") <= dec("0.01"));
    daemon.ctl_ok(&["set", "fit", "--fit", "false"]);
    assert_eq!(daemon.ctl_json(&["ls"]).as_array().unwrap().iter().find(|g| g["name"] == "fit").unwrap()["limits"]["fit"], false);
}
