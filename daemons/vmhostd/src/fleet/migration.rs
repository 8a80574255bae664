//! Moving a running VM to another host: choose the target, lease room there, have it
//! start a QEMU that waits, carry QEMU's migration stream over a QUIC tunnel, switch to
//! post-copy after the first pass, recover a link that breaks during post-copy, and hand
//! the VM over. `crate::host::migrate` does each end's part on the VMs themselves.

use super::*;
use crate::host::{error_chain, vmm_error, HostError, Outgoing};
use crate::store::Departure;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use tokio::sync::mpsc;
use tokio::time::Instant;
use vmhost_api::{CuShape, MigrateVm, MigrationProgress, MigrationSummary};
use vmm::qmp::{MigrateSetParameters, RamStats};

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const RECOVER_RETRY: Duration = Duration::from_secs(1);
const RECOVER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take to bring the arrived VM up (vsock, memory) after the stream.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU's default cap (128 MiB/s) would hold every migration below the link's speed.
const UNCAPPED_BYTES_PER_SEC: u64 = 100 << 30;
/// A migration still in QEMU's setup after this long is stuck, and is cancelled.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest is paused while the disk mirror takes its last writes: a few blocks at most,
/// since the mirror copies each write as it happens.
const DISK_FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Post-copy starts once QEMU has synced the dirty bitmap this often: after the first pass.
const POSTCOPY_AFTER_SYNCS: u64 = 2;

/// How a migration failed.
enum Failure {
    /// Before the switchover: the source still runs the VM.
    BeforeSwitchover(ApiError),
    /// During post-copy, unrecovered: the guest's state is split between the hosts and it
    /// stays paused until an operator resumes the migration.
    Stranded(ApiError),
}

/// Aborts a background task when the migration that started it ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn internal(message: String) -> ApiError {
    ApiError::new(ErrorKind::Internal, message)
}

/// Where a migration stands, as far as following it goes.
#[derive(Clone, Copy)]
struct Stage {
    /// It switches to post-copy after the first pass.
    postcopy: bool,
    /// It has switched to post-copy: the target runs the guest.
    switched: bool,
    /// Its disk, if any, is complete on the target.
    disk_finished: bool,
}

/// Sends a migration's phase and stream counters to whoever follows it.
fn reporter<'a>(
    progress: &'a mpsc::Sender<MigrationProgress>,
    vm: &'a str,
    target: &'a str,
    started: Instant,
) -> impl Fn(&str, Option<&RamStats>) + 'a {
    move |phase, stream| {
        let ram = stream.cloned().unwrap_or_default();
        let _ = progress.try_send(MigrationProgress {
            vm: vm.to_string(),
            target: target.to_string(),
            phase: phase.to_string(),
            transferred_bytes: ram.transferred,
            remaining_bytes: ram.remaining,
            total_bytes: ram.total,
            rate_mbps: ram.mbps,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
    }
}

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

impl Fleet {
    /// Migrates a VM of this host, or resumes its paused post-copy migration, reporting
    /// progress on `progress` as it goes.
    pub async fn migrate(
        &self,
        request: MigrateVm,
        progress: mpsc::Sender<MigrationProgress>,
    ) -> Result<MigrationSummary, ApiError> {
        let _following = self.follow_migration(&request.name)?;
        if request.resume {
            return self.resume(&request.name, &progress).await;
        }
        let out = self.host.begin_outgoing(&request.name).await?;
        match self.migrate_out(&request, &out, &progress).await {
            Ok(summary) => Ok(summary),
            Err(Failure::BeforeSwitchover(error)) => {
                self.host.resume_outgoing(&out).await;
                Err(error)
            }
            Err(Failure::Stranded(error)) => {
                tracing::error!(vm = %request.name, error = %error.message, "VM is paused in the middle of a post-copy migration");
                Err(error)
            }
        }
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

    async fn migrate_out(
        &self,
        request: &MigrateVm,
        out: &Outgoing,
        progress: &mpsc::Sender<MigrationProgress>,
    ) -> Result<MigrationSummary, Failure> {
        let name = request.name.as_str();
        let started = Instant::now();
        let before = Failure::BeforeSwitchover;
        let target = self
            .choose_target(request.to.as_deref(), out)
            .await
            .map_err(before)?;
        let report = reporter(progress, name, &target.name, started);
        report("reserving", None);
        let lease = self
            .reserve(&target, name, out.size)
            .await
            .map_err(|reason| {
                before(ApiError::new(
                    ErrorKind::CapacityExceeded,
                    format!(
                        "host '{}' has no room for VM '{name}' ({}): {reason}",
                        target.name, out.size
                    ),
                ))
            })?;
        let _renewal = self.keep_renewing(&target, lease.id);
        tracing::info!(vm = %name, target = %target.name, lease = lease.id, "migrating VM");
        let postcopy = !request.precopy_only;
        let tunnel = random_id();
        let disk_tunnel = out.disk_socket.as_ref().map(|_| random_id());
        let prepared = async {
            let departure = Departure {
                target: target.name.clone(),
                tunnel,
                lease: lease.id,
            };
            self.host.record_departure(name, &departure)?;
            report("detaching the guest channel", None);
            self.host.detach_for_migration(out).await?;
            report("starting the target", None);
            let incoming = out.incoming(lease.id, tunnel, disk_tunnel, postcopy);
            self.call_api(&target, Request::MigrateIn(Box::new(incoming)))
                .await?;
            let bandwidth = request
                .bandwidth_mib
                .map_or(UNCAPPED_BYTES_PER_SEC, |mib| mib << 20);
            out.machine
                .prepare_migration(
                    postcopy,
                    MigrateSetParameters {
                        downtime_limit: request.max_downtime_ms,
                        max_bandwidth: Some(bandwidth),
                        max_postcopy_bandwidth: Some(bandwidth),
                    },
                )
                .await
                .map_err(|e| {
                    internal(format!("cannot set up the migration: {}", error_chain(&e)))
                })?;
            let disk_forwarder = match (&out.disk_socket, disk_tunnel) {
                (Some(socket), Some(id)) => {
                    let forwarder = self.forward_stream(socket, &target, id)?;
                    self.copy_disk(out, socket, &report).await?;
                    Some(forwarder)
                }
                _ => None,
            };
            let forwarder = self.forward_stream(&out.socket, &target, tunnel)?;
            out.machine
                .migrate_to(&out.socket, false)
                .await
                .map_err(|e| internal(format!("QEMU refused to migrate: {}", error_chain(&e))))?;
            Ok::<_, ApiError>((forwarder, disk_forwarder))
        }
        .await;
        let _forwarders = match prepared {
            Ok(forwarder) => forwarder,
            Err(error) => {
                self.release(&target, lease.id).await;
                return Err(before(error));
            }
        };
        let stage = Stage {
            postcopy,
            switched: false,
            disk_finished: false,
        };
        self.follow(out, &target, lease.id, stage, started, &report)
            .await
    }

    /// Finishes a post-copy migration left paused, toward the host it was going to: the
    /// link is recovered and the migration followed to its end as if it had never stopped.
    async fn resume(
        &self,
        name: &str,
        progress: &mpsc::Sender<MigrationProgress>,
    ) -> Result<MigrationSummary, ApiError> {
        let started = Instant::now();
        let (out, departure) = self.host.stranded_outgoing(name).await?;
        let target = self
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
        let report = reporter(progress, name, &target.name, started);
        tracing::info!(vm = %name, target = %target.name, "resuming a paused post-copy migration");
        let _forwarder = self.forward_stream(&out.socket, &target, departure.tunnel)?;
        let stage = Stage {
            postcopy: true,
            switched: true,
            disk_finished: true,
        };
        self.follow(&out, &target, departure.lease, stage, started, &report)
            .await
            .map_err(|(Failure::BeforeSwitchover(error) | Failure::Stranded(error))| error)
    }

    /// Follows QEMU's migration to its end: switches to post-copy after the first pass,
    /// completes the disk at the pause before the switchover, recovers a post-copy link
    /// that breaks; then hands the VM over to the target.
    async fn follow(
        &self,
        out: &Outgoing,
        target: &HostView,
        lease: u64,
        mut stage: Stage,
        started: Instant,
        report: &impl Fn(&str, Option<&RamStats>),
    ) -> Result<MigrationSummary, Failure> {
        let name = out.spec.name.as_str();
        let before = Failure::BeforeSwitchover;
        let mut recoveries = 0;
        let mut events = out.machine.migration_events();
        let info = loop {
            // Woken early by a status change, so the pause for a disk is short.
            events.next_change(POLL_INTERVAL).await;
            let info = match out.machine.migration_info().await {
                Ok(info) => info,
                Err(error) if out.machine.exited_now() => {
                    let message = format!(
                        "the source QEMU of VM '{name}' exited during the migration: {}",
                        error_chain(&error)
                    );
                    return Err(if stage.switched {
                        Failure::Stranded(internal(message))
                    } else {
                        before(internal(message))
                    });
                }
                Err(error) => {
                    tracing::warn!(vm = %name, error = %error_chain(&error), "cannot read the migration's progress");
                    continue;
                }
            };
            let status = info.status.clone().unwrap_or_default();
            report(&status, info.ram.as_ref());
            stage.switched |= status.starts_with("postcopy");
            match status.as_str() {
                "completed" => break info,
                "failed" | "cancelled" => {
                    let reason = info.error_desc.clone().unwrap_or_else(|| status.clone());
                    let message = format!(
                        "migration of VM '{name}' to host '{}' {status}: {reason}",
                        target.name
                    );
                    if stage.switched {
                        return Err(Failure::Stranded(internal(message)));
                    }
                    return Err(self.abandon(out, target, lease, internal(message)).await);
                }
                "active"
                    if stage.postcopy
                        && !stage.switched
                        && info.ram.as_ref().map_or(0, |r| r.dirty_sync_count)
                            >= POSTCOPY_AFTER_SYNCS =>
                {
                    tracing::info!(vm = %name, "first pass done; switching to post-copy");
                    if let Err(error) = out.machine.start_postcopy().await {
                        tracing::warn!(vm = %name, error = %error_chain(&error), "cannot switch to post-copy; staying in pre-copy");
                    }
                    stage.switched = true;
                }
                "setup" if started.elapsed() > SETUP_TIMEOUT => {
                    let error = internal(format!(
                        "migration of VM '{name}' was still in QEMU's setup after {} s; cancelled",
                        SETUP_TIMEOUT.as_secs()
                    ));
                    return Err(self.abandon(out, target, lease, error).await);
                }
                // Only a VM with a disk pauses here, its guest stopped: the mirror takes
                // the last writes, then the switchover goes on.
                "pre-switchover" if !stage.disk_finished => {
                    report("finishing the disk copy", info.ram.as_ref());
                    if let Err(error) = self.finish_disk(out).await {
                        return Err(self.abandon(out, target, lease, error.into()).await);
                    }
                    stage.disk_finished = true;
                }
                "postcopy-paused" => {
                    report("paused: link broken, recovering", info.ram.as_ref());
                    self.recover(target, out).await?;
                    recoveries += 1;
                }
                _ => {}
            }
        };
        self.host.finish_outgoing(out).await;
        self.await_arrival(target, name).await;
        let ram = info.ram.clone().unwrap_or_default();
        tracing::info!(vm = %name, target = %target.name, downtime_ms = info.downtime.unwrap_or(0), total_ms = started.elapsed().as_millis() as u64, "VM migrated");
        Ok(MigrationSummary {
            vm: name.to_string(),
            from: self.host.name().to_string(),
            to: target.name.clone(),
            downtime_ms: info.downtime.unwrap_or(0),
            total_ms: started.elapsed().as_millis() as u64,
            transferred_bytes: ram.transferred,
            postcopy: stage.switched,
            recoveries,
        })
    }

    /// Mirrors the VM's disk to the target through `socket` until the copy has caught up;
    /// from then on the mirror takes every guest write until the switchover.
    async fn copy_disk(
        &self,
        out: &Outgoing,
        socket: &Path,
        report: &impl Fn(&str, Option<&RamStats>),
    ) -> Result<(), HostError> {
        let name = out.spec.name.as_str();
        out.machine
            .pause_before_switchover()
            .await
            .map_err(vmm_error(name, "prepare the copy of its disk"))?;
        out.machine
            .start_disk_mirror(socket)
            .await
            .map_err(vmm_error(name, "start copying its disk"))?;
        loop {
            let progress = out
                .machine
                .disk_mirror_progress()
                .await
                .map_err(vmm_error(name, "copy its disk"))?;
            let copied = RamStats {
                transferred: progress.copied_bytes,
                remaining: progress.total_bytes.saturating_sub(progress.copied_bytes),
                total: progress.total_bytes,
                ..Default::default()
            };
            report("copying the disk", Some(&copied));
            if progress.ready {
                tracing::info!(vm = %name, bytes = progress.total_bytes, "disk copied; the mirror follows the guest's writes");
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// At the switchover, the guest paused: completes the disk copy, then lets QEMU go on.
    async fn finish_disk(&self, out: &Outgoing) -> Result<(), HostError> {
        let name = out.spec.name.as_str();
        out.machine
            .finish_disk_mirror(DISK_FINISH_TIMEOUT)
            .await
            .map_err(vmm_error(name, "finish copying its disk"))?;
        out.machine
            .continue_switchover()
            .await
            .map_err(vmm_error(name, "go on with the switchover"))
    }

    /// Ends a migration that has not switched over: QEMU cancels it and the VM runs on
    /// here; the target's lease goes.
    async fn abandon(
        &self,
        out: &Outgoing,
        target: &HostView,
        lease: u64,
        error: ApiError,
    ) -> Failure {
        let _ = out.machine.cancel_migration().await;
        self.release(target, lease).await;
        Failure::BeforeSwitchover(error)
    }

    /// The named host, or the live host with the most free memory that has room.
    async fn choose_target(&self, to: Option<&str>, out: &Outgoing) -> Result<HostView, ApiError> {
        let name = &out.spec.name;
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
                .filter(|v| v.cu_shape == out.spec.cu_shape && v.has_room_for(out.size))
                .max_by_key(|v| v.free().memory_bytes)
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::CapacityExceeded,
                        format!("no other live host has room for VM '{name}' ({})", out.size),
                    )
                })?,
        };
        if target.cu_shape != out.spec.cu_shape {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "host '{}' uses CU shape {}, VM '{name}' was sized with {}",
                    target.name,
                    shape(target.cu_shape),
                    shape(out.spec.cu_shape)
                ),
            ));
        }
        Ok(target)
    }

    /// Renews the lease on the target until the migration ends; the target commits it when
    /// the VM arrives, or drops it when renewals stop.
    fn keep_renewing(&self, target: &HostView, id: u64) -> AbortOnDrop {
        let endpoint = self.endpoint.clone();
        let (addr, host) = (target.addr, target.name.clone());
        let ttl_ms = self.config.lease_ttl_secs * 1000;
        AbortOnDrop(tokio::spawn(async move {
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
    fn forward_stream(
        &self,
        socket: &Path,
        target: &HostView,
        tunnel: u64,
    ) -> Result<AbortOnDrop, ApiError> {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .map_err(|e| internal(format!("cannot listen on {}: {e}", socket.display())))?;
        let endpoint = self.endpoint.clone();
        let (addr, host) = (target.addr, target.name.clone());
        Ok(AbortOnDrop(tokio::spawn(async move {
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

    /// Brings a post-copy migration whose link broke back: the target listens again, and
    /// the source resumes into it. Retries until the link returns or the window closes.
    async fn recover(&self, target: &HostView, out: &Outgoing) -> Result<(), Failure> {
        let name = out.spec.name.as_str();
        tracing::error!(vm = %name, target = %target.name, "the link broke during post-copy; the guest waits until it returns");
        let window = Duration::from_secs(self.config.migration_recover_secs);
        let deadline = Instant::now() + window;
        loop {
            let recover = Request::MigrateRecover {
                name: name.to_string(),
            };
            match tokio::time::timeout(RECOVER_CALL_TIMEOUT, self.call_api(target, recover)).await {
                Ok(Ok(_)) => match out.machine.migrate_to(&out.socket, true).await {
                    Ok(()) => {
                        tracing::info!(vm = %name, "post-copy migration resumed");
                        return Ok(());
                    }
                    Err(error) => {
                        tracing::warn!(vm = %name, error = %error_chain(&error), "cannot resume the migration yet")
                    }
                },
                Ok(Err(error)) => {
                    tracing::warn!(vm = %name, error = %error.message, "target not ready to recover yet")
                }
                Err(_) => tracing::warn!(vm = %name, "target did not answer the recovery"),
            }
            if Instant::now() >= deadline {
                return Err(Failure::Stranded(internal(format!(
                    "VM '{name}' is paused mid post-copy: the link to host '{}' stayed down for {} s. \
                     Its memory is split between the hosts, so both QEMUs are kept, paused; \
                     once the link is back, `vmctl migrate {name} --resume` finishes the migration",
                    target.name,
                    window.as_secs()
                ))));
            }
            tokio::time::sleep(RECOVER_RETRY).await;
        }
    }

    /// Waits until the target reports the VM running, so the fleet's list shows it there
    /// when the migration returns.
    async fn await_arrival(&self, target: &HostView, name: &str) {
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        while Instant::now() < deadline {
            let show = Request::Show {
                name: name.to_string(),
            };
            if let Ok(Reply::Vm(vm)) = self.call_api(target, show).await {
                if vm.state == vmhost_api::VmState::Running {
                    return;
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        tracing::warn!(vm = %name, target = %target.name, "the target has not reported the VM running yet");
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
}

fn random_id() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn shape(shape: CuShape) -> String {
    format!(
        "{} vCPU + {} MiB per CU",
        shape.vcpus_per_cu,
        shape.memory_per_cu_bytes >> 20
    )
}
