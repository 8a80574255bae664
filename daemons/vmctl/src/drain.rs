//! `vmctl drain --wait` and how a drain report reads.

use crate::REQUEST_TIMEOUT;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use vmhost_api::{
    ApiError, ClientError, DrainPhase, DrainReport, ErrorKind, Reply, Request, VmMove,
};

const POLL: Duration = Duration::from_secs(1);

/// Follows `host`'s drain, a line per VM whose move changes, until nothing moves any more.
/// Fails if VMs are left that cannot move.
pub fn wait(socket: &Path, host: &str, json: bool) -> Result<(), ClientError> {
    let mut seen: BTreeMap<String, VmMove> = BTreeMap::new();
    loop {
        let request = Request::OnHost {
            host: host.to_string(),
            request: Box::new(Request::DrainStatus),
        };
        let Reply::Drain(report) = vmhost_api::call(socket, request, REQUEST_TIMEOUT)? else {
            return Err(unexpected());
        };
        if report.phase.is_none() {
            return Err(ClientError::Api(ApiError::new(
                ErrorKind::WrongState,
                format!("host '{host}' is no longer draining (undrained meanwhile)"),
            )));
        }
        for vm in &report.vms {
            let shown = coarse(&vm.state);
            if seen.get(&vm.name) != Some(&shown) {
                seen.insert(vm.name.clone(), shown);
                if !json {
                    outln!("{:<20} {}", vm.name, describe(&vm.state));
                }
            }
        }
        if report.settled() {
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("reports serialize")
                );
            } else {
                outln!("{}", total(&report));
            }
            return match report.phase {
                Some(DrainPhase::Drained) => Ok(()),
                _ => Err(ClientError::Api(ApiError::new(
                    ErrorKind::WrongState,
                    format!(
                        "host '{host}' still holds VMs that cannot move: {}",
                        stuck(&report).join("; ")
                    ),
                ))),
            };
        }
        std::thread::sleep(POLL);
    }
}

/// A move's state with its progress in quarters, so a line is printed per quarter.
fn coarse(state: &VmMove) -> VmMove {
    match state {
        VmMove::Moving { to, percent } => VmMove::Moving {
            to: to.clone(),
            percent: percent / 25 * 25,
        },
        other => other.clone(),
    }
}

fn unexpected() -> ClientError {
    ClientError::Api(ApiError::new(
        ErrorKind::Internal,
        "vmhostd answered a drain status with something else",
    ))
}

fn stuck(report: &DrainReport) -> Vec<String> {
    report
        .vms
        .iter()
        .filter_map(|vm| match &vm.state {
            VmMove::Stuck { reason } => Some(format!("{}: {reason}", vm.name)),
            _ => None,
        })
        .collect()
}

/// "moved 2 of 3 VMs (1 cold), 1 stuck".
fn total(report: &DrainReport) -> String {
    let count = |f: fn(&VmMove) -> bool| report.vms.iter().filter(|vm| f(&vm.state)).count();
    let moved = count(|s| matches!(s, VmMove::Moved { .. } | VmMove::MovedCold { .. }));
    let cold = count(|s| matches!(s, VmMove::MovedCold { .. }));
    let stuck = count(|s| matches!(s, VmMove::Stuck { .. }));
    let phase = report
        .phase
        .map_or("not draining".into(), |p| p.to_string());
    format!(
        "host {}: {phase}; moved {moved} of {} VMs ({cold} cold), {stuck} cannot move",
        report.host,
        report.vms.len()
    )
}

pub fn describe(state: &VmMove) -> String {
    match state {
        VmMove::Waiting => "waiting".into(),
        VmMove::Moving { to, percent } if to.is_empty() => format!("moving ({percent}%)"),
        VmMove::Moving { to, percent } => format!("moving to {to} ({percent}%)"),
        VmMove::MovingCold { to } => format!("moving cold to {to} (stopped; its RAM is lost)"),
        VmMove::Moved { to } => format!("moved to {to}"),
        VmMove::MovedCold { to } => format!("moved cold to {to} (rebooted there)"),
        VmMove::Stuck { reason } => format!("cannot move: {reason}"),
    }
}

pub fn print_drain(report: &DrainReport) {
    let order = report.order.as_ref().map_or(String::new(), |o| {
        format!(
            " ({} at a time{})",
            o.parallel,
            if o.cold { ", cold moves allowed" } else { "" }
        )
    });
    outln!(
        "host {}: {}{order}",
        report.host,
        report
            .phase
            .map_or("not draining".into(), |p| p.to_string())
    );
    for vm in &report.vms {
        outln!(
            "  {:<20} {} (tries: {})",
            vm.name,
            describe(&vm.state),
            vm.attempts
        );
    }
    outln!("{}", total(report));
}
