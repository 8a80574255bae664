//! Property loops over the API's decoders of outside bytes: the local socket's request line
//! (an `Envelope`), a peer's call (`PeerEnvelope::from_json`) and the response line a client
//! or a forwarding host reads. Never a panic; valid values round-trip. PROPTEST_CASES sets
//! the number of cases (256 by default); `scripts/fuzz` runs more.

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use vmhost_api::units::MAX_CU;
use vmhost_api::{
    ApiError, ComputeAction, ComputeUnits, CreateVm, Envelope, ErrorKind, Event, EventKind,
    ImageRef, PeerCall, PeerEnvelope, PeerRequest, Reply, Request, Response,
};

fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn cu() -> impl Strategy<Value = ComputeUnits> {
    (1..=MAX_CU * 4).prop_map(ComputeUnits::from_quarters)
}

/// JSON values an operator may put in a VM's agent overrides. Floats are left out: serde_json
/// parses some to the neighbouring double unless built with `float_roundtrip`.
fn agent_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ]
}

fn create() -> impl Strategy<Value = CreateVm> {
    (
        text(),
        prop_oneof![
            "[a-z]{1,8}".prop_map(ImageRef::Named),
            "/[a-z/]{0,16}".prop_map(|p| ImageRef::Path(p.into())),
        ],
        (cu(), cu(), proptest::option::of(cu())),
        any::<bool>(),
        btree_map(text(), agent_value(), 0..4),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(name, image, (min_cu, max_cu, cu), autoscale, agent, lease, disk_gib)| CreateVm {
                name,
                image,
                min_cu,
                max_cu,
                cu,
                autoscale,
                agent,
                lease,
                disk_gib,
                image_id: None,
                compute_spec: None,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    let leaf = prop_oneof![
        create().prop_map(Request::Create),
        Just(Request::List),
        text().prop_map(|name| Request::Show { name }),
        (text(), cu(), any::<bool>()).prop_map(|(name, cu, force)| Request::Scale {
            name,
            cu,
            force
        }),
        text().prop_map(|name| Request::Stop { name }),
        text().prop_map(|name| Request::Delete { name }),
        (text(), cu(), cu()).prop_map(|(name, min_cu, max_cu)| Request::Bounds {
            name,
            min_cu,
            max_cu
        }),
        (proptest::option::of(text()), any::<bool>())
            .prop_map(|(name, follow)| Request::Events { name, follow }),
        Just(Request::Hosts),
        (text(), agent_value()).prop_map(|(name, value)| Request::Compute {
            name,
            action: ComputeAction::Configure {
                spec: serde_json::json!({ "settings": { "key": value } }),
            },
        }),
        text().prop_map(|name| Request::Compute {
            name,
            action: ComputeAction::Terminate,
        }),
    ];
    leaf.prop_recursive(3, 8, 1, |inner| {
        (text(), inner).prop_map(|(host, request)| Request::OnHost {
            host,
            request: Box::new(request),
        })
    })
}

fn peer_call() -> impl Strategy<Value = PeerCall> {
    prop_oneof![
        request().prop_map(PeerCall::Forwarded),
        text().prop_map(|name| PeerCall::Peer(PeerRequest::MigrateRecover { name })),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let kind = prop_oneof![
        Just(ErrorKind::InvalidArgument),
        Just(ErrorKind::NotFound),
        Just(ErrorKind::WrongState),
    ];
    let event = (any::<u64>(), text(), text()).prop_map(|(unix_ms, vm, message)| Event {
        unix_ms,
        vm,
        kind: EventKind::Scaled,
        message,
    });
    prop_oneof![
        (kind, text()).prop_map(|(kind, message)| Response::Error(ApiError::new(kind, message))),
        text().prop_map(|name| Response::Ok(Reply::Deleted { name })),
        vec(event, 0..4).prop_map(|events| Response::Ok(Reply::Events(events))),
    ]
}

/// Everything a line from outside goes through; none of it may panic, and whatever decodes
/// encodes again to the same value. The cargo-fuzz target `api_envelope` runs this too.
pub fn decode_all(line: &str) {
    if let Ok(envelope) = serde_json::from_str::<Envelope>(line) {
        let again = serde_json::to_string(&envelope).unwrap();
        assert_eq!(serde_json::from_str::<Envelope>(&again).unwrap(), envelope);
    }
    if let Ok(envelope) = PeerEnvelope::from_json(line) {
        assert_eq!(
            PeerEnvelope::from_json(&envelope.to_json()).unwrap(),
            envelope
        );
    }
    let _ = serde_json::from_str::<Response>(line);
}

/// Characters that change a JSON document's shape when dropped in.
const JSON_BITS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "\\",
    "null",
    "-1",
    "1e999",
    "0.3",
    "\"op\":\"on_host\"",
];

proptest! {
    #[test]
    fn arbitrary_lines_never_panic(line in ".{0,256}") {
        decode_all(&line);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        decode_all(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn envelopes_round_trip(version in any::<u32>(), request in request()) {
        let envelope = Envelope { version, request };
        let line = serde_json::to_string(&envelope).unwrap();
        prop_assert_eq!(serde_json::from_str::<Envelope>(&line).unwrap(), envelope);
    }

    #[test]
    fn peer_envelopes_round_trip(version in any::<u32>(), call in peer_call()) {
        let envelope = PeerEnvelope { version, call };
        prop_assert_eq!(PeerEnvelope::from_json(&envelope.to_json()).unwrap(), envelope);
    }

    #[test]
    fn responses_round_trip(response in response()) {
        let line = serde_json::to_string(&response).unwrap();
        prop_assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), response);
    }

    /// Valid lines with pieces of JSON dropped in or cut short: never a panic.
    #[test]
    fn mutated_lines_never_panic(version in any::<u32>(), call in peer_call(),
                                 edits in vec((any::<prop::sample::Index>(),
                                               prop::sample::select(JSON_BITS)), 1..4),
                                 keep in any::<prop::sample::Index>()) {
        let mut line = PeerEnvelope { version, call }.to_json();
        for (at, bit) in &edits {
            let boundaries: Vec<usize> = line.char_indices().map(|(i, _)| i).collect();
            if boundaries.is_empty() {
                break;
            }
            line.insert_str(boundaries[at.index(boundaries.len())], bit);
        }
        let cut = line.char_indices().map(|(i, _)| i).nth(keep.index(line.len() + 1));
        line.truncate(cut.unwrap_or(line.len()));
        decode_all(&line);
    }

    /// Requests forwarded through many hosts: refused or read, whatever the depth, within
    /// a test thread's stack (the daemon's tokio threads have the same 2 MiB).
    #[test]
    fn nested_requests_never_overflow_the_stack(depth in 0usize..400) {
        let mut line = String::new();
        for _ in 0..depth {
            line.push_str(r#"{"op":"on_host","host":"h","request":"#);
        }
        line.push_str(r#"{"op":"list"}"#);
        line.push_str(&"}".repeat(depth));
        let envelope = format!(r#"{{"version":1,"op":"on_host","host":"h","request":{line}}}"#);
        decode_all(&envelope);
    }
}
