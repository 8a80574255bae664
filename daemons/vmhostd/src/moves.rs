//! What this host's moves of VMs share with the rest of the daemon: a drain's progress,
//! the cold arrivals under way, and the room an upscale lacked. The rooms that act on them
//! are `drain`, `cold` and `rebalance` (and `fleet::*`, which does the moving).

use crate::error::{error_chain, now_ms, HostError};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;
use tokio::process::Child;
use tokio::sync::Notify;
use vmhost_api::{DrainHost, DrainVm, VmMove};

/// How long a refused upscale counts as wanting room: the agent asks again sooner.
const WANTED_FOR_MS: u64 = 30_000;

#[derive(Default)]
pub struct DrainState {
    inner: Mutex<Option<Draining>>,
    /// Wakes the mover when an order comes or ends.
    pub wake: Notify,
}

struct Draining {
    order: DrainHost,
    vms: BTreeMap<String, Entry>,
}

struct Entry {
    state: VmMove,
    attempts: u32,
    since: Instant,
}

impl DrainState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Draining>> {
        self.inner.lock().expect("drain lock poisoned")
    }

    pub fn order(&self) -> Option<DrainHost> {
        self.lock().as_ref().map(|d| d.order.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.lock().is_some()
    }

    /// Records where VM `vm`'s move stands; a move that starts counts as an attempt.
    pub fn set(&self, vm: &str, state: VmMove) {
        if let Some(draining) = self.lock().as_mut() {
            let entry = draining.vms.entry(vm.to_string()).or_insert(Entry {
                state: VmMove::Waiting,
                attempts: 0,
                since: Instant::now(),
            });
            let starts = is_move(&state) && !is_move(&entry.state);
            entry.attempts += u32::from(starts);
            if std::mem::discriminant(&entry.state) != std::mem::discriminant(&state) {
                entry.since = Instant::now();
            }
            entry.state = state;
        }
    }

    /// Takes an order: a new drain, or a changed one, which retries at once what could not
    /// move (say, now that `--cold` allows it).
    pub fn begin(&self, order: DrainHost) {
        let mut inner = self.lock();
        match inner.as_mut() {
            Some(draining) => {
                if draining.order != order {
                    for entry in draining.vms.values_mut() {
                        if let VmMove::Stuck { .. } = entry.state {
                            entry.state = VmMove::Waiting;
                        }
                    }
                }
                draining.order = order;
            }
            None => {
                *inner = Some(Draining {
                    order,
                    vms: BTreeMap::new(),
                })
            }
        }
        drop(inner);
        self.wake.notify_one();
    }

    pub fn end(&self) {
        *self.lock() = None;
        self.wake.notify_one();
    }

    /// Every VM the drain has tried to move, with where its move stands.
    pub fn moves(&self) -> Vec<DrainVm> {
        let inner = self.lock();
        inner
            .iter()
            .flat_map(|d| &d.vms)
            .map(|(name, entry)| DrainVm {
                name: name.clone(),
                state: entry.state.clone(),
                attempts: entry.attempts,
            })
            .collect()
    }

    /// How VM `vm`'s move stands, and since when.
    pub fn state_of(&self, vm: &str) -> Option<(VmMove, Instant)> {
        let inner = self.lock();
        let entry = inner.as_ref()?.vms.get(vm)?;
        Some((entry.state.clone(), entry.since))
    }
}

fn is_move(state: &VmMove) -> bool {
    matches!(state, VmMove::Moving { .. } | VmMove::MovingCold { .. })
}

/// The cold arrivals under way, by VM.
#[derive(Default)]
pub struct ColdArrivals(Mutex<HashMap<String, ColdArrival>>);

pub struct ColdArrival {
    pub lease: u64,
    pub source: String,
    /// The disk's receiver, with the tunnel that reaches it.
    pub nbd: Option<(Child, u64)>,
}

impl ColdArrivals {
    pub fn insert(&self, name: &str, arrival: ColdArrival) {
        let mut arrivals = self.0.lock().expect("cold arrivals lock");
        arrivals.insert(name.to_string(), arrival);
    }

    pub fn is_pending(&self, name: &str, lease: u64) -> bool {
        let arrivals = self.0.lock().expect("cold arrivals lock");
        arrivals.get(name).is_some_and(|a| a.lease == lease)
    }

    pub fn take(&self, name: &str, source: &str) -> Result<ColdArrival, HostError> {
        let mut arrivals = self.0.lock().expect("cold arrivals lock");
        match arrivals.get(name) {
            Some(arrival) if arrival.source == source => {
                Ok(arrivals.remove(name).expect("just seen"))
            }
            _ => Err(HostError::Invalid(format!(
                "no VM '{name}' is arriving cold from host '{source}'"
            ))),
        }
    }
}

/// The latest upscale this host refused in whole or in part, for lack of room.
#[derive(Default)]
pub struct RoomWanted {
    latest: Mutex<Option<Wanted>>,
    /// Wakes the rebalancer at once: a guest is short of memory now.
    pub wake: Notify,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub vm: String,
    pub memory_bytes: u64,
    pub at_ms: u64,
}

impl RoomWanted {
    pub fn note(&self, vm: &str, memory_bytes: u64) {
        if memory_bytes == 0 {
            return;
        }
        *self.latest.lock().expect("room lock") = Some(Wanted {
            vm: vm.to_string(),
            memory_bytes,
            at_ms: now_ms(),
        });
        self.wake.notify_one();
    }

    /// The wanted room, while it is recent.
    pub fn current(&self, now_ms: u64) -> Option<Wanted> {
        let mut latest = self.latest.lock().expect("room lock");
        if latest
            .as_ref()
            .is_some_and(|w| now_ms.saturating_sub(w.at_ms) > WANTED_FOR_MS)
        {
            *latest = None;
        }
        latest.clone()
    }

    /// The VM got its memory, or left.
    pub fn satisfied(&self, vm: &str) {
        let mut latest = self.latest.lock().expect("room lock");
        if latest.as_ref().is_some_and(|w| w.vm == vm) {
            *latest = None;
        }
    }
}

/// How many ended arrivals a host remembers.
const ENDED_ARRIVALS_KEPT: usize = 256;

/// Arrivals this host ended before their switchover reached it, with the host that sent
/// each. A source left paused in post-copy by a link cut asks to recover; the answer that
/// the VM never ran here tells it that its own copy is the only one, though QEMU can no
/// longer run it. They are saved, since the source may ask only after this host restarted.
pub struct EndedArrivals {
    path: PathBuf,
    ended: Mutex<VecDeque<(String, String)>>,
}

impl EndedArrivals {
    /// Those saved in `path`. An unreadable file is logged and taken as empty: a source
    /// that then asks is told the VM is unknown here, and keeps its VM listed as migrating.
    pub fn open(path: PathBuf) -> EndedArrivals {
        let ended = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the arrivals ended here; taking none");
                VecDeque::new()
            }
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "the arrivals ended here are unreadable; taking none");
                VecDeque::new()
            }),
        };
        EndedArrivals {
            path,
            ended: Mutex::new(ended),
        }
    }

    /// Applies `change`, and saves the list if it says it changed anything.
    fn change(&self, change: impl FnOnce(&mut VecDeque<(String, String)>) -> bool) {
        let mut ended = self.ended.lock().expect("arrivals lock");
        if !change(&mut ended) {
            return;
        }
        let bytes = serde_json::to_vec(&*ended).expect("names always serialize");
        if let Err(error) = crate::store::write_atomically(&self.path, &bytes) {
            tracing::error!(error = %error_chain(&error), "cannot save the arrivals ended here; after a restart their sources would not learn of it");
        }
    }

    pub fn remember(&self, vm: &str, source: &str) {
        self.change(|ended| {
            ended.retain(|(name, _)| name != vm);
            if ended.len() == ENDED_ARRIVALS_KEPT {
                ended.pop_front();
            }
            ended.push_back((vm.to_string(), source.to_string()));
            true
        });
    }

    /// A new arrival of `vm` begins: what ended before no longer answers for it.
    pub fn clear(&self, vm: &str) {
        self.change(|ended| {
            let before = ended.len();
            ended.retain(|(name, _)| name != vm);
            ended.len() != before
        });
    }

    /// Whether `vm`'s arrival from `source` ended here before the switchover.
    pub fn ended_before_switchover(&self, vm: &str, source: &str) -> bool {
        self.ended
            .lock()
            .expect("arrivals lock")
            .iter()
            .any(|(name, from)| name == vm && from == source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_arrivals_are_still_known_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ended-arrivals.json");
        let before = EndedArrivals::open(path.clone());
        before.remember("db1", "host-a");
        before.remember("db2", "host-b");
        before.clear("db2");
        let after = EndedArrivals::open(path.clone());
        assert!(after.ended_before_switchover("db1", "host-a"));
        assert!(!after.ended_before_switchover("db1", "host-b"));
        assert!(!after.ended_before_switchover("db2", "host-b"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(!EndedArrivals::open(path).ended_before_switchover("db1", "host-a"));
    }
}
