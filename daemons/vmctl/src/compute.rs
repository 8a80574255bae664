//! `vmctl compute`: a VM's Postgres compute, as the guest's computectl reports it.

use clap::Subcommand;
use std::path::PathBuf;
use vmhost_api::ComputeAction;

#[derive(Subcommand)]
pub enum ComputeCommand {
    /// State, error, start time and last activity.
    Status,
    /// Apply a new spec (JSON) live; the host keeps it as the VM's spec.
    Configure {
        #[arg(value_name = "FILE", value_parser = read_spec)]
        spec: serde_json::Value,
    },
    /// Shut Postgres down fast; the VM keeps running.
    Terminate,
}

impl ComputeCommand {
    pub fn into_action(self) -> ComputeAction {
        match self {
            ComputeCommand::Status => ComputeAction::Status,
            ComputeCommand::Configure { spec } => ComputeAction::Configure { spec },
            ComputeCommand::Terminate => ComputeAction::Terminate,
        }
    }
}

/// A SCRAM-SHA-256 verifier of `password` (RFC 5802, RFC 7677), as Postgres stores it and
/// a spec carries it: the password itself never leaves the operator's machine.
pub fn scram_verifier(password: &str, salt: &[u8; 16]) -> String {
    use base64::Engine;
    use ring::{digest, hmac, pbkdf2};
    // Postgres's own default.
    const ITERATIONS: u32 = 4096;
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ITERATIONS).expect("a constant above zero"),
        salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64(salt),
        b64(stored_key.as_ref()),
        b64(server_key.as_ref())
    )
}

/// `vmctl hash-password`: the verifier of the password on stdin (one line), with a random salt.
pub fn hash_password() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err("no password on stdin".into());
    }
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "no randomness for the salt".to_string())?;
    Ok(scram_verifier(password, &salt))
}

/// A spec file, read where vmctl runs: the host gets its contents, not its path.
pub fn read_spec(path: &str) -> Result<serde_json::Value, String> {
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read spec {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("spec {} is not JSON: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_has_postgres_s_shape_and_depends_on_password_and_salt() {
        let verifier = scram_verifier("secret", b"0123456789abcdef");
        let (head, keys) = verifier.split_once('$').unwrap().1.split_once('$').unwrap();
        assert_eq!(head, "4096:MDEyMzQ1Njc4OWFiY2RlZg==");
        let (stored, server) = keys.split_once(':').unwrap();
        assert_eq!((stored.len(), server.len()), (44, 44), "{verifier}");
        assert!(verifier.starts_with("SCRAM-SHA-256$"));
        assert_eq!(verifier, scram_verifier("secret", b"0123456789abcdef"));
        assert_ne!(verifier, scram_verifier("secret2", b"0123456789abcdef"));
        assert_ne!(verifier, scram_verifier("secret", b"fedcba9876543210"));
    }
}
