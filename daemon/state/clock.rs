//! The daemon's time, and the spend window of a period in the user's local time zone.

use super::*;

/// The daemon's time: the system clock plus an offset that is zero in the daemon and that
/// tests advance to cross period boundaries and expiries without waiting.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now_millis(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn now_seconds(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }

    /// Moves this clock (and every `State` sharing it) forward.
    pub fn advance(&self, by: std::time::Duration) {
        self.offset_ms.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// The spend window of `period` containing `at` in the user's local time zone.
pub fn local_window(period: Period, at: i64) -> Window {
    use chrono::TimeZone;
    match chrono::Local.timestamp_opt(at, 0).single() {
        Some(local) => period.window(&local),
        None => Window { start: 0, end: None },
    }
}
