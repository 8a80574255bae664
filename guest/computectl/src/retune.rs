//! The retune formula: Postgres memory settings from the memory the workload may use.
//! vm-monitor runs `computectl retune` after every resize with the sizes in its environment.

use crate::sql::quote_literal;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// What the rest of the guest keeps, as in Neon's file-cache sizing.
const RESERVED_BYTES: u64 = 256 * MIB;
/// The smallest cache estimate, for guests too small for the formula to mean anything.
const MIN_BUDGET_BYTES: u64 = 64 * MIB;
/// A query may run several sorts and hashes at once, each allowed `work_mem`.
const WORK_MEM_PER_CONNECTION: u64 = 4;
const MIN_WORK_MEM_BYTES: u64 = 4 * MIB;
const MIN_MAINTENANCE_WORK_MEM_BYTES: u64 = 64 * MIB;
const MAX_MAINTENANCE_WORK_MEM_BYTES: u64 = 2 * GIB;

/// The environment variable vm-monitor sets to the workload cgroup's memory.max.
pub const WORKLOAD_MAX_VAR: &str = "VMHOST_WORKLOAD_MAX_BYTES";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub effective_cache_size_bytes: u64,
    pub work_mem_bytes: u64,
    pub maintenance_work_mem_bytes: u64,
}

/// - budget = min(0.75 × memory, (memory − 256 MiB) / 1.1), at least 64 MiB: what Postgres
///   and the page cache can use (Neon's file-cache formula);
/// - effective_cache_size = budget;
/// - work_mem = max(4 MiB, budget / (4 × max_connections)): every connection can run a few
///   sorts or hashes at once without the total passing the budget;
/// - maintenance_work_mem = budget / 16, within 64 MiB..2 GiB (more does not speed up
///   VACUUM or CREATE INDEX much).
pub fn tuning(memory_bytes: u64, max_connections: u32) -> Tuning {
    let three_quarters = memory_bytes / 4 * 3;
    let after_reserve = memory_bytes.saturating_sub(RESERVED_BYTES) / 11 * 10;
    let budget = three_quarters.min(after_reserve).max(MIN_BUDGET_BYTES);
    let connections = u64::from(max_connections.max(1));
    Tuning {
        effective_cache_size_bytes: budget,
        work_mem_bytes: (budget / (WORK_MEM_PER_CONNECTION * connections)).max(MIN_WORK_MEM_BYTES),
        maintenance_work_mem_bytes: (budget / 16).clamp(
            MIN_MAINTENANCE_WORK_MEM_BYTES,
            MAX_MAINTENANCE_WORK_MEM_BYTES,
        ),
    }
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "effective_cache_size {} MiB, work_mem {} kB, maintenance_work_mem {} MiB",
            self.effective_cache_size_bytes >> 20,
            self.work_mem_bytes >> 10,
            self.maintenance_work_mem_bytes >> 20
        )
    }
}

impl Tuning {
    /// The `ALTER SYSTEM` statements that apply it, in kB, Postgres's unit for memory.
    pub fn statements(&self) -> Vec<String> {
        [
            ("effective_cache_size", self.effective_cache_size_bytes),
            ("work_mem", self.work_mem_bytes),
            ("maintenance_work_mem", self.maintenance_work_mem_bytes),
        ]
        .iter()
        .map(|(name, bytes)| {
            format!(
                "ALTER SYSTEM SET {name} = {}",
                quote_literal(&format!("{}kB", bytes / 1024))
            )
        })
        .collect()
    }
}

/// The workload's memory limit from vm-monitor's environment.
pub fn workload_max_bytes(value: Option<&str>) -> Result<u64, String> {
    let value = value.ok_or_else(|| format!("{WORKLOAD_MAX_VAR} is not set"))?;
    value
        .trim()
        .parse()
        .map_err(|e| format!("{WORKLOAD_MAX_VAR}={value:?} is not a byte count: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4_gib_guest() {
        let t = tuning(4 * GIB, 100);
        // min(3 GiB, 3840 MiB / 1.1 ≈ 3491 MiB) = 3 GiB.
        assert_eq!(t.effective_cache_size_bytes, 3 * GIB);
        assert_eq!(t.work_mem_bytes, 3 * GIB / 400);
        assert_eq!(t.maintenance_work_mem_bytes, 192 * MIB);
    }

    #[test]
    fn a_small_guest_is_bound_by_the_reserve() {
        let t = tuning(512 * MIB, 100);
        // min(384 MiB, 256 MiB / 1.1 ≈ 232.7 MiB).
        assert_eq!(t.effective_cache_size_bytes, 256 * MIB / 11 * 10);
        assert_eq!(t.work_mem_bytes, MIN_WORK_MEM_BYTES);
        assert_eq!(t.maintenance_work_mem_bytes, MIN_MAINTENANCE_WORK_MEM_BYTES);
        assert_eq!(tuning(0, 0).effective_cache_size_bytes, MIN_BUDGET_BYTES);
    }

    #[test]
    fn more_memory_never_means_less_and_usually_means_more() {
        let sizes = [0, 128 * MIB, GIB, 4 * GIB, 16 * GIB, 64 * GIB, 256 * GIB];
        for pair in sizes.windows(2) {
            let (small, big) = (tuning(pair[0], 100), tuning(pair[1], 100));
            assert!(big.effective_cache_size_bytes >= small.effective_cache_size_bytes);
            assert!(big.work_mem_bytes >= small.work_mem_bytes);
            assert!(big.maintenance_work_mem_bytes >= small.maintenance_work_mem_bytes);
        }
        let (small, big) = (tuning(4 * GIB, 100), tuning(8 * GIB, 100));
        assert!(big.effective_cache_size_bytes > small.effective_cache_size_bytes);
        assert!(big.work_mem_bytes > small.work_mem_bytes);
        assert!(big.maintenance_work_mem_bytes > small.maintenance_work_mem_bytes);
        // And shrinking gives the memory back.
        assert!(tuning(GIB, 100).work_mem_bytes < tuning(16 * GIB, 100).work_mem_bytes);
        assert_eq!(
            tuning(256 * GIB, 100).maintenance_work_mem_bytes,
            MAX_MAINTENANCE_WORK_MEM_BYTES
        );
    }

    #[test]
    fn more_connections_mean_less_work_mem_each() {
        assert!(tuning(16 * GIB, 400).work_mem_bytes < tuning(16 * GIB, 100).work_mem_bytes);
        assert_eq!(tuning(16 * GIB, 0), tuning(16 * GIB, 1));
    }

    #[test]
    fn statements_are_in_kb() {
        let t = Tuning {
            effective_cache_size_bytes: 3 * GIB,
            work_mem_bytes: 4 * MIB,
            maintenance_work_mem_bytes: 64 * MIB + 1023,
        };
        assert_eq!(
            t.statements(),
            [
                "ALTER SYSTEM SET effective_cache_size = '3145728kB'",
                "ALTER SYSTEM SET work_mem = '4096kB'",
                "ALTER SYSTEM SET maintenance_work_mem = '65536kB'",
            ]
        );
    }

    #[test]
    fn it_reads_well_in_a_log() {
        assert_eq!(
            tuning(4 * GIB, 100).to_string(),
            "effective_cache_size 3072 MiB, work_mem 7864 kB, maintenance_work_mem 192 MiB"
        );
    }

    #[test]
    fn the_environment_is_read_strictly() {
        assert_eq!(workload_max_bytes(Some("1073741824\n")), Ok(GIB));
        assert!(workload_max_bytes(None)
            .unwrap_err()
            .contains(WORKLOAD_MAX_VAR));
        assert!(workload_max_bytes(Some("1G")).is_err());
    }
}
