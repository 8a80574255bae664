//! The monitor's decisions, pure and clock-free: when to ask for memory and whether a
//! downscale leaves enough.

use std::time::{Duration, Instant};

/// Whether memory in use plus a safety margin fits in the proposed size.
pub fn check_downscale(
    used_bytes: u64,
    target_bytes: u64,
    margin_bytes: u64,
) -> Result<(), String> {
    let needed = used_bytes.saturating_add(margin_bytes);
    if needed <= target_bytes {
        Ok(())
    } else {
        Err(format!(
            "{} MiB in use plus a {} MiB margin does not fit in {} MiB",
            used_bytes >> 20,
            margin_bytes >> 20,
            target_bytes >> 20
        ))
    }
}

/// The memory a downscale must leave room for: what the guest uses that it cannot reclaim,
/// and at least the workload's anonymous memory (Postgres's own use, not its page cache)
/// plus what the kernel and the monitor keep for themselves.
pub fn memory_in_use(guest_used_bytes: u64, workload_anon_bytes: u64, reserve_bytes: u64) -> u64 {
    guest_used_bytes.max(workload_anon_bytes.saturating_add(reserve_bytes))
}

/// Turns pressure signals into upscale requests, at most one per `interval`.
#[derive(Debug)]
pub struct UpscaleLimiter {
    interval: Duration,
    last_request: Option<Instant>,
}

impl UpscaleLimiter {
    pub fn new(interval: Duration) -> Self {
        UpscaleLimiter {
            interval,
            last_request: None,
        }
    }

    /// Records a pressure signal at `now`; true when a request should go out.
    pub fn should_request(&mut self, now: Instant) -> bool {
        let due = self
            .last_request
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if due {
            self.last_request = Some(now);
        }
        due
    }
}

/// True when the workload's memory has crossed `fraction` of the guest's memory.
pub fn over_threshold(workload_bytes: u64, total_bytes: u64, fraction: f64) -> bool {
    total_bytes > 0 && workload_bytes as f64 >= fraction * total_bytes as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workloads_anonymous_memory_counts_with_the_reserve() {
        // Page cache is not in use: the guest's own figure wins when the workload is small.
        assert_eq!(memory_in_use(300 << 20, 100 << 20, 96 << 20), 300 << 20);
        // A workload holding more than the guest-wide figure shows sets the floor.
        assert_eq!(memory_in_use(300 << 20, 500 << 20, 96 << 20), 596 << 20);
        assert_eq!(memory_in_use(0, u64::MAX, 96 << 20), u64::MAX);
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn downscale_needs_usage_plus_margin() {
        assert!(check_downscale(500 * MIB, 1024 * MIB, 128 * MIB).is_ok());
        let reason = check_downscale(950 * MIB, 1024 * MIB, 128 * MIB).unwrap_err();
        assert!(reason.contains("950 MiB in use"), "{reason}");
    }

    #[test]
    fn limiter_spaces_requests_with_a_fake_clock() {
        let start = Instant::now();
        let mut limiter = UpscaleLimiter::new(Duration::from_millis(500));
        assert!(limiter.should_request(start));
        assert!(!limiter.should_request(start + Duration::from_millis(100)));
        assert!(!limiter.should_request(start + Duration::from_millis(499)));
        assert!(limiter.should_request(start + Duration::from_millis(500)));
        assert!(!limiter.should_request(start + Duration::from_millis(900)));
    }

    #[test]
    fn threshold() {
        assert!(over_threshold(800, 1000, 0.7));
        assert!(!over_threshold(600, 1000, 0.7));
        assert!(!over_threshold(1, 0, 0.7));
    }
}
