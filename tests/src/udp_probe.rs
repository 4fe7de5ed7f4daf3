//! A UDP probe for failover tests: from a client namespace, one numbered datagram every `interval` to a
//! service (a `udp_echo` behind the VIP), and a record of which answers came back and when. The report
//! gives what was lost, what came back twice (two directors forwarding the same datagram) and the longest
//! gap between consecutive answers (the outage).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::{in_netns, wait_until};

/// A running probe.
pub struct UdpProbe {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    answers: Arc<Mutex<Vec<(u64, Instant)>>>,
    sender: Option<JoinHandle<Result<()>>>,
    receiver: Option<JoinHandle<()>>,
    socket: Arc<UdpSocket>,
}

/// What a probe saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub sent: u64,
    /// The first datagram answered (those before it went out while the client was still resolving the VIP).
    pub first_answered: u64,
    /// Distinct datagrams answered.
    pub answered: u64,
    /// Answers received more than once.
    pub duplicates: u64,
    /// Longest time between two consecutive answers, and the arrival of the answer that opened it (so a
    /// caller can tell whether the gap is the failover it caused or a stall elsewhere).
    pub longest_gap: Duration,
    pub gap_start: Option<Instant>,
}

impl ProbeReport {
    /// Datagrams from the first answered one on that were never answered.
    pub fn lost(&self) -> u64 {
        (self.sent - self.first_answered).saturating_sub(self.answered)
    }
}

impl UdpProbe {
    /// Starts probing `target` from namespace `netns`, one datagram every `interval`.
    pub fn start(netns: &str, target: SocketAddr, interval: Duration) -> Result<UdpProbe> {
        let socket = in_netns(netns, move || {
            let socket = UdpSocket::bind("0.0.0.0:0").context("binding the probe socket")?;
            socket.connect(target).with_context(|| format!("connecting the probe socket to {target}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(socket)
        })?;
        let socket = Arc::new(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let receiver = {
            let (socket, answers, stop) = (Arc::clone(&socket), Arc::clone(&answers), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buffer = [0u8; 64];
                // Keep reading after `stop` until the socket is quiet, so late answers count.
                let mut quiet = 0;
                while quiet < 10 {
                    match socket.recv(&mut buffer) {
                        Ok(8) => {
                            quiet = 0;
                            let seq = u64::from_be_bytes(buffer[..8].try_into().unwrap_or([0; 8]));
                            answers.lock().unwrap_or_else(|e| e.into_inner()).push((seq, Instant::now()));
                        }
                        Ok(_) => {}
                        Err(_) if stop.load(Ordering::Relaxed) => quiet += 1,
                        Err(_) => {}
                    }
                }
            })
        };
        let sender = {
            let (socket, stop, sent) = (Arc::clone(&socket), Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || -> Result<()> {
                let start = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Paced by the clock (not by sleeps alone): the n-th datagram leaves at start + n·interval.
                    let due = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    // A send error (no ARP answer yet: EHOSTUNREACH) still counts as sent and lost.
                    let _ = socket.send(&seq.to_be_bytes());
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        Ok(UdpProbe { stop, sent, answers, sender: Some(sender), receiver: Some(receiver), socket })
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Distinct answers so far.
    pub fn answered(&self) -> u64 {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let mut seqs: Vec<u64> = answers.iter().map(|(s, _)| *s).collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs.len() as u64
    }

    /// Waits until `n` more answers than now have arrived (the service answers).
    pub fn wait_answers(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = self.answered() + n;
        wait_until("probe answers", timeout, Duration::from_millis(10), || Ok(self.answered() >= target))
    }

    /// Stops sending, waits for the last answers and reports.
    pub fn stop(mut self) -> Result<ProbeReport> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            sender.join().map_err(|_| anyhow!("the probe sender panicked"))??;
        }
        if let Some(receiver) = self.receiver.take() {
            receiver.join().map_err(|_| anyhow!("the probe receiver panicked"))?;
        }
        let _ = &self.socket;
        let sent = self.sent.load(Ordering::Relaxed);
        let answers = std::mem::take(&mut *self.answers.lock().unwrap_or_else(|e| e.into_inner()));
        let mut seqs: Vec<u64> = answers.iter().map(|(s, _)| *s).filter(|s| *s < sent).collect();
        let total = seqs.len() as u64;
        seqs.sort_unstable();
        seqs.dedup();
        let answered = seqs.len() as u64;
        let first_answered = seqs.first().copied().unwrap_or(sent);
        let (mut longest_gap, mut gap_start) = (Duration::ZERO, None);
        for pair in answers.windows(2) {
            let gap = pair[1].1.duration_since(pair[0].1);
            if gap > longest_gap {
                longest_gap = gap;
                gap_start = Some(pair[0].1);
            }
        }
        Ok(ProbeReport { sent, first_answered, answered, duplicates: total - answered, longest_gap, gap_start })
    }
}

impl Drop for UdpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
