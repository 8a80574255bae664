//! Host memory per idle VM: vmhostd's growth and each VM's vsock backend, against the goal
//! of 2 MiB per VM; and QEMU's own memory beside the guest's, against the allowance the
//! VM's cgroup gives it.

use crate::min_median_max;
use std::path::Path;
use std::time::Duration;
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::{Limits, TestHost};
use vmm::Accel;

const GOAL_MIB: f64 = 2.0;

/// A process's memory from /proc/PID/status, in MiB.
fn status_mib(pid: i32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB"))
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

/// What ending the process would free: its private pages (smaps_rollup), in MiB.
fn private_mib(pid: i32) -> f64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kib: f64 = rollup
        .lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix("Private_Clean:")
                .or_else(|| line.strip_prefix("Private_Dirty:"))?;
            rest.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()
        })
        .sum();
    kib / 1024.0
}

fn pid_in(folder: &Path, file: &str) -> i32 {
    let text = std::fs::read_to_string(folder.join(file)).unwrap();
    text.trim().parse().unwrap()
}

pub fn overhead(vms: usize, accel: Accel) {
    let host = TestHost::start(Limits {
        vcpus: vms as u32,
        memory_mib: vms as u64 * 256 + 1024,
    });
    let daemon = host.daemon_pid().unwrap() as i32;
    std::thread::sleep(Duration::from_secs(5));
    let empty = status_mib(daemon, "VmRSS:");
    let names: Vec<String> = (0..vms).map(|i| format!("idle{i}")).collect();
    for name in &names {
        host.vmctl_ok(&[
            "create",
            name,
            "--min-cu",
            "0.25",
            "--max-cu",
            "0.25",
            "--no-autoscale",
        ]);
    }
    for name in &names {
        host.wait_guest_ready(name);
        host.wait_monitor(name);
    }
    // Idle: the guests have booted and their links report; let allocations settle.
    std::thread::sleep(Duration::from_secs(30));
    let daemon_per_vm = (status_mib(daemon, "VmRSS:") - empty) / vms as f64;
    let (mut backends, mut private, mut qemus) = (Vec::new(), Vec::new(), Vec::new());
    for name in &names {
        let folder = host.state_dir().join("vms").join(name);
        let backend = pid_in(&folder, "vsock.pid");
        backends.push(status_mib(backend, "VmRSS:"));
        private.push(private_mib(backend));
        // The guest's RAM is shared memory (vhost-user maps it too): QEMU's own is the rest.
        qemus.push(status_mib(pid_in(&folder, "qemu.pid"), "RssAnon:"));
    }
    let (b_min, b_median, b_max) = min_median_max(&mut backends);
    let (p_min, p_median, p_max) = min_median_max(&mut private);
    let (q_min, q_median, q_max) = min_median_max(&mut qemus);
    let per_vm = daemon_per_vm + p_median;
    append(&format!(
        "- {} host memory per idle VM ({vms} VMs of 0.25 CU, {accel}; vmhostd RSS growth per VM plus one vhost-device-vsock's private memory, median; backends' private min/median/max {p_min:.2}/{p_median:.2}/{p_max:.2} MiB, RSS {b_min:.2}/{b_median:.2}/{b_max:.2} MiB; `bench -- overhead {vms}`): ours {per_vm:.2} MiB (vmhostd +{daemon_per_vm:.2}, backend {p_median:.2}), goal {GOAL_MIB:.2} MiB, ratio {:.2}\n",
        today(),
        per_vm / GOAL_MIB
    ));
    let allowance = match accel {
        Accel::Kvm => 128.0,
        Accel::Tcg => 512.0,
    };
    append(&format!(
        "- {} QEMU's own memory per idle VM ({vms} VMs of 0.25 CU, {accel}; RssAnon beside the guest's shared RAM, min/median/max {q_min:.1}/{q_median:.1}/{q_max:.1} MiB; `bench -- overhead {vms}`): ours {q_median:.1} MiB, cgroup allowance {allowance:.0} MiB, ratio {:.2}\n",
        today(),
        q_median / allowance
    ));
}
