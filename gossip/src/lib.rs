//! The fleet layer of vmhost. It knows nothing of QEMU.
//!
//! - `ledger` and `lease` are pure: the host ledger, which books local allocations and
//!   leases granted to other hosts against one capacity, and the lease protocol. They take
//!   the time as an argument so they can be simulated.
//! - `pki` makes the fleet CA and host certificates; `quic` is the mutually authenticated
//!   QUIC endpoint that carries the fleet's requests; `membership` runs chitchat's gossip
//!   over it.

pub mod lease;
pub mod ledger;
pub mod membership;
pub mod pki;
pub mod quic;
