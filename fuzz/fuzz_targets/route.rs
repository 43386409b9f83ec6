//! The route allowlist admits only what it names: any path it accepts is already normal (no
//! dot segment, no encoded character, no empty segment), metered routes are POSTs, and the
//! answer for a path is the same with or without one trailing slash. Nothing panics.
#![no_main]

use capit::providers::{Endpoint, ProviderKind, route};
use capit::request_path::is_normal;
use http::Method;
use libfuzzer_sys::fuzz_target;

const KINDS: [ProviderKind; 5] =
    [ProviderKind::OpenAi, ProviderKind::Anthropic, ProviderKind::Gemini, ProviderKind::OpenRouter, ProviderKind::OpenAiCompatible];

fuzz_target!(|input: &[u8]| {
    let Some((&pick, rest)) = input.split_first() else { return };
    let Ok(path) = std::str::from_utf8(rest) else { return };
    let kind = KINDS[(pick & 7) as usize % KINDS.len()];
    let method = if pick & 8 == 0 { Method::GET } else { Method::POST };
    let Some(endpoint) = route(kind, &method, path) else { return };
    assert!(is_normal(path), "{kind:?} {method} {path:?} routed but not normal");
    if let Endpoint::Metered(_) = endpoint {
        assert_eq!(method, Method::POST, "{path:?}");
    }
    let other = match path.strip_suffix('/') {
        Some(bare) => route(kind, &method, bare),
        None => route(kind, &method, &format!("{path}/")),
    };
    assert_eq!(other, Some(endpoint), "{kind:?} {method} {path:?}");
});
