//! Claude Code: `~/.claude/settings.json` (or `$CLAUDE_CONFIG_DIR/settings.json`), its `env`
//! object: `ANTHROPIC_BASE_URL` and `ANTHROPIC_AUTH_TOKEN` (sent as `Authorization: Bearer`,
//! which avoids the interactive "use this API key?" prompt that `ANTHROPIC_API_KEY` triggers).
//!
//! JSON keeps every key and the key order; it loses the original indentation and spacing
//! (written back with two-space indentation) — byte-identical restores come from the original
//! text the daemon keeps.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{AgentEnv, Consumer, EditError, Target};

pub struct Claude;

const KEYS: [&str; 2] = ["ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"];

fn parse(path: &Path, text: &str) -> Result<Map<String, Value>, EditError> {
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(EditError { path: path.to_path_buf(), line: Some(1), message: "the settings are not a JSON object".into() }),
        Err(e) => Err(EditError { path: path.to_path_buf(), line: Some(e.line()), message: format!("not valid JSON: {e}") }),
    }
}

fn render(map: Map<String, Value>) -> String {
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default();
    text.push('\n');
    text
}

impl Consumer for Claude {
    fn name(&self) -> &'static str {
        "claude"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "Claude Code"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        match &env.claude_config_dir {
            Some(dir) => Some(dir.join("settings.json")),
            None => env.home.as_ref().map(|h| h.join(".claude").join("settings.json")),
        }
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let mut map = parse(path, existing.unwrap_or(""))?;
        let env = map.entry("env").or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(env) = env else {
            return Err(EditError { path: path.to_path_buf(), line: None, message: "\"env\" is not an object".into() });
        };
        env.insert(KEYS[0].into(), Value::String(target.base_url.to_string()));
        env.insert(KEYS[1].into(), Value::String(target.key.to_string()));
        Ok(render(map))
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let mut map = parse(path, current)?;
        let before = parse(path, original.unwrap_or("")).unwrap_or_default();
        let old_env = before.get("env").and_then(Value::as_object);
        if let Some(Value::Object(env)) = map.get_mut("env") {
            for key in KEYS {
                match old_env.and_then(|e| e.get(key)) {
                    Some(value) => {
                        env.insert(key.into(), value.clone());
                    }
                    None => {
                        env.shift_remove(key);
                    }
                }
            }
            if env.is_empty() && old_env.is_none() {
                map.shift_remove("env");
            }
        }
        Ok(render(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXISTING: &str = r#"{
  "model": "opus",
  "permissions": {"allow": ["Bash(ls:*)"]},
  "env": {"DISABLE_TELEMETRY": "1", "ANTHROPIC_BASE_URL": "https://my-gateway"}
}"#;

    #[test]
    fn install_sets_only_capit_keys_and_uninstall_restores_the_rest() {
        let path = Path::new("settings.json");
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-x" };
        let installed = Claude.install(path, Some(EXISTING), &target).unwrap();
        let v: Value = serde_json::from_str(&installed).unwrap();
        assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], "http://127.0.0.1:8787/anthropic");
        assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], "sk-capit-x");
        assert_eq!(v["env"]["DISABLE_TELEMETRY"], "1");
        assert_eq!(v["permissions"]["allow"][0], "Bash(ls:*)");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["model", "permissions", "env"], "key order kept");
        let removed: Value = serde_json::from_str(&Claude.uninstall(path, &installed, Some(EXISTING)).unwrap()).unwrap();
        assert_eq!(removed, serde_json::from_str::<Value>(EXISTING).unwrap(), "content equal to the original");
        let fresh = Claude.install(path, None, &target).unwrap();
        assert_eq!(Claude.uninstall(path, &fresh, None).unwrap(), "{}\n");
    }

    #[test]
    fn a_broken_file_is_an_error_naming_its_line() {
        let err = Claude.install(Path::new("/h/.claude/settings.json"), Some("{\n  \"a\": 1,\n  oops\n}"), &Target { base_url: "u", key: "k" }).unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("/h/.claude/settings.json:3: not valid JSON"), "{err}");
    }
}
