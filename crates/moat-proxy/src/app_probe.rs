//! The app's kubelet probes, performed by the sidecar in the kubelet's place. Injection rewrites
//! an app container's `httpGet`, `tcpSocket` and `grpc` probes to `GET /app-health/<container>/<kind>`
//! on the admin port (inbound traffic to the app's own ports only gets in over mutual TLS) and
//! hands the originals over in `--app-probes` / `MOAT_APP_PROBES` (see moat-inject's `probes`).
//! The admin port then answers such a path by checking the app on the pod's loopback: the
//! app's HTTP status for an HTTP probe, 200 or 503 for a TCP one, and for a gRPC one 200 when
//! the app's `grpc.health.v1.Health/Check` answers SERVING (for the probe's `service`), else
//! 503. Only the configured probes are
//! performed, and only their status is returned, so the path cannot be used to reach anything
//! else of the app.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use http::StatusCode;
use http_body_util::Empty;
use serde_json::Value;
use tokio::net::TcpStream;

/// The most a probe may take; the kubelet's own timeout is usually shorter.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One original probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppProbe {
    /// `GET path` with `headers` on the app's `port`.
    Http {
        port: u16,
        path: String,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// A TCP connection to the app's `port`.
    Tcp { port: u16 },
    /// `grpc.health.v1.Health/Check` for `service` on the app's `port` (h2c).
    Grpc { port: u16, service: String },
}

/// The probes to perform, by the admin path the kubelet now calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppProbes(BTreeMap<String, AppProbe>);

/// `--app-probes` that cannot be used: what is wrong, where.
#[derive(Debug, thiserror::Error)]
#[error(
    "--app-probes: {0} (expected {{\"/app-health/<container>/<kind>\": {{\"http\": {{\"port\": 8080, \"path\": \"/ready\", \"headers\": [[\"name\", \"value\"]]}}}} | {{\"tcp\": {{\"port\": 8080}}}} | {{\"grpc\": {{\"port\": 9090, \"service\": \"\"}}}}}}, as moat inject writes it)"
)]
pub struct AppProbesError(String);

impl FromStr for AppProbes {
    type Err = AppProbesError;

    fn from_str(s: &str) -> Result<Self, AppProbesError> {
        let bad = |m: String| AppProbesError(m);
        let v: Value = serde_json::from_str(s).map_err(|e| bad(format!("not JSON: {e}")))?;
        let entries = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let mut probes = BTreeMap::new();
        for (path, probe) in entries {
            if !path.starts_with("/app-health/") || path.contains(['?', '#', ' ']) {
                return Err(bad(format!("{path:?} is not an /app-health/ path")));
            }
            let port = |o: &Value| -> Result<u16, AppProbesError> {
                o.get("port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("{path}: port must be 1..65535")))
            };
            let parsed = if let Some(h) = probe.get("http") {
                let target = h.get("path").and_then(Value::as_str).unwrap_or("/");
                if !target.starts_with('/') || target.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(bad(format!("{path}: {target:?} is not a request path")));
                }
                let mut headers = Vec::new();
                for pair in h
                    .get("headers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let (Some(name), Some(value)) = (
                        pair.get(0).and_then(Value::as_str),
                        pair.get(1).and_then(Value::as_str),
                    ) else {
                        return Err(bad(format!("{path}: a header is not [name, value]")));
                    };
                    let name = http::HeaderName::from_str(name)
                        .map_err(|_| bad(format!("{path}: {name:?} is not a header name")))?;
                    let value = http::HeaderValue::from_str(value).map_err(|_| {
                        bad(format!("{path}: the value of {name} is not a header value"))
                    })?;
                    headers.push((name, value));
                }
                AppProbe::Http {
                    port: port(h)?,
                    path: target.to_owned(),
                    headers,
                }
            } else if let Some(t) = probe.get("tcp") {
                AppProbe::Tcp { port: port(t)? }
            } else if let Some(g) = probe.get("grpc") {
                let service = match g.get("service") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(_) => return Err(bad(format!("{path}: service must be a string"))),
                };
                AppProbe::Grpc {
                    port: port(g)?,
                    service,
                }
            } else {
                return Err(bad(format!("{path}: give http, tcp or grpc")));
            };
            probes.insert(path.clone(), parsed);
        }
        Ok(AppProbes(probes))
    }
}

impl AppProbes {
    /// The probe served at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.0.get(path)
    }
}

impl AppProbe {
    /// Performs the probe against the app on loopback: the app's status for HTTP (a failure to
    /// connect or answer is 503), 200 or 503 for TCP.
    pub async fn check(&self) -> StatusCode {
        match tokio::time::timeout(PROBE_TIMEOUT, self.run()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, probe = ?self, "app probe failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    async fn run(&self) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            AppProbe::Tcp { port } => {
                TcpStream::connect(("127.0.0.1", *port)).await?;
                Ok(StatusCode::OK)
            }
            AppProbe::Grpc { port, service } => {
                use tonic_health::pb::HealthCheckRequest;
                use tonic_health::pb::health_check_response::ServingStatus;
                let channel =
                    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
                        .user_agent("moat-proxy (app probe)")?
                        .connect()
                        .await?;
                let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: service.clone(),
                    })
                    .await?
                    .into_inner();
                Ok(if answer.status == ServingStatus::Serving as i32 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                })
            }
            AppProbe::Http {
                port,
                path,
                headers,
            } => {
                let tcp = TcpStream::connect(("127.0.0.1", *port)).await?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                tokio::spawn(conn);
                let mut req = http::Request::get(path.as_str())
                    .header(http::header::HOST, format!("127.0.0.1:{port}"))
                    .header(http::header::USER_AGENT, "moat-proxy (app probe)");
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                let resp = sender
                    .send_request(req.body(Empty::<bytes::Bytes>::new())?)
                    .await?;
                Ok(resp.status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn probes_parse_as_moat_inject_writes_them_and_bad_ones_say_why() {
        let p: AppProbes = r#"{"/app-health/app/readyz": {"http": {"port": 8080, "path": "/ready", "headers": [["X-Probe", "1"]]}},
                              "/app-health/app/livez": {"tcp": {"port": 8080}}}"#
            .parse()
            .unwrap();
        assert_eq!(
            p.get("/app-health/app/livez"),
            Some(&AppProbe::Tcp { port: 8080 })
        );
        assert!(matches!(
            p.get("/app-health/app/readyz"),
            Some(AppProbe::Http { port: 8080, path, headers }) if path == "/ready" && headers.len() == 1
        ));
        for bad in [
            "[]",
            "{\"/config\": {\"tcp\": {\"port\": 1}}}",
            "{\"/app-health/a/readyz\": {\"tcp\": {\"port\": 0}}}",
            "{\"/app-health/a/readyz\": {\"http\": {\"port\": 80, \"path\": \"no-slash\"}}}",
            "{\"/app-health/a/readyz\": {\"exec\": {}}}",
        ] {
            let e = bad.parse::<AppProbes>().unwrap_err().to_string();
            assert!(e.starts_with("--app-probes: "), "{e}");
        }
    }

    #[test]
    fn grpc_probes_parse_with_their_service() {
        let p: AppProbes =
            r#"{"/app-health/api/livez": {"grpc": {"port": 9090, "service": "orders"}}}"#
                .parse()
                .unwrap();
        assert_eq!(
            p.get("/app-health/api/livez"),
            Some(&AppProbe::Grpc {
                port: 9090,
                service: "orders".into()
            })
        );
        let e = r#"{"/app-health/api/livez": {"grpc": {"port": 9090, "service": 7}}}"#
            .parse::<AppProbes>()
            .unwrap_err();
        assert!(e.to_string().contains("service must be a string"), "{e}");
    }
}
