//! A lower bound on the migrations the fleet needs, counted as the run goes.
//!
//! A crossing is a stretch of ticks during which a live, undrained host needs room: its
//! allocated + leased memory is above its watermark, or an upscale was refused (the
//! planner's triggers). Had the host moved nothing, it would have ended the crossing at
//! `used + shed − arrived` (shed: memory moved away during it; arrived: memory moved in).
//! So to end at or below its watermark it had to shed at least
//! `need = used + shed − arrived − watermark` (at most `shed`, for a crossing that never
//! ended), and no move sheds more than the largest VM on the host during the crossing:
//! the crossing needs at least `ceil(need / largest)` moves. A crossing that ended by
//! itself (its VMs shrank) needs none, whatever was moved meanwhile.
//!
//! A drain needs one move per VM on the host when it starts, plus one per VM that arrives
//! while it drains (a lease granted before the drain is honoured).
//!
//! The sum holds for any planner facing the same crossings; one that foresaw growth might
//! cross less often, and one that sheds too little crosses more often, which no
//! per-crossing count can see (migrations per host-hour do). What the ratio to it measures is
//! waste: a shed split into more moves than needed, a shed past the watermark (the
//! hysteresis pays only in fewer later crossings), a target pushed into crossing by a move
//! chosen on a stale view, and late moves: a move that ends after the crossing that started
//! it ended by itself (noise took the host back below its watermark meanwhile).
//!
//! Asserted (`check_bound`): moves that end inside a crossing ≤ 3 × the crossings' bound
//! + 10; late moves ≤ one per crossing; drain moves ≤ the drains' bound.

use crate::fleet::Fleet;
use crate::timeline::{Event, Kind};

/// Moves that end inside a crossing may be at most this many times the crossings' bound,
/// plus `SLACK`. Over 1000 seeds they were 1.00 to 2.89 times it (median 1.49): the planner
/// aims at the low mark, past the watermark the bound counts to; and in tight fleets
/// sources with stale views pick the same emptiest target and push it into a crossing of
/// its own.
pub const FACTOR: u64 = 3;
pub const SLACK: u64 = 10;

#[derive(Debug, Clone, Copy, Default)]
pub struct Crossing {
    shed: u64,
    arrived: u64,
    largest: u64,
}

impl Fleet {
    /// Opens and ends crossings; called each tick before the daemons act.
    pub fn count_crossings(&mut self) {
        for h in 0..self.hosts.len() {
            let host = &self.hosts[h];
            let needs = host.up && host.draining_until.is_none() && self.needs_room(h);
            match (host.crossing.is_some(), needs) {
                (false, true) => {
                    self.stats.crossings += 1;
                    let event = Event::Crossing {
                        host: h,
                        used: self.used(h) + host.refused.map_or(0, |(_, bytes)| bytes),
                        watermark: host.watermark_bytes,
                    };
                    self.timeline.push(self.tick, event);
                    self.hosts[h].crossing = Some(Crossing::default());
                }
                (true, false) => self.end_crossing(h),
                _ => {}
            }
            let host = &self.hosts[h];
            if host.crossing.is_none() {
                continue;
            }
            let growing = host.refused.map(|(vm, _)| vm);
            let largest = host
                .running
                .iter()
                .filter(|&&vm| Some(vm) != growing)
                .map(|&vm| self.vms[vm].size().memory_bytes)
                .max()
                .unwrap_or(0);
            if let Some(c) = &mut self.hosts[h].crossing {
                c.largest = c.largest.max(largest);
            }
        }
    }

    /// A VM of `bytes` moved from `from` to `to`.
    pub fn count_move(&mut self, from: usize, to: usize, bytes: u64, kind: Kind) {
        match &mut self.hosts[from].crossing {
            Some(c) => {
                c.shed += bytes;
                c.largest = c.largest.max(bytes);
            }
            None if kind == Kind::Rebalance => self.stats.late_moves += 1,
            None => {}
        }
        if let Some(c) = &mut self.hosts[to].crossing {
            c.arrived += bytes;
        }
    }

    /// Adds the crossing's moves to the bound; also for crossings the run ends in.
    pub fn end_crossing(&mut self, h: usize) {
        let Some(c) = self.hosts[h].crossing.take() else {
            return;
        };
        let unmoved = (self.used(h) + c.shed).saturating_sub(c.arrived);
        let need = unmoved
            .saturating_sub(self.hosts[h].watermark_bytes)
            .min(c.shed);
        if need > 0 {
            self.stats.bound_crossings += need.div_ceil(c.largest);
        }
        if c.shed > 0 && self.used(h) > self.host_load(h).low_mark_bytes(&self.policy) {
            self.stats.ended_above_low_mark += 1;
        }
        self.timeline
            .push(self.tick, Event::CrossingOver { host: h });
    }

    /// Rebalancing within `FACTOR` times its bound, plus the late moves; at most one late
    /// move per crossing (a source starts one move at a time, and only while it needs
    /// room); drains within theirs.
    pub fn check_bound(&self) {
        let s = &self.stats;
        let timely = s.rebalance_moves - s.late_moves;
        if timely > FACTOR * s.bound_crossings + SLACK
            || s.late_moves > s.crossings
            || s.drain_moves > s.bound_drains
        {
            self.fail(format!(
                "{timely} rebalancing moves in crossings for a bound of {}, {} late ones for {} \
                 crossings, {} drain moves for a bound of {}",
                s.bound_crossings, s.late_moves, s.crossings, s.drain_moves, s.bound_drains
            ));
        }
    }
}
