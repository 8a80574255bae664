//! The Postgres image under test: building it, specs with real password hashes, and
//! clients (psql, pgbench) that reach a guest's Postgres over its tap network from a
//! namespace of their own.

use crate::{bin, repo_root, TestHost};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Where Debian's Postgres client programs are.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

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
        self.command("pgbench")
            .args(["-n", "-P", "1", "-c", &clients.to_string(), "-j", "1"])
            .args(["-T", &secs.to_string()])
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
