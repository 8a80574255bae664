//! Changing whom an endpoint trusts while it runs, over real QUIC on loopback: a fleet rolls
//! from one CA to another without a pair of hosts ever failing to connect, and a denied
//! host is refused both ways and cut off where it was connected.

mod common;

use common::{granter, Granter, LOCALHOST};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmhost_gossip::quic::{
    FleetEndpoint, FleetRequest, FleetResponse, SUPPORTED_FLEET_PROTOCOL_VERSIONS,
};
use vmhost_pki::{self as pki, Identity, CA_CERT, HOST_CERT, HOST_KEY};

/// Far beyond a loopback handshake, far below anything that looks like a hang.
const QUICK: Duration = Duration::from_secs(5);

fn start(credentials: &Path) -> Granter {
    let identity = Identity::load(credentials).unwrap();
    granter(&identity, &SUPPORTED_FLEET_PROTOCOL_VERSIONS)
}

async fn ping(from: &FleetEndpoint, to: SocketAddr, name: &str) -> Result<(), String> {
    match tokio::time::timeout(QUICK, from.call(to, name, &FleetRequest::Ping)).await {
        Ok(Ok(FleetResponse::Pong)) => Ok(()),
        Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Whether `a` and `b` (named `host-a`, `host-b`) reach each other, both ways.
async fn talk(a: &FleetEndpoint, b: &FleetEndpoint) -> Result<(), String> {
    ping(a, b.local_addr(), "host-b").await?;
    ping(b, a.local_addr(), "host-a").await
}

/// Rereads `credentials`, as vmhostd does on a reload; returns whom it cut off.
async fn reload(host: &Granter, credentials: &Path, denied: &[&str]) -> Vec<String> {
    let identity = Identity::load(credentials).unwrap();
    let denied = denied.iter().map(|d| d.to_string()).collect();
    host.endpoint.set_trust(&identity, denied).await.unwrap()
}

/// A certificate for `host` from the CA in `ca`, in a folder of its own.
fn issue(dir: &Path, ca: &str, host: &str) -> PathBuf {
    let out = dir.join(format!("{host}-from-{ca}"));
    pki::issue_cert(&dir.join(ca), host, LOCALHOST, &out).unwrap();
    out
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

/// Two CAs, and the operator's procedure between them: every host trusts the new CA too,
/// then each swaps its certificate for one from the new CA, then the old CA goes.
#[tokio::test]
async fn a_fleet_rolls_to_a_new_ca_without_a_pair_failing_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    pki::init_ca(&dir.join("old")).unwrap();
    pki::init_ca(&dir.join("new")).unwrap();
    let (a_dir, b_dir) = (issue(dir, "old", "host-a"), issue(dir, "new", "host-b"));
    let (a, b) = (start(&a_dir), start(&b_dir));
    let error = talk(&a.endpoint, &b.endpoint).await.unwrap_err();
    assert!(error.contains("handshake failed"), "{error}");

    // (a) Each also trusts the other CA: both reach each other, and nothing is cut.
    copy(&dir.join("new").join(CA_CERT), &a_dir.join("ca-new.pem"));
    copy(&dir.join("old").join(CA_CERT), &b_dir.join("ca-old.pem"));
    assert_eq!(reload(&a, &a_dir, &[]).await, Vec::<String>::new());
    assert_eq!(reload(&b, &b_dir, &[]).await, Vec::<String>::new());
    talk(&a.endpoint, &b.endpoint).await.unwrap();

    // (b) host-a swaps its certificate for one from the new CA; host.pem and host.key only,
    // as ca.pem would end the old CA's trust too early.
    let renewed = issue(dir, "new", "host-a");
    copy(&renewed.join(HOST_CERT), &a_dir.join(HOST_CERT));
    copy(&renewed.join(HOST_KEY), &a_dir.join(HOST_KEY));
    let b_addr = b.endpoint.local_addr();
    assert!(a.endpoint.peer_version(b_addr, "host-b").await.is_some());
    assert_eq!(reload(&a, &a_dir, &[]).await, Vec::<String>::new());
    // Its connection made with the old certificate takes no more requests.
    assert_eq!(a.endpoint.peer_version(b_addr, "host-b").await, None);
    talk(&a.endpoint, &b.endpoint).await.unwrap();

    // (c) The old CA goes everywhere: only host-b's connection to host-a, which host-a
    // answered with its old certificate, is replaced.
    std::fs::rename(a_dir.join("ca-new.pem"), a_dir.join(CA_CERT)).unwrap();
    std::fs::remove_file(b_dir.join("ca-old.pem")).unwrap();
    assert_eq!(reload(&a, &a_dir, &[]).await, Vec::<String>::new());
    assert_eq!(reload(&b, &b_dir, &[]).await, ["host-a"]);
    talk(&a.endpoint, &b.endpoint).await.unwrap();

    // A host whose certificate is from the old CA reaches neither, nor they it, even if it
    // trusts the new CA.
    let c_dir = issue(dir, "old", "host-c");
    copy(&dir.join("new").join(CA_CERT), &c_dir.join("ca-new.pem"));
    let c = start(&c_dir).endpoint;
    for (host, name) in [(&a, "host-a"), (&b, "host-b")] {
        assert!(ping(&c, host.endpoint.local_addr(), name).await.is_err());
        assert!(ping(&host.endpoint, c.local_addr(), "host-c")
            .await
            .is_err());
    }
}

#[tokio::test]
async fn a_trust_that_refuses_this_hosts_own_certificate_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ids = pki::one_machine_fleet(dir, &["host-a", "host-b"], LOCALHOST).unwrap();
    let (a, b) = (
        granter(&ids[0], &SUPPORTED_FLEET_PROTOCOL_VERSIONS),
        granter(&ids[1], &SUPPORTED_FLEET_PROTOCOL_VERSIONS),
    );
    talk(&a.endpoint, &b.endpoint).await.unwrap();
    // The old CA removed before host-a's certificate was swapped.
    pki::init_ca(&dir.join("new")).unwrap();
    copy(
        &dir.join("new").join(CA_CERT),
        &dir.join("host-a").join(CA_CERT),
    );
    let identity = Identity::load(&dir.join("host-a")).unwrap();
    let error = a.endpoint.set_trust(&identity, BTreeSet::new()).await;
    let error = error.unwrap_err().to_string();
    assert!(
        error.contains("no trusted CA issued this host's certificate"),
        "{error}"
    );
    talk(&a.endpoint, &b.endpoint).await.unwrap();
}

/// Keeps the streams of every tunnel opened to it.
fn keep_tunnels(endpoint: &FleetEndpoint) {
    let kept = Arc::new(Mutex::new(Vec::new()));
    endpoint.set_tunnel_handler(Arc::new(move |_, send, recv| {
        kept.lock().unwrap().push((send, recv));
    }));
}

#[tokio::test]
async fn a_denied_host_is_refused_both_ways_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    pki::one_machine_fleet(dir, &["host-a", "host-b", "host-x"], LOCALHOST).unwrap();
    let (a, b, x) = (
        start(&dir.join("host-a")),
        start(&dir.join("host-b")),
        start(&dir.join("host-x")),
    );
    let (b_addr, x_addr) = (b.endpoint.local_addr(), x.endpoint.local_addr());
    keep_tunnels(&b.endpoint);
    ping(&x.endpoint, b_addr, "host-b").await.unwrap();
    ping(&b.endpoint, x_addr, "host-x").await.unwrap();
    let (_send, mut tunnel) = x.endpoint.open_tunnel(b_addr, "host-b", 1).await.unwrap();
    assert!(b.endpoint.peer_version(x_addr, "host-x").await.is_some());

    assert_eq!(
        reload(&b, &dir.join("host-b"), &["host-x"]).await,
        ["host-x"]
    );
    assert!(b.endpoint.denies("host-x"));
    // The open connections are closed: the one host-x dialled, with its tunnel, and the one
    // host-b dialled.
    let ended = tokio::time::timeout(QUICK, tunnel.read(&mut [0; 1])).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "the tunnel lives on: {ended:?}"
    );
    assert_eq!(b.endpoint.peer_version(x_addr, "host-x").await, None);
    // New handshakes fail both ways, and nothing host-x asks reaches host-b.
    let served = b.askers.lock().unwrap().len();
    assert!(ping(&x.endpoint, b_addr, "host-b").await.is_err());
    assert!(ping(&b.endpoint, x_addr, "host-x").await.is_err());
    assert_eq!(b.askers.lock().unwrap().len(), served);
    // Others are unaffected.
    talk(&a.endpoint, &b.endpoint).await.unwrap();

    // A deny list emptied again lets it back.
    assert_eq!(
        reload(&b, &dir.join("host-b"), &[]).await,
        Vec::<String>::new()
    );
    ping(&x.endpoint, b_addr, "host-b").await.unwrap();
    ping(&b.endpoint, x_addr, "host-x").await.unwrap();
}
