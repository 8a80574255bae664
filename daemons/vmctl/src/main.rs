//! vmctl: operate the VMs of a vmhost host through its local vmhostd.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vmhost_api::units::format_bytes;
use vmhost_api::{ClientError, ComputeUnits, CreateVm, HostInfo, ImageRef, Reply, Request, VmInfo};

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
    },
    /// List the VMs.
    List,
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
    /// Show this host: accelerator, capacity and allocation.
    Host,
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
            } => Request::Create(CreateVm {
                name,
                image: ImageRef::parse(&image),
                min_cu,
                max_cu: max_cu.unwrap_or(min_cu),
                cu,
            }),
            Command::List => Request::List,
            Command::Show { name } => Request::Show { name },
            Command::Scale { name, cu, force } => Request::Scale { name, cu, force },
            Command::Stop { name } => Request::Stop { name },
            Command::Start { name } => Request::Start { name },
            Command::Delete { name } => Request::Delete { name },
            Command::Host => Request::Host,
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
            eprintln!("vmctl: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(help) => help.exit(),
    };
    let json = cli.json;
    match vmhost_api::call(&cli.socket, cli.command.into_request(), REQUEST_TIMEOUT) {
        Ok(reply) => print_reply(&reply, json),
        Err(error) => {
            eprintln!("vmctl: {error}");
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
            Reply::Host(host) => serde_json::to_value(host),
            Reply::Deleted { name } => Ok(serde_json::json!({ "deleted": name })),
        }
        .expect("replies always serialize");
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON values always print")
        );
        return;
    }
    match reply {
        Reply::Vm(vm) => print_vm(vm),
        Reply::Vms(vms) => print_table(vms),
        Reply::Host(host) => print_host(host),
        Reply::Deleted { name } => println!("deleted {name}"),
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
        ("host", vm.host.clone()),
        ("pid", vm.pid.map_or("-".into(), |p| p.to_string())),
        ("qemu", vm.qemu_status.clone().unwrap_or_else(|| "-".into())),
        ("serial log", vm.serial_log.clone()),
        (
            "guest",
            vm.guest.as_ref().map_or("-".into(), describe_guest),
        ),
    ];
    for (key, value) in rows {
        println!("{key:<11}{value}");
    }
}

fn describe_guest(guest: &vmhost_api::GuestInfo) -> String {
    if !guest.connected {
        return "not connected".into();
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
    println!(
        "{:<20} {:<9} {:>5} {:>5} {:>5} {:>6} {:>10}  HOST",
        "NAME", "STATE", "CU", "MIN", "MAX", "VCPUS", "MEMORY"
    );
    for vm in vms {
        println!(
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

fn print_host(host: &HostInfo) {
    println!("host       {}", host.name);
    println!("accel      {} ({})", host.accel, host.accel_reason);
    println!(
        "1 CU       {} vCPU, {}",
        host.cu_shape.vcpus_per_cu,
        format_bytes(host.cu_shape.memory_per_cu_bytes)
    );
    println!("capacity   {}", host.capacity);
    println!("allocated  {}", host.allocated);
    println!("vms        {}", host.vms);
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
    fn bad_cu_is_a_parse_error() {
        assert!(Cli::try_parse_from(["vmctl", "scale", "db1", "--cu", "0.3"]).is_err());
    }
}
