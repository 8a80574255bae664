//! Peers whose gossip overstated their room. Gossip is a hint, checked by the lease: a host
//! that refuses a lease its published view had room for, or that cannot honour a lease it
//! granted, is ranked last for a while, so a stale or lying view cannot draw every
//! placement and migration to it. Being suspect never excludes a host outright: in a small
//! fleet it may be the only one with room.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmhost_gossip::membership::HostView;

/// A refusal may only be stale gossip: a short while.
pub const REFUSED_LEASE: Duration = Duration::from_secs(60);
/// A granted lease that its own host then refuses to honour is not staleness.
pub const BROKEN_LEASE: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct Suspects(Mutex<HashMap<String, Instant>>);

impl Suspects {
    pub fn mark(&self, host: &str, for_how_long: Duration, why: &str, now: Instant) {
        tracing::warn!(%host, secs = for_how_long.as_secs(), %why, "ranking a host last: its gossip overstated its room");
        let mut marks = self.0.lock().expect("suspects lock");
        let until = marks.entry(host.to_string()).or_insert(now);
        *until = (*until).max(now + for_how_long);
    }

    pub fn is_suspect(&self, host: &str, now: Instant) -> bool {
        let mut marks = self.0.lock().expect("suspects lock");
        marks.retain(|_, until| *until > now);
        marks.contains_key(host)
    }

    /// Puts suspect hosts last, keeping the order among the others and among them.
    pub fn rank(&self, views: &mut [HostView], now: Instant) {
        views.sort_by_key(|v| self.is_suspect(&v.name, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str) -> HostView {
        HostView {
            name: name.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            cu_shape: Default::default(),
            capacity: Default::default(),
            allocated: Default::default(),
            leased: Default::default(),
            watermark_memory_bytes: 0,
            vms: 0,
            version: "0".into(),
            drain: None,
            images: Default::default(),
            disk_free_gib: None,
        }
    }

    #[test]
    fn a_suspect_is_ranked_last_until_its_mark_ends() {
        let suspects = Suspects::default();
        let start = Instant::now();
        suspects.mark("b", REFUSED_LEASE, "refused", start);
        let mut views = vec![view("b"), view("c"), view("d")];
        suspects.rank(&mut views, start + Duration::from_secs(1));
        let names: Vec<_> = views.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["c", "d", "b"]);
        // A longer mark is kept over a shorter one given later.
        suspects.mark("c", BROKEN_LEASE, "broke a lease", start);
        suspects.mark("c", REFUSED_LEASE, "refused", start);
        let later = start + REFUSED_LEASE + Duration::from_secs(1);
        assert!(!suspects.is_suspect("b", later));
        assert!(suspects.is_suspect("c", later));
        assert!(!suspects.is_suspect("c", start + BROKEN_LEASE));
    }
}
