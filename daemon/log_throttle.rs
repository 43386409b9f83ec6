//! A log line that may repeat at the rate of its cause (a failing accept, a client retrying a
//! refused request) is let through at most once per interval, with a count of what was held
//! back, so that no condition can flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogThrottle {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> LogThrottle {
        LogThrottle { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(n)` when the line may be logged now, `n` being how many were held back since the
    /// last one; `None` when it must be held back (and is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let held = state.1;
                *state = (Some(now), 0);
                Some(held)
            }
        }
    }
}

/// A [`LogThrottle`] per key (such as a grant and a reason), each made on first use.
pub struct KeyedLogThrottle<K> {
    interval: Duration,
    throttles: Mutex<std::collections::HashMap<K, (Instant, u64)>>,
}

impl<K: std::hash::Hash + Eq> KeyedLogThrottle<K> {
    pub fn new(interval: Duration) -> KeyedLogThrottle<K> {
        KeyedLogThrottle { interval, throttles: Mutex::new(std::collections::HashMap::new()) }
    }

    /// As [`LogThrottle::allow`], for the line of `key`.
    pub fn allow(&self, key: K) -> Option<u64> {
        let now = Instant::now();
        let mut throttles = self.throttles.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match throttles.get_mut(&key) {
            Some((last, held)) if now.duration_since(*last) < self.interval => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let count = *held;
                (*last, *held) = (now, 0);
                Some(count)
            }
            None => {
                throttles.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count_of_the_rest() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.allow_at(start), Some(0));
        for ms in 1..1000 {
            assert_eq!(throttle.allow_at(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttle.allow_at(start + Duration::from_secs(10)), Some(999));
        assert_eq!(throttle.allow_at(start + Duration::from_secs(11)), None);
    }

    #[test]
    fn each_key_has_its_own_interval() {
        let throttle = KeyedLogThrottle::new(Duration::from_secs(60));
        assert_eq!(throttle.allow(("a", 1)), Some(0));
        assert_eq!(throttle.allow(("a", 1)), None);
        assert_eq!(throttle.allow(("a", 2)), Some(0));
        assert_eq!(throttle.allow(("a", 1)), None);
    }
}
