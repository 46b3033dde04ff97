//! What a Prometheus server and an operator read from `/metrics`, on the real binaries: the
//! classic text format by default (checked by `promtool check metrics`, Debian's `prometheus`
//! package, which scripts/test installs), OpenMetrics when the scraper prefers it, the build of
//! each process, one latency histogram per edge and decision, and rule counters whose series do
//! not multiply with every policy version. And the operations assets in deploy/monitoring: the
//! alerts pass their promtool unit tests, the PrometheusRule carries the same groups, and every
//! metric the alerts and the dashboard query is one the binaries export.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy};

/// What a Prometheus 2.x server sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// orders admits GET /orders/* and `also` from frontend, and GET /limited once a second.
fn policy(also: &str) -> String {
    format!(
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: orders }}\nspec:\n  target: orders\n  rules:\n    - from: [frontend]\n      http: [{{ methods: [GET], paths: [\"/orders/*\", \"{also}\"] }}]\n    - from: [frontend]\n      http: [{{ methods: [GET], paths: [\"/limited\"] }}]\n      rateLimit: {{ requestsPerSecond: 1, burst: 1 }}\n"
    )
}

/// Sends an HTTP request over plain TCP to `addr` (a TLS port) and waits for it to hang up.
async fn not_tls(addr: std::net::SocketAddr) {
    hang_up_after(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
}

/// Sends `bytes` over plain TCP to `addr` and waits (at most 10 s) for it to hang up.
async fn hang_up_after(addr: std::net::SocketAddr, bytes: &[u8]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut sink),
    )
    .await;
}

fn monitoring() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/monitoring")
}

/// The metric names an exposition (classic text) declares, with a histogram's series names.
fn declared(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        if kind == "histogram" {
            for suffix in ["_bucket", "_count", "_sum"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_owned());
    }
    names
}

/// Every `moat_…` metric name in the PromQL expressions of the alerts and the dashboard.
fn queried() -> BTreeSet<String> {
    let alerts: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(monitoring().join("alerts.yaml")).unwrap(),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for group in alerts["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() > 20, "{exprs:#?}");
    let mut names = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("moat_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// `promtool check metrics` on `text`: its complaints, or nothing.
fn promtool_problems(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is missing: run scripts/test, which installs Debian's prometheus package",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        String::new()
    } else {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// `/metrics` at `admin` with `accept` (none: no header): (content type, body).
async fn scrape(admin: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let (status, h, body) = get(
        &h1_client(),
        "GET",
        &format!("http://{admin}/metrics"),
        &headers,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let content_type = h
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (content_type, body)
}

/// A control plane with [`policy`] applied, orders behind its sidecar and frontend with an
/// upstream to it, both ready and frontend knowing orders' endpoint.
async fn orders_and_frontend() -> (ControlPlane, Proxy, Proxy) {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, &policy("/first"));
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    // A request head gets 1 s (the least there is), so a test sees a connection closed.
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .args(&["--header-read-timeout", "1s"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    (cp, orders, frontend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_binaries_serve_metrics_promtool_accepts_and_openmetrics_when_asked() {
    let (cp, orders, frontend) = orders_and_frontend().await;
    let version = |p: &Proxy| -> Option<String> {
        let (_, body) = p.admin_get("/config")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(v["policies"][0].as_str()?.to_owned())
    };
    let first = version(&orders).unwrap();
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let client = h1_client();
    assert_eq!(get(&client, "GET", &url, &[]).await.unwrap().0, 200);
    assert_eq!(get(&client, "DELETE", &url, &[]).await.unwrap().0, 403);
    // Something for every counter the alerts and the dashboard read: a rate-limited request, a
    // refused certificate request, plain-text connections to both TLS ports, and a request
    // head that never ends.
    let limited = format!("http://{}/limited", frontend.upstream("orders"));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(&client, "GET", &limited, &[]).await.unwrap().0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let refused = cert_request(
        &cp,
        &cp.url(),
        "orders",
        "not-a-token",
        &cp.scratch().join("refused"),
    );
    assert!(!refused.status.success());
    not_tls(orders.inbound).await;
    let cp_grpc: std::net::SocketAddr = cp.url().trim_start_matches("https://").parse().unwrap();
    not_tls(cp_grpc).await;
    hang_up_after(frontend.upstream("orders"), b"GET /orders/1 HTTP/1.1\r\n").await;
    // Counted just after the socket is dropped: the hang-up can arrive first.
    let closed = moat_test_util::eventually(std::time::Duration::from_secs(5), || {
        frontend
            .metrics()
            .contains(
                "moat_connections_closed_total{direction=\"outbound\",reason=\"header-read-timeout\"} 1",
            )
            .then_some(())
    });
    assert!(closed.is_some(), "{}", frontend.metrics());
    // A second version of the same policy: its hits count into the same series.
    apply_policy(&cp, &policy("/second"));
    let v2 = moat_test_util::eventually(std::time::Duration::from_secs(10), || {
        version(&orders).filter(|v| *v != first)
    });
    assert!(v2.is_some(), "{:?}", orders.admin_get("/config"));
    assert_eq!(get(&client, "GET", &url, &[]).await.unwrap().0, 200);

    let admins = [
        ("orders", orders.admin, "proxy"),
        ("frontend", frontend.admin, "proxy"),
        ("control plane", cp.admin_addr(), "control-plane"),
    ];
    let mut exported = BTreeSet::new();
    for (who, admin, component) in admins {
        let (content_type, text) = scrape(admin, None).await;
        exported.extend(declared(&text));
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{who}"
        );
        assert_eq!(promtool_problems(&text), "", "{who}:\n{text}");
        assert!(!text.contains("# EOF"), "{who}:\n{text}");
        let build = format!(
            "moat_build_info{{component=\"{component}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{who}:\n{text}");

        let (content_type, om) = scrape(admin, Some(PROMETHEUS_ACCEPT)).await;
        assert_eq!(
            content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "{who}"
        );
        assert!(om.ends_with("# EOF\n"), "{who}:\n{om}");
        assert!(om.contains(&build), "{who}:\n{om}");
    }

    let (_, text) = scrape(orders.admin, None).await;
    // One latency histogram per edge and decision.
    for decision in ["allow", "deny"] {
        let series = format!(
            "moat_request_duration_seconds_count{{direction=\"inbound\",peer=\"spiffe://moat.local/ns/default/sa/frontend\",target=\"spiffe://moat.local/ns/default/sa/orders\",decision=\"{decision}\"}}"
        );
        assert!(text.contains(&series), "{series} missing:\n{text}");
    }
    // The allowing rule counted twice across two policy versions, in one series.
    let hits: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("moat_policy_rule_hits_total{"))
        .collect();
    assert!(
        hits.contains(
            &"moat_policy_rule_hits_total{policy=\"default/orders\",rule=\"0\",decision=\"allow\"} 2"
        ),
        "{hits:#?}"
    );
    assert!(hits.iter().all(|l| !l.contains("version=")), "{hits:#?}");
    // Every metric the shipped alerts and dashboard query exists.
    let queried = queried();
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");

    // The control plane names certificate expiry the way the sidecars do.
    let (_, text) = scrape(cp.admin_addr(), None).await;
    assert!(
        text.contains("moat_ca_certificate_expiry_timestamp_seconds{kind=\"root\""),
        "{text}"
    );
}

#[test]
fn the_shipped_alerts_pass_their_unit_tests_and_the_operator_rule_matches() {
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts.test.yaml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(monitoring())
            .output()
            .expect(
                "promtool is missing: run scripts/test, which installs Debian's prometheus package",
            );
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |f: &str| -> serde_json::Value {
        serde_yaml_ng::from_str(&std::fs::read_to_string(monitoring().join(f)).unwrap()).unwrap()
    };
    let (rules, operator) = (read("alerts.yaml"), read("prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], rules["groups"]);
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(monitoring().join("alerts.test.yaml")).unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no test in alerts.test.yaml"
            );
        }
    }
}

/// `moat edges` / `moat top` from the sidecars' own counters: per caller → service, the rate,
/// success, latency percentiles and denials by reason, with no Prometheus server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_show_rate_success_latency_and_denials_per_caller() {
    let (cp, orders, frontend) = orders_and_frontend().await;
    let allowed = format!("http://{}/orders/1", frontend.upstream("orders"));
    let denied = format!("http://{}/admin", frontend.upstream("orders"));
    // Traffic for the whole window: 4 allowed requests for every denied one.
    let traffic = tokio::spawn(async move {
        let client = h1_client();
        for i in 0..u64::MAX {
            let url = if i % 5 == 4 { &denied } else { &allowed };
            let _ = get(&client, "GET", url, &[]).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let out = tokio::task::spawn_blocking({
        let cp_args = (cp.url(), cp.admin_dir());
        move || {
            Command::new(moat_test_util::bin("moat"))
                .args(["edges", "--window", "12s", "-o", "json"])
                .env("MOAT_CONTROL_PLANE", &cp_args.0)
                .env("MOAT_CREDENTIALS", &cp_args.1)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let edge = v["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["from"] == "spiffe://moat.local/ns/default/sa/frontend"
                && e["to"] == "spiffe://moat.local/ns/default/sa/orders"
        })
        .unwrap_or_else(|| panic!("no frontend → orders edge: {v}"))
        .clone();
    assert_eq!(edge["mtls"], true);
    assert!(edge["rps"].as_f64().unwrap() > 5.0, "{edge}");
    // A denial is answered 403 by the sidecar: not a failure of the service.
    assert_eq!(edge["success_rate"], 1.0, "{edge}");
    let (p50, p99) = (
        edge["p50_ms"].as_f64().unwrap(),
        edge["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p99 >= p50, "{edge}");
    let denials = edge["denied_per_second"]["route-not-allowed"]
        .as_f64()
        .unwrap();
    let share = denials / edge["rps"].as_f64().unwrap();
    assert!((0.1..0.3).contains(&share), "{edge}");

    // moat top draws the same edge.
    let top = cp.moat_ok(&["top", "--iterations", "2", "--interval", "1s"]);
    assert!(
        top.contains("moat top") && top.contains("frontend") && top.contains("mTLS"),
        "{top}"
    );
    traffic.abort();
    drop(orders);
}
