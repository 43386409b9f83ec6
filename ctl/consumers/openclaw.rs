//! openclaw: `~/.openclaw/openclaw.json` (JSON5; `$OPENCLAW_CONFIG_PATH`, `$OPENCLAW_STATE_DIR`,
//! `$OPENCLAW_PROFILE` move it). A provider `models.providers.capit` of api
//! `anthropic-messages` (its base URL without `/v1`: the Anthropic client appends it), merged
//! into the catalogue (`models.mode: "merge"`), and `agents.defaults.model.primary` pointing at
//! it. Edited with jsonc-parser's concrete syntax tree, which keeps comments, formatting and key
//! order; restores of untouched files come from their original bytes.
//!
//! A per-agent `agents/<id>/agent/models.json` with its own `capit` provider would win over
//! this file, so an install is refused while one exists.

use std::path::{Path, PathBuf};

use jsonc_parser::ParseOptions;
use jsonc_parser::cst::{CstInputValue, CstObject, CstRootNode};
use serde_json::Value;

use super::{AgentEnv, Consumer, EditError, Target};

pub struct OpenClaw;

const PROVIDER: &str = "capit";
const MODEL: &str = "claude-sonnet-4-5";

fn options() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_loose_object_property_names: true,
        allow_trailing_commas: true,
        allow_missing_commas: false,
        allow_single_quoted_strings: true,
        allow_hexadecimal_numbers: true,
        allow_unary_plus_numbers: true,
        ..ParseOptions::default()
    }
}

fn parse(path: &Path, text: &str) -> Result<CstRootNode, EditError> {
    let text = if text.trim().is_empty() { "{}\n" } else { text };
    CstRootNode::parse(text, &options()).map_err(|e| EditError {
        path: path.to_path_buf(),
        line: Some(e.line_display()),
        message: format!("not valid JSON5: {}", e.kind()),
    })
}

fn plain(path: &Path, text: Option<&str>) -> Value {
    text.and_then(|t| parse(path, t).ok()).and_then(|root| root.value()).and_then(|v| v.to_serde_value()).unwrap_or(Value::Null)
}

fn input(value: &Value) -> CstInputValue {
    match value {
        Value::Null => CstInputValue::Null,
        Value::Bool(b) => CstInputValue::Bool(*b),
        Value::Number(n) => CstInputValue::Number(n.to_string()),
        Value::String(s) => CstInputValue::String(s.clone()),
        Value::Array(items) => CstInputValue::Array(items.iter().map(input).collect()),
        Value::Object(map) => CstInputValue::Object(map.iter().map(|(k, v)| (k.clone(), input(v))).collect()),
    }
}

fn set(object: &CstObject, name: &str, value: CstInputValue) {
    match object.get(name) {
        Some(prop) => prop.set_value(value),
        None => {
            object.append(name, value);
        }
    }
}

/// Sets `name` in `object` to its value in `before` (a plain JSON view of the original), or
/// removes it.
fn restore_prop(object: &CstObject, name: &str, before: Option<&Value>) {
    match before {
        Some(value) => set(object, name, input(value)),
        None => {
            if let Some(prop) = object.get(name) {
                prop.remove();
            }
        }
    }
}

/// Removes `name` when it holds an empty object and `before` had no such key.
fn drop_if_empty(object: &CstObject, name: &str, before: Option<&Value>) {
    if before.is_some() {
        return;
    }
    if let Some(prop) = object.get(name)
        && prop.value().and_then(|v| v.to_serde_value()).is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()))
    {
        prop.remove();
    }
}

impl Consumer for OpenClaw {
    fn name(&self) -> &'static str {
        "openclaw"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "openclaw"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        if let Some(path) = &env.openclaw_config_path {
            return Some(path.clone());
        }
        state_dir(env).map(|d| d.join("openclaw.json"))
    }

    fn check(&self, env: &AgentEnv) -> Result<(), String> {
        let Some(agents) = state_dir(env).map(|d| d.join("agents")) else { return Ok(()) };
        let Ok(entries) = std::fs::read_dir(&agents) else { return Ok(()) };
        for entry in entries.flatten() {
            let file = entry.path().join("agent").join("models.json");
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            let catalogue = plain(&file, Some(&text));
            let own = catalogue.pointer("/providers/capit").or_else(|| catalogue.get("capit"));
            let overrides =
                own.is_some_and(|p| ["baseUrl", "apiKey"].iter().any(|k| p.get(*k).and_then(Value::as_str).is_some_and(|s| !s.is_empty())));
            if overrides {
                return Err(format!(
                    "{} sets its own \"capit\" provider, which would win over openclaw.json; remove it first",
                    file.display()
                ));
            }
        }
        Ok(())
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let root = parse(path, existing.unwrap_or(""))?;
        let config = root.object_value_or_set();
        let models = config.object_value_or_set("models");
        if models.get("mode").is_none() {
            models.append("mode", CstInputValue::String("merge".into()));
        }
        let providers = models.object_value_or_set("providers");
        let provider = serde_json::json!({
            "baseUrl": target.base_url,
            "apiKey": target.key,
            "api": "anthropic-messages",
            "models": [{"id": MODEL, "name": "Claude Sonnet 4.5 via capit"}],
        });
        set(&providers, PROVIDER, input(&provider));
        let model = config.object_value_or_set("agents").object_value_or_set("defaults").object_value_or_set("model");
        set(&model, "primary", CstInputValue::String(format!("{PROVIDER}/{MODEL}")));
        Ok(root.to_string())
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let root = parse(path, current)?;
        let before = plain(path, original);
        let Some(config) = root.object_value() else { return Ok(root.to_string()) };
        if let Some(models) = config.object_value("models") {
            if let Some(providers) = models.object_value("providers") {
                restore_prop(&providers, PROVIDER, before.pointer("/models/providers/capit"));
            }
            drop_if_empty(&models, "providers", before.pointer("/models/providers"));
            restore_prop(&models, "mode", before.pointer("/models/mode"));
        }
        drop_if_empty(&config, "models", before.pointer("/models"));
        if let Some(defaults) = config.object_value("agents").and_then(|a| a.object_value("defaults")) {
            if let Some(model) = defaults.object_value("model") {
                restore_prop(&model, "primary", before.pointer("/agents/defaults/model/primary"));
            }
            drop_if_empty(&defaults, "model", before.pointer("/agents/defaults/model"));
        }
        if let Some(agents) = config.object_value("agents") {
            drop_if_empty(&agents, "defaults", before.pointer("/agents/defaults"));
        }
        drop_if_empty(&config, "agents", before.pointer("/agents"));
        Ok(root.to_string())
    }
}

/// `$OPENCLAW_STATE_DIR`, else `~/.openclaw` (`~/.openclaw-<profile>` with `$OPENCLAW_PROFILE`).
fn state_dir(env: &AgentEnv) -> Option<PathBuf> {
    if let Some(dir) = &env.openclaw_state_dir {
        return Some(dir.clone());
    }
    let home = env.home.as_ref()?;
    Some(match &env.openclaw_profile {
        Some(profile) => home.join(format!(".openclaw-{profile}")),
        None => home.join(".openclaw"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "// my openclaw\n{\n  gateway: { port: 18789 }, // local only\n  models: {\n    providers: {\n      ollama: { baseUrl: 'http://localhost:11434/v1', api: 'openai-completions' },\n    },\n  },\n  agents: { defaults: { model: { primary: 'ollama/qwen3' } } },\n}\n";

    #[test]
    fn a_provider_is_added_and_taken_out_keeping_comments() {
        let path = Path::new("openclaw.json");
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k" };
        let installed = OpenClaw.install(path, Some(ORIGINAL), &target).unwrap();
        assert!(installed.contains("// my openclaw") && installed.contains("// local only"), "{installed}");
        let v = plain(path, Some(&installed));
        assert_eq!(v.pointer("/models/providers/capit/baseUrl").and_then(Value::as_str), Some("http://127.0.0.1:8787/anthropic"));
        assert_eq!(v.pointer("/models/providers/ollama/api").and_then(Value::as_str), Some("openai-completions"));
        assert_eq!(v.pointer("/agents/defaults/model/primary").and_then(Value::as_str), Some("capit/claude-sonnet-4-5"));
        assert_eq!(v.pointer("/models/mode").and_then(Value::as_str), Some("merge"));
        let removed = OpenClaw.uninstall(path, &installed, Some(ORIGINAL)).unwrap();
        assert_eq!(plain(path, Some(&removed)), plain(path, Some(ORIGINAL)), "content equal to the original");
        assert!(removed.contains("// local only"));
        let fresh = OpenClaw.install(path, None, &target).unwrap();
        assert_eq!(plain(path, Some(&OpenClaw.uninstall(path, &fresh, None).unwrap())), serde_json::json!({}));
    }

    #[test]
    fn a_broken_file_names_its_line() {
        let err = OpenClaw.install(Path::new("o.json"), Some("{\n  a: 1,\n  b: [\n}"), &Target { base_url: "u", key: "k" }).unwrap_err();
        assert!(err.line.is_some() && err.to_string().starts_with("o.json:"), "{err}");
    }
}
