//! The target's side of a cold move: a stopped VM of a draining host arrives as its spec
//! and its disk, which the source's `qemu-img` writes into a `qemu-nbd` here through a
//! fleet tunnel. It boots when the source says the copy is whole. Until then its spec is
//! marked incoming, so a restart here drops the partial copy (the source still has the VM).

use crate::admission::LeaseClaim;
use crate::error::{error_chain, internal, HostError};
use crate::host::Host;
use crate::lifecycle::StartAs;
use crate::moves::ColdArrival;
use crate::validate;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};
use vmhost_api::{CreateVm, VmInfo};

const COLD_DISK_SOCKET: &str = "cold-disk.sock";
/// qemu-nbd ends when the source's copy disconnects; past this it is taken as stuck.
const NBD_EXIT_WAIT: Duration = Duration::from_secs(30);
const NBD_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How often a pending cold arrival checks that its source still renews the lease.
const LEASE_CHECK: Duration = Duration::from_secs(2);

impl Host {
    /// Makes room for a VM that `source` moves here cold, under a lease `source` holds,
    /// and opens the disk's receiver on `disk_tunnel`.
    pub async fn prepare_cold_arrival(
        self: &Arc<Self>,
        request: CreateVm,
        disk_tunnel: Option<u64>,
        source: &str,
    ) -> Result<VmInfo, HostError> {
        let Some(lease) = request.lease else {
            return Err(HostError::Invalid(
                "a cold arrival needs a lease on this host".into(),
            ));
        };
        let mut spec = validate::spec_for(&self.config, request)?;
        spec.incoming = true;
        if spec.disk_gib.is_some() != disk_tunnel.is_some() {
            return Err(HostError::Invalid(format!(
                "VM '{}': its disk and the disk tunnel must come together",
                spec.name
            )));
        }
        let size = spec.cu_shape.resources(spec.cu);
        let claim = LeaseClaim {
            id: lease,
            holder: source,
        };
        let name = spec.name.clone();
        let slot = self.admit_arrival(&spec, size, claim)?;
        let nbd = match disk_tunnel {
            None => None,
            Some(tunnel) => match self.serve_disk(&name).await {
                Ok(child) => {
                    let socket = self.store.vm_dir(&name).join(COLD_DISK_SOCKET);
                    self.tunnels.route(tunnel, socket);
                    Some((child, tunnel))
                }
                Err(error) => {
                    self.forget(&name, &slot);
                    return Err(error);
                }
            },
        };
        self.cold.insert(
            &name,
            ColdArrival {
                lease,
                source: source.to_string(),
                nbd,
            },
        );
        tracing::info!(vm = %name, %source, "a VM arrives cold");
        self.watch_cold_arrival(&name, lease, source);
        Ok(self.info(&slot))
    }

    /// Drops the arrival if its source stops renewing the lease without finishing it.
    fn watch_cold_arrival(self: &Arc<Self>, name: &str, lease: u64, source: &str) {
        let host = Arc::downgrade(self);
        let (name, source) = (name.to_string(), source.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_CHECK).await;
                let Some(host) = host.upgrade() else { return };
                if !host.cold.is_pending(&name, lease) {
                    return;
                }
                if !host.admission.holds_lease(lease) {
                    tracing::warn!(vm = %name, %source, lease, "the source of a cold arrival stopped renewing its lease");
                    let _ = host.abandon_cold_arrival(&name, &source);
                    return;
                }
            }
        });
    }

    /// qemu-nbd on the new disk, for one client: it exits when the copy disconnects.
    async fn serve_disk(&self, name: &str) -> Result<Child, HostError> {
        let socket = self.store.vm_dir(name).join(COLD_DISK_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("qemu-nbd")
            .arg("--format=raw")
            .arg(format!("--socket={}", socket.display()))
            .arg(self.store.disk_path(name))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failure(format!("cannot run qemu-nbd (package qemu-utils): {e}")))?;
        let deadline = tokio::time::Instant::now() + NBD_SOCKET_WAIT;
        while !socket.exists() {
            if tokio::time::Instant::now() > deadline {
                return Err(failure(format!(
                    "qemu-nbd did not open {} within {NBD_SOCKET_WAIT:?}",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(child)
    }

    /// The source has sent the whole disk: make it durable, book the VM and boot it.
    pub async fn finish_cold_arrival(
        self: &Arc<Self>,
        name: &str,
        source: &str,
    ) -> Result<VmInfo, HostError> {
        let arrival = self.cold.take(name, source)?;
        let slot = self.slot(name)?;
        let finished = async {
            if let Some((mut child, tunnel)) = arrival.nbd {
                self.tunnels.unroute(tunnel);
                let status = tokio::time::timeout(NBD_EXIT_WAIT, child.wait())
                    .await
                    .map_err(|_| {
                        failure("qemu-nbd still serves the disk after the source finished".into())
                    })?
                    .map_err(|e| failure(format!("cannot wait for qemu-nbd: {e}")))?;
                if !status.success() {
                    return Err(failure(format!("qemu-nbd failed: {status}")));
                }
                sync_file(&self.store.disk_path(name))?;
            }
            let mut spec = slot.record().spec.clone();
            let size = spec.cu_shape.resources(spec.cu);
            let claim = LeaseClaim {
                id: arrival.lease,
                holder: source,
            };
            self.admission.book_new_vm(name, size, Some(claim))?;
            spec.incoming = false;
            spec.run = true;
            spec.launched_bounds = Some((spec.min_cu, spec.max_cu));
            let launched = async {
                self.store.save(&spec)?;
                self.launch(&spec, StartAs::Boot).await
            }
            .await;
            let (machine, budget) = launched.inspect_err(|_| self.admission.release(name))?;
            let mut record = slot.record();
            record.spec = spec;
            record.applied = size;
            record.vcpu_plug_budget = budget;
            self.set_running(&mut record, machine);
            Ok(())
        }
        .await;
        if let Err(error) = finished {
            tracing::error!(vm = %name, %source, error = %error_chain(&error), "cannot finish a cold arrival; dropping it (the source keeps the VM)");
            self.admission.release_lease(arrival.lease);
            self.forget(name, &slot);
            return Err(error);
        }
        tracing::info!(vm = %name, %source, "a VM arrived cold and booted");
        Ok(self.info(&slot))
    }

    /// Drops a cold arrival its source gave up on.
    pub fn abandon_cold_arrival(&self, name: &str, source: &str) -> Result<(), HostError> {
        let arrival = self.cold.take(name, source)?;
        if let Some((_, tunnel)) = &arrival.nbd {
            self.tunnels.unroute(*tunnel);
        }
        self.admission.release_lease(arrival.lease);
        if let Ok(slot) = self.slot(name) {
            self.forget(name, &slot);
        }
        tracing::warn!(vm = %name, %source, "dropped a cold arrival its source gave up on");
        Ok(())
    }
}

fn sync_file(path: &Path) -> Result<(), HostError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| failure(format!("cannot sync {}: {e}", path.display())))
}

fn failure(message: String) -> HostError {
    HostError::Peer(internal(message))
}
