//! The chaos soak for three minutes (see `vmhost_tests::soak`), with a fixed seed unless
//! VMHOST_SOAK_SEED names another.

use vmhost_tests::benchmarks::today;
use vmhost_tests::soak::{run, Config};

#[test]
fn three_hosts_hold_every_invariant_through_three_minutes_of_chaos() {
    let seed = std::env::var("VMHOST_SOAK_SEED")
        .map(|s| s.parse().expect("VMHOST_SOAK_SEED must be a number"))
        .unwrap_or(1);
    let config = Config {
        minutes: 3.0,
        seed,
        vms: 7,
    };
    match run(&config) {
        Ok(summary) => print!("{}", summary.benchmark_line(&today())),
        Err(failure) => panic!("{failure}"),
    }
}
