//! Admission: the host ledger, the single authority for this host's capacity. Local VMs
//! book into it; other hosts lease from it. Every grant, commit, release and expiry of a
//! lease is persisted before it is answered, so a restart forgets none.

use crate::error::{error_chain, now_ms, HostError};
use crate::store::{Store, StoreError};
use std::sync::{Arc, Mutex, MutexGuard};
use vmhost_api::Resources;
use vmhost_capacity::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::{LeaseId, Ledger, LedgerError};

pub struct Admission {
    ledger: Mutex<Ledger>,
    store: Arc<Store>,
}

/// What the ledger holds, for the host's view.
pub struct Totals {
    pub capacity: Resources,
    pub allocated: Resources,
    pub leased: Resources,
}

impl Admission {
    /// The ledger of `capacity`, with the leases granted before a restart.
    pub fn open(capacity: Resources, store: Arc<Store>) -> Result<Admission, StoreError> {
        let saved = match store.load_leases() {
            // Leases live two minutes at most, and a holder whose lease is gone gets a clear
            // refusal; a daemon that cannot start at all would strand every VM instead.
            Err(error @ StoreError::Corrupt { .. }) => {
                let kept = store.set_aside_leases()?;
                tracing::error!(error = %error_chain(&error), kept = %kept.display(), "the saved leases are unreadable; starting without them");
                None
            }
            other => other?,
        };
        let ledger = match saved {
            Some(saved) => {
                let ledger = Ledger::with_leases_from(capacity, saved);
                tracing::info!(
                    leases = ledger.leases().count(),
                    "restored the leases granted before the restart"
                );
                ledger
            }
            None => Ledger::new(capacity),
        };
        Ok(Admission {
            ledger: Mutex::new(ledger),
            store,
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger lock poisoned")
    }

    /// Books `size` for a VM, if it fits.
    pub fn set(&self, vm: &str, size: Resources) -> Result<(), LedgerError> {
        self.ledger().set(vm, size)
    }

    /// Books what a VM holds whether or not it fits (it runs already); true if the host is
    /// now over capacity.
    pub fn adopt(&self, vm: &str, size: Resources) -> bool {
        self.ledger().adopt(vm, size)
    }

    pub fn release(&self, vm: &str) {
        self.ledger().release(vm)
    }

    pub fn totals(&self) -> Totals {
        let ledger = self.ledger();
        Totals {
            capacity: ledger.capacity(),
            allocated: ledger.allocated(),
            leased: ledger.leased(),
        }
    }

    /// Books a new VM: from the lease granted for it when it was placed from another host,
    /// or fresh from the ledger.
    pub fn book_new_vm(
        &self,
        vm: &str,
        size: Resources,
        lease: Option<LeaseId>,
    ) -> Result<(), HostError> {
        let Some(id) = lease else {
            return Ok(self.set(vm, size)?);
        };
        let mut ledger = self.ledger();
        check_lease(&ledger, id, vm, size)?;
        ledger.commit(id, now_ms())?;
        self.persist(&ledger);
        Ok(())
    }

    /// Checks that lease `id` is held for VM `vm` of `size`.
    pub fn check_lease(&self, id: LeaseId, vm: &str, size: Resources) -> Result<(), HostError> {
        check_lease(&self.ledger(), id, vm, size)
    }

    pub fn holds_lease(&self, id: LeaseId) -> bool {
        self.ledger().leases().any(|l| l.id == id)
    }

    /// Turns a migration's lease into the arrived VM's allocation. The guest runs here
    /// whatever the lease says, so if the lease is gone, what it holds is booked anyway.
    pub fn commit_arrival(&self, vm: &str, lease: LeaseId, size: Resources) {
        if let Err(error) = self.book_new_vm(vm, size, Some(lease)) {
            tracing::error!(vm, error = %error_chain(&error), "cannot commit the migration's lease; booking the VM anyway");
            self.adopt(vm, size);
        }
    }

    /// Drops a lease that will not be used.
    pub fn release_lease(&self, id: LeaseId) {
        let mut ledger = self.ledger();
        if ledger.release_lease(id).is_some() {
            self.persist(&ledger);
        }
    }

    /// Answers another host's lease request, and persists the leases before the answer
    /// leaves.
    pub fn serve_lease(&self, request: LeaseRequest) -> LeaseResponse {
        let mut ledger = self.ledger();
        let response = lease::serve(&mut ledger, request, now_ms());
        match &response {
            LeaseResponse::Granted(l) => {
                tracing::info!(lease = l.id, vm = %l.vm, holder = %l.holder, size = %l.resources, "lease granted")
            }
            LeaseResponse::Refused { reason, .. } => tracing::info!(%reason, "lease refused"),
            _ => {}
        }
        if matches!(
            response,
            LeaseResponse::Granted(_)
                | LeaseResponse::Renewed(_)
                | LeaseResponse::Committed(_)
                | LeaseResponse::Released
        ) {
            self.persist(&ledger);
        }
        response
    }

    /// Drops leases whose holder stopped renewing them.
    pub fn expire_leases(&self) {
        let mut ledger = self.ledger();
        let expired = ledger.expire(now_ms());
        for lease in &expired {
            tracing::warn!(lease = lease.id, vm = %lease.vm, holder = %lease.holder, size = %lease.resources, "lease expired: its holder neither committed nor released it");
        }
        if !expired.is_empty() {
            self.persist(&ledger);
        }
    }

    fn persist(&self, ledger: &Ledger) {
        if let Err(error) = self.store.save_leases(ledger) {
            tracing::error!(error = %error_chain(&error), "cannot persist leases; a restart would forget them");
        }
    }
}

fn check_lease(ledger: &Ledger, id: LeaseId, vm: &str, size: Resources) -> Result<(), HostError> {
    let held = ledger
        .leases()
        .find(|l| l.id == id)
        .ok_or(LedgerError::UnknownLease(id))?;
    if held.vm != vm || held.resources != size {
        return Err(HostError::Invalid(format!(
            "lease {id} is for VM '{}' of {}, not '{vm}' of {size}",
            held.vm, held.resources
        )));
    }
    Ok(())
}
