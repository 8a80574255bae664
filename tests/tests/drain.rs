//! Draining and watermark rebalancing on three vmhostd in network namespaces: a drained
//! host's VMs all run on elsewhere with their guests intact, it holds nothing and takes
//! nothing until undrained, even across a restart; a VM that cannot move live is listed
//! with its reason and, with `--cold`, moves by a stop here and a boot there with its
//! disk, and never runs on two hosts when the source is killed mid-move; a host past its
//! watermark moves an idle VM away so that a growing one gets its memory. No host goes
//! over capacity meanwhile.

use serde_json::Value;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;
use vmhost_tests::capacity::{held_by, CapacityWatch};
use vmhost_tests::netns::{start_live_fleet, Lab};
use vmhost_tests::workload::{
    assert_continued, fleet_hosts, live_hosts, wait_ticking, TickGaps, MIGRATION_STALL,
};
use vmhost_tests::{process_alive, wait_until, Limits, TestHost};

/// One test at a time: each runs several emulated guests and their migrations.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialized() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hosts a, b and c with 4 vCPU and 4 GiB each; `fleet` is added to each `[fleet]` table.
fn three_hosts(lab: &Lab, pki: &Path, fleet: &str) -> Vec<TestHost> {
    let limits = Limits {
        vcpus: 4,
        memory_mib: 4096,
    };
    let fleet = format!("gossip_interval_ms = 200\nlease_ttl_secs = 5\n{fleet}");
    start_live_fleet(lab, pki, &["a", "b", "c"], limits, &fleet, "")
}

/// The host of `hosts` where VM `vm` runs: its QEMU there is alive and running the guest
/// (not waiting for a migration).
fn runs_on<'a>(hosts: &'a [TestHost], vm: &str) -> Option<&'a TestHost> {
    hosts.iter().find(|h| {
        let shown = h.vmctl(&["--json", "show", vm]);
        if !shown.status.success() {
            return false;
        }
        let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
        shown["qemu_status"] == "running"
            && shown["pid"].as_i64().is_some_and(|pid| {
                process_alive(pid as i32) && h.qemu_pids().contains(&(pid as i32))
            })
    })
}

/// Waits for `done`, or fails with every host's log.
fn wait_or_dump(hosts: &[TestHost], secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        if std::time::Instant::now() > deadline {
            for host in hosts {
                let log = std::fs::read_to_string(host.daemon_log()).unwrap_or_default();
                eprintln!("--- {} ---\n{log}", host.state_dir().display());
            }
            panic!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn drain_state(host: &TestHost, of: &str) -> Value {
    fleet_hosts(host)
        .into_iter()
        .find(|h| h["name"] == of)
        .map_or(Value::Null, |h| h["drain"].clone())
}

fn create(host: &TestHost, args: &[&str]) -> Value {
    let mut all = vec!["--json", "create"];
    all.extend(args);
    serde_json::from_str(&host.vmctl_ok(&all)).unwrap()
}

#[test]
fn a_drained_host_moves_every_vm_away_live_and_takes_none_until_undrained() {
    let _serial = serialized();
    let lab = Lab::new(3);
    let pki = tempfile::tempdir().unwrap();
    let mut hosts = three_hosts(&lab, pki.path(), "");
    let vms = ["d1", "d2", "d3"];
    for vm in vms {
        create(&hosts[0], &[vm, "--image", "dirtier", "--no-autoscale"]);
    }
    let before: Vec<_> = vms
        .iter()
        .map(|vm| {
            hosts[0].wait_monitor(vm);
            wait_ticking(&hosts[0], vm, 1)
        })
        .collect();
    let on_a: Vec<_> = vms.iter().map(|vm| hosts[0].live_pids(vm)).collect();
    let watch = CapacityWatch::start(&hosts);
    let every_host: Vec<&TestHost> = hosts.iter().collect();
    let outages: Vec<_> = vms
        .iter()
        .map(|vm| TickGaps::start(&every_host, vm))
        .collect();

    let out = hosts[0].vmctl_ok(&["drain", "a", "--wait", "--parallel", "2"]);
    println!("{out}");
    assert!(out.contains("moved 3 of 3 VMs (0 cold)"), "{out}");
    for (vm, before) in vms.iter().zip(&before) {
        let target = runs_on(&hosts[1..], vm).unwrap_or_else(|| panic!("{vm} runs nowhere"));
        assert_continued(before, target, vm);
    }
    for pids in &on_a {
        pids.assert_gone();
    }
    for outage in outages {
        outage.assert_within(MIGRATION_STALL);
    }
    assert!(hosts[0].qemu_pids().is_empty());
    wait_until(Duration::from_secs(10), "b to see a drained", || {
        drain_state(&hosts[1], "a") == "drained"
    });

    // Drained stays drained across a restart: a new VM asked of a goes elsewhere.
    hosts[0].kill_daemon();
    hosts[0].start_daemon();
    wait_until(Duration::from_secs(60), "a to see the fleet again", || {
        live_hosts(&hosts[0]) == 3
    });
    let status = hosts[0].vmctl_ok(&["drain-status", "a"]);
    assert!(status.starts_with("host a: drained"), "{status}");
    let placed = create(&hosts[0], &["n1", "--no-autoscale"]);
    assert_ne!(placed["host"], "a", "{placed}");
    assert!(runs_on(&hosts[1..], "n1").is_some(), "{placed}");
    assert!(hosts[0].qemu_pids().is_empty());

    hosts[0].vmctl_ok(&["undrain", "a"]);
    wait_until(Duration::from_secs(10), "b to see a undrained", || {
        drain_state(&hosts[1], "a").is_null()
    });
    let placed = create(&hosts[0], &["n2", "--no-autoscale"]);
    assert_eq!(placed["host"], "a", "{placed}");
    assert!(runs_on(&hosts[..1], "n2").is_some());
    watch.assert_never_over();
}

/// Writes `pattern` at a few places of a disk image, the last near its end.
fn stamp(disk: &Path, pattern: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let len = file.metadata().unwrap().len();
    for offset in [0, 100 << 20, len - 4096] {
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(pattern).unwrap();
    }
    file.sync_all().unwrap();
}

fn stamped(disk: &Path, pattern: &[u8]) -> bool {
    let mut file = std::fs::File::open(disk).unwrap();
    let len = file.metadata().unwrap().len();
    [0, 100 << 20, len - 4096].into_iter().all(|offset| {
        let mut read = vec![0; pattern.len()];
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut read).unwrap();
        read == pattern
    })
}

#[test]
fn a_vm_that_cannot_move_live_moves_cold_with_its_disk_and_never_runs_twice() {
    let _serial = serialized();
    let lab = Lab::new(3);
    let pki = tempfile::tempdir().unwrap();
    let mut hosts = three_hosts(&lab, pki.path(), "");
    let a = &hosts[0];
    // A stopped VM can only move cold; its disk carries what was written.
    create(a, &["parked", "--no-autoscale", "--disk-gib", "1"]);
    a.wait_guest_ready("parked");
    a.vmctl_ok(&["stop", "parked"]);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    stamp(&a.state_dir().join("vms/parked/disk.raw"), &pattern);
    let stopped_copy = tempfile::tempdir().unwrap();
    copy_folder(&a.state_dir().join("vms/parked"), stopped_copy.path());
    // Under TCG, a VM that had a vCPU unplugged cannot migrate live.
    create(
        a,
        &["unplugged", "--max-cu", "2", "--cu", "2", "--no-autoscale"],
    );
    let boot_before = a.wait_guest_ready("unplugged");
    a.vmctl_ok(&["scale", "unplugged", "--cu", "1", "--force"]);
    wait_until(Duration::from_secs(60), "QEMU to end a vCPU", || {
        held_by(a, "unplugged").vcpus == 1
    });
    let tcg = a.show("unplugged")["accel"] == "tcg";
    if !tcg {
        eprintln!("!!! KVM: a vCPU unplug does not stop live migration; only the stopped VM checks the cold path");
    }

    let (code, message) = a.vmctl_err(&["drain", "a", "--wait"]);
    assert_eq!(code, 6, "{message}");
    assert!(message.contains("parked: it is stopped"), "{message}");
    let status = a.vmctl_ok(&["--json", "drain-status", "a"]);
    let report: Value = serde_json::from_str(&status).unwrap();
    let state_of = |vm: &str| {
        report["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .map(|v| v["state"].clone())
    };
    assert_eq!(state_of("parked").unwrap(), "stuck", "{status}");
    if tcg {
        assert!(
            message.contains("unplugged: had a vCPU unplugged"),
            "{message}"
        );
        assert!(runs_on(&hosts[..1], "unplugged").is_some());
    }

    // With every other host draining, no host takes the VM: it is not stopped for nothing.
    let unplugged_on_a = a.live_pids("unplugged");
    for (host, name) in hosts[1..].iter().zip(["b", "c"]) {
        host.vmctl_ok(&["drain", name]);
    }
    let (code, message) = a.vmctl_err(&["drain", "a", "--cold", "--wait"]);
    assert_eq!(code, 6, "{message}");
    if tcg {
        assert_eq!(
            unplugged_on_a.alive().len(),
            2,
            "a cold move with no room stopped the VM: {message}"
        );
    }
    for (host, name) in hosts[1..].iter().zip(["b", "c"]) {
        host.vmctl_ok(&["undrain", name]);
        wait_until(Duration::from_secs(10), "a to see it undrained", || {
            drain_state(a, name).is_null()
        });
    }
    // A new order tries every VM again at once.
    a.vmctl_ok(&["undrain", "a"]);
    let out = a.vmctl_ok(&["drain", "a", "--cold", "--wait"]);
    println!("{out}");
    let parked_on = runs_on(&hosts[1..], "parked").expect("parked runs nowhere");
    assert!(
        stamped(&parked_on.state_dir().join("vms/parked/disk.raw"), &pattern),
        "the disk's contents did not arrive"
    );
    parked_on.wait_guest_ready("parked");
    let unplugged_on = runs_on(&hosts[1..], "unplugged").expect("unplugged runs nowhere");
    let boot_after = unplugged_on.wait_guest_ready("unplugged");
    if tcg {
        assert!(out.contains("moved 2 of 2 VMs (2 cold)"), "{out}");
        assert_ne!(boot_after, boot_before, "a cold move boots the guest again");
    }
    unplugged_on_a.assert_gone();
    assert!(a.qemu_pids().is_empty());
    assert!(!a.state_dir().join("vms/parked").exists());
    let target = hosts
        .iter()
        .position(|h| std::ptr::eq(h, parked_on))
        .unwrap();
    an_unsettled_cold_move_never_runs_twice(&mut hosts, target, stopped_copy.path());
}

/// vmhostd on the source killed after it asked `target` to boot the cold-moved `parked`,
/// before it let go of its copy: restarted, it finds the copy, stopped, recorded as
/// moving there. It never starts it: the fleet shows it on `target`, so it lets go. A
/// second such VM that no host booted starts here again, as it ran before its move.
fn an_unsettled_cold_move_never_runs_twice(hosts: &mut [TestHost], target: usize, stopped: &Path) {
    let parked_pid = hosts[target].show("parked")["pid"].as_i64().unwrap();
    let a = &mut hosts[0];
    a.vmctl_ok(&["undrain", "a"]);
    a.kill_daemon();
    let pending = format!(
        r#"{{"target":"{}","restart":true}}"#,
        ["a", "b", "c"][target]
    );
    for vm in ["parked", "orphan"] {
        let folder = a.state_dir().join("vms").join(vm);
        copy_folder(stopped, &folder);
        let spec_path = folder.join("spec.json");
        let mut spec: Value = serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
        assert_eq!(spec["run"], false, "the copy is of a stopped VM");
        spec["name"] = vm.into();
        std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
        std::fs::write(folder.join("cold-move.json"), &pending).unwrap();
    }
    a.start_daemon();
    let (_, refused) = a.vmctl_err(&["start", "parked"]);
    println!("start of the stale copy: {refused}");
    wait_or_dump(hosts, 60, "a to let go of its stale copy", || {
        !hosts[0].state_dir().join("vms/parked").exists()
    });
    assert_eq!(
        hosts[target].show("parked")["pid"].as_i64(),
        Some(parked_pid),
        "the VM on its target was disturbed"
    );
    wait_or_dump(
        hosts,
        90,
        "the VM no host booted to start again here",
        || runs_on(&hosts[..1], "orphan").is_some(),
    );
    assert_eq!(
        hosts[0].qemu_pids().len(),
        1,
        "a runs only the VM no host booted"
    );
    assert!(runs_on(&hosts[1..], "orphan").is_none());
}

fn copy_folder(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .args(["-a", "--sparse=always", "-T"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "cannot copy {}", from.display());
}

#[test]
fn a_host_past_its_watermark_moves_an_idle_vm_away_so_a_growing_one_gets_its_memory() {
    let _serial = serialized();
    let lab = Lab::new(3);
    let pki = tempfile::tempdir().unwrap();
    let hosts = three_hosts(
        &lab,
        pki.path(),
        "watermark = 0.75\nwatermark_hysteresis = 0.05\n",
    );
    let a = &hosts[0];
    // 3 of 4 GiB: at the watermark, not past it. The grower keeps its CPU busy.
    create(a, &["idler", "--min-cu", "2", "--no-autoscale"]);
    create(
        a,
        &[
            "grower",
            "--image",
            "dirtier",
            "--max-cu",
            "3",
            "--no-autoscale",
        ],
    );
    let idler_boot = a.wait_guest_ready("idler");
    a.wait_monitor("grower");
    let boot = a.wait_guest_report("grower");
    wait_ticking(a, "grower", 5);
    let idler_on_a = a.live_pids("idler");
    let watch = CapacityWatch::start(&hosts);

    // 4 of 4 GiB is past the watermark: the idle VM leaves, and the grower's next step
    // (which would need 5 GiB here) fits.
    a.vmctl_ok(&["scale", "grower", "--cu", "2"]);
    wait_or_dump(&hosts, 180, "the idle VM to move away", || {
        runs_on(&hosts[1..], "idler").is_some() && runs_on(&hosts[..1], "idler").is_none()
    });
    idler_on_a.assert_gone();
    let idler_on = runs_on(&hosts[1..], "idler").unwrap();
    let serial = std::fs::read_to_string(idler_on.serial_log("idler")).unwrap();
    assert!(
        !serial.contains("vmhost-guest: ready"),
        "the idle VM booted again instead of moving live (was boot {idler_boot})"
    );
    a.vmctl_ok(&["scale", "grower", "--cu", "3"]);
    a.wait_guest_view("grower", boot.at_cu(3));
    assert!(runs_on(&hosts[..1], "grower").is_some());

    let events = a.vmctl_ok(&["events"]);
    println!("{events}");
    assert!(
        events.contains("rebalance") && events.contains("above the watermark"),
        "{events}"
    );
    assert!(!events.contains("capacity_refused"), "{events}");
    watch.assert_never_over();
}
