//! Admission: the host ledger, the single authority for this host's capacity. Local VMs
//! book into it; other hosts lease from it. Every grant, commit, release and expiry of a
//! lease is persisted before it is answered, and undone if it cannot be, so a restart
//! forgets none and finds none that was never answered.

use crate::disks::DiskBudget;
use crate::error::{error_chain, now_ms, HostError};
use crate::store::{Store, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vmhost_api::Resources;
use vmhost_capacity::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::{LeaseId, Ledger, LedgerError};

pub struct Admission {
    ledger: Mutex<Ledger>,
    /// The VMs' disks, booked apart: leases and resizes never involve them.
    pub disks: DiskBudget,
    store: Arc<Store>,
    /// Set while the host drains: no new VM, arrival or lease.
    closed: AtomicBool,
}

/// What the ledger holds, for the host's view.
pub struct Totals {
    pub capacity: Resources,
    pub allocated: Resources,
    pub leased: Resources,
}

impl Admission {
    /// The ledger of `capacity`, with the leases granted before a restart.
    pub fn open(
        capacity: Resources,
        disks: DiskBudget,
        store: Arc<Store>,
    ) -> Result<Admission, StoreError> {
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
            disks,
            store,
            closed: AtomicBool::new(false),
        })
    }

    /// Closes the host to new VMs, arrivals and leases (a drain), or opens it again. VMs
    /// here still resize, and leases already granted are still honoured until they end.
    pub fn close(&self, closed: bool) {
        self.closed.store(closed, Ordering::SeqCst);
    }

    fn refuse_if_closed(&self, what: &str) -> Result<(), HostError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(HostError::NoRoom(format!(
                "this host is draining; it takes no {what}"
            )));
        }
        Ok(())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger lock poisoned")
    }

    /// Books `size` for a VM, if it fits.
    pub fn set(&self, vm: &str, size: Resources) -> Result<(), LedgerError> {
        self.ledger().set(vm, size)
    }

    /// Books what a VM holds whether or not it fits (it runs already); true if the host is
    /// now over capacity. A lease still held for it is used up: the VM is here.
    pub fn adopt(&self, vm: &str, size: Resources) -> bool {
        let over = self.ledger().adopt(vm, size);
        let _ = self.change(
            |ledger| {
                let stale: Vec<LeaseId> = ledger
                    .leases()
                    .filter(|l| l.vm == vm)
                    .map(|l| l.id)
                    .collect();
                for id in &stale {
                    ledger.release_lease(*id);
                }
                !stale.is_empty()
            },
            |dropped| *dropped,
        );
        over
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
        self.refuse_if_closed("new VMs")?;
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
        self.change(
            |ledger| {
                check_lease(ledger, id, vm, size, holder)?;
                ledger.commit(id, now_ms())?;
                Ok(())
            },
            |committed: &Result<(), HostError>| committed.is_ok(),
        )?
    }

    /// Checks that the claimed lease is held by its claimant for VM `vm` of `size`.
    pub fn check_lease(
        &self,
        claim: LeaseClaim<'_>,
        vm: &str,
        size: Resources,
    ) -> Result<(), HostError> {
        self.refuse_if_closed("arriving VMs")?;
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
        let _ = self.change(
            |ledger| ledger.release_lease(id).is_some(),
            |released| *released,
        );
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
        if let (LeaseRequest::Reserve { .. }, Err(refusal)) =
            (&request, self.refuse_if_closed("leases"))
        {
            return LeaseResponse::Refused {
                reason: refusal.to_string(),
                free: Resources::default(),
            };
        }
        let served = self.change(
            |ledger| lease::serve(ledger, holder, request, now_ms()),
            |response| {
                matches!(
                    response,
                    LeaseResponse::Granted(_)
                        | LeaseResponse::Renewed(_)
                        | LeaseResponse::Committed(_)
                        | LeaseResponse::Released
                )
            },
        );
        let response = served.unwrap_or_else(|error| LeaseResponse::Refused {
            reason: format!("this host cannot save its leases, so it changes none: {error}"),
            free: Resources::default(),
        });
        match &response {
            LeaseResponse::Granted(l) => {
                tracing::info!(lease = l.id, vm = %l.vm, holder = %l.holder, size = %l.resources, "lease granted")
            }
            LeaseResponse::Refused { reason, .. } => tracing::info!(%reason, "lease refused"),
            _ => {}
        }
        response
    }

    /// Drops leases whose holder stopped renewing them.
    pub fn expire_leases(&self) {
        let expired = self.change(|ledger| ledger.expire(now_ms()), |e| !e.is_empty());
        for lease in expired.unwrap_or_default() {
            tracing::warn!(lease = lease.id, vm = %lease.vm, holder = %lease.holder, size = %lease.resources, "lease expired: its holder neither committed nor released it");
        }
    }

    /// Applies a change to the leases and saves it before anyone hears of it. If the save
    /// fails the change is undone, so that what this host answers is what a restart finds.
    fn change<T>(
        &self,
        apply: impl FnOnce(&mut Ledger) -> T,
        changed: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError> {
        let mut ledger = self.ledger();
        let before = ledger.clone();
        let result = apply(&mut ledger);
        if changed(&result) {
            if let Err(error) = self.store.save_leases(&ledger) {
                *ledger = before;
                tracing::error!(error = %error_chain(&error), "cannot save the leases; the change is undone");
                return Err(error);
            }
        }
        Ok(result)
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

#[cfg(test)]
mod tests {
    use crate::testing::{TestHost, SOURCE};
    use vmhost_api::Resources;
    use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
    use vmm::Accel;

    const GIB: Resources = Resources {
        vcpus: 1,
        memory_bytes: 1 << 30,
    };

    fn reserve(host: &TestHost, vm: &str) -> LeaseResponse {
        let request = LeaseRequest::Reserve {
            vm: vm.into(),
            holder: SOURCE.into(),
            resources: GIB,
            ttl_ms: 60_000,
        };
        host.host.admission.serve_lease(SOURCE, request)
    }

    #[tokio::test]
    async fn a_lease_change_that_cannot_be_saved_is_undone_and_not_answered_as_done() {
        let host = TestHost::new("host-b", Accel::Kvm).await;
        let LeaseResponse::Granted(kept) = reserve(&host, "kept") else {
            panic!("no lease");
        };
        // The save writes leases.tmp first; a folder in its place makes every save fail.
        let blocker = host.host.config.state_dir.join("leases.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let LeaseResponse::Refused { reason, .. } = reserve(&host, "new") else {
            panic!("a lease was granted that a restart would not know");
        };
        assert!(reason.contains("cannot save"), "{reason}");
        let release = LeaseRequest::Release { id: kept.id };
        let answer = host.host.admission.serve_lease(SOURCE, release);
        assert!(
            matches!(answer, LeaseResponse::Refused { .. }),
            "{answer:?}"
        );
        let mut create = TestHost::request("kept", 1, 1, None);
        create.lease = Some(kept.id);
        assert!(host
            .host
            .create(create.clone(), Some(SOURCE))
            .await
            .is_err());
        assert_eq!(
            host.host.admission.totals().leased,
            GIB,
            "the ledger changed"
        );

        std::fs::remove_dir(&blocker).unwrap();
        let host = host.restart().await;
        assert_eq!(host.host.admission.totals().leased, GIB);
        host.host.create(create, Some(SOURCE)).await.unwrap();
        assert_eq!(host.host.admission.totals().leased, Resources::default());
    }

    #[tokio::test]
    async fn a_vm_that_runs_here_uses_up_a_lease_still_held_for_it() {
        let host = TestHost::new("host-b", Accel::Kvm).await;
        assert!(matches!(reserve(&host, "m"), LeaseResponse::Granted(_)));
        host.host.admission.adopt("m", GIB);
        let totals = host.host.admission.totals();
        assert_eq!(
            (totals.allocated, totals.leased),
            (GIB, Resources::default())
        );
        let host = host.restart().await;
        assert_eq!(host.host.admission.totals().leased, Resources::default());
    }
}
