//! Memory pressure in the guest until the guest sees more memory: our path (the monitor's
//! request, the agent, the ledger, the plug and the guest's onlining) against the same
//! +1 GiB plug requested by hand on a raw QEMU the moment the same guest crosses the same
//! threshold. Both are timed inside the guest, from the crossing until MemTotal grew.

use crate::{wait_ready, RawQemu, GIB};
use std::path::Path;
use std::time::Duration;
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::{wait_until, Limits, TestHost, MEMORY_GOAL_ONLY, PRESSURE_WORKLOAD};
use vmm::Accel;

/// Waits for `needle` on the console; returns the rest of its line.
fn wait_console(log: &Path, needle: &str) -> String {
    let mut found = String::new();
    wait_until(Duration::from_secs(180), needle, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        match text.lines().find_map(|l| l.split(needle).nth(1)) {
            Some(rest) => {
                found = rest.trim().to_string();
                true
            }
            None => false,
        }
    });
    found
}

fn grown_ms(log: &Path) -> f64 {
    let rest = wait_console(log, "vmhost-pressure: grown after ");
    rest.trim_end_matches(" ms").parse().unwrap()
}

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

pub async fn pressure(runs: usize, image: &Path, accel: Accel) {
    let host = TestHost::start(Limits {
        vcpus: 4,
        memory_mib: 4096,
    });
    let cmdline = format!(
        "{} {PRESSURE_WORKLOAD}",
        vmm::cmdline::DEFAULT_KERNEL_CMDLINE
    );
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let measure_ours = || {
            let mut create = vec![
                "create", "bench", "--image", "pressure", "--min-cu", "1", "--max-cu", "2",
            ];
            // Only memory may grow it: the allocating vCPU is busy, and the CPU goals would
            // grow the VM first.
            create.extend(MEMORY_GOAL_ONLY);
            host.vmctl_ok(&create);
            let ms = grown_ms(&host.serial_log("bench"));
            host.vmctl_ok(&["delete", "bench"]);
            ms
        };
        let measure_raw = || async {
            let qemu = RawQemu::start_with(image, accel, 2, GIB, &cmdline, false);
            wait_ready(&qemu.spec.serial_log);
            let machine = qemu.attach().await;
            wait_console(&qemu.spec.serial_log, "vmhost-pressure: crossed");
            machine
                .set_hotplug_memory(GIB, Duration::from_secs(60))
                .await
                .unwrap();
            grown_ms(&qemu.spec.serial_log)
        };
        // Alternate which goes first.
        if run % 2 == 0 {
            ours.push(measure_ours());
            raw.push(measure_raw().await);
        } else {
            raw.push(measure_raw().await);
            ours.push(measure_ours());
        }
        eprintln!(
            "run {run}: ours {:.1} ms, raw {:.1} ms",
            ours[run], raw[run]
        );
    }
    let (o50, r50) = (quantile(&mut ours, 0.5), quantile(&mut raw, 0.5));
    let (o90, r90) = (quantile(&mut ours, 0.9), quantile(&mut raw, 0.9));
    append(&format!(
        "- {} memory pressure to memory visible in the guest ({accel}, 1 CU guest allocating past the monitor's 0.7 threshold, +1 CU, the agent's CPU goals off; raw: +1 GiB virtio-mem requested by hand once the guest's console shows the crossing; timed in the guest; min/median/p90/max of {runs}; ours {:.0}/{o50:.0}/{o90:.0}/{:.0} ms, raw {:.0}/{r50:.0}/{r90:.0}/{:.0} ms; `bench -- pressure {runs}`): ours {o50:.0} ms, raw qemu {r50:.0} ms, ratio {:.2}\n",
        today(),
        ours[0],
        ours[runs - 1],
        raw[0],
        raw[runs - 1],
        o50 / r50
    ));
}
