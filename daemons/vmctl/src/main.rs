//! vmctl: operate the VMs of a vmhost host through its local vmhostd.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use vmhost_api::units::format_bytes;
use vmhost_api::{
    ClientError, ComputeUnits, CreateVm, FleetHost, HostInfo, ImageRef, MigrateVm, Reply, Request,
    VmInfo,
};

// A CLI in a pipe must stop quietly when its reader goes away (`vmctl list | head -1`), but
// std's print macros panic when a write fails, EPIPE included, so vmctl prints through these
// four instead (clippy.toml bans std's): a closed stdout or stderr ends vmctl the way it ends
// `ls`, killed by SIGPIPE, and any other output error (`> file` on a full disk) is a one-line
// error, not a panic. Restoring SIGPIPE's default at start would fix the pipe case alone,
// and for every pipe the process ever writes; this keeps the decision at the output.
macro_rules! out {
    ($($arg:tt)*) => { write_or_exit(std::io::stdout().lock(), format_args!($($arg)*)) };
}
macro_rules! outln {
    () => { out!("\n") };
    ($($arg:tt)*) => { out!("{}\n", format_args!($($arg)*)) };
}
macro_rules! err {
    ($($arg:tt)*) => { write_or_exit(std::io::stderr().lock(), format_args!($($arg)*)) };
}
macro_rules! errln {
    () => { err!("\n") };
    ($($arg:tt)*) => { err!("{}\n", format_args!($($arg)*)) };
}

/// Writes output. A reader that has gone away ends vmctl by SIGPIPE; any other failure ends
/// it with an error (on stderr, if that still works) instead of a panic.
fn write_or_exit(mut out: impl std::io::Write, args: std::fmt::Arguments<'_>) {
    let Err(error) = out.write_fmt(args) else {
        return;
    };
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        use nix::sys::signal::{raise, signal, SigHandler, Signal};
        // SAFETY: this installs the default disposition, not a handler; no code of ours runs
        // in signal context.
        let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
        let _ = raise(Signal::SIGPIPE);
        // Only if the signal did not end us: the shell's code for it.
        std::process::exit(128 + Signal::SIGPIPE as i32);
    }
    let _ = writeln!(std::io::stderr(), "vmctl: cannot write output: {error}");
    std::process::exit(1);
}

/// Creating or resizing a guest under emulation can take a while; give up after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Parser)]
#[command(version, about = "Operate vmhost VMs")]
struct Cli {
    /// vmhostd's API socket.
    #[arg(
        long,
        global = true,
        env = "VMHOST_SOCKET",
        default_value = "/run/vmhost/vmhostd.sock"
    )]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Run the command on this fleet host, through the local vmhostd.
    #[arg(long, global = true, value_name = "NAME")]
    host: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and start a VM.
    Create {
        name: String,
        /// `test`, `postgres` (images configured on the host) or a directory with vmlinuz and initrd.img.
        #[arg(long, default_value = "test")]
        image: String,
        /// Smallest size in compute units (steps of 0.25).
        #[arg(long, default_value = "1")]
        min_cu: ComputeUnits,
        /// Largest size; defaults to --min-cu.
        #[arg(long)]
        max_cu: Option<ComputeUnits>,
        /// Starting size; defaults to --min-cu.
        #[arg(long)]
        cu: Option<ComputeUnits>,
        /// Keep the size fixed unless an operator changes it.
        #[arg(long)]
        no_autoscale: bool,
        /// Override one of the host's [agent] settings for this VM (repeatable),
        /// e.g. --agent downscale_cooldown_secs=30.
        #[arg(long = "agent", value_name = "KEY=VALUE", value_parser = parse_setting)]
        agent: Vec<(String, serde_json::Value)>,
        /// Give the VM a writable disk of this many GiB (sparse; /dev/vda in the guest).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(vmhost_api::MAX_DISK_GIB)))]
        disk_gib: Option<u32>,
    },
    /// List the VMs of the whole fleet (with --local, of this host only).
    List {
        #[arg(long)]
        local: bool,
    },
    /// Show one VM.
    Show { name: String },
    /// Resize a running VM.
    Scale {
        name: String,
        #[arg(long)]
        cu: ComputeUnits,
        /// Shrink even if the guest's monitor does not approve (or is not connected).
        #[arg(long)]
        force: bool,
    },
    /// Power a VM off (it keeps its spec and can be started again).
    Stop { name: String },
    /// Start a stopped VM.
    Start { name: String },
    /// Destroy a VM and its files.
    Delete { name: String },
    /// Change a VM's bounds; the agent moves it into them.
    Bounds {
        name: String,
        #[arg(long)]
        min_cu: ComputeUnits,
        #[arg(long)]
        max_cu: ComputeUnits,
    },
    /// Move a running VM to another host while it runs.
    Migrate {
        name: String,
        /// The target host; the live host with the most free memory when absent.
        #[arg(long)]
        to: Option<String>,
        /// Never switch to post-copy: the guest keeps running here until the switchover.
        #[arg(long)]
        precopy_only: bool,
        /// Longest pause allowed at the switchover, in milliseconds.
        #[arg(long, value_name = "MS")]
        max_downtime: Option<u64>,
        /// Cap on the migration stream, in MiB/s.
        #[arg(long, value_name = "MIB_PER_S")]
        bandwidth: Option<u64>,
        /// Finish a post-copy migration that was left paused, toward its original target.
        #[arg(long, conflicts_with_all = ["to", "precopy_only", "max_downtime", "bandwidth"])]
        resume: bool,
    },
    /// Show this host: accelerator, capacity and allocation.
    Host,
    /// The fleet's hosts: liveness, capacity, allocated and leased.
    Hosts,
    /// Scaling decisions and their outcomes, of one VM or all.
    Events {
        name: Option<String>,
        /// Keep streaming new events.
        #[arg(long, short)]
        follow: bool,
    },
    /// Fleet credentials: the CA and host certificates for mutual TLS between hosts.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Each VM's size, goal, load and memory, refreshed every second.
    Top {
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Create the fleet CA in DIR (keep its key off the hosts).
    InitCa { dir: PathBuf },
    /// Issue a host certificate signed by the CA, into OUT.
    IssueCert {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long)]
        addr: std::net::IpAddr,
        out: PathBuf,
    },
}

impl FleetCommand {
    fn run(self) -> Result<(), vmhost_pki::PkiError> {
        match self {
            FleetCommand::InitCa { dir } => {
                vmhost_pki::init_ca(&dir)?;
                outln!("fleet CA created in {}", dir.display());
            }
            FleetCommand::IssueCert {
                ca,
                host,
                addr,
                out,
            } => {
                vmhost_pki::issue_cert(&ca, &host, addr, &out)?;
                outln!(
                    "certificate for {host} ({addr}) written to {}",
                    out.display()
                );
            }
        }
        Ok(())
    }
}

fn parse_setting(text: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE")?;
    let value = serde_json::from_str(value)
        .map_err(|_| format!("'{value}' is not a number or true/false"))?;
    Ok((key.to_string(), value))
}

/// An image named on the command line. A relative path is taken from where vmctl runs:
/// vmhostd, elsewhere, could not know that directory.
fn image_from_here(image: &str) -> ImageRef {
    match ImageRef::parse(image) {
        ImageRef::Path(dir) => ImageRef::Path(std::path::absolute(&dir).unwrap_or(dir)),
        named => named,
    }
}

impl Command {
    fn into_request(self) -> Request {
        match self {
            Command::Create {
                name,
                image,
                min_cu,
                max_cu,
                cu,
                no_autoscale,
                agent,
                disk_gib,
            } => Request::Create(CreateVm {
                name,
                image: image_from_here(&image),
                min_cu,
                max_cu: max_cu.unwrap_or(min_cu),
                cu,
                autoscale: !no_autoscale,
                agent: agent.into_iter().collect(),
                lease: None,
                disk_gib,
            }),
            Command::List { local: true } => Request::List,
            Command::List { local: false } => Request::FleetList,
            Command::Hosts => Request::Hosts,
            Command::Show { name } => Request::Show { name },
            Command::Scale { name, cu, force } => Request::Scale { name, cu, force },
            Command::Stop { name } => Request::Stop { name },
            Command::Start { name } => Request::Start { name },
            Command::Delete { name } => Request::Delete { name },
            Command::Bounds {
                name,
                min_cu,
                max_cu,
            } => Request::Bounds {
                name,
                min_cu,
                max_cu,
            },
            Command::Migrate {
                name,
                to,
                precopy_only,
                max_downtime,
                bandwidth,
                resume,
            } => Request::Migrate(MigrateVm {
                name,
                to,
                precopy_only,
                max_downtime_ms: max_downtime,
                bandwidth_mib: bandwidth,
                resume,
            }),
            Command::Host => Request::Host,
            Command::Events { name, follow } => Request::Events { name, follow },
            Command::Top { .. } => Request::List,
            Command::Fleet(_) => unreachable!("fleet commands run locally"),
        }
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if error.use_stderr() => {
            // One line, not clap's usage block.
            let message = error.to_string();
            let first = message.lines().next().unwrap_or("invalid arguments");
            errln!("vmctl: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(help) => help.exit(),
    };
    let json = cli.json;
    if let Command::Fleet(fleet) = cli.command {
        if let Err(error) = fleet.run() {
            errln!("vmctl: {error}");
            std::process::exit(1);
        }
        return;
    }
    let on_host = |request: Request| match &cli.host {
        // Another host lists its own VMs.
        Some(host) => Request::OnHost {
            host: host.clone(),
            request: Box::new(match request {
                Request::FleetList => Request::List,
                other => other,
            }),
        },
        None => request,
    };
    let result = match cli.command {
        Command::Events { follow: true, .. } => {
            vmhost_api::call_stream(&cli.socket, on_host(cli.command.into_request()), |reply| {
                print_reply(&reply, json);
                true
            })
        }
        Command::Migrate { .. } if cli.host.is_some() => {
            Err(ClientError::Api(vmhost_api::ApiError::new(
                vmhost_api::ErrorKind::InvalidArgument,
                "run migrate on the VM's own host (without --host)",
            )))
        }
        Command::Migrate { ref name, .. } => {
            let name = name.clone();
            let mut finished = false;
            let result =
                vmhost_api::call_stream(&cli.socket, cli.command.into_request(), |reply| {
                    finished |= matches!(reply, Reply::Migrated(_));
                    print_reply(&reply, json);
                    true
                });
            if !json {
                // End the progress line.
                errln!();
            }
            result.and_then(|()| match finished {
                true => Ok(()),
                false => Err(ClientError::Api(vmhost_api::ApiError::new(
                    vmhost_api::ErrorKind::Internal,
                    format!(
                        "vmhostd went away before the migration of VM '{name}' ended; \
                         see `vmctl show {name}` for where it runs"
                    ),
                ))),
            })
        }
        Command::Top { count } => top(&cli.socket, count),
        command => vmhost_api::call(
            &cli.socket,
            on_host(command.into_request()),
            REQUEST_TIMEOUT,
        )
        .map(|reply| print_reply(&reply, json)),
    };
    match result {
        Ok(()) => {}
        Err(error) => {
            errln!("vmctl: {error}");
            std::process::exit(match &error {
                ClientError::Api(api) => api.kind.exit_code(),
                _ => 1,
            });
        }
    }
}

fn print_reply(reply: &Reply, json: bool) {
    if json {
        let value = match reply {
            Reply::Vm(vm) => serde_json::to_value(vm),
            Reply::Vms(vms) => serde_json::to_value(vms),
            Reply::FleetVms { vms, unreachable } => {
                warn_unreachable(unreachable);
                serde_json::to_value(vms)
            }
            Reply::Host(host) => serde_json::to_value(host),
            Reply::Hosts(hosts) => serde_json::to_value(hosts),
            Reply::Deleted { name } => Ok(serde_json::json!({ "deleted": name })),
            Reply::Events(events) => {
                // One JSON object per line, the same as a followed stream.
                for event in events {
                    outln!(
                        "{}",
                        serde_json::to_string(event).expect("events serialize")
                    );
                }
                return;
            }
            Reply::Event(event) => {
                outln!(
                    "{}",
                    serde_json::to_string(event).expect("events serialize")
                );
                return;
            }
            // One object per line, like events, the summary last.
            Reply::MigrationProgress(progress) => {
                outln!(
                    "{}",
                    serde_json::to_string(progress).expect("progress serializes")
                );
                return;
            }
            Reply::Migrated(summary) => {
                outln!(
                    "{}",
                    serde_json::to_string(summary).expect("summaries serialize")
                );
                return;
            }
        }
        .expect("replies always serialize");
        outln!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON values always print")
        );
        return;
    }
    match reply {
        Reply::Vm(vm) => print_vm(vm),
        Reply::Vms(vms) => print_table(vms),
        Reply::FleetVms { vms, unreachable } => {
            print_table(vms);
            warn_unreachable(unreachable);
        }
        Reply::Host(host) => print_host(host),
        Reply::Hosts(hosts) => print_hosts(hosts),
        Reply::Deleted { name } => outln!("deleted {name}"),
        Reply::Events(events) => events.iter().for_each(print_event),
        Reply::Event(event) => print_event(event),
        Reply::MigrationProgress(progress) => print_progress(progress),
        Reply::Migrated(summary) => print_summary(summary),
    }
}

/// One line, redrawn in place: a bar, bytes, rate, phase and ETA.
fn print_progress(p: &vmhost_api::MigrationProgress) {
    const WIDTH: usize = 30;
    let done = if p.total_bytes == 0 {
        0.0
    } else {
        1.0 - p.remaining_bytes as f64 / p.total_bytes as f64
    };
    let filled = ((done.clamp(0.0, 1.0)) * WIDTH as f64) as usize;
    let bytes_per_sec = p.rate_mbps * 1e6 / 8.0;
    let eta = if bytes_per_sec > 0.0 && p.remaining_bytes > 0 {
        format!("{:.0} s", p.remaining_bytes as f64 / bytes_per_sec)
    } else {
        "-".into()
    };
    err!(
        "\r{} -> {} [{}{}] {} MiB sent, {:.0} MiB/s, {}, ETA {}\x1b[K",
        p.vm,
        p.target,
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        p.transferred_bytes >> 20,
        bytes_per_sec / (1 << 20) as f64,
        p.phase,
        eta
    );
}

fn print_summary(s: &vmhost_api::MigrationSummary) {
    outln!(
        "migrated {} from {} to {}: downtime {} ms, total {:.1} s, {} MiB sent{}{}",
        s.vm,
        s.from,
        s.to,
        s.downtime_ms,
        s.total_ms as f64 / 1000.0,
        s.transferred_bytes >> 20,
        if s.postcopy {
            ", post-copy"
        } else {
            ", pre-copy"
        },
        if s.recoveries > 0 {
            format!(", {} link recoveries", s.recoveries)
        } else {
            String::new()
        }
    );
}

fn print_event(event: &vmhost_api::Event) {
    let secs = event.unix_ms / 1000;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    outln!(
        "{h:02}:{m:02}:{s:02}.{:03}Z  {:<16} {:<18} {}",
        event.unix_ms % 1000,
        event.vm,
        event.kind.to_string(),
        event.message
    );
}

/// A live table of every VM, redrawn every second.
fn top(socket: &std::path::Path, count: Option<u64>) -> Result<(), ClientError> {
    let mut round = 0;
    loop {
        let Reply::Vms(vms) = vmhost_api::call(socket, Request::List, REQUEST_TIMEOUT)? else {
            return Ok(());
        };
        // Clear the screen and go home, then draw.
        out!("\x1b[H\x1b[2J");
        outln!(
            "{:<20} {:<9} {:>5} {:>5} {:>6} {:>10} {:>6} {:>6} {:>10} {:>10}",
            "NAME",
            "STATE",
            "CU",
            "GOAL",
            "VCPUS",
            "MEMORY",
            "LOAD1",
            "LOAD5",
            "USED",
            "WORKLOAD"
        );
        for vm in &vms {
            let metrics = vm.guest.as_ref().and_then(|g| g.metrics);
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            outln!(
                "{:<20} {:<9} {:>5} {:>5} {:>6} {:>10} {:>6} {:>6} {:>10} {:>10}",
                vm.name,
                vm.state.to_string(),
                vm.cu.to_string(),
                or_dash(vm.goal_cu.map(|g| g.to_string())),
                vm.vcpus,
                format_bytes(vm.memory_bytes),
                or_dash(metrics.map(|m| format!("{:.2}", m.load1))),
                or_dash(metrics.map(|m| format!("{:.2}", m.load5))),
                or_dash(metrics.map(|m| format_bytes(m.mem_used_bytes))),
                or_dash(metrics.map(|m| format_bytes(m.workload_mem_bytes))),
            );
        }
        round += 1;
        if count.is_some_and(|c| round >= c) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn print_vm(vm: &VmInfo) {
    let rows = [
        ("name", vm.name.clone()),
        ("state", vm.state.to_string()),
        (
            "cu",
            format!("{} (min {}, max {})", vm.cu, vm.min_cu, vm.max_cu),
        ),
        ("vcpus", vm.vcpus.to_string()),
        ("memory", format_bytes(vm.memory_bytes)),
        ("accel", vm.accel.clone()),
        ("image", vm.image.clone()),
        (
            "disk",
            vm.disk_gib.map_or("-".into(), |g| format!("{g} GiB")),
        ),
        ("host", vm.host.clone()),
        (
            "autoscale",
            if vm.autoscale {
                "on".into()
            } else {
                "off".into()
            },
        ),
        ("goal", vm.goal_cu.map_or("-".into(), |g| format!("{g} CU"))),
        ("pid", vm.pid.map_or("-".into(), |p| p.to_string())),
        ("qemu", vm.qemu_status.clone().unwrap_or_else(|| "-".into())),
        ("serial log", vm.serial_log.clone()),
        (
            "guest",
            vm.guest.as_ref().map_or("-".into(), describe_guest),
        ),
    ];
    for (key, value) in rows {
        outln!("{key:<11}{value}");
    }
}

fn describe_guest(guest: &vmhost_api::GuestInfo) -> String {
    if !guest.connected {
        return match guest.protocol_version {
            None => "not up yet (its monitor has not connected)".into(),
            Some(_) => "not connected (its monitor went away)".into(),
        };
    }
    let mut text = format!(
        "connected (protocol {}{})",
        guest.protocol_version.unwrap_or(0),
        if guest.healthy { "" } else { ", UNHEALTHY" }
    );
    if let Some(m) = &guest.metrics {
        text += &format!(
            ", {} CPUs, load {:.2}/{:.2}, memory {} used of {}, workload {}",
            m.online_cpus,
            m.load1,
            m.load5,
            format_bytes(m.mem_used_bytes),
            format_bytes(m.mem_total_bytes),
            format_bytes(m.workload_mem_bytes)
        );
    }
    text
}

fn print_table(vms: &[VmInfo]) {
    outln!(
        "{:<20} {:<9} {:>5} {:>5} {:>5} {:>6} {:>10}  HOST",
        "NAME",
        "STATE",
        "CU",
        "MIN",
        "MAX",
        "VCPUS",
        "MEMORY"
    );
    for vm in vms {
        outln!(
            "{:<20} {:<9} {:>5} {:>5} {:>5} {:>6} {:>10}  {}",
            vm.name,
            vm.state.to_string(),
            vm.cu.to_string(),
            vm.min_cu.to_string(),
            vm.max_cu.to_string(),
            vm.vcpus,
            format_bytes(vm.memory_bytes),
            vm.host
        );
    }
}

fn warn_unreachable(hosts: &[String]) {
    if !hosts.is_empty() {
        errln!(
            "vmctl: VMs of these hosts are missing: {}",
            hosts.join(", ")
        );
    }
}

fn print_hosts(hosts: &[FleetHost]) {
    outln!(
        "{:<16} {:<21} {:<5} {:>14} {:>14} {:>14} {:>4}",
        "HOST",
        "ADDRESS",
        "LIVE",
        "CAPACITY",
        "ALLOCATED",
        "LEASED",
        "VMS"
    );
    let short = |r: vmhost_api::Resources| format!("{}/{}", r.vcpus, format_bytes(r.memory_bytes));
    for host in hosts {
        outln!(
            "{:<16} {:<21} {:<5} {:>14} {:>14} {:>14} {:>4}",
            host.name,
            host.addr,
            if host.live { "yes" } else { "DEAD" },
            short(host.capacity),
            short(host.allocated),
            short(host.leased),
            host.vms
        );
    }
}

fn print_host(host: &HostInfo) {
    outln!("host       {}", host.name);
    outln!("accel      {} ({})", host.accel, host.accel_reason);
    outln!(
        "1 CU       {} vCPU, {}",
        host.cu_shape.vcpus_per_cu,
        format_bytes(host.cu_shape.memory_per_cu_bytes)
    );
    outln!("capacity   {}", host.capacity);
    outln!("allocated  {}", host.allocated);
    outln!("leased     {}", host.leased);
    outln!("vms        {}", host.vms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn create_defaults_max_to_min() {
        let cli = Cli::try_parse_from(["vmctl", "create", "db1", "--min-cu", "2"]).unwrap();
        match cli.command.into_request() {
            Request::Create(create) => {
                assert_eq!(create.max_cu, ComputeUnits::whole(2));
                assert_eq!(create.cu, None);
                assert_eq!(create.image, ImageRef::Named("test".into()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_relative_image_path_is_taken_from_the_callers_directory() {
        let cli = Cli::try_parse_from(["vmctl", "create", "db1", "--image", "./img"]).unwrap();
        let Request::Create(create) = cli.command.into_request() else {
            panic!("not a create");
        };
        let here = std::env::current_dir().unwrap();
        assert_eq!(create.image, ImageRef::Path(here.join("img")));
    }

    #[test]
    fn bad_cu_is_a_parse_error() {
        assert!(Cli::try_parse_from(["vmctl", "scale", "db1", "--cu", "0.3"]).is_err());
    }
}
