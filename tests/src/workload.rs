//! What the test guests' workloads report on their serial consoles, and the fleet's view
//! of its hosts, shared by the multi-host tests.

use crate::{wait_until, TestHost};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// One `dirtier:` report line: the pass count, the boot it ran in, and the writes found
/// lost so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub pass: u64,
    pub boot_id: String,
    pub errors: u64,
}

pub fn parse_tick(line: &str) -> Option<Tick> {
    let rest = line.split("dirtier: pass=").nth(1)?;
    let (pass, rest) = rest.split_once(" boot_id=")?;
    let (boot_id, errors) = rest.split_once(" errors=")?;
    Some(Tick {
        pass: pass.parse().ok()?,
        boot_id: boot_id.into(),
        errors: errors.trim().parse().ok()?,
    })
}

pub fn ticks(serial: &Path) -> Vec<Tick> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines().filter_map(parse_tick).collect()
}

/// What the `diskwriter` guest writes first: random bytes, then one numbered record per
/// 512-byte sector after them.
pub const BLOB_BYTES: u64 = 16 << 20;

/// One line of the `diskwriter` guest's serial console that matters to a disk check.
#[derive(Debug, Clone, PartialEq)]
pub enum DiskLine {
    Ready(String),
    /// The blob's checksum, and the boot that wrote it.
    Blob(String, Option<String>),
    /// A record's number, and the boot that wrote it.
    Record(u64, Option<String>),
}

pub fn parse_disk_line(line: &str) -> Option<DiskLine> {
    if let Some(id) = line.split("vmhost-guest: ready boot_id=").nth(1) {
        Some(DiskLine::Ready(id.trim().to_string()))
    } else if let Some(rest) = line.split("vmhost-disk: blob_md5=").nth(1) {
        let (sum, boot) = value_and_boot(rest);
        Some(DiskLine::Blob(sum.to_string(), boot))
    } else {
        let (n, boot) = value_and_boot(line.split("vmhost-disk: record=").nth(1)?);
        Some(DiskLine::Record(n.parse().ok()?, boot))
    }
}

/// `VALUE boot=ID`, the boot left out by older images.
fn value_and_boot(rest: &str) -> (&str, Option<String>) {
    let mut words = rest.split_whitespace();
    let value = words.next().unwrap_or_default();
    let boot = words
        .find_map(|w| w.strip_prefix("boot="))
        .map(String::from);
    (value, boot)
}

/// What the `diskwriter` guest reported on one host's serial console.
#[derive(Debug, Default)]
pub struct DiskReports {
    pub boot_id: Option<String>,
    pub blob_md5: Option<String>,
    pub records: Vec<u64>,
}

pub fn disk_reports(serial: &Path) -> DiskReports {
    disk_reports_in(&std::fs::read_to_string(serial).unwrap_or_default())
}

pub fn disk_reports_in(text: &str) -> DiskReports {
    let mut reports = DiskReports::default();
    for line in text.lines() {
        match parse_disk_line(line) {
            Some(DiskLine::Ready(id)) => reports.boot_id = Some(id),
            Some(DiskLine::Blob(sum, _)) => reports.blob_md5 = Some(sum),
            Some(DiskLine::Record(n, _)) => reports.records.push(n),
            None => {}
        }
    }
    reports
}

/// The checksum of the first `bytes` of a file.
pub fn md5_of_head(path: &Path, bytes: u64) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"head -c "$1" "$2" | md5sum"#)
        .args(["md5", &bytes.to_string(), &path.display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Waits for more than `after` dirtier reports of VM `vm` on `host`; returns the last.
pub fn wait_ticking(host: &TestHost, vm: &str, after: usize) -> Tick {
    let serial = host.serial_log(vm);
    wait_until(
        Duration::from_secs(180),
        "the guest's workload to report",
        || ticks(&serial).len() > after,
    );
    ticks(&serial).last().unwrap().clone()
}

/// The guest ran on at `target`: same boot, counter past where it was, no page lost.
pub fn assert_continued(before: &Tick, target: &TestHost, vm: &str) {
    let after = wait_ticking(target, vm, 0);
    let on_target = ticks(&target.serial_log(vm));
    assert!(
        on_target.iter().all(|t| t.boot_id == before.boot_id),
        "the guest rebooted: {before:?} then {on_target:?}"
    );
    assert!(
        on_target[0].pass > before.pass,
        "the counter went back: {before:?} then {:?}",
        on_target[0]
    );
    assert!(
        on_target.iter().all(|t| t.errors == 0),
        "pages lost their last write: {on_target:?}"
    );
    assert!(after.pass > on_target[0].pass || on_target.len() == 1);
}

/// The fleet's hosts as `host` sees them through gossip (`vmctl hosts`).
pub fn fleet_hosts(host: &TestHost) -> Vec<Value> {
    let json: Value = serde_json::from_str(&host.vmctl_ok(&["--json", "hosts"])).unwrap();
    json.as_array().unwrap().clone()
}

/// How many hosts `host` sees live, itself included.
pub fn live_hosts(host: &TestHost) -> usize {
    fleet_hosts(host)
        .iter()
        .filter(|h| h["live"] == true)
        .count()
}

/// Samples every host's ledger, and the sizes its VMs hold, until `finish`: the record
/// that no host ever held more than its capacity.
pub struct CapacityWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    over: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    sampler: std::thread::JoinHandle<usize>,
}

impl CapacityWatch {
    pub fn start(hosts: &[TestHost]) -> CapacityWatch {
        use std::sync::atomic::Ordering;
        use vmhost_api::{Reply, Request};
        let sockets: Vec<_> = hosts.iter().map(|h| h.socket.clone()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let over = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let found = over.clone();
        let sampler = std::thread::spawn(move || {
            let mut samples = 0;
            let timeout = Duration::from_secs(5);
            while !stopped.load(Ordering::SeqCst) {
                for socket in &sockets {
                    let (Ok(Reply::Host(info)), Ok(Reply::Vms(vms))) = (
                        vmhost_api::call(socket, Request::Host, timeout),
                        vmhost_api::call(socket, Request::List, timeout),
                    ) else {
                        continue;
                    };
                    samples += 1;
                    let booked = info.allocated.memory_bytes + info.leased.memory_bytes;
                    let held: u64 = vms
                        .iter()
                        .filter(|vm| vm.pid.is_some())
                        .map(|vm| vm.memory_bytes)
                        .sum();
                    let cap = info.capacity.memory_bytes;
                    if booked > cap
                        || held > cap
                        || info.allocated.vcpus + info.leased.vcpus > info.capacity.vcpus
                    {
                        found.lock().unwrap().push(format!(
                            "{}: booked {booked} B, VMs hold {held} B, capacity {cap} B ({:?})",
                            info.name, info
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            samples
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

    /// Stops sampling; returns how many samples were taken and those over capacity.
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = self.sampler.join().expect("the sampler panicked");
        let over = self.over.lock().unwrap().clone();
        (samples, over)
    }

    /// Stops sampling; fails if any sample was over capacity, or none was taken.
    pub fn assert_never_over(self) {
        let (samples, over) = self.finish();
        assert!(samples > 10, "only {samples} capacity samples were taken");
        assert!(over.is_empty(), "a host went over capacity: {over:#?}");
        println!("capacity held in all {samples} samples");
    }
}

/// Follows the dirtier's reports of one VM on every host, stamping each new pass as it
/// appears: the largest gap between them is the outage the guest's workload saw.
pub struct TickGaps {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    follower: std::thread::JoinHandle<Duration>,
}

impl TickGaps {
    /// Starts once the guest has reported; the source's serial log may go with its VM.
    pub fn start(hosts: &[&TestHost], vm: &str) -> TickGaps {
        use std::sync::atomic::Ordering;
        let serials: Vec<_> = hosts.iter().map(|h| h.serial_log(vm)).collect();
        let latest = move || {
            serials
                .iter()
                .filter_map(|s| ticks(s).last().map(|t| t.pass))
                .max()
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let follower = std::thread::spawn(move || {
            let mut pass = latest().expect("the guest reported before the watch started");
            let mut since = std::time::Instant::now();
            let mut largest = Duration::ZERO;
            while !stopped.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                if let Some(now) = latest().filter(|now| *now > pass) {
                    largest = largest.max(since.elapsed());
                    (pass, since) = (now, std::time::Instant::now());
                }
            }
            largest.max(since.elapsed())
        });
        TickGaps { stop, follower }
    }

    /// Stops following; fails if the guest's workload ever stalled longer than `bound`.
    pub fn assert_within(self, bound: Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let largest = self.follower.join().expect("the follower panicked");
        println!("the guest's workload stalled at most {largest:?}");
        assert!(
            largest <= bound,
            "the guest's workload stalled {largest:?}, more than {bound:?}"
        );
    }
}
