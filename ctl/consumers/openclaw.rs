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

use jsonc_parser::cst::{CstInputValue, CstRootNode};
use serde_json::Value;

use super::jsonc::{self, drop_if_empty, input, restore_prop, set};
use super::{AgentEnv, Consumer, EditError, Target};

pub struct OpenClaw;

const PROVIDER: &str = "capit";
const MODEL: &str = "claude-sonnet-4-5";

fn parse(path: &Path, text: &str) -> Result<CstRootNode, EditError> {
    jsonc::parse(path, text, "JSON5")
}

fn plain(path: &Path, text: Option<&str>) -> Value {
    jsonc::plain(path, text)
}

/// A model reference capit's provider serves.
fn capped(model: &str) -> bool {
    model.starts_with(&format!("{PROVIDER}/"))
}

/// Fallback models that are not capit's: openclaw would fail over to them, around the cap,
/// exactly when the cap refuses a request.
fn foreign_fallbacks(config: &Value) -> Vec<String> {
    config
        .pointer("/agents/defaults/model/fallbacks")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).filter(|m| !capped(m)).map(str::to_string).collect())
        .unwrap_or_default()
}

/// An explicit utility model of another provider (titles, recaps), which capit turns off so the
/// primary model does that work.
fn foreign_utility(config: &Value) -> Option<String> {
    config.pointer("/agents/defaults/utilityModel").and_then(Value::as_str).filter(|m| !m.is_empty() && !capped(m)).map(str::to_string)
}

/// Agents of their own (`agents.entries`) whose model is another provider's: refused, since
/// capit would have to rewrite each agent's setup.
fn foreign_agents(config: &Value) -> Vec<(String, String)> {
    let Some(entries) = config.pointer("/agents/entries").and_then(Value::as_object) else { return Vec::new() };
    entries
        .iter()
        .filter_map(|(name, agent)| {
            let model = agent.get("model").and_then(|m| m.as_str().or_else(|| m.get("primary").and_then(Value::as_str)))?;
            (!capped(model)).then(|| (name.clone(), model.to_string()))
        })
        .collect()
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

    fn notes(&self, existing: Option<&str>, _target: &Target) -> Vec<String> {
        let config = plain(Path::new("openclaw.json"), existing);
        let mut notes = Vec::new();
        if let Some(primary) =
            config.pointer("/agents/defaults/model/primary").or(config.pointer("/agents/defaults/model")).and_then(Value::as_str)
            && !capped(primary)
        {
            notes.push(format!("openclaw's default model {primary} is now {PROVIDER}/{MODEL} (put back on revoke)"));
        }
        let fallbacks = foreign_fallbacks(&config);
        if !fallbacks.is_empty() {
            notes.push(format!(
                "openclaw's fallback models ({}) are off while the grant is installed: they would go around the cap",
                fallbacks.join(", ")
            ));
        }
        if let Some(utility) = foreign_utility(&config) {
            notes.push(format!("openclaw's utility model {utility} is off while the grant is installed (the capped model does its work)"));
        }
        notes
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let root = parse(path, existing.unwrap_or(""))?;
        let before = plain(path, existing);
        if let Some((agent, model)) = foreign_agents(&before).into_iter().next() {
            return Err(EditError {
                path: path.to_path_buf(),
                line: None,
                message: format!(
                    "agent \"{agent}\" uses model {model}, which the grant does not cap; point it at {PROVIDER}/{MODEL} or remove its model first"
                ),
            });
        }
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
        let defaults = config.object_value_or_set("agents").object_value_or_set("defaults");
        let model = defaults.object_value_or_set("model");
        set(&model, "primary", CstInputValue::String(format!("{PROVIDER}/{MODEL}")));
        if !foreign_fallbacks(&before).is_empty() {
            set(&model, "fallbacks", CstInputValue::Array(Vec::new()));
        }
        if foreign_utility(&before).is_some() {
            set(&defaults, "utilityModel", CstInputValue::String(String::new()));
        }
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
            let old_model = before.pointer("/agents/defaults/model");
            match (defaults.object_value("model"), old_model) {
                // The string form (`model: "ollama/qwen3"`) comes back whole.
                (_, Some(old)) if !old.is_object() => restore_prop(&defaults, "model", Some(old)),
                (Some(model), _) => {
                    restore_prop(&model, "primary", before.pointer("/agents/defaults/model/primary"));
                    if !foreign_fallbacks(&before).is_empty() {
                        restore_prop(&model, "fallbacks", before.pointer("/agents/defaults/model/fallbacks"));
                    }
                }
                (None, _) => {}
            }
            if foreign_utility(&before).is_some() {
                restore_prop(&defaults, "utilityModel", before.pointer("/agents/defaults/utilityModel"));
            }
            drop_if_empty(&defaults, "model", old_model);
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
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k", kind: "anthropic" };
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
    fn fallbacks_and_utility_models_of_other_providers_are_off_while_installed() {
        let path = Path::new("openclaw.json");
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k", kind: "anthropic" };
        let original = "{\n  // mine\n  agents: {\n    defaults: {\n      model: { primary: 'openai/gpt-5.5', fallbacks: ['minimax/MiniMax-M2.7'] },\n      utilityModel: 'openai/gpt-5.4-mini',\n    },\n  },\n}\n";
        let installed = OpenClaw.install(path, Some(original), &target).unwrap();
        let v = plain(path, Some(&installed));
        assert_eq!(v.pointer("/agents/defaults/model/primary").and_then(Value::as_str), Some("capit/claude-sonnet-4-5"));
        assert_eq!(v.pointer("/agents/defaults/model/fallbacks"), Some(&serde_json::json!([])));
        assert_eq!(v.pointer("/agents/defaults/utilityModel").and_then(Value::as_str), Some(""));
        let notes = OpenClaw.notes(Some(original), &target);
        assert!(notes.len() == 3 && notes[0].contains("openai/gpt-5.5") && notes[1].contains("MiniMax"), "{notes:?}");
        let removed = OpenClaw.uninstall(path, &installed, Some(original)).unwrap();
        assert_eq!(plain(path, Some(&removed)), plain(path, Some(original)));

        // The string form of the default model comes back as a string.
        let short = "{ agents: { defaults: { model: 'ollama/qwen3' } } }\n";
        let installed = OpenClaw.install(path, Some(short), &target).unwrap();
        assert_eq!(
            plain(path, Some(&installed)).pointer("/agents/defaults/model/primary").and_then(Value::as_str),
            Some("capit/claude-sonnet-4-5")
        );
        assert_eq!(plain(path, Some(&OpenClaw.uninstall(path, &installed, Some(short)).unwrap())), plain(path, Some(short)));

        // An agent of its own on another provider is refused, with the reason.
        let own = "{ agents: { entries: { research: { model: 'openai/gpt-5.5' } } } }";
        let err = OpenClaw.install(path, Some(own), &target).unwrap_err();
        assert!(err.to_string().contains("agent \"research\" uses model openai/gpt-5.5"), "{err}");
    }

    #[test]
    fn a_broken_file_names_its_line() {
        let err = OpenClaw
            .install(Path::new("o.json"), Some("{\n  a: 1,\n  b: [\n}"), &Target { base_url: "u", key: "k", kind: "anthropic" })
            .unwrap_err();
        assert!(err.line.is_some() && err.to_string().starts_with("o.json:"), "{err}");
    }
}
