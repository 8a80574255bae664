//! Test harness: a real vmhostd on a private state dir, driven through the real vmctl, with
//! guests booted from the minimal test image.
//!
//! These tests need root-free access to QEMU and the image builder's inputs (a guest kernel
//! and busybox-static). When something is missing they fail with a message saying what.

pub mod ansible;
pub mod benchmarks;
pub mod capacity;
pub mod cgroups;
pub mod echo;
mod fake_guest;
pub mod migrate;
pub mod netns;
pub mod nspawn;
pub mod package;
pub mod postgres;
pub mod procs;
pub mod qmp;
pub mod soak;
pub mod workload;

pub use fake_guest::FakeGuest;
pub use procs::{process_alive, LivePids};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `vmctl create` arguments that switch the agent's CPU goals off, so that only memory can
/// grow the VM: a memory workload's page faults, or a boot, keep a vCPU busy, and the CPU
/// signals would grow the VM before its monitor ever asked for memory.
pub const MEMORY_GOAL_ONLY: [&str; 2] = ["--agent", "load_target=1000"];

/// Directory of the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// An `[images.NAME]` table of a host config: the test image at `image` running
/// `workload` (kernel command line words such as `vmhost.workload=...`).
pub fn workload_image(name: &str, image: &Path, workload: &str) -> String {
    format!(
        "[images.{name}]\nkernel = \"{0}/vmlinuz\"\ninitrd = \"{0}/initrd.img\"\ncmdline = \"{1} {workload}\"\n",
        image.display(),
        vmm::cmdline::DEFAULT_KERNEL_CMDLINE,
    )
}

/// Builds (or finds in the cache) the minimal test image with this workspace's guest
/// binaries; returns its directory.
pub fn test_image() -> PathBuf {
    let output = Command::new(repo_root().join("images/build-test-image"))
        .arg("--with-binary")
        .arg(bin("vm-monitor"))
        .arg("--with-binary")
        .arg(bin("vmhost-memhog"))
        .arg("--with-binary")
        .arg(bin("vmhost-cpuburn"))
        .arg("--with-binary")
        .arg(bin("vmhost-dirtier"))
        .arg("--with-binary")
        .arg(bin("vmhost-pressure"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run images/build-test-image");
    assert!(
        output.status.success(),
        "images/build-test-image failed; it needs linux-image-cloud-amd64 and busybox-static"
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// The guest's own view of its size, as the test image's init reports it on the serial log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestView {
    pub cpus: u32,
    pub mem_total_kb: u64,
}

impl GuestView {
    /// The view of a guest that booted at 1 CU (this view) once it runs `cu` whole CU, in
    /// the test hosts' shape: a vCPU and a GiB each.
    pub fn at_cu(self, cu: u32) -> GuestView {
        GuestView {
            cpus: cu,
            mem_total_kb: self.mem_total_kb + u64::from(cu - 1) * (1 << 20),
        }
    }

    /// The VM's memory as the guest sees it, given its view and size at boot: plugged
    /// memory shows in MemTotal one for one.
    pub fn memory_bytes(&self, boot: GuestView, boot_bytes: u64) -> u64 {
        (boot_bytes + self.mem_total_kb * 1024).saturating_sub(boot.mem_total_kb * 1024)
    }
}

pub fn parse_guest_view(line: &str) -> Option<GuestView> {
    let rest = line.split("vmhost-guest: cpus=").nth(1)?;
    let (cpus, rest) = rest.split_once(" mem_total_kb=")?;
    Some(GuestView {
        cpus: cpus.trim().parse().ok()?,
        mem_total_kb: rest.trim().parse().ok()?,
    })
}

/// What the `memhog` image's workload allocates, and the guest's vsock port that tells it
/// to free that (`TestHost::free_memhog`).
pub const MEMHOG_MIB: u64 = 900;
pub const MEMHOG_FREE_PORT: u32 = 7200;

/// The pressure benchmark's workload, at the monitor's default upscale threshold.
pub const PRESSURE_WORKLOAD: &str = "vmhost.workload=vmhost-pressure,0.7";

/// What the `cpuburn` image's workload runs.
pub const CPUBURN_THREADS: u64 = 6;
/// What the `dirtier` image's workload keeps rewriting.
pub const DIRTIER_MIB: u64 = 64;
pub const CPUBURN_SECS: u64 = 30;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// One vmhostd with its own state dir and socket. Dropping it kills the daemon and every
/// QEMU it started, even when the test failed.
pub struct TestHost {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    netns: Option<String>,
    daemon: Option<Child>,
}

/// How a test host differs from the default one.
pub struct HostOptions {
    pub name: String,
    pub limits: Limits,
    /// The network namespace vmhostd (and so its QEMUs) runs in.
    pub netns: Option<String>,
    /// TOML appended to the config, e.g. a `[fleet]` table.
    pub extra_config: String,
}

impl HostOptions {
    pub fn new(limits: Limits) -> HostOptions {
        HostOptions {
            name: unique_host_name(),
            limits,
            netns: None,
            extra_config: String::new(),
        }
    }
}

/// Test hosts run side by side and their VMs' cgroups are named after them.
fn unique_host_name() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test-host-{}-{n}", std::process::id())
}

/// The real-QEMU tier runs real parts or fails, loudly, naming what is missing: it never
/// passes by skipping.
fn require_real_parts() {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "QEMU (scripts/setup installs it)"),
        (
            "vhost-device-vsock",
            "vhost-device-vsock (scripts/setup installs it)",
        ),
    ]
    .into_iter()
    .filter(|(binary, _)| {
        !std::process::Command::new("sh")
            .args(["-c", &format!("command -v {binary}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .map(|(_, what)| what)
    .chain(
        (!Path::new("/dev/net/tun").exists())
            .then_some("/dev/net/tun (network namespaces need it)"),
    )
    .collect();
    assert!(
        missing.is_empty(),
        "THE REAL-QEMU TESTS CANNOT RUN ON THIS MACHINE; missing: {}",
        missing.join(", ")
    );
}

impl TestHost {
    /// Writes a config (1 CU = 1 vCPU + 1 GiB) and starts vmhostd.
    pub fn start(limits: Limits) -> TestHost {
        TestHost::start_with(HostOptions::new(limits))
    }

    pub fn start_with(options: HostOptions) -> TestHost {
        require_real_parts();
        let limits = options.limits;
        let image = test_image();
        let dir = tempfile::Builder::new()
            .prefix("vmhost-test-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("vmhostd.sock");
        let config = dir.path().join("vmhostd.toml");
        std::fs::write(
            &config,
            format!(
                r#"host_name = "{name}"
state_dir = "{state}"
api_socket = "{socket}"
accel = "auto"
[capacity]
vcpus = {vcpus}
memory_mib = {memory}
[compute_unit]
vcpus = 1
memory_mib = 1024
[metrics]
listen = "127.0.0.1:0"
[timeouts]
hotplug_secs = 120
stop_grace_secs = 3
[images.test]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
# The same image with a workload that grows to {MEMHOG_MIB} MiB in 16 MiB steps every
# 100 ms, holds it until told on vsock port {MEMHOG_FREE_PORT}, then frees it.
[images.memhog]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
cmdline = "{cmdline} vmhost.workload=vmhost-memhog,{MEMHOG_MIB},16,100,{MEMHOG_FREE_PORT}"
# The same image with {CPUBURN_THREADS} busy threads for {CPUBURN_SECS} s.
[images.cpuburn]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
cmdline = "{cmdline} vmhost.workload=vmhost-cpuburn,{CPUBURN_THREADS},{CPUBURN_SECS}"
# The same image with a workload that rewrites {DIRTIER_MIB} MiB over and over.
[images.dirtier]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
cmdline = "{cmdline} vmhost.workload=vmhost-dirtier,{DIRTIER_MIB}"
# The dirtier image, also writing numbered records to its disk (see images/test-init.sh).
[images.diskwriter]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
cmdline = "{cmdline} vmhost.workload=vmhost-dirtier,{DIRTIER_MIB} vmhost.diskwriter"
# The same image with a workload that allocates past the monitor's upscale threshold at
# once, then reports when MemTotal grew (the pressure benchmark).
[images.pressure]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
cmdline = "{cmdline} {PRESSURE_WORKLOAD}"
# The same image without its monitor, so a test can play the guest.
[images.nomonitor]
kernel = "{image}/vmlinuz"
initrd = "{image}/initrd.img"
cmdline = "{cmdline} vmhost.monitor=off"
{extra}
"#,
                name = options.name,
                extra = options.extra_config,
                cmdline = vmm::cmdline::DEFAULT_KERNEL_CMDLINE,
                state = dir.path().join("state").display(),
                socket = socket.display(),
                vcpus = limits.vcpus,
                memory = limits.memory_mib,
                image = image.display(),
            ),
        )
        .unwrap();
        let mut host = TestHost {
            name: options.name,
            dir,
            config,
            socket,
            netns: options.netns,
            daemon: None,
        };
        host.start_daemon();
        host
    }

    /// Where vmhostd serves Prometheus metrics (it binds an ephemeral port in tests).
    pub fn metrics_addr(&self) -> String {
        let log = std::fs::read_to_string(self.daemon_log()).unwrap_or_default();
        log.lines()
            .rev()
            .find_map(|l| l.split("metrics endpoint listening addr=").nth(1))
            .expect("vmhostd logged its metrics address")
            .trim()
            .to_string()
    }

    /// `GET /metrics` from this host's vmhostd.
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics_addr())
            .expect("connect to the metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.dir.path().join("vmhostd.log")
    }

    /// Runs vmhostd on this host's config and waits until its socket answers.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
            .unwrap();
        let mut command = match &self.netns {
            // Not `ip netns exec`, which mounts a new /sys without the cgroup filesystems
            // that vmhostd places its VMs in.
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{ns}"))
                    .arg(bin("vmhostd"));
                command
            }
            None => Command::new(bin("vmhostd")),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start vmhostd");
        self.daemon = Some(child);
        // vmhostd serves once every VM is reattached, and giving an interrupted
        // departure's memory back to its guest may take up to the hotplug timeout.
        let deadline = std::time::Instant::now() + Duration::from_secs(150);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            let exited = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten());
            assert!(
                exited.is_none() && std::time::Instant::now() < deadline,
                "vmhostd did not come up ({exited:?}):\n{}",
                std::fs::read_to_string(self.daemon_log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.id())
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn vmctl(&self, args: &[&str]) -> Output {
        Command::new(bin("vmctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("cannot run vmctl")
    }

    /// Runs vmctl and insists it succeeds; returns stdout.
    pub fn vmctl_ok(&self, args: &[&str]) -> String {
        let output = self.vmctl(args);
        assert!(
            output.status.success(),
            "vmctl {args:?} failed: {}\n--- vmhostd log ---\n{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.daemon_log()).unwrap_or_default()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs vmctl expecting failure; returns (exit code, stderr).
    pub fn vmctl_err(&self, args: &[&str]) -> (i32, String) {
        let output = self.vmctl(args);
        assert!(
            !output.status.success(),
            "vmctl {args:?} unexpectedly succeeded"
        );
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8(output.stderr).unwrap(),
        )
    }

    pub fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.vmctl_ok(&["--json", "show", name])).unwrap()
    }

    /// Waits until the guest's monitor is connected: downscales need its approval.
    pub fn wait_monitor(&self, name: &str) {
        wait_until(
            Duration::from_secs(120),
            "the guest's monitor to connect",
            || self.show(name)["guest"]["connected"] == true,
        );
    }

    pub fn serial_log(&self, name: &str) -> PathBuf {
        self.state_dir().join("vms").join(name).join("serial.log")
    }

    /// Waits for the guest to finish booting; returns its boot id.
    pub fn wait_guest_ready(&self, name: &str) -> String {
        let log = self.serial_log(name);
        let mut boot_id = String::new();
        wait_until(
            Duration::from_secs(180),
            &format!("guest {name} to boot"),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                match text
                    .lines()
                    .find_map(|l| l.split("vmhost-guest: ready boot_id=").nth(1))
                {
                    Some(id) => {
                        boot_id = id.trim().to_string();
                        true
                    }
                    None => false,
                }
            },
        );
        boot_id
    }

    /// The guest's latest report of its size.
    pub fn guest_view(&self, name: &str) -> Option<GuestView> {
        let text = std::fs::read_to_string(self.serial_log(name)).unwrap_or_default();
        text.lines().rev().find_map(parse_guest_view)
    }

    /// The end of the guest's console and the VM's latest events, for a failure message.
    pub fn guest_story(&self, name: &str) -> String {
        let console = std::fs::read_to_string(self.serial_log(name)).unwrap_or_default();
        let console: Vec<&str> = console.lines().rev().take(40).collect();
        let events = self.vmctl(&["events", name]);
        let events = String::from_utf8_lossy(&events.stdout);
        let events: Vec<&str> = events.lines().rev().take(15).collect();
        format!(
            "console, newest first:\n{}\nevents, newest first:\n{}",
            console.join("\n"),
            events.join("\n")
        )
    }

    /// Waits for the guest's first report of its size, the one at boot.
    pub fn wait_guest_report(&self, name: &str) -> GuestView {
        let log = self.serial_log(name);
        let first = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines().find_map(parse_guest_view)
        };
        wait_until(
            Duration::from_secs(120),
            &format!("guest {name} to report its size"),
            || first().is_some(),
        );
        first().unwrap()
    }

    /// Waits until the guest itself reports `expected` exactly (a resize of a running
    /// guest changes MemTotal by exactly the plugged amount).
    pub fn wait_guest_view(&self, name: &str, expected: GuestView) {
        self.wait_guest_view_within(name, expected, 0)
    }

    /// Like `wait_guest_view`, with MemTotal allowed to differ by `tolerance_kb` (a guest
    /// booted with memory already plugged reserves slightly different amounts).
    pub fn wait_guest_view_within(&self, name: &str, expected: GuestView, tolerance_kb: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let view = self.guest_view(name);
            if view.is_some_and(|v| {
                v.cpus == expected.cpus
                    && v.mem_total_kb.abs_diff(expected.mem_total_kb) <= tolerance_kb
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "guest {name} reports {view:?}, expected {expected:?} (±{tolerance_kb} kB)\n{}",
                self.guest_story(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// PIDs of every live QEMU whose command line names this host's state dir, as /proc
    /// shows them: vmhostd's pidfiles could hide a leaked one.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = procs::lab_processes(&[self.state_dir()])
            .into_iter()
            .filter(|p| p.kind == procs::Kind::Qemu)
            .map(|p| p.pid)
            .collect();
        pids.sort();
        pids
    }

    /// The live QEMU of `vm` here, and its vsock backend, before an operation that must end
    /// them.
    pub fn live_pids(&self, vm: &str) -> LivePids {
        LivePids::of(self, vm)
    }

    /// Tells the `memhog` workload in `vm` to free its memory, over the vsock backend's
    /// host-side socket, and waits until the guest reports it freed.
    pub fn free_memhog(&self, vm: &str) {
        let path = self.state_dir().join("vms").join(vm).join("vsock.sock");
        let mut stream =
            std::os::unix::net::UnixStream::connect(&path).expect("connect to the vsock backend");
        stream
            .write_all(format!("CONNECT {MEMHOG_FREE_PORT}\n").as_bytes())
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = String::new();
        let _ = std::io::BufReader::new(stream).read_line(&mut answer);
        assert!(
            answer.starts_with("OK "),
            "memhog's port answered {answer:?}"
        );
        let log = self.serial_log(vm);
        wait_until(Duration::from_secs(30), "memhog to free its memory", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("memhog: freed")
        });
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.kill_daemon();
        // QEMUs, vsock backends and disk tools outlive vmhostd by design; a test must not,
        // even one that no pidfile names any more.
        for process in procs::lab_processes(&[self.state_dir()]) {
            procs::kill(process.pid);
        }
        cgroups::remove_host_cgroups(&self.name);
    }
}

/// Polls `condition` every 50 ms; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_reports() {
        assert_eq!(
            parse_guest_view("vmhost-guest: cpus=2 mem_total_kb=1970132"),
            Some(GuestView {
                cpus: 2,
                mem_total_kb: 1970132
            })
        );
        assert_eq!(
            parse_guest_view("[ 3.1] vmhost-guest: ready boot_id=x"),
            None
        );
        assert_eq!(
            parse_guest_view("vmhost-guest: cpus=x mem_total_kb=1"),
            None
        );
    }
}
