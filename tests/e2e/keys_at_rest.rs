//! Master keys at rest: with a keyring (a real Secret Service, gnome-keyring, on a private
//! D-Bus session bus) the database never holds a master key, only its sealed form, and the key
//! still works after a restart; a database whose keys are sealed does not start without its
//! keyring; without a keyring keys are kept as text, and `status` and `key ls` say so.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::metering::{MASTER, chat_url};
use crate::support::daemon::{CAPITD, Daemon};
use crate::support::http::post_json;
use crate::support::upstream::Fake;
use crate::support::{TempDir, runtime};

const PLAIN: &str = r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#;

/// A D-Bus session bus of the test's own with gnome-keyring's Secret Service on it, its login
/// keyring unlocked with a test password; gone (with the keyring daemon) when dropped.
struct PrivateKeyring {
    bus: Child,
    address: String,
    _dir: TempDir,
}

impl PrivateKeyring {
    /// `None` when dbus-daemon or gnome-keyring-daemon is not installed.
    fn start() -> Option<PrivateKeyring> {
        let dir = TempDir::new();
        let (home, runtime_dir) = (dir.path().join("home"), dir.path().join("run"));
        for d in [&home, &runtime_dir] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        }
        let mut bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut address = String::new();
        BufReader::new(bus.stdout.take().unwrap()).read_line(&mut address).unwrap();
        let address = address.trim().to_string();
        let keyring = Command::new("gnome-keyring-daemon")
            .args(["--unlock", "--components=secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut keyring) = keyring else {
            let _ = bus.kill();
            let _ = bus.wait();
            return None;
        };
        keyring.stdin.take().unwrap().write_all(b"capit-test-password").unwrap();
        // It forks its daemon and exits once the keyring is unlocked.
        assert!(keyring.wait().unwrap().success(), "gnome-keyring-daemon --unlock failed");
        Some(PrivateKeyring { bus, address, _dir: dir })
    }
}

impl Drop for PrivateKeyring {
    fn drop(&mut self) {
        // The keyring daemon leaves with the bus it serves.
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

fn keyring_or_skip() -> Option<PrivateKeyring> {
    let keyring = PrivateKeyring::start();
    if keyring.is_none() {
        assert!(
            std::env::var_os("CAPIT_REQUIRE_KEYRING").is_none(),
            "CAPIT_REQUIRE_KEYRING is set but dbus-daemon or gnome-keyring-daemon cannot be started"
        );
        eprintln!(
            "skipped: no dbus-daemon and gnome-keyring-daemon to give capitd a Secret Service (apt-get install dbus-daemon gnome-keyring)"
        );
    }
    keyring
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn with_a_keyring_the_database_never_holds_a_master_key() {
    let Some(keyring) = keyring_or_skip() else { return };
    let env = [("DBUS_SESSION_BUS_ADDRESS", keyring.address.as_str()), ("CAPIT_KEY_STORAGE", "keyring")];
    let fake = Fake::openai();
    let mut daemon = Daemon::start_env(&[], "debug", &env);
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1", "--output", "2"]);
    fake.set_price("test-model", "1", "1", "2");
    let keys = daemon.ctl_json(&["key", "ls"]);
    assert_eq!(keys[0]["at_rest"], "keyring", "{keys}");
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["key_storage"], "keyring", "{status}");
    assert!(daemon.ctl_ok(&["status"]).contains("sealed under a data key in the Secret Service"));

    let key = daemon.grant("evals", "5", &["--provider", "openai"]);
    let rt = runtime();
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN)).status, 200);
    daemon.restart();
    // After a restart the key is opened from the keyring again and still goes upstream.
    assert_eq!(rt.block_on(post_json(&chat_url(&daemon), &key, PLAIN)).status, 200);
    let received = fake.received();
    assert_eq!(received.len(), 2);
    assert!(received.iter().all(|r| r.header("authorization").as_deref() == Some(format!("Bearer {MASTER}").as_str())));
    let status = daemon.stop();
    assert!(status.success(), "{}", daemon.log_text());

    let file = std::fs::read(daemon.home.join("capit.redb")).unwrap();
    for part in [MASTER, &MASTER[8..28], &MASTER[MASTER.len() - 12..]] {
        assert!(!contains(&file, part), "the database holds {part:?} of the master key");
    }
    assert!(!contains(&daemon.log_text().into_bytes(), &MASTER[8..28]), "the log holds the master key");

    // Its keys sealed, the database does not start where the keyring cannot be reached.
    let out = Command::new(CAPITD)
        .args(["--listen", "127.0.0.1:0", "--home"])
        .arg(&daemon.home)
        .env("CAPIT_KEY_STORAGE", "auto")
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .env_remove("CAPIT_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sealed under it, and it cannot be reached"), "{stderr}");
    // With it, it does.
    daemon.relaunch();
    assert_eq!(daemon.ctl_json(&["key", "ls"])[0]["at_rest"], "keyring");
    drop(daemon);
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn without_a_keyring_keys_are_kept_as_text_and_status_says_so() {
    let daemon = Daemon::start_env(&[], "info", &[("CAPIT_KEY_STORAGE", "auto")]);
    let out = daemon.ctl_stdin(&["key", "add", "openai"], MASTER);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("as text in the database (no keyring)"));
    assert_eq!(daemon.ctl_json(&["key", "ls"])[0]["at_rest"], "file");
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["key_storage"], "file", "{status}");
    assert!(status["key_storage_detail"].as_str().unwrap().contains("0600"), "{status}");
    assert_eq!(Daemon::mode(&daemon.home.join("capit.redb")), 0o600);
}
