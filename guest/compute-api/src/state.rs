//! The compute's state machine and the status computectl reports.

use crate::spec::SpecErrors;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where the compute is, after Neon's compute_ctl:
///
/// ```text
/// Empty ─→ ConfigurationPending ─→ Configuration ─→ Running | Failed
/// Empty ─→ Init ─→ Running | Failed
/// Empty | Running ─→ TerminationPending ─→ Terminated
/// Running | Failed ─→ ConfigurationPending      (a live reconfigure; a corrected spec)
/// Running ─→ Failed                             (the postmaster exited)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeState {
    /// No spec yet: waiting for `POST /configure`.
    Empty,
    /// A configure was accepted and is about to be applied.
    ConfigurationPending,
    /// Starting from a spec found on the VM's disk or the kernel command line.
    Init,
    /// Applying a spec.
    Configuration,
    /// Postgres runs with the spec applied.
    Running,
    /// The last spec could not be applied, or the postmaster exited; see the error.
    Failed,
    /// Postgres is shutting down for good.
    TerminationPending,
    /// Postgres has stopped and stays stopped.
    Terminated,
}

impl ComputeState {
    pub const ALL: [ComputeState; 8] = [
        ComputeState::Empty,
        ComputeState::ConfigurationPending,
        ComputeState::Init,
        ComputeState::Configuration,
        ComputeState::Running,
        ComputeState::Failed,
        ComputeState::TerminationPending,
        ComputeState::Terminated,
    ];

    /// Whether the state machine allows going from `self` to `next`.
    pub fn can_go_to(self, next: ComputeState) -> bool {
        use ComputeState::*;
        matches!(
            (self, next),
            (Empty, ConfigurationPending | Init | TerminationPending)
                | (ConfigurationPending, Configuration)
                | (Configuration | Init, Running | Failed)
                | (Running, ConfigurationPending | TerminationPending | Failed)
                | (Failed, ConfigurationPending)
                | (TerminationPending, Terminated)
        )
    }

    /// The name used in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ComputeState::Empty => "empty",
            ComputeState::ConfigurationPending => "configuration_pending",
            ComputeState::Init => "init",
            ComputeState::Configuration => "configuration",
            ComputeState::Running => "running",
            ComputeState::Failed => "failed",
            ComputeState::TerminationPending => "termination_pending",
            ComputeState::Terminated => "terminated",
        }
    }
}

impl fmt::Display for ComputeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `GET /status` returns (and `POST /configure` and `POST /terminate` once done).
/// Fields added later are optional, so older clients and guests still understand it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeStatus {
    pub state: ComputeState,
    /// Why the compute is `Failed`.
    #[serde(default)]
    pub error: Option<String>,
    /// When computectl started, in Unix milliseconds.
    pub start_time_ms: u64,
    /// When a client last had a query or transaction under way, in Unix milliseconds.
    #[serde(default)]
    pub last_active_ms: Option<u64>,
    /// The build of computectl.
    pub build_tag: String,
    /// The format version of the spec computectl holds, if it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_format_version: Option<u32>,
}

/// The body of every reply that is not a success: `{"error": "...", "errors": [...]}`.
/// `errors` lists each problem of a refused spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ErrorReply {
    pub fn new(error: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: error.into(),
            errors: Vec::new(),
        }
    }

    /// The reply to a spec that was refused.
    pub fn invalid_spec(errors: &SpecErrors) -> ErrorReply {
        ErrorReply {
            error: "invalid compute spec".into(),
            errors: errors.errors().iter().map(|e| e.to_string()).collect(),
        }
    }
}
