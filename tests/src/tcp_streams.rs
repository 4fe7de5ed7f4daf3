//! Long-lived TCP connections for failover tests: from a client namespace, `count` connections to an echo
//! service (`tcp_echo` behind the VIP), each sending a numbered 16-byte message every `interval` and
//! checking that exactly those bytes come back, in order. The report says whether any connection was reset
//! or closed, whether any byte was lost or changed, and the longest time a connection waited for its echo
//! (the outage as TCP saw it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::{in_netns, wait_until};

const MESSAGE: usize = 16;
/// Threads driving the connections (each drives `count / THREADS`).
const THREADS: usize = 4;
/// A connection whose echo takes longer than this has failed.
const ECHO_TIMEOUT: Duration = Duration::from_secs(20);

/// What happened to the connections.
#[derive(Debug, Clone, Default)]
pub struct StreamsReport {
    pub connections: usize,
    pub bytes_sent: u64,
    pub bytes_echoed: u64,
    /// Every failure: a reset, an early close, a timeout, or echoed bytes that differ from those sent.
    pub errors: Vec<String>,
    /// Longest wait for one echo, over all connections.
    pub longest_stall: Duration,
}

/// The running connections.
pub struct TcpStreams {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    threads: Vec<JoinHandle<StreamsReport>>,
}

fn message(connection: u32, seq: u32) -> [u8; MESSAGE] {
    let mut m = [0u8; MESSAGE];
    m[..4].copy_from_slice(&connection.to_be_bytes());
    m[4..8].copy_from_slice(&seq.to_be_bytes());
    m[8..].copy_from_slice(
        &(u64::from(connection) << 32 | u64::from(seq)).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes(),
    );
    m
}

fn drive(
    mut streams: Vec<(u32, TcpStream)>,
    interval: Duration,
    stop: &AtomicBool,
    rounds: &AtomicU64,
) -> StreamsReport {
    let mut report = StreamsReport { connections: streams.len(), ..StreamsReport::default() };
    let start = Instant::now();
    let mut seq = 0u32;
    while !stop.load(Ordering::Relaxed) && !streams.is_empty() {
        let due = start + interval * seq;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // Send to every connection first, then collect every echo: the connections wait in parallel.
        let sent_at = Instant::now();
        streams.retain_mut(|(id, stream)| match stream.write_all(&message(*id, seq)) {
            Ok(()) => {
                report.bytes_sent += MESSAGE as u64;
                true
            }
            Err(e) => {
                report.errors.push(format!("connection {id}: sending message {seq}: {e}"));
                false
            }
        });
        streams.retain_mut(|(id, stream)| {
            let mut echo = [0u8; MESSAGE];
            match stream.read_exact(&mut echo) {
                Ok(()) if echo == message(*id, seq) => {
                    report.bytes_echoed += MESSAGE as u64;
                    report.longest_stall = report.longest_stall.max(sent_at.elapsed());
                    true
                }
                Ok(()) => {
                    report.errors.push(format!("connection {id}: message {seq} came back changed: {echo:02x?}"));
                    false
                }
                Err(e) => {
                    report.errors.push(format!("connection {id}: waiting for echo {seq}: {e}"));
                    false
                }
            }
        });
        seq += 1;
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    report
}

impl TcpStreams {
    /// Opens `count` connections to `target` from namespace `netns` (all of them before any data flows)
    /// and starts exchanging a message on each every `interval`.
    pub fn start(netns: &str, target: SocketAddr, count: usize, interval: Duration) -> Result<TcpStreams> {
        let streams = in_netns(netns, move || {
            (0..count)
                .map(|i| {
                    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                        .with_context(|| format!("opening connection {i} to {target}"))?;
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
                    stream.set_write_timeout(Some(ECHO_TIMEOUT))?;
                    Ok((i as u32, stream))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let mut groups: Vec<Vec<(u32, TcpStream)>> = (0..THREADS).map(|_| Vec::new()).collect();
        for (i, stream) in streams.into_iter().enumerate() {
            groups[i % THREADS].push(stream);
        }
        let threads = groups
            .into_iter()
            .map(|group| {
                let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
                std::thread::spawn(move || drive(group, interval, &stop, &rounds))
            })
            .collect();
        Ok(TcpStreams { stop, rounds, threads })
    }

    /// Rounds completed so far, summed over the driving threads.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits until every driving thread has done `n` more rounds than now (every connection answered).
    pub fn wait_rounds(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = self.rounds() + n * THREADS as u64;
        wait_until("echo rounds on every connection", timeout, Duration::from_millis(10), || {
            if self.threads.iter().any(|t| t.is_finished()) {
                bail!("a group of connections stopped early (a connection failed)");
            }
            Ok(self.rounds() >= target)
        })
    }

    /// Stops after the current round and reports.
    pub fn stop(mut self) -> Result<StreamsReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = StreamsReport::default();
        for thread in self.threads.drain(..) {
            let report = thread.join().map_err(|_| anyhow!("a connection thread panicked"))?;
            total.connections += report.connections;
            total.bytes_sent += report.bytes_sent;
            total.bytes_echoed += report.bytes_echoed;
            total.errors.extend(report.errors);
            total.longest_stall = total.longest_stall.max(report.longest_stall);
        }
        Ok(total)
    }
}

impl Drop for TcpStreams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
