//! The Postgres compute in a VM's guest. vmhostd keeps the VM's compute spec, hands it to
//! computectl when computectl reports `Empty` (its first boot), relays operators' requests
//! to it, and keeps the last status it saw for `list` and `/metrics`.
//!
//! computectl keeps the spec it was given on the VM's own disk, so a restarted VM comes
//! back through `Init` without the host sending it again.

use crate::compute_watch::ComputeWatch;
use crate::error::HostError;
use crate::host::Host;
use crate::store::VmSpec;
use crate::validate;
use crate::vm_table::Action;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use vmhost_api::{ComputeAction, Reply};
use vmhost_compute_api::{ComputeState, ComputeStatus};
use vmhost_guest_link::compute::{ComputeClient, ComputeError};

/// How often a running compute's status is read.
const POLL: Duration = Duration::from_secs(5);
/// While the guest boots: often, so the spec goes over soon after computectl is up.
const POLL_BOOTING: Duration = Duration::from_secs(1);
/// A status read.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// A configure or terminate: initdb and a start of Postgres under emulation take a while.
const APPLY_TIMEOUT: Duration = Duration::from_secs(300);

impl Host {
    fn compute_client(&self, name: &str, timeout: Duration) -> ComputeClient {
        ComputeClient::new(&self.paths(name).vsock.uds_path, timeout)
    }

    /// Starts watching the compute of a VM that runs, if it has a compute spec.
    pub fn watch_compute(self: &Arc<Self>, spec: &VmSpec) -> Option<ComputeWatch> {
        spec.compute_spec.as_ref()?;
        let last = Arc::new(Mutex::new(None));
        let task = tokio::spawn(watch(
            Arc::downgrade(self),
            spec.name.clone(),
            self.compute_client(&spec.name, STATUS_TIMEOUT),
            self.compute_client(&spec.name, APPLY_TIMEOUT),
            last.clone(),
        ));
        Some(ComputeWatch::new(task, last))
    }

    /// An operator's request to a VM's computectl.
    pub async fn compute(
        self: &Arc<Self>,
        name: &str,
        action: ComputeAction,
    ) -> Result<Reply, HostError> {
        let slot = self.slot(name)?;
        slot.record().check(Action::Compute)?;
        let compute_error = |source| HostError::Compute {
            name: name.into(),
            source,
        };
        let status = match action {
            ComputeAction::Status => self
                .compute_client(name, STATUS_TIMEOUT)
                .status()
                .await
                .map_err(compute_error)?,
            ComputeAction::Configure { spec } => {
                validate::check_compute_spec(&spec)?;
                // Kept first, so the spec the guest runs is never one the host lost.
                {
                    let _operation = slot.operation.lock().await;
                    let mut kept = slot.record().spec.clone();
                    kept.compute_spec = Some(spec.clone());
                    self.store.save(&kept)?;
                    slot.record().spec.compute_spec = Some(spec.clone());
                }
                tracing::info!(vm = %name, "configuring the compute");
                self.compute_client(name, APPLY_TIMEOUT)
                    .configure(&spec)
                    .await
                    .map_err(compute_error)?
            }
            ComputeAction::Terminate => {
                tracing::info!(vm = %name, "terminating the compute");
                self.compute_client(name, APPLY_TIMEOUT)
                    .terminate()
                    .await
                    .map_err(compute_error)?
            }
        };
        Ok(Reply::Compute {
            name: name.into(),
            status,
        })
    }
}

async fn watch(
    host: Weak<Host>,
    name: String,
    client: ComputeClient,
    applier: ComputeClient,
    last: Arc<Mutex<Option<ComputeStatus>>>,
) {
    let mut seen: Option<ComputeState> = None;
    loop {
        let status = client.status().await.ok();
        let state = status.as_ref().map(|s| s.state);
        if state != seen {
            // At most one line per poll, whatever the guest does.
            match &status {
                Some(status) => {
                    tracing::info!(vm = %name, state = ?status.state, error = ?status.error, "compute status")
                }
                None => tracing::debug!(vm = %name, "compute not reachable"),
            }
            seen = state;
        }
        *last.lock().unwrap() = status;
        if state == Some(ComputeState::Empty) {
            let Some(spec) = host
                .upgrade()
                .and_then(|host| host.slot(&name).ok())
                .and_then(|slot| slot.record().spec.compute_spec.clone())
            else {
                return;
            };
            match applier.configure(&spec).await {
                Ok(status) => {
                    tracing::info!(vm = %name, state = ?status.state, "handed the compute spec over");
                    *last.lock().unwrap() = Some(status);
                }
                Err(ComputeError::Refused { status, message }) => {
                    tracing::warn!(vm = %name, status, %message, "the guest refused the compute spec");
                }
                Err(error) => {
                    tracing::warn!(vm = %name, %error, "cannot hand the compute spec over")
                }
            }
        }
        tokio::time::sleep(if state.is_some() { POLL } else { POLL_BOOTING }).await;
    }
}
