//! Deterministic simulation of lease traffic across a fleet: real ledgers and the real
//! granter logic (`lease::serve`), over a simulated network with delay, loss and
//! partitions, with granters that crash and restart from their persisted ledger and holders
//! that crash for good. Seeded, so a failure replays exactly.
//!
//! Checked after every step: no host has allocated + leased above capacity, and no VM is
//! allocated on two hosts. Checked at the end: every lease was committed, released or expired.
//!
//! `VMHOST_SIM_SEEDS=1000 cargo test -p vmhost-capacity --test lease_simulation` runs more seeds.

use std::collections::{BTreeMap, BTreeSet};
use vmhost_api::Resources;
use vmhost_capacity::lease::{self, LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::{LeaseId, Ledger};

const HOSTS: usize = 50;
const HOLDERS: usize = 120;
const STEP_MS: u64 = 10;
const STORM_MS: u64 = 60_000;
const TTL_MS: u64 = 5_000;
const GIB: u64 = 1 << 30;

/// xorshift64*: a seeded generator, so every run of a seed is the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

struct Host {
    up: bool,
    /// What survives a crash: the ledger as last persisted (after every change).
    persisted: Vec<u8>,
    ledger: Option<Ledger>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HolderState {
    /// Wants `resources` placed somewhere; retries at `retry_at`.
    Searching {
        retry_at: u64,
    },
    /// Asked `host`; gives up on it at `deadline`.
    Reserving {
        host: usize,
        deadline: u64,
    },
    /// Holds a lease; will commit at `commit_at` (renewing meanwhile) or release it.
    Holding {
        host: usize,
        id: LeaseId,
        commit_at: u64,
        release: bool,
    },
    Committing {
        host: usize,
        id: LeaseId,
        deadline: u64,
    },
    Placed {
        host: usize,
    },
    /// Down; on restart it resumes what it had persisted: a commit in progress or a
    /// placement. Anything earlier is forgotten and its lease must expire.
    Crashed {
        persisted: Option<Persisted>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Persisted {
    Committing { host: usize, id: LeaseId },
    Placed { host: usize },
}

struct Holder {
    vm: String,
    resources: Resources,
    state: HolderState,
}

enum Payload {
    Request(Vec<u8>),
    Response(Vec<u8>),
}

struct Message {
    deliver_at: u64,
    holder: usize,
    host: usize,
    payload: Payload,
}

struct Sim {
    rng: Rng,
    now: u64,
    hosts: Vec<Host>,
    holders: Vec<Holder>,
    network: Vec<Message>,
    /// (holder, host) pairs that cannot talk until the given time.
    partitions: BTreeMap<(usize, usize), u64>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let hosts = (0..HOSTS)
            .map(|_| {
                let ledger = Ledger::new(Resources {
                    vcpus: 2 + rng.below(14) as u32,
                    memory_bytes: (2 + rng.below(30)) * GIB,
                });
                Host {
                    up: true,
                    persisted: lease::encode(&ledger),
                    ledger: Some(ledger),
                }
            })
            .collect();
        let holders = (0..HOLDERS)
            .map(|i| Holder {
                vm: format!("vm{i}"),
                resources: Resources {
                    vcpus: 1 + rng.below(4) as u32,
                    memory_bytes: (1 + rng.below(8)) * GIB,
                },
                state: HolderState::Searching {
                    retry_at: rng.below(STORM_MS / 2),
                },
            })
            .collect();
        Sim {
            rng,
            now: 0,
            hosts,
            holders,
            network: Vec::new(),
            partitions: BTreeMap::new(),
        }
    }

    fn send(&mut self, holder: usize, host: usize, payload: Payload) {
        let cut = self
            .partitions
            .get(&(holder, host))
            .is_some_and(|until| self.now < *until);
        // 5 % loss, and nothing crosses a partition.
        if cut || self.rng.chance(50_000) {
            return;
        }
        let deliver_at = self.now + 1 + self.rng.below(200);
        self.network.push(Message {
            deliver_at,
            holder,
            host,
            payload,
        });
    }

    fn request(&mut self, holder: usize, host: usize, request: LeaseRequest) {
        self.send(holder, host, Payload::Request(lease::encode(&request)));
    }

    fn step(&mut self, storm: bool) {
        self.now += STEP_MS;
        self.faults(storm);
        let (due, later): (Vec<Message>, Vec<Message>) = std::mem::take(&mut self.network)
            .into_iter()
            .partition(|m| m.deliver_at <= self.now);
        self.network = later;
        for message in due {
            self.deliver(message);
        }
        for holder in 0..self.holders.len() {
            self.act(holder, storm);
        }
        self.check_safety();
    }

    fn faults(&mut self, storm: bool) {
        if !storm {
            // After the storm the network heals, so liveness is judged on expiry alone.
            for host in &mut self.hosts {
                if !host.up {
                    host.up = true;
                    host.ledger = Some(postcard::from_bytes(&host.persisted).unwrap());
                }
            }
            return;
        }
        for i in 0..self.hosts.len() {
            let host = &mut self.hosts[i];
            if host.up && self.rng.chance(300) {
                host.up = false;
                host.ledger = None;
            } else if !host.up && self.rng.chance(20_000) {
                host.up = true;
                host.ledger = Some(postcard::from_bytes(&host.persisted).unwrap());
            }
        }
        if self.rng.chance(50_000) {
            let pair = (
                self.rng.below(HOLDERS as u64) as usize,
                self.rng.below(HOSTS as u64) as usize,
            );
            let until = self.now + self.rng.below(20_000);
            self.partitions.insert(pair, until);
        }
        if self.rng.chance(2_000) {
            let victim = self.rng.below(HOLDERS as u64) as usize;
            let persisted = match self.holders[victim].state {
                HolderState::Committing { host, id, .. } => {
                    Some(Persisted::Committing { host, id })
                }
                HolderState::Placed { host } => Some(Persisted::Placed { host }),
                HolderState::Crashed { persisted } => persisted,
                _ => None,
            };
            self.holders[victim].state = HolderState::Crashed { persisted };
        }
        if self.rng.chance(2_000) {
            let revived = self.rng.below(HOLDERS as u64) as usize;
            if let HolderState::Crashed { persisted } = self.holders[revived].state {
                self.holders[revived].state = match persisted {
                    Some(Persisted::Committing { host, id }) => HolderState::Committing {
                        host,
                        id,
                        deadline: self.now,
                    },
                    Some(Persisted::Placed { host }) => HolderState::Placed { host },
                    None => HolderState::Searching { retry_at: self.now },
                };
            }
        }
    }

    fn deliver(&mut self, message: Message) {
        match message.payload {
            Payload::Request(bytes) => {
                let host = &mut self.hosts[message.host];
                let Some(ledger) = host.ledger.as_mut().filter(|_| host.up) else {
                    return;
                };
                let response = match lease::decode_request(&bytes) {
                    Ok(request) => lease::serve(
                        ledger,
                        &format!("holder{}", message.holder),
                        request,
                        self.now,
                    ),
                    Err(reason) => LeaseResponse::Invalid { reason },
                };
                host.persisted = lease::encode(&*ledger);
                self.send(
                    message.holder,
                    message.host,
                    Payload::Response(lease::encode(&response)),
                );
            }
            Payload::Response(bytes) => {
                let response: LeaseResponse = postcard::from_bytes(&bytes).unwrap();
                self.on_response(message.holder, message.host, response);
            }
        }
    }

    fn on_response(&mut self, holder: usize, host: usize, response: LeaseResponse) {
        let now = self.now;
        let state = self.holders[holder].state;
        let next = match (state, response) {
            (HolderState::Crashed { .. }, _) => return,
            (HolderState::Reserving { host: asked, .. }, LeaseResponse::Granted(lease))
                if asked == host =>
            {
                HolderState::Holding {
                    host,
                    id: lease.id,
                    commit_at: now + self.rng.below(2 * TTL_MS),
                    release: self.rng.chance(200_000),
                }
            }
            // A grant nobody waits for any more (late, or from a host given up on): hand it back.
            (_, LeaseResponse::Granted(lease)) => {
                self.request(holder, host, LeaseRequest::Release { id: lease.id });
                return;
            }
            (HolderState::Reserving { host: asked, .. }, LeaseResponse::Refused { .. })
                if asked == host =>
            {
                HolderState::Searching {
                    retry_at: now + self.rng.below(1000),
                }
            }
            (HolderState::Committing { host: asked, .. }, LeaseResponse::Committed(_))
                if asked == host =>
            {
                HolderState::Placed { host }
            }
            // The lease expired before the commit: start over.
            (
                HolderState::Committing { host: asked, .. }
                | HolderState::Holding { host: asked, .. },
                LeaseResponse::Unknown { .. },
            ) if asked == host => HolderState::Searching { retry_at: now },
            _ => return,
        };
        self.holders[holder].state = next;
    }

    fn act(&mut self, holder: usize, storm: bool) {
        let now = self.now;
        let h = &self.holders[holder];
        let (vm, resources) = (h.vm.clone(), h.resources);
        match h.state {
            HolderState::Searching { retry_at } if now >= retry_at && storm => {
                let host = self.rng.below(HOSTS as u64) as usize;
                self.holders[holder].state = HolderState::Reserving {
                    host,
                    deadline: now + 1000,
                };
                self.request(
                    holder,
                    host,
                    LeaseRequest::Reserve {
                        vm,
                        holder: format!("holder{holder}"),
                        resources,
                        ttl_ms: TTL_MS,
                    },
                );
            }
            HolderState::Reserving { deadline, .. } if now >= deadline => {
                self.holders[holder].state = HolderState::Searching { retry_at: now };
            }
            HolderState::Holding {
                host,
                id,
                release: true,
                ..
            } => {
                self.request(holder, host, LeaseRequest::Release { id });
                self.holders[holder].state = HolderState::Searching {
                    retry_at: now + 5_000,
                };
            }
            HolderState::Holding {
                host,
                id,
                commit_at,
                ..
            } if now >= commit_at => {
                self.holders[holder].state = HolderState::Committing {
                    host,
                    id,
                    deadline: now + 500,
                };
                self.request(holder, host, LeaseRequest::Commit { id });
            }
            HolderState::Holding { host, id, .. } if now.is_multiple_of(1000) => {
                self.request(holder, host, LeaseRequest::Renew { id, ttl_ms: TTL_MS });
            }
            // Commits are idempotent, so a lost reply is simply asked again.
            HolderState::Committing { host, id, deadline } if now >= deadline => {
                self.holders[holder].state = HolderState::Committing {
                    host,
                    id,
                    deadline: now + 500,
                };
                self.request(holder, host, LeaseRequest::Commit { id });
            }
            _ => {}
        }
    }

    fn check_safety(&self) {
        let mut placed: BTreeMap<String, usize> = BTreeMap::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let restored;
            let ledger = match &host.ledger {
                Some(ledger) => ledger,
                None => {
                    restored = postcard::from_bytes::<Ledger>(&host.persisted).unwrap();
                    &restored
                }
            };
            assert!(
                ledger.committed().fits_in(ledger.capacity()),
                "t={} host {i}: allocated {} + leased {} exceeds {}",
                self.now,
                ledger.allocated(),
                ledger.leased(),
                ledger.capacity()
            );
            for (vm, _) in ledger.allocations() {
                if let Some(other) = placed.insert(vm.to_string(), i) {
                    panic!("t={} {vm} allocated on hosts {other} and {i}", self.now);
                }
            }
        }
    }
}

fn run(seed: u64) -> (usize, usize) {
    let mut sim = Sim::new(seed);
    while sim.now < STORM_MS {
        sim.step(true);
    }
    // Quiet period: no new reservations, the network heals; every lease must end by
    // commit, release or expiry within its TTL plus the longest message delay.
    while sim.now < STORM_MS + 3 * TTL_MS {
        sim.step(false);
    }
    for host in &mut sim.hosts {
        host.ledger.as_mut().unwrap().expire(sim.now);
    }
    let open: Vec<String> = sim
        .hosts
        .iter()
        .flat_map(|h| {
            h.ledger
                .as_ref()
                .unwrap()
                .leases()
                .map(|l| format!("{} for {}", l.id, l.vm))
        })
        .collect();
    assert!(open.is_empty(), "seed {seed}: leases never ended: {open:?}");
    let placed = sim
        .holders
        .iter()
        .filter(|h| matches!(h.state, HolderState::Placed { .. }))
        .count();
    let crashed = sim
        .holders
        .iter()
        .filter(|h| matches!(h.state, HolderState::Crashed { .. }))
        .count();
    let hosts_with_vms: BTreeSet<usize> = sim
        .holders
        .iter()
        .filter_map(|h| match h.state {
            HolderState::Placed { host } => Some(host),
            _ => None,
        })
        .collect();
    assert!(
        placed > 0 && !hosts_with_vms.is_empty(),
        "seed {seed}: nothing was ever placed"
    );
    (placed, crashed)
}

#[test]
fn fleet_never_overcommits_and_every_lease_ends() {
    let seeds: u64 = std::env::var("VMHOST_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    for seed in 0..seeds {
        let (placed, crashed) = run(seed);
        eprintln!("seed {seed}: {placed} VMs placed, {crashed} holders crashed");
    }
}
