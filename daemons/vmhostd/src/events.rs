//! Scaling events: a bounded in-memory history plus a broadcast for followers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;
use vmhost_api::{Event, EventKind};

/// Events kept per VM: one VM's flood (a guest asking for memory over and over) can push
/// out only its own history, never another VM's.
const HISTORY_PER_VM: usize = 500;

#[derive(Default)]
struct History {
    /// Each VM's latest events, with the order they were recorded in across all VMs.
    per_vm: BTreeMap<String, VecDeque<(u64, Event)>>,
    recorded: u64,
}

pub struct EventLog {
    history: Mutex<History>,
    live: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            history: Mutex::default(),
            live: broadcast::channel(256).0,
        }
    }
}

impl EventLog {
    pub fn record(&self, vm: &str, kind: EventKind, message: String) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = Event {
            unix_ms,
            vm: vm.to_string(),
            kind,
            message,
        };
        tracing::info!(vm, kind = %kind, "{}", event.message);
        let mut history = self.history.lock().unwrap();
        history.recorded += 1;
        let seq = history.recorded;
        let events = history.per_vm.entry(vm.to_string()).or_default();
        if events.len() == HISTORY_PER_VM {
            events.pop_front();
        }
        events.push_back((seq, event.clone()));
        let _ = self.live.send(event);
    }

    /// Drops the history of a VM that left this host, but for this host's own choices
    /// about it (why it was moved away).
    pub fn forget(&self, vm: &str) {
        let mut history = self.history.lock().unwrap();
        if let Some(events) = history.per_vm.get_mut(vm) {
            events.retain(|(_, event)| event.kind.outlives_vm());
            if events.is_empty() {
                history.per_vm.remove(vm);
            }
        }
    }

    /// The history (of one VM, or all, in the order recorded) and a receiver for what comes
    /// after it, taken together so nothing falls between them.
    pub fn snapshot(&self, vm: Option<&str>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let history = self.history.lock().unwrap();
        let mut events: Vec<&(u64, Event)> = match vm {
            Some(vm) => history.per_vm.get(vm).into_iter().flatten().collect(),
            None => history.per_vm.values().flatten().collect(),
        };
        events.sort_by_key(|(seq, _)| *seq);
        let events = events.into_iter().map(|(_, e)| e.clone()).collect();
        (events, self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_per_vm_ordered_and_followed() {
        let log = EventLog::default();
        log.record("b", EventKind::Scaled, "b before".into());
        for i in 0..HISTORY_PER_VM + 5 {
            log.record("a", EventKind::UpscaleRequested, format!("{i}"));
        }
        log.record("b", EventKind::Scaled, "b after".into());
        let (all, mut live) = log.snapshot(None);
        assert_eq!(all.len(), HISTORY_PER_VM + 2);
        assert_eq!(
            all[0].message, "b before",
            "a flood of VM a pushed out VM b's events"
        );
        assert_eq!(all[1].message, "5");
        assert_eq!(all.last().unwrap().message, "b after");
        let (only_b, _) = log.snapshot(Some("b"));
        assert_eq!(only_b.len(), 2);
        log.record("a", EventKind::Rebalance, "moving a away".into());
        log.forget("a");
        assert_eq!(log.snapshot(None).0.len(), 3);
        assert_eq!(log.snapshot(Some("a")).0[0].kind, EventKind::Rebalance);
        log.record("a", EventKind::Scaled, "next".into());
        assert_eq!(live.try_recv().unwrap().message, "moving a away");
        assert_eq!(live.try_recv().unwrap().message, "next");
    }
}
