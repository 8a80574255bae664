//! Guest NICs: a tap device per VM, enslaved to the configured bridge.

use std::process::Command;

/// FNV-1a: a stable hash, so a VM keeps its tap name and MAC across restarts and releases.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Interface names are limited to 15 bytes, VM names are not: derive a short stable name.
pub fn tap_name(vm: &str) -> String {
    format!("vmh{:012x}", stable_hash(vm) & 0xffff_ffff_ffff)
}

/// A locally administered unicast MAC derived from the VM name.
pub fn mac_address(vm: &str) -> String {
    let h = stable_hash(vm).to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up tap {tap} on bridge {bridge}: {message}")]
pub struct NetError {
    tap: String,
    bridge: String,
    message: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Asks the kernel of this network namespace, not /sys, which may be another's.
fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Creates (or reuses) the VM's tap and puts it on `bridge`.
pub fn ensure_tap(vm: &str, bridge: &str) -> Result<String, NetError> {
    let tap = tap_name(vm);
    let exists = link_exists(&tap);
    let result = (|| {
        if !exists {
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        }
        ip(&["link", "set", &tap, "master", bridge])?;
        ip(&["link", "set", &tap, "up"])
    })();
    result.map_err(|message| NetError {
        tap: tap.clone(),
        bridge: bridge.into(),
        message,
    })?;
    Ok(tap)
}

pub fn remove_tap(vm: &str) {
    let tap = tap_name(vm);
    if link_exists(&tap) {
        if let Err(error) = ip(&["link", "del", &tap]) {
            tracing::warn!(%tap, %error, "cannot remove tap");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_distinct() {
        let long = "a-very-long-virtual-machine-name-that-exceeds-interface-limits";
        assert!(tap_name(long).len() <= 15);
        assert_eq!(tap_name("db1"), tap_name("db1"));
        assert_ne!(tap_name("db1"), tap_name("db2"));
        assert_ne!(mac_address("db1"), mac_address("db2"));
        assert!(mac_address("db1").starts_with("52:54:00:"));
    }
}
