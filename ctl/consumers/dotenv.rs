//! Dotenv files, edited line by line: a line `KEY=value` (or `export KEY=value`) for each of
//! capit's keys is replaced in place or appended; every other line, comment and blank line is
//! kept byte for byte. Used by Gemini CLI (`~/.gemini/.env`) and `env --env-file`.

use std::path::{Path, PathBuf};

use super::{AgentEnv, Consumer, EditError, Target};

/// The variables that point an SDK of a provider's kind at the proxy.
pub fn variables(provider_kind: &str) -> (&'static str, &'static str) {
    match provider_kind {
        "anthropic" => ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
        "gemini" => ("GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"),
        _ => ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
    }
}

fn key_of(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line);
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('#')).then_some(key)
}

/// Sets `pairs` in `text`: replaced where a line has the key, else appended.
pub fn set(text: &str, pairs: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for (key, value) in pairs {
        let line = format!("{key}={value}");
        match lines.iter().position(|l| key_of(l) == Some(key)) {
            Some(i) => lines[i] = line,
            None => lines.push(line),
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Takes `keys` out of `current` again: each gets its line from `original` back, or goes.
pub fn unset(current: &str, keys: &[&str], original: Option<&str>) -> String {
    let old_line = |key: &str| original.and_then(|o| o.lines().find(|l| key_of(l) == Some(key)).map(str::to_string));
    let mut lines: Vec<String> = Vec::new();
    for line in current.lines() {
        match key_of(line).filter(|k| keys.contains(k)) {
            Some(key) => {
                if let Some(old) = old_line(key) {
                    lines.push(old);
                }
            }
            None => lines.push(line.to_string()),
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    let mut out = lines.join("\n");
    if current.ends_with('\n') || original.is_some_and(|o| o.ends_with('\n')) {
        out.push('\n');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_replaced_in_place_or_appended_and_restored() {
        let original = "# keys\nexport GEMINI_API_KEY=AIza-real\nGOOGLE_CLOUD_PROJECT=p1\n";
        let installed = set(original, &[("GOOGLE_GEMINI_BASE_URL", "http://x/gemini"), ("GEMINI_API_KEY", "sk-capit-y")]);
        assert_eq!(installed, "# keys\nGEMINI_API_KEY=sk-capit-y\nGOOGLE_CLOUD_PROJECT=p1\nGOOGLE_GEMINI_BASE_URL=http://x/gemini\n");
        assert_eq!(unset(&installed, &["GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"], Some(original)), original);
        let fresh = set("", &[("A", "1")]);
        assert_eq!(unset(&fresh, &["A"], None), "");
    }
}
