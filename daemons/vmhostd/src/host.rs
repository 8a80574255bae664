//! This host: the rooms that run its VMs, and what they share. Each room is its own file:
//! - `vm_table`: the VMs and the state transitions each may make;
//! - `admission`: the ledger and the leases granted to other hosts;
//! - `lifecycle`: create, start, stop, delete, and reattach after a restart;
//! - `resize`: operator and agent resizes, bounds;
//! - `migration`: both ends of a migration, the only code that drives QEMU's migration.

use crate::admission::Admission;
use crate::config::Config;
use crate::disks::DiskBudget;
use crate::error::{error_chain, HostError};
use crate::events::EventLog;
use crate::moves::{ColdArrivals, DrainState, EndedArrivals, RoomWanted};
use crate::prometheus::{ScalingStats, VmGauges};
use crate::store::{Store, StoreError, VmPaths, VmSpec};
use crate::tunnels::TunnelTargets;
use crate::vm_table::{VmSlot, VmTable};
use std::sync::Arc;
use vmhost_api::{HostInfo, Resources, VmInfo};
use vmm::{AccelDecision, Hypervisor, Vm, VmmError};

pub struct Host {
    pub events: EventLog,
    pub stats: ScalingStats,
    pub config: Config,
    pub accel: AccelDecision,
    pub store: Arc<Store>,
    pub admission: Admission,
    pub vms: VmTable,
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Where each migration tunnel a peer opens is delivered.
    pub tunnels: TunnelTargets,
    pub drain: DrainState,
    pub cold: ColdArrivals,
    /// The latest upscale this host could not give in full, for the rebalancer.
    pub room_wanted: RoomWanted,
    pub ended_arrivals: EndedArrivals,
    /// Each VM's cgroup; `None` where they cannot be used or are turned off.
    pub cgroups: Option<Arc<vmm::cgroup::VmCgroups>>,
    name: String,
}

impl Host {
    /// Opens the state directory and reattaches to every VM that should be running.
    pub async fn recover(
        config: Config,
        accel: AccelDecision,
        hypervisor: Arc<dyn Hypervisor>,
    ) -> Result<Arc<Host>, StoreError> {
        let store = Arc::new(Store::open(&config.state_dir)?);
        let (specs, broken) = store.load_all()?;
        for error in broken {
            tracing::error!(error = %error_chain(&error), "skipping a VM folder");
        }
        let disks = DiskBudget::new(config.capacity.disk_gib, &config.state_dir)?;
        for spec in &specs {
            if let Some(gib) = spec.disk_gib {
                disks.adopt(&spec.name, gib);
            }
        }
        let admission = Admission::open(config.capacity(), disks, store.clone())?;
        let cgroups = crate::cgroups::open(&config);
        let ended_arrivals = EndedArrivals::open(config.state_dir.join("ended-arrivals.json"));
        let host = Arc::new(Host {
            events: EventLog::default(),
            stats: ScalingStats::default(),
            name: config.host_name(),
            admission,
            config,
            accel,
            store,
            vms: VmTable::default(),
            hypervisor,
            tunnels: TunnelTargets::default(),
            drain: DrainState::default(),
            cold: ColdArrivals::default(),
            room_wanted: RoomWanted::default(),
            ended_arrivals,
            cgroups,
        });
        crate::service::status(&format!("reattaching {} VMs", specs.len()));
        for spec in specs {
            host.reattach(spec).await;
        }
        match host.store.load_drain() {
            Ok(Some(order)) => {
                tracing::info!(
                    cold = order.cold,
                    parallel = order.parallel,
                    "resuming the drain ordered before the restart"
                );
                host.begin_drain(order);
            }
            Ok(None) => {}
            // Draining stops placements; guessing it over is safer than taking VMs.
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "the saved drain order is unreadable; draining with the defaults");
                host.begin_drain(vmhost_api::DrainHost {
                    cold: false,
                    parallel: 1,
                });
            }
        }
        Ok(host)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn paths(&self, name: &str) -> VmPaths {
        self.store.vm_paths(name, &self.config.vsock_backend)
    }

    /// What QEMU holds now: present vCPUs, boot memory plus plugged virtio-mem.
    pub async fn measure(&self, spec: &VmSpec, machine: &dyn Vm) -> Result<Resources, VmmError> {
        Ok(Resources {
            vcpus: machine.vcpus().await?,
            memory_bytes: spec.boot_resources().memory_bytes + machine.hotplug_memory().await?,
        })
    }

    pub fn slot(&self, name: &str) -> Result<Arc<VmSlot>, HostError> {
        self.vms.get(name)
    }

    pub fn info(&self, slot: &VmSlot) -> VmInfo {
        let record = slot.record();
        let spec = &record.spec;
        VmInfo {
            name: spec.name.clone(),
            state: record.state(),
            cu: spec.cu,
            min_cu: spec.min_cu,
            max_cu: spec.max_cu,
            vcpus: record.applied.vcpus,
            memory_bytes: record.applied.memory_bytes,
            accel: self.accel.accel.to_string(),
            image: spec.image.to_string(),
            host: self.name.clone(),
            autoscale: spec.autoscale,
            disk_gib: spec.disk_gib,
            goal_cu: record.goal.filter(|_| record.agent.is_some()),
            pid: record.machine.as_ref().map(|m| m.pid()),
            serial_log: self.paths(&spec.name).serial_log.display().to_string(),
            qemu_status: None,
            guest: record.guest.as_ref().map(|g| g.info()),
            compute: record.compute.as_ref().and_then(|c| c.last()),
        }
    }

    /// One VM, with QEMU's run state asked live.
    pub async fn show(&self, name: &str) -> Result<VmInfo, HostError> {
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

    pub fn list(&self) -> Vec<VmInfo> {
        self.vms.all().iter().map(|slot| self.info(slot)).collect()
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
                compute: vm.compute.map(|c| (c.build_tag, c.state)),
                vm: vm.name,
            })
            .collect()
    }

    pub fn host_info(&self) -> HostInfo {
        let totals = self.admission.totals();
        let disks = self.admission.disks.totals();
        HostInfo {
            name: self.name.clone(),
            accel: self.accel.accel.to_string(),
            accel_reason: self.accel.reason.clone(),
            cu_shape: self.config.cu_shape(),
            capacity: totals.capacity,
            allocated: totals.allocated,
            leased: totals.leased,
            vms: self.vms.len(),
            disk_allocated_gib: disks.0,
            disk_capacity_gib: disks.1,
        }
    }
}
