//! From watching to enforcing, over the real binaries: a service's policy starts in audit mode,
//! its callers' traffic is recorded by its sidecar, `moat policy suggest` turns it into an
//! enforcing policy, and once that is applied the same traffic reaches the app as sent while
//! anything that was not seen (another method, another path, another caller) is refused.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};

/// orders watches: audit mode, with a rule that admits nobody (everything is a would-deny).
const WATCH: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  mode: audit
  rules:
    - from: [nobody]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_suggested_from_audited_traffic_admits_that_traffic_and_nothing_else() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, WATCH);
    let app = http_echo().await;
    let orders = Proxy::builder(&cp, "orders").app(app).start().unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(app)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    let intruder = Proxy::builder(&cp, "intruder")
        .app(app)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    wait_for_services(&intruder, &["orders"]);
    let client = h1_client();
    let at = |p: &Proxy, path: &str| format!("http://{}{path}", p.upstream("orders"));
    let call = |p: &Proxy, method: &'static str, path: &str| {
        let (client, url) = (client.clone(), at(p, path));
        async move { get(&client, method, &url, &[]).await.unwrap() }
    };

    // What frontend does while orders only watches: everything is admitted (and recorded).
    for i in 0..20 {
        assert_eq!(call(&frontend, "GET", &format!("/orders/{i}")).await.0, 200);
    }
    for _ in 0..12 {
        assert_eq!(call(&frontend, "POST", "/orders").await.0, 200);
    }
    for _ in 0..15 {
        assert_eq!(call(&frontend, "GET", "/health").await.0, 200);
    }

    // The sidecar reports every 5 s; the suggestion appears once its report has arrived.
    let suggested = eventually(Duration::from_secs(30), || {
        let out = cp.moat(&["policy", "suggest", "--for", "orders"]);
        let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && yaml.contains("POST")).then_some(yaml)
    })
    .expect("no suggestion with frontend's calls");
    assert!(suggested.contains("mode: enforce"), "{suggested}");
    assert!(
        suggested.contains("\"/orders/*\"   # 20 requests"),
        "{suggested}"
    );
    assert!(
        suggested.contains("\"/health\"   # 15 requests"),
        "{suggested}"
    );
    assert!(suggested.contains("sa/frontend"), "{suggested}");
    assert!(!suggested.contains("intruder"), "{suggested}");
    // frontend only made HTTP requests: no rule admits it without a route (an idle pooled
    // connection carried nothing and is not taken for a TCP caller).
    assert!(!suggested.contains("opaque TCP"), "{suggested}");
    // Stored under the watching policy's key, so applying it replaces that policy.
    assert!(
        suggested.contains("  name: orders\n  namespace: default\n"),
        "{suggested}"
    );

    let file = cp.scratch().join("suggested.yaml");
    std::fs::write(&file, &suggested).unwrap();
    cp.moat_ok(&["policy", "apply", "-f", &file.display().to_string()]);
    let enforcing = eventually(Duration::from_secs(10), || {
        let status: serde_json::Value =
            serde_json::from_str(&cp.moat_ok(&["policy", "status", "-o", "json"])).ok()?;
        let p = &status["policies"][0];
        (p["mode"] == "enforce" && p["applied"] == 1).then_some(())
    });
    assert!(enforcing.is_some(), "{}", cp.moat_ok(&["policy", "status"]));
    // The sidecar enforces once the snapshot is in place: a DELETE, never seen, is refused.
    let start = std::time::Instant::now();
    while call(&frontend, "DELETE", "/orders/1").await.0 != 403 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "orders never enforced the suggestion:\n{}\n{}\n{}",
            cp.moat_ok(&["policy", "get", "-o", "yaml"]),
            cp.moat_ok(&["policy", "status"]),
            orders.admin_get("/config").map(|c| c.1).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same traffic reaches the app as sent, including ids never seen before.
    for (method, path) in [
        ("GET", "/orders/777"),
        ("POST", "/orders"),
        ("GET", "/health"),
    ] {
        let (status, _, body) = call(&frontend, method, path).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
        assert!(
            body.starts_with(&format!("method={method} path={path} ")),
            "{method} {path}: the app received {body}"
        );
        assert!(body.contains("sa/frontend"), "{body}");
    }
    // Anything not seen is refused before the app: a method, a path, a caller.
    for (who, method, path) in [
        (&frontend, "DELETE", "/orders/1"),
        (&frontend, "GET", "/admin"),
        (&frontend, "POST", "/orders/1"),
        (&intruder, "GET", "/orders/1"),
    ] {
        let (status, headers, body) = call(who, method, path).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(
            headers.contains_key("x-moat-deny-reason"),
            "{method} {path}: {headers:?}"
        );
        assert!(
            !body.contains("method="),
            "the app answered {method} {path}"
        );
    }
}
