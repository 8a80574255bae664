//! The QEMU layer of vmhost. It builds command lines, speaks QMP, hotplugs vCPUs and
//! virtio-mem memory, and knows nothing of fleets.
//!
//! Callers hold VMs as [`Vm`] and start them through a [`Hypervisor`]: [`Qemu`] for real,
//! or the fakes of `fake` (feature `fake`) in tests.

pub mod accel;
pub mod cgroup;
pub mod cmdline;
pub mod disk_mirror;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod machine;
pub mod migration;
pub mod qmp;
pub mod status;
pub mod vm;
pub mod vsock;

pub use accel::{Accel, AccelChoice, AccelDecision, HostFacts};
pub use cmdline::{MachineSpec, Nic};
#[cfg(any(test, feature = "fake"))]
pub use fake::{Call, FakeHypervisor, FakeMachine, Step};
pub use machine::{Machine, VmmError};
pub use migration::MigrationEvents;
pub use status::MigrationStatus;
pub use vm::{Hypervisor, Qemu, Vm};
