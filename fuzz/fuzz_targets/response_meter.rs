//! Any reply body, for any API and framing, split anywhere: the meter never panics, observes
//! the same usage whole and split, and forwards the bytes unchanged unless it filters events.
#![no_main]

use capit::providers::MeteredApi;
use capit::usage::{BodyFormat, meter_whole as run};
use libfuzzer_sys::fuzz_target;

const APIS: [MeteredApi; 5] = [
    MeteredApi::OpenAiChat,
    MeteredApi::OpenAiResponses,
    MeteredApi::OpenAiEmbeddings,
    MeteredApi::AnthropicMessages,
    MeteredApi::GeminiGenerate,
];
const FORMATS: [BodyFormat; 3] = [BodyFormat::Json, BodyFormat::Sse, BodyFormat::JsonArray];

fuzz_target!(|input: &[u8]| {
    let [selector, cut, body @ ..] = input else { return };
    let api = APIS[*selector as usize % APIS.len()];
    let format = FORMATS[(*selector as usize / APIS.len()) % FORMATS.len()];
    let hide = selector & 0x80 != 0;
    let cut = (*cut as usize * body.len()) / 255;
    let (a, b) = body.split_at(cut.min(body.len()));
    let whole = run(api, format, hide, &[body]);
    let split = run(api, format, hide, &[a, b]);
    assert_eq!(whole.0, split.0);
    assert_eq!(whole.1, split.1);
    if !(hide && format == BodyFormat::Sse) {
        assert_eq!(whole.1, body);
    }
});
