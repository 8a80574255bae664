//! One host's own paths against raw QEMU doing the same work: booting a VM, and an
//! upscale from a monitor's request until it is applied. Which side goes first alternates
//! run by run, and both sides report min/median/max.

use crate::{min_median_max, roomy, wait_ready, RawQemu, GIB};
use std::path::Path;
use std::time::{Duration, Instant};
use vmhost_guest_protocol::{GuestMessage, HostMessage};
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::{FakeGuest, GuestView, TestHost};
use vmm::Accel;

/// Runs `ours` and `raw` once each per run, `ours` first on even runs; returns each side's
/// samples in seconds.
async fn alternating<O, R, RF>(runs: usize, mut ours: O, mut raw: R) -> (Vec<f64>, Vec<f64>)
where
    O: FnMut(usize) -> Duration,
    R: FnMut() -> RF,
    RF: std::future::Future<Output = Duration>,
{
    let (mut o, mut r) = (Vec::new(), Vec::new());
    for run in 0..runs {
        if run % 2 == 0 {
            o.push(ours(run).as_secs_f64());
            r.push(raw().await.as_secs_f64());
        } else {
            r.push(raw().await.as_secs_f64());
            o.push(ours(run).as_secs_f64());
        }
        eprintln!("run {run}: ours {:.3} s, raw {:.3} s", o[run], r[run]);
    }
    (o, r)
}

/// "min/median/max" of `samples` scaled by `unit`, and the median.
fn spread(samples: &mut [f64], unit: f64, digits: usize) -> (String, f64) {
    let (lo, mid, hi) = min_median_max(samples);
    let show = |v: f64| format!("{:.*}", digits, v * unit);
    (format!("{}/{}/{}", show(lo), show(mid), show(hi)), mid)
}

fn require_release(which: &str) {
    if cfg!(debug_assertions) {
        panic!("benchmarks time release builds: cargo build --release --workspace && cargo run --release -p vmhost-tests --bin bench -- {which}");
    }
}

/// `vmctl create` until the guest has booted, against raw QEMU until the same report.
pub async fn create(runs: usize, image: &Path, accel: Accel) {
    require_release("create");
    let host = roomy();
    let ours = |_| {
        let started = Instant::now();
        host.vmctl_ok(&["create", "bench", "--min-cu", "1", "--no-autoscale"]);
        wait_ready(&host.serial_log("bench"));
        let elapsed = started.elapsed();
        host.vmctl_ok(&["delete", "bench"]);
        elapsed
    };
    let raw = || async { RawQemu::start(image, accel, 1, 0).1 };
    let (mut o, mut r) = alternating(runs, ours, raw).await;
    let ((os, om), (rs, rm)) = (spread(&mut o, 1.0, 2), spread(&mut r, 1.0, 2));
    append(&format!(
        "- {} create to running ({accel}, 1 vCPU, 1 GiB, {runs} runs, which side goes first alternating, min/median/max, release build; ours {os} s, raw {rs} s): ours {om:.2} s, raw qemu {rm:.2} s, ratio {:.2}\n",
        today(),
        om / rm
    ));
}

/// One upscale request from a guest playing the monitor until its notification; the guest
/// must then show the step on top of its size at `boot`.
fn request_upscale(host: &TestHost, id: u64, boot: GuestView) -> Duration {
    let mut guest = FakeGuest::hello(host, "bench");
    let started = Instant::now();
    guest.send(&GuestMessage::UpscaleRequest {
        id,
        pressure_age_us: 0,
    });
    loop {
        match guest.receive() {
            Some(HostMessage::UpscaleNotification { id: done, .. }) if done == id => break,
            Some(_) => continue,
            None => panic!("the link closed before the upscale notification"),
        }
    }
    let elapsed = started.elapsed();
    host.wait_guest_view(
        "bench",
        GuestView {
            cpus: 2,
            mem_total_kb: boot.mem_total_kb + GIB / 1024,
        },
    );
    drop(guest);
    // Let the request's floor lapse, then put the VM back.
    std::thread::sleep(Duration::from_millis(1500));
    host.vmctl_ok(&["scale", "bench", "--cu", "1", "--force"]);
    host.wait_guest_view("bench", boot);
    elapsed
}

/// A monitor's upscale request until its notification (agent + ledger + vmm + link), against
/// the same step (+1 vCPU, +1 GiB) done directly through vmm on a raw QEMU.
pub async fn upscale(runs: usize, image: &Path, accel: Accel) {
    require_release("upscale");
    let host = roomy();
    // No monitor in this guest: the benchmark plays it, so the request time is exact.
    host.vmctl_ok(&[
        "create",
        "bench",
        "--image",
        "nomonitor",
        "--min-cu",
        "1",
        "--max-cu",
        "2",
        "--agent",
        "upscale_request_hold_secs=1",
    ]);
    host.wait_guest_ready("bench");
    let boot = host.wait_guest_report("bench");
    let (raw_qemu, _) = RawQemu::start(image, accel, 2, GIB);
    let machine = raw_qemu.attach().await;
    let timeout = Duration::from_secs(60);
    let ours = |run: usize| request_upscale(&host, run as u64 + 1, boot);
    let raw = || async {
        let started = Instant::now();
        machine.set_vcpus(2, timeout).await.unwrap();
        machine.set_hotplug_memory(GIB, timeout).await.unwrap();
        let elapsed = started.elapsed();
        machine.set_hotplug_memory(0, timeout).await.unwrap();
        machine.set_vcpus(1, timeout).await.unwrap();
        elapsed
    };
    let (mut o, mut r) = alternating(runs, ours, raw).await;
    let ((os, om), (rs, rm)) = (spread(&mut o, 1000.0, 0), spread(&mut r, 1000.0, 0));
    append(&format!(
        "- {} upscale request to applied, +1 vCPU +1 GiB ({accel}, {runs} runs, which side goes first alternating, min/median/max, release build; ours {os} ms, bare vmm {rs} ms): ours {:.0} ms, bare vmm {:.0} ms, ratio {:.2}\n",
        today(),
        om * 1000.0,
        rm * 1000.0,
        om / rm
    ));
}
