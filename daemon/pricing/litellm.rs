//! Reads LiteLLM's `model_prices_and_context_window.json`: prices per token (numbers such as
//! `3e-06`), turned into our USD per million tokens exactly, from the number's digits.

use rust_decimal::Decimal;
use serde_json::Value;

use super::{LongContext, Price, PriceError, TierPrices, validate_model_name};

/// The modes whose prices describe token-metered calls the proxy makes.
const METERED_MODES: [&str; 4] = ["chat", "responses", "embedding", "completion"];

/// Provider prefixes whose models are also registered under their bare name.
const BARE_PREFIXES: [&str; 3] = ["openai/", "anthropic/", "gemini/"];

/// Parses the whole file; returns the models to import and how many entries were skipped
/// (other modes, no token prices). Any priced entry that does not read is an error: a file is
/// imported whole or not at all.
pub fn parse(text: &str) -> Result<(Vec<(String, Price)>, usize), PriceError> {
    let root: Value = serde_json::from_str(text).map_err(|e| PriceError::BadFile(e.to_string()))?;
    let entries = root.as_object().ok_or_else(|| PriceError::BadFile("the top level is not an object".into()))?;
    let mut out: Vec<(String, Price)> = Vec::new();
    let mut skipped = 0;
    for (model, entry) in entries {
        let mode = entry.get("mode").and_then(Value::as_str).unwrap_or("chat");
        let priced = entry.get("input_cost_per_token").is_some() && (entry.get("output_cost_per_token").is_some() || mode == "embedding");
        if model == "sample_spec" || !METERED_MODES.contains(&mode) || !priced {
            skipped += 1;
            continue;
        }
        let price = read_entry(entry).map_err(|e| PriceError::InModel { model: model.clone(), source: Box::new(e) })?;
        validate_model_name(model).map_err(|e| PriceError::InModel { model: model.clone(), source: Box::new(e) })?;
        out.push((model.clone(), price));
    }
    let named: std::collections::HashSet<String> = out.iter().map(|(m, _)| m.clone()).collect();
    let mut bare = Vec::new();
    for (model, price) in &out {
        if let Some(name) = BARE_PREFIXES.iter().find_map(|p| model.strip_prefix(p))
            && !named.contains(name)
            && !bare.iter().any(|(m, _): &(String, Price)| m == name)
        {
            bare.push((name.to_string(), price.clone()));
        }
    }
    out.extend(bare);
    Ok((out, skipped))
}

/// USD per token → USD per million tokens, exactly.
fn per_million(entry: &Value, field: &str) -> Result<Option<Decimal>, PriceError> {
    match entry.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            let per_token = decimal_from_json(value).ok_or_else(|| PriceError::BadFile(format!("{field} is not a number")))?;
            per_token
                .checked_mul(Decimal::from(1_000_000))
                .map(|d| Some(d.normalize()))
                .ok_or_else(|| PriceError::BadFile(format!("{field} is out of range")))
        }
    }
}

fn read_entry(entry: &Value) -> Result<Price, PriceError> {
    let input = per_million(entry, "input_cost_per_token")?.unwrap_or_default();
    let base = TierPrices {
        input,
        cached_input: per_million(entry, "cache_read_input_token_cost")?,
        cache_write_5m: per_million(entry, "cache_creation_input_token_cost")?,
        cache_write_1h: per_million(entry, "cache_creation_input_token_cost_above_1hr")?,
        output: per_million(entry, "output_cost_per_token")?.unwrap_or_default(),
    };
    let mut long_context = None;
    for threshold in [128_000u64, 200_000, 272_000] {
        let suffix = format!("_above_{}k_tokens", threshold / 1000);
        if let Some(long_input) = per_million(entry, &format!("input_cost_per_token{suffix}"))? {
            long_context = Some(LongContext {
                threshold,
                prices: TierPrices {
                    input: long_input,
                    cached_input: per_million(entry, &format!("cache_read_input_token_cost{suffix}"))?,
                    cache_write_5m: per_million(entry, &format!("cache_creation_input_token_cost{suffix}"))?,
                    cache_write_1h: None,
                    output: per_million(entry, &format!("output_cost_per_token{suffix}"))?.unwrap_or(base.output),
                },
            });
        }
    }
    let max_output_tokens = entry.get("max_output_tokens").or_else(|| entry.get("max_tokens")).and_then(Value::as_u64);
    let price = Price {
        base,
        max_output_tokens,
        max_input_tokens: entry.get("max_input_tokens").and_then(Value::as_u64),
        long_context,
        web_search_per_1k: None,
        per_request: None,
        checked: None,
        provider: entry.get("litellm_provider").and_then(Value::as_str).map(str::to_string),
    };
    price.validate()?;
    Ok(price)
}

/// A JSON number (or numeric text) as an exact decimal: the digits as written, never through a
/// binary float rounding that the text did not have.
fn decimal_from_json(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => {
            let text = n.to_string();
            text.parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&text).ok())
        }
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{
 "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "mode": "one of: chat, embedding"},
 "claude-sonnet-4-5": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
   "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
   "cache_creation_input_token_cost_above_1hr": 6e-06,
   "input_cost_per_token_above_200k_tokens": 6e-06, "output_cost_per_token_above_200k_tokens": 2.25e-05,
   "max_output_tokens": 64000, "litellm_provider": "anthropic", "mode": "chat"},
 "gemini/gemini-2.5-flash": {"input_cost_per_token": 3e-07, "output_cost_per_token": 2.5e-06, "mode": "chat", "max_tokens": 65535},
 "text-embedding-3-small": {"input_cost_per_token": 2e-08, "output_cost_per_token": 0.0, "mode": "embedding"},
 "dall-e-3": {"input_cost_per_pixel": 1e-08, "mode": "image_generation"}
}"#;

    #[test]
    fn per_token_prices_become_exact_per_million() {
        let (prices, skipped) = parse(FILE).unwrap();
        assert_eq!(skipped, 2);
        let get = |name: &str| prices.iter().find(|(m, _)| m == name).map(|(_, p)| p.clone()).unwrap();
        let sonnet = get("claude-sonnet-4-5");
        assert_eq!(sonnet.base.input, "3".parse().unwrap());
        assert_eq!(sonnet.base.output, "15".parse().unwrap());
        assert_eq!(sonnet.base.cached_input, Some("0.3".parse().unwrap()));
        assert_eq!(sonnet.base.cache_write_5m, Some("3.75".parse().unwrap()));
        assert_eq!(sonnet.base.cache_write_1h, Some("6".parse().unwrap()));
        let long = sonnet.long_context.unwrap();
        assert_eq!((long.threshold, long.prices.output), (200_000, "22.5".parse().unwrap()));
        assert_eq!(get("gemini-2.5-flash").base.output, "2.5".parse().unwrap(), "registered under the bare name too");
        assert_eq!(get("gemini/gemini-2.5-flash").max_output_tokens, Some(65535));
        assert_eq!(get("text-embedding-3-small").base.input, "0.02".parse().unwrap());
    }

    #[test]
    fn a_bad_file_imports_nothing() {
        assert!(matches!(parse("[1,2]"), Err(PriceError::BadFile(_))));
        assert!(matches!(parse("{"), Err(PriceError::BadFile(_))));
        let negative = r#"{"m": {"input_cost_per_token": -1e-06, "output_cost_per_token": 1e-06, "mode": "chat"}}"#;
        assert!(matches!(parse(negative), Err(PriceError::InModel { .. })));
    }
}
