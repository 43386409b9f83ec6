//! Any usage object, for any API's parser: it never panics; what it accepts is in range (every
//! count at most the bound, a cost from 0 to the bound), prices to a cost without overflow, and
//! adds to totals; what it refuses it names.
#![no_main]

use capit::ledger::{EntryStatus, LedgerEntry, Totals};
use capit::usage::{MAX_REPORTED_COST, MAX_REPORTED_TOKENS, Usage};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;

fuzz_target!(|input: &[u8]| {
    let [selector, json @ ..] = input else { return };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else { return };
    let parsed = match selector % 4 {
        0 => capit::usage::openai::parse_chat_usage(&value),
        1 => capit::usage::openai::parse_responses_usage(&value),
        2 => capit::usage::gemini::parse_usage(&value),
        _ => {
            let mut counts = capit::usage::anthropic::AnthropicCounts::default();
            counts.update(&value).map(|()| counts.usage())
        }
    };
    let usage: Usage = match parsed {
        Ok(usage) => usage,
        Err(why) => {
            assert!(!why.is_empty());
            return;
        }
    };
    for n in [
        usage.cached_input_tokens,
        usage.cache_write_5m_tokens,
        usage.cache_write_1h_tokens,
        usage.reasoning_tokens,
        usage.web_search_requests,
    ] {
        assert!(n <= MAX_REPORTED_TOKENS);
    }
    // Input and output may each be the sum of a few counts (Anthropic's disjoint input parts).
    assert!(usage.input_tokens <= 3 * MAX_REPORTED_TOKENS && usage.output_tokens <= 2 * MAX_REPORTED_TOKENS);
    if let Some(cost) = usage.reported_cost {
        assert!(!cost.is_sign_negative() && cost <= Decimal::from(MAX_REPORTED_COST));
    }
    let table = capit::pricing::PriceTable::with_overrides(Default::default());
    let (_, price) = table.lookup("claude-sonnet-4-5").expect("the built-in table has Sonnet");
    let cost = capit::pricing::cost(&usage, price);
    assert!(cost < Decimal::from(100_000_000u64), "in range: {cost}");
    let entry = LedgerEntry {
        grant: capit::grants::GrantId(1),
        at_ms: 0,
        model: "m".into(),
        api: "a".into(),
        usage,
        cost,
        status: EntryStatus::Metered,
        http_status: 200,
        error: None,
    };
    let mut totals = Totals::default();
    totals.add(&entry).expect("an entry in range adds");
    totals.add(&entry).expect("and again");
});
