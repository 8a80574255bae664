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

fn leased_vcpus_on(host: &TestHost) -> u64 {
    let info: Value = serde_json::from_str(&host.vmctl_ok(&["--json", "host"])).unwrap();
    info["leased"]["vcpus"].as_u64().unwrap()
}

fn limits(vcpus: u32) -> Limits {
    Limits {
        vcpus,
        memory_mib: vcpus as u64 * 1024,
    }
}

/// A process holding a lease on c, renewing it until killed.
fn hold_lease(lab: &Lab, pki: &Path, ttl_secs: u64) -> Child {
    let mut holder = Command::new("ip")
        .args(["netns", "exec", &lab.ns(0)])
        .arg(bin("lease-holder"))
        .arg(pki.join("a"))
        .arg("c")
        .arg(format!("{}:{FLEET_PORT}", lab.addr(2)))
        .args(["1", "1024", &ttl_secs.to_string()])
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
    let mut holder = hold_lease(&lab, pki.path(), 20);
    assert_eq!(leased_vcpus_on(&fleet[2]), 1);
    holder.kill().unwrap();
    holder.wait().unwrap();
    fleet[2].kill_daemon();
    fleet[2].start_daemon();
    assert_eq!(
        leased_vcpus_on(&fleet[2]),
        1,
        "the lease was lost in the restart"
    );
    wait_until(
        Duration::from_secs(40),
        "the dead holder's lease to expire",
        || leased_vcpus_on(&fleet[2]) == 0,
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
        assert_eq!(leased_vcpus_on(&fleet[2]), 1, "a renewed lease expired");
        std::thread::sleep(Duration::from_millis(200));
    }

    holder.kill().unwrap();
    holder.wait().unwrap();
    let died = Instant::now();
    wait_until(TTL + MARGIN, "the dead holder's lease to expire", || {
        leased_vcpus_on(&fleet[2]) == 0
    });
    println!(
        "the lease expired {:?} after its holder died",
        died.elapsed()
    );
}
