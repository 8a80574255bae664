//! The compute's state and what goes with it, behind the transition table: every change
//! is checked and logged with its reason.

use vmhost_compute_api::{ComputeSpec, ComputeState, ComputeStatus};

/// A change the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the compute is {from}; it cannot go to {to}")]
pub struct Refused {
    pub from: ComputeState,
    pub to: ComputeState,
}

#[derive(Debug)]
pub struct StateHolder {
    state: ComputeState,
    error: Option<String>,
    start_time_ms: u64,
    last_active_ms: Option<u64>,
    build_tag: String,
    spec: Option<ComputeSpec>,
}

impl StateHolder {
    pub fn new(build_tag: &str, start_time_ms: u64) -> StateHolder {
        StateHolder {
            state: ComputeState::Empty,
            error: None,
            start_time_ms,
            last_active_ms: None,
            build_tag: build_tag.to_string(),
            spec: None,
        }
    }

    pub fn state(&self) -> ComputeState {
        self.state
    }

    /// Moves to `next` if the table allows it. `reason` is logged, and kept as the error
    /// when `next` is `Failed`; any other state clears the error.
    pub fn go_to(&mut self, next: ComputeState, reason: &str) -> Result<(), Refused> {
        let from = self.state;
        if !from.can_go_to(next) {
            return Err(Refused { from, to: next });
        }
        if next == ComputeState::Failed {
            tracing::error!("compute {from} -> {next}: {reason}");
            self.error = Some(reason.to_string());
        } else {
            tracing::info!("compute {from} -> {next}: {reason}");
            self.error = None;
        }
        self.state = next;
        Ok(())
    }

    pub fn spec(&self) -> Option<&ComputeSpec> {
        self.spec.as_ref()
    }

    pub fn set_spec(&mut self, spec: ComputeSpec) {
        self.spec = Some(spec);
    }

    pub fn mark_active(&mut self, now_ms: u64) {
        self.last_active_ms = Some(now_ms);
    }

    pub fn status(&self) -> ComputeStatus {
        ComputeStatus {
            state: self.state,
            error: self.error.clone(),
            start_time_ms: self.start_time_ms,
            last_active_ms: self.last_active_ms,
            build_tag: self.build_tag.clone(),
            spec_format_version: self.spec.as_ref().map(|s| s.format_version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ComputeState::*;

    #[test]
    fn changes_follow_the_table_and_failed_keeps_its_reason() {
        let mut holder = StateHolder::new("t", 5);
        assert_eq!(
            holder.go_to(Running, "skipping ahead"),
            Err(Refused {
                from: Empty,
                to: Running
            })
        );
        holder.go_to(ConfigurationPending, "asked").unwrap();
        holder.go_to(Configuration, "applying").unwrap();
        holder.go_to(Failed, "initdb failed").unwrap();
        let status = holder.status();
        assert_eq!(
            (status.state, status.error.as_deref()),
            (Failed, Some("initdb failed"))
        );
        holder.go_to(ConfigurationPending, "asked again").unwrap();
        assert_eq!(holder.status().error, None);
        assert_eq!(holder.status().start_time_ms, 5);
    }

    #[test]
    fn status_carries_activity_and_the_spec_version() {
        let mut holder = StateHolder::new("v2", 1);
        assert_eq!(holder.status().spec_format_version, None);
        holder.set_spec(ComputeSpec {
            format_version: 1,
            roles: vec![],
            databases: vec![],
            settings: Default::default(),
            extensions: vec![],
        });
        holder.mark_active(42);
        let status = holder.status();
        assert_eq!(status.spec_format_version, Some(1));
        assert_eq!(status.last_active_ms, Some(42));
        assert_eq!(status.build_tag, "v2");
    }
}
