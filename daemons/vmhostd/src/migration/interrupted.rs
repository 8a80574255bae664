//! The source's side of a departure that was interrupted: one a restarted vmhostd finds,
//! and one left paused in post-copy, which `vmctl migrate --resume` picks up.

use super::outgoing::{Departing, CANCEL_TIMEOUT, POLL_INTERVAL};
use super::SourcePhase;
use crate::error::{error_chain, vmm_error, HostError};
use crate::host::Host;
use crate::store::{Departure, Marker};
use crate::vm_table::{Action, VmSlot};
use std::sync::Arc;
use tokio::time::Instant;
use vmm::qmp::MigrationInfo;
use vmm::MigrationStatus;

impl Host {
    /// A VM whose post-copy migration was left paused, with where it was going: the
    /// migration can be resumed from here.
    pub async fn stranded_departure(
        &self,
        name: &str,
    ) -> Result<(Departing, Departure), HostError> {
        let slot = self.slot(name)?;
        let (spec, machine, size) = {
            let record = slot.record();
            let machine = record.machine_for(Action::ResumeMigration)?;
            if record.spec.incoming {
                return Err(HostError::Invalid(format!(
                    "VM '{name}' is arriving here; its migration is resumed from its source"
                )));
            }
            (record.spec.clone(), machine, record.applied)
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
            .status;
        if status != MigrationStatus::PostcopyPaused {
            return Err(not_stranded(format!("its migration is {status}")));
        }
        Ok((
            self.departing(&spec, machine, size, SourcePhase::Stranded, true),
            departure,
        ))
    }

    /// After a restart, for a VM that was leaving: before the switchover its migration
    /// lost its stream and orchestration, so it is cancelled and the VM runs on here (the
    /// target drops its copy once the lease is no longer renewed). In post-copy the running
    /// copy is the target's, which still needs pages from here: both stay as they are.
    /// QEMU's word decides which: a switch this host asked for may never have been made.
    pub async fn resume_interrupted_departure(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        let (spec, machine) = {
            let record = slot.record();
            let Some(machine) = record.machine.clone() else {
                return;
            };
            (record.spec.clone(), machine)
        };
        let name = spec.name.as_str();
        let status = |info: Result<MigrationInfo, vmm::VmmError>| {
            info.map(|i| i.status).unwrap_or(MigrationStatus::None)
        };
        let mut now = status(machine.migration_info().await);
        if now.is_unfinished_precopy() {
            tracing::warn!(vm = %name, status = %now, "vmhostd restarted during this VM's migration; cancelling it");
            let mut events = machine.migration_events();
            let _ = machine.cancel_migration().await;
            let deadline = Instant::now() + CANCEL_TIMEOUT;
            while now.is_unfinished_precopy() && Instant::now() < deadline {
                events.next_change(POLL_INTERVAL).await;
                now = status(machine.migration_info().await);
            }
        }
        let Ok(run) = machine.status().await else {
            // A QEMU that does not answer: its exit, if it is gone, is handled as such.
            tracing::error!(vm = %name, status = %now, "vmhostd restarted during this VM's migration and its QEMU does not answer; it stays migrating");
            return;
        };
        // A QEMU that arrived here by migration reports that arrival as `completed` until
        // it starts sending: only a source paused after sending its VM (`postmigrate`) has
        // handed it over.
        let sent = now == MigrationStatus::Completed && run.status == "postmigrate";
        if sent {
            tracing::warn!(vm = %name, "vmhostd restarted after this VM's migration completed; handing it over");
            self.record_hand_over(name);
            slot.record().machine = None;
            if let Err(error) = machine.terminate().await {
                tracing::warn!(vm = %name, error = %error_chain(&error), "the migrated-away QEMU did not end cleanly");
            }
            self.let_go(name, slot);
            return;
        }
        // After a failed migration QEMU runs the guest here again, unless it had switched;
        // one still under way after the cancel may switch yet, if that was asked.
        let switch_asked = self.store.has_marker(name, Marker::Postcopy);
        if now.is_postcopy() || (switch_asked && (!run.running || now.is_unfinished_precopy())) {
            tracing::error!(vm = %name, status = %now, "vmhostd restarted during this VM's post-copy migration; it stays paused on both hosts until `vmctl migrate {name} --resume` finishes it");
            return;
        }
        tracing::warn!(vm = %name, status = %now, "the interrupted migration ended before the switchover; the VM runs on here");
        let size = spec.cu_shape.resources(spec.cu);
        // `detach` stops the backend right after the unplug: a running one means the
        // device is still plugged.
        let unplugged = !self.hypervisor.vsock_running(&self.paths(name).vsock);
        let departing = self.departing(&spec, machine, size, SourcePhase::Prepared, unplugged);
        self.abandon_departure(departing).await;
    }
}
