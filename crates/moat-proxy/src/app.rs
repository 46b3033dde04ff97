//! The inbound's HTTP clients toward the local app. Each inbound connection gets its own pair
//! (HTTP/1.1 with pooled keep-alive connections, and h2c for gRPC and HTTP/2), which closes
//! with it, so what one caller does to its app connections — resetting streams until the app
//! tears a connection down, leaving flow-control windows at zero, holding every stream slot —
//! stays with that caller (decision 30).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::http::Body;
use crate::pool;

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
    pub http2: HttpClient,
}

impl Clients {
    /// Clients to the app at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let build = |h2: bool| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .http2_only(h2)
                .http2_initial_stream_window_size(pool::STREAM_WINDOW)
                .http2_initial_connection_window_size(pool::CONNECTION_WINDOW)
                .pool_idle_timeout(Duration::from_secs(60))
                .build(Connector(addr))
        };
        Clients {
            http1: build(false),
            http2: build(true),
        }
    }
}
