//! `capitctl service install | uninstall | status`: capitd as a systemd user service (Linux)
//! or a launchd agent (macOS), from the templates in `systemd/` and `launchd/`.
//!
//! `install` fills the template with the installed capitd's absolute path and explicit flags,
//! writes it atomically where design.md says, and starts it through the service manager; a start
//! that fails is rolled back (the previous file, or none), so nothing half-installed is left.
//! Where no user service manager answers (a container, WSL without systemd) it writes nothing
//! and says, in one line, how to run capitd in the foreground. It never starts a second daemon
//! beside one already running in the foreground.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::json;

use capit::paths::PathEnv;
use capit::proto::v1 as pb;

use crate::cli::{InstallArgs, ServiceArgs, ServiceCommand};
use crate::consumers::files;
use crate::output;

const SYSTEMD_TEMPLATE: &str = include_str!("../systemd/capitd.service");
const LAUNCHD_TEMPLATE: &str = include_str!("../launchd/dev.capit.capitd.plist");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    Systemd,
    Launchd,
}

impl Manager {
    fn of_platform() -> Manager {
        if cfg!(target_os = "macos") { Manager::Launchd } else { Manager::Systemd }
    }

    fn parse(text: &str) -> anyhow::Result<Manager> {
        match text {
            "systemd" => Ok(Manager::Systemd),
            "launchd" => Ok(Manager::Launchd),
            other => bail!("unknown service manager {other:?}; use systemd or launchd"),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Manager::Systemd => "systemd",
            Manager::Launchd => "launchd",
        }
    }
}

/// Where everything goes, worked out from the environment capitctl runs in.
struct Layout {
    manager: Manager,
    /// The unit's name (`capitd`) or the agent's label (`dev.capit.capitd`).
    name: String,
    file: PathBuf,
    capitd: PathBuf,
    /// capitd's flags (without the program).
    args: Vec<String>,
    data_dir: PathBuf,
    socket: PathBuf,
    /// Directories the unit makes writable.
    writable: Vec<PathBuf>,
    /// Whether the socket is in `$XDG_RUNTIME_DIR/capit`, the unit's own runtime directory.
    runtime_socket: bool,
    log_dir: PathBuf,
}

impl Layout {
    fn new(args: &ServiceArgs, socket_flag: Option<&Path>, listen: &str, extra: &[String]) -> anyhow::Result<Layout> {
        let manager = match &args.manager {
            Some(text) => Manager::parse(text)?,
            None => Manager::of_platform(),
        };
        let env = PathEnv::from_process();
        let home = env.home.clone().context("HOME is not set")?;
        let data_dir = env.data_dir().context("cannot find the data directory: set CAPIT_HOME or HOME")?;
        let socket = socket_flag.map(Path::to_path_buf).or_else(|| env.socket_path()).context("cannot find the control socket path")?;
        let capitd = capitd_path()?;
        let name = match manager {
            Manager::Systemd => args.name.clone(),
            Manager::Launchd => format!("dev.capit.{}", args.name),
        };
        let file = match manager {
            Manager::Systemd => {
                let config =
                    std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).filter(|p| p.is_absolute()).unwrap_or(home.join(".config"));
                config.join("systemd/user").join(format!("{name}.service"))
            }
            Manager::Launchd => home.join("Library/LaunchAgents").join(format!("{name}.plist")),
        };
        let mut flags = vec!["--listen".to_string(), listen.to_string(), "--home".to_string(), path_text(&data_dir)?];
        flags.extend(["--socket".to_string(), path_text(&socket)?]);
        flags.extend(extra.iter().cloned());
        // The socket's directory is the unit's RuntimeDirectory when it is the default one.
        let runtime_socket_dir = env.xdg_runtime_dir.as_ref().map(|r| r.join("capit"));
        let runtime_socket = socket.parent().is_some() && socket.parent() == runtime_socket_dir.as_deref();
        let mut writable = vec![data_dir.clone()];
        if let Some(dir) = socket.parent()
            && !runtime_socket
            && !dir.starts_with(&data_dir)
        {
            writable.push(dir.to_path_buf());
        }
        let log_dir = home.join("Library/Logs/capit");
        Ok(Layout { manager, name, file, capitd, args: flags, data_dir, socket, writable, runtime_socket, log_dir })
    }

    fn render(&self) -> anyhow::Result<String> {
        Ok(match self.manager {
            Manager::Systemd => {
                let exec: Vec<String> =
                    std::iter::once(path_text(&self.capitd)?).chain(self.args.iter().cloned()).map(|a| systemd_quote(&a)).collect();
                let writable: Vec<String> =
                    self.writable.iter().map(|p| path_text(p).map(|t| systemd_quote(&t))).collect::<Result<_, _>>()?;
                SYSTEMD_TEMPLATE
                    .replace("@EXEC_START@", &exec.join(" "))
                    .replace("@READ_WRITE_PATHS@", &writable.join(" "))
                    .replace("@RUNTIME_DIRECTORY@", if self.runtime_socket { "capit" } else { "" })
            }
            Manager::Launchd => {
                let program = std::iter::once(path_text(&self.capitd)?).chain(self.args.iter().cloned());
                let lines: Vec<String> = program.map(|a| format!("    <string>{}</string>", xml_escape(&a))).collect();
                LAUNCHD_TEMPLATE
                    .replace("@LABEL@", &xml_escape(&self.name))
                    .replace("@PROGRAM_ARGUMENTS@", &lines.join("\n"))
                    .replace("@LOG_DIR@", &xml_escape(&path_text(&self.log_dir)?))
            }
        })
    }

    fn unit(&self) -> String {
        format!("{}.service", self.name)
    }
}

/// capitd beside this capitctl (`cargo install` puts both in one directory).
fn capitd_path() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding capitctl's own path")?;
    let capitd = me.with_file_name("capitd");
    if !capitd.is_file() {
        bail!("capitd is not next to capitctl (no {}); install both with: cargo install --locked --path .", capitd.display());
    }
    capitd.canonicalize().with_context(|| format!("resolving {}", capitd.display()))
}

fn path_text(path: &Path) -> anyhow::Result<String> {
    path.to_str().map(str::to_string).ok_or_else(|| anyhow!("{} is not valid UTF-8", path.display()))
}

/// One word of a unit file's command line or path list: quoted where it needs to be, with
/// systemd's specifier (`%`) and variable (`$`) characters doubled so they stay literal.
pub fn systemd_quote(word: &str) -> String {
    let literal = word.replace('%', "%%").replace('$', "$$");
    let plain = !literal.is_empty() && literal.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c));
    if plain {
        return literal;
    }
    let mut out = String::from("\"");
    for c in literal.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A command's outcome: success, and its output for messages.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(program: &str, args: &[&str]) -> Ran {
    match Command::new(program).args(args).stdin(std::process::Stdio::null()).output() {
        Ok(out) => Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        },
        Err(e) => Ran { ok: false, stdout: String::new(), stderr: format!("{program}: {e}") },
    }
}

fn first_line(text: &str) -> &str {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or("no answer").trim()
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// `Err(reason)` when no user service manager answers.
fn manager_answers(manager: Manager) -> Result<(), String> {
    let ran = match manager {
        Manager::Systemd => run("systemctl", &["--user", "show-environment"]),
        Manager::Launchd => run("launchctl", &["print", &format!("gui/{}", uid())]),
    };
    if ran.ok { Ok(()) } else { Err(first_line(&ran.stderr).to_string()) }
}

fn no_manager(manager: Manager, reason: &str) -> anyhow::Error {
    let asked = match manager {
        Manager::Systemd => "systemctl --user",
        Manager::Launchd => "launchctl",
    };
    anyhow!("no user service manager answers here ({asked}: {reason}); run capitd in the foreground instead: capitd")
}

/// The daemon answering on the socket, if any: its status and its process id.
struct Running {
    status: pb::GetStatusResponse,
    pid: Option<i32>,
}

async fn running(socket: &Path) -> Option<Running> {
    if !socket.exists() {
        return None;
    }
    let pid = tokio::net::UnixStream::connect(socket).await.ok()?.peer_cred().ok()?.pid();
    let mut client = crate::cmd::connect(socket).await.ok()?;
    let status = client.get_status(pb::GetStatusRequest {}).await.ok()?.into_inner();
    Some(Running { status, pid })
}

/// The pid the service manager runs the service as, if it runs.
fn service_pid(layout: &Layout) -> Option<i32> {
    match layout.manager {
        Manager::Systemd => {
            let ran = run("systemctl", &["--user", "show", "-p", "MainPID", "--value", &layout.unit()]);
            ran.stdout.trim().parse().ok().filter(|pid| *pid > 0)
        }
        Manager::Launchd => {
            let ran = run("launchctl", &["print", &format!("gui/{}/{}", uid(), layout.name)]);
            ran.stdout.lines().find_map(|l| l.trim().strip_prefix("pid = ")).and_then(|p| p.trim().parse().ok())
        }
    }
}

pub async fn service(cmd: ServiceCommand, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Install(args) => install(args, socket.as_deref(), json).await,
        ServiceCommand::Uninstall(args) => uninstall(args, socket.as_deref(), json).await,
        ServiceCommand::Status(args) => status(args, socket.as_deref(), json).await,
    }
}

async fn install(args: InstallArgs, socket: Option<&Path>, json: bool) -> anyhow::Result<()> {
    capit::proxy::check_listen_addr(
        args.listen.parse().with_context(|| format!("--listen {:?} is not an address such as 127.0.0.1:8787", args.listen))?,
    )
    .map_err(|e| anyhow!(e))?;
    let layout = Layout::new(&args.service, socket, &args.listen, &args.capitd_flags)?;
    let text = layout.render()?;
    if args.dry_run {
        if json {
            let mut argv = vec![path_text(&layout.capitd)?];
            argv.extend(layout.args.iter().cloned());
            output::json(&json!({"manager": layout.manager.as_str(), "path": layout.file, "text": text, "argv": argv}));
        } else {
            print!("{text}");
        }
        return Ok(());
    }
    if layout.manager != Manager::of_platform() {
        bail!("{} is not this platform's service manager; --manager is for --dry-run", layout.manager.as_str());
    }
    let answers = manager_answers(layout.manager);
    let service_pid = if answers.is_ok() { service_pid(&layout) } else { None };
    // A daemon that answers but is not the service's runs in the foreground: never start a second.
    if let Some(daemon) = running(&layout.socket).await
        && (daemon.pid.is_none() || daemon.pid != service_pid)
    {
        bail!(
            "capitd is already running in the foreground (pid {}, proxy on http://{}); stop it first, then run capitctl service install again",
            daemon.pid.map_or("unknown".to_string(), |p| p.to_string()),
            daemon.status.listen_addr
        );
    }
    answers.map_err(|reason| no_manager(layout.manager, &reason))?;
    for dir in std::iter::once(layout.data_dir.as_path()).chain(layout.writable.iter().map(PathBuf::as_path)).chain(layout.socket.parent())
    {
        private_dir(dir)?;
    }
    let previous = files::read(&layout.file).with_context(|| format!("reading {}", layout.file.display()))?;
    let unchanged = previous.as_deref() == Some(text.as_str());
    files::write_atomic(&layout.file, &text, false).map(drop).with_context(|| format!("writing {}", layout.file.display()))?;
    let started = match layout.manager {
        Manager::Systemd => start_systemd(&layout, service_pid.is_some() && !unchanged),
        Manager::Launchd => start_launchd(&layout),
    };
    if let Err(e) = started {
        roll_back(&layout, previous.as_deref());
        return Err(e);
    }
    let Some(daemon) = wait_for_daemon(&layout.socket, Duration::from_secs(15)).await else {
        roll_back(&layout, previous.as_deref());
        bail!("capitd started as a service but did not answer on {} within 15 s; {}", layout.socket.display(), logs_hint(&layout));
    };
    let detail =
        format!("{} {} ({}); proxy on {}", layout.manager.as_str(), layout.name, path_text(&layout.capitd)?, daemon.status.listen_addr);
    record(&layout.socket, "service.install", &layout.file, &detail).await;
    let linger = linger_hint(layout.manager);
    if json {
        output::json(&json!({
            "manager": layout.manager.as_str(), "name": layout.name, "path": layout.file, "listen_addr": daemon.status.listen_addr,
            "pid": daemon.pid, "linger_hint": linger,
        }));
        return Ok(());
    }
    let what = match layout.manager {
        Manager::Systemd => format!("the systemd user service {}", layout.unit()),
        Manager::Launchd => format!("the launchd agent {}", layout.name),
    };
    println!(
        "capitd runs as {what} (pid {}, proxy on http://{}); it starts at login and restarts if it fails",
        daemon.pid.map_or("?".to_string(), |p| p.to_string()),
        daemon.status.listen_addr
    );
    if let Some(hint) = linger {
        println!("{hint}");
    }
    Ok(())
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("making {} private", dir.display()))
}

fn start_systemd(layout: &Layout, restart: bool) -> anyhow::Result<()> {
    let unit = layout.unit();
    let step = |args: &[&str]| -> anyhow::Result<()> {
        let ran = run("systemctl", args);
        if ran.ok {
            Ok(())
        } else {
            Err(anyhow!("systemctl {} failed: {}; {}", args.join(" "), first_line(&ran.stderr), logs_hint(layout)))
        }
    };
    step(&["--user", "daemon-reload"])?;
    // Type=notify: these return once capitd has said READY=1 (or failed).
    step(&["--user", "enable", "--now", &unit])?;
    if restart {
        step(&["--user", "restart", &unit])?;
    }
    Ok(())
}

fn start_launchd(layout: &Layout) -> anyhow::Result<()> {
    private_dir(&layout.log_dir)?;
    let domain = format!("gui/{}", uid());
    let target = format!("{domain}/{}", layout.name);
    // A loaded older version goes first; bootstrap refuses a label that is already loaded.
    let _ = run("launchctl", &["bootout", &target]);
    let file = path_text(&layout.file)?;
    let ran = run("launchctl", &["bootstrap", &domain, &file]);
    if !ran.ok {
        bail!("launchctl bootstrap {domain} {file} failed: {}; {}", first_line(&ran.stderr), logs_hint(layout));
    }
    let ran = run("launchctl", &["kickstart", "-k", &target]);
    if !ran.ok {
        bail!("launchctl kickstart -k {target} failed: {}; {}", first_line(&ran.stderr), logs_hint(layout));
    }
    Ok(())
}

/// Puts back what was there before a failed install: the previous file, or none.
fn roll_back(layout: &Layout, previous: Option<&str>) {
    match layout.manager {
        Manager::Systemd => {
            let _ = run("systemctl", &["--user", "disable", "--now", &layout.unit()]);
        }
        Manager::Launchd => {
            let _ = run("launchctl", &["bootout", &format!("gui/{}/{}", uid(), layout.name)]);
        }
    }
    let _ = match previous {
        Some(text) => files::write_atomic(&layout.file, text, false).map(drop),
        None => std::fs::remove_file(&layout.file),
    };
    if layout.manager == Manager::Systemd {
        let _ = run("systemctl", &["--user", "daemon-reload"]);
        if previous.is_some() {
            let _ = run("systemctl", &["--user", "enable", "--now", &layout.unit()]);
        }
    }
}

fn logs_hint(layout: &Layout) -> String {
    match layout.manager {
        Manager::Systemd => format!("see: journalctl --user -u {} -n 50", layout.unit()),
        Manager::Launchd => format!("see: {}/capitd.log", layout.log_dir.display()),
    }
}

async fn wait_for_daemon(socket: &Path, limit: Duration) -> Option<Running> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(daemon) = running(socket).await {
            return Some(daemon);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records a service change in the daemon's audit log; a daemon that does not answer cannot
/// keep it, which is said on stderr.
async fn record(socket: &Path, action: &str, file: &Path, detail: &str) {
    let request = pb::RecordChangeRequest { action: action.to_string(), target: file.display().to_string(), detail: detail.to_string() };
    let recorded = match crate::cmd::connect(socket).await {
        Ok(mut client) => client.record_change(request).await.map(drop).map_err(|e| e.message().to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = recorded {
        eprintln!("capitctl: {action} was not written to the audit log: {}", output::one_line(&e));
    }
}

/// Where a user manager stops at logout, agents that run without a login session lose capitd.
fn linger_hint(manager: Manager) -> Option<String> {
    if manager != Manager::Systemd {
        return None;
    }
    let ran = run("loginctl", &["show-user", &uid().to_string(), "-p", "Linger", "--value"]);
    (ran.ok && ran.stdout.trim() == "no").then(|| {
        "capitd stops when you log out; for agents that run without a login session (cron, ssh, CI), keep it running with: loginctl enable-linger"
            .to_string()
    })
}

async fn uninstall(args: ServiceArgs, socket: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let layout = Layout::new(&args, socket, "127.0.0.1:8787", &[])?;
    if !layout.file.exists() {
        bail!("no capitd service is installed (no {})", layout.file.display());
    }
    let manager = manager_answers(layout.manager);
    if manager.is_ok() && service_pid(&layout).is_some() {
        record(
            &layout.socket,
            "service.uninstall",
            &layout.file,
            &format!("{} {} stopped and removed", layout.manager.as_str(), layout.name),
        )
        .await;
    }
    if manager.is_ok() {
        let ran = match layout.manager {
            Manager::Systemd => run("systemctl", &["--user", "disable", "--now", &layout.unit()]),
            Manager::Launchd => run("launchctl", &["bootout", &format!("gui/{}/{}", uid(), layout.name)]),
        };
        if !ran.ok && layout.manager == Manager::Systemd {
            bail!("systemctl --user disable --now {} failed: {}", layout.unit(), first_line(&ran.stderr));
        }
    }
    std::fs::remove_file(&layout.file).with_context(|| format!("removing {}", layout.file.display()))?;
    if manager.is_ok() && layout.manager == Manager::Systemd {
        let _ = run("systemctl", &["--user", "daemon-reload"]);
    }
    if json {
        output::json(&json!({"manager": layout.manager.as_str(), "name": layout.name, "removed": layout.file}));
    } else {
        println!(
            "stopped capitd and removed {}; it no longer starts at login (run it in the foreground with: capitd)",
            layout.file.display()
        );
    }
    Ok(())
}

async fn status(args: ServiceArgs, socket: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let layout = Layout::new(&args, socket, "127.0.0.1:8787", &[])?;
    let manager = manager_answers(layout.manager);
    let service = match &manager {
        Ok(()) => Some(service_view(&layout)),
        Err(_) => None,
    };
    let daemon = running(&layout.socket).await;
    let pid = service.as_ref().and_then(|s| s.pid);
    let foreground = daemon.as_ref().is_some_and(|d| d.pid.is_none() || d.pid != pid);
    if json {
        output::json(&json!({
            "manager": layout.manager.as_str(),
            "manager_answers": manager.is_ok(),
            "manager_error": manager.as_ref().err(),
            "installed": layout.file.exists(),
            "path": layout.file,
            "service": service.as_ref().map(|s| json!({"state": s.state, "enabled": s.enabled, "pid": s.pid})),
            "daemon": daemon.as_ref().map(|d| json!({
                "version": d.status.version, "pid": d.pid, "uptime_seconds": d.status.uptime_seconds,
                "listen_addr": d.status.listen_addr, "foreground": foreground,
            })),
        }));
        return Ok(());
    }
    match (&manager, &service) {
        (Err(reason), _) => println!("service: no user service manager answers here ({reason})"),
        (Ok(()), Some(s)) if layout.file.exists() => println!(
            "service: {} {}, {}{}; {}",
            layout.name,
            s.state,
            s.enabled,
            s.pid.map_or(String::new(), |p| format!(", pid {p}")),
            layout.file.display()
        ),
        (Ok(()), _) => println!("service: not installed (install it with: capitctl service install)"),
    }
    match &daemon {
        Some(d) => println!(
            "daemon:  capitd {} up {} s, pid {}, proxy on http://{}{}",
            d.status.version,
            d.status.uptime_seconds,
            d.pid.map_or("?".to_string(), |p| p.to_string()),
            d.status.listen_addr,
            if foreground { " (in the foreground, not as the service)" } else { "" }
        ),
        None => println!("daemon:  not running (nothing answers on {})", layout.socket.display()),
    }
    Ok(())
}

struct ServiceView {
    state: String,
    enabled: String,
    pid: Option<i32>,
}

fn service_view(layout: &Layout) -> ServiceView {
    match layout.manager {
        Manager::Systemd => {
            let ran = run(
                "systemctl",
                &["--user", "show", &layout.unit(), "-p", "ActiveState", "-p", "SubState", "-p", "UnitFileState", "-p", "MainPID"],
            );
            let value = |key: &str| ran.stdout.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).unwrap_or("").to_string();
            ServiceView {
                state: format!("{} ({})", value("ActiveState"), value("SubState")),
                enabled: if value("UnitFileState").is_empty() { "not installed".into() } else { value("UnitFileState") },
                pid: value("MainPID").parse().ok().filter(|p| *p > 0),
            }
        }
        Manager::Launchd => {
            let ran = run("launchctl", &["print", &format!("gui/{}/{}", uid(), layout.name)]);
            let field = |key: &str| ran.stdout.lines().find_map(|l| l.trim().strip_prefix(key)).map(|v| v.trim().to_string());
            ServiceView {
                state: if ran.ok { field("state = ").unwrap_or_else(|| "loaded".into()) } else { "not loaded".into() },
                enabled: if layout.file.exists() { "loaded at login".into() } else { "not installed".into() },
                pid: field("pid = ").and_then(|p| p.parse().ok()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_words_are_quoted_the_way_systemd_reads_them() {
        assert_eq!(systemd_quote("/usr/bin/capitd"), "/usr/bin/capitd");
        assert_eq!(systemd_quote("127.0.0.1:8787"), "127.0.0.1:8787");
        assert_eq!(systemd_quote("/home/a b/capit"), "\"/home/a b/capit\"");
        assert_eq!(systemd_quote("echo \"$CAPIT_GRANT\" 100%"), "\"echo \\\"$$CAPIT_GRANT\\\" 100%%\"");
        assert_eq!(systemd_quote(""), "\"\"");
    }

    #[test]
    fn the_plist_template_is_well_formed_once_filled() {
        let layout = Layout {
            manager: Manager::Launchd,
            name: "dev.capit.capitd".into(),
            file: "/Users/a/Library/LaunchAgents/dev.capit.capitd.plist".into(),
            capitd: "/Users/a/.cargo/bin/capitd".into(),
            args: vec!["--listen".into(), "127.0.0.1:8787".into(), "--on-alert".into(), "say <over> & \"out\"".into()],
            data_dir: "/Users/a/Library/Application Support/capit".into(),
            socket: "/Users/a/Library/Application Support/capit/capitd.sock".into(),
            writable: vec![],
            runtime_socket: false,
            log_dir: "/Users/a/Library/Logs/capit".into(),
        };
        let text = layout.render().unwrap();
        let value = plist::Value::from_reader_xml(text.as_bytes()).unwrap();
        let dict = value.as_dictionary().unwrap();
        let args: Vec<&str> = dict["ProgramArguments"].as_array().unwrap().iter().map(|v| v.as_string().unwrap()).collect();
        assert_eq!(args, ["/Users/a/.cargo/bin/capitd", "--listen", "127.0.0.1:8787", "--on-alert", "say <over> & \"out\""]);
        assert_eq!(dict["StandardErrorPath"].as_string(), Some("/Users/a/Library/Logs/capit/capitd.log"));
    }
}
