//! `capitctl grant <agent>` installs a capped key into the agent's own configuration, and
//! `revoke` puts the file back: byte for byte when it was not touched since, or with only
//! capit's keys taken out when it was. What is installed works against the real proxy.

use std::path::Path;
use std::process::Output;

use ::http::Method;
use serde_json::Value;

use crate::metering::MASTER;
use crate::support::daemon::Daemon;
use crate::support::http;
use crate::support::upstream::Fake;
use crate::support::{TempDir, runtime};

pub(crate) fn ok(out: Output) -> String {
    assert!(out.status.success(), "capitctl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The directory's entries, to show that no temp file is left behind.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn setup(provider: &str) -> (Daemon, Fake, TempDir) {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.setup_provider(provider, &fake.base_url(), MASTER);
    (daemon, fake, TempDir::new())
}

const CLAUDE_SETTINGS: &str = r#"{
    "model": "opus",
    "permissions": {
        "allow": ["Bash(git status:*)"],
        "deny": []
    },
    "env": {
        "DISABLE_TELEMETRY": "1"
    }
}
"#;

#[test]
fn claude_code_settings_get_the_key_and_come_back_byte_for_byte() {
    let (daemon, fake, home) = setup("anthropic");
    fake.set_price("claude-haiku-4-5", "1.00", "0.10", "5.00");
    let dir = home.path().join(".claude");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("settings.json");
    std::fs::write(&file, CLAUDE_SETTINGS).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();

    let line = ok(daemon.ctl_home(home.path(), &["grant", "claude", "5.00"]));
    assert_eq!(Daemon::mode(&file), 0o600, "a file that holds a key is readable by its owner only");
    assert_eq!(
        line.trim(),
        r#"$5.00/month anthropic grant "claude" installed into ~/.claude/settings.json (now mode 0600, was 0640: it holds the key)"#
    );
    let settings: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let base = settings["env"]["ANTHROPIC_BASE_URL"].as_str().unwrap().to_string();
    let token = settings["env"]["ANTHROPIC_AUTH_TOKEN"].as_str().unwrap().to_string();
    assert_eq!(base, format!("http://{}/anthropic", daemon.proxy));
    assert!(token.starts_with("sk-capit-"));
    assert_eq!(settings["env"]["DISABLE_TELEMETRY"], "1");
    assert_eq!(settings["permissions"]["allow"][0], "Bash(git status:*)");
    assert_eq!(settings["model"], "opus");
    assert_eq!(entries(&dir), ["settings.json"], "no temp file left");
    assert!(daemon.ctl_json(&["ls"])[0]["installed_into"].as_str().unwrap().ends_with(".claude/settings.json"));

    // What was installed works, as Claude Code sends it: Bearer, to <base>/v1/messages.
    let auth = format!("Bearer {token}");
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = runtime().block_on(http::send(
        Method::POST,
        &format!("{base}/v1/messages?beta=true"),
        &[("authorization", &auth), ("anthropic-version", "2023-06-01")],
        body,
    ));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("claude"), fake.bill());

    // Rotating installs the new key where the old one was: the agent keeps working.
    let rotated = ok(daemon.ctl_home(home.path(), &["rotate", "claude"]));
    assert!(rotated.contains("the new key is installed into ~/.claude/settings.json"), "{rotated}");
    let settings: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let new_token = settings["env"]["ANTHROPIC_AUTH_TOKEN"].as_str().unwrap().to_string();
    assert!(new_token.starts_with("sk-capit-") && new_token != token && rotated.contains(&new_token), "{rotated}");
    assert_eq!(settings["env"]["ANTHROPIC_BASE_URL"].as_str(), Some(base.as_str()));
    let send = |token: &str| {
        let auth = format!("Bearer {token}");
        let headers = [("authorization", auth.as_str()), ("anthropic-version", "2023-06-01")];
        runtime().block_on(http::send(Method::POST, &format!("{base}/v1/messages"), &headers, body)).status
    };
    assert_eq!((send(&token), send(&new_token)), (401, 200), "the old key is dead, the installed one works");
    assert_eq!(Daemon::mode(&file), 0o600);

    let out = ok(daemon.ctl_home(home.path(), &["revoke", "claude"]));
    assert!(out.contains("restored ~/.claude/settings.json (mode 0640 again)"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CLAUDE_SETTINGS, "byte-identical after revoke");
    assert_eq!(Daemon::mode(&file), 0o640, "and its old mode");
    assert_eq!(entries(&dir), ["settings.json"]);
}

const CODEX_CONFIG: &str = "# Codex settings\nmodel = \"gpt-5.5\"  # my default\napproval_policy = \"on-request\"\n\n[model_providers.ollama]\nname = \"Ollama\"\nbase_url = \"http://localhost:11434/v1\"\n\n[profiles.fast]\nmodel = \"gpt-5-mini\"\n";

#[test]
fn codex_gets_its_own_provider_and_the_config_comes_back_byte_for_byte() {
    let (daemon, fake, home) = setup("openai");
    fake.set_price("gpt-5", "1.25", "0.125", "10.00");
    let dir = home.path().join(".codex");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.toml");
    std::fs::write(&file, CODEX_CONFIG).unwrap();
    let line = ok(daemon.ctl_home(home.path(), &["grant", "codex", "3"]));
    assert_eq!(
        line.trim(),
        r#"$3.00/month openai grant "codex" installed into ~/.codex/config.toml (now mode 0600, was 0644: it holds the key)"#
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let config: toml_edit::DocumentMut = text.parse().expect("still valid TOML");
    assert_eq!(config["model_provider"].as_str(), Some("capit"));
    let capit = &config["model_providers"]["capit"];
    assert_eq!(capit["wire_api"].as_str(), Some("responses"));
    assert_eq!(config["model_providers"]["ollama"]["name"].as_str(), Some("Ollama"));
    assert!(text.contains("# Codex settings") && text.contains("# my default"), "comments kept: {text}");

    // Codex appends /responses to base_url and sends the token as Bearer.
    let url = format!("{}/responses", capit["base_url"].as_str().unwrap());
    let auth = format!("Bearer {}", capit["experimental_bearer_token"].as_str().unwrap());
    let reply =
        runtime().block_on(http::send(Method::POST, &url, &[("authorization", &auth)], r#"{"model":"gpt-5","input":"hi","stream":true}"#));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("codex"), fake.bill());

    ok(daemon.ctl_home(home.path(), &["revoke", "codex"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CODEX_CONFIG);
    assert_eq!(entries(&dir), ["config.toml"]);
}

#[test]
fn gemini_cli_env_file_and_a_dotenv_for_any_script() {
    let (daemon, fake, home) = setup("gemini");
    fake.set_price("gemini-2.5-flash", "0.30", "0.03", "2.50");
    let dir = home.path().join(".gemini");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(".env");
    let original = "# Gemini CLI\nGOOGLE_CLOUD_PROJECT=my-project\n";
    std::fs::write(&file, original).unwrap();
    let settings = dir.join("settings.json");
    let settings_before = "{\n  \"ui\": {\"theme\": \"GitHub\"},\n  \"security\": {\"auth\": {\"selectedType\": \"oauth-personal\"}}\n}\n";
    std::fs::write(&settings, settings_before).unwrap();
    let line = ok(daemon.ctl_home(home.path(), &["grant", "gemini", "2"]));
    assert!(
        line.trim().ends_with("installed into ~/.gemini/.env (now mode 0600, was 0644: it holds the key) and ~/.gemini/settings.json"),
        "every file it changed: {line}"
    );
    assert_eq!(Daemon::mode(&settings), 0o644, "settings.json holds no key and keeps its mode");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with(original), "{text}");
    let chosen: Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    assert_eq!(chosen["security"]["auth"]["selectedType"], "gemini-api-key", "Gemini CLI uses the key only with this auth type");
    assert_eq!(chosen["ui"]["theme"], "GitHub");
    let value = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap().to_string();
    let url = format!("{}/v1beta/models/gemini-2.5-flash:generateContent", value("GOOGLE_GEMINI_BASE_URL"));
    let reply = runtime().block_on(http::send(Method::POST, &url, &[("x-goog-api-key", &value("GEMINI_API_KEY"))], r#"{"contents":[]}"#));
    assert_eq!(reply.status, 200);
    assert_eq!(daemon.spent("gemini"), fake.bill());
    ok(daemon.ctl_home(home.path(), &["revoke", "gemini"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
    assert_eq!(std::fs::read_to_string(&settings).unwrap(), settings_before, "both files come back");
    assert_eq!(entries(&dir), [".env", "settings.json"]);

    // Any name with --env-file: a dotenv of the provider's variables, removed again on revoke.
    daemon.setup_provider("openai", &fake.base_url(), MASTER);
    let env_file = home.path().join("agent.env");
    let doc: Value = serde_json::from_str(&ok(daemon
        .ctl_home(home.path(), &["grant", "nightly", "1", "--provider", "openai", "--env-file", env_file.to_str().unwrap(), "--json"])))
    .unwrap();
    let text = std::fs::read_to_string(&env_file).unwrap();
    assert_eq!(text, format!("OPENAI_BASE_URL={}\nOPENAI_API_KEY={}\n", doc["base_url"].as_str().unwrap(), doc["key"].as_str().unwrap()));
    ok(daemon.ctl_home(home.path(), &["revoke", "nightly"]));
    assert!(!env_file.exists(), "a file capit created goes again");
}

#[test]
fn a_broken_file_is_left_untouched_and_no_grant_is_made() {
    let (daemon, _fake, home) = setup("anthropic");
    let dir = home.path().join(".claude");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("settings.json");
    let broken = "{\n  \"model\": \"opus\",\n  \"env\": {\n}\n";
    std::fs::write(&file, broken).unwrap();
    let out = daemon.ctl_home(home.path(), &["grant", "claude", "5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5: not valid JSON", file.display())) && err.trim_end().lines().count() == 1, "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), broken);
    assert_eq!(entries(&dir), ["settings.json"]);
    assert!(daemon.ctl_json(&["ls", "--all"]).as_array().unwrap().is_empty());
}

#[test]
fn edits_made_after_an_install_survive_its_revoke() {
    let (daemon, _fake, home) = setup("anthropic");
    let file = home.path().join(".claude").join("settings.json");
    ok(daemon.ctl_home(home.path(), &["grant", "claude", "5"]));
    assert!(file.exists(), "the file is created when there was none");
    let mut settings: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    settings["theme"] = Value::String("dark".into());
    std::fs::write(&file, serde_json::to_string_pretty(&settings).unwrap()).unwrap();
    let out = ok(daemon.ctl_home(home.path(), &["revoke", "claude"]));
    assert!(out.contains("edited since the install"), "{out}");
    let after: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(after, serde_json::json!({"theme": "dark"}));
}

#[test]
fn granting_again_replaces_the_key_and_dry_run_changes_nothing() {
    let (daemon, _fake, home) = setup("anthropic");
    let dir = home.path().join(".claude");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("settings.json");
    std::fs::write(&file, CLAUDE_SETTINGS).unwrap();

    let diff = ok(daemon.ctl_home(home.path(), &["grant", "claude", "5", "--dry-run"]));
    assert!(
        diff.contains("+++ ~/.claude/settings.json (with capit)") && diff.contains("+") && diff.contains("ANTHROPIC_AUTH_TOKEN"),
        "{diff}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CLAUDE_SETTINGS);
    assert!(daemon.ctl_json(&["ls"]).as_array().unwrap().is_empty(), "a dry run makes no grant");

    let key_of = || {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        v["env"]["ANTHROPIC_AUTH_TOKEN"].as_str().unwrap().to_string()
    };
    ok(daemon.ctl_home(home.path(), &["grant", "claude", "5"]));
    let first = key_of();
    ok(daemon.ctl_home(home.path(), &["grant", "claude", "7"]));
    let second = key_of();
    assert_ne!(first, second);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.matches("ANTHROPIC_AUTH_TOKEN").count(), 1, "replaced, not duplicated");
    let grants = daemon.ctl_json(&["ls"]);
    assert_eq!((grants.as_array().unwrap().len(), grants[0]["cap"].as_str()), (1, Some("7.00")));
    let auth = format!("Bearer {first}");
    let old = runtime().block_on(http::send(Method::POST, &daemon.url("/anthropic/v1/messages"), &[("authorization", &auth)], "{}"));
    assert_eq!(old.status, 401, "the first key is dead");
    ok(daemon.ctl_home(home.path(), &["revoke", "claude"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CLAUDE_SETTINGS);
}

#[test]
fn agents_are_listed_and_cloud_editors_refused() {
    let (daemon, _fake, home) = setup("openai");
    std::fs::create_dir_all(home.path().join(".codex")).unwrap();
    let list: Value = serde_json::from_str(&ok(daemon.ctl_home(home.path(), &["agents", "--json"]))).unwrap();
    let find = |name: &str| list.as_array().unwrap().iter().find(|a| a["agent"] == name).cloned().unwrap();
    assert_eq!((find("codex")["found"].as_bool(), find("codex")["provider"].as_str()), (Some(true), Some("openai")));
    assert_eq!(find("claude")["found"], false);
    assert_eq!(find("cursor")["supported"], false);
    let out = daemon.ctl_home(home.path(), &["grant", "cursor", "5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach a proxy on 127.0.0.1"));
    assert!(daemon.ctl_json(&["ls", "--all"]).as_array().unwrap().is_empty(), "nothing half-made");
}

#[test]
fn opencode_gets_the_anthropic_base_with_v1_and_uninstall_keeps_the_grant() {
    let (daemon, fake, home) = setup("anthropic");
    fake.set_price("claude-haiku-4-5", "1.00", "0.10", "5.00");
    let dir = home.path().join(".config").join("opencode");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("opencode.json");
    let original = "{\n  \"$schema\": \"https://opencode.ai/config.json\",\n  \"theme\": \"tokyonight\",\n  \"provider\": {\"openai\": {\"options\": {\"timeout\": 60000}}}\n}\n";
    std::fs::write(&file, original).unwrap();
    let line = ok(daemon.ctl_home(home.path(), &["grant", "opencode", "4"]));
    assert!(line.contains("installed into ~/.config/opencode/opencode.json"), "{line}");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let options = &config["provider"]["anthropic"]["options"];
    assert_eq!(options["baseURL"], format!("http://{}/anthropic/v1", daemon.proxy));
    assert_eq!(config["provider"]["openai"]["options"]["timeout"], 60000);
    // @ai-sdk/anthropic posts to {baseURL}/messages with x-api-key.
    let url = format!("{}/messages", options["baseURL"].as_str().unwrap());
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":50,"messages":[]}"#;
    let reply = runtime().block_on(http::send(Method::POST, &url, &[("x-api-key", options["apiKey"].as_str().unwrap())], body));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("opencode"), fake.bill());

    let out = ok(daemon.ctl_home(home.path(), &["uninstall", "opencode"]));
    assert!(out.contains("restored ~/.config/opencode/opencode.json") && out.contains("still works"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
    assert_eq!(daemon.ctl_json(&["ls"])[0]["state"], "active");
    assert!(daemon.ctl_json(&["ls"])[0]["installed_into"].is_null());
    let again = daemon.ctl_home(home.path(), &["uninstall", "opencode"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("not installed"));
}

#[test]
fn aider_options_file_keeps_its_comments_and_comes_back_byte_for_byte() {
    let (daemon, fake, home) = setup("openai");
    let file = home.path().join(".aider.conf.yml");
    let original = "# aider options\nmodel: openai/test-model\nauto-commits: false  # I commit myself\nread:\n  - CONVENTIONS.md\n";
    std::fs::write(&file, original).unwrap();
    daemon.ctl_ok(&["price", "set", "test-model", "--input", "1", "--output", "2"]);
    fake.set_price("test-model", "1", "1", "2");
    let line = ok(daemon.ctl_home(home.path(), &["grant", "aider", "2"]));
    assert!(line.contains("openai grant \"aider\" installed into ~/.aider.conf.yml"), "{line}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with(original), "every line of the user's stays: {text}");
    let value = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).unwrap().trim_matches('"').to_string();
    // aider's OpenAI-compatible route: {openai-api-base}/chat/completions with a Bearer key.
    let url = format!("{}/chat/completions", value("openai-api-base"));
    let reply = runtime().block_on(http::send(
        Method::POST,
        &url,
        &[("authorization", &format!("Bearer {}", value("openai-api-key")))],
        r#"{"model":"test-model","messages":[]}"#,
    ));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("aider"), fake.bill());
    ok(daemon.ctl_home(home.path(), &["revoke", "aider"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
}

#[test]
fn continue_gets_one_model_item_and_the_file_comes_back_byte_for_byte() {
    let (daemon, fake, home) = setup("anthropic");
    fake.set_price("claude-sonnet-4-5", "3.00", "0.30", "15.00");
    let dir = home.path().join(".continue");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    let original = "name: my assistant\nversion: 0.0.1\nschema: v1\n# models I use\nmodels:\n  - name: local\n    provider: ollama\n    model: qwen3\n";
    std::fs::write(&file, original).unwrap();
    ok(daemon.ctl_home(home.path(), &["grant", "continue", "3"]));
    let text = std::fs::read_to_string(&file).unwrap();
    let doc = &yaml_rust2::YamlLoader::load_from_str(&text).expect("still valid YAML")[0];
    let item = &doc["models"][0];
    assert_eq!(item["name"].as_str(), Some("capit"), "first, so that cn and the IDE use it");
    assert_eq!(doc["models"][1]["name"].as_str(), Some("local"));
    assert!(text.contains("# models I use"));
    // Continue posts to new URL("messages", apiBase + "/") with x-api-key.
    let url = format!("{}/messages", item["apiBase"].as_str().unwrap());
    let body = format!(r#"{{"model":"{}","max_tokens":100,"messages":[]}}"#, item["model"].as_str().unwrap());
    let reply = runtime().block_on(http::send(Method::POST, &url, &[("x-api-key", item["apiKey"].as_str().unwrap())], body));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("continue"), fake.bill());
    ok(daemon.ctl_home(home.path(), &["revoke", "continue"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
}

#[test]
fn openclaw_json5_keeps_its_comments_and_a_per_agent_override_is_refused() {
    let (daemon, fake, home) = setup("anthropic");
    fake.set_price("claude-sonnet-4-5", "3.00", "0.30", "15.00");
    let dir = home.path().join(".openclaw");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("openclaw.json");
    let original = "// openclaw, by hand\n{\n  gateway: { port: 18789 }, // loopback only\n  agents: { defaults: { model: { primary: 'ollama/qwen3' } } },\n}\n";
    std::fs::write(&file, original).unwrap();
    let line = ok(daemon.ctl_home(home.path(), &["grant", "openclaw", "4"]));
    assert!(line.contains("installed into ~/.openclaw/openclaw.json"), "{line}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("// openclaw, by hand") && text.contains("// loopback only"), "{text}");
    let options = jsonc_parser::ParseOptions { allow_single_quoted_strings: true, ..Default::default() };
    let config = jsonc_parser::cst::CstRootNode::parse(&text, &options).unwrap().value().unwrap().to_serde_value().unwrap();
    let provider = &config["models"]["providers"]["capit"];
    assert_eq!(config["agents"]["defaults"]["model"]["primary"], "capit/claude-sonnet-4-5");
    // The anthropic-messages client appends /v1/messages to baseUrl and sends x-api-key.
    let url = format!("{}/v1/messages", provider["baseUrl"].as_str().unwrap());
    let reply = runtime().block_on(http::send(
        Method::POST,
        &url,
        &[("x-api-key", provider["apiKey"].as_str().unwrap())],
        r#"{"model":"claude-sonnet-4-5","max_tokens":50,"messages":[]}"#,
    ));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("openclaw"), fake.bill());
    ok(daemon.ctl_home(home.path(), &["revoke", "openclaw"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);

    let agent = dir.join("agents").join("main").join("agent");
    std::fs::create_dir_all(&agent).unwrap();
    std::fs::write(agent.join("models.json"), r#"{"providers": {"capit": {"baseUrl": "http://elsewhere", "apiKey": "x"}}}"#).unwrap();
    let out = daemon.ctl_home(home.path(), &["grant", "openclaw", "4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("models.json sets its own \"capit\" provider"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
}

/// Runs an agent's real CLI as a user whose HOME is `home` would, for at most 90 s; returns
/// its stdout and stderr. `None` when the CLI is not installed (fails when
/// CAPIT_REQUIRE_AGENTS requires it; see `agents`).
pub(crate) fn run_agent(program: &str, args: &[&str], home: &Path, env: &[(&str, &str)], unset: &[&str]) -> Option<(String, String)> {
    if !crate::agents::installed(program) {
        return None;
    }
    let work = home.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut command = std::process::Command::new(program);
    command.args(args).current_dir(&work).env("HOME", home);
    for (name, value) in env {
        command.env(name, value);
    }
    for name in unset {
        command.env_remove(name);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    Some((String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// What the fake received, as `METHOD path?query` lines.
pub(crate) fn calls(fake: &Fake) -> Vec<String> {
    fake.received().iter().map(|r| format!("{} {}?{}", r.method, r.path, r.query.clone().unwrap_or_default())).collect()
}

#[test]
fn granting_again_checks_the_new_grant_before_it_touches_the_old_one() {
    let (daemon, fake, home) = setup("anthropic");
    fake.set_price("claude-haiku-4-5", "1", "0.1", "5");
    let dir = home.path().join(".claude");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("settings.json");
    std::fs::write(&file, CLAUDE_SETTINGS).unwrap();
    ok(daemon.ctl_home(home.path(), &["grant", "claude", "5"]));
    let installed = std::fs::read_to_string(&file).unwrap();
    let key: Value = serde_json::from_str(&installed).unwrap();
    let key = key["env"]["ANTHROPIC_AUTH_TOKEN"].as_str().unwrap().to_string();
    for bad in [
        &["grant", "claude", "lots"][..],
        &["grant", "claude", "5", "--period", "fortnight"],
        &["grant", "claude", "5", "--models", "a model"],
    ] {
        let out = daemon.ctl_home(home.path(), bad);
        assert!(!out.status.success(), "{bad:?}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), installed, "{bad:?}: the installed file is untouched");
    }
    let grants = daemon.ctl_json(&["ls", "--all"]);
    assert_eq!(grants.as_array().unwrap().len(), 1, "no grant was revoked or made: {grants}");
    let auth = format!("Bearer {key}");
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = runtime().block_on(http::send(Method::POST, &daemon.url("/anthropic/v1/messages"), &[("authorization", &auth)], body));
    assert_eq!(reply.status, 200, "the old key still works: {}", reply.text());
    // A good one replaces it; the revoke still gives back the file from before the first grant.
    ok(daemon.ctl_home(home.path(), &["grant", "claude", "7"]));
    ok(daemon.ctl_home(home.path(), &["revoke", "claude"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CLAUDE_SETTINGS);
    assert_eq!(Daemon::mode(&file), 0o644, "the mode from before the first grant");
}

#[test]
fn a_symlinked_crlf_file_stays_a_link_keeps_its_line_endings_and_gets_its_mode_back() {
    let (daemon, fake, home) = setup("openai");
    fake.set_price("gpt-4o", "2.50", "1.25", "10");
    let dotfiles = home.path().join("dotfiles");
    std::fs::create_dir_all(&dotfiles).unwrap();
    let target = dotfiles.join("aider.yml");
    let original = "# managed by my dotfiles\r\nmodel: gpt-4o\r\nauto-commits: false\r\n";
    std::fs::write(&target, original).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = home.path().join(".aider.conf.yml");
    std::os::unix::fs::symlink("dotfiles/aider.yml", &link).unwrap();
    let line = ok(daemon.ctl_home(home.path(), &["grant", "aider", "2"]));
    assert!(line.contains("installed into ~/.aider.conf.yml (now mode 0600, was 0644: it holds the key)"), "{line}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "still a link");
    let text = std::fs::read_to_string(&target).unwrap();
    assert!(text.starts_with(original) && text.ends_with("\r\n") && !text.replace("\r\n", "").contains('\n'), "CRLF throughout: {text:?}");
    assert_eq!(Daemon::mode(&target), 0o600);
    ok(daemon.ctl_home(home.path(), &["revoke", "aider"]));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), original, "byte for byte");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(Daemon::mode(&target), 0o644);
    assert_eq!(entries(&dotfiles), ["aider.yml"]);
}

#[test]
fn opencode_jsonc_under_xdg_config_home_is_edited_in_place_and_its_model_pointed_at_the_grant() {
    let (daemon, _fake, home) = setup("anthropic");
    let xdg = home.path().join("xdg");
    let dir = xdg.join("opencode");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("opencode.jsonc");
    let original = "{\n  \"$schema\": \"https://opencode.ai/config.json\",\n  // my models\n  \"model\": \"openai/gpt-5\",\n  \"theme\": \"tokyonight\",\n}\n";
    std::fs::write(&file, original).unwrap();
    let env = [("XDG_CONFIG_HOME", xdg.to_str().unwrap())];
    let out = daemon.ctl_home_env(home.path(), &env, &["grant", "opencode", "3"]);
    let text = ok(out);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().contains("installed into ~/xdg/opencode/opencode.jsonc"), "{text}");
    assert_eq!(lines.next(), Some("opencode's model openai/gpt-5 is now anthropic/claude-sonnet-4-6 (put back on revoke)"), "{text}");
    let installed = std::fs::read_to_string(&file).unwrap();
    assert!(installed.contains("// my models") && installed.contains("\"anthropic/claude-sonnet-4-6\""), "{installed}");
    assert!(!home.path().join(".config").exists(), "nothing written where opencode does not look");
    ok(daemon.ctl_home_env(home.path(), &env, &["revoke", "opencode"]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);

    // An agent of its own on another provider would go around the cap: refused, nothing made.
    std::fs::write(&file, r#"{"agent": {"plan": {"model": "openai/gpt-5"}}}"#).unwrap();
    let out = daemon.ctl_home_env(home.path(), &env, &["grant", "opencode", "3"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent \"plan\" uses model openai/gpt-5"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.ctl_json(&["ls"]).as_array().unwrap().len(), 0);
}

#[test]
fn goose_installs_where_it_keeps_keys_in_a_file_and_refuses_the_keyring() {
    let (daemon, fake, home) = setup("anthropic");
    fake.set_price("claude-sonnet-4-5", "3", "0.3", "15");
    let dir = home.path().join(".config").join("goose");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    let config_before =
        "GOOSE_MODEL: claude-sonnet-4-5\nGOOSE_PROVIDER: openai\nextensions:\n  developer:\n    enabled: true\n    type: builtin\n";
    std::fs::write(&config, config_before).unwrap();
    // Keys in the system keyring: capit cannot write there, so it refuses and changes nothing.
    let out = daemon.ctl_home(home.path(), &["grant", "goose", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("system keyring"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), config_before);
    assert!(daemon.ctl_json(&["ls", "--all"]).as_array().unwrap().is_empty());

    let secrets = dir.join("secrets.yaml");
    let secrets_before = "OPENAI_API_KEY: sk-real-openai\n";
    std::fs::write(&secrets, secrets_before).unwrap();
    let line = ok(daemon.ctl_home(home.path(), &["grant", "goose", "3"]));
    assert!(line.contains("installed into ~/.config/goose/config.yaml"), "{line}");
    let cfg = &yaml_rust2::YamlLoader::load_from_str(&std::fs::read_to_string(&config).unwrap()).unwrap()[0];
    let sec = &yaml_rust2::YamlLoader::load_from_str(&std::fs::read_to_string(&secrets).unwrap()).unwrap()[0];
    assert_eq!(cfg["GOOSE_PROVIDER"].as_str(), Some("anthropic"));
    assert_eq!(cfg["extensions"]["developer"]["type"].as_str(), Some("builtin"));
    assert_eq!(sec["OPENAI_API_KEY"].as_str(), Some("sk-real-openai"));
    // goose joins v1/messages onto ANTHROPIC_HOST and sends x-api-key.
    let url = format!("{}/v1/messages", cfg["ANTHROPIC_HOST"].as_str().unwrap());
    let reply = runtime().block_on(http::send(
        Method::POST,
        &url,
        &[("x-api-key", sec["ANTHROPIC_API_KEY"].as_str().unwrap())],
        r#"{"model":"claude-sonnet-4-5","max_tokens":50,"messages":[]}"#,
    ));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(daemon.spent("goose"), fake.bill());
    ok(daemon.ctl_home(home.path(), &["revoke", "goose"]));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), config_before);
    assert_eq!(std::fs::read_to_string(&secrets).unwrap(), secrets_before);
}

#[test]
fn provider_overrides_where_the_agent_supports_it() {
    let (daemon, fake, home) = setup("openrouter");
    fake.script(|s| s.report_cost = Some("0.0002"));
    let line = ok(daemon.ctl_home(home.path(), &["grant", "aider", "2", "--provider", "openrouter"]));
    assert!(line.contains("openrouter grant \"aider\" installed into ~/.aider.conf.yml"), "{line}");
    let text = std::fs::read_to_string(home.path().join(".aider.conf.yml")).unwrap();
    assert!(text.contains(&format!("openai-api-base: \"http://{}/openrouter/v1\"", daemon.proxy)), "{text}");
    let out = daemon.ctl_home(home.path(), &["grant", "claude", "2", "--provider", "openrouter"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("claude cannot use provider \"openrouter\""));
}
