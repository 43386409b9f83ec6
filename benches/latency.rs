//! Added latency of the proxy: the same small chat completion sent straight to the fake
//! upstream and through capitd (release build), interleaved, 1,000 times each; and the time to
//! the first byte of a stream. Prints figures; asserts nothing about speed.
//!
//! Run: cargo bench --bench latency

#[allow(dead_code)]
#[path = "../tests/e2e/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::daemon::Daemon;
use support::http::{self as client, next_data};
use support::upstream::Fake;

const MASTER: &str = "sk-bench-master-key-000000000000";
const PLAIN: &str = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"test-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let median = percentile(&samples, 0.5);
    println!(
        "{name:<28} n={:<5} p50={:>8.1} µs  p90={:>8.1} µs  p99={:>8.1} µs",
        samples.len(),
        median.as_secs_f64() * 1e6,
        percentile(&samples, 0.9).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6
    );
    median
}

fn main() {
    let fake = Fake::openai();
    fake.set_price("test-model", "1.10", "0.275", "4.40");
    // Direct calls go to a second fake, so that the first one's bill is the proxy's traffic only.
    let direct_fake = Fake::openai();
    direct_fake.set_price("test-model", "1.10", "0.275", "4.40");
    let daemon = Daemon::start_logging(&[], "warn");
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--cached-input", "0.275", "--output", "4.40"]);
    let key = daemon.grant("bench", "1000000", &["--provider", "openai"]);
    let direct_url = format!("{}/v1/chat/completions", direct_fake.base_url());
    let proxy_url = daemon.url("/openai/v1/chat/completions");
    let master_auth = format!("Bearer {MASTER}");
    let key_auth = format!("Bearer {key}");
    let runtime = support::runtime();
    runtime.block_on(async {
        let http = client::client();
        let once = |url: &str, auth: &str, body: &'static str| {
            let request = client::request(Method::POST, url, &[("authorization", auth), ("content-type", "application/json")], body);
            let http = http.clone();
            async move {
                let started = Instant::now();
                let reply = client::send_with(&http, request).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                started.elapsed()
            }
        };
        for _ in 0..200 {
            once(&direct_url, &master_auth, PLAIN).await;
            once(&proxy_url, &key_auth, PLAIN).await;
        }
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            direct.push(once(&direct_url, &master_auth, PLAIN).await);
            proxied.push(once(&proxy_url, &key_auth, PLAIN).await);
        }
        println!("small JSON chat completion, keep-alive connections, one at a time:");
        let d = report("direct to the fake", direct);
        let p = report("through capitd", proxied);
        println!("added latency at the median: {:.1} µs", (p.as_secs_f64() - d.as_secs_f64()) * 1e6);

        let ttfb = |url: String, auth: String| async move {
            let started = Instant::now();
            let response = client::open(Method::POST, &url, &[("authorization", &auth)], STREAM).await;
            let mut body = response.into_body();
            next_data(&mut body).await.unwrap().unwrap();
            let first = started.elapsed();
            while next_data(&mut body).await.is_some() {}
            first
        };
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            direct.push(ttfb(direct_url.clone(), master_auth.clone()).await);
            proxied.push(ttfb(proxy_url.clone(), key_auth.clone()).await);
        }
        println!("streamed chat completion, time to first byte (new connection each):");
        let d = report("direct to the fake", direct);
        let p = report("through capitd", proxied);
        println!("added time to first byte at the median: {:.1} µs", (p.as_secs_f64() - d.as_secs_f64()) * 1e6);
    });
    let spent = daemon.spent("bench");
    println!("ledger {spent} vs upstream bill {} ({} requests)", fake.bill(), fake.billed_requests());
    assert_eq!(spent, fake.bill(), "the ledger equals the bill");
}
