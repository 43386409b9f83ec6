//! OpenRouter's own model list (`GET /api/v1/models`) as prices. OpenRouter bills the cost it
//! reports with each reply; these prices bound a request before it goes (its hold), judge a
//! running stream, and price a reply that reports no cost.
//!
//! The list gives USD per token (or per request) as decimal strings; a field that is not a
//! non-negative decimal (OpenRouter writes `-1` for routers whose price depends on the model
//! they pick) leaves that model unpriced, so it is refused rather than bounded at zero.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::Value;

use super::{Price, TierPrices};

/// Reads the model list into prices per model id. Models without a usable price are left out.
pub fn parse_models(json: &[u8]) -> Option<BTreeMap<String, Price>> {
    let value: Value = serde_json::from_slice(json).ok()?;
    let mut out = BTreeMap::new();
    for model in value.get("data")?.as_array()? {
        let Some(id) = model.get("id").and_then(Value::as_str) else { continue };
        if let Some(price) = model_price(model) {
            out.insert(id.to_string(), price);
        }
    }
    Some(out)
}

fn per_token(pricing: &Value, field: &str) -> Result<Option<Decimal>, ()> {
    match pricing.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            let value: Decimal = text.trim().parse().or_else(|_| Decimal::from_scientific(text.trim())).map_err(|_| ())?;
            if value.is_sign_negative() { Err(()) } else { Ok(Some(value)) }
        }
        Some(_) => Err(()),
    }
}

fn model_price(model: &Value) -> Option<Price> {
    let pricing = model.get("pricing")?;
    let million = Decimal::from(1_000_000u32);
    let per_million = |field: &str| per_token(pricing, field).map(|v| v.and_then(|v| v.checked_mul(million)));
    let input = per_million("prompt").ok()??;
    let completion = per_million("completion").ok()??;
    let reasoning = per_million("internal_reasoning").ok()?;
    let cached_input = per_million("input_cache_read").ok()?;
    let cache_write = per_million("input_cache_write").ok()?.filter(|w| !w.is_zero());
    let per_request = per_token(pricing, "request").ok()?.filter(|r| !r.is_zero());
    let top = model.get("top_provider");
    let context =
        model.get("context_length").and_then(Value::as_u64).or_else(|| top.and_then(|t| t.get("context_length")).and_then(Value::as_u64));
    let max_output = top.and_then(|t| t.get("max_completion_tokens")).and_then(Value::as_u64).or(context);
    let price = Price {
        base: TierPrices {
            input,
            cached_input: cached_input.filter(|c| !c.is_zero()),
            cache_write_5m: cache_write,
            // OpenRouter lists one cache-write price; a 1-hour write is never cheaper.
            cache_write_1h: cache_write,
            // Reasoning may be priced apart: an output token costs at most the dearer.
            output: completion.max(reasoning.unwrap_or_default()),
        },
        max_output_tokens: max_output,
        max_input_tokens: context,
        long_context: None,
        web_search_per_1k: None,
        per_request,
        checked: None,
        provider: Some("openrouter".into()),
    };
    price.validate().ok()?;
    Some(price)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"data":[
{"id":"anthropic/claude-sonnet-4.5","canonical_slug":"anthropic/claude-4.5-sonnet","context_length":1000000,
 "pricing":{"prompt":"0.000003","completion":"0.000015","request":"0","image":"0.0048","web_search":"0.01","internal_reasoning":"0","input_cache_read":"0.0000003","input_cache_write":"0.00000375"},
 "top_provider":{"context_length":1000000,"max_completion_tokens":64000,"is_moderated":false}},
{"id":"openrouter/auto","context_length":2000000,"pricing":{"prompt":"-1","completion":"-1"},"top_provider":{"max_completion_tokens":null}},
{"id":"some/free:free","context_length":8192,"pricing":{"prompt":"0","completion":"0","request":"0.001"},"top_provider":{}},
{"id":"bad/text","pricing":{"prompt":"cheap","completion":"0.1"}},
{"id":"o/reasoner","context_length":200000,"pricing":{"prompt":"0.000001","completion":"0.000004","internal_reasoning":"0.00001"},"top_provider":{"max_completion_tokens":100000}}
]}"#;

    #[test]
    fn prices_come_per_million_and_unusable_ones_are_left_out() {
        let prices = parse_models(LIST.as_bytes()).unwrap();
        let sonnet = &prices["anthropic/claude-sonnet-4.5"];
        let d = |t: &str| t.parse::<Decimal>().unwrap();
        assert_eq!((sonnet.base.input, sonnet.base.output), (d("3"), d("15")));
        assert_eq!((sonnet.base.cached_input, sonnet.base.cache_write_5m), (Some(d("0.3")), Some(d("3.75"))));
        assert_eq!((sonnet.max_input_tokens, sonnet.max_output_tokens), (Some(1_000_000), Some(64_000)));
        assert!(!prices.contains_key("openrouter/auto"), "a price of -1 is no price");
        assert!(!prices.contains_key("bad/text"));
        let free = &prices["some/free:free"];
        assert_eq!((free.base.input, free.per_request, free.max_output_tokens), (d("0"), Some(d("0.001")), Some(8192)));
        assert_eq!(prices["o/reasoner"].base.output, d("10"), "reasoning priced apart raises the output bound");
        assert!(parse_models(b"not json").is_none());
    }
}
