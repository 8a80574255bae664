//! The guest's vsock endpoint when there is no `/dev/vhost-vsock`: a vhost-user-vsock
//! backend process (rust-vmm's `vhost-device-vsock`) in hybrid mode. A guest connection to
//! CID 2, port P reaches the host unix socket `<uds>_P`.
//!
//! The backend is its own process, like QEMU, so it outlives vmhostd with the VM.

use crate::machine::{process_serves, read_pid};
use nix::sys::signal::{kill, Signal};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// Files of one VM's backend.
#[derive(Debug, Clone)]
pub struct VsockBackend {
    pub binary: PathBuf,
    /// QEMU's side: the vhost-user control socket.
    pub vhost_socket: PathBuf,
    /// The host side: guest connections to port P arrive at `<uds_path>_P`.
    pub uds_path: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot run {binary} (install it with `cargo install vhost-device-vsock`)")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock backend did not create {socket} within {timeout:?}; see {log}")]
    NotReady {
        socket: String,
        log: String,
        timeout: Duration,
    },
}

const READY_TIMEOUT: Duration = Duration::from_secs(10);

impl VsockBackend {
    /// The path vmhostd listens on for guest connections to `port`.
    pub fn host_socket(&self, port: u32) -> PathBuf {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        path.into()
    }

    pub fn is_running(&self) -> bool {
        self.running_pid().is_some()
    }

    /// The backend's process, while it serves this VM's socket.
    pub fn running_pid(&self) -> Option<u32> {
        read_pid(&self.pidfile)
            .ok()
            .filter(|pid| process_serves(*pid, &self.vhost_socket))
            .and_then(|pid| u32::try_from(pid.as_raw()).ok())
    }

    /// Starts the backend unless it already runs, and waits for its control socket.
    pub async fn ensure_running(&self) -> Result<(), VsockError> {
        if self.is_running() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&self.vhost_socket);
        let log = std::fs::File::create(&self.log).map_err(|source| self.spawn_error(source))?;
        let mut child = tokio::process::Command::new(&self.binary)
            .arg("--guest-cid=3")
            .arg("--socket")
            .arg(&self.vhost_socket)
            .arg("--uds-path")
            .arg(&self.uds_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|source| self.spawn_error(source))?)
            .stderr(log)
            // Its own process group: signals aimed at vmhostd's group do not reach it.
            .process_group(0)
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&self.pidfile, pid.to_string());
        }
        // Reap it if it ends while this vmhostd runs.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.vhost_socket.exists() {
            if Instant::now() >= deadline {
                self.stop();
                return Err(VsockError::NotReady {
                    socket: self.vhost_socket.display().to_string(),
                    log: self.log.display().to_string(),
                    timeout: READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops the backend, waits for it to go, and starts a fresh one: a vhost-user
    /// backend serves one QEMU connection, and a replugged device needs a new one.
    pub async fn restart(&self) -> Result<(), VsockError> {
        let old = read_pid(&self.pidfile)
            .ok()
            .filter(|pid| process_serves(*pid, &self.vhost_socket));
        self.stop();
        if let Some(pid) = old {
            let deadline = Instant::now() + READY_TIMEOUT;
            while process_serves(pid, &self.vhost_socket) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.ensure_running().await
    }

    pub fn stop(&self) {
        if let Ok(pid) = read_pid(&self.pidfile) {
            if process_serves(pid, &self.vhost_socket) {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }

    fn spawn_error(&self, source: std::io::Error) -> VsockError {
        VsockError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        }
    }
}

/// Whether the kernel's vhost-vsock is available (then QEMU uses `vhost-vsock-pci`).
pub fn kernel_vhost_vsock_available() -> bool {
    Path::new("/dev/vhost-vsock").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_socket_appends_the_port() {
        let backend = VsockBackend {
            binary: "vhost-device-vsock".into(),
            vhost_socket: "/s/vhost.sock".into(),
            uds_path: "/s/vsock.sock".into(),
            pidfile: "/s/vsock.pid".into(),
            log: "/s/vsock.log".into(),
        };
        assert_eq!(
            backend.host_socket(1024),
            PathBuf::from("/s/vsock.sock_1024")
        );
        assert!(!backend.is_running());
    }
}
