//! The I/O shell around [`Ha`]: one tokio task owning the machine, a UDP socket per heartbeat path and a
//! timer. It feeds the machine datagrams (with their path index), timeouts, the data plane's load and
//! tiebreaker answers, sends what it polls out, and applies its [`Action`]s to the data plane:
//!
//! - `BecomeMaster` → `Dataplane::set_serving(true)` (the engine sends its gratuitous-ARP burst);
//!   `EnterFault` and `BecomeBackup` → `set_serving(false)` at once, except after a handover (the peer
//!   took over while we were MASTER and alive: demotion, or the peer promoted or preempting), where
//!   forwarding goes on for `handover_drain_ms` so clients still sending to our MAC are not dropped
//!   before the new MASTER's gratuitous ARPs reach them (make-before-break).
//! - `SendGratuitousArp` → `Dataplane::announce()`; while MASTER, also every `garp_refresh_s`.
//! - `CheckTiebreaker` → ICMP echo to every tiebreaker (a raw socket: the director runs as root for its
//!   AF_PACKET rings anyway), answered with `tiebreaker_result` — reachable when any answers.
//! - `RunNotify` → the notify program, spawned with the state as its argument; never waited on by the loop.
//!
//! Operator commands (promote, demote, release, status) arrive through [`HaHandle`], which the control
//! socket and the metrics endpoint hold.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::{Action, Ha, HaStatus, LoadSummary, Reason, State};
use crate::config::HaSection;
use crate::dataplane::Dataplane;
use crate::sync::SyncShared;

/// How often the data plane's load is sampled for the adaptive period.
const LOAD_SAMPLE: Duration = Duration::from_millis(100);
/// Largest datagram read (a heartbeat is much smaller; anything longer is refused by length).
const MAX_DATAGRAM: usize = 512;

/// What the shell counts itself (the machine counts the protocol: [`super::Counters`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellCounters {
    /// Transitions by new state and reason: (`master`, `peer_dead`) → n.
    pub transitions: Vec<TransitionCount>,
    pub tiebreaker_checks: u64,
    pub tiebreaker_unreachable: u64,
    /// Datagrams the kernel refused to send (link down, no route), all paths.
    pub send_errors: u64,
    /// Datagrams dropped because the loop was behind (its queue full).
    pub receive_overflows: u64,
    pub garp_announcements: u64,
    pub notify_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionCount {
    pub to: String,
    pub reason: String,
    pub count: u64,
}

/// What `fulcrumctl ha status` shows: the machine's status and the shell's view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaView {
    pub status: HaStatus,
    /// `local → peer` per path.
    pub paths: Vec<String>,
    pub tiebreakers: Vec<String>,
    /// Whether the data plane is serving the VIPs.
    pub serving: bool,
    pub shell: ShellCounters,
}

/// An operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaCommand {
    Status,
    Promote,
    Demote,
    Release,
}

enum Event {
    Datagram { path: usize, bytes: Vec<u8> },
    Tiebreaker { check: u64, reachable: bool },
    Command { command: HaCommand, reply: oneshot::Sender<HaView> },
}

/// The handle the control socket and metrics endpoint hold.
#[derive(Clone)]
pub struct HaHandle {
    events: mpsc::Sender<Event>,
    latest: Arc<Mutex<HaView>>,
    state: watch::Receiver<State>,
}

impl HaHandle {
    /// Applies `command` in the loop and returns the status after it.
    pub async fn command(&self, command: HaCommand) -> Result<HaView> {
        let (reply, answer) = oneshot::channel();
        self.events.send(Event::Command { command, reply }).await.context("the HA task has stopped")?;
        answer.await.context("the HA task has stopped")
    }

    /// On shutdown: a MASTER with a live peer hands over (demote, make-before-break) and returns once it
    /// has stopped serving, so stopping a director loses no traffic. Returns at once otherwise (nobody
    /// to hand over to), and gives up after `timeout`.
    pub async fn hand_over(&self, timeout: Duration) -> Result<()> {
        let view = self.command(HaCommand::Status).await?;
        let peer_alive = view.status.peer.as_ref().is_some_and(|p| p.alive);
        if view.status.state != State::Master || !peer_alive {
            return Ok(());
        }
        self.command(HaCommand::Demote).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            let view = self.latest();
            if !view.serving {
                return Ok(());
            }
            if !view.status.peer.as_ref().is_some_and(|p| p.alive) {
                anyhow::bail!("the peer went away during the handover");
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("the peer did not take over within {timeout:?}");
            }
        }
    }

    /// This director's state, as it changes: for parts that follow mastership (connection sync sends
    /// while MASTER and receives while BACKUP).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// The status as of the loop's last turn (no round trip: for scrapes).
    pub fn latest(&self) -> HaView {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Publishes `fulcrum_ha_*`; called by the metrics endpoint just before it renders.
    pub fn publish_metrics(&self) {
        let view = self.latest();
        let status = &view.status;
        for state in [State::Init, State::Backup, State::Master, State::Fault] {
            metrics::gauge!("fulcrum_ha_state", "state" => state_name(state)).set(if status.state == state {
                1.0
            } else {
                0.0
            });
        }
        metrics::gauge!("fulcrum_ha_serving").set(if view.serving { 1.0 } else { 0.0 });
        metrics::gauge!("fulcrum_ha_heartbeat_period_seconds").set(status.period.as_secs_f64());
        metrics::gauge!("fulcrum_ha_peer_alive").set(if status.peer.as_ref().is_some_and(|p| p.alive) {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("fulcrum_ha_peer_deadline_seconds")
            .set(status.peer.as_ref().map_or(0.0, |p| p.deadline.as_secs_f64()));
        let c = &status.counters;
        metrics::counter!("fulcrum_ha_heartbeats_sent_total").absolute(c.sent);
        metrics::counter!("fulcrum_ha_heartbeats_received_total").absolute(c.received);
        metrics::counter!("fulcrum_ha_failovers_total").absolute(c.failovers);
        metrics::counter!("fulcrum_ha_peer_lost_total").absolute(c.peer_lost);
        let r = &c.rejected;
        for (reason, count) in [
            ("bad_path", r.bad_path),
            ("bad_length", r.bad_length),
            ("bad_version", r.bad_version),
            ("bad_mac", r.bad_mac),
            ("malformed", r.malformed),
            ("own_node_id", r.own_node_id),
            ("replayed", r.replayed),
            ("duplicate", r.duplicate),
            ("stale_boot", r.stale_boot),
            ("unverified_boot", r.unverified_boot),
        ] {
            metrics::counter!("fulcrum_ha_heartbeats_rejected_total", "reason" => reason).absolute(count);
        }
        for t in &view.shell.transitions {
            metrics::counter!("fulcrum_ha_transitions_total", "to" => t.to.clone(), "reason" => t.reason.clone())
                .absolute(t.count);
        }
        let s = &view.shell;
        metrics::counter!("fulcrum_ha_tiebreaker_checks_total").absolute(s.tiebreaker_checks);
        metrics::counter!("fulcrum_ha_tiebreaker_unreachable_total").absolute(s.tiebreaker_unreachable);
        metrics::counter!("fulcrum_ha_send_errors_total").absolute(s.send_errors);
        metrics::counter!("fulcrum_ha_receive_overflows_total").absolute(s.receive_overflows);
        metrics::counter!("fulcrum_ha_gratuitous_arp_announcements_total").absolute(s.garp_announcements);
        metrics::counter!("fulcrum_ha_notify_failures_total").absolute(s.notify_failures);
    }
}

/// The lowercase state name used in metrics labels, notify arguments and `fulcrumctl`.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Init => "init",
        State::Backup => "backup",
        State::Master => "master",
        State::Fault => "fault",
    }
}

fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::NoPeer => "no_peer",
        Reason::Election => "election",
        Reason::PeerIsMaster => "peer_is_master",
        Reason::PeerDead => "peer_dead",
        Reason::PeerFault => "peer_fault",
        Reason::Preempt => "preempt",
        Reason::Handover => "handover",
        Reason::HandedOver => "handed_over",
        Reason::Promoted => "promoted",
        Reason::DualMasterLost => "dual_master_lost",
        Reason::TiebreakerUnreachable => "tiebreaker_unreachable",
        Reason::Recovered => "recovered",
    }
}

/// The running HA task.
pub struct HaRuntime {
    ha: Ha,
    sockets: Vec<Arc<UdpSocket>>,
    peers: Vec<SocketAddr>,
    path_failing: Vec<bool>,
    section: HaSection,
    dataplane: Arc<Dataplane>,
    events: mpsc::Receiver<Event>,
    sender: mpsc::Sender<Event>,
    latest: Arc<Mutex<HaView>>,
    shell: ShellCounters,
    /// The tiebreaker check whose answer the machine waits for (older answers are late: ignored).
    check: u64,
    next_garp_refresh: Option<Instant>,
    /// After a handover, when to stop forwarding (see `handover_drain_ms`).
    drain_until: Option<Instant>,
    last_load: (Instant, u64),
    /// Datagrams the receive tasks dropped because the loop's queue was full.
    overflows: Arc<AtomicU64>,
    /// Notify runs that could not start or exited unsuccessfully.
    notify_failures: Arc<AtomicU64>,
    state: watch::Sender<State>,
    /// While set, preemption is held until connection sync has received the peer's full table (more
    /// full tables than the baseline) or the deadline passes.
    sync_gate: Option<(Arc<SyncShared>, u64, Instant)>,
}

/// Longest a restarted director holds preemption waiting for the peer's connection table.
const SYNC_HOLD_MAX: Duration = Duration::from_secs(10);

impl HaRuntime {
    /// Binds every path's socket and builds the machine in INIT. The data plane must start not serving.
    pub async fn bind(section: &HaSection, dataplane: Arc<Dataplane>) -> Result<(HaRuntime, HaHandle)> {
        let config = section.machine_config().map_err(anyhow::Error::msg).context("[ha]")?;
        let now = Instant::now();
        let ha = Ha::new(config, random_boot_id(), now).context("[ha]")?;
        let mut sockets = Vec::new();
        for path in &section.paths {
            let socket = UdpSocket::bind(path.local)
                .await
                .with_context(|| format!("binding the heartbeat socket {} (ha.path local)", path.local))?;
            sockets.push(Arc::new(socket));
        }
        dataplane.set_serving(false);
        let (sender, events) = mpsc::channel(1024);
        let latest = Arc::new(Mutex::new(HaView {
            status: ha.status(),
            paths: Vec::new(),
            tiebreakers: Vec::new(),
            serving: false,
            shell: ShellCounters::default(),
        }));
        let packets = total_packets(&dataplane);
        let (state, state_rx) = watch::channel(ha.state());
        let runtime = HaRuntime {
            ha,
            peers: section.paths.iter().map(|p| p.peer).collect(),
            path_failing: vec![false; sockets.len()],
            sockets,
            section: section.clone(),
            dataplane,
            events,
            sender: sender.clone(),
            latest: Arc::clone(&latest),
            shell: ShellCounters::default(),
            check: 0,
            next_garp_refresh: None,
            drain_until: None,
            last_load: (now, packets),
            overflows: Arc::new(AtomicU64::new(0)),
            notify_failures: Arc::new(AtomicU64::new(0)),
            state,
            sync_gate: None,
        };
        runtime.publish();
        Ok((runtime, HaHandle { events: sender, latest, state: state_rx }))
    }

    /// With connection sync: take mastership back from a live peer (preemption, failback) only once the
    /// peer's full connection table has arrived (or after [`SYNC_HOLD_MAX`]), so that failing back loses no
    /// connection. Taking over from a dead peer is never held.
    pub fn hold_preemption_until_synced(&mut self, sync: Arc<SyncShared>) {
        let now = Instant::now();
        let baseline = sync.full_tables_received.load(Ordering::Relaxed);
        self.ha.hold_preemption(now, true);
        self.sync_gate = Some((sync, baseline, now + SYNC_HOLD_MAX));
    }

    fn check_sync_gate(&mut self, now: Instant) {
        let Some((sync, baseline, deadline)) = &self.sync_gate else { return };
        let received = sync.full_tables_received.load(Ordering::Relaxed) > *baseline;
        if received || now >= *deadline {
            if received {
                info!("HA: the peer's connection table has arrived; preemption allowed");
            } else {
                warn!("HA: no connection table from the peer within {SYNC_HOLD_MAX:?}; preemption allowed anyway");
            }
            self.sync_gate = None;
            self.ha.hold_preemption(now, false);
        }
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) {
        for (path, socket) in self.sockets.iter().enumerate() {
            tokio::spawn(receive(path, Arc::clone(socket), self.sender.clone(), Arc::clone(&self.overflows)));
        }
        info!(
            node_id = self.section.node_id,
            priority = self.section.priority,
            paths = self.peers.len(),
            "HA: INIT, listening for the peer"
        );
        let mut load_tick = tokio::time::interval(LOAD_SAMPLE);
        load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.drive(Instant::now()).await;
        loop {
            let wake = self.wake_at();
            tokio::select! {
                event = self.events.recv() => {
                    let Some(event) = event else { return };
                    let now = Instant::now();
                    match event {
                        Event::Datagram { path, bytes } => self.ha.handle_datagram(now, path, &bytes),
                        Event::Tiebreaker { check, reachable } => {
                            if check == self.check {
                                if !reachable {
                                    self.shell.tiebreaker_unreachable += 1;
                                }
                                self.ha.tiebreaker_result(now, reachable);
                            }
                        }
                        Event::Command { command, reply } => {
                            match command {
                                HaCommand::Status => {}
                                HaCommand::Promote => self.ha.promote(now),
                                HaCommand::Demote => self.ha.demote(now),
                                HaCommand::Release => self.ha.release(now),
                            }
                            if command != HaCommand::Status {
                                info!(?command, "HA: operator command");
                            }
                            self.drive(now).await;
                            let _ = reply.send(self.view());
                            continue;
                        }
                    }
                    self.drive(now).await;
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    let now = Instant::now();
                    if self.next_garp_refresh.is_some_and(|t| now >= t) {
                        self.announce();
                    }
                    if self.drain_until.is_some_and(|t| now >= t) {
                        self.drain_until = None;
                        if self.ha.state() != State::Master {
                            self.dataplane.set_serving(false);
                            info!("HA: handover drain over, not serving");
                        }
                    }
                    self.ha.handle_timeout(now);
                    self.drive(now).await;
                }
                _ = load_tick.tick() => {
                    let now = Instant::now();
                    let load = self.sample_load(now);
                    self.ha.set_load(now, load);
                    self.check_sync_gate(now);
                    self.drive(now).await;
                }
            }
        }
    }

    fn wake_at(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let machine = self.ha.poll_timeout().unwrap_or(far);
        [self.next_garp_refresh, self.drain_until].into_iter().flatten().fold(machine, Instant::min)
    }

    /// Sends what the machine has to send and applies its actions.
    async fn drive(&mut self, now: Instant) {
        while let Some(transmit) = self.ha.poll_transmit(now) {
            let (Some(socket), Some(peer)) = (self.sockets.get(transmit.path), self.peers.get(transmit.path)) else {
                continue;
            };
            match socket.try_send_to(&transmit.bytes, *peer) {
                Ok(_) => {
                    if std::mem::replace(&mut self.path_failing[transmit.path], false) {
                        info!(path = transmit.path, %peer, "HA: heartbeats go out again");
                    }
                }
                Err(e) => {
                    self.shell.send_errors += 1;
                    if !std::mem::replace(&mut self.path_failing[transmit.path], true) {
                        warn!(path = transmit.path, %peer, error = %e, "HA: cannot send heartbeats on this path");
                    }
                }
            }
        }
        while let Some(action) = self.ha.poll_action() {
            self.apply(action);
        }
        self.publish();
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::BecomeMaster { reason } => {
                self.drain_until = None;
                self.dataplane.set_serving(true);
                self.count_transition(State::Master, reason);
                self.next_garp_refresh = self.garp_refresh().map(|every| Instant::now() + every);
                warn!(reason = reason_name(reason), "HA: MASTER, serving the VIPs");
            }
            Action::BecomeBackup { reason } => {
                self.count_transition(State::Backup, reason);
                self.next_garp_refresh = None;
                let drain = Duration::from_millis(self.section.handover_drain_ms.into());
                let serving = self.dataplane.serving.load(Ordering::Relaxed);
                // Not after a lost dual-master contest: two directors answering ARP is what that ends.
                if serving && reason == Reason::HandedOver && !drain.is_zero() {
                    // Make-before-break: the new MASTER is serving; clients whose ARP caches still
                    // point here keep being forwarded until its gratuitous ARPs have reached them.
                    self.drain_until = Some(Instant::now() + drain);
                    warn!(reason = reason_name(reason), drain_ms = drain.as_millis() as u64, "HA: BACKUP, draining");
                } else {
                    self.dataplane.set_serving(false);
                    warn!(reason = reason_name(reason), "HA: BACKUP, not serving");
                }
            }
            Action::EnterFault { reason } => {
                self.drain_until = None;
                self.dataplane.set_serving(false);
                self.count_transition(State::Fault, reason);
                self.next_garp_refresh = None;
                error!(reason = reason_name(reason), "HA: FAULT, not serving");
            }
            Action::SendGratuitousArp => self.announce(),
            Action::CheckTiebreaker => {
                self.check += 1;
                self.shell.tiebreaker_checks += 1;
                let (check, sender) = (self.check, self.sender.clone());
                let targets: Vec<Ipv4Addr> = self
                    .section
                    .tiebreakers
                    .iter()
                    .filter_map(|ip| match ip {
                        std::net::IpAddr::V4(v4) => Some(*v4),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .collect();
                // Answer a little before the machine's own timeout would count it unreachable.
                let budget = Duration::from_millis(self.section.tiebreaker_timeout_ms.into()).mul_f64(0.9);
                tokio::spawn(async move {
                    let reachable = any_reachable(&targets, budget).await;
                    let _ = sender.send(Event::Tiebreaker { check, reachable }).await;
                });
            }
            Action::RunNotify(state) => {
                if let Some(program) = self.section.notify.clone() {
                    self.run_notify(program, state);
                }
            }
        }
    }

    fn garp_refresh(&self) -> Option<Duration> {
        (self.section.garp_refresh_s > 0).then(|| Duration::from_secs(self.section.garp_refresh_s.into()))
    }

    fn announce(&mut self) {
        self.dataplane.announce();
        self.shell.garp_announcements += 1;
        if self.ha.state() == State::Master {
            self.next_garp_refresh = self.garp_refresh().map(|every| Instant::now() + every);
        }
    }

    fn count_transition(&mut self, to: State, reason: Reason) {
        let (to, reason) = (state_name(to), reason_name(reason));
        match self.shell.transitions.iter_mut().find(|t| t.to == to && t.reason == reason) {
            Some(t) => t.count += 1,
            None => self.shell.transitions.push(TransitionCount { to: to.into(), reason: reason.into(), count: 1 }),
        }
    }

    fn run_notify(&mut self, program: PathBuf, state: State) {
        let mut command = tokio::process::Command::new(&program);
        command.arg(state_name(state)).stdin(std::process::Stdio::null()).kill_on_drop(false);
        match command.spawn() {
            Ok(mut child) => {
                let failures = Arc::clone(&self.notify_failures);
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(status) if status.success() => debug!(program = %program.display(), "HA: notify done"),
                        Ok(status) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            warn!(program = %program.display(), %status, "HA: notify failed");
                        }
                        Err(e) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            warn!(program = %program.display(), error = %e, "HA: notify failed");
                        }
                    }
                });
            }
            Err(e) => {
                self.notify_failures.fetch_add(1, Ordering::Relaxed);
                warn!(program = %program.display(), error = %e, "HA: cannot run notify");
            }
        }
    }

    fn sample_load(&mut self, now: Instant) -> LoadSummary {
        let packets = total_packets(&self.dataplane);
        let (then, before) = std::mem::replace(&mut self.last_load, (now, packets));
        let seconds = now.duration_since(then).as_secs_f64();
        let pps = if seconds > 0.0 { (packets.saturating_sub(before) as f64 / seconds) as u64 } else { 0 };
        let conns = self.dataplane.counters.iter().map(|w| w.table_entries.load(Ordering::Relaxed)).sum();
        LoadSummary { pps, conns }
    }

    fn view(&self) -> HaView {
        HaView {
            status: self.ha.status(),
            paths: self.section.paths.iter().map(|p| format!("{} -> {}", p.local, p.peer)).collect(),
            tiebreakers: self.section.tiebreakers.iter().map(ToString::to_string).collect(),
            serving: self.dataplane.serving.load(Ordering::Relaxed),
            shell: ShellCounters {
                receive_overflows: self.overflows.load(Ordering::Relaxed),
                notify_failures: self.notify_failures.load(Ordering::Relaxed),
                ..self.shell.clone()
            },
        }
    }

    fn publish(&self) {
        self.state.send_if_modified(|state| std::mem::replace(state, self.ha.state()) != self.ha.state());
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = self.view();
    }
}

/// Frames the data plane transmitted (forwarded packets, plus a few ARP frames): the load the period follows.
fn total_packets(dataplane: &Dataplane) -> u64 {
    dataplane.counters.iter().map(|w| w.looped.transmitted.load(Ordering::Relaxed)).sum()
}

async fn receive(path: usize, socket: Arc<UdpSocket>, events: mpsc::Sender<Event>, overflows: Arc<AtomicU64>) {
    let mut buffer = [0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buffer).await {
            Ok((n, _from)) => {
                let event = Event::Datagram { path, bytes: buffer[..n].to_vec() };
                match events.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        overflows.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Err(e) => {
                // ICMP errors from a peer that is down surface here (ECONNREFUSED); nothing to do.
                debug!(path, error = %e, "HA: heartbeat socket");
            }
        }
    }
}

fn random_boot_id() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(bytes)
    } else {
        crate::conntrack::random_seed() ^ u64::from(std::process::id())
    }
}

/// Whether any of `targets` answers an ICMP echo within `budget`. No targets: reachable.
pub async fn any_reachable(targets: &[Ipv4Addr], budget: Duration) -> bool {
    if targets.is_empty() {
        return true;
    }
    match tokio::time::timeout(budget, ping_any(targets)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            debug!(error = %e, "HA: tiebreaker check failed");
            false
        }
        Err(_) => false,
    }
}

/// Sends one echo request to every target and returns at the first matching reply.
async fn ping_any(targets: &[Ipv4Addr]) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use tokio::io::unix::AsyncFd;

    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a raw ICMP socket (needs root or CAP_NET_RAW)");
    }
    // SAFETY: fd is a fresh descriptor we own.
    // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open for its whole lifetime.
    let socket = unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd)) }
        .map_err(|e| anyhow::anyhow!("registering the ICMP socket: {e}"))?;
    let id = (random_boot_id() & 0xffff) as u16;
    let mut sent_any = false;
    for (seq, target) in targets.iter().enumerate() {
        let request = echo_request(id, seq as u16);
        let addr = sockaddr(*target);
        // SAFETY: buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            debug!(%target, error = %std::io::Error::last_os_error(), "HA: tiebreaker echo not sent");
        } else {
            sent_any = true;
        }
    }
    if !sent_any {
        // No route to any of them (unreachable, prohibited): that is the answer, no need to wait.
        anyhow::bail!("no echo request could be sent to any tiebreaker");
    }
    let mut buffer = [0u8; 1500];
    loop {
        let mut guard = socket.readable().await.context("waiting on the ICMP socket")?;
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(e).context("reading the ICMP socket");
        }
        if is_echo_reply(&buffer[..n as usize], id, targets) {
            return Ok(());
        }
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    }
}

fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut packet = [0u8; 16];
    packet[0] = 8; // echo request
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..16].copy_from_slice(b"fulcrum!");
    let sum = crate::wire::checksum::data(&packet);
    packet[2..4].copy_from_slice(&(!sum).to_be_bytes());
    packet
}

/// A raw ICMP socket reads whole IPv4 packets: an echo reply (type 0) with our id from one of `targets`.
fn is_echo_reply(packet: &[u8], id: u16, targets: &[Ipv4Addr]) -> bool {
    let Some(&first) = packet.first() else { return false };
    let header = usize::from(first & 0x0f) * 4;
    if header < 20 || packet.len() < header + 8 {
        return false;
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[header..];
    icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id && targets.contains(&source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_checksums_to_zero() {
        let request = echo_request(0x1234, 7);
        assert_eq!(crate::wire::checksum::data(&request), 0xffff);
    }

    #[test]
    fn only_our_echo_replies_from_a_tiebreaker_count() {
        let target = Ipv4Addr::new(10, 0, 0, 1);
        let mut packet = vec![0x45u8; 20];
        packet[12..16].copy_from_slice(&target.octets());
        let mut icmp = echo_request(0x1234, 0);
        icmp[0] = 0;
        packet.extend_from_slice(&icmp);
        assert!(is_echo_reply(&packet, 0x1234, &[target]));
        assert!(!is_echo_reply(&packet, 0x4321, &[target]), "another pinger's reply");
        assert!(!is_echo_reply(&packet, 0x1234, &[Ipv4Addr::new(10, 0, 0, 9)]), "from elsewhere");
        packet[20] = 8;
        assert!(!is_echo_reply(&packet, 0x1234, &[target]), "a request, not a reply");
        assert!(!is_echo_reply(&packet[..24], 0x1234, &[target]), "truncated");
    }
}
