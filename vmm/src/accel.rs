//! Choice of the QEMU accelerator.
//!
//! `auto` must not pick KVM merely because `/dev/kvm` opens: on a PVM host (KVM inside a
//! VM without hardware virtualisation, `/sys/module/kvm_pvm`) standard guest kernels hang
//! early in boot. Hardware KVM needs the `vmx` or `svm` CPU flag.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// What QEMU will run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Facts about the host that decide whether KVM can run a standard guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub kvm_device_opens: bool,
    pub cpu_has_vmx_or_svm: bool,
    pub kvm_pvm_loaded: bool,
}

impl HostFacts {
    /// Reads the facts from this host.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_has_vmx_or_svm = cpuinfo
            .lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        HostFacts {
            kvm_device_opens: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            cpu_has_vmx_or_svm,
            kvm_pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// The chosen accelerator and the reason, for the log and for `vmctl show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccelError {
    #[error("accel = \"kvm\" was requested but {0}")]
    KvmUnusable(String),
}

/// Why KVM cannot run a standard guest here, or `None` if it can.
fn kvm_problem(facts: &HostFacts) -> Option<String> {
    if !facts.kvm_device_opens {
        Some("/dev/kvm cannot be opened".into())
    } else if facts.kvm_pvm_loaded {
        Some("KVM is the PVM flavour (/sys/module/kvm_pvm), where standard guest kernels hang at boot".into())
    } else if !facts.cpu_has_vmx_or_svm {
        Some("the CPU shows neither vmx nor svm, so KVM has no hardware virtualisation".into())
    } else {
        None
    }
}

/// Resolves the operator's choice against the host facts.
pub fn decide(choice: AccelChoice, facts: &HostFacts) -> Result<AccelDecision, AccelError> {
    let problem = kvm_problem(facts);
    match (choice, problem) {
        (AccelChoice::Tcg, _) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "accel = \"tcg\" in the config".into(),
        }),
        (AccelChoice::Kvm, None) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "accel = \"kvm\" in the config".into(),
        }),
        (AccelChoice::Kvm, Some(problem)) => Err(AccelError::KvmUnusable(problem)),
        (AccelChoice::Auto, None) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "auto: /dev/kvm opens and the CPU has hardware virtualisation".into(),
        }),
        (AccelChoice::Auto, Some(problem)) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("auto: {problem}; using TCG"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HARDWARE_KVM: HostFacts = HostFacts {
        kvm_device_opens: true,
        cpu_has_vmx_or_svm: true,
        kvm_pvm_loaded: false,
    };

    #[test]
    fn auto_picks_kvm_with_hardware_virtualisation() {
        assert_eq!(
            decide(AccelChoice::Auto, &HARDWARE_KVM).unwrap().accel,
            Accel::Kvm
        );
    }

    #[test]
    fn auto_picks_tcg_on_a_pvm_host() {
        let pvm = HostFacts {
            kvm_device_opens: true,
            cpu_has_vmx_or_svm: false,
            kvm_pvm_loaded: true,
        };
        let decision = decide(AccelChoice::Auto, &pvm).unwrap();
        assert_eq!(decision.accel, Accel::Tcg);
        assert!(decision.reason.contains("PVM"), "{}", decision.reason);
    }

    #[test]
    fn auto_picks_tcg_without_cpu_flags_or_device() {
        let no_flags = HostFacts {
            cpu_has_vmx_or_svm: false,
            ..HARDWARE_KVM
        };
        assert_eq!(
            decide(AccelChoice::Auto, &no_flags).unwrap().accel,
            Accel::Tcg
        );
        let no_device = HostFacts {
            kvm_device_opens: false,
            ..HARDWARE_KVM
        };
        assert_eq!(
            decide(AccelChoice::Auto, &no_device).unwrap().accel,
            Accel::Tcg
        );
    }

    #[test]
    fn explicit_kvm_on_an_unusable_host_is_an_error() {
        let pvm = HostFacts {
            kvm_pvm_loaded: true,
            ..HARDWARE_KVM
        };
        assert!(matches!(
            decide(AccelChoice::Kvm, &pvm),
            Err(AccelError::KvmUnusable(_))
        ));
    }

    #[test]
    fn explicit_tcg_is_always_honoured() {
        assert_eq!(
            decide(AccelChoice::Tcg, &HARDWARE_KVM).unwrap().accel,
            Accel::Tcg
        );
    }
}
