//! Property loops over the frame and message decoders: whatever the other end sends, they
//! return frames, messages or errors, never a panic, and valid messages round-trip.
//! PROPTEST_CASES sets the number of cases (256 by default); `scripts/fuzz` runs more.

use proptest::collection::vec;
use proptest::prelude::*;
use vmhost_guest_protocol::{
    decode, encode, CpuUsage, FrameDecoder, FrameError, GuestMessage, HostMessage, Metrics, Size,
    MAX_FRAME_BYTES,
};

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn metrics() -> impl Strategy<Value = Metrics> {
    (any::<f32>(), any::<f32>(), any::<[u64; 4]>(), any::<u32>()).prop_map(
        |(load1, load5, [total, used, cached, workload], cpus)| Metrics {
            load1,
            load5,
            mem_total_bytes: total,
            mem_used_bytes: used,
            mem_cached_bytes: cached,
            workload_mem_bytes: workload,
            online_cpus: cpus,
        },
    )
}

fn cpu_usage() -> impl Strategy<Value = CpuUsage> {
    (any::<f32>(), any::<f32>()).prop_map(|(util, pressure_some_avg10)| CpuUsage {
        util,
        pressure_some_avg10,
    })
}

fn size() -> impl Strategy<Value = Size> {
    (any::<u32>(), any::<u64>()).prop_map(|(vcpus, memory_bytes)| Size {
        vcpus,
        memory_bytes,
    })
}

fn guest_message() -> impl Strategy<Value = GuestMessage> {
    use GuestMessage as G;
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(min_version, max_version)| G::Hello {
            min_version,
            max_version
        }),
        metrics().prop_map(G::Metrics),
        (any::<u64>(), any::<u64>()).prop_map(|(id, pressure_age_us)| G::UpscaleRequest {
            id,
            pressure_age_us
        }),
        (any::<u64>(), any::<bool>(), text()).prop_map(|(id, ok, reason)| G::DownscaleResult {
            id,
            ok,
            reason
        }),
        any::<u64>().prop_map(|id| G::HealthCheck { id }),
        any::<u64>().prop_map(|id| G::HealthCheckReply { id }),
        text().prop_map(|reason| G::InvalidMessage { reason }),
        text().prop_map(|reason| G::InternalError { reason }),
        (metrics(), cpu_usage()).prop_map(|(metrics, cpu)| G::MetricsV2 { metrics, cpu }),
    ]
}

fn host_message() -> impl Strategy<Value = HostMessage> {
    use HostMessage as H;
    prop_oneof![
        any::<u16>().prop_map(|version| H::Welcome { version }),
        (any::<u16>(), any::<u16>()).prop_map(|(min_version, max_version)| {
            H::VersionRefused {
                min_version,
                max_version,
            }
        }),
        (any::<u64>(), size()).prop_map(|(id, granted)| H::UpscaleNotification { id, granted }),
        (any::<u64>(), size()).prop_map(|(id, target)| H::DownscaleRequest { id, target }),
        Just(H::MetricsRequest),
        any::<u64>().prop_map(|id| H::HealthCheck { id }),
        any::<u64>().prop_map(|id| H::HealthCheckReply { id }),
        text().prop_map(|reason| H::InvalidMessage { reason }),
        text().prop_map(|reason| H::InternalError { reason }),
    ]
}

/// Feeds `stream` in pieces of the sizes in `cuts` (cycled), then takes every frame.
fn frames(stream: &[u8], cuts: &[usize]) -> Result<Vec<Vec<u8>>, FrameError> {
    let mut decoder = FrameDecoder::new();
    let mut bodies = Vec::new();
    let mut rest = stream;
    for &cut in cuts.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, after) = rest.split_at(cut.clamp(1, rest.len()));
        decoder.push(piece);
        rest = after;
        while let Some(body) = decoder.next_frame()? {
            assert!(body.len() <= MAX_FRAME_BYTES);
            bodies.push(body);
        }
        // Never more than one frame's worth held back.
        assert!(decoder.buffered() < 4 + MAX_FRAME_BYTES);
    }
    Ok(bodies)
}

/// Everything a stream from the other end goes through, fed in pieces of the sizes in
/// `cuts`: frames or a TooLarge error, and each body either side's message or an error.
/// The cargo-fuzz target `guest_frame` runs this too.
pub fn decode_stream(stream: &[u8], cuts: &[usize]) {
    match frames(stream, cuts) {
        Ok(bodies) => bodies.iter().for_each(|body| decode_body(body)),
        Err(FrameError::TooLarge(n)) => assert!(n > MAX_FRAME_BYTES),
        Err(e) => panic!("unexpected {e}"),
    }
}

fn decode_body(body: &[u8]) {
    reencodes::<GuestMessage>(body);
    reencodes::<HostMessage>(body);
}

/// A decoded message encodes again to bytes that decode to it (not always to `body`:
/// postcard ignores trailing bytes), compared as bytes since a NaN load never equals itself.
fn reencodes<M>(body: &[u8])
where
    M: serde::Serialize + for<'a> serde::Deserialize<'a>,
{
    if let Ok(message) = decode::<M>(body) {
        let frame = encode(&message).expect("a decoded message is within the limit");
        let again: M = decode(&frame[4..]).expect("an encoded message decodes");
        assert_eq!(encode(&again).unwrap(), frame);
    }
}

proptest! {
    /// Any byte stream, cut anywhere.
    #[test]
    fn arbitrary_streams_never_panic(stream in vec(any::<u8>(), 0..4096),
                                     cuts in vec(1usize..64, 1..32)) {
        decode_stream(&stream, &cuts);
    }

    /// Arbitrary bodies, the decoder's real input once framing is done.
    #[test]
    fn arbitrary_bodies_never_panic(body in vec(any::<u8>(), 0..512)) {
        decode_body(&body);
    }

    /// Valid frames split at arbitrary points come out whole and in order.
    #[test]
    fn messages_round_trip_through_any_split(guest in vec(guest_message(), 1..12),
                                             host in vec(host_message(), 1..12),
                                             cuts in vec(1usize..50, 1..8)) {
        let stream: Vec<u8> = guest.iter().flat_map(|m| encode(m).unwrap()).collect();
        let bodies = frames(&stream, &cuts).unwrap();
        let decoded: Vec<GuestMessage> = bodies.iter().map(|b| decode(b).unwrap()).collect();
        // Compared as bytes: a NaN load never equals itself.
        let encoded = |m: &GuestMessage| encode(m).unwrap();
        prop_assert_eq!(decoded.iter().map(encoded).collect::<Vec<_>>(),
                        guest.iter().map(encoded).collect::<Vec<_>>());

        let stream: Vec<u8> = host.iter().flat_map(|m| encode(m).unwrap()).collect();
        let bodies = frames(&stream, &cuts).unwrap();
        let decoded: Vec<HostMessage> = bodies.iter().map(|b| decode(b).unwrap()).collect();
        prop_assert_eq!(decoded, host);
    }

    /// Valid frames with bytes overwritten, cut short or extended: never a panic.
    #[test]
    fn mutated_frames_never_panic(message in guest_message(),
                                  edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                  keep in any::<prop::sample::Index>(),
                                  tail in vec(any::<u8>(), 0..16)) {
        let mut frame = encode(&message).unwrap();
        for (at, byte) in &edits {
            let at = at.index(frame.len());
            frame[at] = *byte;
        }
        frame.truncate(keep.index(frame.len() + 1));
        frame.extend_from_slice(&tail);
        decode_stream(&frame, &[7]);
    }

    /// A version-1 host decodes every metrics message a guest sends it, and reads the same
    /// metrics a version-2 host does.
    #[test]
    fn metrics_for_version_1_decode_as_version_1(metrics in metrics(),
                                                 cpu in prop::option::of(cpu_usage())) {
        let to_v1 = encode(&GuestMessage::metrics(1, metrics, cpu)).unwrap();
        prop_assert_eq!(&to_v1, &encode(&GuestMessage::Metrics(metrics)).unwrap());
        let to_v2 = encode(&GuestMessage::metrics(2, metrics, cpu)).unwrap();
        let sent = match decode::<GuestMessage>(&to_v2[4..]).unwrap() {
            GuestMessage::Metrics(m) => m,
            GuestMessage::MetricsV2 { metrics: m, .. } => m,
            other => panic!("not metrics: {other:?}"),
        };
        // Compared as bytes: a NaN load never equals itself.
        prop_assert_eq!(encode(&GuestMessage::Metrics(sent)).unwrap(), to_v1);
    }

    /// A message encodes exactly when its body fits a frame, so whatever is sent can be read.
    #[test]
    fn encode_refuses_only_oversized_bodies(extra in 0usize..64) {
        let reason = "x".repeat(MAX_FRAME_BYTES - 32 + extra);
        let message = GuestMessage::InternalError { reason };
        match encode(&message) {
            Ok(frame) => {
                let mut decoder = FrameDecoder::new();
                decoder.push(&frame);
                let body = decoder.next_frame().unwrap().unwrap();
                prop_assert_eq!(decode::<GuestMessage>(&body).unwrap(), message);
            }
            Err(FrameError::TooLarge(n)) => prop_assert!(n > MAX_FRAME_BYTES),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}
