//! The host ledger: the single authority for what this host has given out.
//!
//! Every change of a VM's vCPUs or memory is booked here before it is applied, and every
//! lease granted to another host's reservation is counted here too, so at no instant do
//! allocations plus leases exceed capacity. It is pure (no I/O; the time, in wall-clock
//! milliseconds, is an argument) so it can be tested exhaustively and simulated. It
//! serializes, so a restarted granter keeps its leases and their expiry.

use serde::{Deserialize, Serialize};
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
    #[error("no lease {0} (it expired, was released or never existed)")]
    UnknownLease(LeaseId),
    #[error("VM {0} already has an allocation here")]
    AlreadyAllocated(String),
}

pub type LeaseId = u64;

/// Capacity held for a VM that another host wants to place or move here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub vm: String,
    /// The host that asked; for logs and for releasing a dead holder's leases.
    pub holder: String,
    pub resources: Resources,
    /// Wall-clock milliseconds.
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ledger {
    capacity: Resources,
    allocations: BTreeMap<String, Resources>,
    #[serde(default)]
    leases: BTreeMap<LeaseId, Lease>,
    #[serde(default)]
    next_lease: LeaseId,
    /// Recently committed leases, so a commit retried after a lost reply gets the same
    /// answer instead of "unknown" (which would make the holder place the VM twice).
    #[serde(default)]
    recent_commits: std::collections::VecDeque<Lease>,
}

const RECENT_COMMITS: usize = 4096;

impl Ledger {
    pub fn new(capacity: Resources) -> Self {
        Ledger {
            capacity,
            allocations: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 1,
            recent_commits: std::collections::VecDeque::new(),
        }
    }

    /// A ledger for `capacity` that keeps `saved`'s leases and lease numbering. Allocations
    /// are not taken over: the caller books them again from what actually runs.
    pub fn with_leases_from(capacity: Resources, saved: Ledger) -> Self {
        Ledger {
            capacity,
            allocations: BTreeMap::new(),
            leases: saved.leases,
            next_lease: saved.next_lease.max(1),
            recent_commits: saved.recent_commits,
        }
    }

    /// The sum of all leases.
    pub fn leased(&self) -> Resources {
        sum(self.leases.values().map(|l| l.resources))
    }

    /// Allocations plus leases: what must stay within capacity.
    pub fn committed(&self) -> Resources {
        self.allocated()
            .checked_add(self.leased())
            .unwrap_or(Resources {
                vcpus: u32::MAX,
                memory_bytes: u64::MAX,
            })
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Grants a lease if allocated + leased + request fits, all checked under the caller's
    /// single borrow of the ledger (the atomicity the fleet relies on).
    pub fn reserve(
        &mut self,
        vm: &str,
        holder: &str,
        resources: Resources,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Lease, LedgerError> {
        self.expire(now_ms);
        let fits = self
            .committed()
            .checked_add(resources)
            .is_some_and(|total| total.fits_in(self.capacity));
        if !fits {
            return Err(LedgerError::CapacityExceeded {
                owner: vm.to_string(),
                needed: resources,
                free: self.free(),
                capacity: self.capacity,
            });
        }
        let lease = Lease {
            id: self.next_lease,
            vm: vm.to_string(),
            holder: holder.to_string(),
            resources,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        };
        self.next_lease += 1;
        self.leases.insert(lease.id, lease.clone());
        Ok(lease)
    }

    /// Extends a live lease.
    pub fn renew(&mut self, id: LeaseId, ttl_ms: u64, now_ms: u64) -> Result<Lease, LedgerError> {
        self.expire(now_ms);
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or(LedgerError::UnknownLease(id))?;
        lease.expires_at_ms = now_ms.saturating_add(ttl_ms);
        Ok(lease.clone())
    }

    /// Turns a live lease into the VM's allocation, in one step. Committing the same lease
    /// again answers the same.
    pub fn commit(&mut self, id: LeaseId, now_ms: u64) -> Result<Lease, LedgerError> {
        if let Some(done) = self.committed_lease(id) {
            return Ok(done.clone());
        }
        self.expire(now_ms);
        let lease = self.leases.get(&id).ok_or(LedgerError::UnknownLease(id))?;
        if self.allocations.contains_key(&lease.vm) {
            return Err(LedgerError::AlreadyAllocated(lease.vm.clone()));
        }
        let lease = self.leases.remove(&id).expect("checked above");
        self.allocations.insert(lease.vm.clone(), lease.resources);
        if self.recent_commits.len() == RECENT_COMMITS {
            self.recent_commits.pop_front();
        }
        self.recent_commits.push_back(lease.clone());
        Ok(lease)
    }

    /// A lease this ledger committed recently, if `id` is one.
    pub fn committed_lease(&self, id: LeaseId) -> Option<&Lease> {
        self.recent_commits.iter().find(|l| l.id == id)
    }

    /// Gives a lease back; releasing an unknown lease is not an error (it may have expired).
    pub fn release_lease(&mut self, id: LeaseId) -> Option<Lease> {
        self.leases.remove(&id)
    }

    /// Drops every lease past its expiry; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Lease> {
        let expired: Vec<LeaseId> = self
            .leases
            .values()
            .filter(|l| l.expires_at_ms <= now_ms)
            .map(|l| l.id)
            .collect();
        expired
            .iter()
            .filter_map(|id| self.leases.remove(id))
            .collect()
    }

    pub fn capacity(&self) -> Resources {
        self.capacity
    }

    /// The sum of all allocations.
    pub fn allocated(&self) -> Resources {
        sum(self.allocations.values().copied())
    }

    /// What is neither allocated nor leased.
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.committed())
    }

    /// Every allocation, by owner.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, Resources)> {
        self.allocations
            .iter()
            .map(|(owner, r)| (owner.as_str(), *r))
    }

    pub fn allocation(&self, owner: &str) -> Resources {
        self.allocations.get(owner).copied().unwrap_or_default()
    }

    /// Sets `owner`'s allocation to `wanted` if the host has room for the increase.
    /// Shrinking always succeeds.
    pub fn set(&mut self, owner: &str, wanted: Resources) -> Result<(), LedgerError> {
        let current = self.allocation(owner);
        let others = self.committed().saturating_sub(current);
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
        !self.committed().fits_in(self.capacity)
    }

    pub fn release(&mut self, owner: &str) {
        self.allocations.remove(owner);
    }
}

fn sum(resources: impl Iterator<Item = Resources>) -> Resources {
    resources.fold(Resources::default(), |total, r| Resources {
        vcpus: total.vcpus.saturating_add(r.vcpus),
        memory_bytes: total.memory_bytes.saturating_add(r.memory_bytes),
    })
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
    fn leases_count_against_capacity_with_allocations() {
        let mut ledger = Ledger::new(r(4, 8));
        ledger.set("local", r(2, 4)).unwrap();
        let lease = ledger
            .reserve("remote", "host-b", r(2, 4), 1000, 0)
            .unwrap();
        assert_eq!(ledger.free(), r(0, 0));
        assert!(ledger.reserve("x", "host-c", r(1, 1), 1000, 0).is_err());
        assert!(
            ledger.set("local", r(3, 4)).is_err(),
            "a local upscale may not eat a lease"
        );
        let committed = ledger.commit(lease.id, 500).unwrap();
        assert_eq!(committed.vm, "remote");
        assert_eq!(ledger.allocation("remote"), r(2, 4));
        assert_eq!(ledger.leased(), r(0, 0));
        assert_eq!(
            ledger.commit(lease.id, 600).unwrap(),
            committed,
            "a retried commit gets the same answer"
        );
        assert!(matches!(
            ledger.commit(lease.id + 1, 500),
            Err(LedgerError::UnknownLease(_))
        ));
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let mut ledger = Ledger::new(r(4, 8));
        let a = ledger.reserve("a", "h", r(1, 1), 1000, 0).unwrap();
        let b = ledger.reserve("b", "h", r(1, 1), 1000, 0).unwrap();
        ledger.renew(a.id, 1000, 900).unwrap();
        assert_eq!(ledger.expire(1000).len(), 1, "b expired at 1000");
        assert!(ledger.commit(b.id, 1000).is_err());
        assert!(ledger.renew(b.id, 1000, 1000).is_err());
        assert!(ledger.commit(a.id, 1899).is_ok());
    }

    #[test]
    fn survives_a_round_trip_through_its_persisted_form() {
        let mut ledger = Ledger::new(r(4, 8));
        ledger.set("a", r(1, 1)).unwrap();
        let lease = ledger.reserve("b", "h", r(1, 1), 1000, 0).unwrap();
        let bytes = postcard::to_stdvec(&ledger).unwrap();
        let mut restored: Ledger = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(restored.committed(), r(2, 2));
        assert_eq!(
            restored.reserve("c", "h", r(1, 1), 1000, 0).unwrap().id,
            lease.id + 1
        );
        assert_eq!(restored.expire(1000).len(), 2);
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
            let now = next(10_000);
            match next(6) {
                0 => ledger.release(&owner),
                1 => {
                    let _ =
                        ledger.reserve(&owner, "peer", r(next(4) as u32, next(8)), next(2000), now);
                }
                2 => {
                    let _ = ledger.commit(next(50), now);
                }
                3 => {
                    ledger.release_lease(next(50));
                }
                _ => {
                    let _ = ledger.set(&owner, r(next(8) as u32, next(24)));
                }
            }
            assert!(ledger.committed().fits_in(ledger.capacity()));
        }
    }
}
