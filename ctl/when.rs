//! Times on the command line (`7d`, `2026-12-31`, RFC 3339), read by the library's `when`
//! module, which access requests share.

/// An expiry: a duration from `now`, the end of a date, or an instant.
pub fn parse_expiry(text: &str, now: i64) -> anyhow::Result<i64> {
    capit::when::parse_expiry(text, now).map_err(anyhow::Error::msg)
}

/// A start time: a duration before `now`, the start of a date, or an instant.
pub fn parse_since(text: &str, now: i64) -> anyhow::Result<i64> {
    capit::when::parse_since(text, now).map_err(anyhow::Error::msg)
}
