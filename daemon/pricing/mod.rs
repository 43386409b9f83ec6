//! Prices and the one cost formula: tokens × USD-per-million-token prices, in exact decimals.
//!
//! Invariant: money is `rust_decimal::Decimal` from the price text to the ledger; no float
//! ever touches it. Prices come from a table compiled into the binary (`prices.json`), a
//! fetched price list and the user's own prices, layered in `table`.

pub mod litellm;
pub mod openrouter;
mod table;

pub use table::{PriceChange, PriceRow, PriceSource, PriceTable, Provenance};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::usage::Usage;

/// The five rates of one pricing tier, USD per million tokens. Cache prices left out fall back
/// to the input price (the most a cached token can cost); a 1-hour write to twice the input
/// price (Anthropic's rule) or the 5-minute one, whichever is more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPrices {
    pub input: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_5m: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<Decimal>,
    pub output: Decimal,
}

/// One model's prices: a base tier and, for some models, a long-context tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    #[serde(flatten)]
    pub base: TierPrices,
    /// The model's largest possible output, which bounds a request that sets no maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// The model's context window: the most input any request can have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context: Option<LongContext>,
    /// USD per 1,000 server-side web searches (Anthropic's `server_tool_use`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search_per_1k: Option<Decimal>,
    /// USD charged per request whatever its tokens (some OpenRouter models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_request: Option<Decimal>,
    /// When the built-in price was last checked against the provider (YYYY-MM-DD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Prices that replace the base ones for a whole request whose input exceeds `threshold`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LongContext {
    pub threshold: u64,
    #[serde(flatten)]
    pub prices: TierPrices,
}

/// The rates that apply to one request, after choosing the tier and filling the fallbacks.
#[derive(Clone, Copy, Debug)]
struct Rates {
    input: Decimal,
    cached_input: Decimal,
    cache_write_5m: Decimal,
    cache_write_1h: Decimal,
    output: Decimal,
}

/// The largest price per million tokens accepted from a user; guards the arithmetic.
pub const MAX_PRICE_PER_MILLION: u64 = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceError {
    #[error("{field} price {value} must be between 0 and {MAX_PRICE_PER_MILLION} USD per million tokens")]
    OutOfRange { field: String, value: Decimal },
    #[error("model name must be 1-200 printable characters")]
    BadModel,
    #[error("the price file is not LiteLLM's JSON format: {0}")]
    BadFile(String),
    #[error("model {model}: {source}")]
    InModel { model: String, source: Box<PriceError> },
}

impl TierPrices {
    fn rates(&self) -> Rates {
        let cache_write_5m = self.cache_write_5m.unwrap_or(self.input);
        // Only Anthropic writes for an hour, at twice the input rate (its documented formula).
        let twice_input = self.input.checked_mul(Decimal::TWO).unwrap_or(Decimal::MAX);
        Rates {
            input: self.input,
            cached_input: self.cached_input.unwrap_or(self.input),
            cache_write_5m,
            cache_write_1h: self.cache_write_1h.unwrap_or(cache_write_5m.max(twice_input)),
            output: self.output,
        }
    }

    fn validate(&self, tier: &str) -> Result<(), PriceError> {
        let max = Decimal::from(MAX_PRICE_PER_MILLION);
        let fields = [
            ("input", Some(self.input)),
            ("cached input", self.cached_input),
            ("cache write 5m", self.cache_write_5m),
            ("cache write 1h", self.cache_write_1h),
            ("output", Some(self.output)),
        ];
        for (field, value) in fields {
            if let Some(value) = value.filter(|v| v.is_sign_negative() || *v > max) {
                return Err(PriceError::OutOfRange { field: format!("{tier}{field}"), value });
            }
        }
        Ok(())
    }
}

impl Price {
    fn rates(&self, input_tokens: u64) -> Rates {
        match &self.long_context {
            Some(long) if input_tokens > long.threshold => long.prices.rates(),
            _ => self.base.rates(),
        }
    }

    /// Checks every rate is within range, so that [`cost`] cannot overflow.
    pub fn validate(&self) -> Result<(), PriceError> {
        self.base.validate("")?;
        let max = Decimal::from(MAX_PRICE_PER_MILLION);
        for (field, value) in [("per-request", self.per_request), ("web search per 1,000", self.web_search_per_1k)] {
            if let Some(value) = value.filter(|v| v.is_sign_negative() || *v > max) {
                return Err(PriceError::OutOfRange { field: field.to_string(), value });
            }
        }
        match &self.long_context {
            Some(long) => long.prices.validate("long-context "),
            None => Ok(()),
        }
    }
}

/// The cost of one request in USD: each token kind at its rate, nothing counted twice.
///
/// Cached reads and cache writes are subsets of `input_tokens`, so only the rest is billed at
/// the input rate; reasoning is inside `output_tokens` and is not added again. Counts that
/// contradict each other (more cached than input) are clamped rather than trusted.
pub fn cost(usage: &Usage, price: &Price) -> Decimal {
    let rates = price.rates(usage.input_tokens);
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    let write_5m = usage.cache_write_5m_tokens.min(usage.input_tokens - cached);
    let write_1h = usage.cache_write_1h_tokens.min(usage.input_tokens - cached - write_5m);
    let uncached = usage.input_tokens - cached - write_5m - write_1h;
    let terms = [
        (uncached, rates.input),
        (cached, rates.cached_input),
        (write_5m, rates.cache_write_5m),
        (write_1h, rates.cache_write_1h),
        (usage.output_tokens, rates.output),
    ];
    let mut per_million = Decimal::ZERO;
    for (tokens, rate) in terms {
        let term = Decimal::from(tokens).checked_mul(rate).unwrap_or(Decimal::MAX);
        per_million = per_million.checked_add(term).unwrap_or(Decimal::MAX);
    }
    let tokens = per_million / Decimal::from(1_000_000u32);
    let searches = match (usage.web_search_requests, price.web_search_per_1k) {
        (0, _) | (_, None) => Decimal::ZERO,
        (n, Some(per_1k)) => Decimal::from(n).checked_mul(per_1k).unwrap_or(Decimal::MAX) / Decimal::from(1000u32),
    };
    tokens.checked_add(searches).and_then(|c| c.checked_add(price.per_request.unwrap_or_default())).unwrap_or(Decimal::MAX).normalize()
}

/// Input tokens a provider may add to a request on its own (the tool-use system prompt,
/// message framing), on top of what the body holds.
pub const HIDDEN_PROMPT_ALLOWANCE: u64 = 1024;

/// A request's input tokens by the dearest rate each may be billed at: `write_1h` may be
/// 1-hour cache writes, `write_5m` 5-minute (or OpenAI automatic) cache writes, `base` only
/// plain input. A bound, so counts are maxima, not a forecast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputTokens {
    pub base: u64,
    pub write_5m: u64,
    pub write_1h: u64,
}

impl InputTokens {
    pub fn total(&self) -> u64 {
        self.base.saturating_add(self.write_5m).saturating_add(self.write_1h)
    }
}

fn per_token(per_million: Decimal) -> Decimal {
    per_million / Decimal::from(1_000_000u32)
}

/// The most a request's input can cost: each class of tokens at the dearest rate it could be
/// billed at (a write never below plain input, a 1-hour write never below a 5-minute one), in
/// the tier the whole input falls in (long-context rates are never below the base ones), plus
/// the provider's fee per request.
pub fn input_bound(price: &Price, input: &InputTokens) -> Decimal {
    let rates = price.rates(input.total());
    let plain = rates.input.max(rates.cached_input);
    let write_5m = plain.max(rates.cache_write_5m);
    let write_1h = write_5m.max(rates.cache_write_1h);
    let mut per_million = Decimal::ZERO;
    for (tokens, rate) in [(input.base, plain), (input.write_5m, write_5m), (input.write_1h, write_1h)] {
        per_million = Decimal::from(tokens).checked_mul(rate).and_then(|t| per_million.checked_add(t)).unwrap_or(Decimal::MAX);
    }
    per_token(per_million).checked_add(price.per_request.unwrap_or_default()).unwrap_or(Decimal::MAX).normalize()
}

/// What one output token can cost, reasoning included, for a request with this much input
/// (the tier its input falls in).
pub fn output_rate(price: &Price, input_tokens: u64) -> Decimal {
    per_token(price.rates(input_tokens).output)
}

/// The most a request can cost with this input and at most `output_tokens` of output.
pub fn bound(price: &Price, input: &InputTokens, output_tokens: u64) -> Decimal {
    let output = Decimal::from(output_tokens).checked_mul(output_rate(price, input.total())).unwrap_or(Decimal::MAX);
    input_bound(price, input).checked_add(output).unwrap_or(Decimal::MAX).normalize()
}

pub fn validate_model_name(model: &str) -> Result<(), PriceError> {
    if model.is_empty() || model.len() > 200 || model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(PriceError::BadModel);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn table() -> PriceTable {
        PriceTable::with_overrides(std::collections::BTreeMap::new())
    }

    #[test]
    fn builtin_table_parses_and_every_price_is_valid() {
        let t = table();
        assert!(t.entries().len() > 20);
        for row in t.entries() {
            let (name, price) = (row.model, row.price);
            price.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(price.checked.is_some(), "{name} has no checked date");
            assert!(price.max_output_tokens.is_some(), "{name} has no max output");
        }
    }

    #[test]
    fn dated_snapshots_and_prefixes_match() {
        let t = table();
        assert_eq!(t.lookup("gpt-5-mini-2025-08-07").unwrap().0, "gpt-5-mini");
        assert_eq!(t.lookup("gpt-5-mini").unwrap().0, "gpt-5-mini");
        assert_eq!(t.lookup("claude-sonnet-4-5-20250929").unwrap().0, "claude-sonnet-4-5");
        assert_eq!(t.lookup("models/gemini-2.5-flash").unwrap().0, "gemini-2.5-flash");
        assert_eq!(t.lookup("openai/gpt-5").unwrap().0, "gpt-5");
        assert!(t.lookup("gpt-5-mini-turbo").is_none());
        assert!(t.lookup("no-such-model").is_none());
    }

    #[test]
    fn overrides_shadow_builtin_prices() {
        let mut t = table();
        let mut p = t.lookup("gpt-5").unwrap().1.as_ref().clone();
        p.base.input = d("9");
        t.set_override("gpt-5".into(), p, Provenance { source: "price set".into(), at: 0 });
        assert_eq!(t.lookup("gpt-5-2025-08-07").unwrap().1.base.input, d("9"));
    }

    #[test]
    fn openai_cost_does_not_count_cached_or_reasoning_twice() {
        let t = table();
        let price = t.lookup("gpt-5-mini").unwrap().1;
        // 176 uncached × 0.25 + 1024 cached × 0.025 + 300 output × 2.00, per million.
        let usage = Usage { input_tokens: 1200, cached_input_tokens: 1024, output_tokens: 300, reasoning_tokens: 256, ..Usage::default() };
        assert_eq!(cost(&usage, price), d("0.0006696"));
        let small = Usage { input_tokens: 12, output_tokens: 3, ..Usage::default() };
        assert_eq!(cost(&small, price), d("0.000009"));
    }

    #[test]
    fn long_context_tier_applies_to_the_whole_request() {
        let t = table();
        let price = t.lookup("gpt-5.4").unwrap().1;
        let at = Usage { input_tokens: 272_000, output_tokens: 1000, ..Usage::default() };
        assert_eq!(cost(&at, price), d("0.695"));
        let over = Usage { input_tokens: 272_001, output_tokens: 1000, ..Usage::default() };
        assert_eq!(cost(&over, price), d("1.382505"));
    }

    #[test]
    fn cache_writes_at_their_rates() {
        let t = table();
        let price = t.lookup("claude-sonnet-4-5").unwrap().1;
        let usage = Usage {
            input_tokens: 50 + 2048 + 10000,
            cached_input_tokens: 10000,
            cache_write_5m_tokens: 2048,
            output_tokens: 420,
            ..Usage::default()
        };
        // 50×3 + 10000×0.30 + 2048×3.75 + 420×15 = 150 + 3000 + 7680 + 6300 = 17130.
        assert_eq!(cost(&usage, price), d("0.01713"));
        let split = Usage { cache_write_5m_tokens: 1024, cache_write_1h_tokens: 1024, web_search_requests: 2, ..usage };
        // 1024×3.75 + 1024×6 = 9984 replaces 2048×3.75 = 7680 (+2304); two searches at $10 per 1,000: +$0.02.
        assert_eq!(cost(&split, price), d("0.039434"));
    }

    #[test]
    fn the_bound_covers_every_way_its_classes_can_be_billed() {
        let t = table();
        let sonnet = t.lookup("claude-sonnet-4-5").unwrap().1;
        let plain = |n| InputTokens { base: n, ..InputTokens::default() };
        let one_hour = |n| InputTokens { write_1h: n, ..InputTokens::default() };
        // Plain input at 3.00, 5-minute writes at 3.75, 1-hour writes at 6.00; output at 15.00.
        assert_eq!(bound(sonnet, &plain(1000), 500), d("0.0105"));
        assert_eq!(bound(sonnet, &InputTokens { write_5m: 1000, ..InputTokens::default() }, 500), d("0.01125"));
        assert_eq!(bound(sonnet, &one_hour(1000), 500), d("0.0135"));
        // Past 200K input the long-context tier applies: 12.00 for 1-hour writes, 22.50 output.
        assert_eq!(bound(sonnet, &one_hour(200_001), 0), d("2.400012"));
        assert_eq!(output_rate(sonnet, 200_001), d("0.0000225"));
        for (input, cached, w5, w1, output) in
            [(1000, 1000, 0, 0, 500), (1000, 0, 1000, 0, 500), (1000, 0, 0, 1000, 500), (1000, 200, 300, 400, 7)]
        {
            let usage = Usage {
                input_tokens: input,
                cached_input_tokens: cached,
                cache_write_5m_tokens: w5,
                cache_write_1h_tokens: w1,
                output_tokens: output,
                ..Usage::default()
            };
            assert!(cost(&usage, sonnet) <= bound(sonnet, &one_hour(1000), 500), "{usage:?}");
            if w1 == 0 {
                let classes = InputTokens { base: input - w5, write_5m: w5, ..InputTokens::default() };
                assert!(cost(&usage, sonnet) <= bound(sonnet, &classes, 500), "{usage:?} within its classes");
            }
        }
        let huge = InputTokens { base: u64::MAX, write_5m: u64::MAX, write_1h: u64::MAX };
        assert!(bound(sonnet, &huge, u64::MAX) > Decimal::ZERO, "huge counts do not panic");
        // A fee per request is part of the cost and of the bound.
        let mut fee = t.lookup("gpt-5").unwrap().1.as_ref().clone();
        fee.per_request = Some(d("0.005"));
        assert_eq!(cost(&Usage::default(), &fee), d("0.005"));
        assert_eq!(bound(&fee, &InputTokens::default(), 0), d("0.005"));
    }

    #[test]
    fn contradictory_or_huge_counts_do_not_panic() {
        let price = table().lookup("gpt-5").unwrap().1.as_ref().clone();
        let odd = Usage { input_tokens: 5, cached_input_tokens: 50, cache_write_5m_tokens: 9, output_tokens: 1, ..Usage::default() };
        let searches = Usage { web_search_requests: u64::MAX, ..Usage::default() };
        assert_eq!(cost(&searches, &price), d("0"), "no search price, no search cost");
        assert_eq!(cost(&odd, &price), d("0.000010625"));
        let huge = Usage { input_tokens: u64::MAX, cached_input_tokens: u64::MAX, output_tokens: u64::MAX, ..Usage::default() };
        assert!(cost(&huge, &price) > Decimal::ZERO);
    }

    #[test]
    fn price_validation() {
        let mut p = table().lookup("gpt-5").unwrap().1.as_ref().clone();
        p.base.output = d("-1");
        assert_eq!(p.validate(), Err(PriceError::OutOfRange { field: "output".into(), value: d("-1") }));
        let mut long = table().lookup("gpt-5.4").unwrap().1.as_ref().clone();
        long.long_context.as_mut().unwrap().prices.input = d("2000000");
        assert!(long.validate().unwrap_err().to_string().starts_with("long-context input price"));
        assert!(validate_model_name("my model").is_err());
        assert!(validate_model_name("my-model").is_ok());
    }
}
