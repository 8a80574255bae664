//! A holder: one VM that wants a place on some granter, and the host that places it,
//! which may crash and come back with only what it had saved.

use crate::rng::Rng;
use vmhost_api::Resources;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_capacity::ledger::LeaseId;

pub const TTL_MS: u64 = 5_000;
const RENEW_EVERY_MS: u64 = 1_000;
const REPLY_WAIT_MS: u64 = 1_000;
const COMMIT_RETRY_MS: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    /// Wants a place; asks again at `retry_at`.
    Searching {
        retry_at: u64,
    },
    /// Asked `host`; gives up on it at `deadline`.
    Reserving {
        host: usize,
        deadline: u64,
    },
    /// Holds a lease; commits at `commit_at` (renewing meanwhile), or releases it.
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
    /// Down; on restart it resumes what it had saved: a commit in progress or a placement.
    /// Anything earlier is forgotten and its lease must expire.
    Crashed {
        saved: Option<Saved>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Saved {
    Committing { host: usize, id: LeaseId },
    Placed { host: usize },
}

pub struct Holder {
    pub vm: String,
    pub resources: Resources,
    pub state: State,
}

/// A request a holder sends to granter `.0`.
pub type Outgoing = Option<(usize, LeaseRequest)>;

impl Holder {
    pub fn new(index: usize, rng: &mut Rng, storm_ms: u64) -> Holder {
        Holder {
            vm: format!("vm{index}"),
            resources: Resources {
                vcpus: 1 + rng.below(4) as u32,
                memory_bytes: (1 + rng.below(8)) * crate::granter::GIB,
            },
            state: State::Searching {
                retry_at: rng.below(storm_ms / 2),
            },
        }
    }

    /// Where the VM runs, as far as this holder knows (also while it is down).
    pub fn placed_on(&self) -> Option<usize> {
        match self.state {
            State::Placed { host }
            | State::Crashed {
                saved: Some(Saved::Placed { host }),
            } => Some(host),
            _ => None,
        }
    }

    /// The host a commit may have reached, its answer not yet heard.
    pub fn committing_on(&self) -> Option<usize> {
        match self.state {
            State::Committing { host, .. }
            | State::Crashed {
                saved: Some(Saved::Committing { host, .. }),
            } => Some(host),
            _ => None,
        }
    }

    /// Returns whether it was up.
    pub fn crash(&mut self) -> bool {
        let saved = match self.state {
            State::Crashed { .. } => return false,
            State::Committing { host, id, .. } => Some(Saved::Committing { host, id }),
            State::Placed { host } => Some(Saved::Placed { host }),
            _ => None,
        };
        self.state = State::Crashed { saved };
        true
    }

    /// Returns whether it was down.
    pub fn revive(&mut self, now: u64) -> bool {
        let State::Crashed { saved } = self.state else {
            return false;
        };
        self.state = match saved {
            Some(Saved::Committing { host, id }) => State::Committing {
                host,
                id,
                deadline: now,
            },
            Some(Saved::Placed { host }) => State::Placed { host },
            None => State::Searching { retry_at: now },
        };
        true
    }

    /// Acts on an answer from `host`; answers are matched by host and lease, because a late
    /// one about an older lease must not move the holder.
    pub fn on_response(
        &mut self,
        host: usize,
        response: LeaseResponse,
        now: u64,
        rng: &mut Rng,
    ) -> Outgoing {
        use LeaseResponse::*;
        let next = match (self.state, response) {
            (State::Crashed { .. }, _) => return None,
            (State::Reserving { host: asked, .. }, Granted(lease)) if asked == host => {
                State::Holding {
                    host,
                    id: lease.id,
                    commit_at: now + rng.below(2 * TTL_MS),
                    release: rng.chance(200_000),
                }
            }
            // A grant nobody waits for any more (late, or from a host given up on): hand it back.
            (_, Granted(lease)) => return Some((host, LeaseRequest::Release { id: lease.id })),
            (State::Reserving { host: asked, .. }, Refused { .. }) if asked == host => {
                State::Searching {
                    retry_at: now + rng.below(1000),
                }
            }
            (
                State::Committing {
                    host: asked, id, ..
                },
                Committed(lease),
            ) if asked == host && lease.id == id => State::Placed { host },
            // The lease ended before the commit: start over.
            (
                State::Committing {
                    host: asked, id, ..
                }
                | State::Holding {
                    host: asked, id, ..
                },
                Unknown { id: gone },
            ) if asked == host && gone == id => State::Searching { retry_at: now },
            _ => return None,
        };
        self.state = next;
        None
    }

    /// What the holder does at `now`; new reservations only while `searching`.
    pub fn act(
        &mut self,
        index: usize,
        now: u64,
        searching: bool,
        hosts: usize,
        rng: &mut Rng,
    ) -> Outgoing {
        match self.state {
            State::Searching { retry_at } if now >= retry_at && searching => {
                let host = rng.below(hosts as u64) as usize;
                self.state = State::Reserving {
                    host,
                    deadline: now + REPLY_WAIT_MS,
                };
                let request = LeaseRequest::Reserve {
                    vm: self.vm.clone(),
                    holder: format!("holder{index}"),
                    resources: self.resources,
                    ttl_ms: TTL_MS,
                };
                Some((host, request))
            }
            State::Reserving { deadline, .. } if now >= deadline => {
                self.state = State::Searching { retry_at: now };
                None
            }
            State::Holding {
                host,
                id,
                release: true,
                ..
            } => {
                self.state = State::Searching {
                    retry_at: now + TTL_MS,
                };
                Some((host, LeaseRequest::Release { id }))
            }
            State::Holding {
                host,
                id,
                commit_at,
                ..
            } if now >= commit_at => self.commit(host, id, now),
            State::Holding { host, id, .. } if now.is_multiple_of(RENEW_EVERY_MS) => {
                let ttl_ms = TTL_MS;
                Some((host, LeaseRequest::Renew { id, ttl_ms }))
            }
            // Commits are idempotent, so a lost reply is simply asked again.
            State::Committing { host, id, deadline } if now >= deadline => {
                self.commit(host, id, now)
            }
            _ => None,
        }
    }

    fn commit(&mut self, host: usize, id: LeaseId, now: u64) -> Outgoing {
        self.state = State::Committing {
            host,
            id,
            deadline: now + COMMIT_RETRY_MS,
        };
        Some((host, LeaseRequest::Commit { id }))
    }
}
