//! Prices and the one cost formula: tokens × USD-per-million-token prices, in exact decimals.
//!
//! Invariant: money is `rust_decimal::Decimal` from the price text to the ledger; no float
//! ever touches it. Prices come from a table compiled into the binary (`prices.json`), which
//! per-model overrides (`capitctl price set`) shadow.

pub mod litellm;

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::usage::Usage;

/// The five rates of one pricing tier, USD per million tokens. Cache prices left out fall back
/// to the input price (the most a cached token can cost); a 1-hour write to the 5-minute one.
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
        Rates {
            input: self.input,
            cached_input: self.cached_input.unwrap_or(self.input),
            cache_write_5m,
            cache_write_1h: self.cache_write_1h.unwrap_or(cache_write_5m),
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
    tokens.checked_add(searches).unwrap_or(Decimal::MAX).normalize()
}

/// Input tokens a provider may add to a request on its own (the tool-use system prompt,
/// message framing), on top of what the body holds.
pub const HIDDEN_PROMPT_ALLOWANCE: u64 = 1024;

/// The most a request can cost, for its reservation: every input token at the dearest
/// input-side rate (a cache write can cost twice the input rate), every output token at the
/// output rate, in the tier its input falls in (long-context rates are never below the base
/// ones), plus nothing for web searches (their tokens and fees are left to settlement).
pub fn bound(price: &Price, input_tokens: u64, output_tokens: u64) -> Decimal {
    let rates = price.rates(input_tokens);
    let input_rate = [rates.input, rates.cached_input, rates.cache_write_5m, rates.cache_write_1h].into_iter().max().unwrap_or(rates.input);
    let per_million = Decimal::from(input_tokens)
        .checked_mul(input_rate)
        .and_then(|i| Decimal::from(output_tokens).checked_mul(rates.output).and_then(|o| i.checked_add(o)))
        .unwrap_or(Decimal::MAX);
    (per_million / Decimal::from(1_000_000u32)).normalize()
}

/// The most output tokens a request with `input_tokens` of input can have for its bound to stay
/// within `budget` (none when even its input does not fit).
pub fn output_that_fits(price: &Price, input_tokens: u64, budget: Decimal) -> Option<u64> {
    let input_only = bound(price, input_tokens, 0);
    let per_token = bound(price, input_tokens, 1) - input_only;
    if budget < input_only {
        return None;
    }
    if per_token.is_zero() {
        return Some(u64::MAX);
    }
    let tokens = ((budget - input_only) / per_token).floor();
    Some(u64::try_from(tokens.mantissa() / 10i128.pow(tokens.scale())).unwrap_or(u64::MAX))
}

/// Built-in prices and user overrides, looked up by the model a response names.
#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    builtin: BTreeMap<String, Price>,
    overrides: BTreeMap<String, Price>,
}

#[derive(Deserialize)]
struct BuiltinFile {
    models: BTreeMap<String, Price>,
}

/// Where a listed price comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriceSource {
    Builtin,
    Override,
}

impl PriceTable {
    /// The table compiled into this binary, with the given overrides on top.
    pub fn with_overrides(overrides: BTreeMap<String, Price>) -> PriceTable {
        let file: BuiltinFile =
            serde_json::from_str(include_str!("../prices.json")).expect("the built-in price table is valid; a unit test parses it");
        PriceTable { builtin: file.models, overrides }
    }

    pub fn set_override(&mut self, model: String, price: Price) {
        self.overrides.insert(model, price);
    }

    /// Finds the price of `model`, trying the name as given, then without a provider prefix
    /// (`openai/…`, `models/…`) and without a dated-snapshot suffix
    /// (`gpt-5-mini-2025-08-07` → `gpt-5-mini`, `claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`).
    /// Returns the table's name for the model and its price.
    pub fn lookup(&self, model: &str) -> Option<(&str, &Price)> {
        for candidate in candidates(model) {
            for table in [&self.overrides, &self.builtin] {
                if let Some((name, price)) = table.get_key_value(candidate.as_str()) {
                    return Some((name.as_str(), price));
                }
            }
        }
        None
    }

    /// Every priced model, overrides shadowing built-in rows, sorted by name.
    pub fn entries(&self) -> Vec<(&str, &Price, PriceSource)> {
        let mut rows: BTreeMap<&str, (&Price, PriceSource)> = BTreeMap::new();
        for (name, price) in &self.builtin {
            rows.insert(name, (price, PriceSource::Builtin));
        }
        for (name, price) in &self.overrides {
            rows.insert(name, (price, PriceSource::Override));
        }
        rows.into_iter().map(|(name, (price, source))| (name, price, source)).collect()
    }
}

pub fn validate_model_name(model: &str) -> Result<(), PriceError> {
    if model.is_empty() || model.len() > 200 || model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(PriceError::BadModel);
    }
    Ok(())
}

/// The names to try for a model, most specific first.
fn candidates(model: &str) -> Vec<String> {
    let mut out = vec![model.to_string()];
    let unprefixed = model.rsplit_once('/').map_or(model, |(_, m)| m);
    if unprefixed != model {
        out.push(unprefixed.to_string());
    }
    if let Some(undated) = strip_date_suffix(unprefixed) {
        out.push(undated.to_string());
    }
    out
}

/// `name-2025-08-07` or `name-20250807` → `name`.
fn strip_date_suffix(model: &str) -> Option<&str> {
    let is_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((head, tail)) = model.rsplit_once('-')
        && is_digits(tail, 8)
    {
        return Some(head);
    }
    let parts: Vec<&str> = model.rsplitn(4, '-').collect();
    if parts.len() == 4 && is_digits(parts[0], 2) && is_digits(parts[1], 2) && is_digits(parts[2], 4) {
        return Some(parts[3]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn table() -> PriceTable {
        PriceTable::with_overrides(BTreeMap::new())
    }

    #[test]
    fn builtin_table_parses_and_every_price_is_valid() {
        let t = table();
        assert!(t.entries().len() > 20);
        for (name, price, _) in t.entries() {
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
        let mut p = t.lookup("gpt-5").unwrap().1.clone();
        p.base.input = d("9");
        t.set_override("gpt-5".into(), p);
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
    fn the_bound_covers_every_way_the_same_tokens_can_be_billed() {
        let t = table();
        let sonnet = t.lookup("claude-sonnet-4-5").unwrap().1;
        // 1000 input at the 1-hour write rate (6.00), 500 output at 15.00.
        assert_eq!(bound(sonnet, 1000, 500), d("0.0135"));
        // Past 200K input the long-context tier applies: 12.00 for 1-hour writes, 22.50 output.
        assert_eq!(bound(sonnet, 200_001, 0), d("2.400012"));
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
            assert!(cost(&usage, sonnet) <= bound(sonnet, 1000, 500), "{usage:?}");
        }
        assert!(bound(sonnet, u64::MAX, u64::MAX) > Decimal::ZERO, "huge counts do not panic");
    }

    #[test]
    fn output_that_fits_is_the_largest_whose_bound_fits() {
        let t = table();
        let mini = t.lookup("gpt-5-mini").unwrap().1;
        let budget = d("0.01");
        let fits = output_that_fits(mini, 1000, budget).unwrap();
        assert!(bound(mini, 1000, fits) <= budget);
        assert!(bound(mini, 1000, fits + 1) > budget);
        assert_eq!(output_that_fits(mini, 1_000_000, d("0.0001")), None);
    }

    #[test]
    fn contradictory_or_huge_counts_do_not_panic() {
        let price = table().lookup("gpt-5").unwrap().1.clone();
        let odd = Usage { input_tokens: 5, cached_input_tokens: 50, cache_write_5m_tokens: 9, output_tokens: 1, ..Usage::default() };
        let searches = Usage { web_search_requests: u64::MAX, ..Usage::default() };
        assert_eq!(cost(&searches, &price), d("0"), "no search price, no search cost");
        assert_eq!(cost(&odd, &price), d("0.000010625"));
        let huge = Usage { input_tokens: u64::MAX, cached_input_tokens: u64::MAX, output_tokens: u64::MAX, ..Usage::default() };
        assert!(cost(&huge, &price) > Decimal::ZERO);
    }

    #[test]
    fn price_validation() {
        let mut p = table().lookup("gpt-5").unwrap().1.clone();
        p.base.output = d("-1");
        assert_eq!(p.validate(), Err(PriceError::OutOfRange { field: "output".into(), value: d("-1") }));
        let mut long = table().lookup("gpt-5.4").unwrap().1.clone();
        long.long_context.as_mut().unwrap().prices.input = d("2000000");
        assert!(long.validate().unwrap_err().to_string().starts_with("long-context input price"));
        assert!(validate_model_name("my model").is_err());
        assert!(validate_model_name("my-model").is_ok());
    }
}
