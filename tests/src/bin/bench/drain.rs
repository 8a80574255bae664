//! Drain time: `vmctl drain --wait` of a host running N guests that rewrite their memory,
//! against migrating the same guests one by one with `vmctl migrate`, summed. Two hosts in
//! network namespaces; the guests go back and forth, and which side goes first alternates.

use crate::{append, median, today};
use std::time::{Duration, Instant};
use vmhost_tests::netns::{start_live_fleet, Lab};
use vmhost_tests::workload::wait_ticking;
use vmhost_tests::{Limits, TestHost};

fn vm_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("drained{i}")).collect()
}

/// Drains `from` (whose guests all go to the other host), then takes it back in.
fn by_drain(from: &TestHost, name: &str) -> Duration {
    let started = Instant::now();
    from.vmctl_ok(&["drain", name, "--wait"]);
    let took = started.elapsed();
    from.vmctl_ok(&["undrain", name]);
    took
}

/// Migrates each guest of `from` to `to` by hand, one after the other.
fn by_hand(from: &TestHost, to: &str, vms: &[String]) -> Duration {
    vms.iter()
        .map(|vm| {
            let started = Instant::now();
            from.vmctl_ok(&["migrate", vm, "--to", to]);
            started.elapsed()
        })
        .sum()
}

pub fn drain(runs: usize, vms: usize) {
    let lab = Lab::new(2);
    let pki = tempfile::tempdir().unwrap();
    let limits = Limits {
        vcpus: 8,
        memory_mib: 8192,
    };
    let fleet = "gossip_interval_ms = 200\nrebalance = false\n";
    let hosts = start_live_fleet(&lab, pki.path(), &["a", "b"], limits, fleet, "");
    let names = vm_names(vms);
    for vm in &names {
        hosts[0].vmctl_ok(&["create", vm, "--image", "dirtier", "--no-autoscale"]);
    }
    for vm in &names {
        hosts[0].wait_monitor(vm);
        wait_ticking(&hosts[0], vm, 1);
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    // The guests start on a; each drain or round of migrations moves them all across.
    let mut on = 0;
    for run in 0..runs {
        for drain_now in [run % 2 == 0, run % 2 == 1] {
            let (from, to) = (&hosts[on], ["a", "b"][1 - on]);
            if drain_now {
                ours.push(by_drain(from, ["a", "b"][on]));
            } else {
                theirs.push(by_hand(from, to, &names));
            }
            on = 1 - on;
            for vm in &names {
                hosts[on].wait_monitor(vm);
            }
        }
        eprintln!(
            "run {run}: drain {:?}, by hand {:?}",
            ours[run], theirs[run]
        );
    }
    let spread = |samples: &[Duration]| {
        let secs: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
        let min = secs.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = secs.iter().cloned().fold(0.0, f64::max);
        (min, max)
    };
    let ((omin, omax), (tmin, tmax)) = (spread(&ours), spread(&theirs));
    let (o, t) = (median(&mut ours), median(&mut theirs));
    append(&format!(
        "- {} drain of a host running {vms} guests rewriting 64 MiB each (tcg, 1 CU each, two hosts in namespaces, {runs} runs alternating, min/median/max): ours `vmctl drain --wait` {omin:.1}/{o:.1}/{omax:.1} s, the same guests migrated one by one with `vmctl migrate` {tmin:.1}/{t:.1}/{tmax:.1} s, ratio {:.2}\n",
        today(),
        o / t
    ));
}
