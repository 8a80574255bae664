//! Fleet protocol versions across a rolling upgrade, over real QUIC and mutual TLS on
//! loopback: a host of the previous release (an endpoint bound with only version 1) still
//! pings and leases with a current one (gossip: `membership.rs`); current hosts negotiate
//! the current version; a peer speaking only versions nobody knows is refused in the handshake.

mod common;

use common::{any_port, granter, LOCALHOST};
use std::net::SocketAddr;
use std::time::Duration;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::Lease;
use vmhost_gossip::quic::{
    alpn_id, version_of_alpn, FleetEndpoint, FleetRequest, FleetResponse, Peer, QuicError,
    FLEET_PROTOCOL_VERSION, PREVIOUS_FLEET_PROTOCOL_VERSION, SUPPORTED_FLEET_PROTOCOL_VERSIONS,
};
use vmhost_pki::Identity;

/// Far beyond a loopback handshake, far below anything that looks like a hang.
const QUICK: Duration = Duration::from_secs(5);

fn fleet(dir: &std::path::Path, hosts: &[&str]) -> Vec<Identity> {
    vmhost_pki::one_machine_fleet(dir, hosts, LOCALHOST).unwrap()
}

/// Pings, then reserves, renews and releases a lease, each answered as a v1 host expects.
async fn ping_and_lease(client: &FleetEndpoint, server: SocketAddr, name: &str) -> Vec<Peer> {
    let mut peers = Vec::new();
    let mut call = async |request: FleetRequest| {
        let (peer, response) =
            tokio::time::timeout(QUICK, client.call_peer(server, name, &request))
                .await
                .expect("the call finishes")
                .unwrap();
        peers.push(peer);
        response
    };
    assert_eq!(call(FleetRequest::Ping).await, FleetResponse::Pong);
    let reserve = LeaseRequest::Reserve {
        vm: "db1".into(),
        holder: "host-a".into(),
        resources: Resources {
            vcpus: 2,
            memory_bytes: 1 << 30,
        },
        ttl_ms: 10_000,
    };
    let id = match call(FleetRequest::Lease(reserve)).await {
        FleetResponse::Lease(LeaseResponse::Granted(Lease { id, .. })) => id,
        other => panic!("not granted: {other:?}"),
    };
    let renew = LeaseRequest::Renew { id, ttl_ms: 20_000 };
    let renewed = call(FleetRequest::Lease(renew)).await;
    assert!(
        matches!(renewed, FleetResponse::Lease(LeaseResponse::Renewed(ref l)) if l.id == id),
        "{renewed:?}"
    );
    let released = call(FleetRequest::Lease(LeaseRequest::Release { id })).await;
    assert_eq!(released, FleetResponse::Lease(LeaseResponse::Released));
    peers
}

#[tokio::test]
async fn current_hosts_negotiate_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["host-a", "host-b"]);
    let common::Granter {
        endpoint: b,
        askers,
        ..
    } = granter(&ids[1], &SUPPORTED_FLEET_PROTOCOL_VERSIONS);
    let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
    assert_eq!(a.versions(), [2, 1]);
    assert_eq!(a.peer_version(b.local_addr(), "host-b").await, None);
    let peer = a.connect(b.local_addr(), "host-b").await.unwrap();
    assert_eq!(
        peer,
        Peer {
            name: "host-b".into(),
            addr: b.local_addr(),
            version: FLEET_PROTOCOL_VERSION
        }
    );
    for peer in ping_and_lease(&a, b.local_addr(), "host-b").await {
        assert_eq!(peer.version, 2);
    }
    assert_eq!(a.peer_version(b.local_addr(), "host-b").await, Some(2));
    let askers = askers.lock().unwrap();
    assert_eq!(askers.len(), 4);
    for asker in askers.iter() {
        assert_eq!((asker.name.as_str(), asker.version), ("host-a", 2));
        assert_eq!(asker.addr, a.local_addr());
    }
}

#[tokio::test]
async fn a_previous_version_host_pings_and_leases_with_a_current_one_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["old", "new"]);
    let previous = [PREVIOUS_FLEET_PROTOCOL_VERSION];
    // The old host asks the new one.
    let common::Granter {
        endpoint: new,
        askers,
        ..
    } = granter(&ids[1], &SUPPORTED_FLEET_PROTOCOL_VERSIONS);
    let old = FleetEndpoint::bind_with_versions(any_port(), &ids[0], &previous).unwrap();
    for peer in ping_and_lease(&old, new.local_addr(), "new").await {
        assert_eq!((peer.name.as_str(), peer.version), ("new", 1));
    }
    assert_eq!(old.peer_version(new.local_addr(), "new").await, Some(1));
    let seen: Vec<_> = askers.lock().unwrap().iter().map(|p| p.version).collect();
    assert_eq!(seen, [1, 1, 1, 1], "the new host saw the old one speak v1");
    // The new host asks the old one.
    let common::Granter {
        endpoint: old_granter,
        askers: old_askers,
        ..
    } = granter(&ids[0], &previous);
    let client = FleetEndpoint::bind(any_port(), &ids[1]).unwrap();
    for peer in ping_and_lease(&client, old_granter.local_addr(), "old").await {
        assert_eq!((peer.name.as_str(), peer.version), ("old", 1));
    }
    let seen: Vec<_> = old_askers
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.version)
        .collect();
    assert_eq!(seen, [1, 1, 1, 1]);
}

#[tokio::test]
async fn a_peer_speaking_only_unknown_versions_is_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["host-a", "host-b", "stranger"]);
    let common::Granter {
        endpoint: b,
        askers,
        ..
    } = granter(&ids[1], &SUPPORTED_FLEET_PROTOCOL_VERSIONS);
    for unknown in [0, 3] {
        // A client that offers only `unknown`.
        let stranger = FleetEndpoint::bind_with_versions(any_port(), &ids[2], &[unknown]).unwrap();
        let refused = tokio::time::timeout(
            QUICK,
            stranger.call(b.local_addr(), "host-b", &FleetRequest::Ping),
        )
        .await
        .expect("refused, not left hanging");
        match refused {
            Err(QuicError::NoCommonVersion { peer, offered }) => {
                assert_eq!((peer.as_str(), offered), ("host-b", vec![unknown]));
            }
            other => panic!("expected no common version, got {other:?}"),
        }
        let message = stranger
            .connect(b.local_addr(), "host-b")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("speaks none of the fleet protocol versions"),
            "{message}"
        );
        // A server that accepts only `unknown` refuses a current client the same way.
        let odd = granter(&ids[2], &[unknown]).endpoint;
        let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
        let refused = tokio::time::timeout(QUICK, a.connect(odd.local_addr(), "stranger"))
            .await
            .expect("refused, not left hanging");
        assert!(
            matches!(&refused, Err(QuicError::NoCommonVersion { offered, .. }) if offered == &[2, 1]),
            "{refused:?}"
        );
    }
    assert!(
        askers.lock().unwrap().is_empty(),
        "nothing reached the handler"
    );
    // The host keeps serving those who speak its versions.
    let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
    assert_eq!(
        a.call(b.local_addr(), "host-b", &FleetRequest::Ping)
            .await
            .unwrap(),
        FleetResponse::Pong
    );
}

#[test]
fn versions_are_named_by_alpn_ids() {
    assert_eq!(alpn_id(FLEET_PROTOCOL_VERSION), b"vmhost/2");
    assert_eq!(alpn_id(PREVIOUS_FLEET_PROTOCOL_VERSION), b"vmhost/1");
    assert_eq!(version_of_alpn(b"vmhost/1"), Some(1));
    assert_eq!(version_of_alpn(b"vmhost/x"), None);
    assert_eq!(version_of_alpn(b"h3"), None);
    assert_eq!(SUPPORTED_FLEET_PROTOCOL_VERSIONS, [2, 1]);
}

/// Version 1's messages as a v1 host encodes them (taken from the release before
/// negotiation): a current host must send and accept exactly these bytes.
#[test]
fn version_1_messages_keep_their_encoding() {
    let r = Resources {
        vcpus: 2,
        memory_bytes: 1 << 30,
    };
    let lease = Lease {
        id: 7,
        vm: "db1".into(),
        holder: "a".into(),
        resources: r,
        expires_at_ms: 1_000,
    };
    let lease_bytes = [7, 3, 100, 98, 49, 1, 97, 2, 128, 128, 128, 128, 4, 232, 7];
    let requests: Vec<(FleetRequest, Vec<u8>)> = vec![
        (FleetRequest::Ping, vec![0]),
        (
            FleetRequest::Lease(LeaseRequest::Reserve {
                vm: "db1".into(),
                holder: "a".into(),
                resources: r,
                ttl_ms: 10_000,
            }),
            vec![
                1, 0, 3, 100, 98, 49, 1, 97, 2, 128, 128, 128, 128, 4, 144, 78,
            ],
        ),
        (
            FleetRequest::Lease(LeaseRequest::Renew {
                id: 7,
                ttl_ms: 5_000,
            }),
            vec![1, 1, 7, 136, 39],
        ),
        (
            FleetRequest::Lease(LeaseRequest::Commit { id: 7 }),
            vec![1, 2, 7],
        ),
        (
            FleetRequest::Lease(LeaseRequest::Release { id: 7 }),
            vec![1, 3, 7],
        ),
        (FleetRequest::Api("{}".into()), vec![2, 2, 123, 125]),
        (FleetRequest::Tunnel { id: 300 }, vec![3, 172, 2]),
    ];
    for (request, bytes) in requests {
        assert_eq!(request.since(), 1, "{request:?}");
        assert_eq!(postcard::to_stdvec(&request).unwrap(), bytes, "{request:?}");
        assert_eq!(
            postcard::from_bytes::<FleetRequest>(&bytes).unwrap(),
            request
        );
    }
    let with_lease = |tag: u8| [&[1, tag][..], &lease_bytes[..]].concat();
    let responses: Vec<(FleetResponse, Vec<u8>)> = vec![
        (FleetResponse::Pong, vec![0]),
        (
            FleetResponse::Lease(LeaseResponse::Granted(lease.clone())),
            with_lease(0),
        ),
        (
            FleetResponse::Lease(LeaseResponse::Renewed(lease.clone())),
            with_lease(1),
        ),
        (
            FleetResponse::Lease(LeaseResponse::Committed(lease)),
            with_lease(2),
        ),
        (FleetResponse::Lease(LeaseResponse::Released), vec![1, 3]),
        (
            FleetResponse::Lease(LeaseResponse::Refused {
                reason: "x".into(),
                free: r,
            }),
            vec![1, 4, 1, 120, 2, 128, 128, 128, 128, 4],
        ),
        (
            FleetResponse::Lease(LeaseResponse::Unknown { id: 7 }),
            vec![1, 5, 7],
        ),
        (
            FleetResponse::Lease(LeaseResponse::Invalid { reason: "x".into() }),
            vec![1, 6, 1, 120],
        ),
        (FleetResponse::Api("{}".into()), vec![2, 2, 123, 125]),
        (FleetResponse::Error { reason: "x".into() }, vec![3, 1, 120]),
    ];
    for (response, bytes) in responses {
        assert_eq!(response.since(), 1, "{response:?}");
        assert_eq!(
            postcard::to_stdvec(&response).unwrap(),
            bytes,
            "{response:?}"
        );
        assert_eq!(
            postcard::from_bytes::<FleetResponse>(&bytes).unwrap(),
            response
        );
    }
}
