//! The handle of one running VM's compute watch (see `compute.rs`), kept in its VM record.

use std::sync::{Arc, Mutex};
use vmhost_compute_api::ComputeStatus;

/// Watches one running VM's compute; dropping it stops the watch.
pub struct ComputeWatch {
    task: tokio::task::JoinHandle<()>,
    last: Arc<Mutex<Option<ComputeStatus>>>,
}

impl Drop for ComputeWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ComputeWatch {
    pub fn new(
        task: tokio::task::JoinHandle<()>,
        last: Arc<Mutex<Option<ComputeStatus>>>,
    ) -> ComputeWatch {
        ComputeWatch { task, last }
    }

    /// The status last read, if computectl answered the last read.
    pub fn last(&self) -> Option<ComputeStatus> {
        self.last.lock().unwrap().clone()
    }
}
