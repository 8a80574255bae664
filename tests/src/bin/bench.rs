//! Benchmarks of vmhost against raw QEMU, run alternately in the same process so machine
//! noise hits both. Each result is appended to BENCHMARKS.md as one dated line.
//!
//! usage: cargo run -p vmhost-tests --bin bench -- [RUNS]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vmhost_tests::{repo_root, test_image, wait_until, Limits, TestHost};
use vmm::{AccelChoice, HostFacts, MachineSpec, Nic};

const GIB: u64 = 1 << 30;

fn median(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64()
}

fn wait_ready(serial_log: &Path) {
    wait_until(Duration::from_secs(180), "the guest to boot", || {
        std::fs::read_to_string(serial_log)
            .unwrap_or_default()
            .contains("vmhost-guest: ready")
    });
}

/// `vmctl create` until the guest has booted.
fn ours(host: &TestHost) -> Duration {
    let started = Instant::now();
    host.vmctl_ok(&["create", "bench", "--min-cu", "1"]);
    wait_ready(&host.serial_log("bench"));
    let elapsed = started.elapsed();
    host.vmctl_ok(&["delete", "bench"]);
    elapsed
}

/// The same machine started by hand: the same QEMU arguments, no vmhostd, no vmctl.
fn raw_qemu(image: &Path, accel: vmm::Accel) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let spec = MachineSpec {
        name: "bench".into(),
        accel,
        boot_vcpus: 1,
        initial_vcpus: 1,
        max_vcpus: 1,
        vcpu_slots: vmm::cmdline::vcpu_slots(accel, 1),
        boot_memory_bytes: GIB,
        hotplug_memory_bytes: 0,
        initial_hotplug_memory_bytes: 0,
        kernel: image.join("vmlinuz"),
        initrd: Some(image.join("initrd.img")),
        kernel_cmdline: vmm::cmdline::DEFAULT_KERNEL_CMDLINE.into(),
        nic: Nic::None,
        spare_root_ports: 4,
        // Raw QEMU has no guest channel; ours includes starting its backend.
        vhost_user_vsock: None,
        qmp_socket: dir.path().join("qmp.sock"),
        serial_log: dir.path().join("serial.log"),
        pidfile: dir.path().join("qemu.pid"),
    };
    let started = Instant::now();
    let status = Command::new("qemu-system-x86_64")
        .args(spec.to_args())
        .status()
        .unwrap();
    assert!(status.success(), "raw QEMU failed to start");
    wait_ready(&spec.serial_log);
    let elapsed = started.elapsed();
    let pid: i32 = std::fs::read_to_string(&spec.pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    elapsed
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map_or(5, |n| n.parse().expect("RUNS must be a number"));
    let accel = vmm::accel::decide(AccelChoice::Auto, &HostFacts::probe())
        .unwrap()
        .accel;
    let image = test_image();
    let host = TestHost::start(Limits {
        vcpus: 4,
        memory_mib: 8192,
    });
    let (mut ours_s, mut raw_s) = (Vec::new(), Vec::new());
    for run in 0..runs {
        ours_s.push(ours(&host));
        raw_s.push(raw_qemu(&image, accel));
        eprintln!("run {run}: ours {:?}, raw {:?}", ours_s[run], raw_s[run]);
    }
    let (ours_m, raw_m) = (median(&mut ours_s), median(&mut raw_s));
    let date = String::from_utf8(
        Command::new("date")
            .arg("+%Y-%m-%d")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let line = format!(
        "- {} create to running ({accel}, 1 vCPU, 1 GiB, median of {runs}): ours {ours_m:.2} s, raw qemu {raw_m:.2} s, ratio {:.2}\n",
        date.trim(),
        ours_m / raw_m
    );
    print!("{line}");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(repo_root().join("BENCHMARKS.md"))
        .expect("BENCHMARKS.md must exist at the repository root");
    file.write_all(line.as_bytes()).unwrap();
}
