//! Consumers: agents whose own configuration capit can point at the proxy with a grant's key.
//!
//! Each consumer is a pure text transform (`install`, `uninstall`) over its file's format, so
//! the edits are unit-tested without touching a disk; `files` does the one safe write. An edit
//! changes only capit's own keys and keeps every other setting, comment (where the format has
//! them) and the key order. What an install replaced is recovered from the file's original
//! text, which the daemon keeps with the grant: on revoke, a file still exactly as capit wrote
//! it gets its original bytes back; one the user has edited since loses only capit's keys.
//!
//! An install also leaves the agent using the capped provider: where the file selects a model
//! of another provider (which would go around the proxy), the consumer points it at the capped
//! one and says so (`notes`), or refuses with the reason. Files with CRLF line endings are
//! edited as LF and given CRLF back (`install`, `uninstall` below), so they stay byte-exact.

mod aider;
mod claude;
mod codex;
mod continue_dev;
pub mod dotenv;
pub mod files;
mod goose;
mod json;
mod jsonc;
mod lines;
mod openclaw;
mod opencode;

use std::path::{Path, PathBuf};

/// What an install points the agent at.
pub struct Target<'a> {
    pub base_url: &'a str,
    pub key: &'a str,
    /// The grant's provider kind (`openai`, `anthropic`, `openrouter`, ...), which decides the
    /// model an agent is pointed at when its own choice would go around the proxy.
    pub kind: &'a str,
}

/// A file that does not parse in its own format.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct EditError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// The environment values consumers find their files by, read once by capitctl.
#[derive(Clone, Debug, Default)]
pub struct AgentEnv {
    pub home: Option<PathBuf>,
    pub claude_config_dir: Option<PathBuf>,
    pub codex_home: Option<PathBuf>,
    pub openclaw_config_path: Option<PathBuf>,
    pub openclaw_state_dir: Option<PathBuf>,
    pub openclaw_profile: Option<String>,
    pub xdg_config_home: Option<PathBuf>,
    pub opencode_config: Option<PathBuf>,
    pub opencode_config_dir: Option<PathBuf>,
    pub continue_global_dir: Option<PathBuf>,
}

impl AgentEnv {
    pub fn from_process() -> AgentEnv {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        AgentEnv {
            home: var("HOME"),
            claude_config_dir: var("CLAUDE_CONFIG_DIR"),
            codex_home: var("CODEX_HOME"),
            openclaw_config_path: var("OPENCLAW_CONFIG_PATH"),
            openclaw_state_dir: var("OPENCLAW_STATE_DIR"),
            openclaw_profile: var("OPENCLAW_PROFILE").map(|p| p.to_string_lossy().into_owned()),
            xdg_config_home: var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()),
            opencode_config: var("OPENCODE_CONFIG"),
            opencode_config_dir: var("OPENCODE_CONFIG_DIR"),
            continue_global_dir: var("CONTINUE_GLOBAL_DIR"),
        }
    }
}

pub trait Consumer: Sync {
    /// The agent's name on the command line (`capitctl grant claude 5`).
    fn name(&self) -> &'static str;
    /// The provider whose API the agent speaks by default.
    fn provider(&self) -> &'static str;
    /// What it is, for `capitctl agents`.
    fn describe(&self) -> &'static str;
    /// The configuration file capit edits.
    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf>;
    /// The file's text with capit's settings in.
    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError>;
    /// The file's text with capit's settings taken out again: each key capit set gets the value
    /// it had in `original` (the file before the install), or goes.
    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError>;

    /// What else the install changes in the agent's behaviour, for the grant's output: a model
    /// of another provider replaced by the capped one (put back on revoke).
    fn notes(&self, _existing: Option<&str>, _target: &Target) -> Vec<String> {
        Vec::new()
    }

    /// Whether the file holds the key (and so is written 0600).
    fn holds_key(&self) -> bool {
        true
    }

    /// Whether the agent can use a provider of this kind (`--provider` overrides the default
    /// where the agent speaks that provider's API).
    fn accepts(&self, kind: &str) -> bool {
        kind == self.provider()
    }

    /// Further files the agent needs changed with this one, each edited by its own consumer.
    fn companions(&self) -> &'static [&'static dyn Consumer] {
        &[]
    }

    /// Anything else on this machine that would defeat an install (a file that overrides it);
    /// checked before a grant is made.
    fn check(&self, _env: &AgentEnv) -> Result<(), String> {
        Ok(())
    }

    /// Found on this machine: its configuration directory exists.
    fn detect(&self, env: &AgentEnv) -> bool {
        self.config_path(env).and_then(|p| p.parent().map(Path::to_path_buf)).is_some_and(|d| d.is_dir())
    }
}

/// Every consumer capit can install into.
pub fn all() -> &'static [&'static dyn Consumer] {
    &[
        &claude::Claude,
        &codex::Codex,
        &dotenv::GeminiCli,
        &opencode::OpenCode,
        &aider::Aider,
        &continue_dev::ContinueDev,
        &openclaw::OpenClaw,
        &goose::Goose,
    ]
}

pub fn find(name: &str) -> Option<&'static dyn Consumer> {
    all().iter().copied().find(|c| c.name() == name)
}

/// The editor an install record names: a consumer or one of their companions.
pub fn editor(name: &str) -> Option<&'static dyn Consumer> {
    all().iter().flat_map(|c| std::iter::once(*c).chain(c.companions().iter().copied())).find(|c| c.name() == name)
}

/// Agents capit knows but cannot serve through the proxy, with the reason given instead of a
/// half-working install.
pub fn unsupported(name: &str) -> Option<&'static str> {
    match name {
        "cursor" => Some(
            "cursor sends its requests from Cursor's own servers, which cannot reach a proxy on 127.0.0.1; give it a key OpenRouter caps itself instead: capitctl grant cursor AMOUNT --direct",
        ),
        "windsurf" => Some(
            "windsurf takes only vendors' own keys for its own model list (no custom base URL, so neither capit's proxy nor an OpenRouter key); capit cannot cap it",
        ),
        _ => None,
    }
}

/// For agents that take a direct (OpenRouter) key only through their own settings screen, which
/// keeps it where capit cannot edit safely: how to enter it there.
pub fn direct_instructions(name: &str) -> Option<&'static str> {
    match name {
        "cursor" => Some(
            "In Cursor: Settings > Models > API Keys: paste the key as the OpenAI API Key, turn on \"Override OpenAI Base URL\" and set it to the base URL above, then add the OpenRouter models you want by name (e.g. anthropic/claude-sonnet-4.5). Cursor keeps these in its own database, which capit does not edit; revoking the grant deletes the key on OpenRouter.",
        ),
        _ => None,
    }
}

/// Whether every line of a text ends in CRLF (a file edited on Windows).
fn crlf(text: &str) -> bool {
    text.contains("\r\n") && text.matches('\n').count() == text.matches("\r\n").count()
}

fn lf(text: &str) -> String {
    text.replace("\r\n", "\n")
}

/// `consumer.install`, with a CRLF file edited as LF and given its CRLF back.
pub fn install(consumer: &dyn Consumer, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
    match existing {
        Some(text) if crlf(text) => Ok(consumer.install(path, Some(&lf(text)), target)?.replace('\n', "\r\n")),
        _ => consumer.install(path, existing, target),
    }
}

/// `consumer.notes`, on the text as `install` sees it.
pub fn notes(consumer: &dyn Consumer, existing: Option<&str>, target: &Target) -> Vec<String> {
    consumer.notes(existing.map(lf).as_deref(), target)
}

/// `consumer.uninstall`, with a CRLF file edited as LF and given its CRLF back.
pub fn uninstall(consumer: &dyn Consumer, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
    let original = original.map(lf);
    if crlf(current) {
        Ok(consumer.uninstall(path, &lf(current), original.as_deref())?.replace('\n', "\r\n"))
    } else {
        consumer.uninstall(path, current, original.as_deref())
    }
}

/// `~/…` for paths under the home directory, for the one-line messages.
pub fn display_path(path: &Path, env: &AgentEnv) -> String {
    match env.home.as_ref().and_then(|home| path.strip_prefix(home).ok()) {
        Some(rest) => format!("~/{}", rest.display()),
        None => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_files_are_edited_as_lf_and_keep_their_crlf() {
        let path = Path::new(".env");
        let gemini = find("gemini").unwrap();
        let target = Target { base_url: "http://127.0.0.1:8787/gemini", key: "sk-capit-k", kind: "gemini" };
        let original = "# keys\r\nGOOGLE_CLOUD_PROJECT=p\r\n";
        let installed = install(gemini, path, Some(original), &target).unwrap();
        assert_eq!(
            installed,
            "# keys\r\nGOOGLE_CLOUD_PROJECT=p\r\nGOOGLE_GEMINI_BASE_URL=http://127.0.0.1:8787/gemini\r\nGEMINI_API_KEY=sk-capit-k\r\n"
        );
        assert_eq!(uninstall(gemini, path, &installed, Some(original)).unwrap(), original, "byte for byte, CRLF and all");
        let mixed = "A=1\r\nB=2\n";
        assert!(!crlf(mixed) && !crlf("A=1\n") && crlf("A=1\r\n"));
        let claude = find("claude").unwrap();
        let json = "{\r\n  \"model\": \"opus\"\r\n}\r\n";
        let installed = install(claude, Path::new("settings.json"), Some(json), &target).unwrap();
        assert!(installed.contains("\"model\": \"opus\",\r\n") && !installed.replace("\r\n", "").contains('\n'), "{installed:?}");
        assert_eq!(uninstall(claude, Path::new("settings.json"), &installed, Some(json)).unwrap(), json);
    }
}
