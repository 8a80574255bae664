//! Unit-test harness: a real `Host` (store, ledger, VM table, guest link sockets) on a
//! temporary state directory, with QEMU replaced by `vmm::FakeHypervisor`.

use crate::config::Config;
use crate::host::Host;
use crate::migration::{TargetHost, TaskGuard};
use std::path::Path;
use std::sync::Arc;
use vmhost_api::{ApiError, ComputeUnits, CreateVm, ImageRef, IncomingMigration, Resources};
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmm::{Accel, AccelDecision, FakeHypervisor, FakeMachine};

/// The host the test migrations come from, as its certificate would name it.
pub const SOURCE: &str = "host-a";

pub struct TestHost {
    pub host: Arc<Host>,
    pub qemu: Arc<FakeHypervisor>,
    pub dir: tempfile::TempDir,
    accel: Accel,
}

fn config(dir: &Path, name: &str) -> Config {
    std::fs::write(dir.join("vmlinuz"), b"kernel").unwrap();
    let text = format!(
        r#"
        host_name = "{name}"
        state_dir = "{dir}/state"
        api_socket = "{dir}/api.sock"
        vsock_backend = "/nonexistent/vhost-device-vsock"
        [capacity]
        vcpus = 8
        memory_mib = 16384
        [compute_unit]
        vcpus = 1
        memory_mib = 1024
        [guest]
        downscale_answer_secs = 1
        [timeouts]
        hotplug_secs = 1
        [cgroups]
        enabled = false
        [images.test]
        kernel = "{dir}/vmlinuz"
        [fleet]
        cluster = "test"
        listen = "127.0.0.1:1"
        credentials = "{dir}/pki"
        migration_recover_secs = 2
        "#,
        dir = dir.display()
    );
    toml::from_str(&text).unwrap()
}

pub fn cu(n: u32) -> ComputeUnits {
    ComputeUnits::whole(n)
}

/// A post-copy migration's start message for `vm`, without a disk.
pub fn start_message(
    vm: CreateVm,
    bounds: (ComputeUnits, ComputeUnits),
    vcpus: u32,
    restore_hotplug_memory_bytes: u64,
) -> IncomingMigration {
    IncomingMigration {
        version: vmhost_api::MIGRATION_VERSION,
        vm,
        bounds,
        vcpus,
        restore_hotplug_memory_bytes,
        postcopy: true,
        tunnel: 1,
        disk_tunnel: None,
    }
}

impl TestHost {
    pub async fn new(name: &str, accel: Accel) -> TestHost {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), name);
        TestHost::open(dir, config, accel, FakeHypervisor::new()).await
    }

    /// A vmhostd on `dir`'s state directory, with the QEMUs `qemu` runs.
    async fn open(
        dir: tempfile::TempDir,
        config: Config,
        accel: Accel,
        qemu: Arc<FakeHypervisor>,
    ) -> TestHost {
        let host = Host::recover(config, decision(accel), qemu.clone())
            .await
            .unwrap();
        TestHost {
            host,
            qemu,
            dir,
            accel,
        }
    }

    /// A new vmhostd on the same state directory, with the same (fake) QEMUs still running.
    pub async fn restart(self) -> TestHost {
        let config = self.host.config.clone();
        self.restart_with(config).await
    }

    /// Like `restart`, with another config.
    pub async fn restart_with(self, config: Config) -> TestHost {
        let TestHost {
            host,
            qemu,
            dir,
            accel,
        } = self;
        drop(host);
        // The old host's tasks let go of it once they next run.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        TestHost::open(dir, config, accel, qemu).await
    }

    /// A vmhostd restarted on a copy of this host's state directory (sockets left out),
    /// as after a crash of the machine: it finds every QEMU gone.
    pub async fn on_copy(&self) -> TestHost {
        let dir = tempfile::tempdir().unwrap();
        copy_files(&self.host.config.state_dir, &dir.path().join("state"));
        let config = config(dir.path(), self.host.name());
        TestHost::open(dir, config, self.accel, FakeHypervisor::new()).await
    }

    pub fn request(name: &str, min: u32, max: u32, disk_gib: Option<u32>) -> CreateVm {
        CreateVm {
            name: name.into(),
            image: ImageRef::Named("test".into()),
            min_cu: cu(min),
            max_cu: cu(max),
            cu: None,
            autoscale: false,
            agent: Default::default(),
            lease: None,
            disk_gib,
            image_id: None,
            compute_spec: None,
        }
    }

    pub async fn create(&self, name: &str, min: u32, max: u32) {
        self.host
            .create(Self::request(name, min, max, None), None)
            .await
            .unwrap();
    }

    pub fn machine(&self, vm: &str) -> Arc<FakeMachine> {
        self.qemu.machine(vm).expect("a fake QEMU for the VM")
    }

    pub fn state(&self, vm: &str) -> Option<vmhost_api::VmState> {
        self.host.slot(vm).ok().map(|s| s.record().state())
    }

    pub fn vm_dir(&self, vm: &str) -> std::path::PathBuf {
        self.host.store.vm_dir(vm)
    }

    pub fn allocated(&self) -> Resources {
        self.host.host_info().allocated
    }

    /// Reserves room on this host, as the source host `SOURCE` would.
    pub fn lease(&self, vm: &str, resources: Resources) -> u64 {
        let reserve = LeaseRequest::Reserve {
            vm: vm.into(),
            holder: SOURCE.into(),
            resources,
            ttl_ms: 60_000,
        };
        match self.host.admission.serve_lease(SOURCE, reserve) {
            LeaseResponse::Granted(lease) => lease.id,
            other => panic!("lease refused: {other:?}"),
        }
    }
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_files(&entry.path(), &dest);
        } else if kind.is_file() && entry.file_name() != "vmhostd.lock" {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

fn decision(accel: Accel) -> AccelDecision {
    AccelDecision {
        accel,
        reason: "test".into(),
    }
}

/// Another host as a migration's target, reached in-process.
pub struct LocalTarget {
    pub target: Arc<Host>,
}

#[async_trait::async_trait]
impl TargetHost for LocalTarget {
    fn name(&self) -> &str {
        self.target.name()
    }

    async fn prepare(&self, incoming: IncomingMigration) -> Result<(), ApiError> {
        self.target
            .prepare_arrival(incoming, SOURCE)
            .await
            .map(drop)
            .map_err(Into::into)
    }

    async fn listen_again(&self, vm: &str) -> Result<(), ApiError> {
        self.target
            .recover_arrival(vm, SOURCE)
            .await
            .map(drop)
            .map_err(Into::into)
    }

    async fn runs(&self, vm: &str) -> bool {
        self.target
            .slot(vm)
            .is_ok_and(|s| s.record().state() == vmhost_api::VmState::Running)
    }

    async fn release_lease(&self, lease: u64) {
        self.target.admission.release_lease(lease)
    }

    fn keep_lease(&self, _lease: u64) -> TaskGuard {
        TaskGuard(tokio::spawn(async {}))
    }

    /// Fake QEMUs carry no bytes: there is nothing to tunnel.
    fn forward(&self, _socket: &Path, _tunnel: u64) -> Result<TaskGuard, ApiError> {
        Ok(TaskGuard(tokio::spawn(async {})))
    }
}
