//! The fleet-wide rules, checked on every snapshot. A rule seen broken must stay broken for
//! `GRACE` before it counts (listings of three hosts are not taken at one instant, and a
//! killed QEMU takes a moment to be noticed); after quiescing there is no grace.

use super::fleet::HOSTS;
use super::observe::Snapshot;
use crate::procs::Kind;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use vmhost_api::VmState;

pub const GRACE: Duration = Duration::from_secs(30);

/// What the soak knows it made.
#[derive(Default)]
pub struct Model {
    /// Each VM and whether it has a disk.
    pub vms: BTreeMap<String, VmModel>,
    pub deleted: BTreeSet<String>,
}

pub struct VmModel {
    pub disk: bool,
    /// False while a create or delete of it has not said how it went.
    pub sure: bool,
}

fn problems(seen: &Snapshot, model: &Model, settled: bool) -> Vec<String> {
    let mut found = Vec::new();
    for (vm, known) in &model.vms {
        let listings = seen.listings(vm);
        let on_down_host = seen.hosts.iter().any(|h| !h.up() && h.folder(vm).is_some());
        if listings.is_empty() && !on_down_host && known.sure {
            found.push(format!("{vm} is listed by no host"));
        }
        let active: Vec<&str> = listings
            .iter()
            .filter(|(_, v)| matches!(v.state, VmState::Running | VmState::Starting))
            .map(|(h, _)| HOSTS[*h])
            .collect();
        if active.len() > 1 {
            found.push(format!("{vm} runs on hosts {active:?} at once"));
        }
        if settled && listings.len() != 1 && known.sure {
            let hosts: Vec<&str> = listings.iter().map(|(h, _)| HOSTS[*h]).collect();
            found.push(format!("{vm} is listed by {hosts:?}, not by one host"));
        }
        for (h, info) in &listings {
            let folder = seen.hosts[*h].folder(vm);
            let pidfile = folder.and_then(|f| f.qemu_pid);
            // A restart reads the folder: it must say what runs.
            if let Some(f) = folder.filter(|_| info.state == VmState::Running) {
                for (marked, file) in [(f.arriving, "arrival.json"), (f.leaving, "leaving")] {
                    if marked {
                        found.push(format!(
                            "{vm} runs on {} but its folder still holds {file}, as if it were migrating",
                            HOSTS[*h]
                        ));
                    }
                }
            }
            match info.state {
                VmState::Running if info.pid.is_none() || info.pid != pidfile => found.push(format!(
                    "{vm} is listed running on {} with QEMU pid {:?}, but its live pidfile QEMU is {pidfile:?}",
                    HOSTS[*h], info.pid
                )),
                VmState::Stopped | VmState::Crashed => {
                    if known.disk && !folder.is_some_and(|f| f.disk) {
                        found.push(format!("{vm} is {} on {} without its disk", info.state, HOSTS[*h]));
                    }
                    if let Some(pid) = pidfile {
                        found.push(format!(
                            "{vm} is {} on {} but its QEMU {pid} runs",
                            info.state, HOSTS[*h]
                        ));
                    }
                }
                VmState::Migrating | VmState::Starting if settled => found.push(format!(
                    "{vm} is still {} on {} after quiescing",
                    info.state, HOSTS[*h]
                )),
                _ => {}
            }
        }
    }
    for vm in &model.deleted {
        for (h, _) in seen.listings(vm) {
            found.push(format!("{vm} was deleted but {} lists it", HOSTS[h]));
        }
    }
    for process in &seen.processes {
        let host = &seen.hosts[process.host];
        if !host.up() {
            continue;
        }
        let (what, pid, vm, at) = (process.kind, process.pid, &process.vm, HOSTS[process.host]);
        let listed = host.listed(vm);
        match (what, listed) {
            (Kind::DiskTool, _) if !settled => {}
            (_, None) => found.push(format!(
                "orphan {what:?} process {pid} of {vm} on {at}: {at} does not list {vm}"
            )),
            (Kind::Qemu, Some(_)) if host.folder(vm).and_then(|f| f.qemu_pid) != Some(pid) => found
                .push(format!(
                    "QEMU {pid} of {vm} on {at} is not the one its pidfile names"
                )),
            (Kind::Vsock, Some(v)) if matches!(v.state, VmState::Stopped | VmState::Crashed) => {
                found.push(format!(
                    "vsock backend {pid} of {vm} runs on {at}, where it is {}",
                    v.state
                ))
            }
            (Kind::DiskTool, Some(_)) => found.push(format!(
                "disk tool {pid} of {vm} still runs on {at} after quiescing"
            )),
            _ => {}
        }
    }
    found
}

pub struct Checks {
    suspects: HashMap<String, Instant>,
}

impl Checks {
    pub fn new() -> Checks {
        Checks {
            suspects: HashMap::new(),
        }
    }

    /// Fails with a rule broken for longer than the grace, or at all once `settled`.
    pub fn fleet(&mut self, seen: &Snapshot, model: &Model, settled: bool) -> Result<(), String> {
        let found = problems(seen, model, settled);
        if settled {
            return found.into_iter().next().map_or(Ok(()), Err);
        }
        let now = Instant::now();
        self.suspects.retain(|p, _| found.contains(p));
        for problem in found {
            let since = *self.suspects.entry(problem.clone()).or_insert(now);
            if now - since >= GRACE {
                return Err(format!("{problem} (for {} s)", (now - since).as_secs()));
            }
        }
        Ok(())
    }

    /// Rules broken now but not yet for long, for the timeline.
    pub fn suspects(&self) -> Vec<String> {
        self.suspects.keys().cloned().collect()
    }
}

impl Default for Checks {
    fn default() -> Checks {
        Checks::new()
    }
}

/// Hosts still holding a lease for another (every lease ends within its TTL once its
/// holder lets go or dies).
pub fn leases_held(seen: &Snapshot) -> Vec<String> {
    seen.hosts
        .iter()
        .zip(HOSTS)
        .filter_map(|(h, name)| {
            let info = h.info.as_ref()?;
            (info.leased.vcpus != 0 || info.leased.memory_bytes != 0)
                .then(|| format!("{name} leases {:?}", info.leased))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procs::LabProcess;
    use crate::soak::observe::{Folder, HostSeen};

    fn vm(name: &str, state: &str, pid: Option<i32>) -> vmhost_api::VmInfo {
        serde_json::from_value(serde_json::json!({
            "name": name, "state": state, "cu": 1.0, "min_cu": 1.0, "max_cu": 2.0,
            "vcpus": 1, "memory_bytes": 1u64 << 30, "accel": "tcg", "image": "dirtier",
            "host": "a", "autoscale": false, "pid": pid, "serial_log": "",
        }))
        .unwrap()
    }

    fn folder(vm: &str, qemu_pid: Option<i32>, arriving: bool) -> Folder {
        Folder {
            vm: vm.into(),
            qemu_pid,
            leaving: false,
            arriving,
            disk: false,
        }
    }

    fn one_host(
        vms: Vec<vmhost_api::VmInfo>,
        folders: Vec<Folder>,
        qemus: &[(&str, i32)],
    ) -> Snapshot {
        let down = || HostSeen {
            vms: Some(Vec::new()),
            info: None,
            folders: Vec::new(),
        };
        Snapshot {
            hosts: vec![
                HostSeen {
                    vms: Some(vms),
                    info: None,
                    folders,
                },
                down(),
                down(),
            ],
            processes: qemus
                .iter()
                .map(|(vm, pid)| LabProcess {
                    pid: *pid,
                    host: 0,
                    vm: vm.to_string(),
                    kind: Kind::Qemu,
                })
                .collect(),
        }
    }

    fn model(vms: &[&str]) -> Model {
        let mut model = Model::default();
        for vm in vms {
            model.vms.insert(
                vm.to_string(),
                VmModel {
                    disk: false,
                    sure: true,
                },
            );
        }
        model
    }

    #[test]
    fn a_running_vm_with_its_qemu_and_no_marker_is_fine() {
        let seen = one_host(
            vec![vm("x", "running", Some(10))],
            vec![folder("x", Some(10), false)],
            &[("x", 10)],
        );
        assert_eq!(problems(&seen, &model(&["x"]), true), Vec::<String>::new());
    }

    #[test]
    fn an_unsaved_arrival_a_second_qemu_and_a_stopped_vm_that_runs_are_found() {
        let seen = one_host(
            vec![vm("x", "running", Some(10)), vm("y", "stopped", None)],
            vec![folder("x", Some(10), true), folder("y", Some(21), false)],
            &[("x", 10), ("y", 20), ("y", 21)],
        );
        let found = problems(&seen, &model(&["x", "y"]), false);
        let says = |what: &str| found.iter().any(|p| p.contains(what));
        assert!(
            says("x runs on a but its folder still holds arrival.json"),
            "{found:?}"
        );
        assert!(says("y is stopped on a but its QEMU 21 runs"), "{found:?}");
        assert!(
            says("QEMU 20 of y on a is not the one its pidfile names"),
            "{found:?}"
        );
    }

    #[test]
    fn a_vm_gone_or_twice_is_found() {
        let mut seen = one_host(
            vec![vm("x", "running", Some(10))],
            vec![folder("x", Some(10), false)],
            &[("x", 10)],
        );
        seen.hosts[1].vms = Some(vec![vm("x", "running", Some(11))]);
        seen.hosts[1].folders = vec![folder("x", Some(11), false)];
        let found = problems(&seen, &model(&["x", "lost"]), false);
        assert!(
            found.contains(&"x runs on hosts [\"a\", \"b\"] at once".to_string()),
            "{found:?}"
        );
        assert!(
            found.contains(&"lost is listed by no host".to_string()),
            "{found:?}"
        );
    }
}
