//! QMP client on the `qapi` crate, with our own command types where qapi-qmp's (generated
//! from a newer QEMU schema) do not match QEMU 7.2's replies.
//!
//! One task reads the socket: it routes replies to their callers and broadcasts events.

use crate::status::MigrationStatus;
use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp::Event;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};

type Writer = QmpStreamTokio<WriteHalf<UnixStream>>;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} timed out after {timeout:?}")]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("QMP command {command} failed: {message}")]
    Command {
        command: &'static str,
        message: String,
    },
}

/// qapi's reader ends at the first line it cannot decode, and an ended reader means QEMU
/// is gone. QEMU may send events qapi-qmp's schema does not know (a newer QEMU, or an event
/// a guest provokes with odd fields): those are logged and dropped here, before qapi reads,
/// so the VM is not taken for dead while it runs.
fn known_messages_only(
    read: impl tokio::io::AsyncRead + Send + Unpin + 'static,
) -> tokio::io::ReadHalf<tokio::io::DuplexStream> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (filtered, mut to_qapi) = tokio::io::duplex(64 << 10);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut dropped = 0u64;
        while let Ok(Some(line)) = lines.next_line().await {
            if !is_known(&line) {
                // Once at warning level: a guest may provoke the same event endlessly.
                dropped += 1;
                if dropped == 1 {
                    tracing::warn!(message = %line, "QMP event this QEMU client does not know; ignored, as are any more");
                } else {
                    tracing::debug!(message = %line, dropped, "QMP event ignored");
                }
                continue;
            }
            if to_qapi.write_all(line.as_bytes()).await.is_err()
                || to_qapi.write_all(b"\n").await.is_err()
            {
                break;
            }
        }
    });
    tokio::io::split(filtered).0
}

/// Whether `line` is not an event, or an event qapi-qmp decodes.
fn is_known(line: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(value) if value.get("event").is_some() => serde_json::from_value::<Event>(value).is_ok(),
        _ => true,
    }
}

/// A connected QMP monitor.
pub struct QmpClient {
    service: QapiService<Writer>,
    events: broadcast::Sender<Event>,
    closed: watch::Receiver<bool>,
    timeout: Duration,
}

impl QmpClient {
    /// Connects and negotiates capabilities. QEMU serves one QMP client at a time.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let connect_error = |source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        };
        let negotiated = tokio::time::timeout(timeout, async {
            let (read, write) = tokio::io::split(UnixStream::connect(path).await?);
            QmpStreamTokio::open_split(known_messages_only(read), write)
                .await?
                .negotiate()
                .await
        })
        .await
        .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connect_error)?;
        let (service, mut stream) = negotiated.into_parts();
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let sender = events.clone();
        tokio::spawn(async move {
            // Polling the stream also delivers command replies to their callers.
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => {
                        tracing::debug!(?event, "QMP event");
                        let _ = sender.send(event);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "QMP stream ended");
                        break;
                    }
                }
            }
            let _ = closed_tx.send(true);
        });
        Ok(QmpClient {
            service,
            events,
            closed,
            timeout,
        })
    }

    /// Runs one command with the client's timeout. A command that times out still gets
    /// its reply read in the background: QEMU answers in order, and the next command
    /// must not be taken for the late one.
    pub async fn execute<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::qmp::QmpCommand + Send + 'static,
        C::Ok: Send,
    {
        let name = C::NAME;
        let pending = tokio::spawn(self.service.execute(command));
        match tokio::time::timeout(self.timeout, pending).await {
            Err(_) => Err(QmpError::Timeout {
                command: name,
                timeout: self.timeout,
            }),
            Ok(Err(join)) => Err(QmpError::Command {
                command: name,
                message: join.to_string(),
            }),
            Ok(Ok(result)) => result.map_err(|e| QmpError::Command {
                command: name,
                message: e.to_string(),
            }),
        }
    }

    /// Events from now on. Subscribe before issuing the command whose event you await.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Resolves when the connection ends, which means QEMU has exited or closed the monitor.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|closed| *closed).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

/// A session on a monitor with out-of-band execution enabled, for the commands that must
/// run even while QEMU's main loop is stuck (the qapi crate executes in band only).
/// Negotiating needs the main loop, so the session is opened before it may get stuck.
pub struct OobMonitor {
    socket: std::path::PathBuf,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
}

impl OobMonitor {
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<OobMonitor, QmpError> {
        use tokio::io::AsyncBufReadExt;
        let connect = async {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|source| QmpError::Connect {
                    path: socket.display().to_string(),
                    source,
                })?;
            let (read, write) = stream.into_split();
            let mut monitor = OobMonitor {
                socket: socket.to_path_buf(),
                lines: tokio::io::BufReader::new(read).lines(),
                write,
                next_id: 0,
            };
            let greeting = monitor.next_message().await?;
            let offers_oob = greeting["QMP"]["capabilities"]
                .as_array()
                .is_some_and(|caps| caps.iter().any(|c| c == "oob"));
            if !offers_oob {
                return Err(monitor.failed("qmp_capabilities", "no out-of-band execution".into()));
            }
            monitor
                .send(serde_json::json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))
                .await?;
            monitor.next_message().await?;
            Ok(monitor)
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| QmpError::Timeout {
                command: "qmp_capabilities",
                timeout,
            })?
    }

    /// Runs `command` out of band and returns its reply.
    pub async fn execute(
        &mut self,
        command: &'static str,
        arguments: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, QmpError> {
        self.next_id += 1;
        let id = format!("oob-{}", self.next_id);
        let exchange = async {
            self.send(serde_json::json!({"exec-oob": command, "arguments": arguments, "id": id}))
                .await?;
            loop {
                let reply = self.next_message().await?;
                if let Some(outcome) = oob_outcome(&reply, &id) {
                    return outcome.map_err(|message| self.failed(command, message));
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout { command, timeout })?
    }

    async fn send(&mut self, request: serde_json::Value) -> Result<(), QmpError> {
        use tokio::io::AsyncWriteExt;
        let mut line = request.to_string();
        line.push('\n');
        let sent = self.write.write_all(line.as_bytes()).await;
        sent.map_err(|e| self.failed("write", e.to_string()))
    }

    /// The next message that is not an event.
    async fn next_message(&mut self) -> Result<serde_json::Value, QmpError> {
        loop {
            let line = match self.lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => return Err(self.failed("read", "the monitor closed".into())),
                Err(e) => return Err(self.failed("read", e.to_string())),
            };
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| self.failed("read", e.to_string()))?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    fn failed(&self, command: &'static str, message: String) -> QmpError {
        QmpError::Command {
            command,
            message: format!(
                "{} (out-of-band monitor {})",
                message,
                self.socket.display()
            ),
        }
    }
}

/// The outcome of the out-of-band command `id` in a monitor reply: its `return`, or QEMU's
/// description of its error. `None` for a reply to another command (an earlier one that
/// timed out), which is skipped.
pub fn oob_outcome(
    reply: &serde_json::Value,
    id: &str,
) -> Option<Result<serde_json::Value, String>> {
    if reply["id"] != id {
        return None;
    }
    Some(match (reply.get("return"), reply.get("error")) {
        (Some(value), _) => Ok(value.clone()),
        (_, Some(error)) => Err(error["desc"].as_str().unwrap_or("error").into()),
        _ => Err(format!("unexpected reply {reply}")),
    })
}

/// Declares a QMP command type: `qmp_command!(Type => "name", Reply)`.
macro_rules! qmp_command {
    ($ty:ty => $name:literal, $ok:ty) => {
        impl qapi::Command for $ty {
            type Ok = $ok;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
        impl qapi::qmp::QmpCommand for $ty {}
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuProps {
    #[serde(rename = "socket-id")]
    pub socket_id: i64,
    #[serde(rename = "core-id")]
    pub core_id: i64,
    #[serde(rename = "thread-id")]
    pub thread_id: i64,
}

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HotpluggableCpu {
    #[serde(rename = "type")]
    pub driver: String,
    pub props: CpuProps,
    /// Present when the CPU exists.
    #[serde(rename = "qom-path")]
    pub qom_path: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueryHotpluggableCpus {}
qmp_command!(QueryHotpluggableCpus => "query-hotpluggable-cpus", Vec<HotpluggableCpu>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuDeviceAdd {
    pub driver: String,
    pub id: String,
    #[serde(flatten)]
    pub props: CpuProps,
}
qmp_command!(CpuDeviceAdd => "device_add", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct DeviceDel {
    pub id: String,
}
qmp_command!(DeviceDel => "device_del", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct QomSet {
    pub path: String,
    pub property: String,
    pub value: serde_json::Value,
}
qmp_command!(QomSet => "qom-set", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct QomGet {
    pub path: String,
    pub property: String,
}
qmp_command!(QomGet => "qom-get", serde_json::Value);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub status: String,
    pub running: bool,
}

#[derive(Debug, Serialize)]
pub struct QueryStatus {}
qmp_command!(QueryStatus => "query-status", StatusInfo);

#[derive(Debug, Serialize)]
pub struct Stop {}
qmp_command!(Stop => "stop", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct SystemPowerdown {}
qmp_command!(SystemPowerdown => "system_powerdown", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct Quit {}
qmp_command!(Quit => "quit", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct MigrationCapability {
    pub capability: String,
    pub state: bool,
}

#[derive(Debug, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapability>,
}
qmp_command!(MigrateSetCapabilities => "migrate-set-capabilities", qapi::Empty);

/// The migration parameters vmhost sets; absent ones keep QEMU's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrateSetParameters {
    /// Longest pause allowed at the switchover, in milliseconds.
    #[serde(rename = "downtime-limit", skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bytes per second; QEMU's default is a cautious 128 MiB/s.
    #[serde(rename = "max-bandwidth", skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(
        rename = "max-postcopy-bandwidth",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_postcopy_bandwidth: Option<u64>,
}
qmp_command!(MigrateSetParameters => "migrate-set-parameters", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct Migrate {
    pub uri: String,
    /// Continue a paused post-copy migration instead of starting one.
    pub resume: bool,
}
qmp_command!(Migrate => "migrate", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}
qmp_command!(MigrateIncoming => "migrate-incoming", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct MigrateStartPostcopy {}
qmp_command!(MigrateStartPostcopy => "migrate-start-postcopy", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct MigrateCancel {}
qmp_command!(MigrateCancel => "migrate_cancel", qapi::Empty);

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RamStats {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub mbps: f64,
    #[serde(rename = "dirty-sync-count", default)]
    pub dirty_sync_count: u64,
    #[serde(rename = "postcopy-requests", default)]
    pub postcopy_requests: u64,
}

/// `query-migrate`, the fields vmhost reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationInfo {
    /// Absent in a reply before any migration: [`MigrationStatus::None`].
    #[serde(default)]
    pub status: MigrationStatus,
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Milliseconds the guest was paused, once completed.
    #[serde(default)]
    pub downtime: Option<u64>,
    #[serde(rename = "total-time", default)]
    pub total_time: Option<u64>,
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueryMigrate {}
qmp_command!(QueryMigrate => "query-migrate", MigrationInfo);

/// `chardev-add` of a unix socket client.
#[derive(Debug, Serialize)]
pub struct ChardevAddUnix {
    pub id: String,
    pub backend: serde_json::Value,
}
qmp_command!(ChardevAddUnix => "chardev-add", serde_json::Value);

impl ChardevAddUnix {
    pub fn new(id: &str, path: &Path) -> Self {
        ChardevAddUnix {
            id: id.into(),
            backend: serde_json::json!({
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": path.display().to_string()}},
                    "server": false
                }
            }),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChardevRemove {
    pub id: String,
}
qmp_command!(ChardevRemove => "chardev-remove", qapi::Empty);

/// The children of a QOM path, e.g. `/machine/peripheral`: the devices added with an id.
#[derive(Debug, Serialize)]
pub struct QomList {
    pub path: String,
}
qmp_command!(QomList => "qom-list", Vec<QomProperty>);

#[derive(Debug, Deserialize)]
pub struct QomProperty {
    pub name: String,
}

/// `device_add` of a device bound to a chardev on a given bus.
#[derive(Debug, Serialize)]
pub struct ChardevDeviceAdd {
    pub driver: String,
    pub id: String,
    pub chardev: String,
    pub bus: String,
}
qmp_command!(ChardevDeviceAdd => "device_add", qapi::Empty);

/// The block layer's arguments are nested unions, one shape per driver or export type;
/// these commands take them as JSON.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct BlockdevAdd(pub serde_json::Value);
qmp_command!(BlockdevAdd => "blockdev-add", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct BlockdevDel {
    #[serde(rename = "node-name")]
    pub node_name: String,
}
qmp_command!(BlockdevDel => "blockdev-del", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct BlockdevMirror {
    #[serde(rename = "job-id")]
    pub job_id: String,
    pub device: String,
    pub target: String,
    pub sync: String,
    #[serde(rename = "copy-mode")]
    pub copy_mode: String,
}
qmp_command!(BlockdevMirror => "blockdev-mirror", qapi::Empty);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobInfo {
    pub device: String,
    pub len: u64,
    pub offset: u64,
    pub ready: bool,
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueryBlockJobs {}
qmp_command!(QueryBlockJobs => "query-block-jobs", Vec<BlockJobInfo>);

#[derive(Debug, Serialize)]
pub struct BlockJobCancel {
    pub device: String,
    pub force: bool,
}
qmp_command!(BlockJobCancel => "block-job-cancel", qapi::Empty);

#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct NbdServerStart(pub serde_json::Value);
qmp_command!(NbdServerStart => "nbd-server-start", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct NbdServerStop {}
qmp_command!(NbdServerStop => "nbd-server-stop", qapi::Empty);

#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct BlockExportAdd(pub serde_json::Value);
qmp_command!(BlockExportAdd => "block-export-add", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct MigrateContinue {
    pub state: String,
}
qmp_command!(MigrateContinue => "migrate-continue", qapi::Empty);

#[cfg(test)]
mod tests;
