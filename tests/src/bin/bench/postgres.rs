//! The Postgres image: its build from an empty cache against mmdebstrap of the same packages
//! alone, its size against those packages, and `vmctl create` until Postgres is ready
//! against QEMU started by hand with the same image and handed the same spec.

use crate::{append, today, RawQemu, GIB};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmhost_compute_api::ComputeState;
use vmhost_guest_link::compute::ComputeClient;
use vmhost_tests::postgres::{password_hash, postgres_image};
use vmhost_tests::{bin, repo_root, wait_until, HostOptions, Limits, TestHost};
use vmm::vsock::VsockBackend;
use vmm::{Accel, MachineSpec, Nic};

const SCRIPT: &str = "images/build-postgres-image";
const MIRROR: &str = "http://deb.debian.org/debian";
/// First boot under emulation: systemd, mke2fs of the new disk, initdb, Postgres.
const FIRST_BOOT: Duration = Duration::from_secs(600);
const READY: &str = "database system is ready to accept connections";
/// computectl's log line for its move to Running.
const RUNNING: &str = "-> running";
/// 2 CU on the test host, whose CU is 1 vCPU + 1 GiB.
const VCPUS: u32 = 2;
const DISK_GIB: u64 = 2;

pub async fn postgres(runs: usize, accel: Accel) {
    build(runs.max(2), accel);
    create_to_ready(runs, &postgres_image(), accel).await;
}

fn mib(path: &Path) -> f64 {
    std::fs::metadata(path).unwrap().len() as f64 / (1u64 << 20) as f64
}

fn min_median_max(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let secs = |d: Duration| d.as_secs_f64();
    (
        secs(samples[0]),
        secs(samples[samples.len() / 2]),
        secs(samples[samples.len() - 1]),
    )
}

/// The script into an empty cache, so mmdebstrap runs too; (time, (root.img, initrd) MiB).
fn build_ours() -> (Duration, (f64, f64)) {
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = Command::new(repo_root().join(SCRIPT))
        .arg("--vm-monitor")
        .arg(bin("vm-monitor"))
        .arg("--computectl")
        .arg(bin("computectl"))
        .env("VMHOST_IMAGE_CACHE", cache.path())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(output.status.success(), "{SCRIPT} failed");
    let image = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    let sizes = (mib(&image.join("root.img")), mib(&image.join("initrd.img")));
    (took, sizes)
}

/// The script's own mmdebstrap options, read from it so the baseline cannot drift.
fn mmdebstrap_alone() -> String {
    let script = std::fs::read_to_string(repo_root().join(SCRIPT)).unwrap();
    let lines: Vec<&str> = script.lines().collect();
    let find = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{SCRIPT} has no line starting `{prefix}`"))
    };
    let (packages, options) = (find("packages="), find("debian_options=("));
    let end = options
        + lines[options..]
            .iter()
            .position(|l| l.ends_with(')'))
            .expect("debian_options=( ends with a `)`");
    format!(
        "set -euo pipefail\n{}\n{}\nmmdebstrap \"${{debian_options[@]}}\" \"$1\" {MIRROR} >&2\n",
        lines[packages],
        lines[options..=end].join("\n")
    )
}

/// The same Debian root alone; (time, tar MiB).
fn build_debian(command: &str) -> (Duration, f64) {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("debian.tar");
    let started = Instant::now();
    let status = Command::new("bash")
        .args(["-c", command, "bash"])
        .arg(&tar)
        .status()
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "mmdebstrap failed");
    (took, mib(&tar))
}

fn build(runs: usize, accel: Accel) {
    let debian = mmdebstrap_alone();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let ((mut root, mut initrd), mut packages) = ((0.0, 0.0), 0.0);
    for run in 0..runs {
        for ours_now in [run % 2 == 0, run % 2 == 1] {
            if ours_now {
                let (took, sizes) = build_ours();
                ours.push(took);
                (root, initrd) = sizes;
            } else {
                let (took, tar) = build_debian(&debian);
                theirs.push(took);
                packages = tar;
            }
        }
        eprintln!(
            "build {run}: ours {:?}, mmdebstrap alone {:?}",
            ours[run], theirs[run]
        );
    }
    let ((_, o, _), (_, t, _)) = (min_median_max(&mut ours), min_median_max(&mut theirs));
    append(&format!(
        "- {} postgres image build ({accel} host, empty cache, median of {runs}): ours {o:.1} s, mmdebstrap of the same packages alone {t:.1} s, ratio {:.2}\n",
        today(),
        o / t
    ));
    append(&format!(
        "- {} postgres image size: root.img {root:.0} MiB (ext4, read-only, shared), initrd {initrd:.1} MiB; Debian packages alone (mmdebstrap's tar) {packages:.0} MiB, ratio {:.2}\n",
        today(),
        root / packages
    ));
}

fn compute_spec() -> serde_json::Value {
    serde_json::json!({
        "format_version": 1,
        "roles": [{ "name": "app", "password_hash": password_hash("bench password") }],
        "databases": [{ "name": "appdb", "owner": "app" }],
        "settings": { "max_connections": "40" },
        "extensions": [],
    })
}

/// Waits until the console shows Postgres ready and computectl running.
fn wait_postgres(console: &Path) {
    wait_until(FIRST_BOOT, "Postgres to be ready", || {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        text.contains(READY) && text.contains(RUNNING)
    });
}

/// `vmctl create` with the spec until Postgres is ready; the VM is deleted after.
fn ours(host: &TestHost, spec_file: &Path) -> Duration {
    let cu = VCPUS.to_string();
    let disk = DISK_GIB.to_string();
    let started = Instant::now();
    host.vmctl_ok(&[
        "create",
        "bench",
        "--image",
        "postgres",
        "--spec",
        spec_file.to_str().unwrap(),
        "--disk-gib",
        &disk,
        "--min-cu",
        &cu,
        "--no-autoscale",
    ]);
    wait_postgres(&host.serial_log("bench"));
    let took = started.elapsed();
    host.vmctl_ok(&["delete", "bench"]);
    took
}

/// A vsock backend started by hand, stopped on drop (its files are in its own directory).
struct Backend {
    backend: VsockBackend,
    _dir: tempfile::TempDir,
}

impl Backend {
    async fn start() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let backend = VsockBackend {
            binary: "vhost-device-vsock".into(),
            vhost_socket: dir.path().join("vhost.sock"),
            uds_path: dir.path().join("vsock.sock"),
            pidfile: dir.path().join("vsock.pid"),
            log: dir.path().join("vsock.log"),
        };
        let started = Backend { backend, _dir: dir };
        started.backend.ensure_running().await.unwrap();
        started
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.backend.stop();
    }
}

/// What an operator scripting QEMU by hand does: a fresh disk, the backend, QEMU with the
/// image's root read-only, and the spec handed over once computectl answers `empty`.
async fn raw(image: &Path, accel: Accel, spec: &serde_json::Value) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_GIB * GIB))
        .unwrap();
    let backend = Backend::start().await;
    let machine = MachineSpec {
        name: "bench".into(),
        accel,
        boot_vcpus: VCPUS,
        initial_vcpus: VCPUS,
        max_vcpus: VCPUS,
        vcpu_slots: vmm::cmdline::vcpu_slots(accel, VCPUS),
        boot_memory_bytes: u64::from(VCPUS) * GIB,
        hotplug_memory_bytes: 0,
        initial_hotplug_memory_bytes: 0,
        kernel: image.join("vmlinuz"),
        initrd: Some(image.join("initrd.img")),
        kernel_cmdline: vmm::cmdline::DEFAULT_KERNEL_CMDLINE.into(),
        nic: Nic::None,
        disk: Some(disk),
        root_image: Some(image.join("root.img")),
        spare_root_ports: 4,
        vhost_user_vsock: Some(backend.backend.vhost_socket.clone()),
        incoming: false,
        qmp_socket: dir.path().join("qmp.sock"),
        serial_log: dir.path().join("serial.log"),
        pidfile: dir.path().join("qemu.pid"),
    };
    // Under its guard before it starts: a failed run still kills it.
    let qemu = RawQemu {
        _dir: dir,
        spec: machine,
    };
    let status = Command::new("qemu-system-x86_64")
        .args(qemu.spec.to_args())
        .status()
        .unwrap();
    assert!(status.success(), "raw QEMU failed to start");

    let socket = &backend.backend.uds_path;
    let status_client = ComputeClient::new(socket, Duration::from_secs(10));
    let deadline = Instant::now() + FIRST_BOOT;
    loop {
        match status_client.status().await {
            Ok(status) if status.state == ComputeState::Empty => break,
            Ok(status) => panic!("computectl of a new VM is {:?}, not empty", status.state),
            Err(_) => {
                assert!(Instant::now() < deadline, "computectl never answered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    ComputeClient::new(socket, FIRST_BOOT)
        .configure(spec)
        .await
        .expect("computectl refused the spec");
    wait_postgres(&qemu.spec.serial_log);
    started.elapsed()
}

fn image_config(image: &Path) -> String {
    format!(
        "[images.postgres]\nkernel = \"{dir}/vmlinuz\"\ninitrd = \"{dir}/initrd.img\"\nroot = \"{dir}/root.img\"\ncmdline = \"{}\"\n",
        vmm::cmdline::DEFAULT_KERNEL_CMDLINE,
        dir = image.display(),
    )
}

async fn create_to_ready(runs: usize, image: &Path, accel: Accel) {
    let host = TestHost::start_with(HostOptions {
        extra_config: image_config(image),
        ..HostOptions::new(Limits {
            vcpus: 4,
            memory_mib: 4096,
        })
    });
    let spec = compute_spec();
    let spec_file = host.dir.path().join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let (mut ours_took, mut raw_took) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for ours_now in [run % 2 == 0, run % 2 == 1] {
            if ours_now {
                ours_took.push(ours(&host, &spec_file));
            } else {
                raw_took.push(raw(image, accel, &spec).await);
            }
        }
        eprintln!(
            "run {run}: ours {:?}, raw {:?}",
            ours_took[run], raw_took[run]
        );
    }
    let (omin, o, omax) = min_median_max(&mut ours_took);
    let (rmin, r, rmax) = min_median_max(&mut raw_took);
    append(&format!(
        "- {} create to Postgres ready ({accel}, {VCPUS} vCPU, {VCPUS} GiB, {DISK_GIB} GiB disk, min/median/max of {runs}): ours {omin:.1}/{o:.1}/{omax:.1} s, raw qemu {rmin:.1}/{r:.1}/{rmax:.1} s, ratio {:.2}\n",
        today(),
        o / r
    ));
}
