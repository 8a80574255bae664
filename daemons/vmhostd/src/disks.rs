//! The VMs' disks against what the state directory's filesystem may hold. Disks are sparse,
//! so a guest fills its disk only as it writes; booking every disk at its full size is what
//! keeps guests from filling the filesystem that holds every VM's state.

use crate::error::HostError;
use crate::store::StoreError;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

const GIB: u64 = 1 << 30;

pub struct DiskBudget {
    capacity_gib: u64,
    /// Each VM's disk, in GiB.
    disks: Mutex<BTreeMap<String, u64>>,
}

impl DiskBudget {
    /// `capacity_gib` if set, otherwise the size of the filesystem holding `state_dir`.
    pub fn new(capacity_gib: Option<u64>, state_dir: &Path) -> Result<DiskBudget, StoreError> {
        let capacity_gib = match capacity_gib {
            Some(gib) => gib,
            None => {
                let fs = nix::sys::statvfs::statvfs(state_dir).map_err(|e| StoreError::Io {
                    action: "cannot measure the filesystem of",
                    path: state_dir.display().to_string(),
                    source: e.into(),
                })?;
                fs.blocks() as u64 * fs.fragment_size() as u64 / GIB
            }
        };
        Ok(DiskBudget {
            capacity_gib,
            disks: Mutex::default(),
        })
    }

    fn disks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.disks.lock().expect("disk budget lock")
    }

    /// Books VM `vm`'s disk of `gib`, if the disks still fit.
    pub fn book(&self, vm: &str, gib: u32) -> Result<(), HostError> {
        let mut disks = self.disks();
        let used: u64 = disks.iter().filter(|(n, _)| *n != vm).map(|(_, g)| g).sum();
        let free = self.capacity_gib.saturating_sub(used);
        if u64::from(gib) > free {
            return Err(HostError::NoRoom(format!(
                "disk room exceeded: VM '{vm}' needs a {gib} GiB disk, but only {free} of {} GiB is free for disks here",
                self.capacity_gib
            )));
        }
        disks.insert(vm.to_string(), u64::from(gib));
        Ok(())
    }

    /// Books a disk that exists already, whether or not it fits.
    pub fn adopt(&self, vm: &str, gib: u32) {
        self.disks().insert(vm.to_string(), u64::from(gib));
    }

    pub fn release(&self, vm: &str) {
        self.disks().remove(vm);
    }

    /// (booked, capacity) in GiB.
    pub fn totals(&self) -> (u64, u64) {
        (self.disks().values().sum(), self.capacity_gib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_booked_whole_against_the_budget_and_a_refusal_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let budget = DiskBudget::new(Some(10), dir.path()).unwrap();
        budget.book("a", 6).unwrap();
        let refusal = budget.book("b", 5).unwrap_err().to_string();
        assert!(refusal.contains("only 4 of 10 GiB"), "{refusal}");
        budget.book("b", 4).unwrap();
        // Booking a VM again replaces its own disk, not adds to it.
        budget.book("a", 6).unwrap();
        assert_eq!(budget.totals(), (10, 10));
        budget.release("a");
        budget.adopt("c", 20);
        assert_eq!(budget.totals(), (24, 10));
        assert!(budget.book("d", 1).is_err());
    }

    #[test]
    fn without_a_setting_the_budget_is_the_filesystems_size() {
        let dir = tempfile::tempdir().unwrap();
        let budget = DiskBudget::new(None, dir.path()).unwrap();
        assert!(budget.totals().1 > 0);
    }
}
