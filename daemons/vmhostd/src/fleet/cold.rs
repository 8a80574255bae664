//! The source's side of a cold move, for a draining host's VM that cannot move live: lease
//! room on another host, stop it here, copy its disk there with `qemu-img` through a fleet
//! tunnel, have the target boot it, and only then let go of it here. The guest loses its
//! RAM; its disk and spec move. A VM for which no host has room is never stopped. Until the
//! target runs it, the VM stays here, stopped, and a failure starts it here again if it ran
//! before.

use super::*;
use crate::migration::TargetHost;
use crate::store::Marker;
use crate::validate;
use tokio::process::Command;
use vmhost_api::{EventKind, PeerRequest, VmMove, VmState};

const COLD_OUT_SOCKET: &str = "cold-out.sock";

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
        let _operation = slot.operation.lock().await;
        let spec = {
            let mut record = slot.record();
            record
                .become_(VmState::Migrating)
                .map_err(|e| crate::error::internal(e.to_string()))?;
            record.spec.clone()
        };
        let moved = self.copy_and_boot_there(&spec, &target, lease).await;
        match moved {
            Ok(target) => {
                // The target runs it now: a restart here must not offer the old copy.
                if let Err(error) = self.host.store.set_marker(name, Marker::HandedOver, true) {
                    tracing::error!(vm = %name, error = %crate::error::error_chain(&error), "cannot record the hand-over");
                }
                self.host.forget(name, &slot);
                self.host.events.record(
                    name,
                    EventKind::Drain,
                    format!("moved cold to host '{target}': stopped here, booted there"),
                );
                self.host.drain.set(name, VmMove::MovedCold { to: target });
                Ok(())
            }
            Err(error) => {
                let _ = slot.record().become_(VmState::Stopped);
                drop(_operation);
                if was_running {
                    if let Err(e) = self.host.start(name).await {
                        tracing::error!(vm = %name, error = %crate::error::error_chain(&e), "cannot start the VM again after its cold move failed; it stays stopped here");
                    }
                }
                Err(error)
            }
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

    /// Sends the spec and the disk to `target`, under `lease`, and boots the VM there;
    /// returns that host.
    async fn copy_and_boot_there(
        &self,
        spec: &crate::store::VmSpec,
        target: &migration::PeerTarget<'_>,
        lease: u64,
    ) -> Result<String, ApiError> {
        let name = spec.name.as_str();
        let disk_tunnel = spec.disk_gib.map(|_| crate::tunnels::new_tunnel_id());
        let arrive = PeerRequest::ColdArrive {
            vm: validate::request_for(spec, lease),
            disk_tunnel,
        };
        if let Err(error) = self.call_peer(&target.view, PeerCall::Peer(arrive)).await {
            target.release_lease(lease).await;
            return Err(error);
        }
        let booted = async {
            if let Some(tunnel) = disk_tunnel {
                self.copy_disk(target, name, tunnel).await?;
            }
            let start = PeerRequest::ColdStart { name: name.into() };
            self.call_peer(&target.view, PeerCall::Peer(start)).await
        }
        .await;
        if let Err(error) = booted {
            let abandon = PeerRequest::ColdAbandon { name: name.into() };
            if let Err(e) = self.call_peer(&target.view, PeerCall::Peer(abandon)).await {
                tracing::warn!(vm = %name, host = %target.view.name, error = %e, "cannot drop the cold arrival there; its lease will expire and drop it");
            }
            return Err(error);
        }
        Ok(target.view.name.clone())
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
