//! The compute: the state machine, driven by requests (configure, terminate), by the
//! spec found at start-up, and by the postmaster's exit. Postgres is behind the
//! [`Postgres`] trait, so all of it runs in tests without one.
//!
//! The state machine also serialises the work: a configure holds `ConfigurationPending`
//! or `Configuration` until it is done, and nothing may leave those but the configure.

use crate::postgres::{Exit, Postgres};
use crate::state::{Refused, StateHolder};
use crate::store;
use anyhow::{anyhow, Context};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vmhost_compute_api::{parse, ComputeSpec, ComputeState, ComputeStatus, SpecErrors};
use ComputeState::*;

/// Why a request could not be done; `http` maps each kind to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("the compute is {state}; it cannot {action} now")]
    Conflict {
        state: ComputeState,
        action: &'static str,
    },
    #[error("invalid compute spec")]
    InvalidSpec(SpecErrors),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

pub struct Compute {
    state: Mutex<StateHolder>,
    postgres: Arc<dyn Postgres>,
    spec_path: PathBuf,
    /// Set once computectl itself is stopping: the postmaster's exit is then expected.
    shutting_down: AtomicBool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Compute {
    pub fn new(postgres: Arc<dyn Postgres>, spec_path: PathBuf, build_tag: &str) -> Arc<Compute> {
        Arc::new(Compute {
            state: Mutex::new(StateHolder::new(build_tag, now_ms())),
            postgres,
            spec_path,
            shutting_down: AtomicBool::new(false),
        })
    }

    pub fn status(&self) -> ComputeStatus {
        self.state.lock().unwrap().status()
    }

    pub fn spec(&self) -> Option<ComputeSpec> {
        self.state.lock().unwrap().spec().cloned()
    }

    fn go_to(&self, next: ComputeState, reason: &str) -> Result<(), Refused> {
        self.state.lock().unwrap().go_to(next, reason)
    }

    /// Logs `error` with its causes, fails the compute with it, and returns it.
    fn fail(&self, error: anyhow::Error) -> ComputeError {
        if let Err(refused) = self.go_to(Failed, &format!("{error:#}")) {
            tracing::error!("{:#} ({refused})", error);
        }
        ComputeError::Failed(error)
    }

    /// `POST /configure`. Runs to its end even if the client goes away: cut short, it
    /// would leave the compute in `Configuration` for good.
    pub async fn configure(self: &Arc<Self>, body: Vec<u8>) -> Result<ComputeStatus, ComputeError> {
        let compute = self.clone();
        tokio::spawn(async move { compute.run_configure(&body).await })
            .await
            .unwrap_or_else(|e| Err(ComputeError::Failed(anyhow!("the configure stopped: {e}"))))
    }

    async fn run_configure(self: &Arc<Self>, body: &[u8]) -> Result<ComputeStatus, ComputeError> {
        self.go_to(ConfigurationPending, "a configure request arrived")
            .map_err(|r| ComputeError::Conflict {
                state: r.from,
                action: "be configured",
            })?;
        self.go_to(Configuration, "applying the spec")
            .map_err(|r| self.fail(r.into()))?;
        let installed = self
            .postgres
            .installed_extensions()
            .context("cannot list the extensions of the image")
            .map_err(|e| self.fail(e))?;
        let spec = match parse(body).and_then(|spec| spec.validate(&installed).map(|()| spec)) {
            Ok(spec) => spec,
            Err(errors) => {
                let reason = format!(
                    "invalid compute spec: {}",
                    errors.to_string().replace('\n', "; ")
                );
                let _ = self.go_to(Failed, &reason);
                return Err(ComputeError::InvalidSpec(errors));
            }
        };
        store::save_spec(&self.spec_path, &spec).map_err(|e| self.fail(e))?;
        self.state.lock().unwrap().set_spec(spec.clone());
        self.apply_and_finish(&spec).await
    }

    /// Start-up with a spec found on disk: `Empty → Init → Running | Failed`.
    pub async fn init(self: Arc<Self>, source: PathBuf) {
        if let Err(refused) = self.go_to(Init, &format!("starting from {}", source.display())) {
            tracing::error!("cannot start from {}: {refused}", source.display());
            return;
        }
        let spec = match self.read_spec(&source) {
            Ok(spec) => spec,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        self.state.lock().unwrap().set_spec(spec.clone());
        // A failure is logged and kept in the status; nobody waits for this one.
        let _ = self.apply_and_finish(&spec).await;
    }

    fn read_spec(&self, source: &Path) -> anyhow::Result<ComputeSpec> {
        let bytes = std::fs::read(source)
            .with_context(|| format!("cannot read the spec {}", source.display()))?;
        let installed = self
            .postgres
            .installed_extensions()
            .context("cannot list the extensions of the image")?;
        let spec = parse(&bytes).and_then(|spec| spec.validate(&installed).map(|()| spec));
        spec.with_context(|| format!("the spec {} is invalid", source.display()))
    }

    async fn apply_and_finish(
        self: &Arc<Self>,
        spec: &ComputeSpec,
    ) -> Result<ComputeStatus, ComputeError> {
        self.apply(spec).await.map_err(|e| self.fail(e))?;
        let finished = {
            let mut state = self.state.lock().unwrap();
            // Checked under the lock the supervisor takes: an exit is never missed.
            if self.postgres.is_running() {
                state
                    .go_to(Running, "the spec is applied")
                    .map_err(|r| ComputeError::Failed(r.into()))?;
                Some(state.status())
            } else {
                None
            }
        };
        finished.ok_or_else(|| self.fail(anyhow!("postgres exited while the spec was applied")))
    }

    async fn apply(self: &Arc<Self>, spec: &ComputeSpec) -> anyhow::Result<()> {
        self.postgres
            .prepare(spec)
            .await
            .context("cannot prepare PGDATA")?;
        if self.postgres.is_running() {
            self.postgres
                .reload()
                .await
                .context("cannot reload the configuration")?;
        } else {
            let exit = self
                .postgres
                .start()
                .await
                .context("cannot start postgres")?;
            tokio::spawn(self.clone().supervise(exit));
            self.postgres
                .wait_ready()
                .await
                .context("postgres did not come up")?;
        }
        self.postgres
            .reconcile(spec)
            .await
            .context("cannot apply the roles and databases")
    }

    /// Waits for the postmaster to exit. It is not restarted: a compute whose Postgres
    /// died is `Failed` until a configure starts it again.
    async fn supervise(self: Arc<Self>, exit: Exit) {
        let how = exit.wait().await;
        let mut state = self.state.lock().unwrap();
        if self.shutting_down.load(Ordering::SeqCst) {
            tracing::info!("{how}");
            return;
        }
        match state.state() {
            Running => {
                let _ = state.go_to(Failed, &how);
            }
            TerminationPending | Terminated => {}
            // A configure under way finds out itself and fails.
            other => tracing::warn!(state = %other, "{how}"),
        }
    }

    /// `POST /terminate`: a fast shutdown; replies once Postgres has stopped. Runs to its
    /// end even if the client goes away.
    pub async fn terminate(self: &Arc<Self>) -> Result<ComputeStatus, ComputeError> {
        let compute = self.clone();
        tokio::spawn(async move { compute.run_terminate().await })
            .await
            .unwrap_or_else(|e| Err(ComputeError::Failed(anyhow!("the terminate stopped: {e}"))))
    }

    async fn run_terminate(&self) -> Result<ComputeStatus, ComputeError> {
        {
            let mut state = self.state.lock().unwrap();
            if state.state() == Terminated {
                return Ok(state.status());
            }
            state
                .go_to(TerminationPending, "a terminate request arrived")
                .map_err(|r| ComputeError::Conflict {
                    state: r.from,
                    action: "terminate",
                })?;
        }
        if let Err(e) = self.postgres.stop().await {
            let e = e.context("cannot stop postgres");
            tracing::error!("{e:#}");
            return Err(ComputeError::Failed(e));
        }
        let mut state = self.state.lock().unwrap();
        state
            .go_to(Terminated, "postgres has stopped")
            .map_err(|r| ComputeError::Failed(r.into()))?;
        Ok(state.status())
    }

    /// The compute monitor: while Postgres runs, notes when a client was last active.
    pub async fn monitor(self: Arc<Self>, every: Duration) {
        let mut failing = false;
        loop {
            tokio::time::sleep(every).await;
            if self.status().state != Running {
                continue;
            }
            match self.postgres.clients_active().await {
                Ok(active) => {
                    if active {
                        self.state.lock().unwrap().mark_active(now_ms());
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            "cannot read client activity (said once until it works again): {e:#}"
                        );
                    }
                    failing = true;
                }
            }
        }
    }

    /// computectl is stopping: Postgres stops with it, by a fast shutdown.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        if let Err(e) = self.postgres.stop().await {
            tracing::error!("{:#}", e.context("cannot stop postgres"));
        }
    }
}

#[cfg(test)]
#[path = "compute_tests.rs"]
mod tests;
