//! The last fleet events, printed when a check fails. VM resizes are left out: there are
//! thousands per tick, and the failure message shows the host's state instead.

use crate::fleet::{gib, host_name, vm_name};
use std::collections::VecDeque;
use std::fmt;

const KEPT: usize = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rebalance,
    Drain,
}

#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    Full,
    Draining,
    Unreachable,
}

#[derive(Debug, Clone, Copy)]
pub enum Event {
    Crossing {
        host: usize,
        used: u64,
        watermark: u64,
    },
    CrossingOver {
        host: usize,
    },
    UpscaleRefused {
        host: usize,
        vm: usize,
        wanted: u64,
    },
    LeaseRefused {
        from: usize,
        to: usize,
        vm: usize,
        why: Refusal,
    },
    Started {
        from: usize,
        to: usize,
        vm: usize,
        size: u64,
        kind: Kind,
    },
    Switched {
        from: usize,
        to: usize,
        vm: usize,
    },
    Failed {
        from: usize,
        to: usize,
        vm: usize,
        why: &'static str,
    },
    Crashed {
        host: usize,
    },
    Restarted {
        host: usize,
        vms: usize,
    },
    Drain {
        host: usize,
    },
    Undrain {
        host: usize,
        left: usize,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = |i: usize| host_name(i);
        match *self {
            Event::Crossing {
                host,
                used,
                watermark,
            } => write!(
                f,
                "{} needs room: {} GiB used, watermark {} GiB",
                h(host),
                gib(used),
                gib(watermark)
            ),
            Event::CrossingOver { host } => write!(f, "{} needs no more room", h(host)),
            Event::UpscaleRefused { host, vm, wanted } => write!(
                f,
                "{} refused {} {} GiB more",
                h(host),
                vm_name(vm),
                gib(wanted)
            ),
            Event::LeaseRefused { from, to, vm, why } => write!(
                f,
                "{} refused {}'s lease for {} ({why:?})",
                h(to),
                h(from),
                vm_name(vm)
            ),
            Event::Started {
                from,
                to,
                vm,
                size,
                kind,
            } => write!(
                f,
                "{} starts moving {} ({} GiB) to {} ({kind:?})",
                h(from),
                vm_name(vm),
                gib(size),
                h(to)
            ),
            Event::Switched { from, to, vm } => {
                write!(
                    f,
                    "{} now runs on {} (left {})",
                    vm_name(vm),
                    h(to),
                    h(from)
                )
            }
            Event::Failed { from, to, vm, why } => write!(
                f,
                "moving {} from {} to {} failed: {why}",
                vm_name(vm),
                h(from),
                h(to)
            ),
            Event::Crashed { host } => write!(f, "{} crashed", h(host)),
            Event::Restarted { host, vms } => {
                write!(f, "{} restarted with {vms} VMs", h(host))
            }
            Event::Drain { host } => write!(f, "{} starts draining", h(host)),
            Event::Undrain { host, left } => {
                write!(f, "{} stops draining, {left} VMs left on it", h(host))
            }
        }
    }
}

#[derive(Default)]
pub struct Timeline {
    events: VecDeque<(u64, Event)>,
}

impl Timeline {
    pub fn push(&mut self, tick: u64, event: Event) {
        if self.events.len() == KEPT {
            self.events.pop_front();
        }
        self.events.push_back((tick, event));
    }

    pub fn render(&self) -> String {
        self.events
            .iter()
            .map(|(tick, event)| format!("  tick {tick}: {event}\n"))
            .collect()
    }
}
