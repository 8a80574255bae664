//! Faults injected at random and undone a few seconds later: a vmhostd, a QEMU or a vsock
//! backend killed, a host's link cut or lossy, its state filesystem full, a guest reset.

use super::fleet::{Fleet, HOSTS, SMALL_FS_HOST};
use super::guest::GuestWatch;
use super::observe::Snapshot;
use super::rng::Rng;
use super::timeline::Timeline;
use crate::procs::kill;
use crate::qmp::Monitor;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use vmhost_api::VmState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    DaemonKill,
    QemuKill,
    VsockKill,
    LinkCut,
    Loss,
    FullFs,
    GuestReset,
}

impl FaultKind {
    const ALL: [FaultKind; 7] = [
        FaultKind::DaemonKill,
        FaultKind::QemuKill,
        FaultKind::VsockKill,
        FaultKind::LinkCut,
        FaultKind::Loss,
        FaultKind::FullFs,
        FaultKind::GuestReset,
    ];
    const WEIGHTS: [u64; 7] = [3, 2, 2, 2, 2, 1, 2];

    /// What one such fault is called.
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::DaemonKill => "vmhostd kill",
            FaultKind::QemuKill => "QEMU kill",
            FaultKind::VsockKill => "vsock backend kill",
            FaultKind::LinkCut => "link cut",
            FaultKind::Loss => "lossy link",
            FaultKind::FullFs => "full state filesystem",
            FaultKind::GuestReset => "guest reset",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undo {
    RestartDaemon(usize),
    LinkUp(usize),
    LossOff(usize),
    FreeFs,
}

#[derive(Default)]
pub struct Faults {
    pending: Vec<(Instant, Undo)>,
    pub counts: BTreeMap<FaultKind, u32>,
    /// VMs whose QEMU the soak ended: a crash of one of these is its doing.
    pub ended_qemus: BTreeSet<String>,
}

/// A running VM outside any migration, with its live QEMU.
fn settled_vms(seen: &Snapshot) -> Vec<(usize, String, i32)> {
    seen.in_state(VmState::Running)
        .into_iter()
        .filter_map(|(h, vm)| {
            let folder = seen.hosts[h].folder(&vm)?;
            let pid = folder
                .qemu_pid
                .filter(|_| !folder.leaving && !folder.arriving)?;
            (seen.listings(&vm).len() == 1).then_some((h, vm, pid))
        })
        .collect()
}

/// Resets the guest through QEMU's second monitor socket, the one vmhostd opens only for a
/// migration. QEMU runs with -no-reboot, so the guest's reset ends it, as a reboot from
/// inside the guest would.
fn reset_guest(socket: &std::path::Path) -> Result<(), String> {
    let mut monitor = Monitor::connect(socket, Duration::from_secs(3))?;
    match monitor.execute("system_reset", serde_json::json!({})) {
        Ok(_) => Ok(()),
        // QEMU may end before it replies: the reset's own SHUTDOWN event says it happened.
        Err(_) if monitor.events.iter().any(|e| e == "SHUTDOWN") => Ok(()),
        Err(e) => Err(e),
    }
}

impl Faults {
    fn network_fault_on(&self) -> bool {
        self.pending
            .iter()
            .any(|(_, u)| matches!(u, Undo::LinkUp(_) | Undo::LossOff(_)))
    }

    fn pending(&self, undo: Undo) -> bool {
        self.pending.iter().any(|(_, u)| *u == undo)
    }

    /// Injects one fault; says what it did, or why it did nothing.
    pub fn inject(
        &mut self,
        rng: &mut Rng,
        fleet: &mut Fleet,
        seen: &Snapshot,
        guests: &mut GuestWatch,
    ) -> String {
        let kind = FaultKind::ALL[rng.weighted(&FaultKind::WEIGHTS)];
        let now = Instant::now();
        let later =
            |rng: &mut Rng, low: u64, high: u64| now + Duration::from_secs(rng.range(low, high));
        let done = match kind {
            FaultKind::DaemonKill => {
                let up: Vec<usize> = (0..HOSTS.len())
                    .filter(|h| !self.pending(Undo::RestartDaemon(*h)))
                    .collect();
                let Some(&host) = rng.pick(&up) else {
                    return "no vmhostd to kill: one is already down".into();
                };
                // README: a target restarted mid-arrival may leave the VM paused on both
                // hosts; that is a documented limit, not something to find again here.
                if seen.hosts[host].folders.iter().any(|f| f.arriving) {
                    return format!(
                        "vmhostd kill of {} skipped: a VM is arriving there",
                        HOSTS[host]
                    );
                }
                fleet.hosts[host].kill_daemon();
                self.pending
                    .push((later(rng, 2, 7), Undo::RestartDaemon(host)));
                format!("SIGKILL vmhostd of {}", HOSTS[host])
            }
            FaultKind::QemuKill | FaultKind::GuestReset => {
                let Some((host, vm, pid)) = rng.pick(&settled_vms(seen)).cloned() else {
                    return "no settled running VM to end".into();
                };
                self.ended_qemus.insert(vm.clone());
                if kind == FaultKind::QemuKill {
                    kill(pid);
                    format!("SIGKILL QEMU {pid} of {vm} on {}", HOSTS[host])
                } else {
                    let socket = fleet.vm_dir(host, &vm).join("qmp.oob.sock");
                    if let Err(e) = reset_guest(&socket) {
                        return format!("guest reset of {vm} on {} not done: {e}", HOSTS[host]);
                    }
                    format!(
                        "guest reset of {vm} on {} (QEMU runs with -no-reboot)",
                        HOSTS[host]
                    )
                }
            }
            FaultKind::VsockKill => {
                let backends: Vec<(usize, String, i32)> = settled_vms(seen)
                    .into_iter()
                    .filter_map(|(h, vm, _)| {
                        let pid =
                            std::fs::read_to_string(fleet.vm_dir(h, &vm).join("vsock.pid")).ok()?;
                        Some((h, vm, pid.trim().parse().ok()?))
                    })
                    .filter(|(_, _, pid)| crate::process_alive(*pid))
                    .collect();
                let Some((host, vm, pid)) = rng.pick(&backends).cloned() else {
                    return "no vsock backend to kill".into();
                };
                kill(pid);
                format!(
                    "SIGKILL vhost-device-vsock {pid} of {vm} on {}",
                    HOSTS[host]
                )
            }
            FaultKind::LinkCut | FaultKind::Loss => {
                if self.network_fault_on() {
                    return "network fault skipped: one is on".into();
                }
                let host = rng.range(0, HOSTS.len() as u64) as usize;
                if kind == FaultKind::LinkCut {
                    fleet.lab.set_uplink(host, false);
                    // Some cuts outlast the post-copy recovery window.
                    self.pending.push((later(rng, 2, 16), Undo::LinkUp(host)));
                    format!("link of {} cut", HOSTS[host])
                } else {
                    fleet.lab.set_loss(host, Some(20));
                    self.pending.push((later(rng, 10, 25), Undo::LossOff(host)));
                    format!("link of {} drops 20% each way", HOSTS[host])
                }
            }
            FaultKind::FullFs => {
                if self.pending(Undo::FreeFs) {
                    return "full filesystem skipped: it is full already".into();
                }
                guests.fs_full(fleet, SMALL_FS_HOST);
                match fleet.small_fs().fill() {
                    Ok(bytes) => {
                        self.pending.push((later(rng, 8, 16), Undo::FreeFs));
                        format!(
                            "state filesystem of {} filled ({bytes} B)",
                            HOSTS[SMALL_FS_HOST]
                        )
                    }
                    Err(e) => {
                        fleet.small_fs().free();
                        guests.fs_freed(fleet, SMALL_FS_HOST);
                        return format!("cannot fill the state filesystem: {e}");
                    }
                }
            }
        };
        *self.counts.entry(kind).or_default() += 1;
        done
    }

    /// Undoes the faults that are due (all of them with `all`); fails if a vmhostd does
    /// not come back.
    pub fn undo(
        &mut self,
        all: bool,
        fleet: &mut Fleet,
        guests: &mut GuestWatch,
        timeline: &Timeline,
    ) -> Result<(), String> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self
            .pending
            .drain(..)
            .partition(|(at, _)| all || *at <= now);
        self.pending = later;
        for (_, undo) in due {
            match undo {
                Undo::RestartDaemon(host) => {
                    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        fleet.hosts[host].start_daemon()
                    }));
                    if started.is_err() {
                        return Err(format!("vmhostd of {} did not come back up", HOSTS[host]));
                    }
                    timeline.log(format!("vmhostd of {} restarted", HOSTS[host]));
                }
                Undo::LinkUp(host) => {
                    fleet.lab.set_uplink(host, true);
                    timeline.log(format!("link of {} back", HOSTS[host]));
                }
                Undo::LossOff(host) => {
                    fleet.lab.set_loss(host, None);
                    timeline.log(format!("packet loss of {} over", HOSTS[host]));
                }
                Undo::FreeFs => {
                    fleet.small_fs().free();
                    guests.fs_freed(fleet, SMALL_FS_HOST);
                    timeline.log(format!(
                        "state filesystem of {} freed",
                        HOSTS[SMALL_FS_HOST]
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn total(&self) -> u32 {
        self.counts.values().sum()
    }

    pub fn breakdown(&self) -> String {
        self.counts
            .iter()
            .map(|(kind, n)| format!("{n} {}{}", kind.label(), if *n == 1 { "" } else { "s" }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
