//! The soak's fleet: three vmhostd in network namespaces, one of them with its state dir on
//! a small loop-mounted ext4 that a fault can fill. Dropping it ends every process of the
//! lab before its mounts and namespaces go.

use crate::netns::{run_command as run, start_fleet, Lab};
use crate::procs::{kill, lab_processes};
use crate::workload::live_hosts;
use crate::{wait_until, Limits, TestHost};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const HOSTS: [&str; 3] = ["a", "b", "c"];
pub const LEASE_TTL_SECS: u64 = 5;
/// Short, so that some link cuts outlast it and leave a migration to resume.
pub const RECOVER_SECS: u64 = 10;
/// The host whose state dir is on the small filesystem.
pub const SMALL_FS_HOST: usize = 2;
/// Room for a few VM folders, and a disk or two (16 MiB written at boot, then records).
const SMALL_FS_MIB: u64 = 128;

pub struct Fleet {
    pub hosts: Vec<TestHost>,
    pub lab: Lab,
    small_fs: Option<SmallFs>,
    _pki: tempfile::TempDir,
}

impl Fleet {
    pub fn start() -> Fleet {
        let lab = Lab::new(HOSTS.len());
        let pki = tempfile::tempdir().unwrap();
        // Roomier than the first VMs need, so that migrations and drains mostly find a
        // target; the guests touch far less memory than their size.
        let limits = || Limits {
            vcpus: 8,
            memory_mib: 8192,
        };
        let hosts = start_fleet(
            &lab,
            pki.path(),
            HOSTS.iter().map(|name| (*name, limits())).collect(),
            &format!(
                "gossip_interval_ms = 200\nlease_ttl_secs = {LEASE_TTL_SECS}\n\
                 migration_recover_secs = {RECOVER_SECS}\n"
            ),
            "",
        );
        let mut fleet = Fleet {
            hosts,
            lab,
            small_fs: None,
            _pki: pki,
        };
        fleet.small_fs = Some(SmallFs::under(&mut fleet.hosts[SMALL_FS_HOST]));
        fleet.wait_all_live(Duration::from_secs(60));
        fleet
    }

    pub fn wait_all_live(&self, timeout: Duration) {
        wait_until(timeout, "every host to see every host live", || {
            self.hosts
                .iter()
                .all(|h| h.vmctl(&["host"]).status.success() && live_hosts(h) == HOSTS.len())
        });
    }

    pub fn small_fs(&self) -> &SmallFs {
        self.small_fs
            .as_ref()
            .expect("the small filesystem is mounted")
    }

    pub fn state_dirs(&self) -> Vec<PathBuf> {
        self.hosts.iter().map(|h| h.state_dir()).collect()
    }

    pub fn vm_dir(&self, host: usize, vm: &str) -> PathBuf {
        self.hosts[host].state_dir().join("vms").join(vm)
    }

    /// Keeps every daemon's log, for a report of what broke.
    pub fn keep_logs(&self, to: &Path) {
        let _ = std::fs::create_dir_all(to);
        for (host, name) in self.hosts.iter().zip(HOSTS) {
            let _ = std::fs::copy(host.daemon_log(), to.join(format!("vmhostd-{name}.log")));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            host.kill_daemon();
        }
        // QEMUs, vsock backends and NBD servers, even those no pidfile names any more.
        for process in lab_processes(&self.state_dirs()) {
            kill(process.pid);
        }
        std::thread::sleep(Duration::from_millis(300));
        self.small_fs.take();
    }
}

/// An ext4 image loop-mounted over one host's state dir, and the file that fills it.
pub struct SmallFs {
    _image_dir: tempfile::TempDir,
    mount: PathBuf,
    mounted: bool,
}

impl SmallFs {
    /// Moves `host`'s state dir onto a fresh small filesystem, with its daemon stopped
    /// meanwhile (it holds no VM yet).
    fn under(host: &mut TestHost) -> SmallFs {
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("state.ext4");
        let mount = host.state_dir();
        let mut fs = SmallFs {
            _image_dir: image_dir,
            mount: mount.clone(),
            mounted: false,
        };
        host.kill_daemon();
        let old = mount.with_extension("before-mount");
        std::fs::rename(&mount, &old).unwrap();
        std::fs::create_dir(&mount).unwrap();
        let image = image.to_str().unwrap();
        let size = format!("{SMALL_FS_MIB}M");
        let steps = [
            ("truncate", vec!["-s", &size, image]),
            ("mkfs.ext4", vec!["-q", "-F", "-m", "0", image]),
            ("mount", vec!["-o", "loop", image, mount.to_str().unwrap()]),
        ];
        for (program, args) in steps {
            run(program, &args).unwrap_or_else(|e| panic!("the small state filesystem: {e}"));
        }
        fs.mounted = true;
        let from = format!("{}/.", old.display());
        run("cp", &["-a", &from, mount.to_str().unwrap()]).unwrap();
        std::fs::remove_dir_all(&old).unwrap();
        host.start_daemon();
        fs
    }

    fn filler(&self) -> PathBuf {
        self.mount.join("filler")
    }

    /// Takes every free block, as a runaway log would.
    pub fn fill(&self) -> Result<u64, String> {
        let stat = nix::sys::statvfs::statvfs(&self.mount).map_err(|e| e.to_string())?;
        let free = stat.blocks_available() * stat.fragment_size();
        let filler = self.filler();
        run(
            "fallocate",
            &["-l", &free.to_string(), filler.to_str().unwrap()],
        )
        .or_else(|_| {
            // fallocate may ask for slightly more than the metadata leaves; dd takes the rest.
            run(
                "sh",
                &[
                    "-c",
                    r#"dd if=/dev/zero of="$1" bs=64k 2>/dev/null; true"#,
                    "fill",
                    filler.to_str().unwrap(),
                ],
            )
        })?;
        let _ = run(
            "sh",
            &[
                "-c",
                r#"dd if=/dev/zero of="$1" bs=4k 2>/dev/null; true"#,
                "fill",
                self.mount.join("filler-tail").to_str().unwrap(),
            ],
        );
        Ok(free)
    }

    pub fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
        let _ = std::fs::remove_file(self.mount.join("filler-tail"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        self.free();
        if self.mounted {
            let mount = self.mount.to_str().unwrap();
            if run("umount", &[mount]).is_err() {
                let _ = run("umount", &["-l", mount]);
            }
        }
    }
}
