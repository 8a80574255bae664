//! The end of a soak: every fault undone and every command ended, then the strict checks;
//! then every vmhostd killed and restarted, which must find the fleet just as it was.

use super::fleet::{HOSTS, LEASE_TTL_SECS};
use super::invariants::leases_held;
use super::observe::Snapshot;
use super::ops::{vmctl, Op, OpKind};
use super::{Soak, Summary};
use std::time::{Duration, Instant};
use vmhost_api::VmState;

impl Soak<'_> {
    /// Undoes every fault, lets every command end, undrains, and finishes every migration.
    pub(super) fn quiesce(&mut self) -> Result<(), String> {
        self.timeline
            .log("quiescing: every fault undone, no new command");
        self.faults
            .undo(true, self.fleet, &mut self.guests, self.timeline)?;
        let deadline = Instant::now() + Duration::from_secs(330);
        while !self.running.is_empty() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(500));
        }
        for (host, name) in HOSTS.iter().enumerate() {
            let op = Op {
                kind: OpKind::Undrain,
                vm: None,
                host,
                args: vec!["undrain".into(), name.to_string()],
                timeout: Duration::from_secs(30),
            };
            let outcome = vmctl(&self.fleet.hosts[host].socket, &op.args, op.timeout);
            self.timeline
                .log(format!("{} → {}", op.describe(), outcome.summary()));
        }
        self.fleet.wait_all_live(Duration::from_secs(120));
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            self.check()?;
            if !self.seen.migrating() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "VMs still migrating 300 s after quiescing: {:?}",
                    self.seen.in_state(VmState::Migrating)
                ));
            }
            for (host, vm) in self.stranded() {
                let args = ["--json", "migrate", vm.as_str(), "--resume"].map(String::from);
                let socket = &self.fleet.hosts[host].socket;
                let outcome = vmctl(socket, &args, Duration::from_secs(300));
                self.timeline.log(format!(
                    "vmctl migrate {vm} --resume (on {}) → {}",
                    HOSTS[host],
                    outcome.summary()
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        self.timeline
            .log("quiet: no fault, no command, no migration");
        Ok(())
    }

    /// Every rule without grace, every running guest going on, every disk record in place;
    /// returns how many records were checked.
    fn strict_checks(&mut self, since: Instant) -> Result<usize, String> {
        // Listings settle within a few seconds of the last migration.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.guests.read(self.fleet)?;
            self.seen = Snapshot::take(self.fleet);
            match self.checks.fleet(&self.seen, &self.model, true) {
                Ok(()) => break,
                Err(problem) if Instant::now() > deadline => return Err(problem),
                Err(_) => std::thread::sleep(Duration::from_secs(2)),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        for (host, vm) in self.seen.in_state(VmState::Running) {
            while self.guests.last_tick(&vm).is_none_or(|t| t < since) {
                if Instant::now() > deadline {
                    let args = ["--json", "show", vm.as_str()].map(String::from);
                    let socket = &self.fleet.hosts[host].socket;
                    let shown = vmctl(socket, &args, Duration::from_secs(10));
                    let shown: serde_json::Value =
                        serde_json::from_str(&shown.stdout).unwrap_or_default();
                    return Err(format!(
                        "{vm} is listed running on {} but its guest has not reported since {:.0} s ago (QEMU {}, monitor connected: {})",
                        HOSTS[host],
                        since.elapsed().as_secs_f64(),
                        shown["qemu_status"],
                        shown["guest"]["connected"]
                    ));
                }
                std::thread::sleep(Duration::from_secs(1));
                self.guests.read(self.fleet)?;
            }
        }
        self.check_disks(true)
    }

    /// Kills and restarts every vmhostd: each must find the VMs it had, with the same QEMUs.
    fn restart_all(&mut self) -> Result<(), String> {
        let before = self.seen.placements();
        for host in &mut self.fleet.hosts {
            host.kill_daemon();
        }
        for (host, name) in self.fleet.hosts.iter_mut().zip(HOSTS) {
            let started =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| host.start_daemon()));
            if started.is_err() {
                return Err(format!("vmhostd of {name} did not come back up"));
            }
        }
        self.timeline.log("every vmhostd killed and restarted");
        self.fleet.wait_all_live(Duration::from_secs(120));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.seen = Snapshot::take(self.fleet);
            let after = self.seen.placements();
            if after == before {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the fleet changed across a restart of every vmhostd: before {before:?}, after {after:?}"
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    pub(super) fn final_checks(mut self) -> Result<Summary, String> {
        let quiet = Instant::now();
        let deadline = quiet + Duration::from_secs(LEASE_TTL_SECS * 8);
        while !leases_held(&self.seen).is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "leases left after quiescing: {:?}",
                    leases_held(&self.seen)
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
            self.seen = Snapshot::take(self.fleet);
        }
        let records = self.strict_checks(quiet)?;
        let running = self.seen.in_state(VmState::Running).len();
        self.timeline.log(format!(
            "all holds: {} VMs ({running} running), {records} disk records in place, no lease left",
            self.model.vms.len(),
        ));
        self.restart_all()?;
        let restarted = Instant::now();
        self.strict_checks(restarted)?;
        self.timeline.log("all holds after every vmhostd restarted");
        let (samples, fullest, over) = self.capacity.finish();
        if let Some(over) = over.first() {
            return Err(format!("a host went over capacity: {over}"));
        }
        if samples < 10 || fullest.vcpus == 0 {
            return Err(format!(
                "only {samples} capacity samples were taken, the fullest host holding {fullest:?}"
            ));
        }
        let accel = self
            .seen
            .hosts
            .iter()
            .find_map(|h| h.vms.as_ref()?.first().map(|v| v.accel.clone()))
            .unwrap_or_else(|| "unknown".into());
        Ok(Summary {
            config_minutes: self.config.minutes,
            seed: self.config.seed,
            vms: self.config.vms,
            accel,
            ops_tried: self.ops_tried,
            ops_ok: self.ops_ok,
            faults: self.faults,
            capacity_samples: samples,
            unexplained_crashes: self.unexplained_crashes,
            logs: None,
        })
    }
}
