//! The sync task: the I/O around the pure parts, on TCP.
//!
//! **Why TCP.** Sync needs every record delivered once and in order (a "closed" overtaking its "new" would
//! leave a ghost entry); TCP gives that, plus flow control: when the standby falls behind, the sender's
//! writes slow down and changes coalesce in the [`Outbox`] instead of being lost. Datagrams would need
//! sequence numbers, acknowledgements and retransmission to get the same.
//!
//! Each director listens on `listen` and connects to its peer's `peer`, so there are two connections, one
//! per direction:
//! - **Sending** (we connect): after the hellos, every change the workers emit goes out through the outbox
//!   (batched, rate-bounded, coalesced). The peer sends back a full-table request on this connection
//!   whenever it (re)connects; the workers then walk their tables and the task sends an end-of-table marker
//!   after the last record. Connection lost: retried with backoff (100 ms doubling to 5 s); meanwhile
//!   changes are counted as `no_peer` drops and forgotten (the peer asks for the full table on reconnecting).
//! - **Receiving** (the peer connects): the task asks for the full table at once (a fresh connection may
//!   follow a restart on either side), then routes each record to the worker that owns the client (the
//!   steering hash, [`SyncShared::owning_worker`]) through that worker's ring. A full ring makes the task wait (TCP
//!   pushes back on the peer): received records are never dropped. A newer connection from the peer
//!   replaces the older one.
//!
//! Only a serving director emits changes (the workers check), so both directions carry traffic only from
//! whichever director serves.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::frame::{self, FrameError, Header, Message, Receiver, HEADER_LEN};
use super::hub::{SyncDrop, SyncShared, TaskPorts};
use super::outbox::{Outbox, OutboxConfig};
use super::record::SyncRecord;
use super::ring::{Consumer, Producer};

/// How often the sending side looks at the workers' rings.
const TICK: Duration = Duration::from_millis(2);
/// Records waiting in the outbox beyond which the rings are left to fill (and count drops).
const MAX_PENDING: usize = 1 << 20;
/// The peer must answer our hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A peer silent this long (data unacknowledged, or keepalives unanswered) is gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the task needs from the `[sync]` section.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub key: Vec<u8>,
    pub outbox: OutboxConfig,
}

/// Why a sync connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("refused frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer did not say hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    #[error("unexpected {0} on this connection")]
    Unexpected(&'static str),
    #[error("the peer closed the connection")]
    Closed,
}

/// The running task; stops when dropped.
pub struct SyncTask {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SyncTask {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds the listener (so a bad address fails the start) and starts both directions.
pub async fn start(settings: SyncSettings, ports: TaskPorts) -> std::io::Result<SyncTask> {
    let listener = TcpListener::bind(settings.listen).await?;
    let TaskPorts { outgoing, incoming, shared } = ports;
    info!(listen = %settings.listen, peer = %settings.peer, "connection sync running");
    let settings = Arc::new(settings);
    let peer_back = Arc::new(Notify::new());
    let sending = tokio::spawn(send_loop(Arc::clone(&settings), outgoing, Arc::clone(&shared), Arc::clone(&peer_back)));
    let incoming = Arc::new(Mutex::new(incoming));
    let receiving = tokio::spawn(accept_loop(listener, settings, incoming, shared, peer_back));
    Ok(SyncTask { tasks: vec![sending, receiving] })
}

/// Reads one frame (header first: a bad length is refused before anything is allocated for the body).
async fn read_frame(read: &mut OwnedReadHalf, receiver: &mut Receiver) -> Result<Message, SessionError> {
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = read.read_exact(&mut header).await {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof { SessionError::Closed } else { e.into() });
    }
    let header = Header::parse(header)?;
    let mut rest = vec![0u8; header.rest_len()];
    read.read_exact(&mut rest).await?;
    Ok(receiver.open(&header, &rest)?)
}

/// A peer that vanishes without closing (power loss, a cut link) must not leave the connection hanging for
/// the kernel's default of many minutes: data unacknowledged for [`PEER_TIMEOUT`] fails the connection
/// (`TCP_USER_TIMEOUT`), and keepalives probe an idle one.
fn detect_dead_peers(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> std::io::Result<()> {
        // SAFETY: a valid socket and a pointer to an int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, PEER_TIMEOUT.as_millis() as libc::c_int)?;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)
}

/// Exchanges hellos; returns both halves ready.
async fn handshake(
    stream: TcpStream,
    key: &[u8],
) -> Result<(OwnedReadHalf, OwnedWriteHalf, frame::Sender, Receiver), SessionError> {
    stream.set_nodelay(true)?;
    detect_dead_peers(&stream)?;
    let (mut read, mut write) = stream.into_split();
    let (mut sender, mut receiver) = frame::session(key, frame::random_nonce()?);
    write.write_all(&sender.hello()).await?;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut read, &mut receiver))
        .await
        .map_err(|_| SessionError::HelloTimeout)??;
    match hello {
        Message::Hello { nonce } => sender.set_peer_nonce(nonce),
        _ => return Err(SessionError::Unexpected("frame before the hello")),
    }
    Ok((read, write, sender, receiver))
}

fn count_session_error(shared: &SyncShared, error: &SessionError) {
    if let SessionError::Frame(e) = error {
        shared.count(SyncDrop::from_frame_reason(e.reason()), 1);
    }
}

/// Empties the workers' rings into `sink` while it accepts; returns whether every ring is empty.
fn drain(outgoing: &mut [Consumer<SyncRecord>], mut sink: impl FnMut(SyncRecord) -> bool) -> bool {
    for ring in outgoing.iter_mut() {
        while !ring.is_empty() {
            let Some(record) = ring.pop() else { break };
            if !sink(record) {
                return false;
            }
        }
    }
    true
}

async fn send_loop(
    settings: Arc<SyncSettings>,
    mut outgoing: Vec<Consumer<SyncRecord>>,
    shared: Arc<SyncShared>,
    peer_back: Arc<Notify>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(settings.peer)).await {
            Ok(Ok(stream)) => {
                backoff = BACKOFF_MIN;
                shared.outbound_connected.store(true, Ordering::Relaxed);
                let result = send_session(stream, &settings, &mut outgoing, &shared).await;
                shared.outbound_connected.store(false, Ordering::Relaxed);
                shared.lag_us.store(0, Ordering::Relaxed);
                if let Err(e) = result {
                    count_session_error(&shared, &e);
                    warn!(peer = %settings.peer, error = %e, "sync connection to the peer ended");
                }
            }
            Ok(Err(e)) => debug!(peer = %settings.peer, error = %e, "connecting to the sync peer"),
            Err(_) => debug!(peer = %settings.peer, "connecting to the sync peer timed out"),
        }
        // Nobody to send to: changes are forgotten (the peer asks for the full table when it connects). The
        // wait ends early when the peer connects to us: it is back, and a restarted peer needs our table now
        // (before it takes the VIPs back).
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            let mut forgotten = 0;
            drain(&mut outgoing, |_| {
                forgotten += 1;
                true
            });
            shared.count(SyncDrop::NoPeer, forgotten);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = peer_back.notified() => {
                    backoff = BACKOFF_MIN;
                    break;
                }
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send_session(
    stream: TcpStream,
    settings: &SyncSettings,
    outgoing: &mut [Consumer<SyncRecord>],
    shared: &SyncShared,
) -> Result<(), SessionError> {
    let (mut read, mut write, mut sender, mut receiver) = handshake(stream, &settings.key).await?;
    info!(peer = %settings.peer, "sending connection changes to the peer");
    // Reading is not cancel-safe inside `select!`: a task of its own reads and hands over whole messages.
    let (messages_tx, mut messages) = mpsc::channel(4);
    let _reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let message = read_frame(&mut read, &mut receiver).await;
            let end = message.is_err();
            if messages_tx.send(message).await.is_err() || end {
                return;
            }
        }
    }));
    let mut outbox = Outbox::new(settings.outbox, Instant::now());
    let mut coalesced = 0;
    // The full-table request being served: its generation, and once every worker is done, the outbox mark
    // after which the end-of-table marker goes.
    let mut dump: Option<(u64, Option<u64>)> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            message = messages.recv() => match message {
                Some(Ok(Message::FullTableRequest)) => {
                    let generation = shared.dump_generation.fetch_add(1, Ordering::AcqRel) + 1;
                    info!(peer = %settings.peer, "the peer asked for the full connection table");
                    dump = Some((generation, None));
                }
                Some(Ok(Message::Hello { .. })) => return Err(SessionError::Unexpected("second hello")),
                Some(Ok(Message::Records(_) | Message::EndOfTable)) => {
                    return Err(SessionError::Unexpected("records on the sending connection"))
                }
                Some(Err(e)) => return Err(e),
                None => return Err(SessionError::Closed),
            },
        }
        let now = Instant::now();
        let emptied = drain(outgoing, |record| {
            outbox.push(record, now);
            outbox.len() < MAX_PENDING
        });
        if let Some((generation, None)) = dump {
            if emptied
                && shared.dump_finished(generation)
                && drain(outgoing, |r| {
                    outbox.push(r, now);
                    true
                })
            {
                dump = Some((generation, Some(outbox.queued_mark())));
            }
        }
        while let Some(records) = outbox.poll(now) {
            let count = records.len() as u64;
            if let Some(frame) = sender.seal(&Message::Records(records)) {
                write.write_all(&frame).await?;
                shared.frames_sent.fetch_add(1, Ordering::Relaxed);
                shared.records_sent.fetch_add(count, Ordering::Relaxed);
            }
        }
        if let Some((_, Some(mark))) = dump {
            if outbox.sent_mark() >= mark {
                if let Some(frame) = sender.seal(&Message::EndOfTable) {
                    write.write_all(&frame).await?;
                }
                shared.full_tables_sent.fetch_add(1, Ordering::Relaxed);
                info!(peer = %settings.peer, "full connection table sent");
                dump = None;
            }
        }
        shared.records_coalesced.fetch_add(outbox.coalesced() - coalesced, Ordering::Relaxed);
        coalesced = outbox.coalesced();
        shared.lag_us.store(outbox.lag(now).as_micros() as u64, Ordering::Relaxed);
    }
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<SyncSettings>,
    incoming: Arc<Mutex<Vec<Producer<SyncRecord>>>>,
    shared: Arc<SyncShared>,
    peer_back: Arc<Notify>,
) {
    let mut current: Option<AbortOnDrop> = None;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "sync listener accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The newest connection wins: the peer only reconnects when it lost the previous one.
        drop(current.take());
        peer_back.notify_one();
        let (settings, incoming, shared) = (Arc::clone(&settings), Arc::clone(&incoming), Arc::clone(&shared));
        current = Some(AbortOnDrop(tokio::spawn(async move {
            let result = receive_session(stream, &settings, &incoming, &shared).await;
            shared.inbound_connected.store(false, Ordering::Relaxed);
            if let Err(e) = result {
                count_session_error(&shared, &e);
                warn!(%from, error = %e, "sync connection from the peer ended");
            }
        })));
    }
}

async fn receive_session(
    stream: TcpStream,
    settings: &SyncSettings,
    incoming: &Mutex<Vec<Producer<SyncRecord>>>,
    shared: &SyncShared,
) -> Result<(), SessionError> {
    let (mut read, mut write, mut sender, mut receiver) = handshake(stream, &settings.key).await?;
    let mut incoming = incoming.lock().await;
    shared.inbound_connected.store(true, Ordering::Relaxed);
    // A fresh connection may follow a restart of either side: ask for everything.
    if let Some(frame) = sender.seal(&Message::FullTableRequest) {
        write.write_all(&frame).await?;
    }
    info!("receiving connection changes from the peer; asked for its full table");
    let workers = incoming.len() as u32;
    loop {
        match read_frame(&mut read, &mut receiver).await? {
            Message::Records(records) => {
                shared.frames_received.fetch_add(1, Ordering::Relaxed);
                shared.records_received.fetch_add(records.len() as u64, Ordering::Relaxed);
                for record in records {
                    let ring = &mut incoming[shared.owning_worker(&record, workers)];
                    // A full ring: wait for the worker (it drains between packets); TCP holds the peer back.
                    while ring.push(record).is_err() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            Message::EndOfTable => {
                shared.full_tables_received.fetch_add(1, Ordering::Relaxed);
                info!("received the peer's full connection table");
            }
            Message::FullTableRequest => {
                return Err(SessionError::Unexpected("full-table request on the receiving connection"))
            }
            Message::Hello { .. } => return Err(SessionError::Unexpected("second hello")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::ConnState;
    use crate::sync::hub;
    use crate::sync::record::{sample, RecordKind};

    /// A free loopback port (bound then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
    }

    fn settings(listen: u16, peer: u16, key: &[u8]) -> SyncSettings {
        SyncSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            peer: SocketAddr::from(([127, 0, 0, 1], peer)),
            key: key.to_vec(),
            outbox: OutboxConfig { batch_records: 64, batch_interval: Duration::from_millis(5), max_rate: 100_000 },
        }
    }

    /// Polls `condition` until it holds or `timeout` passes.
    async fn wait(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn records_cross_to_the_owning_worker_and_full_tables_are_asked_for_and_ended() {
        let (a_port, b_port) = (free_port(), free_port());
        let key = b"a shared key of enough bytes";
        let (a_shared, mut a_workers, a_task) = hub(2, 1024);
        let (b_shared, mut b_workers, b_task) = hub(2, 1024);
        // B listens first, so that A's first connection attempt succeeds (A forgets changes while it has no
        // peer). Then the records A's data path emitted.
        let _b = start(settings(b_port, a_port, key), b_task).await.expect("b");
        let records: Vec<_> = (1..=20).map(|i| sample(RecordKind::New, i, ConnState::SynRecv)).collect();
        for (i, record) in records.iter().enumerate() {
            a_workers[i % 2].emit(*record);
        }
        let _a = start(settings(a_port, b_port, key), a_task).await.expect("a");

        // Each side asks the other for its full table on the connection it accepts.
        wait("both full-table requests", Duration::from_secs(10), || {
            a_shared.dump_generation.load(Ordering::Relaxed) >= 1
                && b_shared.dump_generation.load(Ordering::Relaxed) >= 1
        })
        .await;
        // Every record reaches B, each in the ring of the worker that owns its client.
        let mut received = Vec::new();
        wait("the records on B", Duration::from_secs(10), || {
            for (worker, port) in b_workers.iter_mut().enumerate() {
                while let Some(record) = port.incoming.pop() {
                    assert_eq!(b_shared.owning_worker(&record, 2), worker, "{record:?}");
                    received.push(record);
                }
            }
            received.len() == records.len()
        })
        .await;
        received.sort_by_key(|r| r.client);
        assert_eq!(
            received.iter().map(|r| r.client).collect::<Vec<_>>(),
            records.iter().map(|r| r.client).collect::<Vec<_>>()
        );
        assert!(received.iter().all(|r| r.remaining_ms <= 900_000 && r.remaining_ms > 890_000), "aged, not reset");

        // A's workers finish their dump: the end-of-table marker follows.
        let generation = a_shared.dump_generation.load(Ordering::Relaxed);
        for worker in a_shared.workers.iter() {
            worker.dumped_generation.store(generation, Ordering::Release);
        }
        wait("the end of A's table at B", Duration::from_secs(10), || {
            b_shared.full_tables_received.load(Ordering::Relaxed) >= 1
        })
        .await;
        let status = a_shared.status();
        assert!(status.sending_connected && status.receiving_connected, "{status:?}");
        assert_eq!(status.records_sent, 20);
        assert_eq!(b_shared.status().records_received, 20);
    }

    #[tokio::test]
    async fn a_peer_with_another_key_is_refused_and_counted() {
        let (a_port, b_port) = (free_port(), free_port());
        let (a_shared, _a_workers, a_task) = hub(1, 1024);
        let (b_shared, _b_workers, b_task) = hub(1, 1024);
        let _a = start(settings(a_port, b_port, b"the first key, 16+ bytes"), a_task).await.expect("a");
        let _b = start(settings(b_port, a_port, b"another key, also 16+ bytes"), b_task).await.expect("b");
        wait("MAC failures on both sides", Duration::from_secs(10), || {
            a_shared.dropped(SyncDrop::Auth) >= 1 && b_shared.dropped(SyncDrop::Auth) >= 1
        })
        .await;
        assert_eq!(a_shared.dump_generation.load(Ordering::Relaxed), 0, "nothing unauthenticated is obeyed");
        assert!(!a_shared.inbound_connected.load(Ordering::Relaxed));
    }
}
