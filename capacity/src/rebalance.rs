//! Which VMs a host moves away, and where, to get back below its memory watermark.
//!
//! Each host decides for itself from its own ledger and its (possibly stale) gossip view of
//! the others; there is no central scheduler. The decision is a pure function of that view
//! and `now`, so it is tested with a fake clock and driven by the fleet simulation. The
//! target's ledger still has the last word: a move starts with a lease there.
//!
//! Thrash guards, each a rule below:
//! - a VM moved less than `cooldown_ms` ago is not moved again;
//! - a target must stay at or below its own low mark (watermark − hysteresis) with the VM,
//!   so a move never makes the target want to move something back;
//! - a host acts only above its watermark and stops once it plans to be at its low mark.

use std::collections::BTreeMap;
use vmhost_api::{CuShape, Resources};

/// A host as the planner sees it: its own, from its ledger, or a peer's, from gossip.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLoad {
    pub name: String,
    pub cu_shape: CuShape,
    pub capacity: Resources,
    pub allocated: Resources,
    pub leased: Resources,
    /// Allocated + leased memory beyond which the host takes no placements.
    pub watermark_memory_bytes: u64,
    /// A draining host takes nothing.
    pub draining: bool,
    /// Its images by name, with their ids; empty when it publishes none.
    pub images: BTreeMap<String, String>,
}

/// The image a VM boots from, which its target must have under the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNeed {
    pub name: String,
    /// `None` when the VM's image carries no id: any image of that name will do.
    pub id: Option<String>,
}

/// Whether a host with `images` (name to id) has image `name`, under id `id` when one is
/// asked for. A host that publishes no images (an older version) is not ruled out: it
/// judges for itself.
pub fn has_image(images: &BTreeMap<String, String>, name: &str, id: Option<&str>) -> bool {
    images.is_empty()
        || images
            .get(name)
            .is_some_and(|own| id.is_none_or(|id| own == id))
}

impl ImageNeed {
    fn met_by(&self, host: &HostLoad) -> bool {
        has_image(&host.images, &self.name, self.id.as_deref())
    }
}

impl HostLoad {
    fn used_memory(&self) -> u64 {
        self.allocated
            .memory_bytes
            .saturating_add(self.leased.memory_bytes)
    }

    fn used(&self) -> Resources {
        Resources {
            vcpus: self.allocated.vcpus.saturating_add(self.leased.vcpus),
            memory_bytes: self.used_memory(),
        }
    }

    /// Where the host aims to be after it moves VMs away, and the most a target may reach.
    pub fn low_mark_bytes(&self, policy: &Policy) -> u64 {
        let hysteresis = (self.capacity.memory_bytes as f64 * policy.hysteresis) as u64;
        self.watermark_memory_bytes.saturating_sub(hysteresis)
    }
}

/// A VM of the planning host.
#[derive(Debug, Clone, PartialEq)]
pub struct VmLoad {
    pub name: String,
    /// What it holds now.
    pub size: Resources,
    /// Guest CPU use per vCPU, 0 to 1 (0 when unknown).
    pub busy: f64,
    /// Wall-clock milliseconds of its last arrival here, if it ever moved.
    pub moved_at_ms: Option<u64>,
    /// Running and not migrating already.
    pub movable: bool,
    /// The named image it boots from; `None` for a VM booted from a path.
    pub image: Option<ImageNeed>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Share of capacity below the watermark that a host aims for, so that it does not act
    /// again at the next small growth.
    pub hysteresis: f64,
    /// How long a VM that moved stays put.
    pub cooldown_ms: u64,
    /// Below this `busy`, a VM counts as idle and is moved first.
    pub idle_below: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            hysteresis: 0.05,
            cooldown_ms: 10 * 60 * 1000,
            idle_below: 0.1,
        }
    }
}

/// Why the host plans to move VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Allocated + leased memory is above the watermark.
    AboveWatermark,
    /// A VM here asked for more memory than is free.
    RefusedUpscale,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub vm: String,
    pub to: String,
    pub size: Resources,
}

/// The planner's answer, with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub trigger: Trigger,
    /// Allocated + leased memory here, plus what a refused upscale still needs.
    pub used_memory_bytes: u64,
    pub watermark_memory_bytes: u64,
    pub low_mark_memory_bytes: u64,
    /// Ordered: the first is the one to start now.
    pub moves: Vec<Move>,
    /// Memory still above the low mark after every move; 0 when the plan is enough.
    pub shortfall_bytes: u64,
}

/// The moves that bring `here` back to its low mark, or `None` when it needs none.
///
/// `wanted_bytes` is memory a VM here asked for and was refused (0 if none); `growing` is
/// that VM, which is never the one moved: moving it would not give it its memory here.
pub fn plan(
    here: &HostLoad,
    vms: &[VmLoad],
    peers: &[HostLoad],
    policy: &Policy,
    now_ms: u64,
    wanted_bytes: u64,
    growing: Option<&str>,
) -> Option<Plan> {
    let used = here.used_memory().saturating_add(wanted_bytes);
    let trigger = if here.used_memory() > here.watermark_memory_bytes {
        Trigger::AboveWatermark
    } else if wanted_bytes > 0 && used > here.capacity.memory_bytes.min(here.watermark_memory_bytes)
    {
        Trigger::RefusedUpscale
    } else {
        return None;
    };
    let low_mark = here.low_mark_bytes(policy);
    let excess = used.saturating_sub(low_mark);
    let mut candidates: Vec<&VmLoad> = vms
        .iter()
        .filter(|vm| vm.movable && Some(vm.name.as_str()) != growing)
        .filter(|vm| {
            vm.moved_at_ms
                .is_none_or(|at| now_ms.saturating_sub(at) >= policy.cooldown_ms)
        })
        .collect();
    candidates.sort_by(|a, b| preference(a, b, policy));

    let mut targets: Vec<HostLoad> = peers
        .iter()
        .filter(|p| p.name != here.name && !p.draining && p.cu_shape == here.cu_shape)
        .cloned()
        .collect();
    let mut moves = Vec::new();
    let mut freed = 0u64;
    // Take VMs in order of preference while the rest could still reach the goal with the
    // fewest moves; one that fits nowhere is passed over.
    while freed < excess {
        let remaining = excess - freed;
        let needed_moves = fewest_to_cover(&candidates, remaining);
        let keeps_count_minimal = |vm: &VmLoad| {
            let rest: Vec<&VmLoad> = candidates
                .iter()
                .filter(|other| other.name != vm.name)
                .copied()
                .collect();
            vm.size.memory_bytes >= remaining
                || fewest_to_cover(&rest, remaining - vm.size.memory_bytes)
                    .is_some_and(|n| Some(n + 1) <= needed_moves)
        };
        let fits_somewhere =
            |vm: &VmLoad| best_target(&targets, vm.size, vm.image.as_ref(), policy).is_some();
        // The most preferred VM that keeps the count minimal, or else that fits anywhere.
        let Some(pick) = candidates
            .iter()
            .position(|vm| keeps_count_minimal(vm) && fits_somewhere(vm))
            .or_else(|| candidates.iter().position(|vm| fits_somewhere(vm)))
        else {
            break;
        };
        take(
            &mut candidates,
            pick,
            &mut targets,
            policy,
            &mut moves,
            &mut freed,
        );
    }
    Some(Plan {
        trigger,
        used_memory_bytes: used,
        watermark_memory_bytes: here.watermark_memory_bytes,
        low_mark_memory_bytes: low_mark,
        moves,
        shortfall_bytes: excess.saturating_sub(freed),
    })
}

fn take(
    candidates: &mut Vec<&VmLoad>,
    pick: usize,
    targets: &mut [HostLoad],
    policy: &Policy,
    moves: &mut Vec<Move>,
    freed: &mut u64,
) {
    let vm = candidates.remove(pick);
    let target =
        best_target(targets, vm.size, vm.image.as_ref(), policy).expect("checked by the caller");
    let target = &mut targets[target];
    target.leased = target.leased.checked_add(vm.size).unwrap_or(target.leased);
    *freed = freed.saturating_add(vm.size.memory_bytes);
    moves.push(Move {
        vm: vm.name.clone(),
        to: target.name.clone(),
        size: vm.size,
    });
}

/// Which of two VMs moves first: an idle one before a busy one; among idle ones the
/// smaller; among busy ones the less busy, then the smaller.
fn preference(a: &VmLoad, b: &VmLoad, policy: &Policy) -> std::cmp::Ordering {
    let key = |vm: &VmLoad| {
        let idle = vm.busy < policy.idle_below;
        (
            !idle,
            if idle { 0.0 } else { vm.busy },
            vm.size.memory_bytes,
        )
    };
    let (a, b) = (key(a), key(b));
    a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2))
}

/// The fewest of `vms` whose memory adds up to `bytes`: the largest ones first.
fn fewest_to_cover(vms: &[&VmLoad], bytes: u64) -> Option<usize> {
    let mut sizes: Vec<u64> = vms.iter().map(|vm| vm.size.memory_bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let mut total = 0u64;
    for (count, size) in sizes.into_iter().enumerate() {
        if total >= bytes {
            return Some(count);
        }
        total = total.saturating_add(size);
    }
    (total >= bytes).then_some(vms.len())
}

/// The target with the most memory to spare that stays at or below its low mark with
/// `size` added and can boot `image`; an index into `targets`.
pub fn best_target(
    targets: &[HostLoad],
    size: Resources,
    image: Option<&ImageNeed>,
    policy: &Policy,
) -> Option<usize> {
    targets
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.draining && image.is_none_or(|need| need.met_by(t)))
        .filter_map(|(i, t)| {
            let after = t.used().checked_add(size)?;
            let low_mark = t.low_mark_bytes(policy);
            (after.fits_in(t.capacity) && after.memory_bytes <= low_mark)
                .then(|| (i, low_mark - after.memory_bytes))
        })
        .max_by_key(|(i, spare)| (*spare, std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests;
