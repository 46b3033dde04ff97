//! Ordinary test apps with no mesh code: an HTTP/1.1 + HTTP/2 (h2c) echo server, a recorder
//! that keeps every request exactly as it arrived, a gRPC echo service (unary and streaming)
//! and a TCP echo server. Each binds `127.0.0.1:0` on the calling
//! tokio runtime and answers with what it saw, including the `x-moat-peer-id` header.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt as _};

/// Generated code for `proto/echo.proto`.
pub mod echo {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("moat.test");
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let a = l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"));
    (l, a)
}

async fn http_handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Every value of a header, comma-joined: a second copy would show.
    let all = |name: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (peer, user, issuer) = (
        all("x-moat-peer-id"),
        all("x-moat-user"),
        all("x-moat-user-issuer"),
    );
    let bearer = req.headers().contains_key("authorization");
    let version = format!("{:?}", req.version());
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    if let Some(ms) = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("sleep_ms="))
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let text = format!(
        "method={method} path={path} version={version} peer={peer} user={user} issuer={issuer} bearer={bearer} body={body}\n"
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// An HTTP echo app (HTTP/1.1 and h2c). `?sleep_ms=N` delays the answer.
pub async fn http_echo() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(http_handler))
                    .await;
            });
        }
    });
    addr
}

/// One request exactly as an app received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// The HTTP version the request arrived in (`HTTP/1.1`, `HTTP/2.0`).
    pub version: String,
    /// The request target's path and query, byte for byte.
    pub path_and_query: String,
    /// Every header, names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Trailers, when the body had any.
    pub trailers: Vec<(String, String)>,
    /// The body's length in bytes.
    pub body_len: usize,
}

impl Received {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }
}

/// What a [`recording_http`] app has received so far.
pub type Recording = std::sync::Arc<std::sync::Mutex<Vec<Received>>>;

fn header_list(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// An HTTP app (HTTP/1.1 and h2c) that records every request it receives (method, raw target,
/// headers, trailers) and answers 200 `seen`. Security tests assert on this record: on what the
/// app RECEIVED, not only on the status a caller saw.
pub async fn recording_http() -> (SocketAddr, Recording) {
    recording(false).await
}

/// [`recording_http`] as an h2c-only server, which, as HTTP/2 servers do, sends its SETTINGS as
/// soon as a connection opens, before the client has sent anything.
pub async fn recording_h2() -> (SocketAddr, Recording) {
    recording(true).await
}

async fn recording(h2_only: bool) -> (SocketAddr, Recording) {
    let (listener, addr) = bind().await;
    let seen = Recording::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let record = record.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let record = record.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let (trailers, body_len) = match body.collect().await {
                        Ok(c) => (
                            c.trailers().map(header_list).unwrap_or_default(),
                            c.to_bytes().len(),
                        ),
                        Err(_) => (Vec::new(), 0),
                    };
                    let got = Received {
                        method: parts.method.to_string(),
                        version: format!("{:?}", parts.version),
                        path_and_query: parts
                            .uri
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default(),
                        headers: header_list(&parts.headers),
                        trailers,
                        body_len,
                    };
                    if let Ok(mut r) = record.lock() {
                        r.push(got);
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"seen\n"))))
                }
            });
            tokio::spawn(async move {
                let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if h2_only {
                    server = server.http2_only();
                }
                let _ = server.serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    (addr, seen)
}

/// How many requests an app received from each caller (`x-moat-peer-id`).
pub type ByCaller = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// The size of [`bulk_http`]'s `/big` answer: 20 MiB.
pub const BULK: usize = 20 * 1024 * 1024;

/// An HTTP app (HTTP/1.1 and h2c) for load and abuse scenarios: `/big` answers [`BULK`] bytes,
/// `/slow` answers after 200 ms, `/upload` reads the whole request body first and answers its
/// length, `/head/N` answers `ok` with an `x-filler` header of N bytes `f` (`/obs-head/N`: of
/// byte 0xDC, which HTTP allows as obs-text and HPACK's Huffman code makes 3.5 times longer),
/// anything else answers `ok`. Counts the requests of each caller.
pub async fn bulk_http() -> (SocketAddr, ByCaller) {
    let (listener, addr) = bind().await;
    let seen = ByCaller::default();
    let record = seen.clone();
    let big = Bytes::from(vec![b'x'; BULK]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (record, big) = (record.clone(), big.clone());
            let svc = service_fn(move |req: Request<Incoming>| {
                let (record, big) = (record.clone(), big.clone());
                async move {
                    let who = req
                        .headers()
                        .get("x-moat-peer-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?")
                        .to_owned();
                    if let Ok(mut r) = record.lock() {
                        *r.entry(who).or_default() += 1;
                    }
                    let path = req.uri().path();
                    let filler = [("/head/", b'f'), ("/obs-head/", 0xDC)]
                        .into_iter()
                        .find_map(|(prefix, byte)| {
                            Some((path.strip_prefix(prefix)?.parse::<usize>().ok()?, byte))
                        });
                    if let Some((n, byte)) = filler {
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        let value = http::HeaderValue::from_bytes(&vec![byte; n]);
                        if let Ok(v) = value {
                            resp.headers_mut().insert("x-filler", v);
                        }
                        return Ok(resp);
                    }
                    let body = match req.uri().path() {
                        "/big" => big,
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Bytes::from_static(b"ok")
                        }
                        "/upload" => {
                            let n = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            Bytes::from(n.to_string())
                        }
                        _ => Bytes::from_static(b"ok"),
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A TCP echo app.
pub async fn tcp_echo() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server-first TCP app: it greets with `220 moat test` before the client says anything,
/// then echoes.
pub async fn tcp_greeter() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if tcp.write_all(b"220 moat test\r\n").await.is_err() {
                    return;
                }
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[derive(Debug, Default)]
struct EchoSvc;

fn peer<T>(req: &tonic::Request<T>) -> String {
    req.metadata()
        .get("x-moat-peer-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<echo::EchoReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoSvc {
    async fn unary(
        &self,
        req: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, tonic::Status> {
        let peer = peer(&req);
        Ok(tonic::Response::new(echo::EchoReply {
            text: req.into_inner().text,
            peer,
        }))
    }

    type StreamStream = ReplyStream;

    async fn stream(
        &self,
        req: tonic::Request<tonic::Streaming<echo::EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let peer = peer(&req);
        let mut inbound = req.into_inner();
        let out = async_stream(move |tx| async move {
            while let Some(Ok(m)) = inbound.next().await {
                if tx
                    .send(Ok(echo::EchoReply {
                        text: m.text,
                        peer: peer.clone(),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(out))
    }
}

fn async_stream<F, Fut>(f: F) -> ReplyStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<echo::EchoReply, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A gRPC echo app (h2c).
pub async fn grpc_echo() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(echo::echo_server::EchoServer::new(EchoSvc))
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}
