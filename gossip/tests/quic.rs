//! The fleet endpoint on loopback: mutual TLS with the fleet CA, lease requests over it,
//! and what it does with strangers and garbage.

mod common;

use common::{any_port, granter, LOCALHOST};
use std::path::Path;
use std::sync::Arc;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_gossip::quic::{
    answer, FleetEndpoint, FleetRequest, FleetResponse, SUPPORTED_FLEET_PROTOCOL_VERSIONS,
};
use vmhost_pki::{self as pki, Identity};

fn fleet(dir: &Path, hosts: &[&str]) -> Vec<Identity> {
    pki::one_machine_fleet(dir, hosts, LOCALHOST).unwrap()
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
    let common::Granter {
        endpoint: b,
        ledger,
        ..
    } = granter(&ids[1], &SUPPORTED_FLEET_PROTOCOL_VERSIONS);
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
    let common::Granter {
        endpoint: b,
        ledger,
        ..
    } = granter(&ours[0], &SUPPORTED_FLEET_PROTOCOL_VERSIONS);
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
    let impostor = granter(&theirs[0], &SUPPORTED_FLEET_PROTOCOL_VERSIONS).endpoint;
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
    let b = granter(&ids[1], &SUPPORTED_FLEET_PROTOCOL_VERSIONS).endpoint;
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

/// Deterministic bytes that differ at every offset, so a lost, repeated or misplaced
/// datagram shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A tunnel relays a bulk stream one way and a reply the other way, byte for byte, over
/// loopback, where path MTU discovery takes datagrams to their largest size; when one end
/// closes, the other sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_relays_a_bulk_stream_intact_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;
    use vmhost_gossip::quic::splice;
    const BULK: usize = 24 << 20;
    const REPLY: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["host-a", "host-b"]);
    let b = FleetEndpoint::bind(any_port(), &ids[1]).unwrap();
    // What the far end read: the bulk stream, then whatever came after it before the close.
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    b.set_tunnel_handler(Arc::new(move |id, send, recv| {
        let (tunnel_side, mut far) = UnixStream::pair().unwrap();
        tokio::spawn(splice(tunnel_side, send, recv));
        let arrived = arrived.clone();
        tokio::spawn(async move {
            let mut received = vec![0; BULK];
            far.read_exact(&mut received).await.unwrap();
            arrived.send(received).unwrap();
            far.write_all(&pattern(id + 1, REPLY)).await.unwrap();
            let mut rest = Vec::new();
            far.read_to_end(&mut rest).await.unwrap();
            arrived.send(rest).unwrap();
            far.shutdown().await.unwrap();
        });
    }));
    b.serve(Arc::new(|_| answer(FleetResponse::Pong)));
    let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
    let (send, recv) = a.open_tunnel(b.local_addr(), "host-b", 7).await.unwrap();
    let (tunnel_side, mut near) = UnixStream::pair().unwrap();
    let relay = tokio::spawn(splice(tunnel_side, send, recv));
    let bulk = pattern(7, BULK);
    near.write_all(&bulk).await.unwrap();
    let mut reply = vec![0; REPLY];
    near.read_exact(&mut reply).await.unwrap();
    assert!(
        arrivals.recv().await.unwrap() == bulk,
        "the bulk stream arrived altered"
    );
    assert!(reply == pattern(8, REPLY), "the reply arrived altered");
    near.shutdown().await.unwrap();
    let mut rest = Vec::new();
    near.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "bytes beyond the reply arrived");
    let beyond = arrivals.recv().await.unwrap();
    assert!(beyond.is_empty(), "bytes beyond the bulk stream arrived");
    assert_eq!(relay.await.unwrap(), (BULK as u64, REPLY as u64));
}

/// Post-copy's page requests are a few bytes each and wait for their answer: a tunnel must
/// pass on what has arrived at once, not hold it until a buffer fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_passes_small_messages_on_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;
    use vmhost_gossip::quic::splice;
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet(dir.path(), &["host-a", "host-b"]);
    let b = FleetEndpoint::bind(any_port(), &ids[1]).unwrap();
    b.set_tunnel_handler(Arc::new(|_, send, recv| {
        let (tunnel_side, mut far) = UnixStream::pair().unwrap();
        tokio::spawn(splice(tunnel_side, send, recv));
        tokio::spawn(async move {
            let mut request = [0u8; 8];
            while far.read_exact(&mut request).await.is_ok() {
                far.write_all(&request).await.unwrap();
            }
        });
    }));
    b.serve(Arc::new(|_| answer(FleetResponse::Pong)));
    let a = FleetEndpoint::bind(any_port(), &ids[0]).unwrap();
    let (send, recv) = a.open_tunnel(b.local_addr(), "host-b", 1).await.unwrap();
    let (tunnel_side, mut near) = UnixStream::pair().unwrap();
    tokio::spawn(splice(tunnel_side, send, recv));
    let round_trips = async {
        for n in 0u64..100 {
            near.write_all(&n.to_be_bytes()).await.unwrap();
            let mut answer = [0u8; 8];
            near.read_exact(&mut answer).await.unwrap();
            assert_eq!(u64::from_be_bytes(answer), n);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), round_trips)
        .await
        .expect("small messages were held back in the tunnel");
}
