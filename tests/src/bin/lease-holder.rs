//! Holds one lease on a fleet host, the way a vmhostd placing a VM does, and renews it until
//! killed; the fleet test kills it to check that the lease then expires.
//!
//! lease-holder CREDENTIALS_DIR HOST_NAME HOST_ADDR VCPUS MEMORY_MIB TTL_SECS

use std::time::Duration;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_gossip::quic::{FleetEndpoint, FleetRequest, FleetResponse};
use vmhost_pki::Identity;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [credentials, name, addr, vcpus, memory_mib, ttl_secs] = &args[..] else {
        eprintln!("usage: lease-holder CREDENTIALS HOST ADDR VCPUS MEMORY_MIB TTL_SECS");
        std::process::exit(2);
    };
    let number = |s: &str| s.parse::<u64>().expect("a number");
    let identity = Identity::load(credentials.as_ref()).expect("credentials");
    let endpoint = FleetEndpoint::bind("0.0.0.0:0".parse().unwrap(), &identity).expect("endpoint");
    let addr = addr.parse().expect("an address");
    let ttl_ms = number(ttl_secs) * 1000;
    let reserve = FleetRequest::Lease(LeaseRequest::Reserve {
        vm: "held".into(),
        holder: "lease-holder".into(),
        resources: Resources {
            vcpus: number(vcpus) as u32,
            memory_bytes: number(memory_mib) << 20,
        },
        ttl_ms,
    });
    let id = match endpoint.call(addr, name, &reserve).await {
        Ok(FleetResponse::Lease(LeaseResponse::Granted(lease))) => lease.id,
        other => {
            eprintln!("not granted: {other:?}");
            std::process::exit(1);
        }
    };
    println!("granted {id}");
    loop {
        tokio::time::sleep(Duration::from_millis(ttl_ms / 3)).await;
        let renew = FleetRequest::Lease(LeaseRequest::Renew { id, ttl_ms });
        if let Err(error) = endpoint.call(addr, name, &renew).await {
            eprintln!("renew failed: {error}");
        }
    }
}
