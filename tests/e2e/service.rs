//! capitd as a service: the generated systemd unit passes `systemd-analyze verify` (and its
//! exposure is reported), the generated launchd plist parses, `service install` works against
//! the real user manager where one runs and falls back in one line where none does, and capitd
//! started from the unit's own ExecStart line tells systemd READY=1 only once it answers.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::daemon::{CAPITCTL, Daemon};
use crate::support::{TempDir, runtime};

/// capitctl with HOME, the data dir and the runtime dir all inside `dir`, so nothing of the
/// user's own is read or written.
fn ctl_in(dir: &Path, args: &[&str]) -> Output {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    Command::new(CAPITCTL)
        .args(args)
        .env("HOME", dir)
        .env("CAPIT_HOME", dir.join("data"))
        .env("XDG_RUNTIME_DIR", &run)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CAPIT_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("running capitctl")
}

#[track_caller]
fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "capitctl failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The unit (or plist) `service install --dry-run` would write.
fn dry_run(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["service", "install", "--dry-run", "--json", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    json_of(&ctl_in(dir, &args))
}

fn systemd_analyze_present() -> bool {
    let present = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !present {
        assert!(std::env::var_os("CAPIT_REQUIRE_SYSTEMD").is_none(), "CAPIT_REQUIRE_SYSTEMD is set but systemd-analyze is missing");
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
    }
    present
}

/// Splits an ExecStart= value the way systemd does for what capitctl writes: words separated
/// by spaces, double quotes with `\"` and `\\` inside, `%%` and `$$` for literal `%` and `$`.
fn systemd_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => word.push(chars.next().unwrap()),
                    c => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word.replace("%%", "%").replace("$$", "$"));
    }
    words
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_its_exposure_is_reported() {
    let dir = TempDir::new();
    let doc = dry_run(dir.path(), &["--", "--on-alert", "echo \"$CAPIT_GRANT at $CAPIT_PERCENT%\""]);
    assert_eq!(doc["manager"], "systemd");
    assert_eq!(doc["path"].as_str().unwrap(), dir.path().join(".config/systemd/user/capitd.service").to_str().unwrap());
    let text = doc["text"].as_str().unwrap();
    // The test's socket is in CAPIT_HOME, so the unit claims no runtime directory of its own.
    for line in ["Type=notify", "Restart=on-failure", "UMask=0077", "RuntimeDirectory=", "[Install]", "WantedBy=default.target"] {
        assert!(text.lines().any(|l| l == line), "{line} is missing from:\n{text}");
    }
    let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let argv: Vec<String> = doc["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    assert_eq!(systemd_words(exec), argv, "ExecStart reads back as the command capitctl meant");
    assert!(Path::new(&argv[0]).is_absolute() && argv[0].ends_with("/capitd"));
    assert!(text.contains(&format!("ReadWritePaths={}", dir.path().join("data").display())), "{text}");
    assert!(!dir.path().join(".config").exists(), "--dry-run writes nothing");
    // With the default paths, the socket lives in the unit's own runtime directory.
    let run = dir.path().join("run");
    let out = Command::new(CAPITCTL)
        .args(["service", "install", "--dry-run", "--json"])
        .env("HOME", dir.path())
        .env("XDG_RUNTIME_DIR", &run)
        .env_remove("CAPIT_HOME")
        .env_remove("CAPIT_SOCKET")
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    let default = json_of(&out);
    let default_text = default["text"].as_str().unwrap();
    assert!(default_text.lines().any(|l| l == "RuntimeDirectory=capit"), "{default_text}");
    assert!(default_text.contains(&format!("ReadWritePaths={}\n", dir.path().join(".local/share/capit").display())), "{default_text}");
    let argv: Vec<&str> = default["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let socket = run.join("capit/capitd.sock");
    assert!(argv.windows(2).any(|w| w == ["--socket", socket.to_str().unwrap()]), "{argv:?}");
    assert!(argv.windows(2).any(|w| w == ["--listen", "127.0.0.1:8787"]), "{argv:?}");
    if !systemd_analyze_present() {
        return;
    }
    let unit = dir.path().join("capitd.service");
    std::fs::write(&unit, text).unwrap();
    let analyze = |args: &[&str]| {
        Command::new("systemd-analyze").args(args).arg(&unit).env("XDG_RUNTIME_DIR", dir.path().join("run")).output().unwrap()
    };
    let verify = analyze(&["--user", "verify"]);
    assert!(verify.status.success(), "systemd-analyze verify failed: {}", String::from_utf8_lossy(&verify.stderr));
    assert_eq!(String::from_utf8_lossy(&verify.stderr), "", "systemd-analyze verify has something to say");
    let security = analyze(&["--user", "security", "--offline=yes", "--no-pager"]);
    let report = String::from_utf8_lossy(&security.stdout);
    let line = report.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("no exposure in: {report}"));
    eprintln!("systemd-analyze security --offline=yes: {}", line.trim());
    let score: f64 = line.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(score <= 3.0, "the unit's exposure grew to {score}; was 2.1 when the sandboxing was written: {report}");
}

#[test]
fn the_launchd_plist_parses_and_has_the_agent_s_keys() {
    let dir = TempDir::new();
    let doc = dry_run(dir.path(), &["--manager", "launchd"]);
    assert_eq!(doc["path"].as_str().unwrap(), dir.path().join("Library/LaunchAgents/dev.capit.capitd.plist").to_str().unwrap());
    let plist = plist::Value::from_reader_xml(doc["text"].as_str().unwrap().as_bytes()).expect("the plist parses");
    let dict = plist.as_dictionary().unwrap();
    assert_eq!(dict["Label"].as_string(), Some("dev.capit.capitd"));
    let args: Vec<&str> = dict["ProgramArguments"].as_array().unwrap().iter().map(|v| v.as_string().unwrap()).collect();
    let argv: Vec<&str> = doc["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, argv);
    assert!(args.windows(2).any(|w| w == ["--listen", "127.0.0.1:0"]));
    assert_eq!(dict["RunAtLoad"].as_boolean(), Some(true));
    assert_eq!(dict["KeepAlive"].as_dictionary().unwrap()["SuccessfulExit"].as_boolean(), Some(false), "restarted only after a failure");
    assert_eq!(dict["Umask"].as_signed_integer(), Some(0o077));
    let logs = dir.path().join("Library/Logs/capit/capitd.log");
    assert_eq!(dict["StandardErrorPath"].as_string(), logs.to_str());
    assert_eq!(dict["StandardOutPath"].as_string(), logs.to_str());
}

fn user_manager_answers() -> bool {
    Command::new("systemctl").args(["--user", "show-environment"]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn install_and_uninstall_go_through_the_user_manager_or_say_in_one_line_there_is_none() {
    if cfg!(target_os = "macos") {
        return;
    }
    let dir = TempDir::new();
    if user_manager_answers() {
        // The real manager reads the real ~/.config, so only the data and the unit's name are the test's own.
        let name = format!("capitd-test-{}", std::process::id());
        let ctl = |args: &[&str]| {
            Command::new(CAPITCTL).args(args).env("CAPIT_HOME", dir.path().join("data")).env_remove("CAPIT_SOCKET").output().unwrap()
        };
        let installed = json_of(&ctl(&["service", "install", "--name", &name, "--listen", "127.0.0.1:0", "--json"]));
        let file = installed["path"].as_str().unwrap().to_string();
        let status = json_of(&ctl(&["service", "status", "--name", &name, "--json"]));
        let uninstalled = ctl(&["service", "uninstall", "--name", &name]);
        assert_eq!(status["daemon"]["pid"], installed["pid"], "{status}");
        assert_eq!(status["daemon"]["foreground"], false);
        assert!(uninstalled.status.success(), "{}", String::from_utf8_lossy(&uninstalled.stderr));
        assert!(!Path::new(&file).exists());
        return;
    }
    let out = ctl_in(dir.path(), &["service", "install"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no user service manager answers here"), "{stderr}");
    assert!(stderr.trim_end().ends_with("run capitd in the foreground instead: capitd"), "{stderr}");
    assert!(!dir.path().join(".config").exists(), "nothing is written where there is no service manager");
    assert!(!dir.path().join("data").exists());
    let status = String::from_utf8(ctl_in(dir.path(), &["service", "status"]).stdout).unwrap();
    assert!(status.starts_with("service: no user service manager answers here"), "{status}");
    assert!(status.contains("daemon:  not running"), "{status}");
    let out = ctl_in(dir.path(), &["service", "uninstall"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no capitd service is installed"));
}

#[test]
fn install_beside_a_daemon_in_the_foreground_says_so_and_starts_nothing() {
    let daemon = Daemon::start();
    let out = Command::new(CAPITCTL)
        .args(["service", "install"])
        .env("HOME", daemon.dir.path())
        .env("CAPIT_HOME", &daemon.home)
        .env_remove("CAPIT_SOCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("capitd is already running in the foreground (pid {}", daemon.pid())), "{stderr}");
    assert!(!daemon.dir.path().join(".config").exists());
    let status = String::from_utf8(
        Command::new(CAPITCTL)
            .args(["service", "status"])
            .env("HOME", daemon.dir.path())
            .env("CAPIT_HOME", &daemon.home)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(status.contains(&format!("pid {}", daemon.pid())) && status.contains("in the foreground"), "{status}");
}

#[test]
fn capitd_from_the_unit_s_exec_start_says_ready_once_it_answers_and_stopping_at_the_end() {
    let dir = TempDir::new();
    let doc = dry_run(dir.path(), &[]);
    let text = doc["text"].as_str().unwrap();
    let argv = systemd_words(text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap());
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let log = std::fs::File::create(dir.path().join("capitd.log")).unwrap();
    // As systemd runs it: the command line alone, the notification socket in the environment.
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &notify)
        .env_remove("CAPIT_HOME")
        .env_remove("CAPIT_SOCKET")
        .env_remove("CAPIT_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = listener.recv(&mut buf).expect("capitd sent nothing to NOTIFY_SOCKET");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    let addr = message.split("proxy on http://").nth(1).and_then(|s| s.split(',').next()).unwrap_or_else(|| panic!("{message}"));
    // At READY=1 the proxy answers at once (a request without a key is refused by capitd itself)...
    let reply = runtime().block_on(crate::support::http::send(::http::Method::GET, &format!("http://{addr}/openai/v1/models"), &[], ""));
    assert_eq!(reply.status, 401, "{}", reply.text());
    // ...and so does the control socket the unit names.
    let socket = argv.iter().position(|a| a == "--socket").map(|i| argv[i + 1].clone()).unwrap();
    let status = Command::new(CAPITCTL).args(["--socket", &socket, "status", "--json"]).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = listener.recv(&mut buf).expect("capitd said nothing when it began to stop");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
    let mut log = String::new();
    std::fs::File::open(dir.path().join("capitd.log")).unwrap().read_to_string(&mut log).unwrap();
    assert!(!log.contains('\u{1b}'), "no colour codes in a log that is not a terminal: {log}");
}

#[test]
fn completions_and_man_pages_are_generated() {
    let out = Command::new(CAPITCTL).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("complete -F _capitctl"), "{script}");
    let loaded = Command::new("bash").arg("-c").arg(format!("{script}\ncomplete -p capitctl")).output().unwrap();
    assert!(
        String::from_utf8_lossy(&loaded.stdout).contains("capitctl"),
        "bash did not take the script: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = Command::new(CAPITCTL).args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("watch"), "{shell}");
    }
    for page in ["capitctl", "capitd"] {
        let man = String::from_utf8(Command::new(CAPITCTL).args(["man", page]).output().unwrap().stdout).unwrap();
        assert!(man.starts_with(".ie") || man.contains(&format!(".TH {page}")), "{man}");
    }
}
