//! Two vmhostd fleets on loopback, the first reloaded by SIGHUP as `systemctl reload` does.

use super::*;
use crate::config::Config;
use crate::testing::TestHost;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmhost_api::Resources;
use vmhost_gossip::membership::HostView;
use vmhost_gossip::quic::{FleetRequest, FleetResponse};
use vmm::Accel;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind((LOCALHOST, 0)).unwrap();
    socket.local_addr().unwrap().port()
}

/// Writes, into its directory, the config of `test`'s host listening on `port`, with
/// `fleet_extra` in `[fleet]`; returns the file.
fn write_config(test: &TestHost, credentials: &Path, port: u16, fleet_extra: &str) -> PathBuf {
    let text = format!(
        "host_name = \"{name}\"\nstate_dir = \"{dir}/state\"\napi_socket = \"{dir}/api.sock\"\n\
         [capacity]\nvcpus = 8\nmemory_mib = 16384\n[compute_unit]\nmemory_mib = 1024\n\
         [fleet]\ncluster = \"test\"\nlisten = \"127.0.0.1:{port}\"\ngossip_interval_ms = 100\n\
         credentials = \"{credentials}\"\n{fleet_extra}\n",
        name = test.host.name(),
        dir = test.dir.path().display(),
        credentials = credentials.display(),
    );
    let path = test.dir.path().join("vmhostd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(test: TestHost, config: Config) -> (TestHost, Arc<Fleet>) {
    let test = test.restart_with(config).await;
    let calls = crate::router::peer_calls(test.host.clone());
    let fleet = Fleet::start(test.host.clone(), calls)
        .await
        .unwrap()
        .unwrap();
    (test, fleet)
}

async fn reaches(from: &Fleet, to: SocketAddr, name: &str) -> bool {
    let call = from.endpoint.call(to, name, &FleetRequest::Ping);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), call).await,
        Ok(Ok(FleetResponse::Pong))
    )
}

async fn live_peer(fleet: &Fleet, name: &str) -> Option<HostView> {
    let peers = fleet.live_peers().await;
    peers.into_iter().find(|v| v.name == name)
}

async fn eventually<F: std::future::Future<Output = bool>>(what: &str, done: impl Fn() -> F) {
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

fn hangup() {
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
}

/// A deny list applied by SIGHUP cuts host-x off both ways and out of placement, and stays
/// over reloads that are refused (a config that does not parse, credentials that do not
/// load) until a reload lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_list_applied_by_sighup_cuts_a_host_off_until_lifted() {
    let (a, x) = (
        TestHost::new("host-a", Accel::Kvm).await,
        TestHost::new("host-x", Accel::Kvm).await,
    );
    let pki = a.dir.path().join("fleet");
    vmhost_pki::one_machine_fleet(&pki, &["host-a", "host-x"], LOCALHOST).unwrap();
    let (a_port, x_port) = (free_udp_port(), free_udp_port());
    let (a_addr, x_addr) = (
        SocketAddr::new(LOCALHOST, a_port),
        SocketAddr::new(LOCALHOST, x_port),
    );
    let a_credentials = pki.join("host-a");
    let a_path = write_config(&a, &a_credentials, a_port, "");
    let (a_config, running) = Config::load_with_table(&a_path).unwrap();
    let seeds = format!("seeds = [\"{a_addr}\"]");
    let x_path = write_config(&x, &pki.join("host-x"), x_port, &seeds);
    let (x_config, _) = Config::load_with_table(&x_path).unwrap();
    let (a, a_fleet) = start(a, a_config).await;
    let (_x, x_fleet) = start(x, x_config).await;
    let write_a = |extra: &str| write_config(&a, &a_credentials, a_port, extra);
    crate::reload::on_hangup(a_path.clone(), running, Some(a_fleet.clone())).unwrap();
    eventually("host-x joins", || async {
        live_peer(&a_fleet, "host-x").await.is_some()
    })
    .await;
    eventually("host-a is seen", || async {
        live_peer(&x_fleet, "host-a").await.is_some()
    })
    .await;
    let a_view = live_peer(&x_fleet, "host-a").await.unwrap();
    let size = Resources {
        vcpus: 1,
        memory_bytes: 1 << 30,
    };
    assert!(x_fleet.reserve(&a_view, "db1", size).await.is_ok());

    write_a("denied_hosts = [\"host-x\"]\nlease_ttl_secs = 60");
    hangup();
    eventually("host-x denied", || async { a_fleet.denies("host-x") }).await;
    assert!(live_peer(&a_fleet, "host-x").await.is_none());
    assert!(!reaches(&x_fleet, a_addr, "host-a").await);
    assert!(!reaches(&a_fleet, x_addr, "host-x").await);
    let refused = x_fleet.reserve(&a_view, "db2", size).await;
    assert!(refused.is_err(), "{refused:?}");

    write_a("denied_hosts = \"host-x\"");
    hangup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let broken = a_credentials.join("ca-broken.pem");
    std::fs::write(&broken, "not a certificate").unwrap();
    write_a("");
    hangup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a_fleet.denies("host-x"));
    assert!(!reaches(&x_fleet, a_addr, "host-a").await);

    std::fs::remove_file(&broken).unwrap();
    hangup();
    eventually("host-x admitted", || async { !a_fleet.denies("host-x") }).await;
    assert!(reaches(&x_fleet, a_addr, "host-a").await);
    assert!(reaches(&a_fleet, x_addr, "host-x").await);
    a_fleet.close();
    x_fleet.close();
}
