//! Dynamic feedback and health checks, wired into the running director.
//!
//! [`FeedbackCore`] is pure: it holds, per service, the feedback [`Blender`], one [`HealthState`] per real server
//! and the [`ServiceQuorum`], and at every [`FeedbackCore::tick`] turns the agents' reports, the data plane's
//! connection counts, the health-check results recorded since and the time into the numbers the data plane
//! schedules with, stored in each server's [`ServerState`] atomics. [`spawn`] is the thin tokio shell around it:
//! a timer, the configuration watch, the health checkers' results (`crate::health::checker`), logging and
//! metrics.
//!
//! # The effective weight: one place decides it
//!
//! ```text
//! full      = feedback on ? blender weight (configured when reports are missing or stale, 0 when down)
//!                          : configured weight
//! effective = health serving ? full (ramped from 1 to full during slow start) : 0
//! below quorum with a sorry server: every real server 0, the sorry server 1
//! ```
//!
//! When no agent of a feedback service has been heard from lately (every server with a configured weight stale
//! or down for its report's age, one at least down), the silence says more about the agents, their certificates
//! or the network to them than about the servers: rather than take the whole service down, `full` falls back to
//! the configured shares (the health checks still decide `effective`) until an agent reports again, and for
//! `down_after` after that for the servers whose agents are still reconnecting. Both switches are logged and
//! counted. A server the feedback marks down is not serving for the quorum.
//!
//! `df`'s `T` and `L` terms come from the blender too (0 with feedback off), so `df` and `wlc` differ exactly by
//! the feedback. Everything is recomputed every `period_ms` (the shortest of the services'), and at once after
//! a health-check result or a configuration change.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::agents::{AgentLatest, AgentRegistry};
use crate::config::{DirectorConfig, FeedbackSettings, HealthCheckKind, HealthSettings, OnFailure, Protocol};
use crate::control_plane::{ControlPlane, ServiceKey};
use crate::dataplane::table::{Health, ServerEntry, ServerState, ServiceTable};
use crate::feedback::{Blender, DownReason, FeedbackStatus, RejectReason, ReportInput, ServerInput, StaleReason};
use crate::flow::Proto;
use crate::health::checker::{self, CheckOutcome, CheckSpec};
use crate::health::quorum::{QuorumConfig, QuorumTransition, Routing, ServiceQuorum};
use crate::health::{CheckResult, HealthState, HealthStatus, ReasonKind, Transition};
use crate::sched::server_key;

/// Something worth a log line and a counter.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Health {
        service: ServiceKey,
        server: (Ipv4Addr, u16),
        transition: Transition,
    },
    Quorum {
        service: ServiceKey,
        transition: QuorumTransition,
    },
    Rejected {
        service: ServiceKey,
        server: (Ipv4Addr, u16),
        reason: RejectReason,
    },
    /// A server's feedback status changed kind (normal, stale, down).
    Feedback {
        service: ServiceKey,
        server: (Ipv4Addr, u16),
        from: FeedbackStatus,
        to: FeedbackStatus,
    },
    /// Every agent of the service fell silent (`silent`: weights fall back to the configured ones), or one
    /// reports again.
    AgentsSilent {
        service: ServiceKey,
        silent: bool,
    },
}

struct ServerHealth {
    server: (Ipv4Addr, u16),
    /// `None` when the service has no health signal: always serving.
    state: Option<HealthState>,
}

struct ServiceRuntime {
    key: ServiceKey,
    feedback: FeedbackSettings,
    feedback_on: bool,
    health: HealthSettings,
    blender: Option<Blender>,
    servers: Vec<ServerHealth>,
    /// Evaluated only when the service has a health signal or a sorry server.
    quorum: Option<ServiceQuorum>,
    /// No agent of the service has reported for `down_after`: weights fall back to the configured ones.
    agents_silent: bool,
    /// Until then, after the silence ended, a server still marked down for its report's age keeps its configured
    /// share: its agent is reconnecting (with back-off) like the ones already back.
    silence_grace_until: Option<Instant>,
    /// The sorry server stood in at the last tick (what was published, not what a new quorum would say).
    sorry_active: bool,
}

/// The pure part: per-service blenders, health states and quorums.
#[derive(Default)]
pub struct FeedbackCore {
    services: Vec<ServiceRuntime>,
}

fn new_health(settings: &HealthSettings, serving_before: bool, now: Instant) -> Option<HealthState> {
    if !settings.is_checked() {
        return None;
    }
    let config = crate::health::HealthConfig { initially_up: serving_before, ..settings.health_config() };
    // `DirectorConfig::check` keeps rise and fall ≥ 1, so this is refused only by a bug: say so, check nothing.
    let mut state = HealthState::new(config)
        .inspect_err(|e| tracing::error!(error = %e, "health settings refused; the service is not health-checked"))
        .ok()?;
    if settings.kind == HealthCheckKind::None {
        // Without active checks, the checks count as passing: only the agent decides.
        for _ in 0..settings.rise {
            state.record(now, CheckResult::Success);
        }
    }
    Some(state)
}

fn is_serving(state: &Option<HealthState>) -> bool {
    state.as_ref().is_none_or(|s| s.status().is_serving())
}

impl FeedbackCore {
    /// Follows a new configuration: keeps the state of unchanged services and servers, starts new ones (a new
    /// server with health checks starts down until proven healthy), and restarts what changed (a server that
    /// was serving stays up across a change of its service's health settings).
    pub fn reconfigure(&mut self, now: Instant, config: &DirectorConfig) {
        let mut old = std::mem::take(&mut self.services);
        for service in &config.services {
            if !service.vip.is_ipv4() {
                continue;
            }
            let key = ServiceKey { vip: service.vip, port: service.port, protocol: service.protocol };
            let feedback_on = service.feedback.is_enabled(service.scheduler);
            let previous = old.iter().position(|s| s.key == key).map(|i| old.swap_remove(i));
            let keep_blender =
                previous.as_ref().is_some_and(|p| p.feedback == service.feedback && p.feedback_on == feedback_on);
            let keep_health = previous.as_ref().is_some_and(|p| p.health == service.health);
            // Carried even when the blender restarts: its servers then start stale, not down, and the next tick
            // reports the silence's end once, as any other.
            let (previous_silent, silence_grace_until, sorry_active) = previous
                .as_ref()
                .map_or((false, None, false), |p| (p.agents_silent, p.silence_grace_until, p.sorry_active));
            let (mut old_servers, old_blender, old_quorum) = match previous {
                Some(p) => (p.servers, p.blender, p.quorum),
                None => (Vec::new(), None, None),
            };
            let blender = match (keep_blender, old_blender) {
                (true, blender) => blender,
                // `DirectorConfig::check` validated the blender settings: a refusal here is a bug, said aloud.
                (false, _) => feedback_on
                    .then(|| {
                        Blender::new(service.feedback.blender_config())
                            .inspect_err(
                                |e| tracing::error!(%key, error = %e, "feedback settings refused; feedback off"),
                            )
                            .ok()
                    })
                    .flatten(),
            };
            let servers = service
                .servers
                .iter()
                .filter_map(|s| match s.address {
                    IpAddr::V4(a) => Some((a, s.port_for(service))),
                    IpAddr::V6(_) => None,
                })
                .map(|server| {
                    let before =
                        old_servers.iter().position(|s| s.server == server).map(|i| old_servers.swap_remove(i));
                    let state = match before {
                        Some(b) if keep_health => b.state,
                        Some(b) => new_health(&service.health, is_serving(&b.state), now),
                        None => new_health(&service.health, false, now),
                    };
                    ServerHealth { server, state }
                })
                .collect();
            let wants_quorum = service.health.is_checked() || service.health.sorry_server.is_some();
            let quorum = match (keep_health, old_quorum) {
                (true, Some(q)) => Some(q),
                (_, old) => wants_quorum.then(|| {
                    let config = QuorumConfig {
                        min_servers: service.health.quorum,
                        min_weight: u64::from(service.health.quorum.min(1)),
                        hysteresis: service.health.hysteresis,
                        hysteresis_weight: 0,
                        sorry_server: service.health.sorry_server,
                    };
                    // New settings carry on from the old state: a change of, say, a check's timeout must not by
                    // itself send the service to its sorry server (a restarted quorum starts as not met, and
                    // with a hysteresis the servers serving may not be enough to regain it), nor silently.
                    match old {
                        Some(old) => ServiceQuorum::continuing(config, old.is_met()),
                        None => ServiceQuorum::new(config),
                    }
                }),
            };
            self.services.push(ServiceRuntime {
                key,
                feedback: service.feedback.clone(),
                feedback_on,
                health: service.health.clone(),
                blender,
                servers,
                quorum,
                agents_silent: previous_silent,
                silence_grace_until,
                sorry_active,
            });
        }
    }

    /// One active check's result for a real server of a service; unknown servers (a check that finished just
    /// after its server was removed) are ignored.
    pub fn record(&mut self, now: Instant, service: ServiceKey, server: (Ipv4Addr, u16), result: CheckResult) {
        let state = self
            .services
            .iter_mut()
            .find(|s| s.key == service)
            .and_then(|s| s.servers.iter_mut().find(|h| h.server == server))
            .and_then(|h| h.state.as_mut());
        if let Some(state) = state {
            state.record(now, result);
        }
    }

    /// Recomputes and stores every server's effective weight, `df` terms and health; returns what happened.
    pub fn tick(&mut self, now: Instant, table: &ServiceTable, agents: &[AgentLatest]) -> Vec<Event> {
        let mut events = Vec::new();
        for service in &mut self.services {
            let IpAddr::V4(vip) = service.key.vip else { continue };
            let proto = match service.key.protocol {
                Protocol::Tcp => Proto::Tcp,
                Protocol::Udp => Proto::Udp,
            };
            let Some((_, entry)) = table.find(vip, service.key.port, proto) else { continue };
            let all: Vec<&ServerEntry> = entry.servers.iter().filter_map(|id| table.server(*id)).collect();
            let real: Vec<&ServerEntry> = all.iter().copied().filter(|s| !s.sorry).collect();
            let sorry: Option<&ServerState> = all.iter().find(|s| s.sorry).map(|s| &*s.state);
            let agent_of = |address: Ipv4Addr| agents.iter().find(|a| a.real_server == IpAddr::V4(address));

            // 1. Health: agent liveness and due transitions. First, because the blender leaves out the servers
            // not in rotation.
            // Each server's health state, found once: its index in `service.servers`, `None` when unchecked.
            let checked: Vec<Option<usize>> = real
                .iter()
                .map(|s| service.servers.iter().position(|h| h.server == (s.address, s.port) && h.state.is_some()))
                .collect();
            let mut statuses: Vec<Option<HealthStatus>> = Vec::with_capacity(real.len());
            for (s, &at) in real.iter().zip(&checked) {
                let Some(state) = at.and_then(|at| service.servers[at].state.as_mut()) else {
                    statuses.push(None);
                    continue;
                };
                let agent = agent_of(s.address);
                let age = agent.and_then(|a| a.report.as_ref()).map(|(_, at)| now.saturating_duration_since(*at));
                state.agent(now, agent.is_some_and(|a| a.connected), age);
                while let Some(transition) = state.poll(now) {
                    events.push(Event::Health { service: service.key, server: (s.address, s.port), transition });
                }
                statuses.push(Some(state.status()));
            }
            // The sorry server standing in since the last period takes every real server out of rotation.
            let sorry_before = service.sorry_active;

            // 2. Feedback: the full weight and df's terms.
            let mut full: Vec<Blended> =
                real.iter().map(|s| Blended { weight: s.configured_weight, ..Blended::default() }).collect();
            if let Some(blender) = &mut service.blender {
                let inputs: Vec<ServerInput> = real
                    .iter()
                    .zip(&statuses)
                    .map(|(s, status)| ServerInput {
                        key: server_key(s.address, s.port),
                        configured_weight: s.configured_weight,
                        report: agent_of(s.address)
                            .and_then(|a| a.report.as_ref())
                            .map(|(report, at)| ReportInput::from_report(report, *at)),
                        active: s.state.active(),
                        inactive: s.state.inactive(),
                        connections_total: s.state.sum(|w| &w.connections_total),
                        connections_established: s.state.sum(|w| &w.connections_established),
                        in_rotation: !sorry_before && status.is_none_or(|st| st == HealthStatus::Up),
                    })
                    .collect();
                let outputs = blender.update(now, &inputs);
                for ((out, f), s) in outputs.iter().zip(&mut full).zip(&real) {
                    *f = Blended {
                        weight: out.effective_weight,
                        response_time_norm: out.response_time_norm,
                        cpu_norm: out.cpu_norm,
                        capacity_per_s: out
                            .capacity_per_s
                            .map_or(0, |c| c.round().clamp(1.0, f64::from(u32::MAX)) as u32),
                    };
                    let server = (s.address, s.port);
                    if let Some(reason) = out.rejected {
                        events.push(Event::Rejected { service: service.key, server, reason });
                    }
                    if out.status.name() != out.status_before.name() {
                        let (from, to) = (out.status_before, out.status);
                        events.push(Event::Feedback { service: service.key, server, from, to });
                    }
                }
                let silent =
                    agents_silent(outputs.iter().map(|o| o.status).zip(real.iter().map(|s| s.configured_weight)));
                if silent != service.agents_silent {
                    service.agents_silent = silent;
                    service.silence_grace_until = (!silent).then(|| now + blender.config().down_after);
                    events.push(Event::AgentsSilent { service: service.key, silent });
                }
                let grace = service.silence_grace_until.is_some_and(|until| now < until);
                for ((f, s), out) in full.iter_mut().zip(&real).zip(blender.outputs()) {
                    if silent || (grace && down_for_age(out.status)) {
                        *f = Blended { weight: blender.neutral_weight(s.configured_weight), ..Blended::default() };
                    }
                }
            }

            // 3. Health: the weight each server gets, with the slow-start ramp.
            let mut decided: Vec<(u32, Health, bool)> = Vec::with_capacity(real.len());
            for ((&Blended { weight, .. }, &at), &status) in full.iter().zip(&checked).zip(&statuses) {
                let (Some(state), Some(status)) = (at.and_then(|at| service.servers[at].state.as_ref()), status) else {
                    decided.push((weight, Health::Unchecked, true));
                    continue;
                };
                let shown = match status {
                    HealthStatus::Up => Health::Up,
                    HealthStatus::SlowStart { .. } => Health::SlowStart,
                    HealthStatus::HeldDown { .. } => Health::HeldDown,
                    HealthStatus::Down if service.health.on_failure == OnFailure::Remove => Health::Removed,
                    HealthStatus::Down => Health::Down,
                };
                decided.push((state.effective_weight(now, weight), shown, status.is_serving()));
            }

            // 4. Quorum and sorry server.
            let mut routing = Routing::RealServers;
            if let Some(quorum) = &mut service.quorum {
                // Serving: health says so, and the feedback has not marked the server down (its full weight 0).
                let serving = real
                    .iter()
                    .zip(&decided)
                    .zip(&full)
                    .filter(|((s, d), f)| d.2 && s.configured_weight > 0 && f.weight > 0)
                    .map(|((s, _), _)| s.configured_weight);
                if let Some(transition) = quorum.evaluate(now, serving) {
                    events.push(Event::Quorum { service: service.key, transition });
                }
                routing = quorum.routing();
            }
            let sorry_active = matches!(routing, Routing::SorryServer(_));
            service.sorry_active = sorry_active;

            // 5. Publish.
            for ((s, fed), &(weight, health, _)) in real.iter().zip(&full).zip(&decided) {
                let weight = if sorry_active { 0 } else { weight };
                s.state.effective_weight.store(weight, Ordering::Relaxed);
                s.state.response_time_norm.store(fed.response_time_norm, Ordering::Relaxed);
                s.state.cpu_norm.store(fed.cpu_norm, Ordering::Relaxed);
                s.state.capacity_per_s.store(fed.capacity_per_s, Ordering::Relaxed);
                s.state.health.store(health as u8, Ordering::Relaxed);
            }
            if let Some(sorry) = sorry {
                let (weight, health) = if sorry_active { (1, Health::SorryActive) } else { (0, Health::SorryStandby) };
                sorry.effective_weight.store(weight, Ordering::Relaxed);
                sorry.health.store(health as u8, Ordering::Relaxed);
            }
        }
        events
    }

    /// The shortest recomputation period over the services (500 ms without services).
    pub fn period(&self) -> Duration {
        let ms = self.services.iter().map(|s| s.feedback.period_ms).min().unwrap_or(500);
        Duration::from_millis(ms.into())
    }
}

/// Whether no agent of a service is heard from: every server with a configured weight has a report too old to
/// count (stale or down for its age), and at least one is down for it. Agents that fell silent together reach
/// `down_after` a report interval apart; waiting for all of them would drop the first ones' servers meanwhile.
/// A server that never reported is stale, not silent: it keeps its configured share anyway.
fn agents_silent(servers: impl Iterator<Item = (FeedbackStatus, u32)>) -> bool {
    let mut down = false;
    for (status, _) in servers.filter(|&(_, configured)| configured > 0) {
        match status {
            FeedbackStatus::Stale { reason: StaleReason::ReportOld { .. } } => {}
            status if down_for_age(status) => down = true,
            _ => return false,
        }
    }
    down
}

/// Marked down because its newest report is older than `down_after`.
fn down_for_age(status: FeedbackStatus) -> bool {
    matches!(status, FeedbackStatus::Down { reason: DownReason::ReportTooOld { .. } })
}

/// What the blender made of one real server this tick, before health and quorum: its full weight (the configured
/// one without feedback), `df`'s T and L, and the estimated capacity per second (0 while unknown).
#[derive(Debug, Clone, Copy, Default)]
struct Blended {
    weight: u32,
    response_time_norm: u32,
    cpu_norm: u32,
    capacity_per_s: u32,
}

/// Logs an event once and counts it.
fn report(event: &Event) {
    match event {
        Event::Health { service, server: (address, port), transition } => {
            let reason = transition.reason.kind().name();
            metrics::counter!("fulcrum_health_transitions_total", "reason" => reason).increment(1);
            let (from, to) = (format!("{:?}", transition.from), format!("{:?}", transition.to));
            if transition.to.is_serving() {
                info!(%service, server = %format!("{address}:{port}"), %from, %to, reason = ?transition.reason, "real server health");
            } else {
                warn!(%service, server = %format!("{address}:{port}"), %from, %to, reason = ?transition.reason, "real server health");
            }
        }
        Event::Quorum { service, transition } => {
            let to = transition.to.name();
            metrics::counter!("fulcrum_quorum_transitions_total", "to" => to).increment(1);
            warn!(%service, to, serving = transition.tally.servers, weight = transition.tally.weight, "service quorum");
        }
        Event::Rejected { service, server: (address, port), reason } => {
            metrics::counter!("fulcrum_feedback_rejected_reports_total", "reason" => reason.name()).increment(1);
            warn!(%service, server = %format!("{address}:{port}"), reason = reason.name(), "agent report refused");
        }
        Event::Feedback { service, server: (address, port), from, to } => {
            metrics::counter!("fulcrum_feedback_transitions_total", "to" => to.name()).increment(1);
            let server = format!("{address}:{port}");
            let (from, reason) = (from.name(), format!("{to:?}"));
            match to {
                FeedbackStatus::Normal => info!(%service, %server, from, to = to.name(), "feedback"),
                _ => warn!(%service, %server, from, to = to.name(), %reason, "feedback"),
            }
        }
        Event::AgentsSilent { service, silent } => {
            metrics::counter!("fulcrum_feedback_agents_silent_total", "silent" => silent_label(*silent)).increment(1);
            if *silent {
                warn!(%service, "no agent of the service reports: going by the configured weights until one does");
            } else {
                info!(%service, "an agent reports again: weights from feedback");
            }
        }
    }
}

const fn silent_label(silent: bool) -> &'static str {
    if silent {
        "true"
    } else {
        "false"
    }
}

/// Registers every series of the event counters [`report`] increments, at 0. A series born at 1 hides that
/// first event from `increase()` and `rate()`, and a dashboard panel over a counter that has never moved would
/// show "no data" rather than a reassuring 0 (Prometheus's "avoid missing metrics").
fn register_event_counters() {
    for kind in ReasonKind::ALL {
        metrics::counter!("fulcrum_health_transitions_total", "reason" => kind.name()).increment(0);
    }
    let sorry = std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    for to in [Routing::RealServers, Routing::BelowQuorum, Routing::SorryServer(sorry)] {
        metrics::counter!("fulcrum_quorum_transitions_total", "to" => to.name()).increment(0);
    }
    for reason in RejectReason::ALL {
        metrics::counter!("fulcrum_feedback_rejected_reports_total", "reason" => reason.name()).increment(0);
    }
    for to in [
        FeedbackStatus::Normal,
        FeedbackStatus::Stale { reason: StaleReason::NeverReported },
        FeedbackStatus::Down { reason: DownReason::ProbeFailures { consecutive: 0 } },
    ] {
        metrics::counter!("fulcrum_feedback_transitions_total", "to" => to.name()).increment(0);
    }
    for silent in [true, false] {
        metrics::counter!("fulcrum_feedback_agents_silent_total", "silent" => silent_label(silent)).increment(0);
    }
}

/// Sets `fulcrum_server_health_up{service,server}`.
fn publish_health(table: &ServiceTable) {
    for service in &table.services {
        let proto = match service.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let service_label = format!("{}:{}/{proto}", service.vip, service.port);
        for server in service.servers.iter().filter_map(|id| table.server(*id)) {
            let labels =
                [("service", service_label.clone()), ("server", format!("{}:{}", server.address, server.port))];
            metrics::gauge!("fulcrum_server_health_up", &labels)
                .set(f64::from(u8::from(server.state.health().is_serving())));
        }
    }
}

/// A checker task, aborted when dropped.
struct Checker {
    spec: CheckSpec,
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts, stops and restarts checker tasks so that exactly the configured checks run.
fn sync_checkers(
    config: &DirectorConfig,
    checkers: &mut HashMap<(ServiceKey, Ipv4Addr, u16), Checker>,
    results: &mpsc::Sender<CheckOutcome>,
) {
    let wanted = checker::specs(config);
    checkers.retain(|key, running| wanted.iter().any(|w| (w.service, w.address, w.port) == *key && *w == running.spec));
    for spec in wanted {
        let key = (spec.service, spec.address, spec.port);
        checkers
            .entry(key)
            .or_insert_with(|| Checker { task: tokio::spawn(checker::run(spec.clone(), results.clone())), spec });
    }
}

/// The feedback and health task: runs until aborted.
pub fn spawn(
    control: Arc<ControlPlane>,
    mut config_rx: watch::Receiver<Arc<DirectorConfig>>,
    agents: AgentRegistry,
) -> JoinHandle<()> {
    register_event_counters();
    tokio::spawn(async move {
        let table = control.table();
        let mut core = FeedbackCore::default();
        let (results_tx, mut results) = mpsc::channel::<CheckOutcome>(1024);
        let mut checkers = HashMap::new();
        let config = config_rx.borrow_and_update().clone();
        core.reconfigure(Instant::now(), &config);
        sync_checkers(&config, &mut checkers, &results_tx);
        let mut period = core.period();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                // A report is blended as soon as it arrives: waiting for the period would add up to a period to
                // every reaction, and the director's connection counts read with it would cover a different
                // interval than the report's CPU.
                () = agents.report_arrived() => {}
                changed = config_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let config = config_rx.borrow_and_update().clone();
                    core.reconfigure(Instant::now(), &config);
                    sync_checkers(&config, &mut checkers, &results_tx);
                    if core.period() != period {
                        period = core.period();
                        ticker = tokio::time::interval(period);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                Some(outcome) = results.recv() => {
                    core.record(outcome.at, outcome.service, (outcome.address, outcome.port), outcome.result);
                    // Results that arrived together are applied together: one recomputation for all.
                    while let Ok(outcome) = results.try_recv() {
                        core.record(outcome.at, outcome.service, (outcome.address, outcome.port), outcome.result);
                    }
                }
            }
            let snapshot = table.load();
            // The reports first, then the clock: a report stamped between the two would otherwise be refused
            // as received in the future.
            let latest = agents.latest();
            for event in core.tick(Instant::now(), &snapshot, &latest) {
                report(&event);
            }
            publish_health(&snapshot);
        }
    })
}

#[cfg(test)]
mod tests;
