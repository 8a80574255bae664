//! The host ledger: the single authority for what this host has given out.
//!
//! Every change of a VM's vCPUs or memory is booked here before it is applied, so the sum
//! of allocations never exceeds capacity. It is pure (no I/O, no clock) so it can be tested
//! exhaustively. Leases for other hosts' reservations are meant to live in this same
//! ledger, counted with allocations against the one capacity.

use std::collections::BTreeMap;
use vmhost_api::Resources;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("host capacity exceeded: {owner} needs {needed} more, but only {free} is free of {capacity}")]
    CapacityExceeded {
        owner: String,
        needed: Resources,
        free: Resources,
        capacity: Resources,
    },
}

#[derive(Debug, Clone)]
pub struct Ledger {
    capacity: Resources,
    allocations: BTreeMap<String, Resources>,
}

impl Ledger {
    pub fn new(capacity: Resources) -> Self {
        Ledger {
            capacity,
            allocations: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> Resources {
        self.capacity
    }

    /// The sum of all allocations.
    pub fn allocated(&self) -> Resources {
        self.allocations
            .values()
            .fold(Resources::default(), |sum, r| Resources {
                vcpus: sum.vcpus + r.vcpus,
                memory_bytes: sum.memory_bytes + r.memory_bytes,
            })
    }

    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.allocated())
    }

    pub fn allocation(&self, owner: &str) -> Resources {
        self.allocations.get(owner).copied().unwrap_or_default()
    }

    /// Sets `owner`'s allocation to `wanted` if the host has room for the increase.
    /// Shrinking always succeeds.
    pub fn set(&mut self, owner: &str, wanted: Resources) -> Result<(), LedgerError> {
        let current = self.allocation(owner);
        let others = self.allocated().saturating_sub(current);
        let fits = others
            .checked_add(wanted)
            .is_some_and(|total| total.fits_in(self.capacity));
        if !fits {
            return Err(LedgerError::CapacityExceeded {
                owner: owner.to_string(),
                needed: wanted.saturating_sub(current),
                free: self.free(),
                capacity: self.capacity,
            });
        }
        self.allocations.insert(owner.to_string(), wanted);
        Ok(())
    }

    /// Books what a VM already holds (found running after a restart) even if it no longer
    /// fits, for example after capacity was lowered in the config. Returns whether the host
    /// is now over capacity, so the caller can warn.
    pub fn adopt(&mut self, owner: &str, holding: Resources) -> bool {
        self.allocations.insert(owner.to_string(), holding);
        !self.allocated().fits_in(self.capacity)
    }

    pub fn release(&mut self, owner: &str) {
        self.allocations.remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(vcpus: u32, gib: u64) -> Resources {
        Resources {
            vcpus,
            memory_bytes: gib << 30,
        }
    }

    #[test]
    fn allocates_until_full_then_refuses() {
        let mut ledger = Ledger::new(r(4, 8));
        ledger.set("a", r(2, 4)).unwrap();
        ledger.set("b", r(2, 4)).unwrap();
        let err = ledger.set("c", r(1, 1)).unwrap_err();
        assert!(matches!(err, LedgerError::CapacityExceeded { free, .. } if free == r(0, 0)));
        assert_eq!(ledger.allocated(), r(4, 8));
        assert_eq!(ledger.allocation("c"), r(0, 0));
    }

    #[test]
    fn either_resource_can_be_the_limit() {
        let mut ledger = Ledger::new(r(8, 4));
        assert!(ledger.set("a", r(1, 5)).is_err());
        assert!(ledger.set("a", r(9, 1)).is_err());
        ledger.set("a", r(8, 4)).unwrap();
    }

    #[test]
    fn resize_counts_only_the_difference() {
        let mut ledger = Ledger::new(r(4, 8));
        ledger.set("a", r(2, 6)).unwrap();
        ledger.set("a", r(4, 8)).unwrap();
        let err = ledger.set("a", r(4, 9)).unwrap_err();
        assert!(matches!(err, LedgerError::CapacityExceeded { needed, .. } if needed == r(0, 1)));
        ledger.set("a", r(1, 1)).unwrap();
        assert_eq!(ledger.free(), r(3, 7));
    }

    #[test]
    fn release_frees_and_adopt_reports_overcommit() {
        let mut ledger = Ledger::new(r(2, 2));
        ledger.set("a", r(2, 2)).unwrap();
        ledger.release("a");
        assert_eq!(ledger.allocated(), r(0, 0));
        assert!(!ledger.adopt("a", r(1, 1)));
        assert!(ledger.adopt("b", r(2, 2)));
        assert_eq!(ledger.allocated(), r(3, 3));
        // Over capacity, nothing may grow until enough is released.
        assert!(ledger.set("a", r(1, 2)).is_err());
    }

    #[test]
    fn never_exceeds_capacity_under_random_operations() {
        // A small deterministic generator: the ledger's invariant must hold for any sequence.
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut ledger = Ledger::new(r(16, 64));
        for _ in 0..10_000 {
            let owner = format!("vm{}", next(10));
            match next(3) {
                0 => ledger.release(&owner),
                _ => {
                    let _ = ledger.set(&owner, r(next(8) as u32, next(24)));
                }
            }
            assert!(ledger.allocated().fits_in(ledger.capacity()));
        }
    }
}
