//! The lease protocol: what a host asks of the host that owns the resources, and how the
//! owner answers. `serve` is the whole of the granter's logic; the transport (QUIC streams
//! in vmhostd, a simulated network in tests) only carries the encoded messages.

use crate::ledger::{Lease, LeaseId, Ledger, LedgerError};
use serde::{Deserialize, Serialize};
use vmhost_api::Resources;

/// The longest lease a granter gives; longer requests are cut to it.
pub const MAX_TTL_MS: u64 = 120_000;
/// The largest encoded message accepted.
pub const MAX_MESSAGE_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    Reserve {
        vm: String,
        holder: String,
        resources: Resources,
        ttl_ms: u64,
    },
    Renew {
        id: LeaseId,
        ttl_ms: u64,
    },
    Commit {
        id: LeaseId,
    },
    Release {
        id: LeaseId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseResponse {
    Granted(Lease),
    Renewed(Lease),
    Committed(Lease),
    Released,
    Refused { reason: String, free: Resources },
    Unknown { id: LeaseId },
    Invalid { reason: String },
}

/// Live leases one holder may have on one granter: enough for a burst of placements and
/// migrations, too few to hold a host's capacity hostage with many small ones.
pub const MAX_LEASES_PER_HOLDER: usize = 64;

/// The granter's answer to one request from `holder` (the name the holder's certificate
/// proves, not one it claims), against its ledger at `now_ms`. A holder sees, renews,
/// commits and releases only its own leases.
pub fn serve(
    ledger: &mut Ledger,
    holder: &str,
    request: LeaseRequest,
    now_ms: u64,
) -> LeaseResponse {
    let owned = |ledger: &Ledger, id: LeaseId| {
        ledger
            .leases()
            .chain(ledger.committed_lease(id))
            .any(|l| l.id == id && l.holder == holder)
    };
    match request {
        LeaseRequest::Reserve { vm, resources, .. } if resources == Resources::default() => {
            LeaseResponse::Invalid {
                reason: format!("a lease for VM '{vm}' must hold something"),
            }
        }
        LeaseRequest::Reserve {
            vm,
            resources,
            ttl_ms,
            ..
        } => {
            if vm.is_empty() || vm.len() > 63 || holder.len() > 255 {
                return LeaseResponse::Invalid {
                    reason: "VM and holder names must be 1 to 63 and at most 255 bytes".into(),
                };
            }
            ledger.expire(now_ms);
            if ledger.leases().filter(|l| l.holder == holder).count() >= MAX_LEASES_PER_HOLDER {
                return LeaseResponse::Refused {
                    reason: format!("{holder} already holds {MAX_LEASES_PER_HOLDER} leases here"),
                    free: ledger.free(),
                };
            }
            match ledger.reserve(&vm, holder, resources, ttl_ms.min(MAX_TTL_MS), now_ms) {
                Ok(lease) => LeaseResponse::Granted(lease),
                Err(e) => LeaseResponse::Refused {
                    reason: e.to_string(),
                    free: ledger.free(),
                },
            }
        }
        LeaseRequest::Renew { id, .. }
        | LeaseRequest::Commit { id }
        | LeaseRequest::Release { id }
            if !owned(ledger, id) =>
        {
            LeaseResponse::Unknown { id }
        }
        // A renewal that crossed its own commit must not read as "gone": the holder would
        // place the VM a second time.
        LeaseRequest::Renew { id, .. } if ledger.committed_lease(id).is_some() => {
            LeaseResponse::Committed(ledger.committed_lease(id).expect("checked").clone())
        }
        LeaseRequest::Renew { id, ttl_ms } => {
            match ledger.renew(id, ttl_ms.min(MAX_TTL_MS), now_ms) {
                Ok(lease) => LeaseResponse::Renewed(lease),
                Err(_) => LeaseResponse::Unknown { id },
            }
        }
        LeaseRequest::Commit { id } => match ledger.commit(id, now_ms) {
            Ok(lease) => LeaseResponse::Committed(lease),
            Err(LedgerError::UnknownLease(_)) => LeaseResponse::Unknown { id },
            Err(e) => LeaseResponse::Refused {
                reason: e.to_string(),
                free: ledger.free(),
            },
        },
        LeaseRequest::Release { id } => {
            ledger.release_lease(id);
            LeaseResponse::Released
        }
    }
}

/// Decodes a request from an untrusted peer.
pub fn decode_request(bytes: &[u8]) -> Result<LeaseRequest, String> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "request of {} bytes exceeds {MAX_MESSAGE_BYTES}",
            bytes.len()
        ));
    }
    postcard::from_bytes(bytes).map_err(|e| format!("malformed lease request: {e}"))
}

pub fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    postcard::to_stdvec(message).expect("lease messages always encode")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn reserve_commit_and_refusal_over_the_wire_format() {
        let mut ledger = Ledger::new(Resources {
            vcpus: 2,
            memory_bytes: 2 * GIB,
        });
        let reserve = LeaseRequest::Reserve {
            vm: "db1".into(),
            holder: "host-a".into(),
            resources: Resources {
                vcpus: 2,
                memory_bytes: 2 * GIB,
            },
            ttl_ms: u64::MAX,
        };
        let request = decode_request(&encode(&reserve)).unwrap();
        let LeaseResponse::Granted(lease) = serve(&mut ledger, "host-a", request, 0) else {
            panic!("not granted")
        };
        assert_eq!(lease.expires_at_ms, MAX_TTL_MS, "ttl is capped");
        assert!(matches!(
            serve(&mut ledger, "host-a", reserve, 0),
            LeaseResponse::Refused { .. }
        ));
        assert!(matches!(
            serve(
                &mut ledger,
                "host-a",
                LeaseRequest::Commit { id: lease.id },
                1
            ),
            LeaseResponse::Committed(_)
        ));
        assert_eq!(
            serve(
                &mut ledger,
                "host-a",
                LeaseRequest::Renew { id: 99, ttl_ms: 1 },
                1
            ),
            LeaseResponse::Unknown { id: 99 }
        );
        // A late renewal of a committed lease says so.
        assert!(matches!(
            serve(
                &mut ledger,
                "host-a",
                LeaseRequest::Renew {
                    id: lease.id,
                    ttl_ms: 1
                },
                2
            ),
            LeaseResponse::Committed(_)
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_request(&[0xff; 16]).is_err());
        assert!(decode_request(&vec![0; MAX_MESSAGE_BYTES + 1]).is_err());
        let mut ledger = Ledger::new(Resources::default());
        let bad = LeaseRequest::Reserve {
            vm: String::new(),
            holder: "h".into(),
            resources: Resources::default(),
            ttl_ms: 1,
        };
        assert!(matches!(
            serve(&mut ledger, "h", bad, 0),
            LeaseResponse::Invalid { .. }
        ));
    }

    #[test]
    fn a_holder_touches_only_its_own_leases_and_only_so_many() {
        let mut ledger = Ledger::new(Resources {
            vcpus: 1000,
            memory_bytes: 1000 * GIB,
        });
        let reserve = |vm: &str, holder: &str| LeaseRequest::Reserve {
            vm: vm.into(),
            // What the request claims does not count; the proven name does.
            holder: holder.into(),
            resources: Resources {
                vcpus: 1,
                memory_bytes: GIB,
            },
            ttl_ms: 60_000,
        };
        let LeaseResponse::Granted(lease) =
            serve(&mut ledger, "host-a", reserve("db1", "host-b"), 0)
        else {
            panic!("not granted")
        };
        assert_eq!(lease.holder, "host-a");
        for stranger in [
            LeaseRequest::Renew {
                id: lease.id,
                ttl_ms: 1,
            },
            LeaseRequest::Commit { id: lease.id },
            LeaseRequest::Release { id: lease.id },
        ] {
            assert_eq!(
                serve(&mut ledger, "host-b", stranger, 1),
                LeaseResponse::Unknown { id: lease.id }
            );
        }
        assert_eq!(ledger.leases().count(), 1, "a stranger changed the lease");
        // Empty leases always fit, so they are refused.
        let empty = LeaseRequest::Reserve {
            vm: "db2".into(),
            holder: "host-a".into(),
            resources: Resources::default(),
            ttl_ms: 1,
        };
        assert!(matches!(
            serve(&mut ledger, "host-a", empty, 1),
            LeaseResponse::Invalid { .. }
        ));
        for i in 1..MAX_LEASES_PER_HOLDER {
            let granted = serve(&mut ledger, "host-a", reserve(&format!("vm{i}"), "x"), 1);
            assert!(matches!(granted, LeaseResponse::Granted(_)), "{granted:?}");
        }
        assert!(matches!(
            serve(&mut ledger, "host-a", reserve("one-more", "x"), 1),
            LeaseResponse::Refused { .. }
        ));
        // Others are not held back by one holder's quota.
        assert!(matches!(
            serve(&mut ledger, "host-b", reserve("theirs", "host-b"), 1),
            LeaseResponse::Granted(_)
        ));
    }
}
