//! Access requests: a local program asks for a grant (or more for its exhausted grant) on the
//! proxy, the owner answers with capitctl over the control socket, and the program collects
//! the answer once with its poll secret. Also grants scoped to some APIs.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ::http::Method;
use serde_json::{Value, json};

use crate::metering::MASTER;
use crate::support::daemon::Daemon;
use crate::support::http::{self, Reply, post_json};
use crate::support::upstream::Fake;
use crate::support::{TempDir, dec, runtime, wait_for};

fn ask(daemon: &Daemon, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    runtime().block_on(http::send(Method::POST, &daemon.url("/capit/v1/requests"), &all, body.to_string()))
}

fn poll(daemon: &Daemon, id: &str, secret: &str) -> Reply {
    let auth = format!("Bearer {secret}");
    runtime().block_on(http::send(Method::GET, &daemon.url(&format!("/capit/v1/requests/{id}")), &[("authorization", &auth)], ""))
}

fn ids(reply: &Reply) -> (String, String) {
    assert_eq!(reply.status, 202, "{}", reply.text());
    let doc = reply.json();
    (doc["id"].as_str().unwrap().to_string(), doc["secret"].as_str().unwrap().to_string())
}

fn new_grant(app: &str) -> Value {
    json!({"app": app, "provider": "openai", "models": ["test-model"], "amount": "2.50", "period": "week", "expires": "7d", "reason": "nightly evals of the parser", "apis": ["chat"]})
}

fn setup(args: &[&str]) -> (Daemon, Fake) {
    let fake = Fake::openai();
    let daemon = Daemon::start_with(args);
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--output", "4.40"]);
    fake.set_price("test-model", "1.10", "1.10", "4.40");
    (daemon, fake)
}

#[test]
fn an_app_asks_waits_and_collects_its_key_once() {
    let dir = TempDir::new();
    let notified = dir.path().join("notified");
    let notifier = dir.path().join("notify.sh");
    std::fs::write(&notifier, format!("#!/bin/sh\nprintf '%s|%s\\n' \"$1\" \"$2\" >> '{}'\n", notified.display())).unwrap();
    std::fs::set_permissions(&notifier, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (daemon, fake) = setup(&["--notify-command", notifier.to_str().unwrap()]);

    let (id, secret) = ids(&ask(&daemon, &[], &new_grant("evals")));
    assert!(secret.starts_with("capit-poll-"));
    let listed = daemon.ctl_json(&["requests"]);
    let r = &listed[0];
    assert_eq!(
        (r["id"].as_str(), r["kind"].as_str(), r["name"].as_str(), r["amount"].as_str()),
        (Some(id.as_str()), Some("grant"), Some("evals"), Some("2.50"))
    );
    assert_eq!((r["period"].as_str(), r["models"][0].as_str(), r["apis"][0].as_str()), (Some("week"), Some("test-model"), Some("chat")));
    assert_eq!(r["reason"], "nightly evals of the parser");
    let table = daemon.ctl_ok(&["requests"]);
    assert!(table.contains(&id) && table.contains("$2.50/week openai; models test-model; APIs chat"), "{table}");
    let note = wait_for("the desktop notification", Duration::from_secs(10), || {
        std::fs::read_to_string(&notified).ok().filter(|t| t.contains(&id))
    });
    assert!(note.starts_with("capit|access request") && note.contains("capitctl approve"), "{note}");
    assert!(!note.contains(&secret), "the poll secret is the asker's alone");

    let pending = poll(&daemon, &id, &secret);
    assert_eq!((pending.status, pending.json()["status"].as_str()), (202, Some("pending")));
    assert_eq!(poll(&daemon, &id, "capit-poll-guess").status, 404, "a wrong secret learns nothing");

    let approved = daemon.ctl_ok(&["approve", &id, "--cap", "2"]);
    assert!(approved.contains("$2.00/week openai grant \"evals\" made"), "{approved}");
    let answer = poll(&daemon, &id, &secret);
    assert_eq!(answer.status, 200, "{}", answer.text());
    let doc = answer.json();
    let key = doc["key"].as_str().unwrap().to_string();
    assert_eq!((doc["status"].as_str(), doc["cap"].as_str(), doc["grant"].as_str()), (Some("approved"), Some("2.00"), Some("evals")));
    assert_eq!(doc["base_url"], format!("http://{}/openai/v1", daemon.proxy));
    let again = poll(&daemon, &id, &secret);
    assert_eq!((again.status, again.json()["status"].as_str()), (410, Some("collected")));
    assert!(again.json().get("key").is_none(), "the second poll gets nothing");

    // The key works, for what was asked: chat with test-model, and not embeddings.
    let rt = runtime();
    let chat =
        rt.block_on(post_json(&daemon.url("/openai/v1/chat/completions"), &key, r#"{"model":"test-model","max_tokens":10,"messages":[]}"#));
    assert_eq!(chat.status, 200, "{}", chat.text());
    let embed = rt.block_on(post_json(&daemon.url("/openai/v1/embeddings"), &key, r#"{"model":"test-model","input":"x"}"#));
    assert_eq!(embed.status, 403);
    assert_eq!(embed.error_message(), "capit: grant \"evals\" may use only the chat API, not embeddings");
    assert_eq!(fake.received().len(), 1, "refused before the upstream");
    daemon.ctl_ok(&["set", "evals", "--apis", "chat,embeddings"]);
    assert_eq!(rt.block_on(post_json(&daemon.url("/openai/v1/embeddings"), &key, r#"{"model":"test-model","input":"x"}"#)).status, 200);
    let grant = daemon.ctl_json(&["ls"])[0].clone();
    assert_eq!(grant["apis"], json!(["chat", "embeddings"]));
    assert!(grant["note"].as_str().unwrap().contains(&format!("access request {id}: nightly evals")));
    assert!(grant["created_by"].as_str().unwrap().contains("access request"));
    assert!(daemon.ctl_err(&["approve", &id]).contains("no access request"));

    // Only local programs ask, with bodies checked like any input.
    assert_eq!(ask(&daemon, &[("origin", "https://evil.example")], &new_grant("web")).status, 403);
    let host = runtime().block_on(http::send(
        Method::POST,
        &daemon.url("/capit/v1/requests"),
        &[("host", "evil.example"), ("content-type", "application/json")],
        new_grant("web").to_string(),
    ));
    // The proxy's front door answers a name other than loopback's before any endpoint does.
    assert_eq!(host.status, 421);
    let mut bad = new_grant("x");
    bad["admin"] = json!(true);
    let refused = ask(&daemon, &[], &bad);
    assert_eq!(refused.status, 400);
    assert!(refused.error_message().contains("unknown field `admin`"), "{}", refused.text());
    let taken = ask(&daemon, &[], &new_grant("evals"));
    assert_eq!(taken.status, 409, "{}", taken.text());
    let form = runtime().block_on(http::send(
        Method::POST,
        &daemon.url("/capit/v1/requests"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "app=x",
    ));
    assert_eq!(form.status, 415);
    assert!(daemon.ctl_json(&["requests"]).as_array().unwrap().is_empty());
}

#[test]
fn denials_expiry_and_the_bound_on_pending_requests() {
    let (daemon, _fake) = setup(&["--request-ttl", "2", "--max-pending-requests", "2", "--notify-command", "none"]);
    let (a, a_secret) = ids(&ask(&daemon, &[], &new_grant("a")));
    assert_eq!(ask(&daemon, &[], &new_grant("a")).status, 409, "one request per app at a time");
    let (b, b_secret) = ids(&ask(&daemon, &[], &new_grant("b")));
    let full = ask(&daemon, &[], &new_grant("c"));
    assert_eq!(full.status, 429);
    assert!(full.error_message().contains("2 access requests are already waiting"), "{}", full.text());
    assert_eq!(daemon.ctl_json(&["status"])["access_requests"], 2);

    assert!(daemon.ctl_ok(&["deny", &a]).contains(&format!("denied {a}")));
    let denied = poll(&daemon, &a, &a_secret);
    assert_eq!((denied.status, denied.json()["status"].as_str()), (403, Some("denied")));
    assert!(daemon.ctl_err(&["approve", &a]).contains("no access request"));
    ids(&ask(&daemon, &[], &new_grant("c")));

    let expired = wait_for("b to expire unanswered", Duration::from_secs(10), || {
        let reply = poll(&daemon, &b, &b_secret);
        (reply.status != 202).then_some(reply)
    });
    assert_eq!((expired.status, expired.json()["status"].as_str()), (410, Some("expired")));
    assert!(daemon.ctl_json(&["requests"]).as_array().unwrap().iter().all(|r| r["id"] != b.as_str()));
    assert!(daemon.ctl_err(&["approve", &b]).contains("no access request"));
    assert!(daemon.ctl_json(&["ls"]).as_array().unwrap().is_empty(), "no grant was made");
}

#[test]
fn an_exhausted_grant_asks_for_more_with_its_own_key() {
    let (daemon, fake) = setup(&[]);
    // Requests that cost exactly their bound ($1 per million tokens): one spends the cap.
    daemon.ctl_ok(&["price", "set", "round-model", "--input", "1", "--output", "1"]);
    fake.set_price("round-model", "1", "1", "1");
    let body = r#"{"model":"round-model","max_tokens":1000,"messages":[]}"#;
    let bound = body.len() as u64 + 1024 + 1000;
    fake.script(|s| {
        s.prompt_tokens = body.len() as u64 + 1024;
        s.completion_tokens = 1000;
    });
    let cap = format!("0.{bound:06}");
    let key = daemon.grant("runner", &cap, &["--provider", "openai"]);
    let rt = runtime();
    let url = daemon.url("/openai/v1/chat/completions");
    assert_eq!(rt.block_on(post_json(&url, &key, body)).status, 200);
    let refused = rt.block_on(post_json(&url, &key, body));
    assert_eq!(refused.status, 429);
    assert!(refused.error_message().contains("To ask its owner for more, POST {\"amount\""), "{}", refused.text());

    let auth = format!("Bearer {key}");
    let extra = ask(&daemon, &[("authorization", &auth)], &json!({"amount": "0.01", "reason": "one more run", "app": "x"}));
    assert_eq!(extra.status, 400);
    assert!(extra.error_message().contains("takes only \"amount\" and \"reason\""), "{}", extra.text());
    let stranger = ask(
        &daemon,
        &[("authorization", "Bearer sk-capit-0000000000000000000000000000000000000000000")],
        &json!({"amount": "1", "reason": "r"}),
    );
    assert_eq!(stranger.status, 401);
    let (id, secret) = ids(&ask(&daemon, &[("authorization", &auth)], &json!({"amount": "0.01", "reason": "one more run"})));
    let r = daemon.ctl_json(&["requests"])[0].clone();
    assert_eq!((r["kind"].as_str(), r["name"].as_str(), r["amount"].as_str()), (Some("top-up"), Some("runner"), Some("0.01")));
    assert_eq!((dec(r["cap"].as_str().unwrap()), dec(r["spent"].as_str().unwrap())), (dec(&cap), dec(&cap)));

    let approved = daemon.ctl_ok(&["approve", &id]);
    let new_cap = dec(&cap) + dec("0.01");
    assert!(approved.contains(&format!("grant \"runner\" now has a ${} cap per month", new_cap.normalize())), "{approved}");
    let answer = poll(&daemon, &id, &secret).json();
    assert_eq!((answer["status"].as_str(), answer.get("key")), (Some("approved"), None), "the grant keeps its key");
    assert_eq!(dec(answer["cap"].as_str().unwrap()), new_cap);
    assert_eq!(rt.block_on(post_json(&url, &key, body)).status, 200, "the top-up pays for the next request");
}
