//! What a run records: how often each fault happened, and the recent events, so a failure
//! can be read without replaying it under a debugger.

use std::collections::VecDeque;
use std::fmt;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};

/// How often each fault, and each path that only faults reach, happened in one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Refusals other than for a failed save: for lack of room, as leases and local VMs
    /// contend.
    pub refusals: u64,
    /// Leases dropped because nobody committed, released or renewed them in time.
    pub expiries: u64,
    pub granter_crashes: u64,
    /// Placed VMs booked again from what runs when their granter restarted.
    pub rebooked: u64,
    pub holder_crashes: u64,
    /// Holder crashes between sending a commit and hearing its answer.
    pub crashes_mid_commit: u64,
    pub lost: u64,
    pub partitions: u64,
    /// Messages a partition stopped.
    pub cut: u64,
    /// Requests that found their granter down.
    pub unreachable: u64,
    pub failed_saves: u64,
    /// Local growth refused because leases and other VMs held the room.
    pub local_refusals: u64,
    pub local_resizes: u64,
    pub commits: u64,
}

/// What the storm injects; the rest happens in a healthy fleet too.
const FAULTS: [&str; 7] = [
    "granter_crashes",
    "holder_crashes",
    "lost",
    "partitions",
    "cut",
    "unreachable",
    "failed_saves",
];

impl Counts {
    fn named(&self) -> [(&'static str, u64); 14] {
        [
            ("refusals", self.refusals),
            ("expiries", self.expiries),
            ("granter_crashes", self.granter_crashes),
            ("rebooked", self.rebooked),
            ("holder_crashes", self.holder_crashes),
            ("crashes_mid_commit", self.crashes_mid_commit),
            ("lost", self.lost),
            ("partitions", self.partitions),
            ("cut", self.cut),
            ("unreachable", self.unreachable),
            ("failed_saves", self.failed_saves),
            ("local_refusals", self.local_refusals),
            ("local_resizes", self.local_resizes),
            ("commits", self.commits),
        ]
    }

    /// The faults that happened since `before`.
    pub fn faults_since(&self, before: &Counts) -> Vec<&'static str> {
        self.named()
            .into_iter()
            .zip(before.named())
            .filter(|((name, now), (_, then))| FAULTS.contains(name) && now != then)
            .map(|((name, _), _)| name)
            .collect()
    }

    /// The counters still at zero: a run where one is has not tested what it claims.
    pub fn missing(&self) -> Vec<&'static str> {
        self.named()
            .into_iter()
            .filter(|(_, n)| *n == 0)
            .map(|(name, _)| name)
            .collect()
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let named = self.named().map(|(name, n)| format!("{name}={n}"));
        write!(f, "{}", named.join(" "))
    }
}

pub enum Event {
    Served {
        host: usize,
        holder: usize,
        request: LeaseRequest,
        response: LeaseResponse,
    },
    Answered {
        holder: usize,
        host: usize,
        response: LeaseResponse,
    },
    SaveFailed {
        host: usize,
    },
    Expired {
        host: usize,
        leases: usize,
    },
    GranterCrashed {
        host: usize,
    },
    GranterRestarted {
        host: usize,
        rebooked: usize,
    },
    HolderCrashed {
        holder: usize,
    },
    HolderRevived {
        holder: usize,
    },
    Partitioned {
        holder: Option<usize>,
        host: Option<usize>,
        until: u64,
    },
    Resized {
        host: usize,
        vm: String,
        to: Resources,
        refused: bool,
    },
    Healed,
}

impl Event {
    fn involves(&self, subject: Subject) -> bool {
        use Event::*;
        let (host, holder) = match *self {
            Served { host, holder, .. } | Answered { holder, host, .. } => {
                (Some(host), Some(holder))
            }
            SaveFailed { host }
            | Expired { host, .. }
            | GranterCrashed { host }
            | GranterRestarted { host, .. }
            | Resized { host, .. } => (Some(host), None),
            HolderCrashed { holder } | HolderRevived { holder } => (None, Some(holder)),
            Partitioned { holder, host, .. } => (host, holder),
            Healed => return true,
        };
        let matches = |ours: Option<usize>, theirs: Option<usize>| ours.is_some() && ours == theirs;
        subject.host.is_none() && subject.holder.is_none()
            || matches(host, subject.host)
            || matches(holder, subject.holder)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Event::*;
        match self {
            Served {
                host,
                holder,
                request,
                response,
            } => write!(
                f,
                "host {host} serves holder {holder}: {} -> {}",
                Request(request),
                Response(response)
            ),
            Answered {
                holder,
                host,
                response,
            } => write!(
                f,
                "holder {holder} hears from host {host}: {}",
                Response(response)
            ),
            SaveFailed { host } => write!(f, "host {host} fails to save its ledger"),
            Expired { host, leases } => write!(f, "host {host} expires {leases} lease(s)"),
            GranterCrashed { host } => write!(f, "host {host} crashes"),
            GranterRestarted { host, rebooked } => {
                write!(
                    f,
                    "host {host} restarts, books {rebooked} placed VM(s) again"
                )
            }
            HolderCrashed { holder } => write!(f, "holder {holder} crashes"),
            HolderRevived { holder } => write!(f, "holder {holder} comes back"),
            Partitioned {
                holder,
                host,
                until,
            } => {
                write!(
                    f,
                    "partition of holder {holder:?} from host {host:?} until {until}"
                )
            }
            Resized {
                host,
                vm,
                to,
                refused,
            } => {
                let outcome = if *refused { "refused" } else { "done" };
                write!(f, "host {host} resizes {vm} to {to}: {outcome}")
            }
            Healed => write!(f, "the network heals; every host and holder is back"),
        }
    }
}

struct Request<'a>(&'a LeaseRequest);

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            LeaseRequest::Reserve { vm, resources, .. } => {
                write!(f, "reserve {resources} for {vm}")
            }
            LeaseRequest::Renew { id, .. } => write!(f, "renew #{id}"),
            LeaseRequest::Commit { id } => write!(f, "commit #{id}"),
            LeaseRequest::Release { id } => write!(f, "release #{id}"),
        }
    }
}

struct Response<'a>(&'a LeaseResponse);

impl fmt::Display for Response<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            LeaseResponse::Granted(l) => write!(f, "granted #{} until {}", l.id, l.expires_at_ms),
            LeaseResponse::Renewed(l) => write!(f, "renewed #{} until {}", l.id, l.expires_at_ms),
            LeaseResponse::Committed(l) => write!(f, "committed #{} for {}", l.id, l.vm),
            LeaseResponse::Released => write!(f, "released"),
            LeaseResponse::Refused { reason, .. } => write!(f, "refused: {reason}"),
            LeaseResponse::Unknown { id } => write!(f, "unknown #{id}"),
            LeaseResponse::Invalid { reason } => write!(f, "invalid: {reason}"),
        }
    }
}

/// Which host and holder a violation is about, to pick the events worth showing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Subject {
    pub host: Option<usize>,
    pub holder: Option<usize>,
}

/// An invariant that did not hold.
#[derive(Debug)]
pub struct Violation {
    pub what: String,
    pub about: Subject,
}

impl Violation {
    pub fn new(what: String, host: Option<usize>, holder: Option<usize>) -> Violation {
        Violation {
            what,
            about: Subject { host, holder },
        }
    }
}

/// The last events of a run.
#[derive(Default)]
pub struct Timeline {
    events: VecDeque<(u64, Event)>,
}

/// Enough history to find the last events of one host or holder among all the others.
const KEPT: usize = 4000;
const SHOWN: usize = 30;

impl Timeline {
    pub fn push(&mut self, now: u64, event: Event) {
        if self.events.len() == KEPT {
            self.events.pop_front();
        }
        self.events.push_back((now, event));
    }

    /// The last events that involve `about`, oldest first.
    pub fn tail(&self, about: Subject) -> String {
        let mut shown: Vec<String> = self
            .events
            .iter()
            .rev()
            .filter(|(_, event)| event.involves(about))
            .take(SHOWN)
            .map(|(t, event)| format!("  t={t} {event}"))
            .collect();
        shown.reverse();
        shown.join("\n")
    }
}
