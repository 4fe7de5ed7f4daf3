//! The demo's real servers and its client: a minimal HTTP/1.1 responder whose capacity is a service time and
//! a concurrency limit, and a paced load generator that records every answer and the gaps between them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head the demo server reads; the demo's clients send about 60 bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// What one demo real server can do: `concurrency` requests at a time, each taking `service_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub service_time: Duration,
    pub concurrency: u32,
}

impl Capacity {
    /// Requests per second it serves when saturated.
    pub fn requests_per_second(&self) -> f64 {
        f64::from(self.concurrency) / self.service_time.as_secs_f64().max(1e-6)
    }
}

/// Serves `GET` on `listener` until the process ends, answering `served by NAME` after the service time.
/// Requests beyond the concurrency limit wait for a slot, so an overloaded server answers late, as a real
/// one does: its agent's probe (which queues like any client) reports the growing response time.
pub async fn serve(listener: TcpListener, name: String, capacity: Capacity) -> Result<()> {
    let slots = Arc::new(Semaphore::new(capacity.concurrency.max(1) as usize));
    let body: Arc<str> = format!("served by {name}\n").into();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors or a connection reset before accept: the next one may work.
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                continue;
            }
        };
        let (slots, body) = (Arc::clone(&slots), Arc::clone(&body));
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &slots, &body, capacity.service_time).await {
                tracing::debug!(error = %e, "demo client");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, slots: &Semaphore, body: &str, service_time: Duration) -> Result<()> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n").await?;
            return Ok(());
        }
    }
    let _slot = slots.acquire().await?;
    // The work this server does for a request: time, not CPU, so that the demo does not load the machine.
    tokio::time::sleep(service_time).await;
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// The longest time without a successful request, the client's measure of an outage. Pure: driven by the
/// instants of successes.
#[derive(Debug, Clone, Default)]
pub struct GapMeter {
    last_success: Option<Instant>,
    longest: Duration,
}

impl GapMeter {
    pub fn success(&mut self, now: Instant) {
        if let Some(last) = self.last_success {
            self.longest = self.longest.max(now.saturating_duration_since(last));
        }
        self.last_success = Some(now.max(self.last_success.unwrap_or(now)));
    }

    /// Forgets the longest gap so far; the gap in progress still counts from the last success.
    pub fn restart(&mut self) {
        self.longest = Duration::ZERO;
    }

    /// The longest gap since the start (or the last [`GapMeter::restart`]), the one in progress included.
    pub fn longest(&self, now: Instant) -> Duration {
        self.longest.max(self.current(now))
    }

    /// Time since the last success (zero before the first).
    pub fn current(&self, now: Instant) -> Duration {
        self.last_success.map_or(Duration::ZERO, |last| now.saturating_duration_since(last))
    }
}

/// What the load generator saw.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    pub succeeded: u64,
    pub failed: u64,
    /// Successful requests by the server that answered (`served by NAME`).
    pub served_by: BTreeMap<String, u64>,
    pub gaps: GapMeter,
    /// Set by [`LoadStats::mark`] (the failover): from then on, the first success of a request *sent* after it.
    pub mark: Option<Instant>,
    pub first_success_after_mark: Option<Instant>,
    /// The outage the mark caused: the longest gap between successes from the mark until that first success.
    pub outage_after_mark: Option<Duration>,
}

impl LoadStats {
    /// Marks an event (the kill of the active director): restarts the gap meter and watches for the first
    /// request sent after it that succeeds. Answers to requests already under way do not count: in direct
    /// routing they come straight from the real server, whatever happened to the director.
    pub fn mark(&mut self, now: Instant) {
        self.gaps.restart();
        self.mark = Some(now);
        self.first_success_after_mark = None;
        self.outage_after_mark = None;
    }

    fn success(&mut self, sent: Instant, now: Instant) {
        self.succeeded += 1;
        self.gaps.success(now);
        if self.mark.is_some_and(|mark| sent >= mark) && self.first_success_after_mark.is_none() {
            self.first_success_after_mark = Some(now);
            self.outage_after_mark = Some(self.gaps.longest(now));
        }
    }
}

/// Load on one address: `clients` connections at a time, each opening a new TCP connection per request (so
/// every request is scheduled by the director) at `rate / clients` per second, until `stop` is set.
#[derive(Debug, Clone)]
pub struct Load {
    pub target: SocketAddr,
    pub clients: u32,
    pub rate: u32,
    pub stats: Arc<Mutex<LoadStats>>,
    pub stop: Arc<AtomicBool>,
}

/// How long a request may take before it counts as failed; short, so that an outage is seen as one.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

impl Load {
    pub fn stats(&self) -> LoadStats {
        self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn record(&self, sent: Instant, outcome: Result<String>) {
        let mut stats = self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            Ok(server) => {
                *stats.served_by.entry(server).or_default() += 1;
                stats.success(sent, Instant::now());
            }
            Err(e) => {
                stats.failed += 1;
                tracing::debug!(error = %e, "demo request");
            }
        }
    }

    /// Runs the clients until `stop`; call from a thread inside the client's namespace.
    pub fn run(&self) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let period = Duration::from_secs_f64(f64::from(self.clients.max(1)) / f64::from(self.rate.max(1)));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..self.clients.max(1) {
                let load = self.clone();
                tasks.spawn(async move {
                    // Spread the clients' first requests over one period.
                    let offset = period * i / load.clients.max(1);
                    let mut next = tokio::time::Instant::now() + offset;
                    while !load.stop.load(Ordering::Relaxed) {
                        tokio::time::sleep_until(next).await;
                        next += period;
                        let sent = Instant::now();
                        let outcome = request(load.target).await;
                        load.record(sent, outcome);
                        // Behind schedule (a slow answer or a timeout): start again from now, no burst.
                        next = next.max(tokio::time::Instant::now());
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
        Ok(())
    }
}

/// One `GET /` on a new connection; the name of the server that answered.
async fn request(target: SocketAddr) -> Result<String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .context("connect timed out")?
        .context("connect")?;
    let exchange = async {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").await?;
        let mut response = Vec::with_capacity(256);
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.context("no answer in time")??;
    let text = String::from_utf8_lossy(&response);
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "unexpected answer {:?}", text.lines().next());
    let server = text.rsplit("served by ").next().map(str::trim).filter(|s| !s.is_empty() && !s.contains('\n'));
    server.map(str::to_string).with_context(|| format!("no server name in {text:?}"))
}

/// Runs `f` on a new thread inside network namespace `netns` (only that thread moves there).
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let path = std::path::Path::new("/run/netns").join(netns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let thread = std::thread::Builder::new().name("demo-load".into()).spawn(move || {
        // SAFETY: setns on a namespace descriptor we own; it moves only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        if rc != 0 {
            anyhow::bail!("entering {}: {}", path.display(), std::io::Error::last_os_error());
        }
        f()
    })?;
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_meter_keeps_the_longest_gap_and_counts_the_one_in_progress() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut gaps = GapMeter::default();
        assert_eq!(gaps.longest(ms(500)), Duration::ZERO, "no gap before the first success");
        gaps.success(ms(0));
        gaps.success(ms(10));
        gaps.success(ms(40));
        assert_eq!(gaps.longest(ms(45)), Duration::from_millis(30));
        assert_eq!(gaps.longest(ms(100)), Duration::from_millis(60), "the gap in progress counts");
        gaps.restart();
        assert_eq!(gaps.longest(ms(50)), Duration::from_millis(10), "restart keeps the gap in progress");
        gaps.success(ms(300));
        gaps.success(ms(310));
        assert_eq!(gaps.longest(ms(310)), Duration::from_millis(260));
        gaps.success(ms(305));
        assert_eq!(gaps.current(ms(320)), Duration::from_millis(10), "a late report does not move time back");
    }

    #[test]
    fn after_a_mark_only_requests_sent_later_show_the_service_back() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut stats = LoadStats::default();
        stats.success(ms(0), ms(5));
        stats.mark(ms(10));
        stats.success(ms(8), ms(30));
        assert_eq!(stats.first_success_after_mark, None, "sent before the mark");
        stats.success(ms(200), ms(210));
        stats.success(ms(220), ms(230));
        assert_eq!(stats.first_success_after_mark, Some(ms(210)));
        assert_eq!(stats.outage_after_mark, Some(Duration::from_millis(180)));
        stats.success(ms(500), ms(700));
        assert_eq!(stats.gaps.longest(ms(700)), Duration::from_millis(470), "a later gap");
        assert_eq!(stats.outage_after_mark, Some(Duration::from_millis(180)), "is not the failover's");
        assert_eq!(stats.succeeded, 5);
    }

    #[test]
    fn capacity_in_requests_per_second() {
        let capacity = Capacity { service_time: Duration::from_millis(20), concurrency: 2 };
        assert!((capacity.requests_per_second() - 100.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn the_server_answers_with_its_name_and_the_client_reads_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let capacity = Capacity { service_time: Duration::from_millis(1), concurrency: 1 };
        let server = tokio::spawn(serve(listener, "rs9".into(), capacity));
        assert_eq!(request(addr).await.unwrap(), "rs9");
        // Two at once through one slot: both are answered, one after the other.
        let (a, b) = tokio::join!(request(addr), request(addr));
        assert_eq!((a.unwrap(), b.unwrap()), ("rs9".to_string(), "rs9".to_string()));
        server.abort();
    }
}
