//! Team budgets: one cap per period shared by many capitd instances (laptops, CI runners,
//! servers) through a Postgres database that holds only money, leases, ledger copies and
//! membership. Master keys never leave their machine.
//!
//! Each daemon is a *member* of a *pool*. It leases room from the pool in one short
//! transaction (the raise succeeds only if the pool's spend, every member's lease and the raise
//! fit the cap), admits locally against that lease with no round trip per request, and reports
//! settled spend back in batches (spend up, lease down, ledger rows appended, in one
//! transaction, idempotent by each row's local ledger sequence number). A lease carries an
//! expiry: a member that stops renewing has it charged as spend when it expires (a *credit* that
//! its later reports draw on first), so the pool never waits on a dead laptop, and a member that
//! returns reconciles against what was charged for it without counting anything twice.
//!
//! Layout: [`account`] is the money (pure, unit-tested); [`url`] the connection string, checked;
//! [`pg`] the only module that knows tokio-postgres (migrations and the transactions);
//! [`member`] a member's runtime (its [`crate::lease::LeaseSource`], reports, renewals);
//! [`pool_lease`] the pool's lease book on this daemon, which admission takes holds under;
//! [`service`] the memberships of this daemon, for the control API.

pub mod account;
pub mod member;
pub mod pg;
pub mod pool_lease;
pub mod service;
pub mod url;

use std::str::FromStr;

use rust_decimal::Decimal;

use crate::grants::{Period, Window};

#[derive(Debug, thiserror::Error)]
pub enum TeamError {
    #[error("{0}")]
    Invalid(String),
    #[error("the team database cannot be reached: {0}")]
    Unreachable(String),
    #[error("team database: {0}")]
    Database(String),
    #[error("no pool named {0:?} in that database; make it with: capitctl team create {0} AMOUNT --db URL")]
    UnknownPool(String),
    #[error("a pool named {0:?} already exists in that database; join it with: capitctl team join {0} --db URL")]
    PoolExists(String),
    #[error("this capitd is not a member of pool {0:?}; join it with: capitctl team join {0} --db URL")]
    NotJoined(String),
    #[error("this capitd is already a member of pool {0:?}")]
    AlreadyJoined(String),
    #[error("the team database has schema version {found}, newer than this capitd knows ({known}); upgrade capit on this machine")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("a money figure would overflow")]
    Overflow,
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
}

/// A pool name: what `team create` names and `grant --team` refers to.
pub fn validate_pool_name(name: &str) -> Result<(), TeamError> {
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(TeamError::Invalid(format!("{name:?} is not a pool name: use 1 to 64 letters, digits, '.', '-' or '_'"))) }
}

/// An IANA time zone name, checked (`Europe/Berlin`, `UTC`).
pub fn parse_time_zone(name: &str) -> Result<chrono_tz::Tz, TeamError> {
    chrono_tz::Tz::from_str(name.trim())
        .map_err(|_| TeamError::Invalid(format!("{name:?} is not a time zone name such as UTC, Europe/Berlin or America/New_York")))
}

/// The IANA name of this machine's time zone, or UTC where it cannot be told.
pub fn local_time_zone() -> String {
    iana_time_zone::get_timezone().ok().filter(|name| parse_time_zone(name).is_ok()).unwrap_or_else(|| "UTC".to_string())
}

/// What a pool is: its cap per period, in one time zone, and how long a member's lease lasts
/// without renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub cap: Decimal,
    pub period: Period,
    pub time_zone: String,
    pub lease_seconds: u32,
}

/// How long a lease lasts without renewal, unless `team create --lease-ttl` says otherwise. A
/// dead member's room comes back this long after it stopped.
pub const DEFAULT_LEASE_SECONDS: u32 = 60;

impl PoolSpec {
    /// The pool's spend window containing `at` (Unix seconds), in the pool's own time zone.
    pub fn window(&self, at: i64) -> Window {
        pool_window(self.period, &self.time_zone, at)
    }

    pub fn validate(&self) -> Result<(), TeamError> {
        validate_pool_name(&self.name)?;
        parse_time_zone(&self.time_zone)?;
        if self.cap.is_sign_negative() {
            return Err(TeamError::Invalid("a pool's cap cannot be negative".into()));
        }
        if !(2..=86_400).contains(&self.lease_seconds) {
            return Err(TeamError::Invalid("a lease lasts from 2 seconds to a day (--lease-ttl)".into()));
        }
        Ok(())
    }
}

/// The spend window of `period` containing `at`, in time zone `zone` (UTC if it is unknown).
pub fn pool_window(period: Period, zone: &str, at: i64) -> Window {
    use chrono::TimeZone;
    let tz = parse_time_zone(zone).unwrap_or(chrono_tz::UTC);
    match tz.timestamp_opt(at, 0).single() {
        Some(local) => period.window(&local),
        None => Window { start: 0, end: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp()
    }

    #[track_caller]
    fn check(period: Period, zone: &str, when: &str, start: &str, end: Option<&str>) {
        let window = pool_window(period, zone, at(when));
        assert_eq!(window, Window { start: at(start), end: end.map(at) }, "{period:?} {zone} {when}");
    }

    #[test]
    fn windows_follow_the_pools_own_time_zone() {
        check(Period::Day, "UTC", "2026-03-10T23:30:00Z", "2026-03-10T00:00:00Z", Some("2026-03-11T00:00:00Z"));
        // 23:30 UTC is already the 11th in Berlin (UTC+1 in March).
        check(Period::Day, "Europe/Berlin", "2026-03-10T23:30:00Z", "2026-03-11T00:00:00+01:00", Some("2026-03-12T00:00:00+01:00"));
        // The day the clocks go forward in New York has 23 hours.
        check(Period::Day, "America/New_York", "2026-03-08T12:00:00-04:00", "2026-03-08T00:00:00-05:00", Some("2026-03-09T00:00:00-04:00"));
        check(Period::Week, "UTC", "2026-03-11T08:00:00Z", "2026-03-09T00:00:00Z", Some("2026-03-16T00:00:00Z"));
        check(Period::Month, "Asia/Tokyo", "2026-02-28T16:00:00Z", "2026-03-01T00:00:00+09:00", Some("2026-04-01T00:00:00+09:00"));
        check(Period::Total, "UTC", "2026-03-11T08:00:00Z", "1970-01-01T00:00:00Z", None);
    }

    #[test]
    fn names_and_zones_are_checked() {
        assert!(validate_pool_name("eng-team.1").is_ok());
        assert!(validate_pool_name("").is_err());
        assert!(validate_pool_name("a b").is_err());
        assert!(parse_time_zone("Europe/Berlin").is_ok());
        assert!(parse_time_zone("Mars/Olympus").is_err());
        let spec = PoolSpec { name: "eng".into(), cap: Decimal::TEN, period: Period::Month, time_zone: "UTC".into(), lease_seconds: 1 };
        assert!(spec.validate().is_err(), "a lease of one second is too short to renew");
    }
}
