//! Both ends of a migration against fake QEMUs: every phase transition and failure branch,
//! and the data-safety rules (one running copy, no lost disk, ledger = real sizes).

use super::*;
use crate::testing::{cu, LocalTarget, TestHost};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use vmhost_api::{MigrationSummary, Resources, VmState, MIGRATION_VERSION};
use vmm::disk_mirror::MirrorProgress;
use vmm::{Accel, FakeMachine, MigrationStatus, Step};

fn options() -> MigrationOptions {
    MigrationOptions {
        postcopy: true,
        max_downtime_ms: None,
        bandwidth_mib: None,
    }
}

/// A source with VM "a" (1 to 3 CU, at 2), a target, and the migration started in a task.
struct Move {
    source: TestHost,
    target: TestHost,
    lease: u64,
    task: tokio::task::JoinHandle<Result<MigrationSummary, vmhost_api::ApiError>>,
}

async fn start_move(disk: Option<u32>, accel: Accel) -> Move {
    let (source, target) = two_hosts(disk, accel).await;
    begin_move(source, target).await
}

/// A source with VM "a" (1 to 3 CU, at 2), and a target.
async fn two_hosts(disk: Option<u32>, accel: Accel) -> (TestHost, TestHost) {
    let source = TestHost::new("host-a", accel).await;
    let target = TestHost::new("host-b", accel).await;
    let mut request = TestHost::request("a", 1, 3, disk);
    request.cu = Some(cu(2));
    source.host.create(request, None).await.unwrap();
    (source, target)
}

/// Starts moving VM "a" from `source` to `target` in a task.
async fn begin_move(source: TestHost, target: TestHost) -> Move {
    let departing = source.host.begin_departure("a").await.unwrap();
    let lease = target.lease("a", departing.size);
    let host = source.host.clone();
    let to = LocalTarget {
        target: target.host.clone(),
    };
    let task = tokio::spawn(async move {
        let (progress, _reports) = mpsc::channel(4096);
        host.migrate_out(departing, &to, lease, options(), &progress)
            .await
    });
    Move {
        source,
        target,
        lease,
        task,
    }
}

/// A migration's outcome, or a failed test if it takes longer than any fake one can.
async fn finished(
    task: tokio::task::JoinHandle<Result<MigrationSummary, vmhost_api::ApiError>>,
) -> Result<MigrationSummary, vmhost_api::ApiError> {
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the migration did not end")
        .unwrap()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Drives the source to post-copy and the target to the switchover.
async fn into_postcopy(m: &Move) -> (Arc<FakeMachine>, Arc<FakeMachine>) {
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    let dst = m.target.machine("a");
    src.set_dirty_sync_count(2);
    src.set_migration_status(MigrationStatus::Active);
    src.wait_for_call(Step::StartPostcopy).await;
    dst.set_migration_status(MigrationStatus::PostcopyActive);
    let dir = m.target.vm_dir("a");
    until("the target records the switchover", || {
        dir.join("switched-over").exists()
    })
    .await;
    (src, dst)
}

#[test]
fn every_phase_change_follows_the_tables() {
    let mut source = Phase::new("a", SourcePhase::Prepared, SOURCE_TRANSITIONS);
    for next in [
        SourcePhase::Detached,
        SourcePhase::Streaming,
        SourcePhase::PostcopyActive,
        SourcePhase::PostcopyPaused,
        SourcePhase::Stranded,
        SourcePhase::PostcopyPaused,
        SourcePhase::PostcopyActive,
        SourcePhase::Completed,
        SourcePhase::HandedOver,
    ] {
        source.go(next).unwrap();
    }
    // Nothing leaves the end states, and post-copy never goes back to running here.
    assert!(source.go(SourcePhase::Abandoned).is_err());
    let mut paused = Phase::new("a", SourcePhase::PostcopyPaused, SOURCE_TRANSITIONS);
    assert!(paused.go(SourcePhase::Abandoned).is_err());
    let mut target = Phase::new("a", TargetPhase::SwitchedOver, TARGET_TRANSITIONS);
    assert!(target.go(TargetPhase::Abandoned).is_err());
    target.go(TargetPhase::Crashed).unwrap();
    assert!(target.go(TargetPhase::Arrived).is_err());
}

#[tokio::test]
async fn a_postcopy_migration_hands_the_vm_over_and_it_arrives_whole() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    let committed = m.target.allocated();
    assert_eq!(committed, cu_size(2));
    src.complete_migration();
    dst.complete_migration();
    let summary = finished(m.task).await.unwrap();
    assert!(summary.postcopy);
    assert!(src.exited_now(), "the source QEMU ended");
    assert!(m.source.state("a").is_none());
    assert!(!m.source.vm_dir("a").exists());
    assert_eq!(m.source.allocated(), Resources::default());
    until("the target runs the VM", || {
        m.target.state("a") == Some(VmState::Running)
    })
    .await;
    assert!(dst.vsock_plugged());
    assert_eq!(dst.hotplug_memory().await.unwrap(), 1 << 30);
    assert!(!m.target.vm_dir("a").join("switched-over").exists());
    assert_eq!(m.target.allocated(), cu_size(2));
    let _ = m.lease;
}

fn cu_size(n: u32) -> Resources {
    Resources {
        vcpus: n,
        memory_bytes: u64::from(n) << 30,
    }
}

#[tokio::test]
async fn the_source_records_the_hand_over_before_its_qemu_ends_and_never_runs_it_again() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    src.stall(Step::Terminate);
    src.complete_migration();
    dst.complete_migration();
    src.wait_for_call(Step::Terminate).await;
    assert!(m.source.vm_dir("a").join("handed-over").exists());
    // vmhostd dies here, before the stale copy is gone; a new one must not run it.
    let restarted = m.source.on_copy().await;
    assert!(restarted.state("a").is_none(), "the stale copy is listed");
    assert!(!restarted.vm_dir("a").exists(), "the stale disk is kept");
    src.release(Step::Terminate);
    finished(m.task).await.unwrap();
}

#[tokio::test]
async fn an_arrival_that_fails_after_the_switchover_keeps_its_disk_and_starts_cold() {
    let m = start_move(Some(1), Accel::Kvm).await;
    let src = m.source.machine("a");
    src.wait_for_call(Step::StartDiskMirror).await;
    let (_, dst) = {
        src.wait_for_call(Step::MigrateTo).await;
        let dst = m.target.machine("a");
        src.set_dirty_sync_count(2);
        src.set_migration_status(MigrationStatus::Active);
        src.wait_for_call(Step::StartPostcopy).await;
        dst.set_migration_status(MigrationStatus::PostcopyActive);
        (src.clone(), dst)
    };
    let dir = m.target.vm_dir("a");
    until("the switchover is recorded", || {
        dir.join("switched-over").exists()
    })
    .await;
    dst.crash();
    until("the arrival is crashed", || {
        m.target.state("a") == Some(VmState::Crashed)
    })
    .await;
    assert!(
        dir.join("disk.raw").exists(),
        "the only up-to-date disk was removed"
    );
    assert_eq!(m.target.allocated(), Resources::default());
    m.target.host.start("a").await.unwrap();
    assert_eq!(m.target.state("a"), Some(VmState::Running));
    assert!(!m.target.machine("a").spec().incoming);
    m.task.abort();
}

#[tokio::test]
async fn a_restarted_target_keeps_a_switched_over_arrival_whose_qemu_is_gone() {
    let m = start_move(Some(1), Accel::Kvm).await;
    let _ = into_postcopy(&m).await;
    let restarted = m.target.on_copy().await;
    assert_eq!(restarted.state("a"), Some(VmState::Crashed));
    assert!(restarted.vm_dir("a").join("disk.raw").exists());
    m.task.abort();
}

#[tokio::test]
async fn a_restarted_target_drops_an_arrival_that_had_not_switched_over() {
    let m = start_move(None, Accel::Kvm).await;
    m.source.machine("a").wait_for_call(Step::MigrateTo).await;
    let restarted = m.target.on_copy().await;
    assert!(restarted.state("a").is_none());
    assert!(!restarted.vm_dir("a").exists());
    m.task.abort();
}

#[tokio::test]
async fn migrate_in_never_removes_a_folder_it_did_not_create() {
    let target = TestHost::new("host-b", Accel::Kvm).await;
    let dir = target.vm_dir("a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spec.json"), b"{corrupt").unwrap();
    std::fs::write(dir.join("disk.raw"), b"data").unwrap();
    let size = cu_size(1);
    let lease = target.lease("a", size);
    let mut vm = TestHost::request("a", 1, 1, None);
    vm.lease = Some(lease);
    let incoming = IncomingMigration {
        version: MIGRATION_VERSION,
        vm,
        bounds: (cu(1), cu(1)),
        vcpus: 1,
        restore_hotplug_memory_bytes: 0,
        postcopy: true,
        tunnel: 1,
        disk_tunnel: None,
    };
    assert!(target
        .host
        .prepare_arrival(incoming, crate::testing::SOURCE)
        .await
        .is_err());
    assert_eq!(std::fs::read(dir.join("disk.raw")).unwrap(), b"data");
    assert!(target.state("a").is_none());
}

#[tokio::test]
async fn a_start_message_of_an_unknown_version_is_refused() {
    let target = TestHost::new("host-b", Accel::Kvm).await;
    let incoming = IncomingMigration {
        version: MIGRATION_VERSION + 1,
        vm: TestHost::request("a", 1, 1, None),
        bounds: (cu(1), cu(1)),
        vcpus: 1,
        restore_hotplug_memory_bytes: 0,
        postcopy: true,
        tunnel: 1,
        disk_tunnel: None,
    };
    let error = target
        .host
        .prepare_arrival(incoming, crate::testing::SOURCE)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("version"), "{error}");
}

#[tokio::test]
async fn a_failed_switch_to_postcopy_stays_precopy_and_a_failure_then_keeps_the_vm_here() {
    let m = start_move(None, Accel::Kvm).await;
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    src.fail_next(Step::StartPostcopy);
    src.set_dirty_sync_count(2);
    src.set_migration_status(MigrationStatus::Active);
    src.wait_for_call(Step::StartPostcopy).await;
    src.fail_migration("the target went away");
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("failed"), "{}", error.message);
    assert_eq!(m.source.state("a"), Some(VmState::Running));
    assert!(src.vsock_plugged(), "the guest got its vsock device back");
    assert!(!m.source.vm_dir("a").join("leaving").exists());
    assert!(!m.target.host.admission.holds_lease(m.lease));
}

#[tokio::test]
async fn a_broken_postcopy_link_is_recovered() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    dst.set_migration_status(MigrationStatus::PostcopyPaused);
    src.break_link();
    dst.wait_for_call(Step::RecoverIncoming).await;
    src.wait_for_calls(Step::MigrateTo, 2).await;
    dst.set_migration_status(MigrationStatus::PostcopyActive);
    src.complete_migration();
    dst.complete_migration();
    let summary = finished(m.task).await.unwrap();
    assert_eq!(summary.recoveries, 1);
}

#[tokio::test]
async fn an_unrecovered_link_strands_both_halves_and_resume_finishes_later() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    dst.fail_always(Step::RecoverIncoming);
    dst.set_migration_status(MigrationStatus::PostcopyPaused);
    src.break_link();
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("--resume"), "{}", error.message);
    assert_eq!(m.source.state("a"), Some(VmState::Migrating));
    assert!(!src.exited_now() && !dst.exited_now(), "a half was ended");
    dst.heal(Step::RecoverIncoming);
    let (departing, departure) = m.source.host.stranded_departure("a").await.unwrap();
    let to = LocalTarget {
        target: m.target.host.clone(),
    };
    let host = m.source.host.clone();
    let resumed = tokio::spawn(async move {
        let (progress, _reports) = mpsc::channel(1024);
        host.resume_departure(departing, departure, &to, &progress)
            .await
    });
    src.wait_for_calls(Step::MigrateTo, 2).await;
    src.complete_migration();
    dst.complete_migration();
    finished(resumed).await.unwrap();
    assert!(m.source.state("a").is_none());
}

#[tokio::test]
async fn a_source_qemu_that_exits_before_the_switchover_leaves_the_vm_crashed_and_the_lease_free() {
    let m = start_move(None, Accel::Kvm).await;
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    src.crash();
    assert!(finished(m.task).await.is_err());
    assert_eq!(m.source.state("a"), Some(VmState::Crashed));
    assert!(!m.target.host.admission.holds_lease(m.lease));
}

#[tokio::test]
async fn a_source_restarted_before_the_switchover_cancels_and_runs_the_vm_on() {
    let m = start_move(None, Accel::Kvm).await;
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    m.task.abort();
    let _ = m.task.await;
    let restarted = m.source.restart().await;
    assert_eq!(restarted.state("a"), Some(VmState::Running));
    assert!(src.count(Step::CancelMigration) >= 1);
    assert!(src.vsock_plugged());
}

#[tokio::test]
async fn a_lease_that_ends_before_the_switchover_drops_the_arrival() {
    let m = start_move(None, Accel::Kvm).await;
    m.source.machine("a").wait_for_call(Step::MigrateTo).await;
    let dst = m.target.machine("a");
    m.target.host.admission.release_lease(m.lease);
    until("the arrival is dropped", || m.target.state("a").is_none()).await;
    assert!(dst.exited_now());
    assert!(!m.target.vm_dir("a").exists());
    m.task.abort();
}

/// Moving a VM whose disk copy does not catch up until the test says so.
async fn move_with_a_slow_disk() -> (Move, Arc<FakeMachine>) {
    let source = TestHost::new("host-a", Accel::Kvm).await;
    let target = TestHost::new("host-b", Accel::Kvm).await;
    source
        .host
        .create(TestHost::request("a", 1, 1, Some(1)), None)
        .await
        .unwrap();
    let src = source.machine("a");
    src.set_mirror_progress(MirrorProgress {
        copied_bytes: 0,
        total_bytes: 1 << 30,
        ready: false,
    });
    (begin_move(source, target).await, src)
}

#[tokio::test(start_paused = true)]
async fn the_setup_timeout_counts_from_the_stream_not_from_the_disk_copy() {
    let (m, src) = move_with_a_slow_disk().await;
    src.wait_for_call(Step::StartDiskMirror).await;
    // A disk copy longer than the setup timeout.
    tokio::time::sleep(Duration::from_secs(90)).await;
    src.set_mirror_progress(MirrorProgress {
        copied_bytes: 1 << 30,
        total_bytes: 1 << 30,
        ready: true,
    });
    src.wait_for_call(Step::MigrateTo).await;
    src.set_migration_status(MigrationStatus::Setup);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(src.count(Step::CancelMigration), 0, "cancelled too early");
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(
        src.count(Step::CancelMigration) >= 1,
        "a stuck setup was kept"
    );
    assert!(finished(m.task).await.is_err());
    assert_eq!(m.source.state("a"), Some(VmState::Running));
}

/// The move ended with the VM running on at the source, whole: its vsock device and its
/// memory back, no longer marked leaving, and the target's lease gone.
/// Returns both hosts for further checks.
async fn assert_runs_on_at_the_source(m: Move) -> (TestHost, TestHost) {
    let Move {
        source,
        target,
        lease,
        task,
    } = m;
    assert!(finished(task).await.is_err());
    assert_eq!(source.state("a"), Some(VmState::Running));
    let src = source.machine("a");
    assert!(src.vsock_plugged(), "the guest has no vsock device");
    assert_eq!(src.hotplug_memory().await.unwrap(), 1 << 30);
    assert!(!source.vm_dir("a").join("leaving").exists());
    assert!(!target.host.admission.holds_lease(lease));
    assert!(source.host.slot("a").unwrap().record().guest.is_some());
    (source, target)
}

#[tokio::test]
async fn a_guest_channel_that_cannot_be_detached_keeps_the_vm_here() {
    let (source, target) = two_hosts(None, Accel::Kvm).await;
    let src = source.machine("a");
    src.fail_next(Step::UnplugVsock);
    let (source, target) = assert_runs_on_at_the_source(begin_move(source, target).await).await;
    assert_eq!(src.count(Step::MigrateTo), 0);
    assert!(target.state("a").is_none());
    // Its device never left, so its backend was never restarted under it.
    assert_eq!(src.count(Step::PlugVsock), 0);
    assert_eq!(source.qemu.count(Step::RestartVsock), 0);
}

#[tokio::test]
async fn a_tcg_guest_whose_monitor_does_not_give_back_its_memory_stays() {
    let (source, target) = two_hosts(None, Accel::Tcg).await;
    let src = source.machine("a");
    let m = begin_move(source, target).await;
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("cannot shrink"), "{}", error.message);
    assert_eq!(src.count(Step::UnplugVsock), 0);
    assert_eq!(m.source.state("a"), Some(VmState::Running));
    assert_eq!(src.hotplug_memory().await.unwrap(), 1 << 30);
}

#[tokio::test]
async fn a_target_that_cannot_start_the_vm_leaves_it_running_here() {
    let (source, target) = two_hosts(None, Accel::Kvm).await;
    target.qemu.fail_next(Step::Launch);
    let (_, target) = assert_runs_on_at_the_source(begin_move(source, target).await).await;
    assert!(!target.vm_dir("a").exists());
}

#[tokio::test]
async fn a_disk_copy_that_fails_leaves_the_vm_and_its_disk_here() {
    let (m, src) = move_with_a_slow_disk().await;
    until("the mirror runs", || src.disk_mirror().is_some()).await;
    src.fail_mirror("No space left on device");
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("disk"), "{}", error.message);
    assert_eq!(src.count(Step::MigrateTo), 0);
    assert!(src.disk_mirror().is_none(), "the mirror was kept");
    assert!(m.source.vm_dir("a").join("disk.raw").exists());
    assert_eq!(m.source.state("a"), Some(VmState::Running));
}

#[tokio::test]
async fn a_disk_moves_with_its_vm_finished_at_the_pause_before_the_switchover() {
    let m = start_move(Some(1), Accel::Kvm).await;
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    let dst = m.target.machine("a");
    assert!(dst.disk_export().is_some());
    // Pre-copy to the end: QEMU pauses before the switchover, vmhostd finishes the disk.
    src.complete_migration();
    src.wait_for_call(Step::ContinueSwitchover).await;
    let steps = src.steps();
    let finish = steps.iter().position(|s| *s == Step::FinishDiskMirror);
    let go_on = steps.iter().position(|s| *s == Step::ContinueSwitchover);
    assert!(
        finish < go_on,
        "the switchover went on before the disk was complete"
    );
    dst.complete_migration();
    finished(m.task).await.unwrap();
    until("the target runs the VM", || {
        m.target.state("a") == Some(VmState::Running)
    })
    .await;
    assert!(
        dst.disk_export().is_none(),
        "the target still exports the disk"
    );
}

#[tokio::test]
async fn a_precopy_only_migration_never_switches_to_postcopy() {
    let source = TestHost::new("host-a", Accel::Kvm).await;
    let target = TestHost::new("host-b", Accel::Kvm).await;
    source.create("a", 1, 1).await;
    let departing = source.host.begin_departure("a").await.unwrap();
    let lease = target.lease("a", departing.size);
    let to = LocalTarget {
        target: target.host.clone(),
    };
    let host = source.host.clone();
    let src = source.machine("a");
    let task = tokio::spawn(async move {
        let (progress, _reports) = mpsc::channel(1024);
        let options = MigrationOptions {
            postcopy: false,
            ..options()
        };
        host.migrate_out(departing, &to, lease, options, &progress)
            .await
    });
    src.wait_for_call(Step::MigrateTo).await;
    src.set_dirty_sync_count(5);
    src.set_migration_status(MigrationStatus::Active);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(src.count(Step::StartPostcopy), 0);
    assert_eq!(src.postcopy_capability(), Some(false));
    src.complete_migration();
    target.machine("a").complete_migration();
    let summary = finished(task).await.unwrap();
    assert!(!summary.postcopy);
    assert!(source.state("a").is_none());
}

#[tokio::test]
async fn a_source_qemu_lost_in_postcopy_leaves_the_vm_to_the_target_alone() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    src.crash();
    let error = finished(m.task).await.unwrap_err();
    assert!(
        error.message.contains("memory is lost"),
        "{}",
        error.message
    );
    // The source's stale copy can never be started: only the target's is left.
    assert!(m.source.state("a").is_none());
    assert!(!m.source.vm_dir("a").exists());
    assert!(!dst.exited_now(), "the target's half was ended");
    assert_eq!(m.target.state("a"), Some(VmState::Migrating));
}

#[tokio::test]
async fn a_stranded_source_whose_qemu_dies_lets_go_of_the_vm_and_never_starts_it() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    dst.fail_always(Step::RecoverIncoming);
    dst.set_migration_status(MigrationStatus::PostcopyPaused);
    src.break_link();
    assert!(finished(m.task).await.is_err());
    assert_eq!(m.source.state("a"), Some(VmState::Migrating));
    src.crash();
    until("the source lets go of the VM", || {
        m.source.state("a").is_none()
    })
    .await;
    assert!(m.source.host.start("a").await.is_err());
    assert!(!m.source.vm_dir("a").exists());
    assert!(!dst.exited_now());
}

#[tokio::test]
async fn a_source_restarted_after_its_qemu_completed_hands_the_vm_over() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    // vmhostd dies between QEMU's completion and the hand-over.
    src.stall(Step::MigrationInfo);
    src.wait_for_call(Step::MigrationInfo).await;
    src.complete_migration();
    dst.complete_migration();
    m.task.abort();
    let _ = m.task.await;
    src.release(Step::MigrationInfo);
    let restarted = m.source.restart().await;
    assert!(
        restarted.state("a").is_none(),
        "the completed source copy is listed"
    );
    assert!(src.exited_now());
    assert!(!restarted.vm_dir("a").exists());
}
