//! The state machine. See the module documentation of [`super`] for the rules implemented here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::packet::{DecodeError, Heartbeat, FLAG_CLAIM, FLAG_FAILOVER, FLAG_YIELD};
use super::{
    Action, ConfigError, Counters, HaConfig, HaStatus, Input, LoadSummary, PeerStatus, Reason, State, Transmit,
};

/// Boot ids of the peer remembered as used.
const RETIRED_BOOTS: usize = 16;
/// Load levels between idle and high load.
const LOAD_STEPS: f64 = 8.0;
/// Jitter EWMA gain (1/16, RFC 3550).
const JITTER_GAIN: i64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Manual {
    None,
    Promoted,
    Demoted,
}

/// What we know of the peer's current boot.
#[derive(Debug, Clone)]
struct Peer {
    node_id: u32,
    boot_id: u64,
    last_seq: u64,
    state: State,
    priority: u8,
    flags: u8,
    period: Duration,
    next_period: Duration,
    tolerance: u8,
    load: LoadSummary,
    last_arrival: Instant,
    deadline: Instant,
    alive: bool,
    received: u64,
    jitter_us: i64,
}

impl Peer {
    fn yields(&self) -> bool {
        self.flags & FLAG_YIELD != 0
    }

    fn claims(&self) -> bool {
        self.flags & FLAG_CLAIM != 0
    }

    fn took_over_by_failover(&self) -> bool {
        self.flags & FLAG_FAILOVER != 0
    }

    fn contest_rank(&self) -> (bool, bool, u8, u32) {
        (!self.yields(), self.claims(), self.priority, self.node_id)
    }
}

/// What the decision rules want in a non-MASTER state.
enum Desire {
    Master(Reason),
    Backup(Reason),
    Wait,
}

/// One director's side of the heartbeat protocol. See the [module documentation](super).
#[derive(Debug)]
pub struct Ha {
    cfg: HaConfig,
    boot_id: u64,
    state: State,
    /// End of the INIT hold, until it passes.
    init_until: Option<Instant>,
    manual: Manual,
    /// MASTER because the peer died or faulted.
    by_failover: bool,

    // Sending.
    seq: u64,
    next_send: Instant,
    last_sent: Option<Instant>,
    load: LoadSummary,
    /// Actual interval between our heartbeats and the tolerance that goes with it.
    period: Duration,
    tolerance: u8,
    /// Announced (period, tolerance) while a lengthening is being announced.
    announced: Option<(Duration, u8)>,
    /// Heartbeats still to send at `period` before `announced` applies.
    announce_left: u32,

    // What the peer reports about our stream.
    last_report: Option<(u64, u32)>,
    reported_loss: f64,
    reported_jitter_us: u32,
    degraded: bool,

    // Receiving.
    peer: Option<Peer>,
    echo: u64,
    retired: VecDeque<u64>,

    // Decisions.
    preempt_since: Option<Instant>,
    /// When a held preemption becomes due.
    preempt_at: Option<Instant>,
    /// Preemption held by the shell (see [`Ha::hold_preemption`]).
    preempt_held: bool,
    tb_asked: Option<Instant>,
    tb_for_takeover: bool,
    tb_grant: bool,
    next_tb_check: Option<Instant>,

    actions: VecDeque<Action>,
    transmits: VecDeque<Transmit>,
    counters: Counters,
}

fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn sat32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Ha {
    /// A director in INIT. Panics if `config` does not [validate](HaConfig::validate): check it first.
    /// A machine for `config` (refused when [`HaConfig::validate`] refuses it).
    pub fn new(config: HaConfig, boot_id: u64, now: Instant) -> Result<Ha, ConfigError> {
        config.validate()?;
        let period = config.period_max;
        let tolerance = config.tolerance;
        Ok(Ha {
            init_until: Some(now + config.init_hold),
            cfg: config,
            boot_id,
            state: State::Init,
            manual: Manual::None,
            by_failover: false,
            seq: 0,
            next_send: now,
            last_sent: None,
            load: LoadSummary::default(),
            period,
            tolerance,
            announced: None,
            announce_left: 0,
            last_report: None,
            reported_loss: 0.0,
            reported_jitter_us: 0,
            degraded: false,
            peer: None,
            echo: 0,
            retired: VecDeque::new(),
            preempt_since: None,
            preempt_at: None,
            preempt_held: false,
            tb_asked: None,
            tb_for_takeover: false,
            tb_grant: false,
            next_tb_check: None,
            actions: VecDeque::new(),
            transmits: VecDeque::new(),
            counters: Counters::default(),
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    pub fn config(&self) -> &HaConfig {
        &self.cfg
    }

    /// The peer's deadline, if it is alive.
    pub fn peer_deadline(&self) -> Option<Instant> {
        self.peer.as_ref().filter(|p| p.alive).map(|p| p.deadline)
    }

    // ----- inputs -----

    /// Any input; for replaying recorded scenarios.
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Datagram { path, bytes } => self.handle_datagram(now, path, &bytes),
            Input::Timeout => self.handle_timeout(now),
            Input::Load(load) => self.set_load(now, load),
            Input::Tiebreaker { reachable } => self.tiebreaker_result(now, reachable),
            Input::Promote => self.promote(now),
            Input::Demote => self.demote(now),
            Input::Release => self.release(now),
        }
    }

    /// A datagram received on heartbeat path `path`.
    pub fn handle_datagram(&mut self, now: Instant, path: usize, bytes: &[u8]) {
        if path >= self.cfg.paths {
            self.counters.rejected.bad_path += 1;
            return;
        }
        let hb = match Heartbeat::decode(bytes, &self.cfg.key) {
            Ok(hb) => hb,
            Err(e) => {
                let r = &mut self.counters.rejected;
                match e {
                    DecodeError::BadLength(_) => r.bad_length += 1,
                    DecodeError::BadVersion(_) => r.bad_version += 1,
                    DecodeError::BadMac => r.bad_mac += 1,
                    DecodeError::BadState(_)
                    | DecodeError::BadPriority
                    | DecodeError::BadFlags(_)
                    | DecodeError::BadPeriod(_)
                    | DecodeError::BadTolerance(_) => r.malformed += 1,
                }
                return;
            }
        };
        if hb.node_id == self.cfg.node_id {
            self.counters.rejected.own_node_id += 1;
            return;
        }
        let same_boot = self.peer.as_ref().is_some_and(|p| p.boot_id == hb.boot_id);
        if same_boot {
            let last = self.peer.as_ref().map_or(0, |p| p.last_seq);
            if hb.seq == last {
                self.counters.rejected.duplicate += 1;
                return;
            }
            if hb.seq < last {
                self.counters.rejected.replayed += 1;
                return;
            }
        } else {
            if self.retired.contains(&hb.boot_id) {
                self.counters.rejected.stale_boot += 1;
                return;
            }
            if hb.echo_boot != self.boot_id {
                // Authentic but maybe recorded before we started: echo its boot id so a genuine peer
                // proves freshness in its next heartbeat.
                self.counters.rejected.unverified_boot += 1;
                if self.echo != hb.boot_id {
                    self.echo = hb.boot_id;
                    self.trigger(now);
                }
                self.flush(now);
                return;
            }
        }
        self.accept(now, hb, !same_boot);
        self.evaluate(now);
        self.refresh_timers(now);
        self.flush(now);
    }

    /// Timers: call at (or after) [`Ha::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.init_until.is_some_and(|t| now >= t) {
            self.init_until = None;
        }
        if self.preempt_at.is_some_and(|t| now >= t) {
            self.preempt_at = None;
        }
        if let Some(p) = self.peer.as_mut() {
            if p.alive && now >= p.deadline {
                p.alive = false;
                self.counters.peer_lost += 1;
                if self.state == State::Master {
                    // The peer may be taking over right now: learn at once whether we should stand down
                    // (FAULT), rather than one tiebreaker interval later with both serving meanwhile.
                    self.next_tb_check = Some(now);
                }
            }
        }
        if let Some(asked) = self.tb_asked {
            if now >= asked + self.cfg.tiebreaker_timeout {
                self.tiebreaker_result(now, false);
            }
        }
        if let Some(at) = self.next_tb_check {
            if now >= at {
                self.ask_tiebreaker(now, false);
                self.next_tb_check = Some(now + self.cfg.tiebreaker_interval);
            }
        }
        self.evaluate(now);
        self.refresh_timers(now);
        self.flush(now);
    }

    /// The current forwarding load; the MASTER's period follows it.
    pub fn set_load(&mut self, now: Instant, load: LoadSummary) {
        self.load = load;
        self.retarget_period(now);
        self.flush(now);
    }

    /// The answer to [`Action::CheckTiebreaker`].
    pub fn tiebreaker_result(&mut self, now: Instant, reachable: bool) {
        let for_takeover = std::mem::take(&mut self.tb_for_takeover);
        self.tb_asked = None;
        let peer_alive = self.peer_alive();
        if reachable {
            if for_takeover || self.state == State::Fault {
                self.tb_grant = true;
                self.evaluate(now);
                self.tb_grant = false;
            }
        } else {
            match self.state {
                State::Master if !peer_alive => self.enter_fault(now, Reason::TiebreakerUnreachable),
                State::Init | State::Backup if for_takeover => self.enter_fault(now, Reason::TiebreakerUnreachable),
                _ => {}
            }
        }
        self.refresh_timers(now);
        self.flush(now);
    }

    /// Operator: take over (make-before-break) and keep mastership until [`Ha::demote`] or
    /// [`Ha::release`].
    pub fn promote(&mut self, now: Instant) {
        self.manual = Manual::Promoted;
        self.trigger(now);
        self.evaluate(now);
        self.refresh_timers(now);
        self.flush(now);
    }

    /// Operator: hand mastership to the peer (make-before-break) and stay BACKUP until [`Ha::promote`]
    /// or [`Ha::release`].
    pub fn demote(&mut self, now: Instant) {
        self.manual = Manual::Demoted;
        self.preempt_since = None;
        self.preempt_at = None;
        self.trigger(now);
        self.evaluate(now);
        self.refresh_timers(now);
        self.flush(now);
    }

    /// Shell: hold (or allow) taking mastership back from a live MASTER by preemption. A restarted director
    /// with connection sync holds it until the peer's full connection table has arrived, so that failing back
    /// loses no connection; taking over from a dead, faulty or yielding peer is never held.
    pub fn hold_preemption(&mut self, now: Instant, held: bool) {
        if self.preempt_held == held {
            return;
        }
        self.preempt_held = held;
        self.evaluate(now);
        self.refresh_timers(now);
        self.flush(now);
    }

    /// Operator: end a promotion or demotion.
    pub fn release(&mut self, now: Instant) {
        self.manual = Manual::None;
        self.trigger(now);
        self.evaluate(now);
        self.refresh_timers(now);
        self.flush(now);
    }

    // ----- outputs -----

    /// When to call [`Ha::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_send;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        at(self.peer_deadline());
        at(self.init_until.filter(|_| self.state == State::Init));
        at(self.preempt_at);
        at(self.tb_asked.map(|a| a + self.cfg.tiebreaker_timeout));
        at(self.next_tb_check);
        Some(t)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.flush(now);
        self.transmits.pop_front()
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn status(&self) -> HaStatus {
        let (next_period, _) = self.announced.unwrap_or((self.period, self.tolerance));
        HaStatus {
            node_id: self.cfg.node_id,
            boot_id: self.boot_id,
            state: self.state,
            priority: self.cfg.priority,
            demoted: self.manual == Manual::Demoted,
            promoted: self.manual == Manual::Promoted,
            period: self.period,
            next_period,
            tolerance: self.announced.map_or(self.tolerance, |a| a.1),
            reported_loss: self.reported_loss,
            degraded: self.degraded,
            peer: self.peer.as_ref().map(|p| PeerStatus {
                node_id: p.node_id,
                boot_id: p.boot_id,
                state: p.state,
                priority: p.priority,
                alive: p.alive,
                demoted: p.yields(),
                promoted: p.claims(),
                period: p.period,
                next_period: p.next_period,
                tolerance: p.tolerance,
                load: p.load,
                deadline: p.deadline.saturating_duration_since(p.last_arrival),
                jitter_us: u64::try_from(p.jitter_us).unwrap_or(0),
                last_seq: p.last_seq,
                received: p.received,
            }),
            counters: self.counters,
        }
    }

    // ----- receiving -----

    fn accept(&mut self, now: Instant, hb: Heartbeat, new_boot: bool) {
        self.counters.received += 1;
        self.echo = hb.boot_id;
        let period = Duration::from_micros(hb.period_us.into());
        let next_period = Duration::from_micros(hb.next_period_us.into());
        if new_boot {
            if let Some(old) = self.peer.take() {
                self.retire(old.boot_id);
            }
            // The peer restarted: it knows nothing of us, tell it at once.
            self.trigger(now);
        }
        let mut jitter_us = 0;
        let mut received = 0;
        if let Some(p) = self.peer.as_ref() {
            jitter_us = p.jitter_us;
            received = p.received;
            let gap = i64::try_from(now.saturating_duration_since(p.last_arrival).as_micros()).unwrap_or(i64::MAX);
            let steps = hb.seq - p.last_seq;
            let prev = i64::try_from(p.period.as_micros()).unwrap_or(i64::MAX);
            // Only lateness is jitter here: the margin protects the deadline, which an early heartbeat
            // never threatens, and heartbeats are early by design when the sender triggers one (a state
            // change, an echo) or shortens its period at once under load. Counting those would stretch the
            // deadline by up to 4 · P / 16 exactly when load arrives and failover should be fastest.
            if steps <= 4 && period == p.period {
                let expected = prev.saturating_mul(steps as i64);
                let dev = gap.saturating_sub(expected).clamp(0, prev);
                jitter_us += (dev - jitter_us) / JITTER_GAIN;
            }
        }
        let margin = self.cfg.margin_min.max(Duration::from_micros(4 * jitter_us.max(0) as u64));
        let budget = period.max(next_period) * (u32::from(hb.tolerance) + 1) + margin;
        if hb.echo_boot == self.boot_id {
            self.take_report(now, &hb);
        } else {
            // It does not know our current boot: tell it.
            self.trigger(now);
        }
        let was_master = self.peer.as_ref().is_some_and(|p| p.alive && p.state == State::Master);
        // A MASTER hearing its peer again (after losing it, or a new boot) cannot know whether the peer
        // served meanwhile and moved the VIPs: announce them again.
        let returning = !new_boot && self.peer.as_ref().is_some_and(|p| !p.alive);
        self.peer = Some(Peer {
            node_id: hb.node_id,
            boot_id: hb.boot_id,
            last_seq: hb.seq,
            state: hb.state,
            priority: hb.priority,
            flags: hb.flags,
            period,
            next_period,
            tolerance: hb.tolerance,
            load: LoadSummary { pps: hb.load_pps.into(), conns: hb.load_conns.into() },
            last_arrival: now,
            deadline: now + budget,
            alive: true,
            received: received + 1,
            jitter_us,
        });
        // Two masters: the lower rank steps down at once, the winner re-announces the VIPs.
        if self.state == State::Master && hb.state == State::Master {
            let ours = self.contest_rank();
            let theirs = self.peer.as_ref().map(Peer::contest_rank);
            if theirs > Some(ours) {
                let peer_claims = self.peer.as_ref().is_some_and(Peer::claims);
                let reason = if self.manual == Manual::Demoted || peer_claims {
                    Reason::HandedOver
                } else {
                    Reason::DualMasterLost
                };
                self.become_backup(now, reason);
            } else if !was_master {
                self.actions.push_back(Action::SendGratuitousArp);
                self.trigger(now);
            }
        } else if self.state == State::Master && (returning || new_boot) {
            self.actions.push_back(Action::SendGratuitousArp);
            self.trigger(now);
        }
    }

    fn take_report(&mut self, now: Instant, hb: &Heartbeat) {
        self.reported_jitter_us = hb.rx_jitter_us;
        match self.last_report {
            Some((seq0, count0)) if hb.rx_seq > seq0 => {
                let sent = hb.rx_seq - seq0;
                let got = u64::from(hb.rx_count.wrapping_sub(count0)).min(sent);
                let loss = 1.0 - got as f64 / sent as f64;
                self.reported_loss += (loss - self.reported_loss) / 4.0;
                self.last_report = Some((hb.rx_seq, hb.rx_count));
            }
            Some((seq0, _)) if hb.rx_seq < seq0 => self.last_report = Some((hb.rx_seq, hb.rx_count)),
            Some(_) => {}
            None => self.last_report = Some((hb.rx_seq, hb.rx_count)),
        }
        let jitter = Duration::from_micros(self.reported_jitter_us.into());
        let degraded = if self.degraded {
            !(self.reported_loss < self.cfg.degraded_loss / 2.0 && jitter < self.period / 8)
        } else {
            self.reported_loss >= self.cfg.degraded_loss || jitter >= self.period / 4
        };
        if degraded != self.degraded {
            self.degraded = degraded;
            self.retarget_period(now);
        }
    }

    fn retire(&mut self, boot: u64) {
        if self.retired.len() == RETIRED_BOOTS {
            self.retired.pop_front();
        }
        self.retired.push_back(boot);
        self.last_report = None;
    }

    fn peer_alive(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| p.alive)
    }

    fn contest_rank(&self) -> (bool, bool, u8, u32) {
        (self.manual != Manual::Demoted, self.manual == Manual::Promoted, self.cfg.priority, self.cfg.node_id)
    }

    // ----- deciding -----

    fn desire(&mut self, now: Instant) -> Desire {
        let Some(p) = self.peer.as_ref().filter(|p| p.alive) else {
            self.preempt_since = None;
            self.preempt_at = None;
            if self.state == State::Init && self.init_until.is_some_and(|t| now < t) {
                return Desire::Wait;
            }
            return Desire::Master(if self.peer.is_some() { Reason::PeerDead } else { Reason::NoPeer });
        };
        let demoted = self.manual == Manual::Demoted;
        let promoted = self.manual == Manual::Promoted;
        match p.state {
            State::Fault => {
                self.preempt_since = None;
                self.preempt_at = None;
                Desire::Master(Reason::PeerFault)
            }
            State::Master => {
                if p.yields() && !demoted {
                    self.preempt_since = None;
                    self.preempt_at = None;
                    return Desire::Master(Reason::Handover);
                }
                if promoted && !p.claims() {
                    self.preempt_since = None;
                    self.preempt_at = None;
                    return Desire::Master(Reason::Promoted);
                }
                let preempt = self.cfg.preempt
                    && !self.preempt_held
                    && !demoted
                    && !p.claims()
                    && (self.cfg.priority, self.cfg.node_id) > (p.priority, p.node_id)
                    && (self.cfg.auto_failback || !p.took_over_by_failover());
                if !preempt {
                    self.preempt_since = None;
                    self.preempt_at = None;
                    return Desire::Backup(Reason::PeerIsMaster);
                }
                let due = *self.preempt_since.get_or_insert(now) + self.cfg.preempt_delay;
                if now >= due {
                    self.preempt_at = None;
                    Desire::Master(Reason::Preempt)
                } else {
                    self.preempt_at = Some(due);
                    Desire::Backup(Reason::PeerIsMaster)
                }
            }
            State::Init | State::Backup => {
                self.preempt_since = None;
                self.preempt_at = None;
                if self.contest_rank() > p.contest_rank() {
                    Desire::Master(Reason::Election)
                } else {
                    Desire::Backup(Reason::Election)
                }
            }
        }
    }

    fn evaluate(&mut self, now: Instant) {
        if self.state == State::Master {
            return;
        }
        let desire = self.desire(now);
        match (self.state, desire) {
            (State::Fault, d) => {
                if self.tb_grant {
                    match d {
                        Desire::Master(r) => self.become_master(now, r),
                        Desire::Backup(_) | Desire::Wait => self.become_backup(now, Reason::Recovered),
                    }
                }
            }
            (_, Desire::Master(r)) => {
                if self.tb_grant {
                    self.become_master(now, r);
                } else {
                    self.ask_tiebreaker(now, true);
                }
            }
            (_, Desire::Backup(r)) => {
                self.tb_for_takeover = false;
                if self.state == State::Init {
                    self.become_backup(now, r);
                }
            }
            (_, Desire::Wait) => {}
        }
    }

    fn ask_tiebreaker(&mut self, now: Instant, for_takeover: bool) {
        self.tb_for_takeover |= for_takeover;
        if self.tb_asked.is_none() {
            self.tb_asked = Some(now);
            self.actions.push_back(Action::CheckTiebreaker);
        }
    }

    fn refresh_timers(&mut self, now: Instant) {
        let periodic = match self.state {
            State::Master => !self.peer_alive(),
            State::Fault => true,
            State::Init | State::Backup => false,
        };
        if !periodic {
            self.next_tb_check = None;
        } else if self.next_tb_check.is_none() {
            self.next_tb_check = Some(now + self.cfg.tiebreaker_interval);
        }
    }

    fn transition(&mut self, now: Instant, state: State, action: Action) {
        self.state = state;
        self.counters.transitions += 1;
        self.actions.push_back(action);
        self.actions.push_back(Action::RunNotify(state));
        self.preempt_since = None;
        self.preempt_at = None;
        self.tb_for_takeover = false;
        self.next_tb_check = None;
        self.trigger(now);
        self.retarget_period(now);
    }

    fn become_master(&mut self, now: Instant, reason: Reason) {
        self.by_failover = matches!(reason, Reason::PeerDead | Reason::PeerFault);
        if self.by_failover {
            self.counters.failovers += 1;
        }
        self.transition(now, State::Master, Action::BecomeMaster { reason });
        self.actions.push_back(Action::SendGratuitousArp);
    }

    fn become_backup(&mut self, now: Instant, reason: Reason) {
        self.by_failover = false;
        self.transition(now, State::Backup, Action::BecomeBackup { reason });
    }

    fn enter_fault(&mut self, now: Instant, reason: Reason) {
        self.by_failover = false;
        self.transition(now, State::Fault, Action::EnterFault { reason });
    }

    // ----- sending -----

    /// The (period, tolerance) the rules want now.
    fn target(&self) -> (Duration, u8) {
        let (min, max) = (self.cfg.period_min, self.cfg.period_max);
        let f = if self.state == State::Master {
            let ratio = |v: u64, high: u64| if high == 0 { 0.0 } else { v as f64 / high as f64 };
            let f = ratio(self.load.pps, self.cfg.high_load.pps).max(ratio(self.load.conns, self.cfg.high_load.conns));
            (f.clamp(0.0, 1.0) * LOAD_STEPS).floor() / LOAD_STEPS
        } else {
            0.0
        };
        let p_load = max.mul_f64((min.as_secs_f64() / max.as_secs_f64()).powf(f)).max(min);
        let p_load = Duration::from_micros(p_load.as_micros() as u64);
        if !self.degraded {
            return (p_load, self.cfg.tolerance);
        }
        let p = (p_load / 2).max(min);
        let budget = p_load * (u32::from(self.cfg.tolerance) + 1);
        let n = budget.as_micros().div_ceil(p.as_micros().max(1));
        let tol = u8::try_from(n.saturating_sub(1)).unwrap_or(u8::MAX).min(super::packet::MAX_TOLERANCE);
        (p, tol)
    }

    fn retarget_period(&mut self, now: Instant) {
        let (p, tol) = self.target();
        let current_target = self.announced.unwrap_or((self.period, self.tolerance));
        if (p, tol) == current_target {
            return;
        }
        if p <= self.period {
            // Shorter (or same) gaps: safe at once.
            let sooner = p < self.period;
            self.period = p;
            self.tolerance = tol;
            self.announced = None;
            self.announce_left = 0;
            if sooner {
                if let Some(last) = self.last_sent {
                    self.next_send = self.next_send.min((last + p).max(now));
                }
            }
        } else {
            // Longer gaps: announce for n_old + 1 heartbeats at the old period first.
            self.announced = Some((p, tol));
            self.announce_left = u32::from(self.tolerance) + 1;
        }
    }

    /// Send as soon as the rate limit (period_min / 4 between heartbeats) allows.
    fn trigger(&mut self, now: Instant) {
        let earliest = self.last_sent.map_or(now, |t| (t + self.cfg.period_min / 4).max(now));
        self.next_send = self.next_send.min(earliest);
    }

    fn flush(&mut self, now: Instant) {
        if now >= self.next_send {
            self.send(now);
        }
    }

    fn send(&mut self, now: Instant) {
        self.seq += 1;
        // The period field is the gap until our next heartbeat; the last announcing heartbeat already
        // carries the new period.
        let (next_period, next_tol) = self.announced.unwrap_or((self.period, self.tolerance));
        let gap = if self.announce_left == 1 { next_period } else { self.period };
        let mut flags = 0;
        match self.manual {
            Manual::Demoted => flags |= FLAG_YIELD,
            Manual::Promoted => flags |= FLAG_CLAIM,
            Manual::None => {}
        }
        if self.state == State::Master && self.by_failover {
            flags |= FLAG_FAILOVER;
        }
        let (rx_seq, rx_count, rx_jitter) =
            self.peer.as_ref().map_or((0, 0, 0), |p| (p.last_seq, p.received as u32, p.jitter_us.max(0) as u64));
        let hb = Heartbeat {
            state: self.state,
            priority: self.cfg.priority,
            flags,
            node_id: self.cfg.node_id,
            boot_id: self.boot_id,
            seq: self.seq,
            echo_boot: self.echo,
            period_us: us(gap),
            next_period_us: us(next_period),
            tolerance: next_tol,
            load_pps: sat32(self.load.pps),
            load_conns: sat32(self.load.conns),
            rx_seq,
            rx_count,
            rx_jitter_us: sat32(rx_jitter),
        };
        let bytes = hb.encode(&self.cfg.key);
        for path in 0..self.cfg.paths {
            self.transmits.push_back(Transmit { path, bytes: bytes.to_vec() });
            self.counters.sent += 1;
        }
        if self.announce_left > 0 {
            self.announce_left -= 1;
            if self.announce_left == 0 {
                self.period = next_period;
                self.tolerance = next_tol;
                self.announced = None;
            }
        }
        self.last_sent = Some(now);
        self.next_send = now + gap;
    }
}
