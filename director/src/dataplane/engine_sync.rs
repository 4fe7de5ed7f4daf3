//! Connection sync in the packet engine: what a worker emits and how it installs what the peer sent.
//!
//! While serving, the engine pushes a fixed-size [`SyncRecord`] into its outgoing ring when it creates a
//! connection (with the persistence template, for a persistent service), when a connection changes state,
//! and when one ends; it also walks its table slowly (`refresh`), re-sending every live connection once per
//! period, which renews the peer's timeouts and repairs records lost to a full ring. On a full-table
//! request it walks the table once more, a bounded number of slots per loop turn. Between packets it drains
//! the incoming ring (bounded too) and installs each record with its remaining timeout, keeping the
//! per-server ActiveConn/InActConn counters right. Nothing here allocates or locks.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;
use crate::config::ForwardMethod;
use crate::conntrack::{ConnFlags, ConnInfo, ConnState, Installed, SyncedConn, Tick};
use crate::dataplane::table::ServiceTable;
use crate::flow::{FlowV4, ServerIndex};
use crate::sync::{remaining_ms, RecordKind, SyncDrop, SyncRecord, WorkerPort};

/// Received records installed per loop turn.
const INSTALL_BUDGET: usize = 4096;
/// Table slots a full-table dump looks at per loop turn.
const DUMP_SLOTS: usize = 16_384;
/// Most table slots the refresh walk looks at per loop turn.
const REFRESH_MAX_SLOTS: usize = 16_384;

/// A worker's sync state.
pub struct EngineSync {
    port: WorkerPort,
    /// The full-table request being served: its generation, the next slot, and whether this director
    /// served when the request came (only a serving director's table is authoritative; one that stops
    /// serving meanwhile — handing the VIPs back to a restarted peer — still finishes its dump).
    dump: Option<(u64, usize, bool)>,
    refresh_period: Duration,
    refresh_next: usize,
    refreshed_at: Instant,
}

/// The record of a connection, or `None` if its server is no longer in the table.
fn connection_record(
    snapshot: &ServiceTable,
    kind: RecordKind,
    info: &ConnInfo,
    client_mac: [u8; 6],
    now: Tick,
) -> Option<SyncRecord> {
    let server = snapshot.server(info.server)?;
    Some(SyncRecord {
        kind,
        proto: info.forward.proto,
        state: info.state,
        method: info.method,
        client: info.forward.src,
        client_port: info.forward.src_port,
        vip: info.forward.dst,
        vip_port: info.forward.dst_port,
        server: server.address,
        server_port: server.port,
        client_mac,
        remaining_ms: remaining_ms(info.remaining(now)),
    })
}

impl Engine {
    /// Connects this worker to connection sync. `refresh_period`: how often each live connection is sent
    /// again while serving.
    pub fn attach_sync(&mut self, port: WorkerPort, refresh_period: Duration, now: Instant) {
        self.sync = Some(EngineSync { port, dump: None, refresh_period, refresh_next: 0, refreshed_at: now });
    }

    /// Emits the connection behind `handle` (new or changed), if this director serves.
    pub(super) fn sync_connection(&mut self, handle: crate::conntrack::Handle, kind: RecordKind, now: Tick) {
        if self.sync.is_none() || !self.serving() {
            return;
        }
        let info = self.conns.get(handle);
        let mac = self.client_macs.get(handle.index()).copied().unwrap_or_default();
        if let (Some(record), Some(sync)) =
            (connection_record(&self.snapshot, kind, &info, mac, now), self.sync.as_mut())
        {
            sync.port.emit(record);
        }
    }

    /// Emits the persistence template of a client just scheduled to `server` in persistent `service`.
    pub(super) fn sync_template(&mut self, service: usize, client: Ipv4Addr, server: ServerIndex) {
        if self.sync.is_none() || !self.serving() {
            return;
        }
        let (Some(entry), Some(server)) = (self.snapshot.services.get(service), self.snapshot.server(server)) else {
            return;
        };
        if entry.persistence.is_zero() {
            return;
        }
        let record = SyncRecord {
            kind: RecordKind::Template,
            proto: entry.proto,
            state: ConnState::None,
            method: server.forward,
            client,
            client_port: 0,
            vip: entry.vip,
            vip_port: entry.port,
            server: server.address,
            server_port: server.port,
            client_mac: [0; 6],
            remaining_ms: remaining_ms(entry.persistence),
        };
        if let Some(sync) = self.sync.as_mut() {
            sync.port.emit(record);
        }
    }

    /// Expires connections, emitting a "closed" record for each while serving; returns how many expired.
    pub(super) fn expire_and_sync(&mut self, tick: Tick, budget: usize) -> u64 {
        let worker = self.config.worker;
        let snapshot = Arc::clone(&self.snapshot);
        let serving = self.serving();
        let mut sync = self.sync.as_mut().filter(|_| serving);
        let mut expired = 0u64;
        self.conns.expire(tick, budget, |gone| {
            expired += 1;
            if let Some(server) = snapshot.server(gone.server) {
                let slot = &server.state.workers[worker];
                if gone.is_active() {
                    slot.active.fetch_sub(1, Ordering::Relaxed);
                } else {
                    slot.inactive.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if let Some(sync) = sync.as_mut() {
                if let Some(record) = connection_record(&snapshot, RecordKind::Closed, gone, [0; 6], tick) {
                    sync.port.emit(record);
                }
            }
        });
        expired
    }

    /// Once per loop turn: installs received records, serves a full-table request, refreshes.
    pub(super) fn sync_poll(&mut self, now: Instant, tick: Tick) {
        let Some(mut sync) = self.sync.take() else { return };
        for _ in 0..INSTALL_BUDGET {
            let Some(record) = sync.port.incoming.pop() else { break };
            self.install(&sync.port, &record, tick, now);
        }
        let serving = self.serving();
        let generation = sync.port.shared.dump_generation.load(Ordering::Acquire);
        let done = sync.port.counters().dumped_generation.load(Ordering::Relaxed);
        if generation > done && sync.dump.is_none_or(|(g, _, _)| g != generation) {
            sync.dump = Some((generation, 0, serving));
        }
        if let Some((generation, next, authoritative)) = sync.dump {
            // A standby has nothing to offer: its table is a copy of the peer's.
            let next = if authoritative { self.walk(&mut sync.port, next, DUMP_SLOTS, tick) } else { None };
            match next {
                Some(next) => sync.dump = Some((generation, next, authoritative)),
                None => {
                    sync.dump = None;
                    sync.port.counters().dumped_generation.store(generation, Ordering::Release);
                }
            }
        }
        if serving {
            let elapsed = now.saturating_duration_since(sync.refreshed_at).as_micros();
            let period = sync.refresh_period.as_micros().max(1);
            let slots = (self.conns.capacity() as u128 * elapsed / period).min(REFRESH_MAX_SLOTS as u128) as usize;
            if slots > 0 {
                sync.refreshed_at = now;
                sync.refresh_next = self.walk(&mut sync.port, sync.refresh_next, slots, tick).unwrap_or(0);
            }
        } else {
            sync.refreshed_at = now;
        }
        self.sync = Some(sync);
    }

    /// Emits every live connection in up to `slots` slots from `from`, stopping early (before the entry
    /// that did not fit) when the ring is full. Returns where to continue, `None` at the end of the table.
    fn walk(&self, port: &mut WorkerPort, from: usize, slots: usize, tick: Tick) -> Option<usize> {
        let end = from.saturating_add(slots).min(self.conns.capacity());
        for (handle, info) in self.conns.iter_range(from, end) {
            if port.outgoing.free() == 0 {
                return Some(handle.index());
            }
            let mac = self.client_macs.get(handle.index()).copied().unwrap_or_default();
            if let Some(record) = connection_record(&self.snapshot, RecordKind::Update, &info, mac, tick) {
                port.emit(record);
            }
        }
        (end < self.conns.capacity()).then_some(end)
    }

    fn count_installed(&self, server: ServerIndex, state: ConnState, delta: i32) {
        let Some(server) = self.snapshot.server(server) else { return };
        let slot = &server.state.workers[self.config.worker];
        let counter = if state.is_active() { &slot.active } else { &slot.inactive };
        if delta > 0 {
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Installs one record from the peer.
    fn install(&mut self, port: &WorkerPort, record: &SyncRecord, tick: Tick, now: Instant) {
        let forward = record.forward();
        if record.kind == RecordKind::Closed {
            if let Some(handle) = self.conns.lookup_forward(&forward) {
                let gone = self.conns.remove(handle);
                self.count_installed(gone.server, gone.state, -1);
            }
            port.counters().applied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some((service, entry)) = self.snapshot.find(record.vip, record.vip_port, record.proto) else {
            return port.count(SyncDrop::UnknownService);
        };
        let found = entry.servers.iter().enumerate().find(|(_, id)| {
            self.snapshot.server(**id).is_some_and(|s| s.address == record.server && s.port == record.server_port)
        });
        let Some((position, &server)) = found else { return port.count(SyncDrop::UnknownService) };
        if record.kind == RecordKind::Template {
            if let Some(templates) = self.services.get_mut(service).and_then(|s| s.persistence.as_mut()) {
                templates.insert(record.client, position, now);
            }
            port.counters().applied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let reply = (record.method == ForwardMethod::Nat).then_some(FlowV4 {
            src: record.server,
            dst: record.client,
            src_port: record.server_port,
            dst_port: record.client_port,
            proto: record.proto,
        });
        let synced = SyncedConn {
            forward,
            reply,
            service: service as u16,
            server,
            method: record.method,
            state: record.state,
            flags: ConnFlags::NONE,
            remaining: record.remaining(),
        };
        let handle = match self.conns.install_synced(&synced, tick) {
            Ok(Installed::New(handle)) => handle,
            Ok(Installed::Updated { handle, previous }) => {
                self.count_installed(previous.server, previous.state, -1);
                handle
            }
            Err(_) => return port.count(SyncDrop::InstallFailed),
        };
        self.count_installed(server, record.state, 1);
        if let Some(mac) = self.client_macs.get_mut(handle.index()) {
            *mac = record.client_mac;
        }
        port.counters().applied.fetch_add(1, Ordering::Relaxed);
    }
}
