//! Turns a create request into a checked VM spec: name, bounds, disk, image and agent
//! settings. Nothing here touches the ledger or QEMU.

use crate::agent_task;
use crate::config::Config;
use crate::error::HostError;
use crate::store::{BootSource, VmSpec};
use vmhost_api::{ComputeUnits, CreateVm, ImageRef, IncomingMigration};

/// The largest compute spec kept with a VM.
pub const MAX_COMPUTE_SPEC_BYTES: usize = 256 << 10;
/// q35 with x2APIC supports up to 288 vCPUs; stay well below.
const MAX_VCPUS: u32 = 255;

pub fn validate_name(name: &str) -> Result<(), HostError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "invalid VM name '{name}': use 1 to 63 lowercase letters, digits and '-', not starting with '-'"
        )))
    }
}

pub fn check_bounds(spec: &VmSpec, cu: ComputeUnits) -> Result<(), HostError> {
    if cu < spec.min_cu || cu > spec.max_cu {
        return Err(HostError::Invalid(format!(
            "{cu} CU is outside VM '{}' bounds [{}, {}]",
            spec.name, spec.min_cu, spec.max_cu
        )));
    }
    Ok(())
}

pub fn check_min_max(min: ComputeUnits, max: ComputeUnits) -> Result<(), HostError> {
    if min > max {
        return Err(HostError::Invalid(format!(
            "min_cu ({min}) is greater than max_cu ({max})"
        )));
    }
    Ok(())
}

fn resolve_image(config: &Config, image: &ImageRef) -> Result<BootSource, HostError> {
    let boot = match image {
        ImageRef::Named(name) => {
            let configured = config.images.get(name).ok_or_else(|| {
                let known: Vec<_> = config.images.keys().map(String::as_str).collect();
                HostError::NoImage(format!(
                    "image '{name}' is not configured on this host (configured: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
            BootSource {
                kernel: configured.kernel.clone(),
                initrd: configured.initrd.clone(),
                cmdline: configured.cmdline.clone(),
                image_id: configured.root.as_deref().and_then(image_id),
                root: configured.root.clone(),
            }
        }
        ImageRef::Path(dir) => {
            // Relative to what? Not to vmhostd's own directory; vmctl sends absolute paths.
            if dir.is_relative() {
                return Err(HostError::Invalid(format!(
                    "image path {} is relative; give an absolute path",
                    dir.display()
                )));
            }
            let initrd = dir.join("initrd.img");
            let root = dir.join(IMAGE_ROOT_FILE);
            BootSource {
                kernel: dir.join("vmlinuz"),
                initrd: initrd.exists().then_some(initrd),
                cmdline: crate::config::default_cmdline(),
                image_id: image_id(&root),
                root: root.exists().then_some(root),
            }
        }
    };
    for file in std::iter::once(&boot.kernel)
        .chain(&boot.initrd)
        .chain(&boot.root)
    {
        if !file.is_file() {
            return Err(HostError::Invalid(format!(
                "image '{image}': {} does not exist",
                file.display()
            )));
        }
    }
    Ok(boot)
}

/// The host keeps a compute spec, and the guest judges it: here only its shape and size.
/// What a migration's source says of the VM beyond its spec, checked as an operator's
/// request is: bounds within those its QEMU was started with, and a size within them.
pub fn check_arrival(spec: &VmSpec, incoming: &IncomingMigration) -> Result<(), HostError> {
    let (min, max) = incoming.bounds;
    check_min_max(min, max)?;
    if min < spec.min_cu || max > spec.max_cu {
        return Err(HostError::Invalid(format!(
            "VM '{}': bounds [{min}, {max}] are outside [{}, {}], those its QEMU starts with",
            spec.name, spec.min_cu, spec.max_cu
        )));
    }
    let boot = spec.boot_resources();
    let room = spec.cu_shape.resources(spec.max_cu);
    if incoming.vcpus < boot.vcpus || incoming.vcpus > room.vcpus {
        return Err(HostError::Invalid(format!(
            "VM '{}': {} vCPUs, but its QEMU runs {} to {}",
            spec.name, incoming.vcpus, boot.vcpus, room.vcpus
        )));
    }
    let hotplug_room = room.memory_bytes.saturating_sub(boot.memory_bytes);
    if incoming.restore_hotplug_memory_bytes > hotplug_room {
        return Err(HostError::Invalid(format!(
            "VM '{}': {} bytes of hotplug memory to restore, but it has room for {hotplug_room}",
            spec.name, incoming.restore_hotplug_memory_bytes
        )));
    }
    Ok(())
}

pub fn check_compute_spec(spec: &serde_json::Value) -> Result<(), HostError> {
    let bytes = serde_json::to_vec(spec).map_or(usize::MAX, |b| b.len());
    if spec.is_object() && bytes <= MAX_COMPUTE_SPEC_BYTES {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "a compute spec is a JSON object of at most {} KiB",
            MAX_COMPUTE_SPEC_BYTES >> 10
        )))
    }
}

/// Every configured image by name, with its id ("" for an image without one): what the
/// host tells the fleet it has.
pub fn image_ids(config: &Config) -> std::collections::BTreeMap<String, String> {
    config
        .images
        .iter()
        .map(|(name, image)| {
            let id = image.root.as_deref().and_then(image_id);
            (name.clone(), id.unwrap_or_default())
        })
        .collect()
}

/// The shared root file system in an image folder.
const IMAGE_ROOT_FILE: &str = "root.img";
/// The image's identity, written by its builder beside the root.
const IMAGE_ID_FILE: &str = "image-id";

/// The id in the `image-id` file beside `root`: a hash, so anything else is no id.
fn image_id(root: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(root.with_file_name(IMAGE_ID_FILE)).ok()?;
    let id = text.trim();
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| id.to_string())
}

/// A VM that moves here must find the very image it runs: its root file system is not
/// copied, only its own disk is.
fn check_image_id(
    image: &ImageRef,
    boot: &BootSource,
    wanted: Option<&str>,
) -> Result<(), HostError> {
    match wanted {
        Some(wanted) if boot.image_id.as_deref() != Some(wanted) => Err(HostError::Invalid(format!(
            "image '{image}' here is {}, but the VM runs image {wanted}: build or copy the same image on this host",
            boot.image_id.as_deref().unwrap_or("without an id")
        ))),
        _ => Ok(()),
    }
}

/// The create request that makes `spec` again on another host, under `lease` there.
pub fn request_for(spec: &VmSpec, lease: u64) -> CreateVm {
    CreateVm {
        name: spec.name.clone(),
        image: spec.image.clone(),
        min_cu: spec.min_cu,
        max_cu: spec.max_cu,
        cu: Some(spec.cu),
        autoscale: spec.autoscale,
        agent: spec.agent.clone(),
        lease: Some(lease),
        disk_gib: spec.disk_gib,
        image_id: spec.boot.image_id.clone(),
        compute_spec: spec.compute_spec.clone(),
    }
}

/// The VM a create request describes, checked.
pub fn spec_for(config: &Config, request: CreateVm) -> Result<VmSpec, HostError> {
    validate_name(&request.name)?;
    check_min_max(request.min_cu, request.max_cu)?;
    if let Some(gib) = request
        .disk_gib
        .filter(|g| !(1..=vmhost_api::MAX_DISK_GIB).contains(g))
    {
        return Err(HostError::Invalid(format!(
            "a disk of {gib} GiB: disks are 1 to {} GiB",
            vmhost_api::MAX_DISK_GIB
        )));
    }
    let shape = config.cu_shape();
    let boot = resolve_image(config, &request.image)?;
    check_image_id(&request.image, &boot, request.image_id.as_deref())?;
    if boot.root.is_some() && request.disk_gib.is_none() {
        return Err(HostError::Invalid(format!(
            "image '{}' keeps each VM's writable state (its data, logs and /etc) on the VM's own disk: give it one with --disk-gib",
            request.image
        )));
    }
    if let Some(spec) = &request.compute_spec {
        check_compute_spec(spec)?;
    }
    let spec = VmSpec {
        name: request.name.clone(),
        boot,
        image: request.image,
        cu_shape: shape,
        min_cu: request.min_cu,
        max_cu: request.max_cu,
        cu: request.cu.unwrap_or(request.min_cu),
        run: true,
        autoscale: request.autoscale,
        launched_bounds: Some((request.min_cu, request.max_cu)),
        agent: request.agent,
        incoming: false,
        disk_gib: request.disk_gib,
        compute_spec: request.compute_spec,
    };
    check_bounds(&spec, spec.cu)?;
    agent_task::effective_config(&config.agent, &spec.agent).map_err(HostError::Invalid)?;
    let max_vcpus = shape.resources(spec.max_cu).vcpus;
    if max_vcpus > MAX_VCPUS {
        return Err(HostError::Invalid(format!(
            "max_cu {} means {max_vcpus} vCPUs; at most {MAX_VCPUS} are supported",
            spec.max_cu
        )));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for good in ["db1", "a", "web-01"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-x", "Db1", "a/b", "a b", "../etc", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A config whose image `pg` has a shared root with the id `id`.
    fn config_with_root_image(dir: &std::path::Path, id: &str) -> Config {
        for (file, bytes) in [("vmlinuz", "k"), ("root.img", "r"), ("image-id", id)] {
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        let text = format!(
            "state_dir = \"/s\"\napi_socket = \"/s/api.sock\"\n[capacity]\nvcpus = 4\nmemory_mib = 4096\n[images.pg]\nkernel = \"{d}/vmlinuz\"\nroot = \"{d}/root.img\"\n",
            d = dir.display()
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_peer_s_figures_for_an_arriving_vm_must_fit_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_with_root_image(dir.path(), "abc");
        let vm = request(Some(1), Some("abc"));
        let spec = spec_for(&config, vm.clone()).unwrap();
        let (boot, room) = (spec.boot_resources(), spec.cu_shape.resources(spec.max_cu));
        let hotplug = room.memory_bytes - boot.memory_bytes;
        let incoming = |bounds, vcpus, restore| IncomingMigration {
            disk_tunnel: Some(2),
            ..crate::testing::start_message(vm.clone(), bounds, vcpus, restore)
        };
        let full = (spec.min_cu, spec.max_cu);
        check_arrival(&spec, &incoming(full, room.vcpus, hotplug)).unwrap();
        check_arrival(&spec, &incoming(full, boot.vcpus, 0)).unwrap();
        for (bounds, vcpus, restore) in [
            ((spec.max_cu, spec.min_cu), boot.vcpus, 0),
            (
                (spec.min_cu, ComputeUnits::from_quarters(u32::MAX)),
                boot.vcpus,
                0,
            ),
            (full, room.vcpus + 1, 0),
            (full, 0, 0),
            (full, boot.vcpus, hotplug + 1),
            (full, boot.vcpus, u64::MAX),
        ] {
            let refused = check_arrival(&spec, &incoming(bounds, vcpus, restore));
            assert!(
                matches!(refused, Err(HostError::Invalid(_))),
                "{bounds:?} {vcpus} {restore}: {refused:?}"
            );
        }
    }

    fn request(disk_gib: Option<u32>, image_id: Option<&str>) -> CreateVm {
        CreateVm {
            image: ImageRef::Named("pg".into()),
            image_id: image_id.map(str::to_string),
            ..crate::testing::TestHost::request("db1", 1, 2, disk_gib)
        }
    }

    #[test]
    fn an_image_with_a_shared_root_needs_a_disk_and_is_known_by_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_with_root_image(dir.path(), "0123abcd");
        let error = spec_for(&config, request(None, None)).unwrap_err();
        assert!(error.to_string().contains("--disk-gib"), "{error}");
        let spec = spec_for(&config, request(Some(2), None)).unwrap();
        assert_eq!(spec.boot.root, Some(dir.path().join("root.img")));
        assert_eq!(spec.boot.image_id.as_deref(), Some("0123abcd"));
        // A VM that moves here must find the same image.
        spec_for(&config, request(Some(2), Some("0123abcd"))).unwrap();
        let error = spec_for(&config, request(Some(2), Some("ffff0000"))).unwrap_err();
        assert!(
            error.to_string().contains("0123abcd") && error.to_string().contains("ffff0000"),
            "{error}"
        );
        // Whatever the id file holds that is not a hash is no id.
        let config = config_with_root_image(dir.path(), "../../etc/passwd");
        assert_eq!(
            spec_for(&config, request(Some(2), None))
                .unwrap()
                .boot
                .image_id,
            None
        );
    }

    #[test]
    fn a_compute_spec_is_an_object_of_bounded_size() {
        check_compute_spec(&serde_json::json!({"format_version": 1})).unwrap();
        assert!(check_compute_spec(&serde_json::json!([1, 2])).is_err());
        let huge = "x".repeat(MAX_COMPUTE_SPEC_BYTES);
        assert!(check_compute_spec(&serde_json::json!({ "settings": { "a": huge } })).is_err());
    }
}
