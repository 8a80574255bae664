//! The fleet's part in moving a VM: choosing the target, leasing room there, and carrying
//! the migration over QUIC tunnels. What happens to the VM and its QEMU is
//! `crate::migration`'s; it reaches the target through `PeerTarget`.

use super::*;
use crate::migration::{MigrationOptions, TargetHost, TaskGuard};
use std::collections::HashSet;
use std::path::Path;
use tokio::sync::mpsc;
use vmhost_api::{CuShape, MigrateVm, MigrationProgress, MigrationSummary, PeerRequest};

/// Marks a VM's migration as followed by this vmhostd until dropped.
struct Following<'a> {
    followed: &'a std::sync::Mutex<HashSet<String>>,
    vm: String,
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        self.followed
            .lock()
            .expect("followed lock")
            .remove(&self.vm);
    }
}

/// Another host of the fleet as a migration's target.
pub(super) struct PeerTarget<'a> {
    pub(super) fleet: &'a Fleet,
    pub(super) view: HostView,
}

#[async_trait::async_trait]
impl TargetHost for PeerTarget<'_> {
    fn name(&self) -> &str {
        &self.view.name
    }

    async fn prepare(&self, incoming: vmhost_api::IncomingMigration) -> Result<(), ApiError> {
        let call = PeerCall::Peer(PeerRequest::MigrateIn(Box::new(incoming)));
        self.fleet.call_peer(&self.view, call).await.map(drop)
    }

    async fn listen_again(&self, vm: &str) -> Result<(), ApiError> {
        let call = PeerCall::Peer(PeerRequest::MigrateRecover { name: vm.into() });
        self.fleet.call_peer(&self.view, call).await.map(drop)
    }

    async fn runs(&self, vm: &str) -> bool {
        let call = PeerCall::Forwarded(Request::Show { name: vm.into() });
        matches!(
            self.fleet.call_peer(&self.view, call).await,
            Ok(Reply::Vm(info)) if info.state == vmhost_api::VmState::Running
        )
    }

    async fn release_lease(&self, lease: u64) {
        self.fleet.release(&self.view, lease).await
    }

    /// The target commits the lease when the VM arrives, or drops it when renewals stop.
    fn keep_lease(&self, id: u64) -> TaskGuard {
        let endpoint = self.fleet.endpoint.clone();
        let (addr, host) = (self.view.addr, self.view.name.clone());
        let ttl_ms = self.fleet.config.lease_ttl_secs * 1000;
        TaskGuard(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(ttl_ms / 3)).await;
                let renew = FleetRequest::Lease(LeaseRequest::Renew { id, ttl_ms });
                match endpoint.call(addr, &host, &renew).await {
                    Ok(FleetResponse::Lease(LeaseResponse::Renewed(_))) => {}
                    // Committed at the switchover, or dropped by the target: nothing to keep.
                    Ok(FleetResponse::Lease(
                        LeaseResponse::Committed(_) | LeaseResponse::Unknown { .. },
                    )) => return,
                    Ok(other) => tracing::warn!(%host, lease = id, ?other, "lease not renewed"),
                    Err(error) => {
                        tracing::warn!(%host, lease = id, %error, "cannot renew the lease")
                    }
                }
            }
        }))
    }

    /// Carries every connection the source QEMU makes to `socket` (the stream, and each
    /// resume after a broken link) through a new tunnel to the target.
    fn forward(&self, socket: &Path, tunnel: u64) -> Result<TaskGuard, ApiError> {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).map_err(|e| {
            crate::error::internal(format!("cannot listen on {}: {e}", socket.display()))
        })?;
        let endpoint = self.fleet.endpoint.clone();
        let (addr, host) = (self.view.addr, self.view.name.clone());
        Ok(TaskGuard(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                match endpoint.open_tunnel(addr, &host, tunnel).await {
                    Ok((send, recv)) => {
                        tokio::spawn(async move {
                            let (sent, received) = quic::splice(stream, send, recv).await;
                            tracing::info!(sent, received, "migration tunnel closed");
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%host, %error, "cannot open the migration tunnel")
                    }
                }
            }
        })))
    }
}

impl Fleet {
    /// Migrates a VM of this host, or resumes its paused post-copy migration, reporting
    /// progress on `progress` as it goes.
    pub async fn migrate(
        &self,
        request: MigrateVm,
        progress: mpsc::Sender<MigrationProgress>,
    ) -> Result<MigrationSummary, ApiError> {
        let _following = self.follow_migration(&request.name)?;
        let name = request.name.as_str();
        if request.resume {
            let (departing, departure) = self.host.stranded_departure(name).await?;
            let view = self
                .live_peers()
                .await
                .into_iter()
                .find(|v| v.name == departure.target)
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::NotFound,
                        format!(
                            "host '{}', where VM '{name}' was going, is not live in the fleet; \
                             the VM stays paused until it is",
                            departure.target
                        ),
                    )
                })?;
            let target = PeerTarget { fleet: self, view };
            return self
                .host
                .resume_departure(departing, departure, &target, &progress)
                .await;
        }
        let departing = self.host.begin_departure(name).await?;
        let chosen = async {
            let view = self
                .choose_target(request.to.as_deref(), &departing)
                .await?;
            let lease = self
                .reserve(&view, name, departing.size)
                .await
                .map_err(|reason| {
                    crate::migration::capacity_refusal(&view.name, name, departing.size, reason)
                })?;
            Ok::<_, ApiError>((view, lease))
        }
        .await;
        let (view, lease) = match chosen {
            Ok(chosen) => chosen,
            Err(error) => {
                self.host.abandon_departure(departing).await;
                return Err(error);
            }
        };
        let options = MigrationOptions {
            postcopy: !request.precopy_only,
            max_downtime_ms: request.max_downtime_ms,
            bandwidth_mib: request.bandwidth_mib,
        };
        let target = PeerTarget { fleet: self, view };
        self.host
            .migrate_out(departing, &target, lease.id, options, &progress)
            .await
    }

    /// Whether a peer's gossip has not overstated its room lately.
    pub(super) fn trusted(&self, view: &HostView) -> bool {
        !self.suspects.is_suspect(&view.name, Instant::now())
    }

    /// Refuses a second follower of the same migration (a resume while the first still
    /// recovers, say).
    fn follow_migration(&self, vm: &str) -> Result<Following<'_>, ApiError> {
        if !self
            .followed
            .lock()
            .expect("followed lock")
            .insert(vm.to_string())
        {
            return Err(ApiError::new(
                ErrorKind::WrongState,
                format!("VM '{vm}' is migrating and this host is following it; wait for the end"),
            ));
        }
        Ok(Following {
            followed: &self.followed,
            vm: vm.to_string(),
        })
    }

    /// The named host, or the live host with the most free memory that has room.
    async fn choose_target(
        &self,
        to: Option<&str>,
        departing: &crate::migration::Departing,
    ) -> Result<HostView, ApiError> {
        let name = &departing.spec.name;
        let shape_here = departing.spec.cu_shape;
        let peers = self.live_peers().await;
        let target = match to {
            Some(host) if host == self.host.name() => {
                return Err(ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!("VM '{name}' already runs on host '{host}'"),
                ))
            }
            Some(host) => peers.into_iter().find(|v| v.name == host).ok_or_else(|| {
                ApiError::new(
                    ErrorKind::NotFound,
                    format!("no live host named '{host}' in the fleet"),
                )
            })?,
            None => peers
                .into_iter()
                .filter(|v| v.cu_shape == shape_here && v.has_room_for(departing.size))
                .filter(|v| v.has_disk_room(departing.spec.disk_gib))
                .filter(|v| super::has_image_of(v, &departing.spec))
                .max_by_key(|v| (self.trusted(v), v.free().memory_bytes))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::CapacityExceeded,
                        format!(
                            "no other live host has room for VM '{name}' ({})",
                            departing.size
                        ),
                    )
                })?,
        };
        if target.cu_shape != shape_here {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "host '{}' uses CU shape {}, VM '{name}' was sized with {}",
                    target.name,
                    shape(target.cu_shape),
                    shape(shape_here)
                ),
            ));
        }
        Ok(target)
    }
}

/// Delivers the tunnels peers open to the QEMU waiting for them.
pub(super) fn take_tunnels(endpoint: &FleetEndpoint, host: Arc<Host>) {
    endpoint.set_tunnel_handler(Arc::new(move |id, send, recv| {
        let host = host.clone();
        tokio::spawn(async move {
            let Some(socket) = host.tunnels.get(id) else {
                tracing::warn!(tunnel = id, "a peer opened an unknown tunnel");
                return;
            };
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(stream) => {
                    let (sent, received) = quic::splice(stream, send, recv).await;
                    tracing::info!(tunnel = id, sent, received, "incoming migration tunnel closed");
                }
                Err(error) => {
                    tracing::warn!(tunnel = id, socket = %socket.display(), %error, "cannot reach the waiting QEMU")
                }
            }
        });
    }));
}

fn shape(shape: CuShape) -> String {
    format!(
        "{} vCPU + {} MiB per CU",
        shape.vcpus_per_cu,
        shape.memory_per_cu_bytes >> 20
    )
}
