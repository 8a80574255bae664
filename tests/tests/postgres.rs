//! Postgres computes on real guests: the Debian image with computectl and vm-monitor, a
//! client in its own namespace reaching Postgres over the VM's tap network, and the VM
//! moving between two hosts while the client works.

use std::path::Path;
use std::time::Duration;
use vmhost_tests::netns::{start_live_fleet, Lab};
use vmhost_tests::postgres::{
    compute_state, finish_pgbench, password_hash, postgres_image_config, wait_compute_state,
    PgClient,
};
use vmhost_tests::{process_alive, Limits, TestHost};

const GUEST_IP: &str = "10.88.0.60";
const PASSWORD: &str = "correct horse battery staple";
/// First boot: systemd, initdb and the first start of Postgres, all under emulation.
const FIRST_BOOT: Duration = Duration::from_secs(420);

/// Two Postgres guests at once would share two cores under emulation: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialized() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn hosts(lab: &Lab, pki: &Path, names: &[&str]) -> Vec<TestHost> {
    start_live_fleet(
        lab,
        pki,
        names,
        Limits {
            vcpus: 4,
            memory_mib: 6144,
        },
        "gossip_interval_ms = 200\n",
        &format!(
            "[network]\nmode = \"tap\"\nbridge = \"br0\"\n{}",
            postgres_image_config(GUEST_IP)
        ),
    )
}

fn spec(extra_role: Option<serde_json::Value>) -> serde_json::Value {
    let mut roles = vec![serde_json::json!({
        "name": "app",
        "password_hash": password_hash(PASSWORD),
    })];
    roles.extend(extra_role);
    serde_json::json!({
        "format_version": 1,
        "roles": roles,
        "databases": [{ "name": "appdb", "owner": "app" }],
        "settings": { "max_connections": "40" },
        "extensions": [],
    })
}

fn write_spec(dir: &Path, name: &str, spec: &serde_json::Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    path.display().to_string()
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
    let lab = Lab::new(2);
    let pki = tempfile::tempdir().unwrap();
    let hosts = hosts(&lab, pki.path(), &["a", "b"]);
    let (a, b) = (&hosts[0], &hosts[1]);
    let specs = tempfile::tempdir().unwrap();
    let good = write_spec(specs.path(), "good.json", &spec(None));

    let (code, error) = a.vmctl_err(&["create", "nodisk", "--image", "postgres"]);
    assert_eq!(code, 2, "{error}");
    assert!(error.contains("--disk-gib"), "{error}");

    a.vmctl_ok(&[
        "create",
        "db1",
        "--image",
        "postgres",
        "--spec",
        &good,
        "--disk-gib",
        "2",
        "--min-cu",
        "1",
        "--max-cu",
        "2",
        "--cu",
        "2",
        "--no-autoscale",
    ]);
    wait_compute_state(a, "db1", "running", FIRST_BOOT);
    let client = PgClient {
        netns: lab.client_namespace(),
        host: GUEST_IP.into(),
        user: "app".into(),
        password: PASSWORD.into(),
        database: "appdb".into(),
    };
    client.wait_ready(Duration::from_secs(60), &a.serial_log("db1"));
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
    let mut unknown_field = spec(None);
    unknown_field["shared_buffers"] = "1GB".into();
    let mut missing_owner = spec(None);
    missing_owner["databases"] = serde_json::json!([{ "name": "other", "owner": "nobody" }]);
    for (name, bad, reason) in [
        ("unknown-field.json", unknown_field, "shared_buffers"),
        (
            "no-hash.json",
            spec(Some(serde_json::json!({ "name": "reader" }))),
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
    a.vmctl_ok(&["compute", "db1", "configure", &good]);
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
    std::thread::sleep(Duration::from_secs(10));
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
    let lab = Lab::new(1);
    let pki = tempfile::tempdir().unwrap();
    let hosts = hosts(&lab, pki.path(), &["a"]);
    let a = &hosts[0];
    let specs = tempfile::tempdir().unwrap();
    let good = write_spec(specs.path(), "good.json", &spec(None));
    a.vmctl_ok(&[
        "create",
        "db2",
        "--image",
        "postgres",
        "--spec",
        &good,
        "--disk-gib",
        "2",
        "--min-cu",
        "1",
        "--max-cu",
        "3",
    ]);
    wait_compute_state(a, "db2", "running", FIRST_BOOT);
    let client = PgClient {
        netns: lab.client_namespace(),
        host: GUEST_IP.into(),
        user: "app".into(),
        password: PASSWORD.into(),
        database: "appdb".into(),
    };
    client.wait_ready(Duration::from_secs(60), &a.serial_log("db2"));
    let postmaster_started = client.query_ok("select pg_postmaster_start_time()");
    let before = a.wait_guest_report("db2");

    // A hash aggregate over 8 million groups, allowed to keep them all in memory: far more
    // than the workload may hold at 1 CU.
    let groups = client.query_ok(
        "set work_mem = '2GB'; \
         select count(*) from (select g, count(*) from generate_series(1, 8000000) g group by g) s",
    );
    assert_eq!(groups, "8000000");
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
