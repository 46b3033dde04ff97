//! The control plane's TLS front door: accept TCP, handshake with the current TLS generation
//! (client certificate optional, verified when presented), and hand tonic a stream whose
//! connection info carries the verified peer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use moat_identity::{CertInfo, VerifiedPeer};
use moat_tls::TlsState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PENDING_HANDSHAKES: usize = 1024;

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
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    let info = CertInfo::from_der(leaf).ok()?;
    Some(Peer {
        verified: VerifiedPeer {
            id: info.spiffe_id.ok()?,
            serial: info.serial,
            not_after: info.not_after,
        },
        spki_der: info.spki_der,
    })
}

/// Accepts connections until the listener fails for good; failed handshakes are logged with
/// their reason and never reach tonic.
pub fn incoming(
    listener: TcpListener,
    tls: watch::Receiver<Arc<TlsState>>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
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
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let config = tls.borrow().server.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => {
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
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
