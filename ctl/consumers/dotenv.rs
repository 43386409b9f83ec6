//! Dotenv files (edited line by line, see `lines`): Gemini CLI's `~/.gemini/.env`, and the file
//! `--env-file` names.

use std::path::{Path, PathBuf};

use super::lines::{self, Syntax};
use super::{AgentEnv, Consumer, EditError, Target, jsonc};

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

/// Gemini CLI: `~/.gemini/.env` (read in trusted folders): `GOOGLE_GEMINI_BASE_URL` selects its
/// gateway mode and `GEMINI_API_KEY` is sent as `x-goog-api-key`; and, in `settings.json`,
/// `security.auth.selectedType: "gemini-api-key"`, without which it refuses to use the key
/// (checked with Gemini CLI 0.61: "Invalid auth method selected").
pub struct GeminiCli;

/// The `~/.gemini/settings.json` half of the Gemini CLI install. Gemini CLI allows comments in
/// it, so it is edited as JSONC (see `jsonc`), comments kept.
pub struct GeminiSettings;

const AUTH_TYPE: &[&str] = &["security", "auth", "selectedType"];

impl Consumer for GeminiSettings {
    fn name(&self) -> &'static str {
        "gemini-settings"
    }

    fn provider(&self) -> &'static str {
        "gemini"
    }

    fn describe(&self) -> &'static str {
        "Gemini CLI settings"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        env.home.as_ref().map(|h| h.join(".gemini").join("settings.json"))
    }

    fn holds_key(&self) -> bool {
        false
    }

    fn install(&self, path: &Path, existing: Option<&str>, _target: &Target) -> Result<String, EditError> {
        let root = jsonc::parse(path, existing.unwrap_or(""), "JSON")?;
        jsonc::set_path(path, &root, AUTH_TYPE, jsonc_parser::cst::CstInputValue::String("gemini-api-key".into()))?;
        Ok(root.to_string())
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let root = jsonc::parse(path, current, "JSON")?;
        let before = jsonc::plain(path, original);
        jsonc::restore_path(&root, AUTH_TYPE, &before);
        Ok(root.to_string())
    }
}

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

    fn companions(&self) -> &'static [&'static dyn Consumer] {
        &[&GeminiSettings]
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
