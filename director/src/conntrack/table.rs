//! The connection table: slab, two hash indexes, timer wheel.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::config::ForwardMethod;
use crate::flow::{FlowV4, Proto, ServerIndex, ServiceIndex};

use super::hash::KeyHasher;
use super::tcp::{self, ConnState, Direction, Rows, TcpFlags};
use super::time::{ceil_millis, Tick, TimeoutTooLong, Timeouts};

/// "No entry" in every `u32` link.
const NIL: u32 = u32::MAX;

const SLOT_SHIFT: u32 = 3;
/// Width of one timer-wheel slot. An entry is reaped by the first [`ConnTable::expire`] call at or after its
/// deadline rounded up to a multiple of this: never early, at most one slot late (whole seconds are multiples
/// of it). A deadline that had already passed when it was set (a synced entry with no time left) goes into
/// the slot being processed and is reaped by the next slot boundary.
pub const WHEEL_SLOT_MS: u32 = 1 << SLOT_SHIFT;
const WHEEL_BITS: u32 = 17;
/// Slots in the timer wheel (fixed, whatever the capacity: 1 MiB of list heads and a 16 KiB bitmap of the
/// non-empty ones).
pub const WHEEL_SLOTS: usize = 1 << WHEEL_BITS;
const WHEEL_MASK: u32 = (1 << WHEEL_BITS) - 1;
/// Time one turn of the wheel covers (≈ 1049 s). Entries due later than that (longer configured timeouts)
/// are looked at once per turn and left in place until due.
pub const WHEEL_SPAN_MS: u32 = WHEEL_SLOT_MS << WHEEL_BITS;

/// The largest accepted capacity (2³⁰ entries; indexes are `u32`).
pub const MAX_CAPACITY: usize = 1 << 30;

/// Size of one slab entry in bytes. The whole table costs [`ConnTable::memory_bytes`]; per entry that is this
/// plus the two hash indexes (2 × 4 bytes × a power of two ≥ 2 × capacity) plus the fixed wheel (1 MiB + 16 KiB).
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

// The memory budget is 128 bytes per entry including the indexes (≤ 16.8 at 2 × load) and the wheel: keep
// the entry itself well inside it.
const _: () = assert!(ENTRY_BYTES <= 64);

/// Flags carried by an entry that the caller may set and read (the high bits are the table's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConnFlags(u8);

impl ConnFlags {
    pub const NONE: ConnFlags = ConnFlags(0);
    /// The entry was installed from the peer director's connection sync.
    pub const SYNCED: ConnFlags = ConnFlags(0x01);
    /// A persistence template (client → real server stickiness, `ipvsadm -p`), not a connection.
    pub const TEMPLATE: ConnFlags = ConnFlags(0x02);
    const PUBLIC_MASK: u8 = 0x0F;

    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Keeps only the caller-visible bits (the low four).
    pub const fn from_bits_truncate(bits: u8) -> ConnFlags {
        ConnFlags(bits & ConnFlags::PUBLIC_MASK)
    }

    pub const fn contains(self, other: ConnFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ConnFlags {
    type Output = ConnFlags;
    fn bitor(self, rhs: ConnFlags) -> ConnFlags {
        ConnFlags(self.0 | rhs.0)
    }
}

/// Internal flag bits (above `ConnFlags::PUBLIC_MASK`).
const F_NO_OUTPUT: u8 = 0x20;
const F_REPLY: u8 = 0x40;
const F_USED: u8 = 0x80;

/// One connection. 56 bytes, `u32`-aligned; addresses are stored as host-order `u32`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Entry {
    // Forward key: client → VIP.
    fwd_src: u32,
    fwd_dst: u32,
    fwd_sport: u16,
    fwd_dport: u16,
    // Reply key (NAT): real server → client. Meaningful only with F_REPLY.
    rep_src: u32,
    rep_dst: u32,
    rep_sport: u16,
    rep_dport: u16,
    /// Deadline, a wrapping `Tick` in ms.
    expires: u32,
    /// Timer-wheel list links; `wheel_next` is the free-list link while the entry is free.
    wheel_next: u32,
    wheel_prev: u32,
    /// Hash chains of the forward and reply indexes.
    fwd_chain: u32,
    rep_chain: u32,
    /// Input packets (wrapping), as IPVS's `in_pkts`: what a sync threshold is computed from.
    in_packets: u32,
    service: ServiceIndex,
    server: ServerIndex,
    proto: u8,
    method: u8,
    state: u8,
    flags: u8,
}

const EMPTY: Entry = Entry {
    fwd_src: 0,
    fwd_dst: 0,
    fwd_sport: 0,
    fwd_dport: 0,
    rep_src: 0,
    rep_dst: 0,
    rep_sport: 0,
    rep_dport: 0,
    expires: 0,
    wheel_next: NIL,
    wheel_prev: NIL,
    fwd_chain: NIL,
    rep_chain: NIL,
    in_packets: 0,
    service: 0,
    server: 0,
    proto: 0,
    method: 0,
    state: 0,
    flags: 0,
};

fn method_to_u8(method: ForwardMethod) -> u8 {
    match method {
        ForwardMethod::Dr => 0,
        ForwardMethod::Nat => 1,
        ForwardMethod::Tun => 2,
    }
}

fn method_from_u8(value: u8) -> ForwardMethod {
    match value {
        1 => ForwardMethod::Nat,
        2 => ForwardMethod::Tun,
        _ => ForwardMethod::Dr,
    }
}

fn proto_from_u8(value: u8) -> Proto {
    Proto::from_ip_protocol(value).unwrap_or(Proto::Tcp)
}

impl Entry {
    #[inline(always)]
    fn matches_forward(&self, key: &FlowV4) -> bool {
        self.fwd_src == u32::from(key.src)
            && self.fwd_dst == u32::from(key.dst)
            && self.fwd_sport == key.src_port
            && self.fwd_dport == key.dst_port
            && self.proto == key.proto as u8
    }

    #[inline(always)]
    fn matches_reply(&self, key: &FlowV4) -> bool {
        self.rep_src == u32::from(key.src)
            && self.rep_dst == u32::from(key.dst)
            && self.rep_sport == key.src_port
            && self.rep_dport == key.dst_port
            && self.proto == key.proto as u8
    }

    fn forward(&self) -> FlowV4 {
        FlowV4 {
            src: Ipv4Addr::from(self.fwd_src),
            dst: Ipv4Addr::from(self.fwd_dst),
            src_port: self.fwd_sport,
            dst_port: self.fwd_dport,
            proto: proto_from_u8(self.proto),
        }
    }

    fn reply(&self) -> Option<FlowV4> {
        (self.flags & F_REPLY != 0).then(|| FlowV4 {
            src: Ipv4Addr::from(self.rep_src),
            dst: Ipv4Addr::from(self.rep_dst),
            src_port: self.rep_sport,
            dst_port: self.rep_dport,
            proto: proto_from_u8(self.proto),
        })
    }

    fn set_forward(&mut self, key: &FlowV4) {
        self.fwd_src = u32::from(key.src);
        self.fwd_dst = u32::from(key.dst);
        self.fwd_sport = key.src_port;
        self.fwd_dport = key.dst_port;
        self.proto = key.proto as u8;
    }

    fn set_reply(&mut self, key: Option<&FlowV4>) {
        match key {
            Some(key) => {
                self.rep_src = u32::from(key.src);
                self.rep_dst = u32::from(key.dst);
                self.rep_sport = key.src_port;
                self.rep_dport = key.dst_port;
                self.flags |= F_REPLY;
            }
            None => {
                (self.rep_src, self.rep_dst, self.rep_sport, self.rep_dport) = (0, 0, 0, 0);
                self.flags &= !F_REPLY;
            }
        }
    }

    fn state(&self) -> ConnState {
        ConnState::from_u8(self.state).unwrap_or(ConnState::Close)
    }

    fn info(&self) -> ConnInfo {
        ConnInfo {
            forward: self.forward(),
            reply: self.reply(),
            service: self.service,
            server: self.server,
            method: method_from_u8(self.method),
            state: self.state(),
            flags: ConnFlags::from_bits_truncate(self.flags),
            in_packets: self.in_packets,
            expires: Tick(self.expires),
        }
    }
}

/// Refers to one live entry. Valid from the insert until the entry is removed or expired; the table is owned
/// by one worker, so a handle is meant to live for the processing of one packet. Passing a handle whose entry
/// is gone panics (or, if the slot was reused since, silently refers to the new entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(u32);

impl Handle {
    /// The entry's slot in the slab (`0..capacity`), e.g. to resume [`ConnTable::iter_from`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A copy of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// Client → VIP.
    pub forward: FlowV4,
    /// Real server → client, for NAT.
    pub reply: Option<FlowV4>,
    pub service: ServiceIndex,
    pub server: ServerIndex,
    pub method: ForwardMethod,
    pub state: ConnState,
    pub flags: ConnFlags,
    /// Input packets seen (wrapping).
    pub in_packets: u32,
    /// The deadline (the entry is reaped by the first `expire` at or after it, rounded up to the wheel slot).
    pub expires: Tick,
}

impl ConnInfo {
    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(&self, now: Tick) -> Duration {
        Duration::from_millis(self.expires.millis_since(now).max(0) as u64)
    }

    /// LVS ActiveConn (ESTABLISHED TCP) rather than InActConn.
    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }

    /// The record connection sync sends for this entry at `now`.
    pub fn to_synced(&self, now: Tick) -> SyncedConn {
        SyncedConn {
            forward: self.forward,
            reply: self.reply,
            service: self.service,
            server: self.server,
            method: self.method,
            state: self.state,
            flags: self.flags,
            remaining: self.remaining(now),
        }
    }
}

/// An entry as connection sync carries it: the standby installs it with the remaining timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncedConn {
    pub forward: FlowV4,
    pub reply: Option<FlowV4>,
    pub service: ServiceIndex,
    pub server: ServerIndex,
    pub method: ForwardMethod,
    pub state: ConnState,
    pub flags: ConnFlags,
    /// Time left on the sender's clock; capped at [`Timeouts::MAX`].
    pub remaining: Duration,
}

/// What [`ConnTable::install_synced`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// A new entry (counts as a new connection of its server, active or inactive by its state).
    New(Handle),
    /// The forward key was already present: its entry now carries the synced data; `previous` is what it held
    /// before (its server and state, to move the per-server counters).
    Updated { handle: Handle, previous: ConnInfo },
}

impl Installed {
    pub fn handle(&self) -> Handle {
        match *self {
            Installed::New(handle) | Installed::Updated { handle, .. } => handle,
        }
    }
}

/// The state before and after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    pub old: ConnState,
    pub new: ConnState,
}

impl StateChange {
    pub fn changed(&self) -> bool {
        self.old != self.new
    }

    /// Moved from InActConn to ActiveConn.
    pub fn became_active(&self) -> bool {
        !self.old.is_active() && self.new.is_active()
    }

    /// Moved from ActiveConn to InActConn.
    pub fn became_inactive(&self) -> bool {
        self.old.is_active() && !self.new.is_active()
    }
}

/// Why an insert failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// Every preallocated entry is in use; counted in [`Counters::table_full`]. Drop the packet.
    #[error("connection table full")]
    Full,
    /// An entry with this forward key exists (look up before inserting).
    #[error("an entry with this forward key exists")]
    ForwardExists(Handle),
    /// Another entry already owns this reply key: the same client address and port reach the same real
    /// server address and port through two services, and NAT replies could not be told apart.
    #[error("another entry has this reply key")]
    ReplyExists(Handle),
    /// The reply key's protocol differs from the forward key's.
    #[error("the reply key's protocol differs from the forward key's")]
    ProtoMismatch,
    /// A synced entry whose state does not fit its protocol (a TCP state for UDP or the reverse).
    #[error("state {0} does not fit the entry's protocol")]
    BadState(ConnState),
}

/// Why a table could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("capacity {0} is outside 1..={max}", max = MAX_CAPACITY)]
    Capacity(usize),
    #[error(transparent)]
    Timeout(#[from] TimeoutTooLong),
}

/// Event counters; all monotonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Successful [`ConnTable::insert`]s.
    pub inserted: u64,
    /// Inserts and synced installs refused because the table was full.
    pub table_full: u64,
    /// Inserts and synced installs refused because a key was present.
    pub duplicates: u64,
    /// Entries reaped by [`ConnTable::expire`].
    pub expired: u64,
    /// Entries removed by [`ConnTable::remove`] or the `remove_server` family.
    pub removed: u64,
    /// Synced installs that created an entry.
    pub synced_new: u64,
    /// Synced installs that updated an entry.
    pub synced_updated: u64,
    /// Non-SYN TCP packets without an entry, dropped ([`ConnTable::count_untracked_drop`]).
    pub untracked_drops: u64,
}

/// What one [`ConnTable::expire`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpireStats {
    /// Entries reaped (and reported to the callback).
    pub expired: usize,
    /// Entries looked at (reaped, or found not yet due and moved to a later slot); at most the budget.
    pub examined: usize,
    /// The budget ran out before the wheel caught up with `now`: call again (next loop iteration).
    pub pending: bool,
}

/// Progress of [`ConnTable::remove_server_step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeStep {
    pub removed: usize,
    /// Where to continue, or `None` when the whole slab has been scanned.
    pub next: Option<usize>,
}

/// Shape of one hash index, from [`ConnTable::index_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    pub buckets: usize,
    /// Keys in the index.
    pub keys: usize,
    /// Buckets holding at least one key.
    pub occupied: usize,
    pub longest_chain: usize,
}

#[derive(Debug, Clone, Copy)]
struct WheelHead {
    next: u32,
    prev: u32,
}

/// One worker's connection table. See the [module documentation](super).
pub struct ConnTable {
    entries: Box<[Entry]>,
    /// Bucket heads of the forward index, then of the reply index.
    fwd_index: Box<[u32]>,
    rep_index: Box<[u32]>,
    index_mask: usize,
    /// List heads of the wheel; node `capacity + slot` in the link space.
    wheel: Box<[WheelHead]>,
    /// One bit per wheel slot, set while its list is non-empty: `expire` skips runs of empty slots.
    occupied: Box<[u64]>,
    /// Boundary (ms, multiple of `WHEEL_SLOT_MS`) of the next slot `expire` processes.
    wheel_pos: u32,
    /// Next node to examine in that slot when the last `expire` ran out of budget mid-slot.
    cursor: u32,
    wheel_started: bool,
    free_head: u32,
    len: u32,
    capacity: u32,
    hasher: KeyHasher,
    timeouts: Timeouts,
    timeout_ms: [u32; ConnState::COUNT],
    secure_tcp: bool,
    counters: Counters,
    /// Tests: put every key in bucket 0.
    #[cfg(test)]
    pub(crate) degenerate_hash: bool,
}

/// A seed for [`ConnTable::new`] from the OS's randomness (via std's `RandomState`, no extra dependency).
pub fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64)
}

#[inline(always)]
fn is_due(expires: u32, now: u32) -> bool {
    (now.wrapping_sub(expires) as i32) >= 0
}

#[inline(always)]
fn slot_boundary_ceil(ms: u32) -> u32 {
    ms.wrapping_add(WHEEL_SLOT_MS - 1) & !(WHEEL_SLOT_MS - 1)
}

#[inline(always)]
fn slot_of(boundary: u32) -> u32 {
    (boundary >> SLOT_SHIFT) & WHEEL_MASK
}

impl ConnTable {
    /// Builds a table of `capacity` entries (a hard limit) and touches all of its memory, so that the packet
    /// path never allocates or page-faults. `seed` keys the hash ([`random_seed`] in production; fixed in
    /// tests).
    pub fn new(capacity: usize, timeouts: Timeouts, seed: u64) -> Result<ConnTable, TableError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(TableError::Capacity(capacity));
        }
        let timeout_ms = timeouts.to_millis_table()?;
        let mut entries = vec![EMPTY; capacity].into_boxed_slice();
        for (i, entry) in entries.iter_mut().enumerate() {
            entry.wheel_next = if i + 1 < capacity { (i + 1) as u32 } else { NIL };
        }
        let buckets = (2 * capacity).next_power_of_two();
        let wheel = (0..WHEEL_SLOTS)
            .map(|slot| {
                let me = (capacity + slot) as u32;
                WheelHead { next: me, prev: me }
            })
            .collect();
        Ok(ConnTable {
            entries,
            fwd_index: vec![NIL; buckets].into_boxed_slice(),
            rep_index: vec![NIL; buckets].into_boxed_slice(),
            index_mask: buckets - 1,
            wheel,
            occupied: vec![0u64; WHEEL_SLOTS / 64].into_boxed_slice(),
            wheel_pos: 0,
            cursor: NIL,
            wheel_started: false,
            free_head: 0,
            len: 0,
            capacity: capacity as u32,
            hasher: KeyHasher::new(seed),
            timeouts,
            timeout_ms,
            secure_tcp: false,
            counters: Counters::default(),
            #[cfg(test)]
            degenerate_hash: false,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// New timeouts apply from each entry's next packet on (as in IPVS); deadlines already set stay.
    pub fn set_timeouts(&mut self, timeouts: Timeouts) -> Result<(), TimeoutTooLong> {
        self.timeout_ms = timeouts.to_millis_table()?;
        self.timeouts = timeouts;
        Ok(())
    }

    pub fn secure_tcp(&self) -> bool {
        self.secure_tcp
    }

    /// Switches to IPVS's `secure_tcp` state tables (see [`tcp`]).
    pub fn set_secure_tcp(&mut self, on: bool) {
        self.secure_tcp = on;
    }

    /// Bytes the table holds: slab, both indexes, wheel and the struct itself. All allocated in `new`.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<ConnTable>()
            + std::mem::size_of_val(&*self.entries)
            + std::mem::size_of_val(&*self.fwd_index)
            + std::mem::size_of_val(&*self.rep_index)
            + std::mem::size_of_val(&*self.wheel)
            + std::mem::size_of_val(&*self.occupied)
    }

    /// [`memory_bytes`](Self::memory_bytes) / capacity.
    pub fn bytes_per_entry(&self) -> f64 {
        self.memory_bytes() as f64 / self.capacity as f64
    }

    /// Buckets per index (a power of two ≥ 2 × capacity).
    pub fn index_buckets(&self) -> usize {
        self.fwd_index.len()
    }

    /// Chain lengths of the forward and the reply index: a diagnostic (O(buckets), not for the packet path)
    /// that shows the hash spreading keys.
    pub fn index_stats(&self) -> (IndexStats, IndexStats) {
        let stats = |index: &[u32], chain: fn(&Entry) -> u32| {
            let mut stats = IndexStats { buckets: index.len(), ..IndexStats::default() };
            for &head in index {
                let (mut n, mut length) = (head, 0);
                while n != NIL {
                    length += 1;
                    n = chain(&self.entries[n as usize]);
                }
                stats.keys += length;
                stats.occupied += usize::from(length > 0);
                stats.longest_chain = stats.longest_chain.max(length);
            }
            stats
        };
        (stats(&self.fwd_index, |e| e.fwd_chain), stats(&self.rep_index, |e| e.rep_chain))
    }

    /// Counts a non-SYN TCP packet that matched no entry and was dropped (see [`tcp::may_create`]).
    pub fn count_untracked_drop(&mut self) {
        self.counters.untracked_drops += 1;
    }

    #[inline(always)]
    fn bucket(&self, key: &FlowV4) -> usize {
        #[cfg(test)]
        if self.degenerate_hash {
            return 0;
        }
        self.hasher.hash(key) as usize & self.index_mask
    }

    /// The entry of a client → VIP packet.
    #[inline]
    pub fn lookup_forward(&self, key: &FlowV4) -> Option<Handle> {
        let mut n = self.fwd_index[self.bucket(key)];
        while n != NIL {
            let entry = &self.entries[n as usize];
            if entry.matches_forward(key) {
                return Some(Handle(n));
            }
            n = entry.fwd_chain;
        }
        None
    }

    /// The entry of a real server → client packet (NAT entries only).
    #[inline]
    pub fn lookup_reply(&self, key: &FlowV4) -> Option<Handle> {
        let mut n = self.rep_index[self.bucket(key)];
        while n != NIL {
            let entry = &self.entries[n as usize];
            if entry.matches_reply(key) {
                return Some(Handle(n));
            }
            n = entry.rep_chain;
        }
        None
    }

    #[inline]
    fn live(&self, handle: Handle) -> &Entry {
        let entry = &self.entries[handle.0 as usize];
        assert!(entry.flags & F_USED != 0, "connection handle {} refers to a free entry", handle.0);
        entry
    }

    /// A copy of the entry.
    pub fn get(&self, handle: Handle) -> ConnInfo {
        self.live(handle).info()
    }

    pub fn state(&self, handle: Handle) -> ConnState {
        self.live(handle).state()
    }

    pub fn server(&self, handle: Handle) -> (ServiceIndex, ServerIndex) {
        let entry = self.live(handle);
        (entry.service, entry.server)
    }

    /// Adds or removes caller flags ([`ConnFlags::TEMPLATE`], [`ConnFlags::SYNCED`]).
    pub fn set_flags(&mut self, handle: Handle, flags: ConnFlags, on: bool) {
        self.live(handle);
        let entry = &mut self.entries[handle.0 as usize];
        let bits = flags.0 & ConnFlags::PUBLIC_MASK;
        if on {
            entry.flags |= bits;
        } else {
            entry.flags &= !bits;
        }
    }

    /// Checks that a new entry's keys are free and that there is room (counting a refusal).
    fn check_new(&mut self, forward: &FlowV4, reply: Option<&FlowV4>) -> Result<(), InsertError> {
        if let Some(reply) = reply {
            if reply.proto != forward.proto {
                return Err(InsertError::ProtoMismatch);
            }
        }
        if let Some(existing) = self.lookup_forward(forward) {
            self.counters.duplicates += 1;
            return Err(InsertError::ForwardExists(existing));
        }
        if let Some(existing) = reply.and_then(|reply| self.lookup_reply(reply)) {
            self.counters.duplicates += 1;
            return Err(InsertError::ReplyExists(existing));
        }
        if self.free_head == NIL {
            self.counters.table_full += 1;
            return Err(InsertError::Full);
        }
        Ok(())
    }

    fn ensure_wheel_started(&mut self, now: Tick) {
        if !self.wheel_started {
            self.wheel_started = true;
            self.wheel_pos = now.0 & !(WHEEL_SLOT_MS - 1);
        }
    }

    /// Takes a free entry, fills it and links it everywhere. `check_new` must have passed.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        forward: &FlowV4,
        reply: Option<&FlowV4>,
        service: ServiceIndex,
        server: ServerIndex,
        method: ForwardMethod,
        state: ConnState,
        flags: u8,
        expires: u32,
    ) -> Handle {
        let n = self.free_head;
        let entry = &mut self.entries[n as usize];
        self.free_head = entry.wheel_next;
        *entry = EMPTY;
        entry.set_forward(forward);
        entry.flags = F_USED | (flags & ConnFlags::PUBLIC_MASK);
        if method != ForwardMethod::Nat {
            entry.flags |= F_NO_OUTPUT;
        }
        entry.set_reply(reply);
        entry.service = service;
        entry.server = server;
        entry.method = method_to_u8(method);
        entry.state = state as u8;
        entry.expires = expires;
        self.len += 1;
        self.link_forward(n, forward);
        if let Some(reply) = reply {
            self.link_reply(n, reply);
        }
        self.wheel_link(n);
        Handle(n)
    }

    /// Creates an entry for a new connection scheduled to `server`, in state NONE for TCP (UDP entries are
    /// always in state UDP) with the NONE timeout. Then feed the packet that created it to
    /// [`on_packet`](Self::on_packet) like every other packet (IPVS does the same: the creating SYN moves the
    /// entry to SYN_RECV). A new entry is inactive (InActConn).
    ///
    /// `reply` is the key of the real server's replies, for NAT (`forward` with the destination replaced by
    /// the real server, reversed). Never allocates; fails with [`InsertError::Full`] (counted) when all
    /// `capacity` entries are in use.
    pub fn insert(
        &mut self,
        forward: FlowV4,
        reply: Option<FlowV4>,
        service: ServiceIndex,
        server: ServerIndex,
        method: ForwardMethod,
        now: Tick,
    ) -> Result<Handle, InsertError> {
        self.check_new(&forward, reply.as_ref())?;
        self.ensure_wheel_started(now);
        let state = match forward.proto {
            Proto::Tcp => ConnState::None,
            Proto::Udp => ConnState::Udp,
        };
        let expires = now.0.wrapping_add(self.timeout_ms[state as usize]);
        let handle = self.install(&forward, reply.as_ref(), service, server, method, state, 0, expires);
        self.counters.inserted += 1;
        Ok(handle)
    }

    /// Accounts one packet of the entry: moves the TCP state (IPVS's tables, see [`tcp`]) and
    /// pushes the deadline to `now` + the timeout of the new state. Returns the states before and after, for
    /// the per-server ActiveConn/InActConn counters and for connection sync.
    ///
    /// `flags` is ignored for UDP entries. Never allocates; O(1).
    pub fn on_packet(&mut self, handle: Handle, direction: Direction, flags: TcpFlags, now: Tick) -> StateChange {
        self.live(handle);
        let n = handle.0;
        let secure = self.secure_tcp;
        let entry = &mut self.entries[n as usize];
        let old = entry.state();
        let new = if old.is_tcp() {
            let rows = match direction {
                Direction::Output => {
                    entry.flags &= !F_NO_OUTPUT;
                    Rows::Output
                }
                Direction::Input if entry.flags & F_NO_OUTPUT != 0 => Rows::InputOnly,
                Direction::Input => Rows::Input,
            };
            tcp::next_state(old, rows, flags, secure)
        } else {
            old
        };
        if direction == Direction::Input {
            entry.in_packets = entry.in_packets.wrapping_add(1);
        }
        entry.state = new as u8;
        let expires = now.0.wrapping_add(self.timeout_ms[new as usize]);
        self.reschedule(n, expires);
        StateChange { old, new }
    }

    /// Removes the entry (both keys) and returns what it held.
    pub fn remove(&mut self, handle: Handle) -> ConnInfo {
        let info = self.live(handle).info();
        self.release(handle.0);
        self.counters.removed += 1;
        info
    }

    /// Installs an entry received from the peer director (connection sync), marked [`ConnFlags::SYNCED`],
    /// with the given state and the remaining time as its deadline. If the forward key is already present
    /// (a state change of a connection synced earlier), that entry is updated instead. Never allocates.
    pub fn install_synced(&mut self, conn: &SyncedConn, now: Tick) -> Result<Installed, InsertError> {
        if conn.state.is_tcp() != (conn.forward.proto == Proto::Tcp) {
            return Err(InsertError::BadState(conn.state));
        }
        if let Some(reply) = &conn.reply {
            if reply.proto != conn.forward.proto {
                return Err(InsertError::ProtoMismatch);
            }
        }
        self.ensure_wheel_started(now);
        let remaining = ceil_millis(conn.remaining.min(Timeouts::MAX)) as u32;
        let expires = now.0.wrapping_add(remaining);
        let flags = (conn.flags | ConnFlags::SYNCED).0;
        let Some(handle) = self.lookup_forward(&conn.forward) else {
            self.check_new(&conn.forward, conn.reply.as_ref())?;
            let handle = self.install(
                &conn.forward,
                conn.reply.as_ref(),
                conn.service,
                conn.server,
                conn.method,
                conn.state,
                flags,
                expires,
            );
            self.counters.synced_new += 1;
            return Ok(Installed::New(handle));
        };
        let n = handle.0;
        let previous = self.entries[n as usize].info();
        if previous.reply != conn.reply {
            if let Some(other) = conn.reply.as_ref().and_then(|reply| self.lookup_reply(reply)) {
                if other != handle {
                    self.counters.duplicates += 1;
                    return Err(InsertError::ReplyExists(other));
                }
            }
            if let Some(old) = previous.reply {
                self.unlink_reply(n, &old);
            }
            self.entries[n as usize].set_reply(conn.reply.as_ref());
            if let Some(reply) = &conn.reply {
                self.link_reply(n, reply);
            }
        }
        let entry = &mut self.entries[n as usize];
        entry.service = conn.service;
        entry.server = conn.server;
        entry.method = method_to_u8(conn.method);
        entry.state = conn.state as u8;
        entry.flags = (entry.flags & !(ConnFlags::PUBLIC_MASK | F_NO_OUTPUT)) | flags;
        if conn.method != ForwardMethod::Nat {
            entry.flags |= F_NO_OUTPUT;
        }
        self.reschedule(n, expires);
        self.counters.synced_updated += 1;
        Ok(Installed::Updated { handle, previous })
    }

    /// Reaps entries whose deadline has passed, looking at no more than `budget` entries, and reports each
    /// to `on_expired` (to move the server's counters and send a sync "closed" message). Call it on every
    /// loop iteration: the work is spread over calls, so even a million entries due at once never stall the
    /// packet loop ([`ExpireStats::pending`] says the budget ran out). Never allocates.
    ///
    /// How: a hashed timing wheel of [`WHEEL_SLOTS`] slots of [`WHEEL_SLOT_MS`]; an entry sits in the slot of
    /// its deadline, rounded up. A call walks the slots from where the last one stopped up to `now`, jumping
    /// over empty ones with a bitmap (so even a call after a long pause reads at most 2048 bitmap words). A packet
    /// that pushes a deadline later just rewrites it, leaving the entry where it is; when its old slot comes
    /// up, the entry is found not due and moved to the slot of its new deadline. That keeps `on_packet` from
    /// touching neighbouring entries on every packet. A deadline moved earlier relinks at once.
    pub fn expire<F: FnMut(&ConnInfo)>(&mut self, now: Tick, budget: usize, mut on_expired: F) -> ExpireStats {
        let mut stats = ExpireStats::default();
        if !self.wheel_started {
            return stats;
        }
        let target = now.0;
        let lag = target.wrapping_sub(self.wheel_pos) as i32;
        if lag < 0 {
            return stats;
        }
        if lag as u32 >= WHEEL_SPAN_MS {
            // More than one turn behind: one visit of every slot, ending at `now`'s, finds everything due.
            self.wheel_pos = (target & !(WHEEL_SLOT_MS - 1)).wrapping_sub(WHEEL_SPAN_MS - WHEEL_SLOT_MS);
            self.cursor = NIL;
        }
        while (target.wrapping_sub(self.wheel_pos) as i32) >= 0 {
            let slot = slot_of(self.wheel_pos);
            if self.cursor == NIL && !self.is_occupied(slot) {
                // Skip to the next non-empty slot, or past `now`'s slot if none comes before it.
                let left = (target.wrapping_sub(self.wheel_pos) >> SLOT_SHIFT) + 1;
                let skip = self.next_occupied(slot, left).unwrap_or(left);
                self.wheel_pos = self.wheel_pos.wrapping_add(skip << SLOT_SHIFT);
                continue;
            }
            let head = self.capacity + slot;
            let mut node = if self.cursor == NIL { self.wheel_next(head) } else { self.cursor };
            while node != head {
                if stats.examined == budget {
                    self.cursor = node;
                    stats.pending = true;
                    return stats;
                }
                stats.examined += 1;
                let next = self.wheel_next(node);
                let expires = self.entries[node as usize].expires;
                if is_due(expires, target) {
                    let info = self.entries[node as usize].info();
                    self.release(node);
                    self.counters.expired += 1;
                    stats.expired += 1;
                    on_expired(&info);
                } else {
                    let proper = slot_of(slot_boundary_ceil(expires));
                    if proper != slot {
                        self.wheel_unlink(node);
                        self.wheel_link_slot(node, proper);
                    }
                }
                node = next;
            }
            self.cursor = NIL;
            self.wheel_pos = self.wheel_pos.wrapping_add(WHEEL_SLOT_MS);
        }
        stats
    }

    /// All live entries, in slab order. O(capacity); for a full-table dump to a restarting peer, take a
    /// bounded number per loop iteration and resume with [`iter_from`](Self::iter_from)`(last.index() + 1)`
    /// (entries created meanwhile behind the resume point are sent as "new" by sync anyway).
    pub fn iter(&self) -> Iter<'_> {
        self.iter_from(0)
    }

    /// Live entries from slab slot `start` on.
    pub fn iter_from(&self, start: usize) -> Iter<'_> {
        self.iter_range(start, self.entries.len())
    }

    /// Live entries in slab slots `start..end`: a bounded step of a walk (a full-table dump, a refresh),
    /// however empty the table is there.
    pub fn iter_range(&self, start: usize, end: usize) -> Iter<'_> {
        Iter { entries: &self.entries[..end.min(self.entries.len())], next: start }
    }

    /// Removes every entry of `server` in `service` (`ipvsadm --purge`-like) and reports each. Scans the
    /// whole slab (a few milliseconds at a million entries): from a packet loop, prefer
    /// [`remove_server_step`](Self::remove_server_step).
    pub fn remove_server<F: FnMut(&ConnInfo)>(
        &mut self,
        service: ServiceIndex,
        server: ServerIndex,
        mut on_removed: F,
    ) -> usize {
        let mut from = 0;
        let mut removed = 0;
        loop {
            let step = self.remove_server_step(service, server, from, usize::MAX, &mut on_removed);
            removed += step.removed;
            match step.next {
                Some(next) => from = next,
                None => return removed,
            }
        }
    }

    /// One bounded step of [`remove_server`](Self::remove_server): scans at most `max_scan` slab slots from
    /// `from`.
    pub fn remove_server_step<F: FnMut(&ConnInfo)>(
        &mut self,
        service: ServiceIndex,
        server: ServerIndex,
        from: usize,
        max_scan: usize,
        mut on_removed: F,
    ) -> PurgeStep {
        let end = from.saturating_add(max_scan).min(self.entries.len());
        let mut removed = 0;
        for n in from.min(end)..end {
            let entry = &self.entries[n];
            if entry.flags & F_USED != 0 && entry.service == service && entry.server == server {
                let info = entry.info();
                self.release(n as u32);
                self.counters.removed += 1;
                removed += 1;
                on_removed(&info);
            }
        }
        PurgeStep { removed, next: (end < self.entries.len()).then_some(end) }
    }

    // --- internals -------------------------------------------------------------------------------------

    /// Unlinks a live entry from everything and puts it on the free list.
    fn release(&mut self, n: u32) {
        let forward = self.entries[n as usize].forward();
        self.unlink_forward(n, &forward);
        if let Some(reply) = self.entries[n as usize].reply() {
            self.unlink_reply(n, &reply);
        }
        self.wheel_unlink(n);
        let entry = &mut self.entries[n as usize];
        entry.flags = 0;
        entry.wheel_next = self.free_head;
        entry.wheel_prev = NIL;
        self.free_head = n;
        self.len -= 1;
    }

    fn link_forward(&mut self, n: u32, key: &FlowV4) {
        let b = self.bucket(key);
        self.entries[n as usize].fwd_chain = self.fwd_index[b];
        self.fwd_index[b] = n;
    }

    fn link_reply(&mut self, n: u32, key: &FlowV4) {
        let b = self.bucket(key);
        self.entries[n as usize].rep_chain = self.rep_index[b];
        self.rep_index[b] = n;
    }

    fn unlink_forward(&mut self, n: u32, key: &FlowV4) {
        let b = self.bucket(key);
        let after = self.entries[n as usize].fwd_chain;
        if self.fwd_index[b] == n {
            self.fwd_index[b] = after;
            return;
        }
        let mut at = self.fwd_index[b];
        while at != NIL {
            let next = self.entries[at as usize].fwd_chain;
            if next == n {
                self.entries[at as usize].fwd_chain = after;
                return;
            }
            at = next;
        }
        unreachable!("entry {n} missing from its forward chain");
    }

    fn unlink_reply(&mut self, n: u32, key: &FlowV4) {
        let b = self.bucket(key);
        let after = self.entries[n as usize].rep_chain;
        if self.rep_index[b] == n {
            self.rep_index[b] = after;
            return;
        }
        let mut at = self.rep_index[b];
        while at != NIL {
            let next = self.entries[at as usize].rep_chain;
            if next == n {
                self.entries[at as usize].rep_chain = after;
                return;
            }
            at = next;
        }
        unreachable!("entry {n} missing from its reply chain");
    }

    /// Sets a new deadline. Later: only rewritten (the wheel moves the entry when its slot comes up).
    /// Earlier: relinked now, so it is not reaped late.
    fn reschedule(&mut self, n: u32, expires: u32) {
        let entry = &mut self.entries[n as usize];
        let old = entry.expires;
        entry.expires = expires;
        if (expires.wrapping_sub(old) as i32) < 0 {
            self.wheel_unlink(n);
            self.wheel_link(n);
        }
    }

    // Wheel lists are circular and doubly linked through one index space: `0..capacity` are entries,
    // `capacity + slot` is the list head of `slot`.

    #[inline(always)]
    fn wheel_next(&self, node: u32) -> u32 {
        if node < self.capacity {
            self.entries[node as usize].wheel_next
        } else {
            self.wheel[(node - self.capacity) as usize].next
        }
    }

    #[inline(always)]
    fn wheel_prev(&self, node: u32) -> u32 {
        if node < self.capacity {
            self.entries[node as usize].wheel_prev
        } else {
            self.wheel[(node - self.capacity) as usize].prev
        }
    }

    #[inline(always)]
    fn set_wheel_next(&mut self, node: u32, next: u32) {
        if node < self.capacity {
            self.entries[node as usize].wheel_next = next;
        } else {
            self.wheel[(node - self.capacity) as usize].next = next;
        }
    }

    #[inline(always)]
    fn set_wheel_prev(&mut self, node: u32, prev: u32) {
        if node < self.capacity {
            self.entries[node as usize].wheel_prev = prev;
        } else {
            self.wheel[(node - self.capacity) as usize].prev = prev;
        }
    }

    /// Links an entry into the slot of its deadline, or into the slot being processed if that boundary has
    /// already been passed (so it is reaped on this turn, not the next).
    fn wheel_link(&mut self, n: u32) {
        let mut boundary = slot_boundary_ceil(self.entries[n as usize].expires);
        if (boundary.wrapping_sub(self.wheel_pos) as i32) < 0 {
            boundary = self.wheel_pos;
        }
        self.wheel_link_slot(n, slot_of(boundary));
    }

    /// Appends at the tail, so an `expire` walk in progress in that slot still reaches the entry.
    fn wheel_link_slot(&mut self, n: u32, slot: u32) {
        let head = self.capacity + slot;
        let tail = self.wheel_prev(head);
        self.set_wheel_next(tail, n);
        self.set_wheel_prev(n, tail);
        self.set_wheel_next(n, head);
        self.set_wheel_prev(head, n);
        self.occupied[(slot >> 6) as usize] |= 1 << (slot & 63);
    }

    fn wheel_unlink(&mut self, n: u32) {
        let prev = self.wheel_prev(n);
        let next = self.wheel_next(n);
        self.set_wheel_next(prev, next);
        self.set_wheel_prev(next, prev);
        if self.cursor == n {
            self.cursor = next;
        }
        if prev == next && prev >= self.capacity {
            // Only the list head is left: the slot is empty.
            let slot = prev - self.capacity;
            self.occupied[(slot >> 6) as usize] &= !(1 << (slot & 63));
        }
    }

    #[inline(always)]
    fn is_occupied(&self, slot: u32) -> bool {
        self.occupied[(slot >> 6) as usize] & (1 << (slot & 63)) != 0
    }

    /// Distance (in slots, `1..limit`) from `slot` to the next non-empty slot, wrapping around the wheel.
    /// Reads at most one bitmap word per 64 slots.
    fn next_occupied(&self, slot: u32, limit: u32) -> Option<u32> {
        let mut distance = 1;
        while distance < limit {
            let at = (slot + distance) & WHEEL_MASK;
            let bits = self.occupied[(at >> 6) as usize] >> (at & 63);
            if bits != 0 {
                let found = distance + bits.trailing_zeros();
                return (found < limit).then_some(found);
            }
            distance += 64 - (at & 63);
        }
        None
    }
}

/// Iterator over live entries; see [`ConnTable::iter`].
pub struct Iter<'a> {
    entries: &'a [Entry],
    next: usize,
}

impl Iterator for Iter<'_> {
    type Item = (Handle, ConnInfo);

    fn next(&mut self) -> Option<(Handle, ConnInfo)> {
        while self.next < self.entries.len() {
            let n = self.next;
            self.next += 1;
            let entry = &self.entries[n];
            if entry.flags & F_USED != 0 {
                return Some((Handle(n as u32), entry.info()));
            }
        }
        None
    }
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}
