//! Every phase change of both ends, and every failure branch that leaves the VM running
//! where it was.

use super::*;
use crate::error::HostError;
use crate::testing::{cu, start_message, LocalTarget, TestHost};
use std::time::Duration;
use tokio::sync::mpsc;
use vmhost_api::{CreateVm, Resources, VmState, MIGRATION_VERSION};
use vmm::{Accel, MigrationStatus, Step};

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
    assert!(dst.oob_monitor_open(), "post-copy may need a recovery");
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
    assert!(
        !dst.oob_monitor_open(),
        "the migration ended: its monitor is free"
    );
    assert_eq!(dst.hotplug_memory().await.unwrap(), 1 << 30);
    assert!(!m.target.vm_dir("a").join("switched-over").exists());
    assert_eq!(m.target.allocated(), cu_size(2));
    let _ = m.lease;
}

#[tokio::test]
async fn a_start_message_of_an_unknown_version_is_refused() {
    let target = TestHost::new("host-b", Accel::Kvm).await;
    let incoming = IncomingMigration {
        version: MIGRATION_VERSION + 1,
        ..start_message(TestHost::request("a", 1, 1, None), (cu(1), cu(1)), 1, 0)
    };
    let error = target
        .host
        .prepare_arrival(incoming, crate::testing::SOURCE)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("version"), "{error}");
}

#[tokio::test]
async fn a_start_message_with_figures_the_vm_cannot_have_is_refused_and_starts_nothing() {
    let target = TestHost::new("host-b", Accel::Kvm).await;
    let lease = target.lease("a", cu_size(2));
    let vm = CreateVm {
        lease: Some(lease),
        ..TestHost::request("a", 1, 2, None)
    };
    let hostile = [
        ((cu(2), cu(1)), 1, 0),
        ((cu(1), cu(3)), 1, 0),
        ((cu(1), cu(2)), 64, 0),
        ((cu(1), cu(2)), 1, u64::MAX),
    ];
    for (bounds, vcpus, restore) in hostile {
        let incoming = start_message(vm.clone(), bounds, vcpus, restore);
        let error = target
            .host
            .prepare_arrival(incoming, crate::testing::SOURCE)
            .await
            .unwrap_err();
        assert!(matches!(error, HostError::Invalid(_)), "{error}");
    }
    assert!(target.state("a").is_none());
    assert_eq!(target.qemu.count(Step::Launch), 0);
    assert_eq!(target.allocated(), Resources::default());
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
    break_link_for_good(&src, &dst);
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
    until("the VM runs on", || {
        restarted.state("a") == Some(VmState::Running)
    })
    .await;
    assert!(src.count(Step::CancelMigration) >= 1);
    assert!(src.vsock_plugged());
}

#[tokio::test]
async fn a_restart_serves_at_once_while_an_interrupted_departure_is_wound_down() {
    let m = start_move(None, Accel::Kvm).await;
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    m.task.abort();
    let _ = m.task.await;
    src.stall(Step::CancelMigration);
    let restarted = tokio::time::timeout(Duration::from_secs(5), m.source.restart())
        .await
        .expect("the restart waited for the interrupted departure");
    assert_eq!(restarted.state("a"), Some(VmState::Migrating));
    src.release(Step::CancelMigration);
    until("the VM runs on", || {
        restarted.state("a") == Some(VmState::Running)
    })
    .await;
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

#[tokio::test]
async fn a_guest_channel_that_cannot_be_detached_keeps_the_vm_here() {
    let (source, target) = two_hosts(None, Accel::Kvm).await;
    let src = source.machine("a");
    src.fail_next(Step::UnplugVsock);
    let (source, target) = assert_runs_on_at_the_source(begin_move(source, target).await).await;
    assert_eq!(src.count(Step::MigrateTo), 0);
    // The target started beside the detach; the released lease ends its arrival.
    until("the target drops the arrival", || {
        target.state("a").is_none()
    })
    .await;
    // Its device never left, so its backend was never restarted under it.
    assert_eq!(src.count(Step::PlugVsock), 0);
    assert_eq!(source.qemu.count(Step::RestartVsock), 0);
}

#[tokio::test]
async fn the_target_starts_while_the_guest_ejects_its_vsock_device() {
    let (source, target) = two_hosts(None, Accel::Kvm).await;
    let src = source.machine("a");
    src.stall(Step::UnplugVsock);
    let m = begin_move(source, target).await;
    until("the target listens", || {
        m.target
            .qemu
            .machine("a")
            .is_some_and(|dst| dst.incoming_socket().is_some())
    })
    .await;
    assert_eq!(m.source.state("a"), Some(VmState::Migrating));
    src.release(Step::UnplugVsock);
    let (src, dst) = into_postcopy(&m).await;
    src.complete_migration();
    dst.complete_migration();
    finished(m.task).await.unwrap();
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
