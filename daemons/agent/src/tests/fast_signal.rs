//! The fast CPU signal of protocol-2 guests, and the window it is held over.

use super::*;

/// How often vmhostd takes the guest's metrics by default.
const POLL: u64 = 5;

/// load1 as four busy tasks leave it after a while.
const LOAD1_AT_STOP: f64 = 3.6;

/// `threads` tasks that each want a CPU, as a protocol-2 guest of `vcpus` shows them.
fn busy(threads: f64, vcpus: u32, load1: f64) -> Metrics {
    let util = (threads / f64::from(vcpus)).min(1.0);
    // Some task waits whenever there are more of them than vCPUs.
    let pressure = if threads > f64::from(vcpus) {
        100.0
    } else {
        0.0
    };
    with_cpu(load1, util, pressure, vcpus)
}

/// vmhostd's loop for `secs`: every `POLL` s a sample, taken from the seconds since the
/// start and the vCPUs the VM has, then a decision carried out in full. Returns the
/// actions, each with its second.
fn poll(
    a: &mut Agent,
    clock: &mut FakeClock,
    secs: u64,
    mut sample: impl FnMut(u64, u32) -> Metrics,
) -> Vec<(u64, Action)> {
    let mut actions = Vec::new();
    for t in (POLL..=secs).step_by(POLL as usize) {
        clock.advance(POLL);
        let vcpus = a.current().quarters().div_ceil(ONE_CU);
        a.on_metrics(sample(t, vcpus), clock.now);
        actions.extend(finish(a, clock).map(|action| (t, action)));
    }
    actions
}

/// load1 `from` the given value, `t` s later, as the kernel decays it once idle.
fn decayed(from: f64, t: u64) -> f64 {
    from * (-(t as f64) / 60.0).exp()
}

fn down(to: &str) -> Action {
    Action::Downscale { target: c(to) }
}

/// An agent whose guest has been idle for two windows, then ran four busy tasks for a
/// minute and now holds 4 CU.
fn after_a_minute_of_load(clock: &mut FakeClock) -> Agent {
    let mut a = agent(clock);
    assert_eq!(poll(&mut a, clock, 120, |_, v| busy(0.0, v, 0.0)), []);
    poll(&mut a, clock, 60, |_, v| busy(4.0, v, LOAD1_AT_STOP));
    assert_eq!(a.current(), c("4"));
    a
}

#[test]
fn a_load_step_grows_a_settled_guest_within_seconds() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    assert_eq!(poll(&mut a, &mut clock, 120, |_, v| busy(0.0, v, 0.0)), []);
    // load1 has not caught up. 1 vCPU, all busy, tasks waiting: 1 × 2 / 0.9 = 2.22 CU;
    // then 3 vCPUs the same: 6.67, held at the maximum.
    let actions = poll(&mut a, &mut clock, 10, |_, v| busy(4.0, v, 0.1));
    assert_eq!(
        actions,
        [
            (5, Action::Upscale { target: c("2.25") }),
            (10, Action::Upscale { target: c("4") })
        ]
    );
    let reason = a.goal(clock.now).reason;
    assert!(
        reason.contains("driven by fast CPU held over 60 s"),
        "{reason}"
    );
}

#[test]
fn after_the_load_stops_the_vm_goes_straight_to_min_one_window_later() {
    let mut clock = FakeClock::new();
    let mut a = after_a_minute_of_load(&mut clock);
    // The load stops: the fast signal falls at once, load1 over minutes.
    let idle = |t, v| busy(0.0, v, decayed(LOAD1_AT_STOP, t));
    assert_eq!(poll(&mut a, &mut clock, 60, idle), [], "a window holds");
    clock.advance(POLL);
    // load1 alone would still hold 1.5 CU, and take the VM there a CU a cooldown.
    a.on_metrics(busy(0.0, 4, decayed(LOAD1_AT_STOP, 65)), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, Some(down("1")), "{}", decision.reason);
    assert!(
        decision.reason.contains(
            "fast CPU held over 60 s → 0.00 CU, load1 1.22 → 1.35 CU (not used), \
             memory used 100 MiB → 0.13 CU; driven by fast CPU held over 60 s"
        ) && decision
            .reason
            .ends_with("more than 1 CU at once, as nothing in the window wanted more"),
        "{}",
        decision.reason
    );
}

#[test]
fn steps_down_the_window_drives_need_no_cooldown_between_them() {
    let mut clock = FakeClock::new();
    let mut a = after_a_minute_of_load(&mut clock);
    // Half the load for half a minute, then none: the window lets go of each in turn.
    assert_eq!(poll(&mut a, &mut clock, 30, |_, v| busy(2.0, v, 0.0)), []);
    assert_eq!(
        poll(&mut a, &mut clock, 100, |_, v| busy(0.0, v, 0.0)),
        [(35, down("2.25")), (65, down("1"))]
    );
}

#[test]
fn a_sample_taken_as_the_vm_shrank_neither_grows_it_nor_holds_it() {
    let mut clock = FakeClock::new();
    let mut a = after_a_minute_of_load(&mut clock);
    assert_eq!(poll(&mut a, &mut clock, 60, |_, v| busy(0.0, v, 0.0)), []);
    clock.advance(POLL);
    a.on_metrics(busy(0.0, 4, 0.0), clock.now);
    assert_eq!(a.next_action(clock.now).action, Some(down("1")));
    // The shrink takes 13 s, and the guest is busy moving pages off the memory it loses.
    clock.advance(13);
    a.on_outcome(Outcome::Downscaled { to: c("1") }, clock.now);
    a.on_metrics(busy(2.0, 1, 0.0), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, None, "{}", decision.reason);
    assert!(
        decision
            .reason
            .contains("→ 2.22 CU (fast, ignored: taken as the VM shrank)"),
        "{}",
        decision.reason
    );
    // Load still there once the shrink has settled is the workload's; the window ran on
    // through the shrink.
    clock.advance(POLL);
    a.on_metrics(busy(2.0, 1, 0.0), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, Some(Action::Upscale { target: c("2.25") }));
    assert!(
        decision
            .reason
            .contains("driven by fast CPU held over 60 s"),
        "{}",
        decision.reason
    );
}

#[test]
fn a_lull_shorter_than_the_window_never_shrinks_the_vm() {
    let mut clock = FakeClock::new();
    let mut a = after_a_minute_of_load(&mut clock);
    // Past the cooldown, load1 falls below 4 CU within seconds of the lull.
    let lull = |t, v| busy(0.0, v, decayed(LOAD1_AT_STOP, t));
    assert_eq!(poll(&mut a, &mut clock, 55, lull), []);
    assert_eq!(poll(&mut a, &mut clock, 30, |_, v| busy(4.0, v, 1.0)), []);
    assert_eq!(a.current(), c("4"));
}

#[test]
fn a_protocol_1_guest_still_steps_down_on_load1() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    assert_eq!(poll(&mut a, &mut clock, 120, |_, _| metrics(0.0, 100)), []);
    poll(&mut a, &mut clock, 60, |_, _| metrics(LOAD1_AT_STOP, 100));
    assert_eq!(a.current(), c("4"));
    // One CU a cooldown at most; a window after the load, load1 still wants 1.5 CU.
    let stopped = |t, _| metrics(decayed(LOAD1_AT_STOP, t), 100);
    assert_eq!(
        poll(&mut a, &mut clock, 240, stopped),
        [
            (5, down("3.75")),
            (65, down("2.75")),
            (125, down("1.75")),
            (185, down("1"))
        ]
    );
}

#[test]
fn a_denied_downscale_still_sets_a_floor() {
    let mut clock = FakeClock::new();
    let mut a = after_a_minute_of_load(&mut clock);
    assert_eq!(poll(&mut a, &mut clock, 60, |_, v| busy(0.0, v, 0.0)), []);
    clock.advance(POLL);
    a.on_metrics(busy(0.0, 4, 0.0), clock.now);
    // The monitor is asked first, each time for the floor its last answer left.
    for denied in ["1", "2", "3"] {
        assert_eq!(a.next_action(clock.now).action, Some(down(denied)));
        a.on_outcome(Outcome::DownscaleDenied { target: c(denied) }, clock.now);
    }
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, None);
    assert!(decision.reason.contains("denied"), "{}", decision.reason);
    let idle = |_, v| busy(0.0, v, 0.0);
    assert_eq!(poll(&mut a, &mut clock, 55, idle), []);
    assert_eq!(poll(&mut a, &mut clock, POLL, idle), [(POLL, down("1"))]);
}

#[test]
fn memory_held_in_the_window_keeps_a_downscale_to_one_cu() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    let using = |mib: u64| {
        move |_, v| Metrics {
            mem_used_bytes: mib << 20,
            ..busy(0.0, v, 0.0)
        }
    };
    // 2970 MiB / 0.75 = 3.87 CU.
    assert_eq!(
        poll(&mut a, &mut clock, 120, using(2970)),
        [(5, Action::Upscale { target: c("4") })]
    );
    assert_eq!(
        poll(&mut a, &mut clock, 130, using(100)),
        [(5, down("3")), (65, down("1"))],
        "one CU while the window still holds the memory, then straight"
    );
}

#[test]
fn a_nan_from_the_guest_hides_no_load_of_the_window() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    assert_eq!(poll(&mut a, &mut clock, 120, |_, v| busy(0.0, v, 0.0)), []);
    a.on_metrics(with_cpu(0.0, f64::NAN, f64::NAN, 1), clock.now);
    assert_eq!(finish(&mut a, &clock), None);
    assert_eq!(
        poll(&mut a, &mut clock, POLL, |_, v| busy(4.0, v, 0.0)),
        [(POLL, Action::Upscale { target: c("2.25") })]
    );
}

#[test]
fn a_load_step_upscales_at_once_on_the_fast_signal() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    // All of its one vCPU busy, tasks waiting 80% of the time; load1 has not caught up.
    a.on_metrics(with_cpu(0.1, 1.0, 80.0, 1), clock.now);
    let decision = a.next_action(clock.now);
    // 1 busy vCPU × 1.8 / 0.9 = 2 CU.
    assert_eq!(decision.action, Some(Action::Upscale { target: c("2") }));
    assert!(
        decision.reason.starts_with(
            "cpu util 1.00 over 1 vCPU, pressure 80% → 2.00 CU (fast), load1 0.10 → 0.11 CU (slow)"
        ) && decision
            .reason
            .ends_with("driven by cpu util (fast); fast CPU not yet seen over 60 s"),
        "{}",
        decision.reason
    );
    a.on_outcome(Outcome::Upscaled { to: c("2") }, clock.now);
    // Still saturated a few seconds later: no cooldown holds an upscale back.
    clock.advance(3);
    a.on_metrics(with_cpu(0.3, 1.0, 50.0, 2), clock.now);
    // 2 × 1.5 / 0.9 = 3.33, rounded up to a quarter.
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("3.5") })
    );
}

#[test]
fn until_a_window_is_covered_load1_still_decides() {
    let mut clock = FakeClock::new();
    let mut a = agent(&clock);
    a.on_metrics(with_cpu(3.5, 1.0, 0.0, 1), clock.now);
    finish(&mut a, &clock);
    assert_eq!(a.current(), c("4"));
    // No sample for a minute: the window starts again, and may have missed a burst.
    clock.advance(60);
    // Ten idle seconds past the cooldown: load1 is still high, and load1 decides.
    for _ in 0..10 {
        clock.advance(1);
        a.on_metrics(with_cpu(3.5, 0.0, 0.0, 4), clock.now);
        let decision = a.next_action(clock.now);
        assert_eq!(decision.action, None, "{}", decision.reason);
        assert!(
            decision
                .reason
                .contains("driven by load1 (slow); fast CPU not yet seen"),
            "{}",
            decision.reason
        );
    }
    // Once load1 falls, the VM steps down as it would without the fast signal...
    clock.advance(1);
    a.on_metrics(with_cpu(0.0, 0.0, 0.0, 4), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Downscale { target: c("3") })
    );
    a.on_outcome(Outcome::Downscaled { to: c("3") }, clock.now);
    // ...but no further than what is busy right now: 0.8 × 3 / 0.9 = 2.67 → 2.75 CU.
    clock.advance(61);
    a.on_metrics(with_cpu(0.0, 0.8, 0.0, 3), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Downscale { target: c("2.75") })
    );
}

#[test]
fn without_the_fast_signal_the_goal_is_neons() {
    let clock = FakeClock::new();
    let mut a = agent(&clock);
    // A protocol-1 guest under the same load step: load1 alone does not move yet.
    a.on_metrics(metrics(0.1, 100), clock.now);
    let decision = a.next_action(clock.now);
    assert_eq!(decision.action, None);
    assert_eq!(
        decision.reason,
        "load1 0.10 → 0.11 CU, memory used 100 MiB → 0.13 CU; clamped to [1, 4]"
    );
    // An idle fast signal changes nothing either.
    a.on_metrics(with_cpu(1.8, 0.0, 0.0, 1), clock.now);
    assert_eq!(
        a.next_action(clock.now).action,
        Some(Action::Upscale { target: c("2") })
    );
}
