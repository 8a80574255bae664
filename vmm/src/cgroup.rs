//! Per-VM cgroups: a VM's QEMU and its vsock backend share one cgroup whose memory and CPU
//! limits follow the VM's size, so a runaway guest or QEMU cannot take the whole host.
//!
//! The cgroups sit below vmhostd's own (under systemd, its unit's `Delegate=yes` subtree):
//! `<own>/vmhost-<host>/<vm>`. They are the kernel's, so they outlive vmhostd with the VMs.

use cgroups_rs::cgroup::{get_cgroups_relative_paths, Cgroup};
use cgroups_rs::cpu::CpuController;
use cgroups_rs::memory::MemController;
use cgroups_rs::{CgroupPid, Hierarchy};
use std::collections::HashMap;

/// CFS bandwidth period; a vCPU is worth one period of CPU time per period.
const CPU_PERIOD_US: u64 = 100_000;

/// What one VM's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
}

impl CgroupLimits {
    /// The VM's memory plus QEMU's own overhead, and one CPU per vCPU.
    pub fn for_vm(vcpus: u32, memory_bytes: u64, overhead_bytes: u64) -> Self {
        CgroupLimits {
            memory_bytes: memory_bytes.saturating_add(overhead_bytes),
            cpu_quota_us: u64::from(vcpus.max(1)) * CPU_PERIOD_US,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create cgroup {path}")]
    Create {
        path: String,
        #[source]
        source: Box<cgroups_rs::error::Error>,
    },
    #[error("cannot move process {pid} into cgroup {path}")]
    Move {
        pid: u32,
        path: String,
        #[source]
        source: Box<cgroups_rs::error::Error>,
    },
    #[error("cannot set {what} of cgroup {path} to {value}")]
    Limit {
        what: &'static str,
        value: String,
        path: String,
        #[source]
        source: Box<cgroups_rs::error::Error>,
    },
    #[error("cgroup {path} lacks the {controller} controller")]
    NoController {
        controller: &'static str,
        path: String,
    },
}

/// Where this host's VM cgroups live, and how to reach them.
pub struct VmCgroups {
    /// vmhostd's own cgroup per v1 controller (empty under v2, where paths are absolute).
    own_paths: HashMap<String, String>,
    /// Under v2: vmhostd's own cgroup, relative to the root.
    own_v2: String,
    host_dir: String,
    v2: bool,
}

impl VmCgroups {
    /// Finds vmhostd's own cgroup. Under v2 vmhostd moves itself into a leaf of it first,
    /// since a cgroup that hands controllers to its children may hold no process.
    pub fn open(host_name: &str) -> Result<Self, String> {
        let v2 = cgroups_rs::hierarchies::is_cgroup2_unified_mode();
        let own_paths = get_cgroups_relative_paths()
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mut cgroups = VmCgroups {
            own_v2: String::new(),
            own_paths: HashMap::new(),
            host_dir: format!("vmhost-{host_name}"),
            v2,
        };
        if v2 {
            let own = own_paths.get("").cloned().unwrap_or_default();
            let own = own.trim_start_matches('/').to_string();
            let daemon = Cgroup::new(
                hierarchy(),
                format!("{own}/vmhostd").trim_start_matches('/'),
            )
            .map_err(|e| format!("cannot create vmhostd's own leaf cgroup: {e}"))?;
            daemon
                .add_task_by_tgid(CgroupPid::from(u64::from(std::process::id())))
                .map_err(|e| format!("cannot move vmhostd into its leaf cgroup: {e}"))?;
            cgroups.own_v2 = own;
        } else {
            for controller in ["memory", "cpu"] {
                if !own_paths.contains_key(controller) {
                    return Err(format!(
                        "the cgroup v1 {controller} controller is not mounted"
                    ));
                }
            }
            cgroups.own_paths = own_paths;
        }
        // Where the cgroup filesystem is read-only (a container), say so now, not per VM.
        let _ = cgroups.handle("").create();
        let dir = cgroups.memory_path("");
        nix::unistd::access(dir.as_str(), nix::unistd::AccessFlags::W_OK)
            .map_err(|e| format!("cannot create or write cgroup {dir}: {e}"))?;
        Ok(cgroups)
    }

    /// `cgroup v2` or `cgroup v1`, for the log.
    pub fn version(&self) -> &'static str {
        if self.v2 {
            "cgroup v2"
        } else {
            "cgroup v1"
        }
    }

    fn relative(&self, vm: &str) -> String {
        let path = format!("{}/{}/{vm}", self.own_v2, self.host_dir);
        path.trim_matches('/').to_string()
    }

    fn handle(&self, vm: &str) -> Cgroup {
        if self.v2 {
            Cgroup::load(hierarchy(), self.relative(vm))
        } else {
            Cgroup::load_with_relative_paths(hierarchy(), self.relative(vm), self.own_paths.clone())
        }
    }

    /// The memory controller's directory of `vm`'s cgroup, for logs and checks.
    pub fn memory_path(&self, vm: &str) -> String {
        let root = if self.v2 {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/memory"
        };
        let own = match self.own_paths.get("memory") {
            Some(own) if !self.v2 => own.trim_matches('/'),
            _ => "",
        };
        let path = format!("{root}/{own}/{}", self.relative(vm));
        path.replace("//", "/")
    }

    /// Creates `vm`'s cgroup if needed, sets its limits, then moves `pids` into it.
    pub fn place(&self, vm: &str, pids: &[u32], limits: CgroupLimits) -> Result<(), CgroupError> {
        let cgroup = self.handle(vm);
        cgroup.create().map_err(|source| CgroupError::Create {
            path: self.memory_path(vm),
            source: Box::new(source),
        })?;
        self.apply(vm, &cgroup, limits)?;
        for &pid in pids {
            cgroup
                .add_task_by_tgid(CgroupPid::from(u64::from(pid)))
                .map_err(|source| CgroupError::Move {
                    pid,
                    path: self.memory_path(vm),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Sets the limits of `vm`'s existing cgroup.
    pub fn set_limits(&self, vm: &str, limits: CgroupLimits) -> Result<(), CgroupError> {
        self.apply(vm, &self.handle(vm), limits)
    }

    fn apply(&self, vm: &str, cgroup: &Cgroup, limits: CgroupLimits) -> Result<(), CgroupError> {
        let path = self.memory_path(vm);
        let memory: &MemController = cgroup.controller_of().ok_or(CgroupError::NoController {
            controller: "memory",
            path: path.clone(),
        })?;
        let cpu: &CpuController = cgroup.controller_of().ok_or(CgroupError::NoController {
            controller: "cpu",
            path: path.clone(),
        })?;
        let limit = |what, value: String, source| CgroupError::Limit {
            what,
            value,
            path: path.clone(),
            source: Box::new(source),
        };
        let memory_bytes = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
        memory
            .set_limit(memory_bytes)
            .map_err(|e| limit("the memory limit", limits.memory_bytes.to_string(), e))?;
        let quota = i64::try_from(limits.cpu_quota_us).unwrap_or(i64::MAX);
        cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
            .map_err(|e| limit("the CPU quota", format!("{quota}/{CPU_PERIOD_US} us"), e))?;
        Ok(())
    }

    /// Removes `vm`'s cgroup once its processes are gone. A cgroup still in use stays and
    /// is reused when the VM starts again.
    pub fn remove(&self, vm: &str) -> Result<(), String> {
        let cgroup = self.handle(vm);
        if !cgroup.exists() {
            return Ok(());
        }
        if !cgroup.procs().is_empty() {
            return Err(format!(
                "cgroup {} still holds processes",
                self.memory_path(vm)
            ));
        }
        cgroup
            .delete()
            .map_err(|e| format!("cannot remove cgroup {}: {e}", self.memory_path(vm)))
    }
}

fn hierarchy() -> Box<dyn Hierarchy> {
    cgroups_rs::hierarchies::auto()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_the_vms_memory_plus_overhead_and_a_cpu_per_vcpu() {
        let limits = CgroupLimits::for_vm(3, 2 << 30, 256 << 20);
        assert_eq!(limits.memory_bytes, (2 << 30) + (256 << 20));
        assert_eq!(limits.cpu_quota_us, 300_000);
    }

    #[test]
    fn a_vm_always_gets_at_least_one_cpu_of_time() {
        assert_eq!(CgroupLimits::for_vm(0, 0, 0).cpu_quota_us, CPU_PERIOD_US);
    }
}
