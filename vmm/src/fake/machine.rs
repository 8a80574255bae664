//! The fake of one QEMU.

use super::*;

/// A VM held in memory. Build one with [`FakeMachine::new`] or [`FakeHypervisor::launch`].
pub struct FakeMachine {
    pub(super) spec: MachineSpec,
    pub(super) pid: i32,
    pub(super) state: Mutex<State>,
    pub(super) exited: watch::Sender<bool>,
    pub(super) script: Script,
    /// Set when launched by a [`FakeHypervisor`]: device plugs need its backends.
    pub(super) backends: Option<Backends>,
}

pub(super) struct State {
    pub(super) vcpus: u32,
    /// vCPU plugs left before a TCG QEMU aborts; `None` under KVM.
    pub(super) plugs_left: Option<u32>,
    pub(super) hotplug_memory: u64,
    pub(super) run: StatusInfo,
    /// Waiting for an incoming migration (`-incoming defer`), until one completes.
    pub(super) incoming: bool,
    pub(super) migration: MigrationStatus,
    /// Where `continue_switchover` goes from `pre-switchover`.
    pub(super) after_switchover: Option<MigrationStatus>,
    pub(super) ram: RamStats,
    pub(super) error_desc: Option<String>,
    /// The events capability: QEMU sends MIGRATION events only once it is set.
    pub(super) events_enabled: bool,
    /// Dropped when the process exits, which closes every subscription.
    pub(super) events: Option<broadcast::Sender<MigrationStatus>>,
    pub(super) postcopy: Option<bool>,
    pub(super) parameters: Option<MigrateSetParameters>,
    pub(super) pause_before_switchover: bool,
    /// QEMU switches to post-copy at its next iteration, not on the request: a test holds
    /// it in pre-copy to act in between.
    pub(super) postcopy_switch_held: bool,
    pub(super) outgoing_socket: Option<PathBuf>,
    pub(super) incoming_socket: Option<PathBuf>,
    pub(super) oob_open: bool,
    pub(super) recoveries: Vec<PathBuf>,
    pub(super) vsock_plugged: bool,
    pub(super) export: Option<PathBuf>,
    pub(super) mirror: Option<Mirror>,
    /// How the next mirror starts, if a test set it before one ran.
    pub(super) next_mirror: Option<MirrorProgress>,
}

#[derive(Debug, Clone)]
pub(super) struct Mirror {
    pub(super) progress: MirrorProgress,
    pub(super) error: Option<String>,
}

pub(super) fn run(status: &str, running: bool) -> StatusInfo {
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

    pub(super) fn build(spec: &MachineSpec, backends: Option<Backends>) -> FakeMachine {
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
                postcopy_switch_held: false,
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
        self.fail_migration_locked(&mut self.state(), reason);
    }

    fn fail_migration_locked(&self, st: &mut State, reason: &str) {
        st.error_desc = Some(reason.into());
        self.transition(st, MigrationStatus::Failed);
    }

    /// QEMU makes the switch to post-copy it was asked for and then fails the migration,
    /// both between two of the caller's polls: the guest stays paused here for good.
    pub fn fail_after_the_switch(&self, reason: &str) {
        let mut st = self.state();
        st.migration = MigrationStatus::PostcopyActive;
        self.fail_migration_locked(&mut st, reason);
        st.run = run("postmigrate", false);
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

    /// `start_postcopy` is accepted but the migration stays in pre-copy.
    pub fn hold_postcopy_switch(&self) {
        self.state().postcopy_switch_held = true;
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

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub(super) fn exit(&self, st: &mut State) {
        st.events = None;
        self.exited.send_replace(true);
    }

    pub(super) fn transition(&self, st: &mut State, status: MigrationStatus) {
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

    pub(super) async fn enter(&self, step: Step, args: String) -> Result<(), VmmError> {
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
    pub(super) async fn enter_quit(&self, step: Step, args: String) -> Result<bool, VmmError> {
        match self.enter(step, args).await {
            Ok(()) => Ok(true),
            Err(_) if self.exited_now() => Ok(false),
            Err(error) => Err(error),
        }
    }

    pub(super) fn backend_refuses(&self, vhost_socket: &Path) -> Option<String> {
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
    pub(super) fn migration_in_progress(st: &State) -> bool {
        !st.incoming && (st.migration.is_unfinished_precopy() || st.migration.is_postcopy())
    }
}
