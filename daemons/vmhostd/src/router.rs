//! Who may ask what, decided in one place. Operators reach this host through the local
//! socket (`api`); other hosts through the fleet endpoint (`fleet`), either forwarding an
//! operator's request about this host's own VMs or asking their own (the target's side of
//! a migration). An operator cannot send a peer's request: it does not parse as one.

use crate::error::HostError;
use crate::fleet::Fleet;
use crate::host::Host;
use std::sync::Arc;
use vmhost_api::{
    ApiError, ErrorKind, PeerCall, PeerEnvelope, PeerRequest, Reply, Request, PEER_API_VERSION,
    PEER_API_VERSION_MIN,
};
use vmhost_gossip::quic::Peer;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, message)
}

/// An operator's request on the local socket (a streamed one, `Migrate` or followed
/// `Events`, is served by `api` itself).
pub async fn from_operator(
    host: &Arc<Host>,
    fleet: Option<&Arc<Fleet>>,
    request: Request,
) -> Result<Reply, ApiError> {
    match (fleet, request) {
        (_, Request::Migrate(_)) => Err(invalid(
            "a migration reports its progress as it goes; it needs a streaming connection",
        )),
        (Some(fleet), Request::Create(create)) => fleet.create(create).await,
        (Some(fleet), Request::FleetList) => Ok(fleet.list().await),
        (Some(fleet), Request::Hosts) => Ok(fleet.hosts().await),
        (
            _,
            Request::OnHost {
                host: name,
                request,
            },
        ) if name == host.name() => {
            forwardable(&request).map_err(invalid)?;
            on_this_host(host, *request, None).await
        }
        (
            Some(fleet),
            Request::OnHost {
                host: name,
                request,
            },
        ) => {
            forwardable(&request).map_err(invalid)?;
            fleet.on_host(&name, *request).await
        }
        (None, Request::FleetList) => Ok(Reply::FleetVms {
            vms: host.list(),
            unreachable: Vec::new(),
        }),
        (None, request) if request.fans_out() => Err(invalid(
            "this host is not part of a fleet ([fleet] is not in its config)",
        )),
        (_, request) => on_this_host(host, request, None).await,
    }
}

/// What the fleet endpoint runs for peers.
pub fn peer_calls(host: Arc<Host>) -> crate::fleet::PeerCalls {
    Arc::new(move |peer, envelope| Box::pin(from_peer(host.clone(), peer, envelope)))
}

/// A call from another host of the fleet, in a version this host still speaks.
async fn from_peer(host: Arc<Host>, peer: Peer, envelope: PeerEnvelope) -> Result<Reply, ApiError> {
    if !(PEER_API_VERSION_MIN..=PEER_API_VERSION).contains(&envelope.version) {
        return Err(invalid(format!(
            "host '{}' sent a version {} request; this host speaks {PEER_API_VERSION_MIN} to {PEER_API_VERSION}",
            peer.name, envelope.version
        )));
    }
    tracing::debug!(peer = %peer.name, version = envelope.version, call = ?envelope.call, "peer request");
    let vm = |info| Reply::Vm(Box::new(info));
    match envelope.call {
        PeerCall::Forwarded(request) => {
            forwardable(&request).map_err(invalid)?;
            let trusted = host
                .config
                .fleet
                .as_ref()
                .is_some_and(|f| f.trust_forwarded_commands);
            if changes_vms(&request) && !under_lease(&request) {
                if !trusted {
                    return Err(ApiError::new(
                        ErrorKind::Refused,
                        format!(
                            "host '{}' takes no commands that change VMs from other hosts \
                             ([fleet] trust_forwarded_commands = false); run vmctl there",
                            host.name()
                        ),
                    ));
                }
                tracing::info!(origin = %peer.name, ?request, "running a command forwarded by another host");
            }
            on_this_host(&host, request, Some(&peer.name)).await
        }
        PeerCall::Peer(PeerRequest::MigrateIn(incoming)) => host
            .prepare_arrival(*incoming, &peer.name)
            .await
            .map(vm)
            .map_err(Into::into),
        PeerCall::Peer(PeerRequest::MigrateRecover { name }) => host
            .recover_arrival(&name, &peer.name)
            .await
            .map(vm)
            .map_err(Into::into),
        PeerCall::Peer(PeerRequest::ColdArrive {
            vm: create,
            disk_tunnel,
        }) => host
            .prepare_cold_arrival(create, disk_tunnel, &peer.name)
            .await
            .map(vm)
            .map_err(Into::into),
        PeerCall::Peer(PeerRequest::ColdStart { name }) => host
            .finish_cold_arrival(&name, &peer.name)
            .await
            .map(vm)
            .map_err(Into::into),
        PeerCall::Peer(PeerRequest::ColdAbandon { name }) => host
            .abandon_cold_arrival(&name, &peer.name)
            .map(|()| Reply::Deleted { name })
            .map_err(Into::into),
    }
}

/// Whether a request changes VMs (as opposed to reading).
fn changes_vms(request: &Request) -> bool {
    !matches!(
        request,
        Request::List
            | Request::Show { .. }
            | Request::Host
            | Request::Events { .. }
            | Request::DrainStatus
            | Request::Compute {
                action: vmhost_api::ComputeAction::Status,
                ..
            }
    )
}

/// A create under a lease: a placement by the lease's holder, checked against the lease.
fn under_lease(request: &Request) -> bool {
    matches!(request, Request::Create(create) if create.lease.is_some())
}

/// What may be run on another host for an operator: requests about that host's own VMs,
/// nothing that fans out again or streams.
fn forwardable(request: &Request) -> Result<(), &'static str> {
    match request {
        Request::OnHost { .. } | Request::FleetList | Request::Hosts => {
            Err("fleet-wide requests cannot be run on another host")
        }
        Request::Migrate(_) => {
            Err("a migration is run on the VM's own host: vmctl there, without --host")
        }
        Request::Events { follow: true, .. } => {
            Err("events cannot be followed on another host; run vmctl there")
        }
        _ => Ok(()),
    }
}

/// A request about this host's own VMs, from an operator here or from the peer `from`.
pub async fn on_this_host(
    host: &Arc<Host>,
    request: Request,
    from: Option<&str>,
) -> Result<Reply, ApiError> {
    let vm = |info| Reply::Vm(Box::new(info));
    let reply = match request {
        Request::Create(create) => host.create(create, from).await.map(vm),
        Request::List => Ok(Reply::Vms(host.list())),
        Request::Show { name } => host.show(&name).await.map(vm),
        Request::Scale { name, cu, force } => host.scale(&name, cu, force).await.map(vm),
        Request::Stop { name } => host.stop(&name).await.map(vm),
        Request::Start { name } => host.start(&name).await.map(vm),
        Request::Delete { name } => host.delete(&name).await.map(|()| Reply::Deleted { name }),
        Request::Host => Ok(Reply::Host(host.host_info())),
        Request::Bounds {
            name,
            min_cu,
            max_cu,
        } => host.bounds(&name, min_cu, max_cu).await.map(vm),
        Request::Events { name, .. } => match &name {
            Some(vm) => host.slot(vm).map(|_| ()),
            None => Ok(()),
        }
        .map(|()| Reply::Events(host.events.snapshot(name.as_deref()).0)),
        Request::Drain(order) => {
            if let Some(origin) = from {
                tracing::info!(%origin, ?order, "drain ordered through another host");
            }
            host.drain(order).map(Reply::Drain)
        }
        Request::Undrain => host.undrain().map(Reply::Drain),
        Request::DrainStatus => Ok(Reply::Drain(host.drain_report())),
        Request::Compute { name, action } => host.compute(&name, action).await,
        Request::FleetList | Request::Hosts | Request::OnHost { .. } | Request::Migrate(_) => {
            Err(HostError::Invalid(
                "this request involves other hosts; it is not run on one host".into(),
            ))
        }
    };
    reply.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestHost;

    fn peer(version: u32) -> Peer {
        Peer {
            name: "host-b".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            version,
        }
    }

    #[tokio::test]
    async fn a_previous_version_peer_is_served_and_an_unknown_version_refused() {
        let host = TestHost::new("host-a", vmm::Accel::Kvm).await;
        host.create("a", 1, 1).await;
        let calls = peer_calls(host.host.clone());
        let show = |version| PeerEnvelope {
            version,
            call: PeerCall::Forwarded(Request::Show { name: "a".into() }),
        };
        let reply = calls(peer(1), show(PEER_API_VERSION_MIN)).await.unwrap();
        assert!(matches!(reply, Reply::Vm(vm) if vm.name == "a"));
        assert!(calls(peer(2), show(PEER_API_VERSION)).await.is_ok());
        let error = calls(peer(2), show(PEER_API_VERSION + 1))
            .await
            .unwrap_err();
        assert!(error.message.contains("version"), "{}", error.message);
        let fan_out = PeerEnvelope {
            version: PEER_API_VERSION,
            call: PeerCall::Forwarded(Request::Hosts),
        };
        assert_eq!(
            calls(peer(2), fan_out).await.unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }

    fn forwarded(request: Request) -> PeerEnvelope {
        PeerEnvelope {
            version: PEER_API_VERSION,
            call: PeerCall::Forwarded(request),
        }
    }

    #[tokio::test]
    async fn a_peer_places_a_vm_only_under_a_lease_of_its_own() {
        let host = TestHost::new("host-a", vmm::Accel::Kvm).await;
        let size = host.host.config.cu_shape().resources(crate::testing::cu(1));
        let lease = host.lease("a", size);
        let calls = peer_calls(host.host.clone());
        let mut create = TestHost::request("a", 1, 1, None);
        create.lease = Some(lease);
        let mut stranger = peer(2);
        stranger.name = "host-c".into();
        let refused = calls(stranger, forwarded(Request::Create(create.clone())))
            .await
            .unwrap_err();
        assert!(refused.message.contains("lease"), "{}", refused.message);
        assert!(host.state("a").is_none());
        let mut holder = peer(2);
        holder.name = crate::testing::SOURCE.into();
        calls(holder, forwarded(Request::Create(create)))
            .await
            .unwrap();
        assert_eq!(host.state("a"), Some(vmhost_api::VmState::Running));
    }

    #[tokio::test]
    async fn an_untrusting_host_refuses_forwarded_changes_but_answers_queries() {
        let mut host = TestHost::new("host-a", vmm::Accel::Kvm).await;
        host.create("a", 1, 1).await;
        let untrusting = {
            let mut config = host.host.config.clone();
            config.fleet.as_mut().unwrap().trust_forwarded_commands = false;
            config
        };
        host = host.restart_with(untrusting).await;
        let calls = peer_calls(host.host.clone());
        let stop = calls(peer(2), forwarded(Request::Stop { name: "a".into() }))
            .await
            .unwrap_err();
        assert_eq!(stop.kind, ErrorKind::Refused, "{}", stop.message);
        assert_eq!(host.state("a"), Some(vmhost_api::VmState::Running));
        assert!(
            calls(peer(2), forwarded(Request::Show { name: "a".into() }))
                .await
                .is_ok()
        );
    }

    #[test]
    fn fan_out_and_streams_are_not_forwarded() {
        let show = Request::Show { name: "a".into() };
        assert!(forwardable(&show).is_ok());
        for refused in [
            Request::FleetList,
            Request::Hosts,
            Request::OnHost {
                host: "b".into(),
                request: Box::new(show.clone()),
            },
            Request::Events {
                name: None,
                follow: true,
            },
        ] {
            assert!(forwardable(&refused).is_err(), "{refused:?} forwarded");
        }
    }
}
