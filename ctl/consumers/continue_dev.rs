//! Continue: `~/.continue/config.yaml`, its top-level `models:` list, to which capit appends
//! one model named `capit` (provider anthropic, `apiBase` with `/v1`, since Continue joins
//! `messages` onto it). The list item is written in the list's own indentation, line by line, so
//! every other line and comment stays byte for byte; the file is checked with a YAML parser
//! before and after, and a broken one is refused.

use std::path::{Path, PathBuf};

use yaml_rust2::Yaml;

use super::{AgentEnv, Consumer, EditError, Target};

pub struct ContinueDev;

/// The model capit adds; Continue users pick it by this name.
const NAME: &str = "capit";
const MODEL: &str = "claude-sonnet-4-5";

fn parse(path: &Path, text: &str) -> Result<Option<Yaml>, EditError> {
    super::lines::yaml_mapping(path, text)
}

/// The line range of the top-level `models:` block (its key line through its last item line).
fn models_block(lines: &[&str]) -> Option<(usize, usize)> {
    let start = lines.iter().position(|l| l.trim_end() == "models:" || l.starts_with("models:"))?;
    let mut end = start + 1;
    while end < lines.len() && (lines[end].starts_with([' ', '\t', '-']) || lines[end].trim().is_empty()) {
        end += 1;
    }
    while end > start + 1 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    Some((start, end))
}

/// The item lines capit adds, at the list's indentation.
fn item(indent: &str, target: &Target) -> Vec<String> {
    let base = format!("{}/v1", target.base_url.trim_end_matches('/'));
    vec![
        format!("{indent}- name: {NAME}"),
        format!("{indent}  provider: anthropic"),
        format!("{indent}  model: {MODEL}"),
        format!("{indent}  apiBase: {base}"),
        format!("{indent}  apiKey: {}", target.key),
    ]
}

/// Removes capit's item (the `- name: capit` line and the lines of that item).
fn without_capit(lines: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skipping: Option<usize> = None;
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        if let Some(item_indent) = skipping {
            if indent > item_indent && !line.trim().is_empty() {
                continue;
            }
            skipping = None;
        }
        if line.trim() == format!("- name: {NAME}") {
            skipping = Some(indent);
            continue;
        }
        out.push(line.to_string());
    }
    out
}

fn join(lines: Vec<String>) -> String {
    if lines.is_empty() { String::new() } else { lines.join("\n") + "\n" }
}

impl Consumer for ContinueDev {
    fn name(&self) -> &'static str {
        "continue"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "Continue (VS Code, JetBrains)"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        env.home.as_ref().map(|h| h.join(".continue").join("config.yaml"))
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let text = existing.unwrap_or("");
        parse(path, text)?;
        let lines: Vec<&str> = text.lines().collect();
        let cleaned = without_capit(&lines);
        let cleaned: Vec<&str> = cleaned.iter().map(String::as_str).collect();
        let mut out: Vec<String> = cleaned.iter().map(|l| l.to_string()).collect();
        match models_block(&cleaned) {
            Some((start, end)) => {
                let indent = cleaned[start + 1..end]
                    .iter()
                    .find(|l| l.trim_start().starts_with('-'))
                    .map_or("  ", |l| &l[..l.len() - l.trim_start().len()]);
                if cleaned[start].trim_end() != "models:" {
                    return Err(EditError {
                        path: path.to_path_buf(),
                        line: Some(start + 1),
                        message: "models is written inline; capit needs it as a block list".into(),
                    });
                }
                out.splice(end..end, item(indent, target));
            }
            None => {
                out.push("models:".into());
                out.extend(item("  ", target));
            }
        }
        let text = join(out);
        parse(path, &text)?;
        Ok(text)
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        parse(path, current)?;
        let lines: Vec<&str> = current.lines().collect();
        let mut out = without_capit(&lines);
        // A `models:` key capit added with the item, now empty, goes too.
        let had_models = original.is_some_and(|o| o.lines().any(|l| l.starts_with("models:")));
        if !had_models {
            let refs: Vec<&str> = out.iter().map(String::as_str).collect();
            if let Some((start, end)) = models_block(&refs)
                && end == start + 1
            {
                out.remove(start);
            }
        }
        Ok(join(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::YamlLoader;

    const ORIGINAL: &str = "name: my assistant\nversion: 0.0.1\nschema: v1\n# my models\nmodels:\n  - name: local\n    provider: ollama\n    model: qwen3\n    roles:\n      - chat\ncontext:\n  - provider: code\n";

    #[test]
    fn appends_and_removes_one_item_keeping_every_other_line() {
        let path = Path::new("config.yaml");
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k" };
        let installed = ContinueDev.install(path, Some(ORIGINAL), &target).unwrap();
        let doc = &YamlLoader::load_from_str(&installed).unwrap()[0];
        let models = doc["models"].as_vec().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[1]["apiBase"].as_str(), Some("http://127.0.0.1:8787/anthropic/v1"));
        assert_eq!(models[1]["apiKey"].as_str(), Some("sk-capit-k"));
        assert_eq!(doc["context"][0]["provider"].as_str(), Some("code"));
        assert_eq!(ContinueDev.uninstall(path, &installed, Some(ORIGINAL)).unwrap(), ORIGINAL);
        let again = ContinueDev.install(path, Some(&installed), &target).unwrap();
        assert_eq!(again.matches("name: capit").count(), 1, "installing twice replaces the item");
        let fresh = ContinueDev.install(path, None, &target).unwrap();
        assert_eq!(ContinueDev.uninstall(path, &fresh, None).unwrap(), "");
    }
}
