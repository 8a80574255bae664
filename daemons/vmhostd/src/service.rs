//! vmhostd as a systemd service: logs to journald with fields to filter on, readiness and
//! status lines, and a watchdog that stops being fed when the daemon wedges.

use crate::host::Host;
use sd_notify::NotifyState;
use std::sync::Arc;

/// Logs go to journald under systemd, to stderr otherwise (or if journald is unreachable).
/// In the journal, each event's fields are fields of their own (`VM=db1`), and every entry
/// carries `HOST=`: `journalctl -u vmhostd VM=db1`.
pub fn init_logging(host_name: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald
                .with_field_prefix(None)
                .with_custom_fields([("HOST", host_name)]);
            registry.with(journald).init();
            return;
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

/// Tells systemd what vmhostd is doing (`systemctl status` shows it).
/// Marks every descriptor vmhostd inherited beyond stdio close-on-exec. A shell's or a
/// supervisor's descriptors are not the VMs' business, and QEMU daemonizes: it would hold
/// them, a lock file among them, for as long as its VM runs.
pub fn keep_inherited_descriptors() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing and touches no memory; it
    // only sets a flag on descriptors, which no code here relies on being unset.
    let marked = unsafe {
        nix::libc::close_range(
            3,
            nix::libc::c_uint::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC as _,
        )
    };
    if marked != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot mark inherited descriptors close-on-exec: QEMU may inherit them"
        );
    }
}

pub fn status(text: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(text)]);
}

pub fn ready(host: &Host) {
    status(&serving(host));
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

fn serving(host: &Host) -> String {
    match host.list().len() {
        1 => "serving 1 VM".into(),
        n => format!("serving {n} VMs"),
    }
}

/// Feeds systemd's watchdog at half its interval, each time after reading the VM table
/// the API serves from: a wedged runtime or a VM table stuck behind its lock starves the
/// watchdog, and systemd restarts vmhostd (its VMs keep running). Keeps the status line's
/// VM count current on the way.
pub fn spawn_watchdog(host: Arc<Host>) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut shown = String::new();
        loop {
            let now = serving(&host);
            if now != shown {
                status(&now);
                shown = now;
            }
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            tokio::time::sleep(timeout / 2).await;
        }
    });
}
