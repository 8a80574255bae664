//! The core, scripted against a fake clock.

use super::*;

mod fast_signal;

const GIB: u64 = 1 << 30;

/// A clock the test moves by hand.
struct FakeClock {
    now: Instant,
}

impl FakeClock {
    fn new() -> Self {
        FakeClock {
            now: Instant::now(),
        }
    }
    fn advance(&mut self, secs: u64) -> Instant {
        self.now += Duration::from_secs(secs);
        self.now
    }
}

fn c(text: &str) -> ComputeUnits {
    text.parse().unwrap()
}

/// 1 CU = 1 vCPU + 1 GiB, bounds [1, 4], at 1 CU.
fn agent(clock: &FakeClock) -> Agent {
    let shape = CuShape {
        vcpus_per_cu: 1,
        memory_per_cu_bytes: GIB,
    };
    Agent::new(
        AgentConfig::default(),
        shape,
        c("1"),
        c("4"),
        c("1"),
        clock.now,
    )
}

/// As a protocol-1 guest reports: no fast CPU signal.
fn metrics(load1: f64, mem_used_mib: u64) -> Metrics {
    Metrics {
        load1,
        mem_used_bytes: mem_used_mib << 20,
        cpu: None,
    }
}

/// As a protocol-2 guest reports, with 100 MiB used.
fn with_cpu(load1: f64, util: f64, pressure: f64, vcpus: u32) -> Metrics {
    Metrics {
        cpu: Some(FastCpu {
            util,
            pressure,
            vcpus,
        }),
        ..metrics(load1, 100)
    }
}

/// Time passes, the guest reports `load1` (and 100 MiB used), the agent decides.
fn after(a: &mut Agent, clock: &mut FakeClock, secs: u64, load1: f64) -> Option<Action> {
    clock.advance(secs);
    a.on_metrics(metrics(load1, 100), clock.now);
    a.next_action(clock.now).action
}

/// Decides, and carries out the action in full; returns it.
fn finish(agent: &mut Agent, clock: &FakeClock) -> Option<Action> {
    let action = agent.next_action(clock.now).action?;
    let outcome = match action {
        Action::Upscale { target } => Outcome::Upscaled { to: target },
        Action::Downscale { target } => Outcome::Downscaled { to: target },
    };
    agent.on_outcome(outcome, clock.now);
    Some(action)
}

#[test]
fn basic_upscale_from_load_and_from_memory() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    // load1 1.8 at 0.9 per vCPU wants 2 CU.
    a.on_metrics(metrics(1.8, 100), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("2") })
    );
    a.on_outcome(Outcome::Upscaled { to: c("2") }, clock.now);
    assert_eq!(a.current(), c("2"));
    // 2.4 GiB used at 0.75 wants 3.2 → 3.25 CU (rounded up to a quarter).
    clock.advance(5);
    a.on_metrics(metrics(0.1, 2458), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, Some(Action::Upscale { target: c("3.25") }));
    assert!(
        decision.reason.contains("memory used 2458 MiB"),
        "{}",
        decision.reason
    );
}

#[test]
fn basic_downscale_after_cooldown_one_cu_at_a_time() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(3.5, 100), clock.now);
    finish(&mut a, &clock);
    assert_eq!(a.current(), c("4"));
    clock.advance(10);
    a.on_metrics(metrics(0.0, 100), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, None, "{}", decision.reason);
    assert!(decision.reason.contains("cooldown"));
    assert_eq!(
        after(&mut a, &mut clock, 60, 0.0),
        Some(Action::Downscale { target: c("3") })
    );
    a.on_outcome(Outcome::Downscaled { to: c("3") }, clock.now);
    // The next step waits for a new cooldown.
    assert_eq!(after(&mut a, &mut clock, 1, 0.0), None);
    assert_eq!(
        after(&mut a, &mut clock, 60, 0.0),
        Some(Action::Downscale { target: c("2") })
    );
}

#[test]
fn goal_is_clamped_to_bounds() {
    let clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(100.0, 100), clock.now);
    assert_eq!(a.goal(clock.now).cu, c("4"));
    a.on_metrics(metrics(0.0, 0), clock.now);
    assert_eq!(a.goal(clock.now).cu, c("1"));
    // A guest reporting NaN gives no evidence of load.
    a.on_metrics(metrics(f64::NAN, 0), clock.now);
    assert_eq!(a.goal(clock.now).cu, c("1"));
}

#[test]
fn partial_ledger_approval_is_used_and_retried_later() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(3.5, 100), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("4") })
    );
    a.on_outcome(Outcome::Upscaled { to: c("2.5") }, clock.now);
    assert_eq!(a.current(), c("2.5"));
    // Short of its goal, it backs off before asking the ledger again.
    assert_eq!(a.next_action(clock.now).action, None);
    assert_eq!(
        after(&mut a, &mut clock, 2, 3.5),
        Some(Action::Upscale { target: c("4") })
    );
}

#[test]
fn ledger_refusal_at_full_capacity_backs_off_exponentially() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(1.8, 100), clock.now);
    assert!(a.next_action(clock.now).action.is_some());
    a.on_outcome(Outcome::UpscaleRefused, clock.now);
    assert_eq!(a.next_action(clock.now).action, None);
    assert!(after(&mut a, &mut clock, 2, 1.8).is_some());
    a.on_outcome(Outcome::UpscaleRefused, clock.now);
    clock.advance(2);
    assert_eq!(
        a.next_action(clock.now).action,
        None,
        "second refusal waits 4 s"
    );
    assert!(after(&mut a, &mut clock, 2, 1.8).is_some());
    assert_eq!(a.current(), c("1"));
}

#[test]
fn denied_downscale_sets_a_floor_until_the_retry_interval() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(3.5, 100), clock.now);
    finish(&mut a, &clock);
    assert_eq!(
        after(&mut a, &mut clock, 61, 0.0),
        Some(Action::Downscale { target: c("3") })
    );
    a.on_outcome(Outcome::DownscaleDenied { target: c("3") }, clock.now);
    // Floor 3 + 1 = 4: no further downscale until the retry interval passes.
    clock.advance(30);
    a.on_metrics(metrics(0.0, 100), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, None);
    assert!(decision.reason.contains("denied"), "{}", decision.reason);
    assert_eq!(
        after(&mut a, &mut clock, 31, 0.0),
        Some(Action::Downscale { target: c("3") })
    );
}

#[test]
fn monitor_request_means_current_plus_one_cu_at_once_and_for_a_while() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(0.0, 100), clock.now);
    a.on_upscale_request(clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("2") })
    );
    a.on_outcome(Outcome::Upscaled { to: c("2") }, clock.now);
    // The floor was current + 1 at request time: it holds 2, even past the cooldown.
    assert_eq!(after(&mut a, &mut clock, 29, 0.0), None);
    // A request overrides a backoff.
    a.on_upscale_request(clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("3") })
    );
}

#[test]
fn missing_or_stale_metrics_never_shrink_the_vm() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(2.7, 100), clock.now);
    finish(&mut a, &clock);
    assert_eq!(a.current(), c("3"));
    clock.advance(120);
    // The last metrics are two minutes old.
    let decision = a.next_action(clock.now);
    assert_eq!(decision.goal, c("3"));
    assert_eq!(decision.action, None);
    assert!(decision.reason.contains("no fresh metrics"));
    // Never any metrics at all.
    let mut fresh = agent(&clock);
    assert_eq!(fresh.next_action(clock.now).action, None);
}

#[test]
fn bounds_change_while_running_moves_the_vm_into_them() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(0.0, 100), clock.now);
    a.set_bounds(c("2"), c("3"));
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("2") })
    );
    a.on_outcome(Outcome::Upscaled { to: c("2") }, clock.now);
    a.on_metrics(metrics(9.0, 100), clock.now);
    finish(&mut a, &clock);
    assert_eq!(a.current(), c("3"));
    clock.advance(61);
    a.set_bounds(c("1"), c("2"));
    a.on_metrics(metrics(9.0, 100), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Downscale { target: c("2") })
    );
}

#[test]
fn one_action_at_a_time_and_failures_back_off() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(metrics(1.8, 100), clock.now);
    assert!(a.next_action(clock.now).action.is_some());
    assert_eq!(
        a.next_action(clock.now).action,
        None,
        "an action is in flight"
    );
    a.on_outcome(Outcome::Failed, clock.now);
    assert_eq!(a.next_action(clock.now).action, None);
    assert!(after(&mut a, &mut clock, 2, 1.8).is_some());
}

#[test]
fn an_operators_resize_counts_as_a_change() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    clock.advance(100);
    a.set_current(c("3"), clock.now);
    a.on_metrics(metrics(0.0, 100), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        None,
        "cooldown starts at the operator's resize"
    );
    assert_eq!(
        after(&mut a, &mut clock, 60, 0.0),
        Some(Action::Downscale { target: c("2") })
    );
}

#[test]
fn config_validation() {
    assert!(AgentConfig::default().validate().is_ok());
    let bad = AgentConfig {
        memory_target: 1.5,
        ..AgentConfig::default()
    };
    assert!(bad.validate().unwrap_err().contains("memory_target"));
    let bad = AgentConfig {
        downscale_window_secs: MAX_SECS + 1,
        ..AgentConfig::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .contains("downscale_window_secs"));
}
