//! Where each migration tunnel a peer opens is delivered: the unix socket the arriving
//! VM's QEMU listens on. The migration module opens and closes routes; the fleet endpoint
//! looks them up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use vmhost_api::IncomingMigration;

/// Where the tunnel of each arriving migration is delivered: the unix socket its QEMU
/// listens on.
/// A tunnel id no other host will guess: the target delivers a tunnel only to the
/// socket registered under its id.
pub fn new_tunnel_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[derive(Default)]
pub struct TunnelTargets(Mutex<HashMap<u64, PathBuf>>);

impl TunnelTargets {
    pub fn get(&self, id: u64) -> Option<PathBuf> {
        self.lock().get(&id).cloned()
    }

    /// Routes an arrival's tunnels: its stream to `socket`, its disk to `disk_socket`.
    pub fn open(&self, incoming: &IncomingMigration, socket: PathBuf, disk_socket: PathBuf) {
        let mut tunnels = self.lock();
        tunnels.insert(incoming.tunnel, socket);
        if let Some(disk_tunnel) = incoming.disk_tunnel {
            tunnels.insert(disk_tunnel, disk_socket);
        }
    }

    /// Routes one tunnel to `socket`.
    pub fn route(&self, id: u64, socket: PathBuf) {
        self.lock().insert(id, socket);
    }

    pub fn unroute(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn close(&self, incoming: &IncomingMigration) {
        let mut tunnels = self.lock();
        tunnels.remove(&incoming.tunnel);
        if let Some(disk_tunnel) = incoming.disk_tunnel {
            tunnels.remove(&disk_tunnel);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, PathBuf>> {
        self.0.lock().expect("tunnel table lock poisoned")
    }
}
