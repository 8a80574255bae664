use super::*;

const GIB: u64 = 1 << 30;
const MINUTE_MS: u64 = 60_000;

fn host(name: &str, capacity_gib: u64, allocated_gib: u64, watermark: f64) -> HostLoad {
    HostLoad {
        name: name.into(),
        cu_shape: CuShape::default(),
        capacity: Resources {
            vcpus: 64,
            memory_bytes: capacity_gib * GIB,
        },
        allocated: Resources {
            vcpus: 1,
            memory_bytes: allocated_gib * GIB,
        },
        leased: Resources::default(),
        watermark_memory_bytes: (capacity_gib as f64 * watermark * GIB as f64) as u64,
        draining: false,
        images: Default::default(),
    }
}

fn vm(name: &str, gib: u64, busy: f64) -> VmLoad {
    VmLoad {
        name: name.into(),
        size: Resources {
            vcpus: 1,
            memory_bytes: gib * GIB,
        },
        busy,
        moved_at_ms: None,
        movable: true,
        image: None,
    }
}

fn policy() -> Policy {
    Policy {
        hysteresis: 0.1,
        cooldown_ms: 10 * MINUTE_MS,
        idle_below: 0.1,
    }
}

fn moved(plan: &Plan) -> Vec<(&str, &str)> {
    plan.moves
        .iter()
        .map(|m| (m.vm.as_str(), m.to.as_str()))
        .collect()
}

#[test]
fn a_host_below_its_watermark_moves_nothing() {
    let here = host("a", 100, 80, 0.8);
    let vms = [vm("x", 80, 0.0)];
    assert_eq!(
        plan(
            &here,
            &vms,
            &[host("b", 100, 0, 0.8)],
            &policy(),
            0,
            0,
            None
        ),
        None
    );
}

#[test]
fn the_fewest_moves_win_over_several_small_ones() {
    // 90 of 100 GiB with a watermark of 80 and a low mark of 70: 20 GiB must go.
    let here = host("a", 100, 90, 0.8);
    let vms = [
        vm("small-1", 10, 0.0),
        vm("small-2", 10, 0.0),
        vm("big", 24, 0.9),
        vm("rest", 46, 0.9),
    ];
    let plan = plan(
        &here,
        &vms,
        &[host("b", 100, 0, 0.8)],
        &policy(),
        0,
        0,
        None,
    )
    .unwrap();
    assert_eq!(plan.trigger, Trigger::AboveWatermark);
    assert_eq!(moved(&plan), [("big", "b")]);
    assert_eq!(plan.shortfall_bytes, 0);
    assert_eq!(plan.low_mark_memory_bytes, 70 * GIB);
}

#[test]
fn among_equally_few_moves_idle_and_small_vms_go_first() {
    let here = host("a", 100, 90, 0.8);
    let vms = [
        vm("busy-big", 40, 0.9),
        vm("idle-big", 40, 0.0),
        vm("idle-small", 21, 0.05),
    ];
    let plan = plan(
        &here,
        &vms,
        &[host("b", 100, 0, 0.8)],
        &policy(),
        0,
        0,
        None,
    )
    .unwrap();
    assert_eq!(moved(&plan), [("idle-small", "b")]);
}

#[test]
fn among_busy_vms_the_less_busy_goes_first() {
    let here = host("a", 100, 90, 0.8);
    let vms = [vm("hot", 30, 1.0), vm("warm", 30, 0.2)];
    let plan = plan_for(&here, &vms, &[host("b", 100, 0, 0.8)]);
    assert_eq!(moved(&plan), [("warm", "b")]);
}

#[test]
fn a_vm_moved_within_the_cooldown_stays_until_it_ends() {
    let here = host("a", 100, 90, 0.8);
    let mut recent = vm("recent", 30, 0.0);
    recent.moved_at_ms = Some(1_000);
    let vms = [recent, vm("other", 60, 0.9)];
    let peers = [host("b", 100, 0, 0.8)];
    let during = plan(
        &here,
        &vms,
        &peers,
        &policy(),
        1_000 + 9 * MINUTE_MS,
        0,
        None,
    )
    .unwrap();
    assert_eq!(moved(&during), [("other", "b")]);
    let after = plan(
        &here,
        &vms,
        &peers,
        &policy(),
        1_000 + 10 * MINUTE_MS,
        0,
        None,
    )
    .unwrap();
    assert_eq!(moved(&after), [("recent", "b")]);
}

#[test]
fn migrating_vms_and_the_growing_vm_are_never_chosen() {
    let here = host("a", 100, 75, 0.8);
    let mut migrating = vm("migrating", 30, 0.0);
    migrating.movable = false;
    let vms = [migrating, vm("grower", 30, 0.9), vm("quiet", 15, 0.5)];
    // 75 GiB is below the watermark; the grower wants 10 GiB more, past it.
    let plan = plan(
        &here,
        &vms,
        &[host("b", 100, 0, 0.8)],
        &policy(),
        0,
        10 * GIB,
        Some("grower"),
    )
    .unwrap();
    assert_eq!(plan.trigger, Trigger::RefusedUpscale);
    assert_eq!(moved(&plan), [("quiet", "b")]);
    assert_eq!(plan.used_memory_bytes, 85 * GIB);
}

#[test]
fn a_target_never_passes_its_own_low_mark_and_draining_or_other_shapes_take_nothing() {
    let here = host("a", 100, 90, 0.8);
    let vms = [vm("x", 25, 0.0)];
    // b would reach 75 GiB, above its 70 GiB low mark; c drains; d has another CU shape.
    let mut draining = host("c", 100, 0, 0.8);
    draining.draining = true;
    let mut other_shape = host("d", 100, 0, 0.8);
    other_shape.cu_shape.memory_per_cu_bytes = 8 * GIB;
    let peers = [host("b", 100, 50, 0.8), draining, other_shape];
    let plan = plan(&here, &vms, &peers, &policy(), 0, 0, None).unwrap();
    assert!(plan.moves.is_empty(), "{plan:?}");
    assert_eq!(plan.shortfall_bytes, 20 * GIB);
    let roomy = [host("b", 100, 50, 0.8), host("e", 100, 40, 0.8)];
    let plan = plan_for(&here, &vms, &roomy);
    assert_eq!(moved(&plan), [("x", "e")]);
}

fn plan_for(here: &HostLoad, vms: &[VmLoad], peers: &[HostLoad]) -> Plan {
    plan(here, vms, peers, &policy(), 0, 0, None).unwrap()
}

#[test]
fn planned_moves_count_against_their_target_and_spread_out() {
    // 95 of 100: 25 GiB must go, in three VMs of 10; each target has room for one.
    let here = host("a", 100, 95, 0.8);
    let vms = [
        vm("p", 10, 0.0),
        vm("q", 10, 0.0),
        vm("r", 10, 0.0),
        vm("s", 65, 0.9),
    ];
    let peers = [
        host("b", 100, 55, 0.8),
        host("c", 100, 58, 0.8),
        host("d", 100, 59, 0.8),
    ];
    let plan = plan_for(&here, &vms, &peers);
    let mut targets: Vec<&str> = plan.moves.iter().map(|m| m.to.as_str()).collect();
    targets.sort();
    assert_eq!(targets, ["b", "c", "d"], "{plan:?}");
    assert_eq!(plan.shortfall_bytes, 0);
}

#[test]
fn a_move_never_makes_its_target_move_back() {
    let policy = policy();
    let mut hosts = [
        (
            host("a", 100, 90, 0.8),
            vec![vm("x", 20, 0.0), vm("y", 70, 0.9)],
        ),
        (host("b", 100, 50, 0.8), vec![vm("z", 50, 0.0)]),
    ];
    let mut moves = 0;
    for round in 0..10u64 {
        let now = round * 20 * MINUTE_MS;
        for (here, there) in [(0, 1), (1, 0)] {
            let peer = hosts[there].0.clone();
            let Some(plan) = plan(
                &hosts[here].0,
                &hosts[here].1,
                &[peer],
                &policy,
                now,
                0,
                None,
            ) else {
                continue;
            };
            for step in &plan.moves {
                let index = hosts[here]
                    .1
                    .iter()
                    .position(|v| v.name == step.vm)
                    .unwrap();
                let mut vm = hosts[here].1.remove(index);
                hosts[here].0.allocated.memory_bytes -= vm.size.memory_bytes;
                hosts[there].0.allocated.memory_bytes += vm.size.memory_bytes;
                vm.moved_at_ms = Some(now);
                hosts[there].1.push(vm);
                moves += 1;
            }
        }
    }
    assert_eq!(moves, 1);
    assert_eq!(hosts[0].0.allocated.memory_bytes, 70 * GIB);
    assert_eq!(hosts[1].0.allocated.memory_bytes, 70 * GIB);
    assert!(hosts[1].1.iter().any(|v| v.name == "x"));
}

#[test]
fn the_fewest_moves_can_cover_more_than_the_largest_vm() {
    assert_eq!(fewest_to_cover(&[], 0), Some(0));
    let vms = [vm("a", 5, 0.0), vm("b", 3, 0.0), vm("c", 4, 0.0)];
    let refs: Vec<&VmLoad> = vms.iter().collect();
    assert_eq!(fewest_to_cover(&refs, 8 * GIB), Some(2));
    assert_eq!(fewest_to_cover(&refs, 10 * GIB), Some(3));
    assert_eq!(fewest_to_cover(&refs, 13 * GIB), None);
}

#[test]
fn a_vm_moves_only_to_a_host_with_its_image_under_the_same_id() {
    let here = host("a", 100, 90, 0.8);
    let mut db = vm("db", 25, 0.0);
    db.image = Some(ImageNeed {
        name: "postgres".into(),
        id: Some("v2".into()),
    });
    let with = |name: &str, images: &[(&str, &str)]| {
        let mut peer = host(name, 100, 0, 0.8);
        peer.images = images
            .iter()
            .map(|(n, id)| (n.to_string(), id.to_string()))
            .collect();
        peer
    };
    // b lacks the image, c has another build of it: neither can boot the VM.
    let peers = [with("b", &[("test", "")]), with("c", &[("postgres", "v1")])];
    let plan = plan_for(&here, std::slice::from_ref(&db), &peers);
    assert!(plan.moves.is_empty(), "{plan:?}");
    // d has it; e publishes no images, so it is left to judge for itself.
    let mut fuller = with("e", &[]);
    fuller.allocated.memory_bytes = 30 * GIB;
    let peers = [
        with("b", &[("test", "")]),
        with("d", &[("postgres", "v2")]),
        fuller,
    ];
    assert_eq!(
        moved(&plan_for(&here, &[db.clone()], &peers)),
        [("db", "d")]
    );
    let peers = [with("b", &[("test", "")]), with("e", &[])];
    assert_eq!(moved(&plan_for(&here, &[db], &peers)), [("db", "e")]);
}
