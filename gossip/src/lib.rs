//! The fleet layer of vmhost. This part is pure: the host ledger, which books local
//! allocations and leases granted to other hosts against one capacity, and the lease
//! protocol that grants, renews, commits and releases those leases. It knows nothing of
//! QEMU, and it takes the time as an argument so it can be simulated.

pub mod lease;
pub mod ledger;
