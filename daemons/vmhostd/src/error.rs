//! The daemon's error type and the one place it becomes an API error class.

use crate::store::StoreError;
use vmhost_api::{ApiError, ErrorKind, VmState};
use vmhost_capacity::ledger::LedgerError;
use vmhost_guest_link::compute::ComputeError;
use vmhost_guest_link::DownscaleError;
use vmm::VmmError;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no VM named '{0}' on this host")]
    NotFound(String),
    /// A peer's arrival that this host ended before the switchover reached it.
    #[error("VM '{0}' never ran on this host: its migration here ended before the switchover")]
    NeverArrived(String),
    #[error("a VM named '{0}' already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    /// The image named is not configured here; another host of the fleet may have it.
    #[error("{0}")]
    NoImage(String),
    #[error(transparent)]
    Capacity(#[from] LedgerError),
    /// No room here for what was asked, other than in the CPU and memory ledger: the host
    /// drains, or its disks are full.
    #[error("{0}")]
    NoRoom(String),
    #[error("VM '{name}' is {state}; cannot {action} it")]
    WrongState {
        name: String,
        state: VmState,
        action: &'static str,
    },
    #[error("VM '{name}': cannot {action}")]
    Vmm {
        name: String,
        action: &'static str,
        #[source]
        source: VmmError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Vsock(#[from] vmm::vsock::VsockError),
    #[error("VM '{name}': cannot shrink: {source}")]
    Downscale {
        name: String,
        #[source]
        source: DownscaleError,
    },
    /// A request between hosts that failed on the other host or on the way.
    #[error("{0}")]
    Peer(ApiError),
    #[error("VM '{name}': {source}")]
    Compute {
        name: String,
        #[source]
        source: vmhost_guest_link::compute::ComputeError,
    },
}

impl HostError {
    /// The single place where errors become API error classes (and so vmctl exit codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            HostError::NotFound(_) => ErrorKind::NotFound,
            HostError::NeverArrived(_) => ErrorKind::NeverArrived,
            HostError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            HostError::Invalid(_) | HostError::NoImage(_) => ErrorKind::InvalidArgument,
            HostError::Capacity(_) | HostError::NoRoom(_) => ErrorKind::CapacityExceeded,
            HostError::WrongState { .. } => ErrorKind::WrongState,
            HostError::Downscale { .. } => ErrorKind::Refused,
            HostError::Peer(error) => error.kind,
            HostError::Compute { source, .. } => match source {
                ComputeError::Refused { status, .. } if (400..500).contains(status) => {
                    ErrorKind::InvalidArgument
                }
                ComputeError::Unreachable(_) => ErrorKind::WrongState,
                _ => ErrorKind::Internal,
            },
            HostError::Vmm { .. }
            | HostError::Store(_)
            | HostError::Net(_)
            | HostError::Vsock(_) => ErrorKind::Internal,
        }
    }
}

impl From<HostError> for ApiError {
    fn from(error: HostError) -> ApiError {
        match error {
            HostError::Peer(error) => error,
            error => ApiError::new(error.kind(), error_chain(&error)),
        }
    }
}

/// Maps a QEMU failure while doing `action` to VM `name`.
pub fn vmm_error<'a>(
    name: &'a str,
    action: &'static str,
) -> impl FnOnce(VmmError) -> HostError + 'a {
    move |source| HostError::Vmm {
        name: name.into(),
        action,
        source,
    }
}

/// An internal failure described in words.
pub fn internal(message: String) -> ApiError {
    ApiError::new(ErrorKind::Internal, message)
}

/// Wall-clock milliseconds: lease expiries are persisted, so they must survive a restart.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// "outer: cause: root cause", on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let error = HostError::Vmm {
            name: "db1".into(),
            action: "resize",
            source: VmmError::NoHotplugMemory,
        };
        assert_eq!(
            error_chain(&error),
            "VM 'db1': cannot resize: VM has no hotplug memory device; its memory is fixed"
        );
        assert_eq!(ApiError::from(error).kind, ErrorKind::Internal);
    }
}
