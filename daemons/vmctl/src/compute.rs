//! `vmctl compute`: a VM's Postgres compute, as the guest's computectl reports it.

use clap::Subcommand;
use std::path::PathBuf;
use vmhost_api::ComputeAction;
use vmhost_compute_api::ComputeStatus;

#[derive(Subcommand)]
pub enum ComputeCommand {
    /// State, error, start time and last activity.
    Status,
    /// Apply a new spec (JSON) live; the host keeps it as the VM's spec.
    Configure {
        #[arg(value_name = "FILE", value_parser = read_spec)]
        spec: serde_json::Value,
    },
    /// Shut Postgres down fast; the VM keeps running.
    Terminate,
}

impl ComputeCommand {
    pub fn into_action(self) -> ComputeAction {
        match self {
            ComputeCommand::Status => ComputeAction::Status,
            ComputeCommand::Configure { spec } => ComputeAction::Configure { spec },
            ComputeCommand::Terminate => ComputeAction::Terminate,
        }
    }
}

/// A spec file, read where vmctl runs: the host gets its contents, not its path.
pub fn read_spec(path: &str) -> Result<serde_json::Value, String> {
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read spec {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("spec {} is not JSON: {e}", path.display()))
}

pub fn print_status(name: &str, status: &ComputeStatus) {
    let when = |ms: Option<u64>| ms.map_or("-".into(), crate::output::format_unix_ms);
    outln!("compute of {name}: {}", status.state);
    if let Some(error) = &status.error {
        outln!("  error: {error}");
    }
    outln!("  started: {}", when(Some(status.start_time_ms)));
    outln!("  last active: {}", when(status.last_active_ms));
    outln!("  build: {}", status.build_tag);
}
