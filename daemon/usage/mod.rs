//! Usage parsing: response bytes in, token counts out. No IO, and no input can make it panic.
//!
//! Each provider reports usage in its own shape and with its own counting rules (is the cache
//! inside the input count? is reasoning inside the output count?). The parsers normalise all of
//! them into one [`Usage`] whose fields have a single meaning, so that pricing has one formula.
//! A parser never fails the request: what it cannot read it reports in [`Observed`] and the
//! proxy records the request as estimated.

pub mod anthropic;
pub mod decode;
pub mod gemini;
pub mod openai;
pub mod sse;

use bytes::Bytes;
use rust_decimal::Decimal;

use crate::providers::MeteredApi;
use sse::{SseEvent, SseFramer};

/// Token counts of one request, normalised across providers.
///
/// `input_tokens` is every input token, including those read from or written to a cache;
/// `cached_input_tokens` and the cache writes are subsets of it. `output_tokens` is every
/// generated token, reasoning included; `reasoning_tokens` is a subset of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_input_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_5m_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_1h_tokens: u64,
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u64,
    /// Server-side web searches (Anthropic), billed per search.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub web_search_requests: u64,
    /// The cost as the provider itself reported it (OpenRouter), which then wins over prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_cost: Option<Decimal>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    pub fn cache_write_tokens(&self) -> u64 {
        self.cache_write_5m_tokens.saturating_add(self.cache_write_1h_tokens)
    }
}

/// What a parser learnt from one response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The last usage report seen (reports are running totals: the last one is the whole).
    pub usage: Option<Usage>,
    /// `usage` is the reply's final count, not a partial one (Anthropic's `message_start`, an
    /// early Gemini chunk) from a reply that was cut short.
    pub usage_final: bool,
    /// The model the response names (a dated snapshot, often), which is what gets priced.
    pub model: Option<String>,
    /// An error the upstream reported inside a successful response (a mid-stream error event).
    pub error: Option<String>,
    /// Bytes of generated text seen, for estimating output when usage never arrives.
    pub output_text_bytes: u64,
    /// The response reached its normal end marker.
    pub complete: bool,
    /// A usage report that could not be read as counts (a negative, fractional or textual
    /// count, a cost that is no cost): the request is settled at its hold, never at zero.
    pub invalid_usage: Option<String>,
    /// The reply has stated its input (Anthropic's `message_start`, a Gemini chunk's prompt
    /// count): usage's input side is known while its output is still to come.
    pub input_stated: bool,
}

impl Observed {
    /// Takes one parsed usage report: a valid one replaces the last, an invalid one is kept as
    /// the reason the reply cannot be metered.
    pub(crate) fn take_usage(&mut self, parsed: Result<Usage, String>) -> bool {
        match parsed {
            Ok(usage) => {
                self.usage = Some(usage);
                true
            }
            Err(why) => {
                self.invalid_usage.get_or_insert(why);
                false
            }
        }
    }
}

/// How a reply body is framed, from its content type and the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document.
    Json,
    /// Server-Sent Events.
    Sse,
    /// A JSON array whose elements arrive one by one (Gemini streaming without `alt=sse`).
    JsonArray,
}

/// Meters one response body as it streams past, optionally holding back events the client
/// must not see (the usage chunk the proxy asked for on the client's behalf).
#[derive(Debug)]
pub struct ResponseMeter {
    api: MeteredApi,
    body: BodyState,
    observed: Observed,
    /// Anthropic's counters, which deltas replace one by one.
    anthropic: anthropic::AnthropicCounts,
    /// Drop the usage-only chunk that exists only because the proxy injected `include_usage`.
    hide_injected_usage: bool,
    /// Forward SSE only in whole events (so that a stream can be ended cleanly between two).
    whole_events: bool,
    /// Set when the upstream compressed its reply: the meter reads a decoded copy.
    decoder: Option<decode::Decoder>,
}

#[derive(Debug)]
enum BodyState {
    /// A JSON body, accumulated (up to a bound) and parsed once complete.
    Json {
        buf: Vec<u8>,
        overflowed: bool,
    },
    Sse(SseFramer),
    JsonArray(gemini::JsonArraySplitter),
}

/// JSON replies bigger than this are forwarded but not parsed (no real reply comes near it).
const MAX_JSON_BYTES: usize = 64 * 1024 * 1024;

impl ResponseMeter {
    pub fn new(api: MeteredApi, format: BodyFormat, hide_injected_usage: bool) -> ResponseMeter {
        let hide_injected_usage = hide_injected_usage && format == BodyFormat::Sse;
        let body = match format {
            BodyFormat::Sse => BodyState::Sse(SseFramer::new(hide_injected_usage)),
            BodyFormat::Json => BodyState::Json { buf: Vec::new(), overflowed: false },
            BodyFormat::JsonArray => BodyState::JsonArray(gemini::JsonArraySplitter::default()),
        };
        ResponseMeter {
            api,
            body,
            observed: Observed::default(),
            anthropic: Default::default(),
            hide_injected_usage,
            whole_events: hide_injected_usage,
            decoder: None,
        }
    }

    /// Forwards SSE in whole events, so that the stream can be ended between two of them.
    pub fn with_whole_events(mut self, whole: bool) -> ResponseMeter {
        if whole
            && !self.whole_events
            && let BodyState::Sse(framer) = &mut self.body
        {
            *framer = SseFramer::new(true);
            self.whole_events = true;
        }
        self
    }

    /// True when the bytes returned so far end on an event boundary (the stream can be cut
    /// cleanly there).
    pub fn at_event_boundary(&self) -> bool {
        self.whole_events && self.decoder.is_none() && matches!(self.body, BodyState::Sse(_))
    }

    /// Meters a reply sent with this `Content-Encoding`. A compressed reply is forwarded as it
    /// came (events cannot be filtered out of it) and metered from a decoded copy.
    pub fn with_content_encoding(mut self, encoding: Option<&str>) -> ResponseMeter {
        self.decoder = encoding.and_then(decode::Decoder::for_encoding);
        if self.decoder.is_some() {
            self.hide_injected_usage = false;
            self.whole_events = false;
        }
        self
    }

    /// Feeds one chunk of the response and returns the bytes to pass on to the client: the
    /// chunk itself, or, when events are being filtered, the complete events it finished.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if let Some(decoder) = self.decoder.as_mut() {
            let decoded = decoder.decode(&chunk);
            self.observe_plain(Bytes::from(decoded));
            return chunk;
        }
        self.observe_plain(chunk)
    }

    fn observe_plain(&mut self, chunk: Bytes) -> Bytes {
        let api = self.api;
        let observed = &mut self.observed;
        let counts = &mut self.anthropic;
        match &mut self.body {
            BodyState::Json { buf, overflowed } => {
                if !*overflowed {
                    if buf.len() + chunk.len() > MAX_JSON_BYTES {
                        *overflowed = true;
                        *buf = Vec::new();
                    } else {
                        buf.extend_from_slice(&chunk);
                    }
                }
                chunk
            }
            BodyState::JsonArray(splitter) => {
                splitter.push(&chunk, &mut |element| {
                    if let Ok(value) = serde_json::from_slice(element) {
                        gemini::observe_response(observed, &value);
                    }
                });
                chunk
            }
            BodyState::Sse(framer) => {
                if self.whole_events {
                    let hide = self.hide_injected_usage;
                    let mut out = Vec::new();
                    framer.push(&chunk, &mut |event| {
                        if observe_event(api, observed, counts, &event) == Verdict::Forward || !hide {
                            out.extend_from_slice(&event.raw);
                        }
                    });
                    Bytes::from(out)
                } else {
                    framer.push(&chunk, &mut |event| {
                        observe_event(api, observed, counts, &event);
                    });
                    chunk
                }
            }
        }
    }

    /// Ends the response: returns what was observed and any held-back bytes still owed to the
    /// client.
    pub fn finish(&mut self) -> (Observed, Bytes) {
        let api = self.api;
        let hide = self.hide_injected_usage;
        let whole = self.whole_events;
        let observed = &mut self.observed;
        let counts = &mut self.anthropic;
        let mut tail = Vec::new();
        match &mut self.body {
            BodyState::Json { buf, overflowed } => {
                if !*overflowed {
                    observe_json(api, observed, counts, buf);
                }
                *buf = Vec::new();
            }
            BodyState::JsonArray(_) => {}
            BodyState::Sse(framer) => {
                let rest = framer.finish(&mut |event| {
                    if (observe_event(api, observed, counts, &event) == Verdict::Forward || !hide) && whole {
                        tail.extend_from_slice(&event.raw);
                    }
                });
                if whole {
                    tail.extend_from_slice(&rest);
                }
            }
        }
        (std::mem::take(&mut self.observed), Bytes::from(tail))
    }

    /// What has been observed so far (for a response cut short).
    pub fn observed(&self) -> &Observed {
        &self.observed
    }
}

/// Runs a whole reply through a meter in the given chunks: what was observed and the bytes the
/// client would have received. For tests, fuzzing and benchmarks.
pub fn meter_whole(api: MeteredApi, format: BodyFormat, hide_injected_usage: bool, chunks: &[&[u8]]) -> (Observed, Vec<u8>) {
    let mut meter = ResponseMeter::new(api, format, hide_injected_usage);
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(chunk)));
    }
    let (observed, tail) = meter.finish();
    out.extend_from_slice(&tail);
    (observed, out)
}

/// The event that ends a stream the proxy cut off, in the API's own stream format, so that the
/// client's SDK raises it as an error with our message.
pub fn cutoff_event(api: MeteredApi, message: &str) -> Vec<u8> {
    use serde_json::json;
    let text = match api {
        MeteredApi::OpenAiChat | MeteredApi::OpenAiEmbeddings => format!(
            "data: {}\n\ndata: [DONE]\n\n",
            json!({"error": {"message": message, "type": "insufficient_quota", "param": null, "code": "capit_stream_cut"}})
        ),
        MeteredApi::OpenAiResponses => format!(
            "event: error\ndata: {}\n\n",
            json!({"type": "error", "code": "capit_stream_cut", "message": message, "param": null, "sequence_number": 0})
        ),
        MeteredApi::AnthropicMessages => {
            format!("event: error\ndata: {}\n\n", json!({"type": "error", "error": {"type": "rate_limit_error", "message": message}}))
        }
        MeteredApi::GeminiGenerate => {
            format!("data: {}\n\n", json!({"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}))
        }
    };
    text.into_bytes()
}

/// Whether an event goes on to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Hide,
}

fn observe_json(api: MeteredApi, observed: &mut Observed, counts: &mut anthropic::AnthropicCounts, body: &[u8]) {
    match api {
        MeteredApi::OpenAiChat => openai::observe_chat_json(observed, body),
        MeteredApi::OpenAiResponses => openai::observe_responses_json(observed, body),
        MeteredApi::OpenAiEmbeddings => openai::observe_embeddings_json(observed, body),
        MeteredApi::AnthropicMessages => anthropic::observe_json(observed, counts, body),
        MeteredApi::GeminiGenerate => gemini::observe_json(observed, body),
    }
}

fn observe_event(api: MeteredApi, observed: &mut Observed, counts: &mut anthropic::AnthropicCounts, event: &SseEvent) -> Verdict {
    match api {
        MeteredApi::OpenAiChat => openai::observe_chat_event(observed, event),
        MeteredApi::OpenAiResponses => openai::observe_responses_event(observed, event),
        MeteredApi::OpenAiEmbeddings => Verdict::Forward,
        MeteredApi::AnthropicMessages => anthropic::observe_event(observed, counts, event),
        MeteredApi::GeminiGenerate => {
            if let Ok(value) = serde_json::from_str(&event.data) {
                gemini::observe_response(observed, &value);
            }
            Verdict::Forward
        }
    }
}

/// The most tokens one reply may report of any kind; more is no count but garbage (no context
/// window comes near it, and pricing it would mean nothing).
pub const MAX_REPORTED_TOKENS: u64 = 100_000_000;

/// The most cost one reply may report, in USD; more is garbage, never a bill.
pub const MAX_REPORTED_COST: u64 = 10_000;

/// Reads a reported token count: absent or null is 0 (a provider leaves out what it did not
/// use), a JSON integer from 0 to [`MAX_REPORTED_TOKENS`] is the count, and anything else
/// (negative, fractional, `1e30`, text) is an error naming the field, so that the request is
/// settled at its hold rather than at a made-up figure.
pub(crate) fn count(value: Option<&serde_json::Value>, field: &str) -> Result<u64, String> {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(tokens) if tokens <= MAX_REPORTED_TOKENS => Ok(tokens),
            _ => Err(format!("{field} {n} is not a token count")),
        },
        Some(other) => Err(format!("{field} {other} is not a token count")),
    }
}

/// Reads a reported cost (OpenRouter's `usage.cost`, in USD): absent or null is none; a JSON
/// number from 0 to [`MAX_REPORTED_COST`] is taken digit for digit; anything else (negative,
/// text, huge) is an error, never a credit.
pub(crate) fn reported_cost(value: Option<&serde_json::Value>) -> Result<Option<Decimal>, String> {
    use serde_json::Value;
    let bad = |v: &Value| format!("usage.cost {v} is not a cost");
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => {
            let text = n.to_string();
            let cost = text.parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&text).ok()).ok_or_else(|| bad(v))?;
            if cost.is_sign_negative() || cost > Decimal::from(MAX_REPORTED_COST) {
                return Err(bad(v));
            }
            Ok(Some(cost.normalize()))
        }
        Some(other) => Err(bad(other)),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Runs a whole response through a meter in the given chunks; returns what was observed and
    /// the bytes the client would have received.
    pub fn meter_chunks(api: MeteredApi, is_sse: bool, hide: bool, chunks: &[&[u8]]) -> (Observed, Vec<u8>) {
        meter_whole(api, if is_sse { BodyFormat::Sse } else { BodyFormat::Json }, hide, chunks)
    }

    /// Checks that an SSE stream gives the same observation whole, byte by byte, split at every
    /// position, and split at many random pairs of positions; returns that observation.
    #[track_caller]
    pub fn every_split_agrees(api: MeteredApi, stream: &[u8]) -> Observed {
        let (whole, out) = meter_chunks(api, true, false, &[stream]);
        assert_eq!(out, stream, "bytes pass through unchanged");
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(meter_chunks(api, true, false, &bytes).0, whole, "byte by byte");
        for cut in 0..=stream.len() {
            assert_eq!(meter_chunks(api, true, false, &split_at_positions(stream, &[cut])).0, whole, "cut at {cut}");
        }
        // A small deterministic generator (xorshift) picks random splits into 2-6 pieces.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ stream.len() as u64;
        for _ in 0..300 {
            let mut cuts: Vec<usize> = (0..(seed % 5 + 1))
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % (stream.len() as u64 + 1)) as usize
                })
                .collect();
            cuts.sort_unstable();
            assert_eq!(meter_chunks(api, true, false, &split_at_positions(stream, &cuts)).0, whole, "cuts at {cuts:?}");
        }
        whole
    }

    /// Splits `stream` at `cuts` sorted positions.
    pub fn split_at_positions<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut parts = Vec::new();
        let mut last = 0;
        for &cut in cuts {
            parts.push(&stream[last..cut]);
            last = cut;
        }
        parts.push(&stream[last..]);
        parts
    }
}
