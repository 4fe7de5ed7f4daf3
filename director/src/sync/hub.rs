//! Where the data-path workers and the sync task meet: per worker, one ring of outgoing changes and one of
//! records received from the peer, the full-table dump request, and counters read at scrape time.
//!
//! Nothing here locks or allocates after [`hub`] built it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::dataplane::steer::{worker_for_connection, Steering};

use super::record::SyncRecord;
use super::ring::{ring, Consumer, Producer};

/// Why a record was not sent or not installed (`fulcrum_sync_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum SyncDrop {
    /// A worker's outgoing ring was full: the change is lost until the connection's next change or refresh.
    RingFull,
    /// Changes made while no peer was connected (the peer asks for the full table when it connects).
    NoPeer,
    /// A received record names a service or real server this director does not have.
    UnknownService,
    /// A received record could not be installed (table full, or its reply key belongs to another entry).
    InstallFailed,
    /// A frame refused: bad MAC (wrong key, forged).
    Auth,
    /// A frame refused: replayed or out of sequence.
    Replay,
    /// A frame or record that does not parse.
    Malformed,
}

impl SyncDrop {
    pub const ALL: [SyncDrop; 7] = [
        SyncDrop::RingFull,
        SyncDrop::NoPeer,
        SyncDrop::UnknownService,
        SyncDrop::InstallFailed,
        SyncDrop::Auth,
        SyncDrop::Replay,
        SyncDrop::Malformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SyncDrop::RingFull => "ring_full",
            SyncDrop::NoPeer => "no_peer",
            SyncDrop::UnknownService => "unknown_service",
            SyncDrop::InstallFailed => "install_failed",
            SyncDrop::Auth => "auth",
            SyncDrop::Replay => "replay",
            SyncDrop::Malformed => "malformed",
        }
    }

    pub fn from_frame_reason(reason: &str) -> SyncDrop {
        match reason {
            "auth" => SyncDrop::Auth,
            "replay" => SyncDrop::Replay,
            _ => SyncDrop::Malformed,
        }
    }
}

/// Counters of one worker's sync work; written by that worker only.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerSyncCounters {
    /// Changes pushed into the outgoing ring.
    pub emitted: AtomicU64,
    /// Received records installed (or, for "closed", applied).
    pub applied: AtomicU64,
    pub drops: [AtomicU64; SyncDrop::ALL.len()],
    /// The last full-table request generation this worker finished dumping.
    pub dumped_generation: AtomicU64,
}

/// State shared by the workers and the sync task.
#[derive(Debug, Default)]
pub struct SyncShared {
    pub workers: Box<[WorkerSyncCounters]>,
    /// Bumped by the sync task when the peer asks for the full table; each worker then walks its table.
    pub dump_generation: AtomicU64,
    /// Counters of the sync task.
    pub frames_sent: AtomicU64,
    pub records_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub records_received: AtomicU64,
    pub records_coalesced: AtomicU64,
    pub full_tables_sent: AtomicU64,
    pub full_tables_received: AtomicU64,
    pub drops: [AtomicU64; SyncDrop::ALL.len()],
    /// Age of the oldest change not yet sent, µs.
    pub lag_us: AtomicU64,
    /// Our connection to the peer (we send on it) is up.
    pub outbound_connected: AtomicBool,
    /// The peer's connection to us (we receive on it) is up.
    pub inbound_connected: AtomicBool,
    /// The data plane steers by client address alone (a service is persistent), not by connection: received
    /// records must reach the worker the steering program would give the connection's packets. Set by the
    /// data plane wherever it sets the program.
    pub steered_by_client: AtomicBool,
}

impl SyncShared {
    /// The worker that owns `record`'s connection under the data plane's current steering.
    pub fn owning_worker(&self, record: &SyncRecord, workers: u32) -> usize {
        let steering =
            if self.steered_by_client.load(Ordering::Relaxed) { Steering::Client } else { Steering::Connection };
        worker_for_connection(record.client, record.client_port, workers, steering) as usize
    }

    pub fn count(&self, reason: SyncDrop, n: u64) {
        self.drops[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// A drop counter summed over the task and the workers.
    pub fn dropped(&self, reason: SyncDrop) -> u64 {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.workers.iter().map(|w| load(&w.drops[reason as usize])).sum::<u64>() + load(&self.drops[reason as usize])
    }

    pub fn applied(&self) -> u64 {
        self.workers.iter().map(|w| w.applied.load(Ordering::Relaxed)).sum()
    }

    pub fn emitted(&self) -> u64 {
        self.workers.iter().map(|w| w.emitted.load(Ordering::Relaxed)).sum()
    }

    /// Whether every worker has finished the dump of `generation`.
    pub fn dump_finished(&self, generation: u64) -> bool {
        self.workers.iter().all(|w| w.dumped_generation.load(Ordering::Acquire) >= generation)
    }

    /// A summary for `fulcrumctl sync`.
    pub fn status(&self) -> SyncStatus {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SyncStatus {
            sending_connected: self.outbound_connected.load(Ordering::Relaxed),
            receiving_connected: self.inbound_connected.load(Ordering::Relaxed),
            records_sent: load(&self.records_sent),
            records_received: load(&self.records_received),
            records_applied: self.applied(),
            records_dropped: SyncDrop::ALL.iter().map(|r| self.dropped(*r)).sum(),
            full_tables_sent: load(&self.full_tables_sent),
            full_tables_received: load(&self.full_tables_received),
            lag_seconds: load(&self.lag_us) as f64 / 1e6,
        }
    }

    /// Publishes the `fulcrum_sync_*` metrics; called by the metrics endpoint just before it renders.
    pub fn publish(&self) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metrics::counter!("fulcrum_sync_messages_sent_total").absolute(load(&self.records_sent));
        metrics::counter!("fulcrum_sync_frames_sent_total").absolute(load(&self.frames_sent));
        metrics::counter!("fulcrum_sync_messages_received_total").absolute(load(&self.records_received));
        metrics::counter!("fulcrum_sync_frames_received_total").absolute(load(&self.frames_received));
        metrics::counter!("fulcrum_sync_messages_applied_total").absolute(self.applied());
        metrics::counter!("fulcrum_sync_changes_emitted_total").absolute(self.emitted());
        metrics::counter!("fulcrum_sync_messages_coalesced_total").absolute(load(&self.records_coalesced));
        metrics::counter!("fulcrum_sync_full_tables_sent_total").absolute(load(&self.full_tables_sent));
        metrics::counter!("fulcrum_sync_full_tables_received_total").absolute(load(&self.full_tables_received));
        for reason in SyncDrop::ALL {
            metrics::counter!("fulcrum_sync_dropped_total", "reason" => reason.label()).absolute(self.dropped(reason));
        }
        metrics::gauge!("fulcrum_sync_lag_seconds").set(load(&self.lag_us) as f64 / 1e6);
        metrics::gauge!("fulcrum_sync_peer_connected", "direction" => "send")
            .set(f64::from(u8::from(self.outbound_connected.load(Ordering::Relaxed))));
        metrics::gauge!("fulcrum_sync_peer_connected", "direction" => "receive")
            .set(f64::from(u8::from(self.inbound_connected.load(Ordering::Relaxed))));
    }
}

/// What `fulcrumctl sync` shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    pub sending_connected: bool,
    pub receiving_connected: bool,
    pub records_sent: u64,
    pub records_received: u64,
    pub records_applied: u64,
    pub records_dropped: u64,
    pub full_tables_sent: u64,
    pub full_tables_received: u64,
    pub lag_seconds: f64,
}

/// One worker's ends: it produces changes and consumes received records.
pub struct WorkerPort {
    pub index: usize,
    pub outgoing: Producer<SyncRecord>,
    pub incoming: Consumer<SyncRecord>,
    pub shared: Arc<SyncShared>,
}

impl WorkerPort {
    pub fn counters(&self) -> &WorkerSyncCounters {
        &self.shared.workers[self.index]
    }

    /// Queues a change for the peer; a full ring counts a drop (the refresh walk sends it again later).
    #[inline]
    pub fn emit(&mut self, record: SyncRecord) {
        let counters = &self.shared.workers[self.index];
        match self.outgoing.push(record) {
            Ok(()) => counters.emitted.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.drops[SyncDrop::RingFull as usize].fetch_add(1, Ordering::Relaxed),
        };
    }

    pub fn count(&self, reason: SyncDrop) {
        self.counters().drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The sync task's ends: it consumes every worker's changes and produces received records for them.
pub struct TaskPorts {
    pub outgoing: Vec<Consumer<SyncRecord>>,
    pub incoming: Vec<Producer<SyncRecord>>,
    pub shared: Arc<SyncShared>,
}

/// Builds the rings for `workers` workers, `ring_records` records each way per worker.
pub fn hub(workers: usize, ring_records: usize) -> (Arc<SyncShared>, Vec<WorkerPort>, TaskPorts) {
    let shared = Arc::new(SyncShared {
        workers: (0..workers).map(|_| WorkerSyncCounters::default()).collect(),
        ..SyncShared::default()
    });
    let mut ports = Vec::with_capacity(workers);
    let mut task = TaskPorts { outgoing: Vec::new(), incoming: Vec::new(), shared: Arc::clone(&shared) };
    for index in 0..workers {
        let (out_tx, out_rx) = ring(ring_records);
        let (in_tx, in_rx) = ring(ring_records);
        ports.push(WorkerPort { index, outgoing: out_tx, incoming: in_rx, shared: Arc::clone(&shared) });
        task.outgoing.push(out_rx);
        task.incoming.push(in_tx);
    }
    (shared, ports, task)
}
