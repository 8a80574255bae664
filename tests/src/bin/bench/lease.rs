//! Lease round trips to a real vmhostd: each grant is booked in its ledger and fsynced to
//! its lease file before the answer leaves, as a placement or a migration meets it. The
//! baseline is a bare request/response (`Ping`) to the same vmhostd on the same connection.

use crate::{fleet_identities, min_median_max, LOCALHOST};
use std::time::Instant;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_gossip::quic::{FleetEndpoint, FleetRequest, FleetResponse};
use vmhost_tests::benchmarks::{append, today};

const BATCH: usize = 100;

/// Reserve→grant round trips from a peer ("a") to vmhostd "b" on loopback, each lease
/// released after its timed grant, against `Ping`s; batches alternate which goes first.
pub async fn lease_rtt(round_trips: usize) {
    if cfg!(debug_assertions) {
        panic!("benchmarks time release builds: cargo run --release -p vmhost-tests --bin bench -- lease-rtt");
    }
    let pki = tempfile::tempdir().unwrap();
    let ids = fleet_identities(pki.path(), &["a", "b"]);
    let host = crate::migration::fleet_host(pki.path(), "b", 7202, "");
    let a = FleetEndpoint::bind(std::net::SocketAddr::new(LOCALHOST, 0), &ids[0]).unwrap();
    let to = std::net::SocketAddr::new(LOCALHOST, 7202);
    a.call(to, "b", &FleetRequest::Ping).await.unwrap();
    let reserve = FleetRequest::Lease(LeaseRequest::Reserve {
        vm: "bench".into(),
        holder: "a".into(),
        resources: vmhost_api::Resources {
            vcpus: 1,
            memory_bytes: 1 << 30,
        },
        ttl_ms: 60_000,
    });
    let leases = || async {
        let mut timed = std::time::Duration::ZERO;
        for _ in 0..BATCH {
            let started = Instant::now();
            let granted = a.call(to, "b", &reserve).await.unwrap();
            timed += started.elapsed();
            let FleetResponse::Lease(LeaseResponse::Granted(lease)) = granted else {
                panic!("vmhostd did not grant the lease: {granted:?}");
            };
            let release = FleetRequest::Lease(LeaseRequest::Release { id: lease.id });
            let released = a.call(to, "b", &release).await.unwrap();
            assert!(
                matches!(released, FleetResponse::Lease(LeaseResponse::Released)),
                "{released:?}"
            );
        }
        BATCH as f64 / timed.as_secs_f64()
    };
    let pings = || async {
        let started = Instant::now();
        for _ in 0..BATCH {
            a.call(to, "b", &FleetRequest::Ping).await.unwrap();
        }
        BATCH as f64 / started.elapsed().as_secs_f64()
    };
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for batch in 0..round_trips / BATCH {
        if batch % 2 == 0 {
            ours.push(leases().await);
            bare.push(pings().await);
        } else {
            bare.push(pings().await);
            ours.push(leases().await);
        }
    }
    drop(host);
    let ((o_lo, o_mid, o_hi), (b_lo, b_mid, b_hi)) =
        (min_median_max(&mut ours), min_median_max(&mut bare));
    let n = round_trips / BATCH * BATCH;
    append(&format!(
        "- {} lease reserve→grant round trips to a vmhostd on loopback (QUIC, mutual TLS, each grant fsynced to its lease file before the answer, {n} each in batches of {BATCH}, which side goes first alternating, batch rates min/median/max, release build; ours {o_lo:.0}/{o_mid:.0}/{o_hi:.0}/s, ping {b_lo:.0}/{b_mid:.0}/{b_hi:.0}/s): ours {o_mid:.0}/s, bare QUIC request/response {b_mid:.0}/s, ratio {:.2} (time per round trip, ours/bare)\n",
        today(),
        b_mid / o_mid
    ));
}
