//! Opaque TCP between a mesh TLS connection and a plain socket, driving the rustls connection
//! directly instead of through tokio-rustls' `AsyncRead`/`AsyncWrite`.
//!
//! What that saves, against `copy_bidirectional` over a tokio-rustls stream, where every 16 KiB
//! record costs about seven system calls:
//! - mesh → app: ciphertext is read up to 256 KiB per system call (rustls on its own reads
//!   4 KiB at a time, five calls per record), and the records that arrived are decrypted and
//!   gathered into one write to the app (one per record before). On loopback each write also
//!   runs the receiver's TCP stack and wakes it, which costs more than the copy into the gather
//!   buffer (bench/results/compare.md, moat/baseline);
//! - app → mesh: the app is read up to 256 KiB at a time, and the records rustls seals from it
//!   go out in one vectored write.
//!
//! The buffers are allocated when their direction has bytes to move, grow from one record to
//! 256 KiB while reads keep filling them, and are released when it goes quiet (a read that
//! would block on an empty buffer), so an idle forwarded connection holds no relay buffer. Everything TLS (records, alerts, key updates, close_notify) stays rustls'.

use std::io::{self, BufRead as _, IoSlice, Write};

use rustls::{ConnectionCommon, SideData};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// Most bytes read, and written, per system call on either side: sixteen full TLS records.
const READ_SIZE: usize = 256 * 1024;
/// What a quiet direction reads first: one full TLS record.
const FIRST_READ: usize = 16 * 1024 + 256;

/// Bytes moved by one relayed connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Plaintext delivered to the app.
    pub to_app: u64,
    /// Plaintext from the app sent over the mesh connection.
    pub to_mesh: u64,
}

/// A byte buffer read from one socket and drained by the other side; empty (no allocation)
/// while its direction is idle. Reads start at [`FIRST_READ`] and double each time a read fills
/// the buffer, up to [`READ_SIZE`], so a connection carrying small messages never allocates a
/// large buffer and a bulk transfer soon reads in large ones.
struct Pending {
    buf: Vec<u8>,
    at: usize,
    /// How much the next read asks for.
    size: usize,
}

impl Default for Pending {
    fn default() -> Self {
        Pending::from(Vec::new())
    }
}

impl Pending {
    fn from(bytes: Vec<u8>) -> Self {
        Pending {
            buf: bytes,
            at: 0,
            size: FIRST_READ,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }

    /// How many more bytes [`Pending::append`] takes.
    fn room(&self) -> usize {
        READ_SIZE.saturating_sub(self.buf.len())
    }

    /// Appends as much of `bytes` as there is room for; returns how much.
    fn append(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.buf.extend_from_slice(&bytes[..n]);
        n
    }

    fn consume(&mut self, n: usize) {
        self.at += n;
        if self.is_empty() {
            self.buf.clear();
            self.at = 0;
        }
    }

    /// Reads what `from` has into the empty buffer. `Ok(0)` is end of stream. When nothing is
    /// there, the buffer is released and `WouldBlock` returned.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        debug_assert!(self.is_empty());
        if self.buf.capacity() < self.size {
            self.buf = Vec::with_capacity(self.size);
        }
        match from.try_read_buf(&mut self.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The memory goes; the size stays, or a bulk transfer that outruns its sender
                // (and finds the socket empty now and then) would keep starting small.
                self.buf = Vec::new();
                Err(e)
            }
            Ok(n) => {
                if n == self.buf.capacity() {
                    self.size = (self.size * 2).min(READ_SIZE);
                }
                Ok(n)
            }
            r => r,
        }
    }
}

/// `Write` over a non-blocking socket, for rustls' `write_tls` (which writes vectored).
struct TryWrite<'a>(&'a TcpStream);

impl Write for TryWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// What the relay waits for before it can move on.
#[derive(Default)]
struct Wants {
    net_read: bool,
    net_write: bool,
    app_read: bool,
    app_write: bool,
}

/// Moves bytes both ways between the mesh connection (`net` carrying `conn`, handshake done) and
/// `app` until both directions have ended: the peer's close_notify becomes a write shutdown of
/// `app`, the app's end of stream becomes our close_notify and a write shutdown of `net`.
/// `to_app` and `to_mesh` are plaintext already read from either side (protocol detection),
/// sent first. A connection the peer ends without close_notify is an error (a truncation).
pub async fn relay<S: SideData>(
    net: &mut TcpStream,
    conn: &mut ConnectionCommon<S>,
    app: &mut TcpStream,
    to_app: Vec<u8>,
    to_mesh: Vec<u8>,
) -> io::Result<Relayed> {
    let mut moved = Relayed::default();
    // rustls takes this much plaintext before it wants its records written out.
    conn.set_buffer_limit(Some(READ_SIZE));
    // Ciphertext from `net` not yet handed to rustls.
    let mut cipher = Pending::default();
    // Decrypted plaintext gathered for one write to `app`; starts with what detection read.
    let mut out = Pending::from(to_app);
    // Plaintext from `app` not yet accepted by rustls.
    let mut plain = Pending::from(to_mesh);
    let (mut net_eof, mut peer_closed) = (false, false);
    // Mesh → app has ended (app's write side shut); app → mesh has ended (close_notify queued);
    // and `net`'s write side is shut.
    let (mut down_done, mut up_eof, mut net_shut) = (false, false, false);
    loop {
        let mut wants = Wants::default();
        // Mesh → app: gather what the records that have arrived decrypt to (up to READ_SIZE),
        // then write it in one call.
        while !down_done {
            while !peer_closed && out.room() > 0 {
                match conn.reader().into_first_chunk() {
                    // close_notify: the peer has nothing more to send.
                    Ok([]) => peer_closed = true,
                    Ok(bytes) => {
                        let n = out.append(bytes);
                        conn.reader().consume(n);
                    }
                    Err(e) if would_block(&e) => {
                        if cipher.is_empty() && !net_eof {
                            match cipher.fill(net) {
                                Ok(0) => net_eof = true,
                                Ok(_) => {}
                                Err(e) if would_block(&e) => break,
                                Err(e) => return Err(e),
                            }
                        }
                        if net_eof && cipher.is_empty() {
                            // Tells rustls the stream ended; the reader then reports either
                            // close_notify (Ok(&[])) or a truncation (UnexpectedEof).
                            conn.read_tls(&mut io::empty())?;
                        } else {
                            let n = conn.read_tls(&mut cipher.bytes())?;
                            cipher.consume(n);
                        }
                        if let Err(e) = conn.process_new_packets() {
                            // Send the alert rustls queued for the peer before giving up.
                            let _ = conn.write_tls(&mut TryWrite(net));
                            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if !out.is_empty() {
                match app.try_write(out.bytes()) {
                    Ok(n) => {
                        moved.to_app += n as u64;
                        out.consume(n);
                    }
                    Err(e) if would_block(&e) => {
                        wants.app_write = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            } else if peer_closed {
                app.shutdown().await?;
                down_done = true;
            } else {
                // Nothing in flight: hold no buffer while the peer is quiet.
                out.buf = Vec::new();
                wants.net_read = true;
                break;
            }
        }
        // App → mesh, and anything rustls has to send of its own (alerts, key updates).
        loop {
            if conn.wants_write() {
                match conn.write_tls(&mut TryWrite(net)) {
                    Ok(_) => continue,
                    Err(e) if would_block(&e) => {
                        wants.net_write = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !plain.is_empty() {
                let n = conn.writer().write(plain.bytes())?;
                if n == 0 && !conn.wants_write() {
                    // Nothing to flush and nothing taken: rustls will not take more, ever.
                    return Err(io::Error::other("the mesh connection takes no more data"));
                }
                moved.to_mesh += n as u64;
                plain.consume(n);
                continue;
            }
            if up_eof {
                if !net_shut && !conn.wants_write() {
                    net.shutdown().await?;
                    net_shut = true;
                }
                break;
            }
            match plain.fill(app) {
                Ok(0) => {
                    conn.send_close_notify();
                    up_eof = true;
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => {
                    wants.app_read = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if down_done && net_shut {
            return Ok(moved);
        }
        tokio::select! {
            r = net.readable(), if wants.net_read => r?,
            r = net.writable(), if wants.net_write => r?,
            r = app.readable(), if wants.app_read => r?,
            r = app.writable(), if wants.app_write => r?,
            // Every path above either finishes a direction or names what it waits for.
            else => return Err(io::Error::other("relay stalled with nothing to wait for")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A TLS server config for a throwaway self-signed name and a client config trusting it.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["relay.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A connected loopback socket pair.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A caller's TLS connection to a relay that forwards to the returned "app" socket (after
    /// sending it `to_app`), and the relay's task.
    async fn start(
        to_app: &[u8],
    ) -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        TcpStream,
        tokio::task::JoinHandle<io::Result<Relayed>>,
    ) {
        let (server_cfg, client_cfg) = configs();
        let (net_client, net_server) = socket_pair().await;
        let (app, mut app_relay_end) = socket_pair().await;
        let to_app = to_app.to_vec();
        let task = tokio::spawn(async move {
            let mut tls = TlsAcceptor::from(server_cfg)
                .accept(net_server)
                .await
                .unwrap();
            let (net, conn) = tls.get_mut();
            relay(net, &mut **conn, &mut app_relay_end, to_app, Vec::new()).await
        });
        let name = ServerName::try_from("relay.test").unwrap();
        let tls = TlsConnector::from(client_cfg)
            .connect(name, net_client)
            .await
            .unwrap();
        (tls, app, task)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// The relay sits on the server end of a TLS connection (as the inbound does) and forwards
    /// to an "app" socket. Megabytes cross both ways at once, intact and in order; the caller's
    /// close_notify reaches the app as end of stream, and the app's end of stream reaches the
    /// caller as close_notify; the counts are the plaintext moved.
    #[tokio::test]
    async fn moves_both_ways_at_once_and_passes_each_end_of_stream_on() {
        let (tls, mut app, relay_task) = start(b"early:").await;
        let up = pattern(3 << 20, 1);
        let down = pattern(5 << 20, 7);
        let (mut rd, mut wr) = tokio::io::split(tls);
        let (up2, down2) = (up.clone(), down.clone());
        let caller_writes = tokio::spawn(async move {
            wr.write_all(&up2).await.unwrap();
            // close_notify, then the TCP write side.
            wr.shutdown().await.unwrap();
        });
        let caller_reads = tokio::spawn(async move {
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            got
        });
        let app_side = tokio::spawn(async move {
            let (mut r, mut w) = app.split();
            let (got, wrote) = tokio::join!(
                async {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).await.unwrap();
                    got
                },
                async {
                    w.write_all(&down2).await.unwrap();
                    w.shutdown().await.unwrap();
                }
            );
            let () = wrote;
            got
        });
        caller_writes.await.unwrap();
        let at_app = app_side.await.unwrap();
        assert_eq!(&at_app[..6], b"early:");
        assert!(
            at_app[6..] == up[..],
            "the app got other bytes than were sent"
        );
        let at_caller = caller_reads.await.unwrap();
        assert!(
            at_caller == down,
            "the caller got other bytes than the app sent"
        );
        let moved = relay_task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Relayed {
                to_app: (up.len() + 6) as u64,
                to_mesh: down.len() as u64
            }
        );
    }

    /// A peer that drops the TCP connection without close_notify may have been cut short by an
    /// attacker: the relay reports it instead of passing a clean end of stream to the app.
    #[tokio::test]
    async fn a_stream_ended_without_close_notify_is_an_error() {
        let (mut tls, mut app, relay_task) = start(b"").await;
        tls.write_all(b"partial").await.unwrap();
        tls.flush().await.unwrap();
        let mut got = [0u8; 7];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"partial");
        // End the TCP stream under the TLS session: a FIN, no close_notify.
        tls.get_mut().0.shutdown().await.unwrap();
        let err = relay_task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
