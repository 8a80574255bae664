use super::*;
use crate::accel::Accel;
use crate::cmdline::Nic;
use MigrationStatus as S;

const SHORT: Duration = Duration::from_millis(50);

fn spec(name: &str) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        accel: Accel::Kvm,
        boot_vcpus: 1,
        initial_vcpus: 2,
        max_vcpus: 4,
        vcpu_slots: 4,
        boot_memory_bytes: 1 << 30,
        hotplug_memory_bytes: 1 << 30,
        initial_hotplug_memory_bytes: 0,
        kernel: "/img/vmlinuz".into(),
        initrd: None,
        kernel_cmdline: String::new(),
        nic: Nic::None,
        disk: Some(format!("/state/{name}/disk.raw").into()),
        root_image: None,
        spare_root_ports: 0,
        vhost_user_vsock: None,
        incoming: false,
        qmp_socket: format!("/state/{name}/qmp.sock").into(),
        serial_log: format!("/state/{name}/serial.log").into(),
        pidfile: format!("/state/{name}/qemu.pid").into(),
    }
}

fn backend(name: &str) -> VsockBackend {
    VsockBackend {
        binary: "vhost-device-vsock".into(),
        vhost_socket: format!("/state/{name}/vhost.sock").into(),
        uds_path: format!("/state/{name}/vsock.sock").into(),
        pidfile: format!("/state/{name}/vsock.pid").into(),
        log: format!("/state/{name}/vsock.log").into(),
    }
}

#[tokio::test]
async fn resizes_within_the_spec_and_logs_commands() {
    let vm = FakeMachine::new(&spec("a"));
    assert_eq!(vm.vcpus().await.unwrap(), 2);
    assert_eq!(vm.set_vcpus(4, SHORT).await.unwrap(), 2);
    assert!(matches!(
        vm.set_vcpus(5, SHORT).await,
        Err(VmmError::VcpusOutOfRange { slots: 4, .. })
    ));
    vm.set_hotplug_memory(512 << 20, SHORT).await.unwrap();
    assert_eq!(vm.hotplug_memory().await.unwrap(), 512 << 20);
    assert!(vm.set_hotplug_memory(2 << 30, SHORT).await.is_err());
    vm.fail_next(Step::SetVcpus);
    assert!(vm.set_vcpus(1, SHORT).await.is_err());
    assert_eq!(vm.set_vcpus(1, SHORT).await.unwrap(), 0);
    let log: Vec<String> = vm.calls().iter().map(ToString::to_string).collect();
    assert_eq!(
        log,
        [
            "vcpus()",
            "set_vcpus(4)",
            "set_vcpus(5)",
            "set_hotplug_memory(536870912)",
            "hotplug_memory()",
            "set_hotplug_memory(2147483648)",
            "set_vcpus(1)",
            "set_vcpus(1)",
        ]
    );
}

#[tokio::test]
async fn tcg_aborts_past_its_plug_budget() {
    let vm = FakeMachine::new(&MachineSpec {
        accel: Accel::Tcg,
        vcpu_slots: 3,
        ..spec("a")
    });
    vm.set_vcpus(3, SHORT).await.unwrap();
    vm.set_vcpus(2, SHORT).await.unwrap();
    assert!(matches!(
        vm.set_vcpus(3, SHORT).await,
        Err(VmmError::Exited { .. })
    ));
    assert!(vm.exited_now());
}

#[tokio::test]
async fn postcopy_migration_with_a_pause_and_a_broken_link() {
    let vm = FakeMachine::new(&spec("a"));
    let mut events = vm.migration_events();
    vm.prepare_migration(true, Default::default())
        .await
        .unwrap();
    vm.pause_before_switchover().await.unwrap();
    vm.migrate_to(Path::new("/s/out.sock"), false)
        .await
        .unwrap();
    assert_eq!(events.next_change(SHORT).await, Some(S::Setup));
    assert_eq!(events.next_change(SHORT).await, Some(S::Active));
    vm.set_dirty_sync_count(2);
    let info = vm.migration_info().await.unwrap();
    assert_eq!(info.ram.unwrap().dirty_sync_count, 2);
    vm.start_postcopy().await.unwrap();
    assert_eq!(vm.migration_status(), S::PreSwitchover);
    assert!(!vm.status().await.unwrap().running);
    vm.continue_switchover().await.unwrap();
    assert_eq!(vm.migration_status(), S::PostcopyActive);
    assert!(vm.cancel_migration().await.is_err());
    vm.break_link();
    assert_eq!(vm.migration_status(), S::PostcopyPaused);
    vm.migrate_to(Path::new("/s/out.sock"), true).await.unwrap();
    vm.complete_migration();
    let mut seen = Vec::new();
    while let Some(status) = events.next_change(SHORT).await {
        seen.push(status);
    }
    assert_eq!(
        seen,
        [
            S::PreSwitchover,
            S::Device,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed
        ]
    );
    assert_eq!(vm.status().await.unwrap().status, "postmigrate");
}

#[tokio::test]
async fn incoming_side_listens_recovers_and_completes() {
    let vm = FakeMachine::new(&MachineSpec {
        incoming: true,
        ..spec("b")
    });
    assert!(vm.migrate_to(Path::new("/s/x"), false).await.is_err());
    vm.listen_incoming(Path::new("/s/in.sock")).await.unwrap();
    assert_eq!(vm.migration_status(), S::Setup);
    vm.set_migration_status(S::PostcopyPaused);
    assert!(matches!(
        vm.recover_incoming(Path::new("/s/in2.sock"), SHORT).await,
        Err(VmmError::NoOobMonitor)
    ));
    vm.open_oob_monitor(SHORT).await.unwrap();
    vm.recover_incoming(Path::new("/s/in2.sock"), SHORT)
        .await
        .unwrap();
    assert_eq!(vm.recoveries(), [PathBuf::from("/s/in2.sock")]);
    vm.complete_migration();
    let status = vm.status().await.unwrap();
    assert!(status.running && status.status == "running");
    assert_eq!(vm.migration_info().await.unwrap().status, S::Completed);
}

#[tokio::test]
async fn a_failed_precopy_destination_exits() {
    let vm = FakeMachine::new(&MachineSpec {
        incoming: true,
        ..spec("b")
    });
    vm.listen_incoming(Path::new("/s/in.sock")).await.unwrap();
    vm.set_migration_status(S::Active);
    vm.break_link();
    tokio::time::timeout(SHORT, vm.exited()).await.unwrap();
    assert!(vm.migration_info().await.is_err());
    assert!(vm.terminate().await.is_ok());
}

#[tokio::test]
async fn a_stalled_step_waits_for_release_or_the_crash() {
    let vm = FakeMachine::new(&spec("a"));
    vm.stall(Step::MigrateTo);
    let task = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.migrate_to(Path::new("/s/o"), false).await })
    };
    vm.wait_for_call(Step::MigrateTo).await;
    tokio::time::sleep(SHORT).await;
    assert!(!task.is_finished());
    vm.release(Step::MigrateTo);
    task.await.unwrap().unwrap();

    vm.stall(Step::CancelMigration);
    let task = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.cancel_migration().await })
    };
    vm.wait_for_call(Step::CancelMigration).await;
    vm.crash();
    assert!(task.await.unwrap().is_err());
    let mut events = vm.migration_events();
    assert_eq!(events.next_change(SHORT).await, None);
}

#[tokio::test]
async fn disk_mirror_and_export() {
    let vm = FakeMachine::new(&spec("a"));
    assert!(vm.finish_disk_mirror(SHORT).await.is_err());
    vm.set_mirror_progress(MirrorProgress {
        copied_bytes: 1,
        total_bytes: 2,
        ready: false,
    });
    vm.start_disk_mirror(Path::new("/s/d")).await.unwrap();
    assert!(!vm.disk_mirror_progress().await.unwrap().ready);
    assert!(vm.finish_disk_mirror(SHORT).await.is_err());
    vm.start_disk_mirror(Path::new("/s/d")).await.unwrap();
    assert!(vm.disk_mirror_progress().await.unwrap().ready);
    vm.finish_disk_mirror(SHORT).await.unwrap();
    assert_eq!(vm.disk_mirror(), None);

    vm.export_disk(Path::new("/s/e")).await.unwrap();
    assert!(vm.export_disk(Path::new("/s/e")).await.is_err());
    vm.unexport_disk().await.unwrap();
    assert_eq!(vm.disk_export(), None);
}

#[tokio::test]
async fn hypervisor_launches_attaches_and_runs_vsock_backends() {
    let hv = FakeHypervisor::new();
    let with_vsock = MachineSpec {
        vhost_user_vsock: Some(backend("a").vhost_socket),
        ..spec("a")
    };
    // QEMU cannot start without its vsock backend.
    assert!(hv.launch(&with_vsock).await.is_err());
    hv.ensure_vsock(&backend("a")).await.unwrap();
    let vm = hv.launch(&with_vsock).await.unwrap();
    assert!(hv.launch(&with_vsock).await.is_err());
    let fake = hv.machine("a").unwrap();
    assert_eq!(fake.pid(), vm.pid());
    assert!(fake.vsock_plugged());

    // A replug needs a fresh backend.
    vm.unplug_vsock(SHORT).await.unwrap();
    hv.ensure_vsock(&backend("a")).await.unwrap();
    assert!(vm.plug_vsock(&backend("a").vhost_socket).await.is_err());
    hv.restart_vsock(&backend("a")).await.unwrap();
    vm.plug_vsock(&backend("a").vhost_socket).await.unwrap();

    let spec = spec("a");
    let again = hv.attach(&spec.qmp_socket, &spec.pidfile).await.unwrap();
    assert_eq!(again.pid(), vm.pid());
    fake.crash();
    assert!(matches!(
        hv.attach(&spec.qmp_socket, &spec.pidfile).await,
        Err(VmmError::NotRunning { .. })
    ));
    hv.stop_vsock(&backend("a"));
    assert!(!hv.vsock_running(&backend("a")));
    hv.fail_next(Step::Launch);
    assert!(hv.launch(&spec).await.is_err());
    assert_eq!(
        hv.steps(),
        [
            Step::Launch,
            Step::EnsureVsock,
            Step::Launch,
            Step::Launch,
            Step::EnsureVsock,
            Step::RestartVsock,
            Step::Attach,
            Step::Attach,
            Step::StopVsock,
            Step::Launch
        ]
    );
}
