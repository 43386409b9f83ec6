//! Alerts: crossing a threshold of a grant's cap runs `capitd --on-alert CMD` with the grant,
//! percent, spent and cap in its environment, shows in `watch` and in the log, and fires once
//! per threshold per period, a restart included. (Period turnover: `events` unit tests, on the
//! daemon's injected clock.)

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::metering::{MASTER, chat_url};
use crate::support::daemon::{CAPITCTL, Daemon};
use crate::support::http::post_json;
use crate::support::upstream::Fake;
use crate::support::{runtime, wait_for};

#[test]
fn each_threshold_runs_the_hook_once_per_period_with_the_alert_in_its_environment() {
    let fake = Fake::openai();
    let dir = crate::support::TempDir::new();
    let fired = dir.path().join("fired");
    let hook = format!(
        r#"printf '%s %s %s %s %s %s\n' "$CAPIT_GRANT" "$CAPIT_PERCENT" "$CAPIT_SPENT" "$CAPIT_CAP" "$CAPIT_PERIOD" "$CAPIT_PROVIDER" >> {}"#,
        fired.display()
    );
    let mut daemon = Daemon::start_logging(&["--on-alert", &hook, "--notify-command", "none"], "info");
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    // $1 per thousand output tokens, nothing for input: a request's cost is its output.
    daemon.ctl_ok(&["price", "set", "alert-model", "--input", "0", "--output", "1000"]);
    fake.set_price("alert-model", "0", "0", "1000");
    let key = daemon.grant("a", "1", &["--provider", "openai", "--alert", "50,80,100"]);
    assert_eq!(daemon.ctl_json(&["ls"])[0]["alerts"], serde_json::json!([50, 80, 100]));

    let mut watch = Command::new(CAPITCTL)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the watcher", Duration::from_secs(20), || (daemon.ctl_json(&["status"])["watchers"] == 1).then_some(()));

    let rt = runtime();
    let url = chat_url(&daemon); // the same after a restart
    let ask = |max_tokens: u64, completion: u64| {
        fake.script(|s| {
            s.prompt_tokens = 10;
            s.completion_tokens = completion;
        });
        let body = format!(r#"{{"model":"alert-model","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#);
        rt.block_on(post_json(&url, &key, &body)).status
    };
    let lines = || std::fs::read_to_string(&fired).unwrap_or_default();
    assert_eq!(ask(400, 300), 200); // $0.30: 30%
    assert_eq!(ask(400, 300), 200); // $0.60: 50%
    wait_for("the 50% hook", Duration::from_secs(10), || (lines().lines().count() == 1).then_some(()));
    assert_eq!(ask(300, 300), 200); // $0.90: 80%
    assert_eq!(ask(100, 100), 200); // $1.00: 100%
    assert_eq!(ask(100, 100), 429, "the cap is spent");
    let expected = "a 50 0.60 1.00 month openai\na 80 0.90 1.00 month openai\na 100 1.00 1.00 month openai\n";
    wait_for("the hooks", Duration::from_secs(10), || (lines() == expected).then_some(()));

    // Raising the cap brings the spend under 80% and 100% again; in this period they stay fired.
    daemon.ctl_ok(&["set", "a", "--cap", "1.5"]);
    assert_eq!(ask(100, 100), 200); // $1.10 of $1.50: 73%
    assert_eq!(ask(300, 300), 200); // $1.40: 93%
    daemon.restart();
    daemon.ctl_ok(&["set", "a", "--cap", "2", "--alert", "50,80,100,200"]);
    assert_eq!(ask(100, 100), 200); // $1.50 of $2.00: 75%, after a restart
    // A last threshold that must fire: the hooks run one after another, so any repeat would be
    // in the file before it.
    daemon.ctl_ok(&["set", "a", "--alert", "90"]);
    assert_eq!(ask(400, 400), 200); // $1.90: 95%
    let expected = format!("{expected}a 90 1.90 2.00 month openai\n");
    wait_for("the last hook", Duration::from_secs(10), || (lines().lines().count() == 4).then_some(()));
    assert_eq!(lines(), expected, "no threshold fired twice in one period");
    // A cap lowered below the spend crosses a threshold without any request.
    daemon.ctl_ok(&["set", "a", "--cap", "1.80", "--alert", "100"]);
    let expected = format!("{expected}a 100 1.90 1.80 month openai\n");
    wait_for("the hook of a lowered cap", Duration::from_secs(10), || (lines() == expected).then_some(()));

    let log = daemon.log_text();
    assert!(log.contains(r#"alert: grant "a" has spent 80% of its cap ($0.90 of $1.00 this month)"#), "{log}");

    // The watcher saw each alert right after the settlement that set it off.
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e["type"].as_str().unwrap() {
            "alert" => format!("alert {}", e["percent"]),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(&kinds[..8], ["hello", "settled", "settled", "alert 50", "settled", "alert 80", "settled", "alert 100"], "{kinds:?}");
    let alert = events.iter().find(|e| e["type"] == "alert").unwrap();
    assert_eq!((alert["grant"].as_str(), alert["spent"].as_str(), alert["cap"].as_str()), (Some("a"), Some("0.6"), Some("1.00")));
}
