//! The inbound's HTTP clients toward the local app. Each inbound connection gets its own pair
//! (HTTP/1.1 with pooled keep-alive connections, and h2c for gRPC and HTTP/2), which closes
//! with it, so what one caller does to its app connections — leaving flow-control windows at
//! zero, holding stream slots — stays with that caller (decision 30). Its h2c connections are
//! [`multiplex`] ones: the requests of one inbound connection come from every local client of
//! the calling sidecar, and none of them can make the app close a connection the others' requests
//! travel on.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::http::Body;
use crate::metrics::Metrics;
use crate::multiplex::{self, Keep, Lease, Leased};

/// Connects every app-bound request to the app's address.
#[derive(Clone, Debug)]
pub struct Connector(SocketAddr);

impl tower::Service<::http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ::http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

/// An HTTP client to the app.
pub type HttpClient = Client<Connector, Body>;

/// One inbound connection's clients to the app.
#[derive(Clone, Debug)]
pub struct Clients {
    /// HTTP/1.1, for requests whose client spoke HTTP/1.1.
    pub http1: HttpClient,
    /// h2c, for HTTP/2 and gRPC.
    pub http2: H2c,
}

impl Clients {
    /// Clients to the app at `addr`; a cancelled h2c stream lingers at most `linger` (see
    /// [`multiplex`]).
    pub fn new(addr: SocketAddr, linger: Duration) -> Self {
        Clients {
            http1: Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(Connector(addr)),
            http2: H2c {
                addr,
                linger,
                conns: Arc::default(),
            },
        }
    }
}

/// Why the app did not answer an h2c request.
#[derive(Debug, thiserror::Error)]
pub enum H2cError {
    #[error("connect to the app: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http/2 handshake with the app: {0}")]
    Handshake(#[source] hyper::Error),
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
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(H2cError::Connect)?;
        tcp.set_nodelay(true).map_err(H2cError::Connect)?;
        let conn = multiplex::Conn::handshake(
            &multiplex::builder(),
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
