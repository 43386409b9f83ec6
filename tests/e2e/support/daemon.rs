//! The real capitd, started in a temp home on a free port, and capitctl pointed at its socket.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{TempDir, wait_for};

pub const CAPITD: &str = env!("CARGO_BIN_EXE_capitd");

/// The variables that move an agent's configuration, unset unless a test sets them.
pub const AGENT_DIR_VARIABLES: [&str; 10] = [
    "CLAUDE_CONFIG_DIR",
    "CODEX_HOME",
    "XDG_CONFIG_HOME",
    "OPENCODE_CONFIG",
    "OPENCODE_CONFIG_DIR",
    "OPENCODE_CONFIG_CONTENT",
    "CONTINUE_GLOBAL_DIR",
    "OPENCLAW_CONFIG_PATH",
    "OPENCLAW_STATE_DIR",
    "OPENCLAW_PROFILE",
];
pub const CAPITCTL: &str = env!("CARGO_BIN_EXE_capitctl");

pub struct Daemon {
    child: Option<Child>,
    pub dir: TempDir,
    pub home: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub proxy: SocketAddr,
    args: Vec<String>,
    log_filter: String,
    /// Extra environment for capitd (set after the defaults above, so it can override them).
    env: Vec<(String, String)>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts capitd with extra flags and waits until its socket answers.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_logging(args, "debug")
    }

    /// Starts capitd with extra flags and a `CAPIT_LOG` filter.
    pub fn start_logging(args: &[&str], log_filter: &str) -> Daemon {
        Daemon::start_env(args, log_filter, &[])
    }

    /// Starts capitd with extra flags, a `CAPIT_LOG` filter and extra environment variables.
    pub fn start_env(args: &[&str], log_filter: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(None, args, log_filter, env)
    }

    /// Starts capitd with its data dir at `home` (a path the test prepared, such as a small
    /// mount), else in the temp dir.
    pub fn start_full(home: Option<PathBuf>, args: &[&str], log_filter: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = TempDir::new();
        let home = home.unwrap_or_else(|| dir.path().join("home"));
        let socket = home.join("capitd.sock");
        let log = dir.path().join("capitd.log");
        let mut daemon = Daemon {
            child: None,
            dir,
            home,
            socket,
            log,
            proxy: "127.0.0.1:0".parse().unwrap(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log_filter: log_filter.to_string(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        daemon.launch("127.0.0.1:0");
        daemon
    }

    fn launch(&mut self, listen: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(CAPITD)
            .args(["--listen", listen, "--home"])
            .arg(&self.home)
            .args(&self.args)
            .env_remove("CAPIT_SOCKET")
            .env_remove("CAPIT_LISTEN")
            // Tests never touch the keyring of the person running them; the keyring test gives
            // its daemon a private one.
            .env("CAPIT_KEY_STORAGE", "file")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CAPIT_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting capitd");
        self.child = Some(child);
        let status = wait_for("capitd to answer on its socket", Duration::from_secs(30), || {
            if let Some(exit) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("capitd exited early with {exit}: {}", self.log_text());
            }
            let out = self.ctl(&["status", "--json"]);
            out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
        });
        self.proxy = status["listen_addr"].as_str().unwrap().parse().unwrap();
    }

    /// Stops with SIGTERM and starts again on the same port and home.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(status.success(), "capitd exited with {status}: {}", self.log_text());
        self.relaunch();
    }

    /// Starts a daemon that has exited again, on the same port and home.
    pub fn relaunch(&mut self) {
        assert!(self.child.is_none(), "capitd is still running");
        let listen = self.proxy.to_string();
        self.launch(&listen);
    }

    /// Kills with SIGKILL (no chance to flush) and starts again on the same port and home.
    pub fn crash_and_restart(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let listen = self.proxy.to_string();
        self.launch(&listen);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit; asserts the socket file is gone afterwards.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("capitd is running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("capitd did not stop within 40 s of SIGTERM: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!self.socket.exists(), "the control socket was left behind");
        status
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "capitd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CAPITCTL);
        cmd.arg("--socket").arg(&self.socket).args(args).env_remove("CAPIT_SOCKET").env_remove("CAPIT_HOME");
        cmd
    }

    /// Runs capitctl as if HOME were `home` (and the agents' own directory variables unset).
    pub fn ctl_home(&self, home: &Path, args: &[&str]) -> Output {
        self.ctl_home_env(home, &[], args)
    }

    /// Runs capitctl as if HOME were `home`, with only the agents' directory variables in `env`.
    pub fn ctl_home_env(&self, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut command = self.ctl_command(args);
        command.env("HOME", home);
        for name in AGENT_DIR_VARIABLES {
            command.env_remove(name);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        command.stdin(Stdio::null()).output().expect("running capitctl")
    }

    /// Runs capitctl with no stdin.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).stdin(Stdio::null()).output().expect("running capitctl")
    }

    /// Runs capitctl with `input` piped to its stdin.
    pub fn ctl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self.ctl_command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs capitctl, asserting success; returns stdout.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(out.status.success(), "capitctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs capitctl with `--json`, asserting success; returns the document.
    #[track_caller]
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ctl_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("capitctl {args:?} printed bad JSON ({e}): {text}"))
    }

    /// Runs capitctl expecting failure; returns stderr.
    #[track_caller]
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(!out.status.success(), "capitctl {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }

    /// Stores a master key for `provider` through stdin and points it at `base_url`.
    pub fn setup_provider(&self, provider: &str, base_url: &str, master_key: &str) {
        let out = self.ctl_stdin(&["key", "add", provider], master_key);
        assert!(out.status.success(), "key add failed: {}", String::from_utf8_lossy(&out.stderr));
        self.ctl_ok(&["provider", "set", provider, "--base-url", base_url]);
    }

    /// Makes a grant and returns its virtual key.
    pub fn grant(&self, name: &str, amount: &str, extra: &[&str]) -> String {
        let mut args = vec!["grant", name, amount, "--no-install"];
        args.extend_from_slice(extra);
        let doc = self.ctl_json(&args);
        doc["key"].as_str().unwrap().to_string()
    }

    /// A grant's total spend from `capitctl usage --json`.
    pub fn spent(&self, grant: &str) -> rust_decimal::Decimal {
        super::dec(self.ctl_json(&["usage", grant])["spent"].as_str().unwrap())
    }

    pub fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
