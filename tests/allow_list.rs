//! Allow-lists over the real binaries: exactly the listed edges, L7 routes for HTTP and gRPC,
//! live changes (closing what is no longer allowed), audit mode, `explain` agreeing with the
//! proxies, `moat policy test`, and policies surviving a control-plane restart.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use moat_test_util::apps::{echo, grpc_echo, http_echo, tcp_echo};
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// GETs until the status is `want` (policy changes arrive asynchronously); returns the answer.
async fn until_status(url: &str, method: &str, want: u16) -> (u16, http::HeaderMap, String) {
    let client = h1_client();
    let start = std::time::Instant::now();
    loop {
        let r = get(&client, method, url, &[]).await.unwrap();
        if r.0 == want || start.elapsed() > Duration::from_secs(10) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reason(h: &http::HeaderMap) -> &str {
    h.get("x-moat-deny-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

const CHAIN: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders, namespace: shop }
spec:
  target: orders
  rules:
    - from: [frontend]
      http: [{ methods: [GET], paths: ["/orders", "/orders/*"] }]
---
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: payments, namespace: shop }
spec:
  target: payments
  rules:
    - from: [orders]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_listed_edges_work_and_routes_are_enforced() {
    let cp = ControlPlane::start().unwrap();
    let app = http_echo().await;
    let payments = Proxy::builder(&cp, "payments").app(app).start().unwrap();
    let orders = Proxy::builder(&cp, "orders")
        .app(app)
        .upstreams(&["payments"])
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(app)
        .upstreams(&["orders", "payments"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders", "payments"]);
    wait_for_services(&orders, &["payments"]);
    let fe_orders = format!("http://{}/orders/1", frontend.upstream("orders"));
    let fe_payments = format!("http://{}/pay", frontend.upstream("payments"));
    let or_payments = format!("http://{}/pay", orders.upstream("payments"));

    // Zero trust: with no policy every call is denied with no-policy.
    for url in [&fe_orders, &fe_payments, &or_payments] {
        let (s, h, _) = get(&h1_client(), "GET", url, &[]).await.unwrap();
        assert_eq!((s, reason(&h)), (403, "no-policy"), "{url}");
    }
    apply_policy(&cp, CHAIN);
    let (s, _, body) = until_status(&fe_orders, "GET", 200).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(until_status(&or_payments, "GET", 200).await.0, 200);
    // Not listed: frontend straight to payments.
    let (s, h, body) = get(&h1_client(), "GET", &fe_payments, &[]).await.unwrap();
    assert_eq!((s, reason(&h)), (403, "identity-not-allowed"), "{body}");
    assert!(body.contains("policy shop/payments@"), "{body}");
    // L7: GET allowed, DELETE denied.
    let (s, h, body) = get(&h1_client(), "DELETE", &fe_orders, &[]).await.unwrap();
    assert_eq!((s, reason(&h)), (403, "route-not-allowed"), "{body}");
    assert!(
        body.contains("route-not-allowed (policy shop/orders@"),
        "{body}"
    );
    let m = orders.metrics();
    assert!(
        m.contains(r#"reason="route-not-allowed""#) && m.contains(r#"decision="deny""#),
        "{m}"
    );
    assert!(orders.log_text().contains("route-not-allowed"));

    // Every policy reached all of its target's proxies.
    let status = cp.moat_ok(&["policy", "status"]);
    assert!(
        status
            .lines()
            .filter(|l| l.starts_with("shop/"))
            .all(|l| l.contains(" 1/1 ")),
        "{status}"
    );
    let counted = eventually(Duration::from_secs(15), || {
        let status = cp.moat_ok(&["policy", "status"]);
        (status.contains("rule 0: allow") && status.contains("no rule matched: deny")).then_some(())
    });
    assert!(counted.is_some(), "{}", cp.moat_ok(&["policy", "status"]));
    let m = orders.metrics();
    assert!(
        m.contains(r#"moat_policy_rule_hits_total{policy="shop/orders","#),
        "{m}"
    );
    drop(payments);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_method_rule_answers_status_7_for_other_methods() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(
        &cp,
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: payments }\nspec:\n  target: payments\n  rules:\n    - from: [frontend]\n      http: [{ methods: [POST], paths: [\"/moat.test.Echo/Unary\"] }]\n",
    );
    let _payments = Proxy::builder(&cp, "payments")
        .app(grpc_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["payments"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["payments"]);
    let mut grpc =
        echo::echo_client::EchoClient::connect(format!("http://{}", frontend.upstream("payments")))
            .await
            .unwrap();
    assert_eq!(
        grpc.unary(echo::EchoRequest { text: "ok".into() })
            .await
            .unwrap()
            .into_inner()
            .text,
        "ok"
    );
    let err = grpc
        .stream(tokio_stream::iter(vec![echo::EchoRequest {
            text: "x".into(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("route-not-allowed") && err.message().contains("default/payments@"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_open_connections_it_forbids() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let _ledger = Proxy::builder(&cp, "ledger")
        .app(tcp_echo().await)
        .start()
        .unwrap();
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["ledger", "orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["ledger", "orders"]);
    // An open TCP connection and a live HTTP/2 session between the sidecars.
    let mut tcp = tokio::net::TcpStream::connect(frontend.upstream("ledger"))
        .await
        .unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    // The client keeps its connection to the outbound, and with it the outbound's HTTP/2
    // connection to orders (each local client connection has its own).
    let client = h1_client();
    assert_eq!(get(&client, "GET", &url, &[]).await.unwrap().0, 200);
    // Now frontend may call neither.
    apply_policy(
        &cp,
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: ledger }\nspec:\n  target: ledger\n  rules: [{ from: [orders] }]\n---\napiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: orders }\nspec:\n  target: orders\n  rules: [{ from: [payments] }]\n",
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the forbidden connection stayed open");
    let session_closed = eventually(Duration::from_secs(10), || {
        orders
            .log_text()
            .contains("closing an HTTP connection the new policy no longer allows")
            .then_some(())
    });
    assert!(session_closed.is_some(), "{}", orders.log_text());
    // New connections and requests are refused too.
    let mut again = tokio::net::TcpStream::connect(frontend.upstream("ledger"))
        .await
        .unwrap();
    let _ = again.write_all(b"ping").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), again.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{out:?}");
    let (s, h, _) = until_status(&url, "GET", 403).await;
    assert_eq!((s, reason(&h)), (403, "identity-not-allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_allows_and_counts_what_enforce_then_denies() {
    let cp = ControlPlane::start().unwrap();
    let audit = "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: orders }\nspec:\n  target: orders\n  mode: audit\n  rules: [{ from: [payments] }]\n";
    apply_policy(&cp, audit);
    let (orders, frontend) = echo_pair(&cp, "orders", "frontend").await;
    wait_for_services(&frontend, &["orders"]);
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let (s, _, body) = until_status(&url, "GET", 200).await;
    assert_eq!(s, 200, "{body}");
    let m = orders.metrics();
    assert!(
        m.contains(r#"moat_authz_decisions_total{direction="inbound",peer="spiffe://moat.local/ns/default/sa/frontend",target="spiffe://moat.local/ns/default/sa/orders",decision="would-deny",reason="identity-not-allowed"}"#),
        "{m}"
    );
    assert!(
        orders.log_text().contains("would-deny"),
        "{}",
        orders.log_text()
    );
    // Per-rule counters travel to the control plane and show in `moat policy status`.
    let counted = eventually(Duration::from_secs(15), || {
        let status = cp.moat_ok(&["policy", "status"]);
        status
            .contains("no rule matched: would-deny")
            .then_some(status)
    });
    assert!(counted.is_some(), "{}", cp.moat_ok(&["policy", "status"]));
    apply_policy(&cp, &audit.replace("mode: audit", "mode: enforce"));
    let (s, h, _) = until_status(&url, "GET", 403).await;
    assert_eq!((s, reason(&h)), (403, "identity-not-allowed"));
}

const TABLE_POLICY: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      ports: [PORT]
      http:
        - { methods: [GET, HEAD], paths: ["/orders", "/orders/*"] }
        - { methods: [POST], paths: ["/orders"] }
    - from: [payments]
      http: [{ methods: [PUT], paths: ["/orders/*"] }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_proxies_on_every_case_and_names_the_rule() {
    let cp = ControlPlane::start().unwrap();
    let app = http_echo().await;
    let port = app.port().to_string();
    apply_policy(&cp, &TABLE_POLICY.replace("PORT", &port));
    let _orders = Proxy::builder(&cp, "orders").app(app).start().unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    let payments = Proxy::builder(&cp, "payments")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    wait_for_services(&payments, &["orders"]);
    let requests = [
        ("GET", "/orders"),
        ("GET", "/orders/1"),
        ("HEAD", "/orders/1"),
        ("POST", "/orders"),
        ("POST", "/orders/1"),
        ("DELETE", "/orders/1"),
        ("PUT", "/orders/1/paid"),
        ("PUT", "/orders/1"),
        ("GET", "/"),
        ("PATCH", "/orders"),
        ("GET", "/ordersx"),
    ];
    let mut cases = 0;
    for (caller, proxy) in [("frontend", &frontend), ("payments", &payments)] {
        for (method, path) in requests {
            let url = format!("http://{}{path}", proxy.upstream("orders"));
            let (status, headers, _) = get(&h1_client(), method, &url, &[]).await.unwrap();
            let explained: serde_json::Value = serde_json::from_str(&cp.moat_ok(&[
                "policy", "explain", "--from", caller, "--to", "orders", "--port", &port,
                "--method", method, "--path", path, "-o", "json",
            ]))
            .unwrap();
            let proxy_allowed = status == 200;
            assert_eq!(
                explained["allowed"], proxy_allowed,
                "{caller} {method} {path}: proxy said {status}"
            );
            if !proxy_allowed {
                assert_eq!(
                    explained["reason"],
                    reason(&headers),
                    "{caller} {method} {path}"
                );
            } else {
                assert!(
                    explained["rule"].is_u64(),
                    "{caller} {method} {path}: no rule named: {explained}"
                );
                assert_eq!(explained["policy"], "default/orders");
            }
            cases += 1;
        }
    }
    assert!(cases >= 20);
    // The text form names the matching rule and traces every rule.
    let text = cp.moat_ok(&[
        "policy",
        "explain",
        "--from",
        "payments",
        "--to",
        "orders",
        "--method",
        "PUT",
        "--path",
        "/orders/7/paid",
    ]);
    assert!(
        text.contains("decision ALLOW") && text.contains("rule 1"),
        "{text}"
    );
    assert!(
        text.contains("rule 0 (enforce): identity-not-allowed"),
        "{text}"
    );
}

#[test]
fn policy_test_passes_a_correct_table_and_names_a_failing_case() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("orders.yaml");
    std::fs::write(&policies, TABLE_POLICY.replace("PORT", "8080")).unwrap();
    let good = "cases:\n  - { name: reads, from: frontend, to: orders, port: 8080, method: GET, path: /orders/1, expect: allow }\n  - { name: deletes, from: frontend, to: orders, port: 8080, method: DELETE, path: /orders/1, expect: deny, reason: route-not-allowed }\n  - { name: stranger, from: intruder, to: orders, port: 8080, expect: deny, reason: identity-not-allowed }\n  - { name: unprotected, from: frontend, to: ledger, port: 1, expect: deny, reason: no-policy }\n";
    let cases = dir.path().join("cases.yaml");
    std::fs::write(&cases, good).unwrap();
    let run = |cases: &std::path::Path| {
        std::process::Command::new(moat_test_util::bin("moat"))
            .args(["policy", "test", "-f"])
            .arg(cases)
            .arg("-p")
            .arg(&policies)
            .output()
            .unwrap()
    };
    let out = run(&cases);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 cases passed"));
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, good.replace("name: deletes, from: frontend, to: orders, port: 8080, method: DELETE, path: /orders/1, expect: deny", "name: deletes, from: frontend, to: orders, port: 8080, method: DELETE, path: /orders/1, expect: allow")).unwrap();
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("1 of 4 cases failed: deletes"),
        "{}",
        stderr(&out)
    );
    std::fs::write(
        &bad,
        "cases:\n  - { name: x, from: a, to: b, expect: maybe }\n",
    )
    .unwrap();
    assert_eq!(run(&bad).status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_versions_and_history_survive_a_restart_and_proxies_converge() {
    let mut cp = ControlPlane::start().unwrap();
    apply_policy(&cp, CHAIN);
    apply_policy(&cp, &CHAIN.replace("[GET]", "[GET, HEAD]"));
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let before = cp.moat_ok(&["policy", "get", "-o", "json"]);
    let history = cp.moat_ok(&["policy", "history", "shop/orders"]);
    assert_eq!(
        history.lines().filter(|l| l.contains("applied")).count(),
        2,
        "{history}"
    );
    cp.kill9();
    cp.restart().unwrap();
    assert_eq!(cp.moat_ok(&["policy", "get", "-o", "json"]), before);
    assert_eq!(cp.moat_ok(&["policy", "history", "shop/orders"]), history);
    let version = serde_json::from_str::<serde_json::Value>(&before).unwrap()["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "orders")
        .unwrap()["version"]
        .as_u64()
        .unwrap();
    let converged = eventually(Duration::from_secs(20), || {
        let status = cp.moat_ok(&["policy", "status"]);
        let config = orders.admin_get("/config")?.1;
        (status.contains(" 1/1 ") && config.contains(&format!("shop/orders@{version}")))
            .then_some(())
    });
    assert!(
        converged.is_some(),
        "{}\n{:?}",
        cp.moat_ok(&["policy", "status"]),
        orders.admin_get("/config")
    );
}
