//! What travels on the endpoint: the versions it negotiates, who is at the other end, and
//! the typed requests and responses, each knowing the version that introduced it.

use super::*;

/// The ALPN id of a fleet protocol version.
pub fn alpn_id(version: u32) -> Vec<u8> {
    format!("{ALPN_PREFIX}{version}").into_bytes()
}

/// The version an ALPN id names, if it is a fleet protocol id at all.
pub fn version_of_alpn(id: &[u8]) -> Option<u32> {
    std::str::from_utf8(id)
        .ok()?
        .strip_prefix(ALPN_PREFIX)?
        .parse()
        .ok()
}

/// Who is at the other end of a connection, and what it speaks there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The host its certificate names, else the server name of the handshake.
    pub name: String,
    pub addr: SocketAddr,
    /// The fleet protocol version negotiated for this connection.
    pub version: u32,
}

/// Variants are encoded by position (postcard), so new ones go at the end, with the version
/// that introduced them in `since`; changing an existing one breaks older peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetRequest {
    Ping,
    Lease(LeaseRequest),
    /// A local-API request (JSON, as `vmhost_api::Envelope`) to run on the receiving host.
    Api(String),
    /// Turns this stream into a raw byte tunnel for the receiver's tunnel `id` (a migration
    /// stream, for one); no response frame follows.
    Tunnel {
        id: u64,
    },
}

/// Versioned like [`FleetRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetResponse {
    Pong,
    Lease(LeaseResponse),
    /// The JSON `vmhost_api::Response` to an `Api` request.
    Api(String),
    Error {
        reason: String,
    },
}

impl FleetRequest {
    /// The protocol version that introduced this request; older peers cannot decode it.
    pub fn since(&self) -> u32 {
        match self {
            FleetRequest::Ping
            | FleetRequest::Lease(_)
            | FleetRequest::Api(_)
            | FleetRequest::Tunnel { .. } => 1,
        }
    }
}

impl FleetResponse {
    /// The protocol version that introduced this response; older peers cannot decode it.
    pub fn since(&self) -> u32 {
        match self {
            FleetResponse::Pong
            | FleetResponse::Lease(_)
            | FleetResponse::Api(_)
            | FleetResponse::Error { .. } => 1,
        }
    }
}
