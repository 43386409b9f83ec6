//! Path normalisation never changes what a path means, only refuses: an accepted path's
//! segments are exactly the percent-decoded, non-empty segments of the input, none of them a dot
//! segment or holding a separator, and its joined form is a valid URL path that normalises to
//! itself (so an upstream decoding it sees the very segments capit matched).
#![no_main]

use capit::request_path::{is_normal, normalize};
use libfuzzer_sys::fuzz_target;

/// A plain percent-decoder, independent of the one under test.
fn decode(segment: &str) -> Option<Vec<u8>> {
    let bytes = segment.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fuzz_target!(|input: &[u8]| {
    let Ok(raw) = std::str::from_utf8(input) else { return };
    let Ok(path) = normalize(raw) else { return };
    let expected: Vec<Vec<u8>> = raw.split('/').filter(|s| !s.is_empty()).map(|s| decode(s).expect("accepted, so decodable")).collect();
    let got: Vec<Vec<u8>> = path.segments().iter().map(|s| s.as_bytes().to_vec()).collect();
    assert_eq!(got, expected, "{raw:?}");
    for segment in path.segments() {
        assert!(!segment.is_empty() && segment != "." && segment != "..", "{raw:?}");
        assert!(!segment.contains(['/', '\\', '%', '?', '#', ';']), "{raw:?}");
    }
    let joined = path.joined();
    assert_eq!(normalize(&joined).as_ref(), Ok(&path), "idempotent: {raw:?}");
    assert!(joined.is_empty() || is_normal(&joined), "{raw:?}");
    let uri: http::Uri = format!("http://127.0.0.1/{joined}").parse().expect("a normal path is a valid URL path");
    assert_eq!(uri.path().trim_start_matches('/'), joined);
});
