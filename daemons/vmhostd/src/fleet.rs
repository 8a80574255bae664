//! This host in its fleet. On the QUIC endpoint it answers peers (leases against the host
//! ledger, gossip, their requests); it publishes its capacity through gossip; it places a
//! VM on another host when it has no room itself; and it answers the fleet-wide requests.

use crate::config::FleetConfig;
use crate::error::HostError;
use crate::host::Host;
use anyhow::Context;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmhost_api::{
    ApiError, CreateVm, ErrorKind, FleetHost, ImageRef, PeerCall, PeerEnvelope, Reply, Request,
    Resources, Response, PEER_API_VERSION,
};
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::Lease;
use vmhost_gossip::membership::{HostView, Member, Membership, MembershipConfig};
use vmhost_gossip::quic::{self, FleetEndpoint, FleetRequest, FleetResponse, Peer};

mod cold;
mod drain;
mod migration;
mod rebalance;
mod suspects;
mod trust;

/// How often this host re-publishes its view and expires stale leases.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// A request run on another host may boot a guest under emulation.
const PEER_API_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs the calls peers make of this host (the router decides what each may ask).
pub type PeerCalls =
    Arc<dyn Fn(Peer, PeerEnvelope) -> BoxFuture<'static, Result<Reply, ApiError>> + Send + Sync>;

pub struct Fleet {
    host: Arc<Host>,
    endpoint: Arc<FleetEndpoint>,
    membership: Membership,
    config: FleetConfig,
    /// The VMs whose migration away this vmhostd follows now.
    followed: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Bounds the migrations this host starts on its own (drains, rebalancing).
    own_moves: tokio::sync::Semaphore,
    /// Peers whose gossip overstated their room, ranked last for a while.
    suspects: suspects::Suspects,
    /// The images this host has, by name, with their ids: read once, as images change
    /// only with a restart.
    images: BTreeMap<String, String>,
}

impl Fleet {
    /// Joins the fleet named in the config, if any.
    pub async fn start(host: Arc<Host>, calls: PeerCalls) -> anyhow::Result<Option<Arc<Fleet>>> {
        let Some(config) = host.config.fleet.clone() else {
            return Ok(None);
        };
        let identity = trust::load(&config.credentials)?;
        let endpoint = Arc::new(
            FleetEndpoint::bind(config.listen, &identity)
                .context("cannot open the fleet endpoint")?,
        );
        trust::apply(&endpoint, &identity, &config.denied_hosts).await?;
        migration::take_tunnels(&endpoint, host.clone());
        let served = host.clone();
        endpoint.serve_peers(Arc::new(move |peer, request| {
            serve_peer(&served, calls.clone(), peer, request)
        }));
        let images = crate::validate::image_ids(&host.config);
        let membership = Membership::start(
            endpoint.clone(),
            MembershipConfig {
                cluster: config.cluster.clone(),
                name: host.name().to_string(),
                advertise: config.advertise(),
                seeds: config.seeds.clone(),
                gossip_interval: Duration::from_millis(config.gossip_interval_ms),
                dead_host_grace: Duration::from_secs(config.dead_host_grace_secs),
            },
            &own_view(&host, &config, &images),
        )
        .await?;
        tracing::info!(addr = %config.advertise(), cluster = %config.cluster, seeds = ?config.seeds, "joined the fleet");
        let fleet = Arc::new(Fleet {
            host,
            endpoint,
            membership,
            own_moves: tokio::sync::Semaphore::new(config.max_concurrent_migrations as usize),
            config,
            followed: Default::default(),
            suspects: Default::default(),
            images,
        });
        fleet.spawn_drainer();
        fleet.spawn_cold_settler();
        if fleet.config.rebalance {
            fleet.spawn_rebalancer();
        }
        let publisher = Arc::downgrade(&fleet);
        tokio::spawn(async move {
            while let Some(fleet) = publisher.upgrade() {
                fleet.host.admission.expire_leases();
                fleet
                    .membership
                    .publish(&own_view(&fleet.host, &fleet.config, &fleet.images))
                    .await;
                drop(fleet);
                tokio::time::sleep(PUBLISH_INTERVAL).await;
            }
        });
        Ok(Some(fleet))
    }

    pub async fn hosts(&self) -> Reply {
        Reply::Hosts(
            self.membership
                .members()
                .await
                .into_iter()
                .map(fleet_host)
                .collect(),
        )
    }

    /// Here if it fits; otherwise on the live host with the most free memory that grants a
    /// lease, trying the next when one refuses.
    pub async fn create(&self, create: CreateVm) -> Result<Reply, ApiError> {
        let local_refusal = match self.host.create(create.clone(), None).await {
            Err(
                refusal @ (HostError::Capacity(_) | HostError::NoRoom(_) | HostError::NoImage(_)),
            ) => refusal,
            other => return other.map(|vm| Reply::Vm(Box::new(vm))).map_err(Into::into),
        };
        let cu = create.cu.unwrap_or(create.min_cu);
        // Hosts that have the image come first; without it here, only they can take the VM.
        let image = match &create.image {
            ImageRef::Named(name) => Some(name.as_str()),
            ImageRef::Path(_) => None,
        };
        let has_image = |v: &HostView| image.is_none_or(|name| v.has_image(name, None));
        let image_required = matches!(local_refusal, HostError::NoImage(_));
        let mut candidates: Vec<HostView> = self
            .live_peers()
            .await
            .into_iter()
            .filter(|v| v.has_room_for(v.cu_shape.resources(cu)))
            .filter(|v| v.has_disk_room(create.disk_gib))
            .filter(|v| !image_required || has_image(v))
            .collect();
        candidates.sort_by_key(|v| (!has_image(v), std::cmp::Reverse(v.free().memory_bytes)));
        self.suspects.rank(&mut candidates, Instant::now());
        let mut refusals = vec![format!("{}: {local_refusal}", self.host.name())];
        for target in candidates {
            let size = target.cu_shape.resources(cu);
            let lease = match self.reserve(&target, &create.name, size).await {
                Ok(lease) => lease,
                Err(refusal) => {
                    refusals.push(format!("{}: {refusal}", target.name));
                    continue;
                }
            };
            tracing::info!(vm = %create.name, host = %target.name, lease = lease.id, "placing VM on another host");
            let placed = CreateVm {
                lease: Some(lease.id),
                ..create.clone()
            };
            let call = PeerCall::Forwarded(Request::Create(placed));
            let error = match self.call_peer(&target, call).await {
                Ok(reply) => return Ok(reply),
                Err(error) => error,
            };
            // A committed lease is no longer a lease; releasing it changes nothing.
            self.release(&target, lease.id).await;
            if error.kind != ErrorKind::CapacityExceeded {
                return Err(error);
            }
            // Its lease, or its gossip of disk room, promised what it then refused.
            let why = format!("granted lease {} and then refused: {error}", lease.id);
            self.suspects
                .mark(&target.name, suspects::BROKEN_LEASE, &why, Instant::now());
            refusals.push(format!("{}: {error}", target.name));
        }
        Err(ApiError::new(
            ErrorKind::CapacityExceeded,
            format!(
                "no host of the fleet has room for VM '{}' at {cu} CU ({})",
                create.name,
                refusals.join("; ")
            ),
        ))
    }

    /// The other hosts gossip shows alive.
    async fn live_peers(&self) -> Vec<HostView> {
        self.membership
            .members()
            .await
            .into_iter()
            .filter(|m| m.live && m.view.name != self.host.name() && !self.denies(&m.view.name))
            .map(|m| m.view)
            .collect()
    }

    async fn reserve(&self, target: &HostView, vm: &str, size: Resources) -> Result<Lease, String> {
        let request = FleetRequest::Lease(LeaseRequest::Reserve {
            vm: vm.to_string(),
            holder: self.host.name().to_string(),
            resources: size,
            ttl_ms: self.config.lease_ttl_secs * 1000,
        });
        match self
            .endpoint
            .call(target.addr, &target.name, &request)
            .await
        {
            Ok(FleetResponse::Lease(LeaseResponse::Granted(lease))) => Ok(lease),
            Ok(FleetResponse::Lease(LeaseResponse::Refused { reason, .. })) => {
                // Its view said it had room (every caller checks), yet it refused.
                if target.has_room_for(size) {
                    self.suspects.mark(
                        &target.name,
                        suspects::REFUSED_LEASE,
                        &reason,
                        Instant::now(),
                    );
                }
                Err(reason)
            }
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn release(&self, target: &HostView, id: u64) {
        let request = FleetRequest::Lease(LeaseRequest::Release { id });
        if let Err(error) = self
            .endpoint
            .call(target.addr, &target.name, &request)
            .await
        {
            tracing::warn!(host = %target.name, lease = id, %error, "cannot release a lease; it will expire");
        }
    }

    /// This host's VMs and those of every live peer.
    pub async fn list(&self) -> Reply {
        let mut vms = self.host.list();
        let mut unreachable = Vec::new();
        let peers: Vec<Member> = self
            .membership
            .members()
            .await
            .into_iter()
            .filter(|m| m.view.name != self.host.name())
            .collect();
        let answers = futures::future::join_all(peers.iter().filter(|m| m.live).map(|m| async {
            let call = PeerCall::Forwarded(Request::List);
            (&m.view.name, self.call_peer(&m.view, call).await)
        }))
        .await;
        for (name, answer) in answers {
            match answer {
                Ok(Reply::Vms(theirs)) => vms.extend(theirs),
                Ok(_) => unreachable.push(format!("{name} (unexpected reply)")),
                Err(error) => unreachable.push(format!("{name} ({error})")),
            }
        }
        unreachable.extend(
            peers
                .iter()
                .filter(|m| !m.live)
                .map(|m| format!("{} (dead)", m.view.name)),
        );
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Reply::FleetVms { vms, unreachable }
    }

    /// Runs an operator's request on another host, named.
    pub async fn on_host(&self, name: &str, request: Request) -> Result<Reply, ApiError> {
        let members = self.membership.members().await;
        let Some(target) = members.iter().find(|m| m.view.name == name) else {
            let known: Vec<_> = members.iter().map(|m| m.view.name.as_str()).collect();
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "no host named '{name}' in the fleet (known: {})",
                    known.join(", ")
                ),
            ));
        };
        self.call_peer(&target.view, PeerCall::Forwarded(request))
            .await
    }

    /// Runs a call on another host, in the version its connection speaks.
    async fn call_peer(&self, target: &HostView, call: PeerCall) -> Result<Reply, ApiError> {
        let unreachable = |message: String| {
            ApiError::new(
                ErrorKind::Internal,
                format!("host '{}': {message}", target.name),
            )
        };
        let peer = self
            .endpoint
            .connect(target.addr, &target.name)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let envelope = PeerEnvelope {
            version: peer.version.min(PEER_API_VERSION),
            call,
        };
        let answer = self
            .endpoint
            .call_with_timeout(
                target.addr,
                &target.name,
                &FleetRequest::Api(envelope.to_json()),
                PEER_API_TIMEOUT,
            )
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let FleetResponse::Api(json) = answer else {
            return Err(unreachable(format!("unexpected answer {answer:?}")));
        };
        match serde_json::from_str(&json) {
            Ok(Response::Ok(reply)) => Ok(reply),
            Ok(Response::Error(error)) => Err(ApiError::new(
                error.kind,
                format!("on host '{}': {}", target.name, error.message),
            )),
            Err(e) => Err(unreachable(format!("unreadable answer: {e}"))),
        }
    }

    pub fn close(&self) {
        self.endpoint.close();
    }
}

/// A peer's request. The peer is a fleet host (the endpoint checked its certificate), but
/// its bytes are still checked like anyone's.
fn serve_peer(
    host: &Arc<Host>,
    calls: PeerCalls,
    peer: Peer,
    request: FleetRequest,
) -> quic::Reply {
    match request {
        FleetRequest::Ping => quic::answer(FleetResponse::Pong),
        // The endpoint hands tunnels to `take_tunnels`; one never reaches here.
        FleetRequest::Tunnel { .. } => quic::answer(FleetResponse::Error {
            reason: "a tunnel is not a request".into(),
        }),
        // Off the runtime's threads: a grant is fsynced before it is answered.
        FleetRequest::Lease(request) => {
            let host = host.clone();
            Box::pin(async move {
                let served = tokio::task::spawn_blocking(move || {
                    host.admission.serve_lease(&peer.name, request)
                })
                .await;
                match served {
                    Ok(response) => FleetResponse::Lease(response),
                    Err(e) => FleetResponse::Error {
                        reason: format!("lease request failed: {e}"),
                    },
                }
            })
        }
        FleetRequest::Api(json) => Box::pin(async move {
            let response = match PeerEnvelope::from_json(&json) {
                Err(e) => Response::Error(ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!("malformed request: {e}"),
                )),
                // Its own task: a peer that hangs up must not cancel a create halfway.
                Ok(envelope) => match tokio::spawn(calls(peer, envelope)).await {
                    Ok(Ok(reply)) => Response::Ok(reply),
                    Ok(Err(error)) => Response::Error(error),
                    Err(e) => Response::Error(ApiError::new(
                        ErrorKind::Internal,
                        format!("request handler failed: {e}"),
                    )),
                },
            };
            FleetResponse::Api(
                serde_json::to_string(&response).expect("responses always serialize"),
            )
        }),
    }
}

/// Whether `view`'s host can boot `spec`: it has the VM's image under the same id. A VM
/// booted from a path carries no image name to look for.
fn has_image_of(view: &HostView, spec: &crate::store::VmSpec) -> bool {
    match &spec.image {
        ImageRef::Named(name) => view.has_image(name, spec.boot.image_id.as_deref()),
        ImageRef::Path(_) => true,
    }
}

fn own_view(host: &Host, config: &FleetConfig, images: &BTreeMap<String, String>) -> HostView {
    let info = host.host_info();
    HostView {
        name: info.name,
        addr: config.advertise(),
        cu_shape: info.cu_shape,
        capacity: info.capacity,
        allocated: info.allocated,
        leased: info.leased,
        watermark_memory_bytes: (info.capacity.memory_bytes as f64 * config.watermark) as u64,
        vms: info.vms as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        drain: host.drain_phase(),
        images: images.clone(),
        disk_free_gib: Some(
            info.disk_capacity_gib
                .saturating_sub(info.disk_allocated_gib),
        ),
    }
}

fn fleet_host(member: Member) -> FleetHost {
    let view = member.view;
    FleetHost {
        name: view.name,
        addr: view.addr.to_string(),
        live: member.live,
        cu_shape: view.cu_shape,
        capacity: view.capacity,
        allocated: view.allocated,
        leased: view.leased,
        vms: view.vms,
        version: view.version,
        drain: view.drain,
    }
}
