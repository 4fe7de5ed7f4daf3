//! Reporting to the directors over QUIC with mutual TLS.
//!
//! Each director has a link task of its own, so an unreachable director never delays reports to another. The
//! sampling loop publishes the newest report in a `watch` channel; a link sends whatever is newest when it
//! can, so a slow link skips stale reports instead of queueing them. A lost or refused connection is retried
//! with jittered exponential backoff.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fulcrum_protocol::stream::{read_frame, write_frame};
use fulcrum_protocol::{
    AgentMessage, DirectorMessage, FrameError, Goodbye, GoodbyeReason, Hello, Instructions, LoadReport, HELLO_VERSION,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::DirectorTarget;

/// How long a connection attempt or a Hello exchange may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alives well inside the idle timeout, so that a director's death is noticed within the idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the Goodbye may take on shutdown.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Jittered exponential backoff: the n-th retry waits a random time in [d/2, d], d = min(max, base·2ⁿ).
/// "Equal jitter": never less than half the nominal delay, so a fleet of agents restarted together spreads
/// out without any of them hammering a director that is coming back.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, attempt: 0 }
    }

    /// The next delay; `unit` is a random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let nominal = self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        nominal.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// After a successful connection the next failure starts again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a link knows of its director, shared with the sampling loop and the metrics.
#[derive(Debug, Default)]
pub struct LinkStatus {
    pub connected: AtomicBool,
    /// The report interval the director asked for, in ms (0: no request).
    pub requested_interval_ms: AtomicU32,
    pub drain: AtomicBool,
}

/// The agent's TLS files as read: the cluster CA, its certificate chain and its private key (PEM). Read once, so
/// that the client configuration and the digest a reload compares come from the same bytes.
#[derive(Debug)]
pub struct TlsFiles {
    ca: (PathBuf, Vec<u8>),
    cert: (PathBuf, Vec<u8>),
    key: (PathBuf, Vec<u8>),
}

impl TlsFiles {
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<TlsFiles> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map(|bytes| (path.to_owned(), bytes))
                .with_context(|| format!("reading the {what} {}", path.display()))
        };
        Ok(TlsFiles {
            ca: read(ca, "CA certificate")?,
            cert: read(cert, "certificate")?,
            key: read(key, "private key")?,
        })
    }

    /// A digest of the three files' contents: a certificate renewed in place changes no path, and a SIGHUP must
    /// still load it.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (_, bytes) in [&self.ca, &self.cert, &self.key] {
            bytes.hash(&mut hasher);
        }
        hasher.finish()
    }
}

/// The agent's QUIC client configuration: trusts the cluster CA only, presents the agent's certificate.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig> {
    let ((ca, ca_pem), (cert, cert_pem), (key, key_pem)) = (&files.ca, &files.cert, &files.key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca_certs = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", ca.display()))?;
    for ca_cert in ca_certs {
        roots.add(ca_cert).with_context(|| format!("adding the CA certificate {}", ca.display()))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(key_pem).with_context(|| format!("reading the private key {}", key.display()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("selecting TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .with_context(|| format!("using the certificate {} with the key {}", cert.display(), key.display()))?;
    tls.alpn_protocols = vec![fulcrum_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("building the QUIC TLS config")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().context("idle timeout")?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One director's link: connects, says hello, sends each new report, reconnects when the connection is lost,
/// and says goodbye when `shutdown` turns true.
pub struct Link {
    pub target: DirectorTarget,
    pub hello: Hello,
    pub client: quinn::ClientConfig,
    pub reports: watch::Receiver<Option<LoadReport>>,
    pub status: Arc<LinkStatus>,
    pub shutdown: watch::Receiver<bool>,
}

/// How a session ended without an error.
enum Ended {
    /// We said goodbye.
    Shutdown,
    /// The director closed the stream or connection.
    ClosedByDirector(String),
}

impl Link {
    pub async fn run(mut self) {
        let director = self.target.name.clone();
        let endpoint = match bind_endpoint(self.target.address) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                warn!(%director, error = %format!("{e:#}"), "cannot create a QUIC endpoint; this director gets no reports");
                return;
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            let outcome = self.session(&endpoint, &mut backoff).await;
            self.status.connected.store(false, Ordering::Relaxed);
            metrics::gauge!("fulcrum_agent_director_connected", "director" => director.clone()).set(0.0);
            match outcome {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::ClosedByDirector(reason)) => info!(%director, %reason, "director closed the connection"),
                Err(e) => {
                    warn!(%director, address = %self.target.address, error = %format!("{e:#}"), "director link down")
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            debug!(%director, ?delay, "reconnecting after backoff");
            metrics::counter!("fulcrum_agent_reconnects_total", "director" => director.clone()).increment(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => {}
            }
        }
        // Let the close (and the Goodbye before it) reach the director.
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, endpoint.wait_idle()).await;
    }

    async fn session(&mut self, endpoint: &quinn::Endpoint, backoff: &mut Backoff) -> Result<Ended> {
        let director = self.target.name.clone();
        let connecting = endpoint
            .connect_with(self.client.clone(), self.target.address, &self.target.name)
            .context("starting the QUIC connection")?;
        let connection = tokio::select! {
            result = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting) => {
                result.map_err(|_| anyhow!("no QUIC handshake within {HANDSHAKE_TIMEOUT:?}"))?.context("QUIC handshake")?
            }
            _ = self.shutdown.changed() => return Ok(Ended::Shutdown),
        };
        let (mut send, mut recv) = connection.open_bi().await.context("opening the report stream")?;
        let mut out = Vec::new();
        write_frame(&mut send, HELLO_VERSION, &AgentMessage::Hello(self.hello.clone()), &mut out)
            .await
            .context("sending Hello")?;
        let mut buf = Vec::new();
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame::<DirectorMessage, _>(&mut recv, &mut buf))
            .await
            .map_err(|_| anyhow!("no answer to Hello within {HANDSHAKE_TIMEOUT:?}"))?
            .context("reading the answer to Hello")?;
        let version = match reply.map(|frame| frame.message) {
            Some(DirectorMessage::Welcome(welcome)) => {
                info!(%director, name = %welcome.director_name, version = welcome.version, "connected to director");
                self.apply(&welcome.instructions);
                welcome.version
            }
            Some(DirectorMessage::Reject(reject)) => {
                bail!("the director refused this agent ({:?}): {}", reject.reason, reject.detail)
            }
            Some(other) => bail!("expected Welcome, the director sent {other:?}"),
            None => bail!("the director closed the stream before answering Hello"),
        };
        backoff.reset();
        self.status.connected.store(true, Ordering::Relaxed);
        metrics::gauge!("fulcrum_agent_director_connected", "director" => director.clone()).set(1.0);

        // Acks are read by a task of their own: a frame read must never be cancelled halfway.
        let status = Arc::clone(&self.status);
        let acks_for = director.clone();
        let mut reader = tokio::spawn(async move {
            loop {
                match read_frame::<DirectorMessage, _>(&mut recv, &mut buf).await? {
                    Some(frame) if frame.version != version => {
                        return Err(FrameError::WrongVersion { found: frame.version, expected: version }.into())
                    }
                    Some(frame) => match frame.message {
                        DirectorMessage::Ack(ack) => apply_instructions(&status, &acks_for, &ack.instructions),
                        other => bail!("unexpected message from the director: {other:?}"),
                    },
                    None => return Ok::<_, anyhow::Error>("the director finished the stream".to_string()),
                }
            }
        });

        // A report made while we were disconnected is still the newest: send it at once.
        self.reports.mark_changed();
        let ended = loop {
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => {
                    let goodbye = AgentMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown });
                    let said = write_frame(&mut send, version, &goodbye, &mut out).await;
                    let _ = send.finish();
                    if said.is_ok() {
                        // The director closes the connection when it reads the Goodbye.
                        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, connection.closed()).await;
                    }
                    connection.close(0u32.into(), b"goodbye");
                    info!(%director, "said goodbye");
                    break Ok(Ended::Shutdown);
                }
                ended = &mut reader => {
                    break match ended {
                        Ok(Ok(reason)) => Ok(Ended::ClosedByDirector(reason)),
                        Ok(Err(e)) => Err(e.context(connection.close_reason().map_or_else(String::new, |r| r.to_string()))),
                        Err(join) => Err(anyhow!("ack reader failed: {join}")),
                    };
                }
                changed = self.reports.changed() => {
                    if changed.is_err() {
                        break Ok(Ended::Shutdown);
                    }
                    let report = self.reports.borrow_and_update().clone();
                    if let Some(report) = report {
                        write_frame(&mut send, version, &AgentMessage::Report(report), &mut out)
                            .await
                            .context("sending a report")?;
                        metrics::counter!("fulcrum_agent_reports_sent_total", "director" => director.clone()).increment(1);
                    }
                }
            }
        };
        reader.abort();
        ended
    }

    fn apply(&self, instructions: &Instructions) {
        apply_instructions(&self.status, &self.target.name, instructions);
    }
}

fn apply_instructions(status: &LinkStatus, director: &str, instructions: &Instructions) {
    status.requested_interval_ms.store(instructions.report_interval_ms, Ordering::Relaxed);
    let was_drained = status.drain.swap(instructions.drain, Ordering::Relaxed);
    if was_drained != instructions.drain {
        info!(%director, drain = instructions.drain, "the director changed this server's drain state");
    }
}

fn bind_endpoint(target: SocketAddr) -> Result<quinn::Endpoint> {
    let local: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().context("bind address")?;
    quinn::Endpoint::client(local).with_context(|| format!("binding a UDP socket on {local}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let lows: Vec<_> = (0..10).map(|_| backoff.next_delay(0.0)).collect();
        assert_eq!(lows[0], Duration::from_millis(50));
        assert_eq!(lows[1], Duration::from_millis(100));
        assert_eq!(lows[3], Duration::from_millis(400));
        assert_eq!(lows[9], Duration::from_secs(5), "capped at max, minus jitter");
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(backoff.next_delay(0.999_999_9).as_millis(), 99);
        for _ in 0..100 {
            assert!(backoff.next_delay(1.0) <= Duration::from_secs(10));
        }
        backoff.reset();
        assert_eq!(backoff.next_delay(1.0), Duration::from_millis(100));
    }
}
