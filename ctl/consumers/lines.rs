//! Files of one setting per line, edited line by line: dotenv (`KEY=value`, `export KEY=value`)
//! and flat YAML mappings (`key: value`). A setting's line (with the indented lines that continue
//! a YAML value) is replaced in place or appended; every other line, comment and blank line is
//! kept byte for byte.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use super::EditError;

/// Parses a YAML file that must be empty or a mapping; a file that is not is refused with the
/// line where it breaks.
pub fn yaml_mapping(path: &Path, text: &str) -> Result<Option<Yaml>, EditError> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| EditError {
        path: path.to_path_buf(),
        line: Some(e.marker().line()),
        message: format!("not valid YAML: {}", e.info()),
    })?;
    match docs.into_iter().next() {
        None | Some(Yaml::Null) => Ok(None),
        Some(doc @ Yaml::Hash(_)) => Ok(Some(doc)),
        Some(_) => Err(EditError { path: path.to_path_buf(), line: Some(1), message: "the file is not a YAML mapping".into() }),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    Dotenv,
    FlatYaml,
}

fn key_of(line: &str, syntax: Syntax) -> Option<&str> {
    let key = match syntax {
        Syntax::Dotenv => {
            let line = line.trim_start();
            line.strip_prefix("export ").unwrap_or(line).split_once('=')?.0.trim()
        }
        // Only top-level keys: a line that starts in column 0.
        Syntax::FlatYaml if line.starts_with([' ', '\t', '#', '-']) => return None,
        Syntax::FlatYaml => line.split_once(':')?.0.trim().trim_matches(|c| c == '"' || c == '\''),
    };
    (!key.is_empty() && !key.starts_with('#')).then_some(key)
}

/// The setting's lines: the one naming it and, in YAML, the indented lines that follow it.
fn span(lines: &[String], index: usize, syntax: Syntax) -> usize {
    let mut end = index + 1;
    if syntax == Syntax::FlatYaml {
        while end < lines.len()
            && (lines[end].starts_with([' ', '\t']) || lines[end].trim().is_empty())
            && lines[end..].iter().any(|l| l.starts_with([' ', '\t']))
        {
            if lines[end].trim().is_empty() && !lines[end + 1..].first().is_some_and(|l| l.starts_with([' ', '\t'])) {
                break;
            }
            end += 1;
        }
    }
    end
}

fn line_for(key: &str, value: &str, syntax: Syntax) -> String {
    match syntax {
        Syntax::Dotenv => format!("{key}={value}"),
        Syntax::FlatYaml => format!("{key}: \"{value}\""),
    }
}

/// The text's lines, each without its `\n` but with any `\r` it had, so that a file with mixed
/// line endings keeps them.
fn split(text: &str) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    text.strip_suffix('\n').unwrap_or(text).split('\n').map(str::to_string).collect()
}

fn join(lines: Vec<String>, trailing_newline: bool) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut out = lines.join("\n");
    if trailing_newline {
        out.push('\n');
    }
    out
}

/// Sets `pairs` in `text`: replaced where a line names the key, else appended.
pub fn set(text: &str, pairs: &[(&str, &str)], syntax: Syntax) -> String {
    let mut lines = split(text);
    for (key, value) in pairs {
        match lines.iter().position(|l| key_of(l, syntax) == Some(key)) {
            Some(i) => {
                let end = span(&lines, i, syntax);
                lines.splice(i..end, [line_for(key, value, syntax)]);
            }
            None => lines.push(line_for(key, value, syntax)),
        }
    }
    join(lines, true)
}

/// Takes `keys` out of `current` again: each gets its lines from `original` back, or goes.
pub fn unset(current: &str, keys: &[&str], original: Option<&str>, syntax: Syntax) -> String {
    let old = split(original.unwrap_or(""));
    let mut lines = split(current);
    for key in keys {
        let Some(i) = lines.iter().position(|l| key_of(l, syntax) == Some(key)) else { continue };
        let end = span(&lines, i, syntax);
        let restored: Vec<String> = match old.iter().position(|l| key_of(l, syntax) == Some(key)) {
            Some(j) => old[j..span(&old, j, syntax)].to_vec(),
            None => Vec::new(),
        };
        lines.splice(i..end, restored);
    }
    let trailing = current.ends_with('\n') || original.is_some_and(|o| o.ends_with('\n'));
    join(lines, trailing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_lines_are_replaced_in_place_or_appended_and_restored() {
        let original = "# keys\nexport GEMINI_API_KEY=AIza-real\nGOOGLE_CLOUD_PROJECT=p1\n";
        let pairs = [("GOOGLE_GEMINI_BASE_URL", "http://x/gemini"), ("GEMINI_API_KEY", "sk-capit-y")];
        let installed = set(original, &pairs, Syntax::Dotenv);
        assert_eq!(installed, "# keys\nGEMINI_API_KEY=sk-capit-y\nGOOGLE_CLOUD_PROJECT=p1\nGOOGLE_GEMINI_BASE_URL=http://x/gemini\n");
        assert_eq!(unset(&installed, &["GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"], Some(original), Syntax::Dotenv), original);
        assert_eq!(unset(&set("", &[("A", "1")], Syntax::Dotenv), &["A"], None, Syntax::Dotenv), "");
    }

    #[test]
    fn mixed_line_endings_are_kept_where_capit_does_not_write() {
        let original = "A=1\r\nB=2\nC=3\r\n";
        let installed = set(original, &[("B", "x"), ("D", "y")], Syntax::Dotenv);
        assert_eq!(installed, "A=1\r\nB=x\nC=3\r\nD=y\n");
        assert_eq!(unset(&installed, &["B", "D"], Some(original), Syntax::Dotenv), original);
    }

    #[test]
    fn flat_yaml_keys_with_continuation_lines() {
        let original = "# aider\nmodel: gpt-5\nopenai-api-key:\n  sk-old\nauto-commits: false\nread:\n  - CONVENTIONS.md\n";
        let pairs = [("openai-api-base", "http://x/openai/v1"), ("openai-api-key", "sk-capit-z")];
        let installed = set(original, &pairs, Syntax::FlatYaml);
        assert_eq!(
            installed,
            "# aider\nmodel: gpt-5\nopenai-api-key: \"sk-capit-z\"\nauto-commits: false\nread:\n  - CONVENTIONS.md\nopenai-api-base: \"http://x/openai/v1\"\n"
        );
        assert_eq!(unset(&installed, &["openai-api-base", "openai-api-key"], Some(original), Syntax::FlatYaml), original);
    }
}
