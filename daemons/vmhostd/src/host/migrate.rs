//! Both ends of a migration as far as this host's VMs go: a VM leaving (detach, resume
//! after a failure, hand over) and a VM arriving (a QEMU waiting for the stream, then the
//! VM it becomes). The fleet side (target, lease, tunnel, progress) is `crate::migration`.

use super::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use vmhost_api::IncomingMigration;
use vmm::qmp::MigrationInfo;

const INCOMING_SOCKET: &str = "migrate-in.sock";
const OUTGOING_SOCKET: &str = "migrate-out.sock";
/// The target's NBD export of the arriving disk, and the source's end of its tunnel.
const INCOMING_DISK_SOCKET: &str = "disk-in.sock";
const OUTGOING_DISK_SOCKET: &str = "disk-out.sock";
/// The guest must eject its vsock device (ACPI) within this time.
const VSOCK_EJECT_TIMEOUT: Duration = Duration::from_secs(30);
const INCOMING_POLL: Duration = Duration::from_millis(100);
/// How long a cancelled migration may take to wind down.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's statuses of a migration still under way before the switchover.
const UNFINISHED: [&str; 5] = ["setup", "active", "pre-switchover", "device", "cancelling"];

/// What an arriving VM holds: its vCPUs, its boot memory and the hotplug memory it gets back.
fn arrival_size(spec: &VmSpec, incoming: &IncomingMigration) -> Resources {
    Resources {
        vcpus: incoming.vcpus,
        memory_bytes: spec.cu_shape.resources(spec.min_cu).memory_bytes
            + incoming.restore_hotplug_memory_bytes,
    }
}

/// Where the tunnel of each arriving migration is delivered: the unix socket its QEMU
/// listens on.
#[derive(Default)]
pub struct TunnelTargets(Mutex<HashMap<u64, PathBuf>>);

impl TunnelTargets {
    pub fn get(&self, id: u64) -> Option<PathBuf> {
        self.lock().get(&id).cloned()
    }

    /// Routes an arrival's tunnels: its stream to `socket`, its disk to `disk_socket`.
    fn open(&self, incoming: &IncomingMigration, socket: PathBuf, disk_socket: PathBuf) {
        let mut tunnels = self.lock();
        tunnels.insert(incoming.tunnel, socket);
        if let Some(disk_tunnel) = incoming.disk_tunnel {
            tunnels.insert(disk_tunnel, disk_socket);
        }
    }

    fn close(&self, incoming: &IncomingMigration) {
        let mut tunnels = self.lock();
        tunnels.remove(&incoming.tunnel);
        if let Some(disk_tunnel) = incoming.disk_tunnel {
            tunnels.remove(&disk_tunnel);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, PathBuf>> {
        self.0.lock().expect("tunnel table lock poisoned")
    }
}

/// A VM leaving this host.
pub struct Outgoing {
    pub spec: VmSpec,
    pub machine: Arc<Machine>,
    /// What it holds now; the target's lease is for this.
    pub size: Resources,
    /// Its plugged virtio-mem memory, plugged again on the target.
    pub hotplug_memory_bytes: u64,
    /// Where its QEMU sends the migration stream.
    pub socket: PathBuf,
    /// Where its QEMU mirrors its disk, if it has one.
    pub disk_socket: Option<PathBuf>,
}

impl Outgoing {
    /// What the target needs to receive it.
    pub fn incoming(
        &self,
        lease: u64,
        tunnel: u64,
        disk_tunnel: Option<u64>,
        postcopy: bool,
    ) -> IncomingMigration {
        let spec = &self.spec;
        let (min_cu, max_cu) = spec.launched_bounds.unwrap_or((spec.min_cu, spec.max_cu));
        IncomingMigration {
            vm: CreateVm {
                name: spec.name.clone(),
                image: spec.image.clone(),
                min_cu,
                max_cu,
                cu: Some(spec.cu),
                autoscale: spec.autoscale,
                agent: spec.agent.clone(),
                lease: Some(lease),
                disk_gib: spec.disk_gib,
            },
            bounds: (spec.min_cu, spec.max_cu),
            vcpus: self.size.vcpus,
            restore_hotplug_memory_bytes: self.hotplug_memory_bytes,
            postcopy,
            tunnel,
            disk_tunnel,
        }
    }
}

impl Host {
    /// Marks a running VM as leaving. From now on scaling, stopping, deleting and a second
    /// migration are refused, and its agent is stopped.
    pub async fn begin_outgoing(&self, name: &str) -> Result<Outgoing, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let mut record = slot.record();
        let machine = match (&record.machine, record.state) {
            (Some(machine), VmState::Running) => machine.clone(),
            _ => return Err(Self::wrong_state(&record, "migrate")),
        };
        if self.accel.accel == vmm::Accel::Tcg && self.store.has_marker(name, Marker::VcpuUnplugged)
        {
            return Err(HostError::Invalid(format!(
                "VM '{name}' had a vCPU unplugged in its current QEMU process; under TCG, QEMU 10.0 \
                 then hangs in the setup of any migration. Stop and start the VM, then migrate it"
            )));
        }
        self.store.set_marker(name, Marker::Leaving, true)?;
        record.state = VmState::Migrating;
        record.agent = None;
        record.goal = None;
        Ok(self.outgoing(&record.spec, machine, record.applied))
    }

    /// Records where a leaving VM goes, for a later resume of its post-copy.
    pub fn record_departure(&self, name: &str, departure: &Departure) -> Result<(), HostError> {
        Ok(self.store.record_departure(name, departure)?)
    }

    /// A VM whose post-copy migration was left paused, with where it was going: the
    /// migration can be resumed from here.
    pub async fn stranded_outgoing(&self, name: &str) -> Result<(Outgoing, Departure), HostError> {
        let slot = self.slot(name)?;
        let (spec, machine, size) = {
            let record = slot.record();
            match (&record.machine, record.state, record.spec.incoming) {
                (Some(machine), VmState::Migrating, false) => {
                    (record.spec.clone(), machine.clone(), record.applied)
                }
                _ => return Err(Self::wrong_state(&record, "resume the migration of")),
            }
        };
        let not_stranded = |why: String| {
            HostError::Invalid(format!(
                "VM '{name}' has no paused post-copy migration to resume: {why}"
            ))
        };
        let departure = self
            .store
            .departure(name)?
            .ok_or_else(|| not_stranded("its target was never chosen".into()))?;
        let status = machine
            .migration_info()
            .await
            .map_err(vmm_error(name, "read its migration"))?
            .status
            .unwrap_or_default();
        if status != "postcopy-paused" {
            return Err(not_stranded(format!("its migration is {status}")));
        }
        Ok((self.outgoing(&spec, machine, size), departure))
    }

    fn outgoing(&self, spec: &VmSpec, machine: Arc<Machine>, size: Resources) -> Outgoing {
        let dir = self.store.vm_dir(&spec.name);
        let boot = spec.cu_shape.resources(spec.min_cu);
        Outgoing {
            spec: spec.clone(),
            machine,
            size,
            hotplug_memory_bytes: size.memory_bytes.saturating_sub(boot.memory_bytes),
            socket: dir.join(OUTGOING_SOCKET),
            disk_socket: spec.disk_gib.map(|_| dir.join(OUTGOING_DISK_SOCKET)),
        }
    }

    /// After a restart, for a VM that was leaving: before the switchover its migration
    /// lost its stream and orchestration, so it is cancelled and the VM runs on here (the
    /// target drops its copy once the lease is no longer renewed). In post-copy the running
    /// copy is the target's, which still needs pages from here: both stay as they are.
    pub(super) async fn resume_interrupted_outgoing(self: &Arc<Self>, spec: VmSpec) {
        let name = spec.name.as_str();
        let Some(machine) = self
            .slot(name)
            .ok()
            .and_then(|s| s.record().machine.clone())
        else {
            return;
        };
        let status = |info: Result<MigrationInfo, VmmError>| {
            info.ok().and_then(|i| i.status).unwrap_or_default()
        };
        let now = status(machine.migration_info().await);
        if now.starts_with("postcopy") {
            tracing::error!(vm = %name, status = %now, "vmhostd restarted during this VM's post-copy migration; it stays paused on both hosts until `vmctl migrate {name} --resume` finishes it");
            return;
        }
        tracing::warn!(vm = %name, status = %now, "vmhostd restarted during this VM's migration; cancelling it, the VM runs on here");
        let mut events = machine.migration_events();
        let _ = machine.cancel_migration().await;
        let deadline = tokio::time::Instant::now() + CANCEL_TIMEOUT;
        while UNFINISHED.contains(&status(machine.migration_info().await).as_str())
            && tokio::time::Instant::now() < deadline
        {
            events.next_change(INCOMING_POLL).await;
        }
        let size = spec.cu_shape.resources(spec.cu);
        self.resume_outgoing(&self.outgoing(&spec, machine, size))
            .await;
    }

    /// Gets a leaving VM ready for the stream. Under TCG its virtio-mem memory is unplugged
    /// first, with the monitor's consent: QEMU 9 and later abort while migrating a TCG guest
    /// whose virtio-mem memory is plugged. Then the vsock device goes, which cannot migrate.
    pub async fn detach_for_migration(&self, out: &Outgoing) -> Result<(), HostError> {
        let name = out.spec.name.as_str();
        let slot = self.slot(name)?;
        if self.accel.accel == vmm::Accel::Tcg && out.hotplug_memory_bytes > 0 {
            let guest = slot.record().guest.clone();
            let boot = Resources {
                vcpus: out.size.vcpus,
                memory_bytes: out.size.memory_bytes - out.hotplug_memory_bytes,
            };
            let timeout = Duration::from_secs(self.config.guest.downscale_answer_secs);
            match &guest {
                Some(guest) => guest.ask_downscale(guest_size(boot), timeout).await,
                None => Err(DownscaleError::NotConnected),
            }
            .map_err(|source| HostError::Downscale {
                name: name.into(),
                source,
            })?;
            out.machine
                .set_hotplug_memory(0, self.config.timeouts.hotplug())
                .await
                .map_err(vmm_error(name, "unplug its memory for the move"))?;
        }
        out.machine
            .unplug_vsock(VSOCK_EJECT_TIMEOUT)
            .await
            .map_err(vmm_error(name, "unplug its vsock device"))?;
        slot.record().guest = None;
        self.paths(name).vsock.stop();
        Ok(())
    }

    /// The migration failed before the target took over: the VM runs on here, and gets
    /// its vsock device, its memory and its agent back.
    pub async fn resume_outgoing(self: &Arc<Self>, out: &Outgoing) {
        let name = out.spec.name.as_str();
        if out.disk_socket.is_some() {
            out.machine.abandon_disk_mirror().await;
        }
        let paths = self.paths(name);
        let replugged = async {
            paths.vsock.restart().await?;
            out.machine
                .plug_vsock(&paths.vsock.vhost_socket)
                .await
                .map_err(vmm_error(name, "plug its vsock device back"))
        }
        .await;
        if let Err(error) = replugged {
            tracing::error!(vm = %name, error = %error_chain(&error), "the guest has no vsock device; it cannot reach this host until it restarts");
        }
        let memory = self.measure(&out.spec, &out.machine).await;
        if memory.is_ok_and(|m| m.memory_bytes < out.size.memory_bytes) {
            let boot = out.size.memory_bytes - out.hotplug_memory_bytes;
            if let Err(error) = out
                .machine
                .set_hotplug_memory(out.hotplug_memory_bytes, self.config.timeouts.hotplug())
                .await
            {
                tracing::warn!(vm = %name, boot, error = %error_chain(&error), "cannot plug the VM's memory back");
            }
        }
        let applied = self.measure(&out.spec, &out.machine).await;
        let Ok(slot) = self.slot(name) else { return };
        let mut record = slot.record();
        if record.state != VmState::Migrating || record.machine.is_none() {
            return;
        }
        if let Ok(applied) = applied {
            let _ = self.ledger().set(name, applied);
            record.applied = applied;
        }
        record.state = VmState::Running;
        record.guest = self.open_guest_link(name);
        record.agent = self.start_agent(&record.spec);
        if let Err(error) = self.store.set_marker(name, Marker::Leaving, false) {
            tracing::warn!(vm = %name, error = %error_chain(&error), "a restart would take this VM for one still leaving");
        }
        tracing::info!(vm = %name, "VM runs on here after the failed migration");
    }

    /// The target runs the VM now: this QEMU ends and the VM leaves this host.
    pub async fn finish_outgoing(&self, out: &Outgoing) {
        let name = out.spec.name.as_str();
        let Ok(slot) = self.slot(name) else { return };
        // Cleared first, so the exit watcher does not take the end for a crash.
        slot.record().machine = None;
        if let Err(error) = out.machine.terminate().await {
            tracing::warn!(vm = %name, error = %error_chain(&error), "the migrated-away QEMU did not end cleanly");
        }
        self.set_down(&mut slot.record(), VmState::Stopped);
        if let Err(error) = self.store.remove_vm(name) {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot remove the files of a VM that moved away");
        }
        net::remove_tap(name);
        self.stats.forget(name);
        self.vms().remove(name);
    }

    /// Starts a QEMU that waits for a migrating VM, under the lease this host granted.
    pub(super) async fn prepare_incoming(
        self: &Arc<Self>,
        incoming: IncomingMigration,
    ) -> Result<VmInfo, HostError> {
        let Some(lease) = incoming.vm.lease else {
            return Err(HostError::Invalid(
                "an incoming migration needs a lease on this host".into(),
            ));
        };
        let mut spec = self.spec_for(incoming.vm.clone())?;
        spec.incoming = true;
        if spec.disk_gib.is_some() != incoming.disk_tunnel.is_some() {
            return Err(HostError::Invalid(format!(
                "VM '{}': its disk and the migration's disk tunnel must come together",
                spec.name
            )));
        }
        let boot = spec.cu_shape.resources(spec.min_cu);
        let size = arrival_size(&spec, &incoming);
        self.check_lease(lease, &spec.name, size)?;
        let name = spec.name.clone();
        let slot = self.insert_slot(&spec, size, VmState::Migrating)?;
        let socket = self.store.vm_dir(&name).join(INCOMING_SOCKET);
        let disk_socket = self.store.vm_dir(&name).join(INCOMING_DISK_SOCKET);
        let started = async {
            self.store.create_vm(&spec)?;
            self.store.record_arrival(&name, &incoming)?;
            let start = StartAs::Incoming(Resources {
                vcpus: incoming.vcpus,
                memory_bytes: boot.memory_bytes,
            });
            let (machine, budget) = self.launch(&spec, start).await?;
            let listening = async {
                machine
                    .prepare_migration(incoming.postcopy, Default::default())
                    .await?;
                if incoming.postcopy {
                    machine.open_oob_monitor(self.config.timeouts.qmp()).await?;
                }
                if incoming.disk_tunnel.is_some() {
                    machine.export_disk(&disk_socket).await?;
                }
                machine.listen_incoming(&socket).await
            }
            .await;
            if let Err(source) = listening {
                let _ = machine.terminate().await;
                return Err(HostError::Vmm {
                    name: name.clone(),
                    action: "listen for the migration",
                    source,
                });
            }
            Ok((machine, budget))
        }
        .await;
        let (machine, budget) = match started {
            Ok(started) => started,
            Err(error) => {
                self.forget_incoming(&name);
                return Err(error);
            }
        };
        {
            let mut record = slot.record();
            record.machine = Some(machine.clone());
            record.vcpu_plug_budget = budget;
        }
        tracing::info!(vm = %name, lease, tunnel = incoming.tunnel, "waiting for an incoming migration");
        self.follow_arrival(incoming, size, machine, false);
        Ok(self.info(&slot))
    }

    /// Routes the arrival's tunnels to its QEMU and follows it until it ends.
    /// `committed`: the lease is already the VM's allocation.
    fn follow_arrival(
        self: &Arc<Self>,
        incoming: IncomingMigration,
        size: Resources,
        machine: Arc<Machine>,
        committed: bool,
    ) {
        let dir = self.store.vm_dir(&incoming.vm.name);
        self.tunnels.open(
            &incoming,
            dir.join(INCOMING_SOCKET),
            dir.join(INCOMING_DISK_SOCKET),
        );
        let host = self.clone();
        tokio::spawn(async move {
            host.watch_incoming(incoming, size, machine, committed)
                .await
        });
    }

    fn check_lease(&self, id: LeaseId, name: &str, size: Resources) -> Result<(), HostError> {
        let ledger = self.ledger();
        let held = ledger
            .leases()
            .find(|l| l.id == id)
            .ok_or(LedgerError::UnknownLease(id))?;
        if held.vm != name || held.resources != size {
            return Err(HostError::Invalid(format!(
                "lease {id} is for VM '{}' of {}, not '{name}' of {size}",
                held.vm, held.resources
            )));
        }
        Ok(())
    }

    /// Follows an arriving VM until it runs here (then it becomes this host's VM) or the
    /// migration ends without it (then everything it held goes).
    async fn watch_incoming(
        self: Arc<Self>,
        incoming: IncomingMigration,
        size: Resources,
        machine: Arc<Machine>,
        mut committed: bool,
    ) {
        let name = incoming.vm.name.clone();
        let lease = incoming.vm.lease.unwrap_or_default();
        let outcome = loop {
            tokio::time::sleep(INCOMING_POLL).await;
            let status = match machine.migration_info().await {
                Ok(info) => info.status.unwrap_or_default(),
                Err(_) if machine.exited_now() => break Err("its QEMU exited".to_string()),
                Err(error) => {
                    tracing::debug!(vm = %name, error = %error_chain(&error), "cannot read the incoming migration");
                    continue;
                }
            };
            // From the switchover on, this is the only running copy: the lease becomes its
            // allocation then, so a link cut that stops renewals cannot free its room.
            let switched = status == "completed" || status.starts_with("postcopy");
            if switched && !committed {
                self.commit_arrival(&name, lease, size);
                committed = true;
            }
            match status.as_str() {
                "completed" => break Ok(()),
                "failed" | "cancelled" => break Err(format!("the migration {status}")),
                _ if !committed && !self.ledger().leases().any(|l| l.id == lease) => {
                    break Err("its lease ended: the source stopped renewing it".to_string())
                }
                _ => {}
            }
        };
        self.tunnels.close(&incoming);
        match outcome {
            Ok(()) => self.finish_incoming(&incoming, size, machine).await,
            Err(reason) => {
                tracing::warn!(vm = %name, %reason, "incoming migration abandoned");
                let _ = machine.terminate().await;
                let mut ledger = self.ledger();
                if committed {
                    ledger.release(&name);
                } else if ledger.release_lease(lease).is_some() {
                    self.persist_leases(&ledger);
                }
                drop(ledger);
                self.forget_incoming(&name);
            }
        }
    }

    /// Turns the migration's lease into the VM's allocation.
    fn commit_arrival(&self, name: &str, lease: LeaseId, size: Resources) {
        if let Err(error) = self.book_new_vm(name, size, Some(lease)) {
            // The guest runs here whatever the lease says; book what it holds.
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot commit the migration's lease; booking the VM anyway");
            self.ledger().adopt(name, size);
        }
    }

    /// The VM runs here now, with all its memory: it gets its vsock device, its hotplug
    /// memory and its agent.
    async fn finish_incoming(
        self: &Arc<Self>,
        incoming: &IncomingMigration,
        size: Resources,
        machine: Arc<Machine>,
    ) {
        let name = incoming.vm.name.as_str();
        let Ok(slot) = self.slot(name) else { return };
        let mut spec = slot.record().spec.clone();
        spec.incoming = false;
        (spec.min_cu, spec.max_cu) = incoming.bounds;
        if let Err(error) = self
            .store
            .save(&spec)
            .and_then(|()| self.store.end_arrival(name))
        {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot save the arrived VM; a restart would lose track of it");
        }
        slot.record().spec = spec.clone();
        if incoming.disk_tunnel.is_some() {
            if let Err(error) = machine.unexport_disk().await {
                tracing::warn!(vm = %name, error = %error_chain(&error), "cannot stop exporting the arrived VM's disk");
            }
        }
        let paths = self.paths(name);
        let plugged = async {
            paths.vsock.ensure_running().await?;
            machine
                .plug_vsock(&paths.vsock.vhost_socket)
                .await
                .map_err(vmm_error(name, "plug its vsock device"))
        }
        .await;
        if let Err(error) = plugged {
            tracing::error!(vm = %name, error = %error_chain(&error), "the arrived guest has no vsock device; it cannot reach this host until it restarts");
        }
        let boot = spec.cu_shape.resources(spec.min_cu).memory_bytes;
        if machine.hotplug_memory().await.ok() != Some(incoming.restore_hotplug_memory_bytes) {
            if let Err(error) = machine
                .set_hotplug_memory(
                    incoming.restore_hotplug_memory_bytes,
                    self.config.timeouts.hotplug(),
                )
                .await
            {
                tracing::warn!(vm = %name, boot, error = %error_chain(&error), "cannot plug the arrived VM's memory back");
            }
        }
        let applied = self.measure(&spec, &machine).await.unwrap_or(size);
        let _ = self.ledger().set(name, applied);
        let mut record = slot.record();
        record.applied = applied;
        self.set_running(&mut record, machine);
        tracing::info!(vm = %name, size = %applied, "migrated VM arrived and runs here");
    }

    /// Drops an arriving VM that never became this host's: its record, files and tap.
    fn forget_incoming(&self, name: &str) {
        self.vms().remove(name);
        if let Err(error) = self.store.remove_vm(name) {
            tracing::warn!(vm = %name, error = %error_chain(&error), "cannot remove an abandoned incoming VM's files");
        }
        net::remove_tap(name);
    }

    /// After a restart, an arriving VM. Before the switchover its migration lost its
    /// stream, so its QEMU ends: the source resumes the VM and the lease expires. From the
    /// switchover on it holds the only running copy, so it is never ended here: it is
    /// followed again, so that the source's recovery can finish the migration, or, if its
    /// QEMU does not answer, kept as it is and listed as migrating.
    pub(super) async fn reattach_incoming(self: &Arc<Self>, spec: VmSpec) {
        let name = spec.name.clone();
        let paths = self.paths(&name);
        let attached = Machine::attach(
            &paths.qmp_socket,
            &paths.pidfile,
            self.config.timeouts.qmp(),
        )
        .await;
        // Only a QEMU known to be gone, or known not to have switched over, is dropped.
        let status = match &attached {
            Ok(machine) => match machine.migration_info().await {
                Ok(info) => info.status.unwrap_or_default(),
                Err(_) => "unreachable".into(),
            },
            Err(VmmError::NotRunning { .. } | VmmError::Pidfile { .. }) => "gone".into(),
            Err(_) => "unreachable".into(),
        };
        let switched = status == "completed" || status.starts_with("postcopy");
        if !switched && status != "unreachable" {
            if let Ok(machine) = attached {
                let _ = machine.terminate().await;
            }
            tracing::warn!(vm = %name, %status, "dropped a migration that was arriving when this vmhostd stopped");
            self.forget_incoming(&name);
            return;
        }
        let arrival = self.store.arrival(&name);
        let size = match &arrival {
            Ok(Some(incoming)) => arrival_size(&spec, incoming),
            _ => spec.cu_shape.resources(spec.cu),
        };
        let Ok(slot) = self.insert_slot(&spec, size, VmState::Migrating) else {
            return;
        };
        self.ledger().adopt(&name, size);
        let (machine, incoming) = match (attached, arrival) {
            (Ok(machine), Ok(Some(incoming))) => (Arc::new(machine), incoming),
            (attached, arrival) => {
                let qemu = attached.err().map(|e| error_chain(&e));
                let record = arrival.err().map(|e| error_chain(&e));
                tracing::error!(vm = %name, %status, ?qemu, ?record, "this vmhostd restarted while the VM was arriving in post-copy, and cannot follow it: its QEMU, which may hold the running guest, is kept as it is, paused, and the VM listed as migrating");
                return;
            }
        };
        slot.record().machine = Some(machine.clone());
        if incoming.postcopy {
            if let Err(error) = machine.open_oob_monitor(self.config.timeouts.qmp()).await {
                tracing::error!(vm = %name, error = %error_chain(&error), "cannot open the out-of-band monitor; a broken link cannot be recovered");
            }
        }
        tracing::warn!(vm = %name, %status, "vmhostd restarted during this VM's arrival, after the switchover; following it again");
        self.follow_arrival(incoming, size, machine, true);
    }

    /// Listens again for a post-copy migration whose link broke.
    pub(super) async fn recover_incoming(&self, name: &str) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let machine = {
            let record = slot.record();
            match (&record.machine, record.state, record.spec.incoming) {
                (Some(machine), VmState::Migrating, true) => machine.clone(),
                _ => return Err(Self::wrong_state(&record, "recover the migration of")),
            }
        };
        let socket = self.store.vm_dir(name).join(INCOMING_SOCKET);
        machine
            .recover_incoming(&socket, self.config.timeouts.qmp())
            .await
            .map_err(vmm_error(name, "listen again for its migration"))?;
        tracing::info!(vm = %name, "listening again for the broken post-copy migration");
        Ok(self.info(&slot))
    }
}
