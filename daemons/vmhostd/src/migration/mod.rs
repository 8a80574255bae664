//! Moving a running VM between hosts, both ends. This module is the only code that drives
//! QEMU's migration. A migrating VM's machine belongs to its `Departure` (source) or to the
//! arrival's watcher (target) until the migration ends, and each end's phase changes only
//! along its transition table.
//!
//! The fleet side (which target, the lease there, the tunnels) reaches this module through
//! the `TargetHost` trait.

mod incoming;
mod interrupted;
mod outgoing;
mod stream;
#[cfg(test)]
mod tests;

pub use outgoing::{capacity_refusal, Departing, MigrationOptions};

use crate::error::{error_chain, vmm_error};
use crate::host::Host;
use std::path::Path;
use vmhost_api::{ApiError, IncomingMigration};
use vmm::Vm;

const INCOMING_SOCKET: &str = "migrate-in.sock";
const OUTGOING_SOCKET: &str = "migrate-out.sock";
/// The target's NBD export of the arriving disk, and the source's end of its tunnel.
const INCOMING_DISK_SOCKET: &str = "disk-in.sock";
const OUTGOING_DISK_SOCKET: &str = "disk-out.sock";

/// Where the source's migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Marked leaving, agent stopped, lease held on the target.
    Prepared,
    /// Vsock device (and under TCG, hotplug memory) unplugged; the target's QEMU waits.
    Detached,
    /// The disk mirror is copying; the guest still runs here.
    CopyingDisk,
    /// QEMU streams memory; the guest still runs here.
    Streaming,
    /// The target runs the guest and pulls missing pages from here.
    PostcopyActive,
    /// The link broke during post-copy; both halves wait.
    PostcopyPaused,
    /// QEMU completed the migration.
    Completed,
    /// Recorded on disk: the VM is the target's now; this copy never runs again.
    HandedOver,
    /// Failed before the switchover: the VM runs on here.
    Abandoned,
    /// Post-copy left paused; `vmctl migrate --resume` picks it up.
    Stranded,
    /// The target ended its half before QEMU's switch to post-copy reached it. QEMU never
    /// runs a guest again after that switch, and no other copy exists: the VM is crashed
    /// here, with its disk.
    Crashed,
}

use SourcePhase as S;

const SOURCE_TRANSITIONS: &[(SourcePhase, SourcePhase)] = &[
    (S::Prepared, S::Detached),
    (S::Prepared, S::Abandoned),
    (S::Detached, S::CopyingDisk),
    (S::Detached, S::Streaming),
    (S::Detached, S::Abandoned),
    (S::CopyingDisk, S::Streaming),
    (S::CopyingDisk, S::Abandoned),
    (S::Streaming, S::PostcopyActive),
    (S::Streaming, S::Completed),
    (S::Streaming, S::Abandoned),
    (S::PostcopyActive, S::PostcopyPaused),
    (S::PostcopyActive, S::Completed),
    (S::PostcopyActive, S::Stranded),
    (S::PostcopyPaused, S::PostcopyActive),
    (S::PostcopyPaused, S::Completed),
    (S::PostcopyPaused, S::Stranded),
    (S::Stranded, S::PostcopyPaused),
    (S::PostcopyPaused, S::Crashed),
    (S::Completed, S::HandedOver),
    // The source's QEMU died in post-copy: what is left of the VM is the target's.
    (S::PostcopyActive, S::HandedOver),
    (S::PostcopyPaused, S::HandedOver),
];

/// Where the target's arrival stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPhase {
    /// Its QEMU listens for the stream.
    Listening,
    /// Recorded on disk: the guest runs here (post-copy or completed). From here on the
    /// VM's folder holds the only up-to-date disk and is never removed.
    SwitchedOver,
    /// The VM runs here with its devices and memory back.
    Arrived,
    /// Ended before the switchover: the source runs the VM; this copy goes.
    Abandoned,
    /// Its QEMU failed after the switchover: the VM is crashed here, its disk kept, and
    /// `vmctl start` boots it cold.
    Crashed,
}

use TargetPhase as T;

const TARGET_TRANSITIONS: &[(TargetPhase, TargetPhase)] = &[
    (T::Listening, T::SwitchedOver),
    (T::Listening, T::Abandoned),
    (T::SwitchedOver, T::Arrived),
    (T::SwitchedOver, T::Crashed),
];

#[derive(Debug, thiserror::Error)]
#[error("migration of VM '{vm}' cannot go from {from:?} to {to:?}")]
pub struct PhaseError<P: std::fmt::Debug> {
    vm: String,
    from: P,
    to: P,
}

/// One end's phase, changed only along its table.
#[derive(Debug)]
pub struct Phase<P: 'static> {
    vm: String,
    now: P,
    table: &'static [(P, P)],
}

impl<P: Copy + PartialEq + std::fmt::Debug> Phase<P> {
    fn new(vm: &str, now: P, table: &'static [(P, P)]) -> Phase<P> {
        Phase {
            vm: vm.into(),
            now,
            table,
        }
    }

    pub fn now(&self) -> P {
        self.now
    }

    fn go(&mut self, to: P) -> Result<(), PhaseError<P>> {
        if self.table.contains(&(self.now, to)) {
            tracing::debug!(vm = %self.vm, from = ?self.now, ?to, "migration phase");
            self.now = to;
            Ok(())
        } else {
            Err(PhaseError {
                vm: self.vm.clone(),
                from: self.now,
                to,
            })
        }
    }
}

/// What a migration needs of the host it goes to. The fleet implements it over QUIC.
#[async_trait::async_trait]
pub trait TargetHost: Send + Sync {
    fn name(&self) -> &str;
    /// Has the target start a QEMU that waits for the VM.
    async fn prepare(&self, incoming: IncomingMigration) -> Result<(), ApiError>;
    /// Has the target listen again for a post-copy migration whose link broke.
    async fn listen_again(&self, vm: &str) -> Result<(), ApiError>;
    /// Whether the target reports the VM running.
    async fn runs(&self, vm: &str) -> bool;
    /// Drops the lease the target granted for the VM.
    async fn release_lease(&self, lease: u64);
    /// Renews the lease until the guard drops.
    fn keep_lease(&self, lease: u64) -> TaskGuard;
    /// Carries every connection made to `socket` to the target through tunnel `id`.
    fn forward(&self, socket: &Path, tunnel: u64) -> Result<TaskGuard, ApiError>;
}

/// Aborts a background task when dropped, however the migration that started it ends.
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Host {
    /// Gives a VM that runs here after a migration, either way, a vsock device on a fresh
    /// backend: the move took its device away. A device already plugged to a live backend
    /// is kept: a restart that finishes an arrival again must not cut the guest's channel.
    async fn replug_vsock(&self, name: &str, machine: &dyn Vm) {
        let paths = self.paths(name);
        let plugged = async {
            let device = machine.vsock_plugged().await;
            if device.map_err(vmm_error(name, "list its devices"))? {
                if self.hypervisor.vsock_running(&paths.vsock) {
                    return Ok(());
                }
                machine
                    .unplug_vsock(self.config.timeouts.hotplug())
                    .await
                    .map_err(vmm_error(
                        name,
                        "unplug its vsock device, whose backend is gone",
                    ))?;
            }
            self.hypervisor.restart_vsock(&paths.vsock).await?;
            machine
                .plug_vsock(&paths.vsock.vhost_socket)
                .await
                .map_err(vmm_error(name, "plug its vsock device"))
        }
        .await;
        if let Err(error) = plugged {
            tracing::error!(vm = %name, error = %error_chain(&error), "the guest has no vsock device; it cannot reach this host until it restarts");
        }
        if let Ok(slot) = self.slot(name) {
            let size = slot.record().applied;
            self.confine(name, machine.pid(), size);
        }
    }

    /// Plugs back the hotplug memory a move unplugged, if it did.
    async fn restore_memory(&self, name: &str, machine: &dyn Vm, hotplug_memory_bytes: u64) {
        if machine.hotplug_memory().await.ok() != Some(hotplug_memory_bytes) {
            if let Err(error) = machine
                .set_hotplug_memory(hotplug_memory_bytes, self.config.timeouts.hotplug())
                .await
            {
                tracing::warn!(vm = %name, bytes = hotplug_memory_bytes, error = %error_chain(&error), "cannot plug the VM's memory back");
            }
        }
    }
}
