//! The audit log: one entry per control-plane change, in order, with who made it (user, uid,
//! pid), kept through `kill -9`, and never a master key or a whole virtual key.

use serde_json::Value;

use crate::metering::MASTER;
use crate::support::TempDir;
use crate::support::daemon::Daemon;
use crate::support::upstream::Fake;

fn actions(log: &Value) -> Vec<String> {
    log.as_array().unwrap().iter().map(|e| format!("{} {}", e["action"].as_str().unwrap(), e["target"].as_str().unwrap())).collect()
}

#[test]
fn every_change_is_logged_once_in_order_survives_kill_9_and_holds_no_secret() {
    let fake = Fake::openai();
    let mut daemon = Daemon::start();
    let home = TempDir::new();
    let out = daemon.ctl_stdin(&["key", "add", "openai"], MASTER);
    assert!(out.status.success());
    let anthropic_master = "sk-ant-api03-SECRETsecretSECRET0123456789";
    assert!(daemon.ctl_stdin(&["key", "add", "anthropic"], anthropic_master).status.success());
    daemon.ctl_ok(&["provider", "set", "openai", "--base-url", &fake.base_url()]);
    daemon.ctl_ok(&["provider", "add", "lab", "--base-url", "http://127.0.0.1:9/v1", "--price-zero"]);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--output", "4.40"]);
    let mut keys = vec![daemon.grant("evals", "5", &["--provider", "openai", "--note", "nightly evals"])];
    daemon.ctl_ok(&["set", "evals", "--cap", "7.50", "--rpm", "60"]);
    keys.push(daemon.ctl_json(&["rotate", "evals"])["key"].as_str().unwrap().to_string());
    let out = daemon.ctl_home(home.path(), &["grant", "claude", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let settings = std::fs::read_to_string(home.path().join(".claude/settings.json")).unwrap();
    keys.push(settings.split('"').find(|s| s.starts_with("sk-capit-")).unwrap().to_string());
    assert!(daemon.ctl_home(home.path(), &["uninstall", "claude"]).status.success());
    daemon.ctl_ok(&["revoke", "evals"]);
    daemon.ctl_ok(&["key", "rm", "anthropic"]);
    // Failed changes are not changes.
    daemon.ctl_err(&["revoke", "nosuch"]);
    daemon.ctl_err(&["set", "claude", "--alert", "0"]);

    let expected = [
        "key.add openai",
        "key.add anthropic",
        "provider.set openai",
        "provider.add lab",
        "price.set test-model",
        "grant.create evals",
        "grant.set evals",
        "grant.rotate evals",
        "grant.create claude",
        "grant.install claude",
        "grant.uninstall claude",
        "grant.revoke evals",
        "key.remove anthropic",
    ];
    let log = daemon.ctl_json(&["log"]);
    assert_eq!(actions(&log), expected);
    let entries = log.as_array().unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>());
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    for e in entries {
        assert_eq!(e["uid"], uid);
        assert!(e["pid"].as_u64().unwrap() > 0 && e["pid"].as_u64() != Some(daemon.pid() as u64), "the pid is the caller's: {e}");
        assert!(!e["user"].as_str().unwrap().is_empty());
    }
    let find = |action: &str| entries.iter().find(|e| e["action"] == action).unwrap()["detail"].as_str().unwrap().to_string();
    assert!(find("grant.set").contains("cap $5.00 -> $7.50") && find("grant.set").contains("rpm none -> 60"), "{}", find("grant.set"));
    assert!(find("grant.install").contains(".claude/settings.json"), "{}", find("grant.install"));
    assert!(find("grant.create").contains("note \"nightly evals\""), "{}", find("grant.create"));
    assert!(find("grant.rotate").contains(&format!("sk-capit-…{}", &keys[1][keys[1].len() - 4..])));

    let claude = daemon.ctl_json(&["log", "--grant", "claude"]);
    assert_eq!(actions(&claude), ["grant.create claude", "grant.install claude", "grant.uninstall claude"]);
    assert_eq!(daemon.ctl_json(&["log", "--since", "2999-01-01"]).as_array().unwrap().len(), 0);
    let text = daemon.ctl_ok(&["log"]);
    assert!(text.lines().next().unwrap().starts_with("TIME") && text.contains("grant.revoke"), "{text}");

    // kill -9 loses nothing that was acknowledged.
    daemon.crash_and_restart();
    assert_eq!(actions(&daemon.ctl_json(&["log"])), expected);
    daemon.ctl_ok(&["grant", "after", "1", "--provider", "openai", "--no-install"]);
    assert_eq!(daemon.ctl_json(&["log"]).as_array().unwrap().last().unwrap()["seq"], expected.len() as u64 + 1);

    let raw = std::fs::read_to_string(daemon.home.join("audit.log")).unwrap();
    assert_eq!(Daemon::mode(&daemon.home.join("audit.log")), 0o600);
    for secret in [MASTER, anthropic_master].iter().map(|s| s.to_string()).chain(keys.iter().cloned()) {
        assert!(!raw.contains(&secret) && !text.contains(&secret), "the audit log holds a secret");
        assert!(!raw.contains(&secret[..secret.len() - 4]), "the audit log holds most of a secret");
    }
}
