//! Membership and capacity: chitchat's scuttlebutt gossip and phi-accrual failure detector,
//! carried over the fleet's mutually authenticated QUIC connections instead of plain UDP.
//!
//! chitchat encodes its messages only inside its own UDP socket, so `ChitchatCodec` runs
//! two loopback sockets back to back: one of chitchat's (which encodes and decodes) and a raw
//! one (which sees the bytes). The bytes then travel as QUIC gossip messages; nothing from
//! outside the fleet ever reaches chitchat.

use crate::quic::{FleetEndpoint, GossipDatagram};
use anyhow::{bail, Context};
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::{ChitchatEnvelope, ChitchatHandle, ChitchatId, ChitchatMessage, ProtocolVersion};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use vmhost_api::{CuShape, DrainPhase, Resources};
use vmhost_capacity::rebalance;

/// The chitchat key under which each host publishes its `HostView`.
pub const HOST_KEY: &str = "host";
/// How long a decode may wait for chitchat's socket to hand back a datagram that is on
/// loopback already.
const DECODE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a host tells the fleet about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    /// The host's fleet (QUIC) address.
    pub addr: SocketAddr,
    /// What one compute unit is on this host.
    pub cu_shape: CuShape,
    pub capacity: Resources,
    pub allocated: Resources,
    pub leased: Resources,
    /// Placements stop once allocated + leased memory would pass this.
    pub watermark_memory_bytes: u64,
    pub vms: u32,
    /// The vmhostd version.
    pub version: String,
    /// Set while the host drains: it takes no placements or arrivals.
    #[serde(default)]
    pub drain: Option<DrainPhase>,
    /// The images configured on the host, by name, with their ids ("" for an image
    /// without one): placement prefers hosts that already have a VM's image.
    #[serde(default)]
    pub images: std::collections::BTreeMap<String, String>,
    /// GiB still free for VM disks; None from a host that does not say.
    #[serde(default)]
    pub disk_free_gib: Option<u64>,
}

impl HostView {
    /// What a new VM of `size` could still take here, by this (possibly stale) view.
    pub fn has_room_for(&self, size: Resources) -> bool {
        if self.drain.is_some() {
            return false;
        }
        let used = Resources {
            vcpus: self.allocated.vcpus.saturating_add(self.leased.vcpus),
            memory_bytes: self
                .allocated
                .memory_bytes
                .saturating_add(self.leased.memory_bytes),
        };
        used.checked_add(size).is_some_and(|total| {
            total.fits_in(self.capacity) && total.memory_bytes <= self.watermark_memory_bytes
        })
    }

    /// Whether a disk of `gib` (if any) fits here, by this view; a host that does not say
    /// is left to decide when the VM comes.
    pub fn has_disk_room(&self, gib: Option<u32>) -> bool {
        match (gib, self.disk_free_gib) {
            (Some(gib), Some(free)) => u64::from(gib) <= free,
            _ => true,
        }
    }

    /// Whether the host has image `name` (with id `id`, when one is asked for), as the
    /// rebalance planner judges it.
    pub fn has_image(&self, name: &str, id: Option<&str>) -> bool {
        rebalance::has_image(&self.images, name, id)
    }

    pub fn free(&self) -> Resources {
        self.capacity
            .saturating_sub(self.allocated)
            .saturating_sub(self.leased)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub view: HostView,
    /// False once chitchat's failure detector gives up on the host.
    pub live: bool,
}

pub struct MembershipConfig {
    pub cluster: String,
    pub name: String,
    /// This host's fleet address, as peers dial it.
    pub advertise: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub gossip_interval: Duration,
    /// A dead host is forgotten after this long.
    pub dead_host_grace: Duration,
}

impl MembershipConfig {
    /// chitchat as vmhost runs it (the gossip simulation runs the same on chitchat's
    /// in-process transport).
    pub fn chitchat_config(self, generation: u64) -> chitchat::ChitchatConfig {
        chitchat::ChitchatConfig {
            chitchat_id: ChitchatId::new(self.name, generation, self.advertise),
            cluster_id: self.cluster,
            gossip_interval: self.gossip_interval,
            listen_addr: self.advertise,
            seed_nodes: self.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: chitchat::FailureDetectorConfig {
                initial_interval: self.gossip_interval,
                dead_node_grace_period: self.dead_host_grace,
                ..Default::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        }
    }
}

/// Bytes and messages of gossip sent, for the benchmarks and metrics.
#[derive(Debug, Default)]
pub struct GossipStats {
    pub bytes_sent: AtomicU64,
    pub messages_sent: AtomicU64,
}

pub struct Membership {
    handle: ChitchatHandle,
    pub stats: Arc<GossipStats>,
}

impl Membership {
    /// Joins the fleet through `endpoint`, which must be serving (it fills the gossip inbox).
    pub async fn start(
        endpoint: Arc<FleetEndpoint>,
        config: MembershipConfig,
        view: &HostView,
    ) -> anyhow::Result<Membership> {
        let inbox = endpoint
            .take_gossip_inbox()
            .context("the fleet endpoint's gossip inbox is already in use")?;
        let stats = Arc::new(GossipStats::default());
        let transport = QuicTransport {
            endpoint,
            inbox: std::sync::Mutex::new(Some(inbox)),
            stats: stats.clone(),
        };
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let initial = vec![(HOST_KEY.to_string(), encode_view(view))];
        let handle =
            chitchat::spawn_chitchat(config.chitchat_config(generation), initial, &transport)
                .await
                .context("cannot start gossip")?;
        Ok(Membership { handle, stats })
    }

    /// Publishes this host's current view (only a change costs gossip).
    pub async fn publish(&self, view: &HostView) {
        let value = encode_view(view);
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                if state.get(HOST_KEY) != Some(value.as_str()) {
                    state.set(HOST_KEY, &value);
                }
            })
            .await;
    }

    /// Every host this one knows, itself included, with its last published view. A host
    /// whose view does not decode is left out (and logged): it cannot be placed on anyway.
    pub async fn members(&self) -> Vec<Member> {
        self.handle
            .with_chitchat(|chitchat| {
                let live: std::collections::HashSet<ChitchatId> =
                    chitchat.live_nodes().cloned().collect();
                let mut members: Vec<Member> = chitchat
                    .node_states()
                    .iter()
                    .filter(|(id, _)| !chitchat.scheduled_for_deletion_nodes().any(|d| d == *id))
                    .filter_map(|(id, state)| {
                        let text = state.get(HOST_KEY)?;
                        match serde_json::from_str::<HostView>(text) {
                            Ok(view) => Some(Member {
                                view,
                                live: live.contains(id),
                            }),
                            Err(error) => {
                                tracing::warn!(node = %id.node_id, %error, "undecodable host view in gossip");
                                None
                            }
                        }
                    })
                    .collect();
                // A restarted host appears under two generations; keep the newest.
                members.sort_by(|a, b| a.view.name.cmp(&b.view.name).then(b.live.cmp(&a.live)));
                members.dedup_by(|later, first| later.view.name == first.view.name);
                members
            })
            .await
    }

    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// A view as published under `HOST_KEY`.
pub fn encode_view(view: &HostView) -> String {
    serde_json::to_string(view).expect("a host view always encodes")
}

/// chitchat's transport over the fleet endpoint.
struct QuicTransport {
    endpoint: Arc<FleetEndpoint>,
    inbox: std::sync::Mutex<Option<mpsc::Receiver<GossipDatagram>>>,
    stats: Arc<GossipStats>,
}

#[async_trait::async_trait]
impl Transport for QuicTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inbox = self
            .inbox
            .lock()
            .expect("inbox lock")
            .take()
            .context("gossip is already running on this endpoint")?;
        let (decoded_tx, decoded) = mpsc::channel(256);
        let decoder = ChitchatCodec::open().await?;
        tokio::spawn(decode_inbox(inbox, decoder, decoded_tx));
        Ok(Box::new(QuicSocket {
            listen_addr,
            endpoint: self.endpoint.clone(),
            encoder: ChitchatCodec::open().await?,
            decoded,
            stats: self.stats.clone(),
        }))
    }
}

struct QuicSocket {
    listen_addr: SocketAddr,
    endpoint: Arc<FleetEndpoint>,
    encoder: ChitchatCodec,
    decoded: mpsc::Receiver<RecvOutcome>,
    stats: Arc<GossipStats>,
}

#[async_trait::async_trait]
impl Socket for QuicSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listen_addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let bytes = self.encoder.encode(envelope).await?;
        let num_bytes_sent = bytes.len();
        self.stats
            .bytes_sent
            .fetch_add(num_bytes_sent as u64, Ordering::Relaxed);
        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        // Never hold up chitchat's loop on a slow or dead peer.
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            if let Err(error) = endpoint.send_gossip(to, &bytes).await {
                tracing::debug!(%to, %error, "gossip not sent");
            }
        });
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.decoded
            .recv()
            .await
            .context("the gossip decoder stopped")
    }
}

async fn decode_inbox(
    mut inbox: mpsc::Receiver<GossipDatagram>,
    mut decoder: ChitchatCodec,
    decoded: mpsc::Sender<RecvOutcome>,
) {
    while let Some((from_addr, bytes)) = inbox.recv().await {
        match decoder.decode(&bytes).await {
            Ok(envelope) => {
                let outcome = RecvOutcome {
                    from_addr,
                    envelope,
                    num_bytes_received: bytes.len(),
                };
                if decoded.send(outcome).await.is_err() {
                    return;
                }
            }
            Err(error) => tracing::debug!(%from_addr, %error, "undecodable gossip dropped"),
        }
    }
}

/// chitchat's wire format, reached through its own UDP socket on loopback.
pub struct ChitchatCodec {
    chitchat_socket: UdpSocket,
    chitchat_addr: SocketAddr,
    raw: tokio::net::UdpSocket,
    raw_addr: SocketAddr,
    /// Sent after each payload to decode: a payload chitchat rejects (it drops it silently)
    /// is recognised when this arrives first. Its cluster id is random, so no peer can
    /// forge it.
    sentinel: Vec<u8>,
    sentinel_cluster: String,
}

impl ChitchatCodec {
    pub async fn open() -> anyhow::Result<ChitchatCodec> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let chitchat_socket = UdpSocket::open(loopback).await?;
        let chitchat_addr = chitchat_socket.local_addr()?;
        let raw = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("cannot bind the gossip codec's loopback socket")?;
        let raw_addr = raw.local_addr()?;
        let mut codec = ChitchatCodec {
            chitchat_socket,
            chitchat_addr,
            raw,
            raw_addr,
            sentinel: Vec::new(),
            sentinel_cluster: format!("sentinel-{:016x}", rand_u64()),
        };
        codec.sentinel = codec
            .encode(ChitchatEnvelope {
                version: ProtocolVersion::V0,
                message: ChitchatMessage::Syn {
                    cluster_id: codec.sentinel_cluster.clone(),
                    digest: Default::default(),
                },
            })
            .await?;
        Ok(codec)
    }

    pub async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<Vec<u8>> {
        self.chitchat_socket.send(self.raw_addr, envelope).await?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let (len, from) = self.raw.recv_from(&mut buf).await?;
            if from == self.chitchat_addr {
                buf.truncate(len);
                return Ok(buf);
            }
        }
    }

    pub async fn decode(&mut self, bytes: &[u8]) -> anyhow::Result<ChitchatEnvelope> {
        for datagram in [bytes, &self.sentinel[..]] {
            self.raw.send_to(datagram, self.chitchat_addr).await?;
        }
        let mut decoded = None;
        loop {
            let outcome = tokio::time::timeout(DECODE_TIMEOUT, self.chitchat_socket.recv())
                .await
                .context("the gossip codec lost a datagram on loopback")??;
            if outcome.from_addr != self.raw_addr {
                continue;
            }
            if self.is_sentinel(&outcome.envelope) {
                return decoded.context("not a chitchat message");
            }
            if decoded.is_some() {
                bail!("one payload decoded into two messages");
            }
            decoded = Some(outcome.envelope);
        }
    }

    fn is_sentinel(&self, envelope: &ChitchatEnvelope) -> bool {
        matches!(&envelope.message, ChitchatMessage::Syn { cluster_id, .. } if *cluster_id == self.sentinel_cluster)
    }
}

/// Enough randomness for a sentinel nobody outside this process can guess.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_has_an_image_by_name_and_id() {
        let mut host = view(8, 0);
        assert!(
            host.has_image("postgres", Some("abc")),
            "a host that says nothing"
        );
        host.images.insert("test".into(), String::new());
        host.images.insert("postgres".into(), "abc".into());
        assert!(host.has_image("postgres", None));
        assert!(host.has_image("postgres", Some("abc")));
        assert!(!host.has_image("postgres", Some("def")));
        assert!(!host.has_image("other", None));
        assert!(host.has_image("test", None));
    }

    #[test]
    fn a_disk_fits_by_the_room_a_host_says_it_has() {
        let mut host = view(8, 0);
        assert!(host.has_disk_room(Some(100)), "a host that says nothing");
        host.disk_free_gib = Some(10);
        assert!(host.has_disk_room(Some(10)));
        assert!(!host.has_disk_room(Some(11)));
        assert!(host.has_disk_room(None), "no disk");
    }

    fn view(memory_gib: u64, allocated_gib: u64) -> HostView {
        HostView {
            name: "b".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            cu_shape: CuShape::default(),
            capacity: Resources {
                vcpus: 8,
                memory_bytes: memory_gib << 30,
            },
            allocated: Resources {
                vcpus: 1,
                memory_bytes: allocated_gib << 30,
            },
            leased: Resources::default(),
            watermark_memory_bytes: (memory_gib << 30) * 9 / 10,
            vms: 1,
            version: "0".into(),
            drain: None,
            images: Default::default(),
            disk_free_gib: None,
        }
    }

    #[test]
    fn room_respects_capacity_and_watermark() {
        let one = Resources {
            vcpus: 1,
            memory_bytes: 1 << 30,
        };
        assert!(view(10, 7).has_room_for(one));
        // 9 of 10 GiB is exactly the watermark; 9.x is past it.
        assert!(view(10, 8).has_room_for(one));
        assert!(!view(10, 9).has_room_for(one));
    }

    #[tokio::test]
    async fn the_codec_round_trips_and_rejects_garbage() {
        let mut codec = ChitchatCodec::open().await.unwrap();
        let envelope = ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::Syn {
                cluster_id: "fleet".into(),
                digest: Default::default(),
            },
        };
        let bytes = codec
            .encode(ChitchatEnvelope {
                version: ProtocolVersion::V1,
                message: ChitchatMessage::Syn {
                    cluster_id: "fleet".into(),
                    digest: Default::default(),
                },
            })
            .await
            .unwrap();
        assert_eq!(codec.decode(&bytes).await.unwrap(), envelope);
        for garbage in [&b""[..], b"\xff\xff\xff\xff", &bytes[..bytes.len() - 1]] {
            assert!(codec.decode(garbage).await.is_err(), "{garbage:?} decoded");
        }
        // Still in step after the garbage.
        assert_eq!(codec.decode(&bytes).await.unwrap(), envelope);
    }
}
