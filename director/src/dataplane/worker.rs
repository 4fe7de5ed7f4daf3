//! One forwarding worker: drains its ring in batches, asks a [`PacketHandler`] what to do with each frame,
//! sends the batch with one `sendmmsg`, then returns the slots to the kernel.
//!
//! Nothing here allocates after start: the batch, the slot list and the scratch pool are sized once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::afpacket::{PacketRing, RxMeta, TxBatch, VNET_HDR_LEN};

/// Frames taken from the ring per batch.
pub const BATCH: usize = 64;
/// Scratch buffers per worker: frames the handler makes (ARP replies, ICMP errors, tunnel segments).
pub const SCRATCH_BUFFERS: usize = 256;
/// Bytes per scratch buffer: a virtio-net header and a 1500-byte-MTU frame, with room to spare.
pub const SCRATCH_LEN: usize = 2048;

/// What to do with a received frame (`[vnet hdr][ethernet frame]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the first `len` bytes of the (rewritten) buffer: vnet header and frame.
    Transmit { len: usize },
    /// Send scratch buffer `prefix` (its first `prefix_len` bytes) followed by the received buffer from
    /// `from` to `to`: a new header in front of an unchanged payload, without copying the payload.
    TransmitAfter { prefix: usize, prefix_len: usize, from: usize, to: usize },
    /// Not for us: the kernel has its own copy of every frame, nothing to do.
    Ignore,
    /// Ours but refused; counted by the handler.
    Drop,
    /// Fully handled through frames the handler made in scratch buffers (e.g. a segmented tunnel frame).
    Consumed,
}

/// Buffers the handler may fill with frames of its own during one batch.
pub struct Scratch {
    buffers: Box<[[u8; SCRATCH_LEN]]>,
    used: usize,
    /// Frames to send: (buffer, length).
    queued: Vec<(usize, usize)>,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            buffers: vec![[0u8; SCRATCH_LEN]; SCRATCH_BUFFERS].into_boxed_slice(),
            used: 0,
            queued: Vec::with_capacity(SCRATCH_BUFFERS),
        }
    }

    /// A free buffer, or `None` when this batch has used them all.
    pub fn take(&mut self) -> Option<(usize, &mut [u8; SCRATCH_LEN])> {
        let index = self.used;
        let buffer = self.buffers.get_mut(index)?;
        self.used += 1;
        Some((index, buffer))
    }

    /// Sends `len` bytes of buffer `index` (vnet header first) with this batch.
    pub fn queue(&mut self, index: usize, len: usize) {
        if index < self.used && len <= SCRATCH_LEN && self.queued.len() < SCRATCH_BUFFERS {
            self.queued.push((index, len));
        }
    }

    pub fn get(&self, index: usize) -> Option<&[u8; SCRATCH_LEN]> {
        self.buffers.get(index)
    }

    /// The frames queued so far, in order.
    pub fn queued_frames(&self) -> impl Iterator<Item = &[u8]> {
        self.queued.iter().filter_map(|&(index, len)| self.buffers.get(index).map(|b| &b[..len]))
    }

    fn reset(&mut self) {
        self.used = 0;
        self.queued.clear();
    }

    pub fn remaining(&self) -> usize {
        SCRATCH_BUFFERS - self.used
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// The pure part of a worker.
pub trait PacketHandler {
    /// Decides what to do with one frame, rewriting it in place if it is to be sent.
    fn handle(&mut self, buffer: &mut [u8], meta: RxMeta, now: Instant, scratch: &mut Scratch) -> Verdict;
    /// Timers: expiry, ARP probes, gratuitous ARPs. Called once per loop turn.
    fn poll(&mut self, now: Instant, scratch: &mut Scratch);
}

/// Counters of the worker loop itself; read at scrape time.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct LoopCounters {
    pub received: AtomicU64,
    pub transmitted: AtomicU64,
    pub transmit_errors: AtomicU64,
    pub ring_packets: AtomicU64,
    pub ring_drops: AtomicU64,
}

/// Longest sleep of an idle worker. It bounds how late a director that was just made MASTER sends its
/// gratuitous ARPs (part of every failover's outage), and how late expiry runs; 200 wake-ups a second cost an
/// idle worker next to nothing.
const IDLE_WAKE_MS: i32 = 5;

/// Runs until `stop` is set. After a busy turn the worker polls the ring for up to `busy_poll` before
/// sleeping in poll(2): under load the next frame usually comes within microseconds, and a sleep and wake-up
/// per frame costs more than the frame. It yields the core between looks rather than spinning on it: with
/// nothing else runnable a yield returns at once, and on a machine whose cores the director shares (with
/// other workers, or in a test bed with the servers and clients) a spinning worker would keep the work it
/// waits for off the core.
pub fn run(
    ring: &mut PacketRing,
    handler: &mut impl PacketHandler,
    counters: &LoopCounters,
    stop: &AtomicBool,
    busy_poll: std::time::Duration,
) {
    let mut batch = TxBatch::with_capacity(BATCH + SCRATCH_BUFFERS);
    let mut slots = Vec::with_capacity(BATCH);
    let mut scratch = Scratch::new();
    let mut last_stats = Instant::now();
    let mut busy = false;
    while !stop.load(Ordering::Relaxed) {
        if busy && !busy_poll.is_zero() {
            let spin_until = Instant::now() + busy_poll;
            while !ring.ready() && Instant::now() < spin_until {
                std::thread::yield_now();
            }
        }
        // Wake at least every IDLE_WAKE_MS for timers, even with no traffic.
        if let Err(e) = ring.wait(IDLE_WAKE_MS) {
            tracing::warn!(error = %e, "waiting on the ring");
        }
        let now = Instant::now();
        handler.poll(now, &mut scratch);
        while slots.len() < BATCH && scratch.remaining() > 0 {
            let Some((slot, meta, buffer)) = ring.take_frame() else { break };
            slots.push(slot);
            counters.received.fetch_add(1, Ordering::Relaxed);
            match handler.handle(buffer, meta, now, &mut scratch) {
                Verdict::Transmit { len } => {
                    let len = len.min(buffer.len());
                    // SAFETY: the slot stays ours, untouched, until it is released after the batch is sent.
                    unsafe { batch.push(&[&buffer[..len]]) };
                }
                Verdict::TransmitAfter { prefix, prefix_len, from, to } => {
                    if let (Some(head), Some(tail)) = (scratch.get(prefix), buffer.get(from..to)) {
                        let head = &head[..prefix_len.min(SCRATCH_LEN)];
                        // SAFETY: scratch buffers and the slot stay untouched until the batch is sent.
                        unsafe { batch.push(&[head, tail]) };
                    }
                }
                Verdict::Ignore | Verdict::Drop | Verdict::Consumed => {}
            }
        }
        for &(index, len) in &scratch.queued {
            if let Some(buffer) = scratch.get(index) {
                // SAFETY: scratch buffers stay untouched until the batch is sent and the scratch is reset.
                unsafe { batch.push(&[&buffer[..len]]) };
            }
        }
        if !batch.is_empty() {
            let (sent, error) = ring.send_batch(&mut batch);
            counters.transmitted.fetch_add(sent as u64, Ordering::Relaxed);
            if let Some(e) = error {
                counters.transmit_errors.fetch_add((batch.len() - sent) as u64, Ordering::Relaxed);
                tracing::debug!(error = %e, "sendmmsg");
            }
            batch.clear();
        }
        busy = !slots.is_empty();
        for slot in slots.drain(..) {
            ring.release(slot);
        }
        scratch.reset();
        if now.duration_since(last_stats).as_millis() >= 500 {
            last_stats = now;
            if let Ok(stats) = ring.stats() {
                counters.ring_packets.store(stats.packets, Ordering::Relaxed);
                counters.ring_drops.store(stats.drops, Ordering::Relaxed);
            }
        }
    }
}

/// Offset of the Ethernet frame in a received buffer.
pub const FRAME_OFFSET: usize = VNET_HDR_LEN;

/// A stop flag shared by the workers and whoever stops them.
pub type StopFlag = Arc<AtomicBool>;
