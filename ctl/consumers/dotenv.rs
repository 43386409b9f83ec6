//! Dotenv files (edited line by line, see `lines`): Gemini CLI's `~/.gemini/.env`, and the file
//! `--env-file` names.

use std::path::{Path, PathBuf};

use super::lines::{self, Syntax};
use super::{AgentEnv, Consumer, EditError, Target};

/// The variables that point an SDK of a provider's kind at the proxy.
pub fn variables(provider_kind: &str) -> (&'static str, &'static str) {
    match provider_kind {
        "anthropic" => ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
        "gemini" => ("GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"),
        _ => ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
    }
}

/// Sets `pairs` in a dotenv text (see `lines`).
pub fn set(text: &str, pairs: &[(&str, &str)]) -> String {
    lines::set(text, pairs, Syntax::Dotenv)
}

/// Takes `keys` out of a dotenv text again (see `lines`).
pub fn unset(current: &str, keys: &[&str], original: Option<&str>) -> String {
    lines::unset(current, keys, original, Syntax::Dotenv)
}

/// Gemini CLI: `~/.gemini/.env`, which it always reads: `GOOGLE_GEMINI_BASE_URL` selects its
/// gateway mode and `GEMINI_API_KEY` is sent as `x-goog-api-key`.
pub struct GeminiCli;

impl Consumer for GeminiCli {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn provider(&self) -> &'static str {
        "gemini"
    }

    fn describe(&self) -> &'static str {
        "Gemini CLI"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        env.home.as_ref().map(|h| h.join(".gemini").join(".env"))
    }

    fn install(&self, _path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let (url, key) = variables("gemini");
        Ok(set(existing.unwrap_or(""), &[(url, target.base_url), (key, target.key)]))
    }

    fn uninstall(&self, _path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let (url, key) = variables("gemini");
        Ok(unset(current, &[url, key], original))
    }
}
