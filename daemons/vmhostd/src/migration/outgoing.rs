//! The source's side: a VM leaving this host. It is detached, streamed through the
//! target's tunnel, switched to post-copy after the first pass, recovered when the link
//! breaks in post-copy, and handed over; or, when it fails before the switchover, it runs
//! on here.

use super::{Phase, SourcePhase, TargetHost, TaskGuard, OUTGOING_DISK_SOCKET, OUTGOING_SOCKET};
use crate::error::{error_chain, internal, vmm_error, HostError};
use crate::host::Host;
use crate::resize;
use crate::store::{Departure, Marker, VmSpec};
use crate::validate;
use crate::vm_table::{Action, VmSlot};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use vmhost_api::{
    ApiError, CreateVm, ErrorKind, IncomingMigration, MigrationProgress, MigrationSummary,
    Resources, VmState, MIGRATION_VERSION,
};
use vmm::qmp::{MigrateSetParameters, RamStats};
use vmm::Vm;

pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// QEMU's default cap (128 MiB/s) would hold every migration below the link's speed.
const UNCAPPED_BYTES_PER_SEC: u64 = 100 << 30;
/// The guest must eject its vsock device (ACPI) within this time.
const VSOCK_EJECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cancelled migration may take to wind down.
pub(super) const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the operator asked of the migration.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    pub postcopy: bool,
    pub max_downtime_ms: Option<u64>,
    pub bandwidth_mib: Option<u64>,
}

/// A VM leaving this host: it owns the VM's QEMU until the migration ends.
pub struct Departing {
    pub spec: VmSpec,
    pub(super) machine: Arc<dyn Vm>,
    /// What it holds now; the target's lease is for this.
    pub size: Resources,
    /// Its plugged virtio-mem memory, plugged again on the target.
    pub(super) hotplug_memory_bytes: u64,
    /// Where its QEMU sends the migration stream.
    pub(super) socket: PathBuf,
    /// Where its QEMU mirrors its disk, if it has one.
    pub(super) disk_socket: Option<PathBuf>,
    /// It switches to post-copy after the first pass.
    pub(super) postcopy: bool,
    /// Its vsock device was unplugged for the move (`detach`): a failure puts one back.
    pub(super) vsock_unplugged: bool,
    pub phase: Phase<SourcePhase>,
}

/// How a migration failed.
pub(super) enum Failure {
    /// Before the switchover: the source still runs the VM.
    BeforeSwitchover(ApiError),
    /// During post-copy, unrecovered: the guest's state is split between the hosts and it
    /// stays paused until an operator resumes the migration.
    Stranded(ApiError),
    /// During post-copy, the source's QEMU died: this host has let go of the VM.
    Lost(ApiError),
    /// During post-copy, the target turned out to have ended its half before the switch
    /// reached it: the VM is crashed here.
    NeverArrived(ApiError),
}

impl Departing {
    /// The migration's start message: what the target needs to receive the VM.
    fn incoming(
        &self,
        lease: u64,
        tunnel: u64,
        disk_tunnel: Option<u64>,
        postcopy: bool,
    ) -> IncomingMigration {
        let spec = &self.spec;
        let (min_cu, max_cu) = spec.launched_bounds.unwrap_or((spec.min_cu, spec.max_cu));
        IncomingMigration {
            version: MIGRATION_VERSION,
            vm: CreateVm {
                min_cu,
                max_cu,
                ..validate::request_for(spec, lease)
            },
            bounds: (spec.min_cu, spec.max_cu),
            vcpus: self.size.vcpus,
            restore_hotplug_memory_bytes: self.hotplug_memory_bytes,
            postcopy,
            tunnel,
            disk_tunnel,
        }
    }

    pub(super) fn go(&mut self, to: SourcePhase) -> Result<(), ApiError> {
        self.phase.go(to).map_err(|e| internal(e.to_string()))
    }
}

/// Sends a migration's phase and stream counters to whoever follows it.
fn reporter<'a>(
    progress: &'a mpsc::Sender<MigrationProgress>,
    vm: &'a str,
    target: &'a str,
    started: Instant,
) -> impl Fn(&str, Option<&RamStats>) + Sync + 'a {
    move |phase, stream| {
        let ram = stream.cloned().unwrap_or_default();
        let _ = progress.try_send(MigrationProgress {
            vm: vm.to_string(),
            target: target.to_string(),
            phase: phase.to_string(),
            transferred_bytes: ram.transferred,
            remaining_bytes: ram.remaining,
            total_bytes: ram.total,
            rate_mbps: ram.mbps,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
    }
}

impl Host {
    /// Marks a running VM as leaving. From now on scaling, stopping, deleting and a second
    /// migration are refused, and its agent is stopped.
    pub async fn begin_departure(&self, name: &str) -> Result<Departing, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let mut record = slot.record();
        let machine = record.machine_for(Action::Migrate)?;
        if let Some(reason) = self.cannot_move_live(name) {
            return Err(HostError::Invalid(format!("VM '{name}' {reason}")));
        }
        self.store.set_marker(name, Marker::Leaving, true)?;
        record
            .become_(VmState::Migrating)
            .map_err(|e| HostError::Invalid(e.to_string()))?;
        record.agent = None;
        record.goal = None;
        Ok(self.departing(
            &record.spec,
            machine,
            record.applied,
            SourcePhase::Prepared,
            false,
        ))
    }

    /// Why a running VM cannot migrate live, if it cannot.
    pub fn cannot_move_live(&self, name: &str) -> Option<String> {
        (self.accel.accel == vmm::Accel::Tcg && self.store.has_marker(name, Marker::VcpuUnplugged))
            .then(|| {
                "had a vCPU unplugged in its current QEMU process; under TCG, QEMU 10.0 then \
                 hangs in the setup of any migration. Stop and start the VM, then migrate it"
                    .to_string()
            })
    }

    pub(super) fn departing(
        &self,
        spec: &VmSpec,
        machine: Arc<dyn Vm>,
        size: Resources,
        phase: SourcePhase,
        vsock_unplugged: bool,
    ) -> Departing {
        let dir = self.store.vm_dir(&spec.name);
        let boot = spec.boot_resources();
        Departing {
            spec: spec.clone(),
            machine,
            size,
            hotplug_memory_bytes: size.memory_bytes.saturating_sub(boot.memory_bytes),
            socket: dir.join(OUTGOING_SOCKET),
            disk_socket: spec.disk_gib.map(|_| dir.join(OUTGOING_DISK_SOCKET)),
            postcopy: true,
            vsock_unplugged,
            phase: Phase::new(&spec.name, phase, super::SOURCE_TRANSITIONS),
        }
    }

    /// Records that the VM is the target's now, so that a restart never runs this copy.
    pub(super) fn record_hand_over(&self, name: &str) {
        if let Err(error) = self.store.set_marker(name, Marker::HandedOver, true) {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot record the hand-over; ending the stale copy anyway");
        }
    }

    /// This host no longer has the VM: its record, files and resources go.
    pub(super) fn let_go(&self, name: &str, slot: &Arc<VmSlot>) {
        self.set_down(&mut slot.record(), VmState::Stopped);
        self.forget(name, slot);
    }

    /// The QEMU of a VM leaving in post-copy exited: the pages it held are lost and the
    /// target's copy (with the newer disk) is the only one left, so this host lets go of
    /// the VM rather than list a stale copy that could be started.
    pub fn lost_in_postcopy(&self, slot: &Arc<VmSlot>) {
        let name = slot.record().spec.name.clone();
        tracing::error!(vm = %name, "the source QEMU exited during post-copy; the VM is the target's alone now");
        self.record_hand_over(&name);
        self.let_go(&name, slot);
    }

    /// A departure whose switch to post-copy never reached its target, which has ended its
    /// half: this QEMU cannot run the guest again and no other copy exists, so the VM is
    /// crashed here with its disk, which the target never wrote.
    async fn crash_departure(&self, departing: &Departing) {
        let name = departing.spec.name.as_str();
        let Ok(slot) = self.slot(name) else { return };
        // Cleared first, so the exit watcher does not take the end for another crash.
        slot.record().machine = None;
        if let Err(error) = departing.machine.terminate().await {
            tracing::warn!(vm = %name, error = %error_chain(&error), "the paused QEMU did not end cleanly");
        }
        self.clear_leaving_markers(name);
        self.set_down(&mut slot.record(), VmState::Crashed);
    }

    /// The VM no longer leaves: a restart must not take it for one that does.
    fn clear_leaving_markers(&self, name: &str) {
        for marker in [Marker::Postcopy, Marker::Leaving] {
            if let Err(error) = self.store.set_marker(name, marker, false) {
                tracing::error!(vm = %name, error = %error_chain(&error), "a restart would take this VM for one still leaving");
            }
        }
    }

    /// Ends a departure before the stream started: the VM runs on here.
    pub async fn abandon_departure(self: &Arc<Self>, mut departing: Departing) {
        let _ = departing.go(SourcePhase::Abandoned);
        self.run_on_here(&departing).await;
    }

    /// Migrates a departing VM to `target` under `lease`, reporting progress as it goes.
    /// A failure before the switchover leaves the VM running here; one in post-copy leaves
    /// it paused on both hosts, to be resumed.
    pub async fn migrate_out(
        self: &Arc<Self>,
        mut departing: Departing,
        target: &dyn TargetHost,
        lease: u64,
        options: MigrationOptions,
        progress: &mpsc::Sender<MigrationProgress>,
    ) -> Result<MigrationSummary, ApiError> {
        let name = departing.spec.name.clone();
        let started = Instant::now();
        let report = reporter(progress, &name, target.name(), started);
        let _renewal = target.keep_lease(lease);
        tracing::info!(vm = %name, target = %target.name(), lease, "migrating VM");
        let prepared = self
            .start_stream(&mut departing, target, lease, &options, &report)
            .await;
        let outcome = match prepared {
            Ok(forwarders) => {
                let outcome = self
                    .follow(&mut departing, target, lease, started, &report)
                    .await;
                drop(forwarders);
                outcome
            }
            Err(error) => {
                target.release_lease(lease).await;
                Err(Failure::BeforeSwitchover(error))
            }
        };
        self.conclude(departing, outcome).await
    }

    /// Finishes a post-copy migration left paused, toward the host it was going to: the
    /// link is recovered and the migration followed to its end as if it had never stopped.
    pub async fn resume_departure(
        self: &Arc<Self>,
        mut departing: Departing,
        departure: Departure,
        target: &dyn TargetHost,
        progress: &mpsc::Sender<MigrationProgress>,
    ) -> Result<MigrationSummary, ApiError> {
        let name = departing.spec.name.clone();
        let started = Instant::now();
        let report = reporter(progress, &name, target.name(), started);
        tracing::info!(vm = %name, target = %target.name(), "resuming a paused post-copy migration");
        let _forwarder = target.forward(&departing.socket, departure.tunnel)?;
        departing.go(SourcePhase::PostcopyPaused)?;
        let outcome = self
            .follow(&mut departing, target, departure.lease, started, &report)
            .await;
        self.conclude(departing, outcome).await
    }

    async fn conclude(
        self: &Arc<Self>,
        mut departing: Departing,
        outcome: Result<MigrationSummary, Failure>,
    ) -> Result<MigrationSummary, ApiError> {
        match outcome {
            Ok(summary) => Ok(summary),
            Err(Failure::BeforeSwitchover(error)) => {
                self.abandon_departure(departing).await;
                Err(error)
            }
            Err(Failure::Lost(error)) => {
                tracing::error!(vm = %departing.spec.name, error = %error.message, "VM lost its source half during post-copy");
                Err(error)
            }
            Err(Failure::NeverArrived(error)) => {
                let _ = departing.go(SourcePhase::Crashed);
                tracing::error!(vm = %departing.spec.name, error = %error.message, "VM crashed mid post-copy: its target never had it");
                self.crash_departure(&departing).await;
                Err(error)
            }
            Err(Failure::Stranded(error)) => {
                let _ = departing.go(SourcePhase::Stranded);
                tracing::error!(vm = %departing.spec.name, error = %error.message, "VM is paused in the middle of a post-copy migration");
                Err(error)
            }
        }
    }

    /// Up to the `migrate` command: records the departure, detaches the guest's devices
    /// while the target starts listening, copies the disk, and starts QEMU's stream.
    async fn start_stream(
        &self,
        departing: &mut Departing,
        target: &dyn TargetHost,
        lease: u64,
        options: &MigrationOptions,
        report: &(impl Fn(&str, Option<&RamStats>) + Sync),
    ) -> Result<Vec<TaskGuard>, ApiError> {
        let name = departing.spec.name.clone();
        departing.postcopy = options.postcopy;
        let tunnel = crate::tunnels::new_tunnel_id();
        let disk_tunnel = departing
            .disk_socket
            .as_ref()
            .map(|_| crate::tunnels::new_tunnel_id());
        let departure = Departure {
            target: target.name().to_string(),
            tunnel,
            lease,
        };
        self.store
            .record_departure(&name, &departure)
            .map_err(HostError::from)?;
        // The target's QEMU starts while the guest ejects its device: neither needs the
        // other, and a failure of either releases the lease, which ends the arrival.
        report("detaching the guest channel and starting the target", None);
        let incoming = departing.incoming(lease, tunnel, disk_tunnel, options.postcopy);
        let (detached, listening) = tokio::join!(
            async {
                (self.detach(departing).await).inspect(|()| report("guest channel detached", None))
            },
            async {
                (target.prepare(incoming).await).inspect(|()| report("target listening", None))
            },
        );
        detached?;
        listening?;
        departing.go(SourcePhase::Detached)?;
        let bandwidth = options
            .bandwidth_mib
            .map_or(UNCAPPED_BYTES_PER_SEC, |mib| mib << 20);
        departing
            .machine
            .prepare_migration(
                options.postcopy,
                MigrateSetParameters {
                    downtime_limit: options.max_downtime_ms,
                    max_bandwidth: Some(bandwidth),
                    max_postcopy_bandwidth: Some(bandwidth),
                },
            )
            .await
            .map_err(|e| internal(format!("cannot set up the migration: {}", error_chain(&e))))?;
        let mut forwarders = Vec::new();
        if let (Some(socket), Some(id)) = (departing.disk_socket.clone(), disk_tunnel) {
            forwarders.push(target.forward(&socket, id)?);
            departing.go(SourcePhase::CopyingDisk)?;
            self.copy_disk(departing, &socket, report).await?;
        }
        forwarders.push(target.forward(&departing.socket, tunnel)?);
        departing
            .machine
            .migrate_to(&departing.socket, false)
            .await
            .map_err(|e| internal(format!("QEMU refused to migrate: {}", error_chain(&e))))?;
        departing.go(SourcePhase::Streaming)?;
        Ok(forwarders)
    }

    /// Gets a leaving VM ready for the stream. Under TCG its virtio-mem memory is unplugged
    /// first, with the monitor's consent: QEMU 9 and later abort while migrating a TCG guest
    /// whose virtio-mem memory is plugged. Then the vsock device goes, which cannot migrate.
    async fn detach(&self, departing: &mut Departing) -> Result<(), HostError> {
        let name = departing.spec.name.as_str();
        let slot = self.slot(name)?;
        if self.accel.accel == vmm::Accel::Tcg && departing.hotplug_memory_bytes > 0 {
            let guest = slot.record().guest.clone();
            let boot = Resources {
                vcpus: departing.size.vcpus,
                memory_bytes: departing.size.memory_bytes - departing.hotplug_memory_bytes,
            };
            let timeout = Duration::from_secs(self.config.guest.downscale_answer_secs);
            resize::ask_guest(name, guest.as_ref(), boot, timeout).await?;
            departing
                .machine
                .set_hotplug_memory(0, self.config.timeouts.hotplug())
                .await
                .map_err(vmm_error(name, "unplug its memory for the move"))?;
        }
        departing
            .machine
            .unplug_vsock(VSOCK_EJECT_TIMEOUT)
            .await
            .map_err(vmm_error(name, "unplug its vsock device"))?;
        departing.vsock_unplugged = true;
        slot.record().guest = None;
        self.hypervisor.stop_vsock(&self.paths(name).vsock);
        Ok(())
    }

    /// Mirrors the VM's disk to the target through `socket` until the copy has caught up;
    /// from then on the mirror takes every guest write until the switchover.
    async fn copy_disk(
        &self,
        departing: &Departing,
        socket: &Path,
        report: &(impl Fn(&str, Option<&RamStats>) + Sync),
    ) -> Result<(), HostError> {
        let name = departing.spec.name.as_str();
        let machine = &departing.machine;
        machine
            .pause_before_switchover()
            .await
            .map_err(vmm_error(name, "prepare the copy of its disk"))?;
        machine
            .start_disk_mirror(socket)
            .await
            .map_err(vmm_error(name, "start copying its disk"))?;
        loop {
            let progress = machine
                .disk_mirror_progress()
                .await
                .map_err(vmm_error(name, "copy its disk"))?;
            let copied = RamStats {
                transferred: progress.copied_bytes,
                remaining: progress.total_bytes.saturating_sub(progress.copied_bytes),
                total: progress.total_bytes,
                ..Default::default()
            };
            report("copying the disk", Some(&copied));
            if progress.ready {
                tracing::info!(vm = %name, bytes = progress.total_bytes, "disk copied; the mirror follows the guest's writes");
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The migration failed before the target took over: the VM runs on here, and gets
    /// its vsock device, its memory and its agent back.
    async fn run_on_here(self: &Arc<Self>, departing: &Departing) {
        let name = departing.spec.name.as_str();
        if departing.disk_socket.is_some() {
            departing.machine.abandon_disk_mirror().await;
        }
        if departing.vsock_unplugged {
            self.replug_vsock(name, departing.machine.as_ref()).await;
        }
        self.restore_memory(
            name,
            departing.machine.as_ref(),
            departing.hotplug_memory_bytes,
        )
        .await;
        let applied = self
            .measure(&departing.spec, departing.machine.as_ref())
            .await;
        let Ok(slot) = self.slot(name) else { return };
        let mut record = slot.record();
        if record.state() != VmState::Migrating || record.machine.is_none() {
            return;
        }
        if let Ok(applied) = applied {
            let _ = self.admission.set(name, applied);
            record.applied = applied;
        }
        let _ = record.become_(VmState::Running);
        if record.guest.is_none() {
            record.guest = self.open_guest_link(name);
        }
        record.agent = self.start_agent(&record.spec);
        self.clear_leaving_markers(name);
        tracing::info!(vm = %name, "VM runs on here after the failed migration");
    }
}

/// The error for a target that refuses to lease room for the VM.
pub fn capacity_refusal(target: &str, vm: &str, size: Resources, reason: String) -> ApiError {
    ApiError::new(
        ErrorKind::CapacityExceeded,
        format!("host '{target}' has no room for VM '{vm}' ({size}): {reason}"),
    )
}
