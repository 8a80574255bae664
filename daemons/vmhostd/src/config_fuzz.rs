//! Property loops over the host config's parse and validation (`Config::load_with_table`): any text is
//! a config or one clear error, never a panic, and what validates is usable. PROPTEST_CASES
//! sets the number of cases (256 by default); `scripts/fuzz` runs more.

use crate::config::{Config, ConfigError};
use proptest::collection::vec;
use proptest::prelude::*;
use std::io::Write;
use vmhost_api::units::MAX_CU;
use vmhost_api::ComputeUnits;

fn load(text: &str) -> Result<Config, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    // Through the open handle: reopening with O_TRUNC makes ext4 flush the file on close,
    // which costs milliseconds per case.
    file.write_all(text.as_bytes()).unwrap();
    Config::load_with_table(file.path()).map(|(config, _)| config)
}

/// Loads `text`; a config must be usable as validated, an error must be one line. The
/// cargo-fuzz target `host_config` runs this too.
pub fn check(text: &str) -> Result<Config, String> {
    match load(text) {
        Ok(config) => {
            let capacity = config.capacity();
            assert_eq!(
                capacity.memory_bytes >> 20,
                config.capacity.memory_mib,
                "capacity in bytes overflows"
            );
            let shape = config.cu_shape();
            assert_eq!(
                shape.memory_per_cu_bytes >> 20,
                config.compute_unit.memory_mib
            );
            // A VM of MAX_CU compute units is MAX_CU times one, nothing wrapped.
            let largest = shape.resources(ComputeUnits::whole(MAX_CU));
            assert_eq!(
                u64::from(largest.vcpus),
                u64::from(shape.vcpus_per_cu) * u64::from(MAX_CU)
            );
            assert_eq!(
                u128::from(largest.memory_bytes),
                u128::from(shape.memory_per_cu_bytes) * u128::from(MAX_CU)
            );
            Ok(config)
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains('\n'), "multi-line error: {message:?}");
            Err(message)
        }
    }
}

/// A TOML integer: small ones, the edges, or anything (TOML's are signed 64-bit).
fn integer() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..5000,
        prop::sample::select(vec![-1, 512, 1 << 32, 1 << 43, 1 << 44, 1 << 52, i64::MAX]),
        any::<i64>(),
    ]
}

fn float() -> impl Strategy<Value = String> {
    prop_oneof![
        (0.0f64..2.0).prop_map(|f| format!("{f:?}")),
        prop::sample::select(vec!["nan", "inf", "-inf", "0.0", "1.0", "-0.5", "1e308"])
            .prop_map(String::from),
    ]
}

fn path() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["/var/lib/vmhost", "relative", "", "/"])
}

/// Config files section by section, valid and invalid values mixed.
fn config_text() -> impl Strategy<Value = String> {
    let top = (
        path(),
        prop::sample::select(vec!["auto", "kvm", "tcg", "xen"]),
    )
        .prop_map(|(dir, accel)| format!("state_dir = {dir:?}\naccel = {accel:?}\n"));
    let capacity = (integer(), integer())
        .prop_map(|(v, m)| format!("[capacity]\nvcpus = {v}\nmemory_mib = {m}\n"));
    let compute_unit = (integer(), integer(), 0i64..64).prop_map(|(v, m, blocks)| {
        // Multiples of 512 MiB pass the first check, so half the time `m` is one.
        let memory = if blocks % 2 == 0 { m } else { m / 512 * 512 };
        format!("[compute_unit]\nvcpus = {v}\nmemory_mib = {memory}\n")
    });
    let agent = (float(), float(), integer()).prop_map(|(load, memory, secs)| {
        format!(
            "[agent]\nload_target = {load}\nmemory_target = {memory}\nmetrics_pull_secs = {secs}\n"
        )
    });
    let fleet = (
        prop::sample::select(vec!["", "c"]),
        prop::sample::select(vec!["0.0.0.0:7100", "10.0.0.1:7100", "[::1]:0", "x"]),
        float(),
        integer(),
        path(),
    )
        .prop_map(|(cluster, listen, watermark, ttl, credentials)| {
            format!(
                "[fleet]\ncluster = {cluster:?}\nlisten = {listen:?}\nwatermark = {watermark}\n\
                 lease_ttl_secs = {ttl}\ncredentials = {credentials:?}\n"
            )
        });
    let network =
        ".{0,20}".prop_map(|bridge| format!("[network]\nmode = \"tap\"\nbridge = {bridge:?}\n"));
    let image = ("[a-z/]{0,6}", path())
        .prop_map(|(name, kernel)| format!("[images.{name:?}]\nkernel = {kernel:?}\n"));
    (
        top,
        capacity,
        proptest::option::of(compute_unit),
        proptest::option::of(agent),
        proptest::option::of(fleet),
        proptest::option::of(network),
        proptest::option::of(image),
    )
        .prop_map(|(top, capacity, cu, agent, fleet, network, image)| {
            [Some(top), Some(capacity), cu, agent, fleet, network, image]
                .into_iter()
                .flatten()
                .collect()
        })
}

const MINIMAL: &str =
    "state_dir = \"/var/lib/vmhost\"\n[capacity]\nvcpus = 8\nmemory_mib = 16384\n";

/// Sizes past the bounds wrapped silently (a capacity of 2^44 MiB read as 0 bytes).
#[test]
fn sizes_that_overflow_are_refused_and_the_largest_load() {
    for (extra, loads) in [
        ("[compute_unit]\nmemory_mib = 2147483648", true),
        ("[compute_unit]\nmemory_mib = 2147484160", false),
        ("[compute_unit]\nvcpus = 4194303", true),
        ("[compute_unit]\nvcpus = 4194304", false),
    ] {
        let text = format!("{MINIMAL}{extra}\n");
        assert_eq!(check(&text).is_ok(), loads, "{text}");
    }
    for (memory_mib, loads) in [(1u64 << 31, true), (1 << 44, false)] {
        let text = MINIMAL.replace("16384", &memory_mib.to_string());
        assert_eq!(check(&text).is_ok(), loads, "{text}");
    }
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = check(&text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..200)) {
        let _ = check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn generated_configs_load_or_are_refused(text in config_text()) {
        let _ = check(&text);
    }

    /// Generated configs with lines dropped, repeated or overwritten: never a panic.
    #[test]
    fn mutated_configs_never_panic(text in config_text(),
                                   edits in vec((any::<prop::sample::Index>(),
                                                 0u8..3, ".{0,12}"), 1..4)) {
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        for (at, how, junk) in &edits {
            let at = at.index(lines.len());
            match how {
                0 => { lines.remove(at); }
                1 => { let line = lines[at].clone(); lines.insert(at, line); }
                _ => lines[at] = format!("{} = {junk}", lines[at].split('=').next().unwrap_or("")),
            }
            if lines.is_empty() {
                break;
            }
        }
        let _ = check(&lines.join("\n"));
    }

    /// Deeply nested values in an unknown key: an error, not a stack overflow.
    #[test]
    fn nested_values_never_overflow_the_stack(depth in 0usize..2000) {
        let text = format!("{MINIMAL}colour = {}1{}\n", "[".repeat(depth), "]".repeat(depth));
        prop_assert!(check(&text).is_err());
    }
}
