//! Test doubles for [`Vm`] and [`Hypervisor`], for callers' unit tests without QEMU
//! (cargo feature `fake`).
//!
//! They keep state in memory and refuse what QEMU refuses, with errors of the same kind,
//! so a caller's mistake shows up in its tests. Every command is logged, and any step can
//! be made to fail or to hang ([`Step`]). Nothing progresses on its own: a test moves a
//! migration on with [`FakeMachine::set_migration_status`], [`FakeMachine::complete_migration`]
//! and the like. Source and destination are separate fakes, each driven by the test.

use crate::cmdline::{vcpu_plug_budget, MachineSpec, VIRTIO_MEM_BLOCK_BYTES};
use crate::disk_mirror::{MirrorProgress, MIRROR_JOB};
use crate::machine::VmmError;
use crate::migration::MigrationEvents;
use crate::qmp::{MigrateSetParameters, MigrationInfo, QmpError, RamStats, StatusInfo};
use crate::status::MigrationStatus;
use crate::vm::{Hypervisor, Vm};
use crate::vsock::{VsockBackend, VsockError};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// A command a fake can be told to fail or stall, and that its call log names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    // FakeMachine
    Status,
    PauseGuest,
    Vcpus,
    SetVcpus,
    HotplugMemory,
    SetHotplugMemory,
    Shutdown,
    Terminate,
    PrepareMigration,
    PauseBeforeSwitchover,
    ContinueSwitchover,
    ListenIncoming,
    OpenOobMonitor,
    RecoverIncoming,
    MigrateTo,
    StartPostcopy,
    CancelMigration,
    MigrationInfo,
    ExportDisk,
    UnexportDisk,
    StartDiskMirror,
    DiskMirrorProgress,
    FinishDiskMirror,
    /// Returns nothing: a fault makes it leave the mirror as it is.
    AbandonDiskMirror,
    UnplugVsock,
    PlugVsock,
    VsockPlugged,
    // FakeHypervisor
    Launch,
    Attach,
    EnsureVsock,
    RestartVsock,
    /// Synchronous: only logged, it cannot fail or stall.
    StopVsock,
}

impl Step {
    /// The trait method's name.
    pub fn name(self) -> &'static str {
        match self {
            Step::Status => "status",
            Step::PauseGuest => "pause_guest",
            Step::Vcpus => "vcpus",
            Step::SetVcpus => "set_vcpus",
            Step::HotplugMemory => "hotplug_memory",
            Step::SetHotplugMemory => "set_hotplug_memory",
            Step::Shutdown => "shutdown",
            Step::Terminate => "terminate",
            Step::PrepareMigration => "prepare_migration",
            Step::PauseBeforeSwitchover => "pause_before_switchover",
            Step::ContinueSwitchover => "continue_switchover",
            Step::ListenIncoming => "listen_incoming",
            Step::OpenOobMonitor => "open_oob_monitor",
            Step::RecoverIncoming => "recover_incoming",
            Step::MigrateTo => "migrate_to",
            Step::StartPostcopy => "start_postcopy",
            Step::CancelMigration => "cancel_migration",
            Step::MigrationInfo => "migration_info",
            Step::ExportDisk => "export_disk",
            Step::UnexportDisk => "unexport_disk",
            Step::StartDiskMirror => "start_disk_mirror",
            Step::DiskMirrorProgress => "disk_mirror_progress",
            Step::FinishDiskMirror => "finish_disk_mirror",
            Step::AbandonDiskMirror => "abandon_disk_mirror",
            Step::UnplugVsock => "unplug_vsock",
            Step::PlugVsock => "plug_vsock",
            Step::VsockPlugged => "vsock_plugged",
            Step::Launch => "launch",
            Step::Attach => "attach",
            Step::EnsureVsock => "ensure_vsock",
            Step::RestartVsock => "restart_vsock",
            Step::StopVsock => "stop_vsock",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One logged command and its arguments, e.g. `set_vcpus(4)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub step: Step,
    pub args: String,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.step, self.args)
    }
}

/// A fake's call log and its scripted faults.
#[derive(Default)]
struct Script {
    calls: watch::Sender<Vec<Call>>,
    faults: Mutex<HashMap<Step, Faults>>,
    stalled: watch::Sender<HashSet<Step>>,
}

#[derive(Default)]
struct Faults {
    /// `None`: the step's usual injected error.
    once: VecDeque<Option<VmmError>>,
    always: bool,
}

enum Refused {
    Injected(Option<VmmError>),
    Exited,
}

impl Script {
    fn record(&self, step: Step, args: String) {
        self.calls
            .send_modify(|calls| calls.push(Call { step, args }));
    }

    /// Logs the call, waits while the step is stalled, then applies a scripted fault.
    async fn enter(
        &self,
        step: Step,
        args: String,
        exited: &watch::Sender<bool>,
    ) -> Result<(), Refused> {
        self.record(step, args);
        let mut stalled = self.stalled.subscribe();
        let mut exit = exited.subscribe();
        // A stalled command ends when the process does, like a QMP command in flight.
        tokio::select! {
            _ = stalled.wait_for(|s| !s.contains(&step)) => {}
            _ = exit.wait_for(|gone| *gone) => {}
        }
        if *exited.borrow() {
            return Err(Refused::Exited);
        }
        let mut faults = self.faults.lock().unwrap();
        let Some(fault) = faults.get_mut(&step) else {
            return Ok(());
        };
        match fault.once.pop_front() {
            Some(error) => Err(Refused::Injected(error)),
            None if fault.always => Err(Refused::Injected(None)),
            None => Ok(()),
        }
    }

    fn fail_next(&self, step: Step, error: Option<VmmError>) {
        let mut faults = self.faults.lock().unwrap();
        faults.entry(step).or_default().once.push_back(error);
    }

    fn fail_always(&self, step: Step) {
        self.faults.lock().unwrap().entry(step).or_default().always = true;
    }

    fn heal(&self, step: Step) {
        self.faults.lock().unwrap().remove(&step);
    }

    fn stall(&self, step: Step) {
        self.stalled.send_modify(|s| {
            s.insert(step);
        });
    }

    fn release(&self, step: Step) {
        self.stalled.send_modify(|s| {
            s.remove(&step);
        });
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    fn count(&self, step: Step) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|c| c.step == step)
            .count()
    }

    async fn wait_for_calls(&self, step: Step, times: usize) {
        let mut calls = self.calls.subscribe();
        let _ = calls
            .wait_for(|calls| calls.iter().filter(|c| c.step == step).count() >= times)
            .await;
    }
}

/// Forwards the fault-script controls to a fake's `script` field.
macro_rules! script_controls {
    () => {
        /// Makes the next call of `step` fail with a generic error (queued: call it
        /// twice for two failures).
        pub fn fail_next(&self, step: Step) {
            self.script.fail_next(step, None)
        }

        /// Makes the next call of `step` fail with `error`.
        pub fn fail_next_with(&self, step: Step, error: VmmError) {
            self.script.fail_next(step, Some(error))
        }

        /// Makes every call of `step` fail until [`Self::heal`].
        pub fn fail_always(&self, step: Step) {
            self.script.fail_always(step)
        }

        /// Drops the scripted failures of `step`.
        pub fn heal(&self, step: Step) {
            self.script.heal(step)
        }

        /// Calls of `step` hang (after being logged) until [`Self::release`].
        pub fn stall(&self, step: Step) {
            self.script.stall(step)
        }

        pub fn release(&self, step: Step) {
            self.script.release(step)
        }

        /// Every command so far, in order.
        pub fn calls(&self) -> Vec<Call> {
            self.script.calls()
        }

        pub fn steps(&self) -> Vec<Step> {
            self.calls().into_iter().map(|c| c.step).collect()
        }

        pub fn count(&self, step: Step) -> usize {
            self.script.count(step)
        }

        pub fn clear_calls(&self) {
            self.script.calls.send_modify(Vec::clear)
        }

        /// Resolves once `step` has been called (a stalled call counts).
        pub async fn wait_for_call(&self, step: Step) {
            self.script.wait_for_calls(step, 1).await
        }

        pub async fn wait_for_calls(&self, step: Step, times: usize) {
            self.script.wait_for_calls(step, times).await
        }
    };
}

/// The fake pids: far above any kernel's `pid_max`, so a signal to one reaches no process.
static NEXT_PID: AtomicI32 = AtomicI32::new(1 << 30);

/// Bytes of a fake disk, as a mirror reports them.
pub const FAKE_DISK_BYTES: u64 = 1 << 30;

/// vhost-user vsock backends by control socket, shared by a hypervisor and its VMs.
type Backends = Arc<Mutex<HashMap<PathBuf, Backend>>>;

#[derive(Debug, Default)]
struct Backend {
    /// A backend serves one device connection; a replug needs a fresh one.
    served: bool,
}

fn qmp_refused(command: &'static str, message: impl Into<String>) -> VmmError {
    VmmError::Qmp(QmpError::Command {
        command,
        message: message.into(),
    })
}

mod hypervisor;
mod machine;
mod machine_vm;
#[cfg(test)]
mod tests;

pub use hypervisor::FakeHypervisor;
pub use machine::FakeMachine;
