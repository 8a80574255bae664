//! Compute units: the size of a VM. 1 CU is a configurable number of vCPUs and bytes of
//! memory; sizes come in quarter steps.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A size in compute units, held as a whole number of quarter CUs so that arithmetic and
/// comparison are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct ComputeUnits {
    quarters: u32,
}

/// The largest size accepted, to keep every derived quantity far from overflow.
pub const MAX_CU: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CuError {
    #[error("compute units must be a number like 1, 0.5 or 2.25, got '{0}'")]
    NotANumber(String),
    #[error("compute units must be a positive multiple of 0.25, got {0}")]
    NotAQuarterStep(String),
    #[error("compute units must be at most {MAX_CU}, got {0}")]
    TooLarge(String),
}

impl ComputeUnits {
    pub const fn from_quarters(quarters: u32) -> Self {
        ComputeUnits { quarters }
    }

    pub const fn whole(cu: u32) -> Self {
        ComputeUnits { quarters: cu * 4 }
    }

    pub const fn quarters(self) -> u32 {
        self.quarters
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.quarters) / 4.0
    }
}

impl TryFrom<f64> for ComputeUnits {
    type Error = CuError;

    fn try_from(value: f64) -> Result<Self, CuError> {
        let text = value.to_string();
        if !value.is_finite() {
            return Err(CuError::NotANumber(text));
        }
        let quarters = value * 4.0;
        if quarters < 1.0 || quarters.fract() != 0.0 {
            return Err(CuError::NotAQuarterStep(text));
        }
        if quarters > f64::from(MAX_CU * 4) {
            return Err(CuError::TooLarge(text));
        }
        Ok(ComputeUnits {
            quarters: quarters as u32,
        })
    }
}

impl From<ComputeUnits> for f64 {
    fn from(cu: ComputeUnits) -> f64 {
        cu.as_f64()
    }
}

impl FromStr for ComputeUnits {
    type Err = CuError;

    fn from_str(s: &str) -> Result<Self, CuError> {
        let value: f64 = s
            .trim()
            .parse()
            .map_err(|_| CuError::NotANumber(s.into()))?;
        ComputeUnits::try_from(value)
    }
}

impl fmt::Display for ComputeUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_f64())
    }
}

/// vCPUs and memory, the two resources a host gives out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

impl Resources {
    /// True when `self` fits within `limit` on both resources.
    pub fn fits_in(self, limit: Resources) -> bool {
        self.vcpus <= limit.vcpus && self.memory_bytes <= limit.memory_bytes
    }

    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            vcpus: self.vcpus.checked_add(other.vcpus)?,
            memory_bytes: self.memory_bytes.checked_add(other.memory_bytes)?,
        })
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPU, {}",
            self.vcpus,
            format_bytes(self.memory_bytes)
        )
    }
}

/// What one compute unit is worth on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CuShape {
    pub vcpus_per_cu: u32,
    pub memory_per_cu_bytes: u64,
}

impl Default for CuShape {
    fn default() -> Self {
        CuShape {
            vcpus_per_cu: 1,
            memory_per_cu_bytes: 4 << 30,
        }
    }
}

impl CuShape {
    /// The resources of `cu`: vCPUs are rounded up, memory is exact (the memory per CU is
    /// validated to be divisible into quarters).
    pub fn resources(self, cu: ComputeUnits) -> Resources {
        let quarters = u64::from(cu.quarters());
        Resources {
            vcpus: (quarters * u64::from(self.vcpus_per_cu)).div_ceil(4) as u32,
            memory_bytes: quarters * self.memory_per_cu_bytes / 4,
        }
    }
}

/// "1.5 GiB", "512 MiB".
pub fn format_bytes(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes.is_multiple_of(GIB / 4) {
        format!("{} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quarter_steps() {
        assert_eq!("1".parse::<ComputeUnits>().unwrap().quarters(), 4);
        assert_eq!("0.25".parse::<ComputeUnits>().unwrap().quarters(), 1);
        assert_eq!("2.75".parse::<ComputeUnits>().unwrap().to_string(), "2.75");
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in ["0", "-1", "0.3", "1.1", "abc", "NaN", "inf", ""] {
            assert!(bad.parse::<ComputeUnits>().is_err(), "{bad} accepted");
        }
        assert!(matches!(
            "5000".parse::<ComputeUnits>(),
            Err(CuError::TooLarge(_))
        ));
    }

    #[test]
    fn json_is_a_plain_number_and_is_validated() {
        let cu: ComputeUnits = serde_json::from_str("1.5").unwrap();
        assert_eq!(serde_json::to_string(&cu).unwrap(), "1.5");
        assert!(serde_json::from_str::<ComputeUnits>("0.1").is_err());
    }

    #[test]
    fn vcpus_round_up_memory_is_exact() {
        let shape = CuShape::default();
        let r = shape.resources("1.25".parse().unwrap());
        assert_eq!(r.vcpus, 2);
        assert_eq!(r.memory_bytes, 5 << 30);
        let r = shape.resources("0.25".parse().unwrap());
        assert_eq!(
            r,
            Resources {
                vcpus: 1,
                memory_bytes: 1 << 30
            }
        );
    }

    #[test]
    fn resources_fit_and_arithmetic() {
        let a = Resources {
            vcpus: 2,
            memory_bytes: 10,
        };
        let b = Resources {
            vcpus: 1,
            memory_bytes: 20,
        };
        assert!(!b.fits_in(a));
        assert_eq!(
            a.checked_add(b).unwrap(),
            Resources {
                vcpus: 3,
                memory_bytes: 30
            }
        );
        assert_eq!(
            a.saturating_sub(b),
            Resources {
                vcpus: 1,
                memory_bytes: 0
            }
        );
    }
}
