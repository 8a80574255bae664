//! The fleet endpoint on loopback: mutual TLS with the fleet CA, lease requests over it,
//! and what it does with strangers and garbage.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vmhost_api::Resources;
use vmhost_gossip::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_gossip::ledger::Ledger;
use vmhost_gossip::pki::{self, Identity};
use vmhost_gossip::quic::{answer, FleetEndpoint, FleetRequest, FleetResponse};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn any_port() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 0)
}

fn fleet(dir: &Path, hosts: &[&str]) -> Vec<Identity> {
    pki::one_machine_fleet(dir, hosts, LOCALHOST).unwrap()
}

/// A granter serving its ledger over the endpoint.
fn granter(identity: &Identity) -> (FleetEndpoint, Arc<Mutex<Ledger>>) {
    let endpoint = FleetEndpoint::bind(any_port(), identity).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::new(Resources {
        vcpus: 4,
        memory_bytes: 4 << 30,
    })));
    let served = ledger.clone();
    endpoint.serve(Arc::new(move |request| {
        answer(match request {
            FleetRequest::Lease(request) => {
                FleetResponse::Lease(lease::serve(&mut served.lock().unwrap(), request, 0))
            }
            _ => FleetResponse::Pong,
        })
    }));
    (endpoint, ledger)
}

fn reserve(vcpus: u32) -> FleetRequest {
    FleetRequest::Lease(LeaseRequest::Reserve {
        vm: "db1".into(),
        holder: "host-a".into(),
        resources: Resources {
            vcpus,
            memory_bytes: 1 << 30,
        },
        ttl_ms: 10_000,
    })
}

#[tokio::test]
async fn hosts_of_one_fleet_reserve_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["host-a", "host-b"]);
    let (b, ledger) = granter(&ids[1]);
    let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
    assert_eq!(
        a.call(b.local_addr(), "host-b", &FleetRequest::Ping)
            .await
            .unwrap(),
        FleetResponse::Pong
    );
    let granted = a.call(b.local_addr(), "host-b", &reserve(2)).await.unwrap();
    assert!(
        matches!(granted, FleetResponse::Lease(LeaseResponse::Granted(_))),
        "{granted:?}"
    );
    assert_eq!(ledger.lock().unwrap().leased().vcpus, 2);
    let refused = a.call(b.local_addr(), "host-b", &reserve(3)).await.unwrap();
    assert!(
        matches!(refused, FleetResponse::Lease(LeaseResponse::Refused { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = fleet(&dir.path().join("ours"), &["host-b"]);
    let theirs = fleet(&dir.path().join("theirs"), &["host-b", "intruder"]);
    let (b, ledger) = granter(&ours[0]);
    // A client whose certificate another CA signed, even one claiming the right name.
    for stranger in &theirs {
        let client = FleetEndpoint::bind(any_port(), stranger).unwrap();
        let result = client.call(b.local_addr(), "host-b", &reserve(1)).await;
        assert!(
            result.is_err(),
            "a foreign certificate got an answer: {result:?}"
        );
    }
    assert_eq!(
        ledger.lock().unwrap().leased().vcpus,
        0,
        "nothing was reserved"
    );
    // And a host of ours refuses a server from another fleet.
    let (impostor, _) = granter(&theirs[0]);
    let a_dir = dir.path().join("ours");
    pki::issue_cert(
        &a_dir.join("ca"),
        "host-a",
        LOCALHOST,
        &a_dir.join("host-a"),
    )
    .unwrap();
    let a =
        FleetEndpoint::bind(any_port(), &Identity::load(&a_dir.join("host-a")).unwrap()).unwrap();
    assert!(a
        .call(impostor.local_addr(), "host-b", &FleetRequest::Ping)
        .await
        .is_err());
}

#[tokio::test]
async fn malformed_requests_get_an_error_and_the_endpoint_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["host-a", "host-b"]);
    let (b, _) = granter(&ids[1]);
    let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
    for garbage in [&[0xffu8; 32][..], &[][..], &[7, 1, 2][..]] {
        let reply = a
            .call_bytes(b.local_addr(), "host-b", garbage)
            .await
            .unwrap();
        let reply: FleetResponse = postcard::from_bytes(&reply).unwrap();
        assert!(matches!(reply, FleetResponse::Error { .. }), "{reply:?}");
    }
    assert_eq!(
        a.call(b.local_addr(), "host-b", &FleetRequest::Ping)
            .await
            .unwrap(),
        FleetResponse::Pong
    );
}

#[test]
fn fleet_keys_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    pki::init_ca(dir.path()).unwrap();
    let again = pki::init_ca(dir.path()).unwrap_err().to_string();
    assert!(again.contains("already exists"), "{again}");
}
