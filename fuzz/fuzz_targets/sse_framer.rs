//! The SSE framer yields the same events however the bytes are split, and its raw copies of
//! the events put together give back exactly the bytes that went in.
#![no_main]

use capit::usage::sse::{SseEvent, SseFramer};
use libfuzzer_sys::fuzz_target;

fn frame(chunks: &[&[u8]], keep_raw: bool) -> (Vec<(Option<String>, String)>, Vec<u8>) {
    let mut framer = SseFramer::new(keep_raw);
    let mut events: Vec<SseEvent> = Vec::new();
    for chunk in chunks {
        framer.push(chunk, &mut |e| events.push(e));
    }
    let rest = framer.finish(&mut |e| events.push(e));
    let mut raw: Vec<u8> = events.iter().flat_map(|e| e.raw.clone()).collect();
    raw.extend_from_slice(&rest);
    let data = events.into_iter().filter(|e| !e.data.is_empty() || e.name.is_some()).map(|e| (e.name, e.data)).collect();
    (data, raw)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, stream)) = input.split_first() else { return };
    let cut = (cut as usize * stream.len()) / 255;
    let (a, b) = stream.split_at(cut.min(stream.len()));
    let whole = frame(&[stream], true);
    let split = frame(&[a, b], true);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(whole.0, split.0);
    assert_eq!(whole.0, frame(&bytes, false).0);
    assert_eq!(whole.1, stream);
    assert_eq!(split.1, stream);
});
