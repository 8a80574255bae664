//! A workload for migration tests: keeps rewriting every page of a buffer with a counter
//! and checks, on each pass, that every page still holds the previous pass's value. Once a
//! second it prints the counter, the boot id and the errors found, so a test can see from
//! outside that the guest ran on without a reset and without losing a write.
//!
//! usage: vmhost-dirtier MIB

use std::time::{Duration, Instant};

const PAGE: usize = 4096;

fn main() {
    let Some(mib) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<usize>().ok())
    else {
        eprintln!("usage: vmhost-dirtier MIB");
        std::process::exit(2);
    };
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut buffer = vec![0u64; (mib << 20) / 8];
    let words_per_page = PAGE / 8;
    let mut errors = 0u64;
    let mut pass = 0u64;
    let mut next_report = Instant::now();
    loop {
        for page in buffer.chunks_mut(words_per_page) {
            if page[0] != pass {
                errors += 1;
            }
            page[0] = pass + 1;
        }
        pass += 1;
        if Instant::now() >= next_report {
            println!("dirtier: pass={pass} boot_id={boot_id} errors={errors}");
            next_report += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
