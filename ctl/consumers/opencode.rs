//! opencode: its global config, `$XDG_CONFIG_HOME/opencode/` (else `~/.config/opencode/`):
//! `opencode.jsonc`, else `opencode.json`, else `config.json`, the first that exists (a new one
//! is `opencode.json`); `$OPENCODE_CONFIG` names a file loaded over the global one, and
//! `$OPENCODE_CONFIG_DIR` a directory whose file is loaded over both, so capit edits the one
//! that wins. The keys: `provider.anthropic.options.baseURL` (with `/v1`: `@ai-sdk/anthropic`
//! posts to `{baseURL}/messages`) and `.apiKey`.
//!
//! A `model` of another provider (or none, where opencode would pick one itself, possibly its
//! own hosted service) is pointed at Anthropic's, and a `small_model` (the title calls) of
//! another provider at Anthropic's small one; both are put back on revoke. An agent or mode
//! with a model of its own elsewhere, or Anthropic disabled, is refused: opencode would go
//! around the proxy. opencode writes a `$schema` into a file that lacks one, so capit adds it
//! first, and the file stays as capit wrote it.
//!
//! The file is JSONC (comments, trailing commas), edited through its syntax tree (`jsonc`).

use std::path::{Path, PathBuf};

use jsonc_parser::cst::CstInputValue;
use serde_json::Value;

use super::{AgentEnv, Consumer, EditError, Target, jsonc};

pub struct OpenCode;

const BASE_URL: &[&str] = &["provider", "anthropic", "options", "baseURL"];
const KEY: &[&str] = &["provider", "anthropic", "options", "apiKey"];
const SCHEMA: &str = "https://opencode.ai/config.json";
/// opencode's own defaults for Anthropic (checked with opencode 1.18.33: its main and title
/// calls with only an Anthropic key).
const MODEL: &str = "anthropic/claude-sonnet-4-6";
const SMALL_MODEL: &str = "anthropic/claude-haiku-4-5";

/// Whether a `provider/model` reference is Anthropic's, which the grant caps.
fn capped(model: &str) -> bool {
    model.split_once('/').is_some_and(|(provider, _)| provider == "anthropic")
}

/// The model keys an install changes in this configuration: `model` when it is missing or
/// another provider's, `small_model` when it is another provider's, `$schema` when missing.
fn touched(config: &Value) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if config.get("$schema").is_none() {
        keys.push("$schema");
    }
    if !config.get("model").and_then(Value::as_str).is_some_and(capped) {
        keys.push("model");
    }
    if config.get("small_model").and_then(Value::as_str).is_some_and(|m| !capped(m)) {
        keys.push("small_model");
    }
    keys
}

/// Why an install would leave opencode going around the proxy, if it would.
fn refusal(config: &Value) -> Option<String> {
    for section in ["agent", "mode"] {
        for (name, agent) in config.get(section).and_then(Value::as_object).into_iter().flatten() {
            if let Some(model) = agent.get("model").and_then(Value::as_str).filter(|m| !capped(m)) {
                return Some(format!(
                    "{section} \"{name}\" uses model {model}, which the anthropic grant does not cap; point it at an anthropic/ model or remove its model first"
                ));
            }
        }
    }
    let names = |key: &str| config.get(key).and_then(Value::as_array).map(|l| l.iter().filter_map(Value::as_str).any(|p| p == "anthropic"));
    if names("disabled_providers") == Some(true) {
        return Some("disabled_providers turns Anthropic off, so opencode would not use the grant; take it out first".into());
    }
    if names("enabled_providers") == Some(false) {
        return Some("enabled_providers leaves Anthropic out, so opencode would not use the grant; add \"anthropic\" first".into());
    }
    None
}

/// In a config directory: the file opencode reads there (JSONC first), or a new `opencode.json`.
fn file_in(dir: &Path, names: &[&str]) -> PathBuf {
    names.iter().map(|n| dir.join(n)).find(|p| p.exists()).unwrap_or_else(|| dir.join("opencode.json"))
}

impl Consumer for OpenCode {
    fn name(&self) -> &'static str {
        "opencode"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "opencode"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        if let Some(dir) = &env.opencode_config_dir {
            return Some(file_in(dir, &["opencode.jsonc", "opencode.json"]));
        }
        if let Some(file) = &env.opencode_config {
            return Some(file.clone());
        }
        let config_home = env.xdg_config_home.clone().or_else(|| env.home.as_ref().map(|h| h.join(".config")))?;
        Some(file_in(&config_home.join("opencode"), &["opencode.jsonc", "opencode.json", "config.json"]))
    }

    fn notes(&self, existing: Option<&str>, _target: &Target) -> Vec<String> {
        let config = jsonc::plain(Path::new("opencode.json"), existing);
        let mut notes = Vec::new();
        for key in touched(&config) {
            let (old, new) = match key {
                "model" => (config.get("model").and_then(Value::as_str), MODEL),
                "small_model" => (config.get("small_model").and_then(Value::as_str), SMALL_MODEL),
                _ => continue,
            };
            if let Some(old) = old {
                notes.push(format!("opencode's {key} {old} is now {new} (put back on revoke)"));
            }
        }
        notes
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let root = jsonc::parse(path, existing.unwrap_or(""), "JSONC")?;
        let before = jsonc::plain(path, existing);
        if let Some(message) = refusal(&before) {
            return Err(EditError { path: path.to_path_buf(), line: None, message });
        }
        let base = format!("{}/v1", target.base_url.trim_end_matches('/'));
        jsonc::set_path(path, &root, BASE_URL, CstInputValue::String(base))?;
        jsonc::set_path(path, &root, KEY, CstInputValue::String(target.key.to_string()))?;
        for key in touched(&before) {
            match key {
                "$schema" => {
                    root.object_value_or_set().insert(0, "$schema", CstInputValue::String(SCHEMA.into()));
                }
                "model" => jsonc::set_path(path, &root, &["model"], CstInputValue::String(MODEL.into()))?,
                _ => jsonc::set_path(path, &root, &["small_model"], CstInputValue::String(SMALL_MODEL.into()))?,
            }
        }
        Ok(root.to_string())
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let root = jsonc::parse(path, current, "JSONC")?;
        let before = jsonc::plain(path, original);
        let before = if before.is_null() { Value::Object(Default::default()) } else { before };
        jsonc::restore_path(&root, BASE_URL, &before);
        jsonc::restore_path(&root, KEY, &before);
        for key in touched(&before) {
            jsonc::restore_path(&root, &[key], &before);
        }
        Ok(root.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k", kind: "anthropic" };

    const JSONC: &str = r#"{
  "$schema": "https://opencode.ai/config.json",
  // my setup
  "theme": "tokyonight",
  "model": "openai/gpt-5",
  "small_model": "openai/gpt-5-nano",
  "provider": {
    "openai": { "options": { "timeout": 60000, }, }, // trailing commas, as opencode allows
  },
}
"#;

    fn env(home: &str) -> AgentEnv {
        AgentEnv { home: Some(PathBuf::from(home)), ..AgentEnv::default() }
    }

    #[test]
    fn jsonc_with_another_providers_model_is_pointed_at_anthropic_and_comes_back() {
        let path = Path::new("opencode.jsonc");
        let installed = OpenCode.install(path, Some(JSONC), &TARGET).unwrap();
        assert!(installed.contains("// my setup") && installed.contains("// trailing commas"), "{installed}");
        let v = jsonc::plain(path, Some(&installed));
        assert_eq!(v.pointer("/provider/anthropic/options/baseURL").and_then(Value::as_str), Some("http://127.0.0.1:8787/anthropic/v1"));
        assert_eq!(v.pointer("/provider/anthropic/options/apiKey").and_then(Value::as_str), Some("sk-capit-k"));
        assert_eq!((v["model"].as_str(), v["small_model"].as_str()), (Some(MODEL), Some(SMALL_MODEL)));
        assert_eq!(v.pointer("/provider/openai/options/timeout").and_then(Value::as_i64), Some(60000));
        let notes = OpenCode.notes(Some(JSONC), &TARGET);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("openai/gpt-5 is now anthropic/claude-sonnet-4-6"), "{notes:?}");
        let removed = OpenCode.uninstall(path, &installed, Some(JSONC)).unwrap();
        assert_eq!(jsonc::plain(path, Some(&removed)), jsonc::plain(path, Some(JSONC)), "content equal to the original");
        assert!(removed.contains("// my setup"));
    }

    #[test]
    fn an_anthropic_model_stays_and_a_new_file_gets_schema_and_model() {
        let path = Path::new("opencode.json");
        let mine = "{\n  \"$schema\": \"https://opencode.ai/config.json\",\n  \"model\": \"anthropic/claude-opus-4-8\"\n}\n";
        let installed = OpenCode.install(path, Some(mine), &TARGET).unwrap();
        assert_eq!(jsonc::plain(path, Some(&installed))["model"], "anthropic/claude-opus-4-8");
        assert!(OpenCode.notes(Some(mine), &TARGET).is_empty());
        assert_eq!(jsonc::plain(path, Some(&OpenCode.uninstall(path, &installed, Some(mine)).unwrap())), jsonc::plain(path, Some(mine)));
        let fresh = OpenCode.install(path, None, &TARGET).unwrap();
        let v = jsonc::plain(path, Some(&fresh));
        assert_eq!((v["$schema"].as_str(), v["model"].as_str()), (Some(SCHEMA), Some(MODEL)));
        assert!(fresh.trim_start().starts_with("{\n  \"$schema\""), "{fresh}");
        assert_eq!(jsonc::plain(path, Some(&OpenCode.uninstall(path, &fresh, None).unwrap())), serde_json::json!({}));
    }

    #[test]
    fn agents_on_other_providers_and_anthropic_disabled_are_refused() {
        let path = Path::new("opencode.json");
        for (config, reason) in [
            (r#"{"agent": {"plan": {"model": "openai/gpt-5"}}}"#, "agent \"plan\" uses model openai/gpt-5"),
            (r#"{"mode": {"build": {"model": "google/gemini-2.5-pro"}}}"#, "mode \"build\" uses model google/gemini-2.5-pro"),
            (r#"{"disabled_providers": ["anthropic"]}"#, "disabled_providers"),
            (r#"{"enabled_providers": ["openai"]}"#, "enabled_providers"),
        ] {
            let err = OpenCode.install(path, Some(config), &TARGET).unwrap_err();
            assert!(err.to_string().contains(reason), "{err}");
        }
        assert!(OpenCode.install(path, Some(r#"{"agent": {"plan": {"model": "anthropic/claude-opus-4-8"}}}"#), &TARGET).is_ok());
    }

    #[test]
    fn the_file_opencode_reads_is_the_one_edited() {
        let home = std::env::temp_dir().join(format!("capit-opencode-{}", std::process::id()));
        let h = home.to_str().unwrap();
        assert_eq!(OpenCode.config_path(&env(h)), Some(home.join(".config/opencode/opencode.json")));
        let xdg = AgentEnv { xdg_config_home: Some(home.join("xdg")), ..env(h) };
        assert_eq!(OpenCode.config_path(&xdg), Some(home.join("xdg/opencode/opencode.json")));
        std::fs::create_dir_all(home.join("xdg/opencode")).unwrap();
        std::fs::write(home.join("xdg/opencode/opencode.jsonc"), "{}").unwrap();
        assert_eq!(OpenCode.config_path(&xdg), Some(home.join("xdg/opencode/opencode.jsonc")), "JSONC first, as opencode reads it");
        let explicit = AgentEnv { opencode_config: Some(home.join("mine.json")), ..xdg.clone() };
        assert_eq!(OpenCode.config_path(&explicit), Some(home.join("mine.json")));
        let dir = AgentEnv { opencode_config_dir: Some(home.join("dir")), ..explicit };
        assert_eq!(OpenCode.config_path(&dir), Some(home.join("dir/opencode.json")));
        std::fs::remove_dir_all(&home).unwrap();
    }
}
