//! A granter host as vmhostd runs one: the ledger in memory, the leases saved to disk after
//! every change, local VMs that autoscale against the same ledger, and VMs that keep running
//! while the daemon is down (QEMU outlives vmhostd).

use crate::rng::Rng;
use std::collections::BTreeMap;
use vmhost_api::Resources;
use vmhost_capacity::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::{LeaseId, Ledger};

pub const GIB: u64 = 1 << 30;
const LOCAL_VMS: usize = 2;

/// What a granter does when saving its ledger fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Glue {
    /// Undo the change and refuse: a holder is never told what a restart would forget.
    RollBack,
    /// Log the failure and answer as if saved.
    AnswerAnyway,
}

/// Why a granter refused when its save failed.
pub const UNSAVED: &str = "cannot save the ledger";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Owner {
    Local,
    Holder(usize),
}

/// A VM that runs on this host, whatever the daemon remembers.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    pub size: Resources,
    pub owner: Owner,
}

pub struct Granter {
    pub capacity: Resources,
    /// `None` while the daemon is down.
    ledger: Option<Ledger>,
    /// The ledger as last saved successfully.
    persisted: Vec<u8>,
    running: BTreeMap<String, Running>,
    locals: Vec<String>,
    /// Whether anything changed since the last check; an unchanged host stays valid, as
    /// leases only expire with time.
    changed: bool,
}

/// One request served, for the caller to count and answer.
pub struct Served {
    pub request: LeaseRequest,
    pub response: LeaseResponse,
    pub save_failed: bool,
    pub expired: usize,
}

impl Granter {
    pub fn new(index: usize, rng: &mut Rng) -> Granter {
        let capacity = Resources {
            vcpus: 2 + rng.below(14) as u32,
            memory_bytes: (2 + rng.below(30)) * GIB,
        };
        let mut ledger = Ledger::new(capacity);
        let locals: Vec<String> = (0..LOCAL_VMS)
            .map(|j| format!("h{index}-local{j}"))
            .collect();
        let mut running = BTreeMap::new();
        for vm in &locals {
            let size = local_size(capacity, rng);
            ledger
                .set(vm, size)
                .expect("each local VM fits in its share");
            let owner = Owner::Local;
            running.insert(vm.clone(), Running { size, owner });
        }
        Granter {
            capacity,
            persisted: lease::encode(&ledger),
            ledger: Some(ledger),
            running,
            locals,
            changed: true,
        }
    }

    pub fn is_up(&self) -> bool {
        self.ledger.is_some()
    }

    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    pub fn running(&self) -> &BTreeMap<String, Running> {
        &self.running
    }

    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// `lease::serve` wrapped the way the daemon wraps it: what changes a lease is saved
    /// before the answer leaves (`glue` says what a failed save does), and a commit starts
    /// the VM.
    pub fn serve(
        &mut self,
        holder: usize,
        bytes: &[u8],
        now: u64,
        saves: bool,
        glue: Glue,
    ) -> Served {
        self.changed = true;
        let ledger = self.ledger.as_mut().expect("served only while up");
        let request = lease::decode_request(bytes).expect("holders send well-formed requests");
        let before = ledger.clone();
        let stale: Vec<LeaseId> = ledger
            .leases()
            .filter(|l| l.expires_at_ms <= now)
            .map(|l| l.id)
            .collect();
        let name = format!("holder{holder}");
        let mut response = lease::serve(ledger, &name, request.clone(), now);
        let to_save = matches!(
            response,
            LeaseResponse::Granted(_)
                | LeaseResponse::Renewed(_)
                | LeaseResponse::Committed(_)
                | LeaseResponse::Released
        );
        let save_failed = to_save && !saves;
        if save_failed && glue == Glue::RollBack {
            *ledger = before;
            response = LeaseResponse::Refused {
                reason: UNSAVED.into(),
                free: ledger.free(),
            };
        }
        let expired = stale
            .iter()
            .filter(|id| !ledger.leases().any(|l| l.id == **id))
            .count();
        if to_save && saves {
            self.persisted = lease::encode(&*ledger);
        }
        if let LeaseResponse::Committed(lease) = &response {
            let owner = Owner::Holder(holder);
            let size = lease.resources;
            self.running
                .entry(lease.vm.clone())
                .or_insert(Running { size, owner });
        }
        Served {
            request,
            response,
            save_failed,
            expired,
        }
    }

    /// The daemon's periodic expiry; returns how many leases ended.
    pub fn expire(&mut self, now: u64, saves: bool) -> usize {
        self.changed = true;
        let ledger = self.ledger.as_mut().expect("expires only while up");
        let expired = ledger.expire(now).len();
        // An expired lease that a restart brings back is dropped again at the next expiry.
        if expired > 0 && saves {
            self.persisted = lease::encode(&*ledger);
        }
        expired
    }

    pub fn crash(&mut self) {
        self.changed = true;
        self.ledger = None;
    }

    /// Restarts the daemon as vmhostd does: the saved leases, then what actually runs
    /// booked again. Returns how many placed VMs were booked again.
    pub fn restart(&mut self) -> usize {
        self.changed = true;
        let saved: Ledger = postcard::from_bytes(&self.persisted).expect("saved ledger decodes");
        let mut ledger = Ledger::with_leases_from(self.capacity, saved);
        for (vm, running) in &self.running {
            ledger.adopt(vm, running.size);
        }
        self.ledger = Some(ledger);
        self.running
            .values()
            .filter(|r| r.owner != Owner::Local)
            .count()
    }

    /// Resizes one local VM as its autoscaler asks: growth only if the ledger has room.
    /// Returns the VM, its wanted size and whether it was refused.
    pub fn autoscale(&mut self, rng: &mut Rng) -> (String, Resources, bool) {
        self.changed = true;
        let vm = self.locals[rng.below(self.locals.len() as u64) as usize].clone();
        let wanted = local_size(self.capacity, rng);
        let ledger = self.ledger.as_mut().expect("autoscales only while up");
        let refused = ledger.set(&vm, wanted).is_err();
        if !refused {
            self.running
                .get_mut(&vm)
                .expect("local VMs always run")
                .size = wanted;
        }
        (vm, wanted, refused)
    }
}

/// A local VM's size: up to half the host, so the local VMs fit together but leave leases
/// little room when they grow.
fn local_size(capacity: Resources, rng: &mut Rng) -> Resources {
    Resources {
        vcpus: 1 + rng.below(u64::from(capacity.vcpus / 2)) as u32,
        memory_bytes: (1 + rng.below(capacity.memory_bytes / GIB / 2)) * GIB,
    }
}
