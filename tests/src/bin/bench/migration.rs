//! Migration downtime and total time: a 1 GiB guest rewriting 64 MiB, moved between two
//! vmhostd on loopback (QUIC tunnel, lease, vsock replug), against raw QEMU post-copy between
//! two QEMUs over a local unix socket, alternating.

use crate::{append, today, wait_until, RawQemu};
use std::path::Path;
use std::time::Duration;
use vmhost_tests::{HostOptions, Limits, TestHost, DIRTIER_MIB};
use vmm::qmp::MigrateSetParameters;
use vmm::{Accel, Machine, MigrationStatus};

fn wait_dirtying(serial: &Path) {
    wait_until(Duration::from_secs(180), "the workload to run", || {
        std::fs::read_to_string(serial)
            .unwrap_or_default()
            .contains("dirtier: pass=")
    });
}

fn fleet_host(dir: &Path, name: &str, port: u16) -> TestHost {
    TestHost::start_with(HostOptions {
        name: name.into(),
        limits: Limits {
            vcpus: 8,
            memory_mib: 8192,
        },
        netns: None,
        extra_config: format!(
            "[fleet]\ncluster = \"bench\"\nlisten = \"127.0.0.1:{port}\"\nseeds = [\"127.0.0.1:7201\"]\n\
             credentials = \"{}\"\ngossip_interval_ms = 200\n",
            dir.join(name).display()
        ),
    })
}

/// One vmhost migration; returns (downtime ms, total ms).
fn ours_once(from: &TestHost, to: &str) -> (f64, f64) {
    let out = from.vmctl_ok(&[
        "--json",
        "migrate",
        "bench",
        "--to",
        to,
        "--max-downtime",
        "1",
    ]);
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["postcopy"], true, "{summary}");
    (
        summary["downtime_ms"].as_f64().unwrap(),
        summary["total_ms"].as_f64().unwrap(),
    )
}

/// One raw QEMU post-copy migration over a unix socket; returns (downtime ms, total ms).
async fn raw_once(image: &Path, accel: Accel) -> (f64, f64) {
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
    src.migrate_to(&socket, false).await.unwrap();
    let mut switched = false;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let info = src.migration_info().await.unwrap();
        match info.status {
            MigrationStatus::Completed => {
                assert!(switched);
                return (
                    info.downtime.unwrap_or(0) as f64,
                    info.total_time.unwrap_or(0) as f64,
                );
            }
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                panic!("raw migration failed: {info:?}")
            }
            MigrationStatus::Active
                if !switched && info.ram.as_ref().is_some_and(|r| r.dirty_sync_count >= 2) =>
            {
                src.start_postcopy().await.unwrap();
                switched = true;
            }
            _ => {}
        }
    }
}

pub async fn downtime(runs: usize, image: &Path, accel: Accel) {
    let pki = tempfile::tempdir().unwrap();
    vmhost_pki::one_machine_fleet(pki.path(), &["a", "b"], crate::LOCALHOST).unwrap();
    let hosts = [
        fleet_host(pki.path(), "a", 7201),
        fleet_host(pki.path(), "b", 7202),
    ];
    wait_until(Duration::from_secs(60), "the two hosts to meet", || {
        hosts[0]
            .vmctl_ok(&["--json", "hosts"])
            .matches("\"live\": true")
            .count()
            == 2
    });
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
        // Back and forth: run i leaves host i % 2.
        let (from, to) = (&hosts[run % 2], ["b", "a"][run % 2]);
        ours.push(ours_once(from, to));
        raw.push(raw_once(image, accel).await);
        eprintln!("run {run}: ours {:?}, raw {:?}", ours[run], raw[run]);
    }
    let median = |samples: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let mut values: Vec<f64> = samples.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (od, rd) = (median(&ours, |s| s.0), median(&raw, |s| s.0));
    let (ot, rt) = (median(&ours, |s| s.1), median(&raw, |s| s.1));
    let what = format!(
        "1 GiB guest rewriting {DIRTIER_MIB} MiB, {accel}, post-copy after the first pass, median of {runs}"
    );
    append(&format!(
        "- {} migration downtime ({what}; ours: two vmhostd on loopback over the QUIC tunnel; raw: two QEMUs over a unix socket): ours {od:.0} ms, raw qemu {rd:.0} ms, ratio {:.2}\n",
        today(),
        od / rd.max(1.0)
    ));
    append(&format!(
        "- {} migration total time ({what}; ours from the request to the VM running on the target, with lease, vsock replug and target start; raw: QEMU's total-time): ours {:.2} s, raw qemu {:.2} s, ratio {:.2}\n",
        today(),
        ot / 1000.0,
        rt / 1000.0,
        ot / rt
    ));
}
