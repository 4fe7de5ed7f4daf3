//! Dynamic-feedback weight blender: turns agent load reports and the director's own counters into an effective
//! weight per real server, plus the `T` and `L` terms of the `df` scheduler.
//!
//! Pure (sans-IO): every input, including time, is an argument. The control loop calls [`Blender::update`] once
//! per period with one [`ServerInput`] per real server of a service (each followed by its key, wherever it is in
//! the list) and stores each
//! [`ServerOutput::effective_weight`] into the data plane's `ServerState::effective_weight`
//! ([`store_weights`]).
//!
//! # The classic rule
//!
//! This follows the LVS "dynamic feedback load balancing" design (Wensong Zhang; `feedbackd`):
//!
//! ```text
//! aggregate = Σ Rᵢ·Mᵢ                        (Mᵢ normalised metrics, Σ Rᵢ = 1)
//! w ← w + A·∛(0.95 − aggregate)              bounded to [1, SCALE × configured weight]
//! ```
//!
//! applied only when the change is significant (more than [`BlenderConfig::significance`] of the current
//! weight; LVS suggests 5 %, Fulcrum's default is 3 %, see below).
//!
//! ## Metrics and their normalisation (1.0 = "fully loaded"; each capped at [`MAX_METRIC`])
//!
//! | metric | coefficient (default) | normalisation |
//! | --- | --- | --- |
//! | CPU | `cpu` = 0.5 | `busy_bp / 10 000`; for a saturated server (≥ 90 %) the demand on it if higher (below) |
//! | response time | `response_time` = 0.3 | the agent's figure for its last interval's probes (clipped to `MAX_METRIC × reference`), smoothed, `/ reference`; the reference is either fixed ([`RtReference::Fixed`]) or `multiple ×` the median over the service's servers in normal state ([`RtReference::ClusterMedian`], default multiple 2: a server at the median scores 0.5, one at twice the median 1.0), at least 1 ms (below that, probe times differ by scheduling jitter) |
//! | CPU pressure | `pressure` = 0.2 | the share of the interval since the previous report in which some task stalled on CPU (PSI `some total`'s growth; `some avg10` for a first report); for a v1 cgroup, which has no PSI, the agent reports the time its CFS quota throttled it |
//! | connections | `connections` = 0.0 | agent-counted established connections / [`BlenderConfig::connections_full`] |
//!
//! A metric a report does not carry (no CPU sample yet, no PSI, no successful probe yet) is left out and the
//! remaining coefficients are rescaled to sum to 1; with no metric at all the weight is held.
//!
//! # Where Fulcrum differs, and why
//!
//! * **Gain in units of the weight.** `Δw = A × max(configured, w) × ∛(target − aggregate)`, so the same
//!   `A` (default 0.5) behaves the same for a server configured with weight 1 or 100, and a weight that
//!   climbed above its configured value sheds it as fast in proportion (measured in `bench/feedback`: at
//!   weight 23, configured 10, the antagonist's server lost 4 units a report and took 4–5 s to leave the
//!   traffic while its response time was a hundred times the others').
//! * **Cluster-relative load** ([`LoadMode::ClusterRelative`], the default). Only the *ratio* of weights
//!   decides where connections go, so steering every server to an absolute 95 % can only succeed when the
//!   offered load happens to be 95 % of the capacity; otherwise all weights run to a bound together. In
//!   relative mode the aggregate fed to the rule is `target × aggregate / max(mean aggregate, floor)`: a server
//!   exactly as loaded as the service's average does not move, busier ones lose weight, idler ones gain, and
//!   the weights converge to the servers' capacity ratios. The floor (default 0.1) keeps an idle service from
//!   reacting to noise: below it every server wants more weight, which the renormalisation cancels.
//!   [`LoadMode::Absolute`] is the classic rule.
//! * **Weights keep their scale** (relative mode). After the steps, the weights of the servers in normal state
//!   are scaled together so that `weight / configured` averages the service's neutral factor: only the ratios
//!   steer traffic, and without this the scale drifts until the weights sit on their bounds, where the ratios
//!   are lost. The neutral factor is 1 when every configured weight is at least `scale` (with equal configured
//!   weights they then keep their configured sum); with smaller configured weights it is `√(scale / smallest)`,
//!   so that a weight can fall as well as rise (configured 1: neutral 3.2, range 1 … 10). A new, stale or
//!   never-reported server stands at `neutral × configured`, which keeps the configured ratios.
//! * **A server pinned by outside work does not skew the mean.** The mean leaves out a server on the floor of
//!   1 that is still busier than the mean (or on its ceiling and idler): a server busy with work the director
//!   does not send it reads busy whatever its weight, and counted in the mean it would make every other server
//!   look idle.
//! * **No overshoot.** Near the target `∛` is steep and, in a closed loop, makes the weight orbit the
//!   equilibrium forever. Under the model "load is proportional to weight", the weight `w × target / aggregate`
//!   would put the server exactly on target; one step never moves more than [`BlenderConfig::damping`]
//!   (default ¾) of the way there. Far from the target the `∛` term is the smaller and decides.
//! * **Dead band.** With the damping `d` and the significance `s`, a server whose load is within about
//!   `s / d` (4 % by default) of its target no longer moves: that is what makes the weights settle and stop.
//!   LVS's 5 % doubles the dead band.
//! * **Hysteresis against noise.** Reported CPU jumps 10–15 points from one report to the next under a
//!   static scheduler (measured in `bench/feedback`), far more than the dead band, so without more the weights
//!   random-walk. After [`STEPS_TO_REST`] steps in a row inside the dead band a weight is at rest; it moves
//!   again only when its load averaged over [`REST_SMOOTHING`] half-lives (restarted on target when it came to
//!   rest) is more than [`BlenderConfig::hold_band`] (default 12 %) off target, or the load averaged over one
//!   half-life more than three times that, or [`REPORTS_TO_RELEASE`] reports in a row each alone more than
//!   twice that off on the same side (a real change, followed at once; see [`Streak`]).
//!   A saturated server sent more than it can complete (demand above 1, see below) and busier than the
//!   target is not held: it moves
//!   as soon as its recent load is more than `hold_band` off, since its backlog grows while the long average
//!   catches up (in the simulation below, the halved server moves on the first report instead of the third).
//!   A weight held on a bound by a load pushing past it (a server on the floor while an antagonist runs) is
//!   pinned, not at rest: it follows the load as soon as the load turns, and once [`REPORTS_TO_UNPIN`] reports
//!   in a row each read more than twice `hold_band` on the other side of the target, its averages restart from
//!   the newest report (they describe the work that ended; see [`released`]). The defaults come from the
//!   simulations in the tests: three servers of capacity 1 : 2 : 3 at 17–92 % of the total capacity settle
//!   within 15 periods with every load within the hold band of the median and never change again; four servers
//!   with ±15 points of noise per report move in under one period in ten.
//! * **Rate cap.** One step moves a weight by at most [`BlenderConfig::max_step`] (default 25 %) of its
//!   current value or of its configured weight, whichever is larger, so a whole service cannot swing at once
//!   (no herd oscillation). The configured weight as a lower bound matters on the way back: a server that
//!   outside work pinned to the floor of 1 would otherwise creep up ×1.25 a report, and take ten reports to
//!   regain a configured weight of 10 after the work stopped; it now takes four.
//! * **Demand, not CPU, under saturation.** A saturated CPU reads 100 % however much work waits for it, so
//!   under full load every server looks the same and the weights stop wherever they were, even after one of
//!   them lost capacity (measured in `bench/feedback`: at 90 % load a server whose quota a CPU antagonist took
//!   kept its weight for 3 s and needed 13 s to shed it, while `wlc` saw its connections pile up at once). The
//!   director knows what it sent each server (`ServerInput::connections_total`), how many of those got
//!   established (`ServerInput::connections_established`) and how its active connections grew: what the server
//!   completed is what got established less that growth (a connection whose SYN a full listen queue dropped is
//!   not completed). From that and the reported CPU the blender keeps each server's capacity (connections completed per
//!   second at full CPU, sampled when the CPU is at least 20 %) and, for a server at 90 % CPU or more, takes
//!   the demand (arrivals over capacity, 1.5 for a server sent half again what it can do) as its CPU figure
//!   when that is higher. The demand exceeds 1 only while the server's active connections grow: one that
//!   completes all it is sent keeps up, and an estimate sampled while outside work shared the CPU is low.
//!   One that completes noticeably more than it is sent ([`DRAINING`]) works off a backlog: its CPU is busy
//!   with connections its weight no longer brings, and its figure is the demand alone, below 1. Without this
//!   a server that had shed enough went on shedding until its backlog was gone (simulated: a server halving
//!   its capacity at 90 % load fell to 0.80 of its final weight before it climbed back; now it reaches it in four reports and stays).
//!   Below saturation nothing changes. Simulated (tests): at 110 % of the capacity the
//!   weights reach the capacities' ratios, where from the CPU alone they stayed 30 % and more off; a server
//!   halving its capacity at 95 % load loses weight from the first report after.
//! * **A saturated server that falls behind is cut at once** ([`cut_to_backlog`]): one that completed less than
//!   [`KEPT_UP_AT_LEAST`] of its arrivals in the newest interval, its backlog having grown by at least
//!   [`BACKLOG_MIN_GROWTH`] connections beyond what a higher arrival rate explains (Little's law), is cut to
//!   that share of its weight (at most [`MAX_CUT`] off per report), past the hysteresis and the rate cap. The
//!   renormalisation then scales every weight alike, the cut one included, so its share of the traffic falls
//!   by less than the cut: the freed share is spread over all servers in proportion. The averages take seconds
//!   to show what the director's counts show at the first report.
//! * **A server busy with outside work takes the overflow** ([`Overflow`]): a saturated server that completed
//!   all it was sent is raised by the rate cap at each report in which another server fell behind, and keeps
//!   what it took while every other server stays saturated. Its CPU and response time read busy whatever its
//!   weight, which alone would hold it on the floor while the others' backlogs grow.
//! * **A step needs the newest report's agreement.** The averages trail the weight by about a half-life, so
//!   right after a move they still read the load of the weight before it. A weight moves only when the newest
//!   report alone also lies on the side of the target that the average points to; otherwise it waits (and
//!   does not count as at rest). Measured in `bench/feedback` at 90 % load: the halved server went 16 → 6 in
//!   four seconds and back to 9 in three more, where 8 or 9 was right. A server whose load does not follow its
//!   weight (outside work) reads the same in both and is not slowed; one noisy report holds a weight for one
//!   report.
//! * **Response time from several probes a report, outliers clipped.** The agent probes `probe.per_interval`
//!   times per report (default 4) and smooths them (0.3 a probe, so three quarters of its figure is the last
//!   interval's); the blender smooths that with its own half-life. With one probe a report, the figure was one
//!   sample of a bimodal time (a server whose CPU quota is spent answers after up to a CFS period: 20 µs and
//!   15 ms in consecutive reports of the same server), and the weights chased it; the agent's short average
//!   adds about a quarter of a report interval of lag. A sample above what the metric can register
//!   (`MAX_METRIC` × the full-load reference of the previous period) is clipped to it first: a throttled
//!   server's 30-fold response time would otherwise keep its smoothed value high for five half-lives after it
//!   recovered. What the smoothing is then fed is the median of the server's last three reports' figures: one
//!   throttled probe still lifted a report's figure fifty-fold (25 µs to 1.2 ms for the 5 % server of
//!   `bench/feedback` at 70 % load), and the weight followed it down and back within seconds, breaking the
//!   settling window after the halved server had settled. A server that stays slow is slow in two reports in
//!   a row and counts one report later; its CPU and pressure are not filtered and still move it at once.
//! * **One step per new report.** Between two reports nothing new is known; stepping again on the same data
//!   would integrate it twice. A period without a new accepted report holds the weight.
//! * **Smoothing.** Every metric is an EWMA over accepted reports with a half-life
//!   ([`BlenderConfig::half_life`], default 1 s, one report interval): `α = 1 − 2^(−dt / half_life)`, `dt` the time between the
//!   reports' receipt `Instant`s.
//! * **Stale and missing reports.** A server whose newest accepted report is older than
//!   [`BlenderConfig::stale_after`] (default 3 s, three report intervals) or that never reported falls back to
//!   its configured share, `neutral × configured` (its configured weight whenever configured weights are at
//!   least `scale`) ([`FeedbackStatus::Stale`]); older than [`BlenderConfig::down_after`] (default 10 s)
//!   or with at least [`BlenderConfig::down_probe_failures`] (default 3) consecutive agent probe failures it is
//!   marked down: weight 0 ([`FeedbackStatus::Down`]). Coming back, it restarts from its configured share with
//!   fresh averages.
//! * **Servers out of rotation are left out** ([`ServerInput::in_rotation`]). A server the health checks took
//!   out (down, held down after flapping, removed), one ramping back up in slow start, and every real server
//!   while the sorry server stands in, gets less traffic than its weight, or none: its load then describes the
//!   health rule, not its weight. Counted, it read idle, climbed towards `scale × configured` while out (the
//!   renormalisation pushing every other weight down, to the floor where the configured ratios are lost), and
//!   came back with that inflated weight once slow start ended. So it stands at its configured share, `neutral
//!   × configured`, with no aggregate: out of the reference, the overflow census and the renormalisation; its
//!   reports still decide its status. Back in rotation, it restarts from there with fresh averages.
//! * **Impossible values are refused**: CPU or pressure above 100 %, a response time above one hour, a report
//!   interval of 0 or above one hour, a receipt time in the future. A refused report feeds nothing; it is
//!   counted once by reason ([`Blender::rejections`]) and shown in [`ServerOutput::rejected`].
//!
//! The effective weight is the smoothed weight rounded to an integer: with small configured weights the
//! integer steps are coarse (configured 1, SCALE 10: ten levels); configure larger weights for finer control.
//!
//! # The `df` terms
//!
//! `T = response_time_metric × unit` and `L = cpu_metric × unit` in the scheduler's connection-overhead units
//! (one active connection = 256, see `sched::conn_overhead`), where
//! `unit = 256 × max(mean active connections per server, df_min_connections) × W / mean W` (`W` the effective
//! weight): a fully busy CPU weighs as much as the server's fair share of the active connections, so the
//! feedback terms stay comparable with the connection term at any load. Servers not in normal state get
//! `T = L = 0` (`df` is then `wlc` for them).
//!
//! The floor, `df_min_connections`, is 1: a fully busy CPU weighs at least one connection. It was 4, and with short
//! connections (about two in flight per server in `bench/feedback` at 70 % load) that made the CPU term twice the
//! connection term it is meant to match. The terms are a report old when they are read (half a second at the
//! agent's default interval), so a term that large steered the next half second's connections off a server that had
//! just reported busy, and onto it once it reported idle: the 10 % server's reported CPU swung 34–40 points from
//! one report to the next (8–23 with a floor of 1), and `df` answered 7.4 % of its requests late (over 10 ms),
//! against 4.7 % (medians of five paired 60 s runs at 70 % load).
//!
//! The share of the weight matters because `df` divides the whole sum by `W`: it balances
//! `connections / W + (T + L) / W`. With terms in proportion to `W` the second part is `k × metrics`, the same
//! for every server equally loaded, so equally loaded servers are balanced exactly as `wlc` balances them and
//! only a difference in load moves connections. A term the same size for every server (the first version)
//! weighed `1 / W` on each: at equal load it steered new connections away from the small weights, and with
//! few connections in flight starved them outright (measured in `bench/feedback`: the 5 % server of four
//! alternated between 0 and 100 % of its quota report by report, and its throttled half-periods made the
//! p99).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fulcrum_protocol::messages::LoadReport;
use thiserror::Error;

#[cfg(test)]
mod tests;

/// Largest value one normalised metric may take, so that one absurd metric cannot dominate the aggregate.
pub const MAX_METRIC: f64 = 2.0;
/// 100 % in basis points.
pub const FULL_BP: u16 = 10_000;
/// The half-life of the load average that decides whether a weight at rest moves again, in units of
/// [`BlenderConfig::half_life`]: long enough that report-to-report noise does not cross the hold band, while a
/// real change (more than three times the band) still moves the weight on the short average at once. In the
/// noisy simulation (four servers, ±15 points a report, 340 reports) 3 moved the weights in 6 periods, 4 in 5
/// and 2 in 19; a load 30 % off target crosses the band after 2.2 half-lives with 3, 2.9 with 4 (measured in
/// `bench/feedback`: a halved server at 66 % CPU waited 4.5 s for its weight to move).
pub const REST_SMOOTHING: u32 = 3;
/// Consecutive insignificant steps before a weight comes to rest. One is not enough: the smoothed load lags
/// the weight it responds to, so a single quiet step right after a move is often the lag, not the target.
pub const STEPS_TO_REST: u32 = 2;

/// Reports in a row, each alone more than twice the hold band off target on the same side, that release a
/// weight at rest at once (see [`Streak`]).
pub const REPORTS_TO_RELEASE: u32 = 3;
/// Reports in a row, each alone more than twice the hold band on the other side of the target, after which a
/// weight pinned on a bound restarts its averages from the newest report (see [`released`]).
pub const REPORTS_TO_UNPIN: u32 = 2;
/// A reported CPU share at or above which the server counts as saturated: its CPU then says nothing of how
/// much more work waits, and the blender reads the demand instead (see the module documentation).
pub const SATURATED_CPU: f64 = 0.9;
/// Completions above arrivals × this mark a saturated server working off a backlog (see [`Demand`]): active
/// connections also move by a few from one report to the next without any backlog.
pub const DRAINING: f64 = 1.05;
/// The least CPU share an interval must show to sample the server's capacity: below it the server's fixed
/// costs (the agent, idle timers) are a large part of the CPU, and completions per CPU would understate it.
pub const CAPACITY_MIN_CPU: f64 = 0.2;
/// A saturated server that completed less than this share of what it was sent in one report interval is cut
/// at once to that share of its weight (see [`cut_to_backlog`]).
pub const KEPT_UP_AT_LEAST: f64 = 0.8;
/// Growth of a server's active connections in one interval below which its backlog counts as steady: a few
/// connections come and go between two reports without any backlog.
pub const BACKLOG_MIN_GROWTH: f64 = 16.0;
/// The most one cut may take off a weight, as a share of it.
pub const MAX_CUT: f64 = 0.5;
/// Longest response time or report interval accepted.
pub const MAX_PLAUSIBLE_TIME: Duration = Duration::from_secs(60 * 60);

/// Coefficients `Rᵢ` of the aggregate load; must be ≥ 0 and sum to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub cpu: f64,
    pub response_time: f64,
    pub pressure: f64,
    pub connections: f64,
}

impl Default for Coefficients {
    fn default() -> Coefficients {
        Coefficients { cpu: 0.5, response_time: 0.3, pressure: 0.2, connections: 0.0 }
    }
}

/// What aggregate the update rule compares with the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadMode {
    /// The classic rule: each server's own aggregate against the target.
    Absolute,
    /// The aggregate relative to the service's mean: `target × aggregate / max(mean, floor)`.
    ClusterRelative { floor: f64 },
}

/// Which response time counts as fully loaded (metric 1.0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RtReference {
    /// A fixed response time, in microseconds.
    Fixed { full_load_us: u32 },
    /// `full_load_multiple ×` the median smoothed response time of the service's servers in normal state, but
    /// never less than `min_full_load_us`: probes that answer in tens of microseconds differ by scheduling
    /// jitter, not load (measured in `bench/feedback`: 17 µs and 243 µs from the same idle server in
    /// consecutive reports), and against a median of 30 µs a server would read 8 times busier for it.
    ClusterMedian { full_load_multiple: f64, min_full_load_us: u32 },
}

/// Per-service blender settings; see the module documentation for each formula.
#[derive(Debug, Clone, PartialEq)]
pub struct BlenderConfig {
    pub coefficients: Coefficients,
    /// The load the rule steers to (LVS: 0.95).
    pub target: f64,
    /// `A`, in units of the configured weight or of the current one, whichever is larger (default 0.5).
    pub gain: f64,
    /// The effective weight stays within `1..=scale × configured` (LVS's SCALE, default 10).
    pub scale: u32,
    /// A step is applied only when it changes the weight by more than this share of it (default 0.03).
    pub significance: f64,
    /// Largest step per period as a share of the current weight or of the configured weight, whichever is
    /// larger (default 0.25).
    pub max_step: f64,
    /// Share of the way to the load-proportional target weight one step may go (default 0.75), `(0, 1]`.
    pub damping: f64,
    pub mode: LoadMode,
    pub response_time_reference: RtReference,
    /// Established connections that count as fully loaded (used when `coefficients.connections > 0`).
    pub connections_full: u32,
    /// EWMA half-life of the metrics (default 1 s); zero disables smoothing.
    pub half_life: Duration,
    /// Report age after which the server falls back to its configured share (default 3 s).
    pub stale_after: Duration,
    /// Report age after which the server is marked down (default 10 s); must exceed `stale_after`.
    pub down_after: Duration,
    /// Consecutive agent probe failures that mark the server down (default 3; 0 = never).
    pub down_probe_failures: u32,
    /// Floor of the `df` unit's connection count (default 1; see the module documentation).
    pub df_min_connections: u32,
    /// Hysteresis: a server whose weight has come to rest moves again only when its load, averaged over
    /// [`REST_SMOOTHING`] × `half_life`, is off target by more than this share of the target, or its load
    /// (averaged over `half_life`) by more than three times that (default 0.12), `[0, 0.5]`.
    pub hold_band: f64,
}

impl Default for BlenderConfig {
    fn default() -> BlenderConfig {
        BlenderConfig {
            coefficients: Coefficients::default(),
            target: 0.95,
            gain: 0.5,
            scale: 10,
            significance: 0.03,
            max_step: 0.25,
            damping: 0.75,
            mode: LoadMode::ClusterRelative { floor: 0.1 },
            response_time_reference: RtReference::ClusterMedian { full_load_multiple: 2.0, min_full_load_us: 1000 },
            connections_full: 10_000,
            half_life: Duration::from_secs(1),
            stale_after: Duration::from_secs(3),
            down_after: Duration::from_secs(10),
            down_probe_failures: 3,
            df_min_connections: 1,
            hold_band: 0.12,
        }
    }
}

/// Why a [`BlenderConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("feedback coefficients must be finite, >= 0 and sum to 1 (got {0:?})")]
    Coefficients(Coefficients),
    #[error("feedback {field} = {value} is out of range {range}")]
    OutOfRange { field: &'static str, value: f64, range: &'static str },
    #[error("feedback down_after must be longer than stale_after")]
    DownBeforeStale,
}

impl BlenderConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self.coefficients;
        let all = [c.cpu, c.response_time, c.pressure, c.connections];
        if all.iter().any(|r| !r.is_finite() || *r < 0.0) || (all.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            return Err(ConfigError::Coefficients(c));
        }
        let check = |field: &'static str, value: f64, ok: bool, range: &'static str| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { field, value, range })
            }
        };
        check("target", self.target, self.target > 0.0 && self.target <= 1.0, "(0, 1]")?;
        check("gain", self.gain, self.gain > 0.0 && self.gain <= 10.0, "(0, 10]")?;
        check("scale", f64::from(self.scale), (1..=1000).contains(&self.scale), "1..=1000")?;
        check("significance", self.significance, (0.0..1.0).contains(&self.significance), "[0, 1)")?;
        check("max_step", self.max_step, self.max_step > 0.0 && self.max_step <= 1.0, "(0, 1]")?;
        check("damping", self.damping, self.damping > 0.0 && self.damping <= 1.0, "(0, 1]")?;
        check("hold_band", self.hold_band, (0.0..=0.5).contains(&self.hold_band), "[0, 0.5]")?;
        if let LoadMode::ClusterRelative { floor } = self.mode {
            check("mode.floor", floor, floor > 0.0 && floor <= 1.0, "(0, 1]")?;
        }
        match self.response_time_reference {
            RtReference::Fixed { full_load_us } => {
                check("response_time_reference", f64::from(full_load_us), full_load_us > 0, "> 0 µs")?
            }
            RtReference::ClusterMedian { full_load_multiple: m, .. } => {
                check("response_time_reference", m, m > 0.0 && m <= 100.0, "(0, 100]")?
            }
        }
        if c.connections > 0.0 && self.connections_full == 0 {
            return Err(ConfigError::OutOfRange { field: "connections_full", value: 0.0, range: ">= 1" });
        }
        if self.down_after <= self.stale_after {
            return Err(ConfigError::DownBeforeStale);
        }
        Ok(())
    }
}

/// The parts of an agent's latest [`LoadReport`] the blender uses, with its receipt time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportInput {
    /// The report's sequence number: with `received`, identifies a report so each is used (or refused) once.
    pub seq: u64,
    /// When the director received it; the report's age is `now − received`.
    pub received: Instant,
    pub interval_ms: u32,
    pub cpu_busy_bp: Option<u16>,
    /// The agent's response time (HTTP: time to first byte; TCP: connect time), microseconds, smoothed over
    /// its last few probes (`ProbeReport::response_time_us`); `None` when the latest probe failed or none has
    /// completed.
    pub response_time_us: Option<u32>,
    /// PSI CPU `some avg10`, basis points.
    pub cpu_pressure_bp: Option<u16>,
    /// PSI CPU `some total`, microseconds (cumulative): from two reports in a row the blender takes the stall
    /// share of the interval between them, where `avg10` would lag by its ten seconds.
    pub cpu_pressure_total_us: Option<u64>,
    pub established: u32,
    pub probe_failures: u32,
}

impl ReportInput {
    /// The fields of `report`, received at `received`.
    pub fn from_report(report: &LoadReport, received: Instant) -> ReportInput {
        ReportInput {
            seq: report.seq,
            received,
            interval_ms: report.interval_ms,
            cpu_busy_bp: report.cpu.map(|c| c.busy_bp),
            response_time_us: report.probe.response_time_us(),
            cpu_pressure_bp: report.cpu_pressure.map(|p| p.some_avg10_bp),
            cpu_pressure_total_us: report.cpu_pressure.map(|p| p.some_total_us),
            established: report.established_connections,
            probe_failures: report.probe.consecutive_failures,
        }
    }
}

/// One real server's inputs for one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerInput {
    /// Stable identity (e.g. `sched::server_key`): the blender follows each server's state by it, wherever the
    /// server is in the list; a new key starts from the configured share.
    pub key: u64,
    /// The configured weight; 0 = administratively quiesced (effective weight 0, no feedback).
    pub configured_weight: u32,
    /// The newest report from the server's agent, if any (repeat the same one until a newer arrives).
    pub report: Option<ReportInput>,
    /// The director's active (established) connections to this server, summed over workers.
    pub active: u32,
    /// The director's inactive connections to this server.
    pub inactive: u32,
    /// New connections the director has scheduled to this server so far (cumulative, summed over workers): with
    /// `active`, what the server was sent and completed between two reports (see [`SATURATED_CPU`]).
    pub connections_total: u64,
    /// Of those, the ones that got going (TCP: reached ESTABLISHED; UDP: all), cumulative: a connection
    /// whose SYN the server dropped (its listen queue full) is not completed, it waits.
    pub connections_established: u64,
    /// The server takes new connections at its full weight. False while its health checks hold it out (down,
    /// held down, removed), while it ramps back up in slow start, and while the sorry server stands in: then its
    /// load follows that rule, not its weight, and the blender holds it at its configured share (see the
    /// module documentation).
    pub in_rotation: bool,
}

/// Why a report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    CpuOverFullScale,
    PressureOverFullScale,
    ResponseTimeAbsurd,
    IntervalAbsurd,
    ReceivedInFuture,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::CpuOverFullScale,
        RejectReason::PressureOverFullScale,
        RejectReason::ResponseTimeAbsurd,
        RejectReason::IntervalAbsurd,
        RejectReason::ReceivedInFuture,
    ];

    /// A label for metrics (`fulcrum_feedback_rejected_reports_total{reason}`).
    pub const fn name(self) -> &'static str {
        match self {
            RejectReason::CpuOverFullScale => "cpu_over_full_scale",
            RejectReason::PressureOverFullScale => "pressure_over_full_scale",
            RejectReason::ResponseTimeAbsurd => "response_time_absurd",
            RejectReason::IntervalAbsurd => "interval_absurd",
            RejectReason::ReceivedInFuture => "received_in_future",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Refused reports counted by reason since the blender was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectionCounts([u64; 5]);

impl RejectionCounts {
    pub fn get(&self, reason: RejectReason) -> u64 {
        self.0[reason.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Why a server is on its configured share rather than feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// No report accepted yet.
    NeverReported,
    /// The newest accepted report is older than `stale_after`.
    ReportOld { age: Duration },
}

/// Why a server is marked down (weight 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// The newest accepted report is older than `down_after`.
    ReportTooOld { age: Duration },
    /// The agent's probe failed this many times in a row.
    ProbeFailures { consecutive: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackStatus {
    /// Weight from feedback.
    Normal,
    /// Configured weight: feedback is missing or old.
    Stale { reason: StaleReason },
    /// Weight 0.
    Down { reason: DownReason },
}

impl FeedbackStatus {
    /// The status without its reason, as logs and metrics name it: `normal`, `stale` or `down`.
    pub const fn name(self) -> &'static str {
        match self {
            FeedbackStatus::Normal => "normal",
            FeedbackStatus::Stale { .. } => "stale",
            FeedbackStatus::Down { .. } => "down",
        }
    }
}

/// One server's result of one period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerOutput {
    /// `0..=scale × configured`: 0 when down or configured 0; `1..=scale × configured` otherwise.
    pub effective_weight: u32,
    /// `df`'s T, in connection-overhead units (see the module documentation).
    pub response_time_norm: u32,
    /// `df`'s L, in connection-overhead units.
    pub cpu_norm: u32,
    pub status: FeedbackStatus,
    /// The previous period's status: a change of [`FeedbackStatus::name`] is a transition to log and count.
    pub status_before: FeedbackStatus,
    /// The server's aggregate load `Σ Rᵢ·Mᵢ` (before the cluster-relative scaling); `None` without metrics or
    /// when not in normal state.
    pub aggregate_load: Option<f64>,
    /// The server's estimated capacity, connections per second at full CPU (see the module documentation on
    /// demand); `None` until sampled or when not in normal state.
    pub capacity_per_s: Option<f64>,
    /// This period's new report was refused, and why.
    pub rejected: Option<RejectReason>,
    /// `effective_weight` differs from the previous period's.
    pub changed: bool,
}

impl ServerOutput {
    const EMPTY: ServerOutput = ServerOutput {
        effective_weight: 0,
        response_time_norm: 0,
        cpu_norm: 0,
        status: FeedbackStatus::Stale { reason: StaleReason::NeverReported },
        status_before: FeedbackStatus::Stale { reason: StaleReason::NeverReported },
        aggregate_load: None,
        capacity_per_s: None,
        rejected: None,
        changed: false,
    };
}

/// An exponentially weighted moving average over irregularly spaced samples.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma {
    value: Option<f64>,
    at: Option<Instant>,
}

impl Ewma {
    /// An average of one sample.
    fn of(x: Option<f64>, at: Instant) -> Ewma {
        Ewma { value: x, at: Some(at) }
    }

    fn feed(&mut self, x: Option<f64>, at: Instant, half_life: Duration) {
        let Some(x) = x else { return };
        self.value = Some(match (self.value, self.at) {
            (Some(old), Some(prev)) if !half_life.is_zero() => {
                let dt = at.saturating_duration_since(prev).as_secs_f64();
                let alpha = 1.0 - (-dt / half_life.as_secs_f64()).exp2();
                old + alpha * (x - old)
            }
            _ => x,
        });
        self.at = Some(at);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Smoothed {
    cpu: Ewma,
    rt_us: Ewma,
    pressure: Ewma,
    established: Ewma,
    /// Connections per second the server completes at full CPU: completions over CPU share, from intervals
    /// with at least [`CAPACITY_MIN_CPU`].
    capacity: Ewma,
    /// A saturated server's demand in the newest interval (see [`demand`]); `None` when the server was not
    /// saturated or its capacity is not known yet.
    demand: Option<Demand>,
}

/// Per-server state kept between periods.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    configured: u32,
    /// The applied (continuous) feedback weight; the effective weight is its rounding.
    weight: f64,
    /// Identity (seq, receipt) of the newest report seen, accepted or not: each is judged once.
    seen: Option<(u64, Instant)>,
    /// Receipt time of the newest accepted report, and its probe failure count.
    accepted: Option<(Instant, u32)>,
    smoothed: Smoothed,
    /// The newest accepted report's metrics alone (capacity and demand as in `smoothed`).
    latest: Smoothed,
    /// The newest report's aggregate alone (see [`step`]), beside `aggregate`, the smoothed one.
    latest_aggregate: Option<f64>,
    /// A report was accepted since the last weight step.
    fresh: bool,
    /// `weight` before this period's step and renormalisation: the rate cap holds for both together.
    weight_before: f64,
    /// Consecutive steps that fell inside the dead band. After [`STEPS_TO_REST`] the weight is at rest: it
    /// holds until the load leaves the hold band.
    quiet_steps: u32,
    /// The load the rule compares with the target, averaged over `REST_SMOOTHING × half_life`; restarted at
    /// the target whenever the weight comes to rest.
    rest_load: Ewma,
    /// The newest reports in a row that each read far off target on the same side.
    streak: Streak,
    /// The weight was raised to take the overflow of servers that fell behind ([`Overflow`]): it keeps what
    /// it took while every other server stays saturated.
    overflow: bool,
    /// In normal state and in rotation ([`ServerInput::in_rotation`]): its weight comes from feedback and its
    /// averages describe it. Step 1 of each update sets it; until then (the new report's intake) it is the
    /// previous update's.
    normal: bool,
    aggregate: Option<f64>,
    /// Sequence number and PSI `some total` of the newest accepted report that had one.
    pressure_total: Option<(u64, u64)>,
    /// The response times (clipped) of the two accepted reports before the newest, older first: what the
    /// smoothing is fed is the median of these and the newest (see [`median_of_three`]).
    rt_before: [Option<f64>; 2],
    /// The director's own counts when the previous report was accepted.
    counted: Option<Counts>,
    /// This period's normalised response time and CPU (0 when unknown or not in normal state), for df's terms.
    df_metrics: (f64, f64),
    published: u32,
}

impl Counts {
    /// `self` with its arrival rate over the interval since `before`.
    fn since(self, before: Option<Counts>) -> Counts {
        let arrival_rate = before.and_then(|b| {
            let seconds = self.at.saturating_duration_since(b.at).as_secs_f64();
            (seconds > 0.0 && self.scheduled >= b.scheduled).then(|| (self.scheduled - b.scheduled) as f64 / seconds)
        });
        Counts { arrival_rate, ..self }
    }
}

impl Slot {
    /// A slot at the service's neutral point, `neutral × configured`.
    fn new(key: u64, configured: u32, neutral: f64) -> Slot {
        Slot {
            key,
            configured,
            weight: neutral * f64::from(configured),
            seen: None,
            accepted: None,
            smoothed: Smoothed::default(),
            latest: Smoothed::default(),
            latest_aggregate: None,
            fresh: false,
            weight_before: neutral * f64::from(configured),
            quiet_steps: 0,
            rest_load: Ewma::default(),
            streak: Streak::default(),
            overflow: false,
            normal: false,
            aggregate: None,
            df_metrics: (0.0, 0.0),
            pressure_total: None,
            rt_before: [None, None],
            counted: None,
            published: configured,
        }
    }
}

/// The dynamic-feedback blender of one service.
#[derive(Debug, Clone)]
pub struct Blender {
    config: BlenderConfig,
    slots: Vec<Slot>,
    outputs: Vec<ServerOutput>,
    scratch: Vec<f64>,
    rejections: RejectionCounts,
    /// The response time that counts as full load, from the last update; response-time samples are clipped to
    /// `MAX_METRIC` times it before they are smoothed.
    rt_full_us: Option<f64>,
    /// The service's neutral factor at the last update (see [`neutral_factor`]).
    neutral: f64,
}

impl Blender {
    /// Validates `config`.
    pub fn new(config: BlenderConfig) -> Result<Blender, ConfigError> {
        config.validate()?;
        Ok(Blender {
            config,
            slots: Vec::new(),
            outputs: Vec::new(),
            scratch: Vec::new(),
            rejections: RejectionCounts::default(),
            rt_full_us: None,
            neutral: 1.0,
        })
    }

    pub fn config(&self) -> &BlenderConfig {
        &self.config
    }

    /// Refused reports by reason, since construction.
    pub fn rejections(&self) -> &RejectionCounts {
        &self.rejections
    }

    /// A server's configured share in effective-weight units, `neutral × configured` as of the last
    /// [`Blender::update`]: what a stale server gets, and what the runtime gives a server when feedback cannot
    /// speak for it.
    pub fn neutral_weight(&self, configured: u32) -> u32 {
        to_units(self.neutral * f64::from(configured))
    }

    /// The outputs of the last [`Blender::update`].
    pub fn outputs(&self) -> &[ServerOutput] {
        &self.outputs
    }

    /// One period: judges each new report, updates the averages, decides each server's status, steps the
    /// weights and returns one output per input, in order. Allocates only when the server list grows.
    pub fn update(&mut self, now: Instant, inputs: &[ServerInput]) -> &[ServerOutput] {
        let cfg = &self.config;
        let neutral = neutral_factor(cfg, inputs);
        self.neutral = neutral;
        let same_servers = self.slots.len() == inputs.len()
            && self.slots.iter().zip(inputs).all(|(slot, input)| slot.key == input.key);
        if !same_servers {
            // Follow each server by its key, not its place: removing the first of ten servers must not restart
            // the other nine (their averages, and weights that would jump to the configured share uncapped).
            let mut old = std::mem::take(&mut self.slots);
            let mut old_outputs = std::mem::take(&mut self.outputs);
            for input in inputs {
                let (slot, out) = match old.iter().position(|slot| slot.key == input.key) {
                    Some(i) => (old.swap_remove(i), old_outputs.swap_remove(i)),
                    None => (Slot::new(input.key, input.configured_weight, neutral), ServerOutput::EMPTY),
                };
                self.slots.push(slot);
                self.outputs.push(out);
            }
            self.scratch.reserve(inputs.len());
        }

        // 1. Reports, averages and status.
        for ((slot, input), out) in self.slots.iter_mut().zip(inputs).zip(self.outputs.iter_mut()) {
            if slot.configured == 0 && input.configured_weight > 0 {
                // Back from an administrative quiesce: from the configured share, as a new server.
                slot.weight = neutral * f64::from(input.configured_weight);
                slot.configured = input.configured_weight;
            }
            if slot.configured != input.configured_weight {
                // A configuration change: rescale the feedback weight with it.
                let ratio = f64::from(input.configured_weight) / f64::from(slot.configured.max(1));
                slot.weight = (slot.weight * ratio).max(1.0);
                slot.configured = input.configured_weight;
            }
            out.rejected = None;
            if let Some(report) = input.report {
                let id = (report.seq, report.received);
                if slot.seen != Some(id) {
                    slot.seen = Some(id);
                    match check(&report, now) {
                        Err(reason) => {
                            self.rejections.0[reason.index()] += 1;
                            out.rejected = Some(reason);
                        }
                        Ok(()) => {
                            if !slot.normal {
                                slot.smoothed = Smoothed::default();
                                slot.counted = None;
                                slot.rt_before = [None, None];
                            }
                            let s = &mut slot.smoothed;
                            let at = report.received;
                            let bp = |v: u16| f64::from(v) / f64::from(FULL_BP);
                            let cpu = report.cpu_busy_bp.map(bp);
                            let counts = Counts {
                                at: now,
                                scheduled: input.connections_total,
                                established: input.connections_established,
                                active: input.active,
                                arrival_rate: None,
                            }
                            .since(slot.counted);
                            s.demand = cpu.and_then(|cpu| demand(cfg, &mut s.capacity, cpu, slot.counted, counts, at));
                            slot.counted = Some(counts);
                            s.cpu.feed(cpu, at, cfg.half_life);
                            let rt_ceiling = self.rt_full_us.map_or(f64::INFINITY, |full| MAX_METRIC * full);
                            let rt = report.response_time_us.map(|us| f64::from(us).min(rt_ceiling));
                            let rt = median_of_three(&mut slot.rt_before, rt);
                            s.rt_us.feed(rt, at, cfg.half_life);
                            let pressure = interval_pressure(&report, slot.pressure_total)
                                .or_else(|| report.cpu_pressure_bp.map(bp));
                            slot.pressure_total = report.cpu_pressure_total_us.map(|total| (report.seq, total));
                            s.pressure.feed(pressure, at, cfg.half_life);
                            s.established.feed(Some(f64::from(report.established)), at, cfg.half_life);
                            // The same report alone: what the server reads now, while the averages trail.
                            slot.latest = Smoothed {
                                cpu: Ewma::of(cpu, at),
                                rt_us: Ewma::of(rt, at),
                                pressure: Ewma::of(pressure, at),
                                established: Ewma::of(Some(f64::from(report.established)), at),
                                ..*s
                            };
                            slot.accepted = Some((report.received, report.probe_failures));
                            slot.fresh = true;
                        }
                    }
                }
            }
            out.status_before = out.status;
            out.status = status(cfg, slot.accepted, now);
            let normal = out.status == FeedbackStatus::Normal && input.in_rotation;
            if !normal {
                slot.weight = neutral * f64::from(slot.configured);
                slot.fresh = false;
                slot.quiet_steps = 0;
                slot.rest_load = Ewma::default();
                slot.streak = Streak::default();
                slot.overflow = false;
            }
            slot.normal = normal;
        }

        // 2. Service-wide references: median response time, mean active connections.
        self.scratch.clear();
        for (slot, out) in self.slots.iter().zip(&self.outputs) {
            if let (FeedbackStatus::Normal, Some(rt)) = (out.status, slot.smoothed.rt_us.value) {
                self.scratch.push(rt);
            }
        }
        let rt_full_us = match cfg.response_time_reference {
            RtReference::Fixed { full_load_us } => Some(f64::from(full_load_us)),
            RtReference::ClusterMedian { full_load_multiple, min_full_load_us } => median(&mut self.scratch)
                .map(|m| (m * full_load_multiple).max(f64::from(min_full_load_us)))
                .filter(|m| *m > 0.0),
        };
        self.rt_full_us = rt_full_us;
        let mean_active = if inputs.is_empty() {
            0.0
        } else {
            inputs.iter().map(|i| f64::from(i.active)).sum::<f64>() / inputs.len() as f64
        };
        let df_unit = 256.0 * mean_active.max(f64::from(cfg.df_min_connections));

        // 3. Aggregates, and their mean for the relative mode.
        for (slot, out) in self.slots.iter_mut().zip(self.outputs.iter_mut()) {
            let metrics = (slot.normal && slot.configured > 0).then(|| Metrics::of(cfg, &slot.smoothed, rt_full_us));
            slot.aggregate = metrics.and_then(|m| m.aggregate(&cfg.coefficients));
            out.aggregate_load = slot.aggregate;
            slot.latest_aggregate =
                metrics.and_then(|_| Metrics::of(cfg, &slot.latest, rt_full_us).aggregate(&cfg.coefficients));
            let m = metrics.unwrap_or_default();
            slot.df_metrics = (m.rt.unwrap_or(0.0), m.cpu.unwrap_or(0.0));
        }
        let reference = reference_load(cfg, &self.slots);
        let service = Census::of(&self.slots, &self.outputs);

        // 4. Weight steps.
        for slot in self.slots.iter_mut() {
            slot.weight_before = slot.weight;
            if let (true, Some(aggregate)) = (slot.fresh, slot.aggregate) {
                let relative = |aggregate: f64| match (cfg.mode, reference) {
                    (LoadMode::ClusterRelative { floor }, Some(reference)) => {
                        cfg.target * aggregate / reference.max(floor)
                    }
                    _ => aggregate,
                };
                let mut load = relative(aggregate);
                let latest = slot.latest_aggregate.map_or(load, relative);
                slot.streak.push(latest / cfg.target - 1.0, 2.0 * cfg.hold_band);
                if released(cfg, slot, load) {
                    // What pinned it has ended: its averages describe that, not the server now.
                    slot.smoothed = slot.latest;
                    slot.aggregate = slot.latest_aggregate;
                    load = latest;
                }
                let at = slot.accepted.map_or(now, |(received, _)| received);
                slot.rest_load.feed(Some(load), at, cfg.half_life * REST_SMOOTHING);
                let off = |load: f64| (load / cfg.target - 1.0).abs();
                // A saturated server sent more than it completes, and busier than its share, is not noise to sit
                // out: its backlog grows while the long average catches up, so it moves once its recent load
                // leaves the band itself.
                let shedding = slot.smoothed.demand.is_some_and(|d| d.ratio > 1.0) && load > cfg.target;
                let band = if shedding { cfg.hold_band } else { 3.0 * cfg.hold_band };
                let cut = cut_to_backlog(slot.smoothed.demand, slot.weight);
                let overflow = service.for_server(slot);
                let holds = cut.is_none()
                    && overflow != Overflow::Take
                    && slot.quiet_steps >= STEPS_TO_REST
                    && off(slot.rest_load.value.unwrap_or(load)) <= cfg.hold_band
                    && off(load) <= band
                    && slot.streak.len < REPORTS_TO_RELEASE;
                if !holds {
                    let stepped = step(cfg, slot.weight, slot.configured, load, latest);
                    let stepped = match overflow {
                        Overflow::Take => stepped
                            .max(slot.weight + rate_cap(cfg, slot.weight, f64::from(slot.configured)))
                            .min(ceiling(cfg, slot.configured)),
                        Overflow::Keep => stepped.max(slot.weight),
                        Overflow::None => stepped,
                    };
                    slot.overflow = match overflow {
                        Overflow::Take => true,
                        _ => slot.overflow && stepped >= slot.weight,
                    };
                    let stepped = cut.map_or(stepped, |cut| stepped.min(cut));
                    // A weight held on a bound that its load pushes against is pinned, not on target: it must
                    // follow the load as soon as the load turns, so it never comes to rest there. Nor does one
                    // waiting for its average to agree with the newest report.
                    let quiet =
                        stepped == slot.weight && !pinned(cfg, slot, load, cfg.target) && !disagree(cfg, load, latest);
                    slot.quiet_steps = if quiet { slot.quiet_steps + 1 } else { 0 };
                    if slot.quiet_steps == STEPS_TO_REST {
                        slot.rest_load = Ewma::default();
                        slot.rest_load.feed(Some(cfg.target), at, Duration::ZERO);
                    }
                    slot.weight = stepped;
                }
                slot.fresh = false;
            }
        }
        if let LoadMode::ClusterRelative { .. } = cfg.mode {
            renormalise(cfg, &mut self.slots, neutral);
        }

        // 5. Outputs.
        for (slot, out) in self.slots.iter_mut().zip(self.outputs.iter_mut()) {
            let weight = match out.status {
                FeedbackStatus::Down { .. } => 0,
                _ if slot.configured == 0 => 0,
                FeedbackStatus::Normal if slot.normal => {
                    slot.weight.round().clamp(1.0, ceiling(cfg, slot.configured)) as u32
                }
                // Stale, or normal but out of rotation: the configured share.
                FeedbackStatus::Stale { .. } | FeedbackStatus::Normal => to_units(neutral * f64::from(slot.configured)),
            };
            out.changed = weight != slot.published;
            out.effective_weight = weight;
            out.capacity_per_s = slot.smoothed.capacity.value.filter(|_| out.status == FeedbackStatus::Normal);
            slot.published = weight;
        }

        // 6. df's terms, each in proportion to the server's share of the weight (see the module documentation).
        let (weight_sum, weighted) = self
            .outputs
            .iter()
            .filter(|out| out.effective_weight > 0)
            .fold((0.0, 0usize), |(sum, n), out| (sum + f64::from(out.effective_weight), n + 1));
        let mean_weight = if weighted > 0 { weight_sum / weighted as f64 } else { 1.0 };
        for (slot, out) in self.slots.iter().zip(self.outputs.iter_mut()) {
            let unit = df_unit * f64::from(out.effective_weight) / mean_weight;
            out.response_time_norm = to_units(slot.df_metrics.0 * unit);
            out.cpu_norm = to_units(slot.df_metrics.1 * unit);
        }
        &self.outputs
    }
}

/// Consecutive reports whose load alone lies more than a margin off target, all on the same side.
///
/// A server that lost half its capacity reads 30–40 % over target in every report after (measured in
/// `bench/feedback` at 70 % load), which is inside three hold bands, so the weight at rest waited for the
/// three-half-life average to leave the hold band: 3.5 s before the first step. Single reports scatter 10–15
/// points, so one far-off report says little; [`REPORTS_TO_RELEASE`] in a row, each over twice the hold band
/// on the same side, happen by chance about once in a thousand reports and follow a real change within
/// 1.5 s at the default 500 ms interval.
#[derive(Debug, Clone, Copy, Default)]
struct Streak {
    /// +1 above target, −1 below, 0 for none.
    side: i8,
    len: u32,
}

impl Streak {
    /// Counts a report whose load is `off` (relative: +0.3 for 30 % over target) against `margin`.
    fn push(&mut self, off: f64, margin: f64) {
        let side = if off > margin {
            1
        } else if off < -margin {
            -1
        } else {
            0
        };
        self.len = if side != 0 && side == self.side { self.len.saturating_add(1) } else { u32::from(side != 0) };
        self.side = side;
    }
}

/// The median of the two previous response times and the newest, `x` (the lower of two when only one came
/// before; `x` itself when none did), and `x` pushed into `before`. `None` (no successful probe) leaves
/// `before` as it was.
///
/// A server whose CPU quota is spent answers after up to a CFS period, so one probe landing in a throttled
/// moment lifts a report's response time fifty-fold (25 µs to 1.2 ms for the 5 % server of `bench/feedback` at
/// 70 % load), and the weight followed it down and back up within seconds, breaking the settling window
/// after the halved server had settled. A server that stays slow is slow in two reports in a row and passes
/// one report later; its CPU and pressure, not filtered, still move it at once.
fn median_of_three(before: &mut [Option<f64>; 2], x: Option<f64>) -> Option<f64> {
    let x = x?;
    let median = match *before {
        [Some(a), Some(b)] => a.max(b).min(x).max(a.min(b)),
        [_, Some(b)] => b.min(x),
        [_, None] => x,
    };
    *before = [before[1], Some(x)];
    Some(median)
}

/// A saturated server's demand over the interval since the previous report, `None` below saturation; also
/// feeds the capacity estimate. The CPU metric is the higher of the smoothed CPU share and this.
///
/// The director counts what it sent the server since the previous report (`arrived`) and what the server
/// completed: the connections that got established less the growth of those still active
/// (`Δestablished − Δactive`). A saturated server's backlog grows in both: in its active connections, and once
/// its listen queue is full in the connections whose SYN it dropped, which do not establish until their
/// client's retry a second later (counted as completed, they made a server overloaded past its listen queue
/// read as keeping up). An interval in which the active connections grew by more than got established (the
/// connection sync installing a peer's connections around a takeover) says nothing and is skipped.
/// Completions per CPU share sample the server's capacity (connections per second at full CPU); the demand is
/// the arrivals over that capacity. Below saturation the demand equals the CPU share and would add only noise;
/// at saturation the CPU reads 100 % however much work waits, while the demand reads 150 % for a server sent
/// half again what it can do, so a server that lost capacity under full load (a noisy neighbour, a halved
/// quota) loses weight at once rather than when its backlog shows in its response time. The director's
/// counts are exact, so the demand is not smoothed again: the capacity is, once.
fn demand(
    cfg: &BlenderConfig,
    capacity: &mut Ewma,
    cpu: f64,
    before: Option<Counts>,
    now: Counts,
    at: Instant,
) -> Option<Demand> {
    let before = before?;
    let seconds = now.at.saturating_duration_since(before.at).as_secs_f64();
    if seconds <= 0.0 || now.scheduled < before.scheduled || now.established < before.established {
        return None;
    }
    let arrived = (now.scheduled - before.scheduled) as f64;
    let established = (now.established - before.established) as f64;
    let grown = f64::from(now.active) - f64::from(before.active);
    if grown > established {
        return None;
    }
    let completed = (established - grown).max(0.0);
    if cpu >= CAPACITY_MIN_CPU && completed > 0.0 {
        // At most twice the estimate per sample: active connections can also fall without completing (idle
        // ones expiring), and one such interval would otherwise read as a burst of completions.
        let sample = (completed / seconds / cpu).min(capacity.value.map_or(f64::INFINITY, |c| 2.0 * c));
        capacity.feed(Some(sample), at, cfg.half_life);
    }
    let per_second = capacity.value.filter(|&c| c > 0.0)?;
    let demand = arrived / seconds / per_second;
    // Above 1 only while the backlog grows. A server that completed all it was sent keeps up, whatever the
    // estimate says: the estimate is low when outside work shares the CPU (a busy loop in the server's cgroup
    // reads as the service's CPU), and read as an overload it kept such a server on the floor of 1 while the
    // cluster needed what it could still serve (measured in `bench/feedback` at 90 % load).
    let ratio = if completed >= arrived { demand.min(1.0) } else { demand };
    let draining = completed > arrived * DRAINING;
    // Little's law: a server sent connections at a higher rate holds proportionally more open at once without
    // any queue (`active = rate × lifetime`), which matters for long-lived connections (keep-alive, streams);
    // only the growth beyond that is backlog.
    let rate = now.arrival_rate?;
    let expected = match before.arrival_rate {
        Some(previous) if previous > 0.0 => (f64::from(before.active) * (rate / previous - 1.0)).max(0.0),
        _ => 0.0,
    };
    let backlog = arrived - completed - expected;
    let kept_up = if backlog >= BACKLOG_MIN_GROWTH { (arrived - backlog) / arrived } else { 1.0 };
    (cpu >= SATURATED_CPU).then_some(Demand { ratio, draining, kept_up })
}

/// The director's own counts for one server when a report was accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    /// The update's time.
    at: Instant,
    /// Connections scheduled to the server so far.
    scheduled: u64,
    /// Of those, the ones that got established.
    established: u64,
    /// Connections established and not yet closed.
    active: u32,
    /// Connections scheduled per second over the interval that ended here ([`Counts::since`]); `None` for the
    /// first.
    arrival_rate: Option<f64>,
}

/// A saturated server's demand over the interval since its previous report.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Demand {
    /// Arrivals over capacity; at most 1 when the server completed all it was sent.
    ratio: f64,
    /// The server completed noticeably more than it was sent ([`DRAINING`]): it works off a backlog, so its CPU
    /// reads busy with work its weight no longer brings, and the load its weight brings is the ratio alone.
    draining: bool,
    /// The share of the interval's arrivals the server completed, when its backlog grew by at least
    /// [`BACKLOG_MIN_GROWTH`] connections; otherwise 1.
    kept_up: f64,
}

impl Demand {
    /// The server's backlog grew in the interval (see [`Demand::kept_up`]).
    fn behind(self) -> bool {
        self.kept_up < 1.0
    }
}

/// The share of the time since the previous accepted report (`previous`: its sequence number and PSI total)
/// in which the server's tasks stalled on CPU: `Δ some total / (Δ seq × interval)`, at most 1. `None` without
/// two totals in a row of the same counter (a restarted agent's counter may start lower).
fn interval_pressure(report: &ReportInput, previous: Option<(u64, u64)>) -> Option<f64> {
    let (total, (seq, before)) = (report.cpu_pressure_total_us?, previous?);
    let span_us = report.seq.checked_sub(seq)?.checked_mul(u64::from(report.interval_ms))?.checked_mul(1000)?;
    let stalled_us = total.checked_sub(before)?;
    (span_us > 0).then(|| (stalled_us as f64 / span_us as f64).min(1.0))
}

/// The relative mode's reference: the mean aggregate of the servers with one, leaving out those pinned at a
/// bound their load pushes them past (on the floor of 1 and busier than the mean, or on `scale × configured`
/// and idler). A server busy with work the director does not send it (a backup job, a noisy neighbour) reads
/// busy whatever its weight and ends on the floor; counted in the mean, it would make every other server look
/// idle and climb together to its bound. `None` when no server has an aggregate.
fn reference_load(cfg: &BlenderConfig, slots: &[Slot]) -> Option<f64> {
    let mean = |keep: &dyn Fn(&Slot, f64) -> bool| {
        let (sum, count) = slots
            .iter()
            .filter_map(|slot| slot.aggregate.filter(|&a| keep(slot, a)))
            .fold((0.0, 0usize), |(sum, count), a| (sum + a, count + 1));
        (count > 0).then(|| sum / count as f64)
    };
    let all = mean(&|_, _| true)?;
    Some(mean(&|slot, a| !pinned(cfg, slot, a, all)).unwrap_or(all))
}

/// Relative mode: scales the weights of the servers in normal state so that their feedback factors
/// (`weight / configured`) average the service's `neutral` factor again. Only the weights' ratios decide where
/// connections go, so the scale carries no information; left alone it drifts (every step is relative to the
/// current weight) until the weights sit on their bounds, where the ratios are lost. With equal configured
/// weights of at least `scale`, `neutral` is 1 and the weights keep summing to the configured ones. When no
/// weight stepped the mean is already `neutral` and nothing changes. The rate cap still holds: no weight moves
/// by more than `max_step` in one period, step and scaling together (the rest follows in the next periods),
/// except a weight cut to its backlog ([`cut_to_backlog`]), which the scaling does not lift back to the cap.
fn renormalise(cfg: &BlenderConfig, slots: &mut [Slot], neutral: f64) {
    let feedback = |slot: &&mut Slot| slot.normal && slot.configured > 0;
    let (mut sum, mut count) = (0.0, 0usize);
    for slot in slots.iter_mut().filter(feedback) {
        sum += slot.weight / f64::from(slot.configured);
        count += 1;
    }
    if count == 0 {
        return;
    }
    let scale = neutral * count as f64 / sum;
    if (scale - 1.0).abs() < 1e-9 {
        return;
    }
    for slot in slots.iter_mut().filter(feedback) {
        let configured = f64::from(slot.configured);
        let cap = rate_cap(cfg, slot.weight_before, configured);
        // A weight cut to its backlog this period (below the rate cap) is not lifted back by the scaling.
        let (low, high) = ((slot.weight_before - cap).min(slot.weight), slot.weight_before + cap);
        slot.weight = (slot.weight * scale).clamp(low, high).clamp(1.0, ceiling(cfg, slot.configured));
    }
}

/// The service's neutral feedback factor: where a weight stands with no feedback (a new, stale or
/// never-reported server: `neutral × configured`) and where relative mode holds the mean factor. 1, the
/// configured weight, when that leaves room both ways, i.e. when every configured weight is at least `scale`
/// (down to 1, a factor of 1 / configured, and up to `scale`); otherwise `√(scale / smallest configured)`,
/// the geometric middle of the smallest one's range. With configured weight 1 and `scale` 10, a factor of 1 is
/// the floor itself: no server could lose weight, and holding the mean at 1 would hold every weight at 1. The
/// same factor for every server of the service keeps their configured ratios.
fn neutral_factor(cfg: &BlenderConfig, inputs: &[ServerInput]) -> f64 {
    let smallest = inputs.iter().map(|i| i.configured_weight).filter(|&w| w > 0).min().unwrap_or(u32::MAX);
    (f64::from(cfg.scale) / f64::from(smallest)).sqrt().max(1.0)
}

/// Whether `w` is on the floor of 1, to within the significance (renormalisation may lift a floored weight by a
/// fraction of a percent).
fn on_floor(cfg: &BlenderConfig, w: f64) -> bool {
    w <= 1.0 + cfg.significance
}

/// The highest weight of a server configured at `configured`: `scale × configured`.
fn ceiling(cfg: &BlenderConfig, configured: u32) -> f64 {
    f64::from(configured) * f64::from(cfg.scale)
}

/// Whether `w` is on its ceiling, to within the significance.
fn on_ceiling(cfg: &BlenderConfig, w: f64, configured: u32) -> bool {
    w >= ceiling(cfg, configured) * (1.0 - cfg.significance)
}

/// Whether the slot's weight is held on a bound that `load` pushes past: on the floor with `load` above
/// `reference`, or on the ceiling with it below. Such a weight is pinned, neither at rest nor a fair sample of
/// the service's load.
fn pinned(cfg: &BlenderConfig, slot: &Slot, load: f64, reference: f64) -> bool {
    (on_floor(cfg, slot.weight) && load > reference)
        || (on_ceiling(cfg, slot.weight, slot.configured) && load < reference)
}

/// Whether the slot's weight is pinned on a bound by its smoothed `load` while its newest
/// [`REPORTS_TO_UNPIN`] reports each lie more than twice the hold band on the other side of the target: what
/// pinned it (outside work on its CPU) has ended, and its averages restart from the newest report.
///
/// Measured in `bench/feedback` at 70 % load: after the antagonist stopped, its server read 1–3 % CPU against
/// the others' 40 % from the first report on, but its averages (a CPU of 100 %, probes throttled to 6 ms, the
/// CFS throttling as pressure) took four seconds to fall below the others', and until then the newest reports
/// disagreed with them and the weight waited on the floor; it then climbed on into the settling window of the
/// halving ten seconds later, moving the others with it.
fn released(cfg: &BlenderConfig, slot: &Slot, load: f64) -> bool {
    // Pinned on the floor means a load over target, on the ceiling one under: the reports must lie opposite.
    let other_side = if load > cfg.target { -1 } else { 1 };
    pinned(cfg, slot, load, cfg.target) && slot.streak.side == other_side && slot.streak.len >= REPORTS_TO_UNPIN
}

/// What a server that keeps up does about the others' overflow.
///
/// A server whose CPU is taken by outside work (a noisy neighbour, a backup job: the antagonist of
/// `bench/feedback`) reads saturated and slow whatever it is sent, so the rule pushes it to the floor of 1 and
/// holds it there. That is right while the other servers have room for its share, and wrong once they do not:
/// measured in `bench/feedback` (90 % load, the antagonist burning and the last server's quota halved), `df`
/// held that server at 3–7 % of the connections while the other three fell behind and answered 21–33 % of theirs
/// late, where `wlc` with perfect weights sent it 13 % and the others answered 2–3 % late. Its own requests are
/// slow (they wait for its CPU quota), but by a bounded time, while a backlog elsewhere grows without bound. So
/// a saturated server that completed everything it was sent is raised by the rate cap at every report in which
/// another server fell behind (its backlog grew: [`Demand::kept_up`] below 1), and while every other server
/// stays saturated it keeps what it took; once one of them has room again the rule takes it back down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    /// Another server fell behind: step up by the rate cap, past the hysteresis.
    Take,
    /// It took overflow before and every other server is still saturated: do not step down.
    Keep,
    /// The rule alone.
    None,
}

/// The service's servers in normal state that fell behind and that are saturated, for [`Overflow`].
#[derive(Debug, Clone, Copy)]
struct Census {
    normal: usize,
    behind: usize,
    saturated: usize,
}

impl Census {
    fn of(slots: &[Slot], outputs: &[ServerOutput]) -> Census {
        let mut census = Census { normal: 0, behind: 0, saturated: 0 };
        for (slot, out) in slots.iter().zip(outputs) {
            if out.status != FeedbackStatus::Normal || slot.configured == 0 || slot.aggregate.is_none() {
                continue;
            }
            census.normal += 1;
            census.behind += usize::from(slot.smoothed.demand.is_some_and(|d| d.behind()));
            census.saturated += usize::from(slot.smoothed.demand.is_some());
        }
        census
    }

    /// What `slot` (one of the census's servers, or not in normal state) does about the others' overflow.
    fn for_server(&self, slot: &Slot) -> Overflow {
        let Some(d) = slot.smoothed.demand else { return Overflow::None };
        if d.behind() || d.ratio > 1.0 {
            return Overflow::None;
        }
        // The slot itself is saturated and not behind: the others are the census less it.
        let (others, others_saturated) = (self.normal.saturating_sub(1), self.saturated.saturating_sub(1));
        if self.behind > 0 {
            Overflow::Take
        } else if slot.overflow && others > 0 && others_saturated == others {
            Overflow::Keep
        } else {
            Overflow::None
        }
    }
}

/// The weight a saturated server is cut to at once when it completed less than [`KEPT_UP_AT_LEAST`] of what it
/// was sent in the newest interval: that share of `w` (at most [`MAX_CUT`] off), or `None`. The renormalisation
/// that follows scales it with the others, so its share of the traffic falls by less.
///
/// The averages and the rate cap take two to four seconds to move a weight by half; measured in
/// `bench/feedback` at 90 % load, the server carrying half the traffic when the antagonist started in its
/// cgroup went on taking 6 000 connections a second, half of them slow, for three seconds, and the backlog
/// it built tipped the whole cluster over. What the director sent it and what it completed say at the first
/// report after that it can serve only that share of its traffic, as `wlc` sees its connections pile up.
fn cut_to_backlog(demand: Option<Demand>, w: f64) -> Option<f64> {
    let kept_up = demand?.kept_up;
    (kept_up < KEPT_UP_AT_LEAST).then(|| (w * kept_up.max(1.0 - MAX_CUT)).max(1.0))
}

/// The most a weight `w` may move in one period: `max_step` of the weight or of the configured weight,
/// whichever is larger.
fn rate_cap(cfg: &BlenderConfig, w: f64, configured: f64) -> f64 {
    cfg.max_step * w.max(configured)
}

/// Whether the smoothed `load` and the newest report's `latest` lie on opposite sides of the target.
fn disagree(cfg: &BlenderConfig, load: f64, latest: f64) -> bool {
    (cfg.target - load) * (cfg.target - latest) < 0.0
}

/// The new feedback weight from the current one, the (smoothed) load the rule compares with the target and the
/// newest report's load alone.
///
/// The weight moves only when the newest report agrees that it should: the averages trail the weight by about
/// a half-life, so after a server has shed enough they still read the load of its weight a second before, and
/// stepping on them alone shed on past the goal and climbed back once they caught up (measured in
/// `bench/feedback` at 90 % load: the halved server went 16 → 6 in four seconds and back to 9 in three more,
/// where 8 or 9 was right). A server whose load does not follow its weight (outside work) reads the same in
/// both and is not slowed.
fn step(cfg: &BlenderConfig, w: f64, configured: u32, load: f64, latest: f64) -> f64 {
    if disagree(cfg, load, latest) {
        return w;
    }
    let max = ceiling(cfg, configured);
    let configured = f64::from(configured);
    let error = cfg.target - load;
    // The LVS rule, with the gain in units of the configured weight or of the current one, whichever is larger:
    // a weight that climbed to twice its configured value while the others' servers were busy must be able to
    // shed it as fast, in proportion, as a weight at its configured value.
    let raw = cfg.gain * configured.max(w) * error.cbrt();
    // Never more than `damping` of the way to the weight that would put a load-proportional server on target.
    let no_overshoot = if load > 1e-9 { cfg.damping * (w * cfg.target / load - w).abs() } else { f64::INFINITY };
    let limit = no_overshoot.min(rate_cap(cfg, w, configured));
    let candidate = (w + raw.clamp(-limit, limit)).clamp(1.0, max);
    // Reaching a bound is always significant, or the last small step to it would never be taken.
    let at_bound = candidate != w && (candidate == 1.0 || candidate == max);
    if at_bound || (candidate - w).abs() > cfg.significance * w {
        candidate
    } else {
        w
    }
}

fn to_units(x: f64) -> u32 {
    x.round().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// The median of `values` (reordered in place), `None` when empty.
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mid = values.len() / 2;
    let (_, m, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    Some(*m)
}

/// Refuses impossible report values.
fn check(report: &ReportInput, now: Instant) -> Result<(), RejectReason> {
    if report.cpu_busy_bp.is_some_and(|bp| bp > FULL_BP) {
        return Err(RejectReason::CpuOverFullScale);
    }
    if report.cpu_pressure_bp.is_some_and(|bp| bp > FULL_BP) {
        return Err(RejectReason::PressureOverFullScale);
    }
    if report.response_time_us.is_some_and(|us| u128::from(us) > MAX_PLAUSIBLE_TIME.as_micros()) {
        return Err(RejectReason::ResponseTimeAbsurd);
    }
    if report.interval_ms == 0 || u128::from(report.interval_ms) > MAX_PLAUSIBLE_TIME.as_millis() {
        return Err(RejectReason::IntervalAbsurd);
    }
    if report.received > now {
        return Err(RejectReason::ReceivedInFuture);
    }
    Ok(())
}

fn status(cfg: &BlenderConfig, accepted: Option<(Instant, u32)>, now: Instant) -> FeedbackStatus {
    let Some((received, failures)) = accepted else {
        return FeedbackStatus::Stale { reason: StaleReason::NeverReported };
    };
    let age = now.saturating_duration_since(received);
    if age > cfg.down_after {
        FeedbackStatus::Down { reason: DownReason::ReportTooOld { age } }
    } else if cfg.down_probe_failures > 0 && failures >= cfg.down_probe_failures {
        FeedbackStatus::Down { reason: DownReason::ProbeFailures { consecutive: failures } }
    } else if age > cfg.stale_after {
        FeedbackStatus::Stale { reason: StaleReason::ReportOld { age } }
    } else {
        FeedbackStatus::Normal
    }
}

/// Normalised metrics of one server (1.0 = fully loaded, capped at [`MAX_METRIC`]); `None` = not available.
#[derive(Debug, Clone, Copy, Default)]
struct Metrics {
    cpu: Option<f64>,
    rt: Option<f64>,
    pressure: Option<f64>,
    connections: Option<f64>,
}

impl Metrics {
    fn of(cfg: &BlenderConfig, s: &Smoothed, rt_full_us: Option<f64>) -> Metrics {
        let cap = |x: f64| x.clamp(0.0, MAX_METRIC);
        Metrics {
            cpu: s.cpu.value.map(|cpu| {
                cap(match s.demand {
                    Some(Demand { ratio, draining: true, .. }) => ratio,
                    Some(Demand { ratio, draining: false, .. }) => cpu.max(ratio),
                    None => cpu,
                })
            }),
            rt: s.rt_us.value.zip(rt_full_us).map(|(rt, full)| cap(rt / full)),
            pressure: s.pressure.value.map(cap),
            connections: (cfg.coefficients.connections > 0.0)
                .then_some(s.established.value)
                .flatten()
                .map(|n| cap(n / f64::from(cfg.connections_full))),
        }
    }

    /// `Σ Rᵢ·Mᵢ / Σ Rᵢ` over the available metrics with a positive coefficient.
    fn aggregate(&self, r: &Coefficients) -> Option<f64> {
        let terms = [
            (r.cpu, self.cpu),
            (r.response_time, self.rt),
            (r.pressure, self.pressure),
            (r.connections, self.connections),
        ];
        let (mut weighted, mut total) = (0.0, 0.0);
        for (coefficient, metric) in terms {
            if let (true, Some(m)) = (coefficient > 0.0, metric) {
                weighted += coefficient * m;
                total += coefficient;
            }
        }
        (total > 0.0).then(|| weighted / total)
    }
}

/// Stores each output's effective weight into the matching data-plane atomic (e.g.
/// `ServerState::effective_weight`), in order.
pub fn store_weights<'a>(outputs: &[ServerOutput], weights: impl IntoIterator<Item = &'a AtomicU32>) {
    for (out, weight) in outputs.iter().zip(weights) {
        weight.store(out.effective_weight, Ordering::Relaxed);
    }
}
