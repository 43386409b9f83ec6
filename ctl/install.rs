//! Putting a grant's key into an agent's files and taking it out again, around the pure edits
//! of `consumers`: which files, in what order, what to record, and how to undo.
//!
//! An install is planned first (every file read and its edit checked, so a broken file stops
//! everything before a grant exists), then applied file by file; each file written gets an
//! `InstallRecord` with its text before, a hash of what was written and, for a file that holds
//! the key and was made 0600, its old mode. A file the edit leaves as it is is not written.
//! Granting again carries each file's first original forward, so a revoke still gives back the
//! file as it was before capit ever touched it.

use std::path::{Path, PathBuf};

use anyhow::Context;

use capit::proto::v1 as pb;

use crate::consumers::{self, AgentEnv, Consumer, Target, files};

/// Where a grant's key goes: an agent's own configuration, or a dotenv file.
pub enum Installer {
    Agent(&'static dyn Consumer),
    EnvFile,
}

impl Installer {
    /// The installers for an agent: its own file, then its companions'.
    pub fn for_agent(consumer: &'static dyn Consumer) -> Vec<Installer> {
        std::iter::once(consumer).chain(consumer.companions().iter().copied()).map(Installer::Agent).collect()
    }

    /// The installer an install record names.
    pub fn of_record(record: &pb::InstallRecord) -> Installer {
        match consumers::editor(&record.agent) {
            Some(c) => Installer::Agent(c),
            None => Installer::EnvFile,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Installer::Agent(c) => c.name(),
            Installer::EnvFile => "env",
        }
    }

    pub fn holds_key(&self) -> bool {
        match self {
            Installer::Agent(c) => c.holds_key(),
            Installer::EnvFile => true,
        }
    }

    pub fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, consumers::EditError> {
        match self {
            Installer::Agent(c) => consumers::install(*c, path, existing, target),
            Installer::EnvFile => {
                let (url, key) = consumers::dotenv::variables(target.kind);
                Ok(consumers::dotenv::set(existing.unwrap_or(""), &[(url, target.base_url), (key, target.key)]))
            }
        }
    }

    fn notes(&self, existing: Option<&str>, target: &Target) -> Vec<String> {
        match self {
            Installer::Agent(c) => consumers::notes(*c, existing, target),
            Installer::EnvFile => Vec::new(),
        }
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>, kind: &str) -> Result<String, consumers::EditError> {
        match self {
            Installer::Agent(c) => consumers::uninstall(*c, path, current, original),
            Installer::EnvFile => {
                let (url, key) = consumers::dotenv::variables(kind);
                Ok(consumers::dotenv::unset(current, &[url, key], original))
            }
        }
    }
}

/// One file an install changes: read, and its edit checked, before any grant exists.
pub struct Step {
    pub installer: Installer,
    pub path: PathBuf,
    /// What else the install changes in the agent's behaviour (a model pointed at the grant's).
    pub notes: Vec<String>,
}

/// Reads every file and checks its edit (with a stand-in key): a file that does not parse, or
/// whose settings would go around the cap, stops the install here, untouched.
pub fn plan(installers: Vec<(Installer, PathBuf)>, kind: &str) -> anyhow::Result<Vec<Step>> {
    let check = Target { base_url: "http://127.0.0.1/", key: "sk-capit-check", kind };
    let mut steps = Vec::new();
    for (installer, path) in installers {
        let existing = files::read(&path).with_context(|| format!("reading {}", path.display()))?;
        installer.install(&path, existing.as_deref(), &check)?;
        let notes = installer.notes(existing.as_deref(), &check);
        steps.push(Step { installer, path, notes });
    }
    Ok(steps)
}

/// What one file's install did, for the grant's output.
pub struct Written {
    pub shown: String,
    pub mode_before: Option<u32>,
    pub mode: Option<u32>,
}

/// Writes each planned file with the grant's key. `replaced` are the install records of the
/// grant this one replaces: their originals (and old modes) are carried forward, and a file
/// they name that this install does not touch gets capit's settings taken out. On an error,
/// every file written so far is put back before the error is returned.
pub fn apply(
    steps: &[Step],
    target: &Target,
    replaced: &[pb::InstallRecord],
    env: &AgentEnv,
) -> anyhow::Result<(Vec<pb::InstallRecord>, Vec<Written>)> {
    let mut records: Vec<pb::InstallRecord> = Vec::new();
    let mut written = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for step in steps {
            let shown = consumers::display_path(&step.path, env);
            let current = files::read(&step.path).with_context(|| format!("reading {shown}"))?;
            let text = step.installer.install(&step.path, current.as_deref(), target)?;
            let earlier = replaced.iter().find(|r| Path::new(&r.path) == step.path);
            let unchanged = current.as_deref().unwrap_or("") == text && (current.is_some() || text.is_empty());
            if unchanged {
                // Nothing to write; a setting the earlier grant made here stays, and so does
                // its record, so that a revoke still undoes it.
                if let Some(earlier) = earlier {
                    records.push(pb::InstallRecord { written_sha256: files::fingerprint(&text), ..earlier.clone() });
                }
                continue;
            }
            let mode_before =
                files::write_atomic(&step.path, &text, step.installer.holds_key()).with_context(|| format!("writing {shown}"))?;
            let (original, mode_before) = match earlier {
                Some(earlier) => (earlier.original.clone(), earlier.mode_before.or(mode_before)),
                None => (current, mode_before),
            };
            records.push(pb::InstallRecord {
                agent: step.installer.name().to_string(),
                path: step.path.display().to_string(),
                original,
                written_sha256: files::fingerprint(&text),
                mode_before,
            });
            written.push(Written { shown, mode_before, mode: files::mode(&step.path) });
        }
        for earlier in replaced.iter().filter(|r| !steps.iter().any(|s| Path::new(&r.path) == s.path)) {
            restore(earlier, target.kind, env)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok((records, written)),
        Err(e) => {
            for record in &records {
                let _ = restore(record, target.kind, env);
            }
            Err(e)
        }
    }
}

/// Undoes an install: a file still exactly as capit wrote it gets its original bytes back (or
/// goes, if there was none); a file edited since loses only capit's keys. A file capit made
/// 0600 gets its old mode back. Returns what it did.
pub fn restore(install: &pb::InstallRecord, kind: &str, env: &AgentEnv) -> anyhow::Result<String> {
    let path = PathBuf::from(&install.path);
    let shown = consumers::display_path(&path, env);
    let Some(current) = files::read(&path).with_context(|| format!("reading {shown}"))? else {
        return Ok(format!("{shown} is gone; nothing to restore"));
    };
    let untouched = files::fingerprint(&current) == install.written_sha256;
    let done = if untouched {
        match &install.original {
            Some(original) => {
                files::write_atomic(&path, original, false).with_context(|| format!("restoring {shown}"))?;
                format!("restored {shown}")
            }
            None => {
                files::remove(&path).with_context(|| format!("removing {shown}"))?;
                return Ok(format!("removed {shown}, which capit had created"));
            }
        }
    } else {
        let text = Installer::of_record(install).uninstall(&path, &current, install.original.as_deref(), kind)?;
        files::write_atomic(&path, &text, false).with_context(|| format!("writing {shown}"))?;
        format!("took capit's settings out of {shown} (it was edited since the install)")
    };
    match install.mode_before {
        // Only a mode still as capit left it goes back: the user may have changed it since.
        Some(old) if files::mode(&path) == Some(files::secret_mode(old)) => {
            files::set_mode(&path, old).with_context(|| format!("setting the mode of {shown}"))?;
            Ok(format!("{done} (mode {old:04o} again)"))
        }
        _ => Ok(done),
    }
}

/// A line-by-line view of a change, for `--dry-run`: the lines that go and the lines that come,
/// between the unchanged start and end.
pub fn diff(path: &str, old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..].iter().rev().zip(b[head..].iter().rev()).take_while(|(x, y)| x == y).count();
    let mut out = format!("--- {path}\n+++ {path} (with capit)\n@@ line {} @@\n", head + 1);
    for line in &a[head..a.len() - tail] {
        out.push_str(&format!("-{}\n", mask_secrets(line)));
    }
    for line in &b[head..b.len() - tail] {
        out.push_str(&format!("+{}\n", mask_secrets(line)));
    }
    out
}

/// A line of a user's file as `--dry-run` shows it: on a line that names a key, token, secret or
/// password, every long run with a digit in it (a key, not a setting's name) is cut to its first
/// and last four characters, so that a master key the file holds is not printed in full.
fn mask_secrets(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    if !["key", "token", "secret", "password"].iter().any(|word| lower.contains(word)) {
        return line.to_string();
    }
    let is_part = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+');
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find(is_part) {
        out.push_str(&rest[..start]);
        let run = &rest[start..];
        let end = run.find(|c: char| !is_part(c)).unwrap_or(run.len());
        let (word, after) = run.split_at(end);
        if word.len() >= 16 && word.chars().any(|c| c.is_ascii_digit()) {
            out.push_str(&format!("{}…{}", &word[..4], &word[word.len() - 4..]));
        } else {
            out.push_str(word);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The files an install wrote, for the grant's one line: `A (now mode 0600, was 0644) and B`.
pub fn describe(written: &[Written]) -> String {
    let parts: Vec<String> = written
        .iter()
        .map(|w| match (w.mode_before, w.mode) {
            (Some(old), Some(new)) => format!("{} (now mode {new:04o}, was {old:04o}: it holds the key)", w.shown),
            _ => w.shown.clone(),
        })
        .collect();
    match parts.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_shows_keys_in_the_file_only_by_their_ends() {
        let old = "model: claude-sonnet-4-5-20250929\nOPENAI_API_KEY=sk-proj-abcdef0123456789WXYZ\n\"apiKey\": \"sk-ant-api03-zyx987654321QRST\",\n";
        let new = "model: claude-sonnet-4-5-20250929\nOPENAI_API_KEY=sk-capit-<new key>\n";
        let shown = diff("~/.env", old, new);
        assert!(!shown.contains("abcdef0123456789") && !shown.contains("zyx987654321"), "{shown}");
        assert!(shown.contains("-OPENAI_API_KEY=sk-p…WXYZ") && shown.contains("\"apiKey\": \"sk-a…QRST\","), "{shown}");
        assert!(shown.contains("+OPENAI_API_KEY=sk-capit-<new key>"), "{shown}");
        // Lines that name no secret are shown as they are, model names and all.
        assert_eq!(mask_secrets("model = \"claude-sonnet-4-5-20250929\""), "model = \"claude-sonnet-4-5-20250929\"");
        assert_eq!(mask_secrets("experimental_bearer_token = \"x\""), "experimental_bearer_token = \"x\"");
    }

    #[test]
    fn the_grant_line_names_every_file_and_each_mode_change() {
        let w = |shown: &str, before: Option<u32>| Written { shown: shown.into(), mode_before: before, mode: Some(0o600) };
        assert_eq!(describe(&[w("~/.a", None)]), "~/.a");
        assert_eq!(
            describe(&[w("~/.gemini/.env", Some(0o644)), w("~/.gemini/settings.json", None)]),
            "~/.gemini/.env (now mode 0600, was 0644: it holds the key) and ~/.gemini/settings.json"
        );
        assert_eq!(describe(&[w("a", None), w("b", None), w("c", None)]), "a, b and c");
    }
}
