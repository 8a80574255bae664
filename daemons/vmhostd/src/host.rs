//! The VMs of this host: lifecycle, resizing, admission control and recovery after a restart.
//!
//! Each VM has an operation lock (one lifecycle or resize operation at a time, so slow guest
//! acknowledgements never block other VMs) and a record behind a short-held mutex that
//! listings read.

use crate::agent_task::{self, AgentHandle, AgentView};
use crate::config::{Config, NetworkConfig};
use crate::events::EventLog;
use crate::guest_link::{DownscaleError, GuestLink, UpscaleRequest};
use crate::net;
use crate::prometheus::{ScalingStats, VmGauges};
use crate::store::{BootSource, Departure, Marker, Store, StoreError, VmPaths, VmSpec};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vmhost_agent::{Action, Outcome};
use vmhost_api::{
    ApiError, ComputeUnits, CreateVm, ErrorKind, EventKind, HostInfo, ImageRef, Reply, Request,
    Resources, VmInfo, VmState,
};
use vmhost_gossip::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_gossip::ledger::{LeaseId, Ledger, LedgerError};
use vmm::{AccelDecision, Machine, MachineSpec, Nic, VmmError};

mod migrate;
pub use migrate::{Outgoing, TunnelTargets};

/// Spare PCIe root ports for devices plugged at run time.
const SPARE_ROOT_PORTS: u32 = 4;
/// q35 with x2APIC supports up to 288 vCPUs; stay well below.
const MAX_VCPUS: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no VM named '{0}' on this host")]
    NotFound(String),
    #[error("a VM named '{0}' already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Capacity(#[from] LedgerError),
    #[error("VM '{name}' is {state}; cannot {action} it")]
    WrongState {
        name: String,
        state: VmState,
        action: &'static str,
    },
    #[error("VM '{name}': cannot {action}")]
    Vmm {
        name: String,
        action: &'static str,
        #[source]
        source: VmmError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Vsock(#[from] vmm::vsock::VsockError),
    #[error("VM '{name}': cannot shrink: {source}")]
    Downscale {
        name: String,
        #[source]
        source: DownscaleError,
    },
}

impl HostError {
    /// The single place where errors become API error classes (and so vmctl exit codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            HostError::NotFound(_) => ErrorKind::NotFound,
            HostError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            HostError::Invalid(_) => ErrorKind::InvalidArgument,
            HostError::Capacity(_) => ErrorKind::CapacityExceeded,
            HostError::WrongState { .. } => ErrorKind::WrongState,
            HostError::Downscale { .. } => ErrorKind::Refused,
            HostError::Vmm { .. }
            | HostError::Store(_)
            | HostError::Net(_)
            | HostError::Vsock(_) => ErrorKind::Internal,
        }
    }
}

impl From<HostError> for ApiError {
    fn from(error: HostError) -> ApiError {
        ApiError::new(error.kind(), error_chain(&error))
    }
}

/// Maps a QEMU failure while doing `action` to VM `name`.
pub(crate) fn vmm_error<'a>(
    name: &'a str,
    action: &'static str,
) -> impl FnOnce(VmmError) -> HostError + 'a {
    move |source| HostError::Vmm {
        name: name.into(),
        action,
        source,
    }
}

/// Wall-clock milliseconds: lease expiries are persisted, so they must survive a restart.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// "outer: cause: root cause", on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

struct VmRecord {
    spec: VmSpec,
    state: VmState,
    machine: Option<Arc<Machine>>,
    /// What QEMU holds now, as last measured.
    applied: Resources,
    /// vCPU plugs the running QEMU can still take (see `vmm::cmdline::vcpu_slots`).
    vcpu_plug_budget: Option<u32>,
    /// The link to the guest's monitor, while QEMU runs.
    guest: Option<Arc<GuestLink>>,
    /// The autoscaling agent, while QEMU runs and the VM autoscales.
    agent: Option<AgentHandle>,
    /// The agent's latest goal.
    goal: Option<ComputeUnits>,
}

struct VmSlot {
    operation: tokio::sync::Mutex<()>,
    record: Mutex<VmRecord>,
}

impl VmSlot {
    fn record(&self) -> MutexGuard<'_, VmRecord> {
        self.record.lock().expect("VM record lock poisoned")
    }
}

pub struct Host {
    pub events: EventLog,
    pub stats: ScalingStats,
    config: Config,
    host_name: String,
    accel: AccelDecision,
    store: Store,
    ledger: Mutex<Ledger>,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
    /// Where each migration tunnel a peer opens is delivered.
    pub tunnels: TunnelTargets,
}

fn validate_name(name: &str) -> Result<(), HostError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "invalid VM name '{name}': use 1 to 63 lowercase letters, digits and '-', not starting with '-'"
        )))
    }
}

fn check_bounds(spec: &VmSpec, cu: ComputeUnits) -> Result<(), HostError> {
    if cu < spec.min_cu || cu > spec.max_cu {
        return Err(HostError::Invalid(format!(
            "{cu} CU is outside VM '{}' bounds [{}, {}]",
            spec.name, spec.min_cu, spec.max_cu
        )));
    }
    Ok(())
}

impl Host {
    /// Opens the state directory and reattaches to every VM that should be running.
    pub async fn recover(config: Config, accel: AccelDecision) -> Result<Arc<Host>, StoreError> {
        let store = Store::open(&config.state_dir)?;
        let (specs, broken) = store.load_all()?;
        for error in broken {
            tracing::error!(error = %error_chain(&error), "skipping a VM folder");
        }
        let ledger = match store.load_leases()? {
            Some(saved) => {
                let ledger = Ledger::with_leases_from(config.capacity(), saved);
                tracing::info!(
                    leases = ledger.leases().count(),
                    "restored the leases granted before the restart"
                );
                ledger
            }
            None => Ledger::new(config.capacity()),
        };
        let host = Arc::new(Host {
            events: EventLog::default(),
            stats: ScalingStats::default(),
            host_name: config.host_name(),
            ledger: Mutex::new(ledger),
            config,
            accel,
            store,
            vms: Mutex::new(BTreeMap::new()),
            tunnels: TunnelTargets::default(),
        });
        for spec in specs {
            host.reattach(spec).await;
        }
        Ok(host)
    }

    async fn reattach(self: &Arc<Self>, spec: VmSpec) {
        let name = spec.name.clone();
        if spec.incoming {
            self.reattach_incoming(spec).await;
            return;
        }
        let mut record = VmRecord {
            state: VmState::Stopped,
            machine: None,
            applied: spec.cu_shape.resources(spec.cu),
            vcpu_plug_budget: self.load_plug_budget(&spec.name),
            guest: None,
            agent: None,
            goal: None,
            spec,
        };
        if record.spec.run {
            let paths = self.paths(&name);
            match Machine::attach(
                &paths.qmp_socket,
                &paths.pidfile,
                self.config.timeouts.qmp(),
            )
            .await
            {
                Ok(machine) => {
                    let machine = Arc::new(machine);
                    match self.measure(&record.spec, &machine).await {
                        Ok(applied) => record.applied = applied,
                        Err(error) => {
                            tracing::warn!(vm = %name, error = %error_chain(&error), "cannot measure VM; booking its spec size")
                        }
                    }
                    if self.ledger().adopt(&name, record.applied) {
                        tracing::warn!(vm = %name, "host is over capacity after reattaching (was capacity lowered?)");
                    }
                    tracing::info!(vm = %name, pid = machine.pid(), size = %record.applied, "reattached to running VM");
                    if self.store.has_marker(&name, Marker::Leaving) {
                        // Its migration lost its orchestration; see `resume_interrupted_outgoing`.
                        record.state = VmState::Migrating;
                        record.machine = Some(machine.clone());
                        self.watch_exit(&name, machine);
                    } else {
                        if !paths.vsock.is_running() {
                            tracing::error!(vm = %name, "the VM's vsock backend is gone; its guest cannot reach this host until it restarts");
                        }
                        self.set_running(&mut record, machine);
                    }
                }
                Err(error) => {
                    tracing::error!(vm = %name, error = %error_chain(&error), "VM should be running but its QEMU is gone");
                    record.state = VmState::Crashed;
                }
            }
        }
        let interrupted = (record.state == VmState::Migrating).then(|| record.spec.clone());
        self.vms().insert(
            name,
            Arc::new(VmSlot {
                operation: tokio::sync::Mutex::new(()),
                record: Mutex::new(record),
            }),
        );
        if let Some(spec) = interrupted {
            self.resume_interrupted_outgoing(spec).await;
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger lock poisoned")
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<VmSlot>>> {
        self.vms.lock().expect("VM table lock poisoned")
    }

    fn slot(&self, name: &str) -> Result<Arc<VmSlot>, HostError> {
        self.vms()
            .get(name)
            .cloned()
            .ok_or_else(|| HostError::NotFound(name.into()))
    }

    /// Whether a VM of that name exists.
    pub fn show_exists(&self, name: &str) -> Result<(), HostError> {
        self.slot(name).map(|_| ())
    }

    pub async fn handle(self: &Arc<Self>, request: Request) -> Result<Reply, HostError> {
        match request {
            Request::Create(create) => self.create(create).await.map(|vm| Reply::Vm(Box::new(vm))),
            Request::List => Ok(Reply::Vms(self.list())),
            Request::Show { name } => self.show(&name).await.map(|vm| Reply::Vm(Box::new(vm))),
            Request::Scale { name, cu, force } => self
                .scale(&name, cu, force)
                .await
                .map(|vm| Reply::Vm(Box::new(vm))),
            Request::Stop { name } => self.stop(&name).await.map(|vm| Reply::Vm(Box::new(vm))),
            Request::Start { name } => self.start(&name).await.map(|vm| Reply::Vm(Box::new(vm))),
            Request::Delete { name } => self.delete(&name).await.map(|()| Reply::Deleted { name }),
            Request::Host => Ok(Reply::Host(self.host_info())),
            Request::Bounds {
                name,
                min_cu,
                max_cu,
            } => self
                .bounds(&name, min_cu, max_cu)
                .await
                .map(|vm| Reply::Vm(Box::new(vm))),
            Request::Events { name, .. } => {
                if let Some(name) = &name {
                    self.slot(name)?;
                }
                Ok(Reply::Events(self.events.snapshot(name.as_deref()).0))
            }
            Request::MigrateIn(incoming) => self
                .prepare_incoming(*incoming)
                .await
                .map(|vm| Reply::Vm(Box::new(vm))),
            Request::MigrateRecover { name } => self
                .recover_incoming(&name)
                .await
                .map(|vm| Reply::Vm(Box::new(vm))),
            Request::FleetList | Request::Hosts | Request::OnHost { .. } | Request::Migrate(_) => {
                Err(HostError::Invalid(
                    "this host is not part of a fleet ([fleet] is not in its config)".into(),
                ))
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.host_name
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Answers another host's lease request against the ledger local scaling uses, and
    /// persists the leases before the answer leaves.
    pub fn serve_lease(&self, request: LeaseRequest) -> LeaseResponse {
        let mut ledger = self.ledger();
        let response = lease::serve(&mut ledger, request, now_ms());
        match &response {
            LeaseResponse::Granted(l) => {
                tracing::info!(lease = l.id, vm = %l.vm, holder = %l.holder, size = %l.resources, "lease granted")
            }
            LeaseResponse::Refused { reason, .. } => tracing::info!(%reason, "lease refused"),
            _ => {}
        }
        let changed = matches!(
            response,
            LeaseResponse::Granted(_)
                | LeaseResponse::Renewed(_)
                | LeaseResponse::Committed(_)
                | LeaseResponse::Released
        );
        if changed {
            self.persist_leases(&ledger);
        }
        response
    }

    /// Drops leases whose holder stopped renewing them.
    pub fn expire_leases(&self) {
        let mut ledger = self.ledger();
        let expired = ledger.expire(now_ms());
        for lease in &expired {
            tracing::warn!(lease = lease.id, vm = %lease.vm, holder = %lease.holder, size = %lease.resources, "lease expired: its holder neither committed nor released it");
        }
        if !expired.is_empty() {
            self.persist_leases(&ledger);
        }
    }

    fn persist_leases(&self, ledger: &Ledger) {
        if let Err(error) = self.store.save_leases(ledger) {
            tracing::error!(error = %error_chain(&error), "cannot persist leases; a restart would forget them");
        }
    }

    /// Books a new VM: from the lease granted for it when it was placed from another host,
    /// or fresh from the ledger.
    fn book_new_vm(
        &self,
        name: &str,
        size: Resources,
        lease: Option<LeaseId>,
    ) -> Result<(), HostError> {
        let Some(id) = lease else {
            return Ok(self.ledger().set(name, size)?);
        };
        let mut ledger = self.ledger();
        let held = ledger
            .leases()
            .find(|l| l.id == id)
            .cloned()
            .ok_or(LedgerError::UnknownLease(id))?;
        if held.vm != name || held.resources != size {
            return Err(HostError::Invalid(format!(
                "lease {id} is for VM '{}' of {}, not '{name}' of {size}",
                held.vm, held.resources
            )));
        }
        ledger.commit(id, now_ms())?;
        self.persist_leases(&ledger);
        Ok(())
    }

    fn info(&self, slot: &VmSlot) -> VmInfo {
        let record = slot.record();
        let spec = &record.spec;
        VmInfo {
            name: spec.name.clone(),
            state: record.state,
            cu: spec.cu,
            min_cu: spec.min_cu,
            max_cu: spec.max_cu,
            vcpus: record.applied.vcpus,
            memory_bytes: record.applied.memory_bytes,
            accel: self.accel.accel.to_string(),
            image: spec.image.to_string(),
            host: self.host_name.clone(),
            autoscale: spec.autoscale,
            disk_gib: spec.disk_gib,
            goal_cu: record.goal.filter(|_| record.agent.is_some()),
            pid: record.machine.as_ref().map(|m| m.pid()),
            serial_log: self.paths(&spec.name).serial_log.display().to_string(),
            qemu_status: None,
            guest: record.guest.as_ref().map(|g| g.info()),
        }
    }

    /// One VM, with QEMU's run state asked live.
    async fn show(&self, name: &str) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let machine = slot.record().machine.clone();
        let mut info = self.info(&slot);
        if let Some(machine) = machine {
            info.qemu_status = Some(match machine.status().await {
                Ok(status) => status.status,
                Err(error) => format!("unknown ({})", error_chain(&error)),
            });
        }
        Ok(info)
    }

    /// Prometheus gauges of every VM, read now.
    pub fn gauges(&self) -> Vec<VmGauges> {
        self.list()
            .into_iter()
            .map(|vm| VmGauges {
                cu: vm.cu.as_f64(),
                goal_cu: vm.goal_cu.map(|g| g.as_f64()),
                guest_connected: vm.guest.as_ref().is_some_and(|g| g.connected),
                guest_healthy: vm.guest.as_ref().is_some_and(|g| g.healthy),
                vm: vm.name,
            })
            .collect()
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let slots: Vec<_> = self.vms().values().cloned().collect();
        slots.iter().map(|slot| self.info(slot)).collect()
    }

    pub fn host_info(&self) -> HostInfo {
        let ledger = self.ledger();
        HostInfo {
            name: self.host_name.clone(),
            accel: self.accel.accel.to_string(),
            accel_reason: self.accel.reason.clone(),
            cu_shape: self.config.cu_shape(),
            capacity: ledger.capacity(),
            allocated: ledger.allocated(),
            leased: ledger.leased(),
            vms: self.vms().len(),
        }
    }

    fn resolve_image(&self, image: &ImageRef) -> Result<BootSource, HostError> {
        let boot = match image {
            ImageRef::Named(name) => {
                let configured = self.config.images.get(name).ok_or_else(|| {
                    let known: Vec<_> = self.config.images.keys().map(String::as_str).collect();
                    HostError::Invalid(format!(
                        "image '{name}' is not configured on this host (configured: {})",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ))
                })?;
                BootSource {
                    kernel: configured.kernel.clone(),
                    initrd: configured.initrd.clone(),
                    cmdline: configured.cmdline.clone(),
                }
            }
            ImageRef::Path(dir) => {
                let dir = std::path::absolute(dir).map_err(|e| {
                    HostError::Invalid(format!("bad image path {}: {e}", dir.display()))
                })?;
                let initrd = dir.join("initrd.img");
                BootSource {
                    kernel: dir.join("vmlinuz"),
                    initrd: initrd.exists().then_some(initrd),
                    cmdline: crate::config::default_cmdline(),
                }
            }
        };
        for file in std::iter::once(&boot.kernel).chain(&boot.initrd) {
            if !file.is_file() {
                return Err(HostError::Invalid(format!(
                    "image '{image}': {} does not exist",
                    file.display()
                )));
            }
        }
        Ok(boot)
    }

    /// The VM a create request describes, checked.
    fn spec_for(&self, request: CreateVm) -> Result<VmSpec, HostError> {
        validate_name(&request.name)?;
        if request.min_cu > request.max_cu {
            return Err(HostError::Invalid(format!(
                "min_cu ({}) is greater than max_cu ({})",
                request.min_cu, request.max_cu
            )));
        }
        if let Some(gib) = request
            .disk_gib
            .filter(|g| !(1..=vmhost_api::MAX_DISK_GIB).contains(g))
        {
            return Err(HostError::Invalid(format!(
                "a disk of {gib} GiB: disks are 1 to {} GiB",
                vmhost_api::MAX_DISK_GIB
            )));
        }
        let shape = self.config.cu_shape();
        let spec = VmSpec {
            name: request.name.clone(),
            boot: self.resolve_image(&request.image)?,
            image: request.image,
            cu_shape: shape,
            min_cu: request.min_cu,
            max_cu: request.max_cu,
            cu: request.cu.unwrap_or(request.min_cu),
            run: true,
            autoscale: request.autoscale,
            launched_bounds: Some((request.min_cu, request.max_cu)),
            agent: request.agent,
            incoming: false,
            disk_gib: request.disk_gib,
        };
        check_bounds(&spec, spec.cu)?;
        agent_task::effective_config(&self.config.agent, &spec.agent)
            .map_err(HostError::Invalid)?;
        let max_vcpus = shape.resources(spec.max_cu).vcpus;
        if max_vcpus > MAX_VCPUS {
            return Err(HostError::Invalid(format!(
                "max_cu {} means {max_vcpus} vCPUs; at most {MAX_VCPUS} are supported",
                spec.max_cu
            )));
        }
        Ok(spec)
    }

    async fn create(self: &Arc<Self>, request: CreateVm) -> Result<VmInfo, HostError> {
        let lease = request.lease;
        let spec = self.spec_for(request)?;
        let shape = spec.cu_shape;
        let name = spec.name.clone();
        let slot = self.insert_slot(&spec, shape.resources(spec.cu), VmState::Starting)?;
        let _operation = slot.operation.lock().await;
        let created = async {
            self.book_new_vm(&name, shape.resources(spec.cu), lease)?;
            if let Err(error) = self.store.create_vm(&spec) {
                self.ledger().release(&name);
                return Err(error.into());
            }
            match self.launch(&spec, StartAs::Boot).await {
                Ok(machine) => Ok(machine),
                Err(error) => {
                    self.ledger().release(&name);
                    net::remove_tap(&name);
                    if let Err(e) = self.store.remove_vm(&name) {
                        tracing::error!(vm = %name, error = %error_chain(&e), "cannot clean up after a failed create");
                    }
                    Err(error)
                }
            }
        }
        .await;
        match created {
            Ok((machine, budget)) => {
                {
                    let mut record = slot.record();
                    record.vcpu_plug_budget = budget;
                    self.set_running(&mut record, machine);
                }
                tracing::info!(vm = %name, cu = %spec.cu, "created VM");
                Ok(self.info(&slot))
            }
            Err(error) => {
                self.vms().remove(&name);
                Err(error)
            }
        }
    }

    /// Enters a VM that has no QEMU yet in the table; its name must be free.
    fn insert_slot(
        &self,
        spec: &VmSpec,
        applied: Resources,
        state: VmState,
    ) -> Result<Arc<VmSlot>, HostError> {
        let slot = Arc::new(VmSlot {
            operation: tokio::sync::Mutex::new(()),
            record: Mutex::new(VmRecord {
                applied,
                spec: spec.clone(),
                state,
                machine: None,
                vcpu_plug_budget: None,
                guest: None,
                agent: None,
                goal: None,
            }),
        });
        let mut vms = self.vms();
        if vms.contains_key(&spec.name) {
            return Err(HostError::AlreadyExists(spec.name.clone()));
        }
        vms.insert(spec.name.clone(), slot.clone());
        Ok(slot)
    }

    fn plug_budget_file(&self, name: &str) -> std::path::PathBuf {
        self.store.vm_dir(name).join("vcpu-plug-budget")
    }

    /// The budget saved for a running QEMU. Under TCG a missing file means no plugs are
    /// known to be safe.
    fn load_plug_budget(&self, name: &str) -> Option<u32> {
        match self.accel.accel {
            vmm::Accel::Kvm => None,
            vmm::Accel::Tcg => Some(
                std::fs::read_to_string(self.plug_budget_file(name))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
            ),
        }
    }

    fn save_plug_budget(&self, name: &str, budget: Option<u32>) -> Result<(), HostError> {
        let path = self.plug_budget_file(name);
        match budget {
            None => Ok(()),
            Some(left) => std::fs::write(&path, left.to_string()).map_err(|source| {
                StoreError::Io {
                    action: "cannot write",
                    path: path.display().to_string(),
                    source,
                }
                .into()
            }),
        }
    }

    /// Starts QEMU for `spec`: booting at its current size, or as a migration target.
    /// Returns it with its vCPU plug budget.
    async fn launch(
        &self,
        spec: &VmSpec,
        start: StartAs,
    ) -> Result<(Arc<Machine>, Option<u32>), HostError> {
        let paths = self.paths(&spec.name);
        let min = spec.cu_shape.resources(spec.min_cu);
        let max = spec.cu_shape.resources(spec.max_cu);
        let now = match start {
            StartAs::Boot => spec.cu_shape.resources(spec.cu),
            StartAs::Incoming(size) => size,
        };
        let incoming = matches!(start, StartAs::Incoming(_));
        let nic = match &self.config.network {
            NetworkConfig::None => Nic::None,
            NetworkConfig::Tap { bridge } => Nic::Tap {
                ifname: net::ensure_tap(&spec.name, bridge)?,
                mac: net::mac_address(&spec.name),
            },
        };
        for stale in [&paths.qmp_socket, &paths.pidfile] {
            let _ = std::fs::remove_file(stale);
        }
        // An arriving VM gets its vsock device once it runs here (see `migrate`).
        if !incoming {
            paths.vsock.ensure_running().await?;
        }
        let vcpu_slots = vmm::cmdline::vcpu_slots(self.accel.accel, max.vcpus);
        let budget = vmm::cmdline::vcpu_plug_budget(self.accel.accel, vcpu_slots, now.vcpus);
        self.save_plug_budget(&spec.name, budget)?;
        self.store
            .set_marker(&spec.name, Marker::VcpuUnplugged, false)?;
        let machine_spec = MachineSpec {
            name: spec.name.clone(),
            accel: self.accel.accel,
            boot_vcpus: min.vcpus,
            initial_vcpus: now.vcpus,
            max_vcpus: max.vcpus,
            vcpu_slots,
            boot_memory_bytes: min.memory_bytes,
            hotplug_memory_bytes: max.memory_bytes - min.memory_bytes,
            initial_hotplug_memory_bytes: now.memory_bytes - min.memory_bytes,
            kernel: spec.boot.kernel.clone(),
            initrd: spec.boot.initrd.clone(),
            kernel_cmdline: spec.boot.cmdline.clone(),
            nic,
            disk: spec.disk_gib.map(|_| self.store.disk_path(&spec.name)),
            spare_root_ports: SPARE_ROOT_PORTS,
            vhost_user_vsock: (!incoming).then(|| paths.vsock.vhost_socket.clone()),
            incoming,
            qmp_socket: paths.qmp_socket,
            serial_log: paths.serial_log,
            pidfile: paths.pidfile,
        };
        let machine = Machine::launch(
            &self.config.qemu_binary,
            &machine_spec,
            self.config.timeouts.qmp(),
        )
        .await
        .map_err(|source| {
            paths.vsock.stop();
            HostError::Vmm {
                name: spec.name.clone(),
                action: "start QEMU",
                source,
            }
        })?;
        tracing::info!(vm = %spec.name, pid = machine.pid(), accel = %self.accel.accel, "QEMU started");
        Ok((Arc::new(machine), budget))
    }

    /// What QEMU holds now: present vCPUs, boot memory plus plugged virtio-mem.
    async fn measure(&self, spec: &VmSpec, machine: &Machine) -> Result<Resources, VmmError> {
        let boot_memory = spec.cu_shape.resources(spec.min_cu).memory_bytes;
        Ok(Resources {
            vcpus: machine.vcpus().await?,
            memory_bytes: boot_memory + machine.hotplug_memory().await?,
        })
    }

    /// Marks the VM crashed and frees its resources if QEMU exits while it should run.
    fn watch_exit(self: &Arc<Self>, name: &str, machine: Arc<Machine>) {
        let host = Arc::downgrade(self);
        let name = name.to_string();
        tokio::spawn(async move {
            machine.exited().await;
            let Some(host) = host.upgrade() else { return };
            let Ok(slot) = host.slot(&name) else { return };
            let mut record = slot.record();
            if !record
                .machine
                .as_ref()
                .is_some_and(|m| Arc::ptr_eq(m, &machine))
            {
                return;
            }
            if record.spec.run {
                host.set_down(&mut record, VmState::Crashed);
                tracing::error!(vm = %name, "QEMU exited unexpectedly; VM marked crashed and its resources released");
            } else {
                host.set_down(&mut record, VmState::Stopped);
            }
        });
    }

    fn paths(&self, name: &str) -> VmPaths {
        self.store.vm_paths(name, &self.config.vsock_backend)
    }

    /// Records a running QEMU: opens the guest link and watches for QEMU's exit.
    fn set_running(self: &Arc<Self>, record: &mut VmRecord, machine: Arc<Machine>) {
        let name = record.spec.name.clone();
        record.state = VmState::Running;
        record.machine = Some(machine.clone());
        record.agent = self.start_agent(&record.spec);
        record.guest = self.open_guest_link(&name);
        self.watch_exit(&name, machine);
    }

    fn start_agent(self: &Arc<Self>, spec: &VmSpec) -> Option<AgentHandle> {
        if !spec.autoscale {
            return None;
        }
        let config = match agent_task::effective_config(&self.config.agent, &spec.agent) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(vm = %spec.name, %error, "VM not autoscaled: bad agent settings");
                return None;
            }
        };
        let view = AgentView {
            cu: spec.cu,
            min: spec.min_cu,
            max: spec.max_cu,
            metrics: None,
        };
        let poll = std::time::Duration::from_secs(config.metrics_pull_secs);
        Some(AgentHandle::start(
            Arc::downgrade(self),
            spec.name.clone(),
            config,
            spec.cu_shape,
            view,
            poll,
        ))
    }

    /// Records that QEMU is gone: closes the guest link, stops the vsock backend and frees
    /// the VM's resources.
    fn set_down(&self, record: &mut VmRecord, state: VmState) {
        record.machine = None;
        record.guest = None;
        record.agent = None;
        record.goal = None;
        record.state = state;
        self.paths(&record.spec.name).vsock.stop();
        self.ledger().release(&record.spec.name);
    }

    fn open_guest_link(self: &Arc<Self>, name: &str) -> Option<Arc<GuestLink>> {
        let socket = self
            .paths(name)
            .vsock
            .host_socket(vmhost_guest_protocol::GUEST_PORT);
        let host = Arc::downgrade(self);
        let vm = name.to_string();
        let on_upscale = Arc::new(move |request: UpscaleRequest| {
            let Some(host) = host.upgrade() else { return };
            let Ok(slot) = host.slot(&vm) else { return };
            let record = slot.record();
            match &record.agent {
                Some(agent) => agent.upscale_request(request),
                None => {
                    tracing::debug!(vm = %vm, "monitor asked for memory; the VM does not autoscale")
                }
            }
        });
        match GuestLink::listen(name, &socket, on_upscale) {
            Ok(link) => Some(Arc::new(link)),
            Err(error) => {
                tracing::error!(vm = %name, socket = %socket.display(), %error, "cannot listen for the guest");
                None
            }
        }
    }

    fn wrong_state(record: &VmRecord, action: &'static str) -> HostError {
        HostError::WrongState {
            name: record.spec.name.clone(),
            state: record.state,
            action,
        }
    }

    /// An operator's resize: exactly `cu`, with the monitor's approval unless forced.
    async fn scale(&self, name: &str, cu: ComputeUnits, force: bool) -> Result<VmInfo, HostError> {
        let info = self
            .resize(
                name,
                cu,
                Resize {
                    partial: false,
                    ask_guest: !force,
                    request_id: None,
                },
            )
            .await?;
        self.events.record(
            name,
            EventKind::Operator,
            format!("operator resized to {cu} CU"),
        );
        self.wake_agent(name);
        Ok(info)
    }

    /// Resizes a running VM to `want`: books the ledger (all of it, or with `partial` the
    /// largest quarter step that fits), asks the monitor before shrinking, applies it through
    /// vmm, settles the ledger on what QEMU holds, and tells the monitor about growth.
    async fn resize(
        &self,
        name: &str,
        want: ComputeUnits,
        how: Resize,
    ) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let (mut spec, machine, before, budget, guest) = {
            let record = slot.record();
            match (&record.machine, record.state) {
                (Some(machine), VmState::Running) => (
                    record.spec.clone(),
                    machine.clone(),
                    record.applied,
                    record.vcpu_plug_budget,
                    record.guest.clone(),
                ),
                _ => return Err(Self::wrong_state(&record, "scale")),
            }
        };
        check_bounds(&spec, want)?;
        let wanted = spec.cu_shape.resources(want);
        let shrinks = wanted.memory_bytes < before.memory_bytes || wanted.vcpus < before.vcpus;
        if shrinks && how.ask_guest {
            let answer = match &guest {
                Some(guest) => {
                    let timeout =
                        std::time::Duration::from_secs(self.config.guest.downscale_answer_secs);
                    guest.ask_downscale(guest_size(wanted), timeout).await
                }
                None => Err(DownscaleError::NotConnected),
            };
            answer.map_err(|source| HostError::Downscale {
                name: name.into(),
                source,
            })?;
        }
        // Book the larger of the old and new size until the guest has actually let go,
        // so memory being unplugged cannot be handed to another VM early.
        let booking = |cu: ComputeUnits| {
            let target = spec.cu_shape.resources(cu);
            Resources {
                vcpus: before.vcpus.max(target.vcpus),
                memory_bytes: before.memory_bytes.max(target.memory_bytes),
            }
        };
        let lowest = if how.partial && want > spec.cu {
            spec.cu.quarters() + 1
        } else {
            want.quarters()
        };
        let mut refusal = None;
        let mut granted = None;
        for quarters in (lowest..=want.quarters()).rev() {
            let candidate = ComputeUnits::from_quarters(quarters);
            match self.ledger().set(name, booking(candidate)) {
                Ok(()) => {
                    granted = Some(candidate);
                    break;
                }
                Err(e) => refusal = refusal.or(Some(e)),
            }
        }
        let cu = match (granted, refusal) {
            (Some(cu), _) => cu,
            (None, Some(refusal)) => return Err(refusal.into()),
            (None, None) => want,
        };
        let target = spec.cu_shape.resources(cu);
        let plugs = target.vcpus.saturating_sub(before.vcpus);
        if let Some(left) = budget {
            if plugs > left {
                let _ = self.ledger().set(name, before);
                return Err(HostError::Invalid(format!(
                    "VM '{name}' can take only {left} more vCPU plugs in this QEMU process (under TCG every \
                     plug uses up one vCPU slot for good); stop and start the VM to reset"
                )));
            }
            // Spent before plugging: a plug that fails halfway still used its slot.
            let left = left - plugs;
            self.save_plug_budget(name, Some(left))?;
            slot.record().vcpu_plug_budget = Some(left);
        }
        let started = std::time::Instant::now();
        let boot_memory = spec.cu_shape.resources(spec.min_cu).memory_bytes;
        let timeout = self.config.timeouts.hotplug();
        if target.vcpus < before.vcpus {
            self.store.set_marker(name, Marker::VcpuUnplugged, true)?;
        }
        let applied = async {
            machine.set_vcpus(target.vcpus, timeout).await?;
            if target.memory_bytes != before.memory_bytes {
                machine
                    .set_hotplug_memory(target.memory_bytes - boot_memory, timeout)
                    .await?;
            }
            Ok::<(), VmmError>(())
        }
        .await;
        let measured = self.measure(&spec, &machine).await.unwrap_or(booking(cu));
        // Shrinking the booking to what QEMU holds always fits.
        let _ = self.ledger().set(name, measured);
        slot.record().applied = measured;
        applied.map_err(|source| HostError::Vmm {
            name: name.into(),
            action: "resize",
            source,
        })?;
        let grew = cu > spec.cu;
        spec.cu = cu;
        self.store.save(&spec)?;
        slot.record().spec = spec;
        if let (true, Some(guest)) = (grew, &guest) {
            guest.notify_upscale(how.request_id.unwrap_or(0), guest_size(measured));
        }
        tracing::info!(vm = %name, %cu, size = %measured, elapsed_ms = started.elapsed().as_millis() as u64, "scaled VM");
        Ok(self.info(&slot))
    }

    /// The agent's view of a running VM, or None once it no longer runs.
    pub fn agent_view(&self, name: &str) -> Option<AgentView> {
        let slot = self.slot(name).ok()?;
        let record = slot.record();
        if record.state != VmState::Running {
            return None;
        }
        let metrics = record
            .guest
            .as_ref()
            .and_then(|g| g.latest_metrics())
            .map(|(m, age)| {
                (
                    vmhost_agent::Metrics {
                        load1: f64::from(m.load1),
                        mem_used_bytes: m.mem_used_bytes,
                    },
                    age,
                )
            });
        Some(AgentView {
            cu: record.spec.cu,
            min: record.spec.min_cu,
            max: record.spec.max_cu,
            metrics,
        })
    }

    pub fn set_goal(&self, name: &str, goal: ComputeUnits) {
        if let Ok(slot) = self.slot(name) {
            slot.record().goal = Some(goal);
        }
    }

    fn wake_agent(&self, name: &str) {
        if let Ok(slot) = self.slot(name) {
            if let Some(agent) = &slot.record().agent {
                agent.wake();
            }
        }
    }

    /// Carries out one of the agent's actions.
    pub async fn execute(
        &self,
        name: &str,
        action: Action,
        request: Option<UpscaleRequest>,
    ) -> Outcome {
        let (want, how) = match action {
            Action::Upscale { target } => (
                target,
                Resize {
                    partial: true,
                    ask_guest: false,
                    request_id: request.map(|r| r.id),
                },
            ),
            Action::Downscale { target } => (
                target,
                Resize {
                    partial: false,
                    ask_guest: true,
                    request_id: None,
                },
            ),
        };
        match (action, self.resize(name, want, how).await) {
            (Action::Upscale { .. }, Ok(info)) => {
                if let Some(request) = request {
                    tracing::info!(
                        vm = %name,
                        request = request.id,
                        to = %info.cu,
                        latency_ms = request.received.elapsed().as_millis() as u64,
                        pressure_age_us = request.pressure_age.as_micros() as u64,
                        "granted the guest's upscale request"
                    );
                }
                Outcome::Upscaled { to: info.cu }
            }
            (Action::Downscale { .. }, Ok(info)) => Outcome::Downscaled { to: info.cu },
            (_, Err(HostError::Capacity(_))) => Outcome::UpscaleRefused,
            (
                Action::Downscale { target },
                Err(HostError::Downscale {
                    source: DownscaleError::Refused(reason),
                    ..
                }),
            ) => {
                tracing::info!(vm = %name, %reason, "monitor denied a downscale");
                Outcome::DownscaleDenied { target }
            }
            (_, Err(error)) => {
                tracing::warn!(vm = %name, error = %error_chain(&error), "scaling action failed");
                Outcome::Failed
            }
        }
    }

    pub fn record_outcome(
        &self,
        name: &str,
        action: Action,
        outcome: Outcome,
        elapsed: std::time::Duration,
    ) {
        let (kind, message, direction, result) =
            agent_task::describe_outcome(action, outcome, elapsed);
        self.stats
            .operation(name, direction, result, elapsed.as_secs_f64());
        self.events.record(name, kind, message);
    }

    async fn bounds(
        &self,
        name: &str,
        min: ComputeUnits,
        max: ComputeUnits,
    ) -> Result<VmInfo, HostError> {
        if min > max {
            return Err(HostError::Invalid(format!(
                "min_cu ({min}) is greater than max_cu ({max})"
            )));
        }
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        if slot.record().state == VmState::Migrating {
            return Err(Self::wrong_state(&slot.record(), "change the bounds of"));
        }
        let mut spec = slot.record().spec.clone();
        if let Some((launched_min, launched_max)) = spec
            .launched_bounds
            .filter(|_| slot.record().machine.is_some())
        {
            if min < launched_min || max > launched_max {
                return Err(HostError::Invalid(format!(
                    "VM '{name}' runs with room for [{launched_min}, {launched_max}] CU; bounds outside that need a stop and start"
                )));
            }
        }
        spec.min_cu = min;
        spec.max_cu = max;
        self.store.save(&spec)?;
        slot.record().spec = spec;
        self.events.record(
            name,
            EventKind::Operator,
            format!("operator set bounds to [{min}, {max}] CU"),
        );
        self.wake_agent(name);
        Ok(self.info(&slot))
    }
}

/// How `Host::launch` starts QEMU.
#[derive(Debug, Clone, Copy)]
enum StartAs {
    Boot,
    /// As the target of a migration of a VM of this size.
    Incoming(Resources),
}

/// How `Host::resize` books and asks.
struct Resize {
    /// Take the largest quarter step the ledger can grant, down to current + 0.25.
    partial: bool,
    /// Ask the guest's monitor before shrinking.
    ask_guest: bool,
    /// The monitor request this answers, for its notification.
    request_id: Option<u64>,
}

fn guest_size(r: Resources) -> vmhost_guest_protocol::Size {
    vmhost_guest_protocol::Size {
        vcpus: r.vcpus,
        memory_bytes: r.memory_bytes,
    }
}

impl Host {
    async fn stop(&self, name: &str) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let (mut spec, machine) = {
            let record = slot.record();
            match record.state {
                VmState::Running | VmState::Crashed => {
                    (record.spec.clone(), record.machine.clone())
                }
                _ => return Err(Self::wrong_state(&record, "stop")),
            }
        };
        spec.run = false;
        self.store.save(&spec)?;
        slot.record().spec.run = false;
        if let Some(machine) = machine {
            machine
                .shutdown(self.config.timeouts.stop_grace())
                .await
                .map_err(|source| HostError::Vmm {
                    name: name.into(),
                    action: "stop",
                    source,
                })?;
        }
        self.set_down(&mut slot.record(), VmState::Stopped);
        tracing::info!(vm = %name, "stopped VM");
        Ok(self.info(&slot))
    }

    async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let mut spec = {
            let record = slot.record();
            match record.state {
                VmState::Stopped | VmState::Crashed => record.spec.clone(),
                _ => return Err(Self::wrong_state(&record, "start")),
            }
        };
        let size = spec.cu_shape.resources(spec.cu);
        self.ledger().set(name, size)?;
        spec.run = true;
        spec.launched_bounds = Some((spec.min_cu, spec.max_cu));
        let started = async {
            self.store.save(&spec)?;
            self.launch(&spec, StartAs::Boot).await
        }
        .await;
        let (machine, budget) = match started {
            Ok(started) => started,
            Err(error) => {
                self.ledger().release(name);
                return Err(error);
            }
        };
        {
            let mut record = slot.record();
            record.spec = spec;
            record.applied = size;
            record.vcpu_plug_budget = budget;
            self.set_running(&mut record, machine);
        }
        tracing::info!(vm = %name, "started VM");
        Ok(self.info(&slot))
    }

    async fn delete(&self, name: &str) -> Result<(), HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let machine = {
            let mut record = slot.record();
            if record.state == VmState::Migrating {
                return Err(Self::wrong_state(&record, "delete"));
            }
            record.spec.run = false;
            record.machine.clone()
        };
        if let Some(machine) = machine {
            machine.terminate().await.map_err(|source| HostError::Vmm {
                name: name.into(),
                action: "terminate QEMU for delete",
                source,
            })?;
        }
        self.set_down(&mut slot.record(), VmState::Stopped);
        self.store.remove_vm(name)?;
        net::remove_tap(name);
        self.stats.forget(name);
        self.vms().remove(name);
        tracing::info!(vm = %name, "deleted VM");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for good in ["db1", "a", "web-01"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-x", "Db1", "a/b", "a b", "../etc", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let error = HostError::Vmm {
            name: "db1".into(),
            action: "resize",
            source: VmmError::NoHotplugMemory,
        };
        assert_eq!(
            error_chain(&error),
            "VM 'db1': cannot resize: VM has no hotplug memory device; its memory is fixed"
        );
        assert_eq!(ApiError::from(error).kind, ErrorKind::Internal);
    }
}
