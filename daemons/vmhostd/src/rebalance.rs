//! What the rebalancer needs from this host: its load as the planner sees it
//! (`vmhost_capacity::rebalance`), and the upscales it could not give in full.
//! `fleet::rebalance` plans and moves.

use crate::host::Host;
use vmhost_api::{ImageRef, Resources, VmState};
use vmhost_capacity::rebalance::{HostLoad, ImageNeed, VmLoad};

/// How long a VM that grew counts as busy, whatever its load says.
const GROWING_FOR: std::time::Duration = std::time::Duration::from_secs(120);

impl Host {
    /// This host and its VMs as the rebalance planner sees them.
    pub fn load(&self, watermark: f64) -> (HostLoad, Vec<VmLoad>) {
        let totals = self.admission.totals();
        let here = HostLoad {
            name: self.name().to_string(),
            cu_shape: self.config.cu_shape(),
            capacity: totals.capacity,
            allocated: totals.allocated,
            leased: totals.leased,
            watermark_memory_bytes: (totals.capacity.memory_bytes as f64 * watermark) as u64,
            draining: self.drain.is_draining(),
            images: Default::default(),
        };
        let vms = self
            .vms
            .all()
            .iter()
            .map(|slot| {
                let record = slot.record();
                let growing = record.grew_at.is_some_and(|at| at.elapsed() < GROWING_FOR);
                let busy = if growing {
                    1.0
                } else {
                    record
                        .guest
                        .as_ref()
                        .and_then(|g| g.latest_metrics())
                        .map_or(0.0, |(m, _, _)| {
                            f64::from(m.load1) / f64::from(record.applied.vcpus.max(1))
                        })
                };
                VmLoad {
                    name: record.spec.name.clone(),
                    size: record.applied,
                    busy: busy.clamp(0.0, 1.0),
                    moved_at_ms: record.arrived_at_ms,
                    movable: record.state() == VmState::Running
                        && self.cannot_move_live(&record.spec.name).is_none(),
                    image: match &record.spec.image {
                        ImageRef::Named(name) => Some(ImageNeed {
                            name: name.clone(),
                            id: record.spec.boot.image_id.clone(),
                        }),
                        ImageRef::Path(_) => None,
                    },
                }
            })
            .collect();
        (here, vms)
    }
}

/// The memory an upscale to `wanted` still lacks at `got`.
pub fn shortfall(wanted: Resources, got: Resources) -> u64 {
    wanted.memory_bytes.saturating_sub(got.memory_bytes)
}
