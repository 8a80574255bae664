//! The autoscaling agent with real guests: CPU load, memory pressure, and a host too small
//! for everyone.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmhost_tests::capacity::{held_by, Held};
use vmhost_tests::{bin, wait_until, Limits, TestHost, MEMHOG_MIB, MEMORY_GOAL_ONLY};

const GIB: u64 = 1 << 30;

/// Short agent intervals, so a test sees several decisions in a minute or two.
const FAST_AGENT: [&str; 6] = [
    "--agent",
    "downscale_cooldown_secs=10",
    "--agent",
    "metrics_pull_secs=1",
    "--agent",
    "denied_retry_secs=10",
];

/// Creates an autoscaled VM of 1 to `max_cu` CU with the fast agent settings.
fn create_fast(host: &TestHost, name: &str, image: &str, max_cu: &str) {
    create_fast_with(host, name, image, max_cu, &[]);
}

fn create_fast_with(host: &TestHost, name: &str, image: &str, max_cu: &str, extra: &[&str]) {
    let mut args = vec![
        "create", name, "--image", image, "--min-cu", "1", "--max-cu", max_cu,
    ];
    args.extend(FAST_AGENT);
    args.extend(extra);
    host.vmctl_ok(&args);
}

fn cu(host: &TestHost, vm: &str) -> f64 {
    host.show(vm)["cu"].as_f64().unwrap()
}

fn events(host: &TestHost, vm: &str) -> String {
    host.vmctl_ok(&["events", vm])
}

/// Samples `sample` every 200 ms until it holds; fails after `timeout` with the VM's
/// recent events, which say what the agent saw and decided.
fn watch(host: &TestHost, timeout: Duration, what: &str, mut sample: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !sample() {
        if Instant::now() >= deadline {
            let log = host.vmctl_ok(&["events"]);
            let recent: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}; recent events:\n{}",
                recent.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn cpu_load_scales_up_to_max_and_back_to_min_after_the_cooldown() {
    let host = TestHost::start(Limits {
        vcpus: 4,
        memory_mib: 8192,
    });
    create_fast(&host, "burn", "cpuburn", "2");
    let boot = host.wait_guest_report("burn");
    watch(
        &host,
        Duration::from_secs(150),
        "the agent to reach max_cu under load",
        || {
            let shown = host.show("burn");
            shown["cu"].as_f64() == Some(2.0) && shown["vcpus"] == 2
        },
    );
    // The guest itself runs the vCPUs and memory the agent gave it.
    let grown = boot.at_cu(2);
    watch(
        &host,
        Duration::from_secs(30),
        "the guest to report 2 CU",
        || host.guest_view("burn") == Some(grown),
    );
    // The load ends; load1 decays, and the agent steps back down to min.
    let serial = host.serial_log("burn");
    wait_until(Duration::from_secs(120), "the burn to end", || {
        std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("cpuburn: done")
    });
    // An idle guest under emulation on a busy host can show a moment of full use, which
    // grows it by a quarter CU at once: the size and the guest's view are read together.
    watch(
        &host,
        Duration::from_secs(240),
        "the guest to return to min_cu",
        || cu(&host, "burn") == 1.0 && host.guest_view("burn") == Some(boot),
    );
    let log = events(&host, "burn");
    assert!(log.contains("load1") && log.contains("upscale to"), "{log}");
    assert!(log.contains("downscale to"), "{log}");
    // Prometheus shows the size vmctl shows.
    let mut metrics = String::new();
    watch(
        &host,
        Duration::from_secs(30),
        "metrics to show the size",
        || {
            let before = cu(&host, "burn");
            metrics = host.scrape_metrics();
            let shown = format!("vmhost_vm_cu{{vm=\"burn\"}} {before}\n");
            metrics.contains(&shown) && cu(&host, "burn") == before
        },
    );
    assert!(
        metrics.contains(
            "vmhost_scaling_operations_total{vm=\"burn\",direction=\"up\",result=\"applied\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmhost_guest_link_healthy{vm=\"burn\"} 1"),
        "{metrics}"
    );
}

#[test]
fn memory_pressure_gets_memory_before_oom_and_shrinks_only_as_the_monitor_allows() {
    let host = TestHost::start(Limits {
        vcpus: 4,
        memory_mib: 8192,
    });
    create_fast_with(&host, "hog", "memhog", "3", &MEMORY_GOAL_ONLY);
    let serial = host.serial_log("hog");
    let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();
    // Follow the events while it runs, as an operator would.
    let mut follower = Command::new(bin("vmctl"))
        .arg("--socket")
        .arg(&host.socket)
        .args(["events", "--follow", "hog"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, followed) = std::sync::mpsc::channel::<String>();
    let stdout = BufReader::new(follower.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    let boot = host.wait_guest_report("hog");
    // The VM's memory as its guest sees it.
    let memory = || host.guest_view("hog").unwrap().memory_bytes(boot, GIB);
    wait_until(
        Duration::from_secs(150),
        "memhog to hold its memory",
        || serial_text().contains(&format!("memhog: holding {MEMHOG_MIB} MiB")),
    );
    assert!(
        memory() >= 2 * GIB,
        "900 MiB was granted without growing the VM?"
    );
    // While the workload holds its memory (until told), through several downscale
    // cooldowns and denied retries, the VM keeps room for it plus the margin.
    let held_until = Instant::now() + Duration::from_secs(45);
    let mut smallest_while_held = u64::MAX;
    let mut samples = 0;
    while Instant::now() < held_until {
        smallest_while_held = smallest_while_held.min(memory());
        samples += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(samples > 100, "only {samples} samples");
    assert!(
        smallest_while_held >= (MEMHOG_MIB + 128) << 20,
        "the guest went down to {smallest_while_held} bytes under a {MEMHOG_MIB} MiB workload"
    );
    let text = serial_text();
    assert!(
        !text.contains("Out of memory") && !text.contains("oom-kill"),
        "OOM killer acted:\n{text}"
    );
    host.free_memhog("hog");
    // Freed: the agent brings it back to min.
    watch(
        &host,
        Duration::from_secs(180),
        "the guest to return to min_cu",
        || host.guest_view("hog") == Some(boot),
    );

    // The guest shows its boot size a moment before vmhostd sees the unplug end and tells
    // its followers.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines
        .iter()
        .any(|l: &String| l.contains("downscaled to 1 CU"))
    {
        match followed.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(_) => panic!(
                "no shrink to 1 CU followed within 30 s:\n{}",
                lines.join("\n")
            ),
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let joined = lines.join("\n");
    assert!(joined.contains("upscale_requested"), "{joined}");
}

#[test]
fn a_small_host_never_overcommits_and_shows_the_refusal() {
    // Room for 3 CU; two VMs that each want to grow from 1 to at least 2.
    let host = TestHost::start(Limits {
        vcpus: 3,
        memory_mib: 3072,
    });
    let vms = ["a", "b"];
    for vm in vms {
        create_fast(&host, vm, "memhog", "3");
    }
    let boots = vms.map(|vm| host.wait_guest_report(vm));
    // Both workloads hold their memory throughout, so both VMs keep asking for more. The
    // sizes the guests themselves report never add up past the host, before or after
    // the first refusal.
    let started = Instant::now();
    let (mut samples, mut first_refusal, mut fullest) = (0, None, 0);
    while started.elapsed() < Duration::from_secs(120) {
        let views = vms.map(|vm| host.guest_view(vm).unwrap());
        let cpus: u32 = views.iter().map(|v| v.cpus).sum();
        let memory: u64 = views
            .iter()
            .zip(boots)
            .map(|(view, boot)| view.memory_bytes(boot, GIB))
            .sum();
        assert!(
            cpus <= 3 && memory <= 3 * GIB,
            "the guests hold {cpus} vCPUs and {memory} bytes on a 3 CU host: {views:?}"
        );
        fullest = fullest.max(memory);
        samples += 1;
        if first_refusal.is_none() && host.vmctl_ok(&["events"]).contains("capacity_refused") {
            first_refusal = Some(samples);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = host.vmctl_ok(&["events"]);
    let first_refusal = first_refusal.unwrap_or_else(|| panic!("no refusal in the events:\n{log}"));
    assert!(
        samples - first_refusal >= 100,
        "only {} samples after the first refusal",
        samples - first_refusal
    );
    println!("{samples} samples within capacity, {first_refusal} before the first refusal");
    assert!(
        fullest > 2 * GIB,
        "no VM ever grew: at most {fullest} bytes"
    );
    let json = host.vmctl_ok(&["--json", "events"]);
    let refusal: serde_json::Value = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["kind"] == "capacity_refused")
        .unwrap();
    assert!(
        refusal["message"].as_str().unwrap().contains("room")
            || refusal["message"]
                .as_str()
                .unwrap()
                .contains("granted only")
    );
}

#[test]
fn bounds_change_moves_a_running_vm_and_top_shows_it() {
    let host = TestHost::start(Limits {
        vcpus: 4,
        memory_mib: 8192,
    });
    create_fast(&host, "db1", "test", "2");
    host.wait_guest_ready("db1");
    host.vmctl_ok(&["bounds", "db1", "--min-cu", "2", "--max-cu", "2"]);
    watch(
        &host,
        Duration::from_secs(60),
        "the agent to move the VM into its new bounds",
        || cu(&host, "db1") == 2.0,
    );
    let two_cu = Held {
        vcpus: 2,
        memory_bytes: 2 * GIB,
    };
    wait_until(Duration::from_secs(30), "QEMU to hold 2 CU", || {
        held_by(&host, "db1") == two_cu
    });
    let shown = host.show("db1");
    assert_eq!(
        (shown["min_cu"].as_f64(), shown["goal_cu"].as_f64()),
        (Some(2.0), Some(2.0)),
        "{shown}"
    );
    let (code, stderr) = host.vmctl_err(&["bounds", "db1", "--min-cu", "1", "--max-cu", "3"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("need a stop and start"), "{stderr}");
    assert!(events(&host, "db1").contains("operator set bounds to [2, 2] CU"));

    watch(&host, Duration::from_secs(30), "metrics in top", || {
        let top = host.vmctl_ok(&["top", "--count", "1"]);
        let row = top
            .lines()
            .find(|l| l.starts_with("db1"))
            .unwrap_or_default()
            .to_string();
        // NAME STATE CU GOAL VCPUS MEMORY(2 words) LOAD1 ...: a number in the load column.
        row.split_whitespace()
            .nth(7)
            .is_some_and(|load| load.parse::<f64>().is_ok())
    });
}
