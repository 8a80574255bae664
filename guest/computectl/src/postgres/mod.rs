//! Postgres behind a trait: the real one runs initdb and the postmaster and speaks SQL over
//! the unix socket; the compute's tests use a fake, so they need no Postgres.

mod client;
mod process;

use crate::config::{self, COMPUTE_CONF, HBA_CONF, IDENT_CONF, SOCKET_DIR};
use crate::store::write_atomic;
use anyhow::{bail, Context};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use vmhost_compute_api::ComputeSpec;

pub use client::retune;
use process::{LogTail, PostgresUser};

/// What the compute needs of Postgres.
#[async_trait]
pub trait Postgres: Send + Sync + 'static {
    /// The extensions the image carries.
    fn installed_extensions(&self) -> anyhow::Result<Vec<String>>;
    /// Creates the cluster if PGDATA is empty, and writes computectl's configuration.
    async fn prepare(&self, spec: &ComputeSpec) -> anyhow::Result<()>;
    /// Starts the postmaster in the workload cgroup; the returned [`Exit`] resolves when
    /// it exits.
    async fn start(&self) -> anyhow::Result<Exit>;
    /// Returns once the postmaster accepts connections (and is tuned to the workload's
    /// memory); fails if it exits first or takes too long.
    async fn wait_ready(&self) -> anyhow::Result<()>;
    /// Whether a postmaster started here still runs.
    fn is_running(&self) -> bool;
    /// Makes the running server reread its configuration.
    async fn reload(&self) -> anyhow::Result<()>;
    /// Brings roles, databases and extensions in line with `spec`.
    async fn reconcile(&self, spec: &ComputeSpec) -> anyhow::Result<()>;
    /// A fast shutdown (SIGINT); returns once the postmaster has exited.
    async fn stop(&self) -> anyhow::Result<()>;
    /// Whether a client other than computectl has a query or transaction under way.
    async fn clients_active(&self) -> anyhow::Result<bool>;
}

/// The end of one postmaster: how it exited, once it has.
#[derive(Debug, Clone)]
pub struct Exit(watch::Receiver<Option<String>>);

impl Exit {
    pub fn new(receiver: watch::Receiver<Option<String>>) -> Exit {
        Exit(receiver)
    }

    pub fn has_exited(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Waits for the exit and says how it went.
    pub async fn wait(mut self) -> String {
        match self.0.wait_for(Option::is_some).await {
            Ok(how) => how.clone().unwrap_or_default(),
            Err(_) => "postgres is no longer watched".into(),
        }
    }
}

/// Where Postgres and its surroundings are in the guest.
#[derive(Debug, Clone)]
pub struct Paths {
    pub pgbin: PathBuf,
    pub pgdata: PathBuf,
    pub extension_dir: PathBuf,
    pub cgroup: PathBuf,
}

struct Postmaster {
    pid: nix::unistd::Pid,
    exit: Exit,
    tail: Arc<LogTail>,
}

/// The Postgres of the guest.
pub struct RealPostgres {
    paths: Paths,
    start_timeout: Duration,
    postmaster: Mutex<Option<Postmaster>>,
    /// The compute monitor's connection, kept between polls.
    monitor: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl RealPostgres {
    pub fn new(paths: Paths, start_timeout: Duration) -> RealPostgres {
        RealPostgres {
            paths,
            start_timeout,
            postmaster: Mutex::new(None),
            monitor: tokio::sync::Mutex::new(None),
        }
    }

    fn running(&self) -> Option<(nix::unistd::Pid, Exit, Arc<LogTail>)> {
        let postmaster = self.postmaster.lock().unwrap();
        let p = postmaster.as_ref()?;
        Some((p.pid, p.exit.clone(), p.tail.clone()))
    }

    /// vm-monitor runs `computectl retune` after each resize, the first one maybe before
    /// this server ran: so a server that has just started is tuned to the workload's
    /// limit at once. Failing that, it keeps its settings until the next resize.
    async fn tune_to_workload(&self) {
        let path = self.paths.cgroup.join("memory.max");
        let limit = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().ok(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", path.display());
                return;
            }
        };
        let Some(limit) = limit else {
            tracing::info!("the workload has no memory limit yet: nothing to tune to");
            return;
        };
        match client::retune(limit).await {
            Ok(Some(tuning)) => tracing::info!("tuned postgres to the workload: {tuning}"),
            Ok(None) => {}
            Err(e) => tracing::warn!("{:#}", e.context("cannot tune postgres to the workload")),
        }
    }

    fn write_config(&self, name: &str, text: &str, user: PostgresUser) -> anyhow::Result<()> {
        let path = self.paths.pgdata.join(name);
        write_atomic(&path, text.as_bytes(), 0o600, Some(user.ids()))
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

#[async_trait]
impl Postgres for RealPostgres {
    fn installed_extensions(&self) -> anyhow::Result<Vec<String>> {
        let dir = &self.paths.extension_dir;
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        let mut names = Vec::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            if path.extension().is_some_and(|e| e == "control") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    names.push(stem.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    async fn prepare(&self, spec: &ComputeSpec) -> anyhow::Result<()> {
        let user = PostgresUser::look_up()?;
        process::ensure_dir(Path::new(SOCKET_DIR), 0o2775, user)?;
        let pgdata = &self.paths.pgdata;
        if is_empty_dir(pgdata)? {
            process::ensure_dir(pgdata, 0o700, user)?;
            process::initdb(&self.paths, user).await?;
        }
        self.write_config(COMPUTE_CONF, &config::compute_conf(&spec.settings), user)?;
        self.write_config("pg_hba.conf", HBA_CONF, user)?;
        self.write_config("pg_ident.conf", IDENT_CONF, user)?;
        let main_conf = pgdata.join("postgresql.conf");
        let text = std::fs::read_to_string(&main_conf)
            .with_context(|| format!("cannot read {}", main_conf.display()))?;
        if let Some(included) = config::with_include(&text) {
            self.write_config("postgresql.conf", &included, user)?;
        }
        Ok(())
    }

    async fn start(&self) -> anyhow::Result<Exit> {
        if self.is_running() {
            bail!("postgres is already running");
        }
        let user = PostgresUser::look_up()?;
        process::wait_for_cgroup(&self.paths.cgroup).await?;
        let (pid, exit, tail) = process::spawn_postmaster(&self.paths, user)?;
        *self.postmaster.lock().unwrap() = Some(Postmaster {
            pid,
            exit: exit.clone(),
            tail,
        });
        Ok(exit)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let Some((_, exit, tail)) = self.running() else {
            bail!("postgres was not started");
        };
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        loop {
            if exit.has_exited() {
                bail!("{}", exit.wait().await);
            }
            if client::accepts_connections().await {
                self.tune_to_workload().await;
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "postgres did not accept connections within {:?}; its last output:\n{}",
                    self.start_timeout,
                    tail.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn is_running(&self) -> bool {
        self.running()
            .is_some_and(|(_, exit, _)| !exit.has_exited())
    }

    async fn reload(&self) -> anyhow::Result<()> {
        client::reload().await
    }

    async fn reconcile(&self, spec: &ComputeSpec) -> anyhow::Result<()> {
        client::reconcile(spec).await
    }

    async fn stop(&self) -> anyhow::Result<()> {
        let Some((pid, exit, _)) = self.running() else {
            return Ok(());
        };
        if exit.has_exited() {
            return Ok(());
        }
        match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e).context("cannot ask postgres for a fast shutdown"),
        }
        tracing::info!(%pid, "fast shutdown of postgres");
        let how = exit.wait().await;
        tracing::info!("{how}");
        Ok(())
    }

    async fn clients_active(&self) -> anyhow::Result<bool> {
        let mut monitor = self.monitor.lock().await;
        let client = match monitor.take() {
            Some(client) if !client.is_closed() => client,
            _ => client::connect(crate::reconcile::MAINTENANCE_DB).await?,
        };
        let active = client::clients_active(&client).await?;
        // Kept only after a good poll: a failed one reconnects next time.
        *monitor = Some(client);
        Ok(active)
    }
}

/// initdb runs only on a missing or empty PGDATA: existing data is always kept.
fn is_empty_dir(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}
