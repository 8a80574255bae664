//! The fleet layer of vmhost. It knows nothing of QEMU.
//!
//! `quic` is the mutually authenticated QUIC endpoint that carries the fleet's requests;
//! `membership` runs chitchat's gossip over it. The ledger and lease protocol live in
//! `vmhost-capacity`, the certificates in `vmhost-pki`.

pub mod membership;
pub mod quic;
