//! Benchmarks of vmhost against raw QEMU, run alternately in the same process so machine
//! noise hits both. Each result is appended to BENCHMARKS.md as one dated line.
//!
//! usage: cargo run -p vmhost-tests --bin bench -- create|upscale|agent-cpu|lease-rtt|gossip|gossip-sim|tunnel|migration|migration-tls|drain|postgres|overhead|pressure [N]

mod drain;
mod gossip;
mod migration;
mod migration_tls;
mod overhead;
mod postgres;
mod pressure;
mod tunnel;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vmhost_guest_protocol::{GuestMessage, HostMessage};
use vmhost_tests::benchmarks::{append, today};
use vmhost_tests::{test_image, wait_until, FakeGuest, Limits, TestHost};
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

    fn start(image: &Path, accel: Accel, max_vcpus: u32, hotplug: u64) -> (RawQemu, Duration) {
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

fn roomy() -> TestHost {
    TestHost::start(Limits {
        vcpus: 40,
        memory_mib: 16384,
    })
}

/// `vmctl create` until the guest has booted, against raw QEMU until the same report.
fn create(runs: usize, image: &Path, accel: Accel) {
    let host = roomy();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let started = Instant::now();
        host.vmctl_ok(&["create", "bench", "--min-cu", "1", "--no-autoscale"]);
        wait_ready(&host.serial_log("bench"));
        ours.push(started.elapsed());
        host.vmctl_ok(&["delete", "bench"]);
        raw.push(RawQemu::start(image, accel, 1, 0).1);
        eprintln!("run {run}: ours {:?}, raw {:?}", ours[run], raw[run]);
    }
    let (o, r) = (median(&mut ours), median(&mut raw));
    append(&format!(
        "- {} create to running ({accel}, 1 vCPU, 1 GiB, median of {runs}): ours {o:.2} s, raw qemu {r:.2} s, ratio {:.2}\n",
        today(),
        o / r
    ));
}

/// A monitor's upscale request until its notification (agent + ledger + vmm + link), against
/// the same step (+1 vCPU, +1 GiB) done directly through vmm on a raw QEMU.
async fn upscale(runs: usize, image: &Path, accel: Accel) {
    let host = roomy();
    // No monitor in this guest: the benchmark plays it, so the request time is exact.
    host.vmctl_ok(&[
        "create",
        "bench",
        "--image",
        "nomonitor",
        "--min-cu",
        "1",
        "--max-cu",
        "2",
        "--agent",
        "upscale_request_hold_secs=1",
    ]);
    host.wait_guest_ready("bench");
    let (raw_qemu, _) = RawQemu::start(image, accel, 2, GIB);
    let machine = Machine::attach(
        &raw_qemu.spec.qmp_socket,
        &raw_qemu.spec.pidfile,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let timeout = Duration::from_secs(60);
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let mut guest = FakeGuest::hello(&host, "bench");
        let started = Instant::now();
        guest.send(&GuestMessage::UpscaleRequest {
            id: run as u64 + 1,
            pressure_age_us: 0,
        });
        loop {
            match guest.receive() {
                Some(HostMessage::UpscaleNotification { id, .. }) if id == run as u64 + 1 => break,
                Some(_) => continue,
                None => panic!("the link closed before the upscale notification"),
            }
        }
        ours.push(started.elapsed());
        assert_eq!(host.show("bench")["cu"], 2.0);
        drop(guest);
        // Let the request's floor lapse, then put it back.
        std::thread::sleep(Duration::from_millis(1500));
        host.vmctl_ok(&["scale", "bench", "--cu", "1", "--force"]);

        let started = Instant::now();
        machine.set_vcpus(2, timeout).await.unwrap();
        machine.set_hotplug_memory(GIB, timeout).await.unwrap();
        raw.push(started.elapsed());
        machine.set_hotplug_memory(0, timeout).await.unwrap();
        machine.set_vcpus(1, timeout).await.unwrap();
        eprintln!("run {run}: ours {:?}, raw {:?}", ours[run], raw[run]);
    }
    let (o, r) = (median(&mut ours), median(&mut raw));
    append(&format!(
        "- {} upscale request to applied, +1 vCPU +1 GiB ({accel}, median of {runs}): ours {:.0} ms, bare vmm {:.0} ms, ratio {:.2}\n",
        today(),
        o * 1000.0,
        r * 1000.0,
        o / r
    ));
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

/// vmhostd's CPU time with `vms` idle VMs, each with a live monitor and agent.
fn agent_cpu(vms: usize, window: Duration) {
    let host = roomy();
    for i in 0..vms {
        // Fixed bounds: the agent runs every poll but has nothing to do, as for an idle VM.
        let name = format!("idle{i}");
        host.vmctl_ok(&["create", &name, "--min-cu", "0.25", "--max-cu", "0.25"]);
    }
    wait_until(Duration::from_secs(600), "every monitor to connect", || {
        let list: serde_json::Value =
            serde_json::from_str(&host.vmctl_ok(&["--json", "list"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .all(|vm| vm["guest"]["connected"] == true)
    });
    let pid = host.daemon_pid().unwrap();
    let before = cpu_seconds(pid).unwrap();
    std::thread::sleep(window);
    let used = cpu_seconds(pid).unwrap() - before;
    let per_vm_hour = used / vms as f64 * (3600.0 / window.as_secs_f64());
    append(&format!(
        "- {} vmhostd CPU per idle VM per hour ({vms} VMs with monitors and agents, {} s window): ours {per_vm_hour:.2} s, share of one core {:.5}\n",
        today(),
        window.as_secs(),
        per_vm_hour / 3600.0
    ));
}

const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A fleet CA in `dir/ca` and loopback hosts it certified.
fn fleet_identities(dir: &Path, hosts: &[&str]) -> Vec<vmhost_pki::Identity> {
    vmhost_pki::one_machine_fleet(dir, hosts, LOCALHOST).unwrap()
}

/// Lease reserve→grant round trips between two hosts on loopback (QUIC, mutual TLS),
/// against a bare request/response (`Ping`) on the same connection, alternating batches.
async fn lease_rtt(round_trips: usize) {
    use std::sync::{Arc, Mutex};
    use vmhost_capacity::lease::{self, LeaseRequest};
    use vmhost_capacity::ledger::Ledger;
    use vmhost_gossip::quic::{answer, FleetEndpoint, FleetRequest, FleetResponse};
    let dir = tempfile::tempdir().unwrap();
    let ids = fleet_identities(dir.path(), &["host-a", "host-b"]);
    let any = std::net::SocketAddr::new(LOCALHOST, 0);
    let b = FleetEndpoint::bind(any, &ids[1]).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::new(vmhost_api::Resources {
        vcpus: u32::MAX,
        memory_bytes: u64::MAX,
    })));
    b.serve(Arc::new(move |request| {
        answer(match request {
            FleetRequest::Lease(request) => FleetResponse::Lease(lease::serve(
                &mut ledger.lock().unwrap(),
                "host-a",
                request,
                0,
            )),
            _ => FleetResponse::Pong,
        })
    }));
    let a = FleetEndpoint::bind(any, &ids[0]).unwrap();
    let to = b.local_addr();
    a.call(to, "host-b", &FleetRequest::Ping).await.unwrap();
    let reserve = FleetRequest::Lease(LeaseRequest::Reserve {
        vm: "bench".into(),
        holder: "host-a".into(),
        resources: vmhost_api::Resources {
            vcpus: 1,
            memory_bytes: 1 << 30,
        },
        ttl_ms: 60_000,
    });
    let (mut ours, mut bare) = (Duration::ZERO, Duration::ZERO);
    const BATCH: usize = 100;
    for _ in 0..round_trips / BATCH {
        let started = Instant::now();
        for _ in 0..BATCH {
            let granted = a.call(to, "host-b", &reserve).await.unwrap();
            assert!(matches!(
                granted,
                FleetResponse::Lease(vmhost_capacity::lease::LeaseResponse::Granted(_))
            ));
        }
        ours += started.elapsed();
        let started = Instant::now();
        for _ in 0..BATCH {
            a.call(to, "host-b", &FleetRequest::Ping).await.unwrap();
        }
        bare += started.elapsed();
    }
    let n = (round_trips / BATCH * BATCH) as f64;
    let (ours_rate, bare_rate) = (n / ours.as_secs_f64(), n / bare.as_secs_f64());
    append(&format!(
        "- {} lease reserve→grant round trips between two hosts on loopback (QUIC, mutual TLS, {n} each): ours {ours_rate:.0}/s, bare QUIC request/response {bare_rate:.0}/s, ratio {:.2}\n",
        today(),
        ours.as_secs_f64() / bare.as_secs_f64()
    ));
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
        "create" => create(runs, &test_image(), accel),
        "upscale" => upscale(runs, &test_image(), accel).await,
        "agent-cpu" => agent_cpu(20, Duration::from_secs(60)),
        "lease-rtt" => lease_rtt(runs).await,
        "gossip" => gossip::real(runs).await,
        "gossip-sim" => gossip::simulated(runs),
        "tunnel" => tunnel::throughput(runs.max(64)),
        "migration" => migration::downtime(runs, &test_image(), accel).await,
        "migration-tls" => migration_tls::throughput(runs, &test_image(), accel).await,
        "drain" => drain::drain(runs, 3),
        "postgres" => postgres::postgres(runs, accel).await,
        "overhead" => overhead::overhead(runs, accel),
        "pressure" => pressure::pressure(runs, &test_image(), accel).await,
        other => panic!(
            "unknown benchmark '{other}': create, upscale, agent-cpu, lease-rtt, gossip, gossip-sim, tunnel, migration, migration-tls, drain, postgres, overhead or pressure"
        ),
    }
}
