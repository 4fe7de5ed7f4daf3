//! The dynamic-feedback benchmark (not a test): unequal real servers, a capacity change and a CPU antagonist,
//! and how well each scheduler spreads the load.
//!
//! A client (10.0.0.1), a director (10.0.0.2, AF_PACKET data plane, `forward = "dr"`) and N real servers
//! (10.0.0.11 …, default four), each a real nginx confined to a CFS quota cgroup (default 5 %, 10 %, 20 % and
//! 20 % of one core, each in the shortest CFS period the kernel allows it: 20, 10, 5 and 5 ms) with a
//! `fulcrum-agent` reporting that cgroup's CPU (relative to the quota) and an HTTP probe. Every server has the
//! same configured weight. In **every** run:
//!
//! - at half time the last server's quota halves (its capacity halves);
//! - a CPU antagonist (a busy loop in the cgroup of the second-to-last server) switches on and off every
//!   `P = min(30 s, run / 3)`, phased so that the interval after the halving is quiet for `P / 2`: in a 120 s
//!   run it burns during 15–45 s and 75–105 s, the quota halves at 60 s.
//!
//! Schedulers compared: `rr`, `wlc`, `p2c` (power of two choices, least connection), `df` (dynamic feedback)
//! `wrr-oracle` (`wrr` with the quotas' ratio as weights, changed when the quota changes: it knows the
//! capacities but not the antagonist) and `wlc-oracle` (`wlc` with those weights, and the antagonist's server's
//! cut to `--oracle-antagonist-share` of it while the antagonist burns, each changed the instant its event
//! happens: what knowing the capacities, and every change to them at once, gives `wlc`). One director runs
//! throughout; each run sets the scheduler (and the weights) with `fulcrumctl`, restores the quotas afterwards,
//! and pauses so connections close and the feedback weights relax.
//!
//! Load, new connection per request (`Connection: close`, so the scheduler decides every request):
//! 1. closed loop, `wrk` at each concurrency (default 50 … 800): the median throughput of the schedulers other
//!    than `rr` at the best concurrency is the scenario's mean capacity;
//! 2. the sustained capacity, what the cluster keeps up with at every moment: the open loop with the worst phase
//!    held throughout (quota halved, antagonist on) and `wlc-oracle` spreading it, at rates found by halving the
//!    interval between 0 and the mean capacity ([`RateSearch`], [`kept_up`]);
//! 3. open loop at 50 %, 70 % and 90 % of the sustained capacity ([`fulcrum_tests::loadgen`]: fixed rate, latency from
//!    each request's intended send time, so queueing is not hidden).
//!
//! Per run: throughput, p50/p99/p99.9 latency, error rate, the CPU spread over the servers (coefficient of
//! variation of each cgroup's use relative to its quota, read from the cgroups), effective-weight changes per
//! minute and the settling time after the halving (time until every effective weight, read from
//! `fulcrumctl list --json` every 250 ms, stays within 10 % (or one unit) of its value at the end of the quiet interval),
//! and for the open loop where in the scenario the requests over [`SLOW_AFTER`] were. Prints Markdown tables and
//! the verdicts against the targets (df p99 ≤ 0.7 × wlc, ≤ p2c, ≤ 1.1 × wrr-oracle; settled within 5 s);
//! `--csv`, `--timeline-csv` and `--seconds-csv` keep the data for the plot (`bench/feedback` draws it). Needs
//! root.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use fulcrum_tests::cgroup::CfsPeriod;
use fulcrum_tests::loadgen::{self, ConnectionMode, LoadSpec, SecondCounts};
use fulcrum_tests::pki::Pki;
use fulcrum_tests::quota::QuotaServer;
use fulcrum_tests::{in_netns, median, metric_sum, require_root, try_workspace_bin, ChildGuard, Host, Testbed};
use serde_json::Value;

const CLIENT_IP: &str = "10.0.0.1";
const DIRECTOR_IP: &str = "10.0.0.2";
const VIP: &str = "10.0.0.100";
const HTTP_PORT: u16 = 80;
const AGENT_PORT: u16 = 7946;
const METRICS_PORT: u16 = 9469;
/// Receive-ring slots per director worker (the default is 256). Everything shares this machine's two cores, so
/// a worker waits its turn behind the load generator and the servers, and 256 slots are 4 ms of frames at the
/// open loop's 90 %: measured at 21 600 requests/s, the rings dropped 35 582 frames in a 60 s run of `df` and
/// 20 436 of `wlc`, whose clients retried 8 947 and 5 574 SYNs a second later, and every p99.9 was just over
/// 1 s. With 2048 slots (34 ms) nothing was dropped and the p99.9s were 46–49 ms. The benchmark compares the
/// schedulers, not how long a starved worker may wait; the drops are still counted in every run.
const RING_FRAMES: u32 = 2048;
const AGENT_INTERVAL_MS: u64 = 500;
/// How often the scenario is checked (quota change, antagonist switch).
const TICK: Duration = Duration::from_millis(50);
/// How often effective weights and cgroup CPU are sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Idle pause between runs: connections close, the antagonist's effect fades, the agents report idle servers.
const GAP: Duration = Duration::from_secs(3);
/// Each request is abandoned (an error) this long after it was sent (open loop: after its intended send time).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A weight within this fraction of its final value, or within one unit of it, counts as settled. The unit: a
/// weight is an integer, and at a weight of 5 the smallest move there is, one, is 20 %; a weight that only
/// flickers between two neighbours has settled.
const SETTLE_BAND: f64 = 0.10;
/// Closed connections leave the director's table after 1 s instead of LVS's 2 minutes, so each run starts with
/// an empty table. (The client reuses its ports within seconds; a SYN over a closing entry of the same 5-tuple
/// is scheduled afresh in any case, as IPVS's `conn_reuse_mode` does.)
const TIMEOUTS: &str = "[dataplane.timeouts]\ntcp_fin_wait_s = 1\ntcp_time_wait_s = 1\ntcp_close_s = 1\n";
/// A request slower than this (or failed) counts as slow in the open loop's per-second tally: half the longest
/// CFS period of the default quotas (the 5 % server's 20 ms), so a request that waited there for a throttled
/// quota is slow.
const SLOW_AFTER: Duration = Duration::from_millis(10);
/// The longest antagonist half-cycle.
const MAX_ANTAGONIST_PERIOD: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    about = "Fulcrum dynamic-feedback benchmark: unequal real servers, rr/wlc/p2c/df/wrr-oracle/wlc-oracle (needs root)"
)]
struct Args {
    /// The short version (about 4 minutes): concurrency 50,400 for 8 s, open loop at 70 % for 30 s. Flags given
    /// explicitly still win.
    #[arg(long)]
    quick: bool,
    /// Schedulers, in this order (wlc-oracle runs in the open loop only; the capacity search runs it in any
    /// case).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "rr,wlc,p2c,df,wrr-oracle,wlc-oracle")]
    schedulers: Vec<Sched>,
    /// Closed-loop wrk concurrencies [default: 50,100,200,400,800; quick: 50,400].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: Option<Vec<u32>>,
    /// Seconds per closed-loop run and per step of the capacity search [default: 30; quick: 8].
    #[arg(long, value_parser = clap::value_parser!(u64).range(4..=3600))]
    closed_seconds: Option<u64>,
    /// Open-loop rates, in % of the sustained capacity [default: 50,70,90; quick: 70].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=200))]
    levels: Option<Vec<u32>>,
    /// Seconds per open-loop run [default: 120; quick: 30].
    #[arg(long, value_parser = clap::value_parser!(u64).range(6..=3600))]
    seconds: Option<u64>,
    /// Open-loop runs per scheduler and level, in rounds (every level and scheduler once, then again), so that
    /// the host's drift falls on all alike; the targets are judged on the medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// CPU quota of each real server, in % of one core. The last one halves at half time of every run; the
    /// antagonist runs in the second-to-last.
    #[arg(long, value_delimiter = ',', default_value = "5,10,20,20")]
    quotas: Vec<f64>,
    /// One CFS period for every quota, ms (a quota must come to at least 1 ms per period). By default each
    /// server's quota is in the shortest period in which it comes to the kernel's 1 ms minimum (20 ms for 5 %,
    /// 10 ms for 10 %, 5 ms for 20 %; the halved server's follows its quota), so that a server that spent its
    /// quota stalls as briefly as the kernel allows.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    period_ms: Option<u64>,
    /// The configured weight of every server (wrr-oracle excepted). Larger gives the feedback finer steps.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=65535))]
    weight: u32,
    /// wlc-oracle's weight for the antagonist's server while the antagonist burns, as a share of its quota's
    /// weight (0 .. 1; 0 takes it out of new connections). The capacity search spreads its load so too: the
    /// share moves the sustained capacity, and with it every open-loop rate.
    #[arg(long, default_value_t = 0.25, value_parser = parse_share)]
    oracle_antagonist_share: f64,
    /// Director forwarding workers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Use this capacity (requests/s) for the open-loop levels instead of searching for it.
    #[arg(long)]
    capacity: Option<f64>,
    /// A `[service.feedback]` setting for the director, e.g. `--feedback response_time=0.4` (repeatable): what
    /// `df` runs with. The director's config check refuses a bad key or value before any run.
    #[arg(long = "feedback", value_name = "KEY=VALUE", value_parser = parse_feedback_setting)]
    feedback: Vec<(String, String)>,
    /// Write one line per run here (CSV).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write every sample (effective weight and CPU per server over time) here (CSV).
    #[arg(long)]
    timeline_csv: Option<PathBuf>,
    /// Write the open loop's requests and slow requests per second of each run here (CSV).
    #[arg(long)]
    seconds_csv: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Sched {
    Rr,
    Wlc,
    P2c,
    Df,
    WrrOracle,
    WlcOracle,
}

impl Sched {
    fn name(self) -> &'static str {
        match self {
            Sched::Rr => "rr",
            Sched::Wlc => "wlc",
            Sched::P2c => "p2c",
            Sched::Df => "df",
            Sched::WrrOracle => "wrr-oracle",
            Sched::WlcOracle => "wlc-oracle",
        }
    }

    /// Run in the open loop only: wlc-oracle is a reference for the p99 target, and counted in the closed loop it
    /// would move the capacity the open loop is based on.
    fn open_loop_only(self) -> bool {
        self == Sched::WlcOracle
    }

    /// The director's scheduler name.
    fn director_scheduler(self) -> &'static str {
        match self {
            Sched::WrrOracle => "wrr",
            Sched::WlcOracle => "wlc",
            other => other.name(),
        }
    }
}

/// The settings after `--quick` and the defaults are applied.
#[derive(Clone, Debug)]
struct Plan {
    schedulers: Vec<Sched>,
    concurrency: Vec<u32>,
    closed: Duration,
    levels: Vec<u32>,
    open: Duration,
    /// Open-loop rounds.
    repeat: u32,
    /// Cores per server.
    quotas: Vec<f64>,
    period: CfsPeriod,
    weight: u32,
    oracle_antagonist_share: f64,
    workers: u32,
    quick: bool,
    /// `[service.feedback]` settings, as given.
    feedback: Vec<(String, String)>,
}

/// A share in 0 ..= 1.
fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{text:?} is not a share between 0 and 1 (e.g. 0.25)")),
    }
}

/// `KEY=VALUE` with a bare key.
fn parse_feedback_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || value.is_empty() {
        return Err(format!("{text:?} is not KEY=VALUE with a bare key (e.g. response_time=0.4)"));
    }
    Ok((key.to_string(), value.to_string()))
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan> {
        let quick = args.quick;
        let mut schedulers = Vec::new();
        for &s in &args.schedulers {
            if !schedulers.contains(&s) {
                schedulers.push(s);
            }
        }
        if args.capacity.is_none() && schedulers.iter().all(|s| s.open_loop_only()) {
            bail!("--schedulers: wlc-oracle runs in the open loop only; add another scheduler or give --capacity");
        }
        if args.quotas.len() < 2 || args.quotas.len() > 9 {
            bail!("--quotas: give 2 to 9 servers' quotas, not {}", args.quotas.len());
        }
        let period = args.period_ms.map_or(CfsPeriod::Shortest, |ms| CfsPeriod::Fixed(Duration::from_millis(ms)));
        let quotas: Vec<f64> = args.quotas.iter().map(|q| q / 100.0).collect();
        let fits = |cores: f64| period.for_quota(cores).and_then(|p| fulcrum_tests::cgroup::quota_us(cores, p));
        for (i, &q) in quotas.iter().enumerate() {
            fits(q).with_context(|| format!("--quotas: server {}", i + 1))?;
        }
        // The last server's quota halves mid-run: that must be possible too.
        let last = quotas.len() - 1;
        fits(quotas[last] / 2.0).with_context(|| format!("--quotas: server {} halved mid-run", last + 1))?;
        Ok(Plan {
            schedulers,
            concurrency: args.concurrency.clone().unwrap_or_else(|| {
                if quick {
                    vec![50, 400]
                } else {
                    vec![50, 100, 200, 400, 800]
                }
            }),
            closed: Duration::from_secs(args.closed_seconds.unwrap_or(if quick { 8 } else { 30 })),
            levels: args.levels.clone().unwrap_or_else(|| if quick { vec![70] } else { vec![50, 70, 90] }),
            open: Duration::from_secs(args.seconds.unwrap_or(if quick { 30 } else { 120 })),
            repeat: args.repeat,
            quotas,
            period,
            weight: args.weight,
            oracle_antagonist_share: args.oracle_antagonist_share,
            workers: args.workers,
            quick,
            feedback: args.feedback.clone(),
        })
    }

    fn servers(&self) -> usize {
        self.quotas.len()
    }

    /// The server whose quota halves mid-run.
    fn changing(&self) -> usize {
        self.servers() - 1
    }

    /// The server with the antagonist.
    fn antagonist(&self) -> usize {
        self.servers() - 2
    }

    /// wrr-oracle's weight for a quota: per-mille of a core, so the ratio is the quotas' ratio.
    fn oracle_weight(cores: f64) -> u32 {
        ((cores * 1000.0).round() as u32).max(1)
    }

    /// Every server's configured weight for `sched` under the quotas in force and with the antagonist on or off.
    /// The oracles know the quotas; wlc-oracle also knows when the antagonist burns, at the instant it starts.
    fn weights(&self, sched: Sched, quotas: &[f64], antagonist_on: bool) -> Vec<u32> {
        (0..self.servers())
            .map(|i| match sched {
                Sched::WrrOracle => Plan::oracle_weight(quotas[i]),
                Sched::WlcOracle if antagonist_on && i == self.antagonist() => {
                    (f64::from(Plan::oracle_weight(quotas[i])) * self.oracle_antagonist_share).round() as u32
                }
                Sched::WlcOracle => Plan::oracle_weight(quotas[i]),
                _ => self.weight,
            })
            .collect()
    }
}

/// When the scenario's events happen in a run of `duration`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Timeline {
    duration: Duration,
    /// The antagonist's half-cycle: on for `period`, off for `period`.
    period: Duration,
}

impl Timeline {
    fn new(duration: Duration) -> Timeline {
        Timeline { duration, period: MAX_ANTAGONIST_PERIOD.min(duration / 3) }
    }

    fn halving_at(&self) -> Duration {
        self.duration / 2
    }

    /// Whether the antagonist burns at `t`: on during `[D/2 + P/2 + 2kP, D/2 + 3P/2 + 2kP)` for every integer
    /// `k`, so it switches `P/2` before and after the halving, never with it.
    fn antagonist_on(&self, t: Duration) -> bool {
        if t >= self.duration {
            return false;
        }
        let p = self.period.as_secs_f64();
        let x = t.as_secs_f64() - (self.halving_at().as_secs_f64() + p / 2.0);
        x.rem_euclid(2.0 * p) < p
    }

    /// From the halving to the antagonist's next switch: where the settling time is measured.
    fn quiet_window(&self) -> (Duration, Duration) {
        (self.halving_at(), (self.halving_at() + self.period / 2).min(self.duration))
    }
}

/// A server's latest agent figures and the blender's `df` terms, from `fulcrumctl list --json`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Reported {
    /// CPU, basis points of the quota (what the blender sees).
    cpu_bp: Option<u64>,
    /// The agent's latest probe response time, µs (what the blender smooths).
    response_time_us: Option<u64>,
    /// `df`'s response-time and load terms (0 without feedback).
    df_response_time_term: u64,
    df_load_term: u64,
    /// Age of the newest report when sampled, ms.
    report_age_ms: Option<u64>,
    /// Cumulative CPU stall (PSI `some total`, or a v1 cgroup's throttled time), µs: its growth between two
    /// samples over their interval is the pressure the blender sees.
    pressure_total_us: Option<u64>,
    /// `up`, `down`, `slow-start`, … or `unchecked`.
    health: String,
}

/// One reading during a run.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    /// Since the run's start.
    t: Duration,
    effective_weights: Vec<u32>,
    /// What each server's agent last reported and what the blender made of it.
    reported: Vec<Reported>,
    /// Cumulative CPU time of each server's cgroup.
    cpu: Vec<Duration>,
    /// Each server's quota in force, cores.
    quota: Vec<f64>,
    antagonist: bool,
}

/// The cluster's capacity from the closed loop, and the concurrency it was measured at: at each concurrency the
/// median throughput of the schedulers (leaving out `rr`, which overloads the smallest server first, unless it is
/// all there is), then the best concurrency. The best single run, used before, was the luckiest moment of a host
/// whose speed swings by half within minutes (37 464 where the schedulers' median was 31 568): the open-loop
/// levels built on it overloaded every scheduler at "70 %".
fn measured_capacity(closed: &[Outcome]) -> Option<(u32, f64)> {
    let mut concurrencies: Vec<u32> = closed.iter().filter_map(|o| o.load.concurrency()).collect();
    concurrencies.sort_unstable();
    concurrencies.dedup();
    concurrencies
        .into_iter()
        .filter_map(|c| Some((c, balanced_median(closed.iter().filter(|o| o.load.concurrency() == Some(c)))?)))
        .filter(|(_, capacity)| *capacity > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Halvings of the interval in doubt when measuring the sustained capacity: 6 leave it at 1/64 of the mean
/// capacity, a few % of the result.
const CAPACITY_STEPS: u32 = 6;

/// The search for the highest fixed rate the cluster keeps up with ([`kept_up`]): each step tries the middle of
/// the interval still in doubt, between the highest rate kept up with (0 at first) and the lowest one not kept
/// up with (the upper bound at first).
#[derive(Clone, Copy, Debug, PartialEq)]
struct RateSearch {
    kept_up: f64,
    not_kept_up: f64,
}

impl RateSearch {
    fn new(upper: f64) -> RateSearch {
        RateSearch { kept_up: 0.0, not_kept_up: upper }
    }

    fn next_rate(&self) -> f64 {
        (self.kept_up + self.not_kept_up) / 2.0
    }

    fn record(&mut self, rate: f64, kept_up: bool) {
        if kept_up {
            self.kept_up = self.kept_up.max(rate);
        } else {
            self.not_kept_up = self.not_kept_up.min(rate);
        }
    }

    /// The highest rate kept up with; `None` before any was.
    fn result(&self) -> Option<f64> {
        (self.kept_up > 0.0).then_some(self.kept_up)
    }
}

/// Whether an open-loop run kept up with its rate: every request answered, and the median within [`SLOW_AFTER`]
/// (half the longest default CFS period, the 5 % server's), so the median request waited neither in a queue nor
/// for that server's throttled quota (the other servers' periods are 10 ms at most).
/// The median suffices under `wlc-oracle`: counting connections, it sends a server whose backlog grows less, so
/// no one server's backlog grows alone; the cluster's does, and a backlog growing through the run puts the
/// median request in it. Not the servers' CPU: they run at their quota's limit well below this rate (measured:
/// 93–100 % of each quota at 3 301 requests/s with the median at 2.3 ms; 2.8 ms at 5 364 requests/s, 13.0 ms at
/// 5 777).
fn kept_up(measured: &Measured) -> bool {
    measured.error_ratio == 0.0 && measured.p50_ms.is_some_and(|p50| p50 <= SLOW_AFTER.as_secs_f64() * 1000.0)
}

/// A capacity-search step's verdict, as the log and the report name it.
fn step_verdict(kept: bool) -> &'static str {
    if kept {
        "kept up"
    } else {
        "did not keep up"
    }
}

/// The median throughput of the completed runs, leaving out `rr`'s unless no other scheduler's completed. The
/// capacity is what the balancing schedulers serve: `rr` leaves the small servers' queues to grow and would drag
/// it down.
fn balanced_median<'a>(runs: impl Iterator<Item = &'a Outcome>) -> Option<f64> {
    let done: Vec<&RunResult> = runs.filter_map(Outcome::ok).collect();
    let others = done.iter().any(|r| r.sched != Sched::Rr);
    median(done.iter().filter(|r| !others || r.sched != Sched::Rr).map(|r| r.measured.throughput).collect())
}

/// How the effective weights behaved after the capacity change.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Settle {
    /// Within the band from this long after the change on.
    After(Duration),
    /// Still outside the band at the end of the quiet interval.
    NotSettled { window: Duration },
    /// Too few samples in the window to tell.
    Unknown,
}

impl Settle {
    fn seconds(self) -> Option<f64> {
        match self {
            Settle::After(d) => Some(d.as_secs_f64()),
            _ => None,
        }
    }

    fn show(self) -> String {
        match self {
            Settle::After(d) => format!("{:.1}", d.as_secs_f64()),
            Settle::NotSettled { window } => format!("> {:.0}", window.as_secs_f64()),
            Settle::Unknown => "–".to_string(),
        }
    }
}

/// Settling time: samples in `[from, to)`; the final weights are the mean over the window's last second; the
/// weights have settled at the first sample from which every later one in the window is within
/// [`SETTLE_BAND`] (or one unit) of the final weights, for every server.
fn settling_time(samples: &[Sample], from: Duration, to: Duration) -> Settle {
    let window: Vec<&Sample> = samples.iter().filter(|s| s.t >= from && s.t < to).collect();
    if window.len() < 2 {
        return Settle::Unknown;
    }
    let last_t = window[window.len() - 1].t;
    let tail: Vec<&&Sample> = window.iter().filter(|s| s.t + Duration::from_secs(1) > last_t).collect();
    let servers = window[0].effective_weights.len();
    let finals: Vec<f64> = (0..servers)
        .map(|i| tail.iter().map(|s| f64::from(s.effective_weights[i])).sum::<f64>() / tail.len() as f64)
        .collect();
    let within = |s: &Sample| {
        s.effective_weights.iter().zip(&finals).all(|(&w, &f)| (f64::from(w) - f).abs() <= (SETTLE_BAND * f).max(1.0))
    };
    // The first index from which all are within.
    let mut first = None;
    for (i, s) in window.iter().enumerate().rev() {
        if within(s) {
            first = Some(i);
        } else {
            break;
        }
    }
    match first {
        Some(i) => Settle::After(window[i].t.saturating_sub(from)),
        None => Settle::NotSettled { window: to.saturating_sub(from) },
    }
}

/// Each server's CPU use relative to its quota over the run: Σ Δcpu / Σ Δt × quota.
fn cpu_utilisation(samples: &[Sample]) -> Vec<f64> {
    let Some(first) = samples.first() else { return Vec::new() };
    let n = first.cpu.len();
    let mut used = vec![0.0; n];
    let mut allowed = vec![0.0; n];
    for pair in samples.windows(2) {
        let dt = pair[1].t.saturating_sub(pair[0].t).as_secs_f64();
        for i in 0..n {
            used[i] += pair[1].cpu[i].saturating_sub(pair[0].cpu[i]).as_secs_f64();
            allowed[i] += dt * pair[0].quota[i];
        }
    }
    used.iter().zip(&allowed).map(|(u, a)| if *a > 0.0 { u / a } else { 0.0 }).collect()
}

/// Standard deviation over mean (population); `None` for no values or a zero mean.
fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return None;
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Some(var.sqrt() / mean)
}

/// Changes of any server's effective weight between consecutive samples (one per server that changed).
fn weight_changes(samples: &[Sample]) -> u64 {
    samples
        .windows(2)
        .map(|p| p[0].effective_weights.iter().zip(&p[1].effective_weights).filter(|(a, b)| a != b).count() as u64)
        .sum()
}

/// What drove a run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    /// `wrk` at this concurrency through the scenario.
    Closed { concurrency: u32 },
    /// A fixed rate with the scenario's worst phase held throughout (the last server's quota halved, the
    /// antagonist burning): a step of the search for the sustained capacity.
    Held { rate: f64 },
    /// A fixed rate through the scenario; `round` (from 1) when the open loop is repeated.
    Open { percent: u32, rate: f64, round: Option<u32> },
}

impl Load {
    fn kind(&self) -> &'static str {
        match self {
            Load::Closed { .. } => "closed",
            Load::Held { .. } => "held",
            Load::Open { .. } => "open",
        }
    }

    fn label(&self) -> String {
        match self {
            Load::Closed { concurrency } => format!("c={concurrency}"),
            Load::Held { rate } => format!("{rate:.0}/s"),
            Load::Open { percent, round: None, .. } => format!("{percent} %"),
            Load::Open { percent, round: Some(round), .. } => format!("{percent} % #{round}"),
        }
    }

    /// The open loop's round, 1 when it is not repeated.
    fn round(&self) -> u32 {
        match self {
            Load::Open { round: Some(round), .. } => *round,
            _ => 1,
        }
    }

    /// The closed loop's concurrency.
    fn concurrency(&self) -> Option<u32> {
        match self {
            Load::Closed { concurrency } => Some(*concurrency),
            Load::Held { .. } | Load::Open { .. } => None,
        }
    }

    /// The column the report shows for it.
    fn column(&self) -> String {
        match self {
            Load::Closed { concurrency } => concurrency.to_string(),
            Load::Held { .. } => format!("held, {}", self.label()),
            Load::Open { .. } => self.label(),
        }
    }
}

/// What the load generator measured.
#[derive(Clone, Debug, Default, PartialEq)]
struct Measured {
    /// Good responses per second.
    throughput: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    /// Requests without a good response over requests attempted.
    error_ratio: f64,
    error_detail: Option<String>,
    /// Open loop: per second of the run, the requests and those slower than [`SLOW_AFTER`] or failed.
    per_second: Vec<SecondCounts>,
    /// Open loop: per real server (rs1 first), per second of the run, the good responses it sent and those
    /// slower than [`SLOW_AFTER`].
    per_server_second: Vec<Vec<SecondCounts>>,
    /// Open loop: per real server (rs1 first), its good responses slower than the run's p99: who sent the
    /// slowest 1 %, which sets the p99 the targets judge.
    past_p99_by_server: Vec<u64>,
}

#[derive(Clone, Debug)]
struct RunResult {
    sched: Sched,
    load: Load,
    /// How long the load ran.
    duration: Duration,
    measured: Measured,
    cpu_cv: Option<f64>,
    cpu_util: Vec<f64>,
    changes_per_min: f64,
    settle: Settle,
    /// Requests each nginx logged during the run.
    served: Vec<u64>,
    /// Connections the director scheduled to each server during the run.
    scheduled: Vec<u64>,
    /// Packets lost on the way during the run; `None` when they could not be read.
    losses: Option<Losses>,
    /// The share of the whole machine's CPU time that was busy during the run; `None` when `/proc/stat` could
    /// not be read.
    host_busy: Option<f64>,
    samples: Vec<Sample>,
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat` (all cores, in clock ticks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostCpu {
    /// Ticks spent idle or waiting for I/O.
    idle: u64,
    /// All ticks (guest time is already counted in user and nice).
    total: u64,
}

impl HostCpu {
    fn read() -> Result<HostCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        HostCpu::parse(&stat).context("/proc/stat: no `cpu` line with user … steal")
    }

    /// The `cpu` line: user nice system idle iowait irq softirq steal [guest guest_nice].
    fn parse(stat: &str) -> Option<HostCpu> {
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let ticks: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
        (ticks.len() == 8).then(|| HostCpu { idle: ticks[3] + ticks[4], total: ticks.iter().sum() })
    }

    /// The busy share of the time between `before` and `self`.
    fn busy_since(self, before: HostCpu) -> Option<f64> {
        let total = self.total.checked_sub(before.total).filter(|&t| t > 0)?;
        let idle = self.idle.checked_sub(before.idle)?.min(total);
        Some(1.0 - idle as f64 / total as f64)
    }
}

/// Packets lost on the way during a run, from counters read before and after it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Losses {
    /// Frames the director's receive rings dropped (`fulcrum_ring_drops_total`): its workers fell behind.
    ring_drops: u64,
    /// SYNs the clients sent again (`TcpExtTCPSynRetrans` in the client's namespace): the first retry comes a
    /// second after the SYN (the initial timeout), whoever lost it (the director, a full listen queue).
    syn_retries: u64,
}

impl Losses {
    fn since(self, before: Losses) -> Losses {
        Losses {
            ring_drops: self.ring_drops.saturating_sub(before.ring_drops),
            syn_retries: self.syn_retries.saturating_sub(before.syn_retries),
        }
    }
}

/// The counter `name` of section `section` (e.g. `TcpExt`) in the text of `/proc/net/netstat`: each section
/// is a line of names followed by a line of values, both prefixed `Section:`.
fn netstat_value(netstat: &str, section: &str, name: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = netstat.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let at = names.split_whitespace().position(|n| n == name);
        if let Some(at) = at {
            return values.split_whitespace().nth(at)?.parse().ok();
        }
    }
    None
}

/// A run, or why it failed.
struct Outcome {
    sched: Sched,
    load: Load,
    result: std::result::Result<RunResult, String>,
}

impl Outcome {
    fn ok(&self) -> Option<&RunResult> {
        self.result.as_ref().ok()
    }
}

/// What the open-loop levels are percentages of.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Capacity {
    /// What the cluster sustains through its worst phase (requests/s): the open loop's 100 %. The scenario's
    /// mean capacity is no base for a fixed rate: "90 %" of it is more than the cluster can serve once the quota
    /// has halved and the antagonist burns (measured: 24 656 requests/s offered where wlc, p2c and df all queued
    /// for a second), and then every scheduler's p99 is its backlog, not its choices.
    sustained: f64,
    /// The closed loop's capacity through the whole scenario, the upper bound of the search for `sustained`.
    /// `None` when `--capacity` gave `sustained`.
    mean: Option<f64>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("bench_feedback: {e:#}");
        std::process::exit(1);
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[feedback] {}", msg.as_ref());
}

fn run(args: &Args) -> Result<()> {
    require_root();
    let plan = Plan::from_args(args)?;
    for tool in ["wrk", "curl", "timeout", "nsenter"] {
        which(tool).with_context(|| format!("{tool} is not installed (bench/feedback installs what is needed)"))?;
    }
    raise_nofile_limit();
    let started = Instant::now();
    // Read now, next to the build bench/feedback just made: read at the end, it named whatever was committed
    // while the sweep ran.
    let commit = command_stdout(&["git", "-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"])
        .unwrap_or_else(|| "unknown".to_string());
    let mut bed = Bed::new(&plan)?;
    let mut closed: Vec<Outcome> = Vec::new();
    let closed_schedulers: Vec<Sched> = plan.schedulers.iter().copied().filter(|s| !s.open_loop_only()).collect();
    for &concurrency in &plan.concurrency {
        for &sched in &closed_schedulers {
            let load = Load::Closed { concurrency };
            let result = bed.run_once(sched, load, plan.closed).map_err(|e| short_reason(&e));
            closed.push(Outcome { sched, load, result });
        }
    }
    let mut held: Vec<Outcome> = Vec::new();
    let capacity = match args.capacity {
        Some(c) if c > 0.0 => Capacity { sustained: c, mean: None },
        Some(c) => bail!("--capacity must be positive, not {c}"),
        None => {
            let (concurrency, mean) = measured_capacity(&closed)
                .context("no closed-loop run completed a request: no capacity to base the open loop on")?;
            log(format!("mean capacity through the scenario: {mean:.0} requests/s (c={concurrency})"));
            // The open loop itself measures what it may offer, with the generator and the cost per request of
            // the levels it sets. The closed-loop measure before it (wrk with the worst phase held over wrk
            // through the scenario, times the mean capacity) rode on wrk's deep queues, in which nginx accepts
            // in batches: on the machine of 6 December it gave 6 497 requests/s, and this search 5 468 an hour
            // later. The host's drift between steps is not cancelled; each step is short and follows the last.
            let mut search = RateSearch::new(mean);
            for _ in 0..CAPACITY_STEPS {
                let rate = search.next_rate();
                let load = Load::Held { rate };
                let result = bed.run_once(Sched::WlcOracle, load, plan.closed).map_err(|e| short_reason(&e));
                // A step that failed measured nothing: the next tries the same rate again.
                match &result {
                    Ok(r) => {
                        let kept = kept_up(&r.measured);
                        log(format!("  {}", step_verdict(kept)));
                        search.record(rate, kept);
                    }
                    Err(reason) => log(format!("  failed, not counted: {reason}")),
                }
                held.push(Outcome { sched: Sched::WlcOracle, load, result });
            }
            if search.not_kept_up >= mean {
                bed.notes.push(format!(
                    "the capacity search kept up with every rate it tried: the cluster sustains at least {:.0} \
                     requests/s, and the search stopped below the mean capacity ({mean:.0})",
                    search.kept_up
                ));
            }
            let sustained = search.result().with_context(|| {
                format!(
                    "wlc-oracle kept up with none of the rates tried with the worst phase held, down to {:.0} \
                     requests/s: no capacity for the open loop",
                    search.not_kept_up
                )
            })?;
            Capacity { sustained, mean: Some(mean) }
        }
    };
    log(format!("sustained capacity: {:.0} requests/s", capacity.sustained));
    let mut open: Vec<Outcome> = Vec::new();
    for round in 1..=plan.repeat {
        for &percent in &plan.levels {
            for &sched in &plan.schedulers {
                let rate = capacity.sustained * f64::from(percent) / 100.0;
                let load = Load::Open { percent, rate, round: (plan.repeat > 1).then_some(round) };
                let result = bed.run_once(sched, load, plan.open).map_err(|e| short_reason(&e));
                open.push(Outcome { sched, load, result });
            }
        }
    }
    let notes = std::mem::take(&mut bed.notes);
    drop(bed);
    if let Some(path) = &args.csv {
        write_file(path, &runs_csv(&[&closed, &held, &open]))?;
    }
    if let Some(path) = &args.timeline_csv {
        write_file(path, &timeline_csv(&[&closed, &held, &open]))?;
    }
    if let Some(path) = &args.seconds_csv {
        write_file(path, &seconds_csv(&open))?;
    }
    let run = RunInfo { elapsed: started.elapsed(), commit };
    print!("{}", render(&plan, &capacity, &closed, &held, &open, &notes, &run));
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The testbed and its long-running processes. Field order: processes stop before the namespaces go.
struct Bed {
    director: ChildGuard,
    servers: Vec<QuotaServer>,
    client: Host,
    socket: PathBuf,
    plan: Plan,
    wrk_script: PathBuf,
    notes: Vec<String>,
    _pki: Pki,
    _work: tempfile::TempDir,
    _director_host: Host,
    _tb: Testbed,
}

impl Bed {
    fn new(plan: &Plan) -> Result<Bed> {
        let n = plan.servers();
        log(format!("building the testbed: client, director, {n} real servers (nginx in quota cgroups, agents)"));
        let tb = Testbed::new("fbench")?;
        let client = tb.add_host("client", &format!("{CLIENT_IP}/24"))?;
        let director_host = tb.add_host("director", &format!("{DIRECTOR_IP}/24"))?;
        let hosts: Vec<Host> = (0..n)
            .map(|i| tb.add_host(&format!("rs{}", i + 1), &format!("{}/24", server_ip(i))))
            .collect::<Result<_>>()?;
        // Many short connections: the whole port range, and TIME-WAIT ports reused.
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        // Direct routing: the VIP on lo of every real server, never answered or announced by ARP.
        for rs in &hosts {
            rs.accept_vip_for_dr(VIP)?;
        }
        let names: Vec<String> = hosts.iter().map(|h| h.name().to_string()).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = Pki::new(&[("d1", DIRECTOR_IP.parse()?)], &name_refs)?;
        let work = tempfile::Builder::new().prefix("fulcrum-fbench-").tempdir()?;

        let socket = work.path().join("director.sock");
        let config = work.path().join("director.toml");
        write_file(&config, &director_config(pki.dir(), &socket, plan))?;
        let director_bin = try_workspace_bin("fulcrum-director")?;
        let check =
            fulcrum_tests::run_unchecked(Command::new(&director_bin).arg("check-config").arg("--config").arg(&config))?;
        if !check.status.success() {
            bail!("director config refused: {}", String::from_utf8_lossy(&check.stderr).trim());
        }
        let mut cmd = Command::new(&director_bin);
        cmd.arg("run").arg("--config").arg(&config).env("RUST_LOG", "warn");
        let mut director = director_host.spawn(cmd)?;
        wait_for("the director's control socket", Duration::from_secs(15), &mut director, || Ok(socket.exists()))?;

        let mut servers = Vec::new();
        for (rs, &cores) in hosts.iter().zip(&plan.quotas) {
            let mut server = QuotaServer::start(rs, HTTP_PORT, cores, plan.period)?;
            server.start_agent(&pki, "d1", format!("{DIRECTOR_IP}:{AGENT_PORT}").parse()?, AGENT_INTERVAL_MS)?;
            servers.push(server);
        }
        let wrk_script = work.path().join("report.lua");
        write_file(&wrk_script, WRK_SCRIPT)?;
        let mut bed = Bed {
            director,
            servers,
            client,
            socket,
            plan: plan.clone(),
            wrk_script,
            notes: Vec::new(),
            _pki: pki,
            _work: work,
            _director_host: director_host,
            _tb: tb,
        };
        bed.wait_ready()?;
        log(format!("testbed {} ready", bed._tb.prefix()));
        Ok(bed)
    }

    /// Every agent reporting a CPU sample, and a request through the VIP answered by a real server.
    fn wait_ready(&mut self) -> Result<()> {
        let socket = self.socket.clone();
        let n = self.servers.len();
        wait_for("every agent reporting its cgroup's CPU", Duration::from_secs(30), &mut self.director, || {
            let agents = fulcrumctl_json(&socket, &["agents", "--json"])?;
            let reporting = agents
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|a| {
                            a["connected"] == true
                                && a["last_report"]["cpu"]["source"].as_str().is_some_and(|s| s.starts_with("Cgroup"))
                        })
                        .count()
                })
                .unwrap_or(0);
            Ok(reporting == n)
        })?;
        let client = self.client.clone();
        let url = format!("http://{VIP}/");
        wait_for("an answer through the VIP", Duration::from_secs(15), &mut self.director, || {
            let out = client.run_unchecked(&["curl", "-sS", "--max-time", "2", &url])?;
            Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("host=rs"))
        })
    }

    fn fulcrumctl(&self, args: &[&str]) -> Result<()> {
        let bin = try_workspace_bin("fulcrumctl")?;
        let out = fulcrum_tests::run_unchecked(Command::new(bin).arg("--socket").arg(&self.socket).args(args))?;
        if !out.status.success() {
            bail!("fulcrumctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The scheduler and the configured weights for `sched`, given the quotas in force.
    ///
    /// Through `wlc` first: with feedback off every effective weight returns to its configured value, and only
    /// once they all have is the scheduler switched, so that its state is built from those weights. (`wrr`
    /// computes its cycle from the effective weights at a rebuild; switching straight from `df` would build it
    /// from df's leftover weights, which the feedback task resets only after the switch.)
    fn configure(&mut self, sched: Sched, weights: &[u32]) -> Result<()> {
        let service = format!("{VIP}:{HTTP_PORT}");
        self.fulcrumctl(&["service", "edit", &service, "-s", "wlc"])?;
        for (i, weight) in weights.iter().enumerate() {
            self.fulcrumctl(&["server", "edit", &service, &server_ip(i), "-w", &weight.to_string()])?;
        }
        let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        let socket = self.socket.clone();
        wait_for("effective weights back to the configured ones", Duration::from_secs(10), &mut self.director, || {
            let list = fulcrumctl_json(&socket, &["list", "--json"])?;
            let servers = list.as_array().and_then(|s| s.first()).and_then(|s| s["servers"].as_array()).cloned();
            Ok(servers.is_some_and(|servers| {
                (0..weights.len()).all(|i| {
                    servers.iter().any(|s| s["address"] == server_ip(i).as_str() && s["effective_weight"] == weights[i])
                })
            }))
        })?;
        if sched.director_scheduler() != "wlc" {
            self.fulcrumctl(&["service", "edit", &service, "-s", sched.director_scheduler()])?;
        }
        Ok(())
    }

    /// Back to the start of a run: full quotas, no antagonist (the caller dropped it), empty access logs.
    fn restore(&self) -> Result<()> {
        for (server, &q) in self.servers.iter().zip(&self.plan.quotas) {
            server.set_quota(q)?;
            // nginx logs every request; keep its temp dir small over long runs.
            let log = server.nginx().dir().join("access.log");
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&log) {
                let _ = f.set_len(0);
            }
        }
        Ok(())
    }

    fn sample(&self, t: Duration, quota: &[f64], antagonist: bool) -> Result<Sample> {
        let list = fulcrumctl_json(&self.socket, &["list", "--json"])?;
        let servers = list
            .as_array()
            .and_then(|s| s.first())
            .and_then(|s| s["servers"].as_array())
            .context("fulcrumctl list --json: no service")?;
        let (mut effective_weights, mut reported) = (Vec::new(), Vec::new());
        for i in 0..self.servers.len() {
            let ip = server_ip(i);
            let s = servers
                .iter()
                .find(|s| s["address"] == ip.as_str())
                .with_context(|| format!("fulcrumctl list --json: no server {ip}"))?;
            effective_weights.push(s["effective_weight"].as_u64().context("effective_weight")? as u32);
            reported.push(Reported {
                cpu_bp: s["cpu_bp"].as_u64(),
                response_time_us: s["response_time_us"].as_u64(),
                df_response_time_term: s["df_response_time_term"].as_u64().unwrap_or(0),
                df_load_term: s["df_load_term"].as_u64().unwrap_or(0),
                report_age_ms: s["report_age_ms"].as_u64(),
                pressure_total_us: s["cpu_pressure_total_us"].as_u64(),
                health: s["health"].as_str().unwrap_or_default().to_string(),
            });
        }
        let cpu = self.servers.iter().map(|s| s.cgroup().usage()).collect::<Result<Vec<_>>>()?;
        Ok(Sample { t, effective_weights, reported, cpu, quota: quota.to_vec(), antagonist })
    }

    /// The director's ring drops and the client's SYN retransmissions so far.
    fn losses(&self) -> Result<Losses> {
        let url = format!("http://{DIRECTOR_IP}:{METRICS_PORT}/metrics");
        let exposition = self.client.curl(&url, &["--max-time", "5"])?;
        let ring_drops = metric_sum(&exposition, "fulcrum_ring_drops_total")
            .with_context(|| format!("{url}: no fulcrum_ring_drops_total"))?;
        let netstat = self.client.run(&["cat", "/proc/net/netstat"])?;
        let syn_retries = netstat_value(&netstat, "TcpExt", "TCPSynRetrans")
            .context("the client's /proc/net/netstat: no TcpExt TCPSynRetrans")?;
        Ok(Losses { ring_drops: ring_drops as u64, syn_retries })
    }

    /// `connections_total` of every server, from `fulcrumctl list --json`.
    fn connections_total(&self) -> Result<Vec<u64>> {
        let list = fulcrumctl_json(&self.socket, &["list", "--json"])?;
        let servers = list
            .as_array()
            .and_then(|s| s.first())
            .and_then(|s| s["servers"].as_array())
            .context("fulcrumctl list --json: no service")?;
        (0..self.servers.len())
            .map(|i| {
                let ip = server_ip(i);
                servers
                    .iter()
                    .find(|s| s["address"] == ip.as_str())
                    .and_then(|s| s["connections_total"].as_u64())
                    .with_context(|| format!("fulcrumctl list --json: no connections_total for {ip}"))
            })
            .collect()
    }

    /// One run: scheduler set, load started, the scenario played while sampling, everything restored.
    fn run_once(&mut self, sched: Sched, load: Load, duration: Duration) -> Result<RunResult> {
        log(format!("{} · {} {} · {} s", sched.name(), load.kind(), load.label(), duration.as_secs()));
        if let Some(status) = self.director.try_wait()? {
            bail!("the director exited with {status}: {}", self.director.output_tails());
        }
        self.restore()?;
        // The pause comes before the scheduler is set: a blender started right after a run would take the
        // agents' last reports of it (a halved server, the antagonist) for the new run's, and start `df` from
        // weights learned under another scheduler's load (measured: 1 : 17 where 2 : 1 was right, and ten seconds
        // of queueing to undo it). Every scheduler starts from the configured weights.
        std::thread::sleep(GAP);
        let mut quota = self.plan.quotas.clone();
        let worst_held = matches!(load, Load::Held { .. });
        let changing = self.plan.changing();
        if worst_held {
            quota[changing] = self.plan.quotas[changing] / 2.0;
            self.servers[changing].set_quota(quota[changing])?;
        }
        let mut weights = self.plan.weights(sched, &quota, worst_held);
        self.configure(sched, &weights)?;
        let timeline = Timeline::new(duration);
        let mut antagonist: Option<ChildGuard> =
            if worst_held { Some(self.servers[self.plan.antagonist()].start_antagonist()?) } else { None };
        let scheduled_before = self.connections_total()?;
        let losses_before = self.losses();
        let host_before = HostCpu::read();
        let loader = self.start_load(load, duration)?;
        let t0 = Instant::now();
        let mut halved = false;
        let mut samples = Vec::new();
        let mut next_sample = Duration::ZERO;
        let mut scenario_error = None;
        while !loader.is_finished() {
            let t = t0.elapsed();
            if !worst_held {
                if let Err(e) = self.play(sched, &timeline, t, &mut quota, &mut halved, &mut antagonist, &mut weights) {
                    scenario_error.get_or_insert(e);
                }
            }
            if t >= next_sample && t <= duration {
                match self.sample(t, &quota, antagonist.is_some()) {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        scenario_error.get_or_insert(e);
                    }
                }
                next_sample += SAMPLE_EVERY;
            }
            std::thread::sleep(TICK);
        }
        drop(antagonist);
        let measured = loader.join().map_err(|_| anyhow!("the load generator thread panicked"))?;
        let host_busy = match (HostCpu::read(), host_before) {
            (Ok(after), Ok(before)) => after.busy_since(before),
            (Err(e), _) | (_, Err(e)) => {
                self.notes.push(format!("{} {} {}: host CPU not read: {e:#}", sched.name(), load.kind(), load.label()));
                None
            }
        };
        let served: Vec<u64> = self.servers.iter().map(|s| count_lines(&s.nginx().dir().join("access.log"))).collect();
        let scheduled: Vec<u64> =
            self.connections_total()?.iter().zip(&scheduled_before).map(|(a, b)| a.saturating_sub(*b)).collect();
        let losses = match (self.losses(), losses_before) {
            (Ok(after), Ok(before)) => Some(after.since(before)),
            (Err(e), _) | (_, Err(e)) => {
                self.notes.push(format!("{} {} {}: losses not read: {e:#}", sched.name(), load.kind(), load.label()));
                None
            }
        };
        self.restore()?;
        if let Some(e) = scenario_error {
            return Err(e.context("playing the scenario"));
        }
        let measured = measured?;
        if let Some(detail) = &measured.error_detail {
            self.notes.push(format!("{} {} {}: {detail}", sched.name(), load.kind(), load.label()));
        }
        let cpu_util = cpu_utilisation(&samples);
        let minutes = duration.as_secs_f64() / 60.0;
        let (from, to) = timeline.quiet_window();
        let result = RunResult {
            sched,
            load,
            duration,
            cpu_cv: coefficient_of_variation(&cpu_util),
            cpu_util,
            changes_per_min: weight_changes(&samples) as f64 / minutes,
            settle: if worst_held { Settle::Unknown } else { settling_time(&samples, from, to) },
            served,
            scheduled,
            losses,
            host_busy,
            measured,
            samples,
        };
        log(format!(
            "  {:.0} req/s, p99 {} ms, errors {:.2} %, CPU CV {}, settle {}, served {:?}, scheduled {:?}, {}, host CPU busy {}",
            result.measured.throughput,
            fmt_opt(result.measured.p99_ms, 1),
            result.measured.error_ratio * 100.0,
            fmt_opt(result.cpu_cv, 2),
            result.settle.show(),
            result.served,
            result.scheduled,
            result.losses.map_or_else(
                || "losses unknown".to_string(),
                |l| format!("ring drops {}, SYN retries {}", l.ring_drops, l.syn_retries)
            ),
            fmt_share(result.host_busy),
        ));
        Ok(result)
    }

    /// Applies the scenario at time `t` of the run: the halving once, the antagonist on or off, and the oracles'
    /// weights that follow them (`weights`: those in force).
    #[allow(clippy::too_many_arguments)]
    fn play(
        &self,
        sched: Sched,
        timeline: &Timeline,
        t: Duration,
        quota: &mut [f64],
        halved: &mut bool,
        antagonist: &mut Option<ChildGuard>,
        weights: &mut [u32],
    ) -> Result<()> {
        let changing = self.plan.changing();
        if !*halved && t >= timeline.halving_at() {
            *halved = true;
            quota[changing] = self.plan.quotas[changing] / 2.0;
            self.servers[changing].set_quota(quota[changing])?;
        }
        let want = timeline.antagonist_on(t);
        if want && antagonist.is_none() {
            *antagonist = Some(self.servers[self.plan.antagonist()].start_antagonist()?);
        } else if !want && antagonist.is_some() {
            *antagonist = None;
        }
        let service = format!("{VIP}:{HTTP_PORT}");
        for (i, want) in self.plan.weights(sched, quota, antagonist.is_some()).into_iter().enumerate() {
            if weights[i] != want {
                self.fulcrumctl(&["server", "edit", &service, &server_ip(i), "-w", &want.to_string()])?;
                weights[i] = want;
            }
        }
        Ok(())
    }

    fn start_load(&self, load: Load, duration: Duration) -> Result<JoinHandle<Result<Measured>>> {
        let client = self.client.clone();
        let script = self.wrk_script.clone();
        let servers = self.servers.iter().map(|s| s.host().name().to_string()).collect();
        Ok(std::thread::spawn(move || match load {
            Load::Closed { concurrency } => closed_loop(&client, &script, concurrency, duration),
            Load::Open { rate, .. } | Load::Held { rate } => open_loop(&client, servers, rate, duration),
        }))
    }
}

/// wrk's `done` hook: one line with what the report table needs, p99.9 included.
const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FULCRUM_WRK %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

fn closed_loop(client: &Host, script: &Path, concurrency: u32, duration: Duration) -> Result<Measured> {
    let secs = duration.as_secs();
    let limit = (secs + 20).to_string();
    let url = format!("http://{VIP}/");
    let conns = concurrency.to_string();
    let d = format!("{secs}s");
    let timeout = format!("{}s", REQUEST_TIMEOUT.as_secs());
    let script = script.to_str().context("non-UTF-8 temp path")?;
    let args = [
        "timeout",
        "-k",
        "5",
        &limit,
        "wrk",
        "-t1",
        "-c",
        &conns,
        "-d",
        &d,
        "--timeout",
        &timeout,
        "-H",
        "Connection: close",
        "-s",
        script,
        &url,
    ];
    let out = client.run_unchecked(&args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk exited with {}: {}", out.status, last_line(&String::from_utf8_lossy(&out.stderr)));
    }
    parse_wrk_report(&stdout)
}

/// The `FULCRUM_WRK` line of [`WRK_SCRIPT`].
fn parse_wrk_report(out: &str) -> Result<Measured> {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("FULCRUM_WRK "))
        .with_context(|| format!("no FULCRUM_WRK line in wrk's output: {}", last_line(out)))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("bad FULCRUM_WRK line {line:?}"))?;
    let [requests, duration_us, connect, read, write, status, timeout, p50, p99, p999] = v[..] else {
        bail!("FULCRUM_WRK line {line:?}: want 10 numbers");
    };
    if duration_us <= 0.0 {
        bail!("wrk ran for no time");
    }
    let good = (requests - status).max(0.0);
    let failed = connect + read + write + timeout;
    let attempted = requests + failed;
    let errors = failed + status;
    let ms = |us: f64| (requests > 0.0).then_some(us / 1000.0);
    Ok(Measured {
        per_second: Vec::new(),
        per_server_second: Vec::new(),
        past_p99_by_server: Vec::new(),
        throughput: good / (duration_us / 1e6),
        p50_ms: ms(p50),
        p99_ms: ms(p99),
        p999_ms: ms(p999),
        error_ratio: if attempted > 0.0 { errors / attempted } else { 1.0 },
        error_detail: (errors > 0.0).then(|| {
            format!(
                "{errors:.0} of {attempted:.0} requests failed (connect {connect:.0}, read {read:.0}, write {write:.0}, timeout {timeout:.0}, status {status:.0})"
            )
        }),
    })
}

/// `servers`: the real servers' names, as their nginx sends them in `X-Backend`.
fn open_loop(client: &Host, servers: Vec<String>, rate: f64, duration: Duration) -> Result<Measured> {
    let addr: SocketAddr = format!("{VIP}:{HTTP_PORT}").parse()?;
    let mut spec = LoadSpec::new(addr, rate, duration, ConnectionMode::NewConnection);
    spec.timeout = REQUEST_TIMEOUT;
    spec.slow_after = Some(SLOW_AFTER);
    spec.backends = servers;
    let report = in_netns(client.netns(), move || loadgen::run(&spec))?;
    let ms = |d: Duration| (report.latency.count > 0).then_some(d.as_secs_f64() * 1e3);
    let e = report.error_counts;
    Ok(Measured {
        throughput: report.ok as f64 / duration.as_secs_f64(),
        p50_ms: ms(report.latency.p50),
        p99_ms: ms(report.latency.p99),
        p999_ms: ms(report.latency.p999),
        error_ratio: report.errors() as f64 / report.scheduled.max(1) as f64,
        per_second: report.per_second.clone(),
        per_server_second: report.per_backend_second.clone(),
        past_p99_by_server: report.per_backend_latency.iter().map(|h| h.count_above(report.latency.p99)).collect(),
        error_detail: (e.total() > 0).then(|| {
            format!(
                "{} of {} requests failed (connect {}, io {}, status {}, timeout {})",
                e.total(),
                report.scheduled,
                e.connect,
                e.io,
                e.status,
                e.timeout
            )
        }),
    })
}

fn count_lines(path: &Path) -> u64 {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64)
}

fn server_ip(i: usize) -> String {
    format!("10.0.0.{}", 11 + i)
}

fn director_config(pki_dir: &Path, socket: &Path, plan: &Plan) -> String {
    let mut text = format!(
        "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:{AGENT_PORT}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[control]\nsocket = \"{socket}\"\n\n[metrics]\nlisten = \"{DIRECTOR_IP}:{METRICS_PORT}\"\n\n[dataplane]\ninterface = \"eth0\"\nworkers = {workers}\nring_frames = {RING_FRAMES}\n\n{TIMEOUTS}\n[[service]]\nvip = \"{VIP}\"\nport = {HTTP_PORT}\nscheduler = \"wlc\"\n",
        ca = pki_dir.join("ca.pem").display(),
        cert = pki_dir.join("d1.pem").display(),
        key = pki_dir.join("d1.key").display(),
        socket = socket.display(),
        workers = plan.workers,
    );
    if !plan.feedback.is_empty() {
        text.push_str("\n[service.feedback]\n");
        for (key, value) in &plan.feedback {
            let _ = writeln!(text, "{key} = {value}");
        }
    }
    for i in 0..plan.servers() {
        let _ = write!(
            text,
            "\n[[service.server]]\naddress = \"{}\"\nweight = {}\nforward = \"dr\"\n",
            server_ip(i),
            plan.weight
        );
    }
    text
}

fn fulcrumctl_json(socket: &Path, args: &[&str]) -> Result<Value> {
    let bin = try_workspace_bin("fulcrumctl")?;
    let out = fulcrum_tests::run_unchecked(Command::new(bin).arg("--socket").arg(socket).args(args))?;
    if !out.status.success() {
        bail!("fulcrumctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("fulcrumctl {} printed no JSON", args.join(" ")))
}

/// Polls `ready` every 100 ms up to `timeout`; fails at once with the director's last words if it exits.
fn wait_for(
    what: &str,
    timeout: Duration,
    director: &mut ChildGuard,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(status) = director.try_wait()? {
            bail!("the director exited with {status} while waiting for {what}: {}", director.output_tails());
        }
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("; last error: {e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("{what}: not ready after {timeout:?}{last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn which(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{tool} not found in PATH"))
}

/// Every request holds a socket: lift the soft open-files limit to the hard one (wrk inherits it).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn last_line(s: &str) -> String {
    s.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("").chars().take(200).collect()
}

fn short_reason(e: &anyhow::Error) -> String {
    let full = format!("{e:#}");
    let line = full.lines().next().unwrap_or("").trim();
    let mut short: String = line.chars().take(200).collect();
    if line.chars().count() > 200 {
        short.push('…');
    }
    log(format!("run failed: {short}"));
    short.replace('|', "/")
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.decimals$}"))
}

/// A share as a whole percentage, `–` when unknown.
fn fmt_share(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{:.0} %", v * 100.0))
}

fn command_stdout(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let line = String::from_utf8_lossy(&text).lines().next()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}

fn runs_csv(groups: &[&[Outcome]]) -> String {
    let mut s = String::from(
        "kind,scheduler,concurrency,level_pct,offered_rps,throughput_rps,p50_ms,p99_ms,p999_ms,error_ratio,cpu_cv,weight_changes_per_min,settle_s,round,ring_drops,syn_retries,host_cpu_busy\n",
    );
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.3}"));
    for r in groups.iter().flat_map(|g| g.iter()).filter_map(Outcome::ok) {
        let (concurrency, level, offered) = match r.load {
            Load::Closed { concurrency } => (concurrency.to_string(), String::new(), String::new()),
            Load::Open { percent, rate, .. } => (String::new(), percent.to_string(), format!("{rate:.1}")),
            Load::Held { rate } => (String::new(), String::new(), format!("{rate:.1}")),
        };
        let m = &r.measured;
        let _ = writeln!(
            s,
            "{},{},{concurrency},{level},{offered},{:.1},{},{},{},{:.5},{},{:.2},{},{},{},{},{}",
            r.load.kind(),
            r.sched.name(),
            m.throughput,
            opt(m.p50_ms),
            opt(m.p99_ms),
            opt(m.p999_ms),
            m.error_ratio,
            opt(r.cpu_cv),
            r.changes_per_min,
            opt(r.settle.seconds()),
            r.load.round(),
            r.losses.map_or_else(String::new, |l| l.ring_drops.to_string()),
            r.losses.map_or_else(String::new, |l| l.syn_retries.to_string()),
            opt(r.host_busy),
        );
    }
    s
}

/// The middle of second `k` of a run: where a per-second count is placed in the scenario.
fn middle_of_second(k: usize) -> Duration {
    Duration::from_secs(k as u64) + Duration::from_millis(500)
}

/// One row per second of each open-loop run; per real server, the good responses it sent that second and the
/// slow ones among them (`answers_rs1,slow_rs1,…`).
fn seconds_csv(open: &[Outcome]) -> String {
    let runs: Vec<&RunResult> = open.iter().filter_map(Outcome::ok).collect();
    let servers = runs.iter().map(|r| r.measured.per_server_second.len()).max().unwrap_or(0);
    let mut s = String::from("scheduler,load_pct,second,antagonist,requests,slow,round");
    for i in 1..=servers {
        let _ = write!(s, ",answers_rs{i},slow_rs{i}");
    }
    s.push('\n');
    for r in runs {
        let Load::Open { percent, .. } = r.load else { continue };
        let timeline = Timeline::new(r.duration);
        for (k, counts) in r.measured.per_second.iter().enumerate() {
            let on = timeline.antagonist_on(middle_of_second(k));
            let (name, on, round) = (r.sched.name(), u8::from(on), r.load.round());
            let _ = write!(s, "{name},{percent},{k},{on},{},{},{round}", counts.requests, counts.slow);
            for i in 0..servers {
                let c = r.measured.per_server_second.get(i).and_then(|v| v.get(k)).copied().unwrap_or_default();
                let _ = write!(s, ",{},{}", c.requests, c.slow);
            }
            s.push('\n');
        }
    }
    s
}

/// Where in the scenario the slow requests were: each class's share of its requests that were slow, and its
/// share of all the slow ones.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct SlowBy {
    all: SecondCounts,
    antagonist_on: SecondCounts,
    /// The first 3 s of each antagonist phase.
    antagonist_starting: SecondCounts,
    /// The 5 s after the halving.
    after_halving: SecondCounts,
    /// Neither the antagonist nor within 5 s of the halving.
    quiet: SecondCounts,
}

fn slow_by(timeline: &Timeline, per_second: &[SecondCounts]) -> SlowBy {
    let mut by = SlowBy::default();
    for (k, &c) in per_second.iter().enumerate() {
        let t = middle_of_second(k);
        by.all += c;
        let on = timeline.antagonist_on(t);
        let since_halving = t.checked_sub(timeline.halving_at());
        let after_halving = since_halving.is_some_and(|d| d < Duration::from_secs(5));
        if on {
            by.antagonist_on += c;
            // Switched on within the last 3 s (the run starts with the antagonist off before it).
            let starting = (1..=3).map(Duration::from_secs).any(|back| t < back || !timeline.antagonist_on(t - back));
            if starting {
                by.antagonist_starting += c;
            }
        }
        if after_halving {
            by.after_halving += c;
        }
        if !on && !after_halving {
            by.quiet += c;
        }
    }
    by
}

/// One server's good responses and slow ones, with the antagonist on and off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ServerSplit {
    antagonist_on: SecondCounts,
    antagonist_off: SecondCounts,
}

fn by_server(timeline: &Timeline, per_server_second: &[Vec<SecondCounts>]) -> Vec<ServerSplit> {
    per_server_second
        .iter()
        .map(|seconds| {
            let by = slow_by(timeline, seconds);
            let off = SecondCounts {
                requests: by.all.requests - by.antagonist_on.requests,
                slow: by.all.slow - by.antagonist_on.slow,
            };
            ServerSplit { antagonist_on: by.antagonist_on, antagonist_off: off }
        })
        .collect()
}

fn timeline_csv(groups: &[&[Outcome]]) -> String {
    let mut s = String::from(
        "kind,scheduler,load,t_s,server,effective_weight,quota_cores,antagonist,reported_cpu_bp,\
         reported_response_time_us,df_response_time_term,df_load_term,report_age_ms,health,reported_pressure_total_us\n",
    );
    let opt = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    let unknown = Reported::default();
    for r in groups.iter().flat_map(|g| g.iter()).filter_map(Outcome::ok) {
        for sample in &r.samples {
            for (i, w) in sample.effective_weights.iter().enumerate() {
                let reported = sample.reported.get(i).unwrap_or(&unknown);
                let _ = writeln!(
                    s,
                    "{},{},{},{:.3},rs{},{w},{:.4},{},{},{},{},{},{},{},{}",
                    r.load.kind(),
                    r.sched.name(),
                    r.load.label().replace(' ', ""),
                    sample.t.as_secs_f64(),
                    i + 1,
                    sample.quota[i],
                    u8::from(sample.antagonist),
                    opt(reported.cpu_bp),
                    opt(reported.response_time_us),
                    reported.df_response_time_term,
                    reported.df_load_term,
                    opt(reported.report_age_ms),
                    reported.health,
                    opt(reported.pressure_total_us),
                );
            }
        }
    }
    s
}

/// What the report's machine section says of the run itself.
struct RunInfo {
    elapsed: Duration,
    /// `git describe --always --dirty` when the run started (the code the binaries were built from).
    commit: String,
}

fn render(
    plan: &Plan,
    capacity: &Capacity,
    closed: &[Outcome],
    held: &[Outcome],
    open: &[Outcome],
    notes: &[String],
    run: &RunInfo,
) -> String {
    let mut s = String::new();
    let quotas: Vec<String> = plan.quotas.iter().map(|q| format!("{:.0} %", q * 100.0)).collect();
    // Plan::from_args checked every quota's period, the halved one's included.
    let period_ms = |cores: f64| {
        plan.period.for_quota(cores).map_or_else(|_| "?".to_string(), |p| format!("{}", p.as_micros() as f64 / 1000.0))
    };
    let periods = match plan.period {
        CfsPeriod::Fixed(_) => format!("CFS period {} ms", period_ms(plan.quotas[0])),
        CfsPeriod::Shortest => {
            let each: Vec<String> = plan.quotas.iter().map(|&q| period_ms(q)).collect();
            format!(
                "CFS periods of {} ms, the shortest in which each quota comes to the kernel's 1 ms minimum; {} ms \
                 for the halved quota",
                each.join(", "),
                period_ms(plan.quotas[plan.changing()] / 2.0)
            )
        }
    };
    let n = plan.servers();
    let _ = writeln!(s, "# Fulcrum dynamic-feedback benchmark\n");
    let _ = writeln!(
        s,
        "{n} real servers (nginx, 1 worker) with CPU quotas of {} of one core ({periods}), every one with \
         weight {} (wrr-oracle: the quotas' ratio). In every run rs{} halves its quota at half time and a CPU \
         antagonist in rs{}'s cgroup switches on and off every min(30 s, run / 3). New connection per request \
         (`Connection: close`), forwarding `dr`, {} director worker(s){}.\n",
        quotas.join(", "),
        plan.weight,
        plan.changing() + 1,
        plan.antagonist() + 1,
        plan.workers,
        if plan.quick { ", `--quick`" } else { "" },
    );
    let servers_header: Vec<String> = (1..=n).map(|i| format!("rs{i}")).collect();
    let servers_header = servers_header.join(" / ");
    let _ = writeln!(s, "## Closed loop (wrk, 1 thread, {} s per run)\n", plan.closed.as_secs());
    let _ = writeln!(
        s,
        "| scheduler | concurrency | req/s | p50 ms | p99 ms | p99.9 ms | errors | CPU CV | weight changes/min | settle s | lost: ring drops · SYN retries | host CPU busy | requests served {servers_header} | CPU use of quota {servers_header} |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    render_rows(&mut s, closed);
    let open_header = format!(
        "| scheduler | load | offered req/s | req/s | p50 ms | p99 ms | p99.9 ms | errors | CPU CV | weight changes/min | settle s | lost: ring drops · SYN retries | host CPU busy | requests served {servers_header} | CPU use of quota {servers_header} |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    if !held.is_empty() {
        let _ = writeln!(
            s,
            "\n## Sustained capacity (open loop, {} s per step, rs{}'s quota halved and the antagonist burning \
             throughout, wlc-oracle spreading it; a step kept up when every request was answered and the median \
             within {} ms)\n",
            plan.closed.as_secs(),
            plan.changing() + 1,
            SLOW_AFTER.as_millis(),
        );
        let _ = writeln!(s, "{open_header}");
        render_rows(&mut s, held);
        let verdicts: Vec<String> = held
            .iter()
            .filter_map(|o| match o.load {
                Load::Held { rate } => Some(format!(
                    "{rate:.0} {}",
                    o.ok().map_or("failed (not counted)", |r| step_verdict(kept_up(&r.measured)))
                )),
                _ => None,
            })
            .collect();
        let _ = writeln!(s, "\nSteps in order: {}.", verdicts.join(", "));
    }
    let how = match capacity.mean {
        None => "given with --capacity".to_string(),
        Some(mean) => format!(
            "the highest fixed rate wlc-oracle kept up with while the scenario's worst phase was held, found in \
             {CAPACITY_STEPS} halvings between 0 and the scenario's mean capacity, {mean:.0} requests/s (the \
             closed loop's median over the schedulers other than rr at its best concurrency). The closed loop's \
             figures are no base for a fixed rate: wrk's deep queues let nginx accept in batches, so each of its \
             requests costs a server less than the open loop's, and a fixed rate at 90 % of the mean capacity \
             is more than the cluster serves once the quota has halved and the antagonist burns"
        ),
    };
    let _ = writeln!(
        s,
        "\n## Open loop (fixed rate, latency from the intended send time, {} s per run)\n\nCapacity: **{:.0} requests/s** ({how}).\n",
        plan.open.as_secs(),
        capacity.sustained,
    );
    let _ = writeln!(s, "{open_header}");
    render_rows(&mut s, open);

    let _ = writeln!(
        s,
        "\n## Where the tail was (open loop: requests over {} ms or failed, by intended send time)\n\nEach cell: \
         the share of that part's requests that were slow, and in brackets that part's share of all the slow ones.\n",
        SLOW_AFTER.as_millis()
    );
    let _ = writeln!(
        s,
        "| scheduler | load | whole run | antagonist on | its first 3 s | 5 s after the halving | the rest |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in open.iter().filter_map(Outcome::ok) {
        let by = slow_by(&Timeline::new(r.duration), &r.measured.per_second);
        let cell = |c: SecondCounts| {
            if c.requests == 0 {
                return "–".to_string();
            }
            let share = c.slow as f64 / c.requests as f64 * 100.0;
            let of_all = if by.all.slow > 0 { c.slow as f64 / by.all.slow as f64 * 100.0 } else { 0.0 };
            format!("{share:.2} % ({of_all:.0} %)")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.sched.name(),
            r.load.column(),
            cell(by.all),
            cell(by.antagonist_on),
            cell(by.antagonist_starting),
            cell(by.after_halving),
            cell(by.quiet),
        );
    }

    let _ = writeln!(
        s,
        "\n## Which server the tail came from (open loop: good responses over {} ms, by the server that sent them)\n\n\
         Each cell, per server: its share of the part's good responses, and in brackets the share of its own that \
         were slow. Failed requests name no server and are left out. The last column splits the run's slowest \
         responses, those past its p99 (which the targets judge), by the server that sent them.\n",
        SLOW_AFTER.as_millis()
    );
    let _ = writeln!(
        s,
        "| scheduler | load | antagonist on: {servers_header} | antagonist off: {servers_header} \
         | past the p99: {servers_header} |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
    for r in open.iter().filter_map(Outcome::ok) {
        let split = by_server(&Timeline::new(r.duration), &r.measured.per_server_second);
        let part = |pick: fn(&ServerSplit) -> SecondCounts| {
            let total: u64 = split.iter().map(|c| pick(c).requests).sum();
            let cells: Vec<String> = split
                .iter()
                .map(|c| {
                    let c = pick(c);
                    let share = if total > 0 { c.requests as f64 / total as f64 * 100.0 } else { 0.0 };
                    let slow = if c.requests > 0 { c.slow as f64 / c.requests as f64 * 100.0 } else { 0.0 };
                    format!("{share:.0} % ({slow:.1} %)")
                })
                .collect();
            cells.join(" / ")
        };
        let past: u64 = r.measured.past_p99_by_server.iter().sum();
        let past_p99 = r
            .measured
            .past_p99_by_server
            .iter()
            .map(|&n| if past > 0 { format!("{:.0} %", n as f64 / past as f64 * 100.0) } else { "–".to_string() })
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {past_p99} |",
            r.sched.name(),
            r.load.column(),
            part(|c| c.antagonist_on),
            part(|c| c.antagonist_off)
        );
    }

    let _ = writeln!(s, "\n## Targets (open loop, p99)\n");
    let _ = writeln!(
        s,
        "| load | df p99 ms | df / wlc (≤ 0.70) | df / p2c (≤ 1.00) | df / wrr-oracle (≤ 1.10) | df settle s (≤ 5) \
         | wlc-oracle / wlc (no target) |"
    );
    let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &percent in &plan.levels {
        let _ = writeln!(s, "{}", targets_row(open, percent));
    }
    if plan.repeat > 1 {
        let _ = writeln!(
            s,
            "\nEach cell: the median over the {} rounds, judged against the target; in brackets, round by round \
             (each ratio is df's p99 over the other scheduler's in the same round).",
            plan.repeat
        );
    }
    let _ = writeln!(
        s,
        "\nwlc-oracle / wlc is what knowing every capacity change the instant it happens gives wlc: each weight set \
         to the server's quota, and the antagonist's server's to {} of its quota's weight while the antagonist \
         burns. It is not a bound on df, which also weighs each server's response time and CPU as they are \
         reported, and may weight the servers otherwise than by capacity.",
        plan.oracle_antagonist_share
    );
    for &percent in &plan.levels {
        if let Some(busy) = host_bound(open, percent) {
            let _ = writeln!(
                s,
                "\n**At {percent} % the machine itself was the bottleneck:** its CPU was {:.0} % busy (median over \
                 that level's runs). The load generator, the director and the servers share its cores, so the \
                 servers did not get their quotas whenever they wanted them, and that level's latencies measure \
                 the contention for the machine as much as the scheduling.",
                busy * 100.0
            );
        }
    }

    let _ = writeln!(s, "\n## Notes\n");
    let method = [
        "Everything shares this machine's cores: the load generator, the director, the agents and the nginx \
         servers. The quotas are set low so the servers saturate before the rest; figures taken on a busy machine \
         compare schedulers, they are not absolute.",
        "host CPU busy: the share of the whole machine's CPU time (all cores, from /proc/stat) that was not idle \
         during the run. Near 100 % the machine, not the servers' quotas, bounded the run.",
        "CPU CV: coefficient of variation over the servers of each cgroup's CPU use relative to its quota, over the \
         run (from cpuacct.usage / cpu.stat, integrated over the quota in force). 0 = every server equally loaded \
         for its size.",
        "Settle: after the halving, time until every effective weight (fulcrumctl list --json, every 250 ms) stays \
         within 10 % (or one unit: weights are integers) of its mean over the last second before the antagonist's \
         next switch (`> N`: not within N s; static weights settle at once). Weight changes/min counts per-server changes between samples.",
        "Errors: requests without a 2xx/3xx response within 2 s (closed loop: wrk's connect/read/write/timeout \
         errors and bad statuses; open loop: counted from the intended send time). Latency percentiles are over \
         the good responses; the closed loop's are wrk's (coordinated omission included), the open loop's are not.",
        "Between runs: quotas restored, the antagonist stopped, the scheduler switched through wlc (so every \
         effective weight is back to its configured value and df's blender starts afresh), a 3 s idle pause. The \
         director's FIN/TIME-WAIT/CLOSE timeouts are 1 s, so a reused client port is scheduled anew.",
    ];
    for m in method {
        let _ = writeln!(s, "- {m}");
    }
    for n in notes {
        let _ = writeln!(s, "- {}", n.replace('|', "/"));
    }
    let _ = writeln!(s, "\n## Machine\n");
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = command_stdout(&["date", "-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let _ = writeln!(s, "- cores: {cores} ({cpu_model}); kernel {}", kernel.trim());
    let _ = writeln!(s, "- load average at the end: {}", load.trim());
    let _ =
        writeln!(s, "- date: {date}; commit {} at the start; whole run {:.0} s", run.commit, run.elapsed.as_secs_f64());
    s
}

/// The open-loop runs at `percent` that completed.
fn runs_at(open: &[Outcome], percent: u32) -> impl Iterator<Item = &RunResult> {
    open.iter().filter_map(Outcome::ok).filter(move |r| matches!(r.load, Load::Open { percent: p, .. } if p == percent))
}

/// The machine's CPU, busy for at least this share of a level's runs (median), bounded them: see
/// [`host_bound`].
const HOST_BOUND: f64 = 0.9;

/// The median host CPU busy share of the open-loop runs at `percent`, when it reaches [`HOST_BOUND`]. A host
/// that busy leaves the servers' quotas unfilled at times. Measured on a 2-core machine whose kernel took three
/// times as long per connection as the one before it (nginx on loopback, `Connection: close`: 12 300
/// requests/s): the open loop at 70 % of the cluster's sustained capacity kept the machine 88 % busy, and 11–18 %
/// of the requests were slow even in the scenario's quiet phase (df and wlc alike), where on the faster machine
/// df's were under 0.1 % and wlc's under 4 %.
fn host_bound(open: &[Outcome], percent: u32) -> Option<f64> {
    let busy: Vec<f64> = runs_at(open, percent).filter_map(|r| r.host_busy).collect();
    median(busy).filter(|&b| b >= HOST_BOUND)
}

/// One level's row of the targets table: each figure per round (a scheduler compared only with the same
/// round's runs), the verdict on the median over the rounds.
fn targets_row(open: &[Outcome], percent: u32) -> String {
    let runs: Vec<&RunResult> = runs_at(open, percent).collect();
    let mut rounds: Vec<u32> = runs.iter().map(|r| r.load.round()).collect();
    rounds.sort_unstable();
    rounds.dedup();
    let p99 = |sched: Sched, round: u32| {
        runs.iter().find(|r| r.sched == sched && r.load.round() == round).and_then(|r| r.measured.p99_ms)
    };
    // The median of `values`, judged by `pass` when there is a target, then each round's value.
    let summary = |values: Vec<f64>, show: &dyn Fn(f64) -> String, pass: Option<&dyn Fn(f64) -> bool>| {
        let each: Vec<String> = values.iter().map(|&v| show(v)).collect();
        match median(values) {
            None => "not measured".to_string(),
            Some(m) => {
                let verdict = pass.map_or("", |pass| if pass(m) { " PASS" } else { " FAIL" });
                let rounds = if each.len() > 1 { format!(" ({})", each.join(" · ")) } else { String::new() };
                format!("{}{verdict}{rounds}", show(m))
            }
        }
    };
    let two_places = |r: f64| format!("{r:.2}");
    // `of`'s p99 over `to`'s, round by round.
    let ratios = |of: Sched, to: Sched| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|&round| match (p99(of, round), p99(to, round)) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            })
            .collect()
    };
    let ratio = |other: Sched, limit: f64| summary(ratios(Sched::Df, other), &two_places, Some(&|r| r <= limit));
    let oracle = summary(ratios(Sched::WlcOracle, Sched::Wlc), &two_places, None);
    let df_p99: Vec<f64> = rounds.iter().filter_map(|&round| p99(Sched::Df, round)).collect();
    // Not settled counts as longer than any settled run; an unknown one (too few samples) is left out.
    let mut window = None;
    let settles = runs
        .iter()
        .filter(|r| r.sched == Sched::Df)
        .filter_map(|r| match r.settle {
            Settle::After(d) => Some(d.as_secs_f64()),
            Settle::NotSettled { window: w } => {
                window = Some(w);
                Some(f64::INFINITY)
            }
            Settle::Unknown => None,
        })
        .collect();
    let show_settle = |v: f64| match window {
        _ if v.is_finite() => format!("{v:.1}"),
        Some(w) => Settle::NotSettled { window: w }.show(),
        None => "–".to_string(),
    };
    format!(
        "| {percent} % | {} | {} | {} | {} | {} | {oracle} |",
        fmt_opt(median(df_p99), 1),
        ratio(Sched::Wlc, 0.70),
        ratio(Sched::P2c, 1.00),
        ratio(Sched::WrrOracle, 1.10),
        summary(settles, &show_settle, Some(&|v| v <= 5.0)),
    )
}

fn render_rows(s: &mut String, outcomes: &[Outcome]) {
    for o in outcomes {
        match &o.result {
            Ok(r) => {
                let m = &r.measured;
                let offered = match r.load {
                    Load::Open { rate, .. } | Load::Held { rate } => format!(" {rate:.0} |"),
                    Load::Closed { .. } => String::new(),
                };
                let load = r.load.column();
                let served: Vec<String> = r.served.iter().map(u64::to_string).collect();
                let util: Vec<String> = r.cpu_util.iter().map(|u| format!("{:.0} %", u * 100.0)).collect();
                let _ = writeln!(
                    s,
                    "| {} | {load} |{offered} {:.0} | {} | {} | {} | {:.2} % | {} | {:.1} | {} | {} | {} | {} | {} |",
                    r.sched.name(),
                    m.throughput,
                    fmt_opt(m.p50_ms, 1),
                    fmt_opt(m.p99_ms, 1),
                    fmt_opt(m.p999_ms, 1),
                    m.error_ratio * 100.0,
                    fmt_opt(r.cpu_cv, 2),
                    r.changes_per_min,
                    r.settle.show(),
                    r.losses.map_or_else(|| "?".to_string(), |l| format!("{} · {}", l.ring_drops, l.syn_retries)),
                    fmt_share(r.host_busy),
                    served.join(" / "),
                    util.join(" / "),
                );
            }
            Err(reason) => {
                let load = o.load.column();
                let _ = writeln!(s, "| {} | {load} | failed: {reason} |", o.sched.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_read_from_the_metrics_and_netstat() {
        let exposition =
            "# TYPE fulcrum_ring_drops_total counter\nfulcrum_ring_drops_total_x 9\nfulcrum_ring_drops_total 42\n";
        assert_eq!(metric_sum(exposition, "fulcrum_ring_drops_total"), Some(42.0));
        assert_eq!(metric_sum(exposition, "fulcrum_ring_packets_total"), None);
        let netstat =
            "TcpExt: SyncookiesSent TCPSynRetrans TCPTimeouts\nTcpExt: 0 17 20\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(netstat_value(netstat, "TcpExt", "TCPSynRetrans"), Some(17));
        assert_eq!(netstat_value(netstat, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(netstat_value(netstat, "TcpExt", "InNoRoutes"), None);
        assert_eq!(netstat_value("TcpExt: TCPSynRetrans\n", "TcpExt", "TCPSynRetrans"), None, "no value line");
        let before = Losses { ring_drops: 5, syn_retries: 10 };
        assert_eq!(Losses { ring_drops: 7, syn_retries: 10 }.since(before), Losses { ring_drops: 2, syn_retries: 0 });
    }

    #[test]
    fn host_cpu_is_read_from_the_cpu_line() {
        let stat = "cpu  100 5 50 800 45 0 0 0 0 0\ncpu0 50 2 25 400 20 0 0 0 0 0\nintr 1\n";
        let before = HostCpu::parse(stat).unwrap();
        assert_eq!(before, HostCpu { idle: 845, total: 1000 });
        let after = HostCpu::parse("cpu  250 5 100 1000 45 0 0 0\n").unwrap();
        // 200 busy ticks of 400.
        assert_eq!(after.busy_since(before), Some(0.5));
        assert_eq!(before.busy_since(before), None, "no time passed");
        assert_eq!(before.busy_since(after), None, "counters went back");
        assert_eq!(HostCpu::parse("cpu0 1 2 3 4 5 6 7 8\n"), None, "only the all-cores line counts");
        assert_eq!(HostCpu::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(HostCpu::parse("cpu  1 2 3\n"), None);
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn sample(t: f64, weights: &[u32]) -> Sample {
        Sample {
            t: secs(t),
            effective_weights: weights.to_vec(),
            reported: vec![Reported::default(); weights.len()],
            cpu: vec![Duration::ZERO; weights.len()],
            quota: vec![0.1; weights.len()],
            antagonist: false,
        }
    }

    #[test]
    fn slow_requests_are_attributed_to_the_scenario_s_phases() {
        // 60 s: the antagonist burns 0–20 s and 40–60 s, the quota halves at 30 s.
        let timeline = Timeline::new(secs(60.0));
        let mut per_second = vec![SecondCounts { requests: 10, slow: 0 }; 60];
        for k in [1, 41, 50, 31, 25] {
            per_second[k].slow = 5;
        }
        let by = slow_by(&timeline, &per_second);
        let counts = |requests, slow| SecondCounts { requests, slow };
        assert_eq!(by.all, counts(600, 25));
        assert_eq!(by.antagonist_on, counts(400, 15));
        assert_eq!(by.antagonist_starting, counts(60, 10), "0–3 s and 40–43 s");
        assert_eq!(by.after_halving, counts(50, 5));
        assert_eq!(by.quiet, counts(150, 5), "20–30 s and 35–40 s");

        let mut rs2 = vec![counts(4, 0); 60];
        rs2[1].slow = 3;
        rs2[25].slow = 2;
        let split = by_server(&timeline, &[Vec::new(), rs2]);
        assert_eq!(split[0], ServerSplit::default(), "a server that answered nothing");
        assert_eq!(split[1].antagonist_on, counts(160, 3));
        assert_eq!(split[1].antagonist_off, counts(80, 2));
    }

    #[test]
    fn repeated_open_loops_are_judged_on_the_median_of_same_round_ratios() {
        let run = |sched: Sched, round: u32, p99: f64, settle: Settle| {
            let load = Load::Open { percent: 90, rate: 1000.0, round: Some(round) };
            let result = RunResult {
                sched,
                load,
                duration: Duration::from_secs(60),
                measured: Measured { p99_ms: Some(p99), ..Measured::default() },
                cpu_cv: None,
                cpu_util: Vec::new(),
                changes_per_min: 0.0,
                settle,
                served: Vec::new(),
                scheduled: Vec::new(),
                losses: None,
                host_busy: None,
                samples: Vec::new(),
            };
            Outcome { sched, load, result: Ok(result) }
        };
        let fixed = Settle::After(Duration::ZERO);
        let open = vec![
            // Round 1: a slow host, everyone at 40 ms; round 2 and 3: calm. df's ratios 0.50, 0.60, 1.00.
            run(Sched::Wlc, 1, 40.0, fixed),
            run(Sched::Df, 1, 20.0, Settle::After(Duration::from_secs(3))),
            run(Sched::Wlc, 2, 20.0, fixed),
            run(Sched::Df, 2, 12.0, Settle::NotSettled { window: Duration::from_secs(10) }),
            run(Sched::Wlc, 3, 10.0, fixed),
            run(Sched::Df, 3, 10.0, Settle::After(Duration::from_secs(4))),
            // wlc with perfect weights: 0.75, 0.90, 0.80 of wlc; shown, not judged.
            run(Sched::WlcOracle, 1, 30.0, fixed),
            run(Sched::WlcOracle, 2, 18.0, fixed),
            run(Sched::WlcOracle, 3, 8.0, fixed),
        ];
        assert_eq!(
            targets_row(&open, 90),
            "| 90 % | 12.0 | 0.60 PASS (0.50 · 0.60 · 1.00) | not measured | not measured | 4.0 PASS (3.0 · > 10 · 4.0) \
             | 0.80 (0.75 · 0.90 · 0.80) |"
        );
        // Unsettled in two of three: the median is not settled.
        let mut two = open;
        two[1] = run(Sched::Df, 1, 20.0, Settle::NotSettled { window: Duration::from_secs(10) });
        assert!(targets_row(&two, 90).contains("| > 10 FAIL (> 10 · > 10 · 4.0) |"), "{}", targets_row(&two, 90));
        assert_eq!(
            targets_row(&two, 50),
            "| 50 % | – | not measured | not measured | not measured | not measured | not measured |"
        );
        // The machine was busy in two of the level's runs out of three: the level is marked host-bound.
        let busy = |mut o: Outcome, share: f64| {
            if let Ok(r) = &mut o.result {
                r.host_busy = Some(share);
            }
            o
        };
        let hosts = vec![
            busy(run(Sched::Wlc, 1, 10.0, fixed), 0.95),
            busy(run(Sched::Df, 1, 10.0, fixed), 0.97),
            busy(run(Sched::Wlc, 2, 10.0, fixed), 0.50),
        ];
        assert_eq!(host_bound(&hosts, 90), Some(0.95));
        assert_eq!(host_bound(&hosts[1..], 90), None, "median 0.735");
        assert_eq!(host_bound(&hosts, 50), None, "no runs at 50 %");
    }

    #[test]
    fn capacity_is_the_schedulers_median_at_the_best_concurrency() {
        let run = |sched: Sched, concurrency: u32, throughput: f64| {
            let load = Load::Closed { concurrency };
            let result = RunResult {
                sched,
                load,
                duration: Duration::from_secs(1),
                measured: Measured { throughput, ..Measured::default() },
                cpu_cv: None,
                cpu_util: Vec::new(),
                changes_per_min: 0.0,
                settle: Settle::Unknown,
                served: Vec::new(),
                scheduled: Vec::new(),
                losses: None,
                host_busy: None,
                samples: Vec::new(),
            };
            Outcome { sched, load, result: Ok(result) }
        };
        let mut closed = vec![
            run(Sched::Rr, 50, 90.0),
            run(Sched::Wlc, 50, 20.0),
            run(Sched::Df, 50, 22.0),
            run(Sched::P2c, 50, 21.0),
            run(Sched::Rr, 400, 10.0),
            // One lucky run does not make the capacity: the median of 30, 31 and 37 is 31.
            run(Sched::Wlc, 400, 37.0),
            run(Sched::Df, 400, 31.0),
            run(Sched::P2c, 400, 30.0),
        ];
        assert_eq!(measured_capacity(&closed), Some((400, 31.0)));
        closed.push(Outcome {
            sched: Sched::WrrOracle,
            load: Load::Closed { concurrency: 400 },
            result: Err("x".into()),
        });
        assert_eq!(measured_capacity(&closed), Some((400, 31.0)), "a failed run counts for nothing");
        // rr alone: its own figures.
        assert_eq!(measured_capacity(&[run(Sched::Rr, 50, 90.0), run(Sched::Rr, 400, 10.0)]), Some((50, 90.0)));
        assert_eq!(measured_capacity(&[]), None);
        // The steps of the search for the sustained capacity are not the scenario's closed loop.
        closed.push(Outcome { load: Load::Held { rate: 5.0 }, ..run(Sched::WlcOracle, 400, 5.0) });
        assert_eq!(measured_capacity(&closed), Some((400, 31.0)));
    }

    #[test]
    fn the_capacity_search_halves_the_interval_in_doubt() {
        // A cluster that keeps up with 700 requests/s and no more, searched below 1000.
        let mut search = RateSearch::new(1000.0);
        assert_eq!(search.result(), None, "nothing kept up with yet");
        let mut tried = Vec::new();
        for _ in 0..CAPACITY_STEPS {
            let rate = search.next_rate();
            tried.push(rate);
            search.record(rate, rate <= 700.0);
        }
        assert_eq!(tried, [500.0, 750.0, 625.0, 687.5, 718.75, 703.125]);
        assert_eq!(search.result(), Some(687.5));
        // A step that contradicts an earlier one (the host's drift) is recorded as it came: the interval may
        // invert, and the result stays the highest rate kept up with.
        search.record(600.0, false);
        search.record(650.0, true);
        assert_eq!((search.result(), search.not_kept_up), (Some(687.5), 600.0));
        // A cluster that keeps up with nothing has no capacity.
        let mut none = RateSearch::new(1000.0);
        for _ in 0..CAPACITY_STEPS {
            none.record(none.next_rate(), false);
        }
        assert_eq!(none.result(), None);
        assert_eq!(none.not_kept_up, 15.625);
    }

    #[test]
    fn a_run_kept_up_when_every_request_was_answered_and_the_median_met_no_queue() {
        let run = |p50_ms: Option<f64>, error_ratio: f64| Measured { p50_ms, error_ratio, ..Measured::default() };
        assert!(kept_up(&run(Some(2.1), 0.0)));
        assert!(kept_up(&run(Some(10.0), 0.0)), "10 ms is half the longest CFS period: still no queue");
        assert!(!kept_up(&run(Some(10.5), 0.0)), "a median over half a period waited");
        assert!(!kept_up(&run(Some(2.1), 0.0001)), "a request abandoned after its timeout");
        assert!(!kept_up(&run(None, 0.0)), "nothing answered");
    }

    #[test]
    fn the_antagonist_never_switches_with_the_halving() {
        let full = Timeline::new(secs(120.0));
        assert_eq!(full.period, secs(30.0));
        assert_eq!(full.halving_at(), secs(60.0));
        let on: Vec<u32> = (0..120).filter(|&t| full.antagonist_on(secs(f64::from(t)))).collect();
        let want: Vec<u32> = (15..45).chain(75..105).collect();
        assert_eq!(on, want);
        assert_eq!(full.quiet_window(), (secs(60.0), secs(75.0)));

        let quick = Timeline::new(secs(30.0));
        assert_eq!(quick.period, secs(10.0));
        let on: Vec<u32> = (0..30).filter(|&t| quick.antagonist_on(secs(f64::from(t)))).collect();
        let want: Vec<u32> = (0..10).chain(20..30).collect();
        assert_eq!(on, want);
        assert_eq!(quick.quiet_window(), (secs(15.0), secs(20.0)));
        assert!(!quick.antagonist_on(secs(30.0)), "off once the run is over");
    }

    #[test]
    fn settling_time_is_when_every_weight_stays_in_the_band() {
        // Changes at 10 s; weights move for 2 s then stay within 10 % of (40, 20).
        let samples = vec![
            sample(9.0, &[30, 30]),
            sample(10.0, &[30, 30]),
            sample(11.0, &[36, 24]),
            sample(12.0, &[41, 19]),
            sample(13.0, &[40, 20]),
            sample(14.0, &[40, 21]),
            sample(15.0, &[10, 10]),
        ];
        assert_eq!(settling_time(&samples, secs(10.0), secs(15.0)), Settle::After(secs(2.0)));
        // Static weights: settled from the first sample.
        let flat: Vec<Sample> = (0..10).map(|t| sample(f64::from(t), &[10, 10])).collect();
        assert_eq!(settling_time(&flat, secs(5.0), secs(10.0)), Settle::After(Duration::ZERO));
        // Oscillating to the end (sampled every 250 ms, as in a run).
        let wobbly: Vec<Sample> =
            (0..40).map(|i| sample(f64::from(i) * 0.25, &[if i % 2 == 0 { 10 } else { 30 }])).collect();
        assert_eq!(settling_time(&wobbly, secs(5.0), secs(10.0)), Settle::NotSettled { window: secs(5.0) });
        assert_eq!(settling_time(&wobbly, secs(20.0), secs(30.0)), Settle::Unknown);
        // A small weight flickering between two neighbours (5 and 6: 18 % apart) has settled; a swing of three has not.
        let flicker: Vec<Sample> =
            (0..40).map(|i| sample(f64::from(i) * 0.25, &[if i % 2 == 0 { 5 } else { 6 }, 20])).collect();
        assert_eq!(settling_time(&flicker, secs(5.0), secs(10.0)), Settle::After(Duration::ZERO));
        let two: Vec<Sample> =
            (0..40).map(|i| sample(f64::from(i) * 0.25, &[if i % 2 == 0 { 4 } else { 7 }, 20])).collect();
        assert_eq!(settling_time(&two, secs(5.0), secs(10.0)), Settle::NotSettled { window: secs(5.0) });
    }

    #[test]
    fn cpu_spread_and_weight_changes() {
        let mut a = sample(0.0, &[10, 10]);
        let mut b = sample(1.0, &[10, 12]);
        let mut c = sample(2.0, &[11, 13]);
        a.quota = vec![0.1, 0.2];
        b.quota = vec![0.1, 0.2];
        c.quota = vec![0.1, 0.1];
        b.cpu = vec![secs(0.1), secs(0.1)];
        c.cpu = vec![secs(0.2), secs(0.2)];
        // rs1: 0.2 s of 0.2 allowed = 100 %; rs2: 0.2 s of 0.2 + 0.2 = 0.4 allowed = 50 %.
        let u = cpu_utilisation(&[a.clone(), b.clone(), c.clone()]);
        assert!((u[0] - 1.0).abs() < 1e-9 && (u[1] - 0.5).abs() < 1e-9, "{u:?}");
        let cv = coefficient_of_variation(&u).unwrap();
        assert!((cv - 1.0 / 3.0).abs() < 1e-9, "{cv}");
        assert_eq!(coefficient_of_variation(&[0.5, 0.5]), Some(0.0));
        assert_eq!(coefficient_of_variation(&[]), None);
        assert_eq!(weight_changes(&[a, b, c]), 3);
    }

    #[test]
    fn parses_the_wrk_hook_line() {
        let out = "Running 8s test @ http://10.0.0.100/\n  1 threads and 50 connections\nFULCRUM_WRK 8000 8000000 0 10 0 0 0 1500 12000 40000\n";
        let m = parse_wrk_report(out).unwrap();
        assert!((m.throughput - 1000.0).abs() < 1e-9);
        assert_eq!((m.p50_ms, m.p99_ms, m.p999_ms), (Some(1.5), Some(12.0), Some(40.0)));
        assert!((m.error_ratio - 10.0 / 8010.0).abs() < 1e-12);
        assert!(m.error_detail.unwrap().contains("read 10"));
        assert!(parse_wrk_report("unable to connect to 10.0.0.100:80").is_err());
        assert!(parse_wrk_report("FULCRUM_WRK 1 2 3").is_err());
    }

    #[test]
    fn quick_and_full_plans() {
        let args = Args::parse_from(["bench_feedback", "--quick"]);
        let plan = Plan::from_args(&args).unwrap();
        assert_eq!((plan.concurrency.clone(), plan.levels.clone()), (vec![50, 400], vec![70]));
        assert_eq!((plan.changing(), plan.antagonist()), (3, 2));
        assert_eq!(plan.schedulers, [Sched::Rr, Sched::Wlc, Sched::P2c, Sched::Df, Sched::WrrOracle, Sched::WlcOracle]);
        let full = Plan::from_args(&Args::parse_from(["bench_feedback", "--levels", "60"])).unwrap();
        assert_eq!((full.levels, full.open), (vec![60], secs(120.0)));
        // By default each quota gets the period it needs: 40 ms for 2.5 %, 25 ms for 8 % halved. In a fixed
        // 20 ms period both are under the kernel's 1 ms minimum; 0.05 % would need periods of 2 s.
        assert_eq!(plan.period, CfsPeriod::Shortest);
        assert!(Plan::from_args(&Args::parse_from(["bench_feedback", "--quotas", "2.5,10"])).is_ok());
        assert!(Plan::from_args(&Args::parse_from(["bench_feedback", "--quotas", "10,8"])).is_ok());
        let fixed = |quotas: &str| Args::parse_from(["bench_feedback", "--period-ms", "20", "--quotas", quotas]);
        assert!(Plan::from_args(&fixed("2.5,10")).is_err());
        assert!(Plan::from_args(&fixed("10,8")).is_err());
        assert!(Plan::from_args(&fixed("5,10")).is_ok());
        assert!(Plan::from_args(&Args::parse_from(["bench_feedback", "--quotas", "0.05,10"])).is_err());
        assert!(Plan::from_args(&Args::parse_from(["bench_feedback", "--quotas", "5,10"])).is_ok());
        assert!(Plan::from_args(&Args::parse_from(["bench_feedback", "--quotas", "10"])).is_err());
        assert_eq!(Plan::oracle_weight(0.05), 50);
        // The oracles' weights follow the quotas; wlc-oracle's also follow the antagonist (default: a quarter).
        let (full, halved) = ([0.05, 0.1, 0.2, 0.2], [0.05, 0.1, 0.2, 0.1]);
        assert_eq!(plan.weights(Sched::WrrOracle, &full, true), [50, 100, 200, 200]);
        assert_eq!(plan.weights(Sched::WlcOracle, &full, false), [50, 100, 200, 200]);
        assert_eq!(plan.weights(Sched::WlcOracle, &halved, true), [50, 100, 50, 100]);
        assert_eq!(plan.weights(Sched::Df, &halved, true), [10, 10, 10, 10]);
        let out = Plan::from_args(&Args::parse_from(["bench_feedback", "--oracle-antagonist-share", "0"])).unwrap();
        assert_eq!(out.weights(Sched::WlcOracle, &full, true), [50, 100, 0, 200]);
        assert!(Args::try_parse_from(["bench_feedback", "--oracle-antagonist-share", "1.5"]).is_err());
        // Nothing would measure the capacity the open loop is based on.
        assert!(Plan::from_args(&Args::parse_from(["bench_feedback", "--schedulers", "wlc-oracle"])).is_err());
        let given = ["bench_feedback", "--schedulers", "wlc-oracle", "--capacity", "1000"];
        assert!(Plan::from_args(&Args::parse_from(given)).is_ok());
        let config = director_config(Path::new("/p"), Path::new("/s.sock"), &plan);
        assert!(config.contains("ca = \"/p/ca.pem\"") && config.contains("scheduler = \"wlc\""));
        assert_eq!(config.matches("forward = \"dr\"").count(), 4);
        assert!(config.contains("address = \"10.0.0.14\"\nweight = 10"));
        assert!(!config.contains("[service.feedback]"));
        let args = ["bench_feedback", "--feedback", "cpu=0.3", "--feedback", "response_time = 0.5"];
        let tuned = Plan::from_args(&Args::parse_from(args)).unwrap();
        let config = director_config(Path::new("/p"), Path::new("/s.sock"), &tuned);
        assert!(config.contains("[service.feedback]\ncpu = 0.3\nresponse_time = 0.5\n"), "{config}");
        assert!(Args::try_parse_from(["bench_feedback", "--feedback", "cpu"]).is_err());
        assert!(Args::try_parse_from(["bench_feedback", "--feedback", "a b=1"]).is_err());
    }
}
