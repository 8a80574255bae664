//! Property loops over what a fleet peer's bytes go through on the QUIC endpoint: the frame
//! header, the postcard request and response bodies, and the ALPN id of the handshake.
//! Never a panic; valid messages round-trip. PROPTEST_CASES sets the number of cases (256
//! by default); `scripts/fuzz` runs more.

use proptest::collection::vec;
use proptest::prelude::*;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::Lease;
use vmhost_gossip::quic::{
    alpn_id, body_length, version_of_alpn, FleetRequest, FleetResponse, MAX_MESSAGE_BYTES,
};

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn resources() -> impl Strategy<Value = Resources> {
    (any::<u32>(), any::<u64>()).prop_map(|(vcpus, memory_bytes)| Resources {
        vcpus,
        memory_bytes,
    })
}

fn lease() -> impl Strategy<Value = Lease> {
    (any::<u64>(), text(), text(), resources(), any::<u64>()).prop_map(
        |(id, vm, holder, resources, expires_at_ms)| Lease {
            id,
            vm,
            holder,
            resources,
            expires_at_ms,
        },
    )
}

fn request() -> impl Strategy<Value = FleetRequest> {
    let lease = prop_oneof![
        (text(), text(), resources(), any::<u64>()).prop_map(|(vm, holder, resources, ttl_ms)| {
            LeaseRequest::Reserve {
                vm,
                holder,
                resources,
                ttl_ms,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(id, ttl_ms)| LeaseRequest::Renew { id, ttl_ms }),
        any::<u64>().prop_map(|id| LeaseRequest::Commit { id }),
        any::<u64>().prop_map(|id| LeaseRequest::Release { id }),
    ];
    prop_oneof![
        Just(FleetRequest::Ping),
        lease.prop_map(FleetRequest::Lease),
        text().prop_map(FleetRequest::Api),
        any::<u64>().prop_map(|id| FleetRequest::Tunnel { id }),
    ]
}

fn response() -> impl Strategy<Value = FleetResponse> {
    let lease = prop_oneof![
        lease().prop_map(LeaseResponse::Granted),
        lease().prop_map(LeaseResponse::Renewed),
        lease().prop_map(LeaseResponse::Committed),
        Just(LeaseResponse::Released),
        (text(), resources()).prop_map(|(reason, free)| LeaseResponse::Refused { reason, free }),
        any::<u64>().prop_map(|id| LeaseResponse::Unknown { id }),
        text().prop_map(|reason| LeaseResponse::Invalid { reason }),
    ];
    prop_oneof![
        Just(FleetResponse::Pong),
        lease.prop_map(FleetResponse::Lease),
        text().prop_map(FleetResponse::Api),
        text().prop_map(|reason| FleetResponse::Error { reason }),
    ]
}

fn frame<M: Serialize>(message: &M) -> Vec<u8> {
    let body = postcard::to_stdvec(message).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Reads one frame as the endpoint does: the header, then as much body as it announces.
fn read<M: DeserializeOwned>(stream: &[u8]) -> Result<M, String> {
    let (header, rest) = stream
        .split_first_chunk::<4>()
        .ok_or("stream ends in the header")?;
    let length = body_length(*header)?;
    assert!(length <= MAX_MESSAGE_BYTES);
    let body = rest.get(..length).ok_or("stream ends in the body")?;
    postcard::from_bytes(body).map_err(|e| e.to_string())
}

/// Everything a peer's stream goes through, as a request and as a response; whatever
/// decodes encodes again to the same message. The cargo-fuzz target `fleet_message` runs
/// this too.
pub fn read_any(stream: &[u8]) {
    reads_back::<FleetRequest>(stream);
    reads_back::<FleetResponse>(stream);
}

fn reads_back<M>(stream: &[u8])
where
    M: Serialize + DeserializeOwned + PartialEq + Debug,
{
    if let Ok(message) = read::<M>(stream) {
        assert_eq!(read::<M>(&frame(&message)), Ok(message));
    }
}

proptest! {
    #[test]
    fn arbitrary_streams_never_panic(stream in vec(any::<u8>(), 0..1024)) {
        read_any(&stream);
    }

    /// A plausible header in front of arbitrary bodies, so the body decoders see them all.
    #[test]
    fn arbitrary_bodies_never_panic(body in vec(any::<u8>(), 0..512)) {
        let mut stream = (body.len() as u32).to_be_bytes().to_vec();
        stream.extend_from_slice(&body);
        read_any(&stream);
    }

    #[test]
    fn headers_past_the_limit_are_refused(length in any::<u32>()) {
        let fits = length as usize <= MAX_MESSAGE_BYTES;
        prop_assert_eq!(body_length(length.to_be_bytes()).is_ok(), fits);
    }

    #[test]
    fn messages_round_trip(request in request(), response in response()) {
        prop_assert_eq!(read::<FleetRequest>(&frame(&request)), Ok(request));
        prop_assert_eq!(read::<FleetResponse>(&frame(&response)), Ok(response));
    }

    /// Valid frames with bytes overwritten and cut short: never a panic.
    #[test]
    fn mutated_frames_never_panic(request in request(), response in response(),
                                  edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                  keep in any::<prop::sample::Index>()) {
        for mut stream in [frame(&request), frame(&response)] {
            for (at, byte) in &edits {
                let at = at.index(stream.len());
                stream[at] = *byte;
            }
            stream.truncate(keep.index(stream.len() + 1));
            read_any(&stream);
        }
    }

    /// The ALPN id a peer offers in the handshake.
    #[test]
    fn alpn_ids_parse_or_not(id in vec(any::<u8>(), 0..24), version in any::<u32>()) {
        let _ = version_of_alpn(&id);
        prop_assert_eq!(version_of_alpn(&alpn_id(version)), Some(version));
    }
}
