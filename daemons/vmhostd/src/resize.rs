//! Resizing a running VM: an operator's scale, the agent's actions, and bounds changes.
//! The ledger is booked before anything grows and settled on what QEMU holds after.

use crate::agent_task::{self, AgentPort, AgentView};
use crate::error::{error_chain, vmm_error, HostError};
use crate::host::Host;
use crate::rebalance;
use crate::store::Marker;
use crate::validate;
use crate::vm_table::{Action, VmSlot};
use std::sync::Arc;
use std::time::Duration;
use vmhost_agent::{Action as AgentAction, Outcome};
use vmhost_api::{ComputeUnits, EventKind, Resources, VmInfo};
use vmhost_guest_link::{DownscaleError, GuestLink, UpscaleRequest};
use vmm::VmmError;

/// How a resize books and asks.
struct Resize {
    /// Take the largest quarter step the ledger can grant, down to current + 0.25.
    partial: bool,
    /// Ask the guest's monitor before shrinking.
    ask_guest: bool,
    /// The monitor request this answers, for its notification.
    request_id: Option<u64>,
    /// The bounds the size must lie in, when they are about to change.
    bounds: Option<(ComputeUnits, ComputeUnits)>,
}

impl Resize {
    fn exact(ask_guest: bool) -> Resize {
        Resize {
            partial: false,
            ask_guest,
            request_id: None,
            bounds: None,
        }
    }
}

pub fn guest_size(r: Resources) -> vmhost_guest_protocol::Size {
    vmhost_guest_protocol::Size {
        vcpus: r.vcpus,
        memory_bytes: r.memory_bytes,
    }
}

/// Asks the guest's monitor whether it can live with `size`.
pub async fn ask_guest(
    name: &str,
    guest: Option<&Arc<GuestLink>>,
    size: Resources,
    timeout: Duration,
) -> Result<(), HostError> {
    match guest {
        Some(guest) => guest.ask_downscale(guest_size(size), timeout).await,
        None => Err(DownscaleError::NotConnected),
    }
    .map_err(|source| HostError::Downscale {
        name: name.into(),
        source,
    })
}

/// A vCPU plugged before the guest's kernel can acknowledge it is plugged but never
/// acknowledged, so a plug waits until the guest's monitor has connected once: by then
/// the guest's ACPI is up. A guest without a monitor is given the whole timeout.
async fn await_guest_up(guest: Option<&Arc<GuestLink>>, timeout: Duration) {
    let Some(guest) = guest else { return };
    let deadline = tokio::time::Instant::now() + timeout;
    while guest.info().protocol_version.is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Host {
    /// An operator's resize: exactly `cu`, with the monitor's approval unless forced.
    pub async fn scale(
        &self,
        name: &str,
        cu: ComputeUnits,
        force: bool,
    ) -> Result<VmInfo, HostError> {
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let info = self.resize(&slot, cu, Resize::exact(!force)).await?;
        self.events.record(
            name,
            EventKind::Operator,
            format!("operator resized to {cu} CU"),
        );
        self.wake_agent(&slot);
        Ok(info)
    }

    /// Changes a VM's bounds. A running VM outside its new bounds is resized into them
    /// first (a shrink with its monitor's approval); if that fails, the bounds stay.
    pub async fn bounds(
        &self,
        name: &str,
        min: ComputeUnits,
        max: ComputeUnits,
    ) -> Result<VmInfo, HostError> {
        validate::check_min_max(min, max)?;
        let slot = self.slot(name)?;
        let _operation = slot.operation.lock().await;
        let (mut spec, running) = {
            let record = slot.record();
            record.check(Action::Bounds)?;
            (record.spec.clone(), record.machine.is_some())
        };
        if let Some((launched_min, launched_max)) = spec.launched_bounds.filter(|_| running) {
            if min < launched_min || max > launched_max {
                return Err(HostError::Invalid(format!(
                    "VM '{name}' runs with room for [{launched_min}, {launched_max}] CU; bounds outside that need a stop and start"
                )));
            }
        }
        let inside = spec.cu.clamp(min, max);
        if inside != spec.cu && running {
            let how = Resize {
                bounds: Some((min, max)),
                ..Resize::exact(true)
            };
            self.resize(&slot, inside, how).await?;
            spec.cu = inside;
        } else {
            spec.cu = inside;
        }
        spec.min_cu = min;
        spec.max_cu = max;
        self.store.save(&spec)?;
        slot.record().spec = spec;
        self.events.record(
            name,
            EventKind::Operator,
            format!("operator set bounds to [{min}, {max}] CU"),
        );
        self.wake_agent(&slot);
        Ok(self.info(&slot))
    }

    fn wake_agent(&self, slot: &VmSlot) {
        if let Some(agent) = &slot.record().agent {
            agent.wake();
        }
    }

    /// Resizes a running VM to `want`, under its operation lock: books the ledger (all of
    /// it, or with `partial` the largest quarter step that fits), asks the monitor before
    /// shrinking, applies it through vmm, settles the ledger on what QEMU holds, and tells
    /// the monitor about growth.
    async fn resize(
        &self,
        slot: &VmSlot,
        want: ComputeUnits,
        how: Resize,
    ) -> Result<VmInfo, HostError> {
        let (mut spec, machine, before, budget, guest) = {
            let record = slot.record();
            let machine = record.machine_for(Action::Scale)?;
            (
                record.spec.clone(),
                machine,
                record.applied,
                record.vcpu_plug_budget,
                record.guest.clone(),
            )
        };
        let name = spec.name.clone();
        let name = name.as_str();
        match how.bounds {
            Some((min, max)) if want < min || want > max => {
                return Err(HostError::Invalid(format!(
                    "{want} CU is outside VM '{name}' bounds [{min}, {max}]"
                )))
            }
            Some(_) => {}
            None => validate::check_bounds(&spec, want)?,
        }
        let wanted = spec.cu_shape.resources(want);
        let shrinks = wanted.memory_bytes < before.memory_bytes || wanted.vcpus < before.vcpus;
        if shrinks && how.ask_guest {
            let timeout = Duration::from_secs(self.config.guest.downscale_answer_secs);
            ask_guest(name, guest.as_ref(), wanted, timeout).await?;
        }
        // Book the larger of the old and new size until the guest has actually let go,
        // so memory being unplugged cannot be handed to another VM early.
        let booking = |cu: ComputeUnits| {
            let target = spec.cu_shape.resources(cu);
            Resources {
                vcpus: before.vcpus.max(target.vcpus),
                memory_bytes: before.memory_bytes.max(target.memory_bytes),
            }
        };
        let lowest = if how.partial && want > spec.cu {
            spec.cu.quarters() + 1
        } else {
            want.quarters()
        };
        let mut refusal = None;
        let mut granted = None;
        for quarters in (lowest..=want.quarters()).rev() {
            let candidate = ComputeUnits::from_quarters(quarters);
            match self.admission.set(name, booking(candidate)) {
                Ok(()) => {
                    granted = Some(candidate);
                    break;
                }
                Err(e) => refusal = refusal.or(Some(e)),
            }
        }
        let cu = match (granted, refusal) {
            (Some(cu), _) => cu,
            (None, Some(refusal)) => return Err(refusal.into()),
            (None, None) => want,
        };
        let target = spec.cu_shape.resources(cu);
        let plugs = target.vcpus.saturating_sub(before.vcpus);
        if let Some(left) = budget {
            if plugs > left {
                let _ = self.admission.set(name, before);
                return Err(HostError::Invalid(format!(
                    "VM '{name}' can take only {left} more vCPU plugs in this QEMU process (under TCG every \
                     plug uses up one vCPU slot for good); stop and start the VM to reset"
                )));
            }
            // Spent before plugging: a plug that fails halfway still used its slot.
            let left = left - plugs;
            if let Err(error) = self.save_plug_budget(name, Some(left)) {
                let _ = self.admission.set(name, before);
                return Err(error.into());
            }
            slot.record().vcpu_plug_budget = Some(left);
        }
        let started = std::time::Instant::now();
        let boot_memory = spec.boot_resources().memory_bytes;
        let timeout = self.config.timeouts.hotplug();
        if target.vcpus < before.vcpus {
            if let Err(error) = self.store.set_marker(name, Marker::VcpuUnplugged, true) {
                let _ = self.admission.set(name, before);
                return Err(error.into());
            }
        }
        self.limit(name, booking(cu));
        if plugs > 0 {
            await_guest_up(guest.as_ref(), timeout).await;
        }
        let applied = async {
            machine.set_vcpus(target.vcpus, timeout).await?;
            if target.memory_bytes != before.memory_bytes {
                machine
                    .set_hotplug_memory(target.memory_bytes.saturating_sub(boot_memory), timeout)
                    .await?;
            }
            Ok::<(), VmmError>(())
        }
        .await;
        let measured = self
            .measure(&spec, machine.as_ref())
            .await
            .unwrap_or(booking(cu));
        {
            let mut record = slot.record();
            // A QEMU that exited meanwhile had its booking released; it stays released.
            if record
                .machine
                .as_ref()
                .is_some_and(|m| Arc::ptr_eq(m, &machine))
            {
                // Shrinking the booking to what QEMU holds always fits.
                let _ = self.admission.set(name, measured);
                record.applied = measured;
                self.limit(name, measured);
            }
        }
        applied.map_err(vmm_error(name, "resize"))?;
        let grew = cu > spec.cu;
        spec.cu = cu;
        self.store.save(&spec)?;
        {
            let mut record = slot.record();
            record.spec = spec;
            if grew {
                record.grew_at = Some(started);
            }
        }
        if let (true, Some(guest)) = (grew, &guest) {
            guest.notify_upscale(how.request_id.unwrap_or(0), guest_size(measured));
        }
        tracing::info!(vm = %name, %cu, size = %measured, elapsed_ms = started.elapsed().as_millis() as u64, "scaled VM");
        Ok(self.info(slot))
    }
}

impl Host {
    /// Tells the rebalancer what an upscale to `want` could not get for lack of room.
    fn note_room_wanted(
        &self,
        slot: &VmSlot,
        want: ComputeUnits,
        resized: &Result<VmInfo, HostError>,
    ) {
        let record = slot.record();
        let wanted = record.spec.cu_shape.resources(want);
        match resized {
            Ok(_) if record.spec.cu >= want => self.room_wanted.satisfied(&record.spec.name),
            Ok(_) | Err(HostError::Capacity(_)) => self.room_wanted.note(
                &record.spec.name,
                rebalance::shortfall(wanted, record.applied),
            ),
            Err(_) => {}
        }
    }
}

#[async_trait::async_trait]
impl AgentPort for Host {
    fn agent_view(&self, vm: &str) -> Option<AgentView> {
        let slot = self.slot(vm).ok()?;
        let record = slot.record();
        record.check(Action::Scale).ok()?;
        let metrics = record
            .guest
            .as_ref()
            .and_then(|g| g.latest_metrics())
            .map(|(m, cpu, age)| (agent_task::agent_metrics(m, cpu), age));
        Some(AgentView {
            cu: record.spec.cu,
            min: record.spec.min_cu,
            max: record.spec.max_cu,
            metrics,
        })
    }

    fn set_goal(&self, vm: &str, goal: ComputeUnits) {
        if let Ok(slot) = self.slot(vm) {
            slot.record().goal = Some(goal);
        }
    }

    fn record_event(&self, vm: &str, kind: EventKind, message: String) {
        self.events.record(vm, kind, message);
    }

    async fn execute(
        &self,
        vm: &str,
        action: AgentAction,
        request: Option<UpscaleRequest>,
    ) -> Outcome {
        let (want, how) = match action {
            AgentAction::Upscale { target } => (
                target,
                Resize {
                    partial: true,
                    request_id: request.map(|r| r.id),
                    ..Resize::exact(false)
                },
            ),
            AgentAction::Downscale { target } => (target, Resize::exact(true)),
        };
        let resized = match self.slot(vm) {
            Ok(slot) => {
                let _operation = slot.operation.lock().await;
                let resized = self.resize(&slot, want, how).await;
                if let AgentAction::Upscale { .. } = action {
                    self.note_room_wanted(&slot, want, &resized);
                }
                resized
            }
            Err(error) => Err(error),
        };
        match (action, resized) {
            (AgentAction::Upscale { .. }, Ok(info)) => {
                if let Some(request) = request {
                    tracing::info!(
                        vm,
                        request = request.id,
                        to = %info.cu,
                        latency_ms = request.received.elapsed().as_millis() as u64,
                        pressure_age_us = request.pressure_age.as_micros() as u64,
                        "granted the guest's upscale request"
                    );
                }
                Outcome::Upscaled { to: info.cu }
            }
            (AgentAction::Downscale { .. }, Ok(info)) => Outcome::Downscaled { to: info.cu },
            (_, Err(HostError::Capacity(_))) => Outcome::UpscaleRefused,
            (
                AgentAction::Downscale { target },
                Err(HostError::Downscale {
                    source: DownscaleError::Refused(reason),
                    ..
                }),
            ) => {
                tracing::info!(vm, %reason, "monitor denied a downscale");
                Outcome::DownscaleDenied { target }
            }
            (_, Err(error)) => {
                tracing::warn!(vm, error = %error_chain(&error), "scaling action failed");
                Outcome::Failed
            }
        }
    }

    fn record_outcome(&self, vm: &str, action: AgentAction, outcome: Outcome, elapsed: Duration) {
        let (kind, message, direction, result) =
            agent_task::describe_outcome(action, outcome, elapsed);
        self.stats
            .operation(vm, direction, result, elapsed.as_secs_f64());
        self.events.record(vm, kind, message);
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{cu, TestHost};
    use vmhost_api::{Resources, VmState};
    use vmm::{Accel, Step, Vm};

    /// What the fake QEMU really holds, from the sizes it was started with.
    async fn held(host: &TestHost, vm: &str) -> Resources {
        let machine = host.machine(vm);
        Resources {
            vcpus: machine.vcpus().await.unwrap(),
            memory_bytes: machine.spec().boot_memory_bytes
                + machine.hotplug_memory().await.unwrap(),
        }
    }

    #[tokio::test]
    async fn raising_the_minimum_moves_the_vm_up_and_the_ledger_keeps_to_what_qemu_holds() {
        let host = TestHost::new("host-a", Accel::Kvm).await;
        host.create("a", 1, 3).await;
        host.host.bounds("a", cu(2), cu(3)).await.unwrap();
        let info = host.host.show("a").await.unwrap();
        assert_eq!(info.cu, cu(2), "left below its new minimum");
        assert_eq!(held(&host, "a").await.vcpus, 2);
        // Hotplug sizes count from the memory QEMU booted with, not from the new minimum.
        host.host.scale("a", cu(3), false).await.unwrap();
        let real = held(&host, "a").await;
        assert_eq!(real.memory_bytes, 3 << 30);
        assert_eq!(host.allocated(), real);
        assert_eq!(
            host.host.show("a").await.unwrap().memory_bytes,
            real.memory_bytes
        );
    }

    #[tokio::test]
    async fn lowering_the_maximum_below_the_size_needs_the_monitor_and_keeps_the_bounds_if_refused()
    {
        let host = TestHost::new("host-a", Accel::Kvm).await;
        host.create("a", 1, 3).await;
        host.host.scale("a", cu(3), true).await.unwrap();
        // No monitor is connected, so the shrink is refused, and so is the change.
        let error = host.host.bounds("a", cu(1), cu(2)).await.unwrap_err();
        assert!(error.to_string().contains("cannot shrink"), "{error}");
        let info = host.host.show("a").await.unwrap();
        assert_eq!((info.cu, info.max_cu), (cu(3), cu(3)));
    }

    #[tokio::test]
    async fn a_refused_upscale_leaves_qemu_and_the_ledger_as_they_were() {
        let host = TestHost::new("host-a", Accel::Kvm).await;
        host.create("a", 1, 3).await;
        let machine = host.machine("a");
        machine.fail_next(Step::SetVcpus);
        assert!(host.host.scale("a", cu(2), false).await.is_err());
        assert_eq!(host.allocated(), held(&host, "a").await);
        assert_eq!(host.state("a"), Some(VmState::Running));
    }

    #[tokio::test]
    async fn an_upscale_refused_for_room_tells_the_rebalancer_and_a_granted_one_clears_it() {
        use crate::agent_task::AgentPort;
        use vmhost_agent::{Action, Outcome};
        let host = TestHost::new("host-a", Accel::Kvm).await;
        host.create("big", 7, 7).await;
        host.create("small", 1, 3).await;
        let upscale = Action::Upscale { target: cu(3) };
        let outcome = host.host.execute("small", upscale, None).await;
        assert_eq!(outcome, Outcome::UpscaleRefused);
        let wanted = host
            .host
            .room_wanted
            .current(crate::error::now_ms())
            .unwrap();
        assert_eq!(
            (wanted.vm.as_str(), wanted.memory_bytes),
            ("small", 2 << 30)
        );
        host.host.delete("big").await.unwrap();
        let outcome = host.host.execute("small", upscale, None).await;
        assert_eq!(outcome, Outcome::Upscaled { to: cu(3) });
        assert_eq!(host.host.room_wanted.current(crate::error::now_ms()), None);
    }

    #[tokio::test]
    async fn a_scale_waits_for_the_vm_table_phase() {
        let host = TestHost::new("host-a", Accel::Kvm).await;
        host.create("a", 1, 3).await;
        host.host.stop("a").await.unwrap();
        let error = host.host.scale("a", cu(2), false).await.unwrap_err();
        assert_eq!(error.to_string(), "VM 'a' is stopped; cannot scale it");
    }
}
