//! Moving a draining host's VMs away: each live to the best other host, `parallel` at a
//! time; with `--cold`, one that cannot move live (or is stopped) by a stop here and a
//! start there. A VM that cannot move is listed with its reason and tried again later.

use super::*;
use std::collections::HashSet;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use vmhost_api::MAX_DRAIN_PARALLEL;
use vmhost_api::{DrainHost, EventKind, MigrateVm, VmMove, VmState};

/// How long a VM that could not move waits before the next try: a monitor that refused
/// to give memory back, or a fleet with no room, may change its mind.
const STUCK_RETRY: Duration = Duration::from_secs(30);
/// How often the drainer looks for VMs when nothing wakes it.
const DRAIN_TICK: Duration = Duration::from_secs(1);

impl Fleet {
    /// Runs for the life of the fleet: whenever this host drains, moves its VMs away.
    pub(super) fn spawn_drainer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut moving: JoinSet<String> = JoinSet::new();
            let mut in_flight: HashSet<String> = HashSet::new();
            loop {
                let Some(fleet) = weak.upgrade() else { return };
                if let Some(order) = fleet.host.drain.order() {
                    let parallel = order.parallel.clamp(1, MAX_DRAIN_PARALLEL) as usize;
                    for name in fleet.vms_to_move() {
                        if in_flight.len() >= parallel {
                            break;
                        }
                        if in_flight.insert(name.clone()) {
                            let fleet = fleet.clone();
                            let order = order.clone();
                            moving.spawn(async move {
                                fleet.move_away(&name, &order).await;
                                name
                            });
                        }
                    }
                }
                let wake = fleet.host.drain.wake.notified();
                tokio::select! {
                    Some(done) = moving.join_next() => {
                        if let Ok(name) = done {
                            in_flight.remove(&name);
                        }
                    }
                    _ = wake => {}
                    _ = tokio::time::sleep(DRAIN_TICK) => {}
                }
            }
        });
    }

    /// The VMs here whose move is due: not tried yet, or stuck long enough ago.
    fn vms_to_move(&self) -> Vec<String> {
        let mut names: Vec<String> = self.host.list().into_iter().map(|vm| vm.name).collect();
        names.retain(|name| match self.host.drain.state_of(name) {
            None => true,
            Some((VmMove::Stuck { .. }, since)) => since.elapsed() >= STUCK_RETRY,
            Some((state, _)) => !matches!(state, VmMove::Moving { .. } | VmMove::MovingCold { .. }),
        });
        names
    }

    /// Moves one VM of the draining host: live if it can, cold if the order allows.
    async fn move_away(self: &Arc<Self>, name: &str, order: &DrainHost) {
        let Ok(slot) = self.host.slot(name) else {
            return;
        };
        let state = slot.record().state();
        let live_refusal = match state {
            VmState::Running => match self.host.cannot_move_live(name) {
                Some(reason) => reason,
                None => match self.move_live(name).await {
                    Ok(()) => return,
                    Err(error) => error.message,
                },
            },
            VmState::Stopped | VmState::Crashed => {
                format!("it is {state}: only a cold move (a start on another host) takes it away")
            }
            // Starting, or migrating on an operator's order: look again later.
            VmState::Starting | VmState::Migrating => return,
        };
        if !order.cold {
            self.drain_event(name, format!("cannot move live: {live_refusal}; `vmctl drain --cold` would stop it here and start it on another host, losing its RAM"));
            self.host.drain.set(
                name,
                VmMove::Stuck {
                    reason: live_refusal,
                },
            );
            return;
        }
        self.drain_event(
            name,
            format!("cannot move live ({live_refusal}); moving it cold: the guest loses its RAM"),
        );
        if let Err(error) = self.move_cold(name).await {
            self.drain_event(name, format!("cold move failed: {}", error.message));
            self.host.drain.set(
                name,
                VmMove::Stuck {
                    reason: error.message,
                },
            );
        }
    }

    /// A live migration to the best host, with its progress in the drain report.
    async fn move_live(&self, name: &str) -> Result<(), ApiError> {
        let _permit = self.own_moves.acquire().await.expect("never closed");
        self.host.drain.set(
            name,
            VmMove::Moving {
                to: String::new(),
                percent: 0,
            },
        );
        let (progress, mut updates) = mpsc::channel::<vmhost_api::MigrationProgress>(16);
        let request = MigrateVm {
            name: name.to_string(),
            ..MigrateVm::default()
        };
        let drain = &self.host.drain;
        let follow = async {
            while let Some(update) = updates.recv().await {
                let percent = (update.transferred_bytes * 100)
                    .checked_div(update.total_bytes)
                    .unwrap_or(0)
                    .min(100) as u32;
                drain.set(
                    name,
                    VmMove::Moving {
                        to: update.target,
                        percent,
                    },
                );
            }
        };
        let (migrated, ()) = tokio::join!(self.migrate(request, progress), follow);
        let summary = migrated?;
        self.drain_event(
            name,
            format!(
                "moved live to host '{}' in {:.1} s",
                summary.to,
                summary.total_ms as f64 / 1000.0
            ),
        );
        self.host.drain.set(name, VmMove::Moved { to: summary.to });
        Ok(())
    }

    fn drain_event(&self, vm: &str, message: String) {
        self.host.events.record(vm, EventKind::Drain, message);
    }
}
