//! `GET /metrics` in the Prometheus text format. Rendered from the status, so
//! `compute_ctl_up` always has exactly one series, for the current state, as Neon's gauge
//! has after its reset-and-set on every change.

use vmhost_compute_api::ComputeStatus;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn render(status: &ComputeStatus) -> String {
    let mut text = format!(
        "# HELP compute_ctl_up Whether computectl is up, by build tag and compute state.\n\
         # TYPE compute_ctl_up gauge\n\
         compute_ctl_up{{build_tag=\"{}\",status=\"{}\"}} 1\n",
        label_value(&status.build_tag),
        status.state
    );
    if let Some(ms) = status.last_active_ms {
        text.push_str(&format!(
            "# HELP compute_last_active_seconds When a client last had a query or transaction under way, in Unix seconds.\n\
             # TYPE compute_last_active_seconds gauge\n\
             compute_last_active_seconds {}.{:03}\n",
            ms / 1000,
            ms % 1000
        ));
    }
    text
}

/// Backslash, quote and newline must be escaped inside a label value.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmhost_compute_api::ComputeState;

    fn status(state: ComputeState, last_active_ms: Option<u64>) -> ComputeStatus {
        ComputeStatus {
            state,
            error: None,
            start_time_ms: 0,
            last_active_ms,
            build_tag: "v1 \"x\"\\".into(),
            spec_format_version: None,
        }
    }

    #[test]
    fn one_up_series_for_the_current_state() {
        let text = render(&status(ComputeState::ConfigurationPending, None));
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("compute_ctl_up{"))
            .collect();
        assert_eq!(
            series,
            ["compute_ctl_up{build_tag=\"v1 \\\"x\\\"\\\\\",status=\"configuration_pending\"} 1"]
        );
        assert!(!text.contains("compute_last_active_seconds"));
    }

    #[test]
    fn last_activity_in_seconds() {
        let text = render(&status(ComputeState::Running, Some(1_700_000_000_042)));
        assert!(
            text.contains("\ncompute_last_active_seconds 1700000000.042\n"),
            "{text}"
        );
        assert!(text.contains("status=\"running\"} 1"));
    }
}
