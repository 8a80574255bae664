//! Three vmhostd, each in its own network namespace on one L2 segment, forming a fleet over
//! QUIC with mutual TLS: membership, placement on another host, running commands on another
//! host, leases that outlive a granter restart and expire when their holder dies, and the
//! detection of a dead host.

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmhost_tests::netns::{Lab, FLEET_PORT};
use vmhost_tests::workload::fleet_hosts;
use vmhost_tests::{bin, wait_until, Limits, TestHost};

const NAMES: [&str; 3] = ["a", "b", "c"];

fn start_fleet(lab: &Lab, pki: &Path, limits: [Limits; 3]) -> Vec<TestHost> {
    let hosts = NAMES.into_iter().zip(limits).collect();
    vmhost_tests::netns::start_fleet(lab, pki, hosts, "gossip_interval_ms = 200\n", "")
}

fn live_names(host: &TestHost) -> Vec<String> {
    fleet_hosts(host)
        .iter()
        .filter(|h| h["live"] == true)
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect()
}

fn limits(vcpus: u32) -> Limits {
    Limits {
        vcpus,
        memory_mib: vcpus as u64 * 1024,
    }
}

/// lease-holder as host a, asking c for `vcpus` vCPUs and that many GiB.
fn lease_holder(lab: &Lab, pki: &Path, vcpus: u32, ttl_secs: u64) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &lab.ns(0)])
        .arg(bin("lease-holder"))
        .arg(pki.join("a"))
        .arg("c")
        .arg(format!("{}:{FLEET_PORT}", lab.addr(2)))
        .args([
            vcpus.to_string(),
            (vcpus * 1024).to_string(),
            ttl_secs.to_string(),
        ]);
    command
}

/// A process holding a 1-CU lease on c, renewing it until killed.
fn hold_lease(lab: &Lab, pki: &Path, ttl_secs: u64) -> Child {
    let mut holder = lease_holder(lab, pki, 1, ttl_secs)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("granted"), "lease-holder said {line:?}");
    holder
}

/// Whether c has room for `vcpus` CU now, as a placing host finds out: a lease asked for
/// and, if granted, given back at once. A c that does not answer yet (just restarted) is
/// asked again.
fn c_has_room_for(lab: &Lab, pki: &Path, vcpus: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = lease_holder(lab, pki, vcpus, 5)
            .arg("--probe")
            .output()
            .unwrap();
        match probe.status.code() {
            Some(0) => return true,
            Some(4) => return false,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => panic!(
                "the lease probe failed: {}",
                String::from_utf8_lossy(&probe.stderr)
            ),
        }
    }
}

#[test]
fn three_hosts_place_vms_hold_leases_and_detect_a_dead_host() {
    let lab = Lab::new(3);
    let pki = tempfile::tempdir().unwrap();
    // a has room for one 1-CU VM; b has the most room.
    let mut fleet = start_fleet(&lab, pki.path(), [limits(1), limits(3), limits(2)]);

    for host in &fleet {
        wait_until(Duration::from_secs(60), "all three hosts live", || {
            live_names(host) == NAMES
        });
    }
    let table = fleet[0].vmctl_ok(&["hosts"]);
    for (i, name) in NAMES.iter().enumerate() {
        assert!(
            table.contains(&format!("{}:{FLEET_PORT}", lab.addr(i))),
            "{name} missing from:\n{table}"
        );
    }

    // a fills up; the next VM created through a lands on b, the host with the most room.
    let first = fleet[0].vmctl_ok(&["--json", "create", "vm1", "--no-autoscale"]);
    assert_eq!(serde_json::from_str::<Value>(&first).unwrap()["host"], "a");
    let second = fleet[0].vmctl_ok(&["--json", "create", "vm2", "--no-autoscale"]);
    assert_eq!(
        serde_json::from_str::<Value>(&second).unwrap()["host"],
        "b",
        "{second}"
    );
    let listed: Value = serde_json::from_str(&fleet[2].vmctl_ok(&["--json", "list"])).unwrap();
    let placement: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| (vm["name"].as_str().unwrap(), vm["host"].as_str().unwrap()))
        .collect();
    assert_eq!(placement, [("vm1", "a"), ("vm2", "b")]);
    // Where the QEMUs really run.
    fleet[0].live_pids("vm1");
    fleet[1].live_pids("vm2");
    assert_eq!(fleet[0].qemu_pids().len(), 1);
    assert!(fleet[2].qemu_pids().is_empty());
    let shown: Value =
        serde_json::from_str(&fleet[0].vmctl_ok(&["--json", "--host", "b", "show", "vm2"]))
            .unwrap();
    assert_eq!(shown["state"], "running");
    let (code, message) = fleet[0].vmctl_err(&["--host", "nowhere", "show", "vm2"]);
    assert_eq!(code, 3, "{message}");
    wait_until(Duration::from_secs(10), "b's allocation in gossip", || {
        fleet_hosts(&fleet[2])
            .iter()
            .any(|h| h["name"] == "b" && h["allocated"]["vcpus"] == 1)
    });

    // A lease held by a process that dies outlives neither its TTL nor, before that, a
    // restart of the granter.
    // c has 2 CU free: while the 1-CU lease holds, a second host's 2-CU lease is refused.
    assert!(c_has_room_for(&lab, pki.path(), 2));
    let mut holder = hold_lease(&lab, pki.path(), 20);
    assert!(!c_has_room_for(&lab, pki.path(), 2));
    holder.kill().unwrap();
    holder.wait().unwrap();
    fleet[2].kill_daemon();
    fleet[2].start_daemon();
    assert!(
        !c_has_room_for(&lab, pki.path(), 2),
        "the lease was lost in the restart"
    );
    wait_until(
        Duration::from_secs(40),
        "the dead holder's lease to expire",
        || c_has_room_for(&lab, pki.path(), 2),
    );

    // c goes away; a and b notice.
    fleet[2].kill_daemon();
    for host in &fleet[..2] {
        wait_until(Duration::from_secs(90), "c to be seen dead", || {
            fleet_hosts(host)
                .iter()
                .any(|h| h["name"] == "c" && h["live"] == false)
        });
    }
    let (_, missing) = {
        let output = fleet[0].vmctl(&["list"]);
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    assert!(missing.contains("c (dead)"), "{missing}");
}

#[test]
fn a_live_holder_keeps_its_lease_past_the_ttl_and_a_dead_one_loses_it_within_the_ttl() {
    const TTL: Duration = Duration::from_secs(3);
    // Expiry is swept once a second, and vmctl takes a moment to ask.
    const MARGIN: Duration = Duration::from_secs(2);
    let lab = Lab::new(3);
    let pki = tempfile::tempdir().unwrap();
    let fleet = start_fleet(&lab, pki.path(), [limits(1), limits(1), limits(2)]);
    wait_until(Duration::from_secs(60), "all three hosts live", || {
        live_names(&fleet[0]) == NAMES
    });

    // Only its renewals keep the lease through three TTLs.
    let mut holder = hold_lease(&lab, pki.path(), TTL.as_secs());
    let held_until = Instant::now() + 3 * TTL;
    while Instant::now() < held_until {
        assert!(
            !c_has_room_for(&lab, pki.path(), 2),
            "a renewed lease expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    holder.kill().unwrap();
    holder.wait().unwrap();
    let died = Instant::now();
    wait_until(TTL + MARGIN, "the dead holder's lease to expire", || {
        c_has_room_for(&lab, pki.path(), 2)
    });
    println!(
        "the lease expired {:?} after its holder died",
        died.elapsed()
    );
}
