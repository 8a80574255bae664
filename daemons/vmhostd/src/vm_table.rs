//! The VMs of this host and the state of each. A VM's state changes only through
//! `VmRecord::become_`, checked against one transition table, and an operator's action is
//! checked against the states it is allowed in, so a wrong-phase action gets a clear error.
//!
//! Each VM has an operation lock (one lifecycle, resize or migration step at a time, so a
//! slow guest never blocks other VMs) and a record behind a short-held mutex that listings
//! read.

use crate::agent_task::AgentHandle;
use crate::error::HostError;
use crate::store::VmSpec;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vmhost_api::{ComputeUnits, Resources, VmState};
use vmhost_guest_link::GuestLink;
use vmm::Vm;

use VmState::*;

/// Every state change a VM can make. Leaving the table (delete, a failed create, an
/// abandoned arrival, a VM handed over to another host) is `VmTable::remove`.
const TRANSITIONS: &[(VmState, VmState, &str)] = &[
    (Starting, Running, "its QEMU started"),
    (Stopped, Running, "started"),
    (Crashed, Running, "started again"),
    (Running, Stopped, "stopped"),
    (Crashed, Stopped, "stopped"),
    (Running, Crashed, "its QEMU exited"),
    (Running, Migrating, "its migration began"),
    (Migrating, Running, "its migration ended here"),
    (Migrating, Crashed, "its QEMU exited during a migration"),
    (
        Migrating,
        Stopped,
        "handed over to another host, or its cold move failed",
    ),
    (Stopped, Migrating, "its cold move began"),
    (Crashed, Migrating, "its cold move began"),
];

/// What an operator or a peer asks of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Scale,
    Stop,
    Start,
    Delete,
    Bounds,
    Migrate,
    ResumeMigration,
    RecoverArrival,
    Compute,
}

impl Action {
    /// The states the action is allowed in.
    fn allowed_in(self) -> &'static [VmState] {
        match self {
            Action::Scale | Action::Migrate | Action::Compute => &[Running],
            Action::Stop => &[Running, Crashed],
            Action::Start => &[Stopped, Crashed],
            // Not while starting: a create that fails removes the VM under that lock.
            Action::Delete | Action::Bounds => &[Running, Stopped, Crashed],
            Action::ResumeMigration | Action::RecoverArrival => &[Migrating],
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Scale => "scale",
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Delete => "delete",
            Action::Bounds => "change the bounds of",
            Action::Migrate => "migrate",
            Action::ResumeMigration => "resume the migration of",
            Action::RecoverArrival => "recover the migration of",
            Action::Compute => "reach the compute of",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("VM '{vm}' cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub vm: String,
    pub from: VmState,
    pub to: VmState,
}

pub struct VmRecord {
    pub spec: VmSpec,
    state: VmState,
    pub machine: Option<Arc<dyn Vm>>,
    /// What QEMU holds now, as last measured.
    pub applied: Resources,
    /// vCPU plugs the running QEMU can still take (see `vmm::cmdline::vcpu_slots`).
    pub vcpu_plug_budget: Option<u32>,
    /// The link to the guest's monitor, while QEMU runs.
    pub guest: Option<Arc<GuestLink>>,
    /// The autoscaling agent, while QEMU runs and the VM autoscales.
    pub agent: Option<AgentHandle>,
    /// The watch of its Postgres compute, while QEMU runs and the VM has a compute spec.
    pub compute: Option<crate::compute_watch::ComputeWatch>,
    /// The agent's latest goal.
    pub goal: Option<ComputeUnits>,
    /// Wall-clock milliseconds of its migration here, if it came by one since this
    /// vmhostd started: a VM that just moved is not moved on again at once.
    pub arrived_at_ms: Option<u64>,
    /// When it last grew: a VM that is growing is the one that needs the room, so the
    /// rebalancer moves others first.
    pub grew_at: Option<std::time::Instant>,
}

impl VmRecord {
    /// A VM without a QEMU yet.
    pub fn new(spec: VmSpec, state: VmState, applied: Resources) -> VmRecord {
        VmRecord {
            spec,
            state,
            machine: None,
            applied,
            vcpu_plug_budget: None,
            guest: None,
            agent: None,
            compute: None,
            goal: None,
            arrived_at_ms: None,
            grew_at: None,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Changes the state, if the transition table allows it.
    pub fn become_(&mut self, to: VmState) -> Result<(), InvalidTransition> {
        if TRANSITIONS
            .iter()
            .any(|&(from, next, _)| from == self.state && next == to)
        {
            tracing::debug!(vm = %self.spec.name, from = %self.state, %to, "VM state changed");
            self.state = to;
            Ok(())
        } else {
            Err(InvalidTransition {
                vm: self.spec.name.clone(),
                from: self.state,
                to,
            })
        }
    }

    /// Refuses an action the VM's state does not allow.
    pub fn check(&self, action: Action) -> Result<(), HostError> {
        if action.allowed_in().contains(&self.state) {
            Ok(())
        } else {
            Err(HostError::WrongState {
                name: self.spec.name.clone(),
                state: self.state,
                action: action.verb(),
            })
        }
    }

    /// The running QEMU, for an action that needs one.
    pub fn machine_for(&self, action: Action) -> Result<Arc<dyn Vm>, HostError> {
        self.check(action)?;
        self.machine.clone().ok_or_else(|| HostError::WrongState {
            name: self.spec.name.clone(),
            state: self.state,
            action: action.verb(),
        })
    }
}

pub struct VmSlot {
    pub operation: tokio::sync::Mutex<()>,
    record: Mutex<VmRecord>,
}

impl VmSlot {
    pub fn record(&self) -> MutexGuard<'_, VmRecord> {
        self.record.lock().expect("VM record lock poisoned")
    }
}

#[derive(Default)]
pub struct VmTable(Mutex<BTreeMap<String, Arc<VmSlot>>>);

impl VmTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<VmSlot>>> {
        self.0.lock().expect("VM table lock poisoned")
    }

    pub fn get(&self, name: &str) -> Result<Arc<VmSlot>, HostError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| HostError::NotFound(name.into()))
    }

    /// Enters a VM; its name must be free.
    pub fn insert(&self, record: VmRecord) -> Result<Arc<VmSlot>, HostError> {
        let name = record.spec.name.clone();
        let mut vms = self.lock();
        if vms.contains_key(&name) {
            return Err(HostError::AlreadyExists(name));
        }
        let slot = Arc::new(VmSlot {
            operation: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
        });
        vms.insert(name, slot.clone());
        Ok(slot)
    }

    /// Removes the VM, if `slot` is still the one listed under its name.
    pub fn remove(&self, name: &str, slot: &Arc<VmSlot>) {
        let mut vms = self.lock();
        if vms.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            vms.remove(name);
        }
    }

    pub fn all(&self) -> Vec<Arc<VmSlot>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::spec;

    fn record(state: VmState) -> VmRecord {
        VmRecord::new(spec("a"), state, Resources::default())
    }

    #[test]
    fn every_listed_transition_is_allowed_and_nothing_else() {
        let all = [Starting, Running, Stopped, Crashed, Migrating];
        for from in all {
            for to in all {
                let listed = TRANSITIONS.iter().any(|&(f, t, _)| f == from && t == to);
                let mut vm = record(from);
                assert_eq!(vm.become_(to).is_ok(), listed, "{from} -> {to}");
                assert_eq!(vm.state(), if listed { to } else { from });
            }
        }
    }

    #[test]
    fn a_wrong_phase_action_names_the_state_and_the_action() {
        let vm = record(Migrating);
        let error = vm.check(Action::Scale).unwrap_err();
        assert_eq!(error.to_string(), "VM 'a' is migrating; cannot scale it");
        assert!(record(Running).check(Action::Scale).is_ok());
        assert!(record(Stopped).check(Action::Start).is_ok());
        assert!(record(Running).check(Action::Start).is_err());
        assert!(record(Migrating).check(Action::Delete).is_err());
        assert!(record(Starting).check(Action::Delete).is_err());
        assert!(record(Running).machine_for(Action::Scale).is_err());
    }

    #[test]
    fn the_table_refuses_a_second_vm_of_a_name_and_removes_only_its_own_slot() {
        let table = VmTable::default();
        let first = table.insert(record(Running)).unwrap();
        assert!(matches!(
            table.insert(record(Running)),
            Err(HostError::AlreadyExists(_))
        ));
        let stranger = Arc::new(VmSlot {
            operation: tokio::sync::Mutex::new(()),
            record: Mutex::new(record(Stopped)),
        });
        table.remove("a", &stranger);
        assert_eq!(table.len(), 1);
        table.remove("a", &first);
        assert_eq!(table.len(), 0);
    }
}
