//! The control plane's TLS front door: accept TCP, handshake with the current TLS generation
//! (client certificate optional, verified when presented), and hand tonic a stream whose
//! connection info carries the verified peer.
//!
//! The port is open to anyone who can reach it (bootstrap needs no certificate), so pending
//! handshakes are bounded per source address and overall, with a short deadline
//! ([`moat_tls::pending`], decision 27): strangers holding connections idle lose them to callers
//! that complete a handshake at once. When every pending handshake is a caller at work from its
//! own address (a reconnection storm), a newcomer is closed at once and tries again after its
//! backoff, rather than push out a handshake half done.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use moat_identity::{CertInfo, VerifiedPeer};
use moat_tls::TlsWatch;
use moat_tls::pending::{Handshakes, Limits, Outcome};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// Handshakes pending at once: 64 from one source address, 1,024 in all (at most half the
/// process's open files), each given 5 s (a real one takes milliseconds), a hello counting as a
/// caller at work for all of it: in a reconnection storm a loaded sidecar answers late.
const PENDING: Limits = Limits {
    per_source: 64,
    total: 1024,
    deadline: Duration::from_secs(5),
    at_work: Duration::from_secs(5),
};

/// What the handshake proved about a caller. `peer` is `None` when no certificate was presented
/// (token bootstrap); a presented certificate that failed verification never gets this far.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Option<Peer>,
}

/// A caller authenticated by its certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub verified: VerifiedPeer,
    /// The caller's current public key (a renewal must bring a new one).
    pub spki_der: Vec<u8>,
    /// SHA-256 (hex) of the intermediate the caller presented with its leaf (empty without).
    pub issuer_sha256: String,
}

/// One accepted, handshaken connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn peer_of(stream: &TlsStream<TcpStream>) -> Option<Peer> {
    let chain = stream.get_ref().1.peer_certificates()?;
    let leaf = chain.first()?;
    let info = CertInfo::from_der(leaf).ok()?;
    Some(Peer {
        verified: VerifiedPeer {
            id: info.spiffe_id.ok()?,
            serial: info.serial,
            not_after: info.not_after,
        },
        spki_der: info.spki_der,
        issuer_sha256: chain
            .get(1)
            .map(|c| moat_identity::bundle::sha256_hex(c))
            .unwrap_or_default(),
    })
}

/// Accepts connections until the listener fails for good; failed handshakes are logged with
/// their reason, counted in `failures` by reason, and never reach tonic. Pending handshakes
/// stay under half of `open_files`, the process's limit on open files, and are counted in
/// `pending_gauge`.
pub fn incoming(
    listener: TcpListener,
    open_files: u64,
    tls: TlsWatch,
    failures: Family<crate::metrics::RefusedLabels, Counter>,
    pending_gauge: Gauge,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let limits = PENDING.within(open_files);
    limits.log(open_files);
    let pending = Handshakes::new(limits);
    let count = move |reason: &'static str, n: u64| {
        failures
            .get_or_create(&crate::metrics::RefusedLabels { reason })
            .inc_by(n);
    };
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(config) = tls.borrow().as_ref().map(|g| g.server.clone()) else {
                // Fail closed: without a serving certificate there is nothing to prove.
                count("no-credential", 1);
                tracing::warn!(%remote, "refused a connection: no serving certificate yet");
                continue;
            };
            let Some(slot) = pending.admit(remote.ip()) else {
                count("busy", 1);
                tracing::debug!(%remote, "closed a new connection: every pending handshake is at work");
                continue;
            };
            if slot.evicted() > 0 {
                count("evicted", slot.evicted());
            }
            let _ = tcp.set_nodelay(true);
            let (tx, count) = (tx.clone(), count.clone());
            let held = moat_metrics::Held::new(&pending_gauge);
            tokio::spawn(async move {
                let outcome = slot.handshake(tcp, config).await;
                drop(held);
                match outcome {
                    Outcome::Done(stream) => {
                        let info = ConnInfo {
                            remote,
                            peer: peer_of(&stream),
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: *stream,
                                info,
                            }))
                            .await;
                    }
                    Outcome::Failed(e) => {
                        count("refused", 1);
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                    }
                    Outcome::TimedOut => {
                        count("timeout", 1);
                        tracing::info!(%remote, "TLS handshake timed out");
                    }
                    Outcome::Evicted => tracing::debug!(
                        %remote,
                        "closed a pending handshake to make room for a newer one"
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
