//! JSON with comments and trailing commas (JSONC, and the JSON5 openclaw reads), edited through
//! jsonc-parser's concrete syntax tree: the comments, formatting and key order outside the keys
//! capit touches stay byte for byte. Values are set and restored by key path.

use std::path::Path;

use jsonc_parser::ParseOptions;
use jsonc_parser::cst::{CstInputValue, CstObject, CstRootNode};
use serde_json::Value;

use super::EditError;

fn options() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_loose_object_property_names: true,
        allow_trailing_commas: true,
        allow_missing_commas: false,
        allow_single_quoted_strings: true,
        allow_hexadecimal_numbers: true,
        allow_unary_plus_numbers: true,
        ..ParseOptions::default()
    }
}

/// Parses a file (`format` names it in errors: "JSONC", "JSON5"); an empty one is `{}`.
pub fn parse(path: &Path, text: &str, format: &str) -> Result<CstRootNode, EditError> {
    let text = if text.trim().is_empty() { "{}\n" } else { text };
    let root = CstRootNode::parse(text, &options()).map_err(|e| EditError {
        path: path.to_path_buf(),
        line: Some(e.line_display()),
        message: format!("not valid {format}: {}", e.kind()),
    })?;
    if root.value().is_some() && root.object_value().is_none() {
        return Err(EditError { path: path.to_path_buf(), line: Some(1), message: "the settings are not an object".into() });
    }
    Ok(root)
}

/// A plain JSON view of a file's text (`Null` when there is none or it does not parse).
pub fn plain(path: &Path, text: Option<&str>) -> Value {
    text.and_then(|t| parse(path, t, "JSONC").ok()).and_then(|root| root.value()).and_then(|v| v.to_serde_value()).unwrap_or(Value::Null)
}

/// A JSON value as the syntax tree takes it.
pub fn input(value: &Value) -> CstInputValue {
    match value {
        Value::Null => CstInputValue::Null,
        Value::Bool(b) => CstInputValue::Bool(*b),
        Value::Number(n) => CstInputValue::Number(n.to_string()),
        Value::String(s) => CstInputValue::String(s.clone()),
        Value::Array(items) => CstInputValue::Array(items.iter().map(input).collect()),
        Value::Object(map) => CstInputValue::Object(map.iter().map(|(k, v)| (k.clone(), input(v))).collect()),
    }
}

/// Sets `name` in `object`, in place when it is there, else appended.
pub fn set(object: &CstObject, name: &str, value: CstInputValue) {
    match object.get(name) {
        Some(prop) => prop.set_value(value),
        None => {
            object.append(name, value);
        }
    }
}

/// Sets `name` in `object` to its value in `before` (a plain JSON view of the original), or
/// removes it.
pub fn restore_prop(object: &CstObject, name: &str, before: Option<&Value>) {
    match before {
        Some(value) => set(object, name, input(value)),
        None => {
            if let Some(prop) = object.get(name) {
                prop.remove();
            }
        }
    }
}

/// Removes `name` when it holds an empty object and `before` had no such key.
pub fn drop_if_empty(object: &CstObject, name: &str, before: Option<&Value>) {
    if before.is_some() {
        return;
    }
    if let Some(prop) = object.get(name)
        && prop.value().and_then(|v| v.to_serde_value()).is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()))
    {
        prop.remove();
    }
}

/// The JSON pointer of a key path.
pub fn pointer(keys: &[&str]) -> String {
    keys.iter().map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1"))).collect()
}

/// Sets the value at a key path, creating the objects on the way; a key on the way that holds
/// something other than an object is an error.
pub fn set_path(path: &Path, root: &CstRootNode, keys: &[&str], value: CstInputValue) -> Result<(), EditError> {
    let (last, parents) = keys.split_last().expect("a key path is never empty");
    let mut object = root.object_value_or_set();
    for key in parents {
        object = object.object_value_or_create(key).ok_or_else(|| EditError {
            path: path.to_path_buf(),
            line: None,
            message: format!("\"{key}\" is not an object"),
        })?;
    }
    set(&object, last, value);
    Ok(())
}

/// Puts a key path back as it was in `before` (a plain view of the original): its old value,
/// or removed, with the objects on the way that are left empty and that `before` lacked.
pub fn restore_path(root: &CstRootNode, keys: &[&str], before: &Value) {
    let Some(top) = root.object_value() else { return };
    let mut chain = vec![top];
    for key in &keys[..keys.len() - 1] {
        let Some(next) = chain.last().and_then(|o| o.object_value(key)) else { return };
        chain.push(next);
    }
    let last = keys.len() - 1;
    restore_prop(&chain[last], keys[last], before.pointer(&pointer(keys)));
    for depth in (0..last).rev() {
        drop_if_empty(&chain[depth], keys[depth], before.pointer(&pointer(&keys[..=depth])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_restore_by_path_keep_comments_and_trailing_commas() {
        let p = Path::new("x.jsonc");
        let original = "{\n  // mine\n  \"a\": 1,\n  \"provider\": { \"openai\": { \"x\": 1, }, },\n}\n";
        let root = parse(p, original, "JSONC").unwrap();
        set_path(p, &root, &["provider", "anthropic", "options", "baseURL"], CstInputValue::String("u".into())).unwrap();
        set_path(p, &root, &["model"], CstInputValue::String("anthropic/m".into())).unwrap();
        let installed = root.to_string();
        assert!(installed.contains("// mine"), "{installed}");
        let v = plain(p, Some(&installed));
        assert_eq!(v.pointer("/provider/anthropic/options/baseURL").and_then(Value::as_str), Some("u"));
        assert_eq!(v.pointer("/provider/openai/x").and_then(Value::as_i64), Some(1));
        let before = plain(p, Some(original));
        let root = parse(p, &installed, "JSONC").unwrap();
        restore_path(&root, &["provider", "anthropic", "options", "baseURL"], &before);
        restore_path(&root, &["model"], &before);
        let restored = root.to_string();
        assert_eq!(plain(p, Some(&restored)), before);
        assert!(restored.contains("// mine"));
        assert!(set_path(p, &parse(p, "{\"provider\": 3}", "JSONC").unwrap(), &["provider", "x"], CstInputValue::Null).is_err());
        assert!(parse(p, "[1]", "JSONC").is_err());
        assert_eq!(pointer(&["$schema", "a/b"]), "/$schema/a~1b");
    }
}
