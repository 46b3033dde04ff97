//! The proxy's own identity: the first certificate (join token), renewal at the refresh hint
//! with a new key each time, and the TLS generation (credential + bundle + configs) that every
//! connection reads. A new generation is validated and built completely before it is published;
//! a live one is never changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moat_api::v1::identity_client::IdentityClient;
use moat_api::v1::{CertifyRequest, CertifyResponse, certify_request};
use moat_identity::{SpiffeId, TrustBundle, WorkloadKey};
use moat_tls::connect::ConnectError;
use moat_tls::cred_dir::CredDirError;
use moat_tls::{
    ALPN_H2, ALPN_HTTP1, ALPN_TCP, ClientAuth, Credential, CredentialError, LiveTls, Serving,
    TlsState,
};
use rustls_pki_types::CertificateDer;

use crate::config::ProxyConfig;

/// How often the renewal loop compares the wall clock with the refresh hint while it waits.
const WALL_CLOCK_CHECK_SECS: u64 = 30;

/// What the inbound listener asks of callers: a mesh certificate, and one of the three
/// protocols another sidecar or a direct HTTP/1.1 client speaks.
pub const SERVING: Serving = Serving {
    client_auth: ClientAuth::Required,
    alpn: &[ALPN_H2, ALPN_TCP, ALPN_HTTP1],
};

/// Why the proxy could not obtain or renew its certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the trust anchors: {0}")]
    Anchors(#[source] CredDirError),
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the token file {0} is empty; write the join token (or mount the service-account token) there"
    )]
    EmptyToken(PathBuf),
    #[error("cannot generate a key pair: {0}")]
    Key(#[from] moat_identity::CsrError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The call failed on its connection (the control plane closed it, or restarted): no
    /// answer came, so it is tried again.
    #[error("sending {what} to the control plane failed on the connection ({code:?}): {message}")]
    Lost {
        /// "our token" or "our renewal".
        what: &'static str,
        /// The code tonic gave the failure (not one the control plane sent).
        code: tonic::Code,
        message: String,
    },
    #[error("the control plane refused {what} ({code:?}): {message}")]
    Refused {
        /// "our token" or "our renewal".
        what: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("the control plane sent an unusable trust bundle: {0}")]
    Bundle(#[from] moat_identity::BundleError),
    #[error("the issued certificate does not verify against our trust anchors: {0}")]
    Untrusted(#[source] CredentialError),
    #[error("cannot use the issued certificate: {0}")]
    Credential(#[from] CredentialError),
}

impl IdentityError {
    /// Whether a [`bootstrap`] failure is worth retrying: the control plane could not be
    /// reached or did not answer in time, as opposed to a refusal or a local problem, which are
    /// final.
    pub fn retryable(&self) -> bool {
        match self {
            IdentityError::Connect(ConnectError::Connect { .. }) | IdentityError::Lost { .. } => {
                true
            }
            IdentityError::Refused { code, .. } => matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}

/// One `Certify` call to the control-plane replica in use, verified against `anchors`, over mTLS
/// with `client` when given. When that replica could not be reached or was unavailable, the
/// next call goes to the next replica.
async fn certify(
    cfg: &ProxyConfig,
    anchors: &TrustBundle,
    client: Option<&Credential>,
    request: CertifyRequest,
    what: &'static str,
) -> Result<CertifyResponse, IdentityError> {
    let url = cfg.control_plane.current().to_owned();
    let call = async {
        let channel = moat_tls::connect::channel(
            &url,
            anchors.clone(),
            SpiffeId::control_plane(&cfg.trust_domain),
            client,
        )
        .await?;
        IdentityClient::new(channel)
            .certify(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| failed_call(what, &s))
    };
    let result = call.await;
    if let Err(e) = &result
        && e.retryable()
    {
        cfg.control_plane.failed(&url);
    }
    result
}

/// What a failed call means. A status the control plane sent carries no source; one tonic made
/// here from a failed connection (closed after the handshake: the bound on connections without
/// a certificate; a restart) does, and is worth another try.
fn failed_call(what: &'static str, s: &tonic::Status) -> IdentityError {
    let (code, message) = (s.code(), s.message().to_owned());
    if std::error::Error::source(s).is_some() {
        IdentityError::Lost {
            what,
            code,
            message,
        }
    } else {
        IdentityError::Refused {
            what,
            code,
            message,
        }
    }
}

fn ttl_seconds(cfg: &ProxyConfig) -> u32 {
    cfg.cert_ttl
        .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32)
        .unwrap_or(0)
}

/// A certificate the control plane issued, checked, ready to publish.
#[derive(Debug)]
pub struct Issued {
    pub credential: Credential,
    pub bundle: TrustBundle,
    /// When to renew (Unix seconds).
    pub refresh_after: i64,
}

impl Issued {
    /// Publishes it as the new TLS generation.
    pub fn publish(self, live: &LiveTls) -> Result<Arc<TlsState>, CredentialError> {
        live.publish(self.credential, self.bundle, self.refresh_after)
    }
}

/// Turns a Certify answer into a credential, checked against `anchors`.
fn accept(
    resp: CertifyResponse,
    key: &WorkloadKey,
    anchors: &TrustBundle,
) -> Result<Issued, IdentityError> {
    let chain: Vec<CertificateDer<'static>> = resp
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bundle = TrustBundle::from_der(
        resp.trust_bundle_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    )?;
    // The chain must verify against what we already trust, not only against what was sent.
    Credential::issued(chain.clone(), key, anchors).map_err(IdentityError::Untrusted)?;
    let credential = Credential::issued(chain, key, &bundle)?;
    Ok(Issued {
        credential,
        bundle,
        refresh_after: resp.refresh_after_unix,
    })
}

/// Obtains the first certificate with the join token.
pub async fn bootstrap(cfg: &ProxyConfig) -> Result<Issued, IdentityError> {
    let anchors =
        moat_tls::cred_dir::read_bundle(&cfg.trust_anchors).map_err(IdentityError::Anchors)?;
    let path = cfg.bootstrap.path();
    let token = std::fs::read_to_string(path).map_err(|source| IdentityError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(IdentityError::EmptyToken(path.to_owned()));
    }
    let credential = match &cfg.bootstrap {
        crate::config::Bootstrap::JoinToken(_) => {
            certify_request::Credential::JoinToken(token.to_owned())
        }
        crate::config::Bootstrap::ServiceAccount(_) => {
            certify_request::Credential::KubernetesToken(token.to_owned())
        }
    };
    let key = WorkloadKey::generate(&cfg.identity)?;
    let resp = certify(
        cfg,
        &anchors,
        None,
        CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: ttl_seconds(cfg),
            credential: Some(credential),
        },
        "our token",
    )
    .await?;
    let issued = accept(resp, &key, &anchors)?;
    tracing::info!(id = %issued.credential.id(), serial = %issued.credential.leaf().serial, not_after = issued.credential.leaf().not_after, "obtained our first certificate");
    Ok(issued)
}

/// Renews over mTLS with the current credential and a new key.
pub async fn renew(cfg: &ProxyConfig, current: &TlsState) -> Result<Issued, IdentityError> {
    let key = WorkloadKey::generate(&cfg.identity)?;
    let resp = certify(
        cfg,
        &current.bundle,
        Some(&current.credential),
        CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: ttl_seconds(cfg),
            credential: None,
        },
        "our renewal",
    )
    .await?;
    accept(resp, &key, &current.bundle)
}

/// Renews at each refresh hint (or at once when `rotate_now` fires), forever; failures retry
/// with backoff. Once the certificate has expired (the control plane was unreachable for longer
/// than its lifetime, or its CA was replaced meanwhile) renewal cannot authenticate any more:
/// the proxy fails closed, and obtains a new certificate the way it got its first one, re-reading
/// its token file and trust anchors on each attempt (a Kubernetes service-account token is kept
/// fresh by the kubelet; a join token must be replaced by the operator).
pub async fn renew_loop(
    cfg: Arc<ProxyConfig>,
    tls: Arc<LiveTls>,
    metrics: Arc<crate::metrics::Metrics>,
    rotate_now: Arc<tokio::sync::Notify>,
) {
    // Up to 30 s: a certificate lives minutes, so a failed renewal is retried well within it.
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let Some(current) = tls.current() else {
            return;
        };
        let wait = current.refresh_after - moat_identity::clock::unix_now();
        if wait > 0 {
            let mut changed = tls.subscribe();
            // Timers run on the monotonic clock; the refresh hint is wall-clock time. Looking at
            // the wall clock at least every half minute keeps a clock jump (a suspended VM, a
            // corrected clock) from leaving an expired certificate in place until the timer ends.
            let nap = Duration::from_secs((wait as u64).min(WALL_CLOCK_CHECK_SECS));
            tokio::select! {
                () = tokio::time::sleep(nap) => {
                    if wait as u64 > WALL_CLOCK_CHECK_SECS {
                        continue;
                    }
                }
                () = rotate_now.notified() => tracing::info!("rotation requested by the control plane"),
                // A new generation (e.g. a new bundle) carries the same refresh hint; re-read it.
                _ = changed.changed() => continue,
            }
        }
        let expired = current.credential.leaf().not_after <= moat_identity::clock::unix_now();
        let attempt = if expired {
            bootstrap(&cfg).await
        } else {
            renew(&cfg, &current).await
        };
        match attempt.and_then(|issued| Ok(issued.publish(&tls)?)) {
            Ok(next) => {
                if expired {
                    tracing::warn!(
                        "our certificate had expired: obtained a new one with the token file"
                    );
                }
                tracing::info!(serial = %next.credential.leaf().serial, not_after = next.credential.leaf().not_after, "renewed our certificate");
                metrics.certificate(&next);
                backoff.reset();
            }
            Err(e) if expired => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, "our certificate has expired, so renewal cannot authenticate; obtaining a new one with the token file failed");
                tokio::time::sleep(retry_in).await;
            }
            Err(e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, "certificate renewal failed");
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unreachable_or_unavailable_control_plane_is_retried() {
        let unreachable = || ConnectError::Connect {
            addr: "127.0.0.1:7443".into(),
            expected: "spiffe://t/ns/moat-system/sa/moat-control".into(),
            detail: "connection refused".into(),
        };
        let refused = |code| IdentityError::Refused {
            what: "our token",
            code,
            message: "x".into(),
        };
        let retried = [
            IdentityError::from(unreachable()),
            refused(tonic::Code::Unavailable),
            refused(tonic::Code::DeadlineExceeded),
        ];
        for e in &retried {
            assert!(e.retryable(), "{e}");
        }
        let final_ = [
            refused(tonic::Code::PermissionDenied),
            refused(tonic::Code::Unauthenticated),
            IdentityError::from(ConnectError::Address("ftp://x".into())),
            IdentityError::TokenFile {
                path: "/token".into(),
                source: std::io::Error::other("Unavailable: cannot reach"),
            },
            IdentityError::EmptyToken("/token".into()),
        ];
        for e in &final_ {
            assert!(!e.retryable(), "{e}");
        }
    }

    /// A status the control plane sent is a refusal; one tonic made from a connection that
    /// failed under the call is tried again. Pinned here because it rests on how tonic builds
    /// its statuses.
    #[test]
    fn a_call_lost_with_its_connection_is_retried_and_a_refusal_is_not() {
        let lost = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        let e = failed_call("our token", &lost);
        assert!(
            matches!(e, IdentityError::Lost { .. }) && e.retryable(),
            "{e}"
        );
        let refused = tonic::Status::permission_denied("join token is used up");
        let e = failed_call("our token", &refused);
        assert!(
            matches!(e, IdentityError::Refused { .. }) && !e.retryable(),
            "{e}"
        );
    }
}
