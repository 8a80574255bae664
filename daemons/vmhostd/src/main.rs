//! vmhostd: runs the VMs of one host. See the README for its config and operation.

mod admission;
mod agent_task;
mod api;
mod cold;
mod compute;
mod compute_watch;
mod config;
#[cfg(test)]
mod config_fuzz;
mod disks;
mod drain;
mod error;
mod events;
mod fleet;
mod host;
mod lifecycle;
mod migration;
mod moves;
mod net;
mod prometheus;
mod rebalance;
mod reload;
mod resize;
mod router;
mod store;
#[cfg(test)]
mod testing;
mod tunnels;
mod validate;
mod vm_table;

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "vmhost host daemon")]
struct Args {
    /// Host config file (TOML).
    #[arg(long, default_value = "/etc/vmhost/vmhostd.toml")]
    config: PathBuf,
}

/// Logs go to journald under systemd, to stderr otherwise (or if journald is unreachable).
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            registry.with(journald).init();
            return;
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

fn main() {
    let args = Args::parse();
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    if let Err(error) = runtime.block_on(run(args)) {
        // One line: the chain of causes, outermost first.
        eprintln!("vmhostd: {error:#}");
        tracing::error!("{error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (config, running) = config::Config::load_with_table(&args.config)?;
    let accel = vmm::accel::decide(config.accel, &vmm::HostFacts::probe())?;
    tracing::info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
    let api_socket = config.api_socket.clone();
    let api_group = config.api_group.clone();
    let metrics = config.metrics.clone();
    let hypervisor = std::sync::Arc::new(vmm::Qemu {
        binary: config.qemu_binary.clone(),
        qmp_timeout: config.timeouts.qmp(),
    });
    let host = host::Host::recover(config, accel, hypervisor).await?;
    let (listener, access) = api::bind(&api_socket, api_group.as_deref())?;
    if metrics.enabled {
        let tcp = tokio::net::TcpListener::bind(metrics.listen)
            .await
            .with_context(|| format!("cannot listen for metrics on {}", metrics.listen))?;
        tracing::info!(addr = %tcp.local_addr()?, "metrics endpoint listening");
        let scraped = host.clone();
        tokio::spawn(prometheus::serve(
            tcp,
            std::sync::Arc::new(move || prometheus::render(&scraped.stats, &scraped.gauges())),
        ));
    }
    let fleet = fleet::Fleet::start(host.clone(), router::peer_calls(host.clone())).await?;
    reload::on_hangup(args.config.clone(), running, fleet.clone())?;
    tracing::info!(socket = %api_socket.display(), vms = host.list().len(), "vmhostd ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    spawn_watchdog();

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        () = api::serve(listener, access, host, fleet.clone()) => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if let Some(fleet) = &fleet {
        fleet.close();
    }
    // VMs keep running: a restarted vmhostd reattaches to them.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&api_socket);
    tracing::info!("vmhostd stopping; VMs keep running");
    Ok(())
}

/// Pings systemd's watchdog at half its interval, from the runtime, so a wedged runtime
/// gets the daemon restarted.
fn spawn_watchdog() {
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        let interval = timeout / 2;
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(interval).await;
            }
        });
    }
}
