//! A lab of network namespaces: one "switch" namespace with a bridge, and one namespace per
//! host whose own bridge `br0` holds the host's address and an uplink to the switch, so every
//! host (and any guest tap later enslaved to a host's `br0`) shares one L2 segment.
//! Dropping the lab deletes every namespace, and with them their links.

use crate::{bin, HostOptions, Limits, TestHost};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;

/// The fleet port every lab host listens on (each has its own address).
pub const FLEET_PORT: u16 = 7100;

pub struct Lab {
    prefix: String,
    hosts: usize,
}

fn ip(args: &[&str]) {
    run_checked("ip", args);
}

/// Runs `program`; says what failed, with its stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

fn run_checked(program: &str, args: &[&str]) {
    if let Err(e) = run_command(program, args) {
        panic!("{e}");
    }
}

/// Namespaces left by a test process that died before it could clean up.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(owner) = name
            .strip_prefix("vmh")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{owner}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Lab {
    pub fn new(hosts: usize) -> Lab {
        assert!(hosts < 200);
        remove_stale_namespaces();
        // Unique per lab, so tests of one process can each have their own.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lab = Lab {
            prefix: format!("vmh{}-{n}-", std::process::id()),
            hosts,
        };
        let switch = lab.switch();
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = lab.ns(i);
            let port = format!("p{i}");
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "uplink",
                "netns", &ns,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", &ns, "link", "set", "uplink", "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "br0", "up"]);
            let addr = format!("{}/24", lab.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "br0"]);
        }
        lab
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Connects or cuts host `i` from the segment (packets are dropped, as on a cable cut).
    pub fn set_uplink(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.ns(i),
            "link",
            "set",
            "uplink",
            if up { "up" } else { "down" },
        ]);
    }

    /// Makes host `i`'s link lossy: `percent` % of what it sends and of what it receives is
    /// dropped at random, or nothing any more (None). This kernel has no netem, so iptables'
    /// `statistic` match does it, on the receiving side so that no sender sees an error;
    /// loopback, where each host's gossip codec runs, is left alone.
    pub fn set_loss(&self, i: usize, percent: Option<u32>) {
        let probability = format!("{:.2}", f64::from(percent.unwrap_or(0)) / 100.0);
        let from = self.addr(i).to_string();
        for j in 0..self.hosts {
            let ns = self.ns(j);
            let mut args = vec!["netns", "exec", &ns, "iptables", "-w"];
            if percent.is_none() {
                args.extend(["-F", "INPUT"]);
            } else {
                args.extend(["-A", "INPUT", "-i", "br0"]);
                if j != i {
                    args.extend(["-s", &from]);
                }
                args.extend(["-m", "statistic", "--mode", "random"]);
                args.extend(["--probability", &probability, "-j", "DROP"]);
            }
            run_checked("ip", &args);
        }
    }

    /// Sets every link of the segment to `mtu` (jumbo frames, say).
    pub fn set_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        let switch = self.switch();
        for i in 0..self.hosts {
            let ns = self.ns(i);
            ip(&["-n", &switch, "link", "set", &format!("p{i}"), "mtu", &mtu]);
            ip(&["-n", &ns, "link", "set", "uplink", "mtu", &mtu]);
            ip(&["-n", &ns, "link", "set", "br0", "mtu", &mtu]);
        }
        ip(&["-n", &switch, "link", "set", "br0", "mtu", &mtu]);
    }

    /// Gives the switch namespace an address on the segment, for a client outside every
    /// host; returns the namespace.
    pub fn client_namespace(&self) -> String {
        let switch = self.switch();
        ip(&["-n", &switch, "addr", "add", "10.88.0.200/24", "dev", "br0"]);
        switch
    }

    /// Host `i`'s address on the shared segment.
    pub fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 88, 0, i as u8 + 1))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in (0..self.hosts).map(|i| self.ns(i)).chain([self.switch()]) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

fn vmctl_fleet(args: &[&str]) {
    let output = Command::new(bin("vmctl"))
        .arg("fleet")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "vmctl fleet {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts one vmhostd per `(name, limits)` in the lab's host namespaces, in that order, as
/// one fleet seeded by the first, with credentials from the real `vmctl fleet` commands.
/// `fleet_config` is added to each `[fleet]` table, `tables` after it.
pub fn start_fleet(
    lab: &Lab,
    pki: &Path,
    hosts: Vec<(&str, Limits)>,
    fleet_config: &str,
    tables: &str,
) -> Vec<TestHost> {
    vmctl_fleet(&["init-ca", pki.join("ca").to_str().unwrap()]);
    let seed = format!("{}:{FLEET_PORT}", lab.addr(0));
    hosts
        .into_iter()
        .enumerate()
        .map(|(i, (name, limits))| {
            let credentials = pki.join(name);
            vmctl_fleet(&[
                "issue-cert",
                "--ca",
                pki.join("ca").to_str().unwrap(),
                "--host",
                name,
                "--addr",
                &lab.addr(i).to_string(),
                credentials.to_str().unwrap(),
            ]);
            TestHost::start_with(HostOptions {
                name: name.into(),
                limits,
                netns: Some(lab.ns(i)),
                extra_config: format!(
                    "[fleet]\ncluster = \"test\"\nlisten = \"{}:{FLEET_PORT}\"\nseeds = [\"{seed}\"]\n\
                     credentials = \"{}\"\n{fleet_config}\n{tables}",
                    lab.addr(i),
                    credentials.display()
                ),
            })
        })
        .collect()
}

/// Hosts `names`, each with `limits`, started as one fleet by `start_fleet`, once every
/// host sees every other live.
pub fn start_live_fleet(
    lab: &Lab,
    pki: &Path,
    names: &[&str],
    limits: Limits,
    fleet_config: &str,
    tables: &str,
) -> Vec<TestHost> {
    let hosts = start_fleet(
        lab,
        pki,
        names.iter().map(|name| (*name, limits)).collect(),
        fleet_config,
        tables,
    );
    crate::wait_until(
        std::time::Duration::from_secs(60),
        "the hosts to see each other",
        || {
            hosts
                .iter()
                .all(|h| crate::workload::live_hosts(h) == names.len())
        },
    );
    hosts
}
