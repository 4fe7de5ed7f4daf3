//! The AF_PACKET shell: a TPACKET_V2 receive ring with `PACKET_VNET_HDR`, joined to a fanout group, and
//! batched `sendmmsg` transmission straight out of the ring.
//!
//! Why these choices:
//! - **TPACKET_V2, not V3.** V3 hands a block to userspace only when it is full or its retire timer fires,
//!   which adds up to that timer's period of latency to a lightly loaded flow. V2 hands over every frame at
//!   once; its fixed slots are sized for the largest GSO super-frame (64 KB plus headers).
//! - **`PACKET_VNET_HDR`.** veth (and NICs with GRO) deliver TCP super-frames and frames whose checksum is
//!   only partial. The virtio-net header in front of each frame carries that GSO and checksum state; passing
//!   it back on transmit lets the kernel (or the next device) segment and checksum, so the data plane
//!   forwards at memory speed and stays correct with every offload on.
//! - **Zero-copy transmit.** The ring slot holds `[virtio_net_hdr][frame]` contiguously, so a forwarded
//!   frame is rewritten in place and sent with an iovec pointing into the ring; slots are returned to the
//!   kernel only after the batch is sent.
//! - **`PACKET_IGNORE_OUTGOING`** (as a fanout flag): the director's own transmissions are not received back.
//!
//! Everything here is the thin I/O layer; what to do with a frame is decided by pure code elsewhere.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// `struct virtio_net_hdr` (without the `num_buffers` field).
pub const VNET_HDR_LEN: usize = 10;

const PACKET_RX_RING: libc::c_int = 5;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_FANOUT: libc::c_int = 18;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_FANOUT_DATA: libc::c_int = 22;
const TPACKET_V2: libc::c_int = 1;
const PACKET_FANOUT_CBPF: u32 = 6;
const PACKET_FANOUT_FLAG_IGNORE_OUTGOING: u32 = 0x4000;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_LOSING: u32 = 1 << 2;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;

/// `struct tpacket2_hdr` is 32 bytes; frames start at an aligned offset after it.
const TPACKET2_HDR_LEN: usize = 32;

/// Ring geometry. One slot holds one frame of any size up to `frame_size` minus headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per slot: room for the largest GSO super-frame (65 535-byte IP packet, Ethernet header,
    /// virtio-net header and the ring's own header), rounded to whole pages.
    pub frame_size: u32,
    pub frame_count: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig { frame_size: 72 * 1024, frame_count: 256 }
    }
}

/// How the ring's frames are grouped into the blocks the kernel allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    block_size: usize,
    block_count: usize,
    frames_per_block: usize,
    frame_count: usize,
}

/// The largest block considered: 4 MiB, the kernel's largest page allocation (it falls back to vmalloc).
const MAX_BLOCK: usize = 4 << 20;

impl Geometry {
    /// The kernel allocates each block as a power-of-two run of pages: one 72 KiB frame per block would take
    /// 128 KiB. Several frames per block fill a power of two almost exactly (7 × 72 KiB in 512 KiB), so the
    /// ring takes little more memory than its frames. `frame_count` is rounded up to whole blocks.
    fn new(frame_size: usize, frame_count: usize) -> Geometry {
        let waste = |frames: usize| {
            let used = frames * frame_size;
            (used.next_power_of_two() - used) as f64 / used.next_power_of_two() as f64
        };
        let most = (MAX_BLOCK / frame_size.max(1)).clamp(1, frame_count.max(1));
        let frames_per_block = (1..=most)
            .find(|&k| waste(k) <= 1.0 / 16.0)
            .unwrap_or_else(|| (1..=most).min_by(|&a, &b| waste(a).total_cmp(&waste(b))).unwrap_or(1));
        let block_count = frame_count.div_ceil(frames_per_block);
        Geometry {
            block_size: (frames_per_block * frame_size).next_power_of_two(),
            block_count,
            frames_per_block,
            frame_count: block_count * frames_per_block,
        }
    }

    fn offset(&self, frame_size: usize, index: usize) -> usize {
        (index / self.frames_per_block) * self.block_size + (index % self.frames_per_block) * frame_size
    }
}

/// A classic-BPF fanout program choosing the worker for each packet.
#[derive(Debug, Clone)]
pub struct FanoutProgram(pub Vec<libc::sock_filter>);

/// Kernel counters of one socket, accumulated (the kernel resets them on every read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    pub packets: u64,
    pub drops: u64,
}

/// Facts about a received frame that are not in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxMeta {
    /// The kernel stripped an 802.1Q tag into metadata; the frame bytes no longer carry it.
    pub vlan_stripped: bool,
    /// The kernel dropped packets because the ring was full just before this one.
    pub losing: bool,
    /// The frame was truncated to fit the slot (snaplen < len).
    pub truncated: bool,
}

/// One receive ring, bound to an interface and (optionally) to a fanout group.
pub struct PacketRing {
    fd: OwnedFd,
    ring: NonNull<u8>,
    ring_len: usize,
    config: RingConfig,
    geometry: Geometry,
    /// The next slot to look at.
    head: usize,
    stats: RingStats,
    ifindex: i32,
}

// The ring memory belongs to this socket alone; moving it to a worker thread is fine.
unsafe impl Send for PacketRing {}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T, what: &str) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc, what)
}

/// The interface index of `name`.
pub fn ifindex(name: &str) -> io::Result<i32> {
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: c is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("interface {name}: {err}")));
    }
    Ok(index as i32)
}

impl PacketRing {
    /// Opens a ring on `interface`. With `fanout`, joins group `group` so that the kernel spreads packets over
    /// the group's sockets by the program's verdict.
    pub fn open(interface: &str, config: RingConfig, fanout: Option<(u16, &FanoutProgram)>) -> io::Result<PacketRing> {
        let ifindex = ifindex(interface)?;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol)) };
        check(raw, "AF_PACKET socket (needs CAP_NET_RAW)")?;
        // SAFETY: raw is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt(&fd, libc::SOL_PACKET, PACKET_VERSION, &TPACKET_V2, "PACKET_VERSION TPACKET_V2")?;
        setsockopt(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, &1i32, "PACKET_VNET_HDR")?;
        setsockopt(&fd, libc::SOL_PACKET, PACKET_QDISC_BYPASS, &1i32, "PACKET_QDISC_BYPASS")?;
        let page = 4096u32;
        if config.frame_size % page != 0 || config.frame_count == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "ring frame size must be whole pages"));
        }
        let geometry = Geometry::new(config.frame_size as usize, config.frame_count as usize);
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "ring too large");
        let req = libc::tpacket_req {
            tp_block_size: u32::try_from(geometry.block_size).map_err(|_| too_big())?,
            tp_block_nr: u32::try_from(geometry.block_count).map_err(|_| too_big())?,
            tp_frame_size: config.frame_size,
            tp_frame_nr: u32::try_from(geometry.frame_count).map_err(|_| too_big())?,
        };
        setsockopt(&fd, libc::SOL_PACKET, PACKET_RX_RING, &req, "PACKET_RX_RING")?;
        let ring_len = geometry.block_size * geometry.block_count;
        // SAFETY: mapping the ring the kernel just allocated for this socket.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        let ring = if ring == libc::MAP_FAILED {
            // MAP_LOCKED can fail under RLIMIT_MEMLOCK; the ring works unlocked too.
            // SAFETY: as above, without MAP_LOCKED.
            let ring = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ring_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if ring == libc::MAP_FAILED {
                return Err(io::Error::other(format!("mmap of the ring: {}", io::Error::last_os_error())));
            }
            ring
        } else {
            ring
        };
        let ring = NonNull::new(ring.cast::<u8>()).ok_or_else(|| io::Error::other("null ring"))?;
        let this = PacketRing { fd, ring, ring_len, config, geometry, head: 0, stats: RingStats::default(), ifindex };

        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex;
        // SAFETY: binding our socket to a properly initialised sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                this.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(rc, &format!("binding to {interface}"))?;

        if let Some((group, program)) = fanout {
            let arg: u32 = u32::from(group) | ((PACKET_FANOUT_CBPF | PACKET_FANOUT_FLAG_IGNORE_OUTGOING) << 16);
            setsockopt(&this.fd, libc::SOL_PACKET, PACKET_FANOUT, &arg, "PACKET_FANOUT")?;
            this.set_fanout_program(program)?;
        }
        Ok(this)
    }

    /// Replaces the group's steering program (all members share it).
    pub fn set_fanout_program(&self, program: &FanoutProgram) -> io::Result<()> {
        let prog =
            libc::sock_fprog { len: program.0.len() as u16, filter: program.0.as_ptr() as *mut libc::sock_filter };
        setsockopt(&self.fd, libc::SOL_PACKET, PACKET_FANOUT_DATA, &prog, "PACKET_FANOUT_DATA")
    }

    /// A second descriptor for the same socket, so the control plane can replace the group's steering
    /// program while a worker owns the ring.
    pub fn steering_handle(&self) -> io::Result<SteeringHandle> {
        Ok(SteeringHandle(self.fd.try_clone()?))
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    fn slot(&self, index: usize) -> *mut u8 {
        // SAFETY: index < frame_count, so the offset stays inside the mapping.
        unsafe { self.ring.as_ptr().add(self.geometry.offset(self.config.frame_size as usize, index)) }
    }

    fn status(&self, index: usize) -> u32 {
        // SAFETY: tp_status is the first u32 of the slot; the kernel writes it, so read it volatile.
        unsafe { std::ptr::read_volatile(self.slot(index).cast::<u32>()) }
    }

    /// Whether the next slot holds a frame, without a system call.
    pub fn ready(&self) -> bool {
        self.status(self.head) & TP_STATUS_USER != 0
    }

    /// Waits up to `timeout_ms` for a frame (returns at once if one is ready).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        if self.ready() {
            return Ok(true);
        }
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN | libc::POLLERR, revents: 0 };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(err);
        }
        Ok(self.status(self.head) & TP_STATUS_USER != 0)
    }

    /// Takes the next received frame, if any: its slot index, metadata, and the bytes from the virtio-net
    /// header to the end of the frame (`[vnet hdr][ethernet frame]`), writable in place. The slot stays
    /// ours until [`PacketRing::release`].
    pub fn take_frame(&mut self) -> Option<(usize, RxMeta, &mut [u8])> {
        let index = self.head;
        let status = self.status(index);
        if status & TP_STATUS_USER == 0 {
            return None;
        }
        // Order the reads of the slot after the status read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        self.head = (self.head + 1) % self.geometry.frame_count;
        let slot = self.slot(index);
        // SAFETY: the slot starts with a tpacket2_hdr the kernel filled in; fields read unaligned-safe.
        let (len, snaplen, mac) = unsafe {
            (
                std::ptr::read_unaligned(slot.add(4).cast::<u32>()) as usize,
                std::ptr::read_unaligned(slot.add(8).cast::<u32>()) as usize,
                std::ptr::read_unaligned(slot.add(12).cast::<u16>()) as usize,
            )
        };
        let meta = RxMeta {
            vlan_stripped: status & TP_STATUS_VLAN_VALID != 0,
            losing: status & TP_STATUS_LOSING != 0,
            truncated: snaplen < len,
        };
        let frame_size = self.config.frame_size as usize;
        let start = mac.checked_sub(VNET_HDR_LEN)?;
        if start < TPACKET2_HDR_LEN || mac + snaplen > frame_size {
            // A slot the kernel laid out differently than documented: hand it back rather than misread it.
            self.release(index);
            return None;
        }
        // SAFETY: [start, mac + snaplen) lies inside this slot, which userspace owns until released, and no
        // other reference to it exists (slots are handed out once per turn of the ring).
        let bytes = unsafe { std::slice::from_raw_parts_mut(slot.add(start), VNET_HDR_LEN + snaplen) };
        Some((index, meta, bytes))
    }

    /// Returns a slot to the kernel.
    pub fn release(&mut self, index: usize) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: tp_status of a slot we own; volatile so the kernel sees it.
        unsafe { std::ptr::write_volatile(self.slot(index).cast::<u32>(), TP_STATUS_KERNEL) };
    }

    /// Sends every message of the batch (each `[vnet hdr][frame]`), retrying partial sends. Returns how many
    /// were sent before an error stopped the batch.
    pub fn send_batch(&self, batch: &mut TxBatch) -> (usize, Option<io::Error>) {
        let mut sent = 0;
        while sent < batch.len {
            // SAFETY: the first `len` headers point at iovecs and buffers that stay alive until the batch is
            // cleared, after this call.
            let rc = unsafe {
                libc::sendmmsg(self.fd.as_raw_fd(), batch.headers.as_mut_ptr().add(sent), (batch.len - sent) as u32, 0)
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return (sent, Some(err));
            }
            sent += rc as usize;
        }
        (sent, None)
    }

    /// Kernel counters since the ring was opened.
    pub fn stats(&mut self) -> io::Result<RingStats> {
        let mut raw = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: reading into a properly sized tpacket_stats.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                (&mut raw as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        check(rc, "PACKET_STATISTICS")?;
        self.stats.packets += u64::from(raw.tp_packets);
        self.stats.drops += u64::from(raw.tp_drops);
        Ok(self.stats)
    }
}

/// Replaces a fanout group's steering program (see [`PacketRing::steering_handle`]).
pub struct SteeringHandle(OwnedFd);

impl SteeringHandle {
    pub fn set_program(&self, program: &FanoutProgram) -> io::Result<()> {
        let prog =
            libc::sock_fprog { len: program.0.len() as u16, filter: program.0.as_ptr() as *mut libc::sock_filter };
        setsockopt(&self.0, libc::SOL_PACKET, PACKET_FANOUT_DATA, &prog, "PACKET_FANOUT_DATA")
    }
}

impl Drop for PacketRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in open.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_len) };
    }
}

/// A preallocated batch of outgoing frames: no allocation per packet.
pub struct TxBatch {
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    len: usize,
}

// The raw pointers point into the ring or into worker-owned buffers; the batch never leaves its worker.
unsafe impl Send for TxBatch {}

impl TxBatch {
    pub fn with_capacity(capacity: usize) -> TxBatch {
        // SAFETY: mmsghdr and iovec are plain data; zero is a valid starting value.
        let header: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        TxBatch { headers: vec![header; capacity], iovecs: vec![iovec; capacity * 2], len: 0 }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.headers.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues one frame made of up to two pieces (e.g. a header in a scratch buffer and a payload in the
    /// ring). The memory must stay untouched until the batch is sent and cleared. Returns false when full.
    ///
    /// # Safety
    /// `parts` must stay valid and unmodified until [`TxBatch::clear`].
    pub unsafe fn push(&mut self, parts: &[&[u8]]) -> bool {
        if self.is_full() || parts.is_empty() || parts.len() > 2 {
            return false;
        }
        let first = self.len * 2;
        for (i, part) in parts.iter().enumerate() {
            self.iovecs[first + i] = libc::iovec { iov_base: part.as_ptr() as *mut libc::c_void, iov_len: part.len() };
        }
        let header = &mut self.headers[self.len].msg_hdr;
        header.msg_iov = self.iovecs[first..].as_mut_ptr();
        header.msg_iovlen = parts.len();
        self.len += 1;
        true
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_share_blocks_that_they_nearly_fill() {
        let g = Geometry::new(72 * 1024, 256);
        assert_eq!((g.frames_per_block, g.block_size), (7, 512 * 1024), "{g:?}");
        assert_eq!((g.block_count, g.frame_count), (37, 259), "rounded up to whole blocks: {g:?}");
        // 18.5 MiB where one frame per 128 KiB block took 32 MiB.
        assert_eq!(g.block_size * g.block_count, 37 * 512 * 1024);
        assert_eq!(g.offset(72 * 1024, 6), 6 * 72 * 1024);
        assert_eq!(g.offset(72 * 1024, 7), 512 * 1024, "the 8th frame opens the second block");
        assert_eq!(g.offset(72 * 1024, 258), 36 * 512 * 1024 + 6 * 72 * 1024);
        // A power-of-two frame needs no company; a tiny ring keeps a small block.
        let g = Geometry::new(64 * 1024, 10);
        assert_eq!((g.frames_per_block, g.block_size, g.frame_count), (1, 64 * 1024, 10));
        let g = Geometry::new(72 * 1024, 2);
        assert_eq!((g.frames_per_block, g.frame_count), (1, 2), "no better fill with two: {g:?}");
    }
}
