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

    /// Books a new VM: from the lease `claim` names, granted for it when another host
    /// placed it here, or fresh from the ledger.
    pub fn book_new_vm(
        &self,
        vm: &str,
        size: Resources,
        claim: Option<LeaseClaim<'_>>,
    ) -> Result<(), HostError> {
        match claim {
            None => Ok(self.set(vm, size)?),
            Some(claim) => self.commit(claim.id, vm, size, Some(claim.holder)),
        }
    }

    fn commit(
        &self,
        id: LeaseId,
        vm: &str,
        size: Resources,
        holder: Option<&str>,
    ) -> Result<(), HostError> {
        let mut ledger = self.ledger();
        check_lease(&ledger, id, vm, size, holder)?;
        ledger.commit(id, now_ms())?;
        self.persist(&ledger);
        Ok(())
    }

    /// Checks that the claimed lease is held by its claimant for VM `vm` of `size`.
    pub fn check_lease(
        &self,
        claim: LeaseClaim<'_>,
        vm: &str,
        size: Resources,
    ) -> Result<(), HostError> {
        check_lease(&self.ledger(), claim.id, vm, size, Some(claim.holder))
    }

    pub fn holds_lease(&self, id: LeaseId) -> bool {
        self.ledger().leases().any(|l| l.id == id)
    }

    /// Turns a migration's lease (checked when the arrival began) into the arrived VM's
    /// allocation. The guest runs here whatever the lease says, so if the lease is gone,
    /// what it holds is booked anyway.
    pub fn commit_arrival(&self, vm: &str, lease: LeaseId, size: Resources) {
        if let Err(error) = self.commit(lease, vm, size, None) {
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

    /// Answers the lease request of `holder`, a host its certificate names, and persists
    /// the leases before the answer leaves. Only this host commits its leases, when the VM
    /// they are for arrives.
    pub fn serve_lease(&self, holder: &str, request: LeaseRequest) -> LeaseResponse {
        if let LeaseRequest::Commit { .. } = request {
            return LeaseResponse::Invalid {
                reason: "a lease is committed by the host that granted it, when its VM arrives"
                    .into(),
            };
        }
        let mut ledger = self.ledger();
        let response = lease::serve(&mut ledger, holder, request, now_ms());
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

/// A lease another host says it holds.
#[derive(Debug, Clone, Copy)]
pub struct LeaseClaim<'a> {
    pub id: LeaseId,
    /// The claimant, as its certificate names it.
    pub holder: &'a str,
}

fn check_lease(
    ledger: &Ledger,
    id: LeaseId,
    vm: &str,
    size: Resources,
    holder: Option<&str>,
) -> Result<(), HostError> {
    // Someone else's lease is as unknown to a claimant as one never granted.
    let held = ledger
        .leases()
        .find(|l| l.id == id && holder.is_none_or(|h| l.holder == h))
        .ok_or(LedgerError::UnknownLease(id))?;
    if held.vm != vm || held.resources != size {
        return Err(HostError::Invalid(format!(
            "lease {id} is for VM '{}' of {}, not '{vm}' of {size}",
            held.vm, held.resources
        )));
    }
    Ok(())
}
