//! aider: `~/.aider.conf.yml`, a flat YAML mapping of its command-line options:
//! `openai-api-base` and `openai-api-key` (its OpenAI-compatible route; models are then named
//! `openai/<model>`). Edited line by line (see `lines`), so comments and every other line stay
//! byte for byte; the file is checked with a YAML parser first, and a broken one is refused.

use std::path::{Path, PathBuf};

use super::lines::{self, Syntax};
use super::{AgentEnv, Consumer, EditError, Target};

pub struct Aider;

const KEYS: [&str; 2] = ["openai-api-base", "openai-api-key"];

fn check(path: &Path, text: &str) -> Result<(), EditError> {
    lines::yaml_mapping(path, text).map(|_| ())
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

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let text = existing.unwrap_or("");
        check(path, text)?;
        let out = lines::set(text, &[(KEYS[0], target.base_url), (KEYS[1], target.key)], Syntax::FlatYaml);
        check(path, &out)?;
        Ok(out)
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        check(path, current)?;
        Ok(lines::unset(current, &KEYS, original, Syntax::FlatYaml))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_file_names_its_line() {
        let err =
            Aider.install(Path::new("a.yml"), Some("model: gpt-5\nread: [a, b\nx: 1\n"), &Target { base_url: "u", key: "k" }).unwrap_err();
        assert!(err.line.is_some() && err.to_string().starts_with("a.yml:"), "{err}");
        assert!(Aider.install(Path::new("a.yml"), Some("- just\n- a list\n"), &Target { base_url: "u", key: "k" }).is_err());
    }
}
