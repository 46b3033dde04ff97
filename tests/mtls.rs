//! The data plane over the real binaries: app → sidecar → mTLS → sidecar → app for TCP,
//! HTTP/1.1, HTTP/2 and gRPC; verified identities; and everything the inbound refuses.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use moat_test_util::apps::{echo, grpc_echo, http_echo, tcp_echo, tcp_greeter};
use moat_test_util::{ControlPlane, Proxy, apply_policy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const FRONTEND: &str = "spiffe://moat.local/ns/default/sa/frontend";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_crosses_a_sidecar_pair_with_the_verified_identity() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let payments = Proxy::builder(&cp, "payments")
        .app(grpc_echo().await)
        .start()
        .unwrap();
    let ledger = Proxy::builder(&cp, "ledger")
        .app(tcp_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders", "payments", "ledger"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders", "payments", "ledger"]);

    // HTTP/1.1, with a forged identity header that must not reach the app.
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let (status, _, body) = get(
        &h1_client(),
        "GET",
        &url,
        &[("x-moat-peer-id", "spiffe://moat.local/ns/default/sa/admin")],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("peer={FRONTEND} ")), "{body}");
    assert!(body.contains("version=HTTP/1.1"), "{body}");

    // HTTP/2 (prior knowledge) stays HTTP/2 end to end.
    let (status, _, body) = get(&h2_client(), "POST", &url, &[("x-moat-peer-id", "forged")])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("peer={FRONTEND} ")) && body.contains("version=HTTP/2.0"),
        "{body}"
    );

    // gRPC unary and bidirectional streaming.
    let mut grpc =
        echo::echo_client::EchoClient::connect(format!("http://{}", frontend.upstream("payments")))
            .await
            .unwrap();
    let mut req = tonic::Request::new(echo::EchoRequest { text: "hi".into() });
    req.metadata_mut()
        .insert("x-moat-peer-id", "forged".parse().unwrap());
    let reply = grpc.unary(req).await.unwrap().into_inner();
    assert_eq!((reply.text.as_str(), reply.peer.as_str()), ("hi", FRONTEND));
    let outbound = tokio_stream::iter((0..5).map(|i| echo::EchoRequest {
        text: format!("m{i}"),
    }));
    let mut replies = grpc.stream(outbound).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(r) = replies.message().await.unwrap() {
        assert_eq!(r.peer, FRONTEND);
        got.push(r.text);
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);

    // Opaque TCP.
    let mut tcp = tokio::net::TcpStream::connect(frontend.upstream("ledger"))
        .await
        .unwrap();
    tcp.write_all(b"hello mesh").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello mesh");
    drop(tcp);

    // Each side logged and counted what it did.
    let m = orders.metrics();
    assert!(m.contains(r#"moat_requests_total{direction="inbound",peer="spiffe://moat.local/ns/default/sa/frontend",target="spiffe://moat.local/ns/default/sa/orders",decision="allow",reason="allowed",status="200"} 2"#), "{m}");
    assert!(
        payments.log_text().contains("path=/moat.test.Echo/Unary"),
        "{}",
        payments.log_text()
    );
    let ok = moat_test_util::eventually(Duration::from_secs(5), || {
        ledger.log_text().contains("protocol=\"tcp\"").then_some(())
    });
    assert!(ok.is_some(), "{}", ledger.log_text());
    let config: serde_json::Value =
        serde_json::from_str(&orders.admin_get("/config").unwrap().1).unwrap();
    assert_eq!(
        config["identity"],
        "spiffe://moat.local/ns/default/sa/orders"
    );
    assert!(
        config["certificate"]["serial"]
            .as_str()
            .is_some_and(|s| s.len() == 32)
    );
}

/// [`exchange_bytes`], as text.
async fn exchange(to: std::net::SocketAddr, request: &str) -> String {
    String::from_utf8_lossy(&exchange_bytes(to, request.as_bytes()).await).into_owned()
}

/// A mesh where frontend calls orders, whose app records what it receives; the sidecars run with
/// `orders_args` and `frontend_args` too.
async fn frontend_and_recorded_orders(
    orders_args: &[&str],
    frontend_args: &[&str],
) -> (ControlPlane, Proxy, Proxy, moat_test_util::apps::Recording) {
    let (app, rec) = moat_test_util::apps::recording_http().await;
    let (cp, orders, frontend) = frontend_and_orders(app, orders_args, frontend_args).await;
    (cp, orders, frontend, rec)
}

/// A mesh where frontend calls orders, whose app is `app`, once frontend knows orders'
/// endpoints; the sidecars run with `orders_args` and `frontend_args` too.
async fn frontend_and_orders(
    app: std::net::SocketAddr,
    orders_args: &[&str],
    frontend_args: &[&str],
) -> (ControlPlane, Proxy, Proxy) {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::builder(&cp, "orders")
        .app(app)
        .args(orders_args)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .args(frontend_args)
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    (cp, orders, frontend)
}

/// HTTP/1.x from a local client crosses the mesh on the shared HTTP/2 connection and reaches
/// the app as HTTP/1.1 (decision 52): the app receives each request as its client sent it
/// (method, target, Host, body, chunked or not), with the verified identity and no forged one,
/// none of the sidecars' own headers, and no `TE` but `trailers` (a second line is not let
/// through on the first one's value); a HEAD's answer keeps its declared length; CONNECT is
/// refused before it reaches the mesh; and one mesh connection carries these requests and
/// HTTP/2's alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_crosses_the_mesh_on_the_shared_http2_connection() {
    let (_cp, _orders, frontend, rec) = frontend_and_recorded_orders(&[], &[]).await;
    let to = frontend.upstream("orders");
    let requests = [
        "GET /a/b?x=1 HTTP/1.1\r\nHost: orders.example\r\nx-moat-peer-id: forged\r\nTE: trailers\r\nTE: gzip\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /upload HTTP/1.1\r\nHost: orders.example\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
        "GET /old HTTP/1.0\r\nHost: orders.example\r\n\r\n",
        "DELETE /items/7 HTTP/1.1\r\nHost: orders.example\r\nConnection: close\r\n\r\n",
        // Trailers HTTP/1.1 allows and HTTP/2 forbids (RFC 9113 section 8.2.2) are dropped,
        // not left to hold the request open on the shared connection.
        "POST /trailers HTTP/1.1\r\nHost: orders.example\r\nTransfer-Encoding: chunked\r\nTrailer: x-ok\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nconnection: close\r\nkeep-alive: 1\r\nte: gzip\r\nx-ok: 1\r\n\r\n",
    ];
    for r in requests {
        let answer = exchange(to, r).await;
        assert!(
            answer.starts_with("HTTP/1.") && answer.contains(" 200 ") && answer.ends_with("seen\n"),
            "{r:?}: {answer}"
        );
    }
    // A HEAD's answer keeps the length the app declared, with no body (RFC 9110 section 9.3.2).
    let answer = exchange(
        to,
        "HEAD /head HTTP/1.1\r\nHost: orders.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200 ")
            && answer
                .to_ascii_lowercase()
                .contains("\r\ncontent-length: 5\r\n")
            && answer.ends_with("\r\n\r\n"),
        "{answer:?}"
    );
    // No tunnel: it would have no path for the far side's rules to judge.
    let answer = exchange(
        to,
        "CONNECT orders.example:443 HTTP/1.1\r\nHost: orders.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nx-moat-deny-reason: method-not-supported\r\n")
            && lower.contains("\r\nx-request-id: "),
        "{answer}"
    );
    let seen = rec.lock().unwrap().clone();
    let got: Vec<(&str, &str, usize)> = seen
        .iter()
        .map(|r| (r.method.as_str(), r.path_and_query.as_str(), r.body_len))
        .collect();
    assert_eq!(
        got,
        [
            ("GET", "/a/b?x=1", 5),
            ("POST", "/upload", 11),
            ("GET", "/old", 0),
            ("DELETE", "/items/7", 0),
            ("POST", "/trailers", 5),
            ("HEAD", "/head", 0),
        ]
    );
    for r in &seen {
        let header = |name: &str| -> Vec<&str> {
            r.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(r.version, "HTTP/1.1", "{r:?}");
        assert_eq!(header("host"), ["orders.example"], "{r:?}");
        assert_eq!(header("x-moat-peer-id"), [FRONTEND], "{r:?}");
        // A `TE` line after `trailers` goes, and the first with it.
        assert_eq!(header("te"), Vec::<&str>::new(), "{r:?}");
        assert!(
            r.trailers
                .iter()
                .all(|(k, _)| !["connection", "keep-alive", "te"].contains(&k.as_str())),
            "{r:?}"
        );
        assert!(
            r.headers
                .iter()
                .all(|(k, _)| !k.starts_with("x-moat-") || k == "x-moat-peer-id"),
            "{r:?}"
        );
    }
    // One shared mesh connection carried all four.
    let m = frontend.metrics();
    assert!(
        m.contains(r#"moat_upstream_connections_total{protocol="h2"} 1"#),
        "{m}"
    );
    assert!(!m.contains(r#"protocol="http1""#), "{m}");
    // The refused CONNECT is counted and logged like any other request.
    assert!(
        m.lines().any(|l| l.starts_with("moat_requests_total{")
            && l.contains(r#"direction="outbound""#)
            && l.contains(r#"reason="method-not-supported""#)
            && l.contains(r#"status="403""#)),
        "{m}"
    );
    assert!(
        frontend
            .log_text()
            .contains(r#"reason="method-not-supported""#),
        "{}",
        frontend.log_text()
    );

    // HTTP/2 from a local client goes on the same connection, and reaches the app as HTTP/2.
    let url = format!("http://{to}/h2");
    let (status, _, body) = get(&h2_client(), "GET", &url, &[]).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "seen\n"));
    let last = rec.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last.path_and_query.as_str(), last.version.as_str()),
        ("/h2", "HTTP/2.0")
    );
    let m = frontend.metrics();
    assert!(
        m.contains(r#"moat_upstream_connections_total{protocol="h2"} 1"#),
        "{m}"
    );
}

/// A shared mesh connection carries HTTP/1.1 requests only while it is as trustworthy as a new
/// one would be: after the caller's sidecar renews its certificate the next request goes on a
/// new connection, and once the far side is revoked nothing more reaches it, although the
/// connection to it was open and idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_connection_carries_nothing_its_certificates_no_longer_allow() {
    let (cp, _orders, frontend, rec) = frontend_and_recorded_orders(&[], &[]).await;
    let to = frontend.upstream("orders");
    let request = "GET /x HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    let opened = |n: u32| {
        frontend.metrics().contains(&format!(
            r#"moat_upstream_connections_total{{protocol="h2"}} {n}"#
        ))
    };
    for _ in 0..3 {
        assert!(exchange(to, request).await.contains(" 200 "));
    }
    assert!(opened(1), "{}", frontend.metrics());

    // A renewal: the open connection was made with the old certificate.
    cp.moat_ok(&[
        "cert",
        "rotate",
        "--identity",
        "frontend",
        "--timeout",
        "10s",
    ]);
    assert!(exchange(to, request).await.contains(" 200 "));
    assert!(opened(2), "{}", frontend.metrics());

    // A revocation of the far side: from the moment frontend knows, nothing reaches orders.
    cp.moat_ok(&["revoke", "--identity", "orders", "--reason", "test"]);
    let mut refused = None;
    for _ in 0..100 {
        let answer = exchange(to, request).await;
        if !answer.contains(" 200 ") {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Refused either way the snapshot says it: the endpoint gone from the service table (503),
    // or its certificate revoked (502), which also retires the connection to it.
    let refusal = |answer: &str| {
        (answer.starts_with("HTTP/1.1 503") && answer.contains("no endpoints are known"))
            || (answer.starts_with("HTTP/1.1 502") && answer.contains("revoked"))
    };
    let refused = refused.expect("frontend still reached the revoked orders after 5 s");
    assert!(refusal(&refused), "{refused}");
    let reached = rec.lock().unwrap().len();
    for _ in 0..5 {
        let answer = exchange(to, request).await;
        assert!(refusal(&answer), "{answer}");
    }
    assert_eq!(
        rec.lock().unwrap().len(),
        reached,
        "a request reached orders"
    );
}

/// A burst of HTTP/2 requests needing more streams than one shared connection carries (100)
/// opens a second one; once the burst is over the spare is closed (`spare`, and orders holds
/// one connection from frontend again), while the oldest stays and carries the next requests
/// without a new dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursts_spare_shared_connection_is_closed_once_idle() {
    let (_cp, orders, frontend) =
        frontend_and_orders(http_echo().await, &[], &["--header-read-timeout", "2s"]).await;
    let client = h2_client();
    let to = frontend.upstream("orders");
    let burst: Vec<_> = (0..120)
        .map(|_| {
            let (client, url) = (client.clone(), format!("http://{to}/burst?sleep_ms=500"));
            tokio::spawn(async move { get(&client, "GET", &url, &[]).await })
        })
        .collect();
    for request in burst {
        let (status, _, _) = request.await.unwrap().unwrap();
        assert_eq!(status, 200);
    }
    let opened = || {
        counter(
            &frontend.metrics(),
            r#"moat_upstream_connections_total{protocol="h2"}"#,
        )
    };
    let spares_closed = || {
        counter(
            &frontend.metrics(),
            r#"moat_connections_closed_total{direction="upstream",reason="spare"}"#,
        )
    };
    assert_eq!(opened(), 2, "{}", frontend.metrics());
    // The keep time is 1 s here: the spare goes after two looks that find it idle.
    assert_eq!(tcp_established(orders.inbound.port(), None), 2);
    let closed = tokio::task::block_in_place(|| {
        moat_test_util::eventually(Duration::from_secs(15), || {
            (spares_closed() == 1 && tcp_established(orders.inbound.port(), None) == 1)
                .then_some(())
        })
    });
    assert!(
        closed.is_some(),
        "{} connections at orders\n{}",
        tcp_established(orders.inbound.port(), None),
        frontend.metrics()
    );
    for _ in 0..3 {
        let (status, _, _) = get(&client, "GET", &format!("http://{to}/after"), &[])
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (opened(), spares_closed()),
        (2, 1),
        "{}",
        frontend.metrics()
    );
    assert_eq!(tcp_established(orders.inbound.port(), None), 1);
}

/// A control plane; ledger, a server-first TCP app (it greets first), behind its sidecar; and
/// frontend with an outbound listener to ledger on a port declared opaque: no detection, the
/// greeting flows at once. The reserved port goes with them, kept while the test runs.
async fn ledger_behind_an_opaque_port() -> (ControlPlane, Proxy, Proxy, moat_test_util::ReservedPort)
{
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let ledger = Proxy::builder(&cp, "ledger")
        .app(tcp_greeter().await)
        .start()
        .unwrap();
    // Reserved for the outbound listener, whose port must be known to declare it opaque.
    let reserved = moat_test_util::ReservedPort::loopback();
    let port = reserved.port().to_string();
    let upstream = format!("ledger@{port}");
    let fe = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&[&upstream])
        .args(&["--opaque-ports", &port])
        .start()
        .unwrap();
    wait_for_services(&fe, &["ledger"]);
    (cp, ledger, fe, reserved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_works_through_an_opaque_port() {
    let (_cp, _ledger, fe, _reserved) = ledger_behind_an_opaque_port().await;
    let mut tcp = tokio::net::TcpStream::connect(fe.upstream("ledger"))
        .await
        .unwrap();
    let mut greeting = [0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&greeting, b"220 moat test\r\n");
    tcp.write_all(b"QUIT\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    tcp.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"QUIT\r\n");
    drop(tcp);
    let logged = moat_test_util::eventually(Duration::from_secs(5), || {
        fe.log_text().contains("opaque=true").then_some(())
    });
    assert!(logged.is_some(), "{}", fe.log_text());
}

/// The value of a counter series (`name{labels}`) in a Prometheus text exposition, 0 if absent.
fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Handshakes of one kind that `proxy` counted in `direction`.
fn handshakes(proxy: &Proxy, direction: &str, kind: &str) -> u64 {
    counter(
        &proxy.metrics(),
        &format!("moat_tls_handshakes_total{{direction=\"{direction}\",kind=\"{kind}\"}}"),
    )
}

/// Opens `n` opaque connections through `fe` to ledger at once and reads each one's greeting.
async fn greeted_at_once(fe: &Proxy, n: usize) {
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..n {
        let to = fe.upstream("ledger");
        all.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(to).await.unwrap();
            let mut greeting = [0u8; 15];
            tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut greeting))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&greeting, b"220 moat test\r\n");
        });
    }
    while let Some(done) = all.join_next().await {
        done.unwrap();
    }
}

/// A burst of new connections to one endpoint resumes TLS sessions instead of signing and
/// verifying certificates again, and both sides count each handshake by kind. Twelve at once is
/// more than the eight tickets rustls keeps per server name by default; the sidecar keeps 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_connections_resumes_and_is_counted_by_kind() {
    const BURST: u64 = 12;
    let (_cp, ledger, fe, _reserved) = ledger_behind_an_opaque_port().await;

    greeted_at_once(&fe, BURST as usize).await;
    let first = handshakes(&fe, "outbound", "full")
        + handshakes(&fe, "outbound", "full-retry")
        + handshakes(&fe, "outbound", "resumed");
    assert_eq!(first, BURST, "{}", fe.metrics());
    assert!(
        handshakes(&fe, "outbound", "full") >= 1,
        "the first connection has no ticket: {}",
        fe.metrics()
    );
    let (full, resumed) = (
        handshakes(&fe, "outbound", "full"),
        handshakes(&fe, "outbound", "resumed"),
    );
    let inbound_resumed = handshakes(&ledger, "inbound", "resumed");

    greeted_at_once(&fe, BURST as usize).await;
    assert_eq!(
        handshakes(&fe, "outbound", "resumed") - resumed,
        BURST,
        "every connection of the second burst resumes: {}",
        fe.metrics()
    );
    assert_eq!(
        handshakes(&fe, "outbound", "full"),
        full,
        "{}",
        fe.metrics()
    );
    let counted = moat_test_util::eventually(Duration::from_secs(5), || {
        (handshakes(&ledger, "inbound", "resumed") - inbound_resumed == BURST).then_some(())
    });
    assert!(counted.is_some(), "{}", ledger.metrics());
    // Both ends of a connection see the same kind of handshake.
    for kind in ["full", "full-retry", "resumed"] {
        assert_eq!(
            handshakes(&ledger, "inbound", kind),
            handshakes(&fe, "outbound", kind),
            "{kind}: {}\n{}",
            ledger.metrics(),
            fe.metrics()
        );
    }
}

/// A rustls client config presenting `chain`/`key` (or nothing), trusting `bundle` for `server`.
fn client_config(
    bundle: &moat_identity::TrustBundle,
    server: &str,
    cert: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(moat_tls::SpiffeServerVerifier::new(
            Arc::new(bundle.clone()),
            id(server),
        )));
    let mut cfg = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// Sends an HTTP/1.1 request over TLS; returns what came back (empty when refused).
async fn tls_request(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> String {
    tls_request_resumable(addr, cfg).await.body
}

/// A control plane on a root the test holds the key of (imported at its first start), so the
/// test can mint certificates the mesh trusts, expired ones included.
fn control_plane_with_own_root() -> (ControlPlane, (rcgen::Certificate, rcgen::KeyPair)) {
    let root = self_signed_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.pem"), root.0.pem()).unwrap();
    std::fs::write(dir.path().join("root.key"), root.1.serialize_pem()).unwrap();
    let cp = ControlPlane::start_with(&[
        "--import-root-cert",
        dir.path().join("root.pem").to_str().unwrap(),
        "--import-root-key",
        dir.path().join("root.key").to_str().unwrap(),
    ])
    .unwrap();
    (cp, root)
}

fn self_signed_root() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).unwrap(), key)
}

/// A leaf for `who` under `root`, valid from `from` to `to` (offsets from now, in seconds).
fn leaf(
    root: &(rcgen::Certificate, rcgen::KeyPair),
    who: &str,
    from: i64,
    to: i64,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id(who).to_string().try_into().unwrap())];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(from);
    p.not_after = now + time::Duration::seconds(to);
    let issuer = rcgen::Issuer::from_ca_cert_der(root.0.der(), &root.1).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    (
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_refuses_everything_it_should_with_a_reason() {
    let (cp, root) = control_plane_with_own_root();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let bundle = bundle(&cp);

    // 1. Plaintext HTTP.
    let mut plain = tokio::net::TcpStream::connect(orders.inbound)
        .await
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"));

    // 2. TLS without a client certificate.
    let anonymous = tls_request(
        orders.inbound,
        client_config(&bundle, "orders", None, b"http/1.1"),
    )
    .await;
    assert!(anonymous.is_empty(), "{anonymous}");

    // 3. A certificate from a foreign CA.
    let foreign = self_signed_root();
    let stranger = client_config(
        &bundle,
        "orders",
        Some(leaf(&foreign, "frontend", -60, 3600)),
        b"http/1.1",
    );
    assert!(tls_request(orders.inbound, stranger).await.is_empty());

    // 4. An expired certificate under the mesh's own root.
    let expired = client_config(
        &bundle,
        "orders",
        Some(leaf(&root, "frontend", -7200, -60)),
        b"http/1.1",
    );
    assert!(tls_request(orders.inbound, expired).await.is_empty());

    // 5. A valid mesh identity that no policy allows: HTTP 403 with the reason …
    let intruder = leaf(&root, "intruder", -60, 3600);
    let resp = tls_request(
        orders.inbound,
        client_config(
            &bundle,
            "orders",
            Some((intruder.0.clone(), intruder.1.clone_key())),
            b"http/1.1",
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains("x-moat-deny-reason: identity-not-allowed"),
        "{resp}"
    );
    assert!(
        resp.contains("identity-not-allowed (policy default/orders@"),
        "{resp}"
    );

    // … and gRPC status 7 from a gRPC service.
    let payments = Proxy::builder(&cp, "payments")
        .app(grpc_echo().await)
        .start()
        .unwrap();
    let cred =
        moat_tls::Credential::new(intruder.0.clone(), intruder.1.clone_key(), &bundle).unwrap();
    let channel = moat_tls::connect::channel(
        &format!("https://{}", payments.inbound),
        bundle.clone(),
        id("payments"),
        Some(&cred),
    )
    .await
    .unwrap();
    let status = echo::echo_client::EchoClient::new(channel)
        .unary(echo::EchoRequest { text: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("identity-not-allowed"),
        "{status:?}"
    );

    // Every refusal is visible in the metrics and the log, with its reason.
    let settle = moat_test_util::eventually(Duration::from_secs(5), || {
        let m = orders.metrics();
        [
            "not-tls",
            "no-client-certificate",
            "unknown-issuer",
            "certificate-expired",
        ]
        .iter()
        .all(|r| {
            m.contains(&format!(
                r#"moat_tls_handshake_failures_total{{direction="inbound",reason="{r}"}} 1"#
            ))
        })
        .then_some(m)
    });
    let m = settle.unwrap_or_else(|| panic!("{}", orders.metrics()));
    assert!(m.contains(r#"moat_authz_decisions_total{direction="inbound",peer="spiffe://moat.local/ns/default/sa/intruder",target="spiffe://moat.local/ns/default/sa/orders",decision="deny",reason="identity-not-allowed"} 1"#), "{m}");
    let log = orders.log_text();
    for reason in [
        "not-tls",
        "no-client-certificate",
        "unknown-issuer",
        "certificate-expired",
        "identity-not-allowed",
    ] {
        assert!(log.contains(reason), "{reason} not logged:\n{log}");
    }
}

/// What one TLS request saw: whether the handshake resumed an earlier session, the suite it
/// negotiated, and what came back (empty when refused).
struct TlsReply {
    resumed: bool,
    suite: Option<rustls::CipherSuite>,
    body: String,
}

/// Sends an HTTP/1.1 request over TLS and reports what the handshake negotiated.
async fn tls_request_resumable(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> TlsReply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(cfg)
        .connect("moat.invalid".try_into().unwrap(), tcp)
        .await
    else {
        return TlsReply {
            resumed: false,
            suite: None,
            body: String::new(),
        };
    };
    let conn = tls.get_ref().1;
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
    let _ = tls
        .write_all(b"GET /orders HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    TlsReply {
        resumed,
        suite,
        body: String::from_utf8_lossy(&out).into_owned(),
    }
}

/// The MeshConfig's cipher preference reaches every sidecar without a restart: new connections
/// to a sidecar's inbound negotiate the preferred suite whatever order the caller offers, a
/// caller that offers only the other suite still gets in, and sidecars keep talking to each
/// other across the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_cipher_preference_picks_the_suite_of_new_connections() {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let (cp, root) = control_plane_with_own_root();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    let bundle = bundle(&cp);
    // A fresh config per request: no session to resume, every handshake chooses a suite.
    let caller = || {
        client_config(
            &bundle,
            "orders",
            Some(leaf(&root, "frontend", -60, 3600)),
            b"http/1.1",
        )
    };
    let through_mesh = || async {
        let url = format!("http://{}/orders/1", frontend.upstream("orders"));
        get(&h1_client(), "GET", &url, &[]).await.unwrap()
    };

    let before = tls_request_resumable(orders.inbound, caller()).await;
    assert!(before.body.starts_with("HTTP/1.1 200"), "{}", before.body);
    assert_eq!(
        before.suite,
        Some(TLS13_AES_256_GCM_SHA384),
        "the default is AES-256"
    );

    apply_policy(
        &cp,
        "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: { name: mesh }\nspec:\n  cipherPreference: aes-128-gcm\n",
    );
    let mut after = None;
    for _ in 0..100 {
        let reply = tls_request_resumable(orders.inbound, caller()).await;
        if reply.suite == Some(TLS13_AES_128_GCM_SHA256) {
            after = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = after.expect("the sidecar never switched to AES-128-GCM");
    assert!(after.body.starts_with("HTTP/1.1 200"), "{}", after.body);
    assert!(
        after.body.contains(&format!("peer={FRONTEND} ")),
        "{}",
        after.body
    );

    // A caller that offers only AES-256 is still served: the preference orders, it never removes.
    let only_256 = {
        let (chain, key) = leaf(&root, "frontend", -60, 3600);
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider
            .cipher_suites
            .retain(|s| s.suite() == TLS13_AES_256_GCM_SHA384);
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(moat_tls::SpiffeServerVerifier::new(
                Arc::new(bundle.clone()),
                id("orders"),
            )))
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    };
    let old = tls_request_resumable(orders.inbound, only_256).await;
    assert_eq!(old.suite, Some(TLS13_AES_256_GCM_SHA384));
    assert!(old.body.starts_with("HTTP/1.1 200"), "{}", old.body);

    // Sidecar to sidecar, both on the new preference.
    let (status, _, body) = through_mesh().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("peer={FRONTEND} ")), "{body}");
}

/// A resumed TLS session skips certificate verification, so a caller whose certificate expired
/// after its first handshake could otherwise go on resuming: the inbound checks the NotAfter of
/// the certificate the session carries on every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_with_an_expired_certificate_is_refused() {
    let (cp, root) = control_plane_with_own_root();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let bundle = bundle(&cp);
    // Valid for 4 more seconds; the same client config keeps the session tickets.
    let cfg = client_config(
        &bundle,
        "orders",
        Some(leaf(&root, "frontend", -60, 4)),
        b"http/1.1",
    );
    let first = tls_request_resumable(orders.inbound, cfg.clone())
        .await
        .body;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let again = tls_request_resumable(orders.inbound, cfg.clone()).await;
    assert!(again.resumed, "the client should resume its session");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let TlsReply {
        resumed,
        body: late,
        ..
    } = tls_request_resumable(orders.inbound, cfg).await;
    assert!(resumed, "the session outlives the certificate");
    assert!(late.is_empty(), "an expired certificate was let in: {late}");
    let m = orders.metrics();
    assert!(
        m.contains(r#"moat_tls_handshake_failures_total{direction="inbound",reason="certificate-expired"} 1"#),
        "{m}"
    );
}

/// The outbound side of the same gap: a sidecar resuming a session with a server whose
/// certificate expired after the first handshake checks the NotAfter the session carries and
/// refuses it. The server here is a bare TLS endpoint announced for `orders` on the mesh stream,
/// presenting a leaf from the test's root that expires a few seconds in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_with_an_expired_server_certificate_is_refused() {
    let (cp, root) = control_plane_with_own_root();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut admin = moat_test_util::mesh::Admin::connect(&cp).await.unwrap();
    let cred = admin.credential("orders").await.unwrap();
    let _endpoint = admin
        .mesh_stream(&cred, &address)
        .await
        .unwrap()
        .keep_acking();
    let fe = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    let known = moat_test_util::eventually(Duration::from_secs(10), || {
        fe.admin_get("/config")
            .filter(|(_, b)| b.contains(&address))
            .map(|_| ())
    });
    assert!(known.is_some(), "the frontend never learnt the endpoint");

    // Valid for 4 more seconds; the server keeps session state for resumption.
    let (chain, key) = leaf(&root, "orders", -60, 4);
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    server.alpn_protocols = vec![moat_tls::ALPN_TCP.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let kinds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = kinds.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            seen.lock().unwrap().push(tls.get_ref().1.handshake_kind());
            let mut line = [0u8; 6];
            if tls.read_exact(&mut line).await.is_ok() {
                let _ = tls.write_all(b"pong\n").await;
                let _ = tls.shutdown().await;
            }
        }
    });
    let ping = |to| async move {
        let mut tcp = tokio::net::TcpStream::connect(to).await.unwrap();
        tcp.write_all(b"ping!\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let to = fe.upstream("orders");
    assert_eq!(ping(to).await, "pong\n");
    assert_eq!(ping(to).await, "pong\n");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        ping(to).await,
        "",
        "a server with an expired certificate was talked to"
    );
    // The server records a handshake once the client's Finished arrives; the sidecar drops the
    // third connection as soon as its own side completes, so that Finished may never be sent.
    // The sidecar's log says which path refused it: only a handshake that completed (a resumed
    // one: a full one fails verification) reaches the expiry check.
    let kinds = kinds.lock().unwrap().clone();
    use rustls::HandshakeKind::{Full, Resumed};
    assert!(
        kinds == [Some(Full), Some(Resumed)] || kinds == [Some(Full), Some(Resumed), Some(Resumed)],
        "the sidecar should resume its session with the endpoint: {kinds:?}"
    );
    let refused = moat_test_util::eventually(Duration::from_secs(5), || {
        fe.log_text()
            .contains("refused a resumed session whose server certificate has expired")
            .then_some(())
    });
    assert!(refused.is_some(), "{}", fe.log_text());
    let m = fe.metrics();
    assert!(
        m.contains(r#"moat_tls_handshake_failures_total{direction="outbound",reason="certificate-expired"} 1"#),
        "{m}"
    );
}
