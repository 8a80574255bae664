//! Every operation, fault and observation of a soak, with its time, for the report of a
//! broken invariant.

use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<String>>>,
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Records `what` (and prints it, so a long run shows where it is).
    pub fn log(&self, what: impl AsRef<str>) {
        let line = format!("[{:7.1}s] {}", self.elapsed_secs(), what.as_ref());
        println!("{line}");
        self.events.lock().unwrap().push(line);
    }

    pub fn dump(&self) -> String {
        self.events.lock().unwrap().join("\n")
    }
}

impl Default for Timeline {
    fn default() -> Timeline {
        Timeline::new()
    }
}
