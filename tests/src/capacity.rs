//! What each host's VMs really hold, as the kernel and QEMU show it, sampled against the
//! host's capacity for the length of a test.
//!
//! - vCPUs are QEMU's vCPU threads: with `debug-threads=on` QEMU names each "CPU n/TCG" (or
//!   "CPU n/KVM"), and an unplugged vCPU's thread ends.
//! - Memory is the boot memory on QEMU's command line plus what its virtio-mem device has
//!   plugged, read over QMP.
//! - Disks are the disk files' sizes in the state directory.

use crate::procs::{lab_processes, start_time, Kind, LabProcess};
use crate::qmp::Monitor;
use crate::TestHost;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmhost_api::{Reply, Request, Resources};

/// What one QEMU holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// A size on QEMU's command line, as vmm writes them: whole MiB.
fn mib_value(text: &str) -> Option<u64> {
    Some(text.strip_suffix('M')?.parse::<u64>().ok()? << 20)
}

/// The value of `key=` in one comma-separated option argument.
fn option<'a>(arg: &'a str, key: &str) -> Option<&'a str> {
    arg.split(',')
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

/// The boot memory, and the hotplug memory it was started with, from QEMU's arguments.
fn command_line_memory(args: &[String]) -> Option<(u64, u64)> {
    let memory = args.iter().position(|a| a == "-m")?;
    let boot = mib_value(option(args.get(memory + 1)?, "size")?)?;
    let plugged = args
        .iter()
        .find(|a| a.starts_with("virtio-mem-pci,"))
        .map_or(Some(0), |device| {
            mib_value(option(device, "requested-size")?)
        })?;
    Some((boot, plugged))
}

fn arguments(pid: i32) -> Option<Vec<String>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn vcpu_threads(pid: i32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let vcpus = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("CPU ") && name.contains('/'))
        .count();
    Some(vcpus as u32)
}

fn plugged_over_qmp(socket: &std::path::Path) -> Result<u64, String> {
    let mut monitor = Monitor::connect(socket, Duration::from_secs(1))?;
    let path = format!("/machine/peripheral/{}", vmm::cmdline::VIRTIO_MEM_ID);
    let size = monitor.execute(
        "qom-get",
        serde_json::json!({"path": path, "property": "size"}),
    )?;
    size.as_u64()
        .ok_or_else(|| format!("virtio-mem size {size} is not a number"))
}

/// Reads QEMUs' sizes, remembering each process's last QMP reading. While vmhostd holds the
/// monitor (a migration, which no resize can overlap) that reading stands; a QEMU not read
/// yet counts at the size on its command line. A migrating VM's monitor is not even tried:
/// QEMU queues a second client until the first leaves, and a test must not sit in the
/// queue in front of vmhostd.
#[derive(Default)]
pub struct SizeReader {
    plugged: HashMap<(i32, u64), u64>,
}

impl SizeReader {
    pub fn held(&mut self, qemu: &LabProcess, state_dir: &std::path::Path) -> Option<Held> {
        let args = arguments(qemu.pid)?;
        let (boot, started_with) = command_line_memory(&args)?;
        let key = (qemu.pid, start_time(qemu.pid)?);
        let folder = state_dir.join("vms").join(&qemu.vm);
        let migrating = folder.join("leaving").exists() || folder.join("arrival.json").exists();
        let read = match migrating {
            true => Err("the VM is migrating".to_string()),
            false => plugged_over_qmp(&vmm::cmdline::oob_socket(&folder.join("qmp.sock"))),
        };
        let plugged = match read {
            Ok(plugged) => *self.plugged.entry(key).insert_entry(plugged).get(),
            Err(_) => *self.plugged.get(&key).unwrap_or(&started_with),
        };
        Some(Held {
            vcpus: vcpu_threads(qemu.pid)?,
            memory_bytes: boot + plugged,
        })
    }
}

/// What `vm`'s QEMU on `host` holds now, as the kernel and QEMU show it.
pub fn held_by(host: &TestHost, vm: &str) -> Held {
    let qemu = LabProcess {
        pid: host.live_pids(vm).qemu(),
        host: 0,
        vm: vm.to_string(),
        kind: Kind::Qemu,
    };
    SizeReader::default()
        .held(&qemu, &host.state_dir())
        .unwrap_or_else(|| panic!("the QEMU of {vm} ended while it was read"))
}

/// The sizes of the disk files in a host's state directory.
fn disk_bytes(state_dir: &std::path::Path) -> u64 {
    let Ok(folders) = std::fs::read_dir(state_dir.join("vms")) else {
        return 0;
    };
    folders
        .filter_map(|folder| std::fs::metadata(folder.ok()?.path().join("disk.raw")).ok())
        .map(|disk| disk.len())
        .sum()
}

struct Watched {
    name: String,
    socket: PathBuf,
    state_dir: PathBuf,
    /// From the daemon's first answer: its configuration does not change under a test.
    capacity: Option<(Resources, u64)>,
}

impl Watched {
    /// What the host's QEMUs hold now, and what is wrong with it, if anything; None when it
    /// could not be sampled.
    fn check(
        &mut self,
        qemus: &[LabProcess],
        sizes: &mut SizeReader,
    ) -> Option<(Held, Vec<String>)> {
        let mut wrong = Vec::new();
        if let Ok(Reply::Host(info)) =
            vmhost_api::call(&self.socket, Request::Host, Duration::from_secs(5))
        {
            self.capacity = Some((info.capacity, info.disk_capacity_gib << 30));
            let booked = info.allocated.memory_bytes + info.leased.memory_bytes;
            if booked > info.capacity.memory_bytes
                || info.allocated.vcpus + info.leased.vcpus > info.capacity.vcpus
            {
                wrong.push(format!("its ledger books more than it has: {info:?}"));
            }
        }
        let (capacity, disk_capacity) = self.capacity?;
        let held: Vec<(String, Held)> = qemus
            .iter()
            .filter_map(|qemu| Some((qemu.vm.clone(), sizes.held(qemu, &self.state_dir)?)))
            .collect();
        let vcpus: u32 = held.iter().map(|(_, h)| h.vcpus).sum();
        let memory: u64 = held.iter().map(|(_, h)| h.memory_bytes).sum();
        if vcpus > capacity.vcpus || memory > capacity.memory_bytes {
            wrong.push(format!(
                "its QEMUs hold {vcpus} vCPUs and {memory} B of {} vCPUs and {} B: {held:?}",
                capacity.vcpus, capacity.memory_bytes
            ));
        }
        let disks = disk_bytes(&self.state_dir);
        if disk_capacity > 0 && disks > disk_capacity {
            wrong.push(format!("its disks take {disks} B of {disk_capacity} B"));
        }
        let wrong = wrong.into_iter().map(|w| format!("{}: {w}", self.name));
        let held = Held {
            vcpus,
            memory_bytes: memory,
        };
        Some((held, wrong.collect()))
    }
}

/// Samples every host until `finish`: the record that no host ever held more than its
/// capacity, by what its QEMUs and disks hold, and by its own ledger.
pub struct CapacityWatch {
    stop: Arc<AtomicBool>,
    over: Arc<Mutex<Vec<String>>>,
    sampler: std::thread::JoinHandle<(usize, Held)>,
}

impl CapacityWatch {
    pub fn start(hosts: &[TestHost]) -> CapacityWatch {
        let mut watched: Vec<Watched> = hosts
            .iter()
            .map(|h| Watched {
                name: h.name.clone(),
                socket: h.socket.clone(),
                state_dir: h.state_dir(),
                capacity: None,
            })
            .collect();
        let state_dirs: Vec<PathBuf> = watched.iter().map(|w| w.state_dir.clone()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let over = Arc::new(Mutex::new(Vec::new()));
        let found = over.clone();
        let sampler = std::thread::spawn(move || {
            let (mut samples, mut sizes) = (0, SizeReader::default());
            let mut fullest = Held::default();
            while !stopped.load(Ordering::SeqCst) {
                let qemus: Vec<LabProcess> = lab_processes(&state_dirs)
                    .into_iter()
                    .filter(|p| p.kind == Kind::Qemu)
                    .collect();
                for (index, host) in watched.iter_mut().enumerate() {
                    let on_host: Vec<LabProcess> =
                        qemus.iter().filter(|q| q.host == index).cloned().collect();
                    if let Some((held, wrong)) = host.check(&on_host, &mut sizes) {
                        samples += 1;
                        fullest.vcpus = fullest.vcpus.max(held.vcpus);
                        fullest.memory_bytes = fullest.memory_bytes.max(held.memory_bytes);
                        found.lock().unwrap().extend(wrong);
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            (samples, fullest)
        });
        CapacityWatch {
            stop,
            over,
            sampler,
        }
    }

    /// The samples over capacity so far.
    pub fn over(&self) -> Vec<String> {
        self.over.lock().unwrap().clone()
    }

    /// Stops sampling; returns how many samples were taken, the most vCPUs and memory one
    /// host's QEMUs were seen to hold, and the samples over capacity.
    pub fn finish(self) -> (usize, Held, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, fullest) = self.sampler.join().expect("the sampler panicked");
        let over = self.over.lock().unwrap().clone();
        (samples, fullest, over)
    }

    /// Stops sampling; fails if any sample was over capacity, or if too few were taken or
    /// none saw a QEMU.
    pub fn assert_never_over(self) {
        let (samples, fullest, over) = self.finish();
        assert!(samples > 10, "only {samples} capacity samples were taken");
        assert!(
            fullest.vcpus > 0 && fullest.memory_bytes > 0,
            "no sample saw a QEMU hold anything: {fullest:?}"
        );
        assert!(over.is_empty(), "a host went over capacity: {over:#?}");
        println!("capacity held in all {samples} samples; the fullest host held {fullest:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_memory_on_the_command_line_in_vmm_s_format() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let growable = args(&[
            "-m",
            "size=512M,maxmem=3584M",
            "-device",
            "virtio-mem-pci,id=vmem0,memdev=hotmem0,block-size=2M,requested-size=1024M",
        ]);
        assert_eq!(command_line_memory(&growable), Some((512 << 20, 1 << 30)));
        let fixed = args(&["-m", "size=1024M,maxmem=1024M"]);
        assert_eq!(command_line_memory(&fixed), Some((1 << 30, 0)));
        assert_eq!(command_line_memory(&args(&["-m", "size=1G"])), None);
    }

    #[test]
    fn counts_no_vcpu_threads_in_a_process_without_them() {
        assert_eq!(vcpu_threads(std::process::id() as i32), Some(0));
    }
}
