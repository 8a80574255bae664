//! The largest sample of a signal over a sliding window of time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One unbroken run of samples. A sample is kept only while no later one is as large, so
/// the front is the largest of the window and the queue stays short.
#[derive(Debug)]
pub(crate) struct WindowMax {
    /// When the run began: the window is only known once the run is as long.
    since: Instant,
    samples: VecDeque<(Instant, f64)>,
}

impl WindowMax {
    pub(crate) fn new(at: Instant, value: f64) -> Self {
        WindowMax {
            since: at,
            samples: VecDeque::from([(at, value)]),
        }
    }

    pub(crate) fn newest(&self) -> Instant {
        self.samples
            .back()
            .expect("a run holds its newest sample")
            .0
    }

    /// Adds a sample, and forgets those more than `window` older than it.
    pub(crate) fn push(&mut self, at: Instant, value: f64, window: Duration) {
        while self.samples.back().is_some_and(|&(_, v)| v <= value) {
            self.samples.pop_back();
        }
        self.samples.push_back((at, value));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| at.saturating_duration_since(t) > window)
        {
            self.samples.pop_front();
        }
    }

    /// The largest sample of the `window` up to the newest, once the run covers it all.
    pub(crate) fn held(&self, window: Duration) -> Option<f64> {
        let covered = self.newest().saturating_duration_since(self.since) >= window;
        covered.then(|| self.samples.front().expect("never empty").1)
    }
}
