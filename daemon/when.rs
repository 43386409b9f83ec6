//! Times as people and scripts write them: durations (`7d`, `12h`, `30m`, `2w`), dates
//! (`2026-12-31`, in local time) and RFC 3339 instants, turned into Unix seconds. Used by
//! capitctl's flags and by access requests, which name an expiry the same way.

use chrono::{DateTime, Local, NaiveDate, TimeZone};

fn duration_seconds(text: &str) -> Option<i64> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = digits.parse().ok()?;
    let unit = match unit {
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(unit)
}

fn local_midnight(date: NaiveDate) -> Result<i64, String> {
    let naive = date.and_hms_opt(0, 0, 0).ok_or("invalid date")?;
    Ok(Local.from_local_datetime(&naive).earliest().ok_or("that local time does not exist")?.timestamp())
}

/// An expiry: a duration from `now`, the end of a date, or an instant.
pub fn parse_expiry(text: &str, now: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Some(secs) = duration_seconds(text) {
        if secs <= 0 {
            return Err(format!("expiry {text:?} must be in the future"));
        }
        return now.checked_add(secs).ok_or_else(|| format!("expiry {text:?} is too far away"));
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let next = date.succ_opt().ok_or("date out of range")?;
        return local_midnight(next);
    }
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Ok(instant.timestamp());
    }
    Err(format!("cannot read expiry {text:?}; use 7d, 12h, 2026-12-31 or an RFC 3339 time"))
}

/// A start time: a duration before `now`, the start of a date, or an instant.
pub fn parse_since(text: &str, now: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Some(secs) = duration_seconds(text) {
        return Ok(now.saturating_sub(secs));
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return local_midnight(date);
    }
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Ok(instant.timestamp());
    }
    Err(format!("cannot read time {text:?}; use 7d, 2026-11-01 or an RFC 3339 time"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries() {
        assert_eq!(parse_expiry("7d", 100).unwrap(), 100 + 7 * 86_400);
        assert_eq!(parse_expiry("12h", 0).unwrap(), 43_200);
        assert_eq!(parse_expiry("2026-12-31T00:00:00Z", 0).unwrap(), 1_798_675_200);
        let end = parse_expiry("2026-12-31", 0).unwrap();
        assert_eq!(end, local_midnight(NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()).unwrap());
        assert!(parse_expiry("soon", 0).is_err());
        assert!(parse_expiry("0d", 0).is_err());
        assert!(parse_expiry("99999999999999999w", 0).is_err());
        assert_eq!(parse_since("1d", 86_400).unwrap(), 0);
    }
}
