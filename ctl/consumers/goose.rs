//! goose: `~/.config/goose/config.yaml` takes the provider and host (`GOOSE_PROVIDER`,
//! `ANTHROPIC_HOST`; goose joins `v1/messages` onto the host and sends `x-api-key`). Its keys are
//! never read from config.yaml: goose takes them from the environment, else from the system
//! keyring, or from `secrets.yaml` beside config.yaml when the keyring is disabled. capit does
//! not write the keyring, so it installs only where goose keeps its keys in `secrets.yaml`, and
//! refuses otherwise rather than leave a half-working install. Both files are flat YAML, edited
//! line by line (see `lines`) after a YAML parser has checked them.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::lines::{self, Syntax};
use super::{AgentEnv, Consumer, EditError, Target};

pub struct Goose;

/// The `secrets.yaml` half of the goose install.
pub struct GooseSecrets;

fn goose_dir(env: &AgentEnv) -> Option<PathBuf> {
    env.home.as_ref().map(|h| h.join(".config").join("goose"))
}

fn parse(path: &Path, text: &str) -> Result<Option<Yaml>, EditError> {
    super::lines::yaml_mapping(path, text)
}

fn edit(path: &Path, text: &str, pairs: &[(&str, &str)]) -> Result<String, EditError> {
    parse(path, text)?;
    let out = lines::set(text, pairs, Syntax::FlatYaml);
    parse(path, &out)?;
    Ok(out)
}

const CONFIG_KEYS: [&str; 2] = ["GOOSE_PROVIDER", "ANTHROPIC_HOST"];
const SECRET_KEYS: [&str; 1] = ["ANTHROPIC_API_KEY"];

impl Consumer for Goose {
    fn name(&self) -> &'static str {
        "goose"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "goose (keys in secrets.yaml)"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        goose_dir(env).map(|d| d.join("config.yaml"))
    }

    fn companions(&self) -> &'static [&'static dyn Consumer] {
        &[&GooseSecrets]
    }

    fn holds_key(&self) -> bool {
        false
    }

    fn check(&self, env: &AgentEnv) -> Result<(), String> {
        let Some(dir) = goose_dir(env) else { return Ok(()) };
        let secrets_file = dir.join("secrets.yaml").exists();
        let keyring_off = std::fs::read_to_string(dir.join("config.yaml"))
            .ok()
            .and_then(|text| YamlLoader::load_from_str(&text).ok())
            .and_then(|docs| docs.into_iter().next())
            .is_some_and(|doc| {
                matches!(&doc["GOOSE_DISABLE_KEYRING"], Yaml::Boolean(true))
                    || doc["GOOSE_DISABLE_KEYRING"].as_str().is_some_and(|v| v == "true" || v == "1")
            });
        if secrets_file || keyring_off {
            Ok(())
        } else {
            Err("goose keeps its API keys in the system keyring, which capit does not write; use --no-install and give goose the key with `goose configure` (or keep its keys in ~/.config/goose/secrets.yaml)".into())
        }
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        edit(path, existing.unwrap_or(""), &[(CONFIG_KEYS[0], "anthropic"), (CONFIG_KEYS[1], target.base_url)])
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        parse(path, current)?;
        Ok(lines::unset(current, &CONFIG_KEYS, original, Syntax::FlatYaml))
    }
}

impl Consumer for GooseSecrets {
    fn name(&self) -> &'static str {
        "goose-secrets"
    }

    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn describe(&self) -> &'static str {
        "goose secrets"
    }

    fn config_path(&self, env: &AgentEnv) -> Option<PathBuf> {
        goose_dir(env).map(|d| d.join("secrets.yaml"))
    }

    fn install(&self, path: &Path, existing: Option<&str>, target: &Target) -> Result<String, EditError> {
        edit(path, existing.unwrap_or(""), &[(SECRET_KEYS[0], target.key)])
    }

    fn uninstall(&self, path: &Path, current: &str, original: Option<&str>) -> Result<String, EditError> {
        parse(path, current)?;
        Ok(lines::unset(current, &SECRET_KEYS, original, Syntax::FlatYaml))
    }
}
