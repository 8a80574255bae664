//! The fleet: granters, holders and the network between them, advanced in fixed steps, with
//! faults injected while the storm lasts.

use crate::checks;
use crate::granter::{Glue, Granter, UNSAVED};
use crate::holder::{Holder, Outgoing, State};
use crate::network::{Message, Network, Partition, Payload};
use crate::record::{Counts, Event, Timeline, Violation};
use crate::rng::Rng;
use vmhost_capacity::lease::{self, LeaseRequest, LeaseResponse};

pub const HOSTS: usize = 50;
pub const HOLDERS: usize = 120;
pub const STEP_MS: u64 = 10;
pub const STORM_MS: u64 = 60_000;
/// How often a granter drops expired leases, as vmhostd's fleet tick does.
const EXPIRY_EVERY_MS: u64 = 1_000;

/// Chances per step, in millionths.
const GRANTER_CRASH: u64 = 300;
const GRANTER_RESTART: u64 = 20_000;
const HOLDER_CRASH: u64 = 4_000;
const CRASH_AFTER_COMMIT: u64 = 100_000;
const HOLDER_REVIVE: u64 = 2_000;
const PARTITION: u64 = 5_000;
const PARTITION_MAX_MS: u64 = 20_000;
const FAILED_SAVE: u64 = 30_000;
const LOCAL_RESIZE: u64 = 20_000;

pub struct Sim {
    rng: Rng,
    pub now: u64,
    pub granters: Vec<Granter>,
    pub holders: Vec<Holder>,
    network: Network,
    /// While true, partitions start, hosts crash and saves fail.
    stormy: bool,
    glue: Glue,
    pub counts: Counts,
    pub timeline: Timeline,
}

impl Sim {
    pub fn new(seed: u64, glue: Glue) -> Sim {
        let mut rng = Rng::new(seed);
        let granters = (0..HOSTS).map(|i| Granter::new(i, &mut rng)).collect();
        let holders = (0..HOLDERS)
            .map(|i| Holder::new(i, &mut rng, STORM_MS))
            .collect();
        Sim {
            rng,
            now: 0,
            granters,
            holders,
            network: Network::new(),
            stormy: true,
            glue,
            counts: Counts::default(),
            timeline: Timeline::default(),
        }
    }

    pub fn step(&mut self) -> Result<(), Violation> {
        self.now += STEP_MS;
        if self.stormy {
            self.faults();
        }
        for message in self.network.due(self.now) {
            self.deliver(message);
        }
        for host in 0..HOSTS {
            self.run_host(host);
        }
        for holder in 0..HOLDERS {
            let searching = self.stormy;
            let (now, rng) = (self.now, &mut self.rng);
            let outgoing = self.holders[holder].act(holder, now, searching, HOSTS, rng);
            let commits = matches!(outgoing, Some((_, LeaseRequest::Commit { .. })));
            self.send(holder, outgoing);
            // The answer to a commit is the one a holder most needs: crash before it arrives.
            if commits && self.stormy && self.rng.chance(CRASH_AFTER_COMMIT) {
                self.crash_holder(holder);
            }
        }
        let changed: Vec<usize> = (0..HOSTS)
            .filter(|&host| self.granters[host].take_changed())
            .collect();
        checks::hosts(self, changed)?;
        checks::placements(self)
    }

    /// Ends the storm: no more faults, the network heals, every host and holder comes back.
    pub fn heal(&mut self) {
        self.stormy = false;
        self.network.heal();
        self.timeline.push(self.now, Event::Healed);
        for host in 0..HOSTS {
            if !self.granters[host].is_up() {
                self.restart(host);
            }
        }
        for holder in 0..HOLDERS {
            self.holders[holder].revive(self.now);
        }
    }

    fn faults(&mut self) {
        for host in 0..HOSTS {
            let up = self.granters[host].is_up();
            if up && self.rng.chance(GRANTER_CRASH) {
                self.granters[host].crash();
                self.counts.granter_crashes += 1;
                self.timeline.push(self.now, Event::GranterCrashed { host });
            } else if !up && self.rng.chance(GRANTER_RESTART) {
                self.restart(host);
            }
        }
        if self.rng.chance(PARTITION) {
            let holder = self.rng.below(HOLDERS as u64) as usize;
            let host = self.rng.below(HOSTS as u64) as usize;
            // A host cut off from everyone, a holder cut off, or one link.
            let (holder, host) = match self.rng.below(3) {
                0 => (None, Some(host)),
                1 => (Some(holder), None),
                _ => (Some(holder), Some(host)),
            };
            let until = self.now + self.rng.below(PARTITION_MAX_MS);
            let partition = Partition {
                holder,
                host,
                until,
            };
            self.network.partition(partition, self.now);
            self.counts.partitions += 1;
            let event = Event::Partitioned {
                holder,
                host,
                until,
            };
            self.timeline.push(self.now, event);
        }
        if self.rng.chance(HOLDER_CRASH) {
            let holder = self.crash_victim();
            self.crash_holder(holder);
        }
        if self.rng.chance(HOLDER_REVIVE) {
            let holder = self.rng.below(HOLDERS as u64) as usize;
            if self.holders[holder].revive(self.now) {
                self.timeline
                    .push(self.now, Event::HolderRevived { holder });
            }
        }
    }

    /// Any holder, or one holding a lease: that window is short, and only a crash inside
    /// it shows that a forgotten lease expires.
    fn crash_victim(&mut self) -> usize {
        let holding: Vec<usize> = (0..HOLDERS)
            .filter(|&h| matches!(self.holders[h].state, State::Holding { .. }))
            .collect();
        if holding.is_empty() || self.rng.chance(500_000) {
            return self.rng.below(HOLDERS as u64) as usize;
        }
        holding[self.rng.below(holding.len() as u64) as usize]
    }

    fn crash_holder(&mut self, holder: usize) {
        let committing = self.holders[holder].committing_on().is_some();
        if self.holders[holder].crash() {
            self.counts.holder_crashes += 1;
            self.counts.crashes_mid_commit += u64::from(committing);
            self.timeline
                .push(self.now, Event::HolderCrashed { holder });
        }
    }

    fn restart(&mut self, host: usize) {
        let rebooked = self.granters[host].restart();
        self.counts.rebooked += rebooked as u64;
        let event = Event::GranterRestarted { host, rebooked };
        self.timeline.push(self.now, event);
    }

    /// Whether a save would succeed now.
    fn saves(&mut self) -> bool {
        !(self.stormy && self.rng.chance(FAILED_SAVE))
    }

    fn save_failed(&mut self, host: usize) {
        self.counts.failed_saves += 1;
        self.timeline.push(self.now, Event::SaveFailed { host });
    }

    /// The host's own work: its expiry tick and its local VMs' autoscaling.
    fn run_host(&mut self, host: usize) {
        if !self.granters[host].is_up() {
            return;
        }
        if self.now.is_multiple_of(EXPIRY_EVERY_MS) {
            let saves = self.saves();
            let leases = self.granters[host].expire(self.now, saves);
            if leases > 0 && !saves {
                self.save_failed(host);
            }
            self.expired(host, leases);
        }
        if self.rng.chance(LOCAL_RESIZE) {
            let (vm, to, refused) = self.granters[host].autoscale(&mut self.rng);
            self.counts.local_resizes += u64::from(!refused);
            self.counts.local_refusals += u64::from(refused);
            let event = Event::Resized {
                host,
                vm,
                to,
                refused,
            };
            self.timeline.push(self.now, event);
        }
    }

    fn send(&mut self, holder: usize, outgoing: Outgoing) {
        if let Some((host, request)) = outgoing {
            let payload = Payload::Request(lease::encode(&request));
            self.transmit(holder, host, payload);
        }
    }

    fn transmit(&mut self, holder: usize, host: usize, payload: Payload) {
        let (rng, counts) = (&mut self.rng, &mut self.counts);
        self.network
            .send(rng, counts, self.now, (holder, host), payload);
    }

    fn deliver(&mut self, message: Message) {
        let (holder, host) = (message.holder, message.host);
        match message.payload {
            Payload::Request(_) if !self.granters[host].is_up() => self.counts.unreachable += 1,
            Payload::Request(bytes) => {
                let saves = self.saves();
                let served = self.granters[host].serve(holder, &bytes, self.now, saves, self.glue);
                if served.save_failed {
                    self.save_failed(host);
                }
                self.expired(host, served.expired);
                self.count(&served.response);
                let payload = Payload::Response(lease::encode(&served.response));
                let event = Event::Served {
                    host,
                    holder,
                    request: served.request,
                    response: served.response,
                };
                self.timeline.push(self.now, event);
                self.transmit(holder, host, payload);
            }
            Payload::Response(bytes) => {
                let response: LeaseResponse = postcard::from_bytes(&bytes).expect("answers decode");
                let event = Event::Answered {
                    holder,
                    host,
                    response: response.clone(),
                };
                self.timeline.push(self.now, event);
                let (now, rng) = (self.now, &mut self.rng);
                let outgoing = self.holders[holder].on_response(host, response, now, rng);
                self.send(holder, outgoing);
            }
        }
    }

    fn expired(&mut self, host: usize, leases: usize) {
        if leases > 0 {
            self.counts.expiries += leases as u64;
            self.timeline
                .push(self.now, Event::Expired { host, leases });
        }
    }

    fn count(&mut self, response: &LeaseResponse) {
        match response {
            LeaseResponse::Refused { reason, .. } if reason != UNSAVED => self.counts.refusals += 1,
            LeaseResponse::Committed(_) => self.counts.commits += 1,
            _ => {}
        }
    }
}
