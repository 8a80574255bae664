//! What the endpoint tests share: loopback addresses and a host that grants leases.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use vmhost_api::Resources;
use vmhost_capacity::lease;
use vmhost_capacity::ledger::Ledger;
use vmhost_gossip::quic::{answer, FleetEndpoint, FleetRequest, FleetResponse, Peer};
use vmhost_pki::Identity;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn any_port() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 0)
}

/// A host speaking `versions` that grants leases from its ledger to whoever its endpoint
/// authenticated, answers anything else with a pong, and records who asked.
// Each test binary reads the part it checks.
#[allow(dead_code)]
pub struct Granter {
    pub endpoint: FleetEndpoint,
    pub ledger: Arc<Mutex<Ledger>>,
    pub askers: Arc<Mutex<Vec<Peer>>>,
}

pub fn granter(identity: &Identity, versions: &[u32]) -> Granter {
    let endpoint = FleetEndpoint::bind_with_versions(any_port(), identity, versions).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::new(Resources {
        vcpus: 4,
        memory_bytes: 4 << 30,
    })));
    let askers = Arc::new(Mutex::new(Vec::new()));
    let (served, seen) = (ledger.clone(), askers.clone());
    endpoint.serve_peers(Arc::new(move |peer, request| {
        let response = match request {
            FleetRequest::Lease(request) => FleetResponse::Lease(lease::serve(
                &mut served.lock().unwrap(),
                &peer.name,
                request,
                0,
            )),
            _ => FleetResponse::Pong,
        };
        seen.lock().unwrap().push(peer);
        answer(response)
    }));
    Granter {
        endpoint,
        ledger,
        askers,
    }
}
