//! The chaos soak (see `vmhost_tests::soak`): random operations and faults on three hosts,
//! invariants checked all along. Prints the seed first, and on a broken invariant the
//! timeline, exiting 1.
//!
//! usage: cargo run -p vmhost-tests --bin soak -- [--minutes M] [--seed S] [--vms N] [--record]

use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::soak::{run, Config};

fn main() {
    let mut config = Config {
        minutes: 3.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000,
        vms: 7,
    };
    let mut record = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs {what}")))
        };
        match arg.as_str() {
            "--minutes" => config.minutes = parse(&value("a number of minutes")),
            "--seed" => config.seed = parse(&value("a number")),
            "--vms" => config.vms = parse(&value("a number of VMs")),
            "--record" => record = true,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    println!("soak seed {}", config.seed);
    match run(&config) {
        Ok(summary) => {
            println!(
                "{} of {} operations succeeded; {} capacity samples; crashes not caused by a fault: {:?}",
                summary.ops_ok,
                summary.ops_tried,
                summary.capacity_samples,
                summary.unexplained_crashes
            );
            if let Some(logs) = &summary.logs {
                println!("vmhostd logs kept in {}", logs.display());
            }
            let line = summary.benchmark_line(&today());
            if record {
                append(&line);
            } else {
                print!("{line}");
            }
        }
        Err(failure) => {
            eprintln!("{failure}");
            std::process::exit(1);
        }
    }
}

fn parse<T: std::str::FromStr>(text: &str) -> T {
    text.parse()
        .unwrap_or_else(|_| usage(&format!("not a number: {text}")))
}

fn usage(problem: &str) -> ! {
    eprintln!("soak: {problem}\nusage: soak [--minutes M] [--seed S] [--vms N] [--record]");
    std::process::exit(2);
}
