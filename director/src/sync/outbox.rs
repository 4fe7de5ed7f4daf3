//! What is waiting to be sent to the peer: batching, a rate bound and coalescing. Pure, driven by `now`.
//!
//! - **Coalescing.** Records are keyed by connection (or template): a newer record of a connection that is
//!   still waiting replaces the older one in place (it keeps its position and its age), so however fast a
//!   connection changes, the queue holds at most one record per connection, and the latest state wins.
//! - **Rate bound.** A token bucket of `max_rate` records per second (burst: 100 ms worth, at least one
//!   frame). When the changes come faster than that, they wait here and coalesce.
//! - **Batching.** A frame goes out when `batch_records` are waiting or the oldest has waited `batch_interval`.
//! - **Age.** Each record's remaining timeout is reduced by the time it waited here, so the peer installs
//!   the deadline the sender had, not a later one.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::record::{RecordKey, SyncRecord};

/// Waiting-room capacity kept when the outbox empties.
const SHRINK_ABOVE: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxConfig {
    /// Most records per frame.
    pub batch_records: usize,
    /// Longest a record waits for a frame to fill.
    pub batch_interval: Duration,
    /// Records per second, at most.
    pub max_rate: u32,
}

#[derive(Debug)]
struct Pending {
    record: SyncRecord,
    since: Instant,
}

/// See the [module documentation](self).
#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    pending: HashMap<RecordKey, Pending>,
    order: VecDeque<RecordKey>,
    tokens: f64,
    burst: f64,
    refilled: Instant,
    /// Keys queued (not counting coalesced records) and keys sent, since the start.
    queued: u64,
    sent: u64,
    coalesced: u64,
}

impl Outbox {
    pub fn new(config: OutboxConfig, now: Instant) -> Outbox {
        let config = OutboxConfig {
            batch_records: config.batch_records.clamp(1, super::frame::MAX_RECORDS),
            max_rate: config.max_rate.max(1),
            ..config
        };
        let burst = (f64::from(config.max_rate) / 10.0).max(config.batch_records as f64);
        Outbox {
            config,
            pending: HashMap::new(),
            order: VecDeque::new(),
            tokens: burst,
            burst,
            refilled: now,
            queued: 0,
            sent: 0,
            coalesced: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Records replaced by a newer record of the same connection before they were sent.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// A marker: once [`sent_mark`](Self::sent_mark) reaches it, everything queued before now has been sent.
    pub fn queued_mark(&self) -> u64 {
        self.queued
    }

    pub fn sent_mark(&self) -> u64 {
        self.sent
    }

    pub fn push(&mut self, record: SyncRecord, now: Instant) {
        let key = record.key();
        match self.pending.get_mut(&key) {
            Some(waiting) => {
                waiting.record = record;
                self.coalesced += 1;
            }
            None => {
                self.pending.insert(key, Pending { record, since: now });
                self.order.push_back(key);
                self.queued += 1;
            }
        }
    }

    /// How long the oldest waiting record has waited.
    pub fn lag(&self, now: Instant) -> Duration {
        self.order
            .front()
            .and_then(|key| self.pending.get(key))
            .map_or(Duration::ZERO, |p| now.saturating_duration_since(p.since))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(self.config.max_rate)).min(self.burst);
        self.refilled = now;
    }

    /// The next frame's records, when one is due and the rate allows; `None` otherwise.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<SyncRecord>> {
        self.refill(now);
        let due = self.order.len() >= self.config.batch_records || self.lag(now) >= self.config.batch_interval;
        let allowed = (self.tokens.floor() as usize).min(self.config.batch_records).min(self.order.len());
        if !due || allowed == 0 {
            return None;
        }
        self.tokens -= allowed as f64;
        let mut records = Vec::with_capacity(allowed);
        for key in self.order.drain(..allowed) {
            if let Some(Pending { mut record, since }) = self.pending.remove(&key) {
                let waited = now.saturating_duration_since(since).as_millis();
                record.remaining_ms = record.remaining_ms.saturating_sub(waited.min(u128::from(u32::MAX)) as u32);
                records.push(record);
            }
        }
        self.sent += records.len() as u64;
        if self.order.is_empty() && self.pending.capacity() > SHRINK_ABOVE {
            // After a full-table dump: give the memory back rather than keep a million slots for good.
            self.pending.shrink_to(SHRINK_ABOVE);
            self.order.shrink_to(SHRINK_ABOVE);
        }
        Some(records)
    }

    /// When [`poll`](Self::poll) may next have a frame (`None`: nothing waiting).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let oldest = self.order.front().and_then(|key| self.pending.get(key))?.since;
        let filled =
            if self.order.len() >= self.config.batch_records { now } else { oldest + self.config.batch_interval };
        let tokens_at = if self.tokens >= 1.0 {
            now
        } else {
            now + Duration::from_secs_f64((1.0 - self.tokens) / f64::from(self.config.max_rate))
        };
        Some(filled.max(tokens_at))
    }

    /// Forgets everything waiting (the connection to the peer is gone; a new one starts with a full table)
    /// and returns how many records that was.
    pub fn clear(&mut self) -> usize {
        let dropped = self.order.len();
        self.pending.clear();
        self.order.clear();
        self.sent = self.queued;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::ConnState;
    use crate::sync::record::{sample, RecordKind};

    fn config(batch_records: usize, max_rate: u32) -> OutboxConfig {
        OutboxConfig { batch_records, batch_interval: Duration::from_millis(10), max_rate }
    }

    #[test]
    fn a_frame_goes_when_full_or_when_the_oldest_has_waited() {
        let t0 = Instant::now();
        let mut outbox = Outbox::new(config(3, 100_000), t0);
        outbox.push(sample(RecordKind::New, 1, ConnState::SynRecv), t0);
        outbox.push(sample(RecordKind::New, 2, ConnState::SynRecv), t0);
        assert_eq!(outbox.poll(t0 + Duration::from_millis(5)), None, "neither full nor old enough");
        assert_eq!(outbox.next_due(t0), Some(t0 + Duration::from_millis(10)));
        outbox.push(sample(RecordKind::New, 3, ConnState::SynRecv), t0);
        let frame = outbox.poll(t0 + Duration::from_millis(5)).expect("full");
        assert_eq!(frame.iter().map(|r| r.client.octets()[3]).collect::<Vec<_>>(), [1, 2, 3], "in order");
        assert_eq!(frame[0].remaining_ms, 900_000 - 5, "aged by the wait");

        outbox.push(sample(RecordKind::Closed, 4, ConnState::Close), t0 + Duration::from_millis(20));
        assert_eq!(outbox.poll(t0 + Duration::from_millis(29)), None);
        assert_eq!(outbox.poll(t0 + Duration::from_millis(30)).map(|f| f.len()), Some(1));
        assert!(outbox.is_empty());
        assert_eq!(outbox.next_due(t0), None);
    }

    #[test]
    fn the_latest_state_of_a_connection_wins_and_keeps_its_place() {
        let t0 = Instant::now();
        let mut outbox = Outbox::new(config(10, 100_000), t0);
        outbox.push(sample(RecordKind::New, 1, ConnState::SynRecv), t0);
        outbox.push(sample(RecordKind::New, 2, ConnState::SynRecv), t0);
        outbox.push(sample(RecordKind::Update, 1, ConnState::Established), t0);
        outbox.push(sample(RecordKind::Closed, 1, ConnState::TimeWait), t0);
        // A template of the same client is another key.
        outbox.push(sample(RecordKind::Template, 1, ConnState::None), t0);
        assert_eq!((outbox.len(), outbox.coalesced()), (3, 2));
        let frame = outbox.poll(t0 + Duration::from_millis(10)).unwrap();
        assert_eq!(
            frame.iter().map(|r| (r.client.octets()[3], r.kind)).collect::<Vec<_>>(),
            [(1, RecordKind::Closed), (2, RecordKind::New), (1, RecordKind::Template)]
        );
    }

    #[test]
    fn the_rate_bound_holds_and_changes_coalesce_meanwhile() {
        let t0 = Instant::now();
        // 1000 records/s, burst max(100, 50) = 100.
        let mut outbox = Outbox::new(config(50, 1000), t0);
        let mut sent = 0;
        let mut now = t0;
        // 1 s of 300 connections each changing every millisecond.
        for ms in 0..1000u64 {
            now = t0 + Duration::from_millis(ms);
            for client in 0..300u16 {
                let mut record = sample(RecordKind::Update, (client % 250) as u8, ConnState::Established);
                record.client_port = client;
                outbox.push(record, now);
            }
            while let Some(frame) = outbox.poll(now) {
                assert!(frame.len() <= 50);
                sent += frame.len();
            }
        }
        // At most the burst plus one second at the rate; 300 000 changes collapsed into that.
        assert!(sent <= 100 + 1000, "{sent}");
        assert!(sent >= 1000, "{sent}: the budget is used");
        assert!(outbox.len() <= 300);
        assert!(outbox.coalesced() > 290_000);
        // With no new changes the backlog drains at the rate.
        let next = outbox.next_due(now).unwrap();
        assert!(next > now && next <= now + Duration::from_millis(50), "{:?}", next - now);
    }

    #[test]
    fn marks_tell_when_everything_queued_earlier_is_sent() {
        let t0 = Instant::now();
        let mut outbox = Outbox::new(config(2, 100_000), t0);
        for i in 0..5 {
            outbox.push(sample(RecordKind::Update, i, ConnState::Established), t0);
        }
        let mark = outbox.queued_mark();
        outbox.push(sample(RecordKind::Update, 1, ConnState::FinWait), t0);
        assert_eq!(outbox.queued_mark(), mark, "coalesced: no new key");
        let later = t0 + Duration::from_millis(10);
        while outbox.sent_mark() < mark {
            assert!(outbox.poll(later).is_some());
        }
        assert!(outbox.is_empty());
        outbox.push(sample(RecordKind::Update, 9, ConnState::Established), t0);
        assert_eq!(outbox.clear(), 1);
        assert_eq!(outbox.sent_mark(), outbox.queued_mark());
    }
}
