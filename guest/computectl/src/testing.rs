//! A fake Postgres for the compute's and the API's tests: records what was asked of it,
//! and can be told to fail or to crash.

use crate::compute::Compute;
use crate::postgres::{Exit, Postgres};
use anyhow::bail;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use vmhost_compute_api::{ComputeSpec, ComputeState};

pub const GOOD_SPEC: &str = r#"{
    "format_version": 1,
    "roles": [{"name": "alice", "password_hash": "md54a0a68b43b6cd5cf266fa02f196e2371"}],
    "databases": [{"name": "app", "owner": "alice"}],
    "settings": {"shared_buffers": "128MB"},
    "extensions": ["hstore"]
}"#;

#[derive(Default)]
pub struct FakePostgres {
    calls: Mutex<Vec<&'static str>>,
    postmaster: Mutex<Option<watch::Sender<Option<String>>>>,
    fail_reconcile: AtomicBool,
}

impl FakePostgres {
    /// What was asked since the last call.
    pub fn take_calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn record(&self, call: &'static str) {
        self.calls.lock().unwrap().push(call);
    }

    pub fn crash(&self, how: &str) {
        if let Some(sender) = self.postmaster.lock().unwrap().as_ref() {
            sender.send_replace(Some(how.to_string()));
        }
    }

    pub fn fail_reconcile(&self, fail: bool) {
        self.fail_reconcile.store(fail, Ordering::SeqCst);
    }
}

#[async_trait]
impl Postgres for FakePostgres {
    fn installed_extensions(&self) -> anyhow::Result<Vec<String>> {
        Ok(vec!["hstore".into(), "pg_stat_statements".into()])
    }

    async fn prepare(&self, _spec: &ComputeSpec) -> anyhow::Result<()> {
        self.record("prepare");
        Ok(())
    }

    async fn start(&self) -> anyhow::Result<Exit> {
        self.record("start");
        let (sender, receiver) = watch::channel(None);
        *self.postmaster.lock().unwrap() = Some(sender);
        Ok(Exit::new(receiver))
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        self.record("wait_ready");
        Ok(())
    }

    fn is_running(&self) -> bool {
        let postmaster = self.postmaster.lock().unwrap();
        postmaster.as_ref().is_some_and(|s| s.borrow().is_none())
    }

    async fn reload(&self) -> anyhow::Result<()> {
        self.record("reload");
        Ok(())
    }

    async fn reconcile(&self, _spec: &ComputeSpec) -> anyhow::Result<()> {
        self.record("reconcile");
        if self.fail_reconcile.load(Ordering::SeqCst) {
            bail!("db error: ERROR: role \"old\" cannot be dropped");
        }
        Ok(())
    }

    async fn stop(&self) -> anyhow::Result<()> {
        self.record("stop");
        self.crash("postgres exited (exit status: 0)");
        Ok(())
    }

    async fn clients_active(&self) -> anyhow::Result<bool> {
        Ok(true)
    }
}

/// A compute over a fake Postgres, keeping its spec in `dir`.
pub fn compute(dir: &tempfile::TempDir) -> (Arc<Compute>, Arc<FakePostgres>) {
    let postgres = Arc::new(FakePostgres::default());
    let compute = Compute::new(postgres.clone(), dir.path().join("spec.json"), "test");
    (compute, postgres)
}

/// Waits (a while, in test time) for the compute to reach `state`.
pub async fn wait_for(compute: &Compute, state: ComputeState) {
    for _ in 0..100 {
        if compute.status().state == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the compute is {}, not {state}", compute.status().state);
}
