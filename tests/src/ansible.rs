//! An Ansible control node for tests: `ansible-playbook` from the venv `scripts/setup`
//! makes, run on this host inside a lab's client namespace, over ssh with a throwaway key to
//! machines that trust it (`nspawn::Machine::boot_clean_in_netns`).

use crate::package::run;
use crate::repo_root;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where `scripts/setup` installs ansible-core (ansible/requirements.txt).
pub const VENV: &str = "/opt/vmhost-ansible";

pub struct ControlNode {
    /// The ssh key, the inventory, ssh's control sockets and the fleet CA.
    dir: tempfile::TempDir,
    /// The network namespace ansible-playbook runs in.
    netns: String,
}

/// One `ansible-playbook` run: its output, and each host's counts of the play recap.
pub struct PlaybookRun {
    pub output: String,
    pub recap: BTreeMap<String, BTreeMap<String, u64>>,
    pub took: Duration,
}

impl PlaybookRun {
    /// A recap count of `host`, e.g. `changed`.
    pub fn count(&self, host: &str, what: &str) -> u64 {
        let counts = self
            .recap
            .get(host)
            .unwrap_or_else(|| panic!("{host} is not in the play recap:\n{}", self.output));
        counts[what]
    }
}

impl ControlNode {
    /// A control node in `netns`, with a new ssh key.
    pub fn new(netns: String) -> ControlNode {
        assert!(
            Path::new(VENV).join("bin/ansible-playbook").exists(),
            "{VENV}/bin/ansible-playbook is missing: run scripts/setup"
        );
        // Short: ssh's control sockets live under it, and a socket path has 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("vmh-ansible-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("cp")).unwrap();
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmhost-test", "-f"])
            .arg(dir.path().join("id_ed25519")));
        ControlNode { dir, netns }
    }

    /// Lets this control node log in as root on the machine whose root is `root`.
    pub fn authorize(&self, root: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let ssh = root.join("root/.ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = std::fs::read(self.dir.path().join("id_ed25519.pub")).unwrap();
        std::fs::write(ssh.join("authorized_keys"), key).unwrap();
    }

    pub fn private_key(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    /// The fleet CA's folder (`vmhost_ca_dir`): on the control node only.
    pub fn ca_dir(&self) -> PathBuf {
        self.path("ca")
    }

    /// A file of the control node's own folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the inventory (YAML's JSON subset) that `playbook` uses.
    pub fn write_inventory(&self, inventory: &serde_json::Value) {
        let text = serde_json::to_string_pretty(inventory).unwrap();
        std::fs::write(self.inventory(), text).unwrap();
    }

    fn inventory(&self) -> PathBuf {
        self.dir.path().join("inventory.json")
    }

    /// Runs `ansible/PLAYBOOK` with the inventory and `args`; fails with its output.
    pub fn playbook(&self, playbook: &str, args: &[&str]) -> PlaybookRun {
        let started = Instant::now();
        let output = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(Path::new(VENV).join("bin/ansible-playbook"))
            .arg("-i")
            .arg(self.inventory())
            .arg(playbook)
            .args(args)
            // ansible/ansible.cfg: the role's path.
            .current_dir(repo_root().join("ansible"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_PIPELINING", "1")
            .env("ANSIBLE_HOST_KEY_CHECKING", "0")
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", self.dir.path().join("cp"))
            // Every machine of the lab has the root's host key, and a lab's addresses are
            // those of the previous one: nothing to remember.
            .env(
                "ANSIBLE_SSH_ARGS",
                "-o ControlMaster=auto -o ControlPersist=30s -o StrictHostKeyChecking=no \
                 -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            )
            .output()
            .expect("cannot run ansible-playbook");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "ansible-playbook {playbook} failed ({}):\n{text}",
            output.status
        );
        PlaybookRun {
            recap: parse_recap(&text),
            output: text,
            took: started.elapsed(),
        }
    }
}

/// The PLAY RECAP's lines: `host : ok=12 changed=3 unreachable=0 failed=0 ...`.
pub fn parse_recap(output: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let Some((_, recap)) = output.rsplit_once("PLAY RECAP") else {
        return BTreeMap::new();
    };
    recap
        .lines()
        .filter_map(|line| {
            let (host, counts) = line.split_once(" : ")?;
            let counts = counts
                .split_whitespace()
                .filter_map(|c| {
                    let (k, v) = c.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            Some((host.trim().to_string(), counts))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_play_recap() {
        let out = "PLAY RECAP *****\n\
                   a                          : ok=20   changed=0    unreachable=0    failed=0    skipped=7    rescued=0    ignored=0   \n\
                   b : ok=3 changed=2 unreachable=0 failed=1\n";
        let recap = super::parse_recap(out);
        assert_eq!(recap["a"]["changed"], 0);
        assert_eq!(recap["a"]["ok"], 20);
        assert_eq!(recap["b"]["failed"], 1);
        assert_eq!(recap.len(), 2);
    }
}
