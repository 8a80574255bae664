//! vmctl: operate the VMs of a vmhost host through its local vmhostd.

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vmhost_api::{
    ClientError, ComputeUnits, CreateVm, DrainHost, ImageRef, MigrateVm, Reply, Request,
};

#[macro_use]
mod output;
mod compute;
mod drain;

use output::{print_reply, top};

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
        /// A Postgres compute spec (JSON) for the guest's computectl; the host keeps it and
        /// hands it over on the VM's first boot.
        #[arg(long, value_name = "FILE", value_parser = compute::read_spec)]
        spec: Option<serde_json::Value>,
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
    /// Move every VM of HOST to other hosts, live, and keep HOST empty until undrained.
    Drain {
        #[arg(value_name = "HOST")]
        target: String,
        /// Follow the moves until every VM has left (or what is left cannot move).
        #[arg(long)]
        wait: bool,
        /// Move a VM that cannot move live by stopping it and booting it on another host:
        /// its disk and spec move, its RAM is lost.
        #[arg(long)]
        cold: bool,
        /// How many VMs move at once.
        #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..=i64::from(vmhost_api::MAX_DRAIN_PARALLEL)))]
        parallel: u32,
    },
    /// Let a drained host take VMs again.
    Undrain {
        #[arg(value_name = "HOST")]
        target: String,
    },
    /// How far HOST's drain got, VM by VM.
    DrainStatus {
        #[arg(value_name = "HOST")]
        target: String,
    },
    /// Fleet credentials: the CA and host certificates for mutual TLS between hosts.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Print the SCRAM-SHA-256 verifier of the password read from stdin, for a compute
    /// spec's `password_hash`.
    HashPassword,
    /// Ask a VM's Postgres compute manager (computectl) in the guest.
    Compute {
        name: String,
        #[command(subcommand)]
        action: compute::ComputeCommand,
    },
    /// Each VM's size, goal, load and memory, refreshed every second.
    Top {
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print the completion script for SHELL, e.g.
    /// `vmctl completions bash > /etc/bash_completion.d/vmctl`.
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages, vmctl.1 and one per subcommand, into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
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

/// A request run on the named host (this one, or another through it).
fn on(host: String, request: Request) -> Request {
    Request::OnHost {
        host,
        request: Box::new(request),
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
                spec,
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
                image_id: None,
                compute_spec: spec,
            }),
            Command::Compute { name, action } => Request::Compute {
                name,
                action: action.into_action(),
            },
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
            Command::Drain {
                target,
                cold,
                parallel,
                ..
            } => on(target, Request::Drain(DrainHost { cold, parallel })),
            Command::Undrain { target } => on(target, Request::Undrain),
            Command::DrainStatus { target } => on(target, Request::DrainStatus),
            Command::Fleet(_)
            | Command::HashPassword
            | Command::Completions { .. }
            | Command::Manpages { .. } => {
                unreachable!("run locally, without vmhostd")
            }
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
    if let Command::HashPassword = cli.command {
        match compute::hash_password() {
            Ok(verifier) => outln!("{verifier}"),
            Err(error) => {
                errln!("vmctl: {error}");
                std::process::exit(2);
            }
        }
        return;
    }
    match &cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "vmctl", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            return;
        }
        Command::Manpages { dir } => {
            if let Err(error) = clap_mangen::generate_to(Cli::command(), dir) {
                errln!(
                    "vmctl: cannot write the manual pages into {}: {error}",
                    dir.display()
                );
                std::process::exit(1);
            }
            return;
        }
        _ => {}
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
        Command::Drain {
            wait: true,
            ref target,
            ..
        } => {
            let host = target.clone();
            vmhost_api::call(&cli.socket, cli.command.into_request(), REQUEST_TIMEOUT)
                .and_then(|_| drain::wait(&cli.socket, &host, json))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn manual_pages_cover_every_subcommand_but_the_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        clap_mangen::generate_to(Cli::command(), dir.path()).unwrap();
        for page in ["vmctl.1", "vmctl-create.1", "vmctl-fleet-issue-cert.1"] {
            assert!(dir.path().join(page).is_file(), "{page} is missing");
        }
        assert!(!dir.path().join("vmctl-manpages.1").exists());
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
    fn a_drain_names_its_host_apart_from_the_host_vmctl_goes_through() {
        let cli = Cli::try_parse_from(["vmctl", "drain-status", "b"]).unwrap();
        assert_eq!(cli.host, None);
        let expected = Request::OnHost {
            host: "b".into(),
            request: Box::new(Request::DrainStatus),
        };
        assert_eq!(cli.command.into_request(), expected);
        let cli = Cli::try_parse_from(["vmctl", "drain", "b", "--cold", "--parallel", "3"]);
        let Request::OnHost { host, request } = cli.unwrap().command.into_request() else {
            panic!("not run on a host");
        };
        assert_eq!(host, "b");
        assert_eq!(
            *request,
            Request::Drain(DrainHost {
                cold: true,
                parallel: 3
            })
        );
        assert!(Cli::try_parse_from(["vmctl", "drain", "b", "--parallel", "0"]).is_err());
    }

    #[test]
    fn bad_cu_is_a_parse_error() {
        assert!(Cli::try_parse_from(["vmctl", "scale", "db1", "--cu", "0.3"]).is_err());
    }
}
