//! The control plane's TLS front door: accept TCP, handshake with the current TLS generation
//! (client certificate optional, verified when presented), and hand tonic a stream whose
//! connection info carries the verified peer.
//!
//! The port is open to anyone who can reach it (bootstrap needs no certificate), so pending
//! handshakes are bounded per source address and overall, with a short deadline, and the
//! accept loop never waits for a slot: a connection that finds its source (or the listener) at
//! the limit evicts the oldest handshake still pending there (at the listener's limit, the
//! oldest of the source holding the most, else the oldest that has not said hello). Strangers
//! holding connections idle therefore lose them to callers that complete a handshake at once,
//! instead of keeping those callers out. When every pending handshake is a caller at work from
//! its own address (a reconnection storm), a newcomer is closed at once and tries again after
//! its backoff, rather than push out a handshake half done.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use moat_identity::{CertInfo, VerifiedPeer};
use moat_tls::TlsWatch;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, rustls};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How long a client may take to complete its handshake (a real one takes milliseconds).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes pending at once, in all.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Handshakes pending at once from one source address.
const MAX_PENDING_PER_SOURCE: usize = 64;
/// Handshakes in progress: oldest first, and per source. Dropping an entry's sender cancels
/// that handshake.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    by_age: BTreeMap<u64, Handshake>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

#[derive(Debug)]
struct Handshake {
    source: IpAddr,
    /// Dropped to cancel the handshake.
    _cancel: oneshot::Sender<()>,
    /// The client's hello arrived: a caller at work, not a connection held idle.
    hello: bool,
}

/// What [`Pending::admit`] did with a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    /// Registered as `id`, after evicting `evicted` older handshakes.
    Yes { id: u64, evicted: u64 },
    /// The listener is full of callers that each said hello from their own address: the
    /// newcomer waits its turn (it is closed and tries again) rather than push out one of them.
    Busy,
}

impl Pending {
    /// Registers a handshake from `source`, evicting the oldest pending one of that source when
    /// it is at its limit. At the listener's limit the source holding the most pending
    /// handshakes loses its oldest (a caller with one handshake in flight is never the one to go
    /// while a stranger holds many); when every source holds one, the oldest handshake whose
    /// hello never came goes; when all of them are at work, the newcomer is refused.
    fn admit(&mut self, source: IpAddr, cancel: oneshot::Sender<()>) -> Admitted {
        let mut evicted = 0;
        if self
            .by_source
            .get(&source)
            .is_some_and(|q| q.len() >= MAX_PENDING_PER_SOURCE)
            && let Some(oldest) = self.by_source.get(&source).and_then(|q| q.front().copied())
        {
            self.remove(oldest, source);
            evicted += 1;
        }
        if self.by_age.len() >= MAX_PENDING_HANDSHAKES {
            let busiest = self
                .by_source
                .iter()
                .max_by_key(|(_, q)| q.len())
                .filter(|(_, q)| q.len() > 1)
                .and_then(|(ip, q)| Some((*ip, *q.front()?)));
            let silent = || {
                self.by_age
                    .iter()
                    .find(|(_, h)| !h.hello)
                    .map(|(id, h)| (h.source, *id))
            };
            match busiest.or_else(silent) {
                Some((ip, oldest)) => {
                    self.remove(oldest, ip);
                    evicted += 1;
                }
                None => return Admitted::Busy,
            }
        }
        let id = self.next;
        self.next += 1;
        self.by_age.insert(
            id,
            Handshake {
                source,
                _cancel: cancel,
                hello: false,
            },
        );
        self.by_source.entry(source).or_default().push_back(id);
        Admitted::Yes { id, evicted }
    }

    /// Notes that handshake `id`'s hello arrived.
    fn said_hello(&mut self, id: u64) {
        if let Some(h) = self.by_age.get_mut(&id) {
            h.hello = true;
        }
    }

    /// Forgets handshake `id` (done, failed or evicted); a no-op when already gone.
    fn remove(&mut self, id: u64, source: IpAddr) {
        self.by_age.remove(&id);
        if let Some(q) = self.by_source.get_mut(&source) {
            q.retain(|&x| x != id);
            if q.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
}

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
/// their reason, counted in `failures` by reason, and never reach tonic.
pub fn incoming(
    listener: TcpListener,
    tls: TlsWatch,
    failures: Family<crate::metrics::RefusedLabels, Counter>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Mutex::new(Pending::default()));
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
            let (cancel, cancelled) = oneshot::channel();
            let admitted = match pending.lock() {
                Ok(mut p) => p.admit(remote.ip(), cancel),
                Err(_) => return,
            };
            let id = match admitted {
                Admitted::Yes { id, evicted } => {
                    if evicted > 0 {
                        count("evicted", evicted);
                    }
                    id
                }
                Admitted::Busy => {
                    count("busy", 1);
                    tracing::debug!(%remote, "closed a new connection: every pending handshake is at work");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tx, pending, count) = (tx.clone(), pending.clone(), count.clone());
            tokio::spawn(async move {
                let source = remote.ip();
                let handshake = async {
                    let start =
                        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
                    if let Ok(mut p) = pending.lock() {
                        p.said_hello(id);
                    }
                    start.into_stream(config).await
                };
                let outcome = tokio::select! {
                    r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => Some(r),
                    _ = cancelled => None,
                };
                if let Ok(mut p) = pending.lock() {
                    p.remove(id, source);
                }
                match outcome {
                    Some(Ok(Ok(stream))) => {
                        let info = ConnInfo {
                            remote,
                            peer: peer_of(&stream),
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: stream,
                                info,
                            }))
                            .await;
                    }
                    Some(Ok(Err(e))) => {
                        count("refused", 1);
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                    }
                    Some(Err(_)) => {
                        count("timeout", 1);
                        tracing::info!(%remote, "TLS handshake timed out");
                    }
                    None => tracing::debug!(
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

    fn admit(p: &mut Pending, ip: IpAddr) -> (u64, u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        match p.admit(ip, tx) {
            Admitted::Yes { id, evicted } => (id, evicted, rx),
            Admitted::Busy => panic!("{ip} refused"),
        }
    }

    #[test]
    fn the_oldest_pending_handshake_of_a_full_source_makes_room() {
        let mut p = Pending::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let mut cancels = Vec::new();
        for _ in 0..MAX_PENDING_PER_SOURCE {
            let (_, evicted, rx) = admit(&mut p, a);
            assert_eq!(evicted, 0);
            cancels.push(rx);
        }
        let (_, evicted, _rx) = admit(&mut p, a);
        assert_eq!(evicted, 1);
        // The first one was told to stop (its sender is gone); the others were not.
        assert!(cancels[0].try_recv().is_err());
        assert!(matches!(
            cancels[1].try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert_eq!(p.by_source[&a].len(), MAX_PENDING_PER_SOURCE);
        // Another source is not affected.
        assert_eq!(admit(&mut p, b).1, 0);
        let (id, _, _rx) = admit(&mut p, b);
        p.remove(id, b);
        p.remove(id, b);
        assert_eq!(p.by_source[&b].len(), 1);
        assert_eq!(p.by_age.len(), MAX_PENDING_PER_SOURCE + 1);
    }

    #[test]
    fn at_the_listeners_limit_the_busiest_source_gives_way() {
        let mut p = Pending::default();
        let caller: IpAddr = [10, 9, 9, 9].into();
        let (_, _, mut caller_rx) = admit(&mut p, caller);
        let mut keep = Vec::new();
        for i in 0..MAX_PENDING_HANDSHAKES * 2 {
            let ip: IpAddr = [10, 2, 0, (i % 20) as u8].into();
            keep.push(admit(&mut p, ip).2);
        }
        assert_eq!(p.by_age.len(), MAX_PENDING_HANDSHAKES);
        assert!(matches!(
            caller_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert_eq!(p.by_source[&caller].len(), 1);
    }

    #[test]
    fn the_listener_as_a_whole_is_bounded() {
        let mut p = Pending::default();
        let mut keep = Vec::new();
        for i in 0..MAX_PENDING_HANDSHAKES + 10 {
            let ip: IpAddr = [10, 1, (i / 256) as u8, (i % 256) as u8].into();
            keep.push(admit(&mut p, ip).2);
        }
        assert_eq!(p.by_age.len(), MAX_PENDING_HANDSHAKES);
        assert_eq!(
            p.by_source.values().map(VecDeque::len).sum::<usize>(),
            MAX_PENDING_HANDSHAKES
        );
    }

    /// A reconnection storm: one handshake per address, each past its hello. A silent
    /// connection goes first; then newcomers wait their turn instead of pushing out callers
    /// whose handshakes are under way.
    #[test]
    fn a_full_listener_of_callers_at_work_turns_newcomers_away() {
        let mut p = Pending::default();
        let ip = |i: usize| -> IpAddr { [10, 3, (i / 256) as u8, (i % 256) as u8].into() };
        let mut keep = Vec::new();
        let (silent, _, mut silent_rx) = admit(&mut p, ip(0));
        for i in 1..MAX_PENDING_HANDSHAKES {
            let (id, evicted, rx) = admit(&mut p, ip(i));
            assert_eq!(evicted, 0);
            p.said_hello(id);
            keep.push(rx);
        }
        let (id, evicted, _rx) = admit(&mut p, ip(MAX_PENDING_HANDSHAKES));
        assert_eq!(evicted, 1);
        assert!(!p.by_age.contains_key(&silent));
        assert!(
            silent_rx.try_recv().is_err(),
            "the silent one was told to stop"
        );
        p.said_hello(id);
        let (tx, _rx) = oneshot::channel();
        assert_eq!(p.admit(ip(MAX_PENDING_HANDSHAKES + 1), tx), Admitted::Busy);
        assert_eq!(p.by_age.len(), MAX_PENDING_HANDSHAKES);
        for rx in &mut keep {
            assert!(matches!(
                rx.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ));
        }
    }
}
