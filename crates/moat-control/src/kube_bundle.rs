//! On Kubernetes: publishes the mesh's trust bundle as a ConfigMap (`moat-ca-root`, key
//! `bundle.pem`) in every namespace, which injected sidecars mount to verify the control plane
//! at bootstrap. Re-checked at an interval, so new namespaces and bundle changes (root rotation)
//! follow; a ConfigMap is written only when its content differs. Talks to the API server with
//! the pod's service-account token over TLS verified with the cluster CA.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use tokio_rustls::rustls;

use crate::ca::CaManager;

use crate::kube_api::ApiServer;
pub use crate::kube_api::KubeError;

/// What to publish where.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub server: ApiServer,
    /// The ConfigMap's name in each namespace.
    pub configmap: String,
    pub interval: Duration,
}

/// A minimal client for the few API calls this needs.
struct Api {
    cfg: KubeConfig,
    tls: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
}

impl Api {
    fn new(cfg: KubeConfig) -> Result<Self, KubeError> {
        let ca = moat_tls::cred_dir::read_bundle(&cfg.server.ca_file).map_err(|source| {
            KubeError::ClusterCa {
                path: cfg.server.ca_file.clone(),
                source,
            }
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca.roots() {
            roots.add(c.clone())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let bad_url = || KubeError::ApiUrl(cfg.server.url.clone());
        let uri: http::Uri = cfg.server.url.parse().map_err(|_| bad_url())?;
        let host = uri.host().ok_or_else(bad_url)?.to_owned();
        let port = uri.port_u16().unwrap_or(443);
        Ok(Api {
            cfg,
            tls: Arc::new(tls),
            host,
            port,
        })
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), KubeError> {
        // Projected tokens rotate: read it for every call.
        let token = std::fs::read_to_string(&self.cfg.server.token_file).map_err(|source| {
            KubeError::Token {
                path: self.cfg.server.token_file.clone(),
                source,
            }
        })?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| KubeError::ApiUrl(self.cfg.server.url.clone()))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| KubeError::Body(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| KubeError::Timeout)??;
        let status = resp.status().as_u16();
        let bytes = http_body_util::Limited::new(resp.into_body(), 16 * 1024 * 1024)
            .collect()
            .await
            .map_err(|e| KubeError::Body(e.to_string()))?
            .to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, v))
    }
}

/// One pass: every namespace gets the current bundle. Returns how many ConfigMaps were written.
async fn publish_once(api: &Api, pem: &str) -> Result<usize, KubeError> {
    let (status, list) = api
        .call(http::Method::GET, "/api/v1/namespaces", None)
        .await?;
    if status != 200 {
        return Err(KubeError::Status {
            call: "listing namespaces",
            status,
            message: list["message"].to_string(),
        });
    }
    let name = &api.cfg.configmap;
    let mut written = 0;
    for ns in list["items"].as_array().into_iter().flatten() {
        let Some(ns) = ns.pointer("/metadata/name").and_then(Value::as_str) else {
            continue;
        };
        let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
        let desired = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": { "app.kubernetes.io/managed-by": "moat-control" },
            },
            "data": { "bundle.pem": pem },
        });
        let (status, current) = api.call(http::Method::GET, &path, None).await?;
        let (method, target) = match status {
            404 => (
                http::Method::POST,
                format!("/api/v1/namespaces/{ns}/configmaps"),
            ),
            200 if current.pointer("/data/bundle.pem").and_then(Value::as_str) == Some(pem) => {
                continue;
            }
            200 => (http::Method::PUT, path.clone()),
            other => {
                tracing::warn!(namespace = ns, status = other, message = %current["message"], "cannot read the trust-bundle ConfigMap");
                continue;
            }
        };
        let (status, answer) = api.call(method, &target, Some(desired)).await?;
        if (200..300).contains(&status) {
            written += 1;
        } else {
            tracing::warn!(namespace = ns, status, message = %answer["message"], "cannot write the trust-bundle ConfigMap");
        }
    }
    Ok(written)
}

/// Publishes the bundle forever.
pub async fn publish_loop(cfg: KubeConfig, ca: Arc<CaManager>) {
    let interval = cfg.interval;
    let api = match Api::new(cfg) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot publish the trust bundle to Kubernetes");
            return;
        }
    };
    loop {
        let pem = ca.current().bundle().to_pem();
        match publish_once(&api, &pem).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(configmaps = n, "published the trust bundle"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the trust bundle; retrying")
            }
        }
        tokio::time::sleep(interval).await;
    }
}
