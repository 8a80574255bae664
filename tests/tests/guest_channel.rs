//! The host-guest channel over vsock: the real vm-monitor in a real guest, a real
//! vhost-user-vsock backend, and vmhostd's guest link.

use std::time::{Duration, Instant};
use vmhost_guest_protocol::{self as protocol, GuestMessage, HostMessage};
use vmhost_tests::{
    wait_until, FakeGuest, GuestView, Limits, TestHost, MEMHOG_MIB, MEMORY_GOAL_ONLY,
};

const GIB: u64 = 1 << 30;
const GIB_KB: u64 = 1 << 20;

fn roomy() -> Limits {
    Limits {
        vcpus: 4,
        memory_mib: 8192,
    }
}

/// Waits until `show --json` satisfies `check`; returns that view.
fn wait_show(
    host: &TestHost,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let shown = host.show(name);
        if check(&shown) {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {shown}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn guest_connected(shown: &serde_json::Value) -> bool {
    shown["guest"]["connected"] == true && shown["guest"]["metrics"].is_object()
}

#[test]
fn guest_reports_live_metrics_and_the_size_vmhostd_set() {
    let host = TestHost::start(roomy());
    // The operator's sizes alone: the agent would grow a guest busy booting.
    host.vmctl_ok(&[
        "create",
        "db1",
        "--min-cu",
        "1",
        "--max-cu",
        "2",
        "--no-autoscale",
    ]);
    let shown = wait_show(
        &host,
        "db1",
        "the guest monitor to connect",
        guest_connected,
    );
    let guest = &shown["guest"];
    assert_eq!(guest["protocol_version"], 2);
    assert_eq!(guest["healthy"], true);
    assert_eq!(guest["online_cpus"], 1);
    assert!(guest["metrics_age_ms"].as_u64().unwrap() < 5000, "{guest}");
    let boot_total = guest["mem_total_bytes"].as_u64().unwrap();
    assert!(boot_total > GIB / 2 && boot_total <= GIB, "{guest}");
    // What the monitor reports is what the guest's kernel says.
    let boot = host.wait_guest_report("db1");
    assert_eq!(boot_total, boot.mem_total_kb * 1024, "{guest}");
    // Metrics are live: their age stays small as time passes.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        host.show("db1")["guest"]["metrics_age_ms"]
            .as_u64()
            .unwrap()
            < 2500
    );

    for (cu, vcpus, total) in [("2", 2, boot_total + GIB), ("1", 1, boot_total)] {
        host.vmctl_ok(&["scale", "db1", "--cu", cu]);
        let shown = wait_show(
            &host,
            "db1",
            &format!("the guest to report {vcpus} CPUs and {total} bytes"),
            |s| s["guest"]["online_cpus"] == vcpus && s["guest"]["mem_total_bytes"] == total,
        );
        assert_eq!(shown["vcpus"], vcpus);
        host.wait_guest_view(
            "db1",
            GuestView {
                cpus: vcpus,
                mem_total_kb: total / 1024,
            },
        );
    }
}

#[test]
fn memory_pressure_gets_an_upscale_and_a_starving_downscale_is_vetoed() {
    let host = TestHost::start(roomy());
    let mut args = vec![
        "create", "hog", "--image", "memhog", "--min-cu", "1", "--max-cu", "3",
    ];
    args.extend(MEMORY_GOAL_ONLY);
    host.vmctl_ok(&args);
    let boot = host.wait_guest_report("hog");
    // 900 MiB does not fit in the 1 CU guest (the workload's limit is MemTotal − 96 MiB):
    // it only gets there if the upscale lands first.
    let shown = wait_show(
        &host,
        "hog",
        "the monitor's upscale request to be granted",
        |s| s["cu"].as_f64().unwrap() >= 2.0,
    );
    assert!(
        shown["guest"]["upscale_requests"].as_u64().unwrap() >= 1,
        "{shown}"
    );
    let serial = host.serial_log("hog");
    wait_until(
        Duration::from_secs(120),
        "memhog to hold its memory",
        || {
            std::fs::read_to_string(&serial)
                .unwrap_or_default()
                .contains(&format!("memhog: holding {MEMHOG_MIB} MiB"))
        },
    );
    let grown = host.guest_view("hog").unwrap();
    assert!(
        grown.mem_total_kb >= boot.mem_total_kb + GIB_KB,
        "the guest holds {MEMHOG_MIB} MiB without the memory: {grown:?}, booted {boot:?}"
    );
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !log.contains("Out of memory") && !log.contains("oom-kill"),
        "the workload was OOM-killed:\n{log}"
    );
    let daemon_log = std::fs::read_to_string(host.daemon_log()).unwrap();
    let grant = daemon_log
        .lines()
        .find(|l| l.contains("granted the guest's upscale request"))
        .expect("vmhostd logs the granted request");
    assert!(
        grant.contains("latency_ms=") && grant.contains("pressure_age_us="),
        "{grant}"
    );
    eprintln!("{grant}");

    // The workload holds its memory until told: shrinking to 1 CU would starve it, and the
    // guest keeps every byte it had.
    let (code, stderr) = host.vmctl_err(&["scale", "hog", "--cu", "1"]);
    assert_eq!(code, 7, "{stderr}");
    assert!(stderr.contains("guest monitor refused"), "{stderr}");
    let kept = host.guest_view("hog").unwrap();
    assert!(
        kept.mem_total_kb >= grown.mem_total_kb,
        "the vetoed downscale took memory: {grown:?} then {kept:?}"
    );
    // Once it lets go, the same downscale is approved, and the guest is back at its boot size.
    host.free_memhog("hog");
    host.vmctl_ok(&["scale", "hog", "--cu", "1"]);
    host.wait_guest_view("hog", boot);
}

fn is_invalid(message: &HostMessage) -> bool {
    matches!(message, HostMessage::InvalidMessage { .. })
}

#[test]
fn hostile_guest_traffic_is_refused_and_vmhostd_keeps_serving() {
    let host = TestHost::start(roomy());
    // The victim runs no monitor: this test plays its guest. The bystander's real monitor
    // must still answer its host afterwards.
    host.vmctl_ok(&[
        "create",
        "victim",
        "--image",
        "nomonitor",
        "--min-cu",
        "1",
        "--max-cu",
        "2",
    ]);
    host.vmctl_ok(&[
        "create",
        "bystander",
        "--min-cu",
        "1",
        "--max-cu",
        "2",
        "--no-autoscale",
    ]);
    host.wait_guest_ready("victim");
    wait_show(
        &host,
        "bystander",
        "the bystander's monitor to connect",
        guest_connected,
    );
    let bystander_boot = host.wait_guest_report("bystander");

    // No handshake: an error, then the connection is closed.
    let mut guest = FakeGuest::connect(&host, "victim");
    guest.send(&GuestMessage::HealthCheck { id: 1 });
    let said = guest.drain();
    assert!(said.iter().any(is_invalid), "{said:?}");

    // A version the host does not speak is refused.
    let mut guest = FakeGuest::connect(&host, "victim");
    guest.send(&GuestMessage::Hello {
        min_version: 50,
        max_version: 60,
    });
    assert!(matches!(
        guest.receive(),
        Some(HostMessage::VersionRefused { .. })
    ));
    assert_eq!(guest.receive(), None);

    // An oversized frame: an error, then closed, without the host buffering the body.
    let mut guest = FakeGuest::hello(&host, "victim");
    guest.send_raw(&(10u32 << 20).to_be_bytes());
    let said = guest.drain();
    assert!(said.iter().any(is_invalid), "{said:?}");

    // Malformed bodies: each gets an error reply; past the bound the link is closed.
    let mut guest = FakeGuest::hello(&host, "victim");
    for _ in 0..20 {
        guest.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    }
    let said = guest.drain();
    assert!(
        said.iter().filter(|m| is_invalid(m)).count() >= 10,
        "{said:?}"
    );

    // A flood: rate-limited, then cut off, while vmhostd answers everyone else.
    let mut guest = FakeGuest::hello(&host, "victim");
    let flood: Vec<u8> = (0..5000u64)
        .flat_map(|id| protocol::encode(&GuestMessage::HealthCheckReply { id }).unwrap())
        .collect();
    guest.send_raw(&flood);
    let started = Instant::now();
    host.vmctl_ok(&["list"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "vmhostd stalled under a guest flood"
    );
    let said = guest.drain();
    assert!(
        said.iter().any(
            |m| matches!(m, HostMessage::InvalidMessage { reason } if reason == "rate limited")
        ),
        "{said:?}"
    );

    // Upscale requests are clamped to the VM's bounds: the guest itself sees 2 CU, no more.
    let boot = host.wait_guest_report("victim");
    let clamped = boot.at_cu(2);
    let mut guest = FakeGuest::hello(&host, "victim");
    for id in 1..=3 {
        guest.send(&GuestMessage::UpscaleRequest {
            id,
            pressure_age_us: u64::MAX,
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    host.wait_guest_view("victim", clamped);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        host.guest_view("victim"),
        Some(clamped),
        "an upscale went past max_cu"
    );
    assert_eq!(host.show("victim")["cu"], 2.0);
    drop(guest);

    let victim = host.show("victim");
    assert!(
        victim["guest"]["protocol_errors"].as_u64().unwrap() >= 3,
        "{victim}"
    );
    assert_eq!(victim["state"], "running");
    // Its QEMU is the one the kernel shows running (this fails if there is none).
    host.live_pids("victim");
    // The bystander's channel still works: a shrink needs its monitor's consent, and the
    // guest itself shows each size.
    host.vmctl_ok(&["scale", "bystander", "--cu", "2"]);
    host.wait_guest_view("bystander", bystander_boot.at_cu(2));
    host.vmctl_ok(&["scale", "bystander", "--cu", "1"]);
    host.wait_guest_view("bystander", bystander_boot);
}
