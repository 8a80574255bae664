//! Budgets that refill with time and forgive with time: the guest's message rate, its log
//! lines, and the strikes that close its connection.

use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `capacity` at once, then `per_sec` on average.
pub(crate) struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        TokenBucket {
            capacity,
            per_sec,
            tokens: capacity,
            updated: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.updated = self.updated.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    #[cfg(test)]
    pub(crate) fn tokens(&self) -> f64 {
        self.tokens
    }
}

/// A count of offences that forgives one per `period`: past misbehaviour weighs on a guest for
/// a while, whatever it does (redialing included), but not forever.
pub(crate) struct Strikes {
    count: u64,
    /// When the oldest unforgiven period started.
    since: Instant,
    period: Duration,
}

impl Strikes {
    pub(crate) fn new(period: Duration, now: Instant) -> Self {
        Strikes {
            count: 0,
            since: now,
            period,
        }
    }

    /// Records one offence; returns the count including it.
    pub(crate) fn add(&mut self, now: Instant) -> u64 {
        self.forgive(now);
        self.count += 1;
        self.count
    }

    #[cfg(test)]
    pub(crate) fn count(&mut self, now: Instant) -> u64 {
        self.forgive(now);
        self.count
    }

    fn forgive(&mut self, now: Instant) {
        if self.count == 0 {
            self.since = self.since.max(now);
            return;
        }
        let elapsed = now.saturating_duration_since(self.since);
        let periods =
            (elapsed.as_nanos() / self.period.as_nanos().max(1)).min(u128::from(self.count));
        // `periods` ≤ `count`, a u64.
        let periods = periods as u64;
        self.count -= periods;
        if self.count == 0 {
            self.since = self.since.max(now);
        } else {
            self.since += self
                .period
                .saturating_mul(u32::try_from(periods).unwrap_or(u32::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(60.0, 20.0, start);
        let burst = (0..100).filter(|_| bucket.take(start)).count();
        assert_eq!(burst, 60);
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_millis(60)));
        assert!(!bucket.take(start + Duration::from_millis(60)));
    }

    #[test]
    fn strikes_are_forgiven_one_per_period() {
        let start = Instant::now();
        let period = Duration::from_secs(30);
        let mut strikes = Strikes::new(period, start);
        for _ in 0..10 {
            strikes.add(start);
        }
        assert_eq!(strikes.count(start + period - Duration::from_millis(1)), 10);
        assert_eq!(strikes.count(start + period), 9);
        assert_eq!(strikes.count(start + period * 3 + period / 2), 7);
        assert_eq!(strikes.add(start + period * 4), 7);
        assert_eq!(strikes.count(start + period * 100), 0);
        // Forgiveness does not bank up while the count is zero.
        assert_eq!(strikes.add(start + period * 100), 1);
        assert_eq!(
            strikes.count(start + period * 101 - Duration::from_millis(1)),
            1
        );
    }
}
