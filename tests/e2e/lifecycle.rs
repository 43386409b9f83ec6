//! The daemon's life: file permissions, loopback only, clean shutdown with requests in flight,
//! state that survives a restart, and secrets that never leak.

use std::os::unix::fs::FileTypeExt;
use std::process::Command;
use std::time::Duration;

use ::http::Method;

use crate::metering::{MASTER, chat_url, setup};
use crate::support::daemon::{CAPITD, Daemon};
use crate::support::http::{self, next_data, post_json};
use crate::support::{TempDir, dec, runtime};

const STREAM: &str = r#"{"model":"test-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn files_are_private_and_the_socket_goes_away_on_sigterm() {
    let mut daemon = Daemon::start();
    assert_eq!(Daemon::mode(&daemon.home), 0o700);
    assert_eq!(Daemon::mode(&daemon.home.join("capit.redb")), 0o600);
    assert!(std::fs::metadata(&daemon.socket).unwrap().file_type().is_socket());
    assert_eq!(Daemon::mode(&daemon.socket), 0o600);
    let status = daemon.stop();
    assert!(status.success(), "capitd exits 0 on SIGTERM: {status}");
}

#[test]
fn a_non_loopback_listen_address_is_refused_at_start() {
    let dir = TempDir::new();
    for addr in ["0.0.0.0:0", "192.0.2.1:8787", "[::]:0"] {
        let out = Command::new(CAPITD).args(["--listen", addr, "--home"]).arg(dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{addr}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refusing to listen") && err.contains("loopback"), "{err}");
    }
    let out = Command::new(CAPITD).args(["--listen", "localhost:x", "--home"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for ca in [dir.path().join("missing.pem"), not_pem] {
        let out = Command::new(CAPITD)
            .args(["--listen", "127.0.0.1:0", "--upstream-ca"])
            .arg(&ca)
            .arg("--home")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("upstream TLS roots") && err.contains(ca.to_str().unwrap()), "{err}");
    }
}

#[test]
fn a_second_daemon_on_the_same_home_is_refused() {
    let daemon = Daemon::start();
    let out = Command::new(CAPITD).args(["--listen", "127.0.0.1:0", "--home"]).arg(&daemon.home).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another capitd"));
    assert_eq!(daemon.ctl_json(&["status"])["grants_total"], 0, "the first daemon is unharmed");
}

#[test]
fn state_and_spend_survive_a_restart() {
    let (mut daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai", "--note", "nightly evals"]);
    let rt = runtime();
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, STREAM)).status, 200);
    let before = daemon.spent("script");
    assert!(before > dec("0"));
    daemon.restart();
    assert_eq!(daemon.spent("script"), before);
    let listed = daemon.ctl_json(&["ls"]);
    assert_eq!(dec(listed[0]["spent"].as_str().unwrap()), before);
    assert_eq!(listed[0]["note"], "nightly evals");
    assert_eq!(daemon.ctl_json(&["key", "ls"])[0]["provider"], "openai");
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, STREAM)).status, 200, "the key still works");
    assert_eq!(daemon.spent("script"), fake.bill());
    assert_eq!(daemon.ctl_json(&["status"])["ledger_entries"], 2);
}

#[test]
fn sigterm_lets_an_open_stream_finish_and_settle() {
    let (mut daemon, fake) = setup();
    let key = daemon.grant("script", "5.00", &["--provider", "openai"]);
    fake.script(|s| s.hold_after_first_event = true);
    let rt = runtime();
    let text = rt.block_on(async {
        let auth = format!("Bearer {key}");
        let response = http::open(Method::POST, &chat_url(&daemon), &[("authorization", &auth)], STREAM).await;
        let mut body = response.into_body();
        let mut text = String::from_utf8(next_data(&mut body).await.unwrap().unwrap().to_vec()).unwrap();
        daemon.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(200)).await;
        fake.release();
        while let Some(chunk) = next_data(&mut body).await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream finishes cleanly during shutdown")));
        }
        text
    });
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success());
    assert!(!daemon.socket.exists());
    // Started again, the ledger holds the request that finished during shutdown.
    daemon.relaunch();
    assert_eq!(daemon.spent("script"), fake.bill());
}

#[test]
fn the_master_key_never_appears_in_logs_or_output() {
    let (mut daemon, fake) = setup();
    let mut outputs = String::new();
    let grant = daemon.ctl_ok(&["grant", "script", "5", "--provider", "openai", "--no-install", "--json"]);
    let key: serde_json::Value = serde_json::from_str(&grant).unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    outputs.push_str(&grant);
    for args in [
        &["key", "ls"][..],
        &["key", "ls", "--json"],
        &["provider", "ls", "--json"],
        &["ls", "--json"],
        &["status", "--json"],
        &["usage", "--json"],
    ] {
        outputs.push_str(&daemon.ctl_ok(args));
    }
    let rt = runtime();
    for body in [STREAM, r#"{"model":"test-model","messages":[]}"#, "{bad json"] {
        outputs.push_str(&rt.block_on(post_json(&chat_url(&daemon), &key, body)).text());
    }
    // An upstream that is down: the error names the upstream, never the key.
    daemon.ctl_ok(&["provider", "set", "openai", "--base-url", "http://127.0.0.1:9"]);
    outputs.push_str(&rt.block_on(post_json(&chat_url(&daemon), &key, STREAM)).text());
    outputs.push_str(&String::from_utf8_lossy(&daemon.ctl_stdin(&["key", "add", "nosuch"], MASTER).stderr));
    daemon.restart();
    let log = daemon.log_text();
    assert!(log.contains("listening"), "the log was captured: {log}");
    let fingerprint = &MASTER[MASTER.len() - 4..];
    assert!(daemon.ctl_ok(&["key", "ls"]).contains(&format!("sk-p…{fingerprint}")));
    for (what, text) in [("log", &log), ("output", &outputs)] {
        assert!(!text.contains(MASTER), "the master key appears in the {what}");
        assert!(!text.contains(&MASTER[4..MASTER.len() - 4]), "the middle of the master key appears in the {what}");
    }
    assert!(!log.contains(&key), "the virtual key appears in the log");
    assert_eq!(fake.billed_requests(), 2);
}

#[test]
fn capitctl_explains_when_the_daemon_is_not_running() {
    let dir = TempDir::new();
    let out = Command::new(crate::support::daemon::CAPITCTL).arg("--socket").arg(dir.path().join("none.sock")).arg("ls").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("capitctl: capitd is not running") && err.trim_end().lines().count() == 1, "{err}");
}
