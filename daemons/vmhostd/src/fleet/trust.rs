//! Whom the fleet endpoint admits, as a reload changes it: the CAs and this host's
//! certificate in the credentials folder, and the hosts `fleet.denied_hosts` refuses.

use super::Fleet;
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::Path;
use vmhost_gossip::quic::FleetEndpoint;
use vmhost_pki::Identity;

impl Fleet {
    /// Reads the credentials folder again and applies it, with `denied`: new connections
    /// follow it, and open ones to or from hosts it no longer admits are closed.
    pub async fn reload_trust(&self, denied: &BTreeSet<String>) -> anyhow::Result<()> {
        let identity = load(&self.config.credentials)?;
        apply(&self.endpoint, &identity, denied).await
    }

    /// A denied host cannot be reached, so it is no candidate for anything.
    pub(crate) fn denies(&self, host: &str) -> bool {
        self.endpoint.denies(host)
    }
}

pub(super) fn load(credentials: &Path) -> anyhow::Result<Identity> {
    Identity::load(credentials).context("cannot load this host's fleet credentials")
}

pub(super) async fn apply(
    endpoint: &FleetEndpoint,
    identity: &Identity,
    denied: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let closed = endpoint
        .set_trust(identity, denied.clone())
        .await
        .context("cannot apply the fleet credentials")?;
    let certificate = vmhost_pki::host_name(&identity.cert).unwrap_or_default();
    tracing::info!(%certificate, trusted_cas = identity.trusted_cas().count(), ?denied, ?closed, "fleet trust applied");
    Ok(())
}

#[cfg(test)]
mod tests;
