//! vmhostd's local API: one JSON request per line on a unix socket, one JSON response per
//! line back. Shared by `vmhostd` (server) and `vmctl` (client) so both speak the same types.

pub mod client;
pub mod drain;
pub mod peer;
pub mod units;

pub use client::{call, call_stream, ClientError};

pub use drain::{DrainHost, DrainPhase, DrainReport, DrainVm, VmMove, MAX_DRAIN_PARALLEL};

pub use peer::{
    PeerCall, PeerEnvelope, PeerRequest, PEER_API_VERSION, PEER_API_VERSION_MIN, PEER_ONLY_OPS,
};
pub use units::{ComputeUnits, CuShape, Resources};

use serde::{Deserialize, Serialize};

/// Version of this API; a server refuses requests from a different major version.
pub const API_VERSION: u32 = 1;
/// The longest request line the server reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What a VM should boot from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRef {
    /// An image named in the host config (`test`, `postgres`, ...).
    Named(String),
    /// A directory holding `vmlinuz` and `initrd.img`.
    Path(std::path::PathBuf),
}

impl ImageRef {
    /// `test`, `postgres` or any bare word is a configured image; anything with a `/` is a path.
    pub fn parse(s: &str) -> ImageRef {
        if s.contains('/') {
            ImageRef::Path(s.into())
        } else {
            ImageRef::Named(s.into())
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Named(name) => f.write_str(name),
            ImageRef::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: String,
    pub image: ImageRef,
    pub min_cu: ComputeUnits,
    pub max_cu: ComputeUnits,
    /// Starting size; `min_cu` when absent.
    pub cu: Option<ComputeUnits>,
    /// Let the host's agent size the VM within its bounds.
    #[serde(default = "yes")]
    pub autoscale: bool,
    /// Per-VM overrides of the host's `[agent]` settings, by key.
    #[serde(default)]
    pub agent: std::collections::BTreeMap<String, serde_json::Value>,
    /// A lease this host granted for the VM (placement from another host): creating the VM
    /// commits it instead of booking anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
    /// Size of the VM's own writable disk (`/dev/vda` in the guest), in GiB; none if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u32>,
    /// The id the image must have on this host. Set when a VM moves: its root file system
    /// must be the same one on every host it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The compute spec handed to the guest's computectl when it first asks (Postgres
    /// images). The guest judges it; the host only keeps and delivers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_spec: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// The largest disk a VM may have (16 TiB).
pub const MAX_DISK_GIB: u32 = 16384;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Create(CreateVm),
    List,
    Show {
        name: String,
    },
    Scale {
        name: String,
        cu: ComputeUnits,
        /// Skip the guest monitor's approval of a downscale.
        #[serde(default)]
        force: bool,
    },
    Stop {
        name: String,
    },
    Start {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Change a VM's bounds while it runs (within the sizes its QEMU was started with).
    Bounds {
        name: String,
        min_cu: ComputeUnits,
        max_cu: ComputeUnits,
    },
    Host,
    /// Scaling events, of one VM or all; with `follow`, new ones stream as they happen.
    Events {
        name: Option<String>,
        #[serde(default)]
        follow: bool,
    },
    /// The VMs of every reachable host of the fleet.
    FleetList,
    /// The fleet's hosts as gossip shows them.
    Hosts,
    /// Runs `request` on the fleet host `host`, through this daemon.
    OnHost {
        host: String,
        request: Box<Request>,
    },
    /// Moves a running VM of this host to another host while it runs; progress streams
    /// back as `MigrationProgress` replies, ending with `Migrated`.
    Migrate(MigrateVm),
    /// Moves every VM of this host away and takes no new ones until `Undrain`.
    Drain(DrainHost),
    Undrain,
    /// How far this host's drain got.
    DrainStatus,
    /// Asks the Postgres compute manager (computectl) in a VM's guest.
    Compute {
        name: String,
        action: ComputeAction,
    },
}

/// What `Request::Compute` asks of a VM's computectl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ComputeAction {
    Status,
    /// Keep `spec` as the VM's compute spec and apply it in the guest now.
    Configure {
        spec: serde_json::Value,
    },
    /// A fast shutdown of Postgres; the VM keeps running.
    Terminate,
}

impl Request {
    /// Whether the request involves other hosts than the one that runs it.
    pub fn fans_out(&self) -> bool {
        matches!(
            self,
            Request::FleetList | Request::Hosts | Request::OnHost { .. } | Request::Migrate(_)
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateVm {
    pub name: String,
    /// The target host; the live host with the most free memory when absent.
    #[serde(default)]
    pub to: Option<String>,
    /// Never switch to post-copy: the guest runs on the source until the switchover.
    #[serde(default)]
    pub precopy_only: bool,
    /// Longest pause at the switchover, in milliseconds (QEMU's `downtime-limit`).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Cap on the migration stream, in MiB/s; unlimited when absent.
    #[serde(default)]
    pub bandwidth_mib: Option<u64>,
    /// Finish a post-copy migration left paused (its link stayed down past the recovery
    /// window, or this host's vmhostd restarted during it), toward the host it was going to.
    #[serde(default)]
    pub resume: bool,
}

/// The version of the migration start message (`IncomingMigration`) this build sends.
/// Version 1 had no version field.
pub const MIGRATION_VERSION: u32 = 2;
/// The oldest start message version a target still accepts.
pub const MIGRATION_VERSION_MIN: u32 = 1;

fn migration_version_1() -> u32 {
    1
}

/// What a target host needs to receive a VM: the migration's start message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingMigration {
    #[serde(default = "migration_version_1")]
    pub version: u32,
    /// The VM as its QEMU was started (bounds included), with the lease the target granted.
    pub vm: CreateVm,
    /// Its bounds now, which may be narrower than those its QEMU was started with.
    pub bounds: (ComputeUnits, ComputeUnits),
    /// vCPUs the VM runs now (its QEMU must be started with the same devices).
    pub vcpus: u32,
    /// Hotplug memory to plug again on arrival (it was unplugged for the move).
    pub restore_hotplug_memory_bytes: u64,
    pub postcopy: bool,
    /// The tunnel the source will open for the migration stream.
    pub tunnel: u64,
    /// The tunnel the source will open to copy the VM's disk, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_tunnel: Option<u64>,
}

/// One progress report of a running migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub vm: String,
    pub target: String,
    /// QEMU's migration status, or vmhost's own step before QEMU starts.
    pub phase: String,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub rate_mbps: f64,
    pub elapsed_ms: u64,
}

/// The outcome of a finished migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// How long the guest was paused at the switchover, as QEMU measured it.
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub transferred_bytes: u64,
    pub postcopy: bool,
    /// Times a broken link was recovered during post-copy.
    pub recoveries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU is being started.
    Starting,
    Running,
    /// Stopped by an operator; holds no host resources.
    Stopped,
    /// QEMU went away without being asked to.
    Crashed,
    /// Being moved to or from another host.
    Migrating,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Migrating => "migrating",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    pub cu: ComputeUnits,
    pub min_cu: ComputeUnits,
    pub max_cu: ComputeUnits,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub accel: String,
    pub image: String,
    pub host: String,
    pub autoscale: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u32>,
    /// What the agent wants, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goal_cu: Option<ComputeUnits>,
    pub pid: Option<i32>,
    pub serial_log: String,
    /// The guest link, while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    /// QEMU's own run state (`running`, `paused`, ...), asked live by `show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_status: Option<String>,
    /// Its Postgres compute as computectl last reported it, for a VM with a compute spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<vmhost_compute_api::ComputeStatus>,
}

/// What vmhostd knows of the guest through its monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub connected: bool,
    /// False once the guest has been silent for too long.
    pub healthy: bool,
    pub protocol_version: Option<u16>,
    pub online_cpus: Option<u32>,
    pub mem_total_bytes: Option<u64>,
    pub metrics: Option<vmhost_guest_protocol::Metrics>,
    /// The fast CPU signal of those metrics, from a guest speaking protocol 2 or later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<vmhost_guest_protocol::CpuUsage>,
    pub metrics_age_ms: Option<u64>,
    pub upscale_requests: u64,
    pub protocol_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub accel: String,
    pub accel_reason: String,
    pub cu_shape: CuShape,
    pub capacity: Resources,
    pub allocated: Resources,
    /// Held by leases granted to other hosts.
    #[serde(default)]
    pub leased: Resources,
    pub vms: usize,
    /// The VMs' disks, at their full (sparse) size, against what they may add up to.
    #[serde(default)]
    pub disk_allocated_gib: u64,
    #[serde(default)]
    pub disk_capacity_gib: u64,
}

/// A fleet host as the gossip view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetHost {
    pub name: String,
    pub addr: String,
    /// False once the failure detector gives up on it.
    pub live: bool,
    pub cu_shape: CuShape,
    pub capacity: Resources,
    pub allocated: Resources,
    pub leased: Resources,
    pub vms: u32,
    pub version: String,
    /// Set while the host drains.
    #[serde(default)]
    pub drain: Option<DrainPhase>,
}

/// One scaling event: a decision of the agent, its outcome, or an operator's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub unix_ms: u64,
    pub vm: String,
    pub kind: EventKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The agent chose an action (inputs, goal and action in the message).
    Decision,
    /// A resize was applied.
    Scaled,
    /// The ledger had no (or only partial) room.
    CapacityRefused,
    /// The guest's monitor vetoed a downscale.
    DownscaleDenied,
    /// The guest's monitor asked for memory.
    UpscaleRequested,
    Failed,
    /// An operator's command (scale, bounds).
    Operator,
    /// The host chose to move the VM away to get below its watermark (numbers in the
    /// message).
    Rebalance,
    /// The VM's move during a drain of its host.
    Drain,
}

impl EventKind {
    /// Whether the event is about the host's choices rather than the VM's own life, so it
    /// stays in the host's history after the VM leaves.
    pub fn outlives_vm(self) -> bool {
        matches!(self, EventKind::Rebalance | EventKind::Drain)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self).ok();
        f.write_str(text.as_ref().and_then(|v| v.as_str()).unwrap_or("event"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Reply {
    Vm(Box<VmInfo>),
    Vms(Vec<VmInfo>),
    /// The fleet's VMs, and the hosts that could not be asked.
    FleetVms {
        vms: Vec<VmInfo>,
        unreachable: Vec<String>,
    },
    Host(HostInfo),
    Hosts(Vec<FleetHost>),
    Deleted {
        name: String,
    },
    Events(Vec<Event>),
    /// One event of a followed stream.
    Event(Event),
    MigrationProgress(MigrationProgress),
    Migrated(MigrationSummary),
    Drain(DrainReport),
    /// A VM's compute, as its computectl reports it.
    Compute {
        name: String,
        status: vmhost_compute_api::ComputeStatus,
    },
}

/// Error classes; each maps to one `vmctl` exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    CapacityExceeded,
    /// The VM is in a state where the action is not possible.
    WrongState,
    /// The guest's monitor vetoed the change.
    Refused,
    Internal,
    /// A migration target ended the VM's arrival before the switchover reached it.
    NeverArrived,
}

impl ErrorKind {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::InvalidArgument => 2,
            ErrorKind::NotFound | ErrorKind::NeverArrived => 3,
            ErrorKind::AlreadyExists => 4,
            ErrorKind::CapacityExceeded => 5,
            ErrorKind::WrongState => 6,
            ErrorKind::Refused => 7,
            ErrorKind::Internal => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(ApiError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_stable() {
        let envelope = Envelope {
            version: API_VERSION,
            request: Request::Scale {
                name: "db1".into(),
                cu: "1.5".parse().unwrap(),
                force: false,
            },
        };
        let json = serde_json::to_string(&envelope).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"op":"scale","name":"db1","cu":1.5,"force":false}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&json).unwrap(), envelope);
    }

    #[test]
    fn image_ref_parses_names_and_paths() {
        assert_eq!(ImageRef::parse("test"), ImageRef::Named("test".into()));
        assert_eq!(ImageRef::parse("./img"), ImageRef::Path("./img".into()));
    }

    #[test]
    fn invalid_cu_in_a_request_is_rejected_by_the_decoder() {
        let json = r#"{"version":1,"op":"scale","name":"db1","cu":0.3}"#;
        assert!(serde_json::from_str::<Envelope>(json).is_err());
    }
}
