//! Deterministic fleet simulation of watermark rebalancing and drains: 50 to 200 hosts with
//! real ledgers and the real lease protocol (`lease::serve`), VMs that grow and shrink along
//! load traces, lossy gossip, and each host's daemon calling the real planner
//! (`rebalance::plan`, `best_target`) and starting one migration at a time. Hosts crash and
//! restart; hosts drain and undrain; migrations fail midway. Seeded, so a failure replays.
//!
//! Checked after every tick, and at each step of a switchover: no ledger above capacity, no
//! VM running in two places (see `checks`), every VM booked once where it runs, no VM moved
//! again within its cool-down by rebalancing (a drain is an operator's order to empty the
//! host, so it moves VMs whatever their age), at most one migration per source, no lease
//! granted by a draining host (vmhostd's admission closes for a drain), and every plan
//! keeps the planner's promises on the view it was given. Then the load stops, gossip
//! heals and faults end; once settled, no host stays above its watermark while one of its
//! VMs fits elsewhere, and the migrations stay within a bound of the lower bound derived
//! in `bound`.
//!
//! `VMHOST_SIM_SEEDS=200` runs more seeds, `VMHOST_SIM_SEED=17` replays one, and
//! `VMHOST_SIM_REPORT=1` adds the benchmark line.

mod bound;
mod checks;
mod fleet;
mod gossip;
mod rng;
mod step;
mod timeline;

use fleet::{Fleet, Stats, TICKS_PER_HOUR};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Well within a minute in a debug build on two cores.
const DEFAULT_SEEDS: u64 = 6;
const LOAD_HOURS: u64 = 6;
/// Six cool-downs: time for every host to finish shedding.
const SETTLE_HOURS: u64 = 1;

struct Summary {
    seed: u64,
    hosts: usize,
    vms: usize,
    hours: f64,
    stats: Stats,
    stuck_above: u64,
}

impl Summary {
    fn moves(&self) -> u64 {
        self.stats.rebalance_moves + self.stats.drain_moves
    }

    fn bound(&self) -> u64 {
        self.stats.bound_crossings + self.stats.bound_drains
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "seed {}: {} hosts, {} VMs, {:.1} h simulated, {} migrations ({} rebalancing of which {} late, {} draining, {} more failed), \
             lower bound {} ({} for {} crossings, {} for drains), {:.1} migrations/h, \
             {} drains ({} VMs stayed), {} crashes, {} refused leases ({} full, {} draining, {} unreachable), \
             {} refused upscales, {} leases took a target past its low mark, {} crossings ended above it, \
             {} hosts settled above the watermark with no room",
            self.seed,
            self.hosts,
            self.vms,
            self.hours,
            self.moves(),
            s.rebalance_moves,
            s.late_moves,
            s.drain_moves,
            s.failed_moves,
            self.bound(),
            s.bound_crossings,
            s.crossings,
            s.bound_drains,
            self.moves() as f64 / self.hours,
            s.drains,
            s.drain_left,
            s.crashes,
            s.refused_full + s.refused_draining + s.unreachable,
            s.refused_full,
            s.refused_draining,
            s.unreachable,
            s.refused_upscales,
            s.overshoots,
            s.ended_above_low_mark,
            self.stuck_above
        )
    }
}

fn simulate(seed: u64) -> Summary {
    let mut fleet = Fleet::new(seed);
    for _ in 0..LOAD_HOURS * TICKS_PER_HOUR {
        fleet.step();
    }
    fleet.settle();
    for _ in 0..SETTLE_HOURS * TICKS_PER_HOUR {
        fleet.step();
    }
    let deadline = fleet.tick + TICKS_PER_HOUR;
    while !fleet.migrations.is_empty() && fleet.tick < deadline {
        fleet.step();
    }
    let stuck_above = fleet.check_settled();
    for h in 0..fleet.hosts.len() {
        fleet.end_crossing(h);
    }
    fleet.check_bound();
    Summary {
        seed,
        hosts: fleet.hosts.len(),
        vms: fleet.vms.len(),
        hours: fleet.tick as f64 / TICKS_PER_HOUR as f64,
        stats: fleet.stats.clone(),
        stuck_above,
    }
}

/// Seeds spread over the cores; the first failure stops the others at their next seed.
fn simulate_all(seeds: &[u64]) -> Vec<Summary> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let done = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(seeds.len()) {
            scope.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::SeqCst)) else {
                        break;
                    };
                    match panic::catch_unwind(AssertUnwindSafe(|| simulate(seed))) {
                        Ok(summary) => done.lock().expect("summaries").push(summary),
                        Err(failure) => {
                            failed.store(true, Ordering::SeqCst);
                            panic::resume_unwind(failure);
                        }
                    }
                }
            });
        }
    });
    let mut done = done.into_inner().expect("summaries");
    done.sort_by_key(|s| s.seed);
    done
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// The line for BENCHMARKS.md: migrations per host-hour, ours and the lower bound's.
fn report(summaries: &[Summary]) -> String {
    let host_hours: f64 = summaries.iter().map(|s| s.hosts as f64 * s.hours).sum();
    let ours = summaries.iter().map(Summary::moves).sum::<u64>() as f64 / host_hours;
    let bound = summaries.iter().map(Summary::bound).sum::<u64>() as f64 / host_hours;
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|e| panic!("date: {e}"));
    format!(
        "- {date} rebalancing simulation ({} seeds, 50–200 hosts, {} simulated hours each): \
         ours {ours:.3} migrations per host-hour, lower bound {bound:.3}, ratio {:.2}",
        summaries.len(),
        LOAD_HOURS + SETTLE_HOURS,
        ours / bound
    )
}

fn main() {
    let seeds: Vec<u64> = match env_u64("VMHOST_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("VMHOST_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let summaries = simulate_all(&seeds);
    for summary in &summaries {
        println!("{summary}");
    }
    if std::env::var("VMHOST_SIM_REPORT").is_ok_and(|v| v == "1") {
        println!("{}", report(&summaries));
    }
}
