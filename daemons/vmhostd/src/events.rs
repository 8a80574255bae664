//! Scaling events: a bounded in-memory history plus a broadcast for followers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;
use vmhost_api::{Event, EventKind};

const HISTORY: usize = 2000;

pub struct EventLog {
    history: Mutex<VecDeque<Event>>,
    live: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
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
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(event.clone());
        let _ = self.live.send(event);
    }

    /// The history (of one VM, or all) and a receiver for what comes after it, taken
    /// together so nothing falls between them.
    pub fn snapshot(&self, vm: Option<&str>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let history = self.history.lock().unwrap();
        let events = history
            .iter()
            .filter(|e| vm.is_none_or(|vm| e.vm == vm))
            .cloned()
            .collect();
        (events, self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_filtered_and_followed() {
        let log = EventLog::default();
        for i in 0..HISTORY + 5 {
            log.record(
                if i % 2 == 0 { "a" } else { "b" },
                EventKind::Decision,
                format!("{i}"),
            );
        }
        let (all, mut live) = log.snapshot(None);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].message, "5");
        let (only_a, _) = log.snapshot(Some("a"));
        assert!(only_a.iter().all(|e| e.vm == "a"));
        log.record("a", EventKind::Scaled, "next".into());
        assert_eq!(live.try_recv().unwrap().message, "next");
    }
}
