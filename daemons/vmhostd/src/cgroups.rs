//! Each VM's cgroup (see `vmm::cgroup`): its QEMU and vsock backend are placed in it when
//! QEMU starts or is found again after a restart, and its limits follow every resize.

use crate::config::Config;
use crate::error::error_chain;
use crate::host::Host;
use std::sync::Arc;
use std::time::Duration;
use vmhost_api::Resources;
use vmm::cgroup::{CgroupLimits, VmCgroups};
use vmm::Accel;

/// Opens this host's VM cgroups, or says once why VMs run without them.
pub fn open(config: &Config) -> Option<Arc<VmCgroups>> {
    if !config.cgroups.enabled {
        tracing::info!("per-VM cgroups are off ([cgroups] enabled = false)");
        return None;
    }
    match VmCgroups::open(&config.host_name()) {
        Ok(cgroups) => {
            tracing::info!(
                cgroups = cgroups.version(),
                "each VM runs in a cgroup of its own"
            );
            Some(Arc::new(cgroups))
        }
        Err(reason) => {
            tracing::warn!(%reason, "VMs run without cgroups of their own: their memory and CPU are not limited");
            None
        }
    }
}

impl Host {
    fn cgroup_limits(&self, size: Resources) -> CgroupLimits {
        let overhead_mib =
            self.config
                .cgroups
                .qemu_overhead_mib
                .unwrap_or(match self.accel.accel {
                    Accel::Kvm => 128,
                    // TCG's translated code adds to QEMU's own memory.
                    Accel::Tcg => 512,
                });
        CgroupLimits::for_vm(size.vcpus, size.memory_bytes, overhead_mib << 20)
    }

    /// Moves the VM's QEMU and its vsock backend, if running, into the VM's cgroup, limited
    /// to `size`.
    pub fn confine(&self, name: &str, qemu_pid: i32, size: Resources) {
        let Some(cgroups) = &self.cgroups else { return };
        let mut pids: Vec<u32> = u32::try_from(qemu_pid).into_iter().collect();
        pids.extend(self.paths(name).vsock.running_pid());
        if let Err(error) = cgroups.place(name, &pids, self.cgroup_limits(size)) {
            tracing::error!(vm = %name, error = %error_chain(&error), "the VM runs outside its cgroup: its memory and CPU are not limited");
        }
    }

    /// Sets the VM's cgroup limits to `size`: before an upscale is applied, and after a
    /// downscale completes, so QEMU never holds more than its limit allows.
    pub fn limit(&self, name: &str, size: Resources) {
        let Some(cgroups) = &self.cgroups else { return };
        if let Err(error) = cgroups.set_limits(name, self.cgroup_limits(size)) {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot change the VM's cgroup limits");
        }
    }

    /// Removes the VM's cgroup once its processes are gone: its vsock backend may take a
    /// moment to exit after QEMU.
    pub fn release_cgroup(&self, name: &str) {
        let Some(cgroups) = self.cgroups.clone() else {
            return;
        };
        let name = name.to_string();
        tokio::spawn(async move {
            for _ in 0..50 {
                match cgroups.remove(&name) {
                    Ok(()) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            if let Err(reason) = cgroups.remove(&name) {
                tracing::debug!(vm = %name, %reason, "VM cgroup kept: in use again, or its processes linger");
            }
        });
    }
}
