//! opencode: `~/.config/opencode/opencode.json` (`$XDG_CONFIG_HOME/opencode/opencode.json`),
//! `provider.anthropic.options.baseURL` and `.apiKey`. Its Anthropic client (`@ai-sdk/anthropic`)
//! posts to `{baseURL}/messages`, so the base URL carries `/v1`. Edited as JSON by key path.

use std::path::{Path, PathBuf};

use super::{AgentEnv, Consumer, EditError, Target, json};

pub struct OpenCode;

const BASE_URL: &[&str] = &["provider", "anthropic", "options", "baseURL"];
const KEY: &[&str] = &["provider", "anthropic", "options", "apiKey"];

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
        env.home.as_ref().map(|h| h.join(".config").join("opencode").join("opencode.json"))
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let base = format!("{}/v1", target.base_url.trim_end_matches('/'));
        json::set(path, existing, &[(BASE_URL, &base), (KEY, target.key)])
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        json::restore(path, current, original, &[BASE_URL, KEY])
    }
}
