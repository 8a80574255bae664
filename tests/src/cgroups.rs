//! The kernel's view of a process's cgroup limits, and the cleanup of a test host's VM
//! cgroups.

use crate::TestHost;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The memory and CPU limits the kernel applies to `pid`, read from its own cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLimits {
    /// The memory controller's cgroup, relative to its hierarchy.
    pub memory_cgroup: String,
    pub memory_bytes: u64,
    /// CPU time per 100 ms period, in microseconds; -1 for none.
    pub cpu_quota_us: i64,
}

/// Reads `pid`'s memory and CPU limits, under cgroup v2 or v1.
pub fn limits_of(pid: i32) -> KernelLimits {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("cannot read the cgroups of process {pid}: {e}"));
    let path_of = |controller: &str| {
        cgroups.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
    };
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .trim()
            .to_string()
    };
    match (path_of("memory"), path_of("cpu")) {
        (Some(memory), Some(cpu)) => KernelLimits {
            memory_bytes: read(dir(&["memory", &memory]).join("memory.limit_in_bytes"))
                .parse()
                .unwrap_or(u64::MAX),
            cpu_quota_us: read(dir(&["cpu", &cpu]).join("cpu.cfs_quota_us"))
                .parse()
                .unwrap(),
            memory_cgroup: memory,
        },
        _ => {
            let unified = path_of("").expect("no cgroup v2 line in /proc/PID/cgroup");
            let cgroup = dir(&[&unified]);
            let cpu_max = read(cgroup.join("cpu.max"));
            KernelLimits {
                memory_bytes: read(cgroup.join("memory.max")).parse().unwrap_or(u64::MAX),
                cpu_quota_us: match cpu_max.split(' ').next().unwrap() {
                    "max" => -1,
                    quota => quota.parse().unwrap(),
                },
                memory_cgroup: unified,
            }
        }
    }
}

/// Asserts that `vm`'s QEMU and vsock backend on `host` run in the VM's cgroup, limited
/// to `memory_bytes` plus QEMU's default overhead.
pub fn assert_confined(host: &TestHost, vm: &str, memory_bytes: u64) {
    let info: serde_json::Value =
        serde_json::from_str(&host.vmctl_ok(&["--json", "host"])).unwrap();
    let overhead_mib = match info["accel"].as_str() {
        Some("kvm") => 128,
        _ => 512,
    };
    // The processes as /proc shows them, not as vmhostd's pidfiles name them.
    let pids = host.live_pids(vm);
    let limits = limits_of(pids.qemu());
    assert!(
        limits
            .memory_cgroup
            .ends_with(&format!("/vmhost-{}/{vm}", host.name)),
        "{limits:?}"
    );
    assert_eq!(limits.memory_bytes, memory_bytes + (overhead_mib << 20));
    assert_eq!(
        limits_of(pids.backend()),
        limits,
        "the vsock backend shares QEMU's cgroup"
    );
}

fn dir(parts: &[&str]) -> PathBuf {
    parts.iter().fold(PathBuf::from(CGROUP_ROOT), |path, part| {
        path.join(part.trim_start_matches('/'))
    })
}

/// Removes every cgroup named `vmhost-<host>` and what is below it, in every hierarchy,
/// once the processes in them are gone.
pub fn remove_host_cgroups(host: &str) {
    let mut found = Vec::new();
    find_dirs(
        Path::new(CGROUP_ROOT),
        &format!("vmhost-{host}"),
        6,
        &mut found,
    );
    for dir in found {
        remove_tree(&dir);
    }
}

fn find_dirs(dir: &Path, name: &str, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry.file_name() == name {
            found.push(path);
        } else if depth > 0 {
            find_dirs(&path, name, depth - 1, found);
        }
    }
}

/// cgroups are removed leaf first, with rmdir alone; a killed process may take a moment
/// to leave.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("cannot remove the test cgroup {}", dir.display());
}
