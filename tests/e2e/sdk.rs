//! The official Python SDKs (openai, anthropic, google-genai), pointed at `grant --json`'s
//! base_url with its key, work for plain and streamed calls of each API, and each grant's
//! ledger equals the fake upstream's bill.
//!
//! CI installs the SDKs and sets CAPIT_REQUIRE_SDKS=1, so there these tests cannot pass without
//! them; elsewhere a missing SDK skips its test with a message.

use std::process::Command;

use serde_json::Value;

use crate::metering::MASTER;
use crate::support::daemon::Daemon;
use crate::support::dec;
use crate::support::upstream::{Fake, FakePrice};

fn have_python_module(module: &str) -> bool {
    let ok = Command::new("python3").args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CAPIT_REQUIRE_SDKS").is_none(), "CAPIT_REQUIRE_SDKS is set but python3 cannot import {module}");
        eprintln!("skipped: python3 cannot import {module} (pip install it); CI requires it");
    }
    ok
}

/// Runs `tests/e2e/sdk/<script>` against the grant and returns what it printed.
fn run_script(script: &str, grant: &Value) -> Value {
    let path = format!("{}/tests/e2e/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(path)
        .env("CAPIT_BASE_URL", grant["base_url"].as_str().unwrap())
        .env("CAPIT_KEY", grant["key"].as_str().unwrap())
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("GEMINI_API_KEY")
        .env_remove("GOOGLE_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_official_openai_python_sdk_works_through_the_proxy() {
    if !have_python_module("openai") {
        return;
    }
    let (daemon, fake) = crate::metering::setup();
    let grant = daemon.ctl_json(&["grant", "sdk", "5.00", "--provider", "openai", "--no-install", "--models", "test-model"]);
    let seen = run_script("openai_sdk.py", &grant);
    assert_eq!(seen["plain_text"], "Hello from the fake");
    assert_eq!(seen["plain_prompt_tokens"], 12);
    assert_eq!(seen["stream_text"], "Hello from the fake");
    assert_eq!(seen["stream_chunks_without_choices"], 0, "the injected usage chunk is hidden");
    assert_eq!(seen["stream_usage_completion_tokens"], 3);
    assert_eq!(seen["refusal_status"], 403);
    assert!(seen["refusal_message"].as_str().unwrap().contains("may not use model \"not-allowed\""));
    assert_eq!(seen["responses_text"], "Hello from the fake");
    assert_eq!(seen["responses_output_tokens"], 3);
    assert_eq!(seen["responses_stream_output_tokens"], 3);
    assert_eq!(seen["embedding_prompt_tokens"], 12);
    assert_eq!(fake.billed_requests(), 6);
    assert_eq!(daemon.spent("sdk"), fake.bill());
}

#[test]
fn the_official_anthropic_python_sdk_works_through_the_proxy() {
    if !have_python_module("anthropic") {
        return;
    }
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider("anthropic", &fake.base_url(), MASTER);
    let price = FakePrice {
        input: dec("1"),
        cached_input: dec("0.1"),
        cache_write_5m: dec("1.25"),
        cache_write_1h: dec("2"),
        output: dec("5"),
        web_search_per_1k: dec("10"),
    };
    fake.set_full_price("claude-haiku-4-5", price);
    fake.script(|s| {
        s.cached_tokens = 2000;
        s.cache_write_5m = 300;
        s.completion_tokens = 42;
    });
    let grant = daemon.ctl_json(&["grant", "claude", "5.00", "--no-install"]);
    assert_eq!(grant["provider"], "anthropic");
    assert_eq!(grant["base_url"], format!("http://{}/anthropic", daemon.proxy));
    let seen = run_script("anthropic_sdk.py", &grant);
    assert_eq!(seen["plain_text"], "Hello from the fake");
    assert_eq!(seen["plain_output_tokens"], 42);
    assert_eq!(seen["stream_text"], "Hello from the fake");
    assert_eq!(seen["stream_output_tokens"], 42);
    assert_eq!(seen["bearer_text"], "Hello from the fake");
    // The free count is all the input the reply bills: 12 plain, 2,000 cached, 300 written.
    assert_eq!(seen["count_input_tokens"], 2312);
    assert_eq!(seen["refusal_status"], 401);
    assert_eq!(fake.billed_requests(), 3);
    assert_eq!(daemon.spent("claude"), fake.bill());
}

#[test]
fn the_official_google_genai_python_sdk_works_through_the_proxy() {
    if !have_python_module("google.genai") {
        return;
    }
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider("gemini", &fake.base_url(), MASTER);
    fake.set_price("gemini-2.5-flash", "0.30", "0.03", "2.50");
    fake.script(|s| {
        s.prompt_tokens = 500;
        s.cached_tokens = 100;
        s.completion_tokens = 20;
        s.reasoning_tokens = 77;
    });
    let grant = daemon.ctl_json(&["grant", "gemini", "5.00", "--no-install"]);
    assert_eq!(grant["base_url"], format!("http://{}/gemini", daemon.proxy));
    let seen = run_script("genai_sdk.py", &grant);
    assert_eq!(seen["plain_text"], "Hello from the fake");
    assert_eq!(seen["plain_thoughts"], 77);
    assert_eq!(seen["stream_text"], "Hello from the fake");
    assert_eq!(seen["stream_candidates"], 20);
    assert_eq!(seen["v1_text"], "Hello from the fake");
    assert_eq!(seen["count_total_tokens"], 500);
    assert!(seen["refusal_status"].as_u64().is_some_and(|s| s == 401), "{seen}");
    assert_eq!(fake.billed_requests(), 3);
    assert_eq!(daemon.spent("gemini"), fake.bill());
}
