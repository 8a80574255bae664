//! The fake of what launches QEMUs and runs their vsock backends.

use super::*;

/// Launches [`FakeMachine`]s, remembers them by VM name, and runs fake vsock backends.
#[derive(Default)]
pub struct FakeHypervisor {
    machines: Mutex<HashMap<String, Arc<FakeMachine>>>,
    backends: Backends,
    script: Script,
    /// Never set: the hypervisor itself does not exit.
    alive: watch::Sender<bool>,
}

impl FakeHypervisor {
    pub fn new() -> Arc<FakeHypervisor> {
        Arc::default()
    }

    script_controls!();

    /// The VM last launched as `name`.
    pub fn machine(&self, name: &str) -> Option<Arc<FakeMachine>> {
        self.machines.lock().unwrap().get(name).cloned()
    }

    /// The control sockets of the running vsock backends.
    pub fn vsock_backends(&self) -> Vec<PathBuf> {
        self.backends.lock().unwrap().keys().cloned().collect()
    }

    async fn enter(&self, step: Step, args: String) -> Result<(), Option<VmmError>> {
        self.script
            .enter(step, args, &self.alive)
            .await
            .map_err(|refused| match refused {
                Refused::Injected(error) => error,
                Refused::Exited => None,
            })
    }

    async fn enter_vsock(&self, step: Step, backend: &VsockBackend) -> Result<(), VsockError> {
        let args = backend.vhost_socket.display().to_string();
        self.enter(step, args)
            .await
            .map_err(|error| VsockError::NotReady {
                socket: backend.vhost_socket.display().to_string(),
                log: error.map_or("injected fault".into(), |e| e.to_string()),
                timeout: Duration::ZERO,
            })
    }
}

/// Why QEMU would refuse to start `spec`, as far as a fake can tell.
fn refuses(spec: &MachineSpec) -> Option<String> {
    if spec.boot_vcpus == 0 || spec.initial_vcpus < spec.boot_vcpus {
        return Some("Invalid CPU topology".into());
    }
    if spec.initial_vcpus > spec.vcpu_slots {
        return Some(format!(
            "{} vCPUs do not fit in maxcpus={}",
            spec.initial_vcpus, spec.vcpu_slots
        ));
    }
    if spec.initial_hotplug_memory_bytes > spec.hotplug_memory_bytes
        || !spec
            .initial_hotplug_memory_bytes
            .is_multiple_of(VIRTIO_MEM_BLOCK_BYTES)
    {
        return Some("virtio-mem: invalid 'requested-size'".into());
    }
    None
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn launch(&self, spec: &MachineSpec) -> Result<Arc<dyn Vm>, VmmError> {
        self.enter(Step::Launch, spec.name.clone())
            .await
            .map_err(|error| {
                error.unwrap_or(VmmError::LaunchFailed {
                    stderr: "injected fault".into(),
                })
            })?;
        let refused = |stderr: String| Err(VmmError::LaunchFailed { stderr });
        if let Some(why) = refuses(spec) {
            return refused(why);
        }
        if self.machine(&spec.name).is_some_and(|m| !m.exited_now()) {
            return refused(format!("Cannot lock pid file {}", spec.pidfile.display()));
        }
        let machine = Arc::new(FakeMachine::build(spec, Some(self.backends.clone())));
        if let Some(socket) = &spec.vhost_user_vsock {
            if let Some(why) = machine.backend_refuses(socket) {
                return refused(why);
            }
        }
        let mut machines = self.machines.lock().unwrap();
        machines.insert(spec.name.clone(), machine.clone());
        Ok(machine)
    }

    async fn attach(&self, qmp_socket: &Path, pidfile: &Path) -> Result<Arc<dyn Vm>, VmmError> {
        self.enter(Step::Attach, qmp_socket.display().to_string())
            .await
            .map_err(|error| {
                error.unwrap_or_else(|| {
                    VmmError::Qmp(QmpError::Connect {
                        path: qmp_socket.display().to_string(),
                        source: std::io::ErrorKind::ConnectionRefused.into(),
                    })
                })
            })?;
        let machines = self.machines.lock().unwrap();
        let Some(machine) = machines.values().find(|m| m.spec.qmp_socket == qmp_socket) else {
            // Never started: there is no pidfile.
            return Err(VmmError::Pidfile {
                path: pidfile.display().to_string(),
            });
        };
        if machine.exited_now() {
            return Err(VmmError::NotRunning {
                pid: machine.pid,
                qmp_socket: qmp_socket.display().to_string(),
            });
        }
        Ok(machine.clone())
    }

    async fn ensure_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError> {
        self.enter_vsock(Step::EnsureVsock, backend).await?;
        let mut backends = self.backends.lock().unwrap();
        backends.entry(backend.vhost_socket.clone()).or_default();
        Ok(())
    }

    async fn restart_vsock(&self, backend: &VsockBackend) -> Result<(), VsockError> {
        self.enter_vsock(Step::RestartVsock, backend).await?;
        let mut backends = self.backends.lock().unwrap();
        backends.insert(backend.vhost_socket.clone(), Backend::default());
        Ok(())
    }

    fn stop_vsock(&self, backend: &VsockBackend) {
        let socket = backend.vhost_socket.display().to_string();
        self.script.record(Step::StopVsock, socket);
        self.backends.lock().unwrap().remove(&backend.vhost_socket);
    }

    fn vsock_running(&self, backend: &VsockBackend) -> bool {
        self.backends
            .lock()
            .unwrap()
            .contains_key(&backend.vhost_socket)
    }
}
