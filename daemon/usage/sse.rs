//! An incremental Server-Sent Events framer: bytes in, complete events out.
//!
//! It is fed whatever the network delivers (half an event, several events, a UTF-8 code point
//! split in two) and yields the same events for every split of the same stream. It accepts
//! `\n`, `\r\n` and `\r` line endings, multi-line `data:` fields, `event:` lines and `:`
//! comments (OpenRouter's keep-alives), as the SSE specification describes.

/// Lines longer than this are dropped (and the event marked damaged) rather than buffered
/// without bound; no real usage event comes near it.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when the stream names its events (Anthropic, OpenAI Responses).
    pub name: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The exact bytes of the event on the wire, comments and terminating blank line included;
    /// filled only when the framer keeps raw bytes (to forward some events and drop others).
    pub raw: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct SseFramer {
    keep_raw: bool,
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    line_too_long: bool,
    /// The previous byte was `\r`, so a `\n` now is part of the same line ending.
    after_cr: bool,
    name: Option<String>,
    data: String,
    has_data: bool,
    /// Raw bytes of the event being built (only when `keep_raw`).
    raw: Vec<u8>,
}

impl SseFramer {
    /// `keep_raw`: remember each event's bytes so the caller can forward events selectively.
    pub fn new(keep_raw: bool) -> SseFramer {
        SseFramer { keep_raw, ..SseFramer::default() }
    }

    /// Feeds a chunk, calling `on_event` for every event the chunk completes.
    pub fn push(&mut self, mut chunk: &[u8], on_event: &mut dyn FnMut(SseEvent)) {
        if chunk.is_empty() {
            return;
        }
        // A `\r` ended the previous chunk: a `\n` now completes that same line ending, and
        // anything else means the `\r` stood alone.
        if std::mem::take(&mut self.after_cr) && chunk[0] == b'\n' {
            if self.keep_raw {
                self.raw.push(b'\n');
            }
            chunk = &chunk[1..];
        }
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (line, rest) = chunk.split_at(pos);
            let terminator = rest[0];
            let mut used = pos + 1;
            self.after_cr = false;
            if terminator == b'\r' {
                match rest.get(1) {
                    Some(b'\n') => used += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.append_line_bytes(line);
            if self.keep_raw {
                self.raw.extend_from_slice(&chunk[..used]);
            }
            self.end_line(on_event);
            chunk = &chunk[used..];
        }
        self.append_line_bytes(chunk);
        if self.keep_raw {
            self.raw.extend_from_slice(chunk);
        }
    }

    /// Ends the stream: an event whose blank line never came is still dispatched (its usage
    /// counts), and raw bytes left over (an unterminated comment, say) are returned.
    pub fn finish(&mut self, on_event: &mut dyn FnMut(SseEvent)) -> Vec<u8> {
        if !self.line.is_empty() || self.line_too_long {
            self.end_line(on_event);
        }
        if self.has_data {
            self.dispatch(on_event);
        }
        self.after_cr = false;
        std::mem::take(&mut self.raw)
    }

    /// Raw bytes held back because their event is not complete yet.
    pub fn pending_raw(&self) -> usize {
        self.raw.len()
    }

    fn append_line_bytes(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            self.line_too_long = true;
            self.line.clear();
        } else if !self.line_too_long {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, on_event: &mut dyn FnMut(SseEvent)) {
        if self.line_too_long {
            self.line_too_long = false;
            self.line.clear();
            return;
        }
        if self.line.is_empty() {
            if self.has_data || self.name.is_some() {
                self.dispatch(on_event);
            } else if self.keep_raw && !self.raw.is_empty() {
                // Blank lines and comments with no event: pass them on as their own "event".
                on_event(SseEvent { name: None, data: String::new(), raw: std::mem::take(&mut self.raw) });
            }
            return;
        }
        let line = String::from_utf8_lossy(&self.line);
        if !line.starts_with(':') {
            let (field, value) = match line.find(':') {
                Some(i) => {
                    let value = &line[i + 1..];
                    (&line[..i], value.strip_prefix(' ').unwrap_or(value))
                }
                None => (&line[..], ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                }
                "event" => self.name = Some(value.to_string()),
                _ => {}
            }
        }
        self.line.clear();
    }

    fn dispatch(&mut self, on_event: &mut dyn FnMut(SseEvent)) {
        let event = SseEvent { name: self.name.take(), data: std::mem::take(&mut self.data), raw: std::mem::take(&mut self.raw) };
        self.has_data = false;
        on_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(chunks: &[&[u8]], keep_raw: bool) -> Vec<SseEvent> {
        let mut framer = SseFramer::new(keep_raw);
        let mut events = Vec::new();
        for chunk in chunks {
            framer.push(chunk, &mut |e| events.push(e));
        }
        let rest = framer.finish(&mut |e| events.push(e));
        if keep_raw && !rest.is_empty() {
            events.push(SseEvent { raw: rest, ..SseEvent::default() });
        }
        events
    }

    fn data_of(events: &[SseEvent]) -> Vec<(Option<&str>, &str)> {
        events.iter().filter(|e| !e.data.is_empty() || e.name.is_some()).map(|e| (e.name.as_deref(), e.data.as_str())).collect()
    }

    #[track_caller]
    fn check_every_split(stream: &[u8], expected: &[(Option<&str>, &str)]) {
        let whole = frame_all(&[stream], false);
        assert_eq!(data_of(&whole), expected, "whole stream");
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(data_of(&frame_all(&bytes, false)), expected, "byte by byte");
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(data_of(&frame_all(&[a, b], false)), expected, "split at {cut}");
            // Raw bytes, concatenated, give back the stream exactly.
            let raw: Vec<u8> = frame_all(&[a, b], true).into_iter().flat_map(|e| e.raw).collect();
            assert_eq!(raw, stream, "raw, split at {cut}");
        }
        let raw: Vec<u8> = frame_all(&bytes, true).into_iter().flat_map(|e| e.raw).collect();
        assert_eq!(raw, stream);
    }

    #[test]
    fn data_only_events() {
        check_every_split(b"data: {\"a\":1}\n\ndata: [DONE]\n\n", &[(None, "{\"a\":1}"), (None, "[DONE]")]);
    }

    #[test]
    fn named_events_and_comments() {
        check_every_split(
            b": OPENROUTER PROCESSING\n\nevent: ping\ndata: {}\n\n:keep\nevent: message_stop\ndata:{\"x\":2}\n\n",
            &[(Some("ping"), "{}"), (Some("message_stop"), "{\"x\":2}")],
        );
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        check_every_split(b"data: one\r\n\r\ndata: two\r\rdata: three\n\n", &[(None, "one"), (None, "two"), (None, "three")]);
    }

    #[test]
    fn a_lone_cr_at_a_chunk_end_does_not_swallow_a_later_newline() {
        // Found by the fuzzer: `\r` ending one chunk, then `event\n\n` in later chunks.
        check_every_split(b"x\revent: e\n\ndata: d\n\n", &[(Some("e"), ""), (None, "d")]);
        check_every_split(b"data: a\rdata: b\n\n", &[(None, "a\nb")]);
    }

    #[test]
    fn multi_line_data_is_joined() {
        check_every_split(b"data: a\ndata: b\ndata\n\n", &[(None, "a\nb\n")]);
    }

    #[test]
    fn utf8_split_across_chunks() {
        check_every_split("data: héllo €\n\n".as_bytes(), &[(None, "héllo €")]);
    }

    #[test]
    fn unterminated_last_event_still_counts() {
        check_every_split(b"data: {\"usage\":1}", &[(None, "{\"usage\":1}")]);
        check_every_split(b"data: {\"usage\":1}\n", &[(None, "{\"usage\":1}")]);
    }
}
