//! The target's side: a VM arriving on this host. A QEMU waits for the stream under the
//! lease this host granted; from the switchover on it holds the only running copy, and
//! its folder the only up-to-date disk, so nothing here removes it after that.

use super::{Phase, TargetPhase, INCOMING_DISK_SOCKET, INCOMING_SOCKET, TARGET_TRANSITIONS};
use crate::admission::LeaseClaim;
use crate::error::{error_chain, vmm_error, HostError};
use crate::host::Host;
use crate::lifecycle::StartAs;
use crate::store::{Marker, VmSpec};
use crate::validate;
use crate::vm_table::{Action, VmRecord, VmSlot};
use std::sync::Arc;
use std::time::Duration;
use vmhost_api::{
    IncomingMigration, Resources, VmInfo, VmState, MIGRATION_VERSION, MIGRATION_VERSION_MIN,
};
use vmm::{MigrationStatus, Vm, VmmError};

const INCOMING_POLL: Duration = Duration::from_millis(100);
/// How often an arrived VM that could not be saved is saved again.
const SAVE_RETRY: Duration = Duration::from_secs(2);

/// What an arriving VM holds: its vCPUs, its boot memory and the hotplug memory it gets back.
fn arrival_size(spec: &VmSpec, incoming: &IncomingMigration) -> Resources {
    Resources {
        vcpus: incoming.vcpus,
        memory_bytes: spec.boot_resources().memory_bytes + incoming.restore_hotplug_memory_bytes,
    }
}

/// An arrival being followed: its QEMU and phase belong to the watcher.
struct Arrival {
    incoming: IncomingMigration,
    size: Resources,
    machine: Arc<dyn Vm>,
    slot: Arc<VmSlot>,
    phase: Phase<TargetPhase>,
}

impl Host {
    /// Starts a QEMU that waits for a migrating VM, under the lease this host granted to
    /// `source`.
    pub async fn prepare_arrival(
        self: &Arc<Self>,
        incoming: IncomingMigration,
        source: &str,
    ) -> Result<VmInfo, HostError> {
        if !(MIGRATION_VERSION_MIN..=MIGRATION_VERSION).contains(&incoming.version) {
            return Err(HostError::Invalid(format!(
                "migration start message version {} is not supported; this host takes {MIGRATION_VERSION_MIN} to {MIGRATION_VERSION}",
                incoming.version
            )));
        }
        let Some(lease) = incoming.vm.lease else {
            return Err(HostError::Invalid(
                "an incoming migration needs a lease on this host".into(),
            ));
        };
        let mut spec = validate::spec_for(&self.config, incoming.vm.clone())?;
        validate::check_arrival(&spec, &incoming)?;
        spec.incoming = true;
        if spec.disk_gib.is_some() != incoming.disk_tunnel.is_some() {
            return Err(HostError::Invalid(format!(
                "VM '{}': its disk and the migration's disk tunnel must come together",
                spec.name
            )));
        }
        let size = arrival_size(&spec, &incoming);
        self.ended_arrivals.clear(&spec.name);
        let claim = LeaseClaim {
            id: lease,
            holder: source,
        };
        let name = spec.name.clone();
        let slot = self.admit_arrival(&spec, size, claim)?;
        let dir = self.store.vm_dir(&name);
        let started = async {
            let record = crate::store::Arrival {
                migration: incoming.clone(),
                source: Some(source.to_string()),
            };
            self.store.record_arrival(&name, &record)?;
            let start = StartAs::Incoming {
                vcpus: incoming.vcpus,
            };
            let (machine, budget) = self.launch(&spec, start).await?;
            let listening = async {
                machine
                    .prepare_migration(incoming.postcopy, Default::default())
                    .await?;
                if incoming.postcopy {
                    machine.open_oob_monitor(self.config.timeouts.qmp()).await?;
                }
                if incoming.disk_tunnel.is_some() {
                    machine.export_disk(&dir.join(INCOMING_DISK_SOCKET)).await?;
                }
                machine.listen_incoming(&dir.join(INCOMING_SOCKET)).await
            }
            .await;
            if let Err(source) = listening {
                let _ = machine.terminate().await;
                return Err(vmm_error(&name, "listen for the migration")(source));
            }
            Ok((machine, budget))
        }
        .await;
        let (machine, budget) = match started {
            Ok(started) => started,
            Err(error) => {
                self.forget(&name, &slot);
                return Err(error);
            }
        };
        {
            let mut record = slot.record();
            record.machine = Some(machine.clone());
            record.vcpu_plug_budget = budget;
        }
        tracing::info!(vm = %name, lease, tunnel = incoming.tunnel, "waiting for an incoming migration");
        let arrival = Arrival {
            phase: Phase::new(&name, TargetPhase::Listening, TARGET_TRANSITIONS),
            incoming,
            size,
            machine,
            slot: slot.clone(),
        };
        self.follow_arrival(arrival);
        Ok(self.info(&slot))
    }

    /// Routes the arrival's tunnels to its QEMU and follows it until it ends.
    fn follow_arrival(self: &Arc<Self>, arrival: Arrival) {
        let dir = self.store.vm_dir(&arrival.incoming.vm.name);
        self.tunnels.open(
            &arrival.incoming,
            dir.join(INCOMING_SOCKET),
            dir.join(INCOMING_DISK_SOCKET),
        );
        let host = self.clone();
        tokio::spawn(async move { host.watch_arrival(arrival).await });
    }

    /// Follows an arriving VM until it runs here (then it becomes this host's VM), the
    /// migration ends without it before the switchover (then everything it held goes), or
    /// its QEMU fails after the switchover (then it is crashed here, its disk kept).
    async fn watch_arrival(self: Arc<Self>, mut arrival: Arrival) {
        let name = arrival.incoming.vm.name.clone();
        let lease = arrival.incoming.vm.lease.unwrap_or_default();
        let machine = arrival.machine.clone();
        let outcome = loop {
            tokio::time::sleep(INCOMING_POLL).await;
            let status = match machine.migration_info().await {
                Ok(info) => info.status,
                Err(_) if machine.exited_now() => break Err("its QEMU exited".to_string()),
                Err(error) => {
                    tracing::debug!(vm = %name, error = %error_chain(&error), "cannot read the incoming migration");
                    continue;
                }
            };
            if status.switched_over() && arrival.phase.now() == TargetPhase::Listening {
                self.switch_over(&mut arrival, lease);
            }
            match status {
                MigrationStatus::Completed => break Ok(()),
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    break Err(format!("the migration {status}"))
                }
                _ if arrival.phase.now() == TargetPhase::Listening
                    && !self.admission.holds_lease(lease) =>
                {
                    break Err("its lease ended: the source stopped renewing it".to_string())
                }
                _ => {}
            }
        };
        self.tunnels.close(&arrival.incoming);
        // No recovery follows the end of a migration: the monitor is free for others.
        machine.close_oob_monitor().await;
        match outcome {
            Ok(()) => self.finish_arrival(arrival).await,
            Err(reason) if arrival.phase.now() == TargetPhase::Listening => {
                tracing::warn!(vm = %name, %reason, "incoming migration abandoned");
                let _ = arrival.phase.go(TargetPhase::Abandoned);
                let _ = machine.terminate().await;
                self.admission.release_lease(lease);
                self.end_before_switchover(&name, &arrival.slot);
            }
            Err(reason) => {
                tracing::error!(vm = %name, %reason, "the arrived VM failed after the switchover; its disk is kept and `vmctl start {name}` boots it from there");
                let _ = arrival.phase.go(TargetPhase::Crashed);
                let _ = machine.terminate().await;
                self.crash_arrival(&arrival.slot, &arrival.incoming);
            }
        }
    }

    /// Drops an arrival that never switched over, remembering that it never ran here.
    fn end_before_switchover(&self, name: &str, slot: &Arc<VmSlot>) {
        if let Ok(Some(source)) = self.store.arrival(name).map(|a| a.and_then(|a| a.source)) {
            self.ended_arrivals.remember(name, &source);
        }
        self.forget(name, slot);
    }

    /// The guest runs here from now on: that is recorded before anything else, and the
    /// lease becomes its allocation, so a link cut that stops renewals cannot free its room.
    fn switch_over(&self, arrival: &mut Arrival, lease: u64) {
        let name = arrival.incoming.vm.name.as_str();
        if let Err(error) = self.store.set_marker(name, Marker::SwitchedOver, true) {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot record the switchover; a restart may not know this copy runs the VM");
        }
        self.admission.commit_arrival(name, lease, arrival.size);
        let _ = arrival.phase.go(TargetPhase::SwitchedOver);
    }

    /// Turns an arrived VM whose QEMU is gone into a crashed VM of this host, with its
    /// disk, startable cold.
    fn crash_arrival(&self, slot: &Arc<VmSlot>, incoming: &IncomingMigration) {
        let mut record = slot.record();
        let name = record.spec.name.clone();
        record.spec.incoming = false;
        record.spec.run = true;
        (record.spec.min_cu, record.spec.max_cu) = incoming.bounds;
        let saved = self
            .store
            .save(&record.spec)
            .and_then(|()| self.store.end_arrival(&name))
            .and_then(|()| self.store.set_marker(&name, Marker::SwitchedOver, false));
        if let Err(error) = saved {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot record the crashed arrival");
        }
        record.machine = None;
        self.set_down(&mut record, VmState::Crashed);
    }

    /// The VM runs here now, with all its memory: it gets its vsock device, its hotplug
    /// memory and its agent.
    async fn finish_arrival(self: &Arc<Self>, mut arrival: Arrival) {
        let incoming = &arrival.incoming;
        let name = incoming.vm.name.as_str();
        let machine = arrival.machine.clone();
        let mut spec = arrival.slot.record().spec.clone();
        spec.incoming = false;
        (spec.min_cu, spec.max_cu) = incoming.bounds;
        let saved = self.save_arrived(&spec);
        arrival.slot.record().spec = spec.clone();
        if let Err(error) = saved {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot save the arrived VM; trying again every {SAVE_RETRY:?}");
            self.save_arrived_later(arrival.slot.clone(), machine.clone());
        }
        if incoming.disk_tunnel.is_some() {
            if let Err(error) = machine.unexport_disk().await {
                tracing::warn!(vm = %name, error = %error_chain(&error), "cannot stop exporting the arrived VM's disk");
            }
        }
        self.replug_vsock(name, machine.as_ref()).await;
        self.restore_memory(
            name,
            machine.as_ref(),
            incoming.restore_hotplug_memory_bytes,
        )
        .await;
        let applied = self
            .measure(&spec, machine.as_ref())
            .await
            .unwrap_or(arrival.size);
        let _ = self.admission.set(name, applied);
        let _ = arrival.phase.go(TargetPhase::Arrived);
        let mut record = arrival.slot.record();
        record.applied = applied;
        self.set_running(&mut record, machine);
        tracing::info!(vm = %name, size = %applied, "migrated VM arrived and runs here");
    }

    /// Records an arrived VM as this host's own: its spec, and no arrival in progress.
    fn save_arrived(&self, spec: &VmSpec) -> Result<(), crate::store::StoreError> {
        self.store
            .save(spec)
            .and_then(|()| self.store.end_arrival(&spec.name))
            .and_then(|()| {
                self.store
                    .set_marker(&spec.name, Marker::SwitchedOver, false)
            })
    }

    /// Saves an arrived VM that could not be saved (a full state filesystem) once it can,
    /// unless it no longer runs here in that QEMU: until then its folder says it arrives.
    fn save_arrived_later(self: &Arc<Self>, slot: Arc<VmSlot>, machine: Arc<dyn Vm>) {
        // Weak: a vmhostd shutting down lets go of its state directory.
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SAVE_RETRY).await;
                let Some(host) = host.upgrade() else {
                    return;
                };
                // Under the record's lock, so no other save of the spec runs meanwhile.
                let record = slot.record();
                let name = record.spec.name.as_str();
                let same_vm = host.vms.get(name).is_ok_and(|s| Arc::ptr_eq(&s, &slot))
                    && record
                        .machine
                        .as_ref()
                        .is_some_and(|m| Arc::ptr_eq(m, &machine));
                if !same_vm {
                    return;
                }
                match host.save_arrived(&record.spec) {
                    Ok(()) => {
                        tracing::info!(vm = %name, "the arrived VM is saved");
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(vm = %name, error = %error_chain(&error), "cannot save the arrived VM yet")
                    }
                }
            }
        });
    }

    /// After a restart, an arriving VM. Before the switchover its migration lost its
    /// stream, so its QEMU ends: the source resumes the VM and the lease expires. From the
    /// switchover on it holds the only running copy, so it is never ended here: it is
    /// followed again, so that the source's recovery can finish the migration; if its
    /// QEMU is gone, the VM is crashed here with its disk; if its QEMU does not answer, it
    /// is kept as it is and listed as migrating.
    pub async fn reattach_arrival(self: &Arc<Self>, spec: VmSpec) {
        let name = spec.name.clone();
        let paths = self.paths(&name);
        let attached = self
            .hypervisor
            .attach(&paths.qmp_socket, &paths.pidfile)
            .await;
        let recorded_switch = self.store.has_marker(&name, Marker::SwitchedOver);
        // Only a QEMU known to be gone, or known not to have switched over, is dropped.
        let status = match &attached {
            Ok(machine) => machine.migration_info().await.map(|i| i.status).ok(),
            Err(VmmError::NotRunning { .. } | VmmError::Pidfile { .. }) => {
                Some(MigrationStatus::None)
            }
            Err(_) => None,
        };
        let switched = recorded_switch || status.as_ref().is_some_and(|s| s.switched_over());
        let arrival = self.store.arrival(&name).map(|a| a.map(|a| a.migration));
        let size = match &arrival {
            Ok(Some(incoming)) => arrival_size(&spec, incoming),
            _ => spec.cu_shape.resources(spec.cu),
        };
        let Ok(slot) = self
            .vms
            .insert(VmRecord::new(spec.clone(), VmState::Migrating, size))
        else {
            return;
        };
        if !switched && status.is_some() {
            if let Ok(machine) = attached {
                let _ = machine.terminate().await;
            }
            tracing::warn!(vm = %name, status = ?status, "dropped a migration that was arriving when this vmhostd stopped");
            self.end_before_switchover(&name, &slot);
            return;
        }
        // From here on it switched over, or its QEMU does not answer. Only a switched-over
        // arrival is this host's allocation; otherwise its lease still covers it.
        if switched {
            self.admission.adopt(&name, size);
        }
        let (machine, incoming) = match (attached, arrival) {
            (Ok(machine), Ok(Some(incoming))) => (machine, incoming),
            (Err(VmmError::NotRunning { .. } | VmmError::Pidfile { .. }), Ok(Some(incoming))) => {
                tracing::error!(vm = %name, "this VM had switched over to this host, and its QEMU is gone: it is crashed here, its disk kept; `vmctl start {name}` boots it");
                self.crash_arrival(&slot, &incoming);
                return;
            }
            (attached, arrival) => {
                let qemu = attached.err().map(|e| error_chain(&e));
                let record = arrival.err().map(|e| error_chain(&e));
                tracing::error!(vm = %name, ?status, ?qemu, ?record, "this vmhostd restarted while the VM was arriving in post-copy, and cannot follow it: its QEMU, which may hold the running guest, is kept as it is, paused, and the VM listed as migrating");
                return;
            }
        };
        slot.record().machine = Some(machine.clone());
        if incoming.postcopy {
            if let Err(error) = machine.open_oob_monitor(self.config.timeouts.qmp()).await {
                tracing::error!(vm = %name, error = %error_chain(&error), "cannot open the out-of-band monitor; a broken link cannot be recovered");
            }
        }
        tracing::warn!(vm = %name, status = ?status, switched, "vmhostd restarted during this VM's arrival; following it again");
        let mut phase = Phase::new(&name, TargetPhase::Listening, TARGET_TRANSITIONS);
        if switched {
            let _ = phase.go(TargetPhase::SwitchedOver);
        }
        self.follow_arrival(Arrival {
            incoming,
            size,
            machine,
            slot,
            phase,
        });
    }

    /// Listens again for a post-copy migration whose link broke, when its source, `from`,
    /// asks.
    pub async fn recover_arrival(&self, name: &str, from: &str) -> Result<VmInfo, HostError> {
        let slot = match self.slot(name) {
            Err(HostError::NotFound(_))
                if self.ended_arrivals.ended_before_switchover(name, from) =>
            {
                return Err(HostError::NeverArrived(name.into()))
            }
            slot => slot?,
        };
        let source = self.store.arrival(name)?.and_then(|a| a.source);
        if source.as_deref().is_some_and(|source| source != from) {
            // As if it were not here: another host learns nothing of it.
            return Err(HostError::NotFound(name.into()));
        }
        let machine = {
            let record = slot.record();
            let machine = record.machine_for(Action::RecoverArrival)?;
            if !record.spec.incoming {
                return Err(HostError::Invalid(format!(
                    "VM '{name}' is not arriving on this host"
                )));
            }
            machine
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
