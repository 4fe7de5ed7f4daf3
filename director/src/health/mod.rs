//! Health-check state machines, pure: the TCP connects and HTTP requests happen elsewhere and come in as
//! [`CheckResult`]s; agent liveness comes in through [`HealthState::agent`]; time comes in as `now`.
//!
//! # One real server ([`HealthState`])
//!
//! ```text
//!            rise successes (and agent alive)            slow_start elapsed
//!   Down ─────────────────────────────────────▶ SlowStart ─────────────────▶ Up
//!    ▲  │ … but ≥ flap_threshold downs in flap_window                │          │
//!    │  └──────────────▶ HeldDown ── hold elapsed ──▶ SlowStart      │          │
//!    └──────────── fall failures, or agent lost ─────────────────────┴──────────┘
//! ```
//!
//! * **Active checks**: `rise` consecutive successes bring the checks up, `fall` consecutive failures bring
//!   them down (keepalived's `rise`/`fall`; defaults 2 and 3).
//! * **Agent liveness**, the second signal ([`AgentPolicy::Required`], the default of [`HealthConfig`]; the
//!   configuration file's `agent` key defaults to `"ignored"`, active checks alone): the agent must be connected
//!   and its newest report at most `max_report_age` old. A lost agent takes the server down even while the
//!   active checks pass; [`AgentPolicy::Ignored`] uses the active checks alone.
//! * **On failure** the server is quiesced (weight 0; established connections continue, as keepalived's
//!   `inhibit_on_failure`) or removed from the service ([`FailureAction`]); [`HealthState::disposition`] says
//!   which.
//! * **Slow start**: a recovering server's weight ramps linearly from 1 to its full weight over `slow_start`
//!   ([`HealthState::weight_factor`], [`HealthState::effective_weight`]) instead of jumping, so that `wlc`
//!   does not hand an empty server every new connection at once.
//! * **Flap damping**: when the server went down at least `flap_threshold` times within `flap_window`, its next
//!   recovery is held down for `hold_down_base × 2^(downs − flap_threshold)`, at most `hold_down_max`
//!   (exponential back-off); the hold survives a failure during it.
//! * **Transitions** carry their time, the statuses before and after, and a [`Reason`]; each is returned by
//!   [`HealthState::poll`] exactly once, in order, and counted by reason kind ([`HealthState::count`]).
//!   Time-driven transitions (end of slow start, end of hold-down) are dated at the moment they became due,
//!   however late `poll` is called.
//!
//! # A service ([`quorum::ServiceQuorum`])
//!
//! A minimum number and total weight of healthy servers; below it the service sends new connections to its
//! sorry server, if it has one.

use std::collections::VecDeque;
use std::time::Duration;
use std::time::Instant;

use thiserror::Error;

pub mod checker;
pub mod quorum;

#[cfg(test)]
mod tests;

/// What happens to a failed server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// Weight 0: no new connections, established ones continue (keepalived `inhibit_on_failure`).
    Quiesce,
    /// Taken out of the service.
    Remove,
}

/// Whether agent liveness is a health signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentPolicy {
    /// Active checks only.
    Ignored,
    /// The agent must be connected with a report at most `max_report_age` old.
    Required { max_report_age: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive successes that bring the checks up (default 2).
    pub rise: u32,
    /// Consecutive failures that bring the checks down (default 3).
    pub fall: u32,
    /// Default [`FailureAction::Quiesce`].
    pub on_failure: FailureAction,
    /// Weight ramp after recovery (default 10 s; zero: straight to full weight).
    pub slow_start: Duration,
    /// Default required, with reports at most 5 s old.
    pub agent: AgentPolicy,
    /// Window in which downs are counted for flap damping (default 60 s).
    pub flap_window: Duration,
    /// Downs within the window from which recoveries are held down (default 3; 0 disables damping).
    pub flap_threshold: u32,
    /// First hold-down (default 10 s), doubled for every further down in the window.
    pub hold_down_base: Duration,
    /// Longest hold-down (default 300 s).
    pub hold_down_max: Duration,
    /// Start up (the checks as if `rise` successes and the agent as alive) rather than down (default false).
    pub initially_up: bool,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            rise: 2,
            fall: 3,
            on_failure: FailureAction::Quiesce,
            slow_start: Duration::from_secs(10),
            agent: AgentPolicy::Required { max_report_age: Duration::from_secs(5) },
            flap_window: Duration::from_secs(60),
            flap_threshold: 3,
            hold_down_base: Duration::from_secs(10),
            hold_down_max: Duration::from_secs(300),
            initially_up: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HealthConfigError {
    #[error("health check rise and fall must be at least 1")]
    ZeroCount,
    #[error("health check hold_down_max must be at least hold_down_base")]
    HoldDown,
}

impl HealthConfig {
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        if self.rise == 0 || self.fall == 0 {
            return Err(HealthConfigError::ZeroCount);
        }
        if self.hold_down_max < self.hold_down_base {
            return Err(HealthConfigError::HoldDown);
        }
        Ok(())
    }
}

/// Why an active check failed (as the checker saw it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFailure {
    Refused,
    Timeout,
    Network,
    /// Not the expected response (not HTTP, wrong status, wrong body digest).
    BadResponse,
}

/// The result of one active check, timestamped by [`HealthState::record`]'s `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Success,
    Failure(CheckFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// Failed, or not yet proven healthy.
    Down,
    /// Healthy again but held back by flap damping until `until`.
    HeldDown { until: Instant },
    /// Serving, its weight ramping since `since`.
    SlowStart { since: Instant },
    /// Serving at full weight.
    Up,
}

impl HealthStatus {
    /// Whether the server takes new connections.
    pub const fn is_serving(self) -> bool {
        matches!(self, HealthStatus::SlowStart { .. } | HealthStatus::Up)
    }
}

/// What the control plane should do with the server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Serve,
    Quiesce,
    Remove,
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `fall` (or more) consecutive active-check failures; the last one's kind.
    ChecksFailed {
        consecutive: u32,
        last: CheckFailure,
    },
    /// `rise` consecutive successes (with the agent alive, when required).
    ChecksPassed {
        consecutive: u32,
    },
    /// The agent is disconnected, or its newest report is too old (`None`: it never reported).
    AgentLost {
        connected: bool,
        report_age: Option<Duration>,
    },
    /// The agent is alive again (and the checks were passing).
    AgentBack,
    /// Recovered, but held down: `downs` in the flap window.
    FlapHoldDown {
        downs: u32,
        hold: Duration,
    },
    HoldDownExpired,
    SlowStartComplete,
}

/// [`Reason`] without its data: the counter index and a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonKind {
    ChecksFailed,
    ChecksPassed,
    AgentLost,
    AgentBack,
    FlapHoldDown,
    HoldDownExpired,
    SlowStartComplete,
}

impl ReasonKind {
    pub const ALL: [ReasonKind; 7] = [
        ReasonKind::ChecksFailed,
        ReasonKind::ChecksPassed,
        ReasonKind::AgentLost,
        ReasonKind::AgentBack,
        ReasonKind::FlapHoldDown,
        ReasonKind::HoldDownExpired,
        ReasonKind::SlowStartComplete,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ReasonKind::ChecksFailed => "checks_failed",
            ReasonKind::ChecksPassed => "checks_passed",
            ReasonKind::AgentLost => "agent_lost",
            ReasonKind::AgentBack => "agent_back",
            ReasonKind::FlapHoldDown => "flap_hold_down",
            ReasonKind::HoldDownExpired => "hold_down_expired",
            ReasonKind::SlowStartComplete => "slow_start_complete",
        }
    }
}

impl Reason {
    pub const fn kind(&self) -> ReasonKind {
        match self {
            Reason::ChecksFailed { .. } => ReasonKind::ChecksFailed,
            Reason::ChecksPassed { .. } => ReasonKind::ChecksPassed,
            Reason::AgentLost { .. } => ReasonKind::AgentLost,
            Reason::AgentBack => ReasonKind::AgentBack,
            Reason::FlapHoldDown { .. } => ReasonKind::FlapHoldDown,
            Reason::HoldDownExpired => ReasonKind::HoldDownExpired,
            Reason::SlowStartComplete => ReasonKind::SlowStartComplete,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub at: Instant,
    pub from: HealthStatus,
    pub to: HealthStatus,
    pub reason: Reason,
}

/// One real server's health.
#[derive(Debug, Clone)]
pub struct HealthState {
    config: HealthConfig,
    status: HealthStatus,
    checks_up: bool,
    successes: u32,
    failures: u32,
    last_failure: CheckFailure,
    agent_alive: bool,
    agent_seen: (bool, Option<Duration>),
    /// Times the server went down, within the flap window.
    downs: VecDeque<Instant>,
    hold_until: Option<Instant>,
    pending: VecDeque<Transition>,
    counts: [u64; ReasonKind::ALL.len()],
}

impl HealthState {
    /// Validates `config`; the server starts [`HealthStatus::Down`] (or `Up` with `initially_up`).
    pub fn new(config: HealthConfig) -> Result<HealthState, HealthConfigError> {
        config.validate()?;
        let up = config.initially_up;
        Ok(HealthState {
            status: if up { HealthStatus::Up } else { HealthStatus::Down },
            checks_up: up,
            successes: 0,
            failures: 0,
            last_failure: CheckFailure::Network,
            agent_alive: up || config.agent == AgentPolicy::Ignored,
            agent_seen: (false, None),
            downs: VecDeque::new(),
            hold_until: None,
            pending: VecDeque::new(),
            counts: [0; ReasonKind::ALL.len()],
            config,
        })
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// One active check's result at `now`.
    pub fn record(&mut self, now: Instant, result: CheckResult) {
        self.advance(now);
        match result {
            CheckResult::Success => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if !self.checks_up && self.successes >= self.config.rise {
                    self.checks_up = true;
                    let reason = if self.agent_alive {
                        Reason::ChecksPassed { consecutive: self.successes }
                    } else {
                        self.agent_lost_reason()
                    };
                    self.reconcile(now, reason);
                }
            }
            CheckResult::Failure(kind) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_failure = kind;
                if self.checks_up && self.failures >= self.config.fall {
                    self.checks_up = false;
                    self.reconcile(now, Reason::ChecksFailed { consecutive: self.failures, last: kind });
                }
            }
        }
    }

    /// The agent's liveness at `now`: connected or not, and the age of its newest report (`None`: none yet).
    pub fn agent(&mut self, now: Instant, connected: bool, report_age: Option<Duration>) {
        self.advance(now);
        self.agent_seen = (connected, report_age);
        let AgentPolicy::Required { max_report_age } = self.config.agent else { return };
        let alive = connected && report_age.is_some_and(|age| age <= max_report_age);
        if alive == self.agent_alive {
            return;
        }
        self.agent_alive = alive;
        let reason = if alive {
            if self.checks_up {
                Reason::AgentBack
            } else {
                Reason::ChecksFailed { consecutive: self.failures, last: self.last_failure }
            }
        } else {
            self.agent_lost_reason()
        };
        self.reconcile(now, reason);
    }

    /// Applies the transitions due by `now` (end of slow start or hold-down), then returns the oldest transition
    /// not yet returned.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        self.advance(now);
        self.pending.pop_front()
    }

    pub fn status(&self) -> HealthStatus {
        self.status
    }

    pub fn disposition(&self) -> Disposition {
        match (self.status.is_serving(), self.config.on_failure) {
            (true, _) => Disposition::Serve,
            (false, FailureAction::Quiesce) => Disposition::Quiesce,
            (false, FailureAction::Remove) => Disposition::Remove,
        }
    }

    /// Share of its full weight the server should have at `now`, as `(numerator, denominator)`: `(0, 1)` when
    /// not serving, `(1, 1)` when up, `(elapsed_ms, slow_start_ms)` during slow start (reads only the status:
    /// call [`HealthState::poll`] first so that a finished slow start is seen).
    pub fn weight_factor(&self, now: Instant) -> (u64, u64) {
        match self.status {
            HealthStatus::Down | HealthStatus::HeldDown { .. } => (0, 1),
            HealthStatus::Up => (1, 1),
            HealthStatus::SlowStart { since } => {
                let total = self.config.slow_start.as_millis().max(1) as u64;
                let elapsed = (now.saturating_duration_since(since).as_millis() as u64).min(total);
                (elapsed, total)
            }
        }
    }

    /// The weight to publish for a server whose full weight (configured, or from feedback) is `full`: 0 when not
    /// serving; during slow start `max(1, full × factor)`, a ramp from 1 to `full`.
    pub fn effective_weight(&self, now: Instant, full: u32) -> u32 {
        let (num, den) = self.weight_factor(now);
        if !self.status.is_serving() || full == 0 {
            return 0;
        }
        let ramped = (u128::from(full) * u128::from(num) / u128::from(den)) as u32;
        ramped.max(1)
    }

    /// Transitions so far with a reason of this kind.
    pub fn count(&self, kind: ReasonKind) -> u64 {
        self.counts[kind as usize]
    }

    fn agent_lost_reason(&self) -> Reason {
        Reason::AgentLost { connected: self.agent_seen.0, report_age: self.agent_seen.1 }
    }

    fn healthy(&self) -> bool {
        self.checks_up && self.agent_alive
    }

    fn go(&mut self, at: Instant, to: HealthStatus, reason: Reason) {
        let from = self.status;
        self.status = to;
        self.counts[reason.kind() as usize] += 1;
        self.pending.push_back(Transition { at, from, to, reason });
    }

    /// Brings the status in line with the signals after an input at `now`.
    fn reconcile(&mut self, now: Instant, reason: Reason) {
        let healthy = self.healthy();
        match self.status {
            HealthStatus::Up | HealthStatus::SlowStart { .. } if !healthy => {
                self.downs.push_back(now);
                self.go(now, HealthStatus::Down, reason);
            }
            HealthStatus::HeldDown { .. } if !healthy => self.go(now, HealthStatus::Down, reason),
            HealthStatus::Down if healthy => {
                self.forget_old_downs(now);
                let downs = self.downs.len() as u32;
                let threshold = self.config.flap_threshold;
                if threshold > 0 && downs >= threshold {
                    let doublings = (downs - threshold).min(20);
                    let hold = self.config.hold_down_base.saturating_mul(1 << doublings).min(self.config.hold_down_max);
                    let until = self.hold_until.map_or(now + hold, |u| u.max(now + hold));
                    self.hold_until = Some(until);
                    self.go(now, HealthStatus::HeldDown { until }, Reason::FlapHoldDown { downs, hold });
                } else if let Some(until) = self.hold_until.filter(|u| *u > now) {
                    // Still inside an earlier hold-down.
                    let hold = until - now;
                    self.go(now, HealthStatus::HeldDown { until }, Reason::FlapHoldDown { downs, hold });
                } else {
                    self.start(now, reason);
                }
            }
            _ => {}
        }
    }

    fn start(&mut self, at: Instant, reason: Reason) {
        if self.config.slow_start.is_zero() {
            self.go(at, HealthStatus::Up, reason);
        } else {
            self.go(at, HealthStatus::SlowStart { since: at }, reason);
        }
    }

    fn forget_old_downs(&mut self, now: Instant) {
        while self.downs.front().is_some_and(|&t| now.saturating_duration_since(t) > self.config.flap_window) {
            self.downs.pop_front();
        }
    }

    /// Time-driven transitions due by `now`, each dated when it became due.
    fn advance(&mut self, now: Instant) {
        loop {
            match self.status {
                HealthStatus::HeldDown { until } if now >= until => {
                    self.hold_until = None;
                    self.start(until, Reason::HoldDownExpired);
                }
                HealthStatus::SlowStart { since } if now >= since + self.config.slow_start => {
                    self.go(since + self.config.slow_start, HealthStatus::Up, Reason::SlowStartComplete);
                }
                _ => break,
            }
        }
    }
}
