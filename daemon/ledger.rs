//! The ledger: one entry per metered request, the source of truth for spend.
//!
//! Invariant: a grant's spend in a window is the sum of its entries' costs in that window. The
//! store keeps a running [`Totals`] per (grant, window start), updated in the same transaction
//! as each entry, so reading a spend never scans the ledger; [`Totals::add`] is the only place
//! entries are summed, for the running totals and for `capitctl usage` alike.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::grants::GrantId;
use crate::usage::Usage;

/// How an entry's cost was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryStatus {
    /// Metered from the usage the provider reported.
    Metered,
    /// The provider's usage never arrived (a stream cut short); the cost is an estimate from
    /// what was seen.
    Estimated,
    /// The upstream answered with an error status; nothing was generated or billed.
    UpstreamError,
    /// The daemon stopped while the request was in flight; charged at its reservation.
    Interrupted,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Metered => "metered",
            EntryStatus::Estimated => "estimated",
            EntryStatus::UpstreamError => "upstream_error",
            EntryStatus::Interrupted => "interrupted",
        }
    }
}

/// One metered request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub grant: GrantId,
    /// When the request settled, Unix milliseconds.
    pub at_ms: i64,
    /// The model that was priced (the response's, when it named one).
    pub model: String,
    /// Which API, e.g. `chat.completions`.
    pub api: String,
    pub usage: Usage,
    pub cost: Decimal,
    pub status: EntryStatus,
    /// The upstream's HTTP status.
    pub http_status: u16,
    /// An error the upstream reported, in a few words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LedgerEntry {
    pub fn at_seconds(&self) -> i64 {
        self.at_ms.div_euclid(1000)
    }
}

/// Sums of entries: a grant's running totals for a window, or a row of a usage report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub spent: Decimal,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub estimated: u64,
    pub errors: u64,
    /// Requests refused, by reason (they cost nothing and have no entry of their own).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// A sum that would pass what a decimal holds; the entry is refused, never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the spend total would overflow")]
pub struct TotalsOverflow;

impl Totals {
    /// Adds an entry, all or nothing: a spend that would overflow leaves the totals as they were.
    pub fn add(&mut self, entry: &LedgerEntry) -> Result<(), TotalsOverflow> {
        self.spent = self.spent.checked_add(entry.cost).ok_or(TotalsOverflow)?;
        self.requests += 1;
        let u = &entry.usage;
        self.input_tokens = self.input_tokens.saturating_add(u.input_tokens);
        self.cached_input_tokens = self.cached_input_tokens.saturating_add(u.cached_input_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(u.cache_write_tokens());
        self.output_tokens = self.output_tokens.saturating_add(u.output_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(u.reasoning_tokens);
        match entry.status {
            EntryStatus::Estimated | EntryStatus::Interrupted => self.estimated += 1,
            EntryStatus::UpstreamError => self.errors += 1,
            EntryStatus::Metered => {}
        }
        Ok(())
    }

    pub fn count_refusal(&mut self, reason: &str) {
        let n = self.refused.entry(reason.to_string()).or_default();
        *n = n.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_entries_exactly() {
        let entry = |cost: &str, status| LedgerEntry {
            grant: GrantId(1),
            at_ms: 1_000,
            model: "gpt-5".into(),
            api: "chat.completions".into(),
            usage: Usage { input_tokens: 10, cached_input_tokens: 4, output_tokens: 5, ..Usage::default() },
            cost: cost.parse().unwrap(),
            status,
            http_status: 200,
            error: None,
        };
        let mut t = Totals::default();
        for _ in 0..3 {
            t.add(&entry("0.1", EntryStatus::Metered)).unwrap();
        }
        t.add(&entry("0", EntryStatus::UpstreamError)).unwrap();
        t.add(&entry("0.000001", EntryStatus::Estimated)).unwrap();
        assert_eq!(t.spent, "0.300001".parse().unwrap());
        assert_eq!((t.requests, t.input_tokens, t.cached_input_tokens, t.output_tokens), (5, 50, 20, 25));
        assert_eq!((t.estimated, t.errors), (1, 1));
        let before = t.clone();
        let huge = LedgerEntry { cost: rust_decimal::Decimal::MAX, ..entry("0", EntryStatus::Metered) };
        assert_eq!(t.add(&huge), Ok(()), "the first huge figure still fits");
        assert_eq!(t.add(&huge), Err(TotalsOverflow), "the second would overflow");
        assert_eq!(t.requests, before.requests + 1, "and changes nothing");
    }
}
