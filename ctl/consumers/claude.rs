//! Claude Code: `~/.claude/settings.json` (or `$CLAUDE_CONFIG_DIR/settings.json`), its `env`
//! object: `ANTHROPIC_BASE_URL` and `ANTHROPIC_AUTH_TOKEN` (sent as `Authorization: Bearer`,
//! which avoids the interactive "use this API key?" prompt that `ANTHROPIC_API_KEY` triggers).
//!
//! Edited as JSON by key path (see `json`).

use std::path::{Path, PathBuf};

use super::{AgentEnv, Consumer, EditError, Target, json};

pub struct Claude;

const BASE_URL: &[&str] = &["env", "ANTHROPIC_BASE_URL"];
const TOKEN: &[&str] = &["env", "ANTHROPIC_AUTH_TOKEN"];

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
        json::set(path, existing, &[(BASE_URL, target.base_url), (TOKEN, target.key)])
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        json::restore(path, current, original, &[BASE_URL, TOKEN])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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
        let err = Claude
            .install(Path::new("/h/.claude/settings.json"), Some("{\n  \"a\": 1,\n  oops\n}"), &Target { base_url: "u", key: "k" })
            .unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("/h/.claude/settings.json:3: not valid JSON"), "{err}");
    }
}
