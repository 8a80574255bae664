//! What the fleet looks like at one moment: each host's own listing and ledger, its VM
//! folders (pidfiles, migration markers, disks), and the lab's processes.

use super::fleet::Fleet;
use crate::process_alive;
use crate::procs::{lab_processes, LabProcess};
use std::time::Duration;
use vmhost_api::{HostInfo, Reply, Request, VmInfo, VmState};

/// One VM folder in a host's state dir.
#[derive(Debug, Clone)]
pub struct Folder {
    pub vm: String,
    /// The pidfile's QEMU, when that process is alive.
    pub qemu_pid: Option<i32>,
    pub leaving: bool,
    pub arriving: bool,
    pub disk: bool,
}

pub struct HostSeen {
    /// None while the daemon does not answer.
    pub vms: Option<Vec<VmInfo>>,
    pub info: Option<HostInfo>,
    pub folders: Vec<Folder>,
}

impl HostSeen {
    pub fn up(&self) -> bool {
        self.vms.is_some()
    }

    pub fn listed(&self, vm: &str) -> Option<&VmInfo> {
        self.vms.as_ref()?.iter().find(|v| v.name == vm)
    }

    pub fn folder(&self, vm: &str) -> Option<&Folder> {
        self.folders.iter().find(|f| f.vm == vm)
    }
}

pub struct Snapshot {
    pub hosts: Vec<HostSeen>,
    pub processes: Vec<LabProcess>,
}

fn folders(fleet: &Fleet, host: usize) -> Vec<Folder> {
    let dir = fleet.hosts[host].state_dir().join("vms");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let vm = path.file_name()?.to_str()?.to_string();
            let qemu_pid = std::fs::read_to_string(path.join("qemu.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .filter(|pid| process_alive(*pid));
            Some(Folder {
                vm,
                qemu_pid,
                leaving: path.join("leaving").exists(),
                arriving: path.join("arrival.json").exists(),
                disk: path.join("disk.raw").exists(),
            })
        })
        .collect()
}

impl Snapshot {
    pub fn take(fleet: &Fleet) -> Snapshot {
        let timeout = Duration::from_secs(5);
        let hosts = (0..fleet.hosts.len())
            .map(|i| {
                let socket = &fleet.hosts[i].socket;
                let vms = match vmhost_api::call(socket, Request::List, timeout) {
                    Ok(Reply::Vms(vms)) => Some(vms),
                    _ => None,
                };
                let info = match vmhost_api::call(socket, Request::Host, timeout) {
                    Ok(Reply::Host(info)) => Some(info),
                    _ => None,
                };
                HostSeen {
                    vms,
                    info,
                    folders: folders(fleet, i),
                }
            })
            .collect();
        Snapshot {
            hosts,
            processes: lab_processes(&fleet.state_dirs()),
        }
    }

    /// Every (host, listing) of `vm`.
    pub fn listings(&self, vm: &str) -> Vec<(usize, &VmInfo)> {
        self.hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| Some((i, h.listed(vm)?)))
            .collect()
    }

    /// Every VM name some host lists.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .hosts
            .iter()
            .filter_map(|h| h.vms.as_ref())
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The host to ask about `vm`: the one that holds it outside a migration, else the
    /// source of its migration.
    pub fn home(&self, vm: &str) -> Option<usize> {
        let listings = self.listings(vm);
        listings
            .iter()
            .find(|(_, v)| v.state != VmState::Migrating)
            .or_else(|| {
                listings
                    .iter()
                    .find(|(i, _)| self.hosts[*i].folder(vm).is_some_and(|f| f.leaving))
            })
            .or(listings.first())
            .map(|(i, _)| *i)
    }

    /// VMs listed in `state` on an answering host, with that host.
    pub fn in_state(&self, state: VmState) -> Vec<(usize, String)> {
        self.placements()
            .into_iter()
            .filter(|(_, _, s, _)| *s == state)
            .map(|(name, i, _, _)| (i, name))
            .collect()
    }

    /// Whether some host lists a VM as migrating.
    pub fn migrating(&self) -> bool {
        !self.in_state(VmState::Migrating).is_empty()
    }

    /// Each listed VM with its host, state and QEMU pid.
    pub fn placements(&self) -> Vec<(String, usize, VmState, Option<i32>)> {
        let mut all: Vec<_> = self
            .hosts
            .iter()
            .enumerate()
            .flat_map(|(i, h)| {
                h.vms
                    .iter()
                    .flatten()
                    .map(move |v| (v.name.clone(), i, v.state, v.pid))
            })
            .collect();
        all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        all
    }
}
