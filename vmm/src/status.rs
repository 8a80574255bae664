//! A migration's status, as QEMU names it in `query-migrate` and its MIGRATION event.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// QEMU's `MigrationStatus`. Newer QEMUs add statuses, so an unknown one is kept as
/// [`MigrationStatus::Other`] rather than failing the whole reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum MigrationStatus {
    /// No migration has started (also what a reply without a status means).
    #[default]
    None,
    Setup,
    Active,
    /// Paused at the switchover, the guest stopped, until `migrate-continue`.
    PreSwitchover,
    /// Sending the device state, the guest stopped.
    Device,
    Cancelling,
    Cancelled,
    PostcopyActive,
    /// The post-copy link broke; both ends wait for a recovery.
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    WaitUnplug,
    Other(String),
}

/// Every known status with its QEMU name; one table for parsing and printing.
const NAMES: [(MigrationStatus, &str); 15] = [
    (MigrationStatus::None, "none"),
    (MigrationStatus::Setup, "setup"),
    (MigrationStatus::Active, "active"),
    (MigrationStatus::PreSwitchover, "pre-switchover"),
    (MigrationStatus::Device, "device"),
    (MigrationStatus::Cancelling, "cancelling"),
    (MigrationStatus::Cancelled, "cancelled"),
    (MigrationStatus::PostcopyActive, "postcopy-active"),
    (MigrationStatus::PostcopyPaused, "postcopy-paused"),
    (
        MigrationStatus::PostcopyRecoverSetup,
        "postcopy-recover-setup",
    ),
    (MigrationStatus::PostcopyRecover, "postcopy-recover"),
    (MigrationStatus::Completed, "completed"),
    (MigrationStatus::Failed, "failed"),
    (MigrationStatus::Colo, "colo"),
    (MigrationStatus::WaitUnplug, "wait-unplug"),
];

impl MigrationStatus {
    /// QEMU's name for it.
    pub fn as_str(&self) -> &str {
        match self {
            MigrationStatus::Other(name) => name,
            known => NAMES
                .iter()
                .find(|(status, _)| status == known)
                .map_or("", |(_, name)| name),
        }
    }

    /// Any post-copy status: the guest runs on the destination.
    pub fn is_postcopy(&self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
        )
    }

    /// The destination holds the only running copy from here on.
    pub fn switched_over(&self) -> bool {
        self.is_postcopy() || *self == MigrationStatus::Completed
    }

    /// A pre-copy migration still under way (or being cancelled): the source runs the guest.
    pub fn is_unfinished_precopy(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
                | MigrationStatus::WaitUnplug
        )
    }

    /// The migration has ended and will not change again by itself.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl From<&str> for MigrationStatus {
    fn from(name: &str) -> Self {
        NAMES
            .iter()
            .find(|(_, known)| *known == name)
            .map_or_else(|| MigrationStatus::Other(name.into()), |(s, _)| s.clone())
    }
}

impl From<String> for MigrationStatus {
    fn from(name: String) -> Self {
        MigrationStatus::from(name.as_str())
    }
}

impl std::str::FromStr for MigrationStatus {
    type Err = std::convert::Infallible;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(name.into())
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MigrationStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MigrationStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(String::deserialize(deserializer)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationStatus as S;

    #[test]
    fn parses_and_prints_every_qemu_status() {
        let all = [
            ("none", S::None),
            ("setup", S::Setup),
            ("active", S::Active),
            ("pre-switchover", S::PreSwitchover),
            ("device", S::Device),
            ("cancelling", S::Cancelling),
            ("cancelled", S::Cancelled),
            ("postcopy-active", S::PostcopyActive),
            ("postcopy-paused", S::PostcopyPaused),
            ("postcopy-recover-setup", S::PostcopyRecoverSetup),
            ("postcopy-recover", S::PostcopyRecover),
            ("completed", S::Completed),
            ("failed", S::Failed),
            ("colo", S::Colo),
            ("wait-unplug", S::WaitUnplug),
        ];
        for (name, status) in all {
            let parsed: MigrationStatus = serde_json::from_value(name.into()).unwrap();
            assert_eq!(parsed, status, "{name}");
            assert_eq!(status.to_string(), name);
            assert_eq!(serde_json::to_value(&status).unwrap(), name);
        }
    }

    #[test]
    fn keeps_unknown_statuses() {
        let parsed: MigrationStatus = serde_json::from_value("postcopy-dancing".into()).unwrap();
        assert_eq!(parsed, S::Other("postcopy-dancing".into()));
        assert_eq!(parsed.to_string(), "postcopy-dancing");
        // Unknown means unknown: not taken for post-copy by its name.
        assert!(!parsed.is_postcopy() && !parsed.is_terminal());
    }

    #[test]
    fn predicates() {
        let postcopy = [
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecoverSetup,
            S::PostcopyRecover,
        ];
        for s in &postcopy {
            assert!(s.is_postcopy() && s.switched_over(), "{s}");
            assert!(!s.is_unfinished_precopy() && !s.is_terminal(), "{s}");
        }
        assert!(S::Completed.switched_over() && !S::Completed.is_postcopy());
        for s in [
            S::Setup,
            S::Active,
            S::PreSwitchover,
            S::Device,
            S::Cancelling,
            S::WaitUnplug,
        ] {
            assert!(s.is_unfinished_precopy() && !s.switched_over(), "{s}");
            assert!(!s.is_terminal(), "{s}");
        }
        for s in [S::Completed, S::Failed, S::Cancelled] {
            assert!(s.is_terminal() && !s.is_unfinished_precopy(), "{s}");
        }
        for s in [S::None, S::Colo] {
            assert!(!s.is_terminal() && !s.switched_over() && !s.is_unfinished_precopy());
        }
    }
}
