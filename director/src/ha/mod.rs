//! The director-pair heartbeat protocol: a sans-I/O state machine ([`Ha`]).
//!
//! Nothing here touches a socket, a clock or a thread. The I/O shell feeds inputs (datagrams, timeouts,
//! load, tiebreaker results, operator commands) with the current [`Instant`] and drains outputs: datagrams
//! ([`Ha::poll_transmit`]), the next wake-up ([`Ha::poll_timeout`]) and [`Action`]s ([`Ha::poll_action`]:
//! start or stop serving, gratuitous ARPs, tiebreaker checks, notify hooks). The shape follows quinn-proto's
//! `Connection`; tests drive two machines over simulated links with a virtual clock (`tests/sim.rs`).
//!
//! # Messages
//!
//! One heartbeat layout (see [`packet`]), sent on every configured path (one UDP destination per path, so a
//! second link can carry them) with the same sequence number: the first copy to arrive counts, later copies
//! are counted as duplicates. Each carries node id, priority, state, sequence number, the sender's current
//! period and tolerance, a load summary and a report on the stream received from the peer (highest
//! sequence, count received, jitter), and is authenticated with HMAC-SHA256 over a shared key.
//!
//! # Replay protection
//!
//! Every start draws a random 64-bit boot id. Within a boot id the sequence numbers must strictly increase
//! (equal: `duplicate`, lower: `replayed`). A heartbeat with a boot id other than the peer's current one is
//! accepted (a restarted peer) only if it authenticates **and** echoes this node's own current boot id,
//! which proves it was made after this node started; otherwise it is counted `unverified_boot` (and its
//! boot id is echoed in our next heartbeat, so a genuine restarted peer is verified one exchange later).
//! Boot ids the peer used before are refused for good (`stale_boot`; the last 16 are remembered). A
//! heartbeat carrying our own node id (a reflection) is refused (`own_node_id`). Every refused datagram is
//! counted by reason in [`Counters::rejected`] and is dropped before it can touch any state.
//!
//! # Failure detection (the receiver's rule)
//!
//! A k × period rule with a jitter margin. On each accepted heartbeat arriving at `t` with advertised period
//! `P`, announced period `P'` and tolerance `n`:
//!
//! ```text
//! deadline = t + (n + 1) · max(P, P') + max(margin_min, 4 · J)
//! J ← J + (max(0, gap − s · P_prev) − J) / 16   (RFC 3550-style, lateness only, per accepted heartbeat)
//! ```
//!
//! where `gap` is the inter-arrival time since the previous accepted heartbeat, `s` the sequence-number
//! difference (lost heartbeats in between) and `P_prev` the period the *previous* heartbeat advertised (the
//! one that governed this gap). A heartbeat advertising another period than the previous one is not
//! sampled, and early arrivals count as zero: the margin protects the deadline, which only lateness
//! threatens, and heartbeats are early by design when triggered (state change, echo) or when the sender
//! shortens its period at once under load — counting them stretched the deadline exactly then. Defaults: `n = 3` (three consecutive
//! losses are ridden out, the fourth fails over), `margin_min = 3 ms`. The peer is declared dead when the
//! deadline passes; with the high-load period of 20 ms that is 3·20 + latency + 3 ms to 4·20 + latency +
//! 3 ms after the peer's death (about 63..83 ms on a LAN).
//!
//! # Adaptive period (the sender's rule)
//!
//! The MASTER picks its period from its forwarding load: `f = min(1, max(pps / high.pps, conns /
//! high.conns))`, floored to eighths, `P = P_max · (P_min / P_max)^f` (geometric, 1000 ms idle … 20 ms at
//! full load by default). Other states use `P_max`. At `P_max` a node sends 1 heartbeat/s per path (2/s
//! per direction over two paths). The peer's reports adapt it to the path: when the reported loss (EWMA
//! of `1 − Δcount / Δseq` per report) reaches `degraded_loss` (1 %) or the reported jitter reaches P/4, the
//! period is halved (not below `P_min`) and the tolerance raised to keep the detection budget:
//! `n' = ceil((n + 1) · P / P_halved) − 1` (more, faster heartbeats in the same time: a loss burst must be
//! twice as long to fail over). It returns to normal when loss < degraded_loss/2 and jitter < P/8.
//!
//! **Period changes never cause a false failover.** Shortening takes effect at once: every gap after it is
//! shorter than any deadline the receiver holds. Lengthening is announced first: the sender keeps sending
//! at the old period for `n_old + 1` heartbeats carrying `next period = P_new` (the receiver applies
//! `max(P, P')`), and only the last of them advertises `P_new` as its own period. A receiver that gets any
//! of them holds a deadline valid for the longer gaps; one that loses all `n_old + 1` would have failed
//! over under the old period anyway. (The naive scheme — first heartbeat with the long period sent at the
//! old rate, then the long gaps — fails over whenever that one heartbeat is lost.)
//!
//! # States and decisions
//!
//! INIT (on start, for `init_hold` or until the peer is verified), BACKUP, MASTER, FAULT. Ranks: in
//! elections and dual-master contests `(not demoted, promoted, priority, node id)` compared
//! lexicographically, higher wins; preemption compares `(priority, node id)`.
//!
//! - INIT/BACKUP with a live peer: peer MASTER → BACKUP, unless the peer yields (demoted: take over), we
//!   are promoted and it is not, or preemption applies (`preempt` on, we outrank it, it is not promoted,
//!   it did not take mastership by failover or `auto_failback` is on; held for `preempt_delay`). Peer
//!   INIT/BACKUP → the higher rank takes over. Peer FAULT → take over.
//! - No live peer (deadline passed, or INIT hold over) → take over.
//! - Taking over always first emits [`Action::CheckTiebreaker`]; `tiebreaker_result(reachable = true)`
//!   completes it, `false` (or no answer within `tiebreaker_timeout`) goes to FAULT instead.
//! - MASTER without a live peer checks the tiebreaker at once when the peer's deadline passes, then every
//!   `tiebreaker_interval`; unreachable → FAULT.
//!   FAULT re-checks at the same interval and leaves FAULT when reachable.
//! - Two MASTERs that hear each other: the lower rank steps down at once (BACKUP), the winner emits
//!   [`Action::SendGratuitousArp`] and a heartbeat immediately. A MASTER that hears its peer again after
//!   losing it (or hears a new boot of it) also re-sends gratuitous ARPs: the peer may have served
//!   meanwhile, and may have stepped down before its MASTER heartbeat got through.
//!
//! Every transition emits `Become*`/`EnterFault`, then [`Action::RunNotify`]; becoming MASTER also emits
//! `SendGratuitousArp`.
//!
//! # Manual switchover (make-before-break)
//!
//! [`Ha::demote`] sets the YIELD flag; a MASTER keeps serving. The peer (if alive and not in FAULT) sees
//! a yielding MASTER, checks its tiebreaker and becomes MASTER — both serve for about one one-way delay —
//! and the demoted node steps down only on seeing the peer's MASTER heartbeat. With no live peer the
//! demoted master keeps serving (there is no one to hand over to). Demotion is sticky: the node still
//! takes over if the peer dies (and hands back when it returns), never preempts, and
//! [`Ha::promote`]/[`Ha::release`] end it. [`Ha::promote`] sets the CLAIM flag: the node takes over from a
//! MASTER peer (tiebreaker first), then the peer sees a claiming MASTER, loses the contest and steps
//! down; a claiming master is never preempted. [`Ha::release`] returns to automatic behaviour.
//!
//! # Cutting every heartbeat path (documented outcome, tested)
//!
//! Each side declares the other dead after its deadline. The BACKUP asks its tiebreaker; the MASTER,
//! now without a peer, re-checks it within `tiebreaker_interval`.
//! - Tiebreakers reachable from both: **both are MASTER** (split brain: reachability of the gateway
//!   cannot tell which side the clients see). As soon as any path carries heartbeats again the dual-master
//!   rule resolves it at once: the lower rank steps down and the winner re-sends gratuitous ARPs.
//! - Reachable from one side only: that side is (or stays) MASTER, the other goes to FAULT and stops
//!   serving; when paths return the FAULT side recovers to BACKUP once its tiebreaker is reachable.

mod machine;
pub mod packet;
pub mod runtime;

#[cfg(test)]
mod tests;

pub use machine::Ha;
pub use packet::{DecodeError, Heartbeat};

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A director's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    Init,
    Backup,
    Master,
    Fault,
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// No peer heard within the INIT hold (or ever).
    NoPeer,
    /// Both alive and neither MASTER: ranks decided.
    Election,
    /// The peer is MASTER.
    PeerIsMaster,
    /// The peer's deadline passed: failover.
    PeerDead,
    /// The peer reports FAULT: failover.
    PeerFault,
    /// We outrank the MASTER peer and preemption applies.
    Preempt,
    /// The MASTER peer is demoted and yields to us.
    Handover,
    /// We yielded (or the peer was promoted) and the peer is MASTER now.
    HandedOver,
    /// We were promoted.
    Promoted,
    /// Two masters heard each other and the peer outranks us.
    DualMasterLost,
    /// The tiebreakers are unreachable (or did not answer in time).
    TiebreakerUnreachable,
    /// The tiebreakers are reachable again.
    Recovered,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Start serving: `Dataplane::set_serving(true)`.
    BecomeMaster { reason: Reason },
    /// Stop serving.
    BecomeBackup { reason: Reason },
    /// Stop serving; something is wrong locally.
    EnterFault { reason: Reason },
    /// Announce the VIPs (again).
    SendGratuitousArp,
    /// Ping the tiebreakers and answer with [`Ha::tiebreaker_result`].
    CheckTiebreaker,
    /// Run the notify hook for the new state.
    RunNotify(State),
}

/// A datagram to send on heartbeat path `path` (an index into the configured peer addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transmit {
    pub path: usize,
    pub bytes: Vec<u8>,
}

/// The forwarding load, as reported by the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSummary {
    /// Packets forwarded per second.
    pub pps: u64,
    /// Tracked connections.
    pub conns: u64,
}

/// One input, for replaying scenarios from files ([`Ha::handle`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    Datagram { path: usize, bytes: Vec<u8> },
    Timeout,
    Load(LoadSummary),
    Tiebreaker { reachable: bool },
    Promote,
    Demote,
    Release,
}

/// Configuration of one director of the pair. Durations are written in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaConfig {
    /// This director's id; the two must differ.
    pub node_id: u32,
    /// 1..=255, higher is preferred.
    pub priority: u8,
    /// The shared HMAC key (at least 16 bytes).
    pub key: Vec<u8>,
    /// Number of heartbeat paths (the shell maps index → peer address).
    pub paths: usize,
    #[serde(with = "ms")]
    pub period_min: Duration,
    #[serde(with = "ms")]
    pub period_max: Duration,
    /// Load at which the period reaches `period_min`.
    pub high_load: LoadSummary,
    /// Consecutive losses the peer must ride out (n in the rule).
    pub tolerance: u8,
    #[serde(with = "ms")]
    pub margin_min: Duration,
    /// Reported loss ratio from which the path counts as degraded.
    pub degraded_loss: f64,
    pub preempt: bool,
    #[serde(with = "ms")]
    pub preempt_delay: Duration,
    pub auto_failback: bool,
    #[serde(with = "ms")]
    pub init_hold: Duration,
    #[serde(with = "ms")]
    pub tiebreaker_timeout: Duration,
    #[serde(with = "ms")]
    pub tiebreaker_interval: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            node_id: 1,
            priority: 100,
            key: Vec::new(),
            paths: 1,
            period_min: Duration::from_millis(20),
            period_max: Duration::from_millis(1000),
            high_load: LoadSummary { pps: 50_000, conns: 20_000 },
            tolerance: 3,
            margin_min: Duration::from_millis(3),
            degraded_loss: 0.01,
            preempt: true,
            preempt_delay: Duration::ZERO,
            auto_failback: true,
            init_hold: Duration::from_millis(3000),
            tiebreaker_timeout: Duration::from_millis(500),
            tiebreaker_interval: Duration::from_millis(1000),
        }
    }
}

/// A configuration the machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("priority must be 1..=255")]
    Priority,
    #[error("the key must have at least 16 bytes")]
    Key,
    #[error("at least one heartbeat path is needed")]
    Paths,
    #[error("periods must satisfy 1 ms <= period_min <= period_max <= 60 s")]
    Periods,
    #[error("tolerance must be at most {}", packet::MAX_TOLERANCE / 2)]
    Tolerance,
    #[error("degraded_loss must be in (0, 1]")]
    DegradedLoss,
}

impl HaConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        if self.priority == 0 {
            return Err(ConfigError::Priority);
        }
        if self.key.len() < 16 {
            return Err(ConfigError::Key);
        }
        if self.paths == 0 {
            return Err(ConfigError::Paths);
        }
        if self.period_min > self.period_max
            || !packet::PERIOD_RANGE_US.contains(&us(self.period_min))
            || !packet::PERIOD_RANGE_US.contains(&us(self.period_max))
        {
            return Err(ConfigError::Periods);
        }
        if self.tolerance > packet::MAX_TOLERANCE / 2 {
            return Err(ConfigError::Tolerance);
        }
        if !(self.degraded_loss > 0.0 && self.degraded_loss <= 1.0) {
            return Err(ConfigError::DegradedLoss);
        }
        Ok(())
    }
}

/// Refused datagrams, one counter per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectCounters {
    /// Path index not configured.
    pub bad_path: u64,
    /// Not [`packet::MESSAGE_LEN`] bytes (truncated, padded, garbage).
    pub bad_length: u64,
    pub bad_version: u64,
    /// Wrong key, forged or corrupted.
    pub bad_mac: u64,
    /// Authenticated but a field is out of range.
    pub malformed: u64,
    /// Our own node id (a reflection).
    pub own_node_id: u64,
    /// Sequence number below the last accepted one (replay, or a copy reordered behind a newer one).
    pub replayed: u64,
    /// Sequence number equal to the last accepted one (the copy over another path).
    pub duplicate: u64,
    /// A boot id the peer used before.
    pub stale_boot: u64,
    /// A new boot id that does not echo our boot id (freshness unproven).
    pub unverified_boot: u64,
}

impl RejectCounters {
    pub fn total(&self) -> u64 {
        self.bad_path
            + self.bad_length
            + self.bad_version
            + self.bad_mac
            + self.malformed
            + self.own_node_id
            + self.replayed
            + self.duplicate
            + self.stale_boot
            + self.unverified_boot
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Datagrams handed to the shell (one per path per heartbeat).
    pub sent: u64,
    /// Heartbeats accepted.
    pub received: u64,
    pub rejected: RejectCounters,
    /// State changes.
    pub transitions: u64,
    /// Takeovers because the peer died or reported FAULT.
    pub failovers: u64,
    /// Times the peer's deadline passed.
    pub peer_lost: u64,
}

/// What we know of the peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: u32,
    pub boot_id: u64,
    pub state: State,
    pub priority: u8,
    /// Within its deadline.
    pub alive: bool,
    pub demoted: bool,
    pub promoted: bool,
    /// Its advertised period, announced period and tolerance.
    #[serde(with = "ms")]
    pub period: Duration,
    #[serde(with = "ms")]
    pub next_period: Duration,
    pub tolerance: u8,
    pub load: LoadSummary,
    /// The current detection budget: deadline − last arrival.
    #[serde(with = "ms")]
    pub deadline: Duration,
    /// Measured jitter of its stream.
    pub jitter_us: u64,
    /// Its last sequence number and how many of its heartbeats arrived (this boot).
    pub last_seq: u64,
    pub received: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaStatus {
    pub node_id: u32,
    pub boot_id: u64,
    pub state: State,
    pub priority: u8,
    pub demoted: bool,
    pub promoted: bool,
    /// Our current period, announced period and tolerance.
    #[serde(with = "ms")]
    pub period: Duration,
    #[serde(with = "ms")]
    pub next_period: Duration,
    pub tolerance: u8,
    /// Loss of our stream as reported by the peer (EWMA) and whether the path counts as degraded.
    pub reported_loss: f64,
    pub degraded: bool,
    pub peer: Option<PeerStatus>,
    pub counters: Counters,
}

/// Durations as (fractional) milliseconds.
mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom)
    }
}
