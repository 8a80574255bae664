//! The compute spec: the roles, databases, settings and extensions computectl makes
//! Postgres hold. The guest judges it, since only the guest knows which extensions its
//! image carries; every problem is reported at once, so one round trip fixes a spec.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The spec format this build reads; any other is refused.
pub const SPEC_FORMAT_VERSION: u32 = 1;

/// postgresql.conf keys a spec may not set, because computectl sets them.
pub const RESERVED_SETTINGS: &[&str] = &[
    // Where Postgres listens and finds its files: computectl must be able to reach it.
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    // Directives, not settings: they would pull other files into the configuration.
    "include",
    "include_dir",
    "include_if_exists",
    // `computectl retune` sets these after every resize, overriding any other value.
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
];

/// Postgres truncates longer identifiers (NAMEDATALEN − 1).
const MAX_NAME_BYTES: usize = 63;
/// Roles Postgres has or refuses to create.
const RESERVED_ROLES: &[&str] = &[
    "postgres",
    "public",
    "none",
    "current_user",
    "current_role",
    "session_user",
];
/// Databases every cluster has: a spec that listed one would let computectl drop it later.
const RESERVED_DATABASES: &[&str] = &["postgres", "template0", "template1"];
/// Names echoed in errors are cut here, so a hostile spec cannot flood a log.
const MAX_SHOWN_CHARS: usize = 64;

/// What Postgres should hold. Roles and databases computectl created and no longer finds
/// here are dropped; others are never touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSpec {
    /// Must be [`SPEC_FORMAT_VERSION`].
    pub format_version: u32,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub databases: Vec<Database>,
    /// postgresql.conf settings, key to value, written as quoted strings.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Extensions created in every database of the spec; each must be in the image.
    #[serde(default)]
    pub extensions: Vec<String>,
}

/// A login role.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    /// A SCRAM-SHA-256 verifier (`SCRAM-SHA-256$<iter>:<salt>$<stored key>:<server key>`)
    /// or `md5` and 32 hex digits. Optional in the format only so that a missing one is
    /// reported with the rest, not as a parse error.
    #[serde(default)]
    pub password_hash: Option<String>,
}

// The verifier stays out of logs and panics.
impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Role")
            .field("name", &self.name)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A database and the role of the spec that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    pub owner: String,
}

/// One problem with a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("not a compute spec: {0}")]
    Malformed(String),
    #[error(
        "format_version {found} is not supported; this computectl reads {SPEC_FORMAT_VERSION}"
    )]
    UnsupportedVersion { found: u32 },
    #[error("{kind} name {name:?}: {reason}")]
    BadName {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("role {0:?} is listed more than once")]
    DuplicateRole(String),
    #[error("database {0:?} is listed more than once")]
    DuplicateDatabase(String),
    #[error("database {database:?}: owner {owner:?} is not a role of the spec")]
    UnknownOwner { database: String, owner: String },
    #[error("role {0:?}: no password hash (a SCRAM-SHA-256 verifier or an md5 hash)")]
    MissingPasswordHash(String),
    #[error("role {0:?}: the password hash is neither a SCRAM-SHA-256 verifier nor an md5 hash; clear passwords are refused")]
    BadPasswordHash(String),
    #[error("extension {0:?} is not installed in the image")]
    UnknownExtension(String),
    #[error("setting {0:?}: a key must match [a-z_][a-z0-9_.]*")]
    BadSettingKey(String),
    #[error("setting {0:?} is computectl's; a spec cannot set {list}", list = RESERVED_SETTINGS.join(", "))]
    ReservedSetting(String),
    #[error("setting {0:?}: the value contains a line break or a NUL")]
    BadSettingValue(String),
}

/// Every problem found with a spec; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(Vec<SpecError>);

impl SpecErrors {
    pub fn errors(&self) -> &[SpecError] {
        &self.0
    }
}

impl From<SpecError> for SpecErrors {
    fn from(error: SpecError) -> SpecErrors {
        SpecErrors(vec![error])
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Reads a spec from JSON. A spec of another format version is refused as such, before
/// its fields are judged by this version's rules.
pub fn parse(bytes: &[u8]) -> Result<ComputeSpec, SpecErrors> {
    #[derive(Deserialize)]
    struct Probe {
        format_version: Option<u32>,
    }
    if let Ok(Probe {
        format_version: Some(found),
    }) = serde_json::from_slice::<Probe>(bytes)
    {
        if found != SPEC_FORMAT_VERSION {
            return Err(SpecError::UnsupportedVersion { found }.into());
        }
    }
    serde_json::from_slice(bytes).map_err(|e| SpecError::Malformed(e.to_string()).into())
}

impl ComputeSpec {
    /// Checks everything computectl relies on; `installed_extensions` are the extensions
    /// the image carries. Returns every problem, not the first.
    pub fn validate(&self, installed_extensions: &[String]) -> Result<(), SpecErrors> {
        let mut errors = Vec::new();
        if self.format_version != SPEC_FORMAT_VERSION {
            errors.push(SpecError::UnsupportedVersion {
                found: self.format_version,
            });
        }
        let mut roles = BTreeSet::new();
        for role in &self.roles {
            if let Some(reason) = name_problem(&role.name, RESERVED_ROLES) {
                errors.push(bad_name("role", &role.name, reason));
            }
            if !roles.insert(role.name.as_str()) {
                errors.push(SpecError::DuplicateRole(shown(&role.name)));
            }
            match &role.password_hash {
                None => errors.push(SpecError::MissingPasswordHash(shown(&role.name))),
                Some(hash) if !is_password_hash(hash) => {
                    errors.push(SpecError::BadPasswordHash(shown(&role.name)))
                }
                Some(_) => {}
            }
        }
        let mut databases = BTreeSet::new();
        for database in &self.databases {
            if let Some(reason) = name_problem(&database.name, RESERVED_DATABASES) {
                errors.push(bad_name("database", &database.name, reason));
            }
            if !databases.insert(database.name.as_str()) {
                errors.push(SpecError::DuplicateDatabase(shown(&database.name)));
            }
            if !roles.contains(database.owner.as_str()) {
                errors.push(SpecError::UnknownOwner {
                    database: shown(&database.name),
                    owner: shown(&database.owner),
                });
            }
        }
        for extension in &self.extensions {
            if !installed_extensions.contains(extension) {
                errors.push(SpecError::UnknownExtension(shown(extension)));
            }
        }
        for (key, value) in &self.settings {
            if !is_setting_key(key) {
                errors.push(SpecError::BadSettingKey(shown(key)));
            } else if RESERVED_SETTINGS.contains(&key.as_str()) {
                errors.push(SpecError::ReservedSetting(key.clone()));
            }
            if value.contains(['\n', '\r', '\0']) {
                errors.push(SpecError::BadSettingValue(shown(key)));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(errors))
        }
    }
}

fn shown(name: &str) -> String {
    match name.char_indices().nth(MAX_SHOWN_CHARS) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_string(),
    }
}

fn bad_name(kind: &'static str, name: &str, reason: &'static str) -> SpecError {
    SpecError::BadName {
        kind,
        name: shown(name),
        reason,
    }
}

fn name_problem(name: &str, reserved: &[&str]) -> Option<&'static str> {
    let mut bytes = name.bytes();
    let well_formed = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let lower = name.to_ascii_lowercase();
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        Some("must be 1 to 63 bytes long")
    } else if !well_formed {
        Some("must match [a-zA-Z_][a-zA-Z0-9_]*")
    } else if lower.starts_with("pg_") {
        Some("names starting with pg_ are reserved to Postgres")
    } else if reserved.contains(&lower.as_str()) {
        Some("is reserved")
    } else {
        None
    }
}

fn is_setting_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// Postgres stores a password it does not recognise as a verifier by hashing it as a clear
/// password, so these checks are at least as strict as Postgres's own recognition
/// (`get_password_type`, `parse_scram_secret`).
fn is_password_hash(hash: &str) -> bool {
    is_md5_hash(hash) || is_scram_verifier(hash)
}

fn is_md5_hash(hash: &str) -> bool {
    hash.len() == 35
        && hash.starts_with("md5")
        && hash[3..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_scram_verifier(hash: &str) -> bool {
    let Some(rest) = hash.strip_prefix("SCRAM-SHA-256$") else {
        return false;
    };
    let Some((iterations_salt, keys)) = rest.split_once('$') else {
        return false;
    };
    let (Some((iterations, salt)), Some((stored_key, server_key))) =
        (iterations_salt.split_once(':'), keys.split_once(':'))
    else {
        return false;
    };
    iterations.bytes().all(|b| b.is_ascii_digit())
        && iterations.parse::<u32>().is_ok_and(|n| n > 0)
        && base64_decoded_len(salt).is_some_and(|n| n > 0)
        && base64_decoded_len(stored_key) == Some(32)
        && base64_decoded_len(server_key) == Some(32)
}

/// The length `text` decodes to, if it is padded standard base64.
fn base64_decoded_len(text: &str) -> Option<usize> {
    if text.is_empty() || !text.len().is_multiple_of(4) {
        return None;
    }
    let body = text.trim_end_matches('=');
    let padding = text.len() - body.len();
    let alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    (padding <= 2 && body.bytes().all(alphabet)).then(|| text.len() / 4 * 3 - padding)
}
