//! `capitctl price update` fetches a price list (LiteLLM's format) from a URL, here a local
//! HTTP server, and puts it in place of the last one whole or not at all; `price ls` says where
//! each price came from and when; the user's own prices stay on top.

use ::http::Method;

use crate::metering::MASTER;
use crate::support::daemon::Daemon;
use crate::support::files::{Document, FileServer};
use crate::support::upstream::Fake;
use crate::support::{http, runtime};

const LIST: &str = r#"{
 "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "mode": "one of: chat, embedding"},
 "fresh-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "cache_read_input_token_cost": 1e-07, "litellm_provider": "openai", "mode": "chat", "max_output_tokens": 32000},
 "openai/other-fresh-model": {"input_cost_per_token": 4e-07, "output_cost_per_token": 1.6e-06, "mode": "chat"},
 "gpt-5-mini": {"input_cost_per_token": 2.5e-07, "output_cost_per_token": 2e-06, "cache_read_input_token_cost": 2.5e-08, "mode": "chat", "max_output_tokens": 128000, "max_input_tokens": 272000},
 "dall-e-3": {"input_cost_per_pixel": 1e-08, "mode": "image_generation"}
}"#;

const NEWER: &str = r#"{
 "fresh-model": {"input_cost_per_token": 3e-06, "output_cost_per_token": 4e-06, "mode": "chat", "max_output_tokens": 32000},
 "gpt-5-mini": {"input_cost_per_token": 2.5e-07, "output_cost_per_token": 2e-06, "cache_read_input_token_cost": 2.5e-08, "mode": "chat", "max_output_tokens": 128000, "max_input_tokens": 272000}
}"#;

const BROKEN: &str = r#"{
 "fine-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06, "mode": "chat"},
 "broken-model": {"input_cost_per_token": "lots", "output_cost_per_token": 1e-06, "mode": "chat"}
}"#;

#[test]
fn a_price_list_is_fetched_applied_whole_and_shown_with_its_source() {
    let files = FileServer::start(vec![
        Document::redirect("/latest.json", "/lists/v1.json"),
        Document::ok("/lists/v1.json", LIST),
        Document::ok("/lists/v2.json", NEWER),
        Document::ok("/lists/broken.json", BROKEN),
    ]);
    let fake = Fake::openai();
    fake.set_price("fresh-model", "1", "0.1", "2");
    let daemon = Daemon::start();
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    let key = daemon.grant("script", "5", &["--provider", "openai"]);
    let chat = |model: &str| {
        let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        runtime().block_on(http::send(
            Method::POST,
            &daemon.url("/openai/v1/chat/completions"),
            &[("authorization", &format!("Bearer {key}"))],
            body,
        ))
    };
    assert_eq!(chat("fresh-model").status, 400, "no price yet: refused, and nothing goes upstream");
    assert!(fake.received().is_empty());

    let update = daemon.ctl_json(&["price", "update", "--from", &files.url("/latest.json")]);
    assert_eq!((update["imported"].as_u64(), update["skipped"].as_u64()), (Some(4), Some(2)), "{update}");
    let added: Vec<&str> = update["added"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert!(added.contains(&"fresh-model") && added.contains(&"other-fresh-model"), "{update}");
    assert!(update["changed"].as_array().unwrap().is_empty(), "gpt-5-mini's price is the same as the built-in one: {update}");

    let prices = daemon.ctl_json(&["price", "ls"]);
    let find = |m: &str| prices.as_array().unwrap().iter().find(|p| p["model"] == m).cloned().unwrap();
    let fresh = find("fresh-model");
    assert_eq!((fresh["input"].as_str(), fresh["source"].as_str()), (Some("1"), Some("list")));
    assert_eq!(fresh["origin"].as_str(), Some(files.url("/latest.json").as_str()));
    assert_eq!(fresh["checked"].as_str(), Some(chrono::Utc::now().format("%Y-%m-%d").to_string().as_str()), "when it was fetched");
    assert_eq!(find("gpt-5").get("source").and_then(|s| s.as_str()), Some("builtin"));
    let table = daemon.ctl_ok(&["price", "ls"]);
    assert!(table.contains(&format!("price list: {}, fetched", files.url("/latest.json"))), "{table}");

    let reply = chat("fresh-model");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("script"), fake.bill(), "metered at the fetched price");

    // The user's own price stays on top of any list.
    daemon.ctl_ok(&["price", "set", "other-fresh-model", "--input", "9", "--output", "9"]);
    let text = daemon.ctl_ok(&["price", "update", "--from", &files.url("/lists/v2.json")]);
    assert!(text.contains("fresh-model: $1 in / $2 out -> $3 in / $4 out"), "what changed: {text}");
    assert!(!text.contains("  other-fresh-model:"), "the user's own price did not move: {text}");
    assert!(text.contains("openai/other-fresh-model: $0.4 in / $1.6 out -> no price"), "a model the new list lacks: {text}");
    let prices = daemon.ctl_json(&["price", "ls"]);
    let find = |m: &str| prices.as_array().unwrap().iter().find(|p| p["model"] == m).cloned();
    assert_eq!(find("other-fresh-model").unwrap()["source"], "override");
    assert_eq!(find("other-fresh-model").unwrap()["origin"], "price set");
    assert_eq!(find("fresh-model").unwrap()["input"], "3");

    // All or nothing: a list with one bad entry changes nothing; so does a missing one.
    let err = daemon.ctl_err(&["price", "update", "--from", &files.url("/lists/broken.json")]);
    assert!(err.contains("broken-model") && err.trim_end().lines().count() == 1, "{err}");
    let err = daemon.ctl_err(&["price", "update", "--from", &files.url("/lists/missing.json")]);
    assert!(err.contains("404"), "{err}");
    assert!(daemon.ctl_err(&["price", "update", "--from", "ftp://example.org/x.json"]).contains("not an http or https URL"));
    let prices = daemon.ctl_json(&["price", "ls"]).to_string();
    assert!(!prices.contains("fine-model") && prices.contains("fresh-model"), "the last good list stays");

    // It survives a restart, source and all.
    let mut daemon = daemon;
    daemon.restart();
    let prices = daemon.ctl_json(&["price", "ls"]);
    let fresh = prices.as_array().unwrap().iter().find(|p| p["model"] == "fresh-model").unwrap();
    assert_eq!((fresh["input"].as_str(), fresh["origin"].as_str()), (Some("3"), Some(files.url("/lists/v2.json").as_str())));
    assert!(files.served() >= 5);
}
