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

#[cfg(test)]
mod tests {
    use super::*;

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
