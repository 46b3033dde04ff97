//! The proxy's own identity: the first certificate (join token), renewal at the refresh hint
//! with a new key each time, and the TLS generation (credential + bundle + configs) that every
//! connection reads. A new generation is validated and built completely before it is published;
//! a live one is never changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use moat_api::v1::identity_client::IdentityClient;
use moat_api::v1::{CertifyRequest, CertifyResponse, certify_request};
use moat_identity::{SpiffeId, TrustBundle, WorkloadKey};
use moat_tls::{ALPN_H2, ALPN_HTTP1, ALPN_TCP, ClientAuth, Credential};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::config::ProxyConfig;

/// How often the renewal loop compares the wall clock with the refresh hint while it waits.
const WALL_CLOCK_CHECK_SECS: u64 = 30;

/// Outbound configs are cached per (expected server identity, ALPN).
type ClientKey = (SpiffeId, &'static [u8]);

/// One generation of TLS material.
#[derive(Debug)]
pub struct TlsGen {
    pub credential: Credential,
    pub bundle: Arc<TrustBundle>,
    /// Inbound: client certificate required, ALPN h2, moat-tcp, http/1.1.
    pub server: Arc<ServerConfig>,
    /// When to renew (Unix seconds).
    pub refresh_after: i64,
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl TlsGen {
    /// Validates `credential` against `bundle` and builds the inbound config.
    pub fn new(
        credential: Credential,
        bundle: TrustBundle,
        refresh_after: i64,
    ) -> anyhow::Result<Self> {
        let bundle = Arc::new(bundle);
        let credential = Credential::new(credential.chain().to_vec(), credential.key(), &bundle)
            .context("our certificate does not verify against the trust bundle")?;
        let server = moat_tls::server_config(
            &credential,
            bundle.clone(),
            ClientAuth::Required,
            &[ALPN_H2, ALPN_TCP, ALPN_HTTP1],
        )?;
        Ok(TlsGen {
            credential,
            bundle,
            server,
            refresh_after,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// SHA-256 of the intermediate that issued our certificate (empty if the chain has none).
    pub fn issuer_sha256(&self) -> String {
        self.credential
            .chain()
            .get(1)
            .map(|c| moat_identity::bundle::sha256_hex(c))
            .unwrap_or_default()
    }

    /// The outbound config that accepts only `expected`, offering `alpn` (cached).
    pub fn client_for(
        &self,
        expected: &SpiffeId,
        alpn: &'static [u8],
    ) -> anyhow::Result<Arc<ClientConfig>> {
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let cfg = moat_tls::client_config(
            Some(&self.credential),
            self.bundle.clone(),
            expected.clone(),
            alpn,
        )?;
        cache.insert((expected.clone(), alpn), cfg.clone());
        Ok(cfg)
    }
}

/// The current TLS generation; `None` until the first certificate arrives.
pub type TlsWatch = watch::Receiver<Option<Arc<TlsGen>>>;

fn ttl_seconds(cfg: &ProxyConfig) -> u32 {
    cfg.cert_ttl
        .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32)
        .unwrap_or(0)
}

/// Turns a Certify answer into a credential, checked against `anchors`.
fn accept(
    resp: CertifyResponse,
    key: &WorkloadKey,
    anchors: &TrustBundle,
) -> anyhow::Result<(Credential, TrustBundle, i64)> {
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
    )
    .context("the control plane sent an unusable trust bundle")?;
    let key = PrivateKeyDer::try_from(key.private_key_der()).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The chain must verify against what we already trust, not only against what was sent.
    Credential::new(chain.clone(), key.clone_key(), anchors)
        .context("the issued certificate does not verify against our trust anchors")?;
    let cred = Credential::new(chain, key, &bundle)?;
    Ok((cred, bundle, resp.refresh_after_unix))
}

/// Obtains the first certificate with the join token.
pub async fn bootstrap(cfg: &ProxyConfig) -> anyhow::Result<TlsGen> {
    let anchors = moat_tls::cred_dir::read_bundle(&cfg.trust_anchors)?;
    let path = cfg.bootstrap.path();
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    let credential = match &cfg.bootstrap {
        crate::config::Bootstrap::JoinToken(_) => {
            certify_request::Credential::JoinToken(token.to_owned())
        }
        crate::config::Bootstrap::ServiceAccount(_) => {
            certify_request::Credential::KubernetesToken(token.to_owned())
        }
    };
    let key = WorkloadKey::generate(&cfg.identity)?;
    let channel = moat_tls::connect::channel(
        &cfg.control_plane,
        anchors.clone(),
        SpiffeId::control_plane(&cfg.trust_domain),
        None,
    )
    .await?;
    let resp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: ttl_seconds(cfg),
            credential: Some(credential),
        })
        .await
        .map_err(|s| CertifyFailed {
            code: s.code(),
            message: s.message().to_owned(),
        })?
        .into_inner();
    let (cred, bundle, refresh) = accept(resp, &key, &anchors)?;
    tracing::info!(id = %cred.id(), serial = %cred.leaf().serial, not_after = cred.leaf().not_after, "obtained our first certificate");
    TlsGen::new(cred, bundle, refresh)
}

/// The control plane answered our first Certify with an error.
#[derive(Debug, thiserror::Error)]
#[error("the control plane refused our token ({code:?}): {message}")]
pub struct CertifyFailed {
    pub code: tonic::Code,
    pub message: String,
}

/// Whether a [`bootstrap`] failure is worth retrying: the control plane could not be reached or
/// did not answer in time, as opposed to a refusal or a local problem, which are final. Read
/// from the error types in the chain, not its text.
pub fn bootstrap_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<moat_tls::connect::ConnectError>(),
            Some(moat_tls::connect::ConnectError::Connect { .. })
        ) || cause.downcast_ref::<CertifyFailed>().is_some_and(|f| {
            matches!(
                f.code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            )
        })
    })
}

/// Renews over mTLS with the current credential and a new key.
pub async fn renew(cfg: &ProxyConfig, current: &TlsGen) -> anyhow::Result<TlsGen> {
    let key = WorkloadKey::generate(&cfg.identity)?;
    let channel = moat_tls::connect::channel(
        &cfg.control_plane,
        (*current.bundle).clone(),
        SpiffeId::control_plane(&cfg.trust_domain),
        Some(&current.credential),
    )
    .await?;
    let resp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: ttl_seconds(cfg),
            credential: None,
        })
        .await
        .map_err(|s| anyhow::anyhow!("renewal refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let (cred, bundle, refresh) = accept(resp, &key, &current.bundle)?;
    TlsGen::new(cred, bundle, refresh)
}

/// Renews at each refresh hint (or at once when `rotate_now` fires), forever; failures retry
/// with backoff. Once the certificate has expired (the control plane was unreachable for longer
/// than its lifetime, or its CA was replaced meanwhile) renewal cannot authenticate any more:
/// the proxy fails closed, and obtains a new certificate the way it got its first one, re-reading
/// its token file and trust anchors on each attempt (a Kubernetes service-account token is kept
/// fresh by the kubelet; a join token must be replaced by the operator).
pub async fn renew_loop(
    cfg: Arc<ProxyConfig>,
    tls: watch::Sender<Option<Arc<TlsGen>>>,
    metrics: Arc<crate::metrics::Metrics>,
    rotate_now: Arc<tokio::sync::Notify>,
) {
    // Up to 30 s: a certificate lives minutes, so a failed renewal is retried well within it.
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let Some(current) = tls.borrow().clone() else {
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
            bootstrap(&cfg).await.context(
                "our certificate has expired, so renewal cannot authenticate; obtaining a new one with the token file failed",
            )
        } else {
            renew(&cfg, &current).await
        };
        match attempt {
            Ok(next) => {
                if expired {
                    tracing::warn!(
                        "our certificate had expired: obtained a new one with the token file"
                    );
                }
                tracing::info!(serial = %next.credential.leaf().serial, not_after = next.credential.leaf().not_after, "renewed our certificate");
                metrics.cert_expiry.set(next.credential.leaf().not_after);
                tls.send_replace(Some(Arc::new(next)));
                backoff.reset();
            }
            Err(e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %format!("{e:#}"), ?retry_in, "certificate renewal failed");
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;
    use moat_tls::connect::ConnectError;

    use super::*;

    #[test]
    fn only_an_unreachable_or_unavailable_control_plane_is_retried() {
        let unreachable = || ConnectError::Connect {
            addr: "127.0.0.1:7443".into(),
            expected: "spiffe://t/ns/moat-system/sa/moat-control".into(),
            detail: "connection refused".into(),
        };
        let failed = |code| CertifyFailed {
            code,
            message: "x".into(),
        };
        let retried = [
            anyhow::Error::from(unreachable()),
            anyhow::Error::from(unreachable()).context("first certificate"),
            anyhow::Error::from(failed(tonic::Code::Unavailable)),
            anyhow::Error::from(failed(tonic::Code::DeadlineExceeded)),
        ];
        for e in &retried {
            assert!(bootstrap_retryable(e), "{e:#}");
        }
        let final_ = [
            anyhow::Error::from(failed(tonic::Code::PermissionDenied)),
            anyhow::Error::from(failed(tonic::Code::Unauthenticated)),
            anyhow::Error::from(ConnectError::Address("ftp://x".into())),
            // Text that merely mentions unavailability is not the control plane's answer.
            anyhow::anyhow!("the token file says Unavailable: cannot reach"),
            Err::<(), _>(std::io::Error::other("disk"))
                .context("cannot read the token file")
                .unwrap_err(),
        ];
        for e in &final_ {
            assert!(!bootstrap_retryable(e), "{e:#}");
        }
    }
}
