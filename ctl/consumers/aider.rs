//! aider: `~/.aider.conf.yml`, a flat YAML mapping of its command-line options:
//! `openai-api-base` and `openai-api-key` (its OpenAI-compatible route; models are then named
//! `openai/<model>`). Edited line by line (see `lines`), so comments and every other line stay
//! byte for byte; the file is checked with a YAML parser first, and a broken one is refused.
//!
//! aider reaches a model through litellm, which picks the provider from the model's name: only
//! `openai/…` and OpenAI's own names go to `openai-api-base`. So a `model` of another provider
//! (`sonnet`, `anthropic/…`, `gemini/…`), or none (aider would pick one by the API keys it
//! finds, Anthropic's first), is set to the grant's (`openai/gpt-4o`, aider's own default for an
//! OpenAI key), and a `weak-model` or `editor-model` elsewhere to the same; all put back on
//! revoke. For a named OpenAI-compatible server, whose models capit cannot know, a model off the
//! route is refused instead.

use std::path::{Path, PathBuf};

use super::lines::{self, Syntax};
use super::{AgentEnv, Consumer, EditError, Target};

pub struct Aider;

const KEYS: [&str; 2] = ["openai-api-base", "openai-api-key"];

/// The model options aider sends requests with.
const MODEL_KEYS: [&str; 3] = ["model", "weak-model", "editor-model"];

/// aider's aliases that name OpenAI models (aider `models.py` `MODEL_ALIASES`).
const OPENAI_ALIASES: [&str; 6] = ["3", "35turbo", "35-turbo", "4", "4o", "4-turbo"];

fn check(path: &Path, text: &str) -> Result<(), EditError> {
    lines::yaml_mapping(path, text).map(|_| ())
}

/// Whether aider sends `model` to `openai-api-base`: `openai/…`, or an OpenAI model's own name.
fn on_route(model: &str) -> bool {
    match model.split_once('/') {
        Some((prefix, _)) => prefix == "openai",
        None => OPENAI_ALIASES.contains(&model) || ["gpt-", "o1", "o3", "o4", "chatgpt-", "ft:gpt"].iter().any(|p| model.starts_with(p)),
    }
}

/// The model the grant points aider at, by provider kind (none for a named server).
fn default_model(kind: &str) -> Option<&'static str> {
    match kind {
        "openai" => Some("openai/gpt-4o"),
        "openrouter" => Some("openai/anthropic/claude-sonnet-4"),
        _ => None,
    }
}

/// A model option the install sets: its key, the value it had, the value it gets.
type ModelChange = (&'static str, Option<String>, String);

fn model_changes(path: &Path, text: &str, kind: &str) -> Result<Vec<ModelChange>, EditError> {
    let doc = lines::yaml_mapping(path, text)?;
    let value = |key: &str| doc.as_ref().and_then(|d| d[key].as_str().map(str::to_string));
    let main = value("model");
    let mut changes = Vec::new();
    let effective = match &main {
        Some(model) if on_route(model) => model.clone(),
        _ => {
            let Some(new) = default_model(kind) else {
                return Err(EditError {
                    path: path.to_path_buf(),
                    line: None,
                    message: match &main {
                        Some(model) => {
                            format!("model {model} would not go through the grant's server; set model: openai/<a model it serves>")
                        }
                        None => {
                            "no model is set, and aider would pick one elsewhere; set model: openai/<a model the grant's server serves>"
                                .into()
                        }
                    },
                });
            };
            changes.push(("model", main, new.to_string()));
            new.to_string()
        }
    };
    for key in ["weak-model", "editor-model"] {
        if let Some(model) = value(key).filter(|m| !on_route(m)) {
            changes.push((key, Some(model), effective.clone()));
        }
    }
    Ok(changes)
}

impl Consumer for Aider {
    fn name(&self) -> &'static str {
        "aider"
    }

    fn provider(&self) -> &'static str {
        "openai"
    }

    fn describe(&self) -> &'static str {
        "aider (OpenAI-compatible route)"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        env.home.as_ref().map(|h| h.join(".aider.conf.yml"))
    }

    fn accepts(&self, kind: &str) -> bool {
        matches!(kind, "openai" | "openrouter" | "openai-compatible")
    }

    fn detect(&self, env: &AgentEnv) -> bool {
        self.config_path(env).is_some_and(|p| p.exists())
    }

    fn notes(&self, existing: Option<&str>, target: &Target) -> Vec<String> {
        let changes = model_changes(Path::new(".aider.conf.yml"), existing.unwrap_or(""), target.kind).unwrap_or_default();
        changes
            .into_iter()
            .filter_map(|(key, old, new)| old.map(|old| format!("aider's {key} {old} is now {new} (put back on revoke)")))
            .collect()
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let text = existing.unwrap_or("");
        let changes = model_changes(path, text, target.kind)?;
        let mut pairs: Vec<(&str, &str)> = vec![(KEYS[0], target.base_url), (KEYS[1], target.key)];
        pairs.extend(changes.iter().map(|(key, _, new)| (*key, new.as_str())));
        let out = lines::set(text, &pairs, Syntax::FlatYaml);
        check(path, &out)?;
        Ok(out)
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        check(path, current)?;
        // The model options the install changed: those the original had off the route, and a
        // `model` it lacked.
        let before = lines::yaml_mapping(path, original.unwrap_or("")).ok().flatten();
        let value = |key: &str| before.as_ref().and_then(|d| d[key].as_str().map(str::to_string));
        let mut keys: Vec<&str> = KEYS.to_vec();
        keys.extend(MODEL_KEYS.iter().copied().filter(|key| match value(key) {
            Some(model) => !on_route(&model),
            None => *key == "model",
        }));
        Ok(lines::unset(current, &keys, original, Syntax::FlatYaml))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_of_another_provider_is_pointed_at_the_grant_and_put_back() {
        let path = Path::new(".aider.conf.yml");
        let target = Target { base_url: "http://127.0.0.1:8787/openai/v1", key: "sk-capit-k", kind: "openai" };
        let original = "# aider\nmodel: sonnet\nweak-model: anthropic/claude-haiku-4-5\neditor-model: gpt-5\nauto-commits: false\n";
        let installed = Aider.install(path, Some(original), &target).unwrap();
        assert_eq!(
            installed,
            "# aider\nmodel: \"openai/gpt-4o\"\nweak-model: \"openai/gpt-4o\"\neditor-model: gpt-5\nauto-commits: false\nopenai-api-base: \"http://127.0.0.1:8787/openai/v1\"\nopenai-api-key: \"sk-capit-k\"\n"
        );
        assert_eq!(Aider.notes(Some(original), &target).len(), 2);
        assert_eq!(Aider.uninstall(path, &installed, Some(original)).unwrap(), original);
        let fresh = Aider.install(path, None, &target).unwrap();
        assert!(fresh.starts_with("openai-api-base:") && fresh.contains("model: \"openai/gpt-4o\""), "{fresh}");
        assert_eq!(Aider.uninstall(path, &fresh, None).unwrap(), "");
        let mine = "model: openai/gpt-5.5\n";
        let installed = Aider.install(path, Some(mine), &target).unwrap();
        assert!(installed.starts_with(mine) && Aider.notes(Some(mine), &target).is_empty());
        assert_eq!(Aider.uninstall(path, &installed, Some(mine)).unwrap(), mine);
        let server = Target { kind: "openai-compatible", ..target };
        assert!(
            Aider.install(path, Some("model: sonnet\n"), &server).unwrap_err().to_string().contains("model sonnet would not go through")
        );
        assert!(Aider.install(path, Some("model: openai/qwen3\n"), &server).is_ok());
    }

    #[test]
    fn a_broken_file_names_its_line() {
        let err = Aider
            .install(Path::new("a.yml"), Some("model: gpt-5\nread: [a, b\nx: 1\n"), &Target { base_url: "u", key: "k", kind: "openai" })
            .unwrap_err();
        assert!(err.line.is_some() && err.to_string().starts_with("a.yml:"), "{err}");
        assert!(
            Aider.install(Path::new("a.yml"), Some("- just\n- a list\n"), &Target { base_url: "u", key: "k", kind: "openai" }).is_err()
        );
    }
}
