//! The cgroup (v2) the workload runs in.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Workload {
    dir: PathBuf,
}

impl Workload {
    /// Creates (or adopts) the cgroup and enables the memory controller for it.
    pub fn create(dir: &Path) -> std::io::Result<Workload> {
        if let Some(parent) = dir.parent() {
            // Already enabled is fine; the mkdir below is the real check.
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu");
        }
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        Ok(Workload {
            dir: dir.to_path_buf(),
        })
    }

    pub fn memory_current(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The workload's anonymous memory: what it cannot give back without swapping, unlike
    /// its page cache.
    pub fn anon_bytes(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.stat"))
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|line| line.strip_prefix("anon "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// A hard limit only: unlike `memory.high` it never throttles the workload below it.
    pub fn set_memory_max(&self, bytes: u64) -> std::io::Result<()> {
        std::fs::write(self.dir.join("memory.max"), bytes.to_string())
    }

    /// A PSI trigger that becomes readable-with-priority when the workload stalls on memory
    /// for `stall_us` within `window_us`.
    pub fn pressure_trigger(&self, stall_us: u64, window_us: u64) -> std::io::Result<File> {
        let mut file = File::options()
            .read(true)
            .write(true)
            .open(self.dir.join("memory.pressure"))?;
        file.write_all(format!("some {stall_us} {window_us}").as_bytes())?;
        Ok(file)
    }
}
