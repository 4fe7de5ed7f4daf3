//! Who answers ARP for an address, over time: from a client namespace, a broadcast ARP request every
//! `interval` (an AF_PACKET socket), and every reply recorded with the MAC that sent it. Each request
//! opens a round; a round in which two different MACs answered means two hosts claimed the address at
//! once (two directors serving one VIP).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::in_netns;

const ETH_P_ARP: u16 = 0x0806;

/// A running watch.
pub struct ArpWatch {
    stop: Arc<AtomicBool>,
    rounds: Arc<Mutex<Vec<Round>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// One request and the MACs that answered it (before the next request went out).
#[derive(Debug, Clone)]
pub struct Round {
    pub at: Instant,
    pub macs: Vec<[u8; 6]>,
}

impl ArpWatch {
    /// Asks "who has `target`" from `netns`'s `iface` (address `ours`) every `interval`.
    pub fn start(netns: &str, iface: &str, ours: Ipv4Addr, target: Ipv4Addr, interval: Duration) -> Result<ArpWatch> {
        let iface = iface.to_string();
        let (fd, ifindex, mac) = in_netns(netns, move || {
            // SAFETY: plain socket(2); the fd is owned at once.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(ETH_P_ARP.to_be())) };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd is fresh and ours.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(iface.clone())?;
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {iface}");
            }
            let mac_text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))?;
            let mut mac = [0u8; 6];
            for (byte, part) in mac.iter_mut().zip(mac_text.trim().split(':')) {
                *byte = u8::from_str_radix(part, 16)?;
            }
            Ok((fd, ifindex, mac))
        })?;
        let tv = libc::timeval { tv_sec: 0, tv_usec: 2_000 };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
            std::thread::spawn(move || -> Result<()> {
                let mut request = [0u8; 28];
                request[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                request[8..14].copy_from_slice(&mac);
                request[14..18].copy_from_slice(&ours.octets());
                request[24..28].copy_from_slice(&target.octets());
                // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
                let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                to.sll_family = libc::AF_PACKET as u16;
                to.sll_protocol = ETH_P_ARP.to_be();
                to.sll_ifindex = ifindex as i32;
                to.sll_halen = 6;
                to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
                let mut buffer = [0u8; 128];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        // SAFETY: buffer and address are valid for the lengths given.
                        let sent = unsafe {
                            libc::sendto(
                                fd.as_raw_fd(),
                                request.as_ptr().cast(),
                                request.len(),
                                0,
                                (&to as *const libc::sockaddr_ll).cast(),
                                std::mem::size_of::<libc::sockaddr_ll>() as u32,
                            )
                        };
                        if sent < 0 {
                            return Err(anyhow!("sending an ARP request: {}", std::io::Error::last_os_error()));
                        }
                        rounds.lock().unwrap_or_else(|e| e.into_inner()).push(Round { at: next, macs: Vec::new() });
                        next += interval;
                    }
                    // SAFETY: the buffer is valid for its length.
                    let n = unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
                    if n < 28 {
                        continue;
                    }
                    // A reply (operation 2) from the target address, to us.
                    if buffer[6..8] == [0, 2] && buffer[14..18] == target.octets() && buffer[24..28] == ours.octets() {
                        let sender: [u8; 6] = buffer[8..14].try_into().unwrap_or([0; 6]);
                        let mut rounds = rounds.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(round) = rounds.last_mut() {
                            if !round.macs.contains(&sender) {
                                round.macs.push(sender);
                            }
                        }
                    }
                }
                Ok(())
            })
        };
        Ok(ArpWatch { stop, rounds, thread: Some(thread) })
    }

    /// Rounds so far.
    pub fn rounds(&self) -> Vec<Round> {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops and returns every round.
    pub fn stop(mut self) -> Result<Vec<Round>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().map_err(|_| anyhow!("the ARP watch panicked"))??;
        }
        Ok(self.rounds())
    }
}

impl Drop for ArpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The longest stretch of consecutive rounds answered by two or more MACs (from the first such round's
/// request to the next single-answer round's request), and how many such rounds there were.
pub fn longest_dual(rounds: &[Round]) -> (Duration, usize) {
    let (mut longest, mut count, mut since) = (Duration::ZERO, 0, None::<Instant>);
    for round in rounds {
        if round.macs.len() >= 2 {
            count += 1;
            since.get_or_insert(round.at);
        } else if let Some(start) = since.take() {
            longest = longest.max(round.at.duration_since(start));
        }
    }
    if let (Some(start), Some(last)) = (since, rounds.last()) {
        longest = longest.max(last.at.duration_since(start));
    }
    (longest, count)
}

/// Formats a MAC as `aa:bb:…`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
