//! The sidecar-injection admission webhook: `POST /inject` takes a Kubernetes AdmissionReview
//! (admission.k8s.io/v1) and answers with the JSONPatch that `moat_inject` would apply, so a pod
//! created through the API server comes out exactly like `moat inject` output. Served over TLS
//! with a certificate for the service's DNS names, issued by the mesh CA and renewed at half-life.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_ca::CertTtl;
use moat_identity::{ValidatedCsr, WorkloadKey};
use moat_inject::{InjectConfig, Outcome};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

use crate::ca::CaManager;

/// The largest AdmissionReview accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Lifetime of the webhook's serving certificate.
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// What the webhook needs.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    /// The names the API server uses to reach the webhook (the Service's DNS names).
    pub dns_names: Vec<String>,
    pub inject: InjectConfig,
}

/// Why the webhook has no serving certificate.
#[derive(Debug, thiserror::Error)]
pub enum WebhookTlsError {
    #[error("cannot generate a key pair: {0}")]
    Key(#[from] moat_identity::CsrError),
    #[error("the CA cannot issue the webhook certificate: {0}")]
    Issue(#[from] moat_ca::CaError),
    #[error("the webhook certificate is unusable: {0}")]
    Credential(#[from] moat_tls::CredentialError),
    #[error("cannot build the webhook's TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn server_config(
    ca: &CaManager,
    dns: &[String],
) -> Result<(Arc<rustls::ServerConfig>, i64), WebhookTlsError> {
    let ca = ca.current();
    // Any workload key will do: only its public half goes into the certificate.
    let id = moat_identity::SpiffeId::control_plane(ca.trust_domain());
    let key = WorkloadKey::generate(&id)?;
    let spki = ValidatedCsr::from_der(key.csr_der())?.spki_der;
    let (chain, refresh) = ca.issue_dns_server(&spki, dns, CertTtl::unchecked(CERT_TTL))?;
    let der = moat_tls::private_key(&key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(moat_tls::provider::provider())
        .with_protocol_versions(moat_tls::provider::VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, der)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), refresh))
}

/// The AdmissionReview answer for `review` (or the error for a malformed one).
pub fn review(body: &[u8], cfg: &InjectConfig) -> (StatusCode, Value) {
    let answer = |uid: &str, response: Value| {
        let mut r = json!({ "uid": uid });
        if let (Some(r), Some(extra)) = (r.as_object_mut(), response.as_object()) {
            r.extend(extra.clone());
        }
        json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r })
    };
    let refuse = |uid: &str, code: u16, message: String| {
        answer(
            uid,
            json!({ "allowed": false, "status": { "code": code, "message": message } }),
        )
    };
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                refuse(
                    "",
                    400,
                    format!(
                        "the body is not JSON: {e}; send an admission.k8s.io/v1 AdmissionReview"
                    ),
                ),
            );
        }
    };
    if parsed.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return (
            StatusCode::BAD_REQUEST,
            refuse("", 400, "not an AdmissionReview (kind must be AdmissionReview, apiVersion admission.k8s.io/v1)".into()),
        );
    }
    let Some(uid) = parsed.pointer("/request/uid").and_then(Value::as_str) else {
        return (
            StatusCode::BAD_REQUEST,
            refuse("", 400, "the AdmissionReview has no request.uid".into()),
        );
    };
    let Some(object) = parsed.pointer("/request/object").filter(|o| o.is_object()) else {
        return (
            StatusCode::OK,
            refuse(uid, 400, "the AdmissionReview has no request.object".into()),
        );
    };
    let mut injected = object.clone();
    match moat_inject::inject(&mut injected, cfg, moat_inject::Selected::ByAdmission) {
        Ok(Outcome::Injected) => {
            let ops = json_patch::diff(object, &injected);
            let patch = base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&ops).unwrap_or_default());
            (
                StatusCode::OK,
                answer(
                    uid,
                    json!({ "allowed": true, "patchType": "JSONPatch", "patch": patch }),
                ),
            )
        }
        // Left alone for a reason the person creating it should see (kubectl prints warnings).
        Ok(Outcome::HostNetwork) => (
            StatusCode::OK,
            answer(
                uid,
                json!({
                    "allowed": true,
                    "warnings": [format!(
                        "moat: no sidecar injected: {}",
                        Outcome::HostNetwork.skipped_because().unwrap_or_default()
                    )],
                }),
            ),
        ),
        Ok(_) => (StatusCode::OK, answer(uid, json!({ "allowed": true }))),
        // A workload the injector cannot make sense of is refused: admitting it without its
        // sidecar would run it outside the mesh.
        Err(e) => (
            StatusCode::OK,
            refuse(uid, 400, format!("moat cannot inject its sidecar: {e}")),
        ),
    }
}

async fn handle(req: Request<Incoming>, cfg: Arc<InjectConfig>) -> Response<Full<Bytes>> {
    let json_response = |status: StatusCode, v: Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"not found: POST an AdmissionReview to /inject\n",
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let (_, v) = review(b"", &cfg);
            let mut v = v;
            v["response"]["status"]["message"] =
                format!("cannot read the body: {e} (the limit is {MAX_BODY} bytes)").into();
            return json_response(StatusCode::PAYLOAD_TOO_LARGE, v);
        }
    };
    let (status, v) = review(&body, &cfg);
    json_response(status, v)
}

/// Serves the webhook forever, renewing its certificate at half-life.
pub async fn serve(
    listener: TcpListener,
    ca: Arc<CaManager>,
    cfg: WebhookConfig,
) -> Result<(), WebhookTlsError> {
    let (tls, refresh) = server_config(&ca, &cfg.dns_names)?;
    let current = Arc::new(RwLock::new(tls));
    {
        let (current, ca, dns) = (current.clone(), ca.clone(), cfg.dns_names.clone());
        tokio::spawn(async move {
            let mut at = refresh;
            loop {
                let wait = (at - moat_identity::clock::unix_now()).max(1) as u64;
                tokio::time::sleep(Duration::from_secs(wait)).await;
                match server_config(&ca, &dns) {
                    Ok((tls, next)) => {
                        *current.write().unwrap_or_else(|e| e.into_inner()) = tls;
                        at = next;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot renew the webhook certificate; retrying in 30 s");
                        at = moat_identity::clock::unix_now() + 30;
                    }
                }
            }
        });
    }
    let inject = Arc::new(cfg.inject);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(
            current.read().unwrap_or_else(|e| e.into_inner()).clone(),
        );
        let inject = inject.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = service_fn(move |req| {
                let inject = inject.clone();
                async move { Ok::<_, Infallible>(handle(req, inject).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_reviews_get_clear_answers() {
        let cfg = InjectConfig::default();
        let (s, v) = review(b"{not json", &cfg);
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            v["response"]["status"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("not JSON")
        );
        let (s, v) = review(br#"{"kind":"AdmissionReview","request":{}}"#, &cfg);
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            v["response"]["status"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("uid")
        );
        let (s, v) = review(br#"{"kind":"AdmissionReview","request":{"uid":"u1","object":{"kind":"Service","metadata":{"name":"x"}}}}"#, &cfg);
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["response"]["uid"], "u1");
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none());
    }
}
