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

/// A VM held in memory. Build one with [`FakeMachine::new`] or [`FakeHypervisor::launch`].
pub struct FakeMachine {
    spec: MachineSpec,
    pid: i32,
    state: Mutex<State>,
    exited: watch::Sender<bool>,
    script: Script,
    /// Set when launched by a [`FakeHypervisor`]: device plugs need its backends.
    backends: Option<Backends>,
}

struct State {
    vcpus: u32,
    /// vCPU plugs left before a TCG QEMU aborts; `None` under KVM.
    plugs_left: Option<u32>,
    hotplug_memory: u64,
    run: StatusInfo,
    /// Waiting for an incoming migration (`-incoming defer`), until one completes.
    incoming: bool,
    migration: MigrationStatus,
    /// Where `continue_switchover` goes from `pre-switchover`.
    after_switchover: Option<MigrationStatus>,
    ram: RamStats,
    error_desc: Option<String>,
    /// The events capability: QEMU sends MIGRATION events only once it is set.
    events_enabled: bool,
    /// Dropped when the process exits, which closes every subscription.
    events: Option<broadcast::Sender<MigrationStatus>>,
    postcopy: Option<bool>,
    parameters: Option<MigrateSetParameters>,
    pause_before_switchover: bool,
    outgoing_socket: Option<PathBuf>,
    incoming_socket: Option<PathBuf>,
    oob_open: bool,
    recoveries: Vec<PathBuf>,
    vsock_plugged: bool,
    export: Option<PathBuf>,
    mirror: Option<Mirror>,
    /// How the next mirror starts, if a test set it before one ran.
    next_mirror: Option<MirrorProgress>,
}

#[derive(Debug, Clone)]
struct Mirror {
    progress: MirrorProgress,
    error: Option<String>,
}

fn run(status: &str, running: bool) -> StatusInfo {
    StatusInfo {
        status: status.into(),
        running,
    }
}

impl FakeMachine {
    /// A running VM (or one awaiting a migration, if `spec.incoming`) as `spec` describes.
    pub fn new(spec: &MachineSpec) -> Arc<FakeMachine> {
        Arc::new(FakeMachine::build(spec, None))
    }

    fn build(spec: &MachineSpec, backends: Option<Backends>) -> FakeMachine {
        let (events, _) = broadcast::channel(64);
        FakeMachine {
            spec: spec.clone(),
            pid: NEXT_PID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(State {
                vcpus: spec.initial_vcpus,
                plugs_left: vcpu_plug_budget(spec.accel, spec.vcpu_slots, spec.initial_vcpus),
                hotplug_memory: spec.initial_hotplug_memory_bytes,
                run: if spec.incoming {
                    run("inmigrate", false)
                } else {
                    run("running", true)
                },
                incoming: spec.incoming,
                migration: MigrationStatus::None,
                after_switchover: None,
                ram: RamStats::default(),
                error_desc: None,
                events_enabled: false,
                events: Some(events),
                postcopy: None,
                parameters: None,
                pause_before_switchover: false,
                outgoing_socket: None,
                incoming_socket: None,
                oob_open: false,
                recoveries: Vec::new(),
                vsock_plugged: spec.vhost_user_vsock.is_some(),
                export: None,
                mirror: None,
                next_mirror: None,
            }),
            exited: watch::channel(false).0,
            script: Script::default(),
            backends,
        }
    }

    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }

    script_controls!();

    /// QEMU dies: `exited` resolves, commands fail, event subscriptions close.
    pub fn crash(&self) {
        self.exit(&mut self.state());
    }

    /// Moves the migration to `status`. Like QEMU, announced to `migration_events` only
    /// once `prepare_migration` has set the events capability.
    pub fn set_migration_status(&self, status: MigrationStatus) {
        self.transition(&mut self.state(), status);
    }

    pub fn migration_status(&self) -> MigrationStatus {
        self.state().migration.clone()
    }

    pub fn set_dirty_sync_count(&self, count: u64) {
        self.state().ram.dirty_sync_count = count;
    }

    pub fn set_ram(&self, ram: RamStats) {
        self.state().ram = ram;
    }

    /// The stream is through. A source told to pause before the switchover stops at
    /// `pre-switchover` first, until `continue_switchover`.
    pub fn complete_migration(&self) {
        let mut st = self.state();
        if st.pause_before_switchover
            && !st.incoming
            && matches!(
                st.migration,
                MigrationStatus::Setup | MigrationStatus::Active
            )
        {
            st.after_switchover = Some(MigrationStatus::Completed);
            self.transition(&mut st, MigrationStatus::PreSwitchover);
        } else {
            self.transition(&mut st, MigrationStatus::Completed);
        }
    }

    /// The migration fails with `reason` (a destination in pre-copy then exits, as QEMU does).
    pub fn fail_migration(&self, reason: &str) {
        let mut st = self.state();
        st.error_desc = Some(reason.into());
        self.transition(&mut st, MigrationStatus::Failed);
    }

    /// The migration stream's link breaks: post-copy pauses, pre-copy fails.
    pub fn break_link(&self) {
        let mut st = self.state();
        if st.migration.is_postcopy() {
            self.transition(&mut st, MigrationStatus::PostcopyPaused);
        } else if st.migration.is_unfinished_precopy() {
            st.error_desc = Some("Unable to write to socket: Broken pipe".into());
            self.transition(&mut st, MigrationStatus::Failed);
        }
    }

    /// Overrides the run state `status` reports until the next migration change.
    pub fn set_run_status(&self, status: &str, running: bool) {
        self.state().run = run(status, running);
    }

    /// The `postcopy` given to `prepare_migration`; `None` before it.
    pub fn postcopy_capability(&self) -> Option<bool> {
        self.state().postcopy
    }

    pub fn migration_parameters(&self) -> Option<MigrateSetParameters> {
        self.state().parameters.clone()
    }

    pub fn pauses_before_switchover(&self) -> bool {
        self.state().pause_before_switchover
    }

    /// Where `migrate_to` last sent the VM.
    pub fn outgoing_socket(&self) -> Option<PathBuf> {
        self.state().outgoing_socket.clone()
    }

    /// Where `listen_incoming` listens.
    pub fn incoming_socket(&self) -> Option<PathBuf> {
        self.state().incoming_socket.clone()
    }

    pub fn oob_monitor_open(&self) -> bool {
        self.state().oob_open
    }

    /// The sockets of every `recover_incoming`, in order.
    pub fn recoveries(&self) -> Vec<PathBuf> {
        self.state().recoveries.clone()
    }

    pub fn vsock_plugged(&self) -> bool {
        self.state().vsock_plugged
    }

    /// The socket the disk is exported at.
    pub fn disk_export(&self) -> Option<PathBuf> {
        self.state().export.clone()
    }

    pub fn disk_mirror(&self) -> Option<MirrorProgress> {
        self.state().mirror.as_ref().map(|m| m.progress)
    }

    /// Sets the running mirror's progress, or, with none, how the next one starts (by
    /// default a mirror is caught up at once).
    pub fn set_mirror_progress(&self, progress: MirrorProgress) {
        let mut st = self.state();
        match &mut st.mirror {
            Some(mirror) => mirror.progress = progress,
            None => st.next_mirror = Some(progress),
        }
    }

    /// The mirror job stops with `error`, as on a write error at the destination.
    pub fn fail_mirror(&self, error: &str) {
        if let Some(mirror) = &mut self.state().mirror {
            mirror.error = Some(error.into());
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn exit(&self, st: &mut State) {
        st.events = None;
        self.exited.send_replace(true);
    }

    fn transition(&self, st: &mut State, status: MigrationStatus) {
        if st.migration == status || *self.exited.borrow() {
            return;
        }
        st.migration = status.clone();
        st.run = match (st.incoming, &status) {
            (true, s) if s.switched_over() => run("running", true),
            (true, _) => run("inmigrate", false),
            (false, MigrationStatus::PreSwitchover | MigrationStatus::Device) => {
                run("finish-migrate", false)
            }
            (false, s) if s.switched_over() => run("postmigrate", false),
            (false, _) => run("running", true),
        };
        if status == MigrationStatus::Completed {
            st.ram.remaining = 0;
            st.ram.transferred = st.ram.transferred.max(st.ram.total);
        }
        if st.events_enabled {
            if let Some(events) = &st.events {
                let _ = events.send(status.clone());
            }
        }
        if st.incoming && status.is_terminal() {
            st.incoming = false;
            // A destination that fails to load a pre-copy stream exits.
            if status == MigrationStatus::Failed {
                self.exit(st);
            }
        }
    }

    async fn enter(&self, step: Step, args: String) -> Result<(), VmmError> {
        self.script
            .enter(step, args, &self.exited)
            .await
            .map_err(|refused| match refused {
                Refused::Injected(Some(error)) => error,
                Refused::Injected(None) => qmp_refused(step.name(), "injected fault"),
                Refused::Exited => qmp_refused(step.name(), "the monitor closed: QEMU exited"),
            })
    }

    /// Quitting a QEMU that is gone succeeds, as with the real one.
    async fn enter_quit(&self, step: Step, args: String) -> Result<bool, VmmError> {
        match self.enter(step, args).await {
            Ok(()) => Ok(true),
            Err(_) if self.exited_now() => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn backend_refuses(&self, vhost_socket: &Path) -> Option<String> {
        let backends = self.backends.as_ref()?;
        let mut backends = backends.lock().unwrap();
        match backends.get_mut(vhost_socket) {
            None => Some(format!(
                "Failed to connect to '{}': No such file or directory",
                vhost_socket.display()
            )),
            Some(backend) if backend.served => Some(format!(
                "vhost-user backend at '{}' already served a device; restart it",
                vhost_socket.display()
            )),
            Some(backend) => {
                backend.served = true;
                None
            }
        }
    }

    /// An outgoing migration under way: QEMU then refuses new capabilities or a second one.
    fn migration_in_progress(st: &State) -> bool {
        !st.incoming && (st.migration.is_unfinished_precopy() || st.migration.is_postcopy())
    }
}

#[async_trait]
impl Vm for FakeMachine {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn exited_now(&self) -> bool {
        *self.exited.borrow()
    }

    async fn exited(&self) {
        let _ = self.exited.subscribe().wait_for(|gone| *gone).await;
    }

    async fn status(&self) -> Result<StatusInfo, VmmError> {
        self.enter(Step::Status, String::new()).await?;
        Ok(self.state().run.clone())
    }

    async fn vcpus(&self) -> Result<u32, VmmError> {
        self.enter(Step::Vcpus, String::new()).await?;
        Ok(self.state().vcpus)
    }

    async fn set_vcpus(&self, target: u32, _timeout: Duration) -> Result<u32, VmmError> {
        self.enter(Step::SetVcpus, target.to_string()).await?;
        let mut st = self.state();
        let (slots, fixed) = (self.spec.vcpu_slots, self.spec.boot_vcpus);
        if target > slots || target < fixed.max(1) {
            return Err(VmmError::VcpusOutOfRange {
                target,
                slots,
                fixed,
            });
        }
        let plugs = target.saturating_sub(st.vcpus);
        if let Some(left) = st.plugs_left {
            // TCG: QEMU aborts on the plug past its translation contexts.
            if plugs > left {
                st.vcpus += left;
                st.plugs_left = Some(0);
                let action = format!("acknowledge vCPU {}", st.vcpus + 1);
                self.exit(&mut st);
                return Err(VmmError::Exited { action });
            }
            st.plugs_left = Some(left - plugs);
        }
        st.vcpus = target;
        Ok(plugs)
    }

    async fn hotplug_memory(&self) -> Result<u64, VmmError> {
        self.enter(Step::HotplugMemory, String::new()).await?;
        Ok(self.state().hotplug_memory)
    }

    async fn set_hotplug_memory(&self, bytes: u64, _timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::SetHotplugMemory, bytes.to_string())
            .await?;
        let region = self.spec.hotplug_memory_bytes;
        if region == 0 {
            return Err(VmmError::NoHotplugMemory);
        }
        if bytes > region {
            return Err(qmp_refused(
                "qom-set",
                format!("'requested-size' cannot exceed the memory backend size of {region}"),
            ));
        }
        if !bytes.is_multiple_of(VIRTIO_MEM_BLOCK_BYTES) {
            return Err(qmp_refused(
                "qom-set",
                format!("'requested-size' must be multiple of {VIRTIO_MEM_BLOCK_BYTES}"),
            ));
        }
        self.state().hotplug_memory = bytes;
        Ok(())
    }

    async fn shutdown(&self, grace: Duration) -> Result<(), VmmError> {
        if self
            .enter_quit(Step::Shutdown, format!("{grace:?}"))
            .await?
        {
            self.exit(&mut self.state());
        }
        Ok(())
    }

    async fn terminate(&self) -> Result<(), VmmError> {
        if self.enter_quit(Step::Terminate, String::new()).await? {
            self.exit(&mut self.state());
        }
        Ok(())
    }

    fn migration_events(&self) -> MigrationEvents {
        let receiver = match &self.state().events {
            Some(events) => events.subscribe(),
            // Gone: a closed subscription, as from a QEMU that exited.
            None => broadcast::channel(1).1,
        };
        MigrationEvents::from_statuses(receiver)
    }

    async fn prepare_migration(
        &self,
        postcopy: bool,
        parameters: MigrateSetParameters,
    ) -> Result<(), VmmError> {
        let args = format!("postcopy={postcopy}, {parameters:?}");
        self.enter(Step::PrepareMigration, args).await?;
        let mut st = self.state();
        if Self::migration_in_progress(&st) {
            return Err(qmp_refused(
                "migrate-set-capabilities",
                "There's a migration process in progress",
            ));
        }
        st.postcopy = Some(postcopy);
        st.events_enabled = true;
        st.parameters = Some(parameters);
        Ok(())
    }

    async fn pause_before_switchover(&self) -> Result<(), VmmError> {
        self.enter(Step::PauseBeforeSwitchover, String::new())
            .await?;
        let mut st = self.state();
        if Self::migration_in_progress(&st) {
            return Err(qmp_refused(
                "migrate-set-capabilities",
                "There's a migration process in progress",
            ));
        }
        st.pause_before_switchover = true;
        Ok(())
    }

    async fn continue_switchover(&self) -> Result<(), VmmError> {
        self.enter(Step::ContinueSwitchover, String::new()).await?;
        let mut st = self.state();
        if st.migration != MigrationStatus::PreSwitchover {
            let message = format!("Migration not in expected state: {}", st.migration.as_str());
            return Err(qmp_refused("migrate-continue", message));
        }
        let next = st
            .after_switchover
            .take()
            .unwrap_or(MigrationStatus::Completed);
        self.transition(&mut st, MigrationStatus::Device);
        self.transition(&mut st, next);
        Ok(())
    }

    async fn listen_incoming(&self, socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::ListenIncoming, socket.display().to_string())
            .await?;
        let mut st = self.state();
        if !st.incoming {
            return Err(qmp_refused(
                "migrate-incoming",
                "'-incoming' was not specified on the command line",
            ));
        }
        if st.migration != MigrationStatus::None {
            return Err(qmp_refused(
                "migrate-incoming",
                "The incoming migration has already been started",
            ));
        }
        st.incoming_socket = Some(socket.to_path_buf());
        self.transition(&mut st, MigrationStatus::Setup);
        Ok(())
    }

    async fn open_oob_monitor(&self, timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::OpenOobMonitor, format!("{timeout:?}"))
            .await?;
        self.state().oob_open = true;
        Ok(())
    }

    async fn recover_incoming(&self, socket: &Path, timeout: Duration) -> Result<(), VmmError> {
        let args = format!("{}, {timeout:?}", socket.display());
        self.enter(Step::RecoverIncoming, args).await?;
        let mut st = self.state();
        if !st.oob_open {
            return Err(VmmError::NoOobMonitor);
        }
        if st.migration != MigrationStatus::PostcopyPaused {
            return Err(qmp_refused(
                "migrate-recover",
                "Migrate recover can only be run when postcopy is paused.",
            ));
        }
        st.recoveries.push(socket.to_path_buf());
        self.transition(&mut st, MigrationStatus::PostcopyRecover);
        Ok(())
    }

    async fn migrate_to(&self, socket: &Path, resume: bool) -> Result<(), VmmError> {
        let args = format!("{}, resume={resume}", socket.display());
        self.enter(Step::MigrateTo, args).await?;
        let mut st = self.state();
        if resume {
            if st.migration != MigrationStatus::PostcopyPaused {
                return Err(qmp_refused(
                    "migrate",
                    "Cannot resume if there is no paused migration",
                ));
            }
            st.outgoing_socket = Some(socket.to_path_buf());
            self.transition(&mut st, MigrationStatus::PostcopyRecover);
            self.transition(&mut st, MigrationStatus::PostcopyActive);
            return Ok(());
        }
        if st.incoming {
            return Err(qmp_refused(
                "migrate",
                "Guest is waiting for an incoming migration",
            ));
        }
        if Self::migration_in_progress(&st) {
            return Err(qmp_refused(
                "migrate",
                "There's a migration process in progress",
            ));
        }
        let total = self.spec.boot_memory_bytes + st.hotplug_memory;
        st.ram = RamStats {
            total,
            remaining: total,
            ..RamStats::default()
        };
        st.error_desc = None;
        st.after_switchover = None;
        st.outgoing_socket = Some(socket.to_path_buf());
        self.transition(&mut st, MigrationStatus::Setup);
        self.transition(&mut st, MigrationStatus::Active);
        Ok(())
    }

    async fn start_postcopy(&self) -> Result<(), VmmError> {
        self.enter(Step::StartPostcopy, String::new()).await?;
        let mut st = self.state();
        if st.postcopy != Some(true) {
            return Err(qmp_refused(
                "migrate-start-postcopy",
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        match st.migration {
            MigrationStatus::None => Err(qmp_refused(
                "migrate-start-postcopy",
                "Postcopy must be started after migration has been started",
            )),
            MigrationStatus::Setup | MigrationStatus::Active if st.pause_before_switchover => {
                st.after_switchover = Some(MigrationStatus::PostcopyActive);
                self.transition(&mut st, MigrationStatus::PreSwitchover);
                Ok(())
            }
            MigrationStatus::Setup | MigrationStatus::Active => {
                self.transition(&mut st, MigrationStatus::PostcopyActive);
                Ok(())
            }
            // QEMU only sets a flag, which a finished migration ignores.
            _ => Ok(()),
        }
    }

    async fn cancel_migration(&self) -> Result<(), VmmError> {
        self.enter(Step::CancelMigration, String::new()).await?;
        let mut st = self.state();
        if st.migration.is_postcopy() {
            // Newer QEMUs refuse; older ones fail the migration and lose the guest.
            return Err(qmp_refused(
                "migrate_cancel",
                "Postcopy migration can't be cancelled",
            ));
        }
        if !st.incoming && st.migration.is_unfinished_precopy() {
            st.after_switchover = None;
            self.transition(&mut st, MigrationStatus::Cancelling);
            self.transition(&mut st, MigrationStatus::Cancelled);
        }
        Ok(())
    }

    async fn migration_info(&self) -> Result<MigrationInfo, VmmError> {
        self.enter(Step::MigrationInfo, String::new()).await?;
        let st = self.state();
        let started = st.migration != MigrationStatus::None;
        let completed = st.migration == MigrationStatus::Completed;
        Ok(MigrationInfo {
            status: st.migration.clone(),
            ram: (started && !st.incoming).then(|| st.ram.clone()),
            downtime: completed.then_some(1),
            total_time: started.then_some(1),
            error_desc: (st.migration == MigrationStatus::Failed)
                .then(|| st.error_desc.clone())
                .flatten(),
        })
    }

    async fn export_disk(&self, socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::ExportDisk, socket.display().to_string())
            .await?;
        let mut st = self.state();
        if st.export.is_some() {
            return Err(qmp_refused(
                "nbd-server-start",
                "NBD server already running",
            ));
        }
        if self.spec.disk.is_none() {
            return Err(qmp_refused(
                "block-export-add",
                "Cannot find device=disk0 nor node-name=disk0",
            ));
        }
        st.export = Some(socket.to_path_buf());
        Ok(())
    }

    async fn unexport_disk(&self) -> Result<(), VmmError> {
        self.enter(Step::UnexportDisk, String::new()).await?;
        match self.state().export.take() {
            Some(_) => Ok(()),
            None => Err(qmp_refused("nbd-server-stop", "NBD server not running")),
        }
    }

    async fn start_disk_mirror(&self, socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::StartDiskMirror, socket.display().to_string())
            .await?;
        let mut st = self.state();
        if self.spec.disk.is_none() {
            return Err(qmp_refused(
                "blockdev-mirror",
                "Cannot find device=disk0 nor node-name=disk0",
            ));
        }
        if st.mirror.is_some() {
            let message = format!("Job ID '{MIRROR_JOB}' already in use");
            return Err(qmp_refused("blockdev-mirror", message));
        }
        let progress = st.next_mirror.take().unwrap_or(MirrorProgress {
            copied_bytes: FAKE_DISK_BYTES,
            total_bytes: FAKE_DISK_BYTES,
            ready: true,
        });
        st.mirror = Some(Mirror {
            progress,
            error: None,
        });
        Ok(())
    }

    async fn disk_mirror_progress(&self) -> Result<MirrorProgress, VmmError> {
        self.enter(Step::DiskMirrorProgress, String::new()).await?;
        match &self.state().mirror {
            None => Err(VmmError::UnexpectedReply {
                property: "block jobs".into(),
                value: format!("the disk mirror '{MIRROR_JOB}' is gone"),
            }),
            Some(Mirror {
                error: Some(error), ..
            }) => Err(VmmError::UnexpectedReply {
                property: "disk mirror".into(),
                value: format!("concluded ({error})"),
            }),
            Some(mirror) => Ok(mirror.progress),
        }
    }

    async fn finish_disk_mirror(&self, timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::FinishDiskMirror, format!("{timeout:?}"))
            .await?;
        let Some(mirror) = self.state().mirror.take() else {
            let message = format!("Block job '{MIRROR_JOB}' not found");
            return Err(qmp_refused("block-job-cancel", message));
        };
        let failure = match (mirror.error, mirror.progress.ready) {
            (Some(error), _) => error,
            (None, false) => "cancelled before it caught up".into(),
            (None, true) => return Ok(()),
        };
        Err(VmmError::UnexpectedReply {
            property: "disk mirror".into(),
            value: failure,
        })
    }

    async fn abandon_disk_mirror(&self) {
        if self
            .enter(Step::AbandonDiskMirror, String::new())
            .await
            .is_ok()
        {
            self.state().mirror = None;
        }
    }

    async fn unplug_vsock(&self, timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::UnplugVsock, format!("{timeout:?}"))
            .await?;
        self.state().vsock_plugged = false;
        Ok(())
    }

    async fn plug_vsock(&self, vhost_socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::PlugVsock, vhost_socket.display().to_string())
            .await?;
        let mut st = self.state();
        if st.vsock_plugged {
            return Err(qmp_refused(
                "chardev-add",
                "attempt to add duplicate property 'vsock0'",
            ));
        }
        if let Some(refusal) = self.backend_refuses(vhost_socket) {
            return Err(qmp_refused("chardev-add", refusal));
        }
        st.vsock_plugged = true;
        Ok(())
    }
}

/// Launches [`FakeMachine`]s, remembers them by VM name, and runs fake vsock backends.
#[derive(Default)]
pub struct FakeHypervisor {
    machines: Mutex<HashMap<String, Arc<FakeMachine>>>,
    backends: Backends,
    script: Script,
    /// Never set: the hypervisor itself does not exit.
    alive: watch::Sender<bool>,
}

impl FakeHypervisor {
    pub fn new() -> Arc<FakeHypervisor> {
        Arc::default()
    }

    script_controls!();

    /// The VM last launched as `name`.
    pub fn machine(&self, name: &str) -> Option<Arc<FakeMachine>> {
        self.machines.lock().unwrap().get(name).cloned()
    }

    /// The control sockets of the running vsock backends.
    pub fn vsock_backends(&self) -> Vec<PathBuf> {
        self.backends.lock().unwrap().keys().cloned().collect()
    }

    async fn enter(&self, step: Step, args: String) -> Result<(), Option<VmmError>> {
        self.script
            .enter(step, args, &self.alive)
            .await
            .map_err(|refused| match refused {
                Refused::Injected(error) => error,
                Refused::Exited => None,
            })
    }

    async fn enter_vsock(&self, step: Step, backend: &VsockBackend) -> Result<(), VsockError> {
        let args = backend.vhost_socket.display().to_string();
        self.enter(step, args)
            .await
            .map_err(|error| VsockError::NotReady {
                socket: backend.vhost_socket.display().to_string(),
                log: error.map_or("injected fault".into(), |e| e.to_string()),
                timeout: Duration::ZERO,
            })
    }
}

/// Why QEMU would refuse to start `spec`, as far as a fake can tell.
fn refuses(spec: &MachineSpec) -> Option<String> {
    if spec.boot_vcpus == 0 || spec.initial_vcpus < spec.boot_vcpus {
        return Some("Invalid CPU topology".into());
    }
    if spec.initial_vcpus > spec.vcpu_slots {
        return Some(format!(
            "{} vCPUs do not fit in maxcpus={}",
            spec.initial_vcpus, spec.vcpu_slots
        ));
    }
    if spec.initial_hotplug_memory_bytes > spec.hotplug_memory_bytes
        || !spec
            .initial_hotplug_memory_bytes
            .is_multiple_of(VIRTIO_MEM_BLOCK_BYTES)
    {
        return Some("virtio-mem: invalid 'requested-size'".into());
    }
    None
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn Vm>, VmmError> {
        self.enter(Step::Launch, spec.name.clone())
            .await
            .map_err(|error| {
                error.unwrap_or(VmmError::LaunchFailed {
                    stderr: "injected fault".into(),
                })
            })?;
        let refused = |stderr: String| Err(VmmError::LaunchFailed { stderr });
        if let Some(why) = refuses(spec) {
            return refused(why);
        }
        if self.machine(&spec.name).is_some_and(|m| !m.exited_now()) {
            return refused(format!("Cannot lock pid file {}", spec.pidfile.display()));
        }
        let machine = Arc::new(FakeMachine::build(spec, Some(self.backends.clone())));
        if let Some(socket) = &spec.vhost_user_vsock {
            if let Some(why) = machine.backend_refuses(socket) {
                return refused(why);
            }
        }
        let mut machines = self.machines.lock().unwrap();
        machines.insert(spec.name.clone(), machine.clone());
        Ok(machine)
    }

    async fn attach(&self, qmp_socket: &Path, pidfile: &Path) -> Result<Arc<dyn Vm>, VmmError> {
        self.enter(Step::Attach, qmp_socket.display().to_string())
            .await
            .map_err(|error| {
                error.unwrap_or_else(|| {
                    VmmError::Qmp(QmpError::Connect {
                        path: qmp_socket.display().to_string(),
                        source: std::io::ErrorKind::ConnectionRefused.into(),
                    })
                })
            })?;
        let machines = self.machines.lock().unwrap();
        let Some(machine) = machines.values().find(|m| m.spec.qmp_socket == qmp_socket) else {
            // Never started: there is no pidfile.
            return Err(VmmError::Pidfile {
                path: pidfile.display().to_string(),
            });
        };
        if machine.exited_now() {
            return Err(VmmError::NotRunning {
                pid: machine.pid,
                qmp_socket: qmp_socket.display().to_string(),
            });
        }
        Ok(machine.clone())
    }

    async fn ensure_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError> {
        self.enter_vsock(Step::EnsureVsock, backend).await?;
        let mut backends = self.backends.lock().unwrap();
        backends.entry(backend.vhost_socket.clone()).or_default();
        Ok(())
    }

    async fn restart_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError> {
        self.enter_vsock(Step::RestartVsock, backend).await?;
        let mut backends = self.backends.lock().unwrap();
        backends.insert(backend.vhost_socket.clone(), Backend::default());
        Ok(())
    }

    fn stop_vsock(&self, backend: &VsockBackend) {
        let socket = backend.vhost_socket.display().to_string();
        self.script.record(Step::StopVsock, socket);
        self.backends.lock().unwrap().remove(&backend.vhost_socket);
    }

    fn vsock_running(&self, backend: &VsockBackend) -> bool {
        self.backends
            .lock()
            .unwrap()
            .contains_key(&backend.vhost_socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::cmdline::Nic;
    use MigrationStatus as S;

    const SHORT: Duration = Duration::from_millis(50);

    fn spec(name: &str) -> MachineSpec {
        MachineSpec {
            name: name.into(),
            accel: Accel::Kvm,
            boot_vcpus: 1,
            initial_vcpus: 2,
            max_vcpus: 4,
            vcpu_slots: 4,
            boot_memory_bytes: 1 << 30,
            hotplug_memory_bytes: 1 << 30,
            initial_hotplug_memory_bytes: 0,
            kernel: "/img/vmlinuz".into(),
            initrd: None,
            kernel_cmdline: String::new(),
            nic: Nic::None,
            disk: Some(format!("/state/{name}/disk.raw").into()),
            spare_root_ports: 0,
            vhost_user_vsock: None,
            incoming: false,
            qmp_socket: format!("/state/{name}/qmp.sock").into(),
            serial_log: format!("/state/{name}/serial.log").into(),
            pidfile: format!("/state/{name}/qemu.pid").into(),
        }
    }

    fn backend(name: &str) -> VsockBackend {
        VsockBackend {
            binary: "vhost-device-vsock".into(),
            vhost_socket: format!("/state/{name}/vhost.sock").into(),
            uds_path: format!("/state/{name}/vsock.sock").into(),
            pidfile: format!("/state/{name}/vsock.pid").into(),
            log: format!("/state/{name}/vsock.log").into(),
        }
    }

    #[tokio::test]
    async fn resizes_within_the_spec_and_logs_commands() {
        let vm = FakeMachine::new(&spec("a"));
        assert_eq!(vm.vcpus().await.unwrap(), 2);
        assert_eq!(vm.set_vcpus(4, SHORT).await.unwrap(), 2);
        assert!(matches!(
            vm.set_vcpus(5, SHORT).await,
            Err(VmmError::VcpusOutOfRange { slots: 4, .. })
        ));
        vm.set_hotplug_memory(512 << 20, SHORT).await.unwrap();
        assert_eq!(vm.hotplug_memory().await.unwrap(), 512 << 20);
        assert!(vm.set_hotplug_memory(2 << 30, SHORT).await.is_err());
        vm.fail_next(Step::SetVcpus);
        assert!(vm.set_vcpus(1, SHORT).await.is_err());
        assert_eq!(vm.set_vcpus(1, SHORT).await.unwrap(), 0);
        let log: Vec<String> = vm.calls().iter().map(ToString::to_string).collect();
        assert_eq!(
            log,
            [
                "vcpus()",
                "set_vcpus(4)",
                "set_vcpus(5)",
                "set_hotplug_memory(536870912)",
                "hotplug_memory()",
                "set_hotplug_memory(2147483648)",
                "set_vcpus(1)",
                "set_vcpus(1)",
            ]
        );
    }

    #[tokio::test]
    async fn tcg_aborts_past_its_plug_budget() {
        let vm = FakeMachine::new(&MachineSpec {
            accel: Accel::Tcg,
            vcpu_slots: 3,
            ..spec("a")
        });
        vm.set_vcpus(3, SHORT).await.unwrap();
        vm.set_vcpus(2, SHORT).await.unwrap();
        assert!(matches!(
            vm.set_vcpus(3, SHORT).await,
            Err(VmmError::Exited { .. })
        ));
        assert!(vm.exited_now());
    }

    #[tokio::test]
    async fn postcopy_migration_with_a_pause_and_a_broken_link() {
        let vm = FakeMachine::new(&spec("a"));
        let mut events = vm.migration_events();
        vm.prepare_migration(true, Default::default())
            .await
            .unwrap();
        vm.pause_before_switchover().await.unwrap();
        vm.migrate_to(Path::new("/s/out.sock"), false)
            .await
            .unwrap();
        assert_eq!(events.next_change(SHORT).await, Some(S::Setup));
        assert_eq!(events.next_change(SHORT).await, Some(S::Active));
        vm.set_dirty_sync_count(2);
        let info = vm.migration_info().await.unwrap();
        assert_eq!(info.ram.unwrap().dirty_sync_count, 2);
        vm.start_postcopy().await.unwrap();
        assert_eq!(vm.migration_status(), S::PreSwitchover);
        assert!(!vm.status().await.unwrap().running);
        vm.continue_switchover().await.unwrap();
        assert_eq!(vm.migration_status(), S::PostcopyActive);
        assert!(vm.cancel_migration().await.is_err());
        vm.break_link();
        assert_eq!(vm.migration_status(), S::PostcopyPaused);
        vm.migrate_to(Path::new("/s/out.sock"), true).await.unwrap();
        vm.complete_migration();
        let mut seen = Vec::new();
        while let Some(status) = events.next_change(SHORT).await {
            seen.push(status);
        }
        assert_eq!(
            seen,
            [
                S::PreSwitchover,
                S::Device,
                S::PostcopyActive,
                S::PostcopyPaused,
                S::PostcopyRecover,
                S::PostcopyActive,
                S::Completed
            ]
        );
        assert_eq!(vm.status().await.unwrap().status, "postmigrate");
    }

    #[tokio::test]
    async fn incoming_side_listens_recovers_and_completes() {
        let vm = FakeMachine::new(&MachineSpec {
            incoming: true,
            ..spec("b")
        });
        assert!(vm.migrate_to(Path::new("/s/x"), false).await.is_err());
        vm.listen_incoming(Path::new("/s/in.sock")).await.unwrap();
        assert_eq!(vm.migration_status(), S::Setup);
        vm.set_migration_status(S::PostcopyPaused);
        assert!(matches!(
            vm.recover_incoming(Path::new("/s/in2.sock"), SHORT).await,
            Err(VmmError::NoOobMonitor)
        ));
        vm.open_oob_monitor(SHORT).await.unwrap();
        vm.recover_incoming(Path::new("/s/in2.sock"), SHORT)
            .await
            .unwrap();
        assert_eq!(vm.recoveries(), [PathBuf::from("/s/in2.sock")]);
        vm.complete_migration();
        let status = vm.status().await.unwrap();
        assert!(status.running && status.status == "running");
        assert_eq!(vm.migration_info().await.unwrap().status, S::Completed);
    }

    #[tokio::test]
    async fn a_failed_precopy_destination_exits() {
        let vm = FakeMachine::new(&MachineSpec {
            incoming: true,
            ..spec("b")
        });
        vm.listen_incoming(Path::new("/s/in.sock")).await.unwrap();
        vm.set_migration_status(S::Active);
        vm.break_link();
        tokio::time::timeout(SHORT, vm.exited()).await.unwrap();
        assert!(vm.migration_info().await.is_err());
        assert!(vm.terminate().await.is_ok());
    }

    #[tokio::test]
    async fn a_stalled_step_waits_for_release_or_the_crash() {
        let vm = FakeMachine::new(&spec("a"));
        vm.stall(Step::MigrateTo);
        let task = {
            let vm = vm.clone();
            tokio::spawn(async move { vm.migrate_to(Path::new("/s/o"), false).await })
        };
        vm.wait_for_call(Step::MigrateTo).await;
        tokio::time::sleep(SHORT).await;
        assert!(!task.is_finished());
        vm.release(Step::MigrateTo);
        task.await.unwrap().unwrap();

        vm.stall(Step::CancelMigration);
        let task = {
            let vm = vm.clone();
            tokio::spawn(async move { vm.cancel_migration().await })
        };
        vm.wait_for_call(Step::CancelMigration).await;
        vm.crash();
        assert!(task.await.unwrap().is_err());
        let mut events = vm.migration_events();
        assert_eq!(events.next_change(SHORT).await, None);
    }

    #[tokio::test]
    async fn disk_mirror_and_export() {
        let vm = FakeMachine::new(&spec("a"));
        assert!(vm.finish_disk_mirror(SHORT).await.is_err());
        vm.set_mirror_progress(MirrorProgress {
            copied_bytes: 1,
            total_bytes: 2,
            ready: false,
        });
        vm.start_disk_mirror(Path::new("/s/d")).await.unwrap();
        assert!(!vm.disk_mirror_progress().await.unwrap().ready);
        assert!(vm.finish_disk_mirror(SHORT).await.is_err());
        vm.start_disk_mirror(Path::new("/s/d")).await.unwrap();
        assert!(vm.disk_mirror_progress().await.unwrap().ready);
        vm.finish_disk_mirror(SHORT).await.unwrap();
        assert_eq!(vm.disk_mirror(), None);

        vm.export_disk(Path::new("/s/e")).await.unwrap();
        assert!(vm.export_disk(Path::new("/s/e")).await.is_err());
        vm.unexport_disk().await.unwrap();
        assert_eq!(vm.disk_export(), None);
    }

    #[tokio::test]
    async fn hypervisor_launches_attaches_and_runs_vsock_backends() {
        let hv = FakeHypervisor::new();
        let with_vsock = MachineSpec {
            vhost_user_vsock: Some(backend("a").vhost_socket),
            ..spec("a")
        };
        // QEMU cannot start without its vsock backend.
        assert!(hv.launch(&with_vsock).await.is_err());
        hv.ensure_vsock(&backend("a")).await.unwrap();
        let vm = hv.launch(&with_vsock).await.unwrap();
        assert!(hv.launch(&with_vsock).await.is_err());
        let fake = hv.machine("a").unwrap();
        assert_eq!(fake.pid(), vm.pid());
        assert!(fake.vsock_plugged());

        // A replug needs a fresh backend.
        vm.unplug_vsock(SHORT).await.unwrap();
        hv.ensure_vsock(&backend("a")).await.unwrap();
        assert!(vm.plug_vsock(&backend("a").vhost_socket).await.is_err());
        hv.restart_vsock(&backend("a")).await.unwrap();
        vm.plug_vsock(&backend("a").vhost_socket).await.unwrap();

        let spec = spec("a");
        let again = hv.attach(&spec.qmp_socket, &spec.pidfile).await.unwrap();
        assert_eq!(again.pid(), vm.pid());
        fake.crash();
        assert!(matches!(
            hv.attach(&spec.qmp_socket, &spec.pidfile).await,
            Err(VmmError::NotRunning { .. })
        ));
        hv.stop_vsock(&backend("a"));
        assert!(!hv.vsock_running(&backend("a")));
        hv.fail_next(Step::Launch);
        assert!(hv.launch(&spec).await.is_err());
        assert_eq!(
            hv.steps(),
            [
                Step::Launch,
                Step::EnsureVsock,
                Step::Launch,
                Step::Launch,
                Step::EnsureVsock,
                Step::RestartVsock,
                Step::Attach,
                Step::Attach,
                Step::StopVsock,
                Step::Launch
            ]
        );
    }
}
