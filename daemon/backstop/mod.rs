//! Provider-side caps: a key of the provider's own, made for one grant with a spending limit,
//! so that the provider enforces the grant's cap as a second lock (OpenRouter's key-management
//! API; see `openrouter`). capitd forwards the grant's traffic with that key, or, for a direct
//! grant, hands the key to the agent itself.
//!
//! This module is the pure part: what limit a key must have, how a grant's period maps onto the
//! provider's resets, what a replaced key's usage carries over, how keys are named, and when the
//! provider's figures and capit's ledger disagree. [`service`] does the calls and keeps the keys
//! in step with the grants.
//!
//! Periods: OpenRouter resets a key's limit at midnight UTC (`daily`), on Monday at midnight UTC
//! (`weekly`) and on the 1st at midnight UTC (`monthly`); capit's own windows follow local time.
//! A grant's period maps to the provider's reset of the same name, so the provider's window is
//! the local one shifted by the local UTC offset; both caps hold, and near a boundary the tighter
//! of the two applies. A `total` cap has no reset. A direct grant, which only the provider caps,
//! is reported in the provider's (UTC) window.

pub mod openrouter;
pub mod service;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::grants::{GrantId, Period, Window};
use crate::secret::Secret;

/// The provider's key for one grant, as capit keeps it (in the 0600 database, with the grant).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderKey {
    /// The provider's id for the key (OpenRouter's `hash`), used to change and delete it.
    pub hash: String,
    /// The name capit gave it (see [`key_name`]).
    pub name: String,
    /// The key itself: what the proxy forwards with, or what a direct grant's agent holds.
    pub secret: Secret,
    /// The limit last set on the provider's side, in USD.
    pub limit: Decimal,
    /// The period the limit resets with (`None`: never, a total cap).
    pub reset: Option<Period>,
    pub expires_at: Option<i64>,
    pub created_at_ms: i64,
    /// Spend of the keys this one replaced (a rotation, a new expiry), counted against the cap
    /// until `carried_until`: a new key starts at zero usage, so its limit is lowered by what the
    /// grant already spent in the current window.
    #[serde(default)]
    pub carried: Decimal,
    /// When the carried spend stops counting (the end of the provider's window); `None` with a
    /// carried amount means for good (a total cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_until: Option<i64>,
    /// Hashes of keys this one replaced whose deletion on the provider's side is still pending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
}

impl ProviderKey {
    /// The replaced keys' spend still counted at `now`.
    pub fn carried_at(&self, now: i64) -> Decimal {
        match self.carried_until {
            Some(until) if now >= until => Decimal::ZERO,
            _ => self.carried,
        }
    }

    /// The limit the key must have at `now` for a grant capped at `cap`: the cap, less what the
    /// keys it replaced spent in the current window; never below zero.
    pub fn desired_limit(&self, cap: Decimal, now: i64) -> Decimal {
        (cap - self.carried_at(now)).max(Decimal::ZERO)
    }
}

/// OpenRouter's `limit_reset` for a grant's period.
pub fn limit_reset(period: Option<Period>) -> Option<&'static str> {
    match period? {
        Period::Day => Some("daily"),
        Period::Week => Some("weekly"),
        Period::Month => Some("monthly"),
        Period::Total => None,
    }
}

/// The period a grant's provider key resets with: its own, or none for a total cap.
pub fn reset_of(period: Period) -> Option<Period> {
    (period != Period::Total).then_some(period)
}

/// The provider's window of `period` containing `at`: the same calendar rule as capit's own
/// windows, in UTC (days from midnight UTC, weeks from Monday, months from the 1st).
pub fn utc_window(period: Period, at: i64) -> Window {
    match Utc.timestamp_opt(at, 0).single() {
        Some(now) => period.window(&now),
        None => Window { start: 0, end: None },
    }
}

/// What carries over to a key replacing `old`: the spend the old key's limit was already
/// counting in the current window (its carried part and its own usage there), counted until the
/// window ends.
pub fn carry_over(old: &ProviderKey, old_usage_in_window: Decimal, period: Period, now: i64) -> (Decimal, Option<i64>) {
    let carried = old.carried_at(now) + old_usage_in_window.max(Decimal::ZERO);
    match reset_of(period) {
        Some(period) => (carried, utc_window(period, now).end),
        None => (carried, None),
    }
}

/// Names capit gives the keys it makes, so that a listing tells them apart from the user's own:
/// `capit:<grant>#<id>@<installation>`.
pub fn key_name(grant: &str, id: GrantId, installation: &str) -> String {
    format!("capit:{grant}#{}@{installation}", id.0)
}

/// Whose a key is, by its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOwner {
    /// Made by this capit for grant id `.0`.
    Ours(GrantId),
    /// Made by another capit installation (another machine, another home).
    OtherCapit(String),
    /// Not made by capit.
    NotCapit,
}

pub fn key_owner(name: &str, installation: &str) -> KeyOwner {
    let Some(rest) = name.strip_prefix("capit:") else { return KeyOwner::NotCapit };
    let Some((grant, install)) = rest.rsplit_once('@') else { return KeyOwner::NotCapit };
    let Some((_, id)) = grant.rsplit_once('#') else { return KeyOwner::NotCapit };
    match id.parse::<u64>() {
        Ok(id) if install == installation => KeyOwner::Ours(GrantId(id)),
        Ok(_) => KeyOwner::OtherCapit(install.to_string()),
        Err(_) => KeyOwner::NotCapit,
    }
}

/// A key's figures as the provider reports them (`GET /api/v1/key`, or one entry of the list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub limit: Option<Decimal>,
    pub limit_remaining: Option<Decimal>,
    pub reset: Option<Period>,
    /// Over the key's life.
    pub usage: Decimal,
    /// In the current UTC day, week (from Monday) and month.
    pub usage_daily: Decimal,
    pub usage_weekly: Decimal,
    pub usage_monthly: Decimal,
    pub expires_at: Option<i64>,
}

impl KeyUsage {
    /// The key's usage in the provider's current window of `period` (its life for `total`).
    pub fn in_window(&self, period: Period) -> Decimal {
        match period {
            Period::Day => self.usage_daily,
            Period::Week => self.usage_weekly,
            Period::Month => self.usage_monthly,
            Period::Total => self.usage,
        }
    }
}

/// How far the provider's bill for a key is from capit's ledger for the same requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub provider: Decimal,
    pub ledger: Decimal,
    /// `provider - ledger`: positive when the provider billed more than capit metered.
    pub difference: Decimal,
    /// Beyond what rounding and requests still settling explain.
    pub drifted: bool,
}

/// A difference below both of these is noise: the provider reports floats, and a request can
/// be billed there a moment before capit settles it.
const DRIFT_TOLERANCE_USD: Decimal = Decimal::from_parts(1, 0, 0, false, 2);
const DRIFT_TOLERANCE_SHARE: Decimal = Decimal::from_parts(1, 0, 0, false, 2);

pub fn drift(provider: Decimal, ledger: Decimal) -> Drift {
    let difference = provider - ledger;
    let larger = provider.abs().max(ledger.abs());
    let drifted = difference.abs() > DRIFT_TOLERANCE_USD && difference.abs() > larger * DRIFT_TOLERANCE_SHARE;
    Drift { provider, ledger, difference, drifted }
}

/// An instant as OpenRouter takes it: ISO 8601 in UTC, `2027-12-31T23:59:59Z`.
pub fn format_utc(at: i64) -> String {
    match DateTime::<Utc>::from_timestamp(at, 0) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => "1970-01-01T00:00:00Z".to_string(),
    }
}

/// An ISO 8601 / RFC 3339 instant from a reply.
pub fn parse_utc(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text.trim()).ok().map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn key(carried: &str, carried_until: Option<i64>) -> ProviderKey {
        ProviderKey {
            hash: "h".into(),
            name: "n".into(),
            secret: Secret::new("sk-or-v1-x".into()),
            limit: dec("5"),
            reset: Some(Period::Month),
            expires_at: None,
            created_at_ms: 0,
            carried: dec(carried),
            carried_until,
            retired: vec![],
        }
    }

    #[test]
    fn periods_map_to_the_provider_resets_in_utc() {
        assert_eq!(limit_reset(reset_of(Period::Day)), Some("daily"));
        assert_eq!(limit_reset(reset_of(Period::Week)), Some("weekly"));
        assert_eq!(limit_reset(reset_of(Period::Month)), Some("monthly"));
        assert_eq!(limit_reset(reset_of(Period::Total)), None);
        // Wednesday 2026-11-25 15:00 UTC: the UTC week began on Monday the 23rd at 00:00 UTC.
        let at = 1_795_618_800;
        assert_eq!(format_utc(at), "2026-11-25T15:00:00Z");
        let week = utc_window(Period::Week, at);
        assert_eq!(
            (format_utc(week.start), week.end.map(format_utc)),
            ("2026-11-23T00:00:00Z".into(), Some("2026-11-30T00:00:00Z".into()))
        );
        let month = utc_window(Period::Month, at);
        assert_eq!(
            (format_utc(month.start), month.end.map(format_utc)),
            ("2026-11-01T00:00:00Z".into(), Some("2026-12-01T00:00:00Z".into()))
        );
        assert_eq!(utc_window(Period::Day, at).start, parse_utc("2026-11-25T00:00:00Z").unwrap());
        assert_eq!(parse_utc("2027-12-31T23:59:59+00:00"), parse_utc("2027-12-31T23:59:59Z"));
    }

    #[test]
    fn a_replaced_key_carries_its_window_spend_until_the_window_ends() {
        let at = 1_795_618_800; // 2026-11-25 15:00 UTC
        let old = key("0", None);
        let (carried, until) = carry_over(&old, dec("1.25"), Period::Month, at);
        assert_eq!((carried, until), (dec("1.25"), parse_utc("2026-12-01T00:00:00Z")));
        let new = ProviderKey { carried, carried_until: until, ..key("0", None) };
        assert_eq!(new.desired_limit(dec("5"), at), dec("3.75"));
        assert_eq!(new.desired_limit(dec("5"), until.unwrap()), dec("5"), "the next window gets the whole cap");
        assert_eq!(new.desired_limit(dec("1"), at), Decimal::ZERO, "never below zero");
        // A second replacement in the same window adds to what the first carried.
        let (again, _) = carry_over(&new, dec("0.5"), Period::Month, at + 60);
        assert_eq!(again, dec("1.75"));
        // A total cap carries for good.
        let (total, forever) = carry_over(&old, dec("2"), Period::Total, at);
        assert_eq!((total, forever), (dec("2"), None));
        assert_eq!(key("2", None).desired_limit(dec("5"), i64::MAX), dec("3"));
    }

    #[test]
    fn key_names_say_whose_a_key_is() {
        let name = key_name("claude", GrantId(7), "a1b2c3d4");
        assert_eq!(name, "capit:claude#7@a1b2c3d4");
        assert_eq!(key_owner(&name, "a1b2c3d4"), KeyOwner::Ours(GrantId(7)));
        assert_eq!(key_owner(&name, "zzzz"), KeyOwner::OtherCapit("a1b2c3d4".into()));
        assert_eq!(key_owner("my laptop key", "a1b2c3d4"), KeyOwner::NotCapit);
        assert_eq!(key_owner("capit:x#y@a1b2c3d4", "a1b2c3d4"), KeyOwner::NotCapit);
        assert_eq!(key_owner(&key_name("a#b@c", GrantId(1), "i"), "i"), KeyOwner::Ours(GrantId(1)));
    }

    #[test]
    fn drift_beyond_noise() {
        assert!(!drift(dec("1.004"), dec("1.000")).drifted, "a rounding difference");
        assert!(!drift(dec("100.5"), dec("100")).drifted, "within 1% of a large figure");
        let d = drift(dec("1.2"), dec("0.003"));
        assert!(d.drifted);
        assert_eq!(d.difference, dec("1.197"));
        assert!(drift(dec("0"), dec("0.5")).drifted, "capit metered more than the provider billed");
    }
}
