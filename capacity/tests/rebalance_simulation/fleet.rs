//! The fleet's state: hosts with their real ledgers, VMs that follow load traces, and the
//! migrations under way.

use crate::bound::Crossing;
use crate::gossip::Gossip;
use crate::rng::Rng;
use crate::timeline::{Kind, Timeline};
use std::collections::BTreeSet;
use std::f64::consts::TAU;
use vmhost_api::{CuShape, Resources};
use vmhost_capacity::ledger::{LeaseId, Ledger};
use vmhost_capacity::rebalance::{HostLoad, Policy, VmLoad};

pub const GIB: u64 = 1 << 30;
pub const TICK_MS: u64 = 10_000;
pub const TICKS_PER_HOUR: u64 = 3_600_000 / TICK_MS;
/// Share of capacity, as `fleet.watermark` in vmhostd's config.
const WATERMARK: f64 = 0.8;
/// While the load moves, a host hears a given peer in a given tick with this chance.
pub const LOSSY_GOSSIP: f64 = 0.3;

pub fn host_name(index: usize) -> String {
    format!("h{index:03}")
}

pub fn vm_name(index: usize) -> String {
    format!("vm{index}")
}

pub fn index_of(name: &str) -> usize {
    // Digits only: far cheaper than parsing, and this runs for every VM every tick.
    name.bytes()
        .filter(u8::is_ascii_digit)
        .fold(0, |n, d| n * 10 + usize::from(d - b'0'))
}

pub fn gib(bytes: u64) -> f64 {
    (bytes as f64 / GIB as f64 * 10.0).round() / 10.0
}

pub struct Host {
    pub name: String,
    pub ledger: Ledger,
    pub watermark_bytes: u64,
    pub up: bool,
    pub restart_at: u64,
    pub draining_until: Option<u64>,
    pub draining_since: u64,
    /// The VMs whose guest runs here now: what "running in two places" is checked on.
    pub running: BTreeSet<usize>,
    /// A migration from here is under way (at most one).
    pub outgoing: bool,
    /// The largest upscale refused this tick: VM and missing bytes.
    pub refused: Option<(usize, u64)>,
    /// Open while the host needs room (see `bound`).
    pub crossing: Option<Crossing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    /// Its host is down; it starts there again when the host does.
    Down,
    /// Running on its home while a copy is built on the target.
    Migrating,
}

pub struct Vm {
    pub name: String,
    pub vcpus: u32,
    pub size_gib: u64,
    /// The host whose ledger books it and that runs it (or restarts it).
    pub home: usize,
    pub state: VmState,
    pub arrived_at_ms: Option<u64>,
    pub busy: f64,
    pub trace: Trace,
}

impl Vm {
    pub fn size(&self) -> Resources {
        Resources {
            vcpus: self.vcpus,
            memory_bytes: self.size_gib * GIB,
        }
    }
}

/// A compressed day (a few hours, so a short run sees several peaks) plus a mean-reverting
/// random walk, between the VM's smallest and largest size.
pub struct Trace {
    pub min_gib: u64,
    pub max_gib: u64,
    period_ticks: f64,
    phase: f64,
    amplitude: f64,
    walk: f64,
    busy_scale: f64,
}

impl Trace {
    fn level(&self, tick: u64) -> f64 {
        let angle = TAU * tick as f64 / self.period_ticks + self.phase;
        (0.5 + self.amplitude * angle.sin() + self.walk).clamp(0.0, 1.0)
    }

    fn gib_at(&self, level: f64) -> u64 {
        self.min_gib + (level * (self.max_gib - self.min_gib) as f64).round() as u64
    }

    /// The size the guest wants at `tick`, in GiB, and how busy it is.
    pub fn step(&mut self, tick: u64, rng: &mut Rng) -> (u64, f64) {
        self.walk = self.walk * 0.98 + (rng.unit() - 0.5) * 0.06;
        let level = self.level(tick);
        (self.gib_at(level), level * self.busy_scale)
    }
}

pub struct Migration {
    pub vm: usize,
    pub from: usize,
    pub to: usize,
    pub lease: LeaseId,
    pub started: u64,
    pub done_at: u64,
    pub kind: Kind,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub rebalance_moves: u64,
    pub drain_moves: u64,
    pub failed_moves: u64,
    /// Rebalancing moves that ended after their source's crossing ended by itself.
    pub late_moves: u64,
    pub bound_crossings: u64,
    pub bound_drains: u64,
    pub crossings: u64,
    pub drains: u64,
    pub drain_left: u64,
    pub crashes: u64,
    pub refused_full: u64,
    pub refused_draining: u64,
    pub unreachable: u64,
    pub refused_upscales: u64,
    /// Leases granted that took their target, in truth, past its low mark (stale views,
    /// or several sources choosing the same target at once).
    pub overshoots: u64,
    /// Crossings that moved something and ended above the low mark.
    pub ended_above_low_mark: u64,
}

pub struct Fleet {
    pub seed: u64,
    pub tick: u64,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub migrations: Vec<Migration>,
    pub gossip: Gossip,
    pub rng: Rng,
    pub policy: Policy,
    pub timeline: Timeline,
    pub stats: Stats,
    /// Load stopped, gossip healed, no more faults.
    pub settling: bool,
}

impl Fleet {
    /// 50 to 200 hosts of mixed sizes, filled on average to 50–72% (the fleet) ± 8% (the
    /// host), with VMs whose peaks on a host mostly coincide (its tenants share a time zone).
    pub fn new(seed: u64) -> Fleet {
        let mut rng = Rng::new(seed);
        let host_count = rng.between(50, 200) as usize;
        let period_ticks = (rng.between(3, 6) * TICKS_PER_HOUR) as f64;
        let fleet_fill = 0.5 + 0.22 * rng.unit();
        let mut hosts = Vec::with_capacity(host_count);
        let mut vms = Vec::new();
        for index in 0..host_count {
            let capacity_gib = rng.pick(&[128, 256, 256, 384, 512]);
            let capacity = Resources {
                vcpus: capacity_gib as u32,
                memory_bytes: capacity_gib * GIB,
            };
            let mut host = Host {
                name: host_name(index),
                ledger: Ledger::new(capacity),
                watermark_bytes: (capacity.memory_bytes as f64 * WATERMARK) as u64,
                up: true,
                restart_at: 0,
                draining_until: None,
                draining_since: 0,
                running: BTreeSet::new(),
                outgoing: false,
                refused: None,
                crossing: None,
            };
            let host_phase = rng.unit() * TAU;
            let fill = (fleet_fill + 0.16 * (rng.unit() - 0.5)) * capacity_gib as f64;
            let mut average_gib = 0.0;
            while average_gib < fill {
                let min_gib = rng.pick(&[1, 2, 2, 4, 4, 8]);
                let max_gib = min_gib * rng.pick(&[2, 3, 4, 6, 8]);
                let trace = Trace {
                    min_gib,
                    max_gib,
                    period_ticks,
                    phase: host_phase + (rng.unit() - 0.5) * 1.6,
                    amplitude: 0.2 + 0.25 * rng.unit(),
                    walk: 0.0,
                    busy_scale: if rng.chance(0.3) {
                        0.1 * rng.unit()
                    } else {
                        0.2 + 0.8 * rng.unit()
                    },
                };
                let vm = Vm {
                    name: vm_name(vms.len()),
                    vcpus: max_gib.div_ceil(4) as u32,
                    size_gib: trace.gib_at(trace.level(0)),
                    home: index,
                    state: VmState::Running,
                    arrived_at_ms: None,
                    busy: 0.0,
                    trace,
                };
                if host.ledger.set(&vm.name, vm.size()).is_err() {
                    break;
                }
                average_gib += (min_gib + max_gib) as f64 / 2.0;
                host.running.insert(vms.len());
                vms.push(vm);
            }
            hosts.push(host);
        }
        let mut fleet = Fleet {
            seed,
            tick: 0,
            hosts,
            vms,
            migrations: Vec::new(),
            gossip: Gossip::new(Vec::new(), LOSSY_GOSSIP),
            rng,
            policy: Policy::default(),
            timeline: Timeline::default(),
            stats: Stats::default(),
            settling: false,
        };
        let initial = (0..host_count).map(|h| fleet.host_load(h)).collect();
        fleet.gossip = Gossip::new(initial, LOSSY_GOSSIP);
        fleet
    }

    pub fn now_ms(&self) -> u64 {
        self.tick * TICK_MS
    }

    /// Allocated + leased memory.
    pub fn used(&self, host: usize) -> u64 {
        self.hosts[host].ledger.committed().memory_bytes
    }

    /// The host as the planner sees itself, from its ledger.
    pub fn host_load(&self, host: usize) -> HostLoad {
        let h = &self.hosts[host];
        HostLoad {
            name: h.name.clone(),
            cu_shape: CuShape::default(),
            capacity: h.ledger.capacity(),
            allocated: h.ledger.allocated(),
            leased: h.ledger.leased(),
            watermark_memory_bytes: h.watermark_bytes,
            draining: h.draining_until.is_some(),
            images: Default::default(),
        }
    }

    pub fn vm_loads(&self, host: usize) -> Vec<VmLoad> {
        self.hosts[host]
            .running
            .iter()
            .map(|&vm| {
                let v = &self.vms[vm];
                VmLoad {
                    name: v.name.clone(),
                    size: v.size(),
                    busy: v.busy,
                    moved_at_ms: v.arrived_at_ms,
                    movable: v.state == VmState::Running,
                    image: None,
                }
            })
            .collect()
    }

    /// The planner's trigger as the policy states it: above the watermark, or refused an
    /// upscale. The planner still decides; this only spares building a view for nothing.
    pub fn needs_room(&self, host: usize) -> bool {
        let h = &self.hosts[host];
        h.refused.is_some() || self.used(host) > h.watermark_bytes
    }
}
