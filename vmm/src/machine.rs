//! A running QEMU: launch or reattach, resize, query, stop.
//!
//! Every resize waits for the guest's own acknowledgement (ACPI `_OST` for a plugged vCPU,
//! `DEVICE_DELETED` for an ejected one, virtio-mem `size` for memory), bounded by a timeout.

use crate::cmdline::{MachineSpec, HOTPLUG_CPU_ID_PREFIX, VIRTIO_MEM_ID};
use crate::qmp::{
    CpuDeviceAdd, DeviceDel, HotpluggableCpu, OobMonitor, QmpClient, QmpError, QomGet, QomSet,
    QueryHotpluggableCpus, QueryStatus, Quit, StatusInfo, Stop, SystemPowerdown,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qapi::qmp::Event;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

const PERIPHERAL_PREFIX: &str = "/machine/peripheral/";
const POLL_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU refused to start: {stderr}")]
    LaunchFailed { stderr: String },
    #[error("QEMU pidfile {path} is missing or unreadable")]
    Pidfile { path: String },
    #[error("no QEMU process {pid} serving {qmp_socket}")]
    NotRunning { pid: i32, qmp_socket: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("cannot set {target} vCPUs: the VM has {slots} slots and {fixed} boot vCPUs that cannot be unplugged")]
    VcpusOutOfRange { target: u32, slots: u32, fixed: u32 },
    #[error("guest did not {action} within {timeout:?}")]
    GuestTimeout { action: String, timeout: Duration },
    #[error("guest rejected {action} (ACPI _OST status {status:#x})")]
    GuestRejected { action: String, status: i64 },
    #[error("VM has no hotplug memory device; its memory is fixed")]
    NoHotplugMemory,
    #[error("QEMU returned an unexpected {property}: {value}")]
    UnexpectedReply { property: String, value: String },
    #[error("QEMU exited during {action}")]
    Exited { action: String },
    #[error("no out-of-band monitor session was opened for this migration")]
    NoOobMonitor,
}

/// One vCPU change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuChange {
    Plug(CpuDeviceAdd),
    Unplug { id: String },
}

/// Plans the device changes that bring the VM to `target` vCPUs. Plugs fill the lowest free
/// cores; unplugs remove the highest hotplugged ones (boot vCPUs cannot be removed).
pub fn plan_vcpus(slots: &[HotpluggableCpu], target: u32) -> Result<Vec<CpuChange>, VmmError> {
    let present = slots.iter().filter(|s| s.qom_path.is_some()).count() as u32;
    let mut removable: Vec<(&HotpluggableCpu, &str)> = slots
        .iter()
        .filter_map(|s| {
            let id = s.qom_path.as_deref()?.strip_prefix(PERIPHERAL_PREFIX)?;
            Some((s, id))
        })
        .collect();
    let fixed = present - removable.len() as u32;
    if target > slots.len() as u32 || target < fixed.max(1) {
        return Err(VmmError::VcpusOutOfRange {
            target,
            slots: slots.len() as u32,
            fixed,
        });
    }
    if target >= present {
        let mut free: Vec<&HotpluggableCpu> =
            slots.iter().filter(|s| s.qom_path.is_none()).collect();
        free.sort_by_key(|s| (s.props.socket_id, s.props.core_id, s.props.thread_id));
        return Ok(free
            .into_iter()
            .take((target - present) as usize)
            .map(|s| {
                CpuChange::Plug(CpuDeviceAdd {
                    driver: s.driver.clone(),
                    id: format!("{HOTPLUG_CPU_ID_PREFIX}{}", s.props.core_id),
                    props: s.props,
                })
            })
            .collect());
    }
    removable.sort_by_key(|(s, _)| {
        std::cmp::Reverse((s.props.socket_id, s.props.core_id, s.props.thread_id))
    });
    Ok(removable
        .into_iter()
        .take((present - target) as usize)
        .map(|(_, id)| CpuChange::Unplug { id: id.to_string() })
        .collect())
}

/// A QEMU process and its monitor.
pub struct Machine {
    pid: Pid,
    qmp: QmpClient,
    qmp_socket: PathBuf,
    /// The out-of-band session of a migration target, once opened.
    oob: tokio::sync::Mutex<Option<OobMonitor>>,
}

impl Machine {
    /// Starts QEMU (it daemonizes, so it outlives the caller) and connects to its monitor.
    pub async fn launch(
        qemu_binary: &Path,
        spec: &MachineSpec,
        qmp_timeout: Duration,
    ) -> Result<Machine, VmmError> {
        let output = tokio::process::Command::new(qemu_binary)
            .args(spec.to_args())
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| VmmError::Spawn {
                binary: qemu_binary.display().to_string(),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(VmmError::LaunchFailed {
                stderr: stderr
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("no output")
                    .to_string(),
            });
        }
        let machine = Machine::attach(&spec.qmp_socket, &spec.pidfile, qmp_timeout).await;
        if machine.is_err() {
            if let Ok(pid) = read_pid(&spec.pidfile) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        machine
    }

    /// Connects to a QEMU that is already running, after checking the pidfile names a live
    /// QEMU serving this socket (a stale pid may have been reused by another process).
    pub async fn attach(
        qmp_socket: &Path,
        pidfile: &Path,
        qmp_timeout: Duration,
    ) -> Result<Machine, VmmError> {
        let pid = read_pid(pidfile)?;
        if !process_serves(pid, qmp_socket) {
            return Err(VmmError::NotRunning {
                pid: pid.as_raw(),
                qmp_socket: qmp_socket.display().to_string(),
            });
        }
        let qmp = QmpClient::connect(qmp_socket, qmp_timeout).await?;
        Ok(Machine {
            pid,
            qmp,
            qmp_socket: qmp_socket.to_path_buf(),
            oob: Default::default(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    pub(crate) fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    pub(crate) fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    pub(crate) fn oob(&self) -> &tokio::sync::Mutex<Option<OobMonitor>> {
        &self.oob
    }

    /// Whether QEMU has gone away.
    pub fn exited_now(&self) -> bool {
        self.qmp.is_closed()
    }

    /// Resolves when QEMU goes away.
    pub async fn exited(&self) {
        self.qmp.closed().await
    }

    pub async fn status(&self) -> Result<StatusInfo, VmmError> {
        Ok(self.qmp.execute(QueryStatus {}).await?)
    }

    /// Stops the guest's vCPUs; QEMU runs on.
    pub async fn pause_guest(&self) -> Result<(), VmmError> {
        self.qmp.execute(Stop {}).await?;
        Ok(())
    }

    pub async fn vcpus(&self) -> Result<u32, VmmError> {
        let slots = self.qmp.execute(QueryHotpluggableCpus {}).await?;
        Ok(slots.iter().filter(|s| s.qom_path.is_some()).count() as u32)
    }

    /// Plugs or unplugs vCPUs until the guest runs `target` of them. Returns how many
    /// vCPUs were plugged.
    pub async fn set_vcpus(&self, target: u32, timeout: Duration) -> Result<u32, VmmError> {
        let slots = self.qmp.execute(QueryHotpluggableCpus {}).await?;
        let mut plugged = 0;
        for change in plan_vcpus(&slots, target)? {
            match change {
                CpuChange::Plug(add) => {
                    let id = add.id.clone();
                    tracing::info!(vcpu = %id, "plugging vCPU");
                    let mut events = self.qmp.subscribe();
                    self.qmp.execute(add).await?;
                    plugged += 1;
                    let action = format!("acknowledge vCPU {id}");
                    let status = self
                        .wait_event(&mut events, &action, timeout, |event| match event {
                            Event::ACPI_DEVICE_OST { data, .. }
                                if data.info.device.as_deref() == Some(id.as_str())
                                    && data.info.source == 1 =>
                            {
                                Some(data.info.status)
                            }
                            _ => None,
                        })
                        .await?;
                    if status != 0 {
                        return Err(VmmError::GuestRejected { action, status });
                    }
                }
                CpuChange::Unplug { id } => {
                    tracing::info!(vcpu = %id, "unplugging vCPU");
                    self.qmp.execute(DeviceDel { id: id.clone() }).await?;
                    // Under TCG QEMU reports only `<id>/lapic` as deleted, never the CPU
                    // itself, so wait for the slot to empty: the guest has ejected it.
                    let path = format!("{PERIPHERAL_PREFIX}{id}");
                    let deadline = Instant::now() + timeout;
                    loop {
                        let slots = self.qmp.execute(QueryHotpluggableCpus {}).await?;
                        if !slots
                            .iter()
                            .any(|s| s.qom_path.as_deref() == Some(path.as_str()))
                        {
                            break;
                        }
                        if Instant::now() >= deadline {
                            return Err(VmmError::GuestTimeout {
                                action: format!("eject vCPU {id}"),
                                timeout,
                            });
                        }
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                }
            }
        }
        Ok(plugged)
    }

    /// Bytes currently plugged through virtio-mem.
    pub async fn hotplug_memory(&self) -> Result<u64, VmmError> {
        self.virtio_mem_property("size").await
    }

    /// Requests `bytes` of virtio-mem memory and waits until the guest has plugged or
    /// unplugged all of it. The size-change event is rate-limited by QEMU, so poll instead.
    pub async fn set_hotplug_memory(&self, bytes: u64, timeout: Duration) -> Result<(), VmmError> {
        tracing::info!(bytes, "requesting virtio-mem size");
        let request = self
            .qmp
            .execute(QomSet {
                path: virtio_mem_path(),
                property: "requested-size".into(),
                value: bytes.into(),
            })
            .await;
        match request {
            Err(QmpError::Command { message, .. }) if message.contains("not found") => {
                return Err(VmmError::NoHotplugMemory)
            }
            other => other?,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let size = self.hotplug_memory().await?;
            if size == bytes {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::GuestTimeout {
                    action: format!("reach {bytes} bytes of hotplug memory (it has {size})"),
                    timeout,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn virtio_mem_property(&self, property: &str) -> Result<u64, VmmError> {
        let reply = self
            .qmp
            .execute(QomGet {
                path: virtio_mem_path(),
                property: property.into(),
            })
            .await;
        match reply {
            Ok(value) => value.as_u64().ok_or_else(|| VmmError::UnexpectedReply {
                property: property.into(),
                value: value.to_string(),
            }),
            // No device: the VM was created with min = max memory.
            Err(QmpError::Command { message, .. }) if message.contains("not found") => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks the guest to power off, then makes QEMU quit after `grace`.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), VmmError> {
        if self.qmp.execute(SystemPowerdown {}).await.is_ok()
            && tokio::time::timeout(grace, self.qmp.closed()).await.is_ok()
            && self.wait_gone(grace).await.is_ok()
        {
            return Ok(());
        }
        tracing::info!(
            pid = self.pid(),
            "guest did not power off in time; quitting QEMU"
        );
        self.terminate().await
    }

    /// Makes QEMU quit now, killing it if it does not.
    pub async fn terminate(&self) -> Result<(), VmmError> {
        const QUIT_WAIT: Duration = Duration::from_secs(5);
        let _ = self.qmp.execute(Quit {}).await;
        if self.wait_gone(QUIT_WAIT).await.is_err() {
            tracing::warn!(pid = self.pid(), "QEMU ignored quit; killing it");
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        self.wait_gone(QUIT_WAIT).await
    }

    async fn wait_gone(&self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = Instant::now() + timeout;
        while process_serves(self.pid, &self.qmp_socket) {
            if Instant::now() >= deadline {
                return Err(VmmError::GuestTimeout {
                    action: "let QEMU exit".into(),
                    timeout,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(())
    }

    pub(crate) async fn wait_event<T>(
        &self,
        events: &mut broadcast::Receiver<Event>,
        action: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> Option<T>,
    ) -> Result<T, VmmError> {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if let Some(found) = matches(&event) {
                            return Ok(found);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(VmmError::Exited {
                            action: action.into(),
                        })
                    }
                }
            }
        };
        tokio::select! {
            found = wait => found,
            _ = self.qmp.closed() => Err(VmmError::Exited { action: action.into() }),
            _ = tokio::time::sleep(timeout) => Err(VmmError::GuestTimeout { action: action.into(), timeout }),
        }
    }
}

fn virtio_mem_path() -> String {
    format!("{PERIPHERAL_PREFIX}{VIRTIO_MEM_ID}")
}

pub(crate) fn read_pid(pidfile: &Path) -> Result<Pid, VmmError> {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0)
        .map(Pid::from_raw)
        .ok_or_else(|| VmmError::Pidfile {
            path: pidfile.display().to_string(),
        })
}

/// True when `pid` is a live (not zombie) process whose command line names `qmp_socket`.
pub fn process_serves(pid: Pid, qmp_socket: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may itself hold spaces.
    let zombie = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| state == "Z" || state == "X");
    if zombie {
        return false;
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let needle = qmp_socket.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::CpuProps;

    fn slot(core: i64, qom_path: Option<&str>) -> HotpluggableCpu {
        HotpluggableCpu {
            driver: "qemu64-x86_64-cpu".into(),
            props: CpuProps {
                socket_id: 0,
                core_id: core,
                thread_id: 0,
            },
            qom_path: qom_path.map(str::to_string),
        }
    }

    fn four_slots_two_present() -> Vec<HotpluggableCpu> {
        vec![
            slot(3, None),
            slot(2, None),
            slot(1, Some("/machine/peripheral/cpu1")),
            slot(0, Some("/machine/unattached/device[0]")),
        ]
    }

    #[test]
    fn plugs_lowest_free_cores() {
        let plan = plan_vcpus(&four_slots_two_present(), 4).unwrap();
        let ids: Vec<_> = plan
            .iter()
            .map(|c| match c {
                CpuChange::Plug(add) => add.id.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, ["cpu2", "cpu3"]);
    }

    #[test]
    fn unplugs_only_hotplugged_cpus() {
        assert_eq!(
            plan_vcpus(&four_slots_two_present(), 1).unwrap(),
            vec![CpuChange::Unplug { id: "cpu1".into() }]
        );
        assert!(matches!(
            plan_vcpus(&four_slots_two_present(), 0),
            Err(VmmError::VcpusOutOfRange { fixed: 1, .. })
        ));
    }

    #[test]
    fn no_change_at_target_and_refuses_beyond_slots() {
        assert!(plan_vcpus(&four_slots_two_present(), 2).unwrap().is_empty());
        assert!(matches!(
            plan_vcpus(&four_slots_two_present(), 5),
            Err(VmmError::VcpusOutOfRange { slots: 4, .. })
        ));
    }

    #[test]
    fn own_process_does_not_serve_an_unrelated_socket() {
        let me = Pid::from_raw(std::process::id() as i32);
        assert!(!process_serves(me, Path::new("/nonexistent/qmp.sock")));
        assert!(!process_serves(Pid::from_raw(i32::MAX), Path::new("/")));
    }
}
