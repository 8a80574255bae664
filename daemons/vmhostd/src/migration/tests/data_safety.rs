//! One running copy, and no lost disk, whatever fails and whenever vmhostd restarts.

use super::*;
use crate::error::HostError;
use crate::store::Marker;
use crate::testing::{cu, TestHost};
use std::time::Duration;
use vmhost_api::{Resources, VmState, MIGRATION_VERSION};
use vmm::disk_mirror::MirrorProgress;
use vmm::{Accel, MigrationStatus, Step};

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
    let (_, dst) = into_postcopy(&m).await;
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
async fn a_switch_to_postcopy_qemu_never_made_leaves_the_vm_running_here() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, _dst) = postcopy_asked_not_made(&m).await;
    // The stream breaks before QEMU switches: it fails the migration and runs the guest on.
    src.break_link();
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("failed"), "{}", error.message);
    assert_eq!(m.source.state("a"), Some(VmState::Running));
    assert!(!src.exited_now());
    assert!(src.vsock_plugged(), "the guest got its vsock device back");
    let store = &m.source.host.store;
    assert!(!store.has_marker("a", Marker::Postcopy));
    assert!(!store.has_marker("a", Marker::Leaving));
    assert!(!m.target.host.admission.holds_lease(m.lease));
}

#[tokio::test]
async fn a_postcopy_qemu_fails_at_its_end_is_handed_over_its_stale_copy_paused() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    dst.complete_migration();
    until("the target runs the VM", || {
        m.target.state("a") == Some(VmState::Running)
    })
    .await;
    // The link goes with the target's last word: QEMU fails the migration and runs its
    // own copy of the guest again.
    src.fail_migration("Channel error: Input/output error");
    finished(m.task).await.unwrap();
    assert!(src.count(Step::PauseGuest) >= 1, "the stale copy ran on");
    assert!(src.exited_now());
    assert!(m.source.state("a").is_none());
    assert!(!dst.exited_now());
}

#[tokio::test]
async fn a_switch_made_unseen_then_a_failure_leaves_the_vm_paused_never_running_here() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, _dst) = postcopy_asked_not_made(&m).await;
    src.fail_after_the_switch("Input/output error");
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("failed"), "{}", error.message);
    assert_eq!(m.source.state("a"), Some(VmState::Migrating));
    assert!(m.source.host.store.has_marker("a", Marker::Postcopy));
    assert!(!src.exited_now());
}

#[tokio::test]
async fn a_restart_before_qemu_made_the_asked_switch_leaves_the_vm_running_here() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, _dst) = postcopy_asked_not_made(&m).await;
    // vmhostd dies right after asking for post-copy; QEMU is still in pre-copy.
    m.task.abort();
    let _ = m.task.await;
    let restarted = m.source.restart().await;
    until("the VM runs on here", || {
        restarted.state("a") == Some(VmState::Running)
    })
    .await;
    assert_eq!(src.migration_status(), MigrationStatus::Cancelled);
    assert!(!src.exited_now());
    assert!(!restarted.host.store.has_marker("a", Marker::Postcopy));
    assert!(!restarted.host.store.has_marker("a", Marker::Leaving));
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

#[tokio::test]
async fn a_source_qemu_lost_in_postcopy_leaves_the_vm_to_the_target_alone() {
    lose_the_source_qemu(true).await;
}

#[tokio::test]
async fn a_source_qemu_lost_once_the_switch_was_asked_leaves_the_vm_to_the_target() {
    // It may have switched unseen: its memory is not whole here any more.
    lose_the_source_qemu(false).await;
}

/// The source's QEMU dies after the switch to post-copy was asked for, and seen or not.
async fn lose_the_source_qemu(switch_seen: bool) {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = match switch_seen {
        true => into_postcopy(&m).await,
        false => postcopy_asked_not_made(&m).await,
    };
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
    break_link_for_good(&src, &dst);
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
    until("the completed source copy is let go", || {
        restarted.state("a").is_none()
    })
    .await;
    assert!(src.exited_now());
    assert!(!restarted.vm_dir("a").exists());
}

#[tokio::test]
async fn only_the_source_of_an_arrival_can_have_it_listen_again() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    dst.set_migration_status(MigrationStatus::PostcopyPaused);
    let error = m
        .target
        .host
        .recover_arrival("a", "host-c")
        .await
        .unwrap_err();
    assert!(
        matches!(error, crate::error::HostError::NotFound(_)),
        "{error}"
    );
    assert_eq!(dst.count(Step::RecoverIncoming), 0);
    m.target
        .host
        .recover_arrival("a", crate::testing::SOURCE)
        .await
        .unwrap();
    assert_eq!(dst.count(Step::RecoverIncoming), 1);
    let _ = src;
    m.task.abort();
}

#[tokio::test]
async fn a_restart_before_an_arrived_vm_is_sent_on_keeps_it_running() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = into_postcopy(&m).await;
    src.complete_migration();
    dst.complete_migration();
    finished(m.task).await.unwrap();
    until("the VM runs on the target", || {
        m.target.state("a") == Some(VmState::Running)
    })
    .await;
    // Its QEMU reports its arrival as a completed migration from now on. The VM starts
    // leaving again, and vmhostd restarts before the stream starts.
    let departing = m.target.host.begin_departure("a").await.unwrap();
    drop(departing);
    let restarted = m.target.restart().await;
    until("the VM runs on", || {
        restarted.state("a") == Some(VmState::Running)
    })
    .await;
    assert!(!dst.exited_now(), "the only copy of the VM was ended");
    assert!(!restarted.vm_dir("a").join("handed-over").exists());
}

/// Moves VM `a` to a target that cannot save it when it arrives: the save writes spec.tmp
/// first, and a folder in its place fails it, as a full disk does. Returns, once the VM
/// runs there, the target's QEMU and that folder.
async fn arrive_unsaved(m: &Move) -> (Arc<FakeMachine>, std::path::PathBuf) {
    let (src, dst) = into_postcopy(m).await;
    let blocker = m.target.vm_dir("a").join("spec.tmp");
    std::fs::create_dir(&blocker).unwrap();
    src.complete_migration();
    dst.complete_migration();
    until("the target runs the VM", || {
        m.target.state("a") == Some(VmState::Running)
    })
    .await;
    assert!(m.target.vm_dir("a").join("arrival.json").exists());
    (dst, blocker)
}

fn saved_as_arrived(spec: &std::path::Path) -> bool {
    std::fs::read_to_string(spec).is_ok_and(|s| !s.contains("\"incoming\""))
}

#[tokio::test]
async fn an_arrival_it_could_not_save_is_saved_once_it_can() {
    let m = start_move(None, Accel::Kvm).await;
    let (_, blocker) = arrive_unsaved(&m).await;
    finished(m.task).await.unwrap();
    std::fs::remove_dir(&blocker).unwrap();
    let dir = m.target.vm_dir("a");
    until("the arrival is saved", || {
        !dir.join("arrival.json").exists()
    })
    .await;
    assert!(saved_as_arrived(&dir.join("spec.json")));
    assert!(!dir.join("switched-over").exists());
}

#[tokio::test]
async fn an_arrival_it_could_not_save_is_finished_again_after_a_restart_keeping_its_channel() {
    let m = start_move(None, Accel::Kvm).await;
    let (dst, blocker) = arrive_unsaved(&m).await;
    finished(m.task).await.unwrap();
    let backend_starts = m.target.qemu.count(Step::RestartVsock);
    std::fs::remove_dir(&blocker).unwrap();
    let restarted = m.target.restart().await;
    let spec = restarted.vm_dir("a").join("spec.json");
    until("the arrival is saved", || saved_as_arrived(&spec)).await;
    assert_eq!(restarted.state("a"), Some(VmState::Running));
    assert!(dst.vsock_plugged(), "the guest lost its vsock device");
    assert_eq!(
        restarted.qemu.count(Step::RestartVsock),
        backend_starts,
        "the backend was restarted under the guest's plugged device"
    );
    assert!(!restarted.vm_dir("a").join("switched-over").exists());
}

#[tokio::test]
async fn a_switch_that_never_reached_a_target_which_then_ended_the_arrival_crashes_the_vm_here() {
    let m = start_move(None, Accel::Kvm).await;
    let (src, dst) = postcopy_asked(&m).await;
    // The link is cut as the switch leaves: the target's stream fails before it.
    dst.fail_migration("Connection reset by peer");
    until("the target ends the arrival", || {
        m.target.state("a").is_none()
    })
    .await;
    let other = m.target.host.recover_arrival("a", "host-c").await;
    assert!(matches!(other, Err(HostError::NotFound(_))), "{other:?}");
    src.set_migration_status(MigrationStatus::PostcopyPaused);
    let error = finished(m.task).await.unwrap_err();
    assert!(error.message.contains("vmctl start a"), "{error}");
    assert_eq!(m.source.state("a"), Some(VmState::Crashed));
    assert!(src.exited_now(), "the paused QEMU was kept");
    let store = &m.source.host.store;
    assert!(!store.has_marker("a", Marker::Postcopy));
    assert!(!store.has_marker("a", Marker::Leaving));
    assert_eq!(m.source.allocated(), Resources::default());
    m.source.host.start("a").await.unwrap();
    assert_eq!(m.source.state("a"), Some(VmState::Running));
}
