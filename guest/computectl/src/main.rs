//! computectl: the Postgres compute manager in a vmhost guest, after Neon's compute_ctl.
//!
//! It takes a compute spec (from `POST /configure`, from its own disk after a restart, or
//! from a file the image names on the kernel command line), creates the cluster if there
//! is none, starts Postgres in vm-monitor's workload cgroup, applies roles, databases and
//! extensions, then watches the postmaster without restarting it. Its HTTP API listens
//! on vsock port 1025 (see `http`).
//!
//! `computectl retune` is vm-monitor's retune hook: after every resize it sets Postgres's
//! memory settings from the workload's new limit.

mod compute;
mod config;
mod http;
mod metrics;
mod postgres;
mod reconcile;
mod retune;
mod sql;
mod state;
mod store;
#[cfg(test)]
mod testing;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use vmhost_compute_api::COMPUTE_PORT;

/// Set by the build (`VMHOST_BUILD_TAG=... cargo build`); reported in status and metrics.
const BUILD_TAG: &str = match option_env!("VMHOST_BUILD_TAG") {
    Some(tag) => tag,
    None => "dev",
};
/// How often the compute monitor reads pg_stat_activity.
const MONITOR_INTERVAL: Duration = Duration::from_secs(5);
const RETUNE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(version, about = "vmhost in-guest Postgres compute manager")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The cluster's data directory; initdb runs only if it is missing or empty.
    #[arg(long, default_value = "/var/lib/postgresql/15/compute")]
    pgdata: PathBuf,
    /// Where initdb and postgres are.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pgbin: PathBuf,
    /// The image's extensions: one `<name>.control` each.
    #[arg(long, default_value = "/usr/share/postgresql/15/extension")]
    extension_dir: PathBuf,
    /// The workload cgroup (v2) Postgres runs in; vm-monitor creates it.
    #[arg(long, default_value = "/sys/fs/cgroup/workload")]
    cgroup: PathBuf,
    /// The vsock port of the HTTP API.
    #[arg(long, default_value_t = COMPUTE_PORT)]
    port: u32,
    /// Also serve the API on this TCP address, for local use.
    #[arg(long)]
    listen_tcp: Option<SocketAddr>,
    /// Where an accepted spec is kept, on the VM's own disk, to start from after a restart.
    #[arg(long, default_value = "/var/lib/computectl/spec.json")]
    spec_path: PathBuf,
    /// Reported in the status and in `compute_ctl_up`.
    #[arg(long, default_value = BUILD_TAG)]
    build_tag: String,
    /// How long Postgres may take to accept connections, crash recovery included.
    #[arg(long, default_value_t = 300)]
    start_timeout_secs: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Sets Postgres's memory settings for the guest's size (vm-monitor's retune hook).
    /// Reads VMHOST_WORKLOAD_MAX_BYTES; does nothing if Postgres is not running.
    Retune,
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd, stderr is the journal.
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let result = match args.command {
        Some(Command::Retune) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")
            .and_then(|runtime| runtime.block_on(run_retune())),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")
            .and_then(|runtime| runtime.block_on(run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let paths = postgres::Paths {
        pgbin: args.pgbin,
        pgdata: args.pgdata,
        extension_dir: args.extension_dir,
        cgroup: args.cgroup,
    };
    let postgres = postgres::RealPostgres::new(paths, Duration::from_secs(args.start_timeout_secs));
    let compute =
        compute::Compute::new(Arc::new(postgres), args.spec_path.clone(), &args.build_tag);
    tracing::info!(build_tag = %args.build_tag, "computectl starting");
    if let Some(address) = args.listen_tcp {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        tracing::info!(%address, "API listening on TCP");
        tokio::spawn(http::serve(compute.clone(), listener));
    }
    {
        let compute = compute.clone();
        tokio::spawn(async move { http::serve(compute, http::bind_vsock(args.port).await).await });
    }
    tokio::spawn(compute.clone().monitor(MONITOR_INTERVAL));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        tracing::warn!("cannot read /proc/cmdline: {e}");
        String::new()
    });
    match store::startup_spec(&args.spec_path, &cmdline) {
        Some(source) => {
            tokio::spawn(compute.clone().init(source));
        }
        None => tracing::info!("no spec yet: waiting for POST /configure"),
    }
    wait_for_stop_signal().await?;
    tracing::info!("stopping, and Postgres with it");
    compute.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

async fn run_retune() -> anyhow::Result<()> {
    let memory_bytes =
        retune::workload_max_bytes(std::env::var(retune::WORKLOAD_MAX_VAR).ok().as_deref())
            .map_err(anyhow::Error::msg)?;
    // vm-monitor waits for the hook before it lets a downscale go ahead.
    let tuned = tokio::time::timeout(RETUNE_TIMEOUT, postgres::retune(memory_bytes))
        .await
        .map_err(|_| anyhow::anyhow!("postgres did not answer within {RETUNE_TIMEOUT:?}"))??;
    match tuned {
        None => tracing::info!("postgres is not running: nothing to retune"),
        Some(tuning) => tracing::info!(
            workload_mib = memory_bytes >> 20,
            cpus = std::env::var("VMHOST_ONLINE_CPUS").unwrap_or_default(),
            "retuned postgres: {tuning}"
        ),
    }
    Ok(())
}
