//! The autoscaling agent of one VM: a task that feeds the pure core (`vmhost_agent`) with
//! the guest's metrics every poll interval and with monitor requests at once, and carries
//! out what it decides through the host (ledger, vmm, guest link).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use vmhost_agent::{Action, Agent, AgentConfig, Decision, FastCpu, Outcome};
use vmhost_api::{ComputeUnits, CuShape, EventKind};
use vmhost_guest_link::UpscaleRequest;
use vmhost_guest_protocol::{CpuUsage, Metrics};

/// What the agent needs of the host: its VM's view, and a way to act and to be heard.
#[async_trait::async_trait]
pub trait AgentPort: Send + Sync {
    /// The VM as the agent sees it, or None once it no longer runs (the agent then ends).
    fn agent_view(&self, vm: &str) -> Option<AgentView>;
    fn set_goal(&self, vm: &str, goal: ComputeUnits);
    fn record_event(&self, vm: &str, kind: EventKind, message: String);
    /// Carries out one action.
    async fn execute(&self, vm: &str, action: Action, request: Option<UpscaleRequest>) -> Outcome;
    fn record_outcome(&self, vm: &str, action: Action, outcome: Outcome, elapsed: Duration);
}

/// What the agent reads of its VM on each round.
pub struct AgentView {
    pub cu: ComputeUnits,
    pub min: ComputeUnits,
    pub max: ComputeUnits,
    /// The latest guest metrics and their age.
    pub metrics: Option<(vmhost_agent::Metrics, Duration)>,
}

/// The guest's metrics as the agent takes them; `cpu` is the fast signal of a guest that
/// sends it.
pub fn agent_metrics(m: Metrics, cpu: Option<CpuUsage>) -> vmhost_agent::Metrics {
    vmhost_agent::Metrics {
        load1: f64::from(m.load1),
        mem_used_bytes: m.mem_used_bytes,
        cpu: cpu.map(|c| FastCpu {
            util: f64::from(c.util),
            pressure: f64::from(c.pressure_some_avg10),
            // The vCPUs the utilisation was measured over.
            vcpus: m.online_cpus,
        }),
    }
}

/// Handle to a running agent; dropping it stops the agent.
pub struct AgentHandle {
    requests: mpsc::Sender<UpscaleRequest>,
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AgentHandle {
    pub fn start(
        host: Weak<dyn AgentPort>,
        vm: String,
        config: AgentConfig,
        shape: CuShape,
        view: AgentView,
        poll: Duration,
    ) -> AgentHandle {
        let (requests, receiver) = mpsc::channel(16);
        let wake = Arc::new(Notify::new());
        let agent = Agent::new(config, shape, view.min, view.max, view.cu, Instant::now());
        let task = tokio::spawn(run(host, vm, agent, receiver, wake.clone(), poll));
        AgentHandle {
            requests,
            wake,
            task,
        }
    }

    /// A monitor's request; dropped if one is already queued (the agent acts on it anyway).
    pub fn upscale_request(&self, request: UpscaleRequest) {
        let _ = self.requests.try_send(request);
    }

    /// Something changed (an operator's scale or bounds): decide again now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn run(
    host: Weak<dyn AgentPort>,
    vm: String,
    mut agent: Agent,
    mut requests: mpsc::Receiver<UpscaleRequest>,
    wake: Arc<Notify>,
    poll: Duration,
) {
    let mut tick = tokio::time::interval(poll);
    let mut last_reported: Option<Decision> = None;
    loop {
        let mut request = None;
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
            Some(r) = requests.recv() => request = Some(r),
        }
        let Some(host) = host.upgrade() else { return };
        let Some(view) = host.agent_view(&vm) else {
            return;
        };
        let now = Instant::now();
        agent.set_bounds(view.min, view.max);
        agent.set_current(view.cu, now);
        if let Some((metrics, age)) = view.metrics {
            agent.on_metrics(metrics, now.checked_sub(age).unwrap_or(now));
        }
        if let Some(r) = &request {
            agent.on_upscale_request(now);
            host.record_event(
                &vm,
                EventKind::UpscaleRequested,
                format!(
                    "monitor asked for memory (request {}, pressure seen {} µs before sending)",
                    r.id,
                    r.pressure_age.as_micros()
                ),
            );
        }
        act(&host, &vm, &mut agent, request, &mut last_reported).await;
    }
}

/// Runs decisions until the agent has nothing more to do right now.
async fn act(
    host: &Arc<dyn AgentPort>,
    vm: &str,
    agent: &mut Agent,
    mut request: Option<UpscaleRequest>,
    last: &mut Option<Decision>,
) {
    loop {
        let decision = agent.next_action(Instant::now());
        host.set_goal(vm, decision.goal);
        let Some(action) = decision.action else {
            *last = Some(decision);
            return;
        };
        // Decisions that change nothing are not worth an event each poll.
        if last.as_ref() != Some(&decision) {
            host.record_event(
                vm,
                EventKind::Decision,
                format!(
                    "{} → goal {} CU: {}; {}",
                    decision.current,
                    decision.goal,
                    decision.reason,
                    describe(action)
                ),
            );
        }
        *last = Some(decision);
        let started = Instant::now();
        let outcome = host.execute(vm, action, request.take()).await;
        let elapsed = started.elapsed();
        agent.on_outcome(outcome, Instant::now());
        host.record_outcome(vm, action, outcome, elapsed);
    }
}

fn describe(action: Action) -> String {
    match action {
        Action::Upscale { target } => format!("upscale to {target} CU"),
        Action::Downscale { target } => format!("downscale to {target} CU"),
    }
}

/// The host's `[agent]` settings with a VM's overrides on top; unknown keys or bad values
/// are an error naming them.
pub fn effective_config(
    host: &AgentConfig,
    overrides: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Result<AgentConfig, String> {
    let mut value = serde_json::to_value(host).map_err(|e| e.to_string())?;
    let map = value
        .as_object_mut()
        .expect("AgentConfig serializes to an object");
    for (key, v) in overrides {
        map.insert(key.clone(), v.clone());
    }
    let config: AgentConfig =
        serde_json::from_value(value).map_err(|e| format!("agent settings: {e}"))?;
    config
        .validate()
        .map_err(|e| format!("agent settings: {e}"))?;
    Ok(config)
}

/// The outcome and its event kind and text.
pub fn describe_outcome(
    action: Action,
    outcome: Outcome,
    elapsed: Duration,
) -> (EventKind, String, &'static str, &'static str) {
    let direction = match action {
        Action::Upscale { .. } => "up",
        Action::Downscale { .. } => "down",
    };
    let ms = elapsed.as_millis();
    match outcome {
        Outcome::Upscaled { to } => match action {
            Action::Upscale { target } if to < target => (
                EventKind::CapacityRefused,
                format!("ledger granted only {to} of {target} CU; upscaled to {to} CU in {ms} ms"),
                direction,
                "partial",
            ),
            _ => (
                EventKind::Scaled,
                format!("upscaled to {to} CU in {ms} ms"),
                direction,
                "applied",
            ),
        },
        Outcome::Downscaled { to } => (
            EventKind::Scaled,
            format!("downscaled to {to} CU in {ms} ms"),
            direction,
            "applied",
        ),
        Outcome::UpscaleRefused => (
            EventKind::CapacityRefused,
            format!("{}: refused, the host has no room", describe(action)),
            direction,
            "refused",
        ),
        Outcome::DownscaleDenied { target } => (
            EventKind::DownscaleDenied,
            format!("monitor denied the downscale to {target} CU"),
            direction,
            "denied",
        ),
        Outcome::Failed => (
            EventKind::Failed,
            format!("{} failed; retrying with backoff", describe(action)),
            direction,
            "failed",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_are_validated() {
        let host = AgentConfig::default();
        let mut overrides = std::collections::BTreeMap::new();
        overrides.insert("downscale_cooldown_secs".to_string(), serde_json::json!(5));
        assert_eq!(
            effective_config(&host, &overrides)
                .unwrap()
                .downscale_cooldown_secs,
            5
        );
        overrides.insert("colour".to_string(), serde_json::json!(1));
        assert!(effective_config(&host, &overrides)
            .unwrap_err()
            .contains("colour"));
        overrides.remove("colour");
        overrides.insert("memory_target".to_string(), serde_json::json!(3));
        assert!(effective_config(&host, &overrides)
            .unwrap_err()
            .contains("memory_target"));
        overrides.remove("memory_target");
        // Seconds past any instant's range were accepted, and overflowed the agent's clock.
        overrides.insert(
            "upscale_request_hold_secs".to_string(),
            serde_json::json!(u64::MAX),
        );
        assert!(effective_config(&host, &overrides)
            .unwrap_err()
            .contains("upscale_request_hold_secs"));
    }
}
