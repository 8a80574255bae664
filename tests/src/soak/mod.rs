//! A chaos soak: three vmhostd in network namespaces run small guests that rewrite their
//! memory (some also write a disk) while random operator commands and faults hit them.
//! Every few seconds, and once more after every fault is undone and every migration has
//! ended, the fleet must hold: each VM runs once or is stopped or crashed with its disk, no
//! host over capacity, no orphan QEMU or vsock backend, no guest that went back or lost a
//! write or rebooted without a cause, every disk record where the VM runs; and at the end,
//! no lease left, and a restart of every vmhostd changes nothing. The binary `soak` and the
//! test `soak.rs` both call `run`.

mod end;
mod faults;
mod fleet;
mod guest;
mod invariants;
mod observe;
mod ops;
mod rng;
mod timeline;

use crate::capacity::CapacityWatch;
use faults::Faults;
use fleet::{Fleet, HOSTS, RECOVER_SECS};
use guest::GuestWatch;
use invariants::{Checks, Model, VmModel};
use observe::Snapshot;
use ops::{vmctl, Busy, Op, OpKind, Planner, Running};
use rng::Rng;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use timeline::Timeline;
use vmhost_api::VmState;

pub struct Config {
    pub minutes: f64,
    pub seed: u64,
    /// VMs created at the start; creates and deletes keep the count within two of it.
    pub vms: usize,
}

pub struct Summary {
    pub config_minutes: f64,
    pub seed: u64,
    pub vms: usize,
    pub accel: String,
    pub ops_tried: u32,
    pub ops_ok: u32,
    pub faults: Faults,
    pub capacity_samples: usize,
    pub unexplained_crashes: BTreeSet<String>,
    /// Where the daemons' logs were kept, when something is worth a look.
    pub logs: Option<PathBuf>,
}

impl Summary {
    pub fn ops_per_minute(&self) -> f64 {
        f64::from(self.ops_ok) / self.config_minutes
    }

    /// The line for BENCHMARKS.md.
    pub fn benchmark_line(&self, date: &str) -> String {
        format!(
            "- {date} chaos soak ({} min, seed {}, {} hosts, {} VMs, {}): ours {:.1} operations per minute, {} faults survived ({}), 0 invariants broken\n",
            self.config_minutes,
            self.seed,
            HOSTS.len(),
            self.vms,
            self.accel,
            self.ops_per_minute(),
            self.faults.total(),
            self.faults.breakdown()
        )
    }
}

pub struct Failure {
    pub seed: u64,
    pub invariant: String,
    pub timeline: String,
    /// Where the daemons' logs were kept.
    pub logs: PathBuf,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SOAK FAILED (seed {}): {}\n--- timeline ---\n{}\n--- vmhostd logs kept in {} ---",
            self.seed,
            self.invariant,
            self.timeline,
            self.logs.display()
        )
    }
}

/// Runs the soak; the fleet is gone again when it returns, whatever happened.
pub fn run(config: &Config) -> Result<Summary, Failure> {
    let timeline = Timeline::new();
    timeline.log(format!(
        "chaos soak: seed {}, {} min, {} VMs on hosts {HOSTS:?}",
        config.seed, config.minutes, config.vms
    ));
    let mut slot = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Soak::new(config, &timeline, &mut slot).and_then(Soak::run)
    }))
    .unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        // A harness assertion carries a whole daemon log; its head says what failed.
        Err(format!(
            "panic: {}",
            text.chars().take(2000).collect::<String>()
        ))
    });
    let logs = std::env::temp_dir().join(format!("vmhost-soak-{}-logs", config.seed));
    let keep_logs = || {
        if let Some(fleet) = &slot {
            fleet.keep_logs(&logs);
        }
    };
    match outcome {
        Ok(mut summary) => {
            // A crash no fault explains is worth a look, though no rule forbids it.
            if !summary.unexplained_crashes.is_empty() {
                keep_logs();
                summary.logs = Some(logs);
            }
            Ok(summary)
        }
        Err(invariant) => {
            timeline.log(format!("BROKEN: {invariant}"));
            keep_logs();
            Err(Failure {
                seed: config.seed,
                invariant,
                timeline: timeline.dump(),
                logs,
            })
        }
    }
}

struct Soak<'a> {
    config: &'a Config,
    timeline: &'a Timeline,
    fleet: &'a mut Fleet,
    rng: Rng,
    model: Model,
    guests: GuestWatch,
    checks: Checks,
    faults: Faults,
    planner: Planner,
    capacity: CapacityWatch,
    running: Vec<Running>,
    drained: BTreeSet<usize>,
    migrating_since: HashMap<String, Instant>,
    seen: Snapshot,
    ops_tried: u32,
    ops_ok: u32,
    unexplained_crashes: BTreeSet<String>,
}

impl<'a> Soak<'a> {
    fn new(
        config: &'a Config,
        timeline: &'a Timeline,
        slot: &'a mut Option<Fleet>,
    ) -> Result<Soak<'a>, String> {
        let fleet = slot.insert(Fleet::start());
        timeline.log(format!(
            "fleet up; {}'s state dir is on a small ext4",
            HOSTS[fleet::SMALL_FS_HOST]
        ));
        let capacity = CapacityWatch::start(&fleet.hosts);
        let seen = Snapshot::take(fleet);
        let mut soak = Soak {
            config,
            timeline,
            rng: Rng::new(config.seed),
            model: Model::default(),
            guests: GuestWatch::default(),
            checks: Checks::new(),
            faults: Faults::default(),
            planner: Planner::new(config.vms.saturating_sub(2).max(1), config.vms + 2),
            capacity,
            running: Vec::new(),
            drained: BTreeSet::new(),
            migrating_since: HashMap::new(),
            seen,
            ops_tried: 0,
            ops_ok: 0,
            unexplained_crashes: BTreeSet::new(),
            fleet,
        };
        for _ in 0..config.vms {
            let host = soak.rng.range(0, HOSTS.len() as u64) as usize;
            let (op, disk) = soak.planner.create(&mut soak.rng, host);
            let outcome = vmctl(&soak.fleet.hosts[host].socket, &op.args, op.timeout);
            soak.timeline
                .log(format!("{} → {}", op.describe(), outcome.summary()));
            if !outcome.ok() {
                return Err(format!(
                    "the first VMs could not be created: {}",
                    outcome.summary()
                ));
            }
            let vm = op.vm.unwrap();
            soak.model.vms.insert(vm, VmModel { disk, sure: true });
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while soak
            .model
            .vms
            .keys()
            .any(|vm| soak.guests.last_tick(vm).is_none())
        {
            if Instant::now() > deadline {
                return Err("the first guests did not all report within 300 s".into());
            }
            soak.guests.read(soak.fleet)?;
            std::thread::sleep(Duration::from_secs(1));
        }
        soak.timeline.log("every guest reports; chaos starts");
        Ok(soak)
    }

    fn run(mut self) -> Result<Summary, String> {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(self.config.minutes * 60.0);
        let mut next_fault = start + Duration::from_secs(self.rng.range(3, 8));
        let mut last_check = start;
        while Instant::now() < end {
            self.reap();
            self.faults
                .undo(false, self.fleet, &mut self.guests, self.timeline)?;
            if last_check.elapsed() >= Duration::from_secs(3) {
                self.check()?;
                last_check = Instant::now();
            }
            if self.running.len() < 4 && self.rng.chance(70) {
                self.issue();
            }
            if Instant::now() >= next_fault {
                let what =
                    self.faults
                        .inject(&mut self.rng, self.fleet, &self.seen, &mut self.guests);
                self.timeline.log(format!("FAULT {what}"));
                next_fault = Instant::now() + Duration::from_secs(self.rng.range(5, 13));
            }
            std::thread::sleep(Duration::from_millis(self.rng.range(300, 1200)));
        }
        self.quiesce()?;
        self.final_checks()
    }

    fn busy(&self) -> Busy {
        Busy {
            vms: self
                .running
                .iter()
                .filter_map(|r| r.op.vm.clone())
                .collect(),
            draining: self
                .running
                .iter()
                .filter(|r| r.op.kind == OpKind::Drain)
                .map(|r| r.op.host)
                .collect(),
            drained: self.drained.clone(),
        }
    }

    /// Migrations paused longer than their recovery window, by source host.
    fn stranded(&self) -> Vec<(usize, String)> {
        let due = Duration::from_secs(RECOVER_SECS + 15);
        self.seen
            .in_state(VmState::Migrating)
            .into_iter()
            .filter(|(h, vm)| {
                self.seen.hosts[*h].folder(vm).is_some_and(|f| f.leaving)
                    && self
                        .migrating_since
                        .get(vm)
                        .is_some_and(|t| t.elapsed() > due)
            })
            .collect()
    }

    fn issue(&mut self) {
        self.seen = Snapshot::take(self.fleet);
        let mut busy = self.busy();
        busy.vms.extend(self.model.deleted.iter().cloned());
        let stranded = self.stranded();
        let known = self.model.vms.len();
        let Some(op) = self
            .planner
            .next(&mut self.rng, &self.seen, known, &busy, &stranded)
        else {
            return;
        };
        self.start_op(op);
    }

    fn start_op(&mut self, op: Op) {
        match op.kind {
            OpKind::Create => {
                let disk = op.args.iter().any(|a| a == "--disk-gib");
                let vm = op.vm.clone().unwrap();
                self.model.vms.insert(vm, VmModel { disk, sure: false });
            }
            OpKind::Delete => {
                if let Some(known) = self.model.vms.get_mut(op.vm.as_ref().unwrap()) {
                    known.sure = false;
                }
            }
            OpKind::Start => {
                let vm = op.vm.as_ref().unwrap();
                self.guests.allow_reboot(vm);
            }
            // A VM that cannot move live is booted again on its new host.
            OpKind::Drain if op.args.iter().any(|a| a == "--cold") => {
                for vm in self.seen.hosts[op.host]
                    .folders
                    .iter()
                    .map(|f| f.vm.clone())
                {
                    self.guests.allow_reboot(&vm);
                }
            }
            _ => {}
        }
        self.timeline.log(format!("→ {}", op.describe()));
        self.ops_tried += 1;
        let socket = self.fleet.hosts[op.host].socket.clone();
        self.running.push(Running::start(op, socket));
    }

    fn reap(&mut self) {
        let (done, running): (Vec<Running>, Vec<Running>) =
            self.running.drain(..).partition(|r| r.finished());
        self.running = running;
        for finished in done {
            let (op, outcome, took) = finished.join();
            self.timeline.log(format!(
                "← {} after {:.1} s: {}",
                op.describe(),
                took.as_secs_f64(),
                outcome.summary()
            ));
            if outcome.ok() {
                self.ops_ok += 1;
            }
            let vm = op.vm.clone().unwrap_or_default();
            match op.kind {
                OpKind::Create if outcome.ok() => {
                    if let Some(known) = self.model.vms.get_mut(&vm) {
                        known.sure = true;
                    }
                }
                OpKind::Delete if outcome.ok() => {
                    self.model.vms.remove(&vm);
                    self.model.deleted.insert(vm.clone());
                    self.guests.forget(&vm);
                }
                // The drain order stays until an undrain, whatever the drain's exit.
                OpKind::Drain => {
                    self.drained.insert(op.host);
                }
                OpKind::Undrain if outcome.ok() => {
                    self.drained.remove(&op.host);
                }
                _ => {}
            }
        }
    }

    /// Reads the guests, takes a snapshot and checks every rule on it.
    fn check(&mut self) -> Result<(), String> {
        self.guests.read(self.fleet)?;
        self.seen = Snapshot::take(self.fleet);
        let busy = self.busy();
        for name in self.seen.names() {
            let listed = self.seen.listings(&name);
            match self.model.vms.get_mut(&name) {
                Some(known) if !known.sure && !busy.vms.contains(&name) => known.sure = true,
                Some(_) => {}
                None if !self.model.deleted.contains(&name) => {
                    let disk = listed.iter().any(|(_, v)| v.disk_gib.is_some());
                    self.timeline.log(format!(
                        "{name} is listed though its create failed; it is one of ours"
                    ));
                    self.model
                        .vms
                        .insert(name.clone(), VmModel { disk, sure: true });
                }
                None => {}
            }
        }
        // A crash is ours until the VM is seen running again.
        for (_, vm) in self.seen.in_state(VmState::Running) {
            self.faults.ended_qemus.remove(&vm);
        }
        for (host, vm) in self.seen.in_state(VmState::Crashed) {
            if !self.faults.ended_qemus.contains(&vm) && self.unexplained_crashes.insert(vm.clone())
            {
                self.timeline.log(format!(
                    "NOTE: {vm} crashed on {} without a fault of ours on its QEMU",
                    HOSTS[host]
                ));
            }
        }
        let migrating: BTreeSet<String> = self
            .seen
            .in_state(VmState::Migrating)
            .into_iter()
            .map(|(_, vm)| vm)
            .collect();
        self.migrating_since.retain(|vm, _| migrating.contains(vm));
        for vm in migrating {
            self.migrating_since.entry(vm).or_insert_with(Instant::now);
        }
        let before = self.checks.suspects();
        let result = self.checks.fleet(&self.seen, &self.model, false);
        for suspect in self.checks.suspects() {
            if !before.contains(&suspect) {
                self.timeline.log(format!("suspect: {suspect}"));
            }
        }
        result?;
        self.check_disks(false)?;
        match self.capacity.over().first() {
            Some(over) => Err(format!("a host went over capacity: {over}")),
            None => Ok(()),
        }
    }

    /// Each disk VM that runs on one host, outside a migration, has its records there.
    fn check_disks(&self, settled: bool) -> Result<usize, String> {
        let mut checked = 0;
        for (vm, _) in self.model.vms.iter().filter(|(_, k)| k.disk) {
            let listings = self.seen.listings(vm);
            let [(host, info)] = listings.as_slice() else {
                continue;
            };
            let folder = self.seen.hosts[*host].folder(vm);
            if folder.is_none_or(|f| f.leaving || f.arriving) {
                continue;
            }
            if info.state == VmState::Running || settled {
                let disk = self.fleet.vm_dir(*host, vm).join("disk.raw");
                checked += self.guests.check_disk(vm, &disk, settled)?;
            }
        }
        Ok(checked)
    }
}
