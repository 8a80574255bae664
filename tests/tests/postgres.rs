//! Postgres computes on real guests: the Debian image with computectl and vm-monitor, a
//! client in its own namespace reaching Postgres over the VM's tap network, and the VM
//! moving between two hosts while the client works.

use std::time::Duration;
use vmhost_tests::postgres::{
    compute_spec, compute_state, create_compute, finish_pgbench, time_until_cpus,
    wait_compute_state, write_spec, PgClient, PostgresLab, FIRST_BOOT,
};
use vmhost_tests::{process_alive, TestHost, MEMORY_GOAL_ONLY};

/// Two Postgres guests at once would share two cores under emulation: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialized() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn qemu_pid(host: &TestHost, vm: &str) -> i32 {
    let pid = host.show(vm)["pid"]
        .as_i64()
        .expect("a running VM has a QEMU") as i32;
    assert!(process_alive(pid), "QEMU {pid} of {vm} is not running");
    pid
}

/// pgbench's transactions keep the tables consistent with each other: every committed one
/// adds the same delta to an account, a teller and a branch and records it in the history.
fn assert_pgbench_consistent(client: &PgClient) -> u64 {
    let sums = client.query_ok(
        "select (select sum(abalance) from pgbench_accounts) || ' ' || \
                (select sum(tbalance) from pgbench_tellers) || ' ' || \
                (select sum(bbalance) from pgbench_branches) || ' ' || \
                (select coalesce(sum(delta), 0) from pgbench_history)",
    );
    let sums: Vec<&str> = sums.split(' ').collect();
    assert!(
        sums.windows(2).all(|w| w[0] == w[1]),
        "pgbench tables disagree (accounts, tellers, branches, history): {sums:?}"
    );
    client
        .query_ok("select count(*) from pgbench_history")
        .parse()
        .unwrap()
}

#[test]
fn a_postgres_compute_is_configured_keeps_its_data_and_serves_through_a_migration() {
    let _one = serialized();
    let setup = PostgresLab::new(&["a", "b"]);
    let (a, b) = (&setup.hosts[0], &setup.hosts[1]);
    let (lab, specs, good) = (&setup.lab, &setup.specs, &setup.good);

    let (code, error) = a.vmctl_err(&["create", "nodisk", "--image", "postgres"]);
    assert_eq!(code, 2, "{error}");
    assert!(error.contains("--disk-gib"), "{error}");

    let client = create_compute(
        lab,
        a,
        "db1",
        good,
        &[
            "--min-cu",
            "1",
            "--max-cu",
            "2",
            "--cu",
            "2",
            "--no-autoscale",
        ],
    );
    assert_eq!(client.query_ok("select current_user"), "app");
    assert!(client.query("select 1").is_ok());
    let wrong = PgClient {
        password: "not the password".into(),
        ..client.clone()
    };
    assert!(
        wrong.query("select 1").is_err(),
        "a wrong password was accepted"
    );

    // Bad specs: each refused with its reason, the compute Failed, the VM still running.
    let pid = qemu_pid(a, "db1");
    let mut unknown_field = compute_spec(None);
    unknown_field["shared_buffers"] = "1GB".into();
    let mut missing_owner = compute_spec(None);
    missing_owner["databases"] = serde_json::json!([{ "name": "other", "owner": "nobody" }]);
    for (name, bad, reason) in [
        ("unknown-field.json", unknown_field, "shared_buffers"),
        (
            "no-hash.json",
            compute_spec(Some(serde_json::json!({ "name": "reader" }))),
            "reader",
        ),
        ("no-owner.json", missing_owner, "nobody"),
    ] {
        let file = write_spec(specs.path(), name, &bad);
        let (code, error) = a.vmctl_err(&["compute", "db1", "configure", &file]);
        assert_eq!(code, 2, "{name}: {error}");
        assert!(
            error.contains(reason),
            "{name}: the error does not say why: {error}"
        );
        assert_eq!(compute_state(a, "db1").as_deref(), Some("failed"), "{name}");
        assert_eq!(
            qemu_pid(a, "db1"),
            pid,
            "{name}: the VM did not keep running"
        );
    }
    a.vmctl_ok(&["compute", "db1", "configure", good]);
    assert_eq!(compute_state(a, "db1").as_deref(), Some("running"));
    assert_eq!(client.query_ok("select current_user"), "app");

    // A table that must come through every move and restart unchanged.
    client.query_ok(
        "create table kept as select g as id, md5(g::text) as v from generate_series(1, 20000) g",
    );
    let kept = client.query_ok("select md5(string_agg(v, '' order by id)) from kept");
    client.pgbench_init(2);

    // Migration under load: pgbench's connections survive and none of its transactions fail.
    let bench = client.pgbench(4, 60);
    // The move starts once pgbench's transactions are committing, as the database shows.
    vmhost_tests::wait_until(Duration::from_secs(30), "pgbench to commit", || {
        client
            .query("select count(*) from pgbench_history")
            .is_ok_and(|n| n.parse::<u64>().is_ok_and(|n| n >= 20))
    });
    a.vmctl_ok(&["migrate", "db1", "--to", "b"]);
    let result = finish_pgbench(bench);
    assert_eq!(result.failed, 0, "{}", result.output);
    assert!(result.transactions > 0, "{}", result.output);
    let history = assert_pgbench_consistent(&client);
    assert_eq!(
        history, result.transactions,
        "pgbench committed {} transactions but the history holds {history}",
        result.transactions
    );
    assert_eq!(compute_state(b, "db1").as_deref(), Some("running"));
    qemu_pid(b, "db1");
    assert_eq!(
        client.query_ok("select md5(string_agg(v, '' order by id)) from kept"),
        kept
    );

    // A restart keeps the data; computectl comes back from its own copy of the spec.
    b.vmctl_ok(&["stop", "db1"]);
    b.vmctl_ok(&["start", "db1"]);
    wait_compute_state(b, "db1", "running", FIRST_BOOT);
    client.wait_ready(Duration::from_secs(60), &b.serial_log("db1"));
    assert_eq!(
        client.query_ok("select md5(string_agg(v, '' order by id)) from kept"),
        kept
    );
    assert_eq!(assert_pgbench_consistent(&client), history);
    let console = std::fs::read_to_string(b.serial_log("db1")).unwrap();
    let restart = console
        .rsplit("vmhost-guest: ready")
        .next()
        .unwrap_or_default();
    assert!(
        restart.contains("empty -> init"),
        "computectl did not start from its own spec after the restart:\n{restart}"
    );
}

#[test]
fn a_memory_hungry_query_gets_memory_before_the_oom_killer() {
    let _one = serialized();
    let setup = PostgresLab::new(&["a"]);
    let a = &setup.hosts[0];
    let client = create_compute(
        &setup.lab,
        a,
        "db2",
        &setup.good,
        &[
            "--min-cu",
            "1",
            "--max-cu",
            "3",
            MEMORY_GOAL_ONLY[0],
            MEMORY_GOAL_ONLY[1],
        ],
    );
    let postmaster_started = client.query_ok("select pg_postmaster_start_time()");
    let before = a.wait_guest_report("db2");
    assert_eq!(before.cpus, 1, "{before:?}: the VM grew before the query");

    // A hash aggregate over 8 million groups, allowed to keep them all in memory: far more
    // than the workload may hold at 1 CU.
    let groups = client.query_ok(
        "set work_mem = '2GB'; \
         select count(*) from (select g, count(*) from generate_series(1, 8000000) g group by g) s",
    );
    assert_eq!(groups.lines().last(), Some("8000000"), "{groups}");
    let after = a.guest_view("db2").unwrap();
    assert!(
        after.mem_total_kb > before.mem_total_kb,
        "the guest never grew: {before:?} then {after:?}"
    );
    let console = std::fs::read_to_string(a.serial_log("db2")).unwrap();
    assert!(
        !console.contains("Out of memory"),
        "the OOM killer acted:\n{console}"
    );
    assert_eq!(
        client.query_ok("select pg_postmaster_start_time()"),
        postmaster_started,
        "Postgres restarted"
    );
}

#[test]
fn a_pgbench_load_step_grows_the_compute_and_it_shrinks_back_after() {
    let _one = serialized();
    let setup = PostgresLab::new(&["a"]);
    let a = &setup.hosts[0];
    let client = create_compute(
        &setup.lab,
        a,
        "db3",
        &setup.good,
        &[
            "--min-cu",
            "1",
            "--max-cu",
            "4",
            "--agent",
            "downscale_cooldown_secs=15",
        ],
    );
    client.pgbench_init(2);
    // Boot and initdb were load too: start from the minimum, with the shrink to it finished
    // (the guest shows 1 vCPU before its memory has gone).
    time_until_cpus(a, "db3", |cpus| cpus == 1, Duration::from_secs(420));
    vmhost_tests::wait_until(Duration::from_secs(120), "db3 to settle at 1 CU", || {
        a.show("db3")["cu"].as_f64() == Some(1.0)
    });

    let bench = client.pgbench(8, 60);
    let up = time_until_cpus(a, "db3", |cpus| cpus > 1, Duration::from_secs(60));
    let result = finish_pgbench(bench);
    assert_eq!(result.failed, 0, "{}", result.output);
    let peak = a.guest_view("db3").unwrap();
    // The agent lets go of a load one window (downscale_window_secs, 60 s) after it ended;
    // a poll and the resize come on top.
    let down = time_until_cpus(a, "db3", |cpus| cpus == 1, Duration::from_secs(90));
    eprintln!(
        "load step: grew within {:.1} s (to {} vCPU by the end, {:.0} tps), back to 1 vCPU {:.1} s after the load stopped",
        up.as_secs_f64(),
        peak.cpus,
        result.tps,
        down.as_secs_f64()
    );
    let events = a.vmctl_ok(&["events", "db3"]);
    assert!(
        events.contains("(fast)"),
        "no decision names the fast signal:\n{events}"
    );
}
