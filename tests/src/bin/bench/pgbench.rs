//! A Postgres compute under pgbench, on two fleet hosts in network namespaces with the
//! client in a namespace of its own: throughput over a load step autoscaled from the
//! minimum, against the same VM fixed at its maximum; how long the guest takes to show its
//! size once the step starts and to be back at the minimum once it ends, against the goals;
//! and pgbench's latency and throughput through a live migration, against a window of the
//! same length without one. The autoscaled and fixed sides, and the two windows, alternate.

use crate::{append, min_median_max, today};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vmhost_tests::postgres::{
    create_compute, finish_pgbench, pgbench_log, time_until_cpus, wait_compute_state,
    LoggedTransaction, PgClient, PostgresLab, FIRST_BOOT,
};
use vmhost_tests::{wait_until, TestHost};
use vmm::Accel;

const VM: &str = "bench";
const HOSTS: [&str; 2] = ["a", "b"];
/// The bounds of the load-step test, whose agent settings these are too.
const MIN_CU: u32 = 1;
const MAX_CU: u32 = 4;
const AGENT: &str = "downscale_cooldown_secs=15";
/// pgbench's connections, run and scale in a load step, as in the load-step test.
const CLIENTS: u32 = 8;
const STEP_SECS: u32 = 60;
const SCALE: u32 = 2;
/// Our goals for a load step, and Neon's end-to-end allowances for the same.
const UP_GOAL_SECS: f64 = 15.0;
const DOWN_GOAL_SECS: f64 = 90.0;
const NEON_UP_SECS: f64 = 90.0;
const NEON_DOWN_SECS: f64 = 300.0;
/// The window measured from the migration's start (or the same point without one) lasts
/// this long, or until `AFTERMATH` after the migration returned if that is later: stalled
/// transactions end inside it.
const WINDOW: Duration = Duration::from_secs(30);
const AFTERMATH: Duration = Duration::from_secs(10);
const WINDOW_RUN_SECS: u32 = 75;
/// How often the guest's console is read for its vCPUs during a step.
const POLL: Duration = Duration::from_millis(200);

/// One pgbench run with a window: its logged transactions and when the window began (µs
/// since the epoch).
struct Run {
    transactions: Vec<LoggedTransaction>,
    start_us: u64,
}

/// Throughput and the longest transaction within a window.
struct Window {
    tps: f64,
    max_latency_ms: f64,
}

impl Run {
    fn window(&self, length: Duration) -> Window {
        let end = self.start_us + length.as_micros() as u64;
        assert!(
            self.transactions.iter().any(|t| t.ended_us >= end),
            "pgbench stopped before the {length:?} window ended: raise WINDOW_RUN_SECS"
        );
        let inside: Vec<&LoggedTransaction> = self
            .transactions
            .iter()
            .filter(|t| (self.start_us..end).contains(&t.ended_us))
            .collect();
        let latencies: Vec<u64> = inside.iter().filter_map(|t| t.latency_us).collect();
        assert_eq!(
            latencies.len(),
            inside.len(),
            "transactions failed in the window"
        );
        Window {
            tps: inside.len() as f64 / length.as_secs_f64(),
            max_latency_ms: latencies.into_iter().max().unwrap_or(0) as f64 / 1000.0,
        }
    }
}

#[derive(Default)]
struct Samples {
    autoscaled_tps: Vec<f64>,
    fixed_tps: Vec<f64>,
    first_growth: Vec<f64>,
    up: Vec<f64>,
    peak: Vec<u32>,
    down: Vec<f64>,
    migrating: Vec<Window>,
    quiet: Vec<Window>,
    migration_secs: Vec<f64>,
}

struct Compute {
    lab: PostgresLab,
    client: PgClient,
    /// The host the VM runs on now.
    on: usize,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn history(client: &PgClient) -> Option<u64> {
    client
        .query("select count(*) from pgbench_history")
        .ok()?
        .parse()
        .ok()
}

/// Runs pgbench with its transactions logged; `during` runs once they commit, which is
/// where the window starts.
fn logged_run(client: &PgClient, during: impl FnOnce()) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("pgbench");
    let before = history(client).expect("the history table answers");
    let bench = client.pgbench_logged(CLIENTS, WINDOW_RUN_SECS, &prefix);
    wait_until(Duration::from_secs(30), "pgbench to commit", || {
        history(client).is_some_and(|n| n >= before + 20)
    });
    let start_us = now_us();
    during();
    let result = finish_pgbench(bench);
    assert_eq!(result.failed, 0, "{}", result.output);
    Run {
        transactions: pgbench_log(&prefix),
        start_us,
    }
}

impl Compute {
    fn host(&self) -> &TestHost {
        &self.lab.hosts[self.on]
    }

    fn wait_cu(&self, cu: u32, timeout: Duration) {
        wait_until(timeout, &format!("{VM} to be at {cu} CU"), || {
            self.host().show(VM)["cu"].as_f64() == Some(f64::from(cu))
        });
    }

    fn bounds(&self, min: u32, max: u32) {
        let (min, max) = (min.to_string(), max.to_string());
        self.host()
            .vmctl_ok(&["bounds", VM, "--min-cu", &min, "--max-cu", &max]);
    }

    /// Waits until the guest shows one vCPU and the host has taken its memory back too.
    fn settle_at_min(&self, timeout: Duration) -> Duration {
        let down = time_until_cpus(self.host(), VM, |cpus| cpus == MIN_CU, timeout);
        // A stale report from an earlier stay on this host can pass the first wait.
        self.wait_cu(MIN_CU, timeout);
        down
    }

    /// A load step on the VM settled at its minimum: its throughput, when the guest first
    /// grew and when it first showed the most vCPUs it reached, and how long after the
    /// step it is back at one.
    fn load_step(&self, samples: &mut Samples) {
        let host = self.host();
        let started = Instant::now();
        let mut bench = self.client.pgbench(CLIENTS, STEP_SECS);
        let mut seen = Vec::new();
        while bench.try_wait().unwrap().is_none() {
            if let Some(view) = host.guest_view(VM) {
                seen.push((started.elapsed().as_secs_f64(), view.cpus));
            }
            std::thread::sleep(POLL);
        }
        let result = finish_pgbench(bench);
        assert_eq!(result.failed, 0, "{}", result.output);
        let down = self.settle_at_min(Duration::from_secs(300));
        let peak = seen.iter().map(|&(_, cpus)| cpus).max().unwrap_or(0);
        assert!(
            peak > MIN_CU,
            "{VM} never grew under the load; the agent's decisions:\n{}",
            host.vmctl_ok(&["events", VM])
        );
        let first = |at_least: u32| seen.iter().find(|&&(_, c)| c >= at_least).unwrap().0;
        samples.autoscaled_tps.push(result.tps);
        samples.first_growth.push(first(MIN_CU + 1));
        samples.up.push(first(peak));
        samples.peak.push(peak);
        samples.down.push(down.as_secs_f64());
    }

    /// The VM fixed at its maximum: a load step's throughput, then a window with a
    /// migration to the other host and one without, in the order `migrate_first` says.
    fn at_max(&mut self, migrate_first: bool, samples: &mut Samples) {
        self.restart_within(MAX_CU, MAX_CU);
        self.wait_cu(MAX_CU, Duration::from_secs(120));
        let result = finish_pgbench(self.client.pgbench(CLIENTS, STEP_SECS));
        assert_eq!(result.failed, 0, "{}", result.output);
        samples.fixed_tps.push(result.tps);

        let (mut migrating, mut quiet, mut took) = (None, None, Duration::ZERO);
        for migrate_now in [migrate_first, !migrate_first] {
            if migrate_now {
                let (from, to) = (self.host(), HOSTS[1 - self.on]);
                migrating = Some(logged_run(&self.client, || {
                    let started = Instant::now();
                    from.vmctl_ok(&["migrate", VM, "--to", to]);
                    took = started.elapsed();
                }));
                self.on = 1 - self.on;
            } else {
                quiet = Some(logged_run(&self.client, || {}));
            }
        }
        let length = WINDOW.max(took + AFTERMATH);
        samples.migrating.push(migrating.unwrap().window(length));
        samples.quiet.push(quiet.unwrap().window(length));
        samples.migration_secs.push(took.as_secs_f64());

        self.restart_within(MIN_CU, MAX_CU);
        self.settle_at_min(FIRST_BOOT);
    }

    /// Stops the VM, sets its bounds and starts it again, until Postgres lets the client
    /// in. A running VM keeps the room it started with, and under TCG vmhostd refuses to
    /// migrate a QEMU that had a vCPU unplugged: both need a new QEMU.
    fn restart_within(&self, min: u32, max: u32) {
        let host = self.host();
        host.vmctl_ok(&["stop", VM]);
        self.bounds(min, max);
        host.vmctl_ok(&["start", VM]);
        wait_compute_state(host, VM, "running", FIRST_BOOT);
        self.client
            .wait_ready(Duration::from_secs(60), &host.serial_log(VM));
    }
}

pub fn pgbench(runs: usize, accel: Accel) {
    if cfg!(debug_assertions) {
        panic!("time pgbench on a release build: cargo run --release -p vmhost-tests --bin bench -- pgbench 3");
    }
    let lab = PostgresLab::new(&HOSTS);
    let (min, max) = (MIN_CU.to_string(), MAX_CU.to_string());
    let sizes: [&str; 6] = ["--min-cu", &min, "--max-cu", &max, "--agent", AGENT];
    let client = create_compute(&lab.lab, &lab.hosts[0], VM, &lab.good, &sizes);
    client.pgbench_init(SCALE);
    let mut compute = Compute { lab, client, on: 0 };
    // Boot and initdb were load too: every step starts from the minimum.
    compute.settle_at_min(FIRST_BOOT);
    let mut samples = Samples::default();
    for run in 0..runs {
        for autoscaled_now in [run % 2 == 0, run % 2 == 1] {
            if autoscaled_now {
                compute.load_step(&mut samples);
            } else {
                compute.at_max(run % 2 == 0, &mut samples);
            }
        }
        let (m, q) = (&samples.migrating[run], &samples.quiet[run]);
        eprintln!(
            "run {run}: {:.0} tps autoscaled, {:.0} fixed; up to {} vCPUs in {:.1} s (first growth {:.1} s), down in {:.1} s; migration {:.1} s: {:.0} tps, max {:.0} ms, without {:.0} tps, max {:.0} ms",
            samples.autoscaled_tps[run],
            samples.fixed_tps[run],
            samples.peak[run],
            samples.up[run],
            samples.first_growth[run],
            samples.down[run],
            samples.migration_secs[run],
            m.tps,
            m.max_latency_ms,
            q.tps,
            q.max_latency_ms
        );
    }
    report(runs, accel, &samples);
}

/// min/median/max of `values` at `decimals`, and the median.
fn spread(values: impl Iterator<Item = f64>, decimals: usize) -> (String, f64) {
    let (lo, mid, hi) = min_median_max(&mut values.collect::<Vec<f64>>());
    (
        format!("{lo:.decimals$}/{mid:.decimals$}/{hi:.decimals$}"),
        mid,
    )
}

fn report(runs: usize, accel: Accel, s: &Samples) {
    let date = today();
    let step = format!(
        "{accel}, Postgres compute of {MIN_CU}–{MAX_CU} CU (1 vCPU + 1 GiB each) settled at {MIN_CU} CU, agent {AGENT}, pgbench -c {CLIENTS} for {STEP_SECS} s at scale {SCALE} from a client namespace, two fleet hosts in network namespaces, {runs} runs"
    );
    let (auto, a) = spread(s.autoscaled_tps.iter().copied(), 0);
    let (fixed, f) = spread(s.fixed_tps.iter().copied(), 0);
    append(&format!(
        "- {date} pgbench throughput over a load step, autoscaled from the minimum ({step}, which side first alternating, min/median/max, release build; autoscaled {auto} tps, fixed {fixed} tps): ours {a:.0} tps, the same VM fixed at {MAX_CU} CU (stopped, `vmctl bounds --min-cu {MAX_CU} --max-cu {MAX_CU}`, started) {f:.0} tps, ratio {:.2} (autoscaled/fixed, higher is better)\n",
        a / f
    ));
    let peaks: Vec<String> = s.peak.iter().map(u32::to_string).collect();
    let (first, _) = spread(s.first_growth.iter().copied(), 1);
    let (up, u) = spread(s.up.iter().copied(), 1);
    append(&format!(
        "- {date} time to right size, up ({step}; from pgbench's start until the guest's own console report shows the most vCPUs it reached under the load, {} in turn, polled every {} ms; first growth {first} s; min/median/max {up} s; Neon's e2e allowance {NEON_UP_SECS:.0} s): ours {u:.1} s, goal {UP_GOAL_SECS:.0} s, ratio {:.2}\n",
        peaks.join(", "),
        POLL.as_millis(),
        u / UP_GOAL_SECS
    ));
    let (down, d) = spread(s.down.iter().copied(), 1);
    append(&format!(
        "- {date} time to right size, down ({step}; from pgbench's end until the guest's own console report shows {MIN_CU} vCPU again, the agent's downscale window 60 s; min/median/max {down} s; Neon's e2e allowance {NEON_DOWN_SECS:.0} s): ours {d:.1} s, goal {DOWN_GOAL_SECS:.0} s, ratio {:.2}\n",
        d / DOWN_GOAL_SECS
    ));
    let (took, _) = spread(s.migration_secs.iter().copied(), 1);
    let window = format!(
        "{accel}, the same Postgres compute fixed at {MAX_CU} CU by a stop and start (under TCG, vmhostd refuses to migrate a QEMU that had a vCPU unplugged), pgbench -c {CLIENTS} at scale {SCALE} from a client namespace with every transaction logged; once it commits, `vmctl migrate` to the other fleet host in a network namespace (migration {took} s), the window from the command for {} s or until {} s after it returned if later, against a run without a migration over a window of the same length from the same point, on the same VM; {runs} runs, which window first alternating, min/median/max, release build",
        WINDOW.as_secs(),
        AFTERMATH.as_secs()
    );
    let (with, w) = spread(s.migrating.iter().map(|w| w.max_latency_ms), 0);
    let (without, o) = spread(s.quiet.iter().map(|w| w.max_latency_ms), 0);
    append(&format!(
        "- {date} pgbench max latency through a live migration ({window}; with {with} ms, without {without} ms): ours with a migration {w:.0} ms, without {o:.0} ms, ratio {:.2}\n",
        w / o
    ));
    let (with, w) = spread(s.migrating.iter().map(|w| w.tps), 0);
    let (without, o) = spread(s.quiet.iter().map(|w| w.tps), 0);
    append(&format!(
        "- {date} pgbench throughput through a live migration ({window}; with {with} tps, without {without} tps): ours with a migration {w:.0} tps, without {o:.0} tps, ratio {:.2} (with/without, higher is better)\n",
        w / o
    ));
}
