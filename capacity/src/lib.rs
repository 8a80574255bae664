//! The pure capacity logic of vmhost: the host ledger, which books local allocations and
//! leases granted to other hosts against one capacity, the lease protocol, and the choice of
//! VMs a host moves away to stay below its watermark. No I/O; they
//! take the time as an argument so they can be simulated.

pub mod lease;
pub mod ledger;
pub mod rebalance;
