//! The host-guest protocol: length-prefixed postcard frames over a vsock stream.
//!
//! The guest always dials the host (CID 2, [`GUEST_PORT`]) and speaks first with
//! [`GuestMessage::Hello`]; the host answers [`HostMessage::Welcome`] with the highest
//! version both speak, or [`HostMessage::VersionRefused`] and closes. Every request carries
//! an id that its reply repeats.
//!
//! Postcard is not self-describing, so a message never changes shape: a new version adds
//! variants at the end of an enum, and a peer sends them only once that version is agreed.
//! Version 2 adds [`GuestMessage::MetricsV2`], metrics with the fast CPU signal.
//!
//! Everything here is pure: the decoder takes bytes and returns frames, so it can be
//! property-tested and fuzzed without a guest.

use serde::{Deserialize, Serialize};
use std::ops::RangeInclusive;

/// The vsock port vmhostd listens on; with a hybrid vhost-user backend, the unix socket
/// `<uds>_1024`.
pub const GUEST_PORT: u32 = 1024;
/// Protocol versions this build speaks. Only the current and the previous are kept.
pub const VERSIONS: RangeInclusive<u16> = 1..=2;
/// The first version with [`GuestMessage::MetricsV2`].
pub const CPU_USAGE_VERSION: u16 = 2;
/// The largest frame body either side accepts.
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
const LENGTH_BYTES: usize = 4;

/// The highest version in both ranges.
pub fn negotiate(ours: &RangeInclusive<u16>, theirs: &RangeInclusive<u16>) -> Option<u16> {
    let high = (*ours.end()).min(*theirs.end());
    let low = (*ours.start()).max(*theirs.start());
    (low <= high).then_some(high)
}

/// Guest metrics, sent every second and on demand.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub load1: f32,
    pub load5: f32,
    pub mem_total_bytes: u64,
    /// MemTotal − MemAvailable.
    pub mem_used_bytes: u64,
    /// Page cache (Cached).
    pub mem_cached_bytes: u64,
    /// The workload cgroup's `memory.current`.
    pub workload_mem_bytes: u64,
    pub online_cpus: u32,
}

impl Metrics {
    /// Refuses loads that are not finite, non-negative numbers: a NaN would reach every
    /// reader of the host's JSON as `null`, and no kernel reports one.
    pub fn check(&self) -> Result<(), String> {
        for (name, load) in [("load1", self.load1), ("load5", self.load5)] {
            if !load.is_finite() || load < 0.0 {
                return Err(format!("{name} {load} is not a load average"));
            }
        }
        Ok(())
    }
}

/// The fast CPU signal: the last seconds, where load1 averages a minute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuUsage {
    /// Busy share of the online vCPUs over the last ~3 s (1.0 = all busy).
    pub util: f32,
    /// `some avg10` of /proc/pressure/cpu: percent of the last 10 s in which some task
    /// waited for a CPU.
    pub pressure_some_avg10: f32,
}

impl CpuUsage {
    /// Refuses values outside what the kernel can report (NaN included).
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.util) {
            return Err(format!("cpu util {} is not within 0..=1", self.util));
        }
        if !(0.0..=100.0).contains(&self.pressure_some_avg10) {
            return Err(format!(
                "cpu pressure {} is not a percentage",
                self.pressure_some_avg10
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GuestMessage {
    Hello {
        min_version: u16,
        max_version: u16,
    },
    Metrics(Metrics),
    /// Memory pressure: the guest wants more. `pressure_age_us` is how long ago the guest
    /// detected it, so the host can log the end-to-end latency.
    UpscaleRequest {
        id: u64,
        pressure_age_us: u64,
    },
    DownscaleResult {
        id: u64,
        ok: bool,
        reason: String,
    },
    HealthCheck {
        id: u64,
    },
    HealthCheckReply {
        id: u64,
    },
    InvalidMessage {
        reason: String,
    },
    InternalError {
        reason: String,
    },
    /// Metrics with the fast CPU signal; version 2 on. Last, so older variants keep their
    /// index on the wire.
    MetricsV2 {
        metrics: Metrics,
        cpu: CpuUsage,
    },
}

impl GuestMessage {
    /// The metrics message the agreed `version` can carry: the fast CPU signal is dropped
    /// for a version-1 host, which could not decode it.
    pub fn metrics(version: u16, metrics: Metrics, cpu: Option<CpuUsage>) -> GuestMessage {
        match cpu {
            Some(cpu) if version >= CPU_USAGE_VERSION => GuestMessage::MetricsV2 { metrics, cpu },
            _ => GuestMessage::Metrics(metrics),
        }
    }
}

/// What a change left the guest with, as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostMessage {
    Welcome {
        version: u16,
    },
    VersionRefused {
        min_version: u16,
        max_version: u16,
    },
    /// The host granted resources (in reply to an upscale request, or on its own).
    UpscaleNotification {
        id: u64,
        granted: Size,
    },
    /// May the guest shrink to `target`? Answered by [`GuestMessage::DownscaleResult`].
    DownscaleRequest {
        id: u64,
        target: Size,
    },
    MetricsRequest,
    HealthCheck {
        id: u64,
    },
    HealthCheckReply {
        id: u64,
    },
    InvalidMessage {
        reason: String,
    },
    InternalError {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("undecodable message: {0}")]
    Malformed(String),
}

/// Encodes one message as a frame: a big-endian u32 length, then the postcard body.
pub fn encode<M: Serialize>(message: &M) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(LENGTH_BYTES + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes one frame body.
pub fn decode<'a, M: Deserialize<'a>>(body: &'a [u8]) -> Result<M, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Splits a byte stream into frame bodies. A length over the limit is an error before any
/// of the body is buffered, so a peer cannot make the decoder hold more than one frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame body, if one is buffered. After an error the stream is out
    /// of sync and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(header) = self.buffer.first_chunk::<LENGTH_BYTES>() else {
            return Ok(None);
        };
        let length = u32::from_be_bytes(*header) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(length));
        }
        if self.buffer.len() < LENGTH_BYTES + length {
            return Ok(None);
        }
        let body = self.buffer[LENGTH_BYTES..LENGTH_BYTES + length].to_vec();
        self.buffer.drain(..LENGTH_BYTES + length);
        Ok(Some(body))
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics {
            load1: 0.5,
            load5: 0.25,
            mem_total_bytes: 1 << 30,
            mem_used_bytes: 100 << 20,
            mem_cached_bytes: 10 << 20,
            workload_mem_bytes: 50 << 20,
            online_cpus: 2,
        }
    }

    fn cpu() -> CpuUsage {
        CpuUsage {
            util: 0.95,
            pressure_some_avg10: 42.5,
        }
    }

    #[test]
    fn negotiates_the_highest_common_version() {
        assert_eq!(negotiate(&(1..=3), &(2..=5)), Some(3));
        assert_eq!(negotiate(&(1..=1), &(1..=1)), Some(1));
        assert_eq!(negotiate(&(1..=2), &(3..=4)), None);
    }

    #[test]
    fn round_trips_every_message() {
        let guest = [
            GuestMessage::Hello {
                min_version: 1,
                max_version: 1,
            },
            GuestMessage::Metrics(metrics()),
            GuestMessage::UpscaleRequest {
                id: 7,
                pressure_age_us: 900,
            },
            GuestMessage::DownscaleResult {
                id: 8,
                ok: false,
                reason: "would starve".into(),
            },
            GuestMessage::HealthCheckReply { id: 9 },
            GuestMessage::MetricsV2 {
                metrics: metrics(),
                cpu: cpu(),
            },
        ];
        for message in guest {
            let frame = encode(&message).unwrap();
            let mut decoder = FrameDecoder::new();
            decoder.push(&frame);
            let body = decoder.next_frame().unwrap().unwrap();
            assert_eq!(decode::<GuestMessage>(&body).unwrap(), message);
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn a_version_1_host_reads_what_the_guest_sends_it() {
        // The version-1 encoding of `metrics()`, byte for byte.
        let v1 = [
            0x01, 0, 0, 0, 0x3f, 0, 0, 0x80, 0x3e, 0x80, 0x80, 0x80, 0x80, 0x04, 0x80, 0x80, 0x80,
            0x32, 0x80, 0x80, 0x80, 0x05, 0x80, 0x80, 0x80, 0x19, 0x02,
        ];
        let to_v1 = GuestMessage::metrics(1, metrics(), Some(cpu()));
        assert_eq!(postcard::to_stdvec(&to_v1).unwrap(), v1);
        assert_eq!(
            GuestMessage::metrics(2, metrics(), Some(cpu())),
            GuestMessage::MetricsV2 {
                metrics: metrics(),
                cpu: cpu()
            }
        );
        // No sample yet: the version-1 form, which a version-2 host accepts too.
        assert_eq!(
            GuestMessage::metrics(2, metrics(), None),
            GuestMessage::Metrics(metrics())
        );
        assert_eq!(negotiate(&VERSIONS, &(1..=1)), Some(1));
        assert_eq!(negotiate(&(1..=1), &VERSIONS), Some(1));
    }

    #[test]
    fn cpu_usage_outside_what_a_kernel_reports_is_refused() {
        assert!(cpu().check().is_ok());
        for (util, pressure) in [(f32::NAN, 0.0), (1.5, 0.0), (-0.1, 0.0), (0.5, 101.0)] {
            let bad = CpuUsage {
                util,
                pressure_some_avg10: pressure,
            };
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering_the_body() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&((MAX_FRAME_BYTES as u32 + 1).to_be_bytes()));
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge(MAX_FRAME_BYTES + 1))
        );
        assert!(encode(&GuestMessage::InvalidMessage {
            reason: "x".repeat(MAX_FRAME_BYTES)
        })
        .is_err());
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        assert!(matches!(
            decode::<HostMessage>(&[0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
    }
}
