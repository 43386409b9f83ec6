//! capitctl's commands against the real daemon: the JSON contract, readable output, and clear
//! one-line errors that leave nothing half-made.

use crate::metering::{MASTER, setup};
use crate::support::daemon::Daemon;
use crate::support::upstream::Fake;

#[test]
fn grant_json_has_the_contract_fields() {
    let (daemon, _fake) = setup();
    let doc = daemon.ctl_json(&["grant", "evals", "5.00", "--provider", "openai", "--no-install", "--note", "weekly run"]);
    assert_eq!(doc["name"], "evals");
    assert_eq!(doc["provider"], "openai");
    let key = doc["key"].as_str().unwrap();
    assert!(key.starts_with("sk-capit-") && key.len() >= "sk-capit-".len() + 32, "{key}");
    assert!(key["sk-capit-".len()..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(doc["base_url"], format!("http://{}/openai/v1", daemon.proxy));
    assert_eq!(doc["cap"], "5.00");
    assert_eq!(doc["period"], "month");
    assert!(doc["expires_at"].is_null());
    assert_eq!(doc["note"], "weekly run");
    assert!(!doc["created_by"].as_str().unwrap().is_empty());
    assert_eq!(doc["exports"][1], format!("export OPENAI_API_KEY={key}"));

    let listed = daemon.ctl_json(&["ls"]);
    let row = &listed[0];
    for field in ["name", "provider", "cap", "spent", "period", "expires_at", "state"] {
        assert!(row.get(field).is_some(), "ls --json lacks {field}: {row}");
    }
    assert_eq!((row["spent"].as_str(), row["state"].as_str()), (Some("0"), Some("active")));
    assert!(!listed.to_string().contains(key), "ls never shows the key again");
    let usage = daemon.ctl_json(&["usage", "evals"]);
    for field in ["grant", "spent", "requests", "input_tokens", "output_tokens", "by_model"] {
        assert!(usage.get(field).is_some(), "usage --json lacks {field}: {usage}");
    }

    let text = daemon.ctl_ok(&["ls"]);
    assert!(text.contains("$0.00 / $5.00") && text.contains("weekly run"), "{text}");
    let text = daemon.ctl_ok(&["grant", "other", "2.5", "--provider", "openai", "--no-install", "--period", "week"]);
    assert!(text.contains("$2.50/week openai grant \"other\"") && text.contains("export OPENAI_BASE_URL="), "{text}");
}

#[test]
fn bad_grants_fail_with_one_line_and_create_nothing() {
    let (daemon, _fake) = setup();
    for (args, expect) in [
        (&["grant", "a", "abc", "--provider", "openai"][..], "cap"),
        (&["grant", "a", "-1", "--provider", "openai"], "cap"),
        (&["grant", "a", "5", "--provider", "nosuch"], "unknown provider"),
        (&["grant", "a", "5", "--provider", "openai", "--period", "hour"], "unknown period"),
        (&["grant", "a", "5", "--provider", "openai", "--expires", "soon"], "expiry"),
        (&["grant", "a", "5", "--provider", "openai", "--expires", "2020-01-01"], "future"),
        (&["grant", "bad name", "5", "--provider", "openai"], "grant name"),
    ] {
        let mut all = args.to_vec();
        all.push("--no-install");
        let err = daemon.ctl_err(&all);
        assert!(err.starts_with("capitctl: ") && err.contains(expect) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
    assert!(daemon.ctl_json(&["ls", "--all"]).as_array().unwrap().is_empty());
    daemon.grant("a", "5", &["--provider", "openai"]);
    let err = daemon.ctl_err(&["grant", "a", "5", "--provider", "openai", "--no-install"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(daemon.ctl_json(&["ls"]).as_array().unwrap().len(), 1);
}

#[test]
fn grant_asks_for_a_missing_master_key_and_stores_it() {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.ctl_ok(&["provider", "set", "openai", "--base-url", &fake.base_url()]);
    // No key stored and nothing on stdin: a clear error, and no grant.
    let err = daemon.ctl_err(&["grant", "codex", "5", "--no-install"]);
    assert!(err.contains("no master key is stored for openai"), "{err}");
    assert!(daemon.ctl_json(&["ls"]).as_array().unwrap().is_empty());
    // The key piped in: stored, and the grant made, in one command. codex speaks OpenAI.
    let out = daemon.ctl_stdin(&["grant", "codex", "5", "--no-install", "--json"], &format!("{MASTER}\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["provider"], "openai");
    assert_eq!(daemon.ctl_json(&["key", "ls"])[0]["fingerprint"], "sk-p…WXYZ");
}

#[test]
fn keys_are_added_from_stdin_listed_by_fingerprint_and_removed() {
    let daemon = Daemon::start();
    let out = daemon.ctl_stdin(&["key", "add", "anthropic"], "sk-ant-api03-secretsecretsecret-AbCd\n");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stored the anthropic key sk-a…AbCd, as text in the database (no keyring)");
    for (provider, input, expect) in [
        ("anthropic", "", "no key was given"),
        ("nosuch", "sk-x-1234567890abcdef", "unknown provider"),
        ("openai", "sk-capit-0123456789012345678901234567890123456789012", "virtual key"),
        ("openai", "two words", "spaces"),
    ] {
        let out = daemon.ctl_stdin(&["key", "add", provider], input);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{provider} {input:?}: {err}");
    }
    let keys = daemon.ctl_json(&["key", "ls"]);
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert!(!keys.to_string().contains("secretsecret"));
    daemon.ctl_ok(&["key", "rm", "anthropic"]);
    assert!(daemon.ctl_json(&["key", "ls"]).as_array().unwrap().is_empty());
    assert!(daemon.ctl_err(&["key", "rm", "anthropic"]).contains("no master key"));
}

#[test]
fn prices_are_listed_overridden_and_validated() {
    let daemon = Daemon::start();
    let prices = daemon.ctl_json(&["price", "ls"]);
    let mini = prices.as_array().unwrap().iter().find(|p| p["model"] == "gpt-5-mini").expect("gpt-5-mini is built in");
    assert_eq!((mini["input"].as_str(), mini["output"].as_str(), mini["source"].as_str()), (Some("0.25"), Some("2"), Some("builtin")));
    assert!(mini["checked"].is_string());
    let set = daemon.ctl_json(&["price", "set", "gpt-5-mini", "--input", "0.3", "--output", "2.5", "--cached-input", "0.03"]);
    assert_eq!(set["source"], "override");
    let prices = daemon.ctl_json(&["price", "ls"]);
    let mini = prices.as_array().unwrap().iter().find(|p| p["model"] == "gpt-5-mini").unwrap();
    assert_eq!((mini["input"].as_str(), mini["source"].as_str()), (Some("0.3"), Some("override")));
    for bad in [&["--input", "-1", "--output", "1"][..], &["--input", "x", "--output", "1"], &["--input", "1", "--output", "99999999"]] {
        let mut args = vec!["price", "set", "m"];
        args.extend_from_slice(bad);
        assert!(daemon.ctl_err(&args).contains("price"), "{bad:?}");
    }
    assert!(!daemon.ctl_json(&["price", "ls"]).to_string().contains("\"m\""));
    let text = daemon.ctl_ok(&["price", "ls"]);
    assert!(text.contains("gpt-5-mini") && text.contains("USD per million tokens"));
}

#[test]
fn providers_can_be_added_and_pointed_elsewhere() {
    let daemon = Daemon::start();
    let providers = daemon.ctl_json(&["provider", "ls"]);
    let names: Vec<&str> = providers.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["anthropic", "gemini", "openai", "openrouter"]);
    let added = daemon.ctl_json(&[
        "provider",
        "add",
        "ollama",
        "--kind",
        "openai-compatible",
        "--base-url",
        "http://127.0.0.1:11434/",
        "--price-zero",
    ]);
    assert_eq!((added["base_url"].as_str(), added["price_zero"].as_bool()), (Some("http://127.0.0.1:11434"), Some(true)));
    assert!(daemon.ctl_err(&["provider", "add", "ollama", "--base-url", "http://x"]).contains("already exists"));
    assert!(daemon.ctl_err(&["provider", "add", "Bad", "--base-url", "http://x"]).contains("provider name"));
    assert!(daemon.ctl_err(&["provider", "set", "openai", "--base-url", "ftp://x"]).contains("base URL"));
    assert!(daemon.ctl_err(&["provider", "set", "nosuch", "--base-url", "http://x"]).contains("unknown provider"));
    let grant = daemon.ctl_json(&["grant", "local", "1", "--provider", "ollama", "--no-install"]);
    assert_eq!(grant["base_url"], format!("http://{}/ollama/v1", daemon.proxy));
}

#[test]
fn status_and_usage_read_well() {
    let (daemon, _fake) = setup();
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["listen_addr"], daemon.proxy.to_string());
    assert_eq!(status["keys"], 1);
    let text = daemon.ctl_ok(&["status"]);
    assert!(text.contains(&format!("proxy on http://{}", daemon.proxy)), "{text}");
    daemon.grant("a", "1", &["--provider", "openai"]);
    let text = daemon.ctl_ok(&["usage", "a", "--by", "day"]);
    assert!(text.contains("grant \"a\": $0.00 in 0 requests"), "{text}");
    assert!(daemon.ctl_err(&["usage", "nosuch"]).contains("unknown grant"));
    assert!(daemon.ctl_err(&["revoke", "nosuch"]).contains("unknown grant"));
}

#[test]
fn a_litellm_price_file_is_imported_whole_or_not_at_all() {
    let daemon = Daemon::start();
    let good = daemon.dir.path().join("prices.json");
    std::fs::write(&good, r#"{
 "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
 "my-model": {"input_cost_per_token": 1.1e-06, "output_cost_per_token": 4.4e-06, "cache_read_input_token_cost": 2.75e-07, "mode": "chat", "max_output_tokens": 100000},
 "openai/other-model": {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06, "mode": "chat"},
 "an-image-model": {"input_cost_per_image": 0.04, "mode": "image_generation"}
}"#).unwrap();
    let out = daemon.ctl_json(&["price", "import", good.to_str().unwrap()]);
    assert_eq!((out["imported"].as_u64(), out["skipped"].as_u64()), (Some(3), Some(2)));
    let prices = daemon.ctl_json(&["price", "ls"]);
    let find = |m: &str| prices.as_array().unwrap().iter().find(|p| p["model"] == m).cloned();
    let mine = find("my-model").unwrap();
    assert_eq!((mine["input"].as_str(), mine["cached_input"].as_str(), mine["output"].as_str()), (Some("1.1"), Some("0.275"), Some("4.4")));
    assert!(find("other-model").is_some());

    let bad = daemon.dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"fine-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06, "mode": "chat"},
 "broken-model": {"input_cost_per_token": "lots", "output_cost_per_token": 1e-06, "mode": "chat"}}"#,
    )
    .unwrap();
    let err = daemon.ctl_err(&["price", "import", bad.to_str().unwrap()]);
    assert!(err.contains("broken-model"), "{err}");
    let prices = daemon.ctl_json(&["price", "ls"]).to_string();
    assert!(!prices.contains("fine-model"), "nothing from a bad file is imported");
    assert!(daemon.ctl_err(&["price", "import", "/nonexistent.json"]).contains("reading /nonexistent.json"));
}
