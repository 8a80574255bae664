//! The Postgres image under test: building it, specs with real password hashes, a lab of
//! hosts that run it, and clients (psql, pgbench) that reach a guest's Postgres over its
//! tap network from a namespace of their own.

use crate::netns::{start_live_fleet, Lab};
use crate::{bin, repo_root, Limits, TestHost};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's Postgres client programs are.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The compute's address on a lab's segment, and its role's password.
pub const GUEST_IP: &str = "10.88.0.60";
pub const PASSWORD: &str = "correct horse battery staple";
/// First boot: systemd, initdb and the first start of Postgres, all under emulation.
pub const FIRST_BOOT: Duration = Duration::from_secs(420);

/// Builds (or finds in the cache) the Postgres image with this workspace's vm-monitor and
/// computectl; returns its directory.
pub fn postgres_image() -> PathBuf {
    let output = Command::new(repo_root().join("images/build-postgres-image"))
        .arg("--vm-monitor")
        .arg(bin("vm-monitor"))
        .arg("--computectl")
        .arg(bin("computectl"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run images/build-postgres-image");
    assert!(
        output.status.success(),
        "images/build-postgres-image failed; it needs mmdebstrap, the Debian mirror and linux-image-cloud-amd64 (scripts/setup)"
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// The `[images.postgres]` table of a host config, with the guest at `guest_ip` (/24).
pub fn postgres_image_config(guest_ip: &str) -> String {
    let image = postgres_image();
    format!(
        "[images.postgres]\nkernel = \"{dir}/vmlinuz\"\ninitrd = \"{dir}/initrd.img\"\nroot = \"{dir}/root.img\"\n\
         cmdline = \"{cmdline} vmhost.ip={guest_ip}/24\"\n",
        dir = image.display(),
        cmdline = vmm::cmdline::DEFAULT_KERNEL_CMDLINE,
    )
}

/// The verifier of `password` that `vmctl hash-password` prints: what a spec carries.
pub fn password_hash(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(bin("vmctl"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_success("vmctl hash-password", &output);
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// A Postgres client in the namespace `netns`, logging in as `user` with `password`.
#[derive(Clone)]
pub struct PgClient {
    pub netns: String,
    pub host: String,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl PgClient {
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns])
            .arg(format!("{PG_BIN}/{program}"))
            .env("PGHOST", &self.host)
            .env("PGUSER", &self.user)
            .env("PGPASSWORD", &self.password)
            .env("PGDATABASE", &self.database)
            .env("PGCONNECT_TIMEOUT", "10");
        command
    }

    /// Runs `sql` with psql; its unaligned output, or psql's error.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let output = self
            .command("psql")
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    }

    pub fn query_ok(&self, sql: &str) -> String {
        self.query(sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} failed: {e}"))
    }

    /// Waits until Postgres accepts this client's connections; panics with the last error
    /// and the end of the guest's console (`console`) if it does not in time.
    pub fn wait_ready(&self, timeout: Duration, console: &Path) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.query("select 1") {
                Ok(_) => return,
                Err(error) if std::time::Instant::now() > deadline => {
                    let text = std::fs::read_to_string(console).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(60).collect();
                    panic!(
                        "Postgres at {} refuses connections after {timeout:?}: {error}\nthe guest's console ends:\n{}",
                        self.host,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// `pgbench -i` at `scale`.
    pub fn pgbench_init(&self, scale: u32) {
        let output = self
            .command("pgbench")
            .args(["-i", "-q", "-s", &scale.to_string()])
            .output()
            .unwrap();
        assert_success("pgbench -i", &output);
    }

    /// Starts pgbench with `clients` connections for `secs` seconds, reporting progress
    /// every second.
    pub fn pgbench(&self, clients: u32, secs: u32) -> Child {
        self.pgbench_with(clients, secs, &[])
    }

    /// Like `pgbench`, also logging every transaction to files named `prefix.*`, which
    /// `pgbench_log` reads once it has finished.
    pub fn pgbench_logged(&self, clients: u32, secs: u32, prefix: &Path) -> Child {
        let prefix = format!("--log-prefix={}", prefix.display());
        self.pgbench_with(clients, secs, &["-l", &prefix])
    }

    fn pgbench_with(&self, clients: u32, secs: u32, extra: &[&str]) -> Child {
        self.command("pgbench")
            .args(["-n", "-P", "1", "-c", &clients.to_string(), "-j", "1"])
            .args(["-T", &secs.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// An order-independent checksum of the pgbench tables' contents.
    pub fn pgbench_checksum(&self) -> String {
        self.query_ok(
            "select md5(string_agg(t, ',' order by t)) from (\
               select 'a' || aid || ':' || abalance as t from pgbench_accounts \
               union all select 'b' || bid || ':' || bbalance from pgbench_branches \
               union all select 't' || tid || ':' || tbalance from pgbench_tellers \
               union all select 'h' || count(*) from pgbench_history) s",
        )
    }
}

/// What `pgbench` reported at its end.
#[derive(Debug)]
pub struct PgbenchResult {
    pub transactions: u64,
    pub failed: u64,
    pub tps: f64,
    pub output: String,
}

/// Waits for a pgbench run and reads its summary; panics with its output if it failed.
pub fn finish_pgbench(child: Child) -> PgbenchResult {
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "pgbench failed:\n{text}");
    let number_after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    PgbenchResult {
        transactions: number_after("number of transactions actually processed:")
            .unwrap_or_else(|| panic!("no transaction count in:\n{text}"))
            as u64,
        failed: number_after("number of failed transactions:").unwrap_or(0.0) as u64,
        tps: number_after("tps =").unwrap_or(0.0),
        output: text,
    }
}

/// One transaction of a pgbench log: when it ended (µs since the epoch) and how long it
/// took (µs), or None if it failed.
#[derive(Debug, Clone, Copy)]
pub struct LoggedTransaction {
    pub ended_us: u64,
    pub latency_us: Option<u64>,
}

/// The transactions `pgbench_logged` wrote to `prefix.*`. Each line is `client_id
/// transaction_no time script_no time_epoch time_us ...`, `time` being the latency in µs
/// or a word for a failed one.
pub fn pgbench_log(prefix: &Path) -> Vec<LoggedTransaction> {
    let dir = prefix.parent().unwrap();
    let name = format!("{}.", prefix.file_name().unwrap().to_string_lossy());
    let mut transactions = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy();
        if !file.starts_with(&name) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            let (Some(secs), Some(micros)) = (number(4), number(5)) else {
                panic!("{}: not a pgbench log line: {line}", path.display());
            };
            transactions.push(LoggedTransaction {
                ended_us: secs * 1_000_000 + micros,
                latency_us: number(2),
            });
        }
    }
    assert!(
        !transactions.is_empty(),
        "pgbench logged nothing to {}.*",
        prefix.display()
    );
    transactions
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// computectl's state of `vm`, asked through vmctl (and so through the guest), or None
/// while it cannot be reached.
pub fn compute_state(host: &TestHost, vm: &str) -> Option<String> {
    let output = host.vmctl(&["--json", "compute", vm, "status"]);
    if !output.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    status["state"].as_str().map(str::to_string)
}

/// Waits until computectl in `vm` reports `state`.
pub fn wait_compute_state(host: &TestHost, vm: &str, state: &str, timeout: Duration) {
    crate::wait_until(timeout, &format!("compute of {vm} to be {state}"), || {
        compute_state(host, vm).as_deref() == Some(state)
    });
}

fn postgres_hosts(lab: &Lab, pki: &Path, names: &[&str]) -> Vec<TestHost> {
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

/// A lab of fleet hosts (4 vCPUs, 6 GiB each) with the Postgres image, and the good spec
/// in a file. Fields drop in order: the hosts (and their VMs) before the lab's namespaces.
pub struct PostgresLab {
    pub hosts: Vec<TestHost>,
    _pki: tempfile::TempDir,
    pub specs: tempfile::TempDir,
    pub good: String,
    pub lab: Lab,
}

impl PostgresLab {
    pub fn new(names: &[&str]) -> PostgresLab {
        let lab = Lab::new(names.len());
        let pki = tempfile::tempdir().unwrap();
        let hosts = postgres_hosts(&lab, pki.path(), names);
        let specs = tempfile::tempdir().unwrap();
        let good = write_spec(specs.path(), "good.json", &compute_spec(None));
        PostgresLab {
            hosts,
            _pki: pki,
            specs,
            good,
            lab,
        }
    }
}

/// A spec with the role `app` (password `PASSWORD`) owning `appdb`, and `extra_role`.
pub fn compute_spec(extra_role: Option<serde_json::Value>) -> serde_json::Value {
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

pub fn write_spec(dir: &Path, name: &str, spec: &serde_json::Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    path.display().to_string()
}

/// Creates `vm` of the Postgres image on `host` with the spec in `spec_file` and `sizes`
/// (create arguments), and returns a client of it once its compute runs and Postgres lets
/// the client in, from the lab's client namespace.
pub fn create_compute(
    lab: &Lab,
    host: &TestHost,
    vm: &str,
    spec_file: &str,
    sizes: &[&str],
) -> PgClient {
    let mut args = vec![
        "create",
        vm,
        "--image",
        "postgres",
        "--spec",
        spec_file,
        "--disk-gib",
        "2",
    ];
    args.extend(sizes);
    host.vmctl_ok(&args);
    wait_compute_state(host, vm, "running", FIRST_BOOT);
    let client = PgClient {
        netns: lab.client_namespace(),
        host: GUEST_IP.into(),
        user: "app".into(),
        password: PASSWORD.into(),
        database: "appdb".into(),
    };
    client.wait_ready(Duration::from_secs(60), &host.serial_log(vm));
    client
}

/// How long the guest itself takes to show `wanted` vCPUs, polled from its own reports;
/// on a timeout, the agent's decisions say why.
pub fn time_until_cpus(
    host: &TestHost,
    vm: &str,
    wanted: impl Fn(u32) -> bool,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    while !host.guest_view(vm).is_some_and(|v| wanted(v.cpus)) {
        if started.elapsed() > timeout {
            panic!(
                "{vm} reports {:?} after {timeout:?}; the agent's decisions:\n{}",
                host.guest_view(vm),
                host.vmctl_ok(&["events", vm])
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    started.elapsed()
}
