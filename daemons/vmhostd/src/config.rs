//! The host config file (TOML).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmhost_api::{CuShape, Resources};
use vmm::AccelChoice;

/// Memory per CU must split into quarter CUs that are whole Linux memory blocks (128 MiB).
const MEMORY_PER_CU_STEP_MIB: u64 = 512;
/// Keep sizes in bytes and vCPUs, up to those of a VM of `MAX_CU` compute units, within
/// their integers (2 PiB is far past any host).
const MAX_MEMORY_MIB: u64 = 1 << 31;
const MAX_VCPUS_PER_CU: u32 = u32::MAX / vmhost_api::units::MAX_CU;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's name in listings; defaults to the system hostname.
    pub host_name: Option<String>,
    pub state_dir: PathBuf,
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// The group that may use the API socket (mode 0660); root's alone when absent.
    #[serde(default)]
    pub api_group: Option<String>,
    #[serde(default)]
    pub accel: AccelChoice,
    #[serde(default = "default_qemu_binary")]
    pub qemu_binary: PathBuf,
    /// The vhost-user vsock backend (rust-vmm's vhost-device-vsock).
    #[serde(default = "default_vsock_backend")]
    pub vsock_backend: PathBuf,
    pub capacity: Capacity,
    #[serde(default)]
    pub compute_unit: ComputeUnitConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub guest: GuestConfig,
    /// The autoscaling agent's thresholds and intervals; VMs may override any of them.
    #[serde(default)]
    pub agent: vmhost_agent::AgentConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub cgroups: CgroupConfig,
    #[serde(default)]
    pub images: BTreeMap<String, ImageConfig>,
    /// Membership in a fleet of hosts; without it the host stands alone.
    pub fleet: Option<FleetConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Hosts gossip only with hosts of the same cluster.
    pub cluster: String,
    /// The UDP address of this host's QUIC endpoint.
    pub listen: std::net::SocketAddr,
    /// The address peers dial, when it differs from `listen` (a wildcard `listen`).
    pub advertise: Option<std::net::SocketAddr>,
    /// Fleet addresses of a few hosts to join through.
    #[serde(default)]
    pub seeds: Vec<std::net::SocketAddr>,
    /// The folder `vmctl fleet issue-cert` wrote for this host (its name must be the
    /// certificate's host name, and `advertise` the certificate's address).
    pub credentials: PathBuf,
    #[serde(default = "default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
    /// A host the failure detector gave up on is forgotten after this long.
    #[serde(default = "default_dead_host_grace_secs")]
    pub dead_host_grace_secs: u64,
    /// The lease this host asks for when it places a VM on another host.
    #[serde(default = "default_lease_ttl_secs")]
    pub lease_ttl_secs: u64,
    /// The share of memory capacity beyond which this host takes no placements.
    #[serde(default = "default_watermark")]
    pub watermark: f64,
    /// Allocated + leased memory above `watermark - watermark_hysteresis` (shares of
    /// capacity) is where a host that passed its watermark aims to get back to.
    #[serde(default = "default_watermark_hysteresis")]
    pub watermark_hysteresis: f64,
    /// Whether this host migrates VMs away when it passes its watermark, or when an
    /// upscale here is refused for lack of room.
    #[serde(default = "yes")]
    pub rebalance: bool,
    /// A VM that arrived by migration is not moved on by the rebalancer for this long.
    #[serde(default = "default_rebalance_cooldown_secs")]
    pub rebalance_cooldown_secs: u64,
    /// Migrations this host starts on its own at once (drains and rebalancing; an
    /// operator's `vmctl migrate` is not held back).
    #[serde(default = "default_max_concurrent_migrations")]
    pub max_concurrent_migrations: u32,
    /// How long a link that breaks during a post-copy migration may stay down before this
    /// host stops trying to recover it (the VM then stays paused, never lost).
    #[serde(default = "default_migration_recover_secs")]
    pub migration_recover_secs: u64,
    /// Whether operator commands that change VMs (create, scale, stop, start, delete,
    /// bounds) are taken from other fleet hosts (`vmctl --host`). Read-only queries, and
    /// what a peer does under a lease it holds, are always taken.
    #[serde(default = "yes")]
    pub trust_forwarded_commands: bool,
    /// Hosts refused both ways, by the name their certificate gives: revoked hosts. A reload
    /// (SIGHUP) applies it, and closes their open connections.
    #[serde(default)]
    pub denied_hosts: std::collections::BTreeSet<String>,
}

fn default_gossip_interval_ms() -> u64 {
    500
}
fn default_dead_host_grace_secs() -> u64 {
    600
}
fn default_lease_ttl_secs() -> u64 {
    30
}
fn default_migration_recover_secs() -> u64 {
    300
}
fn yes() -> bool {
    true
}

fn default_watermark() -> f64 {
    1.0
}
fn default_watermark_hysteresis() -> f64 {
    0.05
}
fn default_rebalance_cooldown_secs() -> u64 {
    600
}
fn default_max_concurrent_migrations() -> u32 {
    2
}

impl FleetConfig {
    pub fn advertise(&self) -> std::net::SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }

    fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() {
            return Err("fleet.cluster must not be empty".into());
        }
        if self.advertise().ip().is_unspecified() || self.advertise().port() == 0 {
            return Err(format!(
                "fleet.advertise must be a concrete address peers can dial (listen is {})",
                self.listen
            ));
        }
        if !(50..=60_000).contains(&self.gossip_interval_ms) {
            return Err("fleet.gossip_interval_ms must be between 50 and 60000".into());
        }
        if !(1..=120).contains(&self.lease_ttl_secs) {
            return Err("fleet.lease_ttl_secs must be between 1 and 120".into());
        }
        if !(1..=86_400).contains(&self.migration_recover_secs) {
            return Err("fleet.migration_recover_secs must be between 1 and 86400".into());
        }
        if !(self.watermark > 0.0 && self.watermark <= 1.0) {
            return Err("fleet.watermark must be in (0, 1]".into());
        }
        if !(0.0..self.watermark).contains(&self.watermark_hysteresis) {
            return Err(
                "fleet.watermark_hysteresis must be at least 0 and below fleet.watermark".into(),
            );
        }
        if !(1..=vmhost_api::MAX_DRAIN_PARALLEL).contains(&self.max_concurrent_migrations) {
            return Err(format!(
                "fleet.max_concurrent_migrations must be between 1 and {}",
                vmhost_api::MAX_DRAIN_PARALLEL
            ));
        }
        if self.rebalance_cooldown_secs > 7 * 86_400 {
            return Err("fleet.rebalance_cooldown_secs must be at most a week".into());
        }
        if !self.credentials.is_absolute() {
            return Err("fleet.credentials must be an absolute path".into());
        }
        if let Some(name) = self
            .denied_hosts
            .iter()
            .find(|n| n.is_empty() || n.trim() != *n)
        {
            return Err(format!("fleet.denied_hosts: '{name}' is not a host name"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// How long the monitor has to answer a downscale request.
    pub downscale_answer_secs: u64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            downscale_answer_secs: 10,
        }
    }
}

/// Per-VM cgroups: each VM's QEMU and vsock backend limited to the VM's size.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    pub enabled: bool,
    /// QEMU's own memory beyond the guest's, added to each VM's memory limit; by default
    /// 128 MiB under KVM and 512 MiB under TCG, whose translated code takes memory too.
    pub qemu_overhead_mib: Option<u64>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enabled: true,
            qemu_overhead_mib: None,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: ([127, 0, 0, 1], 9464).into(),
        }
    }
}

/// What this host may give out to VMs.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// What the VMs' disks may add up to, as created (they are sparse, so they can fill
    /// only this much); the size of the state directory's filesystem when absent.
    #[serde(default)]
    pub disk_gib: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeUnitConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl Default for ComputeUnitConfig {
    fn default() -> Self {
        ComputeUnitConfig {
            vcpus: 1,
            memory_mib: 4096,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
pub enum NetworkConfig {
    #[default]
    None,
    /// Each VM gets a tap device enslaved to this existing bridge.
    Tap { bridge: String },
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A single QMP command.
    pub qmp_secs: u64,
    /// The guest's acknowledgement of one resize.
    pub hotplug_secs: u64,
    /// How long a guest may take to power off before QEMU is made to quit.
    pub stop_grace_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            qmp_secs: 10,
            hotplug_secs: 60,
            stop_grace_secs: 30,
        }
    }
}

impl Timeouts {
    pub fn qmp(&self) -> Duration {
        Duration::from_secs(self.qmp_secs)
    }
    pub fn hotplug(&self) -> Duration {
        Duration::from_secs(self.hotplug_secs)
    }
    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_secs)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// A root file system shared read-only by every VM of the image (the Postgres image's
    /// `root.img`). Its VMs keep their writable state on their own disk, so they need one.
    #[serde(default)]
    pub root: Option<PathBuf>,
}

fn default_api_socket() -> PathBuf {
    "/run/vmhost/vmhostd.sock".into()
}
fn default_vsock_backend() -> PathBuf {
    "vhost-device-vsock".into()
}
fn default_qemu_binary() -> PathBuf {
    "qemu-system-x86_64".into()
}
pub fn default_cmdline() -> String {
    vmm::cmdline::DEFAULT_KERNEL_CMDLINE.into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// The config and the TOML table it came from, which tells what a reload changes.
    pub fn load_with_table(path: &Path) -> Result<(Config, toml::Table), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parse = |e: toml::de::Error| ConfigError::Parse {
            path: path.display().to_string(),
            // toml's message spans several lines with a source excerpt; keep it to one.
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        };
        let config: Config = toml::from_str(&text).map_err(parse)?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        Ok((config, toml::from_str(&text).map_err(parse)?))
    }

    fn validate(&self) -> Result<(), String> {
        if self.capacity.vcpus == 0 || self.capacity.memory_mib == 0 {
            return Err("capacity.vcpus and capacity.memory_mib must be positive".into());
        }
        if self.capacity.disk_gib == Some(0) {
            return Err(
                "capacity.disk_gib must be positive (leave it out for the filesystem's size)"
                    .into(),
            );
        }
        if self.compute_unit.vcpus == 0 {
            return Err("compute_unit.vcpus must be positive".into());
        }
        if self.compute_unit.memory_mib == 0
            || !self
                .compute_unit
                .memory_mib
                .is_multiple_of(MEMORY_PER_CU_STEP_MIB)
        {
            return Err(format!(
                "compute_unit.memory_mib must be a positive multiple of {MEMORY_PER_CU_STEP_MIB} \
                 (so a quarter CU is whole 128 MiB memory blocks), got {}",
                self.compute_unit.memory_mib
            ));
        }
        if self.capacity.memory_mib > MAX_MEMORY_MIB
            || self.compute_unit.memory_mib > MAX_MEMORY_MIB
        {
            return Err(format!(
                "capacity.memory_mib and compute_unit.memory_mib must be at most {MAX_MEMORY_MIB}"
            ));
        }
        if self.compute_unit.vcpus > MAX_VCPUS_PER_CU {
            return Err(format!(
                "compute_unit.vcpus must be at most {MAX_VCPUS_PER_CU}"
            ));
        }
        self.agent.validate().map_err(|e| format!("[agent]: {e}"))?;
        if self.timeouts.qmp_secs == 0 || self.timeouts.hotplug_secs == 0 {
            return Err("timeouts must be positive".into());
        }
        if !self.state_dir.is_absolute() || !self.api_socket.is_absolute() {
            return Err("state_dir and api_socket must be absolute paths".into());
        }
        for (name, image) in &self.images {
            if name.contains('/') || name.is_empty() {
                return Err(format!("image name '{name}' must be a plain word"));
            }
            if !image.kernel.is_absolute()
                || [&image.initrd, &image.root]
                    .into_iter()
                    .flatten()
                    .any(|p| !p.is_absolute())
            {
                return Err(format!(
                    "images.{name}: kernel, initrd and root must be absolute paths"
                ));
            }
        }
        if let Some(fleet) = &self.fleet {
            fleet.validate()?;
            if self
                .host_name
                .as_ref()
                .is_some_and(|own| fleet.denied_hosts.contains(own))
            {
                return Err("fleet.denied_hosts names this host".into());
            }
        }
        if let NetworkConfig::Tap { bridge } = &self.network {
            if bridge.is_empty() || bridge.len() > 15 {
                return Err(format!(
                    "network.bridge '{bridge}' is not a valid interface name"
                ));
            }
        }
        Ok(())
    }

    pub fn cu_shape(&self) -> CuShape {
        CuShape {
            vcpus_per_cu: self.compute_unit.vcpus,
            memory_per_cu_bytes: self.compute_unit.memory_mib << 20,
        }
    }

    pub fn capacity(&self) -> Resources {
        Resources {
            vcpus: self.capacity.vcpus,
            memory_bytes: self.capacity.memory_mib << 20,
        }
    }

    pub fn host_name(&self) -> String {
        self.host_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into())
        })
    }
}

#[cfg(test)]
mod tests;
