//! Watermark rebalancing: this host, on its own, moves VMs away when its allocated memory
//! passes its watermark or an upscale here lacked room. What to move and where is
//! `vmhost_capacity::rebalance::plan`, which aims for the low mark; this runs it on the
//! host's ledger and its gossip view, starts the plan's first migration, and plans again
//! once it ends. So it stops as soon as the host is back at its watermark, which moves
//! fewer VMs than going on to the low mark (the fleet simulation measured both).

use super::*;
use crate::error::now_ms;
use vmhost_api::{EventKind, MigrateVm};
use vmhost_capacity::rebalance::{self, HostLoad, Plan, Policy, Trigger};

/// How often the host looks at its watermark when no refused upscale wakes it.
const REBALANCE_TICK: Duration = Duration::from_secs(2);
/// How often "nothing can move" is recorded again for the same shortfall.
const STUCK_EVENT_EVERY_MS: u64 = 60_000;

impl Fleet {
    pub(super) fn spawn_rebalancer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_stuck: Option<(u64, u64)> = None;
            loop {
                let Some(fleet) = weak.upgrade() else { return };
                if !fleet.host.drain.is_draining() {
                    fleet.rebalance_once(&mut last_stuck).await;
                }
                let wake = fleet.host.room_wanted.wake.notified();
                tokio::select! {
                    _ = wake => {}
                    _ = tokio::time::sleep(REBALANCE_TICK) => {}
                }
            }
        });
    }

    fn policy(&self) -> Policy {
        Policy {
            hysteresis: self.config.watermark_hysteresis,
            cooldown_ms: self.config.rebalance_cooldown_secs * 1000,
            ..Policy::default()
        }
    }

    /// Plans from the current view and starts the first move, waiting for it to end.
    async fn rebalance_once(&self, last_stuck: &mut Option<(u64, u64)>) {
        let now = now_ms();
        let (here, vms) = self.host.load(self.config.watermark);
        let wanted = self.host.room_wanted.current(now);
        // A peer whose gossip overstated its room lately is no target of a move by choice.
        let peers: Vec<HostLoad> = self
            .live_peers()
            .await
            .iter()
            .filter(|v| self.trusted(v))
            .map(load_of)
            .collect();
        let Some(plan) = rebalance::plan(
            &here,
            &vms,
            &peers,
            &self.policy(),
            now,
            wanted.as_ref().map_or(0, |w| w.memory_bytes),
            wanted.as_ref().map(|w| w.vm.as_str()),
        ) else {
            return;
        };
        let Some(first) = plan.moves.first().cloned() else {
            let repeat = last_stuck.is_some_and(|(shortfall, at)| {
                shortfall == plan.shortfall_bytes && now - at < STUCK_EVENT_EVERY_MS
            });
            if !repeat {
                *last_stuck = Some((plan.shortfall_bytes, now));
                let about = wanted.as_ref().map_or(self.host.name(), |w| w.vm.as_str());
                self.host.events.record(
                    about,
                    EventKind::Rebalance,
                    format!(
                        "{}; no VM can move: no live host has room below its own low mark",
                        numbers(&plan)
                    ),
                );
            }
            return;
        };
        *last_stuck = None;
        let Ok(_permit) = self.own_moves.try_acquire() else {
            return;
        };
        self.host.events.record(
            &first.vm,
            EventKind::Rebalance,
            format!(
                "{}; moving this VM ({}) to host '{}', move 1 of {} planned",
                numbers(&plan),
                first.size,
                first.to,
                plan.moves.len()
            ),
        );
        let request = MigrateVm {
            name: first.vm.clone(),
            to: Some(first.to.clone()),
            ..MigrateVm::default()
        };
        let (progress, _ignored) = tokio::sync::mpsc::channel(1);
        let outcome = match self.migrate(request, progress).await {
            Ok(summary) => format!(
                "moved to host '{}' in {:.1} s",
                summary.to,
                summary.total_ms as f64 / 1000.0
            ),
            Err(error) => format!("the move to host '{}' failed: {}", first.to, error.message),
        };
        self.host
            .events
            .record(&first.vm, EventKind::Rebalance, outcome);
    }
}

/// A peer as the planner sees it, from gossip.
fn load_of(view: &HostView) -> HostLoad {
    HostLoad {
        name: view.name.clone(),
        cu_shape: view.cu_shape,
        capacity: view.capacity,
        allocated: view.allocated,
        leased: view.leased,
        watermark_memory_bytes: view.watermark_memory_bytes,
        draining: view.drain.is_some(),
        images: view.images.clone(),
    }
}

fn numbers(plan: &Plan) -> String {
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let why = match plan.trigger {
        Trigger::AboveWatermark => "above the watermark",
        Trigger::RefusedUpscale => "an upscale lacked room",
    };
    format!(
        "{why}: {:.2} GiB in use or wanted, watermark {:.2} GiB, aiming for {:.2} GiB",
        gib(plan.used_memory_bytes),
        gib(plan.watermark_memory_bytes),
        gib(plan.low_mark_memory_bytes)
    )
}
