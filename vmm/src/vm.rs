//! The VM and hypervisor as traits, so that callers can run against test doubles (see
//! `fake`) as well as QEMU. [`Machine`] and [`Qemu`] are the real ones.

use crate::cmdline::MachineSpec;
use crate::disk_mirror::MirrorProgress;
use crate::machine::{Machine, VmmError};
use crate::migration::MigrationEvents;
use crate::qmp::{MigrateSetParameters, MigrationInfo, StatusInfo};
use crate::vsock::{VsockBackend, VsockError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One running VM: what [`Machine`] offers on a QEMU.
#[async_trait]
pub trait Vm: Send + Sync {
    // Lifecycle and size.

    fn pid(&self) -> i32;
    /// Whether the VM's process has gone away.
    fn exited_now(&self) -> bool;
    /// Resolves when the VM's process goes away.
    async fn exited(&self);
    /// QEMU's run state (`running`, `inmigrate`, `postmigrate`, ...).
    async fn status(&self) -> Result<StatusInfo, VmmError>;
    /// Stops the guest's vCPUs (QMP `stop`); QEMU runs on.
    async fn pause_guest(&self) -> Result<(), VmmError>;
    async fn vcpus(&self) -> Result<u32, VmmError>;
    /// Plugs or unplugs vCPUs until the guest runs `target`, each acknowledged by the
    /// guest within `timeout`. Returns how many were plugged.
    async fn set_vcpus(&self, target: u32, timeout: Duration) -> Result<u32, VmmError>;
    /// Bytes plugged through virtio-mem; 0 without a device.
    async fn hotplug_memory(&self) -> Result<u64, VmmError>;
    /// Requests `bytes` of virtio-mem memory and waits until the guest has it.
    async fn set_hotplug_memory(&self, bytes: u64, timeout: Duration) -> Result<(), VmmError>;
    /// Asks the guest to power off, then makes QEMU quit after `grace`.
    async fn shutdown(&self, grace: Duration) -> Result<(), VmmError>;
    /// Makes QEMU quit now, killing it if it does not.
    async fn terminate(&self) -> Result<(), VmmError>;

    // Migration. Both ends call `prepare_migration`; the source then `migrate_to`, the
    // destination (started with `incoming`) `listen_incoming` first.

    /// Status changes of this VM's migration from now on.
    fn migration_events(&self) -> MigrationEvents;
    /// Sets the capabilities both ends must agree on (post-copy, status events), and this
    /// end's parameters.
    async fn prepare_migration(
        &self,
        postcopy: bool,
        parameters: MigrateSetParameters,
    ) -> Result<(), VmmError>;
    /// On the source: stop at the switchover (status `pre-switchover`) until
    /// [`Vm::continue_switchover`].
    async fn pause_before_switchover(&self) -> Result<(), VmmError>;
    async fn continue_switchover(&self) -> Result<(), VmmError>;
    /// On the destination: listen at `socket`.
    async fn listen_incoming(&self, socket: &Path) -> Result<(), VmmError>;
    /// On the destination, before the stream starts: the session a recovery needs.
    async fn open_oob_monitor(&self, timeout: Duration) -> Result<(), VmmError>;
    /// Ends that session once the migration has ended, leaving the monitor free.
    async fn close_oob_monitor(&self);
    /// On the destination of a paused post-copy migration: listen again at `socket`.
    async fn recover_incoming(&self, socket: &Path, timeout: Duration) -> Result<(), VmmError>;
    /// On the source: send the VM to `socket`, or with `resume` continue a paused
    /// post-copy migration there.
    async fn migrate_to(&self, socket: &Path, resume: bool) -> Result<(), VmmError>;
    async fn start_postcopy(&self) -> Result<(), VmmError>;
    async fn cancel_migration(&self) -> Result<(), VmmError>;
    async fn migration_info(&self) -> Result<MigrationInfo, VmmError>;

    // Disk mirror: the destination exports its disk, the source mirrors into it.

    /// On the destination: serves its disk, writable, at `socket`.
    async fn export_disk(&self, socket: &Path) -> Result<(), VmmError>;
    async fn unexport_disk(&self) -> Result<(), VmmError>;
    /// On the source: starts copying the disk to the export at `socket`.
    async fn start_disk_mirror(&self, socket: &Path) -> Result<(), VmmError>;
    /// An error if the mirror stopped on its own.
    async fn disk_mirror_progress(&self) -> Result<MirrorProgress, VmmError>;
    /// Paused at the switchover: copies what is left and ends the mirror; succeeds only
    /// if the destination's disk is complete.
    async fn finish_disk_mirror(&self, timeout: Duration) -> Result<(), VmmError>;
    async fn abandon_disk_mirror(&self);

    // The vsock device, which cannot migrate: unplugged before, plugged after.

    async fn unplug_vsock(&self, timeout: Duration) -> Result<(), VmmError>;
    async fn plug_vsock(&self, vhost_socket: &Path) -> Result<(), VmmError>;
    async fn vsock_plugged(&self) -> Result<bool, VmmError>;
}

/// What starts VMs, finds them again after a restart, and runs their vsock backends.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn Vm>, VmmError>;
    /// A VM already running, if the pidfile names a live process serving `qmp_socket`.
    async fn attach(&self, qmp_socket: &Path, pidfile: &Path) -> Result<Arc<dyn Vm>, VmmError>;
    /// Starts the backend unless it runs.
    async fn ensure_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError>;
    /// A fresh backend: one serves a single device plug.
    async fn restart_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError>;
    fn stop_vsock(&self, backend: &VsockBackend);
    fn vsock_running(&self, backend: &VsockBackend) -> bool;
}

/// QEMU itself.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    /// Bound on each QMP command, and on connecting.
    pub qmp_timeout: Duration,
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn Vm>, VmmError> {
        Ok(Arc::new(
            Machine::launch(&self.binary, spec, self.qmp_timeout).await?,
        ))
    }

    async fn attach(&self, qmp_socket: &Path, pidfile: &Path) -> Result<Arc<dyn Vm>, VmmError> {
        Ok(Arc::new(
            Machine::attach(qmp_socket, pidfile, self.qmp_timeout).await?,
        ))
    }

    async fn ensure_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError> {
        backend.ensure_running().await
    }

    async fn restart_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError> {
        backend.restart().await
    }

    fn stop_vsock(&self, backend: &VsockBackend) {
        backend.stop()
    }

    fn vsock_running(&self, backend: &VsockBackend) -> bool {
        backend.is_running()
    }
}

// The bodies stay with their subject (machine.rs, migration.rs, disk_mirror.rs), where
// they are also callable without the trait.
#[async_trait]
impl Vm for Machine {
    fn pid(&self) -> i32 {
        Machine::pid(self)
    }
    fn exited_now(&self) -> bool {
        Machine::exited_now(self)
    }
    async fn exited(&self) {
        Machine::exited(self).await
    }
    async fn status(&self) -> Result<StatusInfo, VmmError> {
        Machine::status(self).await
    }
    async fn pause_guest(&self) -> Result<(), VmmError> {
        Machine::pause_guest(self).await
    }
    async fn vcpus(&self) -> Result<u32, VmmError> {
        Machine::vcpus(self).await
    }
    async fn set_vcpus(&self, target: u32, timeout: Duration) -> Result<u32, VmmError> {
        Machine::set_vcpus(self, target, timeout).await
    }
    async fn hotplug_memory(&self) -> Result<u64, VmmError> {
        Machine::hotplug_memory(self).await
    }
    async fn set_hotplug_memory(&self, bytes: u64, timeout: Duration) -> Result<(), VmmError> {
        Machine::set_hotplug_memory(self, bytes, timeout).await
    }
    async fn shutdown(&self, grace: Duration) -> Result<(), VmmError> {
        Machine::shutdown(self, grace).await
    }
    async fn terminate(&self) -> Result<(), VmmError> {
        Machine::terminate(self).await
    }

    fn migration_events(&self) -> MigrationEvents {
        Machine::migration_events(self)
    }
    async fn prepare_migration(
        &self,
        postcopy: bool,
        parameters: MigrateSetParameters,
    ) -> Result<(), VmmError> {
        Machine::prepare_migration(self, postcopy, parameters).await
    }
    async fn pause_before_switchover(&self) -> Result<(), VmmError> {
        Machine::pause_before_switchover(self).await
    }
    async fn continue_switchover(&self) -> Result<(), VmmError> {
        Machine::continue_switchover(self).await
    }
    async fn listen_incoming(&self, socket: &Path) -> Result<(), VmmError> {
        Machine::listen_incoming(self, socket).await
    }
    async fn open_oob_monitor(&self, timeout: Duration) -> Result<(), VmmError> {
        Machine::open_oob_monitor(self, timeout).await
    }
    async fn close_oob_monitor(&self) {
        Machine::close_oob_monitor(self).await
    }
    async fn recover_incoming(&self, socket: &Path, timeout: Duration) -> Result<(), VmmError> {
        Machine::recover_incoming(self, socket, timeout).await
    }
    async fn migrate_to(&self, socket: &Path, resume: bool) -> Result<(), VmmError> {
        Machine::migrate_to(self, socket, resume).await
    }
    async fn start_postcopy(&self) -> Result<(), VmmError> {
        Machine::start_postcopy(self).await
    }
    async fn cancel_migration(&self) -> Result<(), VmmError> {
        Machine::cancel_migration(self).await
    }
    async fn migration_info(&self) -> Result<MigrationInfo, VmmError> {
        Machine::migration_info(self).await
    }

    async fn export_disk(&self, socket: &Path) -> Result<(), VmmError> {
        Machine::export_disk(self, socket).await
    }
    async fn unexport_disk(&self) -> Result<(), VmmError> {
        Machine::unexport_disk(self).await
    }
    async fn start_disk_mirror(&self, socket: &Path) -> Result<(), VmmError> {
        Machine::start_disk_mirror(self, socket).await
    }
    async fn disk_mirror_progress(&self) -> Result<MirrorProgress, VmmError> {
        Machine::disk_mirror_progress(self).await
    }
    async fn finish_disk_mirror(&self, timeout: Duration) -> Result<(), VmmError> {
        Machine::finish_disk_mirror(self, timeout).await
    }
    async fn abandon_disk_mirror(&self) {
        Machine::abandon_disk_mirror(self).await
    }

    async fn unplug_vsock(&self, timeout: Duration) -> Result<(), VmmError> {
        Machine::unplug_vsock(self, timeout).await
    }
    async fn plug_vsock(&self, vhost_socket: &Path) -> Result<(), VmmError> {
        Machine::plug_vsock(self, vhost_socket).await
    }
    async fn vsock_plugged(&self) -> Result<bool, VmmError> {
        Machine::vsock_plugged(self).await
    }
}
