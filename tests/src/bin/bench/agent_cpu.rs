//! Host CPU per idle VM with its monitor and agent, against the same VMs without them, on
//! two hosts measured over the same windows. Both sides count vmhostd and every vsock
//! backend process.

use crate::{cpu_seconds, min_median_max};
use std::time::Duration;
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::procs::{lab_processes, Kind};
use vmhost_tests::{wait_until, Limits, TestHost};

/// vmhostd and the vsock backends of `host`.
fn host_pids(host: &TestHost) -> Vec<u32> {
    let backends = lab_processes(&[host.state_dir()])
        .into_iter()
        .filter(|p| p.kind == Kind::Vsock)
        .map(|p| p.pid as u32);
    std::iter::once(host.daemon_pid().unwrap())
        .chain(backends)
        .collect()
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
pub fn agent_cpu(vms: usize, window: Duration, windows: usize) {
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
    let (our_pids, bare_pids) = (host_pids(&ours), host_pids(&bare));
    for pids in [&our_pids, &bare_pids] {
        assert_eq!(
            pids.len(),
            vms + 1,
            "vmhostd and a backend per VM: {pids:?}"
        );
    }
    let per_vm_hour = |used: f64| used / vms as f64 * (3600.0 / window.as_secs_f64());
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for run in 0..windows {
        let (o0, b0) = (cpu_of(&our_pids), cpu_of(&bare_pids));
        std::thread::sleep(window);
        o.push(per_vm_hour(cpu_of(&our_pids) - o0));
        b.push(per_vm_hour(cpu_of(&bare_pids) - b0));
        eprintln!(
            "window {run}: ours {:.2} s, without {:.2} s",
            o[run], b[run]
        );
    }
    let ((o_lo, o_mid, o_hi), (b_lo, b_mid, b_hi)) =
        (min_median_max(&mut o), min_median_max(&mut b));
    append(&format!(
        "- {} host CPU per idle VM per hour (vmhostd plus {vms} vsock backends, {vms} VMs of 0.25 CU on each of two hosts, the same {windows} windows of {} s, min/median/max, release build; ours with monitors and agents {o_lo:.2}/{o_mid:.2}/{o_hi:.2} s, without {b_lo:.2}/{b_mid:.2}/{b_hi:.2} s; share of one core {:.5}): ours {o_mid:.2} s, without monitor and agent {b_mid:.2} s, ratio {:.2}\n",
        today(),
        window.as_secs(),
        o_mid / 3600.0,
        o_mid / b_mid
    ));
}
