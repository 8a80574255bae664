//! Pre-copy migration against QEMU's own TLS migration: one 2 GiB guest holding 1 GiB of
//! written memory, moved back and forth between two vmhostd on loopback (`vmctl migrate
//! --precopy-only`: unix socket, QUIC stream with mutual TLS, unix socket), against two
//! QEMUs migrating over TCP on loopback with `tls-creds-x509` made of the same fleet
//! certificates (verify-peer on both ends), and over plaintext TCP as the physical reference.
//! Which side goes first alternates. Per side: throughput while streaming, total time, and
//! host CPU per GiB moved.

use crate::migration::{fleet_pair, reported, vmctl_migrate};
use crate::{append, cpu_seconds, min_median_max, today, wait_until, RawQemu, GIB};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmhost_pki::{CA_CERT, HOST_CERT, HOST_KEY};
use vmhost_tests::cgroups::remove_host_cgroups;
use vmhost_tests::procs::{lab_processes, Kind};
use vmhost_tests::{TestHost, MEMHOG_FREE_PORT};
use vmm::cgroup::{CgroupLimits, VmCgroups};
use vmm::qmp::{
    Migrate, MigrateIncoming, MigrateSetParameters, QmpClient, QueryMigrate, QueryStatus,
};
use vmm::{Accel, MachineSpec, MigrationStatus};

/// What the guest writes once and then holds, idle.
const FILL_MIB: u64 = 1024;
/// 2 vCPUs and 2 GiB with the test hosts' compute unit.
const GUEST_CU: &str = "2";
const GUEST_VCPUS: u32 = 2;
/// vmhostd's own cap: QEMU's default of 128 MiB/s would hold the stream back.
const UNCAPPED: u64 = 100 << 30;
const POLL: Duration = Duration::from_millis(10);
/// The cgroup hosts of the raw QEMUs.
const RAW_HOSTS: [&str; 2] = ["raw-a", "raw-b"];

fn workload() -> String {
    format!("vmhost.workload=vmhost-memhog,{FILL_MIB},64,0,{MEMHOG_FREE_PORT}")
}

fn wait_filled(serial: &Path) {
    let line = format!("memhog: holding {FILL_MIB} MiB");
    wait_until(
        Duration::from_secs(300),
        "the guest to fill its memory",
        || {
            std::fs::read_to_string(serial)
                .unwrap_or_default()
                .contains(&line)
        },
    );
}

/// One migration: MiB/s while streaming, s until the VM runs on the target, and host CPU
/// s per GiB moved, by process.
struct Sample {
    rate: f64,
    total: f64,
    cpu_per_gib: BTreeMap<String, f64>,
}

impl Sample {
    fn new(
        transferred: u64,
        stream: Duration,
        total: Duration,
        cpu: BTreeMap<String, f64>,
    ) -> Self {
        let gib = transferred as f64 / GIB as f64;
        Sample {
            rate: gib * 1024.0 / stream.as_secs_f64(),
            total: total.as_secs_f64(),
            cpu_per_gib: cpu.into_iter().map(|(name, s)| (name, s / gib)).collect(),
        }
    }

    fn cpu(&self) -> f64 {
        self.cpu_per_gib.values().sum()
    }
}

/// CPU seconds of the processes `list` names, re-listed on each sample every 20 ms, from
/// now until `stop`: vmhostd ends the source QEMU before `vmctl migrate` returns, so one
/// that exits keeps its last sample, and one that starts counts from its start.
struct CpuMeter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<String, f64>>,
}

impl CpuMeter {
    fn start(list: impl Fn() -> Vec<(u32, String)> + Send + 'static) -> CpuMeter {
        let sample = move || -> BTreeMap<u32, (String, f64)> {
            list()
                .into_iter()
                .filter_map(|(pid, name)| Some((pid, (name, cpu_seconds(pid)?))))
                .collect()
        };
        let base = sample();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = base.clone();
            loop {
                last.extend(sample());
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut used = BTreeMap::new();
            for (pid, (name, seconds)) in last {
                let start = base.get(&pid).map_or(0.0, |(_, s)| *s);
                *used.entry(name).or_insert(0.0) += seconds - start;
            }
            used
        });
        CpuMeter { stop, thread }
    }

    fn stop(self) -> BTreeMap<String, f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// One `vmctl migrate --precopy-only` from `hosts[from]`. The stream is timed from the later
/// of the vsock detach and the target listening, when vmhostd starts QEMU's stream, until
/// QEMU completed.
fn ours_once(hosts: &[TestHost; 2], from: usize) -> Sample {
    let dirs: Vec<PathBuf> = hosts.iter().map(TestHost::state_dir).collect();
    let daemons: Vec<u32> = hosts.iter().map(|h| h.daemon_pid().unwrap()).collect();
    let role = move |host: usize| if host == from { "source" } else { "target" };
    let meter = CpuMeter::start(move || {
        let qemus = lab_processes(&dirs)
            .into_iter()
            .filter(|p| p.kind == Kind::Qemu)
            .map(|p| (p.pid as u32, format!("{} qemu", role(p.host))));
        let daemons = daemons.iter().enumerate();
        daemons
            .map(|(host, pid)| (*pid, format!("{} vmhostd", role(host))))
            .chain(qemus)
            .collect()
    });
    let to = ["a", "b"][1 - from];
    let (total, summary, progress) = vmctl_migrate(&hosts[from], &["--to", to, "--precopy-only"]);
    let cpu = meter.stop();
    assert_eq!(summary["postcopy"], false, "{summary}");
    let at = |phase| reported(&progress, phase, false);
    let streaming = at("guest channel detached").max(at("target listening"));
    let ms = |ms: f64| Duration::from_secs_f64(ms / 1000.0);
    Sample::new(
        summary["transferred_bytes"].as_u64().unwrap(),
        ms(at("completed") - streaming),
        ms(total),
        cpu,
    )
}

/// QEMU's certificate directory: the fleet CA, host b's certificate to serve and host a's
/// to dial, named as `tls-creds-x509` wants them.
fn qemu_credentials(pki: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, host, file) in [
        ("ca-cert.pem", "a", CA_CERT),
        ("server-cert.pem", "b", HOST_CERT),
        ("server-key.pem", "b", HOST_KEY),
        ("client-cert.pem", "a", HOST_CERT),
        ("client-key.pem", "a", HOST_KEY),
    ] {
        std::os::unix::fs::symlink(pki.join(host).join(file), dir.path().join(name)).unwrap();
    }
    dir
}

/// QEMU's arguments for a TLS migration as `endpoint` (server or client).
fn tls_args(credentials: &Path, endpoint: &str) -> Vec<String> {
    [
        "-object",
        &format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
            credentials.display()
        ),
        // The migration parameters tls-creds and tls-hostname, set from the start.
        "-global",
        "migration.tls-creds=tls0",
        "-global",
        "migration.tls-hostname=b",
    ]
    .map(String::from)
    .to_vec()
}

fn pid(qemu: &RawQemu) -> u32 {
    let pid = std::fs::read_to_string(&qemu.spec.pidfile).unwrap();
    pid.trim().parse().unwrap()
}

/// Puts a raw QEMU in a cgroup of host `host` as vmhostd confines ours (one CPU per vCPU, the
/// guest's memory and QEMU's allowance), so that both get the same CPU weight against the
/// machine's other work.
fn confine(qemu: &RawQemu, accel: Accel, host: &str) {
    let overhead_mib = if matches!(accel, Accel::Tcg) {
        512
    } else {
        128
    };
    let limits = CgroupLimits::for_vm(GUEST_VCPUS, 2 * GIB, overhead_mib << 20);
    VmCgroups::open(host)
        .unwrap()
        .place("bench", &[pid(qemu)], limits)
        .unwrap();
}

/// One raw QEMU pre-copy migration over TCP on loopback, with TLS if `credentials` are
/// given, of a guest that has filled its memory. Timed, like ours, from starting the target
/// until it runs the guest; the stream from the `migrate` command until the source completed.
async fn raw_once(image: &Path, accel: Accel, credentials: Option<&Path>) -> Sample {
    let cmdline = format!("{} {}", vmm::cmdline::DEFAULT_KERNEL_CMDLINE, workload());
    let start = |incoming, endpoint, host| {
        let shape = |spec| MachineSpec {
            boot_vcpus: GUEST_VCPUS,
            initial_vcpus: GUEST_VCPUS,
            boot_memory_bytes: 2 * GIB,
            kernel_cmdline: cmdline.clone(),
            incoming,
            ..spec
        };
        let extra = credentials.map_or_else(Vec::new, |dir| tls_args(dir, endpoint));
        let qemu = RawQemu::launch(image, accel, GUEST_VCPUS, 0, shape, &extra);
        confine(&qemu, accel, host);
        qemu
    };
    let source = start(false, "client", RAW_HOSTS[0]);
    wait_filled(&source.spec.serial_log);
    let source_before = cpu_seconds(pid(&source)).unwrap();
    let started = Instant::now();
    let target = start(true, "server", RAW_HOSTS[1]);
    let timeout = Duration::from_secs(10);
    let src = QmpClient::connect(&source.spec.qmp_socket, timeout)
        .await
        .unwrap();
    let dst = QmpClient::connect(&target.spec.qmp_socket, timeout)
        .await
        .unwrap();
    let port = std::net::TcpListener::bind((crate::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.execute(MigrateIncoming { uri: uri.clone() })
        .await
        .unwrap();
    src.execute(MigrateSetParameters {
        max_bandwidth: Some(UNCAPPED),
        ..Default::default()
    })
    .await
    .unwrap();
    let streaming = Instant::now();
    src.execute(Migrate { uri, resume: false }).await.unwrap();
    let info = loop {
        let info = src.execute(QueryMigrate {}).await.unwrap();
        match info.status {
            MigrationStatus::Completed => break info,
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                panic!("raw migration failed: {info:?}")
            }
            _ => tokio::time::sleep(POLL).await,
        }
    };
    let stream = streaming.elapsed();
    while !dst.execute(QueryStatus {}).await.unwrap().running {
        tokio::time::sleep(POLL).await;
    }
    let total = started.elapsed();
    let cpu = BTreeMap::from([
        (
            "source qemu".to_string(),
            cpu_seconds(pid(&source)).unwrap() - source_before,
        ),
        (
            "target qemu".to_string(),
            cpu_seconds(pid(&target)).unwrap(),
        ),
    ]);
    let transferred = info.ram.expect("QEMU reported no RAM stats").transferred;
    Sample::new(transferred, stream, total, cpu)
}

fn spread(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    min_median_max(&mut samples.iter().map(value).collect::<Vec<_>>())
}

/// The median CPU s per GiB of each process, printed and named for the line.
fn cpu_split(side: &str, samples: &[Sample]) -> String {
    let names = samples[0].cpu_per_gib.keys();
    let medians: Vec<String> = names
        .map(|name| {
            let (lo, mid, hi) = spread(samples, |s| s.cpu_per_gib[name]);
            println!("{side}: {name} CPU s/GiB {lo:.2}/{mid:.2}/{hi:.2}");
            format!("{name} {mid:.2}")
        })
        .collect();
    medians.join(", ")
}

pub async fn throughput(runs: usize, image: &Path, accel: Accel) {
    if cfg!(debug_assertions) {
        panic!("time migrations on a release build: cargo run --release -p vmhost-tests --bin bench -- migration-tls");
    }
    let pki = tempfile::tempdir().unwrap();
    let hosts = fleet_pair(
        pki.path(),
        &vmhost_tests::workload_image("fill", image, &workload()),
    );
    let credentials = qemu_credentials(pki.path());
    hosts[0].vmctl_ok(&[
        "create",
        "bench",
        "--image",
        "fill",
        "--min-cu",
        GUEST_CU,
        "--no-autoscale",
    ]);
    wait_filled(&hosts[0].serial_log("bench"));
    let (mut ours, mut tls, mut tcp) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // Back and forth: run i leaves host i % 2. Which side goes first alternates.
        if run % 2 == 1 {
            tls.push(raw_once(image, accel, Some(credentials.path())).await);
            tcp.push(raw_once(image, accel, None).await);
        }
        ours.push(ours_once(&hosts, run % 2));
        if run % 2 == 0 {
            tls.push(raw_once(image, accel, Some(credentials.path())).await);
            tcp.push(raw_once(image, accel, None).await);
        }
        for (side, sample) in [
            ("ours", &ours[run]),
            ("qemu tls", &tls[run]),
            ("qemu tcp", &tcp[run]),
        ] {
            eprintln!(
                "run {run} {side}: {:.0} MiB/s, {:.2} s, {:.2} CPU s/GiB {:?}",
                sample.rate,
                sample.total,
                sample.cpu(),
                sample.cpu_per_gib
            );
        }
    }
    for host in RAW_HOSTS {
        remove_host_cgroups(host);
    }
    let (our_split, tls_split, tcp_split) = (
        cpu_split("ours", &ours),
        cpu_split("qemu tls", &tls),
        cpu_split("qemu tcp", &tcp),
    );
    let what = format!(
        "2 GiB guest holding {FILL_MIB} MiB written, {accel}, pre-copy only, {runs} runs, which side goes first alternating, min/median/max, release build; ours: `vmctl migrate --precopy-only` between two vmhostd on loopback (QUIC, mutual TLS); qemu tls: two QEMUs over TCP on loopback, tls-creds-x509 with the fleet's CA and host certificates, verify-peer"
    );
    let figures = |value: fn(&Sample) -> f64, digits: usize| {
        let [o, t, p] = [&ours, &tls, &tcp].map(|samples| spread(samples, value));
        let f =
            |(lo, mid, hi): (f64, f64, f64)| format!("{lo:.digits$}/{mid:.digits$}/{hi:.digits$}");
        (
            o.1,
            t.1,
            p.1,
            format!(
                "ours {}, qemu tls {}, qemu plaintext TCP {}",
                f(o),
                f(t),
                f(p)
            ),
        )
    };
    let (o, t, p, all) = figures(|s| s.rate, 0);
    append(&format!(
        "- {} migration throughput against QEMU's own TLS ({what}; QEMU's transferred bytes over the time from the stream's start until the source completed; {all} MiB/s; `bench -- migration-tls {runs}`): ours {o:.0} MiB/s, qemu tls {t:.0} MiB/s, ratio {:.2} (ours/qemu, higher is better)\n",
        today(),
        o / t
    ));
    append(&format!(
        "- {} migration throughput against QEMU's plaintext TCP migration, the physical reference (the same run; qemu tls {t:.0} MiB/s; `bench -- migration-tls {runs}`): ours {o:.0} MiB/s, qemu plaintext TCP {p:.0} MiB/s, ratio {:.2} (ours/qemu, higher is better)\n",
        today(),
        o / p
    ));
    let (o, t, p, all) = figures(Sample::cpu, 2);
    append(&format!(
        "- {} migration host CPU per GiB moved against QEMU's own TLS ({what}; user+system time of both QEMUs, and for ours of both vmhostd, the target QEMU from its start; medians by process, ours: {our_split}; qemu tls: {tls_split}; qemu plaintext TCP: {tcp_split}; {all} s; `bench -- migration-tls {runs}`): ours {o:.2} s, qemu tls {t:.2} s, ratio {:.2} (ours/qemu, lower is better; plaintext TCP {p:.2} s)\n",
        today(),
        o / t
    ));
    let (o, t, p, all) = figures(|s| s.total, 2);
    append(&format!(
        "- {} migration total time against QEMU's own TLS ({what}; ours from `vmctl migrate` until it returns with the VM running on the target, lease, vsock detach and target start included; qemu from starting the target QEMU until it runs the guest; {all} s; `bench -- migration-tls {runs}`): ours {o:.2} s, qemu tls {t:.2} s, ratio {:.2} (plaintext TCP {p:.2} s)\n",
        today(),
        o / t
    ));
}
