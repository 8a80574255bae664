//! A VM's life on this host: create, start, stop, delete, launching its QEMU, watching it
//! exit, and finding it again after a restart of vmhostd.

use crate::admission::LeaseClaim;
use crate::agent_task::{self, AgentHandle, AgentView};
use crate::config::NetworkConfig;
use crate::error::{error_chain, now_ms, vmm_error, HostError};
use crate::host::Host;
use crate::net;
use crate::store::{write_atomically, Marker, StoreError, VmSpec, PRIVATE_FILE};
use crate::validate;
use crate::vm_table::{Action, VmRecord, VmSlot};
use std::sync::Arc;
use vmhost_api::{CreateVm, Resources, VmInfo, VmState};
use vmhost_guest_link::{GuestLink, UpscaleRequest};
use vmm::{MachineSpec, Nic, Vm};

/// Spare PCIe root ports for devices plugged at run time.
const SPARE_ROOT_PORTS: u32 = 4;

/// Creates `path` if missing, readable by root alone either way.
fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_FILE))
}

/// How `Host::launch` starts QEMU.
#[derive(Debug, Clone, Copy)]
pub enum StartAs {
    Boot,
    /// As the target of a migration of a VM with this many vCPUs and its boot memory.
    Incoming {
        vcpus: u32,
    },
}

impl Host {
    /// Creates a VM. `from` is the host that placed it here, when one did: only it may
    /// name a lease, one it holds.
    pub async fn create(
        self: &Arc<Self>,
        request: CreateVm,
        from: Option<&str>,
    ) -> Result<VmInfo, HostError> {
        let lease = match (request.lease, from) {
            (Some(id), Some(holder)) => Some(LeaseClaim { id, holder }),
            (Some(_), None) => {
                return Err(HostError::Invalid(
                    "a lease is given from one host to another, not by operators".into(),
                ))
            }
            (None, _) => None,
        };
        let spec = validate::spec_for(&self.config, request)?;
        let size = spec.cu_shape.resources(spec.cu);
        let name = spec.name.clone();
        let slot = self
            .vms
            .insert(VmRecord::new(spec.clone(), VmState::Starting, size))?;
        let _operation = slot.operation.lock().await;
        let created = async {
            self.admission.book_new_vm(&name, size, lease)?;
            if let Err(error) = self.make_vm_folder(&spec) {
                self.admission.release(&name);
                return Err(error);
            }
            match self.launch(&spec, StartAs::Boot).await {
                Ok(machine) => Ok(machine),
                Err(error) => {
                    self.admission.release(&name);
                    self.admission.disks.release(&name);
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
                self.vms.remove(&name, &slot);
                Err(error)
            }
        }
    }

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let mut spec = {
            let record = slot.record();
            record.check(Action::Start)?;
            record.spec.clone()
        };
        let size = spec.cu_shape.resources(spec.cu);
        self.admission.set(name, size)?;
        spec.run = true;
        spec.incoming = false;
        spec.launched_bounds = Some((spec.min_cu, spec.max_cu));
        let started = async {
            // A fresh QEMU is no migration's source: a restart must not take it for one.
            self.store.set_marker(name, Marker::Leaving, false)?;
            self.store.set_marker(name, Marker::Postcopy, false)?;
            self.store.save(&spec)?;
            self.launch(&spec, StartAs::Boot).await
        }
        .await;
        let (machine, budget) = match started {
            Ok(started) => started,
            Err(error) => {
                self.admission.release(name);
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

    pub async fn stop(&self, name: &str) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let (mut spec, machine) = {
            let record = slot.record();
            record.check(Action::Stop)?;
            (record.spec.clone(), record.machine.clone())
        };
        spec.run = false;
        self.store.save(&spec)?;
        slot.record().spec.run = false;
        if let Some(machine) = machine {
            machine
                .shutdown(self.config.timeouts.stop_grace())
                .await
                .map_err(vmm_error(name, "stop"))?;
        }
        self.set_down(&mut slot.record(), VmState::Stopped);
        tracing::info!(vm = %name, "stopped VM");
        Ok(self.info(&slot))
    }

    pub async fn delete(&self, name: &str) -> Result<(), HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let machine = {
            let mut record = slot.record();
            record.check(Action::Delete)?;
            record.spec.run = false;
            record.machine.clone()
        };
        if let Some(machine) = machine {
            machine
                .terminate()
                .await
                .map_err(vmm_error(name, "terminate QEMU for delete"))?;
        }
        self.set_down(&mut slot.record(), VmState::Stopped);
        self.store.remove_vm(name)?;
        self.admission.disks.release(name);
        self.release_cgroup(name);
        net::remove_tap(name);
        self.stats.forget(name);
        self.events.forget(name);
        self.vms.remove(name, &slot);
        tracing::info!(vm = %name, "deleted VM");
        Ok(())
    }

    /// Starts QEMU for `spec`: booting at its current size, or as a migration target.
    /// Returns it with its vCPU plug budget.
    pub async fn launch(
        &self,
        spec: &VmSpec,
        start: StartAs,
    ) -> Result<(Arc<dyn Vm>, Option<u32>), HostError> {
        let paths = self.paths(&spec.name);
        let boot = spec.boot_resources();
        let max = spec.cu_shape.resources(spec.max_cu);
        let (now, incoming) = match start {
            StartAs::Boot => (spec.cu_shape.resources(spec.cu), false),
            StartAs::Incoming { vcpus } => (Resources { vcpus, ..boot }, true),
        };
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
        // QEMU keeps the mode of a console file that exists.
        private_file(&paths.serial_log).map_err(|source| StoreError::Io {
            action: "cannot create",
            path: paths.serial_log.display().to_string(),
            source,
        })?;
        let vcpu_slots = vmm::cmdline::vcpu_slots(self.accel.accel, max.vcpus);
        let budget = vmm::cmdline::vcpu_plug_budget(self.accel.accel, vcpu_slots, now.vcpus);
        self.save_plug_budget(&spec.name, budget)?;
        self.store
            .set_marker(&spec.name, Marker::VcpuUnplugged, false)?;
        // Last before QEMU, so a failure before it (a full state filesystem) leaves no
        // backend running. An arriving VM gets its device once it runs here.
        if !incoming {
            self.hypervisor.ensure_vsock(&paths.vsock).await?;
        }
        let machine_spec = MachineSpec {
            name: spec.name.clone(),
            accel: self.accel.accel,
            boot_vcpus: boot.vcpus,
            initial_vcpus: now.vcpus,
            max_vcpus: max.vcpus,
            vcpu_slots,
            boot_memory_bytes: boot.memory_bytes,
            hotplug_memory_bytes: max.memory_bytes - boot.memory_bytes,
            initial_hotplug_memory_bytes: now.memory_bytes - boot.memory_bytes,
            kernel: spec.boot.kernel.clone(),
            initrd: spec.boot.initrd.clone(),
            kernel_cmdline: spec.boot.cmdline.clone(),
            nic,
            disk: spec.disk_gib.map(|_| self.store.disk_path(&spec.name)),
            root_image: spec.boot.root.clone(),
            spare_root_ports: SPARE_ROOT_PORTS,
            vhost_user_vsock: (!incoming).then(|| paths.vsock.vhost_socket.clone()),
            incoming,
            qmp_socket: paths.qmp_socket,
            serial_log: paths.serial_log,
            pidfile: paths.pidfile,
        };
        let machine = self
            .hypervisor
            .launch(&machine_spec)
            .await
            .map_err(|source| {
                self.hypervisor.stop_vsock(&paths.vsock);
                HostError::Vmm {
                    name: spec.name.clone(),
                    action: "start QEMU",
                    source,
                }
            })?;
        tracing::info!(vm = %spec.name, pid = machine.pid(), accel = %self.accel.accel, "QEMU started");
        // An arriving VM is limited to its full size from the start: its memory comes in.
        self.confine(&spec.name, machine.pid(), spec.cu_shape.resources(spec.cu));
        Ok((machine, budget))
    }

    /// After a restart: finds the VM's QEMU again, or marks the VM crashed if it is gone.
    /// A VM in the middle of a migration is the migration module's.
    pub async fn reattach(self: &Arc<Self>, spec: VmSpec) {
        let name = spec.name.clone();
        if self.store.has_marker(&name, Marker::HandedOver) {
            self.forget_handed_over(&spec).await;
            return;
        }
        if spec.incoming {
            self.reattach_arrival(spec).await;
            return;
        }
        let applied = spec.cu_shape.resources(spec.cu);
        let budget = self.load_plug_budget(&name);
        let paths = self.paths(&name);
        let attached = match spec.run {
            true => Some(
                self.hypervisor
                    .attach(&paths.qmp_socket, &paths.pidfile)
                    .await,
            ),
            false => {
                self.finish_interrupted_stop(&spec).await;
                None
            }
        };
        let leaving = self.store.has_marker(&name, Marker::Leaving);
        let mut record = match attached {
            // Unreadable counts as pending: the VM may run on the target.
            None if self.store.cold_move(&name).map_or(true, |m| m.is_some()) => {
                tracing::warn!(vm = %name, "this VM's cold move asked its target to boot it; it stays migrating until that host's answer is known");
                VmRecord::new(spec, VmState::Migrating, applied)
            }
            None => VmRecord::new(spec, VmState::Stopped, applied),
            Some(Err(_)) if leaving && self.store.has_marker(&name, Marker::Postcopy) => {
                tracing::error!(vm = %name, "this VM was leaving in post-copy and its QEMU is gone: it is the target's alone now");
                self.forget_handed_over(&spec).await;
                return;
            }
            Some(Err(error)) => {
                tracing::error!(vm = %name, error = %error_chain(&error), "VM should be running but its QEMU is gone");
                VmRecord::new(spec, VmState::Crashed, applied)
            }
            Some(Ok(machine)) => {
                let applied = match self.measure(&spec, machine.as_ref()).await {
                    Ok(measured) => measured,
                    Err(error) => {
                        tracing::warn!(vm = %name, error = %error_chain(&error), "cannot measure VM; booking its spec size");
                        applied
                    }
                };
                if self.admission.adopt(&name, applied) {
                    tracing::warn!(vm = %name, "host is over capacity after reattaching (was capacity lowered?)");
                }
                tracing::info!(vm = %name, pid = machine.pid(), size = %applied, "reattached to running VM");
                self.confine(&name, machine.pid(), applied);
                if leaving {
                    // Its migration lost its orchestration; see `resume_interrupted_departure`.
                    let mut record = VmRecord::new(spec, VmState::Migrating, applied);
                    record.machine = Some(machine.clone());
                    self.watch_exit(&name, machine);
                    record
                } else {
                    if !self.hypervisor.vsock_running(&paths.vsock) {
                        tracing::error!(vm = %name, "the VM's vsock backend is gone; its guest cannot reach this host until it restarts");
                    }
                    let mut record = VmRecord::new(spec, VmState::Starting, applied);
                    self.set_running(&mut record, machine);
                    record
                }
            }
        };
        record.vcpu_plug_budget = budget;
        let migrating = record.state() == VmState::Migrating;
        let Ok(slot) = self.vms.insert(record) else {
            return;
        };
        if migrating {
            // Cancelling the migration and giving the guest its memory back can take the
            // hotplug timeout: it must not hold up the restart (and systemd's READY).
            let host = self.clone();
            tokio::spawn(async move { host.resume_interrupted_departure(&slot).await });
        }
    }

    /// A VM handed over to another host before a restart: its QEMU, if still there, is
    /// stale and ends, and its files go. It is never started here again.
    async fn forget_handed_over(&self, spec: &VmSpec) {
        let name = spec.name.as_str();
        let paths = self.paths(name);
        if let Ok(machine) = self
            .hypervisor
            .attach(&paths.qmp_socket, &paths.pidfile)
            .await
        {
            if let Err(error) = machine.terminate().await {
                tracing::error!(vm = %name, error = %error_chain(&error), "cannot end the stale QEMU of a VM handed over to another host");
                return;
            }
        }
        self.hypervisor.stop_vsock(&paths.vsock);
        if let Err(error) = self.store.remove_vm(name) {
            tracing::error!(vm = %name, error = %error_chain(&error), "cannot remove the files of a VM handed over to another host");
        }
        net::remove_tap(name);
        self.release_cgroup(name);
        tracing::info!(vm = %name, "finished removing a VM handed over to another host before the restart");
    }

    /// Marks the VM crashed and frees its resources if QEMU exits while it should run.
    pub fn watch_exit(self: &Arc<Self>, name: &str, machine: Arc<dyn Vm>) {
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
            let leaving = record.state() == VmState::Migrating && !record.spec.incoming;
            if leaving && host.store.has_marker(&name, Marker::Postcopy) {
                drop(record);
                host.lost_in_postcopy(&slot);
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

    /// Records a running QEMU: opens the guest link, starts the agent and watches for
    /// QEMU's exit.
    pub fn set_running(self: &Arc<Self>, record: &mut VmRecord, machine: Arc<dyn Vm>) {
        let name = record.spec.name.clone();
        if let Err(error) = record.become_(VmState::Running) {
            tracing::error!(error = %error, "a VM whose QEMU runs is recorded as running anyway");
        }
        record.machine = Some(machine.clone());
        record.agent = self.start_agent(&record.spec);
        record.compute = self.watch_compute(&record.spec);
        record.guest = self.open_guest_link(&name);
        self.watch_exit(&name, machine);
    }

    /// Records that QEMU is gone: closes the guest link, stops the vsock backend and frees
    /// the VM's resources.
    pub fn set_down(&self, record: &mut VmRecord, state: VmState) {
        if record.state() != state {
            if let Err(error) = record.become_(state) {
                tracing::error!(error = %error, "VM state not changed");
            }
        }
        record.machine = None;
        record.guest = None;
        record.agent = None;
        record.compute = None;
        record.goal = None;
        self.hypervisor
            .stop_vsock(&self.paths(&record.spec.name).vsock);
        self.release_cgroup(&record.spec.name);
        self.admission.release(&record.spec.name);
    }

    pub fn start_agent(self: &Arc<Self>, spec: &VmSpec) -> Option<AgentHandle> {
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
        let port: std::sync::Weak<dyn agent_task::AgentPort> =
            Arc::downgrade(self) as std::sync::Weak<dyn agent_task::AgentPort>;
        Some(AgentHandle::start(
            port,
            spec.name.clone(),
            config,
            spec.cu_shape,
            view,
            poll,
        ))
    }

    pub fn open_guest_link(self: &Arc<Self>, name: &str) -> Option<Arc<GuestLink>> {
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
            if let Some(agent) = &record.agent {
                agent.upscale_request(request);
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

    fn plug_budget_file(&self, name: &str) -> std::path::PathBuf {
        self.store.vm_dir(name).join("vcpu-plug-budget")
    }

    /// The budget saved for a running QEMU. Under TCG a missing file means no plugs are
    /// known to be safe.
    pub fn load_plug_budget(&self, name: &str) -> Option<u32> {
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

    pub fn save_plug_budget(&self, name: &str, budget: Option<u32>) -> Result<(), StoreError> {
        match budget {
            None => Ok(()),
            Some(left) => {
                write_atomically(&self.plug_budget_file(name), left.to_string().as_bytes())
            }
        }
    }

    /// Takes in a VM that another host moves here under `claim`: checks the lease, lists
    /// the VM as migrating and makes its folder. Only what this call made is undone on a
    /// failure: a folder already there may belong to a VM this host skipped at start (a
    /// corrupt spec), and its disk is not ours to remove.
    pub fn admit_arrival(
        &self,
        spec: &VmSpec,
        size: Resources,
        claim: LeaseClaim<'_>,
    ) -> Result<Arc<VmSlot>, HostError> {
        self.admission.check_lease(claim, &spec.name, size)?;
        let mut record = VmRecord::new(spec.clone(), VmState::Migrating, size);
        record.arrived_at_ms = Some(now_ms());
        let slot = self.vms.insert(record)?;
        if let Err(error) = self.make_vm_folder(spec) {
            self.vms.remove(&spec.name, &slot);
            return Err(error);
        }
        Ok(slot)
    }

    /// A VM saved as stopped whose QEMU still answers was being stopped when vmhostd
    /// went away: the stop is finished, so that a later start never runs a second QEMU on
    /// the same folder and disk.
    async fn finish_interrupted_stop(&self, spec: &VmSpec) {
        let paths = self.paths(&spec.name);
        let Ok(machine) = self
            .hypervisor
            .attach(&paths.qmp_socket, &paths.pidfile)
            .await
        else {
            return;
        };
        tracing::warn!(vm = %spec.name, pid = machine.pid(), "this VM was being stopped when vmhostd went away; finishing the stop");
        if let Err(error) = machine.shutdown(self.config.timeouts.stop_grace()).await {
            tracing::error!(vm = %spec.name, error = %error_chain(&error), "cannot end the QEMU of a stopped VM");
        }
        self.hypervisor.stop_vsock(&paths.vsock);
    }

    /// Books the disk of a VM new here, then makes its folder (and the disk).
    pub fn make_vm_folder(&self, spec: &VmSpec) -> Result<(), HostError> {
        if let Some(gib) = spec.disk_gib {
            self.admission.disks.book(&spec.name, gib)?;
        }
        self.store.create_vm(spec).map_err(|error| {
            self.admission.disks.release(&spec.name);
            error.into()
        })
    }

    /// Removes a VM that left this host or never became its own: record, files and tap.
    pub fn forget(&self, name: &str, slot: &Arc<VmSlot>) {
        self.vms.remove(name, slot);
        if let Err(error) = self.store.remove_vm(name) {
            tracing::warn!(vm = %name, error = %error_chain(&error), "cannot remove the VM's files");
        }
        self.admission.disks.release(name);
        net::remove_tap(name);
        self.stats.forget(name);
        self.events.forget(name);
    }
}

#[cfg(test)]
mod tests;
