//! vmhostd from the Debian package, run by a real systemd as PID 1 (a `systemd-nspawn`
//! machine): readiness, status lines, the watchdog restarting a frozen daemon while its VMs
//! run on, and the journal's fields.
//!
//! Needs root, systemd-nspawn (systemd-container), mmdebstrap and cargo-deb; fails, never
//! skips, without them.

use std::time::Duration;
use vmhost_tests::nspawn::Machine;
use vmhost_tests::{parse_guest_view, test_image, wait_until};

const NAME: &str = "vmhost-sd1";

fn config() -> String {
    let image = test_image();
    format!(
        r#"host_name = "{NAME}"
state_dir = "/var/lib/vmhost"
vsock_backend = "/usr/libexec/vmhost/vhost-device-vsock"
[capacity]
vcpus = 2
memory_mib = 3072
[compute_unit]
vcpus = 1
memory_mib = 1024
[metrics]
enabled = false
[images.test]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
"#,
        image = image.display()
    )
}

/// The guest's boot ids, from its console: one per boot.
fn boot_ids(machine: &Machine, vm: &str) -> Vec<String> {
    let log =
        std::fs::read_to_string(machine.path(&format!("/var/lib/vmhost/vms/{vm}/serial.log")))
            .unwrap_or_default();
    log.lines()
        .filter_map(|line| line.split("vmhost-guest: ready boot_id=").nth(1))
        .map(|id| id.trim().to_string())
        .collect()
}

#[test]
fn systemd_runs_vmhostd_ready_watched_and_journaled_and_its_vms_outlive_a_frozen_daemon() {
    let machine = Machine::boot_with_package(NAME, &config());
    // The root has no man-db to check the unit's man: link with.
    machine.run_ok(&["systemd-analyze", "verify", "--man=no", "vmhostd.service"]);
    let security = machine.run_ok(&[
        "systemd-analyze",
        "security",
        "--no-pager",
        "vmhostd.service",
    ]);
    eprintln!(
        "systemd-analyze security vmhostd: {}",
        security.lines().last().unwrap_or_default()
    );
    // A short watchdog, so the test does not wait the unit's 30 s.
    let dropin = machine.path("/etc/systemd/system/vmhostd.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(dropin.join("watchdog.conf"), "[Service]\nWatchdogSec=4\n").unwrap();
    machine.run_ok(&["systemctl", "daemon-reload"]);

    // Type=notify: `start` returns once vmhostd said READY, and the API serves by then.
    machine.run_ok(&["systemctl", "start", "vmhostd"]);
    assert_eq!(machine.unit_property("vmhostd", "SubState"), "running");
    assert_eq!(
        machine.unit_property("vmhostd", "StatusText"),
        "serving 0 VMs"
    );
    machine.run_ok(&["vmctl", "list"]);

    machine.run_ok(&["vmctl", "create", "db1", "--min-cu", "1", "--max-cu", "2"]);
    wait_until(Duration::from_secs(120), "the guest to boot", || {
        !boot_ids(&machine, "db1").is_empty()
    });
    let boot_id = boot_ids(&machine, "db1");
    wait_until(
        Duration::from_secs(10),
        "the status line to count the VM",
        || machine.unit_property("vmhostd", "StatusText") == "serving 1 VM",
    );

    // The journal: each event's fields are fields of their own, and HOST= is on every one.
    let journal = machine.run_ok(&[
        "journalctl",
        "--no-pager",
        "-o",
        "json",
        "-u",
        "vmhostd",
        "VM=db1",
    ]);
    let entries: Vec<serde_json::Value> = journal
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        entries.iter().any(|e| e["MESSAGE"] == "QEMU started"),
        "{journal}"
    );
    assert!(
        entries
            .iter()
            .all(|e| e["VM"] == "db1" && e["HOST"] == NAME),
        "{journal}"
    );
    let other = machine.run_ok(&["journalctl", "--no-pager", "-u", "vmhostd", "VM=db2"]);
    assert!(!other.contains("QEMU started"), "{other}");

    // A frozen vmhostd stops feeding the watchdog: systemd kills and restarts it, and the
    // VM runs on in the same QEMU, never rebooted.
    let qemu = std::fs::read_to_string(machine.path("/var/lib/vmhost/vms/db1/qemu.pid")).unwrap();
    let qemu = qemu.trim().to_string();
    let frozen = machine.unit_property("vmhostd", "MainPID");
    machine.run_ok(&["kill", "-STOP", &frozen]);
    wait_until(
        Duration::from_secs(90),
        "systemd to restart the frozen vmhostd",
        || {
            machine.unit_property("vmhostd", "NRestarts") == "1"
                && machine.unit_property("vmhostd", "SubState") == "running"
        },
    );
    assert_ne!(machine.unit_property("vmhostd", "MainPID"), frozen);
    let journal = machine.run_ok(&["journalctl", "--no-pager", "-u", "vmhostd"]);
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    machine.run_ok(&["kill", "-0", &qemu]);
    let shown: serde_json::Value =
        serde_json::from_str(&machine.run_ok(&["vmctl", "show", "db1", "--json"])).unwrap();
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["pid"].to_string(), qemu);
    assert_eq!(boot_ids(&machine, "db1"), boot_id, "the guest rebooted");
    // The guest still answers its host: a resize reaches it.
    machine.run_ok(&["vmctl", "scale", "db1", "--cu", "2"]);
    wait_until(
        Duration::from_secs(120),
        "the guest to see its second vCPU",
        || {
            let log = std::fs::read_to_string(machine.path("/var/lib/vmhost/vms/db1/serial.log"))
                .unwrap_or_default();
            log.lines()
                .rev()
                .find_map(parse_guest_view)
                .is_some_and(|view| view.cpus == 2)
        },
    );
}
