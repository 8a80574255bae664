//! The VM processes a test host started, as the kernel shows them in /proc: a test judges
//! "QEMU is gone" from these, never from the pidfiles vmhostd itself removes.

use crate::TestHost;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Running or sleeping: a zombie has exited already.
pub fn process_alive(pid: i32) -> bool {
    stat_after_name(pid).is_some_and(|rest| rest.starts_with(['R', 'S', 'D']))
}

/// The fields of /proc/PID/stat after the command name, which may hold spaces.
fn stat_after_name(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.trim_start().to_string())
}

/// The process's start time in clock ticks since boot: a later process reusing the pid
/// has another.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    // Field 22 of stat; the name (field 2) is cut off, the state (field 3) comes first.
    stat_after_name(pid)?.split(' ').nth(19)?.parse().ok()
}

/// The files a process holds open, as the kernel names them.
pub fn open_files(pid: i32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .collect()
}

/// A file held open by this process without close-on-exec, so every process it starts
/// inherits it, as a daemon inherits its shell's or supervisor's descriptors.
pub fn inheritable_file(dir: &Path) -> (std::fs::File, PathBuf) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let path = dir.join("inherited.lock");
    let file = std::fs::File::create(&path).unwrap();
    fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    (file, path)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Qemu,
    Vsock,
    /// qemu-nbd or qemu-img of a cold move.
    DiskTool,
}

#[derive(Debug, Clone)]
pub struct LabProcess {
    pub pid: i32,
    pub host: usize,
    pub vm: String,
    pub kind: Kind,
}

/// Every live QEMU, vsock backend and disk tool whose command line names a VM folder of
/// one of `state_dirs`.
pub fn lab_processes(state_dirs: &[PathBuf]) -> Vec<LabProcess> {
    let patterns: Vec<String> = state_dirs
        .iter()
        .map(|d| format!("{}/vms/", d.display()))
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let program = Path::new(args.first()?).file_name()?.to_str()?.to_string();
            let kind = if program.starts_with("qemu-system") {
                Kind::Qemu
            } else if program == "vhost-device-vsock" {
                Kind::Vsock
            } else if program == "qemu-nbd" || program == "qemu-img" {
                Kind::DiskTool
            } else {
                return None;
            };
            let (host, vm) = args.iter().find_map(|arg| {
                patterns.iter().enumerate().find_map(|(host, pattern)| {
                    let rest = &arg[arg.find(pattern.as_str())? + pattern.len()..];
                    Some((host, rest.split(['/', ',']).next()?.to_string()))
                })
            })?;
            process_alive(pid).then_some(LabProcess {
                pid,
                host,
                vm,
                kind,
            })
        })
        .collect()
}

/// The QEMU and vsock backend of one VM, read from /proc before an operation that must end
/// them (stop, delete, a migration away).
#[derive(Debug)]
pub struct LivePids {
    vm: String,
    /// (kind, pid, start time)
    processes: Vec<(Kind, i32, u64)>,
}

impl LivePids {
    /// Fails unless `vm` has a live QEMU on `host`. Its backend is recorded when it runs
    /// one: a source paused mid post-copy has none.
    pub fn of(host: &TestHost, vm: &str) -> LivePids {
        let processes: Vec<_> = lab_processes(&[host.state_dir()])
            .into_iter()
            .filter(|p| p.vm == vm && p.kind != Kind::DiskTool)
            .filter_map(|p| Some((p.kind, p.pid, start_time(p.pid)?)))
            .collect();
        assert!(
            processes.iter().any(|p| p.0 == Kind::Qemu),
            "no live QEMU of {vm} on {}: {processes:?}",
            host.name
        );
        LivePids {
            vm: vm.into(),
            processes,
        }
    }

    pub fn qemu(&self) -> i32 {
        self.pid(Kind::Qemu)
    }

    pub fn backend(&self) -> i32 {
        self.pid(Kind::Vsock)
    }

    fn pid(&self, kind: Kind) -> i32 {
        let found = self.processes.iter().find(|p| p.0 == kind);
        found
            .unwrap_or_else(|| panic!("no {kind:?} of {}: {self:?}", self.vm))
            .1
    }

    /// Those of the recorded processes that still run.
    pub fn alive(&self) -> Vec<(Kind, i32)> {
        self.processes
            .iter()
            .filter(|(_, pid, start)| process_alive(*pid) && start_time(*pid) == Some(*start))
            .map(|(kind, pid, _)| (*kind, *pid))
            .collect()
    }

    /// Waits a few seconds (a stop's grace period, a backend noticing its QEMU went), then
    /// fails naming every recorded process still running.
    pub fn assert_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.alive().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = self.alive();
        assert!(
            left.is_empty(),
            "processes of {} outlived it: {left:?}",
            self.vm
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_this_process_from_a_dead_one() {
        let me = std::process::id() as i32;
        assert!(process_alive(me));
        assert!(start_time(me).is_some());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
