//! Migration downtime and total time: a 1 GiB guest rewriting 64 MiB, moved between two
//! vmhostd on loopback (QUIC tunnel, lease, vsock replug), against raw QEMU post-copy between
//! two QEMUs over a local unix socket. Which side goes first alternates. Ours is broken into
//! phases from `vmctl --json migrate`'s progress lines.

use crate::{append, min_median_max, today, wait_until, RawQemu};
use std::path::Path;
use std::time::{Duration, Instant};
use vmhost_tests::{HostOptions, Limits, TestHost, DIRTIER_MIB};
use vmm::qmp::MigrateSetParameters;
use vmm::{Accel, Machine, MigrationStatus};

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

/// One migration: QEMU's downtime, the time from the command until the VM runs on the
/// target, and its phases, all in ms.
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

fn fleet_host(dir: &Path, name: &str, port: u16, extra_config: &str) -> TestHost {
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
fn ours_once(from: &TestHost, to: &str) -> Sample<7> {
    let (total, summary, progress) = vmctl_migrate(from, &["--to", to, "--max-downtime", "1"]);
    assert_eq!(summary["postcopy"], true, "{summary}");
    let at = |phase| reported(&progress, phase, false);
    let (detached, listening) = (at("guest channel detached"), at("target listening"));
    // Post-copy is asked on the last pre-copy report.
    let asked = reported(&progress, "active", true);
    let (postcopy, completed) = (at("postcopy-active"), at("completed"));
    let source_total = summary["total_ms"].as_f64().unwrap();
    Sample {
        downtime: summary["downtime_ms"].as_f64().unwrap(),
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
    let cmdline = format!(
        "{} vmhost.workload=vmhost-dirtier,{DIRTIER_MIB}",
        vmm::cmdline::DEFAULT_KERNEL_CMDLINE
    );
    let source = RawQemu::start_with(image, accel, 1, 0, &cmdline, false);
    let target = RawQemu::start_with(image, accel, 1, 0, &cmdline, true);
    wait_dirtying(&source.spec.serial_log);
    let timeout = Duration::from_secs(10);
    let src = Machine::attach(&source.spec.qmp_socket, &source.spec.pidfile, timeout)
        .await
        .unwrap();
    let dst = Machine::attach(&target.spec.qmp_socket, &target.spec.pidfile, timeout)
        .await
        .unwrap();
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
    let asked = asked.expect("raw migration completed before the switch to post-copy");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!("raw: QEMU's own total-time {:?} ms", info.total_time);
    Sample {
        downtime: info.downtime.unwrap_or(0) as f64,
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
    let hosts = fleet_pair(pki.path(), "");
    hosts[0].vmctl_ok(&[
        "create",
        "bench",
        "--image",
        "dirtier",
        "--min-cu",
        "1",
        "--no-autoscale",
    ]);
    wait_dirtying(&hosts[0].serial_log("bench"));
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // Back and forth: run i leaves host i % 2. Which side goes first alternates.
        let (from, to) = (&hosts[run % 2], ["b", "a"][run % 2]);
        if run % 2 == 0 {
            ours.push(ours_once(from, to));
            raw.push(raw_once(image, accel).await);
        } else {
            raw.push(raw_once(image, accel).await);
            ours.push(ours_once(from, to));
        }
        eprintln!(
            "run {run}: ours {:.0} ms {:?}, raw {:.0} ms {:?}",
            ours[run].total, ours[run].phases, raw[run].total, raw[run].phases
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
    append(&format!(
        "- {} migration downtime ({what}; ours: two vmhostd on loopback over the QUIC tunnel; raw: two QEMUs over a unix socket; ours {:.0}/{:.0}/{:.0} ms, raw {:.0}/{:.0}/{:.0} ms): ours {:.0} ms, raw qemu {:.0} ms, ratio {:.2}\n",
        today(),
        od.0, od.1, od.2, rd.0, rd.1, rd.2, od.1, rd.1,
        od.1 / rd.1.max(1.0)
    ));
    append(&format!(
        "- {} migration total time ({what}; ours from `vmctl migrate` until it returns with the VM running on the target, phase medians in ms: {our_phases}, the detach and the target's start side by side; raw from the `migrate` command, to a QEMU already listening, until the source completes and the target's status is running, phase medians in ms: {raw_phases}; ours {:.2}/{:.2}/{:.2} s, raw {:.2}/{:.2}/{:.2} s): ours {:.2} s, raw qemu {:.2} s, ratio {:.2}\n",
        today(),
        ot.0, ot.1, ot.2, rt.0, rt.1, rt.2, ot.1, rt.1,
        ot.1 / rt.1
    ));
}
