//! Inbound: mTLS only. accept → TLS (client certificate required, chain checked against the
//! bundle) → peer SPIFFE ID → protocol (from ALPN, else detected) → authorize → forward to the
//! local app. Opaque TCP is authorized once per connection, and only by a rule with no HTTP part
//! (re-checked whenever a new snapshot arrives: a connection no longer allowed is closed). HTTP
//! is authorized per request on its canonical target ([`moat_policy::target`]), which is also
//! what the app receives; denials answer 403 / gRPC status 7 with the reason, a path that cannot
//! be made canonical 400 `invalid-path`, a CONNECT (a tunnel, never forwarded) 403
//! `method-not-supported`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt as _;
use moat_identity::SpiffeId;
use moat_policy::eval::{Decision, Input, Jwt, Reason, Traffic, decide};
use moat_tls::pending::{Limits, Outcome};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};

use crate::conn_guard::{Ended, RequestBody, serve_http};
use crate::ctx::Ctx;
use crate::detect::{HttpVersion, Prefixed, Protocol, detect};
use crate::http::{
    Body, ORIG_PROTO, PEER_ID, USER, USER_ISSUER, answer_here, boxed, deny, ensure_request_id,
    is_grpc, keep_body_framing, printable_path, request_authority, strip_hop_by_hop,
    strip_identity_headers,
};
use crate::metrics::TrafficLabels;
use crate::snapshot::Snapshot;

/// Handshakes the inbound lets wait (decision 44): from one source address as many as one
/// caller may have requests in flight, each on a connection of its own over HTTP/1.1, as a
/// client that is not a sidecar may send them (`requests_per_caller`,
/// from 1,024 to 8,192: at the limit each new connection scans what is pending), twice that in
/// all, each given 10 s, a hello counting as a caller at work for 1 s; all of it within half of
/// `open_files`. Anyone who reaches the port can open a connection, certificate or not, so
/// without a bound a stranger could hold sockets until the sidecar ran out of them.
pub fn pending_handshakes(requests_per_caller: usize, open_files: u64) -> Limits {
    let per_source = requests_per_caller.clamp(1024, 8192);
    Limits {
        per_source,
        total: per_source.saturating_mul(2),
        deadline: Duration::from_secs(10),
        at_work: Duration::from_secs(1),
    }
    .within(open_files)
}

/// Accepts mesh connections until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    crate::net::accept_loop(listener, ctx, "inbound", connection).await
}

/// Where a mesh connection's traffic goes: `--app`, or in transparent mode the port the caller
/// dialled (carried in the TLS server name) on this pod's own address, never one of the proxy's
/// own ports: its inbound, admin and transparent listeners, nor an `--upstream` listener, which
/// would send the caller's requests on with this sidecar's identity.
fn app_addr(
    ctx: &Ctx,
    server_name: Option<&str>,
    local: Option<SocketAddr>,
) -> Result<SocketAddr, &'static str> {
    if let Some(a) = ctx.cfg.app {
        return Ok(a);
    }
    let port = crate::pool::port_from_server_name(server_name).ok_or("no-app-port")?;
    let own = [
        Some(ctx.cfg.inbound.port()),
        Some(ctx.cfg.admin.port()),
        ctx.cfg.transparent.map(|t| t.port()),
    ];
    dialled_app(
        port,
        local,
        &own,
        ctx.cfg.upstreams.iter().map(|u| u.listen),
    )
}

/// The address a transparent-mode connection that arrived at `local` and dialled `port` goes
/// to: that port on that address, unless one of the proxy's own listeners answers there (`own`
/// ports listen on every address, `upstreams` where they say).
fn dialled_app(
    port: u16,
    local: Option<SocketAddr>,
    own: &[Option<u16>],
    mut upstreams: impl Iterator<Item = SocketAddr>,
) -> Result<SocketAddr, &'static str> {
    if own.contains(&Some(port)) {
        return Err("proxy-port");
    }
    // An IPv4 caller on a dual-stack inbound arrives at `::ffff:a.b.c.d`, where a listener on
    // `a.b.c.d` answers too: addresses are compared in their canonical form.
    let ip = local
        .map(|l| l.ip().to_canonical())
        .ok_or("no-local-address")?;
    // An `--upstream` listener answers there if it listens on that address or on all of them.
    if upstreams.any(|listen| {
        let at = listen.ip().to_canonical();
        listen.port() == port && (at == ip || at.is_unspecified())
    }) {
        return Err("proxy-port");
    }
    Ok(SocketAddr::new(ip, port))
}

/// One mesh connection: mTLS with a verified caller ([`accept_tls`]), the app it is for, its
/// protocol, then opaque TCP ([`tcp_forward`]) or HTTP ([`serve_requests`]). A verified
/// identity holds at most `--max-connections-per-caller` connections; one more is closed before
/// any of it reaches the app.
async fn connection(tcp: TcpStream, remote: SocketAddr, ctx: Arc<Ctx>) {
    let local = tcp.local_addr().ok();
    let Some((tls, peer)) = accept_tls(tcp, remote, &ctx).await else {
        return;
    };
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let app = match app_addr(&ctx, conn.server_name(), local) {
        Ok(a) => a,
        Err(reason) => {
            tracing::info!(target: "moat::access", direction = "inbound", %remote, decision = "deny", reason, "no app port for this connection (transparent mode needs the caller's port)");
            return;
        }
    };
    if authorize(&ctx, &peer, app.port(), Traffic::Connection).reason == Reason::Revoked {
        ctx.metrics.handshake_failed("inbound", "revoked".into());
        tracing::info!(target: "moat::access", direction = "inbound", %remote, peer = %peer, serial = %peer.serial, decision = "deny", reason = "revoked", "refused a revoked certificate");
        return;
    }
    // The caller's place among its open connections, held until this one ends. The same key
    // counts its requests in flight.
    let caller: Arc<str> = Arc::from(peer.name.as_str());
    let Some(_open) = ctx.caller_connections.try_acquire(&caller) else {
        ctx.metrics
            .connection_closed("inbound", "too-many-connections");
        tracing::info!(target: "moat::access", direction = "inbound", %remote, peer = %peer, decision = "deny", reason = "too-many-connections", "refused a connection: the caller holds as many as --max-connections-per-caller allows");
        return;
    };
    let (proto, seen, tls) = match alpn.as_deref() {
        Some(moat_tls::ALPN_H2) => (Some(Protocol::Http(HttpVersion::Http2)), Vec::new(), tls),
        // Declared opaque by the operator: carried as it comes, never looked at.
        _ if ctx.cfg.opaque_ports.contains(&app.port()) => (Some(Protocol::Tcp), Vec::new(), tls),
        // A sidecar's opaque TCP: what its client sends first is still to be looked at.
        Some(moat_tls::ALPN_TCP) => (None, Vec::new(), tls),
        _ => {
            let mut tls = tls;
            match detect(&mut tls).await {
                Ok((p, seen)) => (p, seen, tls),
                Err(_) => return,
            }
        }
    };
    let settled = match proto {
        Some(proto) => Undetermined {
            proto,
            seen,
            tls,
            app_conn: None,
            from_app: Vec::new(),
        },
        None => match undetermined(seen, tls, &peer, app, &ctx).await {
            Some(settled) => settled,
            None => return,
        },
    };
    let io = Prefixed::new(settled.seen, settled.tls);
    let app_side = (settled.app_conn, settled.from_app);
    match settled.proto {
        Protocol::Tcp => tcp_forward(io, app_side, remote, peer, app, &ctx).await,
        Protocol::Http(version) => {
            serve_requests(io, version, remote, peer, caller, app, ctx).await
        }
    }
}

/// A connection whose client has not shown what it speaks: silent through detection (or silent
/// after bytes that decide nothing), or a sidecar's opaque TCP (`moat-tcp`), whose own client
/// may not have sent anything yet. HTTP must never reach the app as opaque bytes, where no rule
/// judges its requests and nothing removes the `x-moat-*` headers a caller wrote into them, so
/// the client's first bytes are classified whenever they come (decision 54):
/// - when a rule admits this caller's opaque TCP to the port, the app is connected at once, and
///   an app that speaks first with anything but an HTTP/2 server's SETTINGS (a server-first
///   protocol: SMTP, MySQL) makes the connection TCP, its greeting the first bytes relayed. An
///   HTTP/2 app greets every client that way, so its connection is closed unused and the
///   caller's bytes decide, as when the app closes. Caller bytes that decide nothing go on to
///   the app as they come (no request line is among them), so a protocol whose first message is
///   a bare word (`ping`) gets its answer, which makes it TCP;
/// - otherwise (and once the app's connection is closed) the caller's first bytes are awaited
///   as an HTTP connection awaits its first request.
///
/// Either way a caller silent for `--idle-timeout` (with an app silent too) is closed, never
/// taken as TCP.
///
/// First bytes that decide nothing (the start of a request line, a bare word the app does not
/// answer) must settle within `--header-read-timeout`, or the connection is closed: going on as
/// TCP would let a caller pause inside its request line to pass it through unjudged.
///
/// Returns the protocol, the caller's bytes still to send, the app connection TCP goes on and
/// the app's bytes still to send; `None` when the caller failed or did not settle.
async fn undetermined(
    mut seen: Vec<u8>,
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: &Caller,
    app: SocketAddr,
    ctx: &Ctx,
) -> Option<Undetermined> {
    let now = tokio::time::Instant::now();
    let quiet_until = now + ctx.cfg.limits.idle;
    let opaque = authorize(ctx, peer, app.port(), Traffic::Opaque).allowed;
    let mut app_conn = Tentative(if opaque {
        match tokio::time::timeout_at(quiet_until, TcpStream::connect(app)).await {
            Ok(Ok(a)) => Some(a),
            Ok(Err(e)) => {
                tracing::warn!(app = %app, error = %e, "cannot reach the app");
                return None;
            }
            Err(_) => {
                tracing::warn!(app = %app, "cannot reach the app: no answer within --idle-timeout");
                return None;
            }
        }
    } else {
        None
    });
    // Since the first bytes that did not settle it came.
    let mut unsettled = (!seen.is_empty()).then_some(now);
    // How much of `seen` the app connection has.
    let mut written = 0;
    let mut greeting = vec![0u8; 16 * 1024];
    // How much of `greeting` the app has sent.
    let mut greeted = 0;
    let unsettled_close = || {
        ctx.metrics
            .connection_closed("inbound", "unsettled-protocol");
        tracing::info!(target: "moat::access", direction = "inbound", %peer, decision = "deny", reason = "unsettled-protocol", "closed a connection whose first bytes settled nothing within --header-read-timeout");
    };
    let (proto, from_app) = loop {
        let settle_by = unsettled.map(|at| at + ctx.cfg.limits.header_read);
        if let Some(conn) = app_conn.0.as_mut()
            && written < seen.len()
            && !crate::detect::may_be_h2_preface(&seen)
        {
            // Bytes to write are bytes that settled nothing, so the settling deadline runs: an
            // app that does not read cannot hold the connection past it.
            let write = tokio::io::AsyncWriteExt::write_all(conn, &seen[written..]);
            match tokio::time::timeout_at(settle_by.unwrap_or(quiet_until), write).await {
                Ok(Ok(())) => written = seen.len(),
                Ok(Err(e)) => {
                    tracing::debug!(%app, error = %e, "the app closed before the caller's first bytes settled");
                    (app_conn, written) = (Tentative(None), 0);
                    continue;
                }
                Err(_) => {
                    unsettled_close();
                    return None;
                }
            }
        }
        tokio::select! {
            read = crate::detect::read_more(&mut tls, &mut seen) => match read {
                // What the app sent so far (the start of what could have been an HTTP/2
                // server's SETTINGS) goes first, to the caller of the TCP it is part of.
                Ok(Some(Protocol::Tcp)) if app_conn.0.is_some() => {
                    greeting.truncate(greeted);
                    break (Protocol::Tcp, greeting);
                }
                Ok(Some(p)) => break (p, Vec::new()),
                Ok(None) => {
                    unsettled.get_or_insert_with(tokio::time::Instant::now);
                }
                Err(_) => return None,
            },
            n = async { app_conn.0.as_mut()?.read(&mut greeting[greeted..]).await.ok() }, if app_conn.0.is_some() => {
                greeted += n.unwrap_or(0);
                let sent = &greeting[..greeted];
                match n {
                    Some(n) if n > 0 && crate::detect::may_be_h2_settings(sent) => {}
                    Some(n) if n > 0 && !crate::detect::is_h2_settings(sent) => {
                        greeting.truncate(greeted);
                        break (Protocol::Tcp, greeting);
                    }
                    // Closed, failed, or an HTTP/2 server: the caller's bytes decide, and TCP
                    // would go on a new connection with all of them.
                    _ => (app_conn, written, greeted) = (Tentative(None), 0, 0),
                }
            }
            // Silence decides nothing, whatever the rules: TCP from a caller that has said
            // nothing yet would carry whatever it says next unlooked-at.
            // An app that is silent too (an HTTP server waiting for its request) holds nothing
            // open past it either.
            () = tokio::time::sleep_until(quiet_until), if unsettled.is_none() => {
                ctx.metrics.connection_closed("inbound", "idle");
                tracing::debug!(%peer, "closed a connection whose caller sent nothing within --idle-timeout");
                return None;
            }
            () = tokio::time::sleep_until(settle_by.unwrap_or(quiet_until)), if settle_by.is_some() => {
                unsettled_close();
                return None;
            }
        }
    };
    // TCP goes on where the app's connection is; HTTP is served from every byte seen, on the
    // inbound's own app clients, and the bytes written to this connection (no request line) go
    // no further: it closes unused.
    let app_conn = if proto == Protocol::Tcp {
        seen.drain(..written);
        app_conn.0.take()
    } else {
        None
    };
    Some(Undetermined {
        proto,
        seen,
        tls,
        app_conn,
        from_app,
    })
}

/// The app connection [`undetermined`] opens before the caller's protocol is known. Unless it is
/// handed on to carry TCP, dropping it resets it (RST) rather than closing it: the app may hold
/// the start of a request line that settled nothing, which a server reading up to the end of
/// the stream (Python's `readline`) would take as a whole request, unjudged.
struct Tentative(Option<TcpStream>);

impl Drop for Tentative {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            let _ = conn.set_zero_linger();
        }
    }
}

/// What [`undetermined`] settled.
struct Undetermined {
    proto: Protocol,
    /// The caller's bytes not yet sent on.
    seen: Vec<u8>,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    /// The app connection TCP goes on, when one is open.
    app_conn: Option<TcpStream>,
    /// The app's bytes not yet sent to the caller (a server-first protocol's greeting).
    from_app: Vec<u8>,
}

/// The TLS handshake, with the caller's certificate required and checked: its SPIFFE ID, and
/// (for a resumed session, which skips chain verification) that it has not expired since.
/// `None` when the caller is refused (counted and logged here).
async fn accept_tls(
    tcp: TcpStream,
    remote: SocketAddr,
    ctx: &Ctx,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Caller)> {
    let Some(current) = ctx.tls.borrow().clone() else {
        tracing::info!(%remote, "refused a connection: no certificate yet");
        return None;
    };
    let Some(slot) = ctx.handshakes.admit(remote.ip()) else {
        // Counted, not logged per connection: anyone can provoke it.
        ctx.metrics.handshake_failed("inbound", "busy".into());
        tracing::debug!(%remote, "closed a new connection: every pending handshake is a caller at work");
        return None;
    };
    for _ in 0..slot.evicted() {
        ctx.metrics.handshake_failed("inbound", "evicted".into());
    }
    let pending = moat_metrics::Held::new(&ctx.metrics.handshakes_pending);
    let outcome = slot.handshake(tcp, current.server.clone()).await;
    drop(pending);
    let tls = match outcome {
        Outcome::Done(t) => *t,
        Outcome::Failed(e) => {
            let reason = moat_tls::HandshakeFailure::of(&e).code();
            ctx.metrics.handshake_failed("inbound", reason.into());
            tracing::info!(target: "moat::access", direction = "inbound", %remote, decision = "deny", reason, error = %e, "TLS handshake refused");
            return None;
        }
        Outcome::TimedOut => {
            ctx.metrics.handshake_failed("inbound", "timeout".into());
            tracing::info!(target: "moat::access", direction = "inbound", %remote, decision = "deny", reason = "handshake-timeout", "TLS handshake refused");
            return None;
        }
        Outcome::Evicted => {
            tracing::debug!(%remote, "closed a pending handshake to make room for a newer one");
            return None;
        }
    };
    ctx.metrics
        .handshake_done("inbound", tls.get_ref().1.handshake_kind());
    // Client auth is required, so a completed handshake always has a verified chain.
    let Some(peer) = moat_tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        ctx.metrics
            .handshake_failed("inbound", "no-spiffe-id".into());
        return None;
    };
    if peer.not_after <= moat_identity::clock::unix_now() {
        ctx.metrics
            .handshake_failed("inbound", "certificate-expired".into());
        tracing::info!(target: "moat::access", direction = "inbound", %remote, peer = %peer.id, serial = %peer.serial, decision = "deny", reason = "certificate-expired", "refused a resumed session whose certificate has expired");
        return None;
    }
    let caller = Caller {
        name: peer.id.to_string(),
        id: peer.id,
        serial: peer.serial,
        not_after: peer.not_after,
    };
    Some((tls, caller))
}

/// Serves the HTTP requests of one mesh connection until it ends, each authorized on its own
/// ([`forward`]). A connection admitted now is closed (gracefully) once a new snapshot forbids
/// the caller; one that was never admitted stays open to answer each request with 403 (until the
/// caller is revoked). Either way it is closed when the caller's certificate expires (decision
/// 48). `caller` is the peer's key in the per-caller counts.
async fn serve_requests(
    io: Prefixed<tokio_rustls::server::TlsStream<TcpStream>>,
    version: HttpVersion,
    remote: SocketAddr,
    peer: Caller,
    caller: Arc<str>,
    app: SocketAddr,
    ctx: Arc<Ctx>,
) {
    let port = app.port();
    let admitted = authorize(&ctx, &peer, port, Traffic::Connection).allowed;
    // The app's HTTP clients, this connection's own (decision 30).
    let conn = Arc::new(HttpConn {
        clients: crate::app::Clients::new(
            app,
            ctx.cfg.limits.request_idle / crate::multiplex::LINGER_SHARE_OF_REQUEST_IDLE,
        ),
        counters: ctx.metrics.for_connection(
            "inbound",
            peer.name.clone(),
            ctx.cfg.identity.to_string(),
        ),
        peer_header: HeaderValue::from_str(&peer.name).ok(),
        app_authority: app.to_string(),
        peer: peer.clone(),
        caller,
        app,
    });
    let handler = {
        let ctx = ctx.clone();
        move |req| {
            let (ctx, conn) = (ctx.clone(), conn.clone());
            async move { forward(req, &conn, &ctx).await }
        }
    };
    let closed = until_forbidden(&ctx, &peer, port, admitted);
    match serve_http(io, version, handler, ctx.cfg.limits, &ctx.shutdown, closed).await {
        Ended::Failed(e) => {
            tracing::debug!(%remote, error = %e, "inbound HTTP connection ended with an error")
        }
        Ended::Guard(reason) => {
            ctx.metrics.connection_closed("inbound", reason);
            tracing::warn!(target: "moat::access", direction = "inbound", %remote, peer = %peer, reason, "closed the connection (see moat_connections_closed_total)");
        }
        Ended::Closed(CERTIFICATE_EXPIRED) => {
            ctx.metrics
                .connection_closed("inbound", CERTIFICATE_EXPIRED);
            tracing::info!(target: "moat::access", direction = "inbound", %remote, peer = %peer, serial = %peer.serial, decision = "deny", reason = CERTIFICATE_EXPIRED, "closed an HTTP connection: the certificate the caller opened it with has expired");
        }
        Ended::Closed(reason) => {
            ctx.metrics.connection_closed("inbound", "policy");
            tracing::info!(target: "moat::access", direction = "inbound", %remote, peer = %peer, decision = "deny", reason, "closing an HTTP connection the new policy no longer allows")
        }
        Ended::Finished | Ended::Drained => {}
    }
}

/// What every request of one inbound HTTP connection shares, worked out once.
struct HttpConn {
    peer: Caller,
    /// The caller's name as the key of its count of requests in flight.
    caller: Arc<str>,
    app: SocketAddr,
    /// The app's HTTP/1.1 and HTTP/2 clients.
    clients: crate::app::Clients,
    counters: crate::metrics::ConnCounters,
    /// `x-moat-peer-id` for the app.
    peer_header: Option<HeaderValue>,
    /// The authority for requests that name none.
    app_authority: String,
}

/// A verified caller: its SPIFFE ID and the serial and NotAfter (Unix seconds) of the
/// certificate it presented.
#[derive(Clone, Debug)]
struct Caller {
    id: SpiffeId,
    /// `id` as text, formatted once per connection.
    name: String,
    serial: String,
    not_after: i64,
}

/// Why a connection was closed when the certificate its caller presented expired.
const CERTIFICATE_EXPIRED: &str = "certificate-expired";

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Resolves with the deny reason once a new snapshot revokes `peer`, or (for a connection that
/// was `admitted`) no longer admits it at all; or with [`CERTIFICATE_EXPIRED`] once the
/// certificate `peer` presented expires: a renewed one would have to open a new connection.
async fn until_forbidden(ctx: &Ctx, peer: &Caller, port: u16, admitted: bool) -> &'static str {
    let mut snapshots = ctx.snapshot.clone();
    let forbidden = async {
        loop {
            if snapshots.changed().await.is_err() {
                return std::future::pending().await;
            }
            let d = authorize(ctx, peer, port, Traffic::Connection);
            if d.reason == Reason::Revoked || (admitted && !d.allowed) {
                return d.reason.code();
            }
        }
    };
    tokio::select! {
        reason = forbidden => reason,
        () = moat_tls::expiry::expired(peer.not_after) => CERTIFICATE_EXPIRED,
    }
}

fn authorize(ctx: &Ctx, caller: &Caller, port: u16, traffic: Traffic<'_>) -> Decision {
    let snap = ctx.snapshot.borrow().clone();
    authorize_in(snap.as_deref(), caller, port, traffic)
}

/// [`authorize`] against a snapshot the caller already holds.
fn authorize_in(
    snap: Option<&Snapshot>,
    caller: &Caller,
    port: u16,
    traffic: Traffic<'_>,
) -> Decision {
    let peer = &caller.id;
    // Revocations come first: no policy can allow a revoked identity or certificate.
    if snap.is_some_and(|s| s.is_revoked(peer, &caller.serial)) {
        return Decision::refused(Reason::Revoked);
    }
    // No snapshot yet: nothing is known to be allowed.
    let fallback;
    let (policies, mesh) = match snap {
        Some(s) => (&s.policies[..], &s.mesh),
        None => {
            fallback = moat_policy::MeshConfig::default();
            (&[][..], &fallback)
        }
    };
    decide(
        policies,
        mesh,
        &Input {
            peer,
            port,
            traffic,
        },
    )
}

fn decision_label(d: &Decision) -> &'static str {
    d.effect().as_str()
}

/// Whether this sidecar's allow-list only watches (see [`crate::observe`]).
fn watching(ctx: &Ctx) -> bool {
    ctx.snapshot
        .borrow()
        .as_deref()
        .is_some_and(crate::observe::watching)
}

fn policy_label(d: &Decision) -> Option<String> {
    let (key, version) = d.policy.as_ref()?;
    // Per request: one allocation that fits a 20-digit version, no formatting machinery.
    let mut label = String::with_capacity(key.len() + 21);
    label.push_str(key);
    label.push('@');
    label.push_str(itoa::Buffer::new().format(version.0));
    Some(label)
}

/// Relays an opaque TCP connection to the app (on the connection of `app_side`, when one was
/// opened already, after the app's bytes read from it), once a rule without `http` or `jwt`
/// admits it; re-checked on every new snapshot.
async fn tcp_forward(
    io: Prefixed<tokio_rustls::server::TlsStream<TcpStream>>,
    app_side: (Option<TcpStream>, Vec<u8>),
    remote: SocketAddr,
    peer: Caller,
    app: SocketAddr,
    ctx: &Ctx,
) {
    let start = Instant::now();
    // Opaque TCP carries no route and no end-user token: only a rule without either admits it.
    let d = authorize(ctx, &peer, app.port(), Traffic::Opaque);
    ctx.metrics.count_rule(&d);
    let reason = d.would_deny.unwrap_or(d.reason).code();
    let labels = TrafficLabels {
        direction: "inbound",
        peer: peer.to_string(),
        target: ctx.cfg.identity.to_string(),
        decision: decision_label(&d),
        reason,
    };
    ctx.metrics.authz.get_or_create(&labels).inc();
    ctx.metrics.tcp_connections.get_or_create(&labels).inc();
    if !d.allowed {
        let policy = policy_label(&d);
        tap_tcp(ctx, &peer, app.port(), &d, reason, policy.as_deref(), start);
        tracing::info!(target: "moat::access", direction = "inbound", protocol = "tcp", %remote, peer = %peer, decision = "deny", reason, policy = policy.as_deref().unwrap_or("-"), "tcp");
        return;
    }
    let app_addr = app;
    let (app_conn, from_app) = app_side;
    let connected = match app_conn {
        Some(a) => Ok(a),
        None => TcpStream::connect(app_addr).await,
    };
    let mut app = match connected {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(app = %app_addr, error = %e, "cannot reach the app");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    // Re-check on every new snapshot; close the connection when it is no longer allowed, or
    // when the caller's certificate expires (decision 48).
    let mut snapshots = ctx.snapshot.clone();
    let (detected, mut tls) = io.into_parts();
    let (net, conn) = tls.get_mut();
    let copy = crate::relay::relay(net, &mut **conn, &mut app, detected, from_app);
    tokio::pin!(copy);
    let expired = moat_tls::expiry::expired(peer.not_after);
    tokio::pin!(expired);
    // The snapshots end when the proxy starts draining: the connection then carries on until
    // it ends or the drain timeout ends the process.
    let mut snapshots_open = true;
    let outcome = loop {
        tokio::select! {
            r = &mut copy => break r.map_err(|e| e.to_string()),
            changed = snapshots.changed(), if snapshots_open => {
                if changed.is_err() {
                    snapshots_open = false;
                    continue;
                }
                let again = authorize(ctx, &peer, app_addr.port(), Traffic::Opaque);
                if !again.allowed {
                    tracing::info!(target: "moat::access", direction = "inbound", protocol = "tcp", %remote, peer = %peer, decision = "deny", reason = again.reason.code(), "closing a connection the new policy no longer allows");
                    break Err(format!("closed: {}", again.reason.code()));
                }
            }
            () = &mut expired => {
                ctx.metrics.connection_closed("inbound", CERTIFICATE_EXPIRED);
                tracing::info!(target: "moat::access", direction = "inbound", protocol = "tcp", %remote, peer = %peer, serial = %peer.serial, decision = "deny", reason = CERTIFICATE_EXPIRED, "closed a TCP connection: the certificate the caller opened it with has expired");
                break Err(format!("closed: {CERTIFICATE_EXPIRED}"));
            }
        }
    };
    let (to_app, from_app) = outcome
        .as_ref()
        .map(|r| (r.to_app, r.to_mesh))
        .unwrap_or((0, 0));
    // Counted for `moat policy suggest` only once the caller sent something: a connection that
    // carried nothing (an idle pooled connection that detection gave up on) is no evidence.
    if d.allowed && to_app > 0 && watching(ctx) {
        ctx.metrics
            .observed
            .record(&peer.name, app_addr.port(), "", "");
    }
    ctx.metrics
        .tcp_bytes
        .get_or_create(&crate::metrics::BytesLabels {
            direction: "inbound",
            flow: "to_app",
        })
        .inc_by(to_app);
    ctx.metrics
        .tcp_bytes
        .get_or_create(&crate::metrics::BytesLabels {
            direction: "inbound",
            flow: "from_app",
        })
        .inc_by(from_app);
    let policy = policy_label(&d);
    tap_tcp(
        ctx,
        &peer,
        app_addr.port(),
        &d,
        reason,
        policy.as_deref(),
        start,
    );
    tracing::info!(target: "moat::access", direction = "inbound", protocol = "tcp", %remote, peer = %peer, decision = decision_label(&d), reason, policy = policy.as_deref().unwrap_or("-"), bytes_to_app = to_app, bytes_from_app = from_app, duration_ms = start.elapsed().as_millis() as u64, error = outcome.err().map(tracing::field::display), "tcp");
}

/// Offers an opaque TCP connection to the open taps, if any.
fn tap_tcp(
    ctx: &Ctx,
    peer: &Caller,
    port: u16,
    d: &Decision,
    reason: &str,
    policy: Option<&str>,
    start: Instant,
) {
    if ctx.metrics.tap.active() {
        ctx.metrics.tap.offer(&crate::tap::Call {
            protocol: "tcp",
            peer: &peer.name,
            port,
            method: "",
            path: "",
            status: 0,
            grpc_status: None,
            decision: decision_label(d),
            reason,
            policy,
            latency: start.elapsed(),
            request_id: "",
        });
    }
}

/// Whether any rule of this proxy's policies requires an end-user token (only then is one
/// verified).
fn needs_token(s: &Snapshot) -> bool {
    s.policies
        .iter()
        .any(|p| p.rules.iter().any(|r| r.jwt.is_some()))
}

/// The end-user token a request carries, as the sidecar verifies it.
#[derive(Debug, PartialEq, Eq)]
enum Bearer<'a> {
    /// No `Authorization: Bearer …` header.
    Absent,
    /// The token of the one `Authorization` header, a Bearer one.
    One(&'a str),
    /// More than one `Authorization` header: the app could read another than the one verified,
    /// so none is taken.
    Several,
    /// An `Authorization` header that is not visible ASCII.
    Unreadable,
}

/// The token of an `Authorization: Bearer …` header; [`Bearer::Several`] when the request has
/// more than one `Authorization` header of any scheme.
fn bearer(headers: &http::HeaderMap) -> Bearer<'_> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(first) = all.next() else {
        return Bearer::Absent;
    };
    if all.next().is_some() {
        return Bearer::Several;
    }
    let Ok(value) = first.to_str() else {
        return Bearer::Unreadable;
    };
    value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .map_or(Bearer::Absent, Bearer::One)
}

/// The policy (key and version) whose rate limit refuses the request `d` allowed, and how long
/// until it would admit another: every limited rule that admits the request takes a token, all or none
/// ([`moat_policy::limiting_rules`]).
fn over_limit(
    ctx: &Ctx,
    snap: &Snapshot,
    d: &Decision,
    input: &Input<'_>,
    client: &str,
) -> Option<(String, u64, std::time::Duration)> {
    let Traffic::Request { method, path, .. } = input.traffic else {
        return None;
    };
    let rules = moat_policy::limiting_rules(&snap.policies, d, input);
    if rules.is_empty() {
        return None;
    }
    let keys: Vec<String> = rules.iter().map(|(p, _)| p.key()).collect();
    let reqs: Vec<_> = rules
        .iter()
        .zip(&keys)
        .filter_map(|((p, i), key)| {
            let limit = p.rules.get(*i)?.rate_limit.as_ref()?;
            let req = crate::ratelimit::Request {
                policy: key,
                version: p.version.0,
                rule: *i,
                client,
                method,
                path,
            };
            Some((req, limit))
        })
        .collect();
    let (refused, wait) = ctx.limiter.admit_all(&reqs).err()?;
    let req = &reqs[refused].0;
    Some((req.policy.to_owned(), req.version, wait))
}

/// The request's canonical target: its canonical path (what rules match and the app
/// receives) and, when the request has a query, the path-and-query to forward; or why it has
/// none. An absolute-form target (and every HTTP/2 request, whose `:authority` is one) must
/// name the same authority as its `Host` header, if it has one, so the app cannot route on a
/// name the caller did not present; a request with two `Host` headers has none.
fn canonical_target(parts: &http::request::Parts) -> Result<(String, Option<String>), String> {
    // RFC 9112 section 3.2: one Host, or the app could route on the one not compared below.
    if parts
        .headers
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err("the request has more than one Host header".to_owned());
    }
    let raw = parts.uri.path();
    let path = moat_policy::canonical_path(raw)
        .map_err(|e| format!("{e}"))?
        .into_owned();
    if let (Some(authority), Some(host)) =
        (parts.uri.authority(), parts.headers.get(http::header::HOST))
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Err("the target's authority and the Host header differ".to_owned());
    }
    let with_query = parts.uri.query().map(|q| {
        let mut pq = String::with_capacity(path.len() + 1 + q.len());
        pq.push_str(&path);
        pq.push('?');
        pq.push_str(q);
        pq
    });
    Ok((path, with_query))
}

/// A request's target, as [`canonical_target`] found it.
enum Target {
    /// The canonical path (what rules match and the app receives), and the path and query to
    /// forward when the request has a query.
    Canonical {
        path: String,
        with_query: Option<String>,
    },
    /// A request refused before any rule is looked at, because its target cannot be made
    /// canonical ([`Reason::InvalidPath`]) or its method is never forwarded
    /// ([`Reason::MethodNotSupported`]): its path as the log shows it, and why.
    Invalid {
        printable: String,
        reason: Reason,
        why: String,
    },
}

/// What the proxy decided about one request: what its metrics and access-log line say, and
/// for an admitted request what goes with it to the app.
struct Verdict {
    /// `allow`, `would-deny` (audit mode) or `deny`.
    decision: &'static str,
    reason: Reason,
    /// `namespace/name@version` of the policy that decided, if one did.
    policy: Option<String>,
    /// For a refusal that may succeed later: seconds until a retry (`Retry-After`).
    retry_after: Option<u64>,
    admitted: Option<Admitted>,
}

impl Verdict {
    fn refused(reason: Reason, policy: Option<String>, retry_after: Option<u64>) -> Self {
        Verdict {
            decision: moat_policy::eval::Effect::Deny.as_str(),
            reason,
            policy,
            retry_after,
            admitted: None,
        }
    }
}

/// What an admitted request takes to the app.
struct Admitted {
    /// `x-moat-user` and `x-moat-user-issuer`: the subject and issuer of the verified end-user
    /// token, if it names a subject.
    user: Option<(HeaderValue, HeaderValue)>,
    /// The request's place in its caller's share of the app, held until the response ends.
    slot: crate::callers::Slot,
}

/// Answers one request of an inbound HTTP connection in three steps: make its target canonical
/// and decide ([`judge`]), then send it to the app ([`rewrite_for_app`], [`to_app`]) or refuse
/// it ([`deny`]), then count it and write its one access-log line.
async fn forward(req: Request<RequestBody>, conn: &HttpConn, ctx: &Ctx) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    // The hop's own headers go first, before the sidecar adds any: a caller that names one of
    // the sidecar's headers in `Connection` must not get it removed on the way to the app.
    strip_hop_by_hop(&mut parts.headers);
    let grpc = is_grpc(&parts.headers);
    // The span continues the caller's trace and names itself to the app.
    let span = ctx.tracing.as_ref().map(|t| {
        t.request(
            &mut parts.headers,
            opentelemetry::trace::SpanKind::Server,
            "moat.inbound",
        )
    });
    let request_id = ensure_request_id(&mut parts.headers);
    let method = parts.method.clone();
    // The calling sidecar says which HTTP version its client spoke; every other header the
    // sidecars own (the caller's identity, the end user) the app learns from us alone.
    let h1 = parts.headers.contains_key(&ORIG_PROTO) || parts.version != Version::HTTP_2;
    strip_identity_headers(&mut parts.headers);

    let target = if !moat_policy::is_forwarded_method(method.as_str()) {
        Target::Invalid {
            printable: printable_path(parts.uri.path()),
            reason: Reason::MethodNotSupported,
            why: "the mesh carries no CONNECT tunnels".to_owned(),
        }
    } else {
        match canonical_target(&parts) {
            Ok((path, with_query)) => Target::Canonical { path, with_query },
            Err(why) => Target::Invalid {
                printable: printable_path(parts.uri.path()),
                reason: Reason::InvalidPath,
                why,
            },
        }
    };
    let (path, detail) = match &target {
        Target::Canonical { path, .. } => (path.as_str(), None),
        Target::Invalid { printable, why, .. } => (printable.as_str(), Some(why.as_str())),
    };
    let mut verdict = match &target {
        Target::Canonical { .. } => judge(&parts.headers, &method, path, conn, ctx),
        Target::Invalid { reason, .. } => Verdict::refused(*reason, None, None),
    };
    conn.counters
        .authz(&ctx.metrics, verdict.decision, verdict.reason.code());

    let mut resp = match (verdict.admitted.take(), &target) {
        (Some(admitted), Target::Canonical { path, with_query }) => {
            let path_and_query = with_query.as_deref().unwrap_or(path);
            rewrite_for_app(&mut parts.headers, conn, admitted.user);
            to_app(parts, body, path_and_query, h1, conn, ctx, admitted.slot).await
        }
        _ => deny(
            verdict.reason,
            verdict.policy.as_deref(),
            &request_id,
            grpc,
            verdict.retry_after,
        ),
    };

    let here = crate::http::answered_here(&mut resp, &request_id);
    let detail = detail.or(here.as_deref());
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    let reason = verdict.reason.code();
    conn.counters
        .request(&ctx.metrics, verdict.decision, reason, status, elapsed);
    // What the span and the taps report, built only when one of them wants it.
    if span.is_some() || ctx.metrics.tap.active() {
        let call = crate::tap::Call {
            protocol: "http",
            peer: &conn.peer.name,
            port: conn.app.port(),
            method: method.as_str(),
            path,
            status,
            grpc_status: grpc
                .then(|| resp.headers().get("grpc-status"))
                .flatten()
                .and_then(|v| v.to_str().ok()),
            decision: verdict.decision,
            reason,
            policy: verdict.policy.as_deref(),
            latency: elapsed,
            request_id: &request_id,
        };
        if let Some(span) = span {
            span.end(&call, &ctx.cfg.identity.to_string());
        }
        ctx.metrics.tap.offer(&call);
    }
    tracing::info!(target: "moat::access", direction = "inbound", peer = %conn.peer, %method, path = %path, detail, decision = verdict.decision, reason, policy = verdict.policy.as_deref().unwrap_or("-"), status, duration_ms = elapsed.as_millis() as u64, request_id = %request_id, "http");
    resp
}

/// Decides a request whose target is the canonical `path`: revocation and the allow-list (with
/// the end-user token, verified only when a rule asks for one), then the matching rule's rate
/// limit, then the caller's share of the app.
fn judge(
    headers: &http::HeaderMap,
    method: &http::Method,
    path: &str,
    conn: &HttpConn,
    ctx: &Ctx,
) -> Verdict {
    let peer = &conn.peer;
    let snap = ctx.snapshot.borrow().clone();
    let token = snap
        .as_ref()
        .filter(|s| needs_token(s))
        .map(|s| match bearer(headers) {
            Bearer::Absent => None,
            Bearer::One(t) => Some(moat_policy::jwt::verify(t, &s.issuers)),
            Bearer::Several | Bearer::Unreadable => Some(Err(Reason::JwtMalformed)),
        });
    let jwt = match &token {
        Some(Some(Ok(claims))) => Jwt::Valid(claims),
        Some(Some(Err(r))) => Jwt::Invalid(*r),
        Some(None) | None => Jwt::Missing,
    };
    let traffic = Traffic::Request {
        method: method.as_str(),
        path,
        jwt,
    };
    let d = authorize_in(snap.as_deref(), peer, conn.app.port(), traffic);
    conn.counters.rule(&ctx.metrics, &d);
    if d.allowed && snap.as_deref().is_some_and(crate::observe::watching) {
        ctx.metrics
            .observed
            .record(&peer.name, conn.app.port(), method.as_str(), path);
    }
    let policy = policy_label(&d);
    if !d.allowed {
        return Verdict::refused(d.reason, policy, None);
    }
    let input = Input {
        peer: &peer.id,
        port: conn.app.port(),
        traffic,
    };
    if let Some((limiting, version, wait)) = snap
        .as_deref()
        .and_then(|s| over_limit(ctx, s, &d, &input, &peer.name))
    {
        ctx.metrics
            .rate_limited
            .get_or_create(&crate::metrics::RateLimitedLabels {
                peer: peer.name.clone(),
                policy: limiting.clone(),
            })
            .inc();
        let retry_after = wait.as_secs_f64().ceil().max(1.0) as u64;
        let policy = format!("{limiting}@{version}");
        return Verdict::refused(Reason::RateLimited, Some(policy), Some(retry_after));
    }
    let Some(slot) = ctx.callers.try_acquire(&conn.caller) else {
        return Verdict::refused(Reason::CallerBusy, policy, Some(1));
    };
    // Only a token the allowing rule held to its issuers, audiences and claims names the user:
    // a valid token on a route whose rule asks for none was never checked against anything.
    // With its issuer: two trusted issuers may each have an `alice`.
    let user = match &token {
        Some(Some(Ok(claims))) if d.token_checked => {
            let claim = |name: &str| {
                claims
                    .get(name)
                    .and_then(|v| v.as_str())
                    .and_then(|v| HeaderValue::from_str(v).ok())
            };
            claim("sub").zip(claim("iss"))
        }
        _ => None,
    };
    Verdict {
        decision: decision_label(&d),
        reason: d.would_deny.unwrap_or(d.reason),
        policy,
        retry_after: None,
        admitted: Some(Admitted { user, slot }),
    }
}

/// What the app learns from the sidecar alone: the caller's identity and the end user (the
/// caller's own spellings, and the hop's connection headers, were stripped on arrival). An
/// `Expect: 100-continue` goes too: the sidecar answered it to the caller already, and sends
/// the body on whatever the app says, so an app that answered early and read the body as the
/// next request would run a request no rule judged.
fn rewrite_for_app(
    headers: &mut http::HeaderMap,
    conn: &HttpConn,
    user: Option<(HeaderValue, HeaderValue)>,
) {
    headers.remove(http::header::EXPECT);
    if let Some(v) = &conn.peer_header {
        headers.insert(PEER_ID, v.clone());
    }
    if let Some((user, issuer)) = user {
        headers.insert(USER, user);
        headers.insert(USER_ISSUER, issuer);
    }
}

/// What a response head grows by on its way to the calling sidecar, counted generously as
/// HTTP/2 does: `:status`, and the `date` and `content-length` hyper's server adds.
const HEAD_ADDED: usize = 512;

/// Sends an admitted request to the app, re-targeted at `path_and_query` (the canonical path
/// and the query as sent), in the HTTP version its client spoke. The response keeps `held`, the
/// request's place in its caller's share, until it ends.
async fn to_app(
    mut parts: http::request::Parts,
    body: RequestBody,
    path_and_query: &str,
    h1: bool,
    conn: &HttpConn,
    ctx: &Ctx,
    held: crate::callers::Slot,
) -> Response<Body> {
    let grpc = is_grpc(&parts.headers);
    // The caller's connection: on HTTP/2 (every sidecar's), the answer must fit the head the
    // calling sidecar takes.
    let over_h2 = parts.version == Version::HTTP_2;
    let authority = request_authority(&parts, &conn.app_authority);
    // HTTP/1.1 names the target in origin form, its authority in `host` (set below); HTTP/2
    // carries both in the URI. Either way the authority must be one.
    let target = if h1 {
        authority
            .parse::<http::uri::Authority>()
            .map_err(http::Error::from)
            .and_then(|_| Uri::builder().path_and_query(path_and_query).build())
    } else {
        Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path_and_query)
            .build()
    };
    let uri = match target {
        Ok(uri) => uri,
        Err(e) => {
            return answer_here(
                http::StatusCode::BAD_REQUEST,
                &format!("bad request target: {e}"),
                grpc,
            );
        }
    };
    parts.uri = uri;
    // Trailers are headers too: the sidecars' own names never reach the app from outside, nor
    // a credential the sidecar never saw (it verifies the head's Authorization only).
    let body = boxed(body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            strip_identity_headers(&mut trailers);
            trailers.remove(http::header::AUTHORIZATION);
            hyper::body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }));
    let result = if h1 {
        parts.version = Version::HTTP_11;
        if !parts.headers.contains_key(http::header::HOST)
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(http::header::HOST, v);
        }
        keep_body_framing(&mut parts.headers, &body);
        match conn
            .clients
            .http1
            .send(Request::from_parts(parts, body))
            .await
        {
            Ok(resp) => Ok(resp.map(|b| crate::http::holding(b, held))),
            Err(e) => Err(moat_tls::connect::error_chain(&e)),
        }
    } else {
        parts.version = Version::HTTP_2;
        parts.headers.remove(http::header::HOST);
        match conn
            .clients
            .http2
            .send(
                Request::from_parts(parts, body),
                &ctx.metrics,
                Box::new(held),
            )
            .await
        {
            Ok(resp) => Ok(resp.map(boxed)),
            Err(e) => Err(moat_tls::connect::error_chain(&e)),
        }
    };
    match result {
        Ok(resp) => {
            let (mut rparts, rbody) = resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            // An HTTP/1.1 app's head may be far larger than the calling sidecar takes: it is
            // answered here, for this request alone, rather than sent to end the shared
            // connection under everyone's requests. (Its trailers cannot be: hyper takes 16 KiB
            // of them from an HTTP/1.1 app, and an HTTP/2 app's client has the mesh's bound.)
            let size = crate::multiplex::header_list_size(&rparts.headers) + HEAD_ADDED;
            let limit = crate::multiplex::MAX_HEADER_LIST as usize;
            if over_h2 && size > limit {
                tracing::warn!(app = %conn.app, size, limit, "the app's response head is larger than the mesh carries");
                return crate::http::app_fault(
                    &format!(
                        "the app's response head is {size} bytes as HTTP/2 counts it, over the {limit} the mesh carries; the app must send smaller headers"
                    ),
                    grpc,
                );
            }
            Response::from_parts(rparts, rbody)
        }
        Err(error) => {
            tracing::warn!(app = %conn.app, error, "the app did not answer");
            answer_here(
                http::StatusCode::BAD_GATEWAY,
                "the app did not answer",
                grpc,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness binds IPv4 loopback only, so the mapped form an IPv4 caller takes on a
    /// dual-stack inbound is checked here.
    #[test]
    fn an_upstream_listener_is_out_of_reach_whichever_form_its_address_takes() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [Some(15006), Some(15000), Some(15001)];
        let mapped = Some(addr("[::ffff:10.0.0.7]:15006"));
        let plain = Some(addr("10.0.0.7:15006"));
        for (local, listen) in [
            (mapped, "10.0.0.7:9001"),
            (plain, "[::ffff:10.0.0.7]:9001"),
            (mapped, "0.0.0.0:9001"),
            (mapped, "[::]:9001"),
        ] {
            let upstreams = [addr(listen)];
            assert_eq!(
                dialled_app(9001, local, &own, upstreams.into_iter()),
                Err("proxy-port"),
                "{local:?} reached the upstream listener on {listen}"
            );
        }
        for port in [15006, 15000, 15001] {
            assert_eq!(
                dialled_app(port, mapped, &own, std::iter::empty()),
                Err("proxy-port")
            );
        }
        // The app's own ports go to the address the caller arrived at, in its IPv4 form; an
        // upstream listener elsewhere does not stand in the way.
        let elsewhere = [addr("127.0.0.1:9001")];
        assert_eq!(
            dialled_app(9001, mapped, &own, elsewhere.into_iter()),
            Ok(addr("10.0.0.7:9001"))
        );
        assert_eq!(
            dialled_app(8080, mapped, &own, std::iter::empty()),
            Ok(addr("10.0.0.7:8080"))
        );
        assert_eq!(
            dialled_app(8080, None, &own, std::iter::empty()),
            Err("no-local-address")
        );
    }

    #[test]
    fn one_bearer_token_is_taken_and_two_authorization_headers_are_none() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), Bearer::Absent);
        h.insert("authorization", HeaderValue::from_static("Bearer  a.b.c "));
        assert_eq!(bearer(&h), Bearer::One("a.b.c"));
        h.insert("authorization", HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(bearer(&h), Bearer::Absent);
        h.insert("authorization", HeaderValue::from_static("bearer "));
        assert_eq!(bearer(&h), Bearer::Absent);
        h.insert("authorization", HeaderValue::from_static("Bearer a.b.c"));
        h.append("authorization", HeaderValue::from_static("Bearer x.y.z"));
        assert_eq!(bearer(&h), Bearer::Several);
        h.insert("authorization", HeaderValue::from_static("Bearer a.b.c"));
        h.append("authorization", HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(bearer(&h), Bearer::Several);
        h.insert(
            "authorization",
            HeaderValue::from_bytes(b"Bearer a.b.\xff").unwrap(),
        );
        assert_eq!(bearer(&h), Bearer::Unreadable);
    }

    #[test]
    fn a_callers_burst_fits_among_the_pending_handshakes_within_the_open_files() {
        let l = pending_handshakes(1024, 1 << 20);
        assert_eq!((l.per_source, l.total), (1024, 2048));
        let raised = pending_handshakes(5000, 1 << 20);
        assert_eq!((raised.per_source, raised.total), (5000, 10_000));
        let most = pending_handshakes(1_000_000, 1 << 20);
        assert_eq!((most.per_source, most.total), (8192, 16_384));
        assert_eq!(pending_handshakes(10, 1 << 20).per_source, 1024);
        let few_files = pending_handshakes(1024, 1800);
        assert_eq!((few_files.per_source, few_files.total), (900, 900));
    }
}
