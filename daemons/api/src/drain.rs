//! Draining a host: the operator's order, and the report of how far it got.

use serde::{Deserialize, Serialize};

/// `vmctl drain`: move every VM of a host away, then keep it empty until undrained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainHost {
    /// Move a VM that cannot move live by stopping it and starting it on another host
    /// (its disk and spec move; its RAM is lost).
    #[serde(default)]
    pub cold: bool,
    /// How many VMs move at once.
    #[serde(default = "one")]
    pub parallel: u32,
}

/// The most VMs a drain moves at once: each is a QEMU stream through the host's uplink.
pub const MAX_DRAIN_PARALLEL: u32 = 8;

fn one() -> u32 {
    1
}

/// A host's drain, as gossip and `vmctl hosts` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainPhase {
    /// Takes no placements or arrivals; VMs are still leaving.
    Draining,
    /// Takes nothing and holds no VM.
    Drained,
}

impl std::fmt::Display for DrainPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainPhase::Draining => "draining",
            DrainPhase::Drained => "drained",
        })
    }
}

/// Where one VM of a draining host is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmMove {
    /// Not started yet.
    Waiting,
    /// Migrating live; `percent` of its memory has been sent.
    Moving {
        to: String,
        percent: u32,
    },
    /// Stopped here, its disk and spec on their way; it boots again there.
    MovingCold {
        to: String,
    },
    Moved {
        to: String,
    },
    /// Moved by a stop and a start: the guest lost its RAM.
    MovedCold {
        to: String,
    },
    /// Cannot move (live, or cold without `--cold`); tried again later.
    Stuck {
        reason: String,
    },
}

impl VmMove {
    pub fn in_progress(&self) -> bool {
        matches!(
            self,
            VmMove::Waiting | VmMove::Moving { .. } | VmMove::MovingCold { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainVm {
    pub name: String,
    #[serde(flatten)]
    pub state: VmMove,
    /// Moves tried so far.
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    pub host: String,
    /// None when the host is not draining.
    pub phase: Option<DrainPhase>,
    pub order: Option<DrainHost>,
    /// Every VM the drain has seen on this host, moved ones included.
    pub vms: Vec<DrainVm>,
}

impl DrainReport {
    /// Nothing is moving or waiting to: the host is drained, or what is left is stuck.
    pub fn settled(&self) -> bool {
        !self.vms.iter().any(|vm| vm.state.in_progress())
    }
}
