//! Gemini `generateContent` / `streamGenerateContent` usage.
//!
//! `promptTokenCount` includes `cachedContentTokenCount`; `thoughtsTokenCount` is separate from
//! `candidatesTokenCount` and billed as output; `toolUsePromptTokenCount` is input. A stream
//! repeats running totals in `usageMetadata`: the last one is the whole, never a sum. Without
//! `alt=sse` a stream is one JSON array sent piece by piece, which [`JsonArraySplitter`] cuts
//! into its elements.

use serde_json::Value;

use super::{Observed, Usage, count};

/// Reads a `usageMetadata` object; a count that is not one is an error.
pub fn parse_usage(meta: &Value) -> Result<Usage, String> {
    let prompt = count(meta.get("promptTokenCount"), "promptTokenCount")?;
    let tool_prompt = count(meta.get("toolUsePromptTokenCount"), "toolUsePromptTokenCount")?;
    let candidates = count(meta.get("candidatesTokenCount"), "candidatesTokenCount")?;
    let thoughts = count(meta.get("thoughtsTokenCount"), "thoughtsTokenCount")?;
    Ok(Usage {
        input_tokens: prompt.saturating_add(tool_prompt),
        cached_input_tokens: count(meta.get("cachedContentTokenCount"), "cachedContentTokenCount")?,
        output_tokens: candidates.saturating_add(thoughts),
        reasoning_tokens: thoughts,
        ..Usage::default()
    })
}

/// Observes one `GenerateContentResponse` (a whole reply, or one element of a stream).
pub fn observe_response(observed: &mut Observed, value: &Value) {
    if let Some(error) = value.get("error").filter(|e| e.is_object()) {
        observed.error = Some(super::openai::error_message(error));
        return;
    }
    if let Some(model) = value.get("modelVersion").and_then(Value::as_str) {
        observed.model = Some(model.to_string());
    }
    let mut finished = false;
    for candidate in value.get("candidates").and_then(Value::as_array).into_iter().flatten() {
        if candidate.get("finishReason").is_some_and(|r| !r.is_null()) {
            finished = true;
        }
        for part in candidate.pointer("/content/parts").and_then(Value::as_array).into_iter().flatten() {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                observed.output_text_bytes += text.len() as u64;
            }
        }
    }
    if let Some(meta) = value.get("usageMetadata").filter(|m| m.is_object()) {
        let valid = observed.take_usage(parse_usage(meta));
        if valid && meta.get("promptTokenCount").is_some() {
            observed.input_stated = true;
        }
        if finished {
            observed.usage_final = valid;
        }
    }
    if finished {
        observed.complete = true;
    }
}

pub fn observe_json(observed: &mut Observed, body: &[u8]) {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items.iter().for_each(|item| observe_response(observed, item)),
        Ok(value) => {
            observe_response(observed, &value);
            // A whole non-streamed reply carries its final totals.
            if observed.usage.is_some() && observed.error.is_none() {
                observed.usage_final = true;
                observed.complete = true;
            }
        }
        Err(_) => {}
    }
}

/// Cuts a JSON array arriving in pieces (`[{...},\r\n{...}]`) into its top-level elements.
#[derive(Debug, Default)]
pub struct JsonArraySplitter {
    depth: u32,
    in_string: bool,
    escaped: bool,
    element: Vec<u8>,
}

/// Elements bigger than this are skipped rather than buffered without bound.
const MAX_ELEMENT_BYTES: usize = 32 * 1024 * 1024;

impl JsonArraySplitter {
    pub fn push(&mut self, chunk: &[u8], on_element: &mut dyn FnMut(&[u8])) {
        for &byte in chunk {
            if self.depth == 0 {
                // Between elements: the array's brackets, commas and white space.
                if byte == b'{' {
                    self.depth = 1;
                    self.element.clear();
                    self.element.push(byte);
                }
                continue;
            }
            if self.element.len() < MAX_ELEMENT_BYTES {
                self.element.push(byte);
            }
            if self.in_string {
                match (self.escaped, byte) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        if self.element.len() < MAX_ELEMENT_BYTES {
                            on_element(&self.element);
                        }
                        self.element.clear();
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::MeteredApi;
    use crate::usage::test_support::{every_split_agrees, meter_chunks};

    const SSE: &str = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hel\"}]},\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":1200,\"totalTokenCount\":1200},\"modelVersion\":\"gemini-2.5-flash\"}\r\n\r\n\
data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"lo \\\"}\\\" {\"}]},\"finishReason\":\"STOP\",\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":1200,\"cachedContentTokenCount\":1024,\"candidatesTokenCount\":40,\"thoughtsTokenCount\":310,\"toolUsePromptTokenCount\":5,\"totalTokenCount\":1555},\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"xyz\"}\r\n\r\n";

    fn expected() -> Usage {
        Usage { input_tokens: 1205, cached_input_tokens: 1024, output_tokens: 350, reasoning_tokens: 310, ..Usage::default() }
    }

    #[test]
    fn sse_takes_the_last_running_total_for_every_split() {
        let observed = every_split_agrees(MeteredApi::GeminiGenerate, SSE.as_bytes());
        assert_eq!(observed.usage, Some(expected()));
        assert!(observed.usage_final && observed.complete);
        assert_eq!(observed.model.as_deref(), Some("gemini-2.5-flash"));
    }

    #[test]
    fn json_array_stream_mode() {
        let elements: Vec<&str> = SSE.split("\r\n\r\n").filter(|e| !e.is_empty()).map(|e| e.trim_start_matches("data: ")).collect();
        let array = format!("[{},\r\n{}]", elements[0], elements[1]);
        let mut splitter_results = Vec::new();
        for cut in 0..=array.len() {
            let (a, b) = array.as_bytes().split_at(cut);
            let mut meter = crate::usage::ResponseMeter::new(MeteredApi::GeminiGenerate, crate::usage::BodyFormat::JsonArray, false);
            meter.feed(bytes::Bytes::copy_from_slice(a));
            meter.feed(bytes::Bytes::copy_from_slice(b));
            let observed = meter.finish().0;
            assert_eq!(observed.usage, Some(expected()), "cut at {cut}");
            splitter_results.push(observed.output_text_bytes);
        }
        assert!(splitter_results.iter().all(|&n| n == splitter_results[0]));
    }

    #[test]
    fn a_plain_reply_and_an_error() {
        let body = SSE.split("\r\n\r\n").nth(1).unwrap().trim_start_matches("data: ");
        let (observed, _) = meter_chunks(MeteredApi::GeminiGenerate, false, false, &[body.as_bytes()]);
        assert_eq!(observed.usage, Some(expected()));
        let error = br#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}}"#;
        let (observed, _) = meter_chunks(MeteredApi::GeminiGenerate, false, false, &[error]);
        assert_eq!(observed.error.as_deref(), Some("API key not valid."));
    }

    #[test]
    fn bad_counts_are_no_usage() {
        for bad in ["-1", "2.5", "\"7\""] {
            let body = format!(
                r#"{{"candidates":[{{"content":{{"parts":[{{"text":"Hi"}}]}},"finishReason":"STOP"}}],"usageMetadata":{{"promptTokenCount":10,"thoughtsTokenCount":{bad}}}}}"#
            );
            let (observed, _) =
                crate::usage::test_support::meter_chunks(crate::providers::MeteredApi::GeminiGenerate, false, false, &[body.as_bytes()]);
            assert!(observed.usage.is_none() && !observed.usage_final, "{bad}: {observed:?}");
            assert!(observed.invalid_usage.as_deref().is_some_and(|w| w.contains("thoughtsTokenCount")));
        }
    }

    #[test]
    fn an_early_running_total_is_not_final() {
        let first = SSE.split("\r\n\r\n").next().unwrap();
        let (observed, _) = meter_chunks(MeteredApi::GeminiGenerate, true, false, &[first.as_bytes(), b"\r\n\r\n"]);
        assert_eq!(observed.usage.unwrap().input_tokens, 1200);
        assert!(!observed.usage_final);
    }
}
