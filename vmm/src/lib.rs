//! The QEMU layer of vmhost. It builds command lines, speaks QMP, hotplugs vCPUs and
//! virtio-mem memory, and knows nothing of fleets.

pub mod accel;
pub mod cmdline;
pub mod disk_mirror;
pub mod machine;
pub mod migration;
pub mod qmp;
pub mod vsock;

pub use accel::{Accel, AccelChoice, AccelDecision, HostFacts};
pub use cmdline::{MachineSpec, Nic};
pub use machine::{Machine, VmmError};
