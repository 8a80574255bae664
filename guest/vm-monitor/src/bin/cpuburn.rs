//! A workload for tests: keeps THREADS threads busy for SECS seconds, then idles.
//!
//! usage: vmhost-cpuburn THREADS SECS

use std::time::{Duration, Instant};

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [threads, secs] = numbers[..] else {
        eprintln!("usage: vmhost-cpuburn THREADS SECS");
        std::process::exit(2);
    };
    let until = Instant::now() + Duration::from_secs(secs);
    println!("cpuburn: {threads} threads for {secs} s");
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while Instant::now() < until {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    println!("cpuburn: done");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
