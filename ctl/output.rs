//! How capitctl prints: aligned tables and sentences for people, one JSON document for scripts.

use serde_json::Value;

/// Prints rows as columns, the first row being the header.
pub fn table(rows: &[Vec<String>]) {
    let Some(first) = rows.first() else { return };
    let mut widths = vec![0; first.len()];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}

/// Error messages on one line, as the exit-code contract promises.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Unix seconds as an RFC 3339 UTC time for JSON, `null` when unset (0).
pub fn time_json(at: i64) -> Value {
    if at <= 0 {
        return Value::Null;
    }
    chrono::DateTime::from_timestamp(at, 0).map_or(Value::Null, |t| Value::String(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

/// Unix seconds as a local date (and time when not midnight) for people; "-" when unset.
pub fn time_human(at: i64) -> String {
    if at <= 0 { "-".to_string() } else { capit::grants::format_time(at) }
}

/// A money string from the daemon, shown with a dollar sign and at least two decimals.
pub fn dollars(text: &str) -> String {
    match text.parse::<rust_decimal::Decimal>() {
        Ok(d) => format!("${}", capit::grants::money(d)),
        Err(_) => format!("${text}"),
    }
}

/// Money for a glance (the live view): cents from a dollar up, else four decimals; exact
/// figures are in `--json` and `usage`.
pub fn dollars_short(text: &str) -> String {
    let Ok(amount) = text.parse::<rust_decimal::Decimal>() else { return format!("${text}") };
    if amount.abs() >= rust_decimal::Decimal::ONE || amount.is_zero() {
        return format!("${:.2}", amount.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero));
    }
    let rounded = amount.round_dp_with_strategy(4, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    if rounded.is_zero() { "<$0.0001".to_string() } else { format!("${}", capit::grants::money(rounded)) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_dollars_round_for_a_glance() {
        use super::dollars_short;
        assert_eq!(dollars_short("12.345"), "$12.35");
        assert_eq!(dollars_short("0.0382855"), "$0.0383");
        assert_eq!(dollars_short("0.00001"), "<$0.0001");
        assert_eq!(dollars_short("0"), "$0.00");
        assert_eq!(dollars_short("0.5"), "$0.50");
    }
}
