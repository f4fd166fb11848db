//! Jittered exponential backoff, as a value: each failure doubles the ceiling up to `max`, the
//! wait is drawn uniformly from [ceiling/2, ceiling] so many pods restarting together spread out.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// `min` must be positive and not above `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        assert!(!min.is_zero() && min <= max, "backoff needs 0 < min <= max");
        Backoff { min, max, ceiling: min }
    }

    /// The next wait; grows the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let low = ceiling / 2;
        low + rand::rng().random_range(Duration::ZERO..=ceiling - low)
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }
}

/// The waits of a replica standing by for a name another connection holds: `first`, doubling
/// at each try up to `max`, each plus up to half again of jitter (so replicas that stood by
/// together spread out).
///
/// Why it backs off: without a controller telling it to stand by, a replica can only learn that
/// the name is free by asking, and on a server that does not load-balance each try costs the
/// server a forward (sish makes a random public name that the agent then cancels). Frequent
/// tries are worth it only just after the holder started (the race before the controller
/// assigns the name); a replica left standing by for long asks rarely. Takeover is the
/// controller's job: it clears `standby`, and a changed spec starts the waits over.
#[derive(Clone, Debug)]
pub struct StandbyRetry {
    max: Duration,
    base: Duration,
}

impl StandbyRetry {
    /// A `max` below `first` is taken as `first` (a fixed interval).
    pub fn new(first: Duration, max: Duration) -> Self {
        let first = first.max(Duration::from_millis(1));
        StandbyRetry { max: max.max(first), base: first }
    }

    /// The next wait: in [base, 1.5 base], then the base doubles (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (self.base * 2).min(self.max);
        base + rand::rng().random_range(Duration::ZERO..=base / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12, defect 13: a standby's tries used to come every --standby-retry plus jitter
    /// forever; now they double up to the cap.
    #[test]
    fn standby_retries_double_up_to_the_cap_with_jitter() {
        let mut r = StandbyRetry::new(Duration::from_secs(3), Duration::from_secs(60));
        let bases = [3, 6, 12, 24, 48, 60, 60, 60];
        for base in bases {
            let base = Duration::from_secs(base);
            let d = r.next_delay();
            assert!((base..=base + base / 2).contains(&d), "{d:?} not in [{base:?}, 1.5 x {base:?}]");
        }
        // A cap below the first wait is a fixed interval.
        let mut fixed = StandbyRetry::new(Duration::from_secs(3), Duration::from_secs(1));
        for _ in 0..4 {
            assert!(fixed.next_delay() <= Duration::from_millis(4500));
        }
    }

    #[test]
    fn grows_with_jitter_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first), "{first:?}");
        for _ in 0..10 {
            b.next_delay();
        }
        let capped = b.next_delay();
        assert!((Duration::from_secs(1)..=Duration::from_secs(2)).contains(&capped), "{capped:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
