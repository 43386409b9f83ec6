//! Continue: `~/.continue/config.yaml` (`$CONTINUE_GLOBAL_DIR/config.yaml`), its top-level
//! `models:` list, at the head of which capit puts one model named `capit` (provider anthropic,
//! `apiBase` with `/v1`, since Continue joins `messages` onto it). The list item is written in
//! the list's own indentation, line by line, so every other line and comment stays byte for
//! byte; the file is checked with a YAML parser before and after, and a broken one is refused.
//!
//! Which model Continue uses (its source, continuedev/continue): `cn` takes the model named by
//! `cliSelectedModel` in `~/.continue/index/globalContext.json` when one matches, else the first
//! model whose roles include chat or that has no roles (`extensions/cli/src/services/
//! ModelService.ts`, `src/config.ts` `getLlmApi`); the IDE extensions take
//! `selectedModelsByProfileId["local"].chat` there, else the first chat model
//! (`core/config/selectedModels.ts`; `local` is `LocalProfileLoader.ID`). So capit's item goes
//! first, and a selection of another model is pointed at `capit` (`ContinueSelection`, a
//! companion file); both are put back on revoke. `cn` refuses a file without `name` and
//! `version` ("name: Required"), so capit adds the header keys a file lacks (`name`,
//! `version`, `schema: v1`, as in Continue's own default config) and takes them out again.

use std::path::{Path, PathBuf};

use yaml_rust2::Yaml;

use super::{AgentEnv, Consumer, EditError, Target};

pub struct ContinueDev;

/// The model capit adds; Continue users pick it by this name.
const NAME: &str = "capit";
const MODEL: &str = "claude-sonnet-4-5";

/// The keys Continue requires at the top of an assistant file, with what capit writes when one
/// is missing (Continue's own default config: `core/config/default.ts`).
const HEADER: [(&str, &str); 3] = [("name", "Local Config"), ("version", "1.0.0"), ("schema", "v1")];

fn parse(path: &Path, text: &str) -> Result<Option<Yaml>, EditError> {
    super::lines::yaml_mapping(path, text)
}

/// The header keys `doc` lacks.
fn missing_header(doc: Option<&Yaml>) -> Vec<(&'static str, &'static str)> {
    HEADER.iter().copied().filter(|(key, _)| doc.is_none_or(|d| d[*key].is_badvalue())).collect()
}

/// `~/.continue` (`$CONTINUE_GLOBAL_DIR`).
fn continue_dir(env: &AgentEnv) -> Option<PathBuf> {
    env.continue_global_dir.clone().or_else(|| env.home.as_ref().map(|h| h.join(".continue")))
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
        continue_dir(env).map(|d| d.join("config.yaml"))
    }

    fn companions(&self) -> &'static [&'static dyn Consumer] {
        &[&ContinueSelection]
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        let text = existing.unwrap_or("");
        let doc = parse(path, text)?;
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
                out.splice(start + 1..start + 1, item(indent, target));
            }
            None => {
                out.push("models:".into());
                out.extend(item("  ", target));
            }
        }
        let header: Vec<String> = missing_header(doc.as_ref()).iter().map(|(key, value)| format!("{key}: {value}")).collect();
        out.splice(0..0, header);
        let text = join(out);
        parse(path, &text)?;
        Ok(text)
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        parse(path, current)?;
        let before = original.map(|o| parse(path, o)).transpose()?.flatten();
        let added: Vec<&str> = missing_header(before.as_ref()).iter().map(|(key, _)| *key).collect();
        let current = super::lines::unset(current, &added, original, super::lines::Syntax::FlatYaml);
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

/// `~/.continue/index/globalContext.json`, where `cn` (`cliSelectedModel`) and the IDE
/// (`selectedModelsByProfileId.local.chat`) record the model last selected: a selection of
/// another model is pointed at capit's while the grant is installed. Left alone (not even
/// created) when nothing is selected, since the first model is then capit's anyway.
pub struct ContinueSelection;

const CLI_SELECTED: &[&str] = &["cliSelectedModel"];
const IDE_SELECTED: &[&str] = &["selectedModelsByProfileId", "local", "chat"];

/// The selections in a globalContext.json that name another model than capit's.
fn other_selections(path: &Path, text: Option<&str>) -> Vec<(&'static [&'static str], String)> {
    let Some(map) = text.and_then(|t| super::json::parse(path, t).ok()) else { return Vec::new() };
    let value = serde_json::Value::Object(map);
    [CLI_SELECTED, IDE_SELECTED]
        .into_iter()
        .filter_map(|keys| {
            let pointer: String = keys.iter().map(|k| format!("/{k}")).collect();
            let selected = value.pointer(&pointer)?.as_str()?;
            (selected != NAME).then(|| (keys, selected.to_string()))
        })
        .collect()
}

impl Consumer for ContinueSelection {
    fn name(&self) -> &'static str {
        "continue-selection"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "Continue's selected model"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        continue_dir(env).map(|d| d.join("index").join("globalContext.json"))
    }

    fn holds_key(&self) -> bool {
        false
    }

    fn notes(&self, existing: Option<&str>, _target: &Target) -> Vec<String> {
        let mut seen = Vec::new();
        for (_, model) in other_selections(Path::new("globalContext.json"), existing) {
            if !seen.contains(&model) {
                seen.push(model);
            }
        }
        seen.into_iter().map(|m| format!("Continue's selected model {m} is now {NAME} (put back on revoke)")).collect()
    }

    fn install(&self, path: &Path, existing: Option<&str>, _target: &Target) -> Result<String, EditError> {
        let Some(text) = existing else { return Ok(String::new()) };
        super::json::parse(path, text)?;
        let changes: Vec<(&[&str], &str)> = other_selections(path, existing).into_iter().map(|(keys, _)| (keys, NAME)).collect();
        if changes.is_empty() {
            return Ok(text.to_string());
        }
        super::json::set(path, existing, &changes)
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        let keys: Vec<&[&str]> = other_selections(path, original).into_iter().map(|(keys, _)| keys).collect();
        if keys.is_empty() {
            return Ok(current.to_string());
        }
        super::json::restore(path, current, original, &keys)
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
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k", kind: "anthropic" };
        let installed = ContinueDev.install(path, Some(ORIGINAL), &target).unwrap();
        let doc = &YamlLoader::load_from_str(&installed).unwrap()[0];
        let models = doc["models"].as_vec().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0]["name"].as_str(), Some("capit"), "first: the model cn and the IDE use");
        assert_eq!(models[0]["apiBase"].as_str(), Some("http://127.0.0.1:8787/anthropic/v1"));
        assert_eq!(models[0]["apiKey"].as_str(), Some("sk-capit-k"));
        assert_eq!(models[1]["name"].as_str(), Some("local"));
        assert_eq!(doc["context"][0]["provider"].as_str(), Some("code"));
        assert_eq!(ContinueDev.uninstall(path, &installed, Some(ORIGINAL)).unwrap(), ORIGINAL);
        let again = ContinueDev.install(path, Some(&installed), &target).unwrap();
        assert_eq!(again.matches("name: capit").count(), 1, "installing twice replaces the item");
        let fresh = ContinueDev.install(path, None, &target).unwrap();
        assert_eq!(ContinueDev.uninstall(path, &fresh, None).unwrap(), "");
    }

    #[test]
    fn a_new_or_headless_file_gets_the_keys_cn_requires() {
        let path = Path::new("config.yaml");
        let target = Target { base_url: "http://127.0.0.1:8787/anthropic", key: "sk-capit-k", kind: "anthropic" };
        let fresh = ContinueDev.install(path, None, &target).unwrap();
        assert!(fresh.starts_with("name: Local Config\nversion: 1.0.0\nschema: v1\nmodels:\n  - name: capit\n"), "{fresh}");
        let headless = "# just models\nmodels:\n- name: local\n  provider: ollama\n  model: qwen3\n";
        let installed = ContinueDev.install(path, Some(headless), &target).unwrap();
        let doc = &YamlLoader::load_from_str(&installed).unwrap()[0];
        assert_eq!(
            (doc["name"].as_str(), doc["version"].as_str(), doc["schema"].as_str()),
            (Some("Local Config"), Some("1.0.0"), Some("v1"))
        );
        assert_eq!(doc["models"][0]["name"].as_str(), Some("capit"));
        assert_eq!(doc["models"][1]["name"].as_str(), Some("local"), "the list's own indentation: {installed}");
        assert_eq!(ContinueDev.uninstall(path, &installed, Some(headless)).unwrap(), headless);
        let named = "name: mine\nversion: 2.0.0\nschema: v1\n";
        let installed = ContinueDev.install(path, Some(named), &target).unwrap();
        assert_eq!(installed.matches("name: mine").count(), 1);
        assert_eq!(ContinueDev.uninstall(path, &installed, Some(named)).unwrap(), named);
    }

    #[test]
    fn a_selection_of_another_model_points_at_capit_until_revoke() {
        let path = Path::new("globalContext.json");
        let target = Target { base_url: "u", key: "k", kind: "anthropic" };
        let original = "{\n  \"cliSelectedModel\": \"local\",\n  \"selectedModelsByProfileId\": {\n    \"local\": {\n      \"chat\": \"local\",\n      \"autocomplete\": \"local\"\n    }\n  },\n  \"indexingPaused\": false\n}\n";
        let installed = ContinueSelection.install(path, Some(original), &target).unwrap();
        let v: serde_json::Value = serde_json::from_str(&installed).unwrap();
        assert_eq!(
            (v["cliSelectedModel"].as_str(), v["selectedModelsByProfileId"]["local"]["chat"].as_str()),
            (Some("capit"), Some("capit"))
        );
        assert_eq!(v["selectedModelsByProfileId"]["local"]["autocomplete"], "local");
        assert_eq!(ContinueSelection.notes(Some(original), &target), ["Continue's selected model local is now capit (put back on revoke)"]);
        assert_eq!(ContinueSelection.uninstall(path, &installed, Some(original)).unwrap(), original);
        assert_eq!(ContinueSelection.install(path, None, &target).unwrap(), "", "no file, no selection: nothing to write");
        let none = "{\"indexingPaused\": true}";
        assert_eq!(ContinueSelection.install(path, Some(none), &target).unwrap(), none);
    }
}
