//! Data-plane counters: per-worker atomics, written only by their worker, summed at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dataplane::table::ServiceTable;
use crate::wire::WireError;

/// Room for one counter per parser reason ([`WireError::ALL_REASONS`]); a test checks it is enough.
pub const MALFORMED_SLOTS: usize = 32;
use crate::dataplane::worker::LoopCounters;

/// Why the data plane refused a packet that was for it. Each has a counter
/// (`fulcrum_dropped_packets_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A frame that does not parse (too short, bad header length, …) at any layer.
    Malformed,
    /// An IPv4 fragment for a VIP: ports are unknown, so it cannot be scheduled.
    Fragment,
    /// A TCP packet that is not a SYN and has no connection entry (and the service is not `sloppy`).
    NoConnection,
    /// The connection table is full.
    TableFull,
    /// No real server can take a new connection (none configured, or every weight is 0).
    NoServer,
    /// The chosen real server's MAC is not resolved yet.
    Unresolved,
    /// The connection's real server was removed with `--purge`.
    ServerGone,
    /// The ring truncated the frame (larger than a ring slot).
    Truncated,
    /// An 802.1Q-tagged frame for a VIP (the ring strips tags; tagged VIP traffic is not supported).
    Vlan,
    /// Too big for the tunnel and not segmentable: an ICMP "fragmentation needed" was sent instead.
    TooBig,
    /// The worker's scratch buffers were exhausted in this batch.
    NoBuffer,
    /// A NAT connection whose reply key (client address and port, real server address and port) a live
    /// connection of another service already holds: the server's replies could not be told apart.
    ReplyClash,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::NoConnection,
        DropReason::TableFull,
        DropReason::NoServer,
        DropReason::Unresolved,
        DropReason::ServerGone,
        DropReason::Truncated,
        DropReason::Vlan,
        DropReason::TooBig,
        DropReason::NoBuffer,
        DropReason::ReplyClash,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::NoConnection => "no_connection",
            DropReason::TableFull => "table_full",
            DropReason::NoServer => "no_server",
            DropReason::Unresolved => "unresolved",
            DropReason::ServerGone => "server_gone",
            DropReason::Truncated => "truncated",
            DropReason::Vlan => "vlan",
            DropReason::TooBig => "too_big",
            DropReason::NoBuffer => "no_buffer",
            DropReason::ReplyClash => "reply_clash",
        }
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerCounters {
    pub looped: LoopCounters,
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Malformed frames by the parser's reason, indexed as [`WireError::ALL_REASONS`].
    pub malformed: [AtomicU64; MALFORMED_SLOTS],
    pub arp_replies: AtomicU64,
    pub garps: AtomicU64,
    pub arp_probes: AtomicU64,
    pub connections_created: AtomicU64,
    /// Closing entries ended early by a new connection on the same 5-tuple (a reused client port).
    pub connections_reused: AtomicU64,
    pub connections_expired: AtomicU64,
    pub table_entries: AtomicU64,
    pub table_capacity: AtomicU64,
    pub icmp_forwarded: AtomicU64,
}

impl WorkerCounters {
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A frame the parser refused: counted under `malformed` and under the parser's own reason.
    pub fn count_malformed(&self, error: &WireError) {
        self.count_drop(DropReason::Malformed);
        let reason = error.reason();
        if let Some(slot) = WireError::ALL_REASONS.iter().position(|r| *r == reason).and_then(|i| self.malformed.get(i))
        {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Publishes the data plane's counters; called by the metrics endpoint just before it renders.
pub fn publish(workers: &[std::sync::Arc<WorkerCounters>], table: &ServiceTable) {
    let sum = |f: &dyn Fn(&WorkerCounters) -> u64| workers.iter().map(|w| f(w)).fold(0u64, u64::saturating_add);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for reason in DropReason::ALL {
        metrics::counter!("fulcrum_dropped_packets_total", "reason" => reason.label())
            .absolute(sum(&|w| load(&w.drops[reason as usize])));
    }
    for (i, reason) in WireError::ALL_REASONS.iter().enumerate().take(MALFORMED_SLOTS) {
        let count = sum(&|w| load(&w.malformed[i]));
        if count > 0 {
            metrics::counter!("fulcrum_malformed_frames_total", "reason" => *reason).absolute(count);
        }
    }
    metrics::counter!("fulcrum_received_packets_total").absolute(sum(&|w| load(&w.looped.received)));
    metrics::counter!("fulcrum_transmitted_packets_total").absolute(sum(&|w| load(&w.looped.transmitted)));
    metrics::counter!("fulcrum_transmit_errors_total").absolute(sum(&|w| load(&w.looped.transmit_errors)));
    metrics::counter!("fulcrum_ring_packets_total").absolute(sum(&|w| load(&w.looped.ring_packets)));
    metrics::counter!("fulcrum_ring_drops_total").absolute(sum(&|w| load(&w.looped.ring_drops)));
    metrics::counter!("fulcrum_arp_replies_total").absolute(sum(&|w| load(&w.arp_replies)));
    metrics::counter!("fulcrum_gratuitous_arps_total").absolute(sum(&|w| load(&w.garps)));
    metrics::counter!("fulcrum_connections_expired_total").absolute(sum(&|w| load(&w.connections_expired)));
    metrics::counter!("fulcrum_connections_reused_total").absolute(sum(&|w| load(&w.connections_reused)));
    metrics::counter!("fulcrum_icmp_forwarded_total").absolute(sum(&|w| load(&w.icmp_forwarded)));
    metrics::gauge!("fulcrum_connection_table_entries").set(sum(&|w| load(&w.table_entries)) as f64);
    metrics::gauge!("fulcrum_connection_table_capacity").set(sum(&|w| load(&w.table_capacity)) as f64);
    for service in &table.services {
        let service_label = format!(
            "{}:{}/{}",
            service.vip,
            service.port,
            match service.proto {
                crate::flow::Proto::Tcp => "tcp",
                crate::flow::Proto::Udp => "udp",
            }
        );
        for id in &service.servers {
            let Some(server) = table.server(*id) else { continue };
            let labels =
                [("service", service_label.clone()), ("server", format!("{}:{}", server.address, server.port))];
            let state = &server.state;
            metrics::counter!("fulcrum_forwarded_packets_total", &labels).absolute(state.sum(|w| &w.packets));
            metrics::counter!("fulcrum_forwarded_bytes_total", &labels).absolute(state.sum(|w| &w.bytes));
            metrics::counter!("fulcrum_connections_total", &labels).absolute(state.sum(|w| &w.connections_total));
            metrics::counter!("fulcrum_connections_established_total", &labels)
                .absolute(state.sum(|w| &w.connections_established));
            metrics::gauge!("fulcrum_active_connections", &labels).set(f64::from(state.active()));
            metrics::gauge!("fulcrum_inactive_connections", &labels).set(f64::from(state.inactive()));
            metrics::gauge!("fulcrum_server_configured_weight", &labels).set(f64::from(server.configured_weight));
            metrics::gauge!("fulcrum_server_effective_weight", &labels)
                .set(f64::from(state.effective_weight.load(Ordering::Relaxed)));
            // 0 while unknown (never sampled, stale reports, feedback off), so that a stale figure never lingers.
            metrics::gauge!("fulcrum_server_capacity_connections_per_second", &labels)
                .set(f64::from(state.capacity_per_s.load(Ordering::Relaxed)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parser_reason_has_a_counter() {
        assert!(WireError::ALL_REASONS.len() <= MALFORMED_SLOTS);
        let counters = WorkerCounters::default();
        let error = WireError::BadVersion { layer: crate::wire::Layer::Ipv4, version: 6 };
        counters.count_malformed(&error);
        let at = WireError::ALL_REASONS.iter().position(|r| *r == error.reason()).unwrap();
        assert_eq!(counters.malformed[at].load(Ordering::Relaxed), 1);
        assert_eq!(counters.drops[DropReason::Malformed as usize].load(Ordering::Relaxed), 1);
    }
}
