//! Fleet health from the operator's seat: `moat status` over the real binaries.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_proxy_with_its_certificate_snapshot_and_bundle() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::start(&cp, "orders", http_echo().await, &[], &[]).unwrap();
    let frontend = Proxy::start(&cp, "frontend", http_echo().await, &["orders"], &[]).unwrap();
    let status = eventually(Duration::from_secs(10), || {
        let v: serde_json::Value =
            serde_json::from_str(&cp.moat_ok(&["status", "-o", "json"])).ok()?;
        let all_applied = v["proxies"].as_array()?.iter().all(|p| {
            p["snapshot_applied"].as_u64().unwrap_or(0) > 0
                && p["snapshot_applied"] == p["snapshot_sent"]
        });
        (v["proxies"].as_array()?.len() == 2 && all_applied).then_some(v)
    })
    .unwrap_or_else(|| panic!("{}", cp.moat_ok(&["status", "-o", "json"])));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (proxy, policy) in [(&orders, Some("default/orders@")), (&frontend, None)] {
        let p = status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["identity"] == id(&proxy.identity).to_string())
            .unwrap();
        assert_eq!(p["address"], proxy.inbound.to_string());
        let config: serde_json::Value =
            serde_json::from_str(&proxy.admin_get("/config").unwrap().1).unwrap();
        assert_eq!(p["cert_serial"], config["certificate"]["serial"]);
        assert!(p["cert_not_after_unix"].as_i64().unwrap() > now + 3000);
        assert_eq!(p["bundle_current"], true);
        assert!(p["last_seen_seconds_ago"].as_i64().unwrap() < 30);
        assert!(p["version"].as_str().is_some_and(|v| !v.is_empty()));
        match policy {
            Some(prefix) => assert!(
                p["policies"][0].as_str().unwrap().starts_with(prefix),
                "{p}"
            ),
            None => assert_eq!(p["policies"].as_array().unwrap().len(), 0, "{p}"),
        }
    }
    assert_eq!(status["default_posture"], "deny");
    let table = cp.moat_ok(&["status"]);
    assert!(
        table.contains("proxies: 2") && table.contains("spiffe://moat.local/ns/default/sa/orders"),
        "{table}"
    );
}
