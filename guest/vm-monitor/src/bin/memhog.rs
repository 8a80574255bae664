//! A workload for tests: grows its memory in steps, touching every page, holds it, then
//! frees it and idles. Progress goes to stdout.
//!
//! usage: vmhost-memhog TARGET_MIB STEP_MIB INTERVAL_MS HOLD_SECS

use std::time::Duration;

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [target, step, interval_ms, hold_secs] = numbers[..] else {
        eprintln!("usage: vmhost-memhog TARGET_MIB STEP_MIB INTERVAL_MS HOLD_SECS");
        std::process::exit(2);
    };
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut held = 0;
    while held < target {
        let mib = step.min(target - held);
        // Non-zero fill: every page is really touched and owned.
        chunks.push(vec![1u8; (mib as usize) << 20]);
        held += mib;
        println!("memhog: holding {held} MiB");
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    std::thread::sleep(Duration::from_secs(hold_secs));
    drop(chunks);
    println!("memhog: freed");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
