//! The invariants, checked after every tick and after each step of a switchover, and the
//! check once the load has settled. A failure names the seed and shows the last events.
//!
//! "Running in two places" means two hosts' `running` sets hold the VM at once: both
//! guests would execute. A VM may be booked on two ledgers during its switchover (the
//! target's commit comes before the source's release); that is only capacity held.

use crate::fleet::{gib, host_name, index_of, Fleet, VmState};
use std::collections::BTreeMap;
use std::fmt::Display;
use vmhost_capacity::rebalance::{best_target, HostLoad, Plan};

impl Fleet {
    pub fn fail(&self, what: impl Display) -> ! {
        let seed = self.seed;
        panic!(
            "rebalancing simulation, seed {seed}, tick {} ({:.2} h): {what}\n\
             replay: VMHOST_SIM_SEED={seed} cargo test -p vmhost-capacity --test rebalance_simulation\n\
             last events:\n{}",
            self.tick,
            self.now_ms() as f64 / 3_600_000.0,
            self.timeline.render()
        );
    }

    /// No host has allocated + leased above its capacity.
    pub fn check_capacity(&self, host: usize) {
        let ledger = &self.hosts[host].ledger;
        if !ledger.committed().fits_in(ledger.capacity()) {
            self.fail(format!(
                "{} holds {} of {}",
                host_name(host),
                ledger.committed(),
                ledger.capacity()
            ));
        }
    }

    /// Starts `vm`'s guest on `host`, which must be the only one running it.
    pub fn run(&mut self, host: usize, vm: usize) {
        if let Some(other) = self.hosts.iter().position(|h| h.running.contains(&vm)) {
            let name = &self.vms[vm].name;
            self.fail(format!(
                "{name} would run on {} while it runs on {}",
                host_name(host),
                host_name(other)
            ));
        }
        self.hosts[host].running.insert(vm);
    }

    /// The planner's promises, on the view it was given: every target is in it, takes
    /// all that is planned for it without passing its low mark, and the growing VM stays.
    pub fn check_plan(&self, plan: &Plan, peers: &[HostLoad], growing: Option<usize>) {
        let mut planned: BTreeMap<&str, u64> = BTreeMap::new();
        for m in &plan.moves {
            if Some(index_of(&m.vm)) == growing {
                self.fail(format!(
                    "the plan moves {}, the VM that wants to grow",
                    m.vm
                ));
            }
            *planned.entry(&m.to).or_default() += m.size.memory_bytes;
        }
        for (to, bytes) in planned {
            match peers.iter().find(|p| p.name == to) {
                Some(target) => self.check_room(target, bytes),
                None => self.fail(format!("the plan moves to {to}, which is not in its view")),
            }
        }
    }

    /// `target`, as seen, takes `bytes` more and stays at or below its low mark.
    pub fn check_room(&self, target: &HostLoad, bytes: u64) {
        let after = target.allocated.memory_bytes + target.leased.memory_bytes + bytes;
        let low_mark = target.low_mark_bytes(&self.policy);
        if target.draining || after > low_mark {
            self.fail(format!(
                "{} was chosen to reach {} GiB, past its low mark {} GiB (draining: {})",
                target.name,
                gib(after),
                gib(low_mark),
                target.draining
            ));
        }
    }

    pub fn check_fleet(&self) {
        let vms = self.vms.len();
        let mut copies = vec![0u32; vms];
        let mut booked = vec![0u32; vms];
        for (h, host) in self.hosts.iter().enumerate() {
            self.check_capacity(h);
            for &vm in &host.running {
                copies[vm] += 1;
                if self.vms[vm].home != h || !host.up {
                    self.fail(format!(
                        "{} runs on {} but is booked elsewhere",
                        self.vms[vm].name, host.name
                    ));
                }
            }
            for (owner, size) in host.ledger.allocations() {
                let vm = index_of(owner);
                booked[vm] += 1;
                if self.vms[vm].home != h || self.vms[vm].size() != size {
                    self.fail(format!("{} books {owner} at {size}", host.name));
                }
            }
            let outgoing = self.migrations.iter().filter(|m| m.from == h).count();
            if outgoing > 1 || (outgoing == 1) != host.outgoing {
                self.fail(format!(
                    "{} has {outgoing} migrations of its own under way",
                    host.name
                ));
            }
        }
        for (vm, v) in self.vms.iter().enumerate() {
            let up = self.hosts[v.home].up;
            let expected = match v.state {
                VmState::Running | VmState::Migrating => u32::from(up),
                VmState::Down => 0,
            };
            if copies[vm] != expected || booked[vm] != 1 || (v.state == VmState::Down) == up {
                self.fail(format!(
                    "{} ({:?} on {}) runs in {} places and is booked in {}",
                    v.name,
                    v.state,
                    host_name(v.home),
                    copies[vm],
                    booked[vm]
                ));
            }
        }
        for m in &self.migrations {
            let target = &self.hosts[m.to];
            if target.draining_until.is_some() && m.started >= target.draining_since {
                self.fail(format!("{} granted a lease while draining", target.name));
            }
            let ledger = &target.ledger;
            if self.vms[m.vm].state != VmState::Migrating
                || !ledger.leases().any(|l| l.id == m.lease)
            {
                self.fail(format!(
                    "moving {} has no live lease on {}",
                    self.vms[m.vm].name,
                    host_name(m.to)
                ));
            }
        }
    }

    /// Every host as it truly is, as targets: a host that is down takes nothing, which
    /// the planner's `best_target` reads from `draining`.
    fn true_targets(&self) -> Vec<HostLoad> {
        (0..self.hosts.len())
            .map(|h| {
                let mut load = self.host_load(h);
                load.draining |= !self.hosts[h].up;
                load
            })
            .collect()
    }

    /// The first VM of `host`, among `vms`, that fits on another host without taking it
    /// past its low mark, with that host.
    fn room_for(
        &self,
        host: usize,
        vms: &[usize],
        targets: &mut [HostLoad],
    ) -> Option<(usize, usize)> {
        let was = std::mem::replace(&mut targets[host].draining, true);
        let found = vms.iter().find_map(|&vm| {
            best_target(targets, self.vms[vm].size(), None, &self.policy).map(|t| (vm, t))
        });
        targets[host].draining = was;
        found
    }

    /// Once the load stopped, gossip healed and every cool-down ended, no live, undrained
    /// host is above its watermark while the fleet has room for it: some VM of it fits on
    /// another live, undrained host within capacity and at or below that host's low mark
    /// (`best_target` on the true state; the planner would have moved it). And no lease
    /// outlived its migration. Returns how many hosts stayed above with no room.
    pub fn check_settled(&mut self) -> u64 {
        let mut targets = self.true_targets();
        let mut stuck = 0;
        for h in 0..self.hosts.len() {
            let host = &self.hosts[h];
            if !host.up || host.draining_until.is_some() || !self.migrations.is_empty() {
                self.fail(format!("{} has not settled", host.name));
            }
            if let Some(lease) = host.ledger.leases().next() {
                self.fail(format!(
                    "{} still holds a lease for {}",
                    host.name, lease.vm
                ));
            }
            if self.used(h) <= host.watermark_bytes {
                continue;
            }
            let vms: Vec<usize> = host.running.iter().copied().collect();
            match self.room_for(h, &vms, &mut targets) {
                Some((vm, t)) => self.fail(format!(
                    "{} settled at {} GiB, above its watermark {} GiB, though {} ({} GiB) fits on {}",
                    host.name,
                    gib(self.used(h)),
                    gib(host.watermark_bytes),
                    self.vms[vm].name,
                    self.vms[vm].size_gib,
                    targets[t].name
                )),
                None => stuck += 1,
            }
        }
        stuck
    }
}
