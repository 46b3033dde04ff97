//! Helpers shared by the end-to-end scenarios: gRPC clients that dial the real control plane the
//! way a sidecar does, and credential loading.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

pub mod kube_api;
pub mod tokens;

use moat_api::v1::identity_client::IdentityClient;
use moat_identity::{SpiffeId, TrustBundle, TrustDomain};
use moat_test_util::ControlPlane;
use moat_tls::Credential;
use tonic::transport::Channel;

pub fn td() -> TrustDomain {
    TrustDomain::default_domain()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse_with_default(s, &td()).unwrap()
}

pub fn control_id() -> SpiffeId {
    id("moat-system/moat-control")
}

pub fn bundle(cp: &ControlPlane) -> TrustBundle {
    TrustBundle::from_pem(&std::fs::read(cp.admin_dir().join("bundle.pem")).unwrap()).unwrap()
}

/// Loads a credential directory written by the control plane or `moat cert ...`.
pub fn credential(dir: &Path, bundle: &TrustBundle) -> Credential {
    Credential::from_pem(
        &std::fs::read(dir.join("cert.pem")).unwrap(),
        &std::fs::read(dir.join("key.pem")).unwrap(),
        bundle,
    )
    .unwrap()
}

/// An Identity client, optionally presenting `cred`.
pub async fn identity_client(
    cp: &ControlPlane,
    cred: Option<&Credential>,
) -> IdentityClient<Channel> {
    let channel = moat_tls::connect::channel(&cp.url(), bundle(cp), control_id(), cred)
        .await
        .unwrap();
    IdentityClient::new(channel)
}

/// Creates a join token with the CLI; returns the token text.
pub fn token(cp: &ControlPlane, identity: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--identity", identity];
    args.extend_from_slice(extra);
    cp.moat_ok(&args).trim().to_owned()
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `moat cert request` against `url` with a join token, trusting the control plane's
/// bundle; writes the credential to `out`.
pub fn cert_request(
    cp: &ControlPlane,
    url: &str,
    identity: &str,
    token: &str,
    out: &Path,
) -> std::process::Output {
    let token_file = out.with_extension("token");
    std::fs::write(&token_file, token).unwrap();
    std::process::Command::new(moat_test_util::bin("moat"))
        .args([
            "--control-plane",
            url,
            "cert",
            "request",
            "--identity",
            identity,
            "--token-file",
        ])
        .arg(&token_file)
        .arg("--trust-anchors")
        .arg(cp.admin_dir().join("bundle.pem"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// Two sidecars, each in front of an HTTP echo app: `server`, and `client` with an outbound
/// listener for `server`. Returns them in that order, both ready.
pub async fn echo_pair(
    cp: &ControlPlane,
    server: &str,
    client: &str,
) -> (moat_test_util::Proxy, moat_test_util::Proxy) {
    use moat_test_util::apps::http_echo;
    let s = moat_test_util::Proxy::builder(cp, server)
        .app(http_echo().await)
        .start()
        .unwrap();
    let c = moat_test_util::Proxy::builder(cp, client)
        .app(http_echo().await)
        .upstreams(&[server])
        .start()
        .unwrap();
    (s, c)
}

/// The simplest allow-list: `target` admits each of `from` on every port and route. Several
/// of them joined with `---` make one policy file.
pub fn allow(target: &str, from: &[&str]) -> String {
    format!(
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: {target} }}\nspec:\n  target: {target}\n  rules:\n    - from: [{}]\n",
        from.join(", ")
    )
}

/// The demo-style allow-list: frontend may call orders (HTTP), payments (gRPC) and ledger (TCP).
pub const MESH_POLICY: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
---
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: payments }
spec:
  target: payments
  rules:
    - from: [frontend]
      http: [{ methods: [POST], paths: ["/moat.test.Echo/*"] }]
---
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: ledger }
spec:
  target: ledger
  rules:
    - from: [frontend]
"#;

/// Waits until `proxy` knows endpoints for every service in `services`.
pub fn wait_for_services(proxy: &moat_test_util::Proxy, services: &[&str]) {
    let ok = moat_test_util::eventually(std::time::Duration::from_secs(15), || {
        let (_, body) = proxy.admin_get("/config")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        services
            .iter()
            .all(|s| {
                v["services"][id(s).to_string()]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "{} never learned {services:?}: {:?}",
        proxy.identity,
        proxy.admin_get("/config")
    );
}

/// An HTTP/1.1 client (keep-alive pool).
pub fn h1_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET `url` with extra headers; returns (status, headers, body).
pub async fn get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String), String> {
    use http_body_util::BodyExt as _;
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends GET `url` at `rps` for `duration` (each request on its own task, over a keep-alive
/// pool). Returns the number of 200s and a description of every failure.
pub async fn load(url: &str, rps: u32, duration: std::time::Duration) -> (usize, Vec<String>) {
    let client = h1_client();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs_f64(1.0 / f64::from(rps)));
    let end = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let (c, u) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            match get(&c, "GET", &u, &[]).await {
                Ok((200, _, _)) => Ok(()),
                Ok((s, _, b)) => Err(format!("status {s}: {b}")),
                Err(e) => Err(e),
            }
        }));
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    (ok, failures)
}

/// A rustls client config presenting `cred`, accepting only `server` under `bundle`, for HTTP/1.1.
pub fn tls_client(
    bundle: &TrustBundle,
    server: &str,
    cred: &Credential,
) -> std::sync::Arc<rustls::ClientConfig> {
    moat_tls::client_config(
        Some(cred),
        std::sync::Arc::new(bundle.clone()),
        id(server),
        moat_tls::ALPN_HTTP1,
    )
    .unwrap()
}

/// One request as a test HTTPS server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// A TLS acceptor for a server on 127.0.0.1, and the PEM of the CA that signed its certificate.
pub fn localhost_tls() -> (tokio_rustls::TlsAcceptor, String) {
    use std::sync::Arc;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        ca_cert.pem(),
    )
}

/// Serves HTTP/1.1 over TLS on `listener`, each request answered by `answer`, until the test
/// ends.
pub fn serve_tls<F, Fut, B>(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    answer: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let reply = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
}

/// An HTTPS server on 127.0.0.1 (HTTP/1.1) answering each request with `answer(request)`:
/// (status, JSON or text body). Returns its address and the PEM of the CA that signed its
/// certificate (for 127.0.0.1).
pub async fn https_server(
    answer: impl Fn(Seen) -> (u16, String) + Send + Sync + 'static,
) -> (std::net::SocketAddr, String) {
    use std::sync::Arc;
    let (acceptor, ca_pem) = localhost_tls();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    serve_tls(
        listener,
        acceptor,
        move |req: http::Request<hyper::body::Incoming>| {
            let answer = answer.clone();
            async move {
                use http_body_util::BodyExt as _;
                let method = req.method().to_string();
                let path = req.uri().path().to_owned();
                let authorization = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .unwrap_or_default();
                let (status, text) = answer(Seen {
                    method,
                    path,
                    authorization,
                    body,
                });
                let mut r =
                    http::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                r
            }
        },
    );
    (addr, ca_pem)
}

/// A credential for `who`, issued by the control plane for a join token.
pub fn credential_for(cp: &ControlPlane, who: &str) -> Credential {
    let dir = cp.scratch().join(format!("cred-{who}"));
    let out = cert_request(cp, &cp.url(), who, &token(cp, who, &[]), &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    credential(&dir, &bundle(cp))
}

/// A TLS connection to `to`'s inbound as the holder of `cred`, offering `alpn`.
pub async fn dial(
    cp: &ControlPlane,
    to: &moat_test_util::Proxy,
    cred: &Credential,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    dial_named(cp, to, cred, alpn, "moat.invalid").await
}

/// [`dial`] with the TLS server name `server_name`: in transparent mode the sidecar takes the
/// app port from it (`port-<n>.moat.invalid`).
pub async fn dial_named(
    cp: &ControlPlane,
    to: &moat_test_util::Proxy,
    cred: &Credential,
    alpn: &[u8],
    server_name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = moat_tls::client_config(
        Some(cred),
        std::sync::Arc::new(bundle(cp)),
        id(&to.identity),
        alpn,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(to.inbound).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name.to_owned().try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Runs `moat ca rotate-root` until it prints a line containing `marker`, then kills it -9.
pub fn run_rotation_until(cp: &moat_test_util::ControlPlane, marker: &str) -> String {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(moat_test_util::bin("moat"))
        .args(["--control-plane", &cp.url(), "--credentials"])
        .arg(cp.admin_dir())
        .args(["ca", "rotate-root", "--timeout", "30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(marker) {
            child.kill().unwrap();
            child.wait().unwrap();
            return seen;
        }
    }
    let out = child.wait_with_output().unwrap();
    panic!(
        "rotate-root ended before {marker:?}: {seen}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate of `ttl_seconds` for `identity`, obtained with a join token as a sidecar's
/// first one is (the control plane must allow so short a lifetime: `--min-cert-ttl`).
pub async fn short_credential(
    cp: &ControlPlane,
    identity: &str,
    ttl_seconds: u32,
) -> moat_tls::Credential {
    let key = moat_identity::WorkloadKey::generate(&id(identity)).unwrap();
    let issued = identity_client(cp, None)
        .await
        .certify(moat_api::v1::CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds,
            credential: Some(moat_api::v1::certify_request::Credential::JoinToken(token(
                cp,
                identity,
                &[],
            ))),
        })
        .await
        .unwrap()
        .into_inner();
    moat_tls::Credential::new(
        issued
            .chain_der
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect(),
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.private_key_der().into()),
        &bundle(cp),
    )
    .unwrap()
}

/// Established TCP connections on this machine (IPv4) whose local port is `local` and, when
/// given, whose remote port is `remote`: what a server process holds open, read from the
/// kernel's table rather than from the process's own word.
pub fn tcp_established(local: u16, remote: Option<u16>) -> usize {
    let local = format!(":{local:04X}");
    let remote = remote.map(|r| format!(":{r:04X}"));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            f.len() > 3
                && f[1].ends_with(&local)
                && remote.as_ref().is_none_or(|r| f[2].ends_with(r))
                && f[3] == "01"
        })
        .count()
}

/// Sends `request` to `to` as raw bytes and reads the answer until the connection closes
/// (within 10 s).
pub async fn exchange_bytes(to: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    got
}
