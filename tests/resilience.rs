//! The data plane under stress, over the real binaries: rotation under load, a control-plane
//! outage, SIGTERM draining, an endpoint with the wrong identity, and garbage on every listener.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn pair(cp: &ControlPlane, app: std::net::SocketAddr, extra: &[&str]) -> (Proxy, Proxy) {
    apply_policy(cp, MESH_POLICY);
    let orders = Proxy::builder(cp, "orders")
        .app(app)
        .args(extra)
        .start()
        .unwrap();
    let frontend = Proxy::builder(cp, "frontend")
        .app(app)
        .upstreams(&["orders"])
        .args(extra)
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    (orders, frontend)
}

fn serial(p: &Proxy) -> String {
    let (_, body) = p.admin_get("/config").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["certificate"]["serial"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_every_few_seconds_under_load_without_a_failed_request() {
    let cp = ControlPlane::start_with(&["--min-cert-ttl", "2s"]).unwrap();
    let (orders, frontend) = pair(&cp, http_echo().await, &["--cert-ttl", "4s"]);
    let (orders_before, frontend_before) = (serial(&orders), serial(&frontend));
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let (ok, failures) = load(&url, 220, Duration::from_secs(30)).await;
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 6000, "only {ok} requests in 30 s");
    // A 4 s certificate renews about every 2 s: well over five times in 30 s, each with a new key.
    for p in [&orders, &frontend] {
        let renewals = p.log_text().matches("renewed our certificate").count();
        assert!(
            renewals >= 5,
            "{} renewed only {renewals} times",
            p.identity
        );
    }
    assert_ne!(serial(&orders), orders_before);
    assert_ne!(serial(&frontend), frontend_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_keeps_serving_while_the_control_plane_is_down() {
    let mut cp = ControlPlane::start().unwrap();
    let (orders, frontend) = pair(&cp, http_echo().await, &[]);
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let traffic = tokio::spawn(async move { load(&url, 100, Duration::from_secs(8)).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    cp.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.restart().unwrap();
    let (ok, failures) = traffic.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 700, "{ok}");
    // Both proxies found the control plane again.
    for p in [&orders, &frontend] {
        let back = eventually(Duration::from_secs(20), || {
            p.metrics()
                .contains("moat_control_plane_connected 1")
                .then_some(())
        });
        assert!(
            back.is_some(),
            "{} did not reconnect:\n{}",
            p.identity,
            p.log_text()
        );
    }
    // A proxy reports itself connected as soon as its stream opens; the control plane's log line
    // for it may land a moment later.
    let logged = eventually(Duration::from_secs(5), || {
        (cp.log_text().matches("proxy connected").count() >= 4).then_some(())
    });
    assert!(logged.is_some(), "{}", cp.log_text());
    // Until both are back, the restarted control plane kept serving the endpoints it had
    // remembered, so the first proxy to reconnect was never told the other one was gone.
    let log = cp.log_text();
    assert!(log.contains("serving remembered endpoints"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let cp = ControlPlane::start().unwrap();
    let (mut orders, frontend) = pair(&cp, http_echo().await, &["--drain-timeout", "5s"]);
    let url = format!(
        "http://{}/orders/slow?sleep_ms=1500",
        frontend.upstream("orders")
    );
    let client = h1_client();
    let in_flight: Vec<_> = (0..10)
        .map(|_| {
            let (c, u) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&c, "GET", &u, &[]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sent = Instant::now();
    orders.sigterm();
    for r in in_flight {
        let (status, _, body) = r.await.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let exit = tokio::task::block_in_place(|| orders.wait_exit(Duration::from_secs(8)));
    let waited = sent.elapsed();
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}: {}",
        orders.log_text()
    );
    assert!(waited < Duration::from_secs(7), "took {waited:?}");
    assert!(
        orders.log_text().contains("draining"),
        "{}",
        orders.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_never_talks_to_an_endpoint_with_the_wrong_identity() {
    let mut cp = ControlPlane::start().unwrap();
    let (mut orders, frontend) = pair(&cp, http_echo().await, &[]);
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    assert_eq!(get(&h1_client(), "GET", &url, &[]).await.unwrap().0, 200);

    // A valid mesh certificate, but for payments.
    let imp_dir = cp.scratch().join("impostor");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "payments",
        "--out",
        imp_dir.to_str().unwrap(),
    ]);
    let cred = credential(&imp_dir, &bundle(&cp));
    let server = moat_tls::server_config(
        &cred,
        std::sync::Arc::new(bundle(&cp)),
        moat_tls::ClientAuth::Optional,
        &[moat_tls::ALPN_H2, moat_tls::ALPN_TCP, moat_tls::ALPN_HTTP1],
    )
    .unwrap();
    // The control plane goes away (the frontend keeps its table), orders dies, and the impostor
    // takes over orders' address.
    cp.kill9();
    let addr = orders.inbound;
    orders.kill9();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let impostor = tokio::spawn(async move {
        let mut completed = Vec::new();
        while let Ok(Ok((tcp, _))) =
            tokio::time::timeout(Duration::from_secs(3), listener.accept()).await
        {
            completed.push(
                tokio_rustls::TlsAcceptor::from(server.clone())
                    .accept(tcp)
                    .await
                    .is_ok(),
            );
        }
        completed
    });
    let (status, _, body) = get(&h1_client(), "GET", &url, &[]).await.unwrap();
    assert_eq!(status, 502, "{body}");
    let completed = impostor.await.unwrap();
    assert!(
        !completed.is_empty() && completed.iter().all(|c| !c),
        "the impostor completed a handshake: {completed:?}"
    );
    let m = frontend.metrics();
    assert!(
        m.contains(
            r#"moat_tls_handshake_failures_total{direction="outbound",reason="wrong-identity"}"#
        ),
        "{m}"
    );
    assert!(
        frontend
            .log_text()
            .contains("spiffe://moat.local/ns/default/sa/payments"),
        "{}",
        frontend.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_listener_is_answered_or_closed_and_service_goes_on() {
    let cp = ControlPlane::start().unwrap();
    let (orders, frontend) = pair(&cp, http_echo().await, &[]);
    let outbound = frontend.upstream("orders");

    async fn exchange_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    }
    async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
        String::from_utf8_lossy(&exchange_raw(addr, bytes).await).into_owned()
    }
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let truncated_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xde, 0xad,
    ];
    let smuggle = b"POST /orders HTTP/1.1\r\nHost: orders\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: orders\r\n\r\n";
    let mut huge = b"GET /orders HTTP/1.1\r\nHost: orders\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");

    // Inbound (TLS only): random bytes and a truncated ClientHello get at most a TLS alert
    // record (content type 21), then the connection closes.
    for g in [&random[..], &truncated_hello[..]] {
        let r = exchange_raw(orders.inbound, g).await;
        assert!(r.is_empty() || (r[0] == 0x15 && r.len() <= 7), "{r:?}");
    }
    // The control plane's TLS port: the same, and it keeps serving.
    let cp_addr: std::net::SocketAddr = cp.url().trim_start_matches("https://").parse().unwrap();
    for g in [&random[..], &truncated_hello[..]] {
        let r = exchange_raw(cp_addr, g).await;
        assert!(r.is_empty() || (r[0] == 0x15 && r.len() <= 7), "{r:?}");
    }
    cp.moat_ok(&["ca", "show"]);
    // Admin: garbage gets a 400 or a close.
    let r = exchange(orders.admin, &random).await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
    // Outbound: a conflicting Content-Length/Transfer-Encoding request is framed by
    // Transfer-Encoding only and the connection closes after the answer (RFC 9112 6.1), so the
    // smuggled request never reaches anyone; 1 MB of headers is refused.
    let r = exchange(outbound, smuggle).await;
    assert!(
        !r.contains("/smuggled") && r.lines().filter(|l| l.starts_with("HTTP/1.1 ")).count() <= 1,
        "{r}"
    );
    let r = exchange(outbound, &huge).await;
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"),
        "{}",
        &r[..r.len().min(200)]
    );

    // Inbound over valid mTLS: the same two HTTP attacks.
    let dir = cp.scratch().join("fe");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "frontend",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let cfg = tls_client(&bundle(&cp), "orders", &credential(&dir, &bundle(&cp)));
    for attack in [&smuggle[..], &huge[..]] {
        let tcp = tokio::net::TcpStream::connect(orders.inbound)
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect("moat.invalid".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let _ = tls.write_all(attack).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let r = String::from_utf8_lossy(&out);
        let shown = &r[..r.len().min(300)];
        assert!(
            !r.contains("/smuggled")
                && r.lines().filter(|l| l.starts_with("HTTP/1.1 ")).count() <= 1,
            "{shown}"
        );
        if attack.len() > 1024 {
            assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{shown}");
        }
    }

    // Everyone is still serving.
    let url = format!("http://{outbound}/orders/1");
    let (status, _, body) = get(&h1_client(), "GET", &url, &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    for p in [&orders, &frontend] {
        assert_eq!(p.admin_get("/ready").unwrap().0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_live_but_not_ready_until_it_has_a_certificate_and_a_snapshot() {
    let mut cp = ControlPlane::start().unwrap();
    let token = cp.moat_ok(&["token", "create", "--identity", "orders"]);
    cp.kill9();
    let orders = Proxy::launch(&cp, "orders", token.trim(), http_echo().await, &[], &[]).unwrap();
    let answered = eventually(Duration::from_secs(10), || {
        orders.admin_get("/live").filter(|(s, _)| *s == 200)
    });
    assert!(answered.is_some(), "{}", orders.log_text());
    let (status, body) = orders.admin_get("/ready").unwrap();
    assert_eq!(
        (status, body.trim()),
        (503, "not ready: no certificate yet")
    );
    // Its inbound port refuses connections it cannot yet secure.
    let mut s = tokio::net::TcpStream::connect(orders.inbound)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0),
        0
    );
    // The control plane comes back; the proxy's retries succeed.
    cp.restart().unwrap();
    orders.wait_ready(Duration::from_secs(30)).unwrap();
    assert!(
        orders
            .log_text()
            .contains("cannot reach the control plane for our first certificate")
    );
}

/// A sidecar's admin port has no TLS and listens where the kubelet and the scraper reach it, so
/// anyone may open connections to it. One address opening idle connections gets 64 at most (the
/// rest are closed at once), the kubelet's probes from another address are still answered, and
/// the holder's place comes back once its connections close. (Before, every connection was
/// kept, with no header timeout: one address could hold the sidecar's files.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_a_sidecars_admin_port() {
    let cp = ControlPlane::start().unwrap();
    let b = Proxy::builder(&cp, "b")
        .app(http_echo().await)
        .start()
        .unwrap();
    let admin = b.admin;
    let from = move |ip: [u8; 4]| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind((std::net::Ipv4Addr::from(ip), 0).into()).unwrap();
        s.connect(admin)
    };
    // Opened, then all watched at once for 1 s (well within the 5 s an idle connection is
    // kept): those over the bound are closed without a byte.
    let mut watching = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let mut s = from([127, 0, 0, 3]).await.unwrap();
        watching.spawn(async move {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
            (matches!(read, Ok(Ok(0))), s)
        });
    }
    let mut held = Vec::new();
    let mut closed = 0;
    while let Some(r) = watching.join_next().await {
        let (was_closed, s) = r.unwrap();
        closed += usize::from(was_closed);
        held.push(s);
    }
    assert_eq!(closed, 100 - 64, "closed {closed} of 100");
    let probe = |ip| async move {
        let mut s = from(ip).await.unwrap();
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    };
    assert!(probe([127, 0, 0, 4]).await.starts_with("HTTP/1.1 200"));
    drop(held);
    let back = eventually(Duration::from_secs(5), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(probe([127, 0, 0, 3]))
        });
        r.starts_with("HTTP/1.1 200").then_some(())
    });
    assert!(back.is_some(), "the address's place never came back");
}
