//! Migration downtime and total time: a 1 GiB guest rewriting 64 MiB, moved between two
//! vmhostd on loopback (QUIC tunnel, lease, vsock replug), against raw QEMU post-copy between
//! two QEMUs over a local unix socket. Which side goes first alternates. Ours is broken into
//! phases from `vmctl --json migrate`'s progress lines. The downtime is the outage the guest
//! shows: the largest gap between its beats, stamped on the host as they reach either serial
//! log.

use crate::{append, min_median_max, today, wait_until, RawQemu};
use std::path::Path;
use std::time::{Duration, Instant};
use vmhost_tests::workload::{parse_beat, TickGaps};
use vmhost_tests::{HostOptions, Limits, TestHost, DIRTIER_MIB};
use vmm::qmp::MigrateSetParameters;
use vmm::{Accel, MigrationStatus};

/// Our phases. The vsock detach and the target's start run side by side; the first pass
/// counts from the later of the two, and ends when the switch to post-copy is asked.
const PHASES: [&str; 7] = [
    "request and lease",
    "vsock detach",
    "target start",
    "first pass",
    "switch to post-copy",
    "post-copy",
    "arrival",
];
/// Raw QEMU's, from the `migrate` command.
const RAW_PHASES: [&str; 3] = ["first pass", "post-copy", "target running"];

/// The guest's beat interval, and how often the host reads the serial logs for a beat.
const BEAT_MS: u64 = 1;
const BEAT_POLL: Duration = Duration::from_micros(500);
const IDLE_WATCH: Duration = Duration::from_secs(10);

/// The dirtier, beating on the console.
fn workload() -> String {
    format!("vmhost.workload=vmhost-dirtier,{DIRTIER_MIB},{BEAT_MS}")
}

/// Follows the guest's beats on its serial logs from now on.
fn follow_beats(serials: &[&Path]) -> TickGaps {
    let serials = serials.iter().map(|s| s.to_path_buf()).collect();
    TickGaps::follow(serials, BEAT_POLL, parse_beat)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One migration: the largest gap in the guest's beats, the time from the command until the
/// VM runs on the target, and its phases, all in ms.
struct Sample<const N: usize> {
    downtime: f64,
    total: f64,
    phases: [f64; N],
}

fn wait_dirtying(serial: &Path) {
    wait_until(Duration::from_secs(180), "the workload to run", || {
        std::fs::read_to_string(serial)
            .unwrap_or_default()
            .contains("dirtier: pass=")
    });
}

pub(crate) fn fleet_host(dir: &Path, name: &str, port: u16, extra_config: &str) -> TestHost {
    TestHost::start_with(HostOptions {
        name: name.into(),
        limits: Limits {
            vcpus: 8,
            memory_mib: 8192,
        },
        netns: None,
        extra_config: format!(
            "[fleet]\ncluster = \"bench\"\nlisten = \"127.0.0.1:{port}\"\nseeds = [\"127.0.0.1:7201\"]\n\
             credentials = \"{}\"\ngossip_interval_ms = 200\n{extra_config}",
            dir.join(name).display()
        ),
    })
}

/// Fleet hosts `a` and `b` on loopback, with credentials from a new CA in `pki`, once they
/// see each other; `extra_config` is added to both configs.
pub(crate) fn fleet_pair(pki: &Path, extra_config: &str) -> [TestHost; 2] {
    vmhost_pki::one_machine_fleet(pki, &["a", "b"], crate::LOCALHOST).unwrap();
    let hosts = [
        fleet_host(pki, "a", 7201, extra_config),
        fleet_host(pki, "b", 7202, extra_config),
    ];
    wait_until(Duration::from_secs(60), "the two hosts to meet", || {
        hosts[0]
            .vmctl_ok(&["--json", "hosts"])
            .matches("\"live\": true")
            .count()
            == 2
    });
    hosts
}

/// Runs `vmctl --json migrate bench` with `options`; returns the ms until it returned, its
/// summary and its progress lines.
pub(crate) fn vmctl_migrate(
    from: &TestHost,
    options: &[&str],
) -> (f64, serde_json::Value, Vec<serde_json::Value>) {
    let started = Instant::now();
    let out = from.vmctl_ok(&[&["--json", "migrate", "bench"][..], options].concat());
    let total = started.elapsed().as_secs_f64() * 1000.0;
    let mut lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = lines.pop().unwrap();
    (total, summary, lines)
}

/// When vmctl's progress lines first (or last) reported `phase`, ms after the source began.
pub(crate) fn reported(progress: &[serde_json::Value], phase: &str, last: bool) -> f64 {
    let mut times = progress
        .iter()
        .filter(|p| p["phase"] == phase)
        .map(|p| p["elapsed_ms"].as_f64().unwrap());
    let time = if last {
        times.next_back()
    } else {
        times.next()
    };
    time.unwrap_or_else(|| panic!("no '{phase}' progress line"))
}

/// One vmhost migration, timed from the command until it returns with the VM running on
/// the target. The source's progress times start after the lease; the arrival is what
/// follows QEMU's completion.
fn ours_once(from: &TestHost, to: &TestHost) -> Sample<7> {
    let beats = follow_beats(&[&from.serial_log("bench"), &to.serial_log("bench")]);
    let (total, summary, progress) =
        vmctl_migrate(from, &["--to", &to.name, "--max-downtime", "1"]);
    let downtime = beats.finish();
    assert_eq!(summary["postcopy"], true, "{summary}");
    eprintln!("ours: QEMU's own downtime {} ms", summary["downtime_ms"]);
    let at = |phase| reported(&progress, phase, false);
    let (detached, listening) = (at("guest channel detached"), at("target listening"));
    // Post-copy is asked on the last pre-copy report.
    let asked = reported(&progress, "active", true);
    let (postcopy, completed) = (at("postcopy-active"), at("completed"));
    let source_total = summary["total_ms"].as_f64().unwrap();
    Sample {
        downtime: ms(downtime),
        total,
        phases: [
            total - source_total,
            detached,
            listening,
            asked - detached.max(listening),
            postcopy - asked,
            completed - postcopy,
            source_total - completed,
        ],
    }
}

/// One raw QEMU post-copy migration over a unix socket to a QEMU already listening, timed
/// from the `migrate` command until the source completes and the target reports running.
async fn raw_once(image: &Path, accel: Accel) -> Sample<3> {
    let cmdline = format!("{} {}", vmm::cmdline::DEFAULT_KERNEL_CMDLINE, workload());
    let source = RawQemu::start_with(image, accel, 1, 0, &cmdline, false);
    let target = RawQemu::start_with(image, accel, 1, 0, &cmdline, true);
    wait_dirtying(&source.spec.serial_log);
    let src = source.attach().await;
    let dst = target.attach().await;
    let socket = target.spec.qmp_socket.with_file_name("migrate.sock");
    dst.prepare_migration(true, Default::default())
        .await
        .unwrap();
    dst.listen_incoming(&socket).await.unwrap();
    let uncapped = Some(100 << 30);
    src.prepare_migration(
        true,
        MigrateSetParameters {
            // Pre-copy must not converge first: the comparison is of post-copy switchovers,
            // taken like vmhostd's after the first pass.
            downtime_limit: Some(1),
            max_bandwidth: uncapped,
            max_postcopy_bandwidth: uncapped,
        },
    )
    .await
    .unwrap();
    let mut events = src.migration_events();
    let beats = follow_beats(&[&source.spec.serial_log, &target.spec.serial_log]);
    let started = Instant::now();
    src.migrate_to(&socket, false).await.unwrap();
    let mut asked = None;
    let info = loop {
        events.next_change(Duration::from_millis(50)).await;
        let info = src.migration_info().await.unwrap();
        match info.status {
            MigrationStatus::Completed => break info,
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                panic!("raw migration failed: {info:?}")
            }
            MigrationStatus::Active
                if asked.is_none()
                    && info.ram.as_ref().is_some_and(|r| r.dirty_sync_count >= 2) =>
            {
                src.start_postcopy().await.unwrap();
                asked = Some(started.elapsed());
            }
            _ => {}
        }
    };
    let completed = started.elapsed();
    // In post-copy the target runs the guest from the switch on; this only confirms it.
    while !dst.status().await.unwrap().running {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let downtime = beats.finish();
    let asked = asked.expect("raw migration completed before the switch to post-copy");
    eprintln!(
        "raw: QEMU's own total-time {:?} ms, downtime {:?} ms",
        info.total_time, info.downtime
    );
    Sample {
        downtime: ms(downtime),
        total: ms(total),
        phases: [ms(asked), ms(completed - asked), ms(total - completed)],
    }
}

/// Prints min/median/max of each phase, in ms; returns the medians, named, for the line.
fn phases<const N: usize>(side: &str, names: [&str; N], samples: &[Sample<N>]) -> String {
    println!("{side}: phase min/median/max ms");
    let medians: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut values: Vec<f64> = samples.iter().map(|s| s.phases[i]).collect();
            let (lo, mid, hi) = min_median_max(&mut values);
            println!("  {name:<20} {lo:>7.0} {mid:>7.0} {hi:>7.0}");
            format!("{name} {mid:.0}")
        })
        .collect();
    medians.join(", ")
}

pub async fn downtime(runs: usize, image: &Path, accel: Accel) {
    if cfg!(debug_assertions) {
        panic!("time migrations on a release build: cargo run --release -p vmhost-tests --bin bench -- migration");
    }
    let pki = tempfile::tempdir().unwrap();
    let hosts = fleet_pair(
        pki.path(),
        &vmhost_tests::workload_image("beating", image, &workload()),
    );
    hosts[0].vmctl_ok(&[
        "create",
        "bench",
        "--image",
        "beating",
        "--min-cu",
        "1",
        "--no-autoscale",
    ]);
    wait_dirtying(&hosts[0].serial_log("bench"));
    // The largest gap the guest shows without migrating, for scale.
    let idle = follow_beats(&[&hosts[0].serial_log("bench")]);
    std::thread::sleep(IDLE_WATCH);
    let idle = ms(idle.finish());
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // Back and forth: run i leaves host i % 2. Which side goes first alternates.
        let (from, to) = (&hosts[run % 2], &hosts[(run + 1) % 2]);
        if run % 2 == 0 {
            ours.push(ours_once(from, to));
            raw.push(raw_once(image, accel).await);
        } else {
            raw.push(raw_once(image, accel).await);
            ours.push(ours_once(from, to));
        }
        eprintln!(
            "run {run}: ours down {:.1} ms, {:.0} ms {:?}; raw down {:.1} ms, {:.0} ms {:?}",
            ours[run].downtime,
            ours[run].total,
            ours[run].phases,
            raw[run].downtime,
            raw[run].total,
            raw[run].phases
        );
    }
    let (our_phases, raw_phases) = (
        phases("ours", PHASES, &ours),
        phases("raw qemu", RAW_PHASES, &raw),
    );
    let spread = |mut values: Vec<f64>| min_median_max(&mut values);
    let (od, rd) = (
        spread(ours.iter().map(|s| s.downtime).collect()),
        spread(raw.iter().map(|s| s.downtime).collect()),
    );
    let (ot, rt) = (
        spread(ours.iter().map(|s| s.total / 1000.0).collect()),
        spread(raw.iter().map(|s| s.total / 1000.0).collect()),
    );
    let what = format!(
        "1 GiB guest rewriting {DIRTIER_MIB} MiB, {accel}, post-copy after the first pass, {runs} runs, which side goes first alternating, min/median/max, release build"
    );
    assert!(
        rd.1 > 0.0,
        "raw's median gap is 0 ms, yet a gap spans at least one poll: no ratio"
    );
    append(&format!(
        "- {} migration downtime, the largest gap between the guest's beats (numbered lines it prints on its serial console every {BEAT_MS} ms, stamped on the host as they reach either QEMU's serial log, read every {:.1} ms from the migration command until the guest beats again after the target runs; the same guest without migrating, over {} s before the runs: {idle:.1} ms) ({what}; ours: two vmhostd on loopback over the QUIC tunnel; raw: two QEMUs over a unix socket; ours {:.1}/{:.1}/{:.1} ms, raw {:.1}/{:.1}/{:.1} ms): ours {:.1} ms, raw qemu {:.1} ms, ratio {:.2}\n",
        today(),
        ms(BEAT_POLL),
        IDLE_WATCH.as_secs(),
        od.0, od.1, od.2, rd.0, rd.1, rd.2, od.1, rd.1,
        od.1 / rd.1
    ));
    append(&format!(
        "- {} migration total time ({what}; ours from `vmctl migrate` until it returns with the VM running on the target, phase medians in ms: {our_phases}, the detach and the target's start side by side; raw from the `migrate` command, to a QEMU already listening, until the source completes and the target's status is running, phase medians in ms: {raw_phases}; ours {:.2}/{:.2}/{:.2} s, raw {:.2}/{:.2}/{:.2} s): ours {:.2} s, raw qemu {:.2} s, ratio {:.2}\n",
        today(),
        ot.0, ot.1, ot.2, rt.0, rt.1, rt.2, ot.1, rt.1,
        ot.1 / rt.1
    ));
}
