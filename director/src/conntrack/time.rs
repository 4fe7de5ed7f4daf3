//! The table's clock and the per-state timeouts.

use std::time::{Duration, Instant};

use super::tcp::ConnState;

/// A point on a table's monotonic clock, in milliseconds, wrapping at 2³² ms (≈ 49.7 days).
///
/// The origin is the caller's choice (typically the worker's start, see [`Tick::since`]); it must be the
/// same for every call on one table, and time must never go backwards. Ticks are compared with serial-number
/// arithmetic (like the kernel's jiffies), so the wrap is harmless as long as two ticks being compared are
/// less than 2³¹ ms (≈ 24.8 days) apart — which holds because every timeout is at most [`Timeouts::MAX`]
/// and the owner calls [`ConnTable::expire`](super::ConnTable::expire) on every loop iteration.
///
/// `Tick` deliberately does not implement `Ord`: use [`Tick::is_before`] / [`Tick::millis_since`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tick(pub u32);

impl Tick {
    pub const fn from_millis(ms: u32) -> Tick {
        Tick(ms)
    }

    pub const fn from_secs(secs: u32) -> Tick {
        Tick(secs.wrapping_mul(1000))
    }

    /// The tick of `now` on a clock whose origin is `base` (truncated to whole milliseconds, wrapping).
    pub fn since(base: Instant, now: Instant) -> Tick {
        Tick(now.saturating_duration_since(base).as_millis() as u32)
    }

    pub const fn as_millis(self) -> u32 {
        self.0
    }

    /// `self + ms`, wrapping.
    pub const fn add_millis(self, ms: u32) -> Tick {
        Tick(self.0.wrapping_add(ms))
    }

    /// Signed distance from `earlier` to `self` in milliseconds (negative when `self` is before `earlier`).
    pub const fn millis_since(self, earlier: Tick) -> i32 {
        self.0.wrapping_sub(earlier.0) as i32
    }

    /// Strictly before `other`.
    pub const fn is_before(self, other: Tick) -> bool {
        self.millis_since(other) < 0
    }
}

/// `tick + d`, wrapping; `d` is rounded up to whole milliseconds.
impl std::ops::Add<Duration> for Tick {
    type Output = Tick;
    fn add(self, d: Duration) -> Tick {
        self.add_millis(ceil_millis(d) as u32)
    }
}

/// Whole milliseconds in `d`, rounded up (a timeout is never shortened).
pub(crate) fn ceil_millis(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

/// How long an entry lives after the last packet that left it in a given state: the TCP states as IPVS
/// (`ipvsadm --set tcp tcpfin udp` sets `tcp_established`, `tcp_fin_wait` and `udp`), plus UDP.
///
/// Defaults are IPVS's. Each value must be at most [`Timeouts::MAX`]; sub-millisecond parts round up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Entry just created, no packet processed yet (IPVS: 2 s).
    pub tcp_none: Duration,
    /// 15 min.
    pub tcp_established: Duration,
    /// 2 min.
    pub tcp_syn_sent: Duration,
    /// 1 min.
    pub tcp_syn_recv: Duration,
    /// 2 min.
    pub tcp_fin_wait: Duration,
    /// 2 min.
    pub tcp_time_wait: Duration,
    /// 10 s.
    pub tcp_close: Duration,
    /// 1 min.
    pub tcp_close_wait: Duration,
    /// 30 s.
    pub tcp_last_ack: Duration,
    /// 2 min.
    pub tcp_listen: Duration,
    /// 2 min.
    pub tcp_synack: Duration,
    /// 5 min.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            tcp_none: s(2),
            tcp_established: s(15 * 60),
            tcp_syn_sent: s(2 * 60),
            tcp_syn_recv: s(60),
            tcp_fin_wait: s(2 * 60),
            tcp_time_wait: s(2 * 60),
            tcp_close: s(10),
            tcp_close_wait: s(60),
            tcp_last_ack: s(30),
            tcp_listen: s(2 * 60),
            tcp_synack: s(120),
            udp: s(5 * 60),
        }
    }
}

/// A timeout longer than [`Timeouts::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {state} timeout of {value:?} exceeds the maximum of {max:?}", max = Timeouts::MAX)]
pub struct TimeoutTooLong {
    pub state: &'static str,
    pub value: Duration,
}

impl Timeouts {
    /// The longest accepted timeout: 7 days, far inside the 2³¹ ms window [`Tick`] comparisons need.
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

    /// The timeout of `state`.
    pub fn for_state(&self, state: ConnState) -> Duration {
        match state {
            ConnState::None => self.tcp_none,
            ConnState::Established => self.tcp_established,
            ConnState::SynSent => self.tcp_syn_sent,
            ConnState::SynRecv => self.tcp_syn_recv,
            ConnState::FinWait => self.tcp_fin_wait,
            ConnState::TimeWait => self.tcp_time_wait,
            ConnState::Close => self.tcp_close,
            ConnState::CloseWait => self.tcp_close_wait,
            ConnState::LastAck => self.tcp_last_ack,
            ConnState::Listen => self.tcp_listen,
            ConnState::SynAck => self.tcp_synack,
            ConnState::Udp => self.udp,
        }
    }

    /// Sets the timeout of `state`.
    pub fn set(&mut self, state: ConnState, value: Duration) {
        *match state {
            ConnState::None => &mut self.tcp_none,
            ConnState::Established => &mut self.tcp_established,
            ConnState::SynSent => &mut self.tcp_syn_sent,
            ConnState::SynRecv => &mut self.tcp_syn_recv,
            ConnState::FinWait => &mut self.tcp_fin_wait,
            ConnState::TimeWait => &mut self.tcp_time_wait,
            ConnState::Close => &mut self.tcp_close,
            ConnState::CloseWait => &mut self.tcp_close_wait,
            ConnState::LastAck => &mut self.tcp_last_ack,
            ConnState::Listen => &mut self.tcp_listen,
            ConnState::SynAck => &mut self.tcp_synack,
            ConnState::Udp => &mut self.udp,
        } = value;
    }

    /// Checks every value against [`Timeouts::MAX`] and returns the per-state milliseconds, indexed by
    /// `ConnState as usize`.
    pub(crate) fn to_millis_table(self) -> Result<[u32; ConnState::COUNT], TimeoutTooLong> {
        let mut table = [0u32; ConnState::COUNT];
        for state in ConnState::ALL {
            let value = self.for_state(state);
            if value > Timeouts::MAX {
                return Err(TimeoutTooLong { state: state.name(), value });
            }
            table[state as usize] = ceil_millis(value) as u32;
        }
        Ok(table)
    }
}
