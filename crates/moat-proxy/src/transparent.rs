//! Transparent outbound: connections the interception rules (`moat-proxy init`) redirect to this
//! listener. The original destination (SO_ORIGINAL_DST) decides: the address of a mesh endpoint
//! goes over mTLS to that endpoint, which must prove its service's identity, with the dialled
//! port carried along; anything else is passed through or closed (`--unknown-destinations`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::config::Unknown;
use crate::ctx::Ctx;
use crate::pool::Target;

/// Accepts redirected connections until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    crate::net::accept_loop(listener, ctx, "transparent", connection).await
}

/// The address the app dialled before the redirect.
fn original_destination(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
    let sin = getsockopt(tcp, OriginalDst).map_err(std::io::Error::from)?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
}

/// The mesh endpoint at `dest`'s address, if any: its service and endpoint, to `dest`'s port.
fn route(ctx: &Ctx, dest: SocketAddr) -> Option<Target> {
    let snap = ctx.snapshot.borrow().clone()?;
    for (service, endpoints) in &snap.services {
        for ep in endpoints {
            let host = ep.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']));
            if host.and_then(|h| h.parse::<std::net::IpAddr>().ok()) == Some(dest.ip()) {
                return Some(Target {
                    service: service.clone(),
                    endpoint: Some(ep.clone()),
                    port: Some(dest.port()),
                });
            }
        }
    }
    None
}

async fn connection(tcp: TcpStream, remote: SocketAddr, ctx: Arc<Ctx>) {
    let dest = match original_destination(&tcp) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "an intercepted connection has no original destination; closed");
            return;
        }
    };
    // Dialled directly rather than redirected: serving it would loop back to ourselves.
    if tcp.local_addr().is_ok_and(|l| l == dest) {
        tracing::warn!(%remote, "a connection to the transparent listener itself; closed");
        return;
    }
    match route(&ctx, dest) {
        Some(target) => crate::outbound::connection(tcp, remote, target, ctx).await,
        None => match ctx.cfg.unknown_destinations {
            Unknown::Deny => {
                tracing::info!(target: "moat::access", direction = "outbound", %remote, destination = %dest, decision = "deny", reason = "not-in-mesh", "tcp");
            }
            Unknown::Passthrough => passthrough(tcp, remote, dest).await,
        },
    }
}

async fn passthrough(mut tcp: TcpStream, remote: SocketAddr, dest: SocketAddr) {
    let mut upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(dest))
        .await
    {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            tracing::info!(%remote, destination = %dest, error = %e, "passthrough connect failed");
            return;
        }
        Err(_) => return,
    };
    let r = crate::net::copy_both_ways(&mut tcp, &mut upstream).await;
    tracing::info!(target: "moat::access", direction = "outbound", %remote, destination = %dest, decision = "passthrough", reason = "not-in-mesh", error = r.err().map(tracing::field::display), "tcp");
}
