//! Request paths as the route allowlist sees them: percent-decoded and normalised before any
//! matching, so that the path capit matches is exactly the path that goes upstream.
//!
//! Invariant: a path [`normalize`] accepts has no dot segment (`.`, `..`), no encoded slash,
//! backslash, `%`, `;`, `?` or `#`, no control, space or non-ASCII character, and no empty
//! segment. Every character left is one a URL path carries as it is, so the decoded form is also
//! the canonical encoded form: an upstream that decodes it sees the very segments that were
//! matched. A path with anything else is refused, never repaired.

use std::fmt;

/// A normalised path: its segments, decoded, none of them empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalPath {
    segments: Vec<String>,
}

impl NormalPath {
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The segments joined by `/`, without a leading one: what the allowlist matches and, as every
    /// character in it is a plain path character, what is forwarded.
    pub fn joined(&self) -> String {
        self.segments.join("/")
    }
}

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// A `.` or `..` segment, written plainly or percent-encoded.
    DotSegment,
    /// A `/` or `\` hidden in a segment as `%2F` or `%5C`.
    EncodedSlash,
    /// A character no API path of ours needs (a control or non-ASCII character, space, `%`, `;`,
    /// `?`, `#`, quotes, brackets), plainly or encoded.
    Character(u8),
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::BadEscape => f.write_str("it has a malformed percent escape"),
            PathError::DotSegment => f.write_str("it has a dot segment (. or ..)"),
            PathError::EncodedSlash => f.write_str("it has an encoded slash or backslash"),
            PathError::Character(b) if b.is_ascii_graphic() => write!(f, "it has the character {:?}", *b as char),
            PathError::Character(b) => write!(f, "it has the byte 0x{b:02x}"),
        }
    }
}

/// True for the bytes a decoded segment may hold: RFC 3986 `pchar` less `%` and `;`, all of
/// which a path carries unencoded.
fn plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,=".contains(&byte)
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Decodes and checks one raw segment.
fn segment(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = if bytes[i] == b'%' {
            let high = bytes.get(i + 1).copied().and_then(hex).ok_or(PathError::BadEscape)?;
            let low = bytes.get(i + 2).copied().and_then(hex).ok_or(PathError::BadEscape)?;
            i += 3;
            let decoded = high << 4 | low;
            if decoded == b'/' || decoded == b'\\' {
                return Err(PathError::EncodedSlash);
            }
            decoded
        } else {
            i += 1;
            bytes[i - 1]
        };
        if !plain(byte) {
            return Err(PathError::Character(byte));
        }
        out.push(byte as char);
    }
    if out == "." || out == ".." {
        return Err(PathError::DotSegment);
    }
    Ok(out)
}

/// Decodes and checks a request path (`Uri::path`, without the query). Empty segments (`//`, a
/// trailing `/`) are dropped; everything else that is not a plain segment is refused.
pub fn normalize(raw: &str) -> Result<NormalPath, PathError> {
    let segments = raw.split('/').filter(|s| !s.is_empty()).map(segment).collect::<Result<Vec<_>, _>>()?;
    Ok(NormalPath { segments })
}

/// True when `path` (segments joined by `/`, one trailing `/` allowed) is already normal: every
/// segment non-empty and plain. The route allowlist refuses anything else, whoever calls it.
pub fn is_normal(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    !path.is_empty() && path.split('/').all(|s| !s.is_empty() && s != "." && s != ".." && s.bytes().all(plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(raw: &str, expected: Result<&str, PathError>) {
        assert_eq!(normalize(raw).map(|p| p.joined()).as_deref().map_err(|e| *e), expected, "{raw}");
    }

    #[test]
    fn plain_paths_pass_as_they_are() {
        check("/openai/v1/chat/completions", Ok("openai/v1/chat/completions"));
        check(
            "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            Ok("gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
        );
        check("/openai/v1/models/ft:gpt-4o-mini:org:custom:abc123", Ok("openai/v1/models/ft:gpt-4o-mini:org:custom:abc123"));
        check("/ollama/v1/models/llama3.1:8b", Ok("ollama/v1/models/llama3.1:8b"));
    }

    #[test]
    fn empty_segments_are_dropped() {
        check("/openai//v1/models/", Ok("openai/v1/models"));
        check("/", Ok(""));
    }

    #[test]
    fn escapes_are_decoded_before_matching() {
        check("/openai/v1/mod%65ls", Ok("openai/v1/models"));
        check("/openai/v1/models/gpt%2D5", Ok("openai/v1/models/gpt-5"));
    }

    #[test]
    fn dot_segments_and_encoded_slashes_are_refused() {
        check("/openai/v1/models/..%2F..%2Fv1%2Ffiles%2Ffile-abc%2Fcontent", Err(PathError::EncodedSlash));
        check("/openai/v1/models/../files", Err(PathError::DotSegment));
        check("/openai/v1/models/%2e%2e", Err(PathError::DotSegment));
        check("/openai/v1/models/%2E", Err(PathError::DotSegment));
        check("/openai/v1/./models", Err(PathError::DotSegment));
        check("/openai/v1/models/a%5Cb", Err(PathError::EncodedSlash));
        check("/openai/v1/models/a%2fb", Err(PathError::EncodedSlash));
    }

    #[test]
    fn odd_characters_and_bad_escapes_are_refused() {
        check("/openai/v1/models/a%", Err(PathError::BadEscape));
        check("/openai/v1/models/a%2", Err(PathError::BadEscape));
        check("/openai/v1/models/a%zz", Err(PathError::BadEscape));
        check("/openai/v1/models/a%252e", Err(PathError::Character(b'%')));
        check("/openai/v1/models/..;", Err(PathError::Character(b';')));
        check("/openai/v1/models/a%3Fb", Err(PathError::Character(b'?')));
        check("/openai/v1/models/a%23b", Err(PathError::Character(b'#')));
        check("/openai/v1/models/a%00b", Err(PathError::Character(0)));
        check("/openai/v1/models/a%20b", Err(PathError::Character(b' ')));
        check("/openai/v1/models/%C3%A9", Err(PathError::Character(0xc3)));
        check("/openai/v1/models/\u{e9}", Err(PathError::Character(0xc3)));
    }

    #[test]
    fn normal_means_what_normalize_would_keep() {
        assert!(is_normal("v1/models/gpt-5"));
        assert!(is_normal("v1/models/"));
        assert!(!is_normal("v1/models/.."));
        assert!(!is_normal("v1//models"));
        assert!(!is_normal("v1/models/a%2Fb"));
        assert!(!is_normal(""));
    }
}
