//! A lab of network namespaces: one "switch" namespace with a bridge, and one namespace per
//! host whose own bridge `br0` holds the host's address and an uplink to the switch, so every
//! host (and any guest tap later enslaved to a host's `br0`) shares one L2 segment.
//! Dropping the lab deletes every namespace, and with them their links.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

pub struct Lab {
    prefix: String,
    hosts: usize,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
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
        let lab = Lab {
            prefix: format!("vmh{}-", std::process::id()),
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
