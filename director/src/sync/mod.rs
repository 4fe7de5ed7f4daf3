//! Connection synchronisation between the two directors of a pair.
//!
//! The serving director streams its connection-table changes to the other — new connections (with their
//! persistence templates), state changes and closes, each with its remaining timeout — so that the standby
//! can take over every open connection. Whoever serves sends, so after a failback nothing is lost either; a
//! director that (re)connects asks its peer for the full table, which covers a restarted, empty director.
//!
//! - [`record`]: one change, a fixed 32-byte layout.
//! - [`frame`]: frames on the TCP stream, HMAC-SHA256 with the shared key, replay protection.
//! - [`outbox`]: batching, the rate bound and coalescing (the latest state of a connection wins).
//! - [`ring`], [`hub`]: the lock-free rings between the data-path workers and the sync task, and the
//!   counters. The workers' side lives in `dataplane/engine_sync.rs`.
//! - [`runtime`]: the tokio task: listens for the peer, connects to it, reconnects with backoff.
//!
//! Everything but `runtime` is pure and tested without sockets.

pub mod frame;
pub mod hub;
pub mod outbox;
pub mod record;
pub mod ring;
pub mod runtime;

pub use hub::{hub, SyncDrop, SyncShared, SyncStatus, TaskPorts, WorkerPort};
pub use record::{remaining_ms, RecordKind, SyncRecord};
