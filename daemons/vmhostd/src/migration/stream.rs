//! Following a departing VM's migration stream to its end: the switch to post-copy after
//! the first pass, the disk's last writes at the pause before the switchover, recovery of a
//! post-copy link that breaks, and the hand-over once QEMU completes.

use super::outgoing::{Departing, Failure};
use super::{SourcePhase, TargetHost};
use crate::error::{error_chain, internal, vmm_error, HostError};
use crate::host::Host;
use crate::store::Marker;
use std::time::Duration;
use tokio::time::Instant;
use vmhost_api::{ApiError, ErrorKind, MigrationSummary};
use vmm::qmp::RamStats;
use vmm::MigrationStatus;

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const RECOVER_RETRY: Duration = Duration::from_secs(1);
const RECOVER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take to bring the arrived VM up (vsock, memory) after the stream.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(120);
/// A migration still in QEMU's setup this long after it was started is stuck. Counted
/// from the `migrate` command, so a long disk copy before it never counts.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest is paused while the disk mirror takes its last writes: a few blocks at most,
/// since the mirror copies each write as it happens.
const DISK_FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Post-copy starts once QEMU has synced the dirty bitmap this often: after the first pass.
const POSTCOPY_AFTER_SYNCS: u64 = 2;

impl Host {
    /// Follows QEMU's migration to its end: switches to post-copy after the first pass,
    /// completes the disk at the pause before the switchover, recovers a post-copy link
    /// that breaks; then hands the VM over to the target.
    pub(super) async fn follow(
        &self,
        departing: &mut Departing,
        target: &dyn TargetHost,
        lease: u64,
        started: Instant,
        report: &(impl Fn(&str, Option<&RamStats>) + Sync),
    ) -> Result<MigrationSummary, Failure> {
        let name = departing.spec.name.clone();
        let name = name.as_str();
        let machine = departing.machine.clone();
        let stream_started = Instant::now();
        let mut postcopy_asked = false;
        let mut disk_finished = departing.disk_socket.is_none();
        let mut recoveries = 0;
        let mut events = machine.migration_events();
        let switched = |d: &Departing| {
            matches!(
                d.phase.now(),
                SourcePhase::PostcopyActive | SourcePhase::PostcopyPaused
            )
        };
        let mut went_postcopy = switched(departing);
        let info = loop {
            // Woken early by a status change, so the pause for a disk is short.
            events.next_change(POLL_INTERVAL).await;
            let info = match machine.migration_info().await {
                Ok(info) => info,
                // Once asked, the switch may have been made between two polls.
                Err(error) if machine.exited_now() && (switched(departing) || postcopy_asked) => {
                    // The pages still here are lost, and the target's copy (its disk
                    // included) is the only one left: this host lets go of the VM, so
                    // that it can never be started twice.
                    self.hand_over(departing).await;
                    return Err(Failure::Lost(internal(format!(
                        "the source QEMU of VM '{name}' exited during post-copy: {}. The \
                         guest's memory is lost; host '{}' keeps the VM and its disk, and \
                         `vmctl start {name}` there boots it once it is listed crashed",
                        error_chain(&error),
                        target.name()
                    ))));
                }
                Err(error) if machine.exited_now() => {
                    let message = internal(format!(
                        "the source QEMU of VM '{name}' exited during the migration: {}",
                        error_chain(&error)
                    ));
                    return Err(self.abandon(departing, target, lease, message).await);
                }
                Err(error) => {
                    tracing::warn!(vm = %name, error = %error_chain(&error), "cannot read the migration's progress");
                    continue;
                }
            };
            let status = info.status.clone();
            report(status.as_str(), info.ram.as_ref());
            if status.is_postcopy() && departing.phase.now() == SourcePhase::Streaming {
                let _ = departing.go(SourcePhase::PostcopyActive);
            }
            went_postcopy |= switched(departing);
            match status {
                MigrationStatus::Completed => {
                    let _ = departing.go(SourcePhase::Completed);
                    break info;
                }
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    let reason = info
                        .error_desc
                        .clone()
                        .unwrap_or_else(|| status.to_string());
                    let message = internal(format!(
                        "migration of VM '{name}' to host '{}' {status}: {reason}",
                        target.name()
                    ));
                    if switched(departing) {
                        if self.arrived_despite_failure(departing, target).await {
                            let _ = departing.go(SourcePhase::Completed);
                            break info;
                        }
                        return Err(Failure::Stranded(message));
                    }
                    // A switch made between two polls: QEMU then never runs the guest
                    // here again, as it does after a failure before the switch.
                    if postcopy_asked && !machine.status().await.is_ok_and(|run| run.running) {
                        return Err(Failure::Stranded(message));
                    }
                    return Err(self.abandon(departing, target, lease, message).await);
                }
                MigrationStatus::Active
                    if departing.postcopy
                        && !postcopy_asked
                        && departing.phase.now() == SourcePhase::Streaming
                        && info.ram.as_ref().map_or(0, |r| r.dirty_sync_count)
                            >= POSTCOPY_AFTER_SYNCS =>
                {
                    postcopy_asked = true;
                    tracing::info!(vm = %name, "first pass done; switching to post-copy");
                    // Recorded first: from the switch on, this copy must never run again,
                    // even if this QEMU and vmhostd die before the next line.
                    let recorded = self.store.set_marker(name, Marker::Postcopy, true);
                    match recorded {
                        Err(error) => {
                            tracing::warn!(vm = %name, error = %error_chain(&error), "cannot record the switch to post-copy; staying in pre-copy")
                        }
                        // The phase follows QEMU's status, not this request: QEMU may
                        // still fail the migration before it switches, and then runs the
                        // guest here again.
                        Ok(()) => match machine.start_postcopy().await {
                            Ok(()) => {}
                            Err(error) => {
                                // Still pre-copy: the guest runs here until QEMU switches over.
                                tracing::warn!(vm = %name, error = %error_chain(&error), "cannot switch to post-copy; staying in pre-copy");
                                if let Err(error) =
                                    self.store.set_marker(name, Marker::Postcopy, false)
                                {
                                    tracing::warn!(vm = %name, error = %error_chain(&error), "a restart would take this VM for one in post-copy");
                                }
                            }
                        },
                    }
                }
                MigrationStatus::Setup if stream_started.elapsed() > SETUP_TIMEOUT => {
                    let error = internal(format!(
                        "migration of VM '{name}' was still in QEMU's setup after {} s; cancelled",
                        SETUP_TIMEOUT.as_secs()
                    ));
                    return Err(self.abandon(departing, target, lease, error).await);
                }
                // Only a VM with a disk pauses here, its guest stopped: the mirror takes
                // the last writes, then the switchover goes on.
                MigrationStatus::PreSwitchover if !disk_finished => {
                    report("finishing the disk copy", info.ram.as_ref());
                    if let Err(error) = self.finish_disk(departing).await {
                        return Err(self.abandon(departing, target, lease, error.into()).await);
                    }
                    disk_finished = true;
                }
                MigrationStatus::PostcopyPaused => {
                    let _ = departing.go(SourcePhase::PostcopyPaused);
                    report("paused: link broken, recovering", info.ram.as_ref());
                    self.recover_link(departing, target).await?;
                    let _ = departing.go(SourcePhase::PostcopyActive);
                    recoveries += 1;
                }
                _ => {}
            }
        };
        self.hand_over(departing).await;
        self.await_arrival(target, name).await;
        let ram = info.ram.clone().unwrap_or_default();
        tracing::info!(vm = %name, target = %target.name(), downtime_ms = info.downtime.unwrap_or(0), total_ms = started.elapsed().as_millis() as u64, "VM migrated");
        Ok(MigrationSummary {
            vm: name.to_string(),
            from: self.name().to_string(),
            to: target.name().to_string(),
            downtime_ms: info.downtime.unwrap_or(0),
            total_ms: started.elapsed().as_millis() as u64,
            transferred_bytes: ram.transferred,
            postcopy: went_postcopy,
            recoveries,
        })
    }

    /// At the switchover, the guest paused: completes the disk copy, then lets QEMU go on.
    async fn finish_disk(&self, departing: &Departing) -> Result<(), HostError> {
        let name = departing.spec.name.as_str();
        departing
            .machine
            .finish_disk_mirror(DISK_FINISH_TIMEOUT)
            .await
            .map_err(vmm_error(name, "finish copying its disk"))?;
        departing
            .machine
            .continue_switchover()
            .await
            .map_err(vmm_error(name, "go on with the switchover"))
    }

    /// QEMU fails a post-copy migration whose end the link lost (the target's last word
    /// never came back), and then runs its own copy of the guest again, stale, while the
    /// target may hold the whole VM. That copy is paused at once; if the target runs the VM
    /// within the recovery window, the VM is the target's.
    async fn arrived_despite_failure(
        &self,
        departing: &Departing,
        target: &dyn TargetHost,
    ) -> bool {
        let name = departing.spec.name.as_str();
        if departing
            .machine
            .status()
            .await
            .is_ok_and(|run| run.running)
        {
            tracing::error!(vm = %name, "QEMU runs the guest here again after its post-copy migration failed; pausing it");
            if let Err(error) = departing.machine.pause_guest().await {
                tracing::error!(vm = %name, error = %error_chain(&error), "cannot pause the guest QEMU runs again here");
            }
        }
        let deadline = Instant::now() + self.recover_window();
        loop {
            if target.runs(name).await {
                tracing::warn!(vm = %name, target = %target.name(), "the post-copy migration failed at its end, but the target runs the VM whole");
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(RECOVER_RETRY).await;
        }
    }

    /// How long a post-copy migration's link may stay down before the VM is left paused.
    fn recover_window(&self) -> Duration {
        Duration::from_secs(
            self.config
                .fleet
                .as_ref()
                .map_or(60, |f| f.migration_recover_secs),
        )
    }

    /// Ends a migration that has not switched over: QEMU cancels it; the target's lease
    /// goes.
    async fn abandon(
        &self,
        departing: &Departing,
        target: &dyn TargetHost,
        lease: u64,
        error: ApiError,
    ) -> Failure {
        let _ = departing.machine.cancel_migration().await;
        target.release_lease(lease).await;
        Failure::BeforeSwitchover(error)
    }

    /// Brings a post-copy migration whose link broke back: the target listens again, and
    /// the source resumes into it. Retries until the link returns or the window closes.
    async fn recover_link(
        &self,
        departing: &Departing,
        target: &dyn TargetHost,
    ) -> Result<(), Failure> {
        let name = departing.spec.name.as_str();
        tracing::error!(vm = %name, target = %target.name(), "the link broke during post-copy; the guest waits until it returns");
        let window = self.recover_window();
        let deadline = Instant::now() + window;
        loop {
            match tokio::time::timeout(RECOVER_CALL_TIMEOUT, target.listen_again(name)).await {
                Ok(Ok(())) => match departing.machine.migrate_to(&departing.socket, true).await {
                    Ok(()) => {
                        tracing::info!(vm = %name, "post-copy migration resumed");
                        return Ok(());
                    }
                    Err(error) => {
                        tracing::warn!(vm = %name, error = %error_chain(&error), "cannot resume the migration yet")
                    }
                },
                Ok(Err(error)) if error.kind == ErrorKind::NeverArrived => {
                    return Err(Failure::NeverArrived(internal(format!(
                        "VM '{name}' crashed mid post-copy: host '{}' ended its arrival before \
                         the switch reached it ({}), and QEMU cannot run a guest again after that \
                         switch. Its disk here is whole: `vmctl start {name}` boots it",
                        target.name(),
                        error.message
                    ))));
                }
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
                    target.name(),
                    window.as_secs()
                ))));
            }
            tokio::time::sleep(RECOVER_RETRY).await;
        }
    }

    /// The target runs the VM now. That is recorded first, so that a vmhostd that dies
    /// before the end never runs this stale copy again; then this QEMU ends and the VM
    /// leaves this host.
    async fn hand_over(&self, departing: &mut Departing) {
        let _ = departing.go(SourcePhase::HandedOver);
        let name = departing.spec.name.as_str();
        let Ok(slot) = self.slot(name) else { return };
        self.record_hand_over(name);
        // Cleared first, so the exit watcher does not take the end for a crash.
        slot.record().machine = None;
        if let Err(error) = departing.machine.terminate().await {
            tracing::warn!(vm = %name, error = %error_chain(&error), "the migrated-away QEMU did not end cleanly");
        }
        self.let_go(name, &slot);
    }

    /// Waits until the target reports the VM running, so the fleet's list shows it there
    /// when the migration returns.
    async fn await_arrival(&self, target: &dyn TargetHost, name: &str) {
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        while Instant::now() < deadline {
            if target.runs(name).await {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        tracing::warn!(vm = %name, target = %target.name(), "the target has not reported the VM running yet");
    }
}
