//! Both ends of a migration against fake QEMUs: every phase transition and failure branch
//! (`flows`), and the data-safety rules: one running copy, no lost disk (`data_safety`).

mod data_safety;
mod flows;

use super::*;
use crate::testing::{cu, LocalTarget, TestHost};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use vmhost_api::{MigrationSummary, Resources, VmState};
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

/// Cuts a post-copy migration's link so that the target can never listen again.
fn break_link_for_good(src: &FakeMachine, dst: &FakeMachine) {
    dst.fail_always(Step::RecoverIncoming);
    dst.set_migration_status(MigrationStatus::PostcopyPaused);
    src.break_link();
}

/// Drives the source until it has asked QEMU to switch to post-copy; the target has not
/// seen the switch yet.
async fn postcopy_asked(m: &Move) -> (Arc<FakeMachine>, Arc<FakeMachine>) {
    let src = m.source.machine("a");
    src.wait_for_call(Step::MigrateTo).await;
    let dst = m.target.machine("a");
    src.set_dirty_sync_count(2);
    src.set_migration_status(MigrationStatus::Active);
    src.wait_for_call(Step::StartPostcopy).await;
    (src, dst)
}

/// The switch to post-copy asked for, and held back in QEMU, which makes it only at its
/// next iteration.
async fn postcopy_asked_not_made(m: &Move) -> (Arc<FakeMachine>, Arc<FakeMachine>) {
    m.source.machine("a").hold_postcopy_switch();
    postcopy_asked(m).await
}

/// Drives the source to post-copy and the target to the switchover.
async fn into_postcopy(m: &Move) -> (Arc<FakeMachine>, Arc<FakeMachine>) {
    let (src, dst) = postcopy_asked(m).await;
    dst.set_migration_status(MigrationStatus::PostcopyActive);
    let dir = m.target.vm_dir("a");
    until("the target records the switchover", || {
        dir.join("switched-over").exists()
    })
    .await;
    (src, dst)
}

fn cu_size(n: u32) -> Resources {
    Resources {
        vcpus: n,
        memory_bytes: u64::from(n) << 30,
    }
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
