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
//!
//! A completed handshake without a client certificate (a sidecar's first `Certify`, with a join
//! or service-account token) proves nothing either, and an idle TLS connection costs a file and
//! its buffers: such connections are bounded too ([`ANONYMOUS_PER_SOURCE`], [`ANONYMOUS`]), a
//! newcomer taking the place of an older one not at work (no `Certify` running on it, and past
//! [`ANONYMOUS_GRACE`]: [`crate::anonymous`]), and closed [`ANONYMOUS_LIFETIME`] after their handshake, long enough
//! for the one call they need.
//! A certificate holder gets at most [`CERTIFIED_PER_SOURCE`] connections per identity from one
//! source address: a sidecar needs one or two, and a stolen workload certificate must not hold
//! the control plane's files. Not where one address stands for many sidecars (NAT, with
//! `--announce-any-address`), as the mesh streams' own bound per address is not.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use moat_identity::{CertInfo, SpiffeId, VerifiedPeer};
use moat_tls::TlsWatch;
use moat_tls::pending::{Handshakes, Limits, Outcome};
use moat_tls::per_caller::{PerCaller, Slot};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::anonymous::{Place, Places};

/// Handshakes pending at once: 64 from one source address, 1,024 in all (at most half the
/// process's open files), each given 5 s (a real one takes milliseconds), a hello counting as a
/// caller at work for all of it: in a reconnection storm a loaded sidecar answers late.
const PENDING: Limits = Limits {
    per_source: 64,
    total: 1024,
    deadline: Duration::from_secs(5),
    at_work: Duration::from_secs(5),
};

/// Connections without a client certificate open at once from one source address: a node's
/// sidecars bootstrapping together after a restart stay well under it.
pub const ANONYMOUS_PER_SOURCE: usize = 32;
/// Connections without a client certificate open at once, in all.
pub const ANONYMOUS: usize = 512;
/// How long after its handshake a connection without a client certificate counts as at work
/// before any call: a bootstrapping sidecar sends its `Certify` at once, and from then on the
/// call itself keeps the connection at work ([`crate::anonymous`]).
pub const ANONYMOUS_GRACE: Duration = Duration::from_secs(1);
/// How long a connection without a client certificate is served: its calls (a `Certify`, a
/// bundle fetch) take milliseconds, and tonic gives each call at most 30 s.
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(30);

/// Connections with a certificate open at once for one identity from one source address (a
/// sidecar holds its mesh stream and a renewal's connection; 16 mesh streams per identity and
/// address are served at most).
pub const CERTIFIED_PER_SOURCE: usize = 64;

/// The source a connection is counted under: an IPv4 address, or an IPv6 address's /64 (one
/// host is commonly given a whole /64, and would otherwise count as 2^64 sources).
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// What the handshake proved about a caller. `peer` is `None` when no certificate was presented
/// (token bootstrap); a presented certificate that failed verification never gets this far.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Option<Peer>,
    /// Without a certificate: the count a `Certify` enters while it runs, which keeps the
    /// connection's place ([`crate::anonymous::Calls`]).
    pub at_work: Option<Arc<crate::anonymous::Calls>>,
}

/// A caller authenticated by its certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub verified: VerifiedPeer,
    /// The caller's current public key (a renewal must bring a new one).
    pub spki_der: Vec<u8>,
    /// SHA-256 (hex) of the intermediate that signed the caller's leaf, among those it presented
    /// (empty without): what the CA rotation's gates count as the certificate's issuer.
    pub issuer_sha256: String,
}

/// One accepted, handshaken connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: ConnInfo,
    /// For a connection without a client certificate: when it ends, and its places in the
    /// counts of such connections.
    anonymous: Option<Anonymous>,
    /// For one with a certificate: its place in its identity's count from its address.
    _certified: Option<Slot<(String, IpAddr)>>,
}

/// What a connection without a client certificate holds: when its lifetime ends, and its place
/// among such connections (which a newer one may take).
#[derive(Debug)]
struct Anonymous {
    ends: Pin<Box<tokio::time::Sleep>>,
    place: Place,
}

/// The bounds on connections after their handshake.
struct AfterHandshake {
    anonymous: Arc<Places>,
    /// Per identity and source address, when bounded.
    certified: Option<Arc<PerCaller<(String, IpAddr)>>>,
}

impl AfterHandshake {
    fn new(per_identity_and_source: bool) -> Self {
        AfterHandshake {
            anonymous: Places::new(ANONYMOUS_PER_SOURCE, ANONYMOUS, ANONYMOUS_GRACE),
            certified: per_identity_and_source.then(|| PerCaller::new(CERTIFIED_PER_SOURCE)),
        }
    }

    /// A place for one more connection of `id` from `source`: `None` over the bound,
    /// `Some(None)` when there is no bound.
    fn admit_certified(
        &self,
        id: &SpiffeId,
        source: IpAddr,
    ) -> Option<Option<Slot<(String, IpAddr)>>> {
        match &self.certified {
            None => Some(None),
            Some(counts) => counts.try_acquire(&(id.to_string(), source)).map(Some),
        }
    }

    /// A place for one more connection without a certificate from `source`, which may push
    /// out older ones ([`Place::evicted`]); `None` when every candidate is at work.
    fn admit(&self, source: IpAddr) -> Option<Anonymous> {
        Some(Anonymous {
            ends: Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)),
            place: self.anonymous.admit(source)?,
        })
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl TlsConn {
    /// For a connection without a client certificate: an error once its lifetime is over or a
    /// newer connection took its place, which ends it. Looked at on every read, write and
    /// flush, so a client that stops reading (the server then waits to write, and reads
    /// nothing) cannot keep it open.
    fn poll_ended(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let a = self.anonymous.as_mut()?;
        if a.ends.as_mut().poll(cx).is_ready() {
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a connection without a client certificate is served for 30 s",
            ));
        }
        a.place.poll_evicted(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed to make room for a newer connection without a client certificate",
            )
        })
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poll_ended(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poll_ended(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poll_ended(cx) {
            return Poll::Ready(Err(e));
        }
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
        issuer_sha256: moat_identity::issuer_sha256(
            leaf,
            &chain[1..],
            moat_identity::Usage::Client,
        ),
    })
}

/// What the listener bounds beyond the handshakes.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The process's limit on open files: pending handshakes stay under half of it.
    pub open_files: u64,
    /// Whether one identity's connections from one address are bounded
    /// ([`CERTIFIED_PER_SOURCE`]).
    pub per_identity_and_source: bool,
}

/// Accepts connections until the listener fails for good; failed handshakes are logged with
/// their reason, counted in `failures` by reason, and never reach tonic. Pending handshakes
/// stay under half of `open_files`, the process's limit on open files, and are counted in
/// `pending_gauge`.
pub fn incoming(
    listener: TcpListener,
    bounds: Bounds,
    tls: TlsWatch,
    failures: Family<crate::metrics::RefusedLabels, Counter>,
    pending_gauge: Gauge,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let limits = PENDING.within(bounds.open_files);
    limits.log(bounds.open_files);
    let pending = Handshakes::new(limits);
    let after = Arc::new(AfterHandshake::new(bounds.per_identity_and_source));
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
            let (tx, count, after) = (tx.clone(), count.clone(), after.clone());
            let held = moat_metrics::Held::new(&pending_gauge);
            tokio::spawn(async move {
                let outcome = slot.handshake(tcp, config).await;
                drop(held);
                match outcome {
                    Outcome::Done(stream) => {
                        let peer = peer_of(&stream);
                        let (anonymous, certified) = match &peer {
                            Some(p) => {
                                match after.admit_certified(&p.verified.id, source(remote.ip())) {
                                    Some(slot) => (None, slot),
                                    None => {
                                        count("identity-busy", 1);
                                        tracing::debug!(%remote, id = %p.verified.id, "closed a connection: this identity already holds as many from this address as allowed");
                                        return;
                                    }
                                }
                            }
                            None => match after.admit(source(remote.ip())) {
                                Some(a) => {
                                    if a.place.evicted() > 0 {
                                        count("anonymous-evicted", a.place.evicted());
                                        tracing::debug!(%remote, evicted = a.place.evicted(), "closed older connections without a client certificate to make room for this one");
                                    }
                                    (Some(a), None)
                                }
                                None => {
                                    count("anonymous-busy", 1);
                                    tracing::debug!(%remote, "closed a connection without a client certificate: every place is held by one at work");
                                    return;
                                }
                            },
                        };
                        let info = ConnInfo {
                            remote,
                            peer,
                            at_work: anonymous.as_ref().map(|a| a.place.at_work()),
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: *stream,
                                info,
                                anonymous,
                                _certified: certified,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_ipv4_as_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(other));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source(v4), v4);
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source(mapped), v4);
    }
}
