//! Benchmarks of vmhost against raw QEMU, run alternately in the same process so machine
//! noise hits both. Each result is appended to BENCHMARKS.md as one dated line.
//!
//! usage: cargo run -p vmhost-tests --bin bench -- create|upscale|agent-cpu|lease-rtt|gossip|gossip-sim|tunnel|migration|migration-tls|drain|postgres|pgbench|overhead|pressure [N]

mod agent_cpu;
mod drain;
mod gossip;
mod lease;
mod local;
mod migration;
mod migration_tls;
mod overhead;
mod pgbench;
mod postgres;
mod pressure;
mod tunnel;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::{test_image, wait_until, Limits, TestHost};
use vmm::{Accel, AccelChoice, HostFacts, Machine, MachineSpec, Nic};

pub(crate) const GIB: u64 = 1 << 30;

fn median(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64()
}

pub(crate) fn min_median_max(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

pub(crate) fn wait_ready(serial_log: &Path) {
    wait_until(Duration::from_secs(180), "the guest to boot", || {
        std::fs::read_to_string(serial_log)
            .unwrap_or_default()
            .contains("vmhost-guest: ready")
    });
}

/// A QEMU started by hand with vmm's command line, no vmhostd: 1 vCPU + 1 GiB at boot,
/// room for `max_vcpus` and `hotplug` more memory.
pub(crate) struct RawQemu {
    _dir: tempfile::TempDir,
    pub(crate) spec: MachineSpec,
}

impl RawQemu {
    fn spec(dir: &Path, image: &Path, accel: Accel, max_vcpus: u32, hotplug: u64) -> MachineSpec {
        MachineSpec {
            name: "bench".into(),
            accel,
            boot_vcpus: 1,
            initial_vcpus: 1,
            max_vcpus,
            vcpu_slots: vmm::cmdline::vcpu_slots(accel, max_vcpus),
            boot_memory_bytes: GIB,
            hotplug_memory_bytes: hotplug,
            initial_hotplug_memory_bytes: 0,
            kernel: image.join("vmlinuz"),
            initrd: Some(image.join("initrd.img")),
            kernel_cmdline: vmm::cmdline::DEFAULT_KERNEL_CMDLINE.into(),
            nic: Nic::None,
            disk: None,
            root_image: None,
            spare_root_ports: 4,
            // Raw QEMU has no guest channel; ours includes starting its backend.
            vhost_user_vsock: None,
            incoming: false,
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            pidfile: dir.join("qemu.pid"),
        }
    }

    pub(crate) fn start(
        image: &Path,
        accel: Accel,
        max_vcpus: u32,
        hotplug: u64,
    ) -> (RawQemu, Duration) {
        let started = Instant::now();
        let cmdline = vmm::cmdline::DEFAULT_KERNEL_CMDLINE;
        let qemu = Self::start_with(image, accel, max_vcpus, hotplug, cmdline, false);
        wait_ready(&qemu.spec.serial_log);
        (qemu, started.elapsed())
    }

    /// Starts QEMU (booting, or waiting for a migration) without waiting for the guest.
    pub(crate) fn start_with(
        image: &Path,
        accel: Accel,
        max_vcpus: u32,
        hotplug: u64,
        cmdline: &str,
        incoming: bool,
    ) -> RawQemu {
        let shape = |spec| MachineSpec {
            kernel_cmdline: cmdline.into(),
            incoming,
            ..spec
        };
        Self::launch(image, accel, max_vcpus, hotplug, shape, &[])
    }

    /// Starts QEMU on the spec `shape` makes of the default one, with `extra` arguments
    /// after vmm's, without waiting for the guest.
    pub(crate) fn launch(
        image: &Path,
        accel: Accel,
        max_vcpus: u32,
        hotplug: u64,
        shape: impl FnOnce(MachineSpec) -> MachineSpec,
        extra: &[String],
    ) -> RawQemu {
        let dir = tempfile::tempdir().unwrap();
        let spec = shape(Self::spec(dir.path(), image, accel, max_vcpus, hotplug));
        let status = Command::new("qemu-system-x86_64")
            .args(spec.to_args())
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "raw QEMU failed to start");
        RawQemu { _dir: dir, spec }
    }
}

impl RawQemu {
    /// QMP control of this QEMU, through vmm as vmhostd has it.
    pub(crate) async fn attach(&self) -> Machine {
        let timeout = Duration::from_secs(10);
        Machine::attach(&self.spec.qmp_socket, &self.spec.pidfile, timeout)
            .await
            .expect("attach to the raw QEMU's QMP socket")
    }
}

impl Drop for RawQemu {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.spec.pidfile) {
            if let Ok(pid) = pid.trim().parse() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

pub(crate) fn roomy() -> TestHost {
    TestHost::start(Limits {
        vcpus: 40,
        memory_mib: 16384,
    })
}

/// User+system CPU seconds of a process; `None` once it is gone.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the command name.
    let ticks: f64 = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    Some(ticks / hz)
}

pub(crate) const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A fleet CA in `dir/ca` and loopback hosts it certified.
pub(crate) fn fleet_identities(dir: &Path, hosts: &[&str]) -> Vec<vmhost_pki::Identity> {
    vmhost_pki::one_machine_fleet(dir, hosts, LOCALHOST).unwrap()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "create".into());
    // The two ends of the tunnel benchmark, each started in its host's namespace.
    let mut arg = || args.next().expect("a tunnel end takes more arguments");
    match which.as_str() {
        "tunnel-sink" => return tunnel::sink(arg().as_ref(), arg().parse().unwrap()).await,
        "tunnel-source" => {
            let (identity, addr, peer, mib) = (arg(), arg(), arg(), arg());
            return tunnel::source(
                identity.as_ref(),
                addr.parse().unwrap(),
                peer.parse().unwrap(),
                mib.parse().unwrap(),
            )
            .await;
        }
        _ => {}
    }
    let runs: usize = args
        .next()
        .map_or(5, |n| n.parse().expect("RUNS must be a number"));
    let accel = vmm::accel::decide(AccelChoice::Auto, &HostFacts::probe())
        .unwrap()
        .accel;
    match which.as_str() {
        "create" => local::create(runs, &test_image(), accel).await,
        "upscale" => local::upscale(runs, &test_image(), accel).await,
        // Ten per host: twenty TCG guests are what two cores boot and keep idle.
        "agent-cpu" => agent_cpu::agent_cpu(10, Duration::from_secs(60), runs, accel),
        "lease-rtt" => lease::lease_rtt(runs).await,
        "gossip" => gossip::real(runs).await,
        "gossip-sim" => gossip::simulated(runs),
        "tunnel" => tunnel::throughput(runs.max(64)),
        "migration" => migration::downtime(runs, &test_image(), accel).await,
        "migration-tls" => migration_tls::throughput(runs, &test_image(), accel).await,
        "drain" => drain::drain(runs, 3),
        "postgres" => postgres::postgres(runs, accel).await,
        "pgbench" => pgbench::pgbench(runs, accel),
        "overhead" => overhead::overhead(runs, accel),
        "pressure" => pressure::pressure(runs, &test_image(), accel).await,
        other => panic!(
            "unknown benchmark '{other}': create, upscale, agent-cpu, lease-rtt, gossip, gossip-sim, tunnel, migration, migration-tls, drain, postgres, pgbench, overhead or pressure"
        ),
    }
}
