//! Lossy gossip: every tick, each host hears each peer's latest published state only with
//! some probability, so views are stale and differ from host to host.
//!
//! Views are drawn lazily, when a host plans: the last tick it heard a peer is drawn from
//! the ticks since it last looked, which is the same as a draw every tick but costs nothing
//! for hosts that do not plan.

use crate::rng::Rng;
use std::collections::VecDeque;
use vmhost_capacity::rebalance::HostLoad;

/// Older states are dropped; hearing nothing from a peer for this long is vanishingly rare.
const HISTORY_TICKS: u64 = 90;

pub struct Gossip {
    /// Per host: what it published at the end of each tick it changed; `None` while dead.
    published: Vec<VecDeque<(u64, Option<HostLoad>)>>,
    /// `heard[observer][peer]`: the tick the observer last drew for, and the tick whose
    /// published state it holds.
    heard: Vec<Vec<(u64, u64)>>,
    /// The chance, per tick and pair, that the observer hears the peer.
    pub heard_per_tick: f64,
}

impl Gossip {
    pub fn new(initial: Vec<HostLoad>, heard_per_tick: f64) -> Gossip {
        let hosts = initial.len();
        Gossip {
            published: initial
                .into_iter()
                .map(|load| VecDeque::from([(0, Some(load))]))
                .collect(),
            heard: vec![vec![(0, 0); hosts]; hosts],
            heard_per_tick,
        }
    }

    /// Records what `host` says at the end of `tick`.
    pub fn publish(&mut self, host: usize, tick: u64, state: Option<HostLoad>) {
        let history = &mut self.published[host];
        if history.back().is_some_and(|(_, last)| *last == state) {
            return;
        }
        history.push_back((tick, state));
        while history.len() > 1 && history[1].0 + HISTORY_TICKS <= tick {
            history.pop_front();
        }
    }

    /// The live peers as `observer` sees them during `tick` (what they published at the end
    /// of the tick before it last heard them).
    pub fn view(&mut self, observer: usize, tick: u64, rng: &mut Rng) -> Vec<HostLoad> {
        let mut peers = Vec::new();
        for peer in 0..self.published.len() {
            if peer == observer {
                continue;
            }
            let (drawn, held) = &mut self.heard[observer][peer];
            if *drawn < tick {
                let back = rng.failures_before_success(self.heard_per_tick);
                if back < tick - *drawn {
                    *held = tick - back - 1;
                }
                *drawn = tick;
            }
            let history = &self.published[peer];
            let at = history.partition_point(|(t, _)| *t <= *held).max(1) - 1;
            if let Some(load) = &history[at].1 {
                peers.push(load.clone());
            }
        }
        peers
    }
}
