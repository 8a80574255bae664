//! The state directory: one folder per VM holding its spec, QMP socket, serial log and
//! pidfile, plus a lock that keeps a second vmhostd away.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use vmhost_api::{ComputeUnits, CuShape, ImageRef};
use vmhost_capacity::ledger::Ledger;

const SPEC_FILE: &str = "spec.json";
const LEASES_FILE: &str = "leases.json";
const DRAIN_FILE: &str = "drain.json";
const DISK_FILE: &str = "disk.raw";
/// What an arriving VM's migration is, for a restarted vmhostd to follow it again.
const ARRIVAL_FILE: &str = "arrival.json";
/// A cold move whose boot on the target was asked for, until its outcome is known.
const COLD_MOVE_FILE: &str = "cold-move.json";

/// Facts about a VM's running QEMU that a restarted vmhostd must know, kept as files in its
/// folder: empty, except that `leaving` records the departure once its target is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Its migration away has begun and not ended.
    Leaving,
    /// The QEMU had a vCPU unplugged (see `migration::outgoing`); a fresh QEMU has none.
    VcpuUnplugged,
    /// Source: the target runs the VM now. This copy is stale and never runs again.
    HandedOver,
    /// Source: the migration was switched to post-copy; from then on the target holds the
    /// running guest, and this copy must never run on its own again.
    Postcopy,
    /// Target: the migration switched over. From then on this folder holds the only
    /// up-to-date disk and is never removed for a failed arrival.
    SwitchedOver,
}

impl Marker {
    fn file(self) -> &'static str {
        match self {
            Marker::Leaving => "leaving",
            Marker::VcpuUnplugged => "vcpu-unplugged",
            Marker::HandedOver => "handed-over",
            Marker::Postcopy => "postcopy",
            Marker::SwitchedOver => "switched-over",
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path).or_else(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    })
}

/// A JSON file's value, or `None` if there is no such file.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => parse_json(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("cannot read", path)(e)),
    }
}

/// Where a leaving VM's migration goes: the target host, the tunnel its stream takes there,
/// and the lease the target granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub target: String,
    pub tunnel: u64,
    pub lease: u64,
}

/// A raw disk image of `bytes` that takes no room until written, readable by root alone.
fn create_sparse(path: &Path, bytes: u64) -> Result<(), StoreError> {
    File::options()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)
        .and_then(|file| file.set_len(bytes))
        .map_err(io_error("cannot create disk", path))
}

/// A guest's disk and console are its tenant's data: no other local user reads them.
pub const PRIVATE_FILE: u32 = 0o600;
const PRIVATE_DIR: u32 = 0o700;

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(PRIVATE_DIR).create(path)
}

/// A cold move that asked its target to boot the VM: until the target's answer is known,
/// the VM may run there, so it never starts here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdMove {
    pub target: String,
    /// It ran here before the move: if the target never booted it, it starts here again.
    pub restart: bool,
}

/// Write, fsync, rename, fsync the folder: a crash leaves the old file or the new one,
/// never half of one, and the rename itself survives a power loss.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io_error("cannot write", &tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("cannot replace", path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir).map_err(io_error("cannot sync", dir)),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An arriving VM's migration, as `arrival.json` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arrival {
    #[serde(flatten)]
    pub migration: vmhost_api::IncomingMigration,
    /// The host that sends it, as its certificate names it; only it may resume the
    /// migration. Absent in files written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What must survive a restart of vmhostd, for one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub image: ImageRef,
    pub boot: BootSource,
    /// The CU shape at creation: the VM's QEMU was sized with it, whatever the config says now.
    pub cu_shape: CuShape,
    pub min_cu: ComputeUnits,
    pub max_cu: ComputeUnits,
    /// The size last applied.
    pub cu: ComputeUnits,
    /// Whether the operator wants it running.
    pub run: bool,
    /// Whether the agent sizes it.
    #[serde(default = "yes")]
    pub autoscale: bool,
    /// Overrides of the host's `[agent]` settings.
    #[serde(default)]
    pub agent: std::collections::BTreeMap<String, serde_json::Value>,
    /// The bounds its running QEMU was started with: live bounds changes stay within them.
    #[serde(default)]
    pub launched_bounds: Option<(ComputeUnits, ComputeUnits)>,
    /// Still arriving from another host: its QEMU is a migration target, not yet the VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incoming: bool,
    /// Size of its writable disk, `disk.raw` in its folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u32>,
    /// The compute spec for the guest's computectl (see `compute.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_spec: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

impl VmSpec {
    /// The memory and vCPUs its QEMU was started with, which no later bounds change moves:
    /// hotplug sizes are counted from there.
    pub fn boot_resources(&self) -> vmhost_api::Resources {
        let (min, _) = self.launched_bounds.unwrap_or((self.min_cu, self.max_cu));
        self.cu_shape.resources(min)
    }
}

/// Resolved at creation, so a later change of the config's images does not change a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The image's shared read-only root file system, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// The image's identity, the hash its builder wrote beside the root (`image-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another vmhostd already uses state directory {0}")]
    Locked(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt VM file {path}: {message}")]
    Corrupt { path: String, message: String },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// The locked state directory.
pub struct Store {
    root: PathBuf,
    _lock: File,
}

/// Paths of one VM's files.
pub struct VmPaths {
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
    pub vsock: vmm::vsock::VsockBackend,
}

impl Store {
    /// Opens (creating if needed) and locks the state directory. The lock is released by the
    /// kernel when the process dies, so a SIGKILLed vmhostd never leaves it stale.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let vms = root.join("vms");
        std::fs::create_dir_all(&vms)
            .and_then(|()| {
                std::fs::set_permissions(&vms, std::fs::Permissions::from_mode(PRIVATE_DIR))
            })
            .map_err(io_error("cannot create", root))?;
        let lock_path = root.join("vmhostd.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(root.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_error("cannot lock", &lock_path)(e))
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn vm_paths(&self, name: &str, vsock_binary: &Path) -> VmPaths {
        let dir = self.vm_dir(name);
        VmPaths {
            vsock: vmm::vsock::VsockBackend {
                binary: vsock_binary.to_path_buf(),
                vhost_socket: dir.join("vhost-vsock.sock"),
                uds_path: dir.join("vsock.sock"),
                pidfile: dir.join("vsock.pid"),
                log: dir.join("vsock.log"),
            },
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            pidfile: dir.join("qemu.pid"),
        }
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    /// Creates the VM's folder, and its empty (sparse) disk if it has one; fails if the
    /// folder exists, so two creates of one name cannot race.
    pub fn create_vm(&self, spec: &VmSpec) -> Result<(), StoreError> {
        let paths = self.vm_dir(&spec.name);
        create_private_dir(&paths).map_err(io_error("cannot create", &paths))?;
        let created = self.save(spec).and_then(|()| match spec.disk_gib {
            Some(gib) => create_sparse(&self.disk_path(&spec.name), u64::from(gib) << 30),
            None => Ok(()),
        });
        if let Err(e) = created {
            let _ = std::fs::remove_dir_all(&paths);
            return Err(e);
        }
        Ok(())
    }

    /// Sets or clears one of a VM's markers, durably: markers decide what a restarted
    /// vmhostd may do with a VM's QEMU and disk.
    pub fn set_marker(&self, name: &str, marker: Marker, on: bool) -> Result<(), StoreError> {
        let path = self.vm_dir(name).join(marker.file());
        match on {
            true => File::create(&path).and_then(|file| file.sync_all()),
            false => remove_if_present(&path),
        }
        .and_then(|()| sync_dir(&self.vm_dir(name)))
        .map_err(io_error("cannot mark", &path))
    }

    pub fn has_marker(&self, name: &str, marker: Marker) -> bool {
        self.vm_dir(name).join(marker.file()).exists()
    }

    /// Writes where a leaving VM goes into its `leaving` marker, so that a migration left
    /// paused in post-copy can be resumed, even by a restarted vmhostd.
    pub fn record_departure(&self, name: &str, departure: &Departure) -> Result<(), StoreError> {
        self.write_vm_json(name, Marker::Leaving.file(), departure)
    }

    /// Where a leaving VM goes, once its target is chosen (until then its marker is empty).
    pub fn departure(&self, name: &str) -> Result<Option<Departure>, StoreError> {
        let path = self.vm_dir(name).join(Marker::Leaving.file());
        match std::fs::metadata(&path) {
            Ok(marker) if marker.len() == 0 => Ok(None),
            _ => read_json(&path),
        }
    }

    /// Keeps what an arriving VM's migration is, and which host sends it, until it has
    /// arrived.
    pub fn record_arrival(&self, name: &str, arrival: &Arrival) -> Result<(), StoreError> {
        self.write_vm_json(name, ARRIVAL_FILE, arrival)
    }

    pub fn arrival(&self, name: &str) -> Result<Option<Arrival>, StoreError> {
        read_json(&self.vm_dir(name).join(ARRIVAL_FILE))
    }

    /// The VM has arrived: its migration is over.
    pub fn end_arrival(&self, name: &str) -> Result<(), StoreError> {
        self.remove_vm_file(name, ARRIVAL_FILE)
    }

    pub fn record_cold_move(&self, name: &str, cold_move: &ColdMove) -> Result<(), StoreError> {
        self.write_vm_json(name, COLD_MOVE_FILE, cold_move)
    }

    pub fn cold_move(&self, name: &str) -> Result<Option<ColdMove>, StoreError> {
        read_json(&self.vm_dir(name).join(COLD_MOVE_FILE))
    }

    /// The cold move's outcome is known: the VM never ran on its target.
    pub fn end_cold_move(&self, name: &str) -> Result<(), StoreError> {
        self.remove_vm_file(name, COLD_MOVE_FILE)
    }

    fn write_vm_json(
        &self,
        name: &str,
        file: &str,
        value: &impl Serialize,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(value).expect("a VM's record always serializes");
        write_atomically(&self.vm_dir(name).join(file), &json)
    }

    fn remove_vm_file(&self, name: &str, file: &str) -> Result<(), StoreError> {
        let path = self.vm_dir(name).join(file);
        remove_if_present(&path).map_err(io_error("cannot remove", &path))
    }

    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(DISK_FILE)
    }

    /// Writes the spec atomically.
    pub fn save(&self, spec: &VmSpec) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(spec).expect("a spec always serializes");
        write_atomically(&self.vm_dir(&spec.name).join(SPEC_FILE), &json)
    }

    /// Persists the leases this host granted, so they outlive a restart and expire on time.
    pub fn save_leases(&self, ledger: &Ledger) -> Result<(), StoreError> {
        let json = serde_json::to_vec(ledger).expect("a ledger always serializes");
        write_atomically(&self.root.join(LEASES_FILE), &json)
    }

    /// The ledger saved by `save_leases`, if any.
    pub fn load_leases(&self) -> Result<Option<Ledger>, StoreError> {
        read_json(&self.root.join(LEASES_FILE))
    }

    /// Keeps the operator's drain order across restarts; `None` ends it.
    pub fn save_drain(&self, order: Option<&vmhost_api::DrainHost>) -> Result<(), StoreError> {
        let path = self.root.join(DRAIN_FILE);
        match order {
            Some(order) => write_atomically(
                &path,
                &serde_json::to_vec(order).expect("an order serializes"),
            ),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_error("cannot remove", &path)(e))
                }
                _ => Ok(()),
            },
        }
    }

    pub fn load_drain(&self) -> Result<Option<vmhost_api::DrainHost>, StoreError> {
        read_json(&self.root.join(DRAIN_FILE))
    }

    /// Moves an unreadable leases file aside, for a person to look at; returns where.
    pub fn set_aside_leases(&self) -> Result<PathBuf, StoreError> {
        let path = self.root.join(LEASES_FILE);
        let aside = path.with_extension("json.corrupt");
        std::fs::rename(&path, &aside).map_err(io_error("cannot move aside", &path))?;
        Ok(aside)
    }

    /// Every VM spec on disk, with the folders whose spec cannot be read reported apart.
    pub fn load_all(&self) -> Result<(Vec<VmSpec>, Vec<StoreError>), StoreError> {
        let vms = self.root.join("vms");
        let mut specs = Vec::new();
        let mut broken = Vec::new();
        for entry in std::fs::read_dir(&vms).map_err(io_error("cannot list", &vms))? {
            let entry = entry.map_err(io_error("cannot list", &vms))?;
            let path = entry.path().join(SPEC_FILE);
            let parsed = std::fs::read(&path)
                .map_err(io_error("cannot read", &path))
                .and_then(|bytes| parse_json::<VmSpec>(&path, &bytes));
            match parsed {
                Ok(spec) if Some(spec.name.as_str()) == entry.file_name().to_str() => {
                    specs.push(spec)
                }
                Ok(spec) => broken.push(StoreError::Corrupt {
                    path: path.display().to_string(),
                    message: format!("names VM '{}' but sits in another VM's folder", spec.name),
                }),
                Err(e) => broken.push(e),
            }
        }
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((specs, broken))
    }

    pub fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.vm_dir(name);
        std::fs::remove_dir_all(&dir).map_err(io_error("cannot remove", &dir))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            image: ImageRef::Named("test".into()),
            boot: BootSource {
                kernel: "/img/vmlinuz".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
                root: None,
                image_id: None,
            },
            cu_shape: CuShape::default(),
            min_cu: ComputeUnits::whole(1),
            max_cu: ComputeUnits::whole(2),
            cu: ComputeUnits::whole(1),
            run: true,
            autoscale: true,
            agent: Default::default(),
            launched_bounds: None,
            incoming: false,
            disk_gib: None,
            compute_spec: None,
        }
    }

    #[test]
    fn second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn specs_round_trip_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_vm(&spec("b")).unwrap();
        store.create_vm(&spec("a")).unwrap();
        assert!(store.create_vm(&spec("a")).is_err());
        let mut changed = spec("a");
        changed.cu = ComputeUnits::whole(2);
        store.save(&changed).unwrap();
        let (specs, broken) = store.load_all().unwrap();
        assert!(broken.is_empty());
        assert_eq!(specs, vec![changed, spec("b")]);
        store.remove_vm("a").unwrap();
        assert_eq!(store.load_all().unwrap().0.len(), 1);
    }

    #[test]
    fn a_vms_folder_and_disk_are_private_to_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut with_disk = spec("a");
        with_disk.disk_gib = Some(1);
        store.create_vm(&with_disk).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("vms")), 0o700);
        assert_eq!(mode(&store.vm_dir("a")), 0o700);
        assert_eq!(mode(&store.disk_path("a")), 0o600);
    }

    #[test]
    fn an_arrival_written_before_sources_were_kept_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_vm(&spec("a")).unwrap();
        let old = r#"{"vm":{"name":"a","image":{"named":"test"},"min_cu":1,"max_cu":2,"cu":1},"bounds":[1,2],"vcpus":1,"restore_hotplug_memory_bytes":0,"postcopy":true,"tunnel":7}"#;
        std::fs::write(dir.path().join("vms/a/arrival.json"), old).unwrap();
        let arrival = store.arrival("a").unwrap().unwrap();
        assert_eq!((arrival.source, arrival.migration.tunnel), (None, 7));
    }

    #[test]
    fn corrupt_spec_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_vm(&spec("good")).unwrap();
        std::fs::create_dir(dir.path().join("vms/bad")).unwrap();
        std::fs::write(dir.path().join("vms/bad/spec.json"), b"{not json").unwrap();
        let (specs, broken) = store.load_all().unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(broken.len(), 1);
        assert!(broken[0].to_string().contains("vms/bad/spec.json"));
    }

    #[test]
    fn a_departure_lives_in_the_leaving_marker() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_vm(&spec("a")).unwrap();
        assert_eq!(store.departure("a").unwrap(), None);
        store.set_marker("a", Marker::Leaving, true).unwrap();
        assert_eq!(store.departure("a").unwrap(), None);
        let departure = Departure {
            target: "host-b".into(),
            tunnel: 7,
            lease: 9,
        };
        store.record_departure("a", &departure).unwrap();
        assert!(store.has_marker("a", Marker::Leaving));
        assert_eq!(store.departure("a").unwrap(), Some(departure));
        store.set_marker("a", Marker::Leaving, false).unwrap();
        assert_eq!(store.departure("a").unwrap(), None);
        std::fs::write(dir.path().join("vms/a/leaving"), b"{torn").unwrap();
        assert!(store
            .departure("a")
            .unwrap_err()
            .to_string()
            .contains("vms/a/leaving"));
    }
}
