//! QMP client on the `qapi` crate, with our own command types where qapi-qmp's (generated
//! from a newer QEMU schema) do not match QEMU 7.2's replies.
//!
//! One task reads the socket: it routes replies to their callers and broadcasts events.

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
            QmpStreamTokio::open_uds(path).await?.negotiate().await
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

    /// Runs one command with the client's timeout.
    pub async fn execute<C: qapi::qmp::QmpCommand>(&self, command: C) -> Result<C::Ok, QmpError> {
        let name = C::NAME;
        match tokio::time::timeout(self.timeout, self.service.execute(command)).await {
            Err(_) => Err(QmpError::Timeout {
                command: name,
                timeout: self.timeout,
            }),
            Ok(result) => result.map_err(|e| QmpError::Command {
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
pub struct SystemPowerdown {}
qmp_command!(SystemPowerdown => "system_powerdown", qapi::Empty);

#[derive(Debug, Serialize)]
pub struct Quit {}
qmp_command!(Quit => "quit", qapi::Empty);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_7_2_hotpluggable_cpus_reply() {
        let reply = r#"[{"props": {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0},
            "vcpus-count": 1, "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1,
            "qom-path": "/machine/unattached/device[0]", "type": "qemu64-x86_64-cpu"}]"#;
        let cpus: Vec<HotpluggableCpu> = serde_json::from_str(reply).unwrap();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0].qom_path, None);
        assert_eq!(cpus[0].props.core_id, 1);
        assert_eq!(cpus[1].driver, "qemu64-x86_64-cpu");
    }

    #[test]
    fn cpu_device_add_flattens_props() {
        let cmd = CpuDeviceAdd {
            driver: "qemu64-x86_64-cpu".into(),
            id: "cpu1".into(),
            props: CpuProps {
                socket_id: 0,
                core_id: 1,
                thread_id: 0,
            },
        };
        let json = serde_json::to_value(&cmd).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"driver": "qemu64-x86_64-cpu", "id": "cpu1",
                "socket-id": 0, "core-id": 1, "thread-id": 0})
        );
    }
}
