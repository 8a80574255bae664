//! Holds one lease on a fleet host, the way a vmhostd placing a VM does, and renews it until
//! killed; the fleet test kills it to check that the lease then expires. With `--probe` it
//! only asks whether the host has that room now: granted, the lease is released at once;
//! refused, it exits 4.
//!
//! lease-holder CREDENTIALS_DIR HOST_NAME HOST_ADDR VCPUS MEMORY_MIB TTL_SECS [--probe]

use std::time::Duration;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_gossip::quic::{FleetEndpoint, FleetRequest, FleetResponse};
use vmhost_pki::Identity;

/// The exit code of a probe the host refused for want of room.
const NO_ROOM: i32 = 4;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (probe, args) = match &args[..] {
        [args @ .., flag] if flag == "--probe" => (true, args),
        args => (false, args),
    };
    let [credentials, name, addr, vcpus, memory_mib, ttl_secs] = args else {
        eprintln!("usage: lease-holder CREDENTIALS HOST ADDR VCPUS MEMORY_MIB TTL_SECS [--probe]");
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
        Ok(FleetResponse::Lease(LeaseResponse::Refused { reason, free })) => {
            println!("refused: {reason} (free: {free})");
            std::process::exit(NO_ROOM);
        }
        other => {
            eprintln!("not granted: {other:?}");
            std::process::exit(1);
        }
    };
    println!("granted {id}");
    if probe {
        let release = FleetRequest::Lease(LeaseRequest::Release { id });
        match endpoint.call(addr, name, &release).await {
            Ok(FleetResponse::Lease(LeaseResponse::Released)) => return,
            other => {
                eprintln!("the probe's lease was not released: {other:?}");
                std::process::exit(3);
            }
        }
    }
    loop {
        tokio::time::sleep(Duration::from_millis(ttl_ms / 3)).await;
        let renew = FleetRequest::Lease(LeaseRequest::Renew { id, ttl_ms });
        if let Err(error) = endpoint.call(addr, name, &renew).await {
            eprintln!("renew failed: {error}");
        }
    }
}
