//! A workload for the pressure benchmark: allocates fast until its cgroup's memory crosses
//! the monitor's upscale threshold, then holds it, and reports on the console how long the
//! guest took from that crossing until MemTotal grew. Both ends are timed here, on the
//! guest's own clock.
//!
//! usage: vmhost-pressure THRESHOLD (the monitor's --upscale-threshold, e.g. 0.7)

use std::time::{Duration, Instant};

/// Fast steps far from the threshold; near it, steps small enough that the crossing is
/// seen within a millisecond or two, as the monitor may see it.
const STEP_MIB: usize = 32;
const NEAR_MIB: u64 = 96;

fn meminfo_kb(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse().ok())
        .unwrap_or(0)
}

fn cgroup_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .and_then(|path| {
            std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.current")).ok()
        })
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let threshold: f64 = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(t)) => t,
        _ => {
            eprintln!("usage: vmhost-pressure THRESHOLD");
            std::process::exit(2);
        }
    };
    let total_kb = meminfo_kb("MemTotal:");
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let threshold_bytes = threshold * (total_kb << 10) as f64;
    loop {
        let used = cgroup_bytes() as f64;
        if used >= threshold_bytes {
            break;
        }
        let step = if threshold_bytes - used > (NEAR_MIB << 20) as f64 {
            STEP_MIB << 20
        } else {
            64 << 10
        };
        // Non-zero fill: every page is really touched.
        chunks.push(vec![1u8; step]);
    }
    let crossed = Instant::now();
    println!("vmhost-pressure: crossed at {} MiB", cgroup_bytes() >> 20);
    while meminfo_kb("MemTotal:") <= total_kb {
        std::thread::sleep(Duration::from_millis(1));
    }
    println!(
        "vmhost-pressure: grown after {:.1} ms",
        crossed.elapsed().as_secs_f64() * 1000.0
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
