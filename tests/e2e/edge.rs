//! The proxy's edge, as a local attacker or a web page meets it: names other than loopback's
//! are refused 421, browser pages 403 unless allowed, free paths are normalised before they are
//! matched, idle and slow connections are closed at their timeouts, idle ones make room at the
//! connection limit, and one user cannot take more than its share.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ::http::Method;

use crate::metering::{MASTER, chat_url};
use crate::support::daemon::Daemon;
use crate::support::http::{self, post_json};
use crate::support::upstream::Fake;
use crate::support::{runtime, wait_for};

const PLAIN: &str = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;

fn setup(args: &[&str]) -> (Daemon, Fake, String) {
    let fake = Fake::openai();
    let daemon = Daemon::start_with(args);
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.setup_provider("anthropic", &fake.base_url(), "sk-ant-MASTERkey0123456789abcdefWXYZ");
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--output", "4.40"]);
    fake.set_price("test-model", "1.10", "1.10", "4.40");
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    (daemon, fake, key)
}

/// Sends `head` (request line and headers, no blank line) and `body` on a fresh connection,
/// closing after the reply; returns the status and the whole reply as text.
fn raw(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let length = if body.is_empty() { String::new() } else { format!("content-length: {}\r\n", body.len()) };
    write!(stream, "{head}\r\n{length}connection: close\r\n\r\n{body}").unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let status = reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, reply)
}

/// True once the peer has closed the connection (a read sees its end or a reset).
fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn other_hosts_are_misdirected_with_421_in_the_provider_s_format() {
    let (daemon, fake, key) = setup(&[]);
    let port = daemon.proxy.port();
    let auth = format!("authorization: Bearer {key}");
    for host in [format!("evil.example:{port}"), format!("127.0.0.1.nip.io:{port}"), format!("localhost:{}", port + 1), "".into()] {
        let (status, reply) = raw(daemon.proxy, &format!("GET /openai/v1/models HTTP/1.1\r\nhost: {host}\r\n{auth}"), "");
        assert_eq!(status, 421, "Host {host:?}: {reply}");
        assert!(reply.contains(r#""code":"capit_misdirected""#), "{reply}");
    }
    let (status, reply) = raw(daemon.proxy, &format!("POST /anthropic/v1/messages HTTP/1.1\r\nhost: rebound.example:{port}"), PLAIN);
    assert_eq!(status, 421);
    assert!(reply.contains(r#""type":"error""#) && reply.contains("answers only to 127.0.0.1"), "Anthropic's format: {reply}");
    assert!(fake.received().is_empty(), "nothing was forwarded");
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "localhost".to_string()] {
        let (status, reply) = raw(daemon.proxy, &format!("GET /openai/v1/models HTTP/1.1\r\nhost: {host}\r\n{auth}"), "");
        assert_eq!(status, 200, "Host {host:?}: {reply}");
    }
}

#[test]
fn browser_pages_are_refused_unless_their_origin_is_allowed() {
    let (daemon, fake, key) = setup(&["--allow-origin", "http://localhost:5173"]);
    let port = daemon.proxy.port();
    let head = |extra: &str| {
        format!(
            "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n{extra}"
        )
    };
    for extra in ["origin: http://localhost:3000", "origin: null", "sec-fetch-site: cross-site", "sec-fetch-site: same-site"] {
        let (status, reply) = raw(daemon.proxy, &head(extra), PLAIN);
        assert_eq!(status, 403, "{extra}: {reply}");
        assert!(reply.contains("requests from web pages are refused") && reply.contains("--allow-origin"), "{reply}");
    }
    assert!(fake.received().is_empty());

    // The allowed origin's page: its preflight is answered, and its request served with CORS.
    let preflight = format!(
        "OPTIONS /openai/v1/chat/completions HTTP/1.1\r\nhost: localhost:{port}\r\norigin: http://localhost:5173\r\naccess-control-request-method: POST\r\naccess-control-request-headers: authorization, content-type"
    );
    let (status, reply) = raw(daemon.proxy, &preflight, "");
    assert_eq!(status, 204, "{reply}");
    let lower = reply.to_ascii_lowercase();
    assert!(lower.contains("access-control-allow-origin: http://localhost:5173"), "{reply}");
    assert!(lower.contains("access-control-allow-headers: authorization, content-type"), "{reply}");
    let (status, reply) = raw(daemon.proxy, &head("origin: http://localhost:5173\r\nsec-fetch-site: same-site"), PLAIN);
    assert_eq!(status, 200, "{reply}");
    assert!(reply.to_ascii_lowercase().contains("access-control-allow-origin: http://localhost:5173"), "{reply}");
    assert_eq!(fake.received().len(), 1);
}

#[test]
fn free_paths_are_decoded_and_normalised_before_they_are_matched() {
    let (daemon, fake, key) = setup(&[]);
    let port = daemon.proxy.port();
    let get = |path: &str| raw(daemon.proxy, &format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}"), "");
    for path in [
        "/openai/v1/models/..%2F..%2Fv1%2Ffiles%2Ffile-abc%2Fcontent",
        "/openai/v1/models/%2e%2e/files",
        "/openai/v1/models/../files/file-abc/content",
        "/openai/v1/models/gpt-5%3Fx=1",
        "/openai/v1/models/a%252fb",
        "/openai/v1/models/a;b",
    ] {
        let (status, reply) = get(path);
        assert_eq!(status, 403, "{path}: {reply}");
    }
    let (status, reply) = raw(
        daemon.proxy,
        &format!("POST /openai/v1/chat/../chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}"),
        PLAIN,
    );
    assert_eq!(status, 403, "a metered path with a dot segment: {reply}");
    assert!(fake.received().is_empty(), "nothing was forwarded");

    // Escapes of plain characters and doubled slashes are decoded and forwarded in the
    // normalised form, which is what was matched.
    for path in ["/openai/v1/mod%65ls", "/openai//v1/models/", "/openai/v1/models/gpt%2D5"] {
        let (status, reply) = get(path);
        assert!(status != 403 && !reply.contains("x-capit-refusal"), "{path} was forwarded, not refused: {reply}");
    }
    let paths: Vec<String> = fake.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/models", "/v1/models", "/v1/models/gpt-5"]);
}

/// Latency percentile (ms) of a sorted sample.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn idle_and_slow_connections_are_closed_at_their_timeouts_while_a_client_keeps_working() {
    let (daemon, _fake, key) = setup(&["--header-timeout", "1", "--idle-timeout", "2"]);
    let addr = daemon.proxy;
    let started = Instant::now();
    // The attack: connections that say nothing, and connections that send their head a byte at
    // a time (slowloris), kept up in the background.
    let mut idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let slow_threads: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                let _ = stream.write_all(b"GET /openai/v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n");
                let begun = Instant::now();
                loop {
                    if stream.write_all(format!("x-slow-{i}: a\r\n").as_bytes()).is_err() || closed(&mut stream) {
                        return begun.elapsed();
                    }
                    if begun.elapsed() > Duration::from_secs(15) {
                        panic!("a slowloris connection stayed open 15 s with --header-timeout 1");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();

    // A legitimate client meanwhile: every request served; its latency is printed, not asserted.
    let rt = runtime();
    let url = daemon.url("/openai/v1/models");
    let auth = format!("Bearer {key}");
    let mut latencies = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        let sent = Instant::now();
        let reply = rt.block_on(http::send(Method::GET, &url, &[("authorization", &auth)], ""));
        assert_eq!(reply.status, 200, "{}", reply.text());
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "legitimate client under 200 idle + 20 slowloris connections: {} requests, p50 {:.2} ms, p99 {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );

    for thread in slow_threads {
        let lasted = thread.join().unwrap();
        assert!(lasted < Duration::from_secs(5), "a slowloris connection lasted {lasted:?}");
    }
    for stream in &mut idle {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(closed(stream), "an idle connection was never closed");
    }
    eprintln!("200 idle connections closed within {:?} of opening (--idle-timeout 2)", started.elapsed());

    // A connection idle after a request is closed too, once its keep-alive has run out.
    let mut kept = TcpStream::connect(addr).unwrap();
    write!(kept, "GET /openai/v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"200");
    kept.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = kept.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).to_ascii_lowercase().contains("keep-alive: timeout=2"), "clients are told the timeout");
}

#[test]
fn at_the_connection_limit_idle_connections_make_room_for_work() {
    let (daemon, _fake, key) = setup(&["--max-connections", "16", "--idle-timeout", "600", "--header-timeout", "600"]);
    // Far more idle connections than the limit, none of which would time out for ten minutes.
    let idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(daemon.proxy).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let rt = runtime();
    let sent = Instant::now();
    let reply = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), post_json(&chat_url(&daemon), &key, PLAIN))
            .await
            .expect("served while idle connections filled the proxy")
    });
    assert_eq!(reply.status, 200, "{}", reply.text());
    eprintln!("with 64 idle connections against --max-connections 16, a request was served in {:?}", sent.elapsed());
    drop(idle);
}

#[test]
fn one_user_cannot_hold_more_than_its_share_of_connections() {
    let (daemon, fake, key) = setup(&["--max-connections-per-user", "3"]);
    fake.script(|s| s.hold_after_first_event = true);
    let rt = runtime();
    let stream = r#"{"model":"test-model","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let auth = format!("Bearer {key}");
    // Three connections each with a request in flight: the user's share, all of it busy.
    let busy: Vec<_> =
        (0..3).map(|_| rt.block_on(http::open(Method::POST, &chat_url(&daemon), &[("authorization", &auth)], stream))).collect();
    wait_for("three streams in flight", Duration::from_secs(10), || (fake.received().len() == 3).then_some(()));
    let refused = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "capit_too_many_connections");
    assert!(refused.error_message().contains("--max-connections-per-user"), "{}", refused.text());
    assert_eq!(fake.received().len(), 3, "the refused request went nowhere");
    fake.release();
    for response in busy {
        assert_eq!(response.status(), 200);
        drop(rt.block_on(http_body_util::BodyExt::collect(response.into_body())));
    }
    let served = wait_for("the share to free up", Duration::from_secs(10), || {
        let reply = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
        (reply.status == 200).then_some(reply)
    });
    assert_eq!(served.status, 200);
}

fn set_soft_fd_limit(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit on our own child, reading its limit first.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) }, 0);
    let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    // SAFETY: as above; lowering the soft limit, or raising it back to at most the hard one.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) }, 0);
    old.rlim_cur
}

#[test]
fn out_of_descriptors_the_accept_loop_backs_off_and_logs_once_per_interval() {
    let (daemon, _fake, key) = setup(&[]);
    let pid = daemon.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let before = set_soft_fd_limit(pid, open + 6);
    // Far more connections than descriptors left: accepting fails with EMFILE, again and again.
    let flood: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(daemon.proxy).unwrap()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let log = daemon.log_text();
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("accepting proxy connections fails")).collect();
    let warnings = warned.len();
    eprintln!("out of descriptors for 3 s: {warnings} warning(s): {warned:?}");
    assert!(warnings >= 1, "the failure was logged: {log}");
    assert!(warnings <= 1, "{warnings} warnings in 3 s: the accept loop must not log at its own rate");
    assert!(log.lines().count() < 200, "the log did not flood: {} lines", log.lines().count());
    set_soft_fd_limit(pid, before);
    drop(flood);
    let rt = runtime();
    let reply = wait_for("service with descriptors back", Duration::from_secs(10), || {
        let reply = rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN));
        (reply.status == 200).then_some(reply)
    });
    assert_eq!(reply.status, 200);
}
