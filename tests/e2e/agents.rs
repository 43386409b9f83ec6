//! The real agents, installed from their registries at the versions `.ci/run` pins, each run
//! non-interactively with the configuration `capitctl grant` installed, against the fake
//! upstream behind the real proxy: on a machine with no configuration at all, and with a
//! realistic one (another provider's model selected, comments). Each run must print the fake's
//! reply, reach the fake only through the proxy (the master key on every request it received),
//! be billed by the fake exactly what the ledger says, and get its files back byte for byte on
//! revoke. An agent that is not installed is skipped with a line saying so, unless
//! `CAPIT_REQUIRE_AGENTS` is set.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::metering::MASTER;
use crate::support::TempDir;
use crate::support::daemon::{AGENT_DIR_VARIABLES, Daemon};
use crate::support::upstream::Fake;

/// One agent, and how to run it headless.
struct Agent {
    /// The grant's name, which picks the consumer (`capitctl grant NAME`).
    grant: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    provider: &'static str,
    /// Every model it may call, at list prices written here, independently of the daemon's
    /// table: (model, input, cached input, output), USD per million tokens.
    prices: &'static [(&'static str, &'static str, &'static str, &'static str)],
    /// The request every run must make, as `METHOD path`.
    call: &'static str,
}

/// Variables that would point an agent elsewhere than the grant, unset for every run.
const UNSET: [&str; 16] = [
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_BASE",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "OPENROUTER_API_KEY",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "AIDER_MODEL",
    "CN_API_KEY",
    "CONTINUE_API_KEY",
];

const ANTHROPIC_PRICES: &[(&str, &str, &str, &str)] = &[
    ("claude-opus-4-8", "5", "0.5", "25"),
    ("claude-opus-4-7", "5", "0.5", "25"),
    ("claude-opus-5", "5", "0.5", "25"),
    ("claude-sonnet-5", "3", "0.3", "15"),
    ("claude-sonnet-4-6", "3", "0.3", "15"),
    ("claude-sonnet-4-5", "3", "0.3", "15"),
    ("claude-haiku-4-5", "1", "0.1", "5"),
];

const CLAUDE: Agent = Agent {
    grant: "claude",
    program: "claude",
    args: &["-p", "say hello"],
    env: &[],
    provider: "anthropic",
    prices: ANTHROPIC_PRICES,
    call: "POST /v1/messages",
};

const CODEX: Agent = Agent {
    grant: "codex",
    program: "codex",
    args: &["exec", "--skip-git-repo-check", "say hello"],
    env: &[],
    provider: "openai",
    prices: &[("gpt-6.1-sol", "2", "0.1", "10"), ("gpt-5.5", "5", "0.5", "30"), ("gpt-5", "1.25", "0.125", "10")],
    call: "POST /v1/responses",
};

const GEMINI: Agent = Agent {
    grant: "gemini",
    program: "gemini",
    args: &["-p", "say hello"],
    // Headless runs need a trusted folder; trust is the user's own setting, not capit's.
    env: &[("GEMINI_CLI_TRUST_WORKSPACE", "true")],
    provider: "gemini",
    prices: &[
        ("gemini-3.5-flash-lite", "0.30", "0.03", "2.50"),
        ("gemini-3.8-flash", "0.75", "0.075", "3.75"),
        ("gemini-3.5-flash", "1.50", "0.15", "9"),
        ("gemini-3.1-pro-preview", "2", "0.2", "12"),
        ("gemini-2.5-pro", "1.25", "0.125", "10"),
        ("gemini-2.5-flash", "0.30", "0.03", "2.50"),
        ("gemini-2.5-flash-lite", "0.10", "0.01", "0.40"),
    ],
    call: "POST /v1beta/models/",
};

const AIDER: Agent = Agent {
    grant: "aider",
    program: "aider",
    args: &["--message", "say hello", "--no-git", "--yes-always", "--no-check-update", "--no-analytics", "--no-show-release-notes"],
    env: &[],
    provider: "openai",
    prices: &[("gpt-4o", "2.50", "1.25", "10"), ("gpt-4o-mini", "0.15", "0.075", "0.60")],
    call: "POST /v1/chat/completions",
};

const OPENCODE: Agent = Agent {
    grant: "opencode",
    program: "opencode",
    args: &["run", "say hello"],
    env: &[],
    provider: "anthropic",
    prices: ANTHROPIC_PRICES,
    call: "POST /v1/messages",
};

const CONTINUE: Agent = Agent {
    grant: "continue",
    program: "cn",
    args: &["-p", "say hello"],
    env: &[],
    provider: "anthropic",
    prices: ANTHROPIC_PRICES,
    call: "POST /v1/messages",
};

const OPENCLAW: Agent = Agent {
    grant: "openclaw",
    program: "openclaw",
    args: &["agent", "--local", "-m", "say hello", "--json"],
    env: &[],
    provider: "anthropic",
    prices: ANTHROPIC_PRICES,
    call: "POST /v1/messages",
};

/// Whether the agent's CLI runs here; when it does not, the test skips, unless
/// `CAPIT_REQUIRE_AGENTS` requires it: `1` requires every agent, a comma-separated list of
/// programs (what `.ci/install-agents` installed) those.
pub(crate) fn installed(program: &str) -> bool {
    let runs = std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success());
    if !runs {
        let required = std::env::var("CAPIT_REQUIRE_AGENTS").unwrap_or_default();
        let required = required == "1" || required.split(',').any(|p| p.trim() == program);
        assert!(!required, "CAPIT_REQUIRE_AGENTS requires {program}, which does not run");
        eprintln!("skipped: {program} is not installed (.ci/install-agents installs it)");
    }
    runs
}

/// Runs the agent as a user whose HOME is `home` would, in `home/work`, for at most two minutes,
/// with `env` on top (the agents' own directory variables); returns its stdout and stderr.
fn run(agent: &Agent, home: &Path, env: &[(&str, String)]) -> (String, String) {
    let work = home.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut command = std::process::Command::new(agent.program);
    command.args(agent.args).current_dir(&work).env("HOME", home);
    for name in UNSET.iter().chain(AGENT_DIR_VARIABLES.iter()) {
        command.env_remove(name);
    }
    for (name, value) in agent.env {
        command.env(name, value);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The header the proxy sets the master key in, for the provider's kind.
fn master_header(provider: &str) -> (&'static str, String) {
    match provider {
        "anthropic" => ("x-api-key", MASTER.to_string()),
        "gemini" => ("x-goog-api-key", MASTER.to_string()),
        _ => ("authorization", format!("Bearer {MASTER}")),
    }
}

/// Installs a grant for `agent` over `existing` files (paths under HOME), runs the agent, and
/// checks the run and the revoke. Returns the models the fake was asked for.
fn check(agent: &Agent, existing: &[(&str, &str)]) -> Option<Vec<String>> {
    check_in(agent, existing, &[])
}

/// As `check`, with directory variables (`{home}` stands for HOME) set for capitctl and the
/// agent alike.
fn check_in(agent: &Agent, existing: &[(&str, &str)], env: &[(&str, &str)]) -> Option<Vec<String>> {
    if !installed(agent.program) {
        return None;
    }
    let fake = Fake::openai();
    for (model, input, cached, output) in agent.prices {
        fake.set_price(model, input, cached, output);
    }
    let daemon = Daemon::start();
    daemon.setup_provider(agent.provider, &fake.base_url(), MASTER);
    let home = TempDir::new();
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.replace("{home}", home.path().to_str().unwrap()))).collect();
    let ctl_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for (path, text) in existing {
        let file = home.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, text).unwrap();
    }
    let out = daemon.ctl_home_env(home.path(), &ctl_env, &["grant", agent.grant, "20", "--json"]);
    assert!(out.status.success(), "grant {}: {}", agent.grant, String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let files: Vec<PathBuf> = doc["installed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| home.path().join(f["path"].as_str().unwrap().trim_start_matches("~/")))
        .collect();
    assert!(!files.is_empty(), "{doc}");
    let before = |file: &Path| existing.iter().find(|(p, _)| home.path().join(p) == file).map(|(_, t)| t.to_string());

    let (stdout, stderr) = run(agent, home.path(), &env);
    let received = fake.received();
    if std::env::var_os("CAPIT_SHOW_BODIES").is_some() {
        for r in &received {
            eprintln!("{} {}: {}", r.method, r.path, String::from_utf8_lossy(&r.body));
        }
    }
    let calls: Vec<String> = received.iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    let context = format!("{} ({} files before)\ncalls: {calls:?}\nstdout: {stdout}\nstderr: {stderr}", agent.program, existing.len());
    assert!(calls.iter().any(|c| c.starts_with(agent.call)), "{context}");
    let (header, value) = master_header(agent.provider);
    assert!(
        received.iter().all(|r| r.header(header).as_deref() == Some(value.as_str())),
        "every request came through the proxy: {context}"
    );
    assert!(stdout.contains("Hello from the fake"), "the agent prints the fake's reply: {context}");
    eprintln!(
        "{} printed: {} ({} requests: {calls:?})",
        agent.program,
        stdout.lines().find(|l| l.contains("Hello from the fake")).unwrap_or_default().trim(),
        calls.len()
    );
    assert!(fake.bill() > rust_decimal::Decimal::ZERO, "{context}");
    assert_eq!(daemon.spent(agent.grant), fake.bill(), "the ledger equals the bill: {context}");
    // The model a request names: in its body, or (Gemini) in its path.
    let models: Vec<String> = received
        .iter()
        .filter_map(|r| {
            let in_path = r.path.split("/models/").nth(1).and_then(|m| m.split(':').next()).filter(|_| r.method == "POST");
            r.json()["model"].as_str().or(in_path).map(str::to_string)
        })
        .collect();

    let out = daemon.ctl_home_env(home.path(), &ctl_env, &["revoke", agent.grant]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in &files {
        assert_eq!(std::fs::read_to_string(file).ok(), before(file), "{} comes back byte for byte after {}", file.display(), agent.program);
    }
    Some(models)
}

#[test]
fn claude_code_with_no_configuration() {
    if let Some(models) = check(&CLAUDE, &[]) {
        assert!(models.iter().any(|m| m == "claude-opus-4-8"), "its default model: {models:?}");
    }
}

#[test]
fn claude_code_with_its_own_settings() {
    let settings = r#"{
  "model": "sonnet",
  "permissions": {"allow": ["Bash(git status:*)"], "deny": []},
  "env": {"DISABLE_TELEMETRY": "1"}
}
"#;
    if let Some(models) = check(&CLAUDE, &[(".claude/settings.json", settings)]) {
        assert!(models.iter().any(|m| m == "claude-sonnet-5"), "the sonnet alias the user selected: {models:?}");
    }
}

#[test]
fn codex_with_no_configuration() {
    if let Some(models) = check(&CODEX, &[]) {
        assert!(models.iter().any(|m| m == "gpt-6.1-sol"), "its default model: {models:?}");
    }
}

#[test]
fn codex_with_its_own_provider_selected() {
    let config = "# Codex, by hand\nmodel = \"gpt-5.5\"  # my default\nmodel_provider = \"lanbox\"\napproval_policy = \"never\"\n\n[model_providers.lanbox]\nname = \"LAN box\"\nbase_url = \"http://192.0.2.10:8000/v1\"\nwire_api = \"responses\"\n";
    if let Some(models) = check(&CODEX, &[(".codex/config.toml", config)]) {
        assert!(models.iter().all(|m| m == "gpt-5.5"), "the user's model, through the grant: {models:?}");
    }
}

#[test]
fn gemini_cli_with_no_configuration() {
    if let Some(models) = check(&GEMINI, &[]) {
        assert!(models.iter().any(|m| m == "gemini-3.5-flash-lite"), "its router's model: {models:?}");
    }
}

#[test]
fn gemini_cli_with_its_own_settings() {
    let env = "# Gemini CLI\nGOOGLE_CLOUD_PROJECT=my-project\n";
    let settings = "{\n  \"model\": {\"name\": \"gemini-2.5-pro\"},\n  \"ui\": {\"theme\": \"GitHub\"},\n  \"security\": {\"auth\": {\"selectedType\": \"oauth-personal\"}}\n}\n";
    if let Some(models) = check(&GEMINI, &[(".gemini/.env", env), (".gemini/settings.json", settings)]) {
        assert!(models.iter().any(|m| m == "gemini-2.5-pro"), "the model the user selected: {models:?}");
    }
}

#[test]
fn aider_with_no_configuration() {
    if let Some(models) = check(&AIDER, &[]) {
        assert!(models.iter().any(|m| m == "gpt-4o"), "{models:?}");
    }
}

#[test]
fn aider_with_another_providers_model_selected() {
    let config = "# aider options\nmodel: sonnet  # Anthropic, which the grant does not cap\nauto-commits: false\ndark-mode: true\n";
    if let Some(models) = check(&AIDER, &[(".aider.conf.yml", config)]) {
        assert!(models.iter().all(|m| m.starts_with("gpt-4o")), "pointed at the grant's model: {models:?}");
    }
}

#[test]
fn opencode_with_no_configuration() {
    if let Some(models) = check(&OPENCODE, &[]) {
        assert!(models.iter().any(|m| m == "claude-sonnet-4-6"), "{models:?}");
    }
}

#[test]
fn opencode_with_jsonc_and_another_providers_model() {
    let config = "{\n  \"$schema\": \"https://opencode.ai/config.json\",\n  // picked in the TUI\n  \"model\": \"openai/gpt-5\",\n  \"theme\": \"tokyonight\",\n  \"provider\": {\n    \"openai\": {\"options\": {\"timeout\": 60000,},},\n  },\n}\n";
    if let Some(models) = check(&OPENCODE, &[(".config/opencode/opencode.jsonc", config)]) {
        assert!(models.iter().all(|m| m.starts_with("claude-")), "{models:?}");
    }
}

#[test]
fn opencode_under_xdg_config_home() {
    // opencode reads $XDG_CONFIG_HOME/opencode; a file under ~/.config would be ignored, and
    // opencode would fall back to its own hosted provider.
    let config = "{\n  // mine\n  \"model\": \"anthropic/claude-sonnet-4-6\",\n}\n";
    let env = [("XDG_CONFIG_HOME", "{home}/xdg")];
    if let Some(models) = check_in(&OPENCODE, &[("xdg/opencode/opencode.jsonc", config)], &env) {
        assert!(models.iter().all(|m| m.starts_with("claude-")), "{models:?}");
    }
}

#[test]
fn continue_cn_with_no_configuration() {
    check(&CONTINUE, &[]);
}

#[test]
fn continue_cn_with_another_model_first_and_selected() {
    let config = "name: my assistant\nversion: 0.0.1\nschema: v1\n# my models\nmodels:\n  - name: local\n    provider: ollama\n    model: qwen3\n    roles:\n      - chat\n      - edit\ncontext:\n  - provider: code\n";
    let selection = "{\n  \"cliSelectedModel\": \"local\",\n  \"selectedModelsByProfileId\": {\n    \"local\": {\n      \"chat\": \"local\"\n    }\n  }\n}";
    if let Some(models) = check(&CONTINUE, &[(".continue/config.yaml", config), (".continue/index/globalContext.json", selection)]) {
        assert!(models.iter().all(|m| m == "claude-sonnet-4-5"), "{models:?}");
    }
}

#[test]
fn openclaw_with_no_configuration() {
    check(&OPENCLAW, &[]);
}

#[test]
fn openclaw_with_json5_another_model_and_fallbacks() {
    let config = "// openclaw, by hand\n{\n  gateway: { port: 18789 }, // loopback only\n  agents: {\n    defaults: {\n      model: { primary: 'openai/gpt-5.5', fallbacks: ['openrouter/qwen/qwen3'] },\n    },\n  },\n}\n";
    if let Some(models) = check(&OPENCLAW, &[(".openclaw/openclaw.json", config)]) {
        assert!(models.iter().all(|m| m == "claude-sonnet-4-5"), "{models:?}");
    }
}
