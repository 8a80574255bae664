//! A Debian host booted with a real systemd as PID 1 (`systemd-nspawn -b`), with the vmhost
//! package installed: for what only systemd shows, such as readiness, the watchdog, the
//! journal and the unit's hardening. Or without it, in a lab's network namespace, for Ansible
//! to install it over ssh.

use crate::package::{build_package, host_root, run};
use crate::wait_until;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Where the guest images are; the machine sees them at the same path, read-only.
const IMAGE_CACHE: &str = "/var/cache/vmhost/images";

pub struct Machine {
    pub name: String,
    dir: tempfile::TempDir,
    nspawn: Child,
    /// The machine's PID 1, as this host sees it.
    leader: i32,
}

impl Machine {
    /// Boots a fresh root with the package installed and `config` as vmhostd's config, and
    /// waits until systemd has finished starting up.
    pub fn boot_with_package(name: &str, config: &str) -> Machine {
        let deb = build_package();
        let dir = host_root("vmhost-machine-");
        let root = dir.path().join("root");
        std::fs::copy(&deb, root.join("tmp/vmhost.deb")).unwrap();
        run(Command::new("chroot")
            .arg(&root)
            .args(["dpkg", "-i", "/tmp/vmhost.deb"])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"));
        std::fs::write(root.join("etc/vmhost/vmhostd.toml"), config).unwrap();
        Machine::boot(name, dir, &["--private-network".into()])
    }

    /// Boots a fresh clean root, without the package, in the network namespace `netns`
    /// (`/run/netns/NAME`, e.g. a `Lab` host's: the machine has its addresses), once
    /// `prepare` has changed the root (seen from this host); waits until systemd has
    /// finished starting up. Its root may lock memory, as a real host's: QEMU checks that it
    /// can (munlockall) before a post-copy migration.
    pub fn boot_clean_in_netns(
        name: &str,
        netns: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Machine {
        let dir = host_root("vmhost-machine-");
        prepare(&dir.path().join("root"));
        let network = format!("--network-namespace-path=/run/netns/{netns}");
        Machine::boot(name, dir, &[network, "--capability=CAP_IPC_LOCK".into()])
    }

    fn boot(name: &str, dir: tempfile::TempDir, options: &[String]) -> Machine {
        let root = dir.path().join("root");
        std::fs::write(root.join("etc/hostname"), format!("{name}\n")).unwrap();
        let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .arg(format!("--directory={}", root.display()))
            .arg(format!("--machine={name}"))
            .arg(format!("--bind-ro={IMAGE_CACHE}"))
            // No systemd runs this host's services: no machined to register with, and no
            // scope to make.
            .args(["--boot", "--register=no", "--keep-unit"])
            .args(options)
            .arg("--console=pipe")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot run systemd-nspawn (scripts/setup installs systemd-container)");
        let mut machine = Machine {
            name: name.into(),
            dir,
            nspawn,
            leader: 0,
        };
        // nspawn's first child sets the container up and exits: the leader is the child that
        // has executed the machine's init, no longer a copy of nspawn.
        wait_until(Duration::from_secs(60), "the machine's systemd", || {
            let child = child_of(machine.nspawn.id()).filter(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                comm.is_ok_and(|c| c.trim() != "systemd-nspawn")
            });
            machine.leader = child.unwrap_or(0);
            machine.leader != 0
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let state = machine.run(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&state.stdout);
            if matches!(state.trim(), "running" | "degraded") {
                return machine;
            }
            if std::time::Instant::now() > deadline {
                let jobs = machine.run(&["systemctl", "list-jobs", "--no-pager"]);
                let console = std::fs::read_to_string(machine.dir.path().join("console.log"));
                panic!(
                    "machine {name} did not boot in 120 s ({}); its jobs:\n{}\nits console:\n{}",
                    state.trim(),
                    String::from_utf8_lossy(&jobs.stdout),
                    console.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The machine's root file system, seen from this host.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Runs a command inside the machine: all its namespaces, its root.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--target={}", self.leader))
            .args(["--all", "--"])
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("cannot run nsenter")
    }

    /// The command's stdout; its whole output and the journal in the panic when it fails.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?} in machine {} failed ({}):\n{}{}\n--- journal ---\n{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.journal_tail()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// A property of a unit, as systemd has it (`systemctl show -p`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.run_ok(&["systemctl", "show", "--value", "-p", property, unit])
            .trim()
            .to_string()
    }

    pub fn journal_tail(&self) -> String {
        let output = self.run(&["journalctl", "--no-pager", "-n", "60"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A file of the machine, seen from this host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }
}

impl Drop for Machine {
    /// Ending the machine's PID 1 makes the kernel end every process of its PID namespace:
    /// vmhostd and the QEMUs that outlive it by design. nspawn then exits.
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if self.leader != 0 {
            let _ = kill(Pid::from_raw(self.leader), Signal::SIGKILL);
        }
        let _ = kill(Pid::from_raw(self.nspawn.id() as i32), Signal::SIGTERM);
        let _ = self.nspawn.wait();
    }
}

/// The process whose parent is `parent`, if exactly one.
fn child_of(parent: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    let mut pids = children.split_whitespace().filter_map(|p| p.parse().ok());
    match (pids.next(), pids.next()) {
        (Some(pid), None) => Some(pid),
        _ => None,
    }
}
