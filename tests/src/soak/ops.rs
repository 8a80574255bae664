//! The operator's side of the soak: real vmctl commands picked at random, each run in a
//! thread of its own so that a slow one (a migration, a drain) holds up neither the others
//! nor the checks.

use super::fleet::HOSTS;
use super::observe::Snapshot;
use super::rng::Rng;
use crate::bin;
use std::collections::BTreeSet;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmhost_api::VmState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    Create,
    Scale,
    Bounds,
    Migrate,
    Resume,
    Stop,
    Start,
    Delete,
    Drain,
    Undrain,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    pub vm: Option<String>,
    /// The host whose vmctl runs it; for a drain or undrain, also the host drained.
    pub host: usize,
    pub args: Vec<String>,
    pub timeout: Duration,
}

impl Op {
    pub fn describe(&self) -> String {
        format!("vmctl {} (on {})", self.args.join(" "), HOSTS[self.host])
    }
}

pub struct Outcome {
    /// None when it was killed at its timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn summary(&self) -> String {
        match self.code {
            Some(0) => {
                let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty());
                format!("ok {}", last.unwrap_or_default().trim())
            }
            Some(code) => {
                let last = self.stderr.lines().rev().find(|l| !l.trim().is_empty());
                format!("exit {code}: {}", last.unwrap_or_default().trim())
            }
            None => "timed out".into(),
        }
    }
}

/// Runs vmctl on `socket`, killing it at `timeout`.
pub fn vmctl(socket: &Path, args: &[String], timeout: Duration) -> Outcome {
    let (mut out, mut err) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let mut child = Command::new(bin("vmctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .expect("cannot run vmctl");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |file: &mut std::fs::File| {
        let mut text = String::new();
        file.rewind().unwrap();
        let _ = file.read_to_string(&mut text);
        text
    };
    Outcome {
        code,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

pub struct Running {
    pub op: Op,
    pub started: Instant,
    handle: std::thread::JoinHandle<Outcome>,
}

impl Running {
    pub fn start(op: Op, socket: PathBuf) -> Running {
        let (args, timeout) = (op.args.clone(), op.timeout);
        Running {
            op,
            started: Instant::now(),
            handle: std::thread::spawn(move || vmctl(&socket, &args, timeout)),
        }
    }

    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub fn join(self) -> (Op, Outcome, Duration) {
        let outcome = self.handle.join().expect("a vmctl thread panicked");
        (self.op, outcome, self.started.elapsed())
    }
}

/// What the planner must not touch: VMs and hosts with a command in flight, drained hosts.
pub struct Busy {
    pub vms: BTreeSet<String>,
    pub draining: BTreeSet<usize>,
    pub drained: BTreeSet<usize>,
}

pub struct Planner {
    pub min_vms: usize,
    pub max_vms: usize,
    next_vm: u32,
}

const CU_STEPS: [&str; 5] = ["1", "1.25", "1.5", "1.75", "2"];
const BOUNDS: [(&str, &str); 5] = [
    ("1", "2"),
    ("1", "1.5"),
    ("1.5", "2"),
    ("1", "1"),
    ("2", "2"),
];

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

impl Planner {
    pub fn new(min_vms: usize, max_vms: usize) -> Planner {
        Planner {
            min_vms,
            max_vms,
            next_vm: 0,
        }
    }

    /// A create of the `n`th VM: every third one writes a disk, every other one autoscales.
    pub fn create(&mut self, rng: &mut Rng, host: usize) -> (Op, bool) {
        let n = self.next_vm;
        self.next_vm += 1;
        let name = format!("s{n}");
        let disk = n % 3 == 2;
        let mut args = strings(&["--json", "create", &name, "--min-cu", "1", "--max-cu", "2"]);
        if disk {
            args.extend(strings(&["--image", "diskwriter", "--disk-gib", "1"]));
        } else {
            args.extend(strings(&["--image", "dirtier"]));
        }
        if n.is_multiple_of(2) {
            args.push("--no-autoscale".into());
        }
        if rng.chance(20) {
            args.extend(strings(&["--cu", "2"]));
        }
        let op = Op {
            kind: OpKind::Create,
            vm: Some(name),
            host,
            args,
            timeout: Duration::from_secs(120),
        };
        (op, disk)
    }

    /// One operation on what the snapshot shows, or None when nothing fits now.
    /// `stranded`: migrations left paused long enough that a resume is due.
    pub fn next(
        &mut self,
        rng: &mut Rng,
        seen: &Snapshot,
        known: usize,
        busy: &Busy,
        stranded: &[(usize, String)],
    ) -> Option<Op> {
        let free = |vm: &String| !busy.vms.contains(vm);
        let with_state = |states: &[VmState]| -> Vec<(usize, String)> {
            let mut vms: Vec<(usize, String)> = states
                .iter()
                .flat_map(|s| seen.in_state(*s))
                .filter(|(_, vm)| free(vm))
                .collect();
            vms.sort();
            vms
        };
        let running = with_state(&[VmState::Running]);
        let down = with_state(&[VmState::Stopped, VmState::Crashed]);
        let stranded: Vec<&(usize, String)> = stranded.iter().filter(|(_, vm)| free(vm)).collect();
        let any_drain = !busy.draining.is_empty() || !busy.drained.is_empty();
        let weights = [
            if known < self.max_vms { 8 } else { 0 },     // create
            if known > self.min_vms { 4 } else { 0 },     // delete
            if running.is_empty() { 0 } else { 14 },      // scale
            if running.is_empty() { 0 } else { 6 },       // bounds
            if running.is_empty() { 0 } else { 20 },      // migrate
            if running.is_empty() { 0 } else { 7 },       // stop
            if down.is_empty() { 0 } else { 25 },         // start
            if any_drain { 0 } else { 6 },                // drain
            if busy.drained.is_empty() { 0 } else { 12 }, // undrain
            if stranded.is_empty() { 0 } else { 10 },     // resume
        ];
        if weights.iter().all(|w| *w == 0) {
            return None;
        }
        let op = |kind, vm: &str, host: usize, args: &[&str], secs| Op {
            kind,
            vm: Some(vm.to_string()),
            host,
            args: strings(args),
            timeout: Duration::from_secs(secs),
        };
        Some(match rng.weighted(&weights) {
            0 => {
                let host = rng.range(0, HOSTS.len() as u64) as usize;
                self.create(rng, host).0
            }
            1 => {
                let all: Vec<(usize, String)> = [running.clone(), down.clone()].concat();
                let (host, vm) = rng.pick(&all)?;
                op(OpKind::Delete, vm, *host, &["delete", vm], 60)
            }
            2 => {
                let (host, vm) = rng.pick(&running)?;
                let cu = rng.pick(&CU_STEPS)?;
                let mut args = vec!["scale", vm, "--cu", cu];
                if rng.chance(30) {
                    args.push("--force");
                }
                op(OpKind::Scale, vm, *host, &args, 150)
            }
            3 => {
                let (host, vm) = rng.pick(&running)?;
                let (min, max) = rng.pick(&BOUNDS)?;
                let args = ["bounds", vm, "--min-cu", min, "--max-cu", max];
                op(OpKind::Bounds, vm, *host, &args, 150)
            }
            4 => {
                let (host, vm) = rng.pick(&running)?;
                let others: Vec<usize> = (0..HOSTS.len()).filter(|h| h != host).collect();
                let to = HOSTS[*rng.pick(&others)?];
                let mut args = vec!["--json", "migrate", vm];
                if rng.chance(80) {
                    args.extend(["--to", to]);
                }
                // Slow ones keep post-copy open long enough for faults to land in it.
                if rng.chance(30) {
                    args.extend(["--bandwidth", "16"]);
                }
                op(OpKind::Migrate, vm, *host, &args, 300)
            }
            5 => {
                let (host, vm) = rng.pick(&running)?;
                op(OpKind::Stop, vm, *host, &["stop", vm], 60)
            }
            6 => {
                let (host, vm) = rng.pick(&down)?;
                op(OpKind::Start, vm, *host, &["start", vm], 120)
            }
            7 => {
                let host = rng.range(0, HOSTS.len() as u64) as usize;
                let mut args = strings(&["drain", HOSTS[host], "--wait"]);
                if rng.chance(50) {
                    args.push("--cold".into());
                }
                if rng.chance(50) {
                    args.extend(strings(&["--parallel", "2"]));
                }
                Op {
                    kind: OpKind::Drain,
                    vm: None,
                    host,
                    args,
                    timeout: Duration::from_secs(300),
                }
            }
            8 => {
                let host = *busy.drained.iter().next()?;
                Op {
                    kind: OpKind::Undrain,
                    vm: None,
                    host,
                    args: strings(&["undrain", HOSTS[host]]),
                    timeout: Duration::from_secs(30),
                }
            }
            _ => {
                let (host, vm) = *rng.pick(&stranded)?;
                let args = ["--json", "migrate", vm, "--resume"];
                op(OpKind::Resume, vm, *host, &args, 300)
            }
        })
    }
}
