//! Host CPU per idle VM with its monitor and agent, against the same VMs without them, on
//! two hosts measured over the same windows. Both sides count vmhostd, every vsock backend
//! and every QEMU, whose guest runs the monitor: vmhostd alone without agents idles below
//! the 10 ms resolution of /proc/PID/stat, so it is shown beside the whole, not compared.

use crate::{cpu_seconds, min_median_max};
use std::time::Duration;
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::procs::{lab_processes, Kind};
use vmhost_tests::{wait_until, Limits, TestHost};

/// vmhostd and the vsock backends of `host`, then its QEMUs.
fn host_pids(host: &TestHost) -> (Vec<u32>, Vec<u32>) {
    let processes = lab_processes(&[host.state_dir()]);
    let of = |kind| {
        processes
            .iter()
            .filter(move |p| p.kind == kind)
            .map(|p| p.pid as u32)
    };
    let daemon = std::iter::once(host.daemon_pid().unwrap());
    (
        daemon.chain(of(Kind::Vsock)).collect(),
        of(Kind::Qemu).collect(),
    )
}

/// The CPU seconds of `pids` together; each must still be alive.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&pid| cpu_seconds(pid).unwrap_or_else(|| panic!("process {pid} ended")))
        .sum()
}

fn idle_host(vms: usize) -> TestHost {
    TestHost::start(Limits {
        vcpus: vms as u32,
        memory_mib: vms as u64 * 256 + 1024,
    })
}

/// `vms` idle VMs on each of two hosts: with monitors and agents (fixed bounds, so the
/// agent runs every poll with nothing to do), and without either; `windows` windows.
pub fn agent_cpu(vms: usize, window: Duration, windows: usize, accel: vmm::Accel) {
    if cfg!(debug_assertions) {
        panic!("benchmarks time release builds: cargo run --release -p vmhost-tests --bin bench -- agent-cpu");
    }
    let (ours, bare) = (idle_host(vms), idle_host(vms));
    let names: Vec<String> = (0..vms).map(|i| format!("idle{i}")).collect();
    // One host's VMs boot at a time: forty TCG guests at once starve each other.
    for name in &names {
        ours.vmctl_ok(&["create", name, "--min-cu", "0.25", "--max-cu", "0.25"]);
    }
    wait_until(Duration::from_secs(900), "every monitor to connect", || {
        names
            .iter()
            .all(|name| ours.show(name)["guest"]["connected"] == true)
    });
    for name in &names {
        bare.vmctl_ok(&[
            "create",
            name,
            "--image",
            "nomonitor",
            "--min-cu",
            "0.25",
            "--no-autoscale",
        ]);
    }
    for name in &names {
        bare.wait_guest_ready(name);
    }
    let (ours, bare) = (host_pids(&ours), host_pids(&bare));
    for (daemons, qemus) in [&ours, &bare] {
        assert_eq!(
            daemons.len(),
            vms + 1,
            "vmhostd and a backend per VM: {daemons:?}"
        );
        assert_eq!(qemus.len(), vms, "a QEMU per VM: {qemus:?}");
    }
    let per_vm_hour = |used: f64| used / vms as f64 * (3600.0 / window.as_secs_f64());
    // Per side: the whole, and vmhostd with the backends alone.
    let (mut o, mut b, mut o_host, mut b_host) = (vec![], vec![], vec![], vec![]);
    for run in 0..windows {
        let cpu = |(daemons, qemus): &(Vec<u32>, Vec<u32>)| (cpu_of(daemons), cpu_of(qemus));
        let (o0, b0) = (cpu(&ours), cpu(&bare));
        std::thread::sleep(window);
        let (o1, b1) = (cpu(&ours), cpu(&bare));
        o_host.push(per_vm_hour(o1.0 - o0.0));
        b_host.push(per_vm_hour(b1.0 - b0.0));
        o.push(per_vm_hour(o1.0 + o1.1 - o0.0 - o0.1));
        b.push(per_vm_hour(b1.0 + b1.1 - b0.0 - b0.1));
        eprintln!(
            "window {run}: ours {:.2} s (vmhostd and backends {:.2}), without {:.2} s ({:.2})",
            o[run], o_host[run], b[run], b_host[run]
        );
    }
    let spread = |v: &mut Vec<f64>| {
        let (lo, mid, hi) = min_median_max(v);
        (format!("{lo:.1}/{mid:.1}/{hi:.1}"), mid)
    };
    let ((os, om), (bs, bm)) = (spread(&mut o), spread(&mut b));
    let ((ohs, _), (bhs, _)) = (spread(&mut o_host), spread(&mut b_host));
    append(&format!(
        "- {} host CPU per idle VM per hour, vmhostd, vsock backends and QEMU together ({vms} VMs of 0.25 CU on each of two hosts, {accel}, the same {windows} windows of {} s, min/median/max, release build; with monitors and agents {os} s, of which vmhostd and backends {ohs} s; without {bs} s, of which vmhostd and backends {bhs} s; /proc counts CPU time in 10 ms ticks): ours {om:.1} s, without monitor and agent {bm:.1} s, ratio {:.2}\n",
        today(),
        window.as_secs(),
        om / bm
    ));
}
