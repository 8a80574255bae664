//! The invariants, checked against what actually runs on each host, not only against what
//! the ledgers say.

use crate::granter::{Granter, Owner};
use crate::holder::State;
use crate::record::{Counts, Violation};
use crate::sim::Sim;
use std::collections::BTreeMap;
use vmhost_api::Resources;
use vmhost_capacity::ledger::Ledger;

/// Every host and every placement.
pub fn everything(sim: &Sim) -> Result<(), Violation> {
    hosts(sim, 0..sim.granters.len())?;
    placements(sim)
}

/// No host runs or books more than it has, and every ledger books exactly what runs there.
pub fn hosts(sim: &Sim, which: impl IntoIterator<Item = usize>) -> Result<(), Violation> {
    which
        .into_iter()
        .try_for_each(|host| within_capacity(&sim.granters[host], host, sim.now))
}

/// Every VM runs where its holder believes, on one host only.
pub fn placements(sim: &Sim) -> Result<(), Violation> {
    // Where each holder's VM runs; a local VM never leaves its host.
    let mut runs_on: Vec<Option<usize>> = vec![None; sim.holders.len()];
    for (host, granter) in sim.granters.iter().enumerate() {
        for (vm, running) in granter.running() {
            let Owner::Holder(index) = running.owner else {
                continue;
            };
            if let Some(other) = runs_on[index].replace(host) {
                let what = format!("{vm} runs on hosts {other} and {host}");
                return Err(Violation::new(what, Some(host), Some(index)));
            }
            placed_by_its_holder(sim, vm, running.size, host, index)?;
        }
    }
    for (index, holder) in sim.holders.iter().enumerate() {
        let placed = holder.placed_on();
        if let Some(host) = placed.filter(|&host| runs_on[index] != Some(host)) {
            let what = format!(
                "holder {index} placed {} on host {host}, but it runs on {:?}",
                holder.vm, runs_on[index]
            );
            return Err(Violation::new(what, Some(host), Some(index)));
        }
    }
    Ok(())
}

/// After the quiet period: every lease ended, every holder is placed or still searching, and
/// so every VM that runs for a holder is one that holder knows is placed there.
pub fn settled(sim: &Sim) -> Result<(), Violation> {
    for (host, granter) in sim.granters.iter().enumerate() {
        let Some(ledger) = granter.ledger() else {
            let what = format!("host {host} is still down after the network healed");
            return Err(Violation::new(what, Some(host), None));
        };
        if let Some(lease) = ledger.leases().next() {
            let what = format!("host {host}: lease {lease:?} never ended");
            return Err(Violation::new(what, Some(host), None));
        }
    }
    for (index, holder) in sim.holders.iter().enumerate() {
        if !matches!(holder.state, State::Placed { .. } | State::Searching { .. }) {
            let what = format!(
                "holder {index} is still {:?} after the quiet period",
                holder.state
            );
            return Err(Violation::new(what, None, Some(index)));
        }
    }
    everything(sim)
}

/// A restart after the quiet period brings back the same ledger: what was saved and what
/// runs agree.
pub fn restart_loses_nothing(sim: &mut Sim) -> Result<(), Violation> {
    let now = sim.now;
    for (host, granter) in sim.granters.iter_mut().enumerate() {
        let before = allocations(granter.ledger().expect("all up after healing"));
        granter.crash();
        granter.restart();
        // A lease dropped by an expiry that was not saved comes back expired; the daemon's
        // next tick drops it again.
        granter.expire(now, true);
        let ledger = granter.ledger().expect("just restarted");
        let after = allocations(ledger);
        if before != after || ledger.leases().next().is_some() {
            let leases: Vec<_> = ledger.leases().collect();
            let what = format!(
                "host {host} restarted with {after:?} and leases {leases:?}, had {before:?}"
            );
            return Err(Violation::new(what, Some(host), None));
        }
    }
    everything(sim)
}

/// Nothing failed after the network healed, so the quiet period judges the protocol alone.
pub fn healed(at_heal: &Counts, now: &Counts) -> Result<(), Violation> {
    let since = now.faults_since(at_heal);
    if since.is_empty() {
        return Ok(());
    }
    let what = format!("faults after the network healed: {}", since.join(", "));
    Err(Violation::new(what, None, None))
}

/// Every fault happened at least once, or the run proved less than it claims.
pub fn every_fault_happened(counts: &Counts) -> Result<(), Violation> {
    let missing = counts.missing();
    if missing.is_empty() {
        return Ok(());
    }
    let what = format!("these never happened: {}", missing.join(", "));
    Err(Violation::new(what, None, None))
}

fn within_capacity(granter: &Granter, host: usize, now: u64) -> Result<(), Violation> {
    let capacity = granter.capacity;
    let running = total(granter.running().values().map(|r| r.size));
    if !running.fits_in(capacity) {
        let what = format!("host {host} runs {running}, more than its {capacity}");
        return Err(Violation::new(what, Some(host), None));
    }
    let Some(ledger) = granter.ledger() else {
        return Ok(());
    };
    let runs = granter
        .running()
        .iter()
        .map(|(vm, r)| (vm.as_str(), r.size));
    if !ledger.allocations().eq(runs) {
        let booked = allocations(ledger);
        let runs: BTreeMap<_, _> = granter
            .running()
            .iter()
            .map(|(vm, r)| (vm, r.size))
            .collect();
        let what = format!("host {host} books {booked:?} but runs {runs:?}");
        return Err(Violation::new(what, Some(host), None));
    }
    // A lease past its expiry holds nothing: nobody can commit or renew it any more.
    let live = ledger.leases().filter(|l| l.expires_at_ms > now);
    let leased = total(live.map(|l| l.resources));
    let committed = ledger.allocated().checked_add(leased);
    if !committed.is_some_and(|c| c.fits_in(capacity)) {
        let what = format!(
            "host {host}: allocated {} + leased {leased} exceeds {capacity}",
            ledger.allocated()
        );
        return Err(Violation::new(what, Some(host), None));
    }
    Ok(())
}

/// A VM runs for a holder only where that holder placed it, or where its commit went and
/// the answer has not reached the holder yet, and only at the size it asked for.
fn placed_by_its_holder(
    sim: &Sim,
    vm: &str,
    size: Resources,
    host: usize,
    index: usize,
) -> Result<(), Violation> {
    let holder = &sim.holders[index];
    let knows = holder.placed_on() == Some(host) || holder.committing_on() == Some(host);
    if holder.vm != vm || holder.resources != size || !knows {
        let what = format!(
            "{vm} of {size} runs on host {host} for holder {index}, which is {:?}",
            holder.state
        );
        return Err(Violation::new(what, Some(host), Some(index)));
    }
    Ok(())
}

fn allocations(ledger: &Ledger) -> BTreeMap<String, Resources> {
    ledger
        .allocations()
        .map(|(vm, r)| (vm.to_string(), r))
        .collect()
}

fn total(sizes: impl Iterator<Item = Resources>) -> Resources {
    sizes.fold(Resources::default(), |sum, r| {
        sum.checked_add(r)
            .expect("sizes in the simulation are small")
    })
}
