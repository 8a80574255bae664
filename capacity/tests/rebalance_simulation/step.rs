//! One tick of the fleet: faults, lease upkeep, migrations, load, then each host's daemon
//! (rebalance or drain), as vmhostd will drive the planner.

use crate::fleet::{host_name, index_of, Fleet, Migration, VmState, TICKS_PER_HOUR};
use crate::timeline::{Event, Kind, Refusal};
use std::cmp::Reverse;
use vmhost_api::Resources;
use vmhost_capacity::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::Ledger;
use vmhost_capacity::rebalance::{best_target, plan};

const CRASHES_PER_HOST_HOUR: f64 = 1.0 / 150.0;
const DRAINS_PER_HOUR: f64 = 1.5;
const MAX_DRAINING: usize = 3;
/// Per migration and tick: the link or the target QEMU gives up.
const ABORTS_PER_TICK: f64 = 0.005;
/// Renewed every tick while the migration runs, so only a dead holder's lease expires.
const LEASE_TTL_MS: u64 = 60_000;

impl Fleet {
    pub fn step(&mut self) {
        self.tick += 1;
        if !self.settling {
            self.faults();
        }
        self.scheduled();
        let now = self.now_ms();
        for host in self.hosts.iter_mut().filter(|h| h.up) {
            host.ledger.expire(now);
        }
        self.follow_migrations();
        if !self.settling {
            self.load();
        }
        self.count_crossings();
        self.daemons();
        for h in 0..self.hosts.len() {
            let state = self.hosts[h].up.then(|| self.host_load(h));
            self.gossip.publish(h, self.tick, state);
        }
        self.check_fleet();
    }

    /// Stops the load and the faults, heals gossip, restarts every host and ends drains.
    pub fn settle(&mut self) {
        self.settling = true;
        self.gossip.heard_per_tick = 1.0;
        for host in &mut self.hosts {
            host.restart_at = host.restart_at.min(self.tick + 1);
            host.draining_until = host.draining_until.map(|_| self.tick + 1);
            host.refused = None;
        }
    }

    fn faults(&mut self) {
        let hosts = self.hosts.len();
        let crash = CRASHES_PER_HOST_HOUR * hosts as f64 / TICKS_PER_HOUR as f64;
        if self.rng.chance(crash) {
            let h = self.rng.between(0, hosts as u64 - 1) as usize;
            if self.hosts[h].up {
                self.crash(h);
            }
        }
        let draining = self
            .hosts
            .iter()
            .filter(|h| h.draining_until.is_some())
            .count();
        if self.rng.chance(DRAINS_PER_HOUR / TICKS_PER_HOUR as f64) && draining < MAX_DRAINING {
            // Half the drains empty the host with the most room (the quickest to free, and
            // the one the others are about to choose as a target), half a random one.
            let h = if self.rng.chance(0.5) {
                (0..hosts)
                    .filter(|&h| self.hosts[h].up)
                    .max_by_key(|&h| self.hosts[h].ledger.free().memory_bytes)
                    .unwrap_or(0)
            } else {
                self.rng.between(0, hosts as u64 - 1) as usize
            };
            if self.hosts[h].up && self.hosts[h].draining_until.is_none() {
                let minutes = self.rng.between(30, 90);
                self.hosts[h].draining_until = Some(self.tick + minutes * TICKS_PER_HOUR / 60);
                self.hosts[h].draining_since = self.tick;
                self.stats.drains += 1;
                self.stats.bound_drains += self.homed_on(h).len() as u64;
                self.timeline.push(self.tick, Event::Drain { host: h });
            }
        }
    }

    fn homed_on(&self, host: usize) -> Vec<usize> {
        (0..self.vms.len())
            .filter(|&vm| self.vms[vm].home == host)
            .collect()
    }

    fn crash(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.up = false;
        host.restart_at = self.tick + self.rng.between(30, 180);
        host.refused = None;
        host.outgoing = false;
        for vm in std::mem::take(&mut host.running) {
            self.vms[vm].state = VmState::Down;
        }
        // Whatever it sent or received fails; the leases it holds or granted just expire.
        let (ended, kept) = std::mem::take(&mut self.migrations)
            .into_iter()
            .partition(|m| m.from == h || m.to == h);
        self.migrations = kept;
        for m in ended {
            let why = if m.from == h {
                "the source crashed"
            } else {
                self.vms[m.vm].state = VmState::Running;
                self.hosts[m.from].outgoing = false;
                "the target crashed"
            };
            self.migration_failed(&m, why);
        }
        self.stats.crashes += 1;
        self.timeline.push(self.tick, Event::Crashed { host: h });
    }

    fn migration_failed(&mut self, m: &Migration, why: &'static str) {
        self.stats.failed_moves += 1;
        let event = Event::Failed {
            from: m.from,
            to: m.to,
            vm: m.vm,
            why,
        };
        self.timeline.push(self.tick, event);
    }

    /// Restarts and undrains that are due.
    fn scheduled(&mut self) {
        for h in 0..self.hosts.len() {
            if !self.hosts[h].up && self.hosts[h].restart_at <= self.tick {
                self.restart(h);
            }
            if self.hosts[h].draining_until.is_some_and(|t| t <= self.tick) {
                self.hosts[h].draining_until = None;
                let left = self.homed_on(h).len();
                self.stats.drain_left += left as u64;
                self.timeline
                    .push(self.tick, Event::Undrain { host: h, left });
            }
        }
    }

    /// As vmhostd starts: the saved leases, then every VM that was here booked again.
    fn restart(&mut self, h: usize) {
        let now = self.now_ms();
        let host = &mut self.hosts[h];
        let capacity = host.ledger.capacity();
        let saved = std::mem::replace(&mut host.ledger, Ledger::new(capacity));
        host.ledger = Ledger::with_leases_from(capacity, saved);
        host.ledger.expire(now);
        host.up = true;
        let vms = self.homed_on(h);
        for &vm in &vms {
            let v = &self.vms[vm];
            if let Err(e) = self.hosts[h].ledger.set(&v.name, v.size()) {
                self.fail(format!(
                    "{} cannot book {} again: {e}",
                    host_name(h),
                    v.name
                ));
            }
            self.vms[vm].state = VmState::Running;
            self.run(h, vm);
        }
        self.check_capacity(h);
        let event = Event::Restarted {
            host: h,
            vms: vms.len(),
        };
        self.timeline.push(self.tick, event);
    }

    /// Renews, finishes or aborts each migration under way.
    fn follow_migrations(&mut self) {
        let now = self.now_ms();
        let mut k = 0;
        while k < self.migrations.len() {
            let m = &self.migrations[k];
            let holder = self.hosts[m.from].name.clone();
            let target = &mut self.hosts[m.to].ledger;
            if self.rng.chance(ABORTS_PER_TICK) {
                let m = self.migrations.remove(k);
                lease::serve(target, &holder, LeaseRequest::Release { id: m.lease }, now);
                self.vms[m.vm].state = VmState::Running;
                self.hosts[m.from].outgoing = false;
                self.migration_failed(&m, "aborted");
            } else if self.tick >= m.done_at {
                let m = self.migrations.remove(k);
                self.switch_over(m);
            } else {
                let renew = LeaseRequest::Renew {
                    id: m.lease,
                    ttl_ms: LEASE_TTL_MS,
                };
                let answer = lease::serve(target, &holder, renew, now);
                if !matches!(answer, LeaseResponse::Renewed(_)) {
                    let vm = &self.vms[m.vm].name;
                    self.fail(format!("the lease for {vm} was lost midway: {answer:?}"));
                }
                k += 1;
            }
        }
    }

    /// The source pauses the VM, the target commits its lease and runs it, and only then
    /// does the source free its allocation: never running in two places, never unbooked.
    fn switch_over(&mut self, m: Migration) {
        let now = self.now_ms();
        let (from, to, vm) = (m.from, m.to, m.vm);
        self.hosts[from].running.remove(&vm);
        let holder = self.hosts[from].name.clone();
        let commit = LeaseRequest::Commit { id: m.lease };
        let answer = lease::serve(&mut self.hosts[to].ledger, &holder, commit, now);
        if !matches!(answer, LeaseResponse::Committed(_)) {
            let name = &self.vms[vm].name;
            self.fail(format!(
                "the target did not commit {name}'s live lease: {answer:?}"
            ));
        }
        self.check_capacity(to);
        self.run(to, vm);
        self.hosts[from].ledger.release(&self.vms[vm].name);
        self.hosts[from].outgoing = false;
        self.count_move(from, to, self.vms[vm].size().memory_bytes, m.kind);
        let v = &mut self.vms[vm];
        v.home = to;
        v.arrived_at_ms = Some(now);
        v.state = VmState::Running;
        match m.kind {
            Kind::Rebalance => self.stats.rebalance_moves += 1,
            Kind::Drain => self.stats.drain_moves += 1,
        }
        if self.hosts[to].draining_until.is_some() {
            // A lease granted before the drain is honoured; the VM must leave again.
            self.stats.bound_drains += 1;
        }
        self.timeline
            .push(self.tick, Event::Switched { from, to, vm });
    }

    /// Each running VM follows its trace; growth that does not fit is a refused upscale.
    /// A migrating VM does not resize (the per-VM operation lock).
    fn load(&mut self) {
        let mut refused_before = Vec::with_capacity(self.hosts.len());
        for host in &mut self.hosts {
            refused_before.push(host.refused.take().is_some());
        }
        for vm in 0..self.vms.len() {
            let v = &mut self.vms[vm];
            if v.state != VmState::Running {
                continue;
            }
            let (wanted_gib, busy) = v.trace.step(self.tick, &mut self.rng);
            v.busy = busy;
            if wanted_gib == v.size_gib {
                continue;
            }
            let host = &mut self.hosts[v.home];
            let wanted = Resources {
                vcpus: v.vcpus,
                memory_bytes: wanted_gib << 30,
            };
            if host.ledger.set(&v.name, wanted).is_ok() {
                v.size_gib = wanted_gib;
                continue;
            }
            self.stats.refused_upscales += 1;
            let missing = (wanted_gib - v.size_gib) << 30;
            if host.refused.is_none_or(|(_, largest)| largest < missing) {
                host.refused = Some((vm, missing));
            }
            if !refused_before[v.home] {
                refused_before[v.home] = true;
                let event = Event::UpscaleRefused {
                    host: v.home,
                    vm,
                    wanted: missing,
                };
                self.timeline.push(self.tick, event);
            }
        }
    }

    /// Every live host with no migration of its own under way acts once, in an order that
    /// changes every tick so no host always sees the others' leases first.
    fn daemons(&mut self) {
        let hosts = self.hosts.len();
        let first = self.rng.between(0, hosts as u64 - 1) as usize;
        for h in (0..hosts).map(|i| (first + i) % hosts) {
            if !self.hosts[h].up || self.hosts[h].outgoing {
                continue;
            }
            if self.hosts[h].draining_until.is_some() {
                self.drain_one(h);
            } else if self.needs_room(h) {
                self.rebalance(h);
            }
        }
    }

    fn rebalance(&mut self, h: usize) {
        let here = self.host_load(h);
        let vms = self.vm_loads(h);
        let (wanted, growing) = match self.hosts[h].refused {
            Some((vm, bytes)) => (bytes, Some(self.vms[vm].name.as_str())),
            None => (0, None),
        };
        let peers = self.gossip.view(h, self.tick, &mut self.rng);
        let now = self.now_ms();
        let Some(plan) = plan(&here, &vms, &peers, &self.policy, now, wanted, growing) else {
            return;
        };
        self.check_plan(&plan, &peers, self.hosts[h].refused.map(|(vm, _)| vm));
        if let Some(first) = plan.moves.first() {
            self.start(h, index_of(&first.vm), index_of(&first.to), Kind::Rebalance);
        }
    }

    /// The largest VM first (the hardest to place, while there is most room), each to the
    /// best target in this host's view; a VM that fits nowhere stays for now.
    fn drain_one(&mut self, h: usize) {
        let mut vms: Vec<usize> = self.hosts[h]
            .running
            .iter()
            .copied()
            .filter(|&vm| self.vms[vm].state == VmState::Running)
            .collect();
        if vms.is_empty() {
            return;
        }
        vms.sort_by_key(|&vm| (Reverse(self.vms[vm].size_gib), vm));
        let peers = self.gossip.view(h, self.tick, &mut self.rng);
        for vm in vms {
            if let Some(t) = best_target(&peers, self.vms[vm].size(), None, &self.policy) {
                self.check_room(&peers[t], self.vms[vm].size().memory_bytes);
                self.start(h, vm, index_of(&peers[t].name), Kind::Drain);
                return;
            }
        }
    }

    /// Reserves on the target through the real lease protocol and starts the copy. A
    /// draining or dead target answers no, whatever the source's view said.
    fn start(&mut self, from: usize, vm: usize, to: usize, kind: Kind) {
        let now = self.now_ms();
        let v = &self.vms[vm];
        if kind == Kind::Rebalance {
            if let Some(at) = v
                .arrived_at_ms
                .filter(|at| now - at < self.policy.cooldown_ms)
            {
                let ago = (now - at) / 1000;
                self.fail(format!("{} moves again {ago} s after it arrived", v.name));
            }
        }
        if self.hosts[from].outgoing || v.home != from || v.state != VmState::Running {
            self.fail(format!(
                "{} cannot start moving {}",
                host_name(from),
                v.name
            ));
        }
        let refusal = if !self.hosts[to].up {
            self.stats.unreachable += 1;
            Some(Refusal::Unreachable)
        } else if self.hosts[to].draining_until.is_some() {
            self.stats.refused_draining += 1;
            Some(Refusal::Draining)
        } else {
            let reserve = LeaseRequest::Reserve {
                vm: v.name.clone(),
                holder: self.hosts[from].name.clone(),
                resources: v.size(),
                ttl_ms: LEASE_TTL_MS,
            };
            let holder = self.hosts[from].name.clone();
            match lease::serve(&mut self.hosts[to].ledger, &holder, reserve, now) {
                LeaseResponse::Granted(lease) => {
                    self.check_capacity(to);
                    if self.used(to) > self.host_load(to).low_mark_bytes(&self.policy) {
                        self.stats.overshoots += 1;
                    }
                    let size = self.vms[vm].size_gib;
                    self.migrations.push(Migration {
                        vm,
                        from,
                        to,
                        lease: lease.id,
                        started: self.tick,
                        done_at: self.tick + 1 + size.div_ceil(8),
                        kind,
                    });
                    self.vms[vm].state = VmState::Migrating;
                    self.hosts[from].outgoing = true;
                    let size = size << 30;
                    let event = Event::Started {
                        from,
                        to,
                        vm,
                        size,
                        kind,
                    };
                    self.timeline.push(self.tick, event);
                    None
                }
                LeaseResponse::Refused { .. } => {
                    self.stats.refused_full += 1;
                    Some(Refusal::Full)
                }
                other => self.fail(format!("unexpected answer to a reservation: {other:?}")),
            }
        };
        if let Some(why) = refusal {
            let event = Event::LeaseRefused { from, to, vm, why };
            self.timeline.push(self.tick, event);
        }
    }
}
