//! Prometheus metrics over HTTP: `GET /metrics` in the text exposition format. Counters
//! live here; gauges are read from the host at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Counters of scaling operations.
#[derive(Default)]
pub struct ScalingStats {
    inner: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    /// (vm, direction, result) → count
    operations: BTreeMap<(String, &'static str, &'static str), u64>,
    /// direction → (sum of seconds, count)
    latency: BTreeMap<&'static str, (f64, u64)>,
    /// vm → downscales the monitor denied
    denials: BTreeMap<String, u64>,
}

impl ScalingStats {
    pub fn operation(&self, vm: &str, direction: &'static str, result: &'static str, seconds: f64) {
        let mut c = self.inner.lock().unwrap();
        *c.operations
            .entry((vm.to_string(), direction, result))
            .or_default() += 1;
        if result == "applied" {
            let entry = c.latency.entry(direction).or_default();
            entry.0 += seconds;
            entry.1 += 1;
        }
        if result == "denied" {
            *c.denials.entry(vm.to_string()).or_default() += 1;
        }
    }

    pub fn forget(&self, vm: &str) {
        let mut c = self.inner.lock().unwrap();
        c.operations.retain(|(v, _, _), _| v != vm);
        c.denials.remove(vm);
    }
}

/// Live values of one VM at scrape time.
pub struct VmGauges {
    pub vm: String,
    pub cu: f64,
    pub goal_cu: Option<f64>,
    pub guest_connected: bool,
    pub guest_healthy: bool,
    /// Its compute's build tag and state, as computectl last reported them.
    pub compute: Option<(String, vmhost_compute_api::ComputeState)>,
}

/// Label values are quoted; backslash, quote and newline must be escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One yes/no fact about a VM's guest link.
type GuestFlag = fn(&VmGauges) -> bool;

pub fn render(stats: &ScalingStats, vms: &[VmGauges]) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        &mut out,
        "vmhost_vm_cu",
        "Current size of the VM in compute units.",
    );
    for vm in vms {
        let _ = writeln!(out, "vmhost_vm_cu{{vm=\"{}\"}} {}", label(&vm.vm), vm.cu);
    }
    gauge(
        &mut out,
        "vmhost_vm_goal_cu",
        "The autoscaling agent's goal for the VM.",
    );
    for vm in vms {
        if let Some(goal) = vm.goal_cu {
            let _ = writeln!(out, "vmhost_vm_goal_cu{{vm=\"{}\"}} {goal}", label(&vm.vm));
        }
    }
    let links: [(&str, &str, GuestFlag); 2] = [
        (
            "vmhost_guest_link_connected",
            "1 when the guest's monitor is connected.",
            |vm| vm.guest_connected,
        ),
        (
            "vmhost_guest_link_healthy",
            "1 when the guest's monitor is connected and recently heard from.",
            |vm| vm.guest_healthy,
        ),
    ];
    for (name, help, value) in links {
        gauge(&mut out, name, help);
        for vm in vms {
            let _ = writeln!(
                out,
                "{name}{{vm=\"{}\"}} {}",
                label(&vm.vm),
                u8::from(value(vm))
            );
        }
    }
    // Counts with no VM label: a fleet-wide aggregate of computectl's `compute_ctl_up`.
    gauge(
        &mut out,
        "vmhost_computes",
        "Postgres computes on this host by build tag and status.",
    );
    let mut computes: BTreeMap<(&str, String), u32> = BTreeMap::new();
    for (tag, state) in vms.iter().filter_map(|vm| vm.compute.as_ref()) {
        *computes
            .entry((tag.as_str(), state.to_string()))
            .or_default() += 1;
    }
    for ((tag, status), count) in computes {
        let _ = writeln!(
            out,
            "vmhost_computes{{build_tag=\"{}\",status=\"{status}\"}} {count}",
            label(tag)
        );
    }
    let c = stats.inner.lock().unwrap();
    let _ = writeln!(
        out,
        "# HELP vmhost_scaling_operations_total Scaling operations by direction and result.\n# TYPE vmhost_scaling_operations_total counter"
    );
    for ((vm, direction, result), count) in &c.operations {
        let _ = writeln!(
            out,
            "vmhost_scaling_operations_total{{vm=\"{}\",direction=\"{direction}\",result=\"{result}\"}} {count}",
            label(vm)
        );
    }
    let _ = writeln!(
        out,
        "# HELP vmhost_scaling_latency_seconds Time from decision to applied resize.\n# TYPE vmhost_scaling_latency_seconds summary"
    );
    for (direction, (sum, count)) in &c.latency {
        let _ = writeln!(
            out,
            "vmhost_scaling_latency_seconds_sum{{direction=\"{direction}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "vmhost_scaling_latency_seconds_count{{direction=\"{direction}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP vmhost_downscale_denials_total Downscales the guest's monitor refused.\n# TYPE vmhost_downscale_denials_total counter"
    );
    for (vm, count) in &c.denials {
        let _ = writeln!(
            out,
            "vmhost_downscale_denials_total{{vm=\"{}\"}} {count}",
            label(vm)
        );
    }
    out
}

/// Serves `GET /metrics`; anything else gets 404. One short response per connection.
pub async fn serve(listener: TcpListener, scrape: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut request))
                    .await;
            let Ok(Ok(n)) = read else { return };
            let head = String::from_utf8_lossy(&request[..n]);
            let response = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?")
            {
                let body = scrape();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmhost_compute_api::ComputeState;

    #[test]
    fn renders_gauges_counters_and_escapes_labels() {
        let stats = ScalingStats::default();
        stats.operation("db1", "up", "applied", 0.25);
        stats.operation("db1", "down", "denied", 0.0);
        let running = Some(("v1".to_string(), ComputeState::Running));
        let vm = |name: &str, compute| VmGauges {
            vm: name.into(),
            cu: 1.5,
            goal_cu: Some(2.0),
            guest_connected: true,
            guest_healthy: false,
            compute,
        };
        let text = render(
            &stats,
            &[
                vm("db\"1", running.clone()),
                vm("db2", running),
                vm("db3", Some(("v1".into(), ComputeState::Failed))),
                vm("web", None),
            ],
        );
        assert!(text.contains("vmhost_vm_cu{vm=\"db\\\"1\"} 1.5"), "{text}");
        assert!(text.contains("vmhost_vm_goal_cu{vm=\"db\\\"1\"} 2"));
        assert!(text.contains("vmhost_guest_link_healthy{vm=\"db\\\"1\"} 0"));
        assert!(text.contains(
            "vmhost_scaling_operations_total{vm=\"db1\",direction=\"up\",result=\"applied\"} 1"
        ));
        assert!(text.contains("vmhost_scaling_latency_seconds_count{direction=\"up\"} 1"));
        assert!(text.contains("vmhost_downscale_denials_total{vm=\"db1\"} 1"));
        assert!(text.contains("vmhost_computes{build_tag=\"v1\",status=\"running\"} 2"));
        assert!(text.contains("vmhost_computes{build_tag=\"v1\",status=\"failed\"} 1"));
        assert_eq!(text.matches("vmhost_computes{").count(), 2, "{text}");
    }
}
