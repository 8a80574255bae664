//! The Ansible role and both playbooks of ansible/ on real hosts: three clean Debian 12
//! machines (images/build-host-root, without the vmhost package) booted by
//! `systemd-nspawn -b` with a real systemd as PID 1, each in a lab network namespace, and
//! managed over ssh, as operators do, by `ansible-playbook` on this host (the control node,
//! which keeps the fleet CA), from the lab's client namespace.
//!
//! `site.yml` installs the package, configures and enrolls every host and starts vmhostd
//! under systemd; a second run changes nothing. Then, with a VM running,
//! `rolling-upgrade.yml` moves every host to a new package version one by one: the VM
//! migrates live away from each drained host and runs on in the same boot.
//!
//! Needs root, systemd-nspawn, mmdebstrap, cargo-deb, ssh and the Ansible venv of
//! scripts/setup; fails, never skips, without them.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmhost_tests::ansible::ControlNode;
use vmhost_tests::netns::Lab;
use vmhost_tests::nspawn::Machine;
use vmhost_tests::package::{build_package, run};
use vmhost_tests::workload::parse_tick;
use vmhost_tests::{bin, test_image, wait_until};

const NAMES: [&str; 3] = ["vmh-a", "vmh-b", "vmh-c"];
const SERIAL_LOG: &str = "/var/lib/vmhost/vms/db1/serial.log";

/// The machines, the control node and the lab; dropped in that order, so each machine ends
/// while its namespace is still there.
struct Fleet {
    machines: Vec<Machine>,
    control: ControlNode,
    lab: Lab,
}

impl Fleet {
    /// Boots the machines side by side, each trusting the control node's key.
    fn boot() -> Fleet {
        let lab = Lab::new(NAMES.len());
        let control = ControlNode::new(lab.client_namespace());
        let machines = std::thread::scope(|s| {
            let booting: Vec<_> = NAMES
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let (ns, control) = (lab.ns(i), &control);
                    s.spawn(move || {
                        Machine::boot_clean_in_netns(name, &ns, |root| control.authorize(root))
                    })
                })
                .collect();
            booting
                .into_iter()
                .map(|b| b.join().expect("a machine did not boot"))
                .collect()
        });
        let fleet = Fleet {
            machines,
            control,
            lab,
        };
        fleet.copy_package();
        fleet.control.write_inventory(&fleet.inventory());
        fleet
    }

    /// The package under test, on the control node.
    fn package(&self) -> PathBuf {
        self.control.path("vmhost.deb")
    }

    /// Copies the package under test to the control node. Tests running meanwhile rebuild
    /// it under target/: a copy taken mid-write is taken again.
    fn copy_package(&self) {
        for _ in 0..5 {
            std::fs::copy(build_package(), self.package()).unwrap();
            let mut check = Command::new("dpkg-deb");
            let check = check.arg("--info").arg(self.package()).output();
            if check.is_ok_and(|out| out.status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        panic!("the package under target/debian is never whole");
    }

    /// One group `vmhost`: each host reached and enrolled at its lab address, small hosts
    /// of 2 vCPUs and 2 GiB, the test image, and an image whose guest reports its boot id
    /// every second (a light `dirtier`), to follow it across hosts.
    fn inventory(&self) -> Value {
        let image = test_image();
        let (kernel, initrd) = (image.join("vmlinuz"), image.join("initrd.img"));
        let hosts: serde_json::Map<String, Value> = NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let addr = self.lab.addr(i).to_string();
                let vars = json!({"ansible_host": addr, "vmhost_fleet_address": addr});
                (name.to_string(), vars)
            })
            .collect();
        json!({"vmhost": {"hosts": hosts, "vars": {
            "ansible_connection": "ssh",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": self.control.private_key(),
            "ansible_python_interpreter": "/usr/bin/python3",
            "vmhost_package_file": self.package(),
            "vmhost_ca_dir": self.control.ca_dir(),
            "vmhost_controller_vmctl": bin("vmctl"),
            "vmhost_fleet_cluster": "ansible-test",
            "vmhost_fleet_options": {"gossip_interval_ms": 200, "lease_ttl_secs": 5},
            "vmhost_capacity_vcpus": 2,
            "vmhost_capacity_memory_mib": 2048,
            "vmhost_cu_memory_mib": 1024,
            "vmhost_images": {
                "test": {"kernel": kernel, "initrd": initrd},
                "ticker": {
                    "kernel": kernel,
                    "initrd": initrd,
                    "cmdline": format!(
                        "{} vmhost.workload=vmhost-dirtier,4",
                        vmm::cmdline::DEFAULT_KERNEL_CMDLINE
                    ),
                },
            },
            "vmhost_config_sections": {"metrics": {"enabled": false}},
        }}})
    }

    fn machine(&self, name: &str) -> &Machine {
        let i = NAMES.iter().position(|n| *n == name);
        &self.machines[i.unwrap_or_else(|| panic!("no machine {name}"))]
    }

    /// Waits until every host sees every host live and none drained.
    fn wait_all_live_and_undrained(&self, what: &str) {
        wait_until(Duration::from_secs(60), what, || {
            std::thread::sleep(Duration::from_millis(250));
            self.machines.iter().all(|m| {
                let hosts = fleet_view(m);
                hosts.len() == NAMES.len()
                    && hosts
                        .iter()
                        .all(|h| h["live"] == true && h["drain"].is_null())
            })
        });
    }
}

/// The fleet's hosts as machine `m`'s vmhostd sees them (empty when it does not answer).
fn fleet_view(m: &Machine) -> Vec<Value> {
    let out = m.run(&["vmctl", "--json", "hosts"]);
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn sha256(m: &Machine, file: &str) -> String {
    m.run_ok(&["sha256sum", file])
        .split(' ')
        .next()
        .unwrap()
        .into()
}

/// The machine's credentials: ca.pem, host.pem and host.key, by their checksums.
fn credentials(m: &Machine) -> Vec<String> {
    ["ca.pem", "host.pem", "host.key"]
        .map(|f| sha256(m, &format!("/etc/vmhost/fleet/{f}")))
        .to_vec()
}

/// The package with the same files and a later Debian version: `VERSION+upgrade1`.
fn next_version(deb: &Path, dir: &Path) -> (PathBuf, String) {
    let tree = dir.join("tree");
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let old = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("no Version in the package");
    let new = format!("{old}+upgrade1");
    let text = text.replace(&format!("Version: {old}\n"), &format!("Version: {new}\n"));
    std::fs::write(&control, text).unwrap();
    let out = dir.join(format!("vmhost_{new}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["-Zgzip", "-z1", "--root-owner-group", "-b"])
        .arg(&tree)
        .arg(&out));
    (out, new)
}

/// The dirtier's reports on the console of the host that runs db1: (boot id, errors).
fn ticks(m: &Machine) -> Vec<(String, u64)> {
    let log = std::fs::read_to_string(m.path(SERIAL_LOG)).unwrap_or_default();
    log.lines()
        .filter_map(parse_tick)
        .map(|t| (t.boot_id, t.errors))
        .collect()
}

#[test]
fn the_role_installs_a_fleet_under_systemd_and_rolls_an_upgrade_while_its_vm_runs_on() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "THE ANSIBLE TEST NEEDS ROOT (nspawn, netns)"
    );
    let started = Instant::now();
    let fleet = Fleet::boot();
    let booted = started.elapsed();

    // 1. site.yml on three clean hosts.
    let first = fleet.control.playbook("site.yml", &[]);
    eprintln!("{}", first.output);
    let version = fleet.machines[0].run_ok(&["dpkg-query", "-W", "-f=${Version}", "vmhost"]);
    for m in &fleet.machines {
        assert_eq!(m.unit_property("vmhostd", "SubState"), "running");
        assert_eq!(m.unit_property("vmhostd", "UnitFileState"), "enabled");
        assert_eq!(m.unit_property("vmhostd", "NRestarts"), "0");
        let key = m.run_ok(&["stat", "-c", "%a %U", "/etc/vmhost/fleet/host.key"]);
        assert_eq!(key.trim(), "600 root", "{}: host.key", m.name);
        let found = m.run_ok(&["find", "/", "-xdev", "-name", "ca.key"]);
        assert!(found.trim().is_empty(), "{}: {found}", m.name);
    }
    // Nor is the CA key anywhere under another name: none of its lines is on a host.
    let ca_key = std::fs::read_to_string(fleet.control.ca_dir().join("ca.key")).unwrap();
    let secret = ca_key.lines().nth(1).expect("a PEM body");
    for m in &fleet.machines {
        let mut grep = vec!["grep", "-rlsF", "--", secret];
        grep.extend([
            "/etc", "/root", "/tmp", "/var/tmp", "/var/lib", "/home", "/opt",
        ]);
        let out = m.run(&grep);
        assert_eq!(out.status.code(), Some(1), "{}: {out:?}", m.name);
    }
    fleet.wait_all_live_and_undrained("every host to see the three live");
    let issued: Vec<_> = fleet.machines.iter().map(credentials).collect();

    let second = fleet.control.playbook("site.yml", &[]);
    for name in NAMES {
        assert_eq!(second.count(name, "changed"), 0, "{}", second.output);
        assert_eq!(second.count(name, "failed"), 0, "{}", second.output);
    }
    let kept: Vec<_> = fleet.machines.iter().map(credentials).collect();
    assert_eq!(issued, kept, "the second run replaced certificates");
    let installed = started.elapsed();

    // 2. A VM on the first host, then a rolling upgrade to a new version.
    let a = &fleet.machines[0];
    let created = a.run_ok(&[
        "vmctl",
        "--json",
        "create",
        "db1",
        "--image",
        "ticker",
        "--min-cu",
        "0.25",
        "--max-cu",
        "0.5",
        "--no-autoscale",
    ]);
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["host"], NAMES[0], "{created}");
    let mut boot_id = String::new();
    wait_until(Duration::from_secs(180), "db1's guest to boot", || {
        std::thread::sleep(Duration::from_millis(250));
        let log = std::fs::read_to_string(a.path(SERIAL_LOG)).unwrap_or_default();
        let ready = log
            .lines()
            .find_map(|l| l.split("vmhost-guest: ready boot_id=").nth(1));
        boot_id = ready.unwrap_or_default().trim().to_string();
        !boot_id.is_empty() && !ticks(a).is_empty()
    });
    let invocations: Vec<_> = fleet
        .machines
        .iter()
        .map(|m| m.unit_property("vmhostd", "InvocationID"))
        .collect();

    let scratch = tempfile::tempdir().unwrap();
    let (deb, new_version) = next_version(&fleet.package(), scratch.path());
    let extra = format!("vmhost_package_file={}", deb.display());
    let upgrade = fleet
        .control
        .playbook("rolling-upgrade.yml", &["-e", &extra]);
    eprintln!("{}", upgrade.output);
    for (m, before) in fleet.machines.iter().zip(&invocations) {
        let now = m.run_ok(&["dpkg-query", "-W", "-f=${Version}", "vmhost"]);
        assert_eq!(now, new_version, "{} (was {version})", m.name);
        assert_eq!(m.unit_property("vmhostd", "SubState"), "running");
        assert_ne!(
            &m.unit_property("vmhostd", "InvocationID"),
            before,
            "{}: vmhostd was not restarted",
            m.name
        );
    }
    fleet.wait_all_live_and_undrained("every host live and undrained after the upgrade");

    // db1 runs on, moved live by the drains: the same boot, and no write lost.
    let listed: Value = serde_json::from_str(&a.run_ok(&["vmctl", "--json", "list"])).unwrap();
    let db1 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["name"] == "db1")
        .unwrap_or_else(|| panic!("db1 is not listed: {listed}"));
    assert_eq!(db1["state"], "running", "{db1}");
    let on = fleet.machine(db1["host"].as_str().unwrap());
    wait_until(Duration::from_secs(60), "db1's guest to report", || {
        std::thread::sleep(Duration::from_millis(250));
        !ticks(on).is_empty()
    });
    let reports = ticks(on);
    assert!(
        reports
            .iter()
            .all(|(id, errors)| *id == boot_id && *errors == 0),
        "db1 rebooted or lost writes on {}: boot {boot_id} then {reports:?}",
        on.name
    );
    let shown: Value =
        serde_json::from_str(&on.run_ok(&["vmctl", "--json", "show", "db1"])).unwrap();
    on.run_ok(&["kill", "-0", &shown["pid"].to_string()]);
    eprintln!(
        "ansible test: machines booted in {} s, site.yml {} s then {} s (idempotent), \
         the VM and rolling-upgrade.yml {} s (of which the playbook {} s), {} s in all; \
         db1 ended on {}",
        booted.as_secs(),
        first.took.as_secs(),
        second.took.as_secs(),
        (started.elapsed() - installed).as_secs(),
        upgrade.took.as_secs(),
        started.elapsed().as_secs(),
        on.name
    );
}
