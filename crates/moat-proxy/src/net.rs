//! Socket plumbing the listeners share: the accept loop, and copying a forwarded TCP
//! connection both ways.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::ctx::Ctx;

/// Bytes read at a time in each direction of a forwarded TCP connection: one full TLS record
/// (tokio's default, 8 KiB, halves the records and system calls per byte on the mTLS side).
const COPY_BUFFER: usize = 16 * 1024;

/// Accepts connections on `listener` until shutdown; each (with no-delay set) is handled by
/// `handle` on the drain tracker. `what` names the listener in logs.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        ctx.tracker.spawn(handle(tcp, remote, ctx.clone()));
    }
}

/// Copies both ways between `a` and `b` until both directions are done; returns the bytes
/// copied a→b and b→a.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}
