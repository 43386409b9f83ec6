//! Decoding a copy of a compressed reply for metering.
//!
//! The proxy asks upstreams for `identity`; one that compresses anyway has its bytes forwarded
//! untouched under its own headers, while the meter reads a decoded copy. Supported: gzip,
//! deflate (zlib) and br. Anything else cannot be read, and the request is charged an estimate.

use std::io::Write;

pub enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    /// A coding we cannot read, or a stream that broke: nothing more is decoded.
    Failed,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Gzip(_) => "Decoder::Gzip",
            Decoder::Deflate(_) => "Decoder::Deflate",
            Decoder::Brotli(_) => "Decoder::Brotli",
            Decoder::Failed => "Decoder::Failed",
        })
    }
}

impl Decoder {
    /// The decoder for a `Content-Encoding` value; `None` for identity (no decoding needed).
    pub fn for_encoding(encoding: &str) -> Option<Decoder> {
        match encoding.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => None,
            "gzip" | "x-gzip" => Some(Decoder::Gzip(flate2::write::MultiGzDecoder::new(Vec::new()))),
            "deflate" => Some(Decoder::Deflate(flate2::write::ZlibDecoder::new(Vec::new()))),
            "br" => Some(Decoder::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(Vec::new(), 4096)))),
            _ => Some(Decoder::Failed),
        }
    }

    /// Decodes one chunk; returns the bytes it completed (possibly none).
    pub fn decode(&mut self, chunk: &[u8]) -> Vec<u8> {
        let result = match self {
            Decoder::Gzip(d) => d.write_all(chunk).and_then(|_| d.flush()).map(|_| std::mem::take(d.get_mut())),
            Decoder::Deflate(d) => d.write_all(chunk).and_then(|_| d.flush()).map(|_| std::mem::take(d.get_mut())),
            Decoder::Brotli(d) => d.write_all(chunk).and_then(|_| d.flush()).map(|_| std::mem::take(d.get_mut())),
            Decoder::Failed => return Vec::new(),
        };
        result.unwrap_or_else(|_| {
            *self = Decoder::Failed;
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_decodes_across_any_split() {
        let text = b"data: {\"usage\":{\"prompt_tokens\":5}}\n\ndata: [DONE]\n\n".repeat(20);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&text).unwrap();
        let compressed = encoder.finish().unwrap();
        for size in [1, 7, 64, compressed.len()] {
            let mut decoder = Decoder::for_encoding("gzip").unwrap();
            let out: Vec<u8> = compressed.chunks(size).flat_map(|c| decoder.decode(c)).collect();
            assert_eq!(out, text, "chunks of {size}");
        }
    }

    #[test]
    fn unknown_codings_and_garbage_fail_quietly() {
        assert!(Decoder::for_encoding("identity").is_none());
        let mut zstd = Decoder::for_encoding("zstd").unwrap();
        assert!(zstd.decode(b"anything").is_empty());
        let mut gzip = Decoder::for_encoding("gzip").unwrap();
        assert!(gzip.decode(b"not gzip at all").is_empty());
        assert!(matches!(gzip, Decoder::Failed));
    }
}
