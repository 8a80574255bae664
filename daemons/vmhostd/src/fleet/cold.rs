//! The source's side of a cold move, for a draining host's VM that cannot move live: lease
//! room on another host, stop it here, copy its disk there with `qemu-img` through a fleet
//! tunnel, have the target boot it, and only then let go of it here. The guest loses its
//! RAM; its disk and spec move. A VM for which no host has room is never stopped. Until the
//! target runs it, the VM stays here, stopped, and a failure starts it here again if it ran
//! before. Once the target was asked to boot it, a failure whose outcome is unknown (the
//! answer lost, or this vmhostd killed) keeps it migrating here, recorded, until the fleet
//! shows where it is: it never runs on two hosts.

use super::*;
use crate::migration::TargetHost;
use crate::store::{ColdMove, Marker};
use crate::validate;
use crate::vm_table::VmSlot;
use tokio::process::Command;
use vmhost_api::{EventKind, PeerRequest, VmMove, VmState};

const COLD_OUT_SOCKET: &str = "cold-out.sock";
/// How often a cold move whose outcome is unknown looks for the VM in the fleet again.
const SETTLE_INTERVAL: Duration = Duration::from_secs(5);

/// How a cold move ended.
enum ColdOutcome {
    /// The host named runs the VM now.
    Moved(String),
    /// No other host ever booted it: the VM is this host's still.
    NotMoved(ApiError),
    /// The target was asked to boot it and its answer is unknown: it may run there, and
    /// the settler finds out.
    Unsettled(ApiError),
}

/// Where the fleet shows a VM that this host moved cold.
enum Whereabouts {
    Elsewhere(String),
    /// Every host answered and none has it, its target among them.
    Nowhere,
    Unknown,
}

impl Fleet {
    /// Moves VM `name` to another host by a stop here and a boot there.
    pub(super) async fn move_cold(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let _permit = self.own_moves.acquire().await.expect("never closed");
        let slot = self.host.slot(name)?;
        let booked = slot.record().spec.clone();
        let (target, lease) = self.lease_room(&booked).await?;
        let _renewals = target.keep_lease(lease);
        let was_running = slot.record().state() == VmState::Running;
        if was_running {
            if let Err(error) = self.host.stop(name).await {
                target.release_lease(lease).await;
                return Err(error.into());
            }
        }
        let operation = slot.operation.lock().await;
        let spec = {
            let mut record = slot.record();
            record
                .become_(VmState::Migrating)
                .map_err(|e| crate::error::internal(e.to_string()))?;
            record.spec.clone()
        };
        match self
            .copy_and_boot_there(&spec, &target, lease, was_running)
            .await
        {
            ColdOutcome::Moved(target) => {
                self.hand_over_cold(name, &slot, &target);
                Ok(())
            }
            ColdOutcome::NotMoved(error) => {
                self.keep_here(name, &slot, operation, was_running).await;
                Err(error)
            }
            ColdOutcome::Unsettled(error) => {
                tracing::error!(vm = %name, host = %target.view.name, error = %error.message, "a cold move's outcome is unknown; the VM stays migrating here until the fleet shows where it is");
                Err(error)
            }
        }
    }

    /// The host named runs the VM now: a restart here must never offer the old copy.
    fn hand_over_cold(&self, name: &str, slot: &Arc<VmSlot>, target: &str) {
        if let Err(error) = self.host.store.set_marker(name, Marker::HandedOver, true) {
            tracing::error!(vm = %name, error = %crate::error::error_chain(&error), "cannot record the hand-over");
        }
        self.host.forget(name, slot);
        self.host.events.record(
            name,
            EventKind::Drain,
            format!("moved cold to host '{target}': stopped here, booted there"),
        );
        self.host.drain.set(
            name,
            VmMove::MovedCold {
                to: target.to_string(),
            },
        );
    }

    /// No other host ever booted the VM: it is stopped here, and starts again if it ran.
    async fn keep_here(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        operation: tokio::sync::MutexGuard<'_, ()>,
        restart: bool,
    ) {
        let _ = slot.record().become_(VmState::Stopped);
        drop(operation);
        if restart {
            if let Err(e) = self.host.start(name).await {
                tracing::error!(vm = %name, error = %crate::error::error_chain(&e), "cannot start the VM again after its cold move failed; it stays stopped here");
            }
        }
    }

    /// Runs for the life of the fleet: settles the cold moves whose outcome was unknown.
    pub(super) fn spawn_cold_settler(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SETTLE_INTERVAL).await;
                let Some(fleet) = weak.upgrade() else { return };
                for vm in fleet.host.list() {
                    if vm.state == VmState::Migrating {
                        fleet.settle_cold_move(&vm.name).await;
                    }
                }
            }
        });
    }

    async fn settle_cold_move(&self, name: &str) {
        let Ok(slot) = self.host.slot(name) else {
            return;
        };
        // A move under way holds it and settles it itself.
        let Ok(operation) = slot.operation.try_lock() else {
            return;
        };
        let Ok(Some(pending)) = self.host.store.cold_move(name) else {
            return;
        };
        match self.whereabouts(name, &pending.target).await {
            Whereabouts::Elsewhere(host) => {
                tracing::warn!(vm = %name, %host, "the VM of an unsettled cold move runs elsewhere; letting go of it here");
                self.hand_over_cold(name, &slot, &host);
            }
            Whereabouts::Nowhere => match self.host.store.end_cold_move(name) {
                Ok(()) => {
                    let reason = format!(
                        "its cold move to host '{}' never booted it there",
                        pending.target
                    );
                    tracing::warn!(vm = %name, "{reason}; it is this host's again");
                    self.keep_here(name, &slot, operation, pending.restart)
                        .await;
                    // A drain tries it again, like any move that failed.
                    self.host.drain.set(name, VmMove::Stuck { reason });
                }
                Err(error) => {
                    tracing::error!(vm = %name, error = %crate::error::error_chain(&error), "cannot clear a settled cold move")
                }
            },
            Whereabouts::Unknown => {}
        }
    }

    /// Where the fleet shows VM `name`, whose cold move went to `target`. A copy that is
    /// still arriving somewhere (no QEMU yet) settles nothing: it boots or is dropped.
    async fn whereabouts(&self, name: &str, target: &str) -> Whereabouts {
        let Reply::FleetVms { vms, unreachable } = self.list().await else {
            return Whereabouts::Unknown;
        };
        let mut elsewhere = vms
            .iter()
            .filter(|vm| vm.name == name && vm.host != self.host.name());
        if let Some(vm) = elsewhere
            .clone()
            .find(|vm| vm.state != VmState::Migrating || vm.pid.is_some())
        {
            return Whereabouts::Elsewhere(vm.host.clone());
        }
        let target_answered = self.live_peers().await.iter().any(|v| v.name == target);
        match elsewhere.next().is_none() && unreachable.is_empty() && target_answered {
            true => Whereabouts::Nowhere,
            false => Whereabouts::Unknown,
        }
    }

    /// Leases room for the VM, at the size it boots at, on the best host.
    async fn lease_room(
        &self,
        spec: &crate::store::VmSpec,
    ) -> Result<(migration::PeerTarget<'_>, u64), ApiError> {
        let name = spec.name.as_str();
        let size = spec.cu_shape.resources(spec.cu);
        let view = self
            .live_peers()
            .await
            .into_iter()
            .filter(|v| v.cu_shape == spec.cu_shape && v.has_room_for(size))
            .filter(|v| v.has_disk_room(spec.disk_gib))
            .filter(|v| super::has_image_of(v, spec))
            .max_by_key(|v| (self.trusted(v), v.free().memory_bytes))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::CapacityExceeded,
                    format!("no other live host has room for VM '{name}' ({size})"),
                )
            })?;
        self.host.drain.set(
            name,
            VmMove::MovingCold {
                to: view.name.clone(),
            },
        );
        let lease = self
            .reserve(&view, name, size)
            .await
            .map_err(|reason| crate::migration::capacity_refusal(&view.name, name, size, reason))?;
        Ok((migration::PeerTarget { fleet: self, view }, lease.id))
    }

    /// Sends the spec and the disk to `target`, under `lease`, and boots the VM there.
    async fn copy_and_boot_there(
        &self,
        spec: &crate::store::VmSpec,
        target: &migration::PeerTarget<'_>,
        lease: u64,
        restart: bool,
    ) -> ColdOutcome {
        let name = spec.name.as_str();
        let disk_tunnel = spec.disk_gib.map(|_| crate::tunnels::new_tunnel_id());
        let arrive = PeerRequest::ColdArrive {
            vm: validate::request_for(spec, lease),
            disk_tunnel,
        };
        if let Err(error) = self.call_peer(&target.view, PeerCall::Peer(arrive)).await {
            target.release_lease(lease).await;
            return ColdOutcome::NotMoved(error);
        }
        let copied = async {
            if let Some(tunnel) = disk_tunnel {
                self.copy_disk(target, name, tunnel).await?;
            }
            // Recorded before the boot is asked for: from then on the VM may run there.
            let pending = ColdMove {
                target: target.view.name.clone(),
                restart,
            };
            self.host
                .store
                .record_cold_move(name, &pending)
                .map_err(|e| ApiError::from(HostError::from(e)))
        }
        .await;
        if let Err(error) = copied {
            self.abandon_there(target, name).await;
            return ColdOutcome::NotMoved(error);
        }
        let start = PeerRequest::ColdStart { name: name.into() };
        let Err(error) = self.call_peer(&target.view, PeerCall::Peer(start)).await else {
            return ColdOutcome::Moved(target.view.name.clone());
        };
        // The target may have booted it and its answer been lost: only its dropping the
        // arrival proves it never ran there. Otherwise the settler finds out where it runs.
        match self.abandon_there(target, name).await && self.host.store.end_cold_move(name).is_ok()
        {
            true => ColdOutcome::NotMoved(error),
            false => ColdOutcome::Unsettled(error),
        }
    }

    /// Asks the target to drop the arrival; true if it did.
    async fn abandon_there(&self, target: &migration::PeerTarget<'_>, name: &str) -> bool {
        let abandon = PeerRequest::ColdAbandon { name: name.into() };
        match self.call_peer(&target.view, PeerCall::Peer(abandon)).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(vm = %name, host = %target.view.name, error = %e, "cannot drop the cold arrival there; its lease will expire and drop it");
                false
            }
        }
    }

    /// Writes the VM's disk into the target's qemu-nbd, skipping what is zero (the target's
    /// new disk is sparse).
    async fn copy_disk(
        &self,
        target: &migration::PeerTarget<'_>,
        name: &str,
        tunnel: u64,
    ) -> Result<(), ApiError> {
        let socket = self.host.store.vm_dir(name).join(COLD_OUT_SOCKET);
        let _forward = target.forward(&socket, tunnel)?;
        let disk = self.host.store.disk_path(name);
        let started = std::time::Instant::now();
        let output = Command::new("qemu-img")
            .args([
                "convert",
                "-n",
                "--target-is-zero",
                "-f",
                "raw",
                "-O",
                "raw",
            ])
            .arg(&disk)
            .arg(format!("nbd+unix:///?socket={}", socket.display()))
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                crate::error::internal(format!("cannot run qemu-img (package qemu-utils): {e}"))
            })?;
        let _ = std::fs::remove_file(&socket);
        if !output.status.success() {
            return Err(crate::error::internal(format!(
                "copying the disk of VM '{name}' failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        tracing::info!(vm = %name, host = %target.view.name, elapsed_ms = started.elapsed().as_millis() as u64, "copied the disk for a cold move");
        Ok(())
    }
}
