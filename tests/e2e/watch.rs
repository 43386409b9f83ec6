//! `capitctl watch --json` gets every settlement and refusal of a concurrent load, in order, and
//! a watcher that reads slowly neither slows the proxy nor loses events without being told how
//! many. The per-request log line is there too, without a key.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::metering::MASTER;
use crate::support::daemon::{CAPITCTL, Daemon};
use crate::support::http::{self, client};
use crate::support::upstream::Fake;
use crate::support::{runtime, wait_for};

const CLIENTS: usize = 4;

/// A daemon with a zero-priced OpenAI-compatible provider on the fake, where any model name
/// goes, so each request can carry its own name through to the events.
fn setup() -> (Daemon, Fake) {
    let fake = Fake::openai();
    let daemon = Daemon::start_logging(&[], "info");
    daemon.ctl_ok(&["provider", "add", "local", "--base-url", &fake.base_url(), "--price-zero"]);
    assert!(daemon.ctl_stdin(&["key", "add", "local"], MASTER).status.success());
    (daemon, fake)
}

struct Watcher {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Watcher {
    /// Starts `capitctl watch --json`; `read` false leaves its stdout unread (a stuck reader)
    /// until [`Watcher::start_reading`].
    fn start(daemon: &Daemon) -> Watcher {
        let child = Command::new(CAPITCTL)
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["watch", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (_tx, lines) = mpsc::channel();
        Watcher { child, lines }
    }

    fn start_reading(&mut self) {
        let stdout = self.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("bad line ({e}): {line}"))).is_err() {
                    break;
                }
            }
        });
        self.lines = rx;
    }

    fn next(&self) -> Value {
        self.lines.recv_timeout(Duration::from_secs(30)).expect("the watcher got nothing for 30 s")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `per_client` requests from each of [`CLIENTS`] concurrent clients, each in turn; client
/// `c`'s request `r` asks for model `c{c}-r{r}` with the key `keys[c]`. Returns the statuses.
fn load(daemon: &Daemon, keys: &[String], per_client: usize) -> Vec<Vec<u16>> {
    let rt = runtime();
    let url = daemon.url("/local/v1/chat/completions");
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, auth) = (url.clone(), format!("Bearer {}", keys[c]));
            rt.spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                for r in 0..per_client {
                    let body = format!(r#"{{"model":"c{c}-r{r}","max_tokens":10,"messages":[{{"role":"user","content":"hi"}}]}}"#);
                    let reply =
                        http::send_with(&client, http::request(::http::Method::POST, &url, &[("authorization", &auth)], body)).await;
                    statuses.push(reply.status);
                }
                statuses
            })
        })
        .collect();
    tasks.into_iter().map(|t| rt.block_on(t).unwrap()).collect()
}

#[test]
fn watch_json_gets_every_settlement_and_refusal_of_a_concurrent_load_in_order() {
    let (daemon, fake) = setup();
    fake.script(|s| {
        s.prompt_tokens = 21;
        s.completion_tokens = 4;
    });
    const PER_CLIENT: usize = 30;
    // Every third model is not in the grant's list, so it is refused (403) before going upstream.
    let keys: Vec<String> = (0..CLIENTS)
        .map(|c| {
            let allowed: Vec<String> = (0..PER_CLIENT).filter(|r| r % 3 != 2).map(|r| format!("c{c}-r{r}")).collect();
            for model in &allowed {
                fake.set_price(model, "0", "0", "0");
            }
            daemon.grant(&format!("w{c}"), "5", &["--provider", "local", "--models", &allowed.join(",")])
        })
        .collect();
    let mut watcher = Watcher::start(&daemon);
    watcher.start_reading();
    assert_eq!(watcher.next()["type"], "hello");

    let statuses = load(&daemon, &keys, PER_CLIENT);
    let total = CLIENTS * PER_CLIENT;
    let events: Vec<Value> = (0..total).map(|_| watcher.next()).collect();

    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "events are numbered without gaps: {seqs:?}");
    for (c, statuses) in statuses.iter().enumerate() {
        let grant = format!("w{c}");
        let mine: Vec<&Value> = events.iter().filter(|e| e["grant"] == grant.as_str()).collect();
        let seen: Vec<(String, String)> =
            mine.iter().map(|e| (e["type"].as_str().unwrap().to_string(), e["model"].as_str().unwrap().to_string())).collect();
        let expected: Vec<(String, String)> =
            (0..PER_CLIENT).map(|r| (if r % 3 == 2 { "refused" } else { "settled" }.to_string(), format!("c{c}-r{r}"))).collect();
        assert_eq!(seen, expected, "client {c}'s requests, in the order it made them");
        let codes: Vec<u16> = (0..PER_CLIENT).map(|r| if r % 3 == 2 { 403 } else { 200 }).collect();
        assert_eq!(*statuses, codes);
        let settled = mine.iter().find(|e| e["type"] == "settled").unwrap();
        assert_eq!((settled["input_tokens"].as_u64(), settled["output_tokens"].as_u64()), (Some(21), Some(4)));
        assert_eq!((settled["status"].as_str(), settled["http_status"].as_u64()), (Some("metered"), Some(200)));
        assert_eq!(settled["cap"], "5.00");
        let refused = mine.iter().find(|e| e["type"] == "refused").unwrap();
        assert_eq!(refused["reason"], "model_not_allowed");
        assert_eq!(
            daemon.ctl_json(&["usage", &grant])["requests"].as_u64(),
            Some((PER_CLIENT - PER_CLIENT / 3) as u64),
            "the ledger agrees"
        );
    }
    // One log line per metered request, with what a person needs and never the key.
    let log = wait_for("the log lines", Duration::from_secs(10), || {
        let log = daemon.log_text();
        (log.matches(" settled ").count() >= total - total / 3).then_some(log)
    });
    let line = log.lines().find(|l| l.contains(" settled ") && l.contains("c0-r0")).unwrap();
    for field in ["grant=w0", "input_tokens=21", "output_tokens=4", "cost=0", "status=\"metered\"", "http_status=200", "latency_ms="] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    for key in &keys {
        assert!(!log.contains(key.as_str()), "a virtual key is in the log");
    }
    assert!(!log.contains(MASTER));
}

#[test]
fn a_slow_watcher_does_not_hold_the_proxy_back_and_is_told_what_it_lost() {
    let (daemon, _fake) = setup();
    // Every request is refused (no model is allowed but one never asked for): cheap events, fast.
    let keys: Vec<String> =
        (0..CLIENTS).map(|c| daemon.grant(&format!("s{c}"), "5", &["--provider", "local", "--models", "never-asked"])).collect();
    const PER_CLIENT: usize = 2000;

    let started = Instant::now();
    load(&daemon, &keys, 100);
    let unwatched = started.elapsed() / 100;

    let mut stuck = Watcher::start(&daemon);
    wait_for("the watcher to subscribe", Duration::from_secs(20), || (daemon.ctl_json(&["status"])["watchers"] == 1).then_some(()));
    let started = Instant::now();
    let statuses = load(&daemon, &keys, PER_CLIENT);
    let watched = started.elapsed() / PER_CLIENT as u32;
    assert!(statuses.iter().flatten().all(|s| *s == 403));
    eprintln!("per request, {CLIENTS} clients: {unwatched:?} with nobody watching, {watched:?} with a stuck watcher");

    // Now read: every event is either delivered or counted as dropped, and the counts say where.
    stuck.start_reading();
    assert_eq!(stuck.next()["type"], "hello");
    let total = (CLIENTS * PER_CLIENT) as u64;
    let (mut delivered, mut dropped, mut last_seq, mut pending_drop) = (0u64, 0u64, 0u64, 0u64);
    while delivered + dropped < total {
        let event = stuck.next();
        if event["type"] == "dropped" {
            pending_drop = event["count"].as_u64().unwrap();
            dropped += pending_drop;
            continue;
        }
        let seq = event["seq"].as_u64().unwrap();
        assert_eq!(event["type"], "refused");
        if last_seq > 0 {
            assert_eq!(seq, last_seq + 1 + pending_drop, "a gap is exactly what was reported dropped");
        }
        pending_drop = 0;
        last_seq = seq;
        delivered += 1;
    }
    assert_eq!(delivered + dropped, total);
    assert!(dropped > 0, "a watcher that did not read for {total} events lost some");
    eprintln!("the stuck watcher got {delivered} events and was told of {dropped} dropped");
}
