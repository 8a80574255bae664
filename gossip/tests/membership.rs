//! Gossip over the fleet's QUIC endpoints, on loopback: hosts find each other from a seed,
//! see each other's capacity change, detect a dead host, and ignore anyone outside the fleet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmhost_api::Resources;
use vmhost_gossip::membership::{HostView, Member, Membership, MembershipConfig};
use vmhost_gossip::quic::{
    answer, FleetEndpoint, FleetResponse, PREVIOUS_FLEET_PROTOCOL_VERSION,
    SUPPORTED_FLEET_PROTOCOL_VERSIONS,
};
use vmhost_pki::{self as pki, Identity};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const CLUSTER: &str = "test-fleet";

struct TestHost {
    endpoint: Arc<FleetEndpoint>,
    membership: Membership,
    view: HostView,
}

fn identities(dir: &Path, hosts: &[&str]) -> Vec<Identity> {
    pki::one_machine_fleet(dir, hosts, LOCALHOST).unwrap()
}

async fn start(name: &str, identity: &Identity, seeds: Vec<SocketAddr>) -> TestHost {
    start_speaking(name, identity, &SUPPORTED_FLEET_PROTOCOL_VERSIONS, seeds).await
}

/// A host whose endpoint offers only `versions` of the fleet protocol.
async fn start_speaking(
    name: &str,
    identity: &Identity,
    versions: &[u32],
    seeds: Vec<SocketAddr>,
) -> TestHost {
    let endpoint = Arc::new(
        FleetEndpoint::bind_with_versions(SocketAddr::new(LOCALHOST, 0), identity, versions)
            .unwrap(),
    );
    endpoint.serve(Arc::new(|_| answer(FleetResponse::Pong)));
    let view = HostView {
        name: name.into(),
        addr: endpoint.local_addr(),
        cu_shape: Default::default(),
        capacity: Resources {
            vcpus: 4,
            memory_bytes: 4 << 30,
        },
        allocated: Resources::default(),
        leased: Resources::default(),
        watermark_memory_bytes: 4 << 30,
        vms: 0,
        version: "test".into(),
        drain: None,
        images: Default::default(),
        disk_free_gib: None,
    };
    let config = MembershipConfig {
        cluster: CLUSTER.into(),
        name: name.into(),
        advertise: endpoint.local_addr(),
        seeds,
        gossip_interval: Duration::from_millis(100),
        dead_host_grace: Duration::from_secs(3600),
    };
    let membership = Membership::start(endpoint.clone(), config, &view)
        .await
        .unwrap();
    TestHost {
        endpoint,
        membership,
        view,
    }
}

/// Waits until `host`'s view satisfies `done`, or fails with what it saw.
async fn wait_for(host: &TestHost, what: &str, done: impl Fn(&[Member]) -> bool) -> Vec<Member> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let members = host.membership.members().await;
        if done(&members) {
            return members;
        }
        assert!(
            Instant::now() < deadline,
            "{} never saw {what}; it sees {members:#?}",
            host.view.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names(members: &[Member], live: bool) -> Vec<&str> {
    members
        .iter()
        .filter(|m| m.live == live)
        .map(|m| m.view.name.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_join_share_capacity_and_detect_a_dead_host() {
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(dir.path(), &["a", "b", "c"]);
    let a = start("a", &ids[0], vec![]).await;
    let seed = vec![a.endpoint.local_addr()];
    let b = start("b", &ids[1], seed.clone()).await;
    let c = start("c", &ids[2], seed).await;
    for host in [&a, &b, &c] {
        wait_for(host, "all three live", |m| {
            names(m, true) == ["a", "b", "c"]
        })
        .await;
    }

    let mut changed = b.view.clone();
    changed.allocated = Resources {
        vcpus: 3,
        memory_bytes: 3 << 30,
    };
    b.membership.publish(&changed).await;
    wait_for(&c, "b's new allocation", |m| {
        m.iter().any(|m| m.view == changed)
    })
    .await;

    c.membership.shutdown().await;
    c.endpoint.close();
    for host in [&a, &b] {
        let seen = wait_for(host, "c dead", |m| names(m, false) == ["c"]).await;
        assert_eq!(names(&seen, true), ["a", "b"]);
    }
}

/// Plain chitchat over UDP, aimed at a fleet host's address, with the fleet's cluster id:
/// what an attacker without a certificate can send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unauthenticated_gossip_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(&dir.path().join("ours"), &["a", "b"]);
    let a = start("a", &ids[0], vec![]).await;
    let b = start("b", &ids[1], vec![a.endpoint.local_addr()]).await;
    wait_for(&a, "b", |m| names(m, true) == ["a", "b"]).await;

    // 1. Unauthenticated: a stock chitchat node on UDP, seeded with a's address, publishing
    //    a host view that claims to be a huge, empty host.
    let forged_view = HostView {
        name: "forged".into(),
        addr: SocketAddr::new(LOCALHOST, 1),
        capacity: Resources {
            vcpus: 1000,
            memory_bytes: 1 << 50,
        },
        ..a.view.clone()
    };
    let rogue_addr = {
        let socket = std::net::UdpSocket::bind((LOCALHOST, 0)).unwrap();
        socket.local_addr().unwrap()
    };
    let rogue = chitchat::spawn_chitchat(
        chitchat::ChitchatConfig {
            chitchat_id: chitchat::ChitchatId::new("forged", 1, rogue_addr),
            cluster_id: CLUSTER.into(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: rogue_addr,
            seed_nodes: vec![a.endpoint.local_addr().to_string()],
            failure_detector_config: Default::default(),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        },
        vec![("host".into(), serde_json::to_string(&forged_view).unwrap())],
        &chitchat::transport::UdpTransport,
    )
    .await
    .unwrap();

    // 2. Authenticated by another CA: a full vmhost gossip node of a different fleet.
    let theirs = identities(&dir.path().join("theirs"), &["intruder"]);
    let intruder = start("intruder", &theirs[0], vec![a.endpoint.local_addr()]).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    for host in [&a, &b] {
        let members = host.membership.members().await;
        assert_eq!(
            members
                .iter()
                .map(|m| m.view.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"],
            "{} let a stranger in: {members:#?}",
            host.view.name
        );
        assert!(members.iter().all(|m| m.view.capacity.vcpus == 4));
    }
    // Nor did the strangers learn anything about the fleet.
    let rogue_knows = rogue.with_chitchat(|c| c.node_states().len()).await;
    assert_eq!(rogue_knows, 1, "the UDP rogue learned of fleet hosts");
    let intruder_knows = intruder.membership.members().await;
    assert_eq!(names(&intruder_knows, true), ["intruder"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_version_host_gossips_with_a_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(dir.path(), &["old", "new"]);
    let new = start("new", &ids[1], vec![]).await;
    let old = start_speaking(
        "old",
        &ids[0],
        &[PREVIOUS_FLEET_PROTOCOL_VERSION],
        vec![new.endpoint.local_addr()],
    )
    .await;
    for host in [&new, &old] {
        wait_for(host, "both hosts live", |m| {
            let mut live = names(m, true);
            live.sort();
            live == ["new", "old"]
        })
        .await;
    }
    // Gossip dials by IP; each direction's connection negotiated version 1.
    let ip = LOCALHOST.to_string();
    let (old_addr, new_addr) = (old.endpoint.local_addr(), new.endpoint.local_addr());
    assert_eq!(old.endpoint.peer_version(new_addr, &ip).await, Some(1));
    assert_eq!(new.endpoint.peer_version(old_addr, &ip).await, Some(1));
}
