//! The agent's run loop: sample, probe, publish, report, and say goodbye on SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fulcrum_protocol::{
    Hello, LoadReport, ProbeOutcome, ProbeReport, VersionRange, FULL_SCALE_BP, MAX_REPORT_INTERVAL_MS,
    MIN_REPORT_INTERVAL_MS,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{AgentConfig, CpuSetting, Overrides};
use crate::sample::cgroup::CgroupCpu;
use crate::sample::probe::{probe_once, ProbeConfig, ProbeTracker};
use crate::sample::{CpuSourceConfig, Sampler};
use crate::sd_notify::{self, Watchdog};
use crate::transport::{client_config, Link, LinkStatus, TlsFiles};

/// Why [`run`] returned.
#[derive(Debug)]
pub enum Stopped {
    /// SIGTERM or SIGINT: the agent said goodbye and exits.
    Shutdown,
    /// SIGHUP with a valid new configuration, already [`prepare`]d: the agent said goodbye and runs again with it.
    Reload(Box<(AgentConfig, Prepared)>),
}

/// What a configuration needs from the machine before the agent can run with it: its CPU source located and its
/// TLS files read. Made before a reload is chosen, so that a configuration which cannot run (a cgroup that does
/// not exist, a key file without a key) is refused while the running one carries on, rather than ending the
/// process after the goodbyes.
#[derive(Debug)]
pub struct Prepared {
    cpu_source: CpuSourceConfig,
    client: quinn::ClientConfig,
    /// [`TlsFiles::digest`] of the files `client` was made from.
    tls_digest: u64,
}

/// Locates `config`'s CPU source and reads its TLS files.
pub fn prepare(config: &AgentConfig) -> Result<Prepared> {
    let cpu_source = match &config.cpu {
        CpuSetting::Proc => CpuSourceConfig::Proc,
        CpuSetting::Cgroup(name) => CpuSourceConfig::Cgroup(
            CgroupCpu::locate(name).with_context(|| format!("locating the cgroup {name:?} (cpu.cgroup)"))?,
        ),
    };
    let tls = TlsFiles::read(&config.ca, &config.cert, &config.key)?;
    Ok(Prepared { cpu_source, client: client_config(&tls)?, tls_digest: tls.digest() })
}

/// Runs the agent with the configuration from `overrides` until SIGTERM or SIGINT, re-reading it on SIGHUP (a
/// refused configuration is logged and the running one stays).
pub async fn run_until_stopped(overrides: &Overrides, mut config: AgentConfig) -> Result<()> {
    if let Some(listen) = config.metrics_listen {
        install_metrics(listen)?;
    }
    metrics::gauge!("fulcrum_agent_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let mut watchdog = Watchdog::from_env();
    let mut prepared = prepare(&config)?;
    loop {
        match run(overrides, config, prepared, &mut watchdog).await? {
            Stopped::Shutdown => {
                sd_notify::notify(&[sd_notify::State::Stopping]);
                return Ok(());
            }
            Stopped::Reload(new) => {
                info!("configuration reloaded; reconnecting with it");
                (config, prepared) = *new;
            }
        }
    }
}

/// Runs until a signal; says goodbye to every director before returning. Feeds the service manager's
/// `watchdog` from its loop, so a stuck loop gets the agent restarted.
pub async fn run(
    overrides: &Overrides,
    config: AgentConfig,
    prepared: Prepared,
    watchdog: &mut Watchdog,
) -> Result<Stopped> {
    let Prepared { cpu_source, client, tls_digest: running_tls } = prepared;
    let mut sampler = Sampler::new(cpu_source, config.ports.clone());

    let (reports_tx, reports_rx) = watch::channel::<Option<LoadReport>>(None);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let hello = Hello {
        agent_name: config.name.clone(),
        versions: VersionRange::SUPPORTED,
        real_server: config.real_server,
        ports: config.ports.clone(),
        software: env!("CARGO_PKG_VERSION").to_string(),
    };
    let mut statuses = Vec::new();
    let mut links = Vec::new();
    for target in &config.directors {
        let status = Arc::new(LinkStatus::default());
        statuses.push(Arc::clone(&status));
        let link = Link {
            target: target.clone(),
            hello: hello.clone(),
            client: client.clone(),
            reports: reports_rx.clone(),
            status,
            shutdown: shutdown_rx.clone(),
        };
        links.push(tokio::spawn(link.run()));
    }

    let probe_config = ProbeConfig {
        kind: config.probe.kind,
        target: config.probe.target,
        http_host: config.probe.host.clone(),
        http_path: config.probe.path.clone(),
        expect_status: config.probe.expect_status.clone(),
        timeout: config.probe.timeout,
    };
    let (probe_tx, probe_rx) = watch::channel(ProbeTracker::new(config.probe.kind, config.probe.smoothing).report());
    let per_interval = config.probe.per_interval;
    let (probe_every_tx, probe_every) = watch::channel(probe_spacing(config.interval, per_interval));
    let probe_task = tokio::spawn(probe_loop(probe_config, config.probe.smoothing, probe_every, probe_tx));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    info!(
        name = %config.name, real_server = %config.real_server, directors = config.directors.len(),
        interval = ?config.interval, "agent running"
    );
    // Ready once the links are started (each connects on its own; an unreachable director is not a failure).
    sd_notify::notify(&[sd_notify::State::Ready]);

    let mut interval = config.interval;
    let mut ticker = new_ticker(interval);
    let mut seq = 0u64;
    let stopped = loop {
        tokio::select! {
            _ = sigterm.recv() => break Stopped::Shutdown,
            _ = sigint.recv() => break Stopped::Shutdown,
            _ = watchdog.due() => watchdog.feed(),
            _ = sighup.recv() => {
                sd_notify::notify(&[sd_notify::State::Reloading]);
                let loaded = AgentConfig::load(overrides).map_err(anyhow::Error::from);
                match loaded.and_then(|new| prepare(&new).map(|ready| (new, ready))) {
                    Ok((new, ready)) if new == config && ready.tls_digest == running_tls => {
                        info!("SIGHUP: configuration unchanged");
                        sd_notify::notify(&[sd_notify::State::Ready]);
                    }
                    Ok((new, ready)) => {
                        if new.metrics_listen != config.metrics_listen {
                            warn!("metrics.listen changes only on restart");
                        }
                        if new == config {
                            info!("SIGHUP: the TLS files changed; reconnecting with them");
                        }
                        // READY=1 follows when `run` starts again with the new configuration.
                        break Stopped::Reload(Box::new((new, ready)));
                    }
                    Err(e) => {
                        error!("SIGHUP: configuration refused, the running one stays: {e:#}");
                        sd_notify::notify(&[sd_notify::State::Ready]);
                    }
                }
            }
            _ = ticker.tick() => {
                seq += 1;
                match sampler.sample(Instant::now()) {
                    Ok(system) => {
                        let probe = probe_rx.borrow().clone();
                        let report = LoadReport {
                            seq,
                            interval_ms: interval.as_millis() as u32,
                            cpu: system.cpu,
                            load_avg_milli: system.load_avg_milli,
                            memory: system.memory,
                            cpu_pressure: system.cpu_pressure,
                            established_connections: system.established_connections,
                            probe,
                        };
                        record_metrics(&report);
                        reports_tx.send_replace(Some(report));
                    }
                    Err(e) => {
                        metrics::counter!("fulcrum_agent_sample_errors_total").increment(1);
                        warn!(error = %e, "sampling failed; no report this interval");
                        // Nor the previous one again: a link that reconnects sends the latest report, and the
                        // director would take an old one (its probe result included) as news.
                        reports_tx.send_replace(None);
                    }
                }
                let wanted = effective_interval(config.interval, &statuses);
                if wanted != interval {
                    info!(from = ?interval, to = ?wanted, "report interval changed at a director's request");
                    interval = wanted;
                    // The next report a whole new interval on: a tick at once would measure the CPU over
                    // microseconds and claim the new interval for them.
                    ticker = ticker_from(tokio::time::Instant::now() + interval, interval);
                    // The probes keep their number per report, so that each report's response time is still
                    // mostly its own interval's.
                    probe_every_tx.send_replace(probe_spacing(interval, per_interval));
                }
            }
        }
    };

    info!("saying goodbye to the directors");
    shutdown_tx.send_replace(true);
    probe_task.abort();
    for link in links {
        let _ = link.await;
    }
    Ok(stopped)
}

fn new_ticker(interval: Duration) -> tokio::time::Interval {
    ticker_from(tokio::time::Instant::now(), interval)
}

/// Ticks at `start`, then every `interval`.
fn ticker_from(start: tokio::time::Instant, interval: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(start, interval);
    // After a stall, report once and carry on rather than bursting the missed reports.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// The shortest interval any connected director asks for, within bounds; else the configured one.
fn effective_interval(configured: Duration, statuses: &[Arc<LinkStatus>]) -> Duration {
    statuses
        .iter()
        .filter(|s| s.connected.load(Ordering::Relaxed))
        .map(|s| s.requested_interval_ms.load(Ordering::Relaxed))
        .filter(|ms| *ms > 0)
        .min()
        .map_or(configured, |ms| Duration::from_millis(ms.clamp(MIN_REPORT_INTERVAL_MS, MAX_REPORT_INTERVAL_MS).into()))
}

/// The shortest time between two probes of the service.
const MIN_PROBE_SPACING: Duration = Duration::from_millis(10);

/// The time between two probes: the report interval in force over `probe.per_interval`, but never under
/// [`MIN_PROBE_SPACING`] (a 50 ms interval with 20 probes would be one every 2.5 ms).
fn probe_spacing(interval: Duration, per_interval: u32) -> Duration {
    (interval / per_interval.max(1)).max(MIN_PROBE_SPACING)
}

/// Probes the service every `every` (see [`probe_spacing`]; it follows the report interval a director asks
/// for), independently of reporting, so a slow or dead service never delays a report: the report carries the
/// newest probe result and the smoothed response time of the probes so far.
async fn probe_loop(
    config: ProbeConfig,
    smoothing: f64,
    mut every: watch::Receiver<Duration>,
    out: watch::Sender<ProbeReport>,
) {
    let mut tracker = ProbeTracker::new(config.kind, smoothing);
    let mut ticker = new_ticker(*every.borrow_and_update());
    // Without a sender (the agent is stopping), the spacing in force stays.
    let mut following = true;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = every.changed(), if following => {
                match changed {
                    Ok(()) => ticker = new_ticker(*every.borrow_and_update()),
                    Err(_) => following = false,
                }
                continue;
            }
        }
        let outcome = probe_once(&config).await;
        tracker.record(outcome);
        let report = tracker.report();
        match report.last {
            ProbeOutcome::Ok(sample) => {
                let primary = sample.first_byte_us.unwrap_or(sample.connect_us);
                metrics::gauge!("fulcrum_agent_probe_last_seconds").set(f64::from(primary) / 1e6);
            }
            ProbeOutcome::Failed(failure) => {
                metrics::counter!("fulcrum_agent_probe_failures_total").increment(1);
                if report.consecutive_failures == 1 {
                    warn!(target = %config.target, ?failure, "service probe failed");
                }
            }
            ProbeOutcome::Pending => {}
        }
        out.send_replace(report);
    }
}

fn record_metrics(report: &LoadReport) {
    if let Some(cpu) = report.cpu {
        metrics::gauge!("fulcrum_agent_cpu_ratio").set(f64::from(cpu.busy_bp) / f64::from(FULL_SCALE_BP));
    }
    if let Some(us) = report.probe.smoothed_us {
        metrics::gauge!("fulcrum_agent_response_time_seconds").set(f64::from(us) / 1e6);
    }
    metrics::gauge!("fulcrum_agent_established_connections").set(f64::from(report.established_connections));
    metrics::counter!("fulcrum_agent_reports_made_total").increment(1);
}

fn install_metrics(listen: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()
        .with_context(|| format!("starting the metrics endpoint on {listen}"))?;
    info!(%listen, "metrics endpoint at http://{listen}/metrics");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_keep_their_number_per_report_whatever_the_interval() {
        let ms = Duration::from_millis;
        assert_eq!(probe_spacing(ms(1000), 4), ms(250));
        // A director asking for 200 ms reports: still four probes a report.
        assert_eq!(probe_spacing(ms(200), 4), ms(50));
        // Never closer than 10 ms.
        assert_eq!(probe_spacing(ms(50), 20), MIN_PROBE_SPACING);
        assert_eq!(probe_spacing(ms(500), 0), ms(500), "a zero count is refused by the config; never a panic");
    }
}
