//! JSON settings files, edited by key path. serde_json (with `preserve_order`) keeps every key
//! and the key order; it loses the original indentation and spacing (written back with two-space
//! indentation), which is why an untouched file is restored from its original bytes instead.

use std::path::Path;

use serde_json::{Map, Value};

use super::EditError;

pub fn parse(path: &Path, text: &str) -> Result<Map<String, Value>, EditError> {
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(EditError { path: path.to_path_buf(), line: Some(1), message: "the settings are not a JSON object".into() }),
        Err(e) => Err(EditError { path: path.to_path_buf(), line: Some(e.line()), message: format!("not valid JSON: {e}") }),
    }
}

pub fn render(map: Map<String, Value>) -> String {
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default();
    text.push('\n');
    text
}

/// Sets each `(path, value)`, creating the objects on the way.
pub fn set(path: &Path, text: Option<&str>, values: &[(&[&str], &str)]) -> Result<String, EditError> {
    let mut map = parse(path, text.unwrap_or(""))?;
    for (keys, value) in values {
        let (last, parents) = keys.split_last().expect("a key path is never empty");
        let mut object = &mut map;
        for key in parents {
            let entry = object.entry(key.to_string()).or_insert_with(|| Value::Object(Map::new()));
            object = entry.as_object_mut().ok_or_else(|| EditError {
                path: path.to_path_buf(),
                line: None,
                message: format!("\"{key}\" is not an object"),
            })?;
        }
        object.insert(last.to_string(), Value::String(value.to_string()));
    }
    Ok(render(map))
}

/// Puts each key path back as it was in `original`: its old value, or removed (with the objects
/// capit created for it, when they are left empty and were not there before).
pub fn restore(path: &Path, current: &str, original: Option<&str>, keys: &[&[&str]]) -> Result<String, EditError> {
    let mut map = parse(path, current)?;
    let before = parse(path, original.unwrap_or("")).unwrap_or_default();
    for key_path in keys {
        let old = lookup(&before, key_path);
        match old {
            Some(value) => {
                let (last, parents) = key_path.split_last().expect("a key path is never empty");
                if let Some(object) = object_at(&mut map, parents) {
                    object.insert(last.to_string(), value.clone());
                }
            }
            None => remove(&mut map, key_path, &before),
        }
    }
    Ok(render(map))
}

fn lookup<'a>(map: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    let (first, rest) = keys.split_first()?;
    let value = map.get(*first)?;
    if rest.is_empty() { Some(value) } else { lookup(value.as_object()?, rest) }
}

fn object_at<'a>(map: &'a mut Map<String, Value>, keys: &[&str]) -> Option<&'a mut Map<String, Value>> {
    match keys.split_first() {
        None => Some(map),
        Some((first, rest)) => object_at(map.get_mut(*first)?.as_object_mut()?, rest),
    }
}

/// Removes the key, then each parent object left empty that `before` did not have.
fn remove(map: &mut Map<String, Value>, keys: &[&str], before: &Map<String, Value>) {
    for depth in (1..=keys.len()).rev() {
        let (last, parents) = keys[..depth].split_last().expect("depth is at least 1");
        let Some(object) = object_at(map, parents) else { return };
        let empty = object.get(*last).and_then(Value::as_object).is_some_and(Map::is_empty);
        if depth == keys.len() || (empty && lookup(before, &keys[..depth]).is_none()) {
            object.shift_remove(*last);
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_restore_by_path() {
        let p = Path::new("x.json");
        let original = r#"{"a": 1, "provider": {"openai": {"x": 1}}}"#;
        let keys: [&[&str]; 2] = [&["provider", "anthropic", "options", "baseURL"], &["provider", "anthropic", "options", "apiKey"]];
        let set_text = set(p, Some(original), &[(keys[0], "u"), (keys[1], "k")]).unwrap();
        let v: Value = serde_json::from_str(&set_text).unwrap();
        assert_eq!(v["provider"]["anthropic"]["options"]["apiKey"], "k");
        let back: Value = serde_json::from_str(&restore(p, &set_text, Some(original), &keys).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(original).unwrap());
    }
}
