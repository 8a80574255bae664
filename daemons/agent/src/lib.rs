//! The autoscaling core: a state machine per VM, free of I/O and of the clock. The caller
//! feeds it inputs (metrics, monitor requests, outcomes of actions), each with `now`, and
//! asks [`Agent::next_action`] what to do. Tests drive it with a fake clock.
//!
//! The goal starts from Neon's algorithm: CPU goal = load1 / load target / vCPUs per CU,
//! memory goal = used / memory target / memory per CU, the larger rounded up to a quarter
//! CU and clamped to the VM's bounds. Upscales go ledger → vmm → monitor; downscales go
//! monitor → vmm → ledger, one CU at a time and not within the cooldown of the last change.
//!
//! load1 averages a minute: too slow for a load step, and slower still to let go of one. A
//! guest that sends the fast CPU signal (protocol 2) gives, from its last seconds,
//!
//! fast CPU goal = util × vCPUs × (1 + PSI some avg10 / 100) / load target / vCPUs per CU
//!
//! util × vCPUs is how many vCPUs were busy; as util cannot pass 1, the share of time some
//! task waited for a CPU stands for the demand it cannot show, up to double. The agent
//! holds the largest fast goal of the last `downscale_window_secs`:
//!
//! - Once the samples cover a whole window, the CPU goal is that held value and load1 is
//!   left out. A load step raises it at once; a lull shorter than the window never lowers
//!   it; a finished load stops counting one window after it ended, not when load1 has
//!   decayed. When no sample of the window called for more than the goal, CPU or memory,
//!   a downscale goes straight to it, still asked of the monitor first, and waits for the
//!   cooldown after growth only; else one CU, after any change.
//! - CPU samples measured during a shrink or just after it are left out: they show the
//!   guest moving pages off the unplugged memory, which would grow the VM right back.
//! - Until then (a new agent, a gap in the samples), or for a guest without the signal,
//!   the CPU goal is the larger of load1's and the fast one, in one-CU steps as above.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use vmhost_api::{ComputeUnits, CuShape};
use window::WindowMax;

mod window;

/// The longest duration any agent setting may name.
pub const MAX_SECS: u64 = 86_400;

/// Every threshold and interval of the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// load1 per vCPU the agent aims for.
    pub load_target: f64,
    /// Fraction of memory in use the agent aims for.
    pub memory_target: f64,
    /// Metrics older than this are ignored (and the VM is never shrunk on them).
    pub metrics_max_age_secs: u64,
    /// How long a monitor's upscale request keeps its floor of current + 1 CU.
    pub upscale_request_hold_secs: u64,
    /// No downscale within this long of the last change.
    pub downscale_cooldown_secs: u64,
    /// A guest with the fast CPU signal may shrink to the largest fast CPU goal of this
    /// long. Samples further apart than `metrics_max_age_secs` start the window anew.
    pub downscale_window_secs: u64,
    /// After a monitor denies a downscale to X, the floor is X + 1 CU for this long.
    pub denied_retry_secs: u64,
    /// After a ledger refusal or a failed operation, wait this long (doubling on repeated
    /// failures, up to 16 times) before trying again.
    pub retry_backoff_secs: u64,
    /// How often the agent takes the guest's latest metrics (monitor requests do not wait).
    pub metrics_pull_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            load_target: 0.9,
            memory_target: 0.75,
            metrics_max_age_secs: 15,
            upscale_request_hold_secs: 30,
            downscale_cooldown_secs: 60,
            downscale_window_secs: 60,
            denied_retry_secs: 60,
            retry_backoff_secs: 2,
            metrics_pull_secs: 5,
        }
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.load_target > 0.0 && self.load_target.is_finite()) {
            return Err(format!(
                "load_target must be positive, got {}",
                self.load_target
            ));
        }
        if !(self.memory_target > 0.0 && self.memory_target <= 1.0) {
            return Err(format!(
                "memory_target must be in (0, 1], got {}",
                self.memory_target
            ));
        }
        if self.metrics_max_age_secs == 0
            || self.retry_backoff_secs == 0
            || self.metrics_pull_secs == 0
        {
            return Err(
                "metrics_max_age_secs, retry_backoff_secs and metrics_pull_secs must be positive"
                    .into(),
            );
        }
        // Durations are added to instants; a bound keeps that arithmetic from overflowing.
        for (name, secs) in [
            ("metrics_max_age_secs", self.metrics_max_age_secs),
            ("upscale_request_hold_secs", self.upscale_request_hold_secs),
            ("downscale_cooldown_secs", self.downscale_cooldown_secs),
            ("downscale_window_secs", self.downscale_window_secs),
            ("denied_retry_secs", self.denied_retry_secs),
            ("retry_backoff_secs", self.retry_backoff_secs),
            ("metrics_pull_secs", self.metrics_pull_secs),
        ] {
            if secs > MAX_SECS {
                return Err(format!(
                    "{name} must be at most {MAX_SECS} (a day), got {secs}"
                ));
            }
        }
        Ok(())
    }
}

/// What the guest reported, as the agent uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub load1: f64,
    pub mem_used_bytes: u64,
    /// None from a guest that does not send it (protocol 1): the goal is Neon's alone.
    pub cpu: Option<FastCpu>,
}

/// The fast CPU signal: what the guest's vCPUs did in the last seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FastCpu {
    /// Busy share of the online vCPUs over the last few seconds (1.0 = all busy).
    pub util: f64,
    /// Percent of the last 10 s in which some task waited for a CPU (PSI `some avg10`).
    pub pressure: f64,
    /// The online vCPUs `util` is a share of.
    pub vcpus: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Book `target` in the ledger (a partial grant is taken), resize, tell the monitor.
    Upscale { target: ComputeUnits },
    /// Ask the monitor, resize, release in the ledger.
    Downscale { target: ComputeUnits },
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Grown to `to`, possibly less than asked because the ledger granted part.
    Upscaled {
        to: ComputeUnits,
    },
    /// The ledger had no room at all.
    UpscaleRefused,
    Downscaled {
        to: ComputeUnits,
    },
    /// The monitor said no to `target`.
    DownscaleDenied {
        target: ComputeUnits,
    },
    /// The operation failed (vmm, guest link); retried with backoff.
    Failed,
}

/// One decision, with what it was based on, for events and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub current: ComputeUnits,
    pub goal: ComputeUnits,
    pub reason: String,
    pub action: Option<Action>,
}

const ONE_CU: u32 = 4;

/// How long after a shrink the guest's CPU samples still show the shrink itself (pages
/// moved off the unplugged memory) rather than the workload: the guest measures its use
/// over the last 3 s.
const SHRINK_SETTLE: Duration = Duration::from_secs(5);

fn cu(quarters: u32) -> ComputeUnits {
    ComputeUnits::from_quarters(quarters)
}

/// A floor on the goal that holds until a deadline.
#[derive(Debug, Clone, Copy)]
struct Floor {
    at_least: ComputeUnits,
    until: Instant,
}

impl Floor {
    fn active(self, now: Instant) -> Option<ComputeUnits> {
        (now < self.until).then_some(self.at_least)
    }
}

/// What the metrics call for.
struct Wanted {
    /// In CU, unrounded.
    cu: f64,
    reason: String,
    /// The largest memory goal of a whole window, once the fast CPU goal is held over one.
    memory_held: Option<f64>,
}

/// The size the agent wants now.
#[derive(Debug)]
struct Goal {
    cu: ComputeUnits,
    reason: String,
    /// A downscale may go straight to it rather than one CU at a time.
    straight: bool,
}

/// The fast CPU and memory goals of one unbroken run of protocol-2 samples.
#[derive(Debug)]
struct Held {
    cpu: WindowMax,
    memory: WindowMax,
}

#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    shape: CuShape,
    min: ComputeUnits,
    max: ComputeUnits,
    current: ComputeUnits,
    metrics: Option<(Metrics, Instant)>,
    /// The goals of the current run of protocol-2 samples.
    held: Option<Held>,
    requested: Option<Floor>,
    denied: Option<Floor>,
    last_change: Instant,
    /// The last growth or operator's resize: a downscale the window drives waits for the
    /// cooldown from here only.
    last_growth: Instant,
    /// CPU samples measured before this show the agent's own shrink.
    shrink_settles: Option<Instant>,
    in_flight: Option<Action>,
    blocked_until: Option<Instant>,
    failures: u32,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        shape: CuShape,
        min: ComputeUnits,
        max: ComputeUnits,
        current: ComputeUnits,
        now: Instant,
    ) -> Self {
        Agent {
            config,
            shape,
            min,
            max,
            current,
            metrics: None,
            held: None,
            requested: None,
            denied: None,
            last_change: now,
            last_growth: now,
            shrink_settles: None,
            in_flight: None,
            blocked_until: None,
            failures: 0,
        }
    }

    pub fn current(&self) -> ComputeUnits {
        self.current
    }

    /// Takes the metrics measured at `at`.
    pub fn on_metrics(&mut self, metrics: Metrics, at: Instant) {
        self.metrics = Some((metrics, at));
        let Some(cpu) = metrics.cpu else { return };
        if self.settling(at) {
            return;
        }
        let cpu = self.fast_goal(cpu);
        let memory = self.memory_goal(metrics.mem_used_bytes);
        // After a gap the window may have missed a burst: it starts again. The agent's own
        // resize, during which it takes no samples, is no gap.
        let gap = Duration::from_secs(self.config.metrics_max_age_secs);
        let (window, last_change) = (self.window(), self.last_change);
        match &mut self.held {
            Some(run) if at.saturating_duration_since(run.cpu.newest().max(last_change)) <= gap => {
                run.cpu.push(at, cpu, window);
                run.memory.push(at, memory, window);
            }
            _ => {
                self.held = Some(Held {
                    cpu: WindowMax::new(at, cpu),
                    memory: WindowMax::new(at, memory),
                })
            }
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.downscale_window_secs)
    }

    fn settling(&self, at: Instant) -> bool {
        self.shrink_settles.is_some_and(|settles| at < settles)
    }

    /// The monitor asked for memory: at least current + 1 CU for a while, at once.
    pub fn on_upscale_request(&mut self, now: Instant) {
        self.requested = Some(Floor {
            at_least: cu(self.current.quarters() + ONE_CU),
            until: now + Duration::from_secs(self.config.upscale_request_hold_secs),
        });
        // A request overrides a backoff from an earlier refusal: the guest needs it now.
        self.blocked_until = None;
    }

    /// The operator changed the bounds; the next decision moves the VM into them.
    pub fn set_bounds(&mut self, min: ComputeUnits, max: ComputeUnits) {
        self.min = min;
        self.max = max;
    }

    /// The size changed outside the agent (an operator's scale): adopt it, and count it as
    /// a change for the cooldown.
    pub fn set_current(&mut self, current: ComputeUnits, now: Instant) {
        if current != self.current {
            self.current = current;
            self.last_change = now;
            self.last_growth = now;
        }
    }

    /// The latest metrics and when they were measured, unless too old.
    fn fresh_metrics(&self, now: Instant) -> Option<(Metrics, Instant)> {
        let (metrics, at) = self.metrics?;
        (now.saturating_duration_since(at) <= Duration::from_secs(self.config.metrics_max_age_secs))
            .then_some((metrics, at))
    }

    /// The fast CPU goal, unrounded.
    fn fast_goal(&self, c: FastCpu) -> f64 {
        // A NaN gives no evidence of load, as a NaN load1.
        let within = |x: f64, max: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, max) };
        let busy_vcpus = within(c.util, 1.0) * f64::from(c.vcpus);
        let queued = 1.0 + within(c.pressure, 100.0) / 100.0;
        busy_vcpus * queued / self.config.load_target / f64::from(self.shape.vcpus_per_cu)
    }

    fn memory_goal(&self, used_bytes: u64) -> f64 {
        used_bytes as f64 / self.config.memory_target / self.shape.memory_per_cu_bytes as f64
    }

    fn wanted(&self, m: Metrics, at: Instant) -> Wanted {
        let vcpus_per_cu = f64::from(self.shape.vcpus_per_cu);
        let slow = m.load1.max(0.0) / self.config.load_target / vcpus_per_cu;
        let memory = self.memory_goal(m.mem_used_bytes);
        let load = format!("load1 {:.2} → {slow:.2} CU", m.load1);
        let used = format!(
            "memory used {} MiB → {memory:.2} CU",
            m.mem_used_bytes >> 20
        );
        let Some(c) = m.cpu else {
            return Wanted {
                cu: slow.max(memory),
                reason: format!("{load}, {used}"),
                memory_held: None,
            };
        };
        let measured = self.fast_goal(c);
        let (fast, ignored) = if self.settling(at) {
            (0.0, ", ignored: taken as the VM shrank")
        } else {
            (measured, "")
        };
        let fast_text = format!(
            "cpu util {:.2} over {} vCPU, pressure {:.0}% → {measured:.2} CU (fast{ignored})",
            c.util, c.vcpus, c.pressure
        );
        let window = self.config.downscale_window_secs;
        let run = self.held.as_ref();
        if let Some(held) = run.and_then(|r| r.cpu.held(self.window())) {
            let held_text = format!("fast CPU held over {window} s");
            // Memory that would not keep the VM above its minimum sets nothing.
            let driver = if memory <= held.max(self.min.as_f64()) {
                &held_text
            } else {
                "memory"
            };
            return Wanted {
                cu: held.max(memory),
                reason: format!(
                    "{fast_text}, {held_text} → {held:.2} CU, {load} (not used), {used}; \
                     driven by {driver}"
                ),
                memory_held: run.and_then(|r| r.memory.held(self.window())),
            };
        }
        let driver = if fast > slow.max(memory) {
            "cpu util (fast)"
        } else if slow >= memory {
            "load1 (slow)"
        } else {
            "memory"
        };
        Wanted {
            cu: slow.max(memory).max(fast),
            reason: format!(
                "{fast_text}, {load} (slow), {used}; driven by {driver}; \
                 fast CPU not yet seen over {window} s"
            ),
            memory_held: None,
        }
    }

    /// The size the agent wants now, and why.
    fn goal(&self, now: Instant) -> Goal {
        let (mut goal, mut reason, memory_held) = match self.fresh_metrics(now) {
            Some((m, at)) => {
                let wanted = self.wanted(m, at);
                // Round up to a quarter CU; NaN and huge values end at the maximum.
                let quarters = (wanted.cu * 4.0).ceil();
                let quarters = if quarters.is_finite() {
                    quarters.clamp(0.0, f64::from(u32::MAX / 2)) as u32
                } else {
                    u32::MAX / 2
                };
                (cu(quarters), wanted.reason, wanted.memory_held)
            }
            None => (
                self.current,
                "no fresh metrics: keep at least the current size".to_string(),
                None,
            ),
        };
        if let Some(floor) = self.requested.and_then(|f| f.active(now)) {
            if floor > goal {
                goal = floor;
                reason += "; monitor asked for more";
            }
        }
        if let Some(floor) = self.denied.and_then(|f| f.active(now)) {
            // A denial only stops shrinking; it never grows the VM.
            let floor = floor.min(self.current);
            if floor > goal {
                goal = floor;
                reason += "; a recent downscale was denied";
            }
        }
        let clamped = goal.clamp(self.min, self.max.max(self.min));
        if clamped != goal {
            reason += &format!("; clamped to [{}, {}]", self.min, self.max);
        }
        // The CPU goal is the window's largest: the goal is stable if its memory was too.
        // Floors and bounds only raise it or are the operator's.
        Goal {
            cu: clamped,
            reason,
            straight: memory_held.is_some_and(|m| m <= clamped.as_f64()),
        }
    }

    /// The next action, if any. While one is in flight nothing else is started.
    pub fn next_action(&mut self, now: Instant) -> Decision {
        let Goal {
            cu: goal,
            mut reason,
            straight,
        } = self.goal(now);
        let action = if self.in_flight.is_some() {
            None
        } else if self.blocked_until.is_some_and(|until| now < until) {
            if goal != self.current {
                reason += "; waiting after a refusal or failure";
            }
            None
        } else if goal > self.current {
            Some(Action::Upscale { target: goal })
        } else if goal < self.current {
            // The window has seen a whole window want no more: a step it drives pauses
            // after growth, against flapping, but not after the previous step down.
            let since = if straight {
                self.last_growth
            } else {
                self.last_change
            };
            let cooldown_ends = since + Duration::from_secs(self.config.downscale_cooldown_secs);
            if now < cooldown_ends {
                reason += "; in downscale cooldown";
                None
            } else {
                let one_step_down = cu(self.current.quarters().saturating_sub(ONE_CU));
                let target = if straight {
                    goal
                } else {
                    goal.max(one_step_down)
                };
                if target < one_step_down {
                    reason += "; more than 1 CU at once, as nothing in the window wanted more";
                }
                Some(Action::Downscale { target })
            }
        } else {
            None
        };
        self.in_flight = action;
        Decision {
            current: self.current,
            goal,
            reason,
            action,
        }
    }

    pub fn on_outcome(&mut self, outcome: Outcome, now: Instant) {
        self.in_flight = None;
        match outcome {
            Outcome::Upscaled { to } | Outcome::Downscaled { to } => {
                self.failures = 0;
                if to != self.current {
                    if to > self.current {
                        self.last_growth = now;
                    } else {
                        self.shrink_settles = Some(now + SHRINK_SETTLE);
                    }
                    self.current = to;
                    self.last_change = now;
                }
                // A partial grant means the ledger is short: do not ask again at once.
                if matches!(outcome, Outcome::Upscaled { .. }) && to < self.goal(now).cu {
                    self.back_off(now);
                }
            }
            Outcome::UpscaleRefused | Outcome::Failed => self.back_off(now),
            Outcome::DownscaleDenied { target } => {
                self.denied = Some(Floor {
                    at_least: cu(target.quarters() + ONE_CU),
                    until: now + Duration::from_secs(self.config.denied_retry_secs),
                });
            }
        }
    }

    fn back_off(&mut self, now: Instant) {
        self.failures = (self.failures + 1).min(5);
        let delay =
            Duration::from_secs(self.config.retry_backoff_secs) * (1 << (self.failures - 1));
        self.blocked_until = Some(now + delay);
    }
}

#[cfg(test)]
mod tests;
