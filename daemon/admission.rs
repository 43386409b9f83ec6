//! Admission maths: the most a request can cost (its hold) and what happens to it against what
//! its grant has left: admitted whole, admitted with its output fitted to a fair share of what
//! is left, made to wait for requests in flight, or refused.
//!
//! Invariants (see ARCHITECTURE.md, "why the cap holds"):
//! - A hold is never below the request's worst case: input tokens are bounded by its bytes (a
//!   token is at least one byte of text) or by an exact count, each at the dearest rate its class
//!   allows; output by the limit sent upstream, at the output rate.
//! - A request is admitted only if its hold fits in `cap - spent - held`; so whatever the
//!   concurrency, the holds of admitted requests never add up past the cap.
//! - A request is refused at once only when it could not fit even with nothing in flight; when
//!   only holds in flight are in the way, it waits.
//!
//! Pure: decimals and counts in, a decision out. Arithmetic is checked; an overflow never
//! admits.

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use crate::pricing::{HIDDEN_PROMPT_ALLOWANCE, InputTokens, Price};
use crate::request_fields::{InputBytes, RequestFields};

/// Tokens added to an exact input count, for what the count call may not see (the count is the
/// provider's own estimate; the reply's figure trues the hold up as soon as it arrives).
fn count_margin(counted: u64) -> u64 {
    counted / 50 + 64
}

/// The input classes of a request bounded by its bytes: every byte one token in its class, plus
/// the provider's hidden prompt, which renders first and so goes to the dearest class in use.
/// Capped by the context window (`context`), which no request can pass.
pub fn input_from_bytes(bytes: InputBytes, context: u64) -> InputTokens {
    let mut input = InputTokens { base: bytes.base, write_5m: bytes.write_5m, write_1h: bytes.write_1h };
    *dearest_class(&mut input) = dearest_class(&mut input).saturating_add(HIDDEN_PROMPT_ALLOWANCE);
    cap_at_context(input, context)
}

/// The input classes of a request whose input the provider counted: the counted tokens placed
/// in the dearest classes first, no class holding more tokens than its bytes allow (plus the
/// hidden prompt), so the split is the worst the request makes possible.
pub fn input_from_count(counted: u64, bytes: InputBytes, context: u64) -> InputTokens {
    let from_bytes = input_from_bytes(bytes, u64::MAX);
    let mut left = counted.saturating_add(count_margin(counted));
    let mut take = |room: u64| {
        let n = room.min(left);
        left -= n;
        n
    };
    let write_1h = take(from_bytes.write_1h);
    let write_5m = take(from_bytes.write_5m);
    let base = take(from_bytes.base);
    let mut input = InputTokens { base, write_5m, write_1h };
    // More tokens than bytes (a count that includes what the provider adds): the dearest class.
    *dearest_class(&mut input) = dearest_class(&mut input).saturating_add(left);
    cap_at_context(input, context)
}

/// The input of a request whose content is partly given by reference: the whole context window,
/// in the dearest class the body makes possible.
pub fn input_by_reference(bytes: InputBytes, context: u64) -> InputTokens {
    let mut input = InputTokens::default();
    let class = if bytes.write_1h > 0 {
        &mut input.write_1h
    } else if bytes.write_5m > 0 {
        &mut input.write_5m
    } else {
        &mut input.base
    };
    *class = context;
    input
}

fn dearest_class(input: &mut InputTokens) -> &mut u64 {
    if input.write_1h > 0 {
        &mut input.write_1h
    } else if input.write_5m > 0 {
        &mut input.write_5m
    } else {
        &mut input.base
    }
}

/// No request has more input than the context window: trims the cheapest classes first.
fn cap_at_context(mut input: InputTokens, context: u64) -> InputTokens {
    let mut excess = input.total().saturating_sub(context);
    for class in [&mut input.base, &mut input.write_5m, &mut input.write_1h] {
        let cut = excess.min(*class);
        *class -= cut;
        excess -= cut;
    }
    input
}

/// The context window assumed for a model whose price does not give one: generous, never small.
pub const DEFAULT_CONTEXT: u64 = 2_000_000;

/// The output assumed for a request that sets no limit on a model whose price does not give its
/// largest output: generous, never small.
pub const DEFAULT_MAX_OUTPUT: u64 = 128_000;

/// The least output a request with an extended-thinking budget can be fitted to (the budget must
/// stay at 1,024 or more and below the limit).
pub const MIN_FIT_WITH_THINKING: u64 = 2048;

/// What `fields` asks of its grant at `price` (none for a provider priced at zero): its input
/// bounded by `counted` when the provider counted it, else by its bytes or, for input given by
/// reference, by the context window; its output by its own limit, else the model's largest.
pub fn demand_for(price: Option<&Price>, fields: &RequestFields, counted: Option<u64>, fit: bool) -> Demand {
    let context = price.and_then(|p| p.max_input_tokens).unwrap_or(DEFAULT_CONTEXT);
    let input = match counted {
        Some(counted) => input_from_count(counted, fields.input, context),
        None if fields.external_input => input_by_reference(fields.input, context),
        None => input_from_bytes(fields.input, context),
    };
    let output = fields
        .max_output_tokens
        .unwrap_or_else(|| price.and_then(|p| p.max_output_tokens).unwrap_or(DEFAULT_MAX_OUTPUT).saturating_mul(fields.choices.max(1)));
    let least = if fields.thinking_budget { MIN_FIT_WITH_THINKING } else { crate::grants::MIN_FIT_OUTPUT_TOKENS };
    match price {
        Some(price) => Demand::priced(price, &input, output, fit.then_some(least)),
        None => Demand::free(input.total(), output),
    }
}

/// What a request asks of its grant's budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    /// The most its input can cost.
    pub input_cost: Decimal,
    /// The most input tokens it can have, for token limits.
    pub input_tokens: u64,
    /// The most output it can produce as sent (its own limit, else the model's largest).
    pub output_tokens: u64,
    /// What one output token can cost.
    pub output_rate: Decimal,
    /// When fitting is allowed: the least output worth sending the request with.
    pub fit_at_least: Option<u64>,
}

impl Demand {
    /// The demand of a request priced with `price`, with this input and output.
    pub fn priced(price: &Price, input: &InputTokens, output_tokens: u64, fit_at_least: Option<u64>) -> Demand {
        Demand {
            input_cost: crate::pricing::input_bound(price, input),
            input_tokens: input.total(),
            output_tokens,
            output_rate: crate::pricing::output_rate(price, input.total()),
            fit_at_least,
        }
    }

    /// A request that costs nothing (a provider priced at zero): only its tokens count.
    pub fn free(input_tokens: u64, output_tokens: u64) -> Demand {
        Demand { input_cost: Decimal::ZERO, input_tokens, output_tokens, output_rate: Decimal::ZERO, fit_at_least: None }
    }

    fn cost_with(&self, output_tokens: u64) -> Option<Decimal> {
        Decimal::from(output_tokens).checked_mul(self.output_rate)?.checked_add(self.input_cost)
    }

    /// The whole hold, with the output as asked.
    pub fn full_cost(&self) -> Option<Decimal> {
        self.cost_with(self.output_tokens)
    }

    /// The least output the request can be sent with (its least when fitting is allowed).
    pub fn least_output(&self) -> u64 {
        self.fit_at_least.map_or(self.output_tokens, |least| least.min(self.output_tokens))
    }

    /// The least the request can be sent for.
    pub fn cost_least(&self) -> Decimal {
        self.cost_with(self.least_output()).unwrap_or(Decimal::MAX)
    }
}

/// Where a grant's budget stands when a request asks, in its current window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    pub cap: Decimal,
    pub spent: Decimal,
    /// Held by requests in flight.
    pub reserved: Decimal,
    pub in_flight: u64,
    /// Requests that have arrived and are not yet admitted or refused, this one included.
    pub competing: u64,
}

impl Room {
    /// What is left for new holds now.
    pub fn free_now(&self) -> Decimal {
        self.cap.checked_sub(self.spent).and_then(|d| d.checked_sub(self.reserved)).unwrap_or(Decimal::ZERO).max(Decimal::ZERO)
    }

    /// What would be left with nothing in flight.
    pub fn free_when_idle(&self) -> Decimal {
        self.cap.checked_sub(self.spent).unwrap_or(Decimal::ZERO).max(Decimal::ZERO)
    }
}

/// An admitted request's hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub amount: Decimal,
    /// The output the request may produce as sent: its own, or fitted.
    pub output_tokens: u64,
    /// The output was lowered to fit: the request must be sent with this limit.
    pub fitted: bool,
    /// Input and output tokens, for token limits.
    pub tokens: u64,
}

/// What admission decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Admit(Hold),
    /// It would fit once requests in flight settle.
    Wait,
    /// The window's cap is spent.
    Spent,
    /// Even with nothing in flight it would not fit: `least` is the least it can cost, with
    /// `output_tokens` of output, and `left` what the window has.
    TooBig {
        left: Decimal,
        least: Decimal,
        output_tokens: u64,
    },
}

/// Decides a request against its grant's room.
///
/// Whole if it fits. Otherwise, when fitting is allowed, its output is lowered to a fair share
/// of what is left after its input, the room divided among the requests in flight and those
/// arriving (so one request does not lock out its siblings), but never below its least output
/// and never past what is left. Otherwise it waits if it would fit with nothing in flight, and
/// is refused if not.
pub fn decide(room: &Room, demand: &Demand) -> Decision {
    if room.spent >= room.cap {
        return Decision::Spent;
    }
    let free = room.free_now();
    let least_output = demand.least_output();
    let tokens = |output: u64| demand.input_tokens.saturating_add(output);
    if let Some(full) = demand.full_cost().filter(|full| *full <= free) {
        return Decision::Admit(Hold {
            amount: full,
            output_tokens: demand.output_tokens,
            fitted: false,
            tokens: tokens(demand.output_tokens),
        });
    }
    if demand.fit_at_least.is_some()
        && let Some(output_room) = free.checked_sub(demand.input_cost).filter(|r| !r.is_sign_negative())
        && !demand.output_rate.is_zero()
    {
        let fits = whole_tokens(output_room / demand.output_rate);
        if fits >= least_output {
            let sharing = room.in_flight.saturating_add(room.competing).max(1);
            let share = whole_tokens(output_room / Decimal::from(sharing) / demand.output_rate);
            let output = share.max(least_output).min(fits).min(demand.output_tokens);
            if let Some(amount) = demand.cost_with(output) {
                return Decision::Admit(Hold {
                    amount,
                    output_tokens: output,
                    fitted: output < demand.output_tokens,
                    tokens: tokens(output),
                });
            }
        }
    }
    let least = demand.cost_least();
    let left = room.free_when_idle();
    if least <= left { Decision::Wait } else { Decision::TooBig { left, least, output_tokens: least_output } }
}

fn whole_tokens(amount: Decimal) -> u64 {
    amount.floor().to_u64().unwrap_or(if amount.is_sign_negative() { 0 } else { u64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn room(cap: &str, spent: &str, reserved: &str, in_flight: u64, competing: u64) -> Room {
        Room { cap: d(cap), spent: d(spent), reserved: d(reserved), in_flight, competing }
    }

    /// $0.10 of input, up to 1,000 output tokens at $0.001 each: $1.10 whole.
    fn demand(fit: Option<u64>) -> Demand {
        Demand { input_cost: d("0.10"), input_tokens: 500, output_tokens: 1000, output_rate: d("0.001"), fit_at_least: fit }
    }

    #[test]
    fn a_request_that_fits_is_admitted_whole() {
        let hold = Hold { amount: d("1.10"), output_tokens: 1000, fitted: false, tokens: 1500 };
        assert_eq!(decide(&room("5", "0", "0", 0, 1), &demand(Some(256))), Decision::Admit(hold));
        assert_eq!(decide(&room("5", "3.9", "0", 0, 1), &demand(None)), Decision::Admit(hold), "exactly at the cap fits");
        assert_eq!(decide(&room("5", "5", "0", 0, 1), &demand(Some(256))), Decision::Spent);
    }

    #[test]
    fn fitting_takes_a_fair_share_never_below_the_least() {
        // $1.00 left: $0.90 for output, alone: 900 tokens.
        let alone = decide(&room("1", "0", "0", 0, 1), &demand(Some(256)));
        assert_eq!(alone, Decision::Admit(Hold { amount: d("1.00"), output_tokens: 900, fitted: true, tokens: 1400 }));
        // With two in flight and one more arriving, a quarter of the $0.90: 225, raised to 256.
        let shared = decide(&room("1", "0", "0", 2, 2), &demand(Some(256)));
        assert_eq!(shared, Decision::Admit(Hold { amount: d("0.356"), output_tokens: 256, fitted: true, tokens: 756 }));
        // With two in flight, a third: 300.
        let third = decide(&room("1", "0", "0", 2, 1), &demand(Some(256)));
        assert!(matches!(third, Decision::Admit(Hold { output_tokens: 300, .. })), "{third:?}");
    }

    #[test]
    fn in_flight_holds_make_it_wait_and_a_request_too_big_is_refused() {
        // $0.30 free now, $1.00 when idle: fitted needs $0.356.
        assert_eq!(decide(&room("1", "0", "0.70", 3, 1), &demand(Some(256))), Decision::Wait);
        assert_eq!(decide(&room("2", "0", "1.50", 1, 1), &demand(None)), Decision::Wait, "whole needs 1.10 of the 2.00");
        let too_big = decide(&room("1", "0.70", "0", 0, 1), &demand(Some(256)));
        assert_eq!(too_big, Decision::TooBig { left: d("0.30"), least: d("0.356"), output_tokens: 256 });
        let whole_only = decide(&room("1", "0", "0", 0, 1), &demand(None));
        assert_eq!(whole_only, Decision::TooBig { left: d("1"), least: d("1.10"), output_tokens: 1000 });
    }

    #[test]
    fn a_request_asking_less_than_the_least_is_fitted_to_itself() {
        let small = Demand { output_tokens: 100, ..demand(Some(256)) };
        assert_eq!(
            decide(&room("0.15", "0", "0", 0, 1), &small),
            Decision::TooBig { left: d("0.15"), least: d("0.20"), output_tokens: 100 }
        );
        assert!(matches!(decide(&room("0.20", "0", "0", 0, 1), &small), Decision::Admit(Hold { fitted: false, .. })));
    }

    #[test]
    fn spend_past_the_cap_and_huge_figures_never_admit() {
        // A reply that cost more than its hold can leave spend and holds past the cap.
        assert_eq!(decide(&room("1", "0.5", "0.9", 1, 1), &demand(Some(256))), Decision::Wait);
        let huge = Demand { input_cost: Decimal::MAX, output_tokens: u64::MAX, output_rate: Decimal::MAX, ..demand(Some(256)) };
        assert!(matches!(decide(&room("1000000", "0", "0", 0, 1), &huge), Decision::TooBig { .. }));
        let free = Demand::free(100, 100);
        assert!(matches!(decide(&room("1", "0", "0", 0, 1), &free), Decision::Admit(Hold { amount, .. }) if amount.is_zero()));
    }

    #[test]
    fn a_request_without_a_limit_holds_the_models_largest_output_for_each_choice() {
        let price: Price = serde_json::from_str(r#"{"input":"2.5","output":"10","max_output_tokens":16384}"#).unwrap();
        let fields = |body: &str| crate::request_fields::read(crate::providers::MeteredApi::OpenAiChat, body.as_bytes(), None).unwrap();
        let output = |body: &str| demand_for(Some(&price), &fields(body), None, false).output_tokens;
        assert_eq!(output(r#"{"model":"gpt-4o","messages":[]}"#), 16384);
        assert_eq!(output(r#"{"model":"gpt-4o","messages":[],"n":64}"#), 64 * 16384, "64 replies may each be as long as the model allows");
        assert_eq!(output(r#"{"model":"gpt-4o","messages":[],"n":64,"max_tokens":10}"#), 640, "its own limit, times its choices");
        let unpriced = demand_for(None, &fields(r#"{"model":"x","messages":[],"n":2}"#), None, false);
        assert_eq!(unpriced.output_tokens, 2 * DEFAULT_MAX_OUTPUT);
    }

    #[test]
    fn input_classes_from_bytes_counts_and_references() {
        let bytes = InputBytes { base: 1000, write_5m: 5000, write_1h: 2000 };
        assert_eq!(input_from_bytes(bytes, u64::MAX), InputTokens { base: 1000, write_5m: 5000, write_1h: 2000 + HIDDEN_PROMPT_ALLOWANCE });
        assert_eq!(input_from_bytes(InputBytes { base: 10, ..InputBytes::default() }, u64::MAX).base, 10 + HIDDEN_PROMPT_ALLOWANCE);
        assert_eq!(
            input_from_bytes(bytes, 4000),
            InputTokens { base: 0, write_5m: 976, write_1h: 3024 },
            "capped by the context, cheapest first"
        );
        // 2,000 counted tokens (+104 margin) go to the dearest classes first.
        assert_eq!(input_from_count(2000, bytes, u64::MAX), InputTokens { base: 0, write_5m: 0, write_1h: 2104 });
        assert_eq!(input_from_count(4000, bytes, u64::MAX), InputTokens { base: 0, write_5m: 1120, write_1h: 3024 });
        // A count past every byte (the provider's additions) lands in the dearest class.
        let plain = InputBytes { base: 100, ..InputBytes::default() };
        assert_eq!(input_from_count(5000, plain, u64::MAX).base, 5164);
        assert_eq!(input_by_reference(bytes, 200_000), InputTokens { write_1h: 200_000, ..InputTokens::default() });
        assert_eq!(input_by_reference(plain, 200_000), InputTokens { base: 200_000, ..InputTokens::default() });
    }
}
