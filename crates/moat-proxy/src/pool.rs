//! Dialling other sidecars: pick an endpoint of the service (round robin, skipping endpoints
//! that failed recently), originate mTLS that accepts only the service's expected identity, and,
//! for HTTP, keep a multiplexed HTTP/2 connection per endpoint **for each local client
//! connection** ([`Upstreams`]), so what one local client does to its streams — resets, a
//! window left at zero, every stream slot held — can make the far side close only its own
//! connection (decision 30).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use moat_identity::SpiffeId;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::Ctx;
use crate::http::Body;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed endpoint is tried only after the healthy ones.
const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// Why no connection to the service could be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no endpoints are known for {0}")]
    NoEndpoints(SpiffeId),
    #[error("the proxy has no certificate yet")]
    NotReady,
    #[error("every endpoint of {service} failed; last: {last}")]
    AllFailed { service: SpiffeId, last: String },
}

/// Where a mesh connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The identity the far side must prove.
    pub service: SpiffeId,
    /// Only this endpoint (transparent mode: the pod the app dialled); else any of the service's.
    pub endpoint: Option<String>,
    /// The app port on the far side (transparent mode), carried as the TLS server name
    /// `port-<n>.moat.invalid`; else the far side's `--app`.
    pub port: Option<u16>,
}

impl Target {
    /// Any endpoint of `service`, to its configured app.
    pub fn service(service: SpiffeId) -> Self {
        Target {
            service,
            endpoint: None,
            port: None,
        }
    }

    fn server_name(&self) -> String {
        match self.port {
            Some(p) => format!("port-{p}.moat.invalid"),
            None => "moat.invalid".to_owned(),
        }
    }
}

/// The app port a mesh connection asks for, from its TLS server name (`port-<n>.moat.invalid`).
pub fn port_from_server_name(name: Option<&str>) -> Option<u16> {
    name?
        .strip_prefix("port-")?
        .strip_suffix(".moat.invalid")?
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

/// Endpoint health and round robin, shared by every outbound listener.
#[derive(Debug, Default)]
pub struct Pool {
    failed: Mutex<HashMap<String, Instant>>,
    next: AtomicUsize,
}

/// The HTTP/2 connections to other sidecars that one local client connection uses (one per
/// endpoint and app port); they close when that client's connection ends and this is dropped.
#[derive(Debug, Default)]
pub struct Upstreams(tokio::sync::Mutex<HashMap<String, SendRequest<Body>>>);

fn tls_reason(e: &std::io::Error) -> &'static str {
    let text = format!("{e:?}");
    if text.contains("WrongIdentity") {
        "wrong-identity"
    } else if text.contains("UnknownIssuer") {
        "unknown-issuer"
    } else if text.contains("Expired") {
        "certificate-expired"
    } else {
        "tls-error"
    }
}

impl Pool {
    /// The target's endpoints in the order to try them.
    fn order(&self, ctx: &Ctx, target: &Target) -> Result<Vec<String>, DialError> {
        let service = &target.service;
        let snap = ctx.snapshot.borrow().clone();
        let eps = snap
            .as_ref()
            .and_then(|s| s.services.get(service).cloned())
            .filter(|e| !e.is_empty())
            .ok_or_else(|| DialError::NoEndpoints(service.clone()))?;
        if let Some(only) = &target.endpoint {
            return if eps.contains(only) {
                Ok(vec![only.clone()])
            } else {
                Err(DialError::NoEndpoints(service.clone()))
            };
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % eps.len();
        let mut rotated: Vec<String> = eps[start..].iter().chain(&eps[..start]).cloned().collect();
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let recently = |ep: &String| failed.get(ep).is_some_and(|t| t.elapsed() < FAILURE_HOLD);
        rotated.sort_by_key(recently);
        Ok(rotated)
    }

    fn mark_failed(&self, ep: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep.to_owned(), Instant::now());
    }

    fn mark_ok(&self, ep: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ep);
    }

    async fn dial_one(
        &self,
        ctx: &Ctx,
        ep: &str,
        target: &Target,
        alpn: &'static [u8],
    ) -> Result<TlsStream<TcpStream>, String> {
        let service = &target.service;
        let current = ctx.tls.borrow().clone().ok_or("no certificate")?;
        let config = current
            .client_for(service, alpn)
            .map_err(|e| e.to_string())?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(target.server_name()).map_err(|e| e.to_string())?;
        match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Err(_) => {
                ctx.metrics.handshake_failed("outbound", "timeout".into());
                Err("TLS handshake timed out".into())
            }
            Ok(Err(e)) => {
                let reason = tls_reason(&e);
                ctx.metrics.handshake_failed("outbound", reason.into());
                tracing::warn!(%service, endpoint = ep, reason, error = %e, "refused to talk to an endpoint that did not prove the expected identity");
                Err(format!("{reason}: {e}"))
            }
            Ok(Ok(tls)) => {
                let peer = moat_tls::peer_identity(tls.get_ref().1.peer_certificates());
                // A resumed session skips chain verification: the certificate it carries was
                // checked when the session began and may have expired since.
                if let Some(p) = &peer
                    && p.not_after <= crate::unix_now()
                {
                    ctx.metrics
                        .handshake_failed("outbound", "certificate-expired".into());
                    tracing::warn!(%service, endpoint = ep, serial = %p.serial, "refused a resumed session whose server certificate has expired");
                    return Err(
                        "certificate-expired: the endpoint's certificate has expired".into(),
                    );
                }
                let snap = ctx.snapshot.borrow().clone();
                if let (Some(p), Some(s)) = (peer, snap)
                    && s.is_revoked(&p.id, &p.serial)
                {
                    ctx.metrics.handshake_failed("outbound", "revoked".into());
                    tracing::warn!(%service, endpoint = ep, serial = %p.serial, "refused an endpoint whose certificate is revoked");
                    return Err("revoked: the endpoint's certificate or identity is revoked".into());
                }
                Ok(tls)
            }
        }
    }

    /// An mTLS connection to one endpoint of `target`, offering `alpn`.
    pub async fn dial(
        &self,
        ctx: &Ctx,
        target: &Target,
        alpn: &'static [u8],
    ) -> Result<(String, TlsStream<TcpStream>), DialError> {
        let service = &target.service;
        if ctx.tls.borrow().is_none() {
            return Err(DialError::NotReady);
        }
        let mut last = String::new();
        for ep in self.order(ctx, target)? {
            match self.dial_one(ctx, &ep, target, alpn).await {
                Ok(tls) => {
                    self.mark_ok(&ep);
                    return Ok((ep, tls));
                }
                Err(e) => {
                    self.mark_failed(&ep);
                    last = format!("{ep}: {e}");
                }
            }
        }
        Err(DialError::AllFailed {
            service: service.clone(),
            last,
        })
    }

    /// Sends an HTTP/2 request to an endpoint of `target` over one of `conns` (made on first
    /// use). Endpoints are tried in turn until one accepts the request; a request is sent at
    /// most once.
    pub async fn send(
        &self,
        ctx: &Ctx,
        target: &Target,
        conns: &Upstreams,
        req: Request<Body>,
    ) -> Result<(String, http::Response<Incoming>), DialError> {
        let service = &target.service;
        let mut last = String::new();
        for ep in self.order(ctx, target)? {
            let key = format!("{ep}|{}", target.server_name());
            let mut sender = {
                let mut conns = conns.0.lock().await;
                match conns.get(&key).filter(|s| !s.is_closed()).cloned() {
                    Some(s) => s,
                    None => match self.dial_one(ctx, &ep, target, moat_tls::ALPN_H2).await {
                        Ok(tls) => {
                            let handshake =
                                hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                                    .timer(TokioTimer::new())
                                    .keep_alive_interval(Duration::from_secs(20))
                                    .keep_alive_while_idle(true)
                                    .handshake::<_, Body>(TokioIo::new(tls))
                                    .await;
                            match handshake {
                                Ok((s, conn)) => {
                                    let endpoint = ep.clone();
                                    tokio::spawn(async move {
                                        if let Err(e) = conn.await {
                                            tracing::debug!(endpoint, error = %e, "mesh connection closed");
                                        }
                                    });
                                    conns.insert(key.clone(), s.clone());
                                    s
                                }
                                Err(e) => {
                                    self.mark_failed(&ep);
                                    last = format!("{ep}: http/2 handshake: {e}");
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            self.mark_failed(&ep);
                            last = format!("{ep}: {e}");
                            continue;
                        }
                    },
                }
            };
            if sender.ready().await.is_err() {
                conns.0.lock().await.remove(&key);
                last = format!("{ep}: connection closed");
                continue;
            }
            self.mark_ok(&ep);
            return match sender.send_request(req).await {
                Ok(resp) => Ok((ep, resp)),
                Err(e) => Err(DialError::AllFailed {
                    service: service.clone(),
                    last: format!("{ep}: {e}"),
                }),
            };
        }
        Err(DialError::AllFailed {
            service: service.clone(),
            last,
        })
    }
}
