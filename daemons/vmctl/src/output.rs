//! What vmctl prints: tables, one VM, hosts, events, migration progress, and `top`, all
//! through macros that end vmctl quietly when its reader goes away.

use crate::REQUEST_TIMEOUT;
use std::io::Write;
use std::time::Duration;
use vmhost_api::units::format_bytes;
use vmhost_api::{ClientError, FleetHost, HostInfo, Reply, Request, VmInfo};

// A CLI in a pipe must stop quietly when its reader goes away (`vmctl list | head -1`), but
// std's print macros panic when a write fails, EPIPE included, so vmctl prints through these
// four instead (clippy.toml bans std's): a closed stdout or stderr ends vmctl the way it ends
// `ls`, killed by SIGPIPE, and any other output error (`> file` on a full disk) is a one-line
// error, not a panic. Restoring SIGPIPE's default at start would fix the pipe case alone,
// and for every pipe the process ever writes; this keeps the decision at the output.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_or_exit(std::io::stdout().lock(), format_args!($($arg)*)) };
}
macro_rules! outln {
    () => { out!("\n") };
    ($($arg:tt)*) => { out!("{}\n", format_args!($($arg)*)) };
}
macro_rules! err {
    ($($arg:tt)*) => { $crate::output::write_or_exit(std::io::stderr().lock(), format_args!($($arg)*)) };
}
macro_rules! errln {
    () => { err!("\n") };
    ($($arg:tt)*) => { err!("{}\n", format_args!($($arg)*)) };
}

/// Writes output. A reader that has gone away ends vmctl by SIGPIPE; any other failure ends
/// it with an error (on stderr, if that still works) instead of a panic.
pub fn write_or_exit(mut out: impl std::io::Write, args: std::fmt::Arguments<'_>) {
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

pub fn print_reply(reply: &Reply, json: bool) {
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
            Reply::Drain(report) => serde_json::to_value(report),
            Reply::Compute { status, .. } => serde_json::to_value(status),
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
        Reply::Drain(report) => crate::drain::print_drain(report),
        Reply::Deleted { name } => outln!("deleted {name}"),
        Reply::Events(events) => events.iter().for_each(print_event),
        Reply::Event(event) => print_event(event),
        Reply::MigrationProgress(progress) => print_progress(progress),
        Reply::Migrated(summary) => print_summary(summary),
        Reply::Compute { name, status } => print_compute(name, status),
    }
}

/// One line, redrawn in place: a bar, bytes, rate, phase and ETA.
pub fn print_progress(p: &vmhost_api::MigrationProgress) {
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

pub fn print_summary(s: &vmhost_api::MigrationSummary) {
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

/// The UTC time of day of a wall-clock millisecond count.
pub fn format_unix_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", unix_ms % 1000)
}

pub fn print_event(event: &vmhost_api::Event) {
    outln!(
        "{}  {:<16} {:<18} {}",
        format_unix_ms(event.unix_ms),
        event.vm,
        event.kind.to_string(),
        event.message
    );
}

/// A live table of every VM, redrawn every second.
pub fn top(socket: &std::path::Path, count: Option<u64>) -> Result<(), ClientError> {
    let mut round = 0;
    loop {
        let Reply::Vms(vms) = vmhost_api::call(socket, Request::List, REQUEST_TIMEOUT)? else {
            return Ok(());
        };
        // Clear the screen and go home, then draw.
        out!("\x1b[H\x1b[2J");
        // The fast CPU signal (the last seconds) beside the slow one (load1, a minute).
        outln!(
            "{:<20} {:<9} {:>5} {:>5} {:>6} {:>10} {:>6} {:>5} {:>6} {:>6} {:>10} {:>10}",
            "NAME",
            "STATE",
            "CU",
            "GOAL",
            "VCPUS",
            "MEMORY",
            "LOAD1",
            "UTIL",
            "CPUPSI",
            "LOAD5",
            "USED",
            "WORKLOAD"
        );
        for vm in &vms {
            let metrics = vm.guest.as_ref().and_then(|g| g.metrics);
            let cpu = vm.guest.as_ref().and_then(|g| g.cpu);
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            outln!(
                "{:<20} {:<9} {:>5} {:>5} {:>6} {:>10} {:>6} {:>5} {:>6} {:>6} {:>10} {:>10}",
                vm.name,
                vm.state.to_string(),
                vm.cu.to_string(),
                or_dash(vm.goal_cu.map(|g| g.to_string())),
                vm.vcpus,
                format_bytes(vm.memory_bytes),
                or_dash(metrics.map(|m| format!("{:.2}", m.load1))),
                or_dash(cpu.map(|c| format!("{:.0}%", c.util * 100.0))),
                or_dash(cpu.map(|c| format!("{:.1}%", c.pressure_some_avg10))),
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

pub fn print_vm(vm: &VmInfo) {
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

pub fn describe_guest(guest: &vmhost_api::GuestInfo) -> String {
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
    if let Some(c) = &guest.cpu {
        text += &format!(
            ", cpu util {:.0}% (last seconds), cpu pressure {:.1}% (10 s)",
            c.util * 100.0,
            c.pressure_some_avg10
        );
    }
    text
}

pub fn print_table(vms: &[VmInfo]) {
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

pub fn warn_unreachable(hosts: &[String]) {
    if !hosts.is_empty() {
        errln!(
            "vmctl: VMs of these hosts are missing: {}",
            hosts.join(", ")
        );
    }
}

pub fn print_hosts(hosts: &[FleetHost]) {
    outln!(
        "{:<16} {:<21} {:<5} {:>14} {:>14} {:>14} {:>4} {:<8}",
        "HOST",
        "ADDRESS",
        "LIVE",
        "CAPACITY",
        "ALLOCATED",
        "LEASED",
        "VMS",
        "DRAIN"
    );
    let short = |r: vmhost_api::Resources| format!("{}/{}", r.vcpus, format_bytes(r.memory_bytes));
    for host in hosts {
        outln!(
            "{:<16} {:<21} {:<5} {:>14} {:>14} {:>14} {:>4} {:<8}",
            host.name,
            host.addr,
            if host.live { "yes" } else { "DEAD" },
            short(host.capacity),
            short(host.allocated),
            short(host.leased),
            host.vms,
            host.drain.map_or("-".into(), |d| d.to_string())
        );
    }
}

pub fn print_host(host: &HostInfo) {
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
    outln!(
        "disks      {} of {} GiB",
        host.disk_allocated_gib,
        host.disk_capacity_gib
    );
    outln!("vms        {}", host.vms);
}

/// A compute as computectl reports it.
fn print_compute(name: &str, status: &vmhost_compute_api::ComputeStatus) {
    let when = |ms: Option<u64>| ms.map_or("-".into(), format_unix_ms);
    outln!("compute of {name}: {}", status.state);
    if let Some(error) = &status.error {
        outln!("  error: {error}");
    }
    outln!("  started: {}", when(Some(status.start_time_ms)));
    outln!("  last active: {}", when(status.last_active_ms));
    outln!("  build: {}", status.build_tag);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_shows_the_fast_cpu_signal_when_it_sends_one() {
        let mut info = serde_json::json!({
            "connected": true,
            "healthy": true,
            "protocol_version": 1,
            "online_cpus": 2,
            "mem_total_bytes": 1 << 30,
            "metrics": {
                "load1": 0.4,
                "load5": 0.2,
                "mem_total_bytes": 1 << 30,
                "mem_used_bytes": 1 << 28,
                "mem_cached_bytes": 0,
                "workload_mem_bytes": 0,
                "online_cpus": 2
            },
            "metrics_age_ms": 300,
            "upscale_requests": 0,
            "protocol_errors": 0
        });
        // What a vmhostd without the fast signal answers still reads.
        let old = describe_guest(&serde_json::from_value(info.clone()).unwrap());
        assert!(
            old.contains("load 0.40/0.20") && !old.contains("util"),
            "{old}"
        );
        info["protocol_version"] = 2.into();
        info["cpu"] = serde_json::json!({ "util": 0.95, "pressure_some_avg10": 42.5 });
        let new = describe_guest(&serde_json::from_value(info).unwrap());
        assert!(
            new.ends_with("cpu util 95% (last seconds), cpu pressure 42.5% (10 s)"),
            "{new}"
        );
    }
}
