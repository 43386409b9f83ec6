//! Any request body, for any API: reading its fields never panics; when it is read, every byte
//! is in exactly one rate class, the hold built from it is never below its bytes (or the
//! context window), and the body of the provider's count call is valid JSON.
#![no_main]

use capit::providers::MeteredApi;
use capit::request_fields::{count_body, read};
use libfuzzer_sys::fuzz_target;

const APIS: [MeteredApi; 5] = [
    MeteredApi::OpenAiChat,
    MeteredApi::OpenAiResponses,
    MeteredApi::OpenAiEmbeddings,
    MeteredApi::AnthropicMessages,
    MeteredApi::GeminiGenerate,
];

fuzz_target!(|input: &[u8]| {
    let [selector, body @ ..] = input else { return };
    let api = APIS[*selector as usize % APIS.len()];
    let path_model = (selector & 0x80 != 0).then_some("gemini-x");
    let Ok(fields) = read(api, body, path_model) else { return };
    assert_eq!(fields.input.total(), body.len() as u64, "every byte in one class");
    let price = capit::pricing::Price {
        base: capit::pricing::TierPrices {
            input: "3".parse().unwrap(),
            cached_input: Some("0.3".parse().unwrap()),
            cache_write_5m: Some("3.75".parse().unwrap()),
            cache_write_1h: Some("6".parse().unwrap()),
            output: "15".parse().unwrap(),
        },
        max_output_tokens: Some(64_000),
        max_input_tokens: Some(200_000),
        long_context: None,
        web_search_per_1k: None,
        per_request: None,
        checked: None,
        provider: None,
    };
    for counted in [None, Some(u64::from(*selector) * 1000)] {
        let demand = capit::admission::demand_for(Some(&price), &fields, counted, selector & 1 == 0);
        if counted.is_none() {
            assert!(demand.input_tokens >= (body.len() as u64).min(200_000), "never below the bytes");
        }
        assert!(demand.input_tokens <= 200_000, "never past the context window");
        assert!(demand.full_cost().is_some(), "a hold in range");
    }
    if let Some(count) = count_body(api, body, &fields.model) {
        serde_json::from_slice::<serde_json::Value>(&count).expect("the count call's body is JSON");
    }
});
