//! Outbound: an explicit listener per upstream service (`--upstream orders=127.0.0.1:9001`).
//! The local app connects in plaintext; the proxy detects the protocol and carries it to an
//! endpoint of the service over mTLS that accepts only the service's expected identity: opaque
//! TCP on its own connection (ALPN moat-tcp), HTTP (HTTP/1.x, HTTP/2 and gRPC) multiplexed over
//! shared HTTP/2 connections (ALPN h2, see `pool::Upstreams`; decision 52).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use moat_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use crate::conn_guard::{Ended, RequestBody, serve_http};
use crate::ctx::Ctx;
use crate::detect::{Prefixed, Protocol, detect};
use crate::http::{
    Body, ORIG_PROTO, answer_here, boxed, deny, ensure_request_id, is_grpc, printable_path,
    request_target, strip_hop_by_hop,
};
use crate::metrics::TrafficLabels;
use crate::pool::Target;

/// Accepts app connections for `service` until shutdown.
pub async fn serve(listener: TcpListener, service: SpiffeId, ctx: Arc<Ctx>) {
    crate::net::accept_loop(listener, ctx, "outbound", move |tcp, remote, ctx| {
        connection(tcp, remote, Target::service(service.clone()), ctx)
    })
    .await
}

/// Carries one app connection to `target`: opaque TCP on its own mTLS connection, HTTP over
/// pooled ones.
pub async fn connection(mut tcp: TcpStream, remote: SocketAddr, target: Target, ctx: Arc<Ctx>) {
    // The port that names the protocol: the far app's in transparent mode, else our listener's.
    let port = target
        .port
        .or_else(|| tcp.local_addr().ok().map(|a| a.port()));
    let opaque = port.is_some_and(|p| ctx.cfg.opaque_ports.contains(&p));
    let (proto, seen) = if opaque {
        (Protocol::Tcp, Vec::new())
    } else {
        // A client silent through detection is carried as TCP; the far side goes on looking at
        // its first bytes (`inbound::undetermined`).
        match detect(&mut tcp).await {
            Ok((p, seen)) => (p.unwrap_or(Protocol::Tcp), seen),
            Err(e) => {
                tracing::debug!(%remote, error = %e, "outbound connection failed before detection");
                return;
            }
        }
    };
    let io = Prefixed::new(seen, tcp);
    match proto {
        Protocol::Tcp => tcp_forward(io, remote, &target, opaque, &ctx).await,
        Protocol::Http(version) => {
            let name = target.service.to_string();
            let conn = Arc::new(HttpConn {
                counters: ctx
                    .metrics
                    .for_connection("outbound", name.clone(), name.clone()),
                default_authority: target.service.service_account().to_string(),
                name,
                target,
            });
            let handler = {
                let ctx = ctx.clone();
                move |req| {
                    let (ctx, conn) = (ctx.clone(), conn.clone());
                    async move { forward(req, &conn, &ctx).await }
                }
            };
            match serve_http(
                io,
                version,
                handler,
                ctx.cfg.limits.for_local_clients(),
                &ctx.shutdown,
                std::future::pending(),
            )
            .await
            {
                Ended::Failed(e) => {
                    tracing::debug!(%remote, error = %e, "outbound HTTP connection ended with an error");
                }
                Ended::Guard(reason) => {
                    ctx.metrics.connection_closed("outbound", reason);
                    tracing::warn!(target: "moat::access", direction = "outbound", %remote, reason, "closed a local client's connection (see moat_connections_closed_total)");
                }
                Ended::Finished | Ended::Drained | Ended::Closed(_) => {}
            }
        }
    }
}

/// What every request of one outbound HTTP connection shares, worked out once.
struct HttpConn {
    target: Target,
    /// The target service's identity as text.
    name: String,
    counters: crate::metrics::ConnCounters,
    /// The authority for requests that name none.
    default_authority: String,
}

/// Resolves when the certificate `server` presented expires (`certificate-expired`) or a
/// snapshot revokes it (`revoked`).
async fn until_server_gone(ctx: &Ctx, server: &moat_identity::VerifiedPeer) -> &'static str {
    let mut snapshots = ctx.snapshot.clone();
    let revoked = async {
        loop {
            // The snapshot in hand first (it may have changed since the dial), then each new one.
            let snap = snapshots.borrow_and_update().clone();
            if snap.is_some_and(|s| s.is_revoked(&server.id, &server.serial)) {
                return "revoked";
            }
            if snapshots.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    tokio::select! {
        why = revoked => why,
        () = moat_tls::expiry::expired(server.not_after) => "certificate-expired",
    }
}

async fn tcp_forward(
    io: Prefixed<TcpStream>,
    remote: SocketAddr,
    to: &Target,
    opaque: bool,
    ctx: &Ctx,
) {
    let start = Instant::now();
    let target = to.service.to_string();
    let (ep, mut tls) = match ctx.pool.dial(ctx, to, moat_tls::ALPN_TCP).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(target: "moat::access", direction = "outbound", protocol = "tcp", %remote, target = %target, decision = "error", reason = "upstream-unavailable", error = %e, "tcp");
            return;
        }
    };
    // The far side's certificate bounds the connection as the caller's does at the far side
    // (decision 48): closed when it expires or is revoked.
    let server = moat_tls::peer_identity(tls.get_ref().1.peer_certificates());
    let (detected, mut app) = io.into_parts();
    let (net, conn) = tls.get_mut();
    let copy = crate::relay::relay(net, &mut **conn, &mut app, Vec::new(), detected);
    let result = match server {
        Some(server) => {
            let ended = until_server_gone(ctx, &server);
            tokio::select! {
                r = copy => r,
                why = ended => {
                    ctx.metrics.connection_closed("outbound", why);
                    tracing::info!(target: "moat::access", direction = "outbound", protocol = "tcp", %remote, target = %target, serial = %server.serial, reason = why, "closed a TCP connection: the far side's certificate is no longer good");
                    Err(std::io::Error::other(format!("closed: {why}")))
                }
            }
        }
        None => copy.await,
    };
    let (sent, received) = result
        .as_ref()
        .map(|r| (r.to_mesh, r.to_app))
        .unwrap_or((0, 0));
    ctx.metrics
        .tcp_connections
        .get_or_create(&TrafficLabels {
            direction: "outbound",
            peer: target.clone(),
            target: target.clone(),
            decision: "allow",
            reason: "forwarded",
        })
        .inc();
    ctx.metrics
        .tcp_bytes
        .get_or_create(&crate::metrics::BytesLabels {
            direction: "outbound",
            flow: "to_peer",
        })
        .inc_by(sent);
    ctx.metrics
        .tcp_bytes
        .get_or_create(&crate::metrics::BytesLabels {
            direction: "outbound",
            flow: "from_peer",
        })
        .inc_by(received);
    tracing::info!(target: "moat::access", direction = "outbound", protocol = "tcp", opaque, %remote, target = %target, endpoint = %ep, bytes_sent = sent, bytes_received = received, duration_ms = start.elapsed().as_millis() as u64, error = result.err().map(tracing::field::display), "tcp");
}

/// What became of one app request: sent to an endpoint (`Ok`, with the endpoint), or answered
/// here without leaving the sidecar (`Err`): refused, or no endpoint could take it.
type Sent = Result<(String, Response<Body>), Refused>;

/// A request answered by the outbound itself: the answer, and what its metrics and access-log
/// line say.
struct Refused {
    resp: Response<Body>,
    /// `deny` when the request itself is at fault, `allow` when the mesh failed it.
    decision: &'static str,
    reason: &'static str,
}

impl Refused {
    /// A request whose target cannot be sent on: 400 `invalid-target`.
    fn bad_target(e: &dyn std::fmt::Display, grpc: bool) -> Self {
        Refused {
            resp: answer_here(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {e}"),
                grpc,
            ),
            decision: "deny",
            reason: "invalid-target",
        }
    }
}

/// Forwards one app request to the service over the mesh ([`send`]), then counts it and writes
/// its one access-log line, whether it was sent or answered here.
async fn forward(req: Request<RequestBody>, conn: &HttpConn, ctx: &Ctx) -> Response<Body> {
    let (to, target) = (&conn.target, &conn.name);
    let service = &to.service;
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    // The hop's own headers go before the sidecar adds any (see the inbound's `forward`).
    strip_hop_by_hop(&mut parts.headers);
    let grpc = is_grpc(&parts.headers);
    // The span continues the app's trace and names itself to the other sidecar.
    let span = ctx.tracing.as_ref().map(|t| {
        t.request(
            &mut parts.headers,
            opentelemetry::trace::SpanKind::Client,
            "moat.outbound",
        )
    });
    let request_id = ensure_request_id(&mut parts.headers);
    let method = parts.method.clone();
    let path = printable_path(parts.uri.path());
    // A CONNECT is refused as the far side would (403 `method-not-supported`, with the reason
    // and the request id in the answer): a tunnel has no path for the far side's rules to judge,
    // and as an HTTP/2 stream it would be malformed (the far side resets it, and counts the reset
    // against the shared connection other clients' requests travel on).
    let sent = if moat_policy::is_forwarded_method(method.as_str()) {
        send(parts, body, grpc, conn, ctx).await
    } else {
        let reason = moat_policy::Reason::MethodNotSupported;
        Err(Refused {
            resp: deny(reason, None, &request_id, grpc, None),
            decision: "deny",
            reason: reason.code(),
        })
    };
    let (decision, reason, endpoint, mut resp) = match sent {
        Ok((ep, resp)) => ("allow", "forwarded", ep, resp),
        Err(r) => (r.decision, r.reason, String::new(), r.resp),
    };
    let detail = crate::http::answered_here(&mut resp, &request_id);
    let status = resp.status();
    let elapsed = start.elapsed();
    conn.counters
        .request(&ctx.metrics, decision, reason, status.as_u16(), elapsed);
    if let Some(span) = span {
        let service = service.to_string();
        let call = crate::tap::Call {
            protocol: "http",
            peer: &service,
            port: 0,
            method: method.as_str(),
            path: &path,
            status: status.as_u16(),
            grpc_status: None,
            decision,
            reason,
            policy: None,
            latency: elapsed,
            request_id: &request_id,
        };
        span.end(&call, &service);
    }
    tracing::info!(target: "moat::access", direction = "outbound", %method, path = %path, target = %target, endpoint = %endpoint, decision, reason, detail = detail.as_deref(), status = status.as_u16(), duration_ms = elapsed.as_millis() as u64, request_id = %request_id, "http");
    resp
}

/// Sends one app request on to an endpoint of the service, on the shared HTTP/2 connections
/// whatever its local client spoke (decision 52). A request that came as HTTP/1.x says so in
/// `x-moat-orig-proto`, and the far side sends it to its app as HTTP/1.1.
async fn send(
    mut parts: http::request::Parts,
    body: RequestBody,
    grpc: bool,
    conn: &HttpConn,
    ctx: &Ctx,
) -> Sent {
    let to = &conn.target;
    let (authority, pq) = request_target(&parts, &conn.default_authority);
    if parts.version == Version::HTTP_2 {
        parts.headers.remove(&ORIG_PROTO);
    } else {
        parts
            .headers
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        parts.version = Version::HTTP_2;
    }
    // The authority travels in the URI; a `Host` header would be a second, possibly other, one.
    parts.headers.remove(http::header::HOST);
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
        .map_err(|e| Refused::bad_target(&e, grpc))?;
    // A head grows on its way to HTTP/2 (32 bytes a field, and the marks above). One the far
    // side would not take is answered here: sent on, it would be refused there, or, once over
    // the bound within a block that CONTINUATION frames carry, end the shared connection.
    let size = crate::multiplex::request_head_size(&parts.method, &parts.uri, &parts.headers)
        + crate::multiplex::ADDED_BY_SEND;
    let limit = crate::multiplex::MAX_HEADER_LIST as usize;
    if size >= limit {
        return Err(Refused {
            resp: answer_here(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &format!(
                    "the request head is {size} bytes as HTTP/2 counts it (each field and 32 bytes), the mesh carries less than {limit}; send smaller headers"
                ),
                grpc,
            ),
            decision: "deny",
            reason: "head-too-large",
        });
    }
    let sent = ctx
        .pool
        .send(ctx, to, Request::from_parts(parts, boxed(body)))
        .await
        .map(|(ep, resp)| (ep, resp.map(boxed)));
    match sent {
        Ok((ep, resp)) => {
            let (mut rparts, rbody) = resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            Ok((ep, Response::from_parts(rparts, rbody)))
        }
        Err(e) => {
            let status = match e {
                crate::pool::DialError::NoEndpoints(_) | crate::pool::DialError::NotReady => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                crate::pool::DialError::AllFailed { .. } => StatusCode::BAD_GATEWAY,
            };
            tracing::warn!(service = %to.service, error = %e, "no endpoint of the service could take the request");
            Err(Refused {
                resp: answer_here(status, &e.to_string(), grpc),
                decision: "allow",
                reason: "forwarded",
            })
        }
    }
}
