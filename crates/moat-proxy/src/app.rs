//! The inbound's HTTP clients toward the local app. Each inbound connection gets its own pair
//! (HTTP/1.1 on kept-alive connections, [`Http1`], and h2c for gRPC and HTTP/2), which closes
//! with it, so what one caller does to its app connections — leaving flow-control windows at
//! zero, holding stream slots — stays with that caller (decision 30). Its h2c connections are
//! [`multiplex`] ones: the requests of one inbound connection come from every local client of
//! the calling sidecar, and none of them can make the app close a connection the others' requests
//! travel on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::Body;
use crate::keepalive::{self, Conn, Idle};
use crate::metrics::Metrics;
use crate::multiplex::{self, Keep, Lease, Leased};

/// How long an idle HTTP/1.1 connection to the app is kept for the next request.
pub const APP_KEEP: Duration = Duration::from_secs(60);

/// One inbound connection's clients to the app.
#[derive(Clone, Debug)]
pub struct Clients {
    /// HTTP/1.1, for requests whose client spoke HTTP/1.1.
    pub http1: Http1,
    /// h2c, for HTTP/2 and gRPC.
    pub http2: H2c,
}

impl Clients {
    /// Clients to the app at `addr`; a cancelled h2c stream lingers at most `linger` (see
    /// [`multiplex`]).
    pub fn new(addr: SocketAddr, linger: Duration) -> Self {
        Clients {
            http1: Http1::new(addr, APP_KEEP),
            http2: H2c {
                addr,
                linger,
                conns: Arc::default(),
            },
        }
    }
}

/// Why the app did not answer an HTTP/1.1 request.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("connect to the app: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http/1.1 handshake with the app: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("http/1.1 exchange with the app: {0}")]
    Exchange(#[source] hyper::Error),
}

/// HTTP/1.1 to the app on kept-alive connections that carry one request at a time (the parts of
/// [`keepalive`]): a request takes the newest idle connection, else a new one, and its
/// connection is kept once its response has ended. A connection idle for `keep` is closed, and
/// the rest close with the inbound connection. A request is sent at most once: a kept connection
/// the app closed before the request went out is replaced.
#[derive(Clone, Debug)]
pub struct Http1 {
    addr: SocketAddr,
    keep: Duration,
    idle: Arc<Idle>,
}

impl Http1 {
    /// A client to the app at `addr` whose connections are kept idle for `keep`.
    pub fn new(addr: SocketAddr, keep: Duration) -> Self {
        Http1 {
            addr,
            keep,
            idle: Arc::default(),
        }
    }

    /// Sends `req` (its target in origin form) to the app.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, Http1Error> {
        let mut req = req;
        loop {
            let kept = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                keepalive::take_newest(&mut idle, self.keep)
            };
            let fresh = kept.is_none();
            let mut conn = match kept {
                Some(c) => c,
                None => self.connect().await?,
            };
            if let Err(e) = conn.sender.ready().await {
                // A kept one closed since it was taken: the request is still here.
                if fresh {
                    return Err(Http1Error::Exchange(e));
                }
                continue;
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = keepalive::returning(conn, &self.idle, body);
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(Http1Error::Exchange(e.into_error())),
                },
            }
        }
    }

    /// A new connection to the app, driven by a task of its own until it closes.
    async fn connect(&self) -> Result<Conn, Http1Error> {
        let tcp = dial(self.addr).await.map_err(Http1Error::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(Http1Error::Handshake)?;
        let idle = Arc::new(keepalive::IdleSince::default());
        let watched = idle.clone();
        let (keep, app) = (self.keep, self.addr);
        tokio::spawn(async move {
            if let Err(e) = keepalive::drive(conn, &watched, keep).await {
                tracing::debug!(%app, error = %e, "HTTP/1.1 connection to the app ended with an error");
            }
        });
        Ok(Conn::new(sender, idle))
    }
}

/// A new TCP connection to the app, with Nagle off: requests and their answers are written whole.
async fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Why the app did not answer an h2c request.
#[derive(Debug, thiserror::Error)]
pub enum H2cError {
    #[error("connect to the app: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http/2 handshake with the app: {0}")]
    Handshake(#[source] h2::Error),
    #[error(transparent)]
    Stream(#[from] multiplex::StreamError),
    #[error("the app closed its connection before the request went out")]
    Closed,
}

/// HTTP/2 without TLS to the app, over shared connections opened as streams need them.
#[derive(Clone, Debug)]
pub struct H2c {
    addr: SocketAddr,
    linger: Duration,
    conns: Arc<tokio::sync::Mutex<Vec<Arc<multiplex::Conn>>>>,
}

impl H2c {
    /// Sends `req` to the app; `keep` is held until the response ends (or its stream is reset).
    pub async fn send(
        &self,
        req: Request<Body>,
        metrics: &Arc<Metrics>,
        keep: Keep,
    ) -> Result<Response<Leased>, H2cError> {
        let mut req = req;
        let mut keep = Some(keep);
        // A connection found closed is replaced once; a request is sent at most once.
        for _attempt in 0..2 {
            let mut lease = self.checkout(metrics).await?;
            if let Some(k) = keep.take() {
                lease = lease.keeping(k);
            }
            match lease.send(req).await {
                Ok(sent) => return Ok(sent.await?),
                Err(unsent) => req = unsent,
            }
        }
        Err(H2cError::Closed)
    }

    /// A stream slot on an open connection with room, dialled if there is none. Of the idle
    /// connections a burst left behind, one is kept.
    async fn checkout(&self, metrics: &Arc<Metrics>) -> Result<Lease, H2cError> {
        let mut conns = self.conns.lock().await;
        conns.retain(|c| c.usable());
        let mut idle_kept = false;
        conns.retain(|c| {
            let spare = c.is_idle() && idle_kept;
            idle_kept |= c.is_idle();
            !spare
        });
        if let Some(c) = conns.iter().find(|c| c.has_room()) {
            return Ok(Lease::new(c, metrics));
        }
        let tcp = dial(self.addr).await.map_err(H2cError::Connect)?;
        let conn = multiplex::Conn::handshake(
            multiplex::Settings::default(),
            tcp,
            "app",
            self.linger,
            self.addr.to_string(),
        )
        .await
        .map_err(H2cError::Handshake)?;
        let lease = Lease::new(&conn, metrics);
        conns.push(conn);
        Ok(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// What the app saw: connections accepted, connections ended, and each request's target
    /// and `host`.
    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        ended: AtomicUsize,
        requests: Mutex<Vec<(String, String)>>,
    }

    /// A real HTTP/1.1 app: `/big` answers 1 MiB, anything else `ok`.
    async fn app() -> (SocketAddr, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let seen = s.clone();
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let host = req
                                .headers()
                                .get(http::header::HOST)
                                .map(|h| h.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            seen.requests
                                .lock()
                                .unwrap()
                                .push((req.uri().to_string(), host));
                            let body = if req.uri().path() == "/big" {
                                vec![b'x'; 1 << 20]
                            } else {
                                b"ok".to_vec()
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(body)),
                                ))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    s.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, seen)
    }

    fn get(target: &str) -> Request<Body> {
        Request::get(target)
            .header(http::header::HOST, "orders.test")
            .body(crate::http::boxed(http_body_util::Empty::new()))
            .unwrap()
    }

    async fn read_all(resp: Response<Body>) -> Vec<u8> {
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    /// Waits for `cond`, for at most 5 s.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    impl Http1 {
        /// Idle connections still open.
        fn open_idle(&self) -> usize {
            let idle = self.idle.lock().unwrap();
            idle.iter().filter(|c| !c.sender.is_closed()).count()
        }
    }

    #[tokio::test]
    async fn requests_in_turn_share_one_connection_and_reach_the_app_in_origin_form() {
        let (addr, seen) = app().await;
        let client = Http1::new(addr, APP_KEEP);
        for target in ["/a?x=1", "/b", "/c/d?y=%20"] {
            let resp = client.send(get(target)).await.unwrap();
            assert_eq!(read_all(resp).await, b"ok");
        }
        assert_eq!(
            seen.accepted.load(Ordering::SeqCst),
            1,
            "one connection, kept"
        );
        let requests = seen.requests.lock().unwrap().clone();
        let want: Vec<_> = ["/a?x=1", "/b", "/c/d?y=%20"]
            .iter()
            .map(|t| (t.to_string(), "orders.test".to_string()))
            .collect();
        assert_eq!(requests, want);
        // Two at once need two connections; both are kept for the next ones.
        let (a, b) = tokio::join!(client.send(get("/e")), client.send(get("/f")));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(read_all(a).await, b"ok");
        assert_eq!(read_all(b).await, b"ok");
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        until("both kept", || client.open_idle() == 2).await;
        let (a, b) = tokio::join!(client.send(get("/g")), client.send(get("/h")));
        read_all(a.unwrap()).await;
        read_all(b.unwrap()).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2, "no third one");
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_takes_its_connection_with_it() {
        let (addr, seen) = app().await;
        let client = Http1::new(addr, APP_KEEP);
        let mut resp = client.send(get("/big")).await.unwrap();
        let first = resp.body_mut().frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(resp);
        until("the app saw it close", || {
            seen.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(client.open_idle(), 0, "not kept half read");
        let resp = client.send(get("/")).await.unwrap();
        assert_eq!(read_all(resp).await, b"ok");
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_idle_for_the_keep_time_is_closed_and_the_next_request_opens_one() {
        let (addr, seen) = app().await;
        let client = Http1::new(addr, Duration::from_millis(200));
        read_all(client.send(get("/")).await.unwrap()).await;
        until("kept", || client.open_idle() == 1).await;
        until("closed by this side", || {
            seen.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        read_all(client.send(get("/")).await.unwrap()).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_kept_connection_the_app_closed_is_replaced_without_losing_the_request() {
        // An app that answers one request per connection, then closes it without saying so
        // (as one does when its own keep-alive time runs out).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    let n = tcp.read(&mut buf).await.unwrap();
                    assert!(n > 0, "request head");
                    head.extend_from_slice(&buf[..n]);
                }
                tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        });
        let client = Http1::new(addr, APP_KEEP);
        read_all(client.send(get("/one")).await.unwrap()).await;
        until("the close seen", || client.open_idle() == 0).await;
        let resp = client.send(get("/two")).await.unwrap();
        assert_eq!(read_all(resp).await, b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
