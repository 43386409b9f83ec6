//! The proxy's cost, printed, never asserted: capitd (release build) against calling the fake
//! upstream directly and against a bare forwarding proxy with no metering (this same binary,
//! started again with `--bare-forwarder`), for
//! - added latency, p50/p99 over 1,000 small JSON requests on keep-alive connections;
//! - the same latency with `capitctl watch --json` attached, reading or stuck;
//! - time to the first byte of a stream, over 300 new connections;
//! - throughput with 16 concurrent clients for 3 s each;
//! - capitd's resident memory idle and with 1,000 streams open at once.
//!
//! Run: cargo bench --bench proxy

#[path = "../tests/e2e/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use support::daemon::Daemon;
use support::http::{self as client, next_data};
use support::upstream::Fake;

const MASTER: &str = "sk-bench-master-key-000000000000";
const PLAIN: &str = r#"{"model":"test-model","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"test-model","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "  {name:<22} n={:<5} p50={:>8.1} µs  p90={:>8.1} µs  p99={:>8.1} µs",
        samples.len(),
        us(p50),
        us(percentile(&samples, 0.9)),
        us(p99)
    );
    (p50, p99)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A forwarding proxy with nothing else: no keys, no metering, no ledger. The yardstick.
fn bare_forwarder(upstream: String) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build::<_, hyper::body::Incoming>(connector);
        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            let (http, upstream, builder) = (http.clone(), upstream.clone(), builder.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    let http = http.clone();
                    let uri: http::Uri = format!("{upstream}{}", req.uri().path_and_query().map_or("/", |p| p.as_str())).parse().unwrap();
                    *req.uri_mut() = uri;
                    req.headers_mut().remove(http::header::HOST);
                    async move {
                        let response = http.request(req).await.unwrap();
                        Ok::<_, Infallible>(response.map(|b| b.boxed()))
                    }
                });
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
}

/// 16 clients on keep-alive connections, one request after another each, for `length`: the rate
/// and every request's latency.
async fn load(url: &str, auth: &str, length: Duration) -> (f64, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (url, auth, stop, http) = (url.to_string(), auth.to_string(), stop.clone(), client::client());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let request = client::request(Method::POST, &url, &[("authorization", &auth)], PLAIN);
                    let reply = client::send_with(&http, request).await;
                    assert_eq!(reply.status, 200, "{}", reply.text());
                    latencies.push(started.elapsed());
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    (all.len() as f64 / length.as_secs_f64(), all)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--bare-forwarder") {
        return bare_forwarder(args[i + 1].clone());
    }
    let fake = Fake::openai();
    fake.set_price("test-model", "1.10", "0.275", "4.40");
    let daemon = Daemon::start_logging(&[], "warn");
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--cached-input", "0.275", "--output", "4.40"]);
    let key = daemon.grant("bench", "1000000", &["--provider", "openai"]);
    let idle_rss = rss_kib(daemon.pid());

    let mut forwarder = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--bare-forwarder", &fake.base_url()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(forwarder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let bare = format!("http://{}", line.trim());

    let targets = [
        ("direct to the fake", format!("{}/v1/chat/completions", fake.base_url()), format!("Bearer {MASTER}")),
        ("bare forwarder", format!("{bare}/v1/chat/completions"), format!("Bearer {MASTER}")),
        ("capitd", daemon.url("/openai/v1/chat/completions"), format!("Bearer {key}")),
    ];
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
            for (_, url, auth) in &targets {
                once(url, auth, PLAIN).await;
            }
        }
        let mut samples = vec![Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..1000 {
            for (i, (_, url, auth)) in targets.iter().enumerate() {
                samples[i].push(once(url, auth, PLAIN).await);
            }
        }
        println!("small JSON chat completion, keep-alive connections, one at a time:");
        let figures: Vec<_> = targets.iter().zip(samples).map(|((name, _, _), s)| report(name, s)).collect();
        let added = |i: usize| (us(figures[i].0) - us(figures[0].0), us(figures[i].1) - us(figures[0].1));
        let (bare50, bare99) = added(1);
        let (capit50, capit99) = added(2);
        println!("  added over direct: bare p50 {bare50:.1} µs p99 {bare99:.1} µs; capitd p50 {capit50:.1} µs p99 {capit99:.1} µs");
        println!(
            "  capitd / bare forwarder, whole request: p50 {:.2}x, p99 {:.2}x",
            us(figures[2].0) / us(figures[1].0),
            us(figures[2].1) / us(figures[1].1)
        );

        // What a watcher costs: nothing while nobody watches (one atomic load), and a reader that
        // stops reading must not cost more than one that keeps up (the daemon drops for it).
        println!("capitd with and without `capitctl watch --json` attached (same requests, one at a time):");
        let (_, capit_url, capit_auth) = &targets[2];
        let mut watched = Vec::new();
        for mode in ["nobody watching", "a watcher reading", "a stuck watcher"] {
            let watcher = match mode {
                "nobody watching" => None,
                _ => {
                    let mut command = std::process::Command::new(support::daemon::CAPITCTL);
                    command.arg("--socket").arg(&daemon.socket).args(["watch", "--json"]).stdin(std::process::Stdio::null());
                    // A reader that keeps up writes to /dev/null; a stuck one to a pipe nobody reads.
                    if mode == "a watcher reading" {
                        command.stdout(std::process::Stdio::null());
                    } else {
                        command.stdout(std::process::Stdio::piped());
                    }
                    Some(command.spawn().unwrap())
                }
            };
            let expected = u64::from(watcher.is_some());
            while daemon.ctl_json(&["status"])["watchers"].as_u64() != Some(expected) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The stuck watcher's buffers fill in the first few thousand events; measure after.
            for _ in 0..6000 {
                once(capit_url, capit_auth, PLAIN).await;
            }
            let mut samples = Vec::new();
            for _ in 0..1000 {
                samples.push(once(capit_url, capit_auth, PLAIN).await);
            }
            watched.push(report(mode, samples));
            if let Some(mut watcher) = watcher {
                let _ = watcher.kill();
                let _ = watcher.wait();
            }
        }
        println!(
            "  with a watcher / without: reading p50 {:.2}x p99 {:.2}x; stuck p50 {:.2}x p99 {:.2}x",
            us(watched[1].0) / us(watched[0].0),
            us(watched[1].1) / us(watched[0].1),
            us(watched[2].0) / us(watched[0].0),
            us(watched[2].1) / us(watched[0].1)
        );

        let ttfb = |url: String, auth: String| async move {
            let started = Instant::now();
            let response = client::open(Method::POST, &url, &[("authorization", &auth)], STREAM).await;
            let mut body = response.into_body();
            next_data(&mut body).await.unwrap().unwrap();
            let first = started.elapsed();
            while next_data(&mut body).await.is_some() {}
            first
        };
        let mut samples = vec![Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..300 {
            for (i, (_, url, auth)) in targets.iter().enumerate() {
                samples[i].push(ttfb(url.clone(), auth.clone()).await);
            }
        }
        println!("streamed chat completion, time to first byte, new connection each:");
        let figures: Vec<_> = targets.iter().zip(samples).map(|((name, _, _), s)| report(name, s)).collect();
        println!(
            "  capitd / bare forwarder: p50 {:.2}x, p99 {:.2}x",
            us(figures[2].0) / us(figures[1].0),
            us(figures[2].1) / us(figures[1].1)
        );

        // With CAPIT_BENCH_PROFILE_SECS=N, capitd alone first takes the same load for N s, for a
        // profiler to attach to (its pid is printed); the figures below are measured after.
        if let Some(secs) = std::env::var("CAPIT_BENCH_PROFILE_SECS").ok().and_then(|s| s.parse::<u64>().ok()) {
            println!("profiling window: capitd pid {} under 16 clients for {secs} s", daemon.pid());
            let (_, url, auth) = &targets[2];
            load(url, auth, Duration::from_secs(secs)).await;
            println!("profiling window over");
        }
        println!("throughput, 16 concurrent clients on keep-alive connections, 3 s each (latency of each request under that load):");
        let mut loads = Vec::new();
        for (name, url, auth) in &targets {
            let (rate, latencies) = load(url, auth, Duration::from_secs(3)).await;
            print!("  {name:<22} {rate:>8.0} requests/s ");
            loads.push((rate, report("", latencies)));
        }
        let (bare, capit) = (loads[1], loads[2]);
        println!(
            "  capitd / bare forwarder: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
            capit.0 / bare.0,
            us(capit.1.0) / us(bare.1.0),
            us(capit.1.1) / us(bare.1.1)
        );

        println!("memory (capitd's resident set):");
        println!("  idle after start       {:>8} KiB", idle_rss);
        fake.script(|s| s.hold_after_first_event = true);
        let before = fake.received().len();
        let streams: Vec<_> = (0..1000)
            .map(|_| {
                let (url, auth) = (targets[2].1.clone(), targets[2].2.clone());
                tokio::spawn(async move {
                    let response = client::open(Method::POST, &url, &[("authorization", &auth)], STREAM).await;
                    response.into_body().collect().await.map(|c| c.to_bytes().len()).unwrap_or(0)
                })
            })
            .collect();
        while fake.received().len() < before + 1000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!("  1,000 streams open     {:>8} KiB", rss_kib(daemon.pid()));
        fake.release();
        for stream in streams {
            assert!(stream.await.unwrap() > 0);
        }
        println!("  after they finished    {:>8} KiB", rss_kib(daemon.pid()));
    });
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    let spent = daemon.spent("bench");
    println!(
        "ledger {spent} vs the fake's bill {} ({} requests; the bare forwarder's and direct calls are billed too)",
        fake.bill(),
        fake.billed_requests()
    );
}
