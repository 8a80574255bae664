//! A VM's disk across a migration: the target exports its empty disk over NBD on a unix
//! socket, and the source mirrors its disk there while the guest runs. The mirror copies
//! guest writes synchronously once it has caught up (`write-blocking`), so it stays in step
//! until the source pauses at the switchover; then it is finished, and the target's disk
//! holds every write.

use crate::cmdline::DISK_NODE;
use crate::machine::{Machine, VmmError};
use crate::qmp::{
    BlockExportAdd, BlockJobCancel, BlockJobInfo, BlockdevAdd, BlockdevDel, BlockdevMirror,
    NbdServerStart, NbdServerStop, QueryBlockJobs,
};
use qapi::qmp::Event;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The NBD export's name, and the node and job names on the source.
const EXPORT: &str = "disk0-export";
const MIRROR_TARGET: &str = "disk0-mirror-target";
pub const MIRROR_JOB: &str = "disk0-mirror";

/// Where a disk mirror stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorProgress {
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// Caught up: from now on every guest write reaches both disks.
    pub ready: bool,
}

fn unix_address(socket: &Path) -> serde_json::Value {
    json!({ "type": "unix", "path": socket.display().to_string() })
}

/// If `event` ends the mirror job: `None` if it completed, else why not.
fn mirror_ended(event: &Event) -> Option<Option<String>> {
    match event {
        Event::BLOCK_JOB_COMPLETED { data, .. } if data.device == MIRROR_JOB => {
            Some(data.error.clone())
        }
        Event::BLOCK_JOB_CANCELLED { data, .. } if data.device == MIRROR_JOB => {
            Some(Some("cancelled before it caught up".to_string()))
        }
        _ => None,
    }
}

impl Machine {
    /// On the target, waiting for the migration: serves its disk, writable, at `socket`.
    pub async fn export_disk(&self, socket: &Path) -> Result<(), VmmError> {
        let _ = std::fs::remove_file(socket);
        self.qmp()
            // nbd-server-start still takes the older, nested address form.
            .execute(NbdServerStart(json!({
                "addr": { "type": "unix", "data": { "path": socket.display().to_string() } }
            })))
            .await?;
        self.qmp()
            .execute(BlockExportAdd(json!({
                "type": "nbd",
                "id": EXPORT,
                "node-name": DISK_NODE,
                "name": EXPORT,
                "writable": true,
            })))
            .await?;
        Ok(())
    }

    /// On the target, once the migration completed: no one may write the disk but the guest.
    pub async fn unexport_disk(&self) -> Result<(), VmmError> {
        self.qmp().execute(NbdServerStop {}).await?;
        Ok(())
    }

    /// On the source: starts copying the disk to the export reachable at `socket`.
    pub async fn start_disk_mirror(&self, socket: &Path) -> Result<(), VmmError> {
        self.qmp()
            .execute(BlockdevAdd(json!({
                "driver": "nbd",
                "node-name": MIRROR_TARGET,
                "server": unix_address(socket),
                "export": EXPORT,
            })))
            .await?;
        let mirror = self
            .qmp()
            .execute(BlockdevMirror {
                job_id: MIRROR_JOB.into(),
                device: DISK_NODE.into(),
                target: MIRROR_TARGET.into(),
                sync: "full".into(),
                copy_mode: "write-blocking".into(),
            })
            .await;
        if let Err(error) = mirror {
            self.drop_mirror_target().await;
            return Err(error.into());
        }
        Ok(())
    }

    /// The mirror's progress; an error if the job stopped on its own (it failed).
    pub async fn disk_mirror_progress(&self) -> Result<MirrorProgress, VmmError> {
        let jobs: Vec<BlockJobInfo> = self.qmp().execute(QueryBlockJobs {}).await?;
        let job = jobs
            .into_iter()
            .find(|job| job.device == MIRROR_JOB)
            .ok_or_else(|| VmmError::UnexpectedReply {
                property: "block jobs".into(),
                value: format!("the disk mirror '{MIRROR_JOB}' is gone"),
            })?;
        if let Some(error) = job.error.filter(|_| job.status != "running") {
            return Err(VmmError::UnexpectedReply {
                property: "disk mirror".into(),
                value: format!("{} ({error})", job.status),
            });
        }
        Ok(MirrorProgress {
            copied_bytes: job.offset,
            total_bytes: job.len,
            ready: job.ready,
        })
    }

    /// On the source, paused at the switchover: copies what is left and ends the mirror,
    /// leaving the guest's disk as it was. Succeeds only if the target's disk is complete.
    pub async fn finish_disk_mirror(&self, timeout: Duration) -> Result<(), VmmError> {
        let mut events = self.qmp().subscribe();
        // Not forced: a caught-up mirror copies its last writes, then completes.
        self.qmp()
            .execute(BlockJobCancel {
                device: MIRROR_JOB.into(),
                force: false,
            })
            .await?;
        let outcome = self
            .wait_event(&mut events, "finish the disk mirror", timeout, mirror_ended)
            .await?;
        self.drop_mirror_target().await;
        match outcome {
            None => Ok(()),
            Some(error) => Err(VmmError::UnexpectedReply {
                property: "disk mirror".into(),
                value: error,
            }),
        }
    }

    /// On the source, when the migration failed: drops the mirror and its connection.
    pub async fn abandon_disk_mirror(&self) {
        let mut events = self.qmp().subscribe();
        let cancelled = self
            .qmp()
            .execute(BlockJobCancel {
                device: MIRROR_JOB.into(),
                force: true,
            })
            .await;
        if cancelled.is_ok() {
            let timeout = Duration::from_secs(10);
            let _ = self
                .wait_event(&mut events, "cancel the disk mirror", timeout, mirror_ended)
                .await;
        }
        self.drop_mirror_target().await;
    }

    async fn drop_mirror_target(&self) {
        match self
            .qmp()
            .execute(BlockdevDel {
                node_name: MIRROR_TARGET.into(),
            })
            .await
        {
            Ok(_) => {}
            // It is gone already when the mirror never started.
            Err(error) => tracing::debug!(%error, "cannot drop the disk mirror's target node"),
        }
    }
}
