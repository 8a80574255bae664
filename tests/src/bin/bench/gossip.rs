//! How fast a capacity change reaches every host, and what gossip costs.
//!
//! - `real`: N hosts in this process on loopback, vmhost's gossip (chitchat over QUIC with
//!   mutual TLS) against stock chitchat over plain UDP, measured alternately.
//! - `simulated`: chitchat's in-process transport on a virtual clock for 10, 100 and 1000
//!   hosts, vmhost's chitchat configuration against stock chitchat, counted in gossip rounds
//!   against the goal of 2·log2(N).

use super::{append, fleet_identities, median, today, LOCALHOST};
use chitchat::transport::{ChannelTransport, Transport, UdpTransport};
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use vmhost_api::Resources;
use vmhost_gossip::membership::{encode_view, HostView, Membership, MembershipConfig, HOST_KEY};
use vmhost_gossip::quic::{answer, FleetEndpoint, FleetResponse};

const INTERVAL: Duration = Duration::from_millis(100);
const CHANGES: usize = 5;
/// How often a change's arrival is checked.
const POLL: Duration = Duration::from_millis(5);

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
        disk_free_gib: None,
    }
}

/// Polls every `poll` until `reached` holds, then returns the time since `since`.
async fn until(
    since: Instant,
    what: &str,
    poll: Duration,
    mut reached: impl AsyncFnMut() -> bool,
) -> Duration {
    while !reached().await {
        assert!(
            since.elapsed() < Duration::from_secs(300),
            "gave up waiting for {what}"
        );
        tokio::time::sleep(poll).await;
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
        until(started, "our change to spread", POLL, async || {
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

/// How a node of `Chitchats` is set up.
#[derive(Clone, Copy)]
enum Setup {
    /// chitchat publishing one short value under the same key.
    Stock,
    /// vmhost's chitchat configuration, publishing its JSON host view.
    Vmhost,
}

impl Setup {
    fn config(
        self,
        name: String,
        addr: SocketAddr,
        seed: &[SocketAddr],
        interval: Duration,
    ) -> ChitchatConfig {
        match self {
            Setup::Stock => ChitchatConfig {
                chitchat_id: ChitchatId::new(name, 0, addr),
                cluster_id: "bench".into(),
                gossip_interval: interval,
                listen_addr: addr,
                seed_nodes: seed.iter().map(SocketAddr::to_string).collect(),
                failure_detector_config: chitchat::FailureDetectorConfig {
                    initial_interval: interval,
                    ..Default::default()
                },
                marked_for_deletion_grace_period: Duration::from_secs(3600),
                catchup_callback: None,
                extra_liveness_predicate: None,
                protocol_version: chitchat::ProtocolVersion::V1,
            },
            Setup::Vmhost => MembershipConfig {
                cluster: "bench".into(),
                name,
                advertise: addr,
                seeds: seed.to_vec(),
                gossip_interval: interval,
                // vmhostd's default.
                dead_host_grace: Duration::from_secs(600),
            }
            .chitchat_config(0),
        }
    }

    /// What host `name` publishes as its change number `change` (0 at start).
    fn value(self, name: &str, addr: SocketAddr, change: u32) -> String {
        match self {
            Setup::Stock => change.to_string(),
            Setup::Vmhost => encode_view(&view(name, addr, change)),
        }
    }
}

/// chitchat nodes on `transport`, each seeded with the one started before it.
struct Chitchats {
    setup: Setup,
    nodes: Vec<ChitchatHandle>,
}

impl Chitchats {
    async fn start(
        setup: Setup,
        hosts: usize,
        transport: &dyn Transport,
        in_process: bool,
        interval: Duration,
    ) -> Chitchats {
        let mut nodes = Vec::new();
        let mut seed = Vec::new();
        for i in 0..hosts {
            let addr = if in_process {
                SocketAddr::new(LOCALHOST, 20_000 + i as u16)
            } else {
                // A free port, for the UDP transport to bind again.
                std::net::UdpSocket::bind((LOCALHOST, 0))
                    .and_then(|socket| socket.local_addr())
                    .expect("a free UDP port")
            };
            let name = format!("h{i}");
            let mut config = setup.config(name.clone(), addr, &seed, interval);
            // The default window, 1000 heartbeat intervals (8 KB) per peer, takes 8 GB when a
            // thousand nodes share one process. It only sets how fast a peer's mean interval
            // adapts, and these peers' never changes.
            config.failure_detector_config.sampling_window_size = 16;
            let initial = vec![(HOST_KEY.to_string(), setup.value(&name, addr, 0))];
            nodes.push(
                chitchat::spawn_chitchat(config, initial, transport)
                    .await
                    .unwrap(),
            );
            seed = vec![addr];
            // Hosts started apart gossip out of step.
            tokio::time::sleep(interval / hosts as u32).await;
        }
        Chitchats { setup, nodes }
    }

    /// Whether every node has every node's value.
    async fn converged(&self) -> bool {
        for node in &self.nodes {
            let known = node
                .with_chitchat(|c| {
                    c.node_states()
                        .values()
                        .filter(|s| s.get(HOST_KEY).is_some())
                        .count()
                })
                .await;
            if known < self.nodes.len() {
                return false;
            }
        }
        true
    }

    /// Publishes change number `change` on the first node; the time until every node has it.
    async fn change(&self, change: u32) -> Duration {
        let first = self.nodes[0].chitchat_id().clone();
        let value = self
            .setup
            .value(&first.node_id, first.gossip_advertise_addr, change);
        let started = Instant::now();
        self.nodes[0]
            .with_chitchat(|c| c.self_node_state().set(HOST_KEY, &value))
            .await;
        until(started, "the change to spread", POLL, async || {
            for node in &self.nodes {
                let seen = node
                    .with_chitchat(|c| {
                        c.node_state(&first).and_then(|s| s.get(HOST_KEY)) == Some(value.as_str())
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

    async fn shutdown(self) {
        for node in self.nodes {
            let _ = node.shutdown().await;
        }
    }
}

pub async fn real(hosts: usize) {
    let (ours, _dir) = Ours::start(hosts).await;
    let udp = Chitchats::start(Setup::Stock, hosts, &UdpTransport, false, INTERVAL).await;
    until(Instant::now(), "our cluster to form", POLL, async || {
        ours.converged().await
    })
    .await;
    until(
        Instant::now(),
        "the UDP cluster to form",
        POLL,
        async || udp.converged().await,
    )
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
    let simulated = Chitchats::start(Setup::Stock, hosts, &channel, true, INTERVAL).await;
    until(
        Instant::now(),
        "the in-process cluster to form",
        POLL,
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

/// Runs on a paused clock that jumps to the next timer once every node is idle: a round then
/// lasts exactly one interval however long its messages take to process, so a thousand nodes
/// on two cores neither fall behind nor pile up undelivered digests.
pub fn simulated(max_hosts: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    std::thread::spawn(move || runtime.block_on(simulate(max_hosts)))
        .join()
        .unwrap();
}

async fn simulate(max_hosts: usize) {
    let interval = Duration::from_millis(500);
    for hosts in [10, 100, 1000].into_iter().filter(|&n| n <= max_hosts) {
        let mut rounds = Vec::new();
        // One cluster at a time: the clock is virtual, so no machine noise to alternate over.
        for setup in [Setup::Vmhost, Setup::Stock] {
            let transport = ChannelTransport::default();
            let cluster = Chitchats::start(setup, hosts, &transport, true, interval).await;
            until(
                Instant::now(),
                "the simulated cluster to form",
                interval,
                async || cluster.converged().await,
            )
            .await;
            let mut times = Vec::new();
            for change in 1..=CHANGES as u32 {
                times.push(cluster.change(change).await);
            }
            rounds.push(median(&mut times) / interval.as_secs_f64());
            cluster.shutdown().await;
        }
        let (ours, stock) = (rounds[0], rounds[1]);
        let log2 = (hosts as f64).log2();
        let ms = |rounds: f64| rounds * interval.as_secs_f64() * 1000.0;
        append(&format!(
            "- {} capacity change reaching all {hosts} hosts (simulated: chitchat's in-process transport on a virtual clock, gossip every {} ms, the hosts' rounds spread over one interval, failure-detector window 16 samples, median of {CHANGES}; ours: vmhost's chitchat configuration publishing its JSON host view, stock: chitchat publishing one short value; peak RSS {:.2} GiB): ours {:.0} ms = {ours:.1} gossip rounds, stock chitchat {:.0} ms = {stock:.1} rounds, ratio {:.2}; goal 2·log2({hosts}) = {:.1} rounds, ours/goal {:.2}; log2({hosts}) = {log2:.1}\n",
            today(),
            interval.as_millis(),
            peak_rss_gib(),
            ms(ours),
            ms(stock),
            ours / stock,
            2.0 * log2,
            ours / (2.0 * log2),
        ));
    }
}

/// This process's peak resident memory so far.
fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib / (1 << 20) as f64
}
