//! An open-loop, fixed-rate HTTP/1.1 load generator.
//!
//! Request `i` has the intended send time `t0 + i / rate`, whatever happened to the requests before it, and its
//! latency is measured from that intended time to the last byte of the response. A server (or a balancer in
//! front of it) that stalls therefore shows up as latency of every request scheduled during the stall, not as
//! a missing sample: the "coordinated omission" of closed-loop tools (send, wait, send the next) is not hidden.
//!
//! Two connection modes:
//! - [`ConnectionMode::NewConnection`]: every request opens its own TCP connection and says `Connection:
//!   close`; the latency includes the handshake. At most [`LoadSpec::max_in_flight`] requests are open at a
//!   time; a request that waits for a slot is still timed from its intended send time.
//! - [`ConnectionMode::KeepAlive`]: a pool of persistent connections, opened before `t0` (not measured). Due
//!   requests wait in one queue; a free connection takes the oldest. A connection that breaks is reopened for
//!   its next request.
//!
//! Everything is bounded: request `i` is abandoned (counted as a timeout) at `intended + timeout`, so the whole
//! run ends by `t0 + duration + timeout`.
//!
//! ```no_run
//! use std::time::Duration;
//! use fulcrum_tests::loadgen::{ConnectionMode, LoadSpec};
//!
//! # fn main() -> anyhow::Result<()> {
//! let spec = LoadSpec::new("10.0.0.100:80".parse()?, 2000.0, Duration::from_secs(10), ConnectionMode::NewConnection);
//! let report = fulcrum_tests::loadgen::run(&spec)?;
//! println!("p50 {:?} p99 {:?} errors {}", report.latency.p50, report.latency.p99, report.errors());
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at, Instant};

/// Largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body read (the body is discarded, but a runaway response must not run forever).
const MAX_BODY: u64 = 1 << 30;

/// How requests get connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionMode {
    /// A new TCP connection per request, with `Connection: close`.
    NewConnection,
    /// A pool of this many keep-alive connections.
    KeepAlive { connections: usize },
}

/// What to send, where, how fast and for how long.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// The `Host` header; defaults to the target's IP.
    pub host: String,
    /// The request path, e.g. `/`.
    pub path: String,
    /// Requests per second (> 0).
    pub rate: f64,
    /// How long requests are scheduled for: `floor(rate * duration)` requests in all.
    pub duration: Duration,
    pub mode: ConnectionMode,
    /// Each request is abandoned (a timeout) this long after its intended send time.
    pub timeout: Duration,
    /// Most requests open at once in [`ConnectionMode::NewConnection`] (each holds a socket).
    pub max_in_flight: usize,
    /// With a threshold, [`LoadReport::per_second`] counts, per second of intended send time, the requests and
    /// those slower than this or failed: when in a run the tail happened.
    pub slow_after: Option<Duration>,
    /// [`LoadReport::per_backend_latency`] (and, with [`LoadSpec::slow_after`],
    /// [`LoadReport::per_backend_second`]) split the good responses by the value of their [`BACKEND_HEADER`],
    /// one entry per name here: which real server the tail came from.
    pub backends: Vec<String>,
}

/// The response header naming the real server that answered (the testbed's nginx sets it: see
/// [`crate::nginx`]).
pub const BACKEND_HEADER: &str = "X-Backend";

impl LoadSpec {
    /// `GET /` with `Host: <target ip>`, a 2 s timeout and at most 4096 requests in flight.
    pub fn new(target: SocketAddr, rate: f64, duration: Duration, mode: ConnectionMode) -> LoadSpec {
        LoadSpec {
            target,
            host: target.ip().to_string(),
            path: "/".to_string(),
            rate,
            duration,
            mode,
            timeout: Duration::from_secs(2),
            max_in_flight: 4096,
            slow_after: None,
            backends: Vec::new(),
        }
    }

    /// The number of requests the run schedules.
    pub fn request_count(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).floor() as u64
    }

    /// Offset of request `i`'s intended send time from `t0`.
    pub fn intended_offset(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// The second of the run request `i` is intended in.
    fn second_of(&self, i: u64) -> usize {
        self.intended_offset(i).as_secs() as usize
    }

    fn validate(&self) -> Result<()> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("rate must be a positive number of requests per second, not {}", self.rate);
        }
        if self.request_count() == 0 {
            bail!("rate {} for {:?} schedules no request", self.rate, self.duration);
        }
        if self.timeout.is_zero() {
            bail!("timeout must be positive");
        }
        if !self.path.starts_with('/') || self.path.contains(['\r', '\n', ' ']) {
            bail!("path {:?} must start with '/' and hold no spaces or line breaks", self.path);
        }
        if self.host.is_empty() || self.host.contains(['\r', '\n']) {
            bail!("bad Host header {:?}", self.host);
        }
        match self.mode {
            ConnectionMode::KeepAlive { connections: 0 } => bail!("a keep-alive pool needs at least one connection"),
            ConnectionMode::NewConnection if self.max_in_flight == 0 => bail!("max_in_flight must be at least 1"),
            _ => Ok(()),
        }
    }

    fn request(&self) -> Vec<u8> {
        let close = match self.mode {
            ConnectionMode::NewConnection => "Connection: close\r\n",
            ConnectionMode::KeepAlive { .. } => "",
        };
        format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fulcrum-loadgen\r\n{close}\r\n", self.path, self.host)
            .into_bytes()
    }
}

/// A latency histogram: microsecond resolution, 3 significant digits, from 1 µs to one hour (longer values are
/// recorded as one hour).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

const HIST_MAX_US: u64 = 3_600_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> LatencyHistogram {
        LatencyHistogram { hist: Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds") }
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, HIST_MAX_US);
        self.hist.saturating_record(us);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The value at quantile `q` (0 ..= 1): the smallest recorded value (within the histogram's precision) that
    /// at least `q` of all values are less than or equal to. Zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.hist.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.hist.value_at_quantile(q.clamp(0.0, 1.0)))
    }

    /// How many recorded values are above `threshold` (beyond the histogram bucket that holds it, so a
    /// threshold taken from [`LatencyHistogram::quantile`] counts only the values past that quantile).
    pub fn count_above(&self, threshold: Duration) -> u64 {
        let us = u64::try_from(threshold.as_micros()).unwrap_or(u64::MAX).clamp(1, HIST_MAX_US);
        let above = self.hist.highest_equivalent(us).saturating_add(1);
        if above > HIST_MAX_US {
            return 0;
        }
        self.hist.count_between(above, HIST_MAX_US)
    }

    pub fn max(&self) -> Duration {
        if self.hist.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_micros(self.hist.max())
        }
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.hist.add(&other.hist).expect("histograms of the same bounds always merge");
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: self.max(),
        }
    }
}

/// Percentiles of the successful requests' latencies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

/// Counts of requests that did not get a good response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// The TCP connection could not be opened (refused, unreachable, reset during the handshake).
    pub connect: u64,
    /// The connection broke, or the response was not HTTP/1.x as expected.
    pub io: u64,
    /// A status outside 200-399.
    pub status: u64,
    /// No complete response within the timeout of the intended send time (including requests that never got
    /// a connection or a slot in time).
    pub timeout: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.connect + self.io + self.status + self.timeout
    }

    fn add(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.io += other.io;
        self.status += other.status;
        self.timeout += other.timeout;
    }
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Requests scheduled (`floor(rate * duration)`).
    pub scheduled: u64,
    /// Requests answered with a 2xx/3xx status in time.
    pub ok: u64,
    pub error_counts: ErrorCounts,
    /// Latency from intended send time to the end of the response, successful requests only.
    pub latency: LatencySummary,
    /// The full histogram behind [`LoadReport::latency`].
    pub histogram: LatencyHistogram,
    /// From `t0` (the first intended send time) to the last outcome.
    pub elapsed: Duration,
    /// Successful responses per second of the scheduled duration.
    pub achieved_rate: f64,
    /// With [`LoadSpec::slow_after`]: per second of intended send time, from the first.
    pub per_second: Vec<SecondCounts>,
    /// With [`LoadSpec::slow_after`]: for each of [`LoadSpec::backends`], per second of intended send time, the
    /// good responses it sent and those among them slower than the threshold. Failures name no backend: they
    /// count in [`LoadReport::per_second`] only, as do responses from a backend not in the list.
    pub per_backend_second: Vec<Vec<SecondCounts>>,
    /// For each of [`LoadSpec::backends`], the latencies of the good responses it sent.
    pub per_backend_latency: Vec<LatencyHistogram>,
}

/// One second of a run (by intended send time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondCounts {
    pub requests: u64,
    /// Slower than [`LoadSpec::slow_after`], or failed.
    pub slow: u64,
}

impl std::ops::AddAssign for SecondCounts {
    fn add_assign(&mut self, other: SecondCounts) {
        self.requests += other.requests;
        self.slow += other.slow;
    }
}

impl LoadReport {
    pub fn errors(&self) -> u64 {
        self.error_counts.total()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Connect,
    Io,
    Status,
    Timeout,
}

/// A good response: how long after its intended send time it was complete, and which of
/// [`LoadSpec::backends`] sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Answer {
    latency: Duration,
    backend: Option<usize>,
}

#[derive(Default)]
struct Tally {
    hist: LatencyHistogram,
    ok: u64,
    errors: ErrorCounts,
    slow_after: Option<Duration>,
    per_second: Vec<SecondCounts>,
    per_backend_second: Vec<Vec<SecondCounts>>,
    per_backend_hist: Vec<LatencyHistogram>,
}

/// Adds `counts` to second `second` of `seconds`, growing it as needed.
fn add_to_second(seconds: &mut Vec<SecondCounts>, second: usize, counts: SecondCounts) {
    if seconds.len() <= second {
        seconds.resize(second + 1, SecondCounts::default());
    }
    seconds[second] += counts;
}

impl Tally {
    fn new(spec: &LoadSpec) -> Tally {
        Tally {
            slow_after: spec.slow_after,
            per_backend_second: vec![Vec::new(); spec.backends.len()],
            per_backend_hist: vec![LatencyHistogram::new(); spec.backends.len()],
            ..Tally::default()
        }
    }

    /// The outcome of a request intended in `second` of the run.
    fn record(&mut self, second: usize, outcome: Result<Answer, Failure>) {
        if let Some(limit) = self.slow_after {
            let slow = outcome.map_or(true, |answer| answer.latency > limit);
            let counts = SecondCounts { requests: 1, slow: u64::from(slow) };
            add_to_second(&mut self.per_second, second, counts);
            let backend = outcome.ok().and_then(|answer| answer.backend);
            if let Some(seconds) = backend.and_then(|b| self.per_backend_second.get_mut(b)) {
                add_to_second(seconds, second, counts);
            }
        }
        match outcome {
            Ok(Answer { latency, backend }) => {
                self.ok += 1;
                self.hist.record(latency);
                if let Some(hist) = backend.and_then(|b| self.per_backend_hist.get_mut(b)) {
                    hist.record(latency);
                }
            }
            Err(Failure::Connect) => self.errors.connect += 1,
            Err(Failure::Io) => self.errors.io += 1,
            Err(Failure::Status) => self.errors.status += 1,
            Err(Failure::Timeout) => self.errors.timeout += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.hist.merge(&other.hist);
        self.ok += other.ok;
        self.errors.add(&other.errors);
        for (k, &counts) in other.per_second.iter().enumerate() {
            add_to_second(&mut self.per_second, k, counts);
        }
        for (mine, theirs) in self.per_backend_second.iter_mut().zip(&other.per_backend_second) {
            for (k, &counts) in theirs.iter().enumerate() {
                add_to_second(mine, k, counts);
            }
        }
        for (mine, theirs) in self.per_backend_hist.iter_mut().zip(&other.per_backend_hist) {
            mine.merge(theirs);
        }
    }
}

/// Runs `spec` on a new single-threaded tokio runtime on the calling thread (so sockets are made in the
/// calling thread's network namespace: see [`crate::in_netns`]).
pub fn run(spec: &LoadSpec) -> Result<LoadReport> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("building a tokio runtime")?;
    runtime.block_on(run_async(spec))
}

/// Runs `spec` on the current tokio runtime.
pub async fn run_async(spec: &LoadSpec) -> Result<LoadReport> {
    spec.validate()?;
    let spec = Arc::new(spec.clone());
    let request: Arc<[u8]> = spec.request().into();
    let (tally, t0) = match spec.mode {
        ConnectionMode::NewConnection => run_new_connections(&spec, request).await,
        ConnectionMode::KeepAlive { connections } => run_keep_alive(&spec, request, connections).await,
    };
    let elapsed = t0.elapsed();
    let scheduled = spec.request_count();
    let accounted = tally.ok + tally.errors.total();
    debug_assert_eq!(accounted, scheduled, "every scheduled request has exactly one outcome");
    Ok(LoadReport {
        scheduled,
        ok: tally.ok,
        error_counts: tally.errors,
        latency: tally.hist.summary(),
        achieved_rate: tally.ok as f64 / spec.duration.as_secs_f64(),
        histogram: tally.hist,
        elapsed,
        per_second: tally.per_second,
        per_backend_second: tally.per_backend_second,
        per_backend_latency: tally.per_backend_hist,
    })
}

async fn run_new_connections(spec: &Arc<LoadSpec>, request: Arc<[u8]>) -> (Tally, Instant) {
    let n = spec.request_count();
    let slots = Arc::new(Semaphore::new(spec.max_in_flight));
    let mut tally = Tally::new(spec);
    let mut tasks = JoinSet::new();
    let t0 = Instant::now() + Duration::from_millis(5);
    // A task that panicked lost its second: it counts in the last one.
    let joined = |done: Result<(usize, Result<Answer, Failure>), _>| {
        done.unwrap_or((spec.second_of(n.saturating_sub(1)), Err(Failure::Io)))
    };
    for i in 0..n {
        let intended = t0 + spec.intended_offset(i);
        let deadline = intended + spec.timeout;
        let second = spec.second_of(i);
        sleep_until(intended).await;
        while let Some(done) = tasks.try_join_next() {
            let (second, outcome) = joined(done);
            tally.record(second, outcome);
        }
        // Waiting for a slot delays the send, not the clock: the latency still counts from `intended`.
        let permit = match timeout_at(deadline, Arc::clone(&slots).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                tally.record(second, Err(Failure::Timeout));
                continue;
            }
        };
        let spec = Arc::clone(spec);
        let request = Arc::clone(&request);
        tasks.spawn(async move {
            let outcome = match timeout_at(deadline, one_shot(&spec, &request)).await {
                Ok(Ok(backend)) => Ok(Answer { latency: Instant::now().saturating_duration_since(intended), backend }),
                Ok(Err(failure)) => Err(failure),
                Err(_) => Err(Failure::Timeout),
            };
            drop(permit);
            (second, outcome)
        });
    }
    // Every task ends by its own deadline (at most t0 + duration + timeout); the outer bound is a safety net.
    let hard_deadline = t0 + spec.duration + spec.timeout + Duration::from_secs(1);
    loop {
        match timeout_at(hard_deadline, tasks.join_next()).await {
            Ok(Some(done)) => {
                let (second, outcome) = joined(done);
                tally.record(second, outcome);
            }
            Ok(None) => break,
            Err(_) => {
                let left = tasks.len() as u64;
                tasks.abort_all();
                tally.errors.timeout += left;
                break;
            }
        }
    }
    (tally, t0)
}

/// One request on a new connection: which of [`LoadSpec::backends`] answered it, if one did.
async fn one_shot(spec: &LoadSpec, request: &[u8]) -> Result<Option<usize>, Failure> {
    let mut stream = TcpStream::connect(spec.target).await.map_err(|_| Failure::Connect)?;
    let _ = stream.set_nodelay(true);
    stream.write_all(request).await.map_err(|_| Failure::Io)?;
    let mut buf = Vec::with_capacity(1024);
    let (response, backend) = read_response(&mut stream, &mut buf, &spec.backends).await.map_err(|_| Failure::Io)?;
    if !(200..400).contains(&response.status) {
        return Err(Failure::Status);
    }
    Ok(backend)
}

async fn run_keep_alive(spec: &Arc<LoadSpec>, request: Arc<[u8]>, connections: usize) -> (Tally, Instant) {
    // Open the pool before the clock starts: connection setup is not what keep-alive latency measures.
    let setup_deadline = Instant::now() + spec.timeout;
    let mut pool = Vec::with_capacity(connections);
    for _ in 0..connections {
        let conn = match timeout_at(setup_deadline, TcpStream::connect(spec.target)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Some(stream)
            }
            _ => None,
        };
        pool.push(conn);
    }
    let n = spec.request_count();
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, usize)>();
    let queue = Arc::new(Mutex::new(rx));
    let mut workers = JoinSet::new();
    for conn in pool {
        let queue = Arc::clone(&queue);
        let spec = Arc::clone(spec);
        let request = Arc::clone(&request);
        workers.spawn(keep_alive_worker(spec, request, queue, conn));
    }
    let t0 = Instant::now() + Duration::from_millis(5);
    for i in 0..n {
        let intended = t0 + spec.intended_offset(i);
        sleep_until(intended).await;
        if tx.send((intended, spec.second_of(i))).is_err() {
            break; // every worker is gone; the requests left are counted below
        }
    }
    drop(tx);
    let mut tally = Tally::new(spec);
    let hard_deadline = t0 + spec.duration + spec.timeout + Duration::from_secs(1);
    loop {
        match timeout_at(hard_deadline, workers.join_next()).await {
            Ok(Some(Ok(worker_tally))) => tally.merge(&worker_tally),
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                workers.abort_all();
                break;
            }
        }
    }
    // Requests no worker took (workers aborted or panicked) are timeouts.
    let accounted = tally.ok + tally.errors.total();
    tally.errors.timeout += n.saturating_sub(accounted);
    (tally, t0)
}

async fn keep_alive_worker(
    spec: Arc<LoadSpec>,
    request: Arc<[u8]>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<(Instant, usize)>>>,
    mut conn: Option<TcpStream>,
) -> Tally {
    let mut tally = Tally::new(&spec);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let next = { queue.lock().await.recv().await };
        let Some((intended, second)) = next else { break };
        let deadline = intended + spec.timeout;
        if Instant::now() >= deadline {
            tally.record(second, Err(Failure::Timeout));
            continue;
        }
        let outcome = match timeout_at(deadline, keep_alive_request(&spec, &request, &mut conn, &mut buf)).await {
            Ok(Ok(backend)) => Ok(Answer { latency: Instant::now().saturating_duration_since(intended), backend }),
            Ok(Err(failure)) => {
                conn = None;
                Err(failure)
            }
            Err(_) => {
                conn = None; // a late response would be mistaken for the next request's
                Err(Failure::Timeout)
            }
        };
        tally.record(second, outcome);
    }
    tally
}

async fn keep_alive_request(
    spec: &LoadSpec,
    request: &[u8],
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, Failure> {
    if conn.is_none() {
        let stream = TcpStream::connect(spec.target).await.map_err(|_| Failure::Connect)?;
        let _ = stream.set_nodelay(true);
        buf.clear();
        *conn = Some(stream);
    }
    let stream = conn.as_mut().ok_or(Failure::Io)?;
    stream.write_all(request).await.map_err(|_| Failure::Io)?;
    let (response, backend) = read_response(stream, buf, &spec.backends).await.map_err(|_| Failure::Io)?;
    if response.close {
        *conn = None;
        buf.clear();
    }
    if !(200..400).contains(&response.status) {
        return Err(Failure::Status);
    }
    Ok(backend)
}

/// How the body of a response is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLength {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head, the blank line included.
    pub head_len: usize,
    pub body: BodyLength,
    /// The connection cannot carry another request (`Connection: close`, HTTP/1.0 without keep-alive, or a
    /// body delimited by the close).
    pub close: bool,
    /// Where the value of the [`BACKEND_HEADER`] lies in the parsed bytes (start, end), if the head has one.
    pub backend: Option<(usize, usize)>,
}

/// Parses an HTTP/1.x response head from the start of `buf`: `Ok(None)` while the blank line that ends it has
/// not arrived yet.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => bail!("not an HTTP/1.x status line: {status_line:?}"),
    };
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .with_context(|| format!("bad status in {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    let mut close = http10;
    let mut backend = None;
    for line in lines {
        let (name, value) = line.split_once(':').with_context(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case(BACKEND_HEADER) {
            // `value` is a slice of `head`, itself the start of `buf`.
            let start = value.as_ptr() as usize - head.as_ptr() as usize;
            backend = Some((start, start + value.len()));
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<u64>().with_context(|| format!("bad Content-Length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.split(',').any(|v| v.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyLength::Empty
    } else if chunked {
        BodyLength::Chunked
    } else if let Some(n) = length {
        BodyLength::Length(n)
    } else {
        close = true;
        BodyLength::UntilClose
    };
    Ok(Some(ResponseHead { status, head_len: end + 4, body, close, backend }))
}

/// Which of `backends` the head parsed from `buf` names in its [`BACKEND_HEADER`], if any.
pub fn backend_of(head: &ResponseHead, buf: &[u8], backends: &[String]) -> Option<usize> {
    let value = head.backend.and_then(|(start, end)| buf.get(start..end))?;
    backends.iter().position(|b| b.as_bytes() == value)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `stream`, and which of `backends` sent it ([`backend_of`]). `buf` holds bytes
/// already read past the previous response (keep-alive) and keeps whatever follows this one.
async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    backends: &[String],
) -> Result<(ResponseHead, Option<usize>)> {
    let head = loop {
        if let Some(head) = parse_response_head(buf)? {
            break head;
        }
        fill(stream, buf).await?;
    };
    let backend = backend_of(&head, buf, backends);
    buf.drain(..head.head_len);
    match head.body {
        BodyLength::Empty => {}
        BodyLength::Length(n) => {
            if n > MAX_BODY {
                bail!("body of {n} bytes is over the {MAX_BODY}-byte limit");
            }
            skip(stream, buf, n).await?;
        }
        BodyLength::Chunked => loop {
            let line = read_line(stream, buf).await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16).with_context(|| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailer fields, then the empty line.
                while !read_line(stream, buf).await?.is_empty() {}
                break;
            }
            if size > MAX_BODY {
                bail!("chunk of {size} bytes is over the {MAX_BODY}-byte limit");
            }
            skip(stream, buf, size).await?;
            if !read_line(stream, buf).await?.is_empty() {
                bail!("chunk not followed by CRLF");
            }
        },
        BodyLength::UntilClose => {
            let mut read = buf.len() as u64;
            buf.clear();
            while fill_or_eof(stream, buf).await? {
                read += buf.len() as u64;
                buf.clear();
                if read > MAX_BODY {
                    bail!("body over the {MAX_BODY}-byte limit");
                }
            }
        }
    }
    Ok((head, backend))
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Result<()> {
    if !fill_or_eof(stream, buf).await? {
        bail!("connection closed mid-response");
    }
    Ok(())
}

/// Appends what the next read returns; false at end of stream.
async fn fill_or_eof<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.context("reading the response")?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

async fn skip<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>, mut n: u64) -> Result<()> {
    loop {
        let have = (buf.len() as u64).min(n);
        buf.drain(..have as usize);
        n -= have;
        if n == 0 {
            return Ok(());
        }
        fill(stream, buf).await?;
    }
}

async fn read_line<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Result<String> {
    loop {
        if let Some(end) = find(buf, b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 2);
            return Ok(line);
        }
        if buf.len() > MAX_HEAD {
            bail!("line longer than {MAX_HEAD} bytes");
        }
        fill(stream, buf).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::net::TcpListener;

    #[test]
    fn histogram_percentiles_of_a_uniform_distribution() {
        let mut h = LatencyHistogram::new();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 1000);
        let close = |got: Duration, want_ms: u64| {
            let want = Duration::from_millis(want_ms).as_secs_f64();
            let err = (got.as_secs_f64() - want).abs() / want;
            assert!(err <= 0.001, "got {got:?}, want {want_ms} ms within 0.1 %");
        };
        let s = h.summary();
        close(s.p50, 500);
        close(s.p90, 900);
        close(s.p99, 990);
        close(s.p999, 999);
        close(s.max, 1000);
        close(h.quantile(0.0), 1);
        close(h.quantile(1.0), 1000);
    }

    #[test]
    fn histogram_quantile_is_the_smallest_value_covering_q() {
        let mut h = LatencyHistogram::new();
        for _ in 0..99 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(50));
        // 99 % of the values are 100 µs: p99 is 100 µs, anything above it the outlier.
        assert_eq!(h.quantile(0.99), Duration::from_micros(100));
        let p999 = h.quantile(0.999).as_micros();
        assert!((49_950..=50_050).contains(&p999), "{p999}");
        assert_eq!(h.count_above(h.quantile(0.99)), 1, "only the outlier is past p99");
        assert_eq!(h.count_above(Duration::from_micros(99)), 100);
        assert_eq!(h.count_above(h.max()), 0);
        assert_eq!(h.count_above(Duration::from_secs(10_000)), 0, "past the histogram's range");
    }

    #[test]
    fn histogram_edges_and_merge() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.summary(), LatencySummary::default());
        h.record(Duration::ZERO); // clamps to 1 µs
        h.record(Duration::from_secs(10_000)); // clamps to one hour
        assert_eq!(h.quantile(0.0), Duration::from_micros(1));
        assert!(h.max() >= Duration::from_secs(3599) && h.max() <= Duration::from_secs(3601), "{:?}", h.max());
        let mut other = LatencyHistogram::new();
        other.record(Duration::from_millis(2));
        h.merge(&other);
        assert_eq!(h.count(), 3);
        let p50 = h.quantile(0.5).as_micros();
        assert!((1998..=2002).contains(&p50), "{p50}");
    }

    #[test]
    fn schedule_is_open_loop() {
        let spec = LoadSpec::new(
            "127.0.0.1:1".parse().unwrap(),
            2000.0,
            Duration::from_millis(1500),
            ConnectionMode::NewConnection,
        );
        assert_eq!(spec.request_count(), 3000);
        assert_eq!(spec.intended_offset(0), Duration::ZERO);
        assert_eq!(spec.intended_offset(1), Duration::from_micros(500));
        assert_eq!(spec.intended_offset(2999), Duration::from_micros(1_499_500));
        let mut bad = spec.clone();
        bad.rate = 0.0;
        assert!(bad.validate().is_err());
        bad.rate = 0.5;
        bad.duration = Duration::from_secs(1);
        assert!(bad.validate().is_err(), "0.5 req/s for 1 s schedules nothing");
        let mut bad = spec.clone();
        bad.mode = ConnectionMode::KeepAlive { connections: 0 };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn parses_response_heads() {
        let head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap().unwrap();
        let want = ResponseHead { status: 200, head_len: 38, body: BodyLength::Length(5), close: false, backend: None };
        assert_eq!(head, want);
        let head =
            parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!(head.map(|h| (h.body, h.close)), Some((BodyLength::Chunked, true)));
        let head = parse_response_head(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n").unwrap().unwrap();
        assert_eq!((head.status, head.close), (404, true));
        let head = parse_response_head(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.body, BodyLength::Empty);
        let head = parse_response_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n").unwrap().unwrap();
        assert_eq!((head.body, head.close), (BodyLength::UntilClose, true));
        assert_eq!(parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        assert!(parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response_head(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
    }

    #[test]
    fn names_the_backend_from_its_header() {
        let backends = ["rs1".to_string(), "rs2".to_string()];
        // A head that does not parse names no backend either.
        let named =
            |buf: &[u8]| parse_response_head(buf).ok().flatten().and_then(|head| backend_of(&head, buf, &backends));
        assert_eq!(named(b"HTTP/1.1 200 OK\r\nServer: x\r\nx-backend:  rs2 \r\n\r\n"), Some(1));
        assert_eq!(named(b"HTTP/1.1 200 OK\r\nX-Backend: rs3\r\n\r\n"), None, "not listed");
        assert_eq!(named(b"HTTP/1.1 200 OK\r\nX-Backends: rs1\r\n\r\n"), None, "another header");
        assert_eq!(named(b"X-Backend: rs1\r\n\r\n"), None, "the status line is not a header");
        assert_eq!(named(b"HTTP/1.1 200 OK\r\nX-Backend: \xff\r\n\r\n"), None);
    }

    #[tokio::test]
    async fn reads_chunked_and_keeps_what_follows() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nHTTP/1.1";
        let mut reader = &wire[..];
        let mut buf = Vec::new();
        let (head, backend) = read_response(&mut reader, &mut buf, &[]).await.unwrap();
        assert_eq!((head.status, backend), (200, None));
        assert_eq!(buf, b"HTTP/1.1");
    }

    /// A minimal HTTP/1.1 server on 127.0.0.1: answers every request with `200 ok` from backend `rs2` after
    /// `delay`, keeps connections alive unless asked to close. Serves connections one at a time when `serial`.
    async fn serve(delay: Duration, serial: bool) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&served);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let conn = handle(stream, delay, Arc::clone(&counter));
                if serial {
                    conn.await;
                } else {
                    tokio::spawn(conn);
                }
            }
        });
        (addr, served)
    }

    async fn handle(mut stream: TcpStream, delay: Duration, served: Arc<AtomicU64>) {
        let mut buf = Vec::new();
        loop {
            let end = loop {
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    break end;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let close = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase().contains("connection: close");
            buf.drain(..end + 4);
            tokio::time::sleep(delay).await;
            let reply: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Backend: rs2\r\nConnection: close\r\n\r\nok\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Backend: rs2\r\n\r\nok\n"
            };
            if stream.write_all(reply).await.is_err() {
                return;
            }
            served.fetch_add(1, Ordering::Relaxed);
            if close {
                return;
            }
        }
    }

    #[tokio::test]
    async fn new_connections_at_a_fixed_rate_against_a_real_server() {
        let (addr, served) = serve(Duration::ZERO, false).await;
        let mut spec = LoadSpec::new(addr, 200.0, Duration::from_secs(2), ConnectionMode::NewConnection);
        spec.slow_after = Some(Duration::from_secs(1));
        spec.backends = vec!["rs1".to_string(), "rs2".to_string()];
        let report = run_async(&spec).await.unwrap();
        assert_eq!(report.scheduled, 400);
        let fast = SecondCounts { requests: 200, slow: 0 };
        assert_eq!(report.per_second, [fast, fast], "per second of intended send time");
        assert_eq!(report.per_backend_second, [vec![], vec![fast, fast]], "every answer came from rs2");
        let answered: Vec<u64> = report.per_backend_latency.iter().map(LatencyHistogram::count).collect();
        assert_eq!(answered, [0, 400], "every latency recorded under rs2");
        assert_eq!((report.ok, report.errors()), (400, 0), "{report:?}");
        assert_eq!(served.load(Ordering::Relaxed), 400);
        assert!((180.0..=220.0).contains(&report.achieved_rate), "{report:?}");
        assert!(report.latency.p50 < Duration::from_millis(50), "{report:?}");
        assert!(report.elapsed < Duration::from_secs(4), "{report:?}");
    }

    #[tokio::test]
    async fn keep_alive_pool_reuses_connections() {
        let (addr, served) = serve(Duration::ZERO, false).await;
        let mut spec = LoadSpec::new(addr, 500.0, Duration::from_secs(1), ConnectionMode::KeepAlive { connections: 4 });
        spec.slow_after = Some(Duration::from_secs(1));
        spec.backends = vec!["rs2".to_string()];
        let report = run_async(&spec).await.unwrap();
        assert_eq!((report.ok, report.errors()), (500, 0), "{report:?}");
        assert_eq!(report.per_second, [SecondCounts { requests: 500, slow: 0 }]);
        assert_eq!(report.per_backend_second, [[SecondCounts { requests: 500, slow: 0 }]], "merged over the pool");
        assert_eq!(report.per_backend_latency[0].count(), 500, "merged over the pool");
        assert_eq!(served.load(Ordering::Relaxed), 500);
        assert_eq!(report.histogram.count(), 500);
    }

    /// One connection served at a time, 20 ms per request, requests every 10 ms: the queue grows by one request
    /// every 20 ms. Latency from the intended send time grows with it (request i waits about 10 ms × i); a
    /// closed-loop tool would report 20 ms throughout.
    #[tokio::test]
    async fn queueing_behind_a_slow_server_is_not_hidden() {
        let (addr, _) = serve(Duration::from_millis(20), true).await;
        let mut spec =
            LoadSpec::new(addr, 100.0, Duration::from_millis(500), ConnectionMode::KeepAlive { connections: 1 });
        spec.timeout = Duration::from_secs(5);
        let report = run_async(&spec).await.unwrap();
        assert_eq!((report.ok, report.errors()), (50, 0), "{report:?}");
        assert!(report.latency.p99 >= Duration::from_millis(400), "queueing must show in p99: {report:?}");
        assert!(report.latency.p50 >= Duration::from_millis(200), "{report:?}");
    }

    #[tokio::test]
    async fn silent_server_times_out_within_the_bound() {
        // Accepts connections and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let mut spec = LoadSpec::new(addr, 100.0, Duration::from_millis(300), ConnectionMode::NewConnection);
        spec.timeout = Duration::from_millis(200);
        spec.slow_after = Some(Duration::from_secs(1));
        let start = std::time::Instant::now();
        let report = run_async(&spec).await.unwrap();
        assert_eq!((report.ok, report.error_counts.timeout), (0, 30), "{report:?}");
        assert_eq!(report.per_second, [SecondCounts { requests: 30, slow: 30 }], "a failed request is slow");
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn refused_connections_are_counted() {
        // Bind and drop: nothing listens on the port any more.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let spec = LoadSpec::new(addr, 100.0, Duration::from_millis(200), ConnectionMode::NewConnection);
        let report = run_async(&spec).await.unwrap();
        assert_eq!((report.ok, report.error_counts.connect), (0, 20), "{report:?}");
    }
}
