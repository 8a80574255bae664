//! The pure capacity logic of vmhost: the host ledger, which books local allocations and
//! leases granted to other hosts against one capacity, and the lease protocol. No I/O; they
//! take the time as an argument so they can be simulated.

pub mod lease;
pub mod ledger;
