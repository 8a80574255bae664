//! vm-monitor: runs in the guest. It keeps the workload's cgroup, asks the host for memory
//! the moment the workload needs it, vets the host's downscale requests, and reports
//! metrics every second. It always dials the host and redials with backoff.

mod cgroup;
mod policy;
mod sysinfo;

use clap::Parser;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmhost_guest_protocol::{
    self as protocol, CpuUsage, FrameDecoder, GuestMessage, HostMessage, Metrics, GUEST_PORT,
};

#[derive(Parser, Clone)]
#[command(version, about = "vmhost in-guest monitor")]
struct Args {
    /// The workload's cgroup (v2).
    #[arg(long, default_value = "/sys/fs/cgroup/workload")]
    cgroup: PathBuf,
    /// Host CID and port to dial.
    #[arg(long, default_value_t = 2)]
    cid: u32,
    #[arg(long, default_value_t = GUEST_PORT)]
    port: u32,
    /// Ask for more memory once the workload uses this fraction of the guest's memory.
    #[arg(long, default_value_t = 0.7)]
    upscale_threshold: f64,
    /// Memory that must stay free after a downscale.
    #[arg(long, default_value_t = 128)]
    margin_mib: u64,
    /// Memory kept out of the workload's reach for the kernel and the monitor.
    #[arg(long, default_value_t = 96)]
    reserve_mib: u64,
    /// How often memory.current is read.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Run after every size change, with VMHOST_MEM_TOTAL_BYTES, VMHOST_ONLINE_CPUS and
    /// VMHOST_WORKLOAD_MAX_BYTES set (the Postgres image retunes Postgres from it).
    #[arg(long)]
    retune_hook: Option<PathBuf>,
}

/// The sender of the live connection and its protocol version, if any: threads that
/// report find the link here.
type Link = Arc<Mutex<Option<(Sender<GuestMessage>, u16)>>>;

/// The span of the CPU utilisation the host sees: short, so a load step shows within
/// seconds where load1 takes a minute.
const CPU_WINDOW: Duration = Duration::from_secs(3);

/// Utilisation since a sample ~[`CPU_WINDOW`] old, shared by whoever reads metrics.
type CpuWindow = Mutex<sysinfo::UtilWindow>;

fn log(message: &str) {
    eprintln!("vm-monitor: {message}");
}

fn send(link: &Link, message: GuestMessage) {
    if let Some((sender, _)) = link.lock().unwrap().as_ref() {
        let _ = sender.send(message);
    }
}

/// Metrics in the form the live connection's version can carry.
fn send_metrics(link: &Link, (metrics, cpu): (Metrics, Option<CpuUsage>)) {
    if let Some((sender, version)) = link.lock().unwrap().as_ref() {
        let _ = sender.send(GuestMessage::metrics(*version, metrics, cpu));
    }
}

fn main() {
    let args = Args::parse();
    let workload = match cgroup::Workload::create(&args.cgroup) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            log(&format!(
                "cannot create cgroup {}: {e}",
                args.cgroup.display()
            ));
            std::process::exit(1);
        }
    };
    let link: Link = Arc::new(Mutex::new(None));
    let cpu: Arc<CpuWindow> = Arc::new(Mutex::new(sysinfo::UtilWindow::new(CPU_WINDOW)));
    {
        let (args, workload, link, cpu) =
            (args.clone(), workload.clone(), link.clone(), cpu.clone());
        std::thread::spawn(move || report_metrics(&args, &workload, &cpu, &link));
    }
    {
        let (args, workload, link) = (args.clone(), workload.clone(), link.clone());
        std::thread::spawn(move || watch_pressure(&args, &workload, &link));
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        match serve_connection(&args, &workload, &cpu, &link) {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => log(&format!("link to host: {e}")),
        }
        *link.lock().unwrap() = None;
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn dial(args: &Args) -> std::io::Result<File> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(args.cid, args.port),
    )?;
    // A connected stream socket: plain read(2)/write(2) through File are what we need.
    Ok(File::from(fd))
}

fn read_message(stream: &mut File, decoder: &mut FrameDecoder) -> std::io::Result<HostMessage> {
    let invalid = |e: protocol::FrameError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    loop {
        if let Some(body) = decoder.next_frame().map_err(invalid)? {
            return protocol::decode(&body).map_err(invalid);
        }
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        decoder.push(&buf[..n]);
    }
}

fn write_message(stream: &mut File, message: &GuestMessage) -> std::io::Result<()> {
    let frame = protocol::encode(message)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    stream.write_all(&frame)
}

/// One connection: handshake, then serve host requests until it drops.
fn serve_connection(
    args: &Args,
    workload: &cgroup::Workload,
    cpu: &CpuWindow,
    link: &Link,
) -> std::io::Result<()> {
    let mut stream = dial(args)?;
    let mut decoder = FrameDecoder::new();
    write_message(
        &mut stream,
        &GuestMessage::Hello {
            min_version: *protocol::VERSIONS.start(),
            max_version: *protocol::VERSIONS.end(),
        },
    )?;
    let version = match read_message(&mut stream, &mut decoder)? {
        HostMessage::Welcome { version } if protocol::VERSIONS.contains(&version) => version,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("handshake refused: {other:?}"),
            ))
        }
    };
    log(&format!("connected to host, protocol version {version}"));
    let (sender, receiver) = channel::<GuestMessage>();
    let mut writer = stream.try_clone()?;
    std::thread::spawn(move || {
        for message in receiver {
            if write_message(&mut writer, &message).is_err() {
                break;
            }
        }
    });
    *link.lock().unwrap() = Some((sender.clone(), version));
    let metrics_message = || {
        let (metrics, usage) = metrics(workload, cpu);
        GuestMessage::metrics(version, metrics, usage)
    };
    let _ = sender.send(metrics_message());
    loop {
        let reply = match read_message(&mut stream, &mut decoder) {
            Ok(HostMessage::HealthCheck { id }) => GuestMessage::HealthCheckReply { id },
            Ok(HostMessage::MetricsRequest) => metrics_message(),
            Ok(HostMessage::DownscaleRequest { id, target }) => {
                let used = policy::memory_in_use(
                    sysinfo::meminfo().used(),
                    workload.anon_bytes(),
                    args.reserve_mib << 20,
                );
                let verdict =
                    policy::check_downscale(used, target.memory_bytes, args.margin_mib << 20);
                log(&format!(
                    "downscale to {} MiB: {verdict:?}",
                    target.memory_bytes >> 20
                ));
                // The workload's settings shrink before its memory goes.
                if verdict.is_ok() {
                    run_retune_hook(args, target.memory_bytes, target.vcpus);
                }
                GuestMessage::DownscaleResult {
                    id,
                    ok: verdict.is_ok(),
                    reason: verdict.err().unwrap_or_default(),
                }
            }
            Ok(HostMessage::UpscaleNotification { granted, .. }) => {
                log(&format!(
                    "host granted {} vCPU, {} MiB",
                    granted.vcpus,
                    granted.memory_bytes >> 20
                ));
                continue;
            }
            Ok(HostMessage::HealthCheckReply { .. }) | Ok(HostMessage::Welcome { .. }) => continue,
            Ok(
                other @ (HostMessage::InvalidMessage { .. }
                | HostMessage::InternalError { .. }
                | HostMessage::VersionRefused { .. }),
            ) => {
                log(&format!("host reports {other:?}"));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = sender.send(GuestMessage::InvalidMessage {
                    reason: e.to_string(),
                });
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if sender.send(reply).is_err() {
            return Ok(());
        }
    }
}

/// The metrics, and the fast CPU signal once the window holds two samples.
fn metrics(workload: &cgroup::Workload, cpu: &CpuWindow) -> (Metrics, Option<CpuUsage>) {
    let mem = sysinfo::meminfo();
    let (load1, load5) = sysinfo::loadavg();
    let util = sysinfo::cpu_times().and_then(|t| cpu.lock().unwrap().update(Instant::now(), t));
    let cpu = util.map(|util| CpuUsage {
        util,
        // Without PSI in the kernel, the signal rests on utilisation alone.
        pressure_some_avg10: sysinfo::cpu_pressure().unwrap_or(0.0),
    });
    let metrics = Metrics {
        load1,
        load5,
        mem_total_bytes: mem.total,
        mem_used_bytes: mem.used(),
        mem_cached_bytes: mem.cached,
        workload_mem_bytes: workload.memory_current(),
        online_cpus: sysinfo::online_cpus(),
    };
    (metrics, cpu)
}

/// Every second: metrics to the host; on a size change, new cgroup limits and the hook.
fn report_metrics(args: &Args, workload: &cgroup::Workload, cpu: &CpuWindow, link: &Link) {
    let mut last_size = None;
    loop {
        let sample = metrics(workload, cpu);
        let now = sample.0;
        let size = (now.online_cpus, now.mem_total_bytes);
        if last_size != Some(size) {
            retune(args, workload, now);
            // Report a size change at once, not on the next tick.
            last_size = Some(size);
        }
        send_metrics(link, sample);
        // Short ticks so a resize is reported within a fraction of a second; full metrics
        // go out every second.
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            let mem = sysinfo::meminfo();
            if Some((sysinfo::online_cpus(), mem.total)) != last_size {
                break;
            }
        }
    }
}

fn retune(args: &Args, workload: &cgroup::Workload, now: Metrics) {
    let workload_max = now.mem_total_bytes.saturating_sub(args.reserve_mib << 20);
    if let Err(e) = workload.set_memory_max(workload_max) {
        log(&format!("cannot set memory.max: {e}"));
    }
    log(&format!(
        "size is {} vCPU, {} MiB; workload limit {} MiB",
        now.online_cpus,
        now.mem_total_bytes >> 20,
        workload_max >> 20
    ));
    run_retune_hook(args, now.mem_total_bytes, now.online_cpus);
}

/// Lets the workload follow a size: after an upscale is online, before a downscale goes.
fn run_retune_hook(args: &Args, mem_total_bytes: u64, online_cpus: u32) {
    let Some(hook) = &args.retune_hook else {
        return;
    };
    let workload_max = mem_total_bytes.saturating_sub(args.reserve_mib << 20);
    let status = std::process::Command::new(hook)
        .env("VMHOST_MEM_TOTAL_BYTES", mem_total_bytes.to_string())
        .env("VMHOST_ONLINE_CPUS", online_cpus.to_string())
        .env("VMHOST_WORKLOAD_MAX_BYTES", workload_max.to_string())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        log(&format!(
            "retune hook {} failed: {status:?}",
            hook.display()
        ));
    }
}

/// Polls memory.current every `poll_ms` and waits on a PSI trigger; either one over the
/// threshold sends an upscale request, rate-limited.
fn watch_pressure(args: &Args, workload: &cgroup::Workload, link: &Link) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let trigger = workload
        .pressure_trigger(10_000, 500_000)
        .map_err(|e| {
            log(&format!(
                "no PSI trigger ({e}); polling memory.current only"
            ))
        })
        .ok();
    let mut limiter = policy::UpscaleLimiter::new(Duration::from_millis(1000));
    let mut next_id = 1u64;
    let timeout = PollTimeout::try_from(args.poll_ms).unwrap_or(PollTimeout::NONE);
    loop {
        let stalled = match &trigger {
            Some(file) => {
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
                poll(&mut fds, timeout).unwrap_or(0) > 0
            }
            None => {
                std::thread::sleep(Duration::from_millis(args.poll_ms));
                false
            }
        };
        let detected = Instant::now();
        let total = sysinfo::meminfo().total;
        if (stalled
            || policy::over_threshold(workload.memory_current(), total, args.upscale_threshold))
            && limiter.should_request(detected)
        {
            send(
                link,
                GuestMessage::UpscaleRequest {
                    id: next_id,
                    pressure_age_us: detected.elapsed().as_micros() as u64,
                },
            );
            next_id += 1;
        }
    }
}
