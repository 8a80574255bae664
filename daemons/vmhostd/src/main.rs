//! vmhostd: runs the VMs of one host. See the README for its config and operation.

mod admission;
mod agent_task;
mod api;
mod cgroups;
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
mod service;
mod store;
#[cfg(test)]
mod testing;
mod tunnels;
mod validate;
mod vm_table;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "vmhost host daemon",
    long_about = "Runs, resizes and supervises the QEMU VMs of one host, and serves vmctl on \
        its API socket, as the systemd unit vmhostd.service. VMs outlive it: a restarted \
        vmhostd reattaches to them.\n\n\
        SIGHUP rereads the config and the fleet credentials: the fleet's CAs, certificate and \
        denied hosts apply at once, other changes at the next restart. VMHOST_LOG sets the \
        log filter (e.g. VMHOST_LOG=debug). The README's Configuration section \
        (/usr/share/doc/vmhost/README.md) describes every key of the config."
)]
struct Args {
    /// Host config file (TOML).
    #[arg(long, default_value = "/etc/vmhost/vmhostd.toml")]
    config: PathBuf,
    /// Write the manual page, vmhostd.8, into DIR and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    manpage_dir: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if let Some(dir) = &args.manpage_dir {
        let page = clap_mangen::Man::new(Args::command()).section("8");
        if let Err(error) = page.generate_to(dir) {
            eprintln!(
                "vmhostd: cannot write the manual page into {}: {error}",
                dir.display()
            );
            std::process::exit(1);
        }
        return;
    }
    let loaded = config::Config::load_with_table(&args.config);
    let host_name = loaded.as_ref().map(|(c, _)| c.host_name());
    service::init_logging(host_name.as_deref().unwrap_or_default());
    service::keep_inherited_descriptors();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    if let Err(error) = runtime.block_on(run(args.config, loaded)) {
        // One line: the chain of causes, outermost first.
        eprintln!("vmhostd: {error:#}");
        tracing::error!("{error:#}");
        std::process::exit(1);
    }
}

async fn run(
    config_path: PathBuf,
    loaded: Result<(config::Config, toml::Table), config::ConfigError>,
) -> anyhow::Result<()> {
    let (config, running) = loaded?;
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
    reload::on_hangup(config_path, running, fleet.clone())?;
    tracing::info!(socket = %api_socket.display(), vms = host.list().len(), "vmhostd ready");
    service::ready(&host);
    service::spawn_watchdog(host.clone());

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
    service::stopping();
    let _ = std::fs::remove_file(&api_socket);
    tracing::info!("vmhostd stopping; VMs keep running");
    Ok(())
}
