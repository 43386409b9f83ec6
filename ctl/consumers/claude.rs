//! Claude Code: `~/.claude/settings.json` (or `$CLAUDE_CONFIG_DIR/settings.json`), its `env`
//! object: `ANTHROPIC_BASE_URL` and `ANTHROPIC_AUTH_TOKEN` (sent as `Authorization: Bearer`,
//! which avoids the interactive "use this API key?" prompt that `ANTHROPIC_API_KEY` triggers).
//!
//! Settings that send Claude Code to another cloud (`CLAUDE_CODE_USE_BEDROCK`, `_VERTEX`,
//! `_FOUNDRY` in `env`) would go around the proxy, so a truthy one is set to `0` while the grant
//! is installed and put back on revoke.
//!
//! Edited as JSON by key path (see `json`).

use std::path::{Path, PathBuf};

use super::{AgentEnv, Consumer, EditError, Target, json};

pub struct Claude;

const BASE_URL: &[&str] = &["env", "ANTHROPIC_BASE_URL"];
const TOKEN: &[&str] = &["env", "ANTHROPIC_AUTH_TOKEN"];
const OTHER_CLOUDS: [&[&str]; 3] =
    [&["env", "CLAUDE_CODE_USE_BEDROCK"], &["env", "CLAUDE_CODE_USE_VERTEX"], &["env", "CLAUDE_CODE_USE_FOUNDRY"]];

/// The other-cloud switches that are on in these settings (Claude Code reads `1`, `true`,
/// `yes` and `on` as on).
fn clouds_on(path: &Path, text: Option<&str>) -> Vec<&'static [&'static str]> {
    let Some(map) = text.and_then(|t| json::parse(path, t).ok()) else { return Vec::new() };
    OTHER_CLOUDS
        .into_iter()
        .filter(|keys| {
            map.get(keys[0])
                .and_then(|env| env.get(keys[1]))
                .and_then(|v| v.as_str().map(str::to_ascii_lowercase).or_else(|| v.as_bool().map(|b| b.to_string())))
                .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes" | "on"))
        })
        .collect()
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

    fn notes(&self, existing: Option<&str>, _target: &Target) -> Vec<String> {
        clouds_on(Path::new("settings.json"), existing)
            .into_iter()
            .map(|keys| format!("Claude Code's {} is off while the grant is installed: it would go around the cap", keys[1]))
            .collect()
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let mut values = vec![(BASE_URL, target.base_url), (TOKEN, target.key)];
        values.extend(clouds_on(path, existing).into_iter().map(|keys| (keys, "0")));
        json::set(path, existing, &values)
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let mut keys = vec![BASE_URL, TOKEN];
        keys.extend(clouds_on(path, original));
        json::restore(path, current, original, &keys)
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
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-x", kind: "anthropic" };
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
    fn another_cloud_is_switched_off_until_revoke() {
        let path = Path::new("settings.json");
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-x", kind: "anthropic" };
        let original = r#"{"env": {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "us-east-1"}}"#;
        let installed = Claude.install(path, Some(original), &target).unwrap();
        let v: Value = serde_json::from_str(&installed).unwrap();
        assert_eq!((v["env"]["CLAUDE_CODE_USE_BEDROCK"].as_str(), v["env"]["AWS_REGION"].as_str()), (Some("0"), Some("us-east-1")));
        assert_eq!(Claude.notes(Some(original), &target).len(), 1);
        let back: Value = serde_json::from_str(&Claude.uninstall(path, &installed, Some(original)).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(original).unwrap());
        assert!(Claude.notes(Some(EXISTING), &target).is_empty());
    }

    #[test]
    fn a_broken_file_is_an_error_naming_its_line() {
        let err = Claude
            .install(
                Path::new("/h/.claude/settings.json"),
                Some("{\n  \"a\": 1,\n  oops\n}"),
                &Target { base_url: "u", key: "k", kind: "anthropic" },
            )
            .unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("/h/.claude/settings.json:3: not valid JSON"), "{err}");
    }
}
