//! The connection table of one data-plane worker.
//!
//! Flows are steered to workers by client address, so every worker owns one [`ConnTable`] outright: no
//! locks, no atomics. Everything is allocated (and touched) in [`ConnTable::new`]; capacity is a hard limit,
//! and the per-packet operations — [`lookup_forward`](ConnTable::lookup_forward),
//! [`lookup_reply`](ConnTable::lookup_reply), [`insert`](ConnTable::insert),
//! [`on_packet`](ConnTable::on_packet), [`remove`](ConnTable::remove), [`expire`](ConnTable::expire),
//! [`install_synced`](ConnTable::install_synced) — never allocate (`tests/conntrack_no_alloc.rs` checks).
//! Time is passed in as a [`Tick`] (milliseconds on the worker's monotonic clock), so the table is pure and
//! tests run on simulated time.
//!
//! # Per packet
//!
//! ```text
//! input (client → VIP):   match table.lookup_forward(&flow) {
//!     Some(h) => table.on_packet(h, Direction::Input, flags, now)          -> StateChange
//!     None if tcp && !may_create(flags, service.sloppy) => { table.count_untracked_drop(); drop }
//!     None => { schedule a server; h = table.insert(flow, reply_key_if_nat, svc, srv, method, now)?
//!               (Err(Full) -> drop, counted); table.on_packet(h, Direction::Input, flags, now) }
//! }
//! output (NAT, real server → client): table.lookup_reply(&flow) -> on_packet(h, Direction::Output, ..)
//! every loop iteration: table.expire(now, budget, |gone| { counters, sync "closed" })
//! ```
//!
//! [`StateChange`] tells the caller when an entry moved between LVS's ActiveConn (ESTABLISHED TCP) and
//! InActConn (everything else, UDP included); inserted entries start inactive, and expired/removed entries
//! are reported with their last state. The caller keeps the per-server counters and emits connection-sync
//! messages (new / changed / closed) from these; the standby installs what it receives with
//! [`install_synced`](ConnTable::install_synced), which keeps the remaining timeout. A full dump for a
//! restarted peer walks [`iter`](ConnTable::iter) / [`iter_from`](ConnTable::iter_from) in bounded chunks.
//!
//! # Layout and memory
//!
//! * A slab of [`ENTRY_BYTES`] (56) byte entries with a free list. An entry holds the forward key
//!   (client → VIP), the reply key (real server → client, NAT), service and server indexes, forwarding
//!   method, TCP state, flags, deadline, input packet count, and `u32` links: timer wheel prev/next and one
//!   hash-chain link per key. Both keys of a NAT entry lead to the same entry.
//! * Two chained hash indexes (forward, reply) of `u32` bucket heads, each a power of two ≥ 2 × capacity,
//!   keyed by a seeded hash (the `hash` module explains the choice and what it resists).
//! * A hashed timing wheel (fixed: 1 MiB of list heads, a 16 KiB bitmap of non-empty slots) drives expiry
//!   incrementally; see [`ConnTable::expire`].
//!
//! At a capacity of 1 000 000 that is 56 + 16.8 (indexes: 2 × 4 bytes × 2²¹ buckets / 10⁶) + 1.1 (wheel)
//! ≈ 74 bytes per entry, within the 128-byte budget; `bench/conntrack-memory.sh` measures it (with RSS) and
//! the insert, lookup and expire rates.
//!
//! # TCP states and timeouts
//!
//! As IPVS: see [`tcp`] for the state machine (two directions for NAT, input-only for DR/TUN, the
//! `secure_tcp` variant) and [`Timeouts`] for the defaults (ESTABLISHED 900 s, SYN_RECV 60 s, FIN_WAIT and
//! TIME_WAIT 120 s, CLOSE 10 s, UDP 300 s, …), all configurable. Whether a packet without an entry may
//! create one is [`may_create`] (SYN only, or anything but RST with `sloppy`).

mod hash;
mod table;
pub mod tcp;
mod time;

#[cfg(test)]
mod tests;

pub use table::{
    random_seed, ConnFlags, ConnInfo, ConnTable, Counters, ExpireStats, Handle, IndexStats, InsertError, Installed,
    Iter, PurgeStep, StateChange, SyncedConn, TableError, ENTRY_BYTES, MAX_CAPACITY, WHEEL_SLOTS, WHEEL_SLOT_MS,
    WHEEL_SPAN_MS,
};
pub use tcp::{may_create, opens_over, ConnState, Direction, TcpFlags};
pub use time::{Tick, TimeoutTooLong, Timeouts};
