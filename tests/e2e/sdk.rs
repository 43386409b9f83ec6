//! The official openai Python SDK, pointed at `grant --json`'s base_url with its key, works for
//! plain and streamed chat completions, and the ledger equals the upstream's bill.
//!
//! CI installs the SDK and sets CAPIT_REQUIRE_SDKS=1, so there the test cannot pass without it.

use std::process::Command;

use crate::metering::setup;

fn have_python_module(module: &str) -> bool {
    Command::new("python3").args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_official_openai_python_sdk_works_through_the_proxy() {
    if !have_python_module("openai") {
        assert!(std::env::var_os("CAPIT_REQUIRE_SDKS").is_none(), "CAPIT_REQUIRE_SDKS is set but python3 cannot import openai");
        eprintln!("skipped: python3 cannot import openai (pip install openai); CI requires it");
        return;
    }
    let (daemon, fake) = setup();
    let grant = daemon.ctl_json(&["grant", "sdk", "5.00", "--provider", "openai", "--no-install", "--models", "test-model"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/sdk_openai.py");
    let out = Command::new("python3")
        .arg(script)
        .env("CAPIT_BASE_URL", grant["base_url"].as_str().unwrap())
        .env("CAPIT_KEY", grant["key"].as_str().unwrap())
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "the SDK script failed: {}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["plain_text"], "Hello from the fake");
    assert_eq!(seen["plain_prompt_tokens"], 12);
    assert_eq!(seen["stream_text"], "Hello from the fake");
    assert_eq!(seen["stream_chunks_without_choices"], 0, "the injected usage chunk is hidden");
    assert_eq!(seen["stream_usage_completion_tokens"], 3);
    assert_eq!(seen["refusal_status"], 403);
    assert!(seen["refusal_message"].as_str().unwrap().contains("may not use model \"not-allowed\""));
    assert_eq!(fake.billed_requests(), 3);
    assert_eq!(daemon.spent("sdk"), fake.bill());
}
