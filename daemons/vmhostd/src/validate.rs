//! Turns a create request into a checked VM spec: name, bounds, disk, image and agent
//! settings. Nothing here touches the ledger or QEMU.

use crate::agent_task;
use crate::config::Config;
use crate::error::HostError;
use crate::store::{BootSource, VmSpec};
use vmhost_api::{ComputeUnits, CreateVm, ImageRef};

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
                HostError::Invalid(format!(
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
            BootSource {
                kernel: dir.join("vmlinuz"),
                initrd: initrd.exists().then_some(initrd),
                cmdline: crate::config::default_cmdline(),
            }
        }
    };
    for file in std::iter::once(&boot.kernel).chain(&boot.initrd) {
        if !file.is_file() {
            return Err(HostError::Invalid(format!(
                "image '{image}': {} does not exist",
                file.display()
            )));
        }
    }
    Ok(boot)
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
    let spec = VmSpec {
        name: request.name.clone(),
        boot: resolve_image(config, &request.image)?,
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
}
