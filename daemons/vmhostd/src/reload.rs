//! `systemctl reload vmhostd` (SIGHUP): the config file and the fleet's credentials folder
//! are read again. The fleet's trust (trusted CAs, this host's certificate, and
//! `fleet.denied_hosts`) applies at once; any other change is logged as waiting for a
//! restart. A config or credentials that do not load are refused, and what runs stays.

use crate::config::Config;
use crate::fleet::Fleet;
use anyhow::Context;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The keys a reload applies.
const LIVE_KEYS: &[&str] = &["fleet.denied_hosts"];

/// Reloads on each SIGHUP from now on; `running` is the table of the config that runs.
pub fn on_hangup(
    path: PathBuf,
    running: toml::Table,
    fleet: Option<Arc<Fleet>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload(&path, &running, fleet.as_deref()).await;
        }
    });
    Ok(())
}

async fn reload(path: &Path, running: &toml::Table, fleet: Option<&Fleet>) {
    tracing::info!(config = %path.display(), "reloading");
    let (config, table) = match Config::load_with_table(path) {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::error!("reload refused, the running config stays: {error}");
            return;
        }
    };
    let waiting = changed_keys(running, &table);
    if !waiting.is_empty() {
        let keys = waiting.join(", ");
        tracing::warn!(%keys, "config changes that apply only after a restart");
    }
    if let (Some(fleet), Some(fleet_config)) = (fleet, &config.fleet) {
        if let Err(error) = fleet.reload_trust(&fleet_config.denied_hosts).await {
            tracing::error!("reload refused, the running fleet trust stays: {error:#}");
        }
    }
}

/// The dotted keys whose values differ, or that only one side has, but for `LIVE_KEYS`.
fn changed_keys(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let (old, new) = (leaves(old), leaves(new));
    let keys: BTreeSet<_> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|key| old.get(*key) != new.get(*key) && !LIVE_KEYS.contains(&key.as_str()))
        .cloned()
        .collect()
}

fn leaves(table: &toml::Table) -> BTreeMap<String, &toml::Value> {
    let mut leaves = BTreeMap::new();
    let mut tables = vec![(String::new(), table)];
    while let Some((prefix, table)) = tables.pop() {
        for (key, value) in table {
            let key = match prefix.as_str() {
                "" => key.clone(),
                prefix => format!("{prefix}.{key}"),
            };
            match value {
                toml::Value::Table(inner) => tables.push((key, inner)),
                leaf => {
                    leaves.insert(key, leaf);
                }
            }
        }
    }
    leaves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_reload_names_the_changes_that_wait_for_a_restart() {
        let running = table(
            "state_dir = \"/s\"\n[capacity]\nvcpus = 8\n\
             [fleet]\ncluster = \"c\"\nseeds = [\"10.0.0.2:7100\"]\ndenied_hosts = [\"x\"]",
        );
        let same = table(
            "state_dir = \"/s\"\n[capacity]\nvcpus = 8\n\
             [fleet]\ncluster = \"c\"\nseeds = [\"10.0.0.2:7100\"]\ndenied_hosts = [\"y\"]",
        );
        assert_eq!(changed_keys(&running, &same), Vec::<String>::new());
        let changed = table(
            "state_dir = \"/s\"\n[capacity]\nvcpus = 16\n[fleet]\ncluster = \"c\"\n\
             seeds = []\n[metrics]\nenabled = false",
        );
        assert_eq!(
            changed_keys(&running, &changed),
            ["capacity.vcpus", "fleet.seeds", "metrics.enabled"]
        );
    }

    /// What a reload, like a start, accepts in `fleet.denied_hosts`.
    #[test]
    fn denied_hosts_are_host_names_other_than_this_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmhostd.toml");
        let load = |denied: &str| {
            let text = format!(
                "host_name = \"host-a\"\nstate_dir = \"/s\"\n[capacity]\nvcpus = 8\n\
                 memory_mib = 16384\n[fleet]\ncluster = \"c\"\nlisten = \"10.0.0.1:7100\"\n\
                 credentials = \"/f\"\n{denied}"
            );
            std::fs::write(&path, text).unwrap();
            Config::load_with_table(&path).map(|(config, _)| config.fleet.unwrap().denied_hosts)
        };
        assert!(load("").unwrap().is_empty());
        let denied = load("denied_hosts = [\"host-x\", \"host-y\"]").unwrap();
        assert_eq!(denied, ["host-x".to_string(), "host-y".into()].into());
        for (list, expected) in [
            ("\"host-x\"", "invalid type"),
            ("[\"\"]", "'' is not a host name"),
            ("[\" host-x\"]", "' host-x' is not a host name"),
            ("[\"host-a\"]", "names this host"),
        ] {
            let message = load(&format!("denied_hosts = {list}"))
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }
}
