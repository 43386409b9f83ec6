//! A full disk is an outage, not a lie: while the ledger cannot be written, metered requests are
//! refused 503 in the provider's own format and nothing goes upstream unmetered; `capitctl
//! status` says so; once space is freed, service resumes by itself (no restart), and every
//! request the upstream billed is in the ledger exactly once.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ::http::Method;

use crate::metering::{MASTER, chat_url};
use crate::support::daemon::Daemon;
use crate::support::http::{self, post_json};
use crate::support::upstream::Fake;
use crate::support::{TempDir, dec, runtime, wait_for};

const PLAIN: &str = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;

/// The disk the daemon's home is on, which the test fills and frees: a small tmpfs where the
/// test may mount one (as root, as in CI), else the daemon's own file-size limit (`prlimit`),
/// under which its writes past the file's size fail as they do on a full disk.
enum Disk {
    Tmpfs { _dir: TempDir, mount: PathBuf },
    FileSizeLimit { dir: TempDir, pid: Option<u32> },
}

impl Disk {
    fn new() -> Disk {
        let dir = TempDir::new();
        let mount = dir.path().join("small");
        std::fs::create_dir_all(&mount).unwrap();
        let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"]).arg(&mount).output();
        match mounted {
            Ok(out) if out.status.success() => Disk::Tmpfs { _dir: dir, mount },
            _ => {
                eprintln!("no tmpfs can be mounted here: filling the disk by the daemon's file-size limit instead");
                Disk::FileSizeLimit { dir, pid: None }
            }
        }
    }

    fn home(&self) -> PathBuf {
        match self {
            Disk::Tmpfs { mount, .. } => mount.join("home"),
            Disk::FileSizeLimit { dir, .. } => dir.path().join("home"),
        }
    }

    fn attach(&mut self, daemon: &Daemon) {
        if let Disk::FileSizeLimit { pid, .. } = self {
            *pid = Some(daemon.pid());
        }
    }

    fn fill(&self) {
        match self {
            Disk::Tmpfs { mount, .. } => {
                let mut filler = std::fs::File::create(mount.join("filler")).unwrap();
                let chunk = vec![0x5a; 16 * 1024];
                while filler.write_all(&chunk).is_ok() {}
                let _ = filler.sync_all();
            }
            Disk::FileSizeLimit { pid, .. } => {
                let size = std::fs::metadata(self.home().join("capit.redb")).unwrap().len();
                set_file_size_limit(pid.unwrap(), size);
            }
        }
    }

    fn free(&self) {
        match self {
            Disk::Tmpfs { mount, .. } => std::fs::remove_file(mount.join("filler")).unwrap(),
            Disk::FileSizeLimit { pid, .. } => set_file_size_limit(pid.unwrap(), libc::RLIM_INFINITY),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Disk::Tmpfs { .. } => "a 4 MiB tmpfs",
            Disk::FileSizeLimit { .. } => "the daemon's file-size limit",
        }
    }
}

fn set_file_size_limit(pid: u32, bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on another process of ours, with a limit struct and no old-limit output.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Disk::Tmpfs { mount, .. } = self {
            let _ = Command::new("umount").arg("-l").arg(&*mount).status();
        }
    }
}

#[test]
fn a_full_disk_refuses_metered_requests_with_503_and_service_resumes_by_itself_once_freed() {
    let fake = Fake::openai();
    let mut disk = Disk::new();
    let daemon = Daemon::start_full(Some(disk.home()), &[], "info", &[]);
    disk.attach(&daemon);
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.setup_provider("anthropic", &fake.base_url(), "sk-ant-MASTERkey0123456789abcdefWXYZ");
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--cached-input", "0.275", "--output", "4.40"]);
    fake.set_price("test-model", "1.10", "0.275", "4.40");
    let key = daemon.grant("evals", "100", &["--provider", "openai", "--period", "total"]);
    let claude = daemon.grant("claude", "100", &["--provider", "anthropic", "--period", "total"]);
    let rt = runtime();
    let url = chat_url(&daemon);
    for _ in 0..3 {
        assert_eq!(rt.block_on(post_json(&url, &key, PLAIN)).status, 200);
    }

    disk.fill();
    // Requests go on while the store still has room in its file; the first write that needs
    // more fails, and from then on metered requests are refused.
    let mut served_while_filling = 0;
    let refused = loop {
        let reply = rt.block_on(post_json(&url, &key, PLAIN));
        match reply.status {
            200 => served_while_filling += 1,
            503 => break reply,
            other => panic!("a request during the fill got {other}: {}", reply.text()),
        }
        assert!(served_while_filling < 20_000, "the disk never filled: {}", daemon.log_text());
    };
    eprintln!("{}: {served_while_filling} requests served after the fill before the ledger could not be written", disk.what());
    assert!(refused.error_message().contains("capit cannot write its ledger (disk full?)"), "{}", refused.text());
    assert_eq!(refused.headers["retry-after"], "5");
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["store"]["writable"], false, "{status}");
    assert!(status["store"]["failing_since"].is_string(), "{status}");
    assert!(daemon.ctl_ok(&["status"]).contains("LEDGER CANNOT BE WRITTEN"));

    // While it lasts, nothing goes upstream unmetered, whatever the provider; free calls (model
    // lists) still work; control changes fail with a clear error and change nothing.
    let seen = fake.received().len();
    for _ in 0..3 {
        assert_eq!(rt.block_on(post_json(&url, &key, PLAIN)).status, 503);
    }
    let messages = r#"{"model":"test-model","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let anthropic = rt.block_on(http::send(
        Method::POST,
        &daemon.url("/anthropic/v1/messages"),
        &[("x-api-key", &claude), ("anthropic-version", "2023-06-01")],
        messages,
    ));
    assert_eq!(anthropic.status, 503);
    assert_eq!(anthropic.json()["error"]["type"], "api_error", "{}", anthropic.text());
    assert_eq!(fake.received().len(), seen, "no metered request reached the upstream during the outage");
    let models = rt.block_on(http::send(Method::GET, &daemon.url("/openai/v1/models"), &[("authorization", &format!("Bearer {key}"))], ""));
    assert_eq!(models.status, 200, "{}", models.text());
    let err = daemon.ctl_err(&["grant", "late", "1", "--provider", "openai", "--no-install"]);
    assert!(err.contains("disk full?"), "{err}");

    disk.free();
    let resumed = wait_for("service to resume by itself", Duration::from_secs(30), || {
        let reply = rt.block_on(post_json(&url, &key, PLAIN));
        (reply.status == 200).then_some(reply)
    });
    assert_eq!(resumed.status, 200);
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["store"]["writable"], true, "{status}");
    assert_eq!(status["store"]["outages_recovered"], 1, "{status}");

    // Nothing lost, nothing twice: the ledger is what the upstream billed, request for request.
    let usage = daemon.ctl_json(&["usage", "evals"]);
    assert_eq!(dec(usage["spent"].as_str().unwrap()), fake.bill(), "{usage}");
    assert_eq!(usage["requests"].as_u64().unwrap() as usize, fake.billed_requests(), "{usage}");
    assert!(daemon.log_text().contains("the ledger can be written again"), "{}", daemon.log_text());
    drop(daemon);
}
