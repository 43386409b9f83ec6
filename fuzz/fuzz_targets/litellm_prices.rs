//! A price file of any content either imports or is refused; it never panics, and whatever it
//! imports passes validation (so the cost formula cannot overflow on it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok((prices, _)) = capit::pricing::litellm::parse(text) {
        for (_, price) in prices {
            assert!(price.validate().is_ok());
            let usage = capit::usage::Usage { input_tokens: u64::MAX, output_tokens: u64::MAX, ..Default::default() };
            let _ = capit::pricing::cost(&usage, &price);
        }
    }
});
