use crate::testing::TestHost;
use std::os::unix::fs::PermissionsExt;
use vmhost_api::ImageRef;
use vmm::Accel;

#[tokio::test]
async fn a_vms_console_log_is_readable_by_root_alone() {
    let host = TestHost::new("host-a", Accel::Kvm).await;
    host.create("a", 1, 1).await;
    let log = host.host.paths("a").serial_log;
    let mode = std::fs::metadata(log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn a_relative_image_path_is_refused_not_taken_from_vmhostds_directory() {
    let host = TestHost::new("host-a", Accel::Kvm).await;
    let mut request = TestHost::request("a", 1, 1, None);
    request.image = ImageRef::Path("images/test".into());
    let error = host.host.create(request, None).await.unwrap_err();
    assert!(error.to_string().contains("relative"), "{error}");
    assert!(host.state("a").is_none());
}

#[tokio::test]
async fn unreadable_saved_leases_are_set_aside_and_the_vms_still_come_back() {
    let host = TestHost::new("host-a", Accel::Kvm).await;
    host.create("a", 1, 1).await;
    let leases = host.host.config.state_dir.join("leases.json");
    std::fs::write(&leases, b"{torn").unwrap();
    let restarted = host.restart().await;
    assert_eq!(restarted.state("a"), Some(vmhost_api::VmState::Running));
    let aside = restarted.host.config.state_dir.join("leases.json.corrupt");
    assert_eq!(std::fs::read(aside).unwrap(), b"{torn");
}

#[tokio::test]
async fn disks_are_booked_at_their_full_size_against_the_disk_capacity() {
    let host = TestHost::new("host-a", Accel::Kvm).await;
    let mut config = host.host.config.clone();
    config.capacity.disk_gib = Some(3);
    let host = host.restart_with(config).await;
    let create = |name: &str| TestHost::request(name, 1, 1, Some(2));
    host.host.create(create("a"), None).await.unwrap();
    let error = vmhost_api::ApiError::from(host.host.create(create("b"), None).await.unwrap_err());
    assert_eq!(error.kind, vmhost_api::ErrorKind::CapacityExceeded);
    assert!(error.message.contains("only 1 of 3 GiB"), "{error}");
    assert!(host.state("b").is_none());
    assert!(!host.vm_dir("b").exists());
    // A restart books the disks it finds; a delete gives the room back.
    let host = host.restart().await;
    assert!(host.host.create(create("b"), None).await.is_err());
    assert_eq!(host.host.host_info().disk_allocated_gib, 2);
    host.host.delete("a").await.unwrap();
    host.host.create(create("b"), None).await.unwrap();
}

#[tokio::test]
async fn a_stop_cut_short_by_a_restart_is_finished_so_no_second_qemu_can_run() {
    use vmm::Vm;
    let host = TestHost::new("host-a", Accel::Kvm).await;
    host.create("a", 1, 1).await;
    // vmhostd saved the stop, then went away before QEMU had ended.
    let mut spec = host.host.slot("a").unwrap().record().spec.clone();
    spec.run = false;
    host.host.store.save(&spec).unwrap();
    let first = host.machine("a");
    let host = host.restart().await;
    assert!(first.exited_now(), "the QEMU of a stopped VM still runs");
    assert!(host.qemu.vsock_backends().is_empty());
    assert_eq!(host.state("a"), Some(vmhost_api::VmState::Stopped));
    host.host.start("a").await.unwrap();
    assert!(!host.machine("a").exited_now());
}

#[tokio::test]
async fn a_start_that_cannot_write_its_files_leaves_no_backend_running() {
    // Under TCG a start writes the VM's vCPU plug budget.
    let host = TestHost::new("host-a", Accel::Tcg).await;
    host.create("a", 1, 1).await;
    host.host.stop("a").await.unwrap();
    assert!(host.qemu.vsock_backends().is_empty());
    // A folder in place of the budget's temporary file fails its write, as a full disk does.
    let blocker = host.vm_dir("a").join("vcpu-plug-budget.tmp");
    std::fs::create_dir(&blocker).unwrap();
    assert!(host.host.start("a").await.is_err());
    assert!(
        host.qemu.vsock_backends().is_empty(),
        "a backend outlived the failed start"
    );
    std::fs::remove_dir(&blocker).unwrap();
    host.host.start("a").await.unwrap();
    assert_eq!(host.qemu.vsock_backends().len(), 1);
}
