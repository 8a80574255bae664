//! What fleet hosts ask of each other over this API: an operator's request forwarded to the
//! VM's host, or a peer's own (the target's side of a migration), in a versioned envelope
//! whose JSON keeps version 1's flat shape.

use crate::{CreateVm, Envelope, IncomingMigration, Request};
use serde::{Deserialize, Serialize};

/// Version of the calls between hosts this build sends. A host accepts it and the one
/// before, so a fleet can be upgraded one host at a time.
pub const PEER_API_VERSION: u32 = 2;
pub const PEER_API_VERSION_MIN: u32 = 1;

/// What only another fleet host may ask: the target's side of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PeerRequest {
    /// Get ready to receive a migrating VM.
    MigrateIn(Box<IncomingMigration>),
    /// Listen again for a post-copy migration whose link broke.
    MigrateRecover { name: String },
    /// Take a VM that its draining host stopped, under a lease: its disk (if it has one)
    /// comes through the tunnel `disk_tunnel`, then `ColdStart` boots it here.
    ColdArrive {
        vm: CreateVm,
        #[serde(default)]
        disk_tunnel: Option<u64>,
    },
    /// The disk of a cold arrival is all sent: boot the VM.
    ColdStart { name: String },
    /// A cold arrival will not be finished: drop it, and its lease.
    ColdAbandon { name: String },
}

/// The `op` of every `PeerRequest`: an operator sending one is told it is not theirs.
pub const PEER_ONLY_OPS: [&str; 5] = [
    "migrate_in",
    "migrate_recover",
    "cold_arrive",
    "cold_start",
    "cold_abandon",
];

/// A request from another host: an operator's request it forwards, or its own.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerCall {
    Forwarded(Request),
    Peer(PeerRequest),
}

/// A peer call on the wire: `{"version": N, "op": ..., ...}`, the same shape as an
/// operator's envelope, so that version 1 hosts (which had one request type) still agree.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerEnvelope {
    pub version: u32,
    pub call: PeerCall,
}

impl PeerEnvelope {
    pub fn to_json(&self) -> String {
        let mut value = match &self.call {
            PeerCall::Forwarded(request) => serde_json::to_value(request),
            PeerCall::Peer(request) => serde_json::to_value(request),
        }
        .expect("requests always serialize");
        value["version"] = self.version.into();
        value.to_string()
    }

    pub fn from_json(json: &str) -> Result<PeerEnvelope, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(json)?;
        let version = serde_json::from_value(value["version"].clone())?;
        let peer_only = value["op"]
            .as_str()
            .is_some_and(|op| PEER_ONLY_OPS.contains(&op));
        let call = if peer_only {
            PeerCall::Peer(serde_json::from_value(value)?)
        } else {
            PeerCall::Forwarded(serde_json::from_value::<Envelope>(value)?.request)
        };
        Ok(PeerEnvelope { version, call })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_calls_keep_the_version_1_wire_format() {
        let v1_show = r#"{"version":1,"op":"show","name":"db1"}"#;
        let parsed = PeerEnvelope::from_json(v1_show).unwrap();
        assert_eq!(parsed.version, 1);
        assert_eq!(
            parsed.call,
            PeerCall::Forwarded(Request::Show { name: "db1".into() })
        );
        let recover = PeerEnvelope {
            version: 2,
            call: PeerCall::Peer(PeerRequest::MigrateRecover { name: "db1".into() }),
        };
        let json = recover.to_json();
        assert!(json.contains(r#""op":"migrate_recover""#), "{json}");
        assert_eq!(PeerEnvelope::from_json(&json).unwrap(), recover);
        // A version 1 start message has no version of its own.
        let start = r#"{"version":1,"op":"migrate_in","vm":{"name":"a","image":{"named":"test"},"min_cu":1,"max_cu":2,"cu":1},"bounds":[1,2],"vcpus":1,"restore_hotplug_memory_bytes":0,"postcopy":true,"tunnel":7}"#;
        let PeerCall::Peer(PeerRequest::MigrateIn(incoming)) =
            PeerEnvelope::from_json(start).unwrap().call
        else {
            panic!("not a migration start");
        };
        assert_eq!(incoming.version, 1);
        // Operators cannot send a peer's request.
        assert!(serde_json::from_str::<Envelope>(
            r#"{"version":1,"op":"migrate_recover","name":"a"}"#
        )
        .is_err());
    }
}
