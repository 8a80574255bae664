//! The network between holders and granters: delay, loss and partitions.

use crate::record::Counts;
use crate::rng::Rng;

pub enum Payload {
    Request(Vec<u8>),
    Response(Vec<u8>),
}

pub struct Message {
    pub deliver_at: u64,
    pub holder: usize,
    pub host: usize,
    pub payload: Payload,
}

/// Cuts a holder, a granter, or one pair of them off until `until`.
pub struct Partition {
    pub holder: Option<usize>,
    pub host: Option<usize>,
    pub until: u64,
}

impl Partition {
    fn cuts(&self, holder: usize, host: usize, now: u64) -> bool {
        now < self.until
            && self.holder.is_none_or(|h| h == holder)
            && self.host.is_none_or(|h| h == host)
    }
}

pub const LOSS_PER_MILLION: u64 = 50_000;
pub const MAX_DELAY_MS: u64 = 200;

pub struct Network {
    in_flight: Vec<Message>,
    partitions: Vec<Partition>,
    loss_per_million: u64,
}

impl Network {
    pub fn new() -> Network {
        Network {
            in_flight: Vec::new(),
            partitions: Vec::new(),
            loss_per_million: LOSS_PER_MILLION,
        }
    }

    pub fn send(
        &mut self,
        rng: &mut Rng,
        counts: &mut Counts,
        now: u64,
        (holder, host): (usize, usize),
        payload: Payload,
    ) {
        if self.partitions.iter().any(|p| p.cuts(holder, host, now)) {
            counts.cut += 1;
            return;
        }
        if rng.chance(self.loss_per_million) {
            counts.lost += 1;
            return;
        }
        self.in_flight.push(Message {
            deliver_at: now + 1 + rng.below(MAX_DELAY_MS),
            holder,
            host,
            payload,
        });
    }

    /// The messages due by `now`, in the order they were sent.
    pub fn due(&mut self, now: u64) -> Vec<Message> {
        let (due, later) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|m| m.deliver_at <= now);
        self.in_flight = later;
        due
    }

    pub fn partition(&mut self, partition: Partition, now: u64) {
        self.partitions.retain(|p| now < p.until);
        self.partitions.push(partition);
    }

    /// Ends every partition and all loss; what is in flight still arrives.
    pub fn heal(&mut self) {
        self.partitions.clear();
        self.loss_per_million = 0;
    }
}
