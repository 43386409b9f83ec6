//! Codex CLI: `~/.codex/config.toml` (or `$CODEX_HOME/config.toml`). A custom provider
//! `[model_providers.capit]` speaking the Responses API, with the key inline as
//! `experimental_bearer_token` (desktop launches do not inherit shell variables), selected by a
//! top-level `model_provider = "capit"`. A custom id is needed: Codex ignores overrides of its
//! built-in `openai` provider.
//!
//! A top-level `profile` (Codex before 0.169; 0.169 refuses it and reads profiles from
//! `<name>.config.toml` only with `--profile`) selects a profile whose own `model_provider`
//! would win over the top-level one, so that profile's `model_provider` is pointed at `capit`
//! too (put back on revoke).
//!
//! TOML is edited with toml_edit, which keeps comments, blank lines and key order byte for byte
//! outside the keys capit touches.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table, value};

use super::{AgentEnv, Consumer, EditError, Target};

pub struct Codex;

fn parse(path: &Path, text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| {
        let line = e.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        EditError { path: path.to_path_buf(), line, message: format!("not valid TOML: {}", e.message()) }
    })
}

/// The active profile (top-level `profile`) when it names a provider other than capit's.
fn foreign_profile(doc: &DocumentMut) -> Option<(String, String)> {
    let name = doc.get("profile")?.as_str()?;
    let provider = doc.get("profiles")?.get(name)?.get("model_provider")?.as_str()?;
    (provider != "capit").then(|| (name.to_string(), provider.to_string()))
}

impl Consumer for Codex {
    fn name(&self) -> &'static str {
        "codex"
    }

    fn provider(&self) -> &'static str {
        "openai"
    }

    fn describe(&self) -> &'static str {
        "OpenAI Codex CLI"
    }

    fn accepts(&self, kind: &str) -> bool {
        matches!(kind, "openai" | "openai-compatible")
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        match &env.codex_home {
            Some(dir) => Some(dir.join("config.toml")),
            None => env.home.as_ref().map(|h| h.join(".codex").join("config.toml")),
        }
    }

    fn notes(&self, existing: Option<&str>, _target: &Target) -> Vec<String> {
        let Ok(doc) = existing.unwrap_or("").parse::<DocumentMut>() else { return Vec::new() };
        let mut notes = Vec::new();
        if let Some(old) = doc.get("model_provider").and_then(Item::as_str).filter(|p| *p != "capit") {
            notes.push(format!("codex's model_provider {old} is now capit (put back on revoke)"));
        }
        if let Some((profile, old)) = foreign_profile(&doc) {
            notes.push(format!("codex's profile {profile} uses model_provider capit instead of {old} (put back on revoke)"));
        }
        notes
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let mut doc = parse(path, existing.unwrap_or(""))?;
        if let Some((profile, _)) = foreign_profile(&doc) {
            doc["profiles"][profile.as_str()]["model_provider"] = value("capit");
        }
        doc["model_provider"] = value("capit");
        let providers = doc.entry("model_providers").or_insert_with(|| {
            let mut table = Table::new();
            table.set_implicit(true);
            Item::Table(table)
        });
        let Some(providers) = providers.as_table_like_mut() else {
            return Err(EditError { path: path.to_path_buf(), line: None, message: "model_providers is not a table".into() });
        };
        let mut capit = Table::new();
        capit["name"] = value("capit");
        capit["base_url"] = value(target.base_url);
        capit["wire_api"] = value("responses");
        capit["experimental_bearer_token"] = value(target.key);
        providers.insert("capit", Item::Table(capit));
        Ok(doc.to_string())
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let mut doc = parse(path, current)?;
        let before = parse(path, original.unwrap_or("")).unwrap_or_default();
        if let Some((profile, old)) = foreign_profile(&before)
            && let Some(table) = doc.get_mut("profiles").and_then(|p| p.get_mut(profile.as_str())).and_then(Item::as_table_like_mut)
        {
            table.insert("model_provider", value(old));
        }
        match before.get("model_provider") {
            Some(item) => doc["model_provider"] = item.clone(),
            None => {
                doc.remove("model_provider");
            }
        }
        let old_capit = before.get("model_providers").and_then(|p| p.get("capit")).cloned();
        if let Some(providers) = doc.get_mut("model_providers").and_then(Item::as_table_like_mut) {
            match old_capit {
                Some(item) => {
                    providers.insert("capit", item);
                }
                None => {
                    providers.remove("capit");
                }
            }
            let empty = providers.is_empty();
            if empty && before.get("model_providers").is_none() {
                doc.remove("model_providers");
            }
        }
        Ok(doc.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXISTING: &str = "# my codex setup\nmodel = \"gpt-5.5\"  # the default\napproval_policy = \"on-request\"\n\n[model_providers.ollama]\nname = \"Ollama\"\nbase_url = \"http://localhost:11434/v1\"\n\n[profiles.fast]\nmodel = \"gpt-5-mini\"\n";

    #[test]
    fn install_adds_a_provider_and_uninstall_gives_the_bytes_back() {
        let path = Path::new("config.toml");
        let target = Target { base_url: "http://127.0.0.1:8787/openai/v1", key: "sk-capit-x", kind: "openai" };
        let installed = Codex.install(path, Some(EXISTING), &target).unwrap();
        let doc: DocumentMut = installed.parse().unwrap();
        assert_eq!(doc["model_provider"].as_str(), Some("capit"));
        assert_eq!(doc["model_providers"]["capit"]["wire_api"].as_str(), Some("responses"));
        assert_eq!(doc["model_providers"]["capit"]["experimental_bearer_token"].as_str(), Some("sk-capit-x"));
        assert_eq!(doc["model_providers"]["ollama"]["name"].as_str(), Some("Ollama"));
        assert!(installed.contains("# my codex setup\n") && installed.contains("# the default"));
        assert_eq!(Codex.uninstall(path, &installed, Some(EXISTING)).unwrap(), EXISTING);
        let fresh = Codex.install(path, None, &target).unwrap();
        assert!(fresh.starts_with("model_provider = \"capit\"\n"), "{fresh}");
        assert_eq!(Codex.uninstall(path, &fresh, None).unwrap().trim(), "");
    }

    #[test]
    fn the_active_profiles_provider_points_at_capit_too() {
        let path = Path::new("config.toml");
        let target = Target { base_url: "http://127.0.0.1:8787/openai/v1", key: "sk-capit-x", kind: "openai" };
        let original = "profile = \"local\"\nmodel_provider = \"openai\"\n\n[profiles.local]\nmodel = \"gpt-5.5\"\nmodel_provider = \"ollama\" # my box\n";
        let installed = Codex.install(path, Some(original), &target).unwrap();
        let doc: DocumentMut = installed.parse().unwrap();
        assert_eq!(doc["profiles"]["local"]["model_provider"].as_str(), Some("capit"));
        assert_eq!(doc["model_provider"].as_str(), Some("capit"));
        assert_eq!(Codex.notes(Some(original), &target).len(), 2);
        let back = Codex.uninstall(path, &installed, Some(original)).unwrap();
        let doc: DocumentMut = back.parse().unwrap();
        assert_eq!((doc["profiles"]["local"]["model_provider"].as_str(), doc["model_provider"].as_str()), (Some("ollama"), Some("openai")));
    }

    #[test]
    fn a_broken_file_is_an_error_naming_its_line() {
        let err =
            Codex.install(Path::new("c.toml"), Some("a = 1\nb = [\n"), &Target { base_url: "u", key: "k", kind: "openai" }).unwrap_err();
        assert!(err.line.is_some() && err.to_string().starts_with("c.toml:"), "{err}");
    }
}
