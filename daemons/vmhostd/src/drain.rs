//! This host's drain: the operator's order, kept across restarts, and the report of where
//! each VM's move stands. While the host drains, admission takes no placements and no
//! arrivals, and gossip says so; `fleet::drain` does the moving.

use crate::error::HostError;
use crate::host::Host;
use std::collections::BTreeMap;
use vmhost_api::{DrainHost, DrainPhase, DrainReport, DrainVm, VmMove, MAX_DRAIN_PARALLEL};

impl Host {
    /// Starts draining this host (or changes the order of a drain under way).
    pub fn drain(&self, order: DrainHost) -> Result<DrainReport, HostError> {
        if self.config.fleet.is_none() {
            return Err(HostError::Invalid(
                "this host is not part of a fleet ([fleet] is not in its config); there is nowhere to drain it to".into(),
            ));
        }
        if !(1..=MAX_DRAIN_PARALLEL).contains(&order.parallel) {
            return Err(HostError::Invalid(format!(
                "--parallel must be between 1 and {MAX_DRAIN_PARALLEL}, not {}",
                order.parallel
            )));
        }
        self.store.save_drain(Some(&order))?;
        self.begin_drain(order.clone());
        tracing::info!(
            cold = order.cold,
            parallel = order.parallel,
            "draining this host"
        );
        Ok(self.drain_report())
    }

    /// Takes the order in force (from the operator, or saved before a restart).
    pub fn begin_drain(&self, order: DrainHost) {
        self.admission.close(true);
        self.drain.begin(order);
    }

    /// Ends the drain: the host takes VMs again. Moves under way finish.
    pub fn undrain(&self) -> Result<DrainReport, HostError> {
        self.store.save_drain(None)?;
        let report = self.drain_report();
        self.drain.end();
        self.admission.close(false);
        tracing::info!("no longer draining this host");
        Ok(DrainReport {
            phase: None,
            order: None,
            ..report
        })
    }

    pub fn drain_phase(&self) -> Option<DrainPhase> {
        self.drain.is_draining().then(|| {
            if self.vms.len() == 0 {
                DrainPhase::Drained
            } else {
                DrainPhase::Draining
            }
        })
    }

    /// Every VM the drain has moved or tried to, and those still here that it has not
    /// reached yet.
    pub fn drain_report(&self) -> DrainReport {
        let phase = self.drain_phase();
        let mut vms: BTreeMap<String, DrainVm> = BTreeMap::new();
        if phase.is_some() {
            for slot in self.vms.all() {
                let name = slot.record().spec.name.clone();
                let waiting = DrainVm {
                    name: name.clone(),
                    state: VmMove::Waiting,
                    attempts: 0,
                };
                vms.insert(name, waiting);
            }
        }
        for moved in self.drain.moves() {
            vms.insert(moved.name.clone(), moved);
        }
        DrainReport {
            host: self.name().to_string(),
            phase,
            order: self.drain.order(),
            vms: vms.into_values().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{TestHost, SOURCE};
    use vmhost_api::{DrainHost, DrainPhase, ErrorKind, Resources, VmMove};
    use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
    use vmm::Accel;

    const ORDER: DrainHost = DrainHost {
        cold: false,
        parallel: 1,
    };

    fn reserve(host: &TestHost, vm: &str) -> LeaseResponse {
        let request = LeaseRequest::Reserve {
            vm: vm.into(),
            holder: SOURCE.into(),
            resources: Resources {
                vcpus: 1,
                memory_bytes: 1 << 30,
            },
            ttl_ms: 60_000,
        };
        host.host.admission.serve_lease(SOURCE, request)
    }

    async fn create_refusal(host: &TestHost, vm: &str) -> vmhost_api::ApiError {
        let request = TestHost::request(vm, 1, 1, None);
        host.host.create(request, None).await.unwrap_err().into()
    }

    #[tokio::test]
    async fn a_draining_host_takes_no_new_vm_and_no_lease_even_after_a_restart() {
        let host = TestHost::new("host-b", Accel::Kvm).await;
        host.create("a", 1, 1).await;
        let report = host.host.drain(ORDER).unwrap();
        assert_eq!(report.phase, Some(DrainPhase::Draining));
        assert_eq!(report.vms.len(), 1);
        assert_eq!(report.vms[0].state, VmMove::Waiting);

        let refusal = create_refusal(&host, "b").await;
        assert_eq!(refusal.kind, ErrorKind::CapacityExceeded);
        assert!(refusal.message.contains("draining"), "{refusal}");
        let LeaseResponse::Refused { reason, .. } = reserve(&host, "c") else {
            panic!("a draining host granted a lease");
        };
        assert!(reason.contains("draining"), "{reason}");

        let host = host.restart().await;
        assert_eq!(host.host.drain_phase(), Some(DrainPhase::Draining));
        assert!(create_refusal(&host, "b")
            .await
            .message
            .contains("draining"));
        host.host.delete("a").await.unwrap();
        assert_eq!(host.host.drain_phase(), Some(DrainPhase::Drained));

        assert_eq!(host.host.undrain().unwrap().phase, None);
        assert!(matches!(reserve(&host, "c"), LeaseResponse::Granted(_)));
        host.create("b", 1, 1).await;
        let host = host.restart().await;
        assert_eq!(host.host.drain_phase(), None);
    }

    #[tokio::test]
    async fn an_arrival_under_a_lease_granted_before_the_drain_is_refused() {
        let host = TestHost::new("host-b", Accel::Kvm).await;
        let LeaseResponse::Granted(lease) = reserve(&host, "m") else {
            panic!("no lease");
        };
        host.host.drain(ORDER).unwrap();
        let mut create = TestHost::request("m", 1, 1, None);
        create.lease = Some(lease.id);
        let error = host
            .host
            .prepare_cold_arrival(create, None, SOURCE)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("draining"), "{error}");
        assert_eq!(host.state("m"), None);
    }

    #[tokio::test]
    async fn a_drain_order_out_of_bounds_is_refused_and_changes_nothing() {
        let host = TestHost::new("host-b", Accel::Kvm).await;
        for parallel in [0, vmhost_api::MAX_DRAIN_PARALLEL + 1] {
            let error = host
                .host
                .drain(DrainHost {
                    cold: true,
                    parallel,
                })
                .unwrap_err();
            assert!(error.to_string().contains("--parallel"), "{error}");
        }
        assert_eq!(host.host.drain_phase(), None);
        assert!(matches!(reserve(&host, "c"), LeaseResponse::Granted(_)));
    }
}
