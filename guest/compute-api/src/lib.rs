//! The API of computectl, the Postgres compute manager in a vmhost guest, after Neon's
//! compute_ctl. computectl serves HTTP on the guest's vsock port [`COMPUTE_PORT`]; vmhostd
//! and vmctl are its clients.
//!
//! - [`ComputeSpec`]: what Postgres should hold (roles, databases, settings, extensions).
//!   [`parse`] and [`ComputeSpec::validate`] report every problem at once.
//! - [`ComputeState`]: the compute's state machine, with its transition table.
//! - [`ComputeStatus`]: what `GET /status` returns; [`ErrorReply`]: the body of a refusal.
//!
//! Everything here is pure, so it can be unit- and property-tested without a guest.

mod spec;
mod state;

pub use spec::{
    parse, ComputeSpec, Database, Role, SpecError, SpecErrors, RESERVED_SETTINGS,
    SPEC_FORMAT_VERSION,
};
pub use state::{ComputeState, ComputeStatus, ErrorReply};

/// The guest vsock port computectl's HTTP API listens on; vm-monitor dials the host on
/// 1024, so the compute takes the next one.
pub const COMPUTE_PORT: u32 = 1025;
