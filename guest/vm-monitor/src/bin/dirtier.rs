//! A workload for migration tests: keeps rewriting every page of a buffer with a counter
//! and checks, on each pass, that every page still holds the previous pass's value. Once a
//! second it prints the counter, the boot id and the errors found, so a test can see from
//! outside that the guest ran on without a reset and without losing a write.
//!
//! Given BEAT_MS, a second thread also prints a numbered beat, `b<n>`, every BEAT_MS: the
//! host stamps them as they reach the serial log, and their largest gap is the outage the
//! guest showed. The guest's own clocks stop while it is paused, so it cannot time that.
//!
//! usage: vmhost-dirtier MIB [BEAT_MS]

use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const USAGE: &str = "usage: vmhost-dirtier MIB [BEAT_MS]";

fn main() {
    let args: Vec<u64> = match std::env::args().skip(1).map(|a| a.parse::<u64>()).collect() {
        Ok(args) => args,
        Err(_) => usage(),
    };
    let (mib, beat_ms) = match args[..] {
        [mib] => (mib, None),
        [mib, beat_ms] if beat_ms > 0 => (mib, Some(beat_ms)),
        _ => usage(),
    };
    if let Some(ms) = beat_ms {
        std::thread::spawn(move || beat(Duration::from_millis(ms)));
    }
    dirty(mib as usize);
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

/// A few bytes per beat, so that a run of minutes keeps the log small.
fn beat(every: Duration) {
    for n in 1u64.. {
        println!("b{n}");
        std::thread::sleep(every);
    }
}

fn dirty(mib: usize) {
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
