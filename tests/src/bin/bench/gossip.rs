//! How fast a capacity change reaches every host, and what gossip costs.
//!
//! - `real`: N hosts in this process on loopback, vmhost's gossip (chitchat over QUIC with
//!   mutual TLS) against stock chitchat over plain UDP, measured alternately.
//! - `simulated`: chitchat's in-process transport for 10, 100 and 1000 hosts, counted in
//!   gossip rounds against log2(N), the rounds an ideal epidemic needs.

use super::{append, fleet_identities, median, today, LOCALHOST};
use chitchat::transport::{ChannelTransport, Transport, UdpTransport};
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmhost_api::Resources;
use vmhost_gossip::membership::{HostView, Membership, MembershipConfig};
use vmhost_gossip::quic::{answer, FleetEndpoint, FleetResponse};

const INTERVAL: Duration = Duration::from_millis(100);
const CHANGES: usize = 5;

fn view(name: &str, addr: SocketAddr, allocated_vcpus: u32) -> HostView {
    HostView {
        name: name.into(),
        addr,
        cu_shape: Default::default(),
        capacity: Resources {
            vcpus: 64,
            memory_bytes: 256 << 30,
        },
        allocated: Resources {
            vcpus: allocated_vcpus,
            memory_bytes: 0,
        },
        leased: Resources::default(),
        watermark_memory_bytes: 256 << 30,
        vms: 0,
        version: "bench".into(),
        drain: None,
        images: Default::default(),
    }
}

/// Polls until `reached` holds, then returns the time since `since`.
async fn until(since: Instant, what: &str, mut reached: impl AsyncFnMut() -> bool) -> Duration {
    while !reached().await {
        assert!(
            since.elapsed() < Duration::from_secs(300),
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    since.elapsed()
}

struct Ours {
    nodes: Vec<(Arc<FleetEndpoint>, Membership, HostView)>,
}

impl Ours {
    async fn start(hosts: usize) -> (Ours, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..hosts).map(|i| format!("h{i}")).collect();
        let ids = fleet_identities(
            dir.path(),
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut nodes = Vec::new();
        let mut seed = Vec::new();
        for (name, id) in names.iter().zip(&ids) {
            let endpoint =
                Arc::new(FleetEndpoint::bind(SocketAddr::new(LOCALHOST, 0), id).unwrap());
            endpoint.serve(Arc::new(|_| answer(FleetResponse::Pong)));
            let view = view(name, endpoint.local_addr(), 0);
            let config = MembershipConfig {
                cluster: "bench".into(),
                name: name.clone(),
                advertise: endpoint.local_addr(),
                seeds: seed.clone(),
                gossip_interval: INTERVAL,
                dead_host_grace: Duration::from_secs(3600),
            };
            let membership = Membership::start(endpoint.clone(), config, &view)
                .await
                .unwrap();
            seed = vec![endpoint.local_addr()];
            nodes.push((endpoint, membership, view));
        }
        (Ours { nodes }, dir)
    }

    async fn converged(&self) -> bool {
        for (_, membership, _) in &self.nodes {
            if membership.members().await.len() < self.nodes.len() {
                return false;
            }
        }
        true
    }

    /// Publishes a new allocation on the first host; the time until every host sees it.
    async fn change(&self, vcpus: u32) -> Duration {
        let (_, first, base) = &self.nodes[0];
        let changed = HostView {
            allocated: Resources {
                vcpus,
                memory_bytes: 0,
            },
            ..base.clone()
        };
        let started = Instant::now();
        first.publish(&changed).await;
        until(started, "our change to spread", async || {
            for (_, membership, _) in &self.nodes {
                let members = membership.members().await;
                if !members.iter().any(|m| m.view == changed) {
                    return false;
                }
            }
            true
        })
        .await
    }

    fn bytes_sent(&self) -> u64 {
        self.nodes
            .iter()
            .map(|(_, m, _)| m.stats.bytes_sent.load(Ordering::Relaxed))
            .sum()
    }
}

/// Stock chitchat nodes on `transport`, node 0 the seed of all.
struct Stock {
    nodes: Vec<ChitchatHandle>,
}

impl Stock {
    async fn start(
        hosts: usize,
        transport: &dyn Transport,
        in_process: bool,
        interval: Duration,
    ) -> Stock {
        let mut nodes = Vec::new();
        let mut seed: Vec<String> = Vec::new();
        for i in 0..hosts {
            let addr = if in_process {
                SocketAddr::new(LOCALHOST, 20_000 + i as u16)
            } else {
                // A free port, for the UDP transport to bind again.
                std::net::UdpSocket::bind((LOCALHOST, 0))
                    .and_then(|socket| socket.local_addr())
                    .expect("a free UDP port")
            };
            let config = ChitchatConfig {
                chitchat_id: ChitchatId::new(format!("h{i}"), 0, addr),
                cluster_id: "bench".into(),
                gossip_interval: interval,
                listen_addr: addr,
                seed_nodes: seed.clone(),
                failure_detector_config: chitchat::FailureDetectorConfig {
                    initial_interval: interval,
                    // The default window (1000 heartbeat samples per peer) takes
                    // gigabytes when a thousand nodes share one process.
                    sampling_window_size: 16,
                    ..Default::default()
                },
                marked_for_deletion_grace_period: Duration::from_secs(3600),
                catchup_callback: None,
                extra_liveness_predicate: None,
                protocol_version: chitchat::ProtocolVersion::V1,
            };
            let initial = vec![("host".to_string(), "0".to_string())];
            nodes.push(
                chitchat::spawn_chitchat(config, initial, transport)
                    .await
                    .unwrap(),
            );
            seed = vec![addr.to_string()];
        }
        Stock { nodes }
    }

    async fn converged(&self) -> bool {
        for node in &self.nodes {
            if node.with_chitchat(|c| c.node_states().len()).await < self.nodes.len() {
                return false;
            }
        }
        true
    }

    async fn change(&self, value: u32) -> Duration {
        let value = value.to_string();
        let first = self.nodes[0].chitchat_id().clone();
        let started = Instant::now();
        self.nodes[0]
            .with_chitchat(|c| c.self_node_state().set("host", &value))
            .await;
        until(started, "the stock change to spread", async || {
            for node in &self.nodes {
                let seen = node
                    .with_chitchat(|c| {
                        c.node_state(&first).and_then(|s| s.get("host")) == Some(value.as_str())
                    })
                    .await;
                if !seen {
                    return false;
                }
            }
            true
        })
        .await
    }
}

pub async fn real(hosts: usize) {
    let (ours, _dir) = Ours::start(hosts).await;
    let udp = Stock::start(hosts, &UdpTransport, false, INTERVAL).await;
    until(Instant::now(), "our cluster to form", async || {
        ours.converged().await
    })
    .await;
    until(Instant::now(), "the UDP cluster to form", async || {
        udp.converged().await
    })
    .await;

    let (mut ours_times, mut udp_times) = (Vec::new(), Vec::new());
    for change in 1..=CHANGES as u32 {
        ours_times.push(ours.change(change).await);
        udp_times.push(udp.change(change).await);
    }
    let (ours_ms, udp_ms) = (
        median(&mut ours_times) * 1000.0,
        median(&mut udp_times) * 1000.0,
    );
    append(&format!(
        "- {} capacity change reaching all {hosts} hosts (real transports on loopback, gossip every {} ms, median of {CHANGES}): ours (chitchat over QUIC, mutual TLS) {ours_ms:.0} ms, stock chitchat over plain UDP {udp_ms:.0} ms, ratio {:.2}\n",
        today(),
        INTERVAL.as_millis(),
        ours_ms / udp_ms
    ));

    // Steady state: what gossip costs while nothing changes, against the same protocol in
    // process (chitchat's own count of its message bytes).
    let window = Duration::from_secs(10);
    let channel = ChannelTransport::default();
    let simulated = Stock::start(hosts, &channel, true, INTERVAL).await;
    until(
        Instant::now(),
        "the simulated cluster to form",
        async || simulated.converged().await,
    )
    .await;
    let (ours_before, channel_before) = (ours.bytes_sent(), channel.statistics().num_bytes_total);
    tokio::time::sleep(window).await;
    let per_host_second = |bytes: u64| bytes as f64 / hosts as f64 / window.as_secs_f64();
    let ours_rate = per_host_second(ours.bytes_sent() - ours_before);
    let channel_rate = per_host_second(channel.statistics().num_bytes_total - channel_before);
    append(&format!(
        "- {} gossip bytes per host per second, {hosts} idle hosts, gossip every {} ms (chitchat message bytes, before QUIC framing and encryption): ours {ours_rate:.0} B/s, stock chitchat in process {channel_rate:.0} B/s, ratio {:.2}\n",
        today(),
        INTERVAL.as_millis(),
        ours_rate / channel_rate
    ));
}

pub async fn simulated(max_hosts: usize) {
    let interval = Duration::from_millis(500);
    for hosts in [10, 100, 1000].into_iter().filter(|&n| n <= max_hosts) {
        let cluster = Stock::start(hosts, &ChannelTransport::default(), true, interval).await;
        until(
            Instant::now(),
            "the simulated cluster to form",
            async || cluster.converged().await,
        )
        .await;
        let mut times = Vec::new();
        for change in 1..=CHANGES as u32 {
            times.push(cluster.change(change).await);
        }
        let rounds = median(&mut times) / interval.as_secs_f64();
        let ideal = (hosts as f64).log2();
        append(&format!(
            "- {} capacity change reaching all {hosts} hosts (simulated: chitchat's in-process transport, gossip every {} ms, median of {CHANGES}): {:.0} ms = {rounds:.1} gossip rounds, ideal epidemic log2({hosts}) = {ideal:.1} rounds, ratio {:.2}\n",
            today(),
            interval.as_millis(),
            rounds * interval.as_secs_f64() * 1000.0,
            rounds / ideal
        ));
        for node in cluster.nodes {
            let _ = node.shutdown().await;
        }
    }
}
