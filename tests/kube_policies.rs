//! The policy controller over the real binaries, against a stand-in for the Kubernetes API
//! server that speaks its list/watch/status wire protocol (tests/common/kube_api.rs; no
//! kube-apiserver can run here). AccessPolicy resources become enforced policies, with their
//! status saying whether they were accepted (and the exact validation error when not), for which
//! generation, and how many proxies applied them; the CLI cannot change what a resource
//! declares; deleting a resource removes its policy; a watch gap with a compacted history
//! (410 Expired, re-list) neither loses nor resurrects a policy; a MeshConfig resource sets the
//! mesh's posture.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::kube_api::KubeApi;
use common::*;
use moat_test_util::apps::recording_http;
use moat_test_util::{ControlPlane, Proxy, eventually};
use serde_json::{Value, json};

const AP: &str = "accesspolicies";

fn orders_spec(methods: &[&str]) -> Value {
    json!({ "target": "orders",
            "rules": [{ "from": ["frontend"], "http": [{ "methods": methods, "paths": ["/orders/*"] }] }] })
}

/// The message of a resource's `Accepted` condition, once it says `False`, reason `Invalid`.
fn refusal(api: &KubeApi, ns: &str, name: &str) -> String {
    let s = status_when(api, ns, name, |s| accepted(s).is_some());
    let c = accepted(&s).unwrap();
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&"False".into(), &"Invalid".into())
    );
    c["message"].as_str().unwrap().to_owned()
}

/// The resource's status once `ok` holds for it.
fn status_when(api: &KubeApi, ns: &str, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(20), || {
        let s = api.get(AP, ns, name)?["status"].clone();
        ok(&s).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "{ns}/{name} never reached the status wanted: {:?}",
            api.get(AP, ns, name)
        )
    })
}

fn accepted(s: &Value) -> Option<&Value> {
    s["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
}

fn policies(cp: &ControlPlane) -> Vec<String> {
    let v: Value = serde_json::from_str(&cp.moat_ok(&["policy", "status", "-o", "json"])).unwrap();
    v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["policy"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_policies_declared_as_resources_are_enforced_reported_and_owned() {
    let api = KubeApi::start().await;
    let files = tempfile::tempdir().unwrap();
    let (token, ca) = (files.path().join("token"), files.path().join("ca.crt"));
    std::fs::write(&token, "sa-token-of-moat-control").unwrap();
    std::fs::write(&ca, &api.ca_pem).unwrap();
    // Declared before the control plane starts: found by its first list.
    api.apply(AP, "default", "orders", orders_spec(&["GET"]));
    let cp = ControlPlane::start_with(&[
        "--watch-policies",
        "--kube-api",
        &api.url(),
        "--kube-token-file",
        token.to_str().unwrap(),
        "--kube-ca-file",
        ca.to_str().unwrap(),
    ])
    .unwrap();
    let (app, seen) = recording_http().await;
    let _orders = Proxy::builder(&cp, "orders").app(app).start().unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(app)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);

    // Accepted, for generation 1, and applied by orders' one sidecar.
    let s = status_when(&api, "default", "orders", |s| {
        accepted(s).is_some_and(|c| c["status"] == "True") && s["applied"] == "1/1"
    });
    assert_eq!(s["observedGeneration"], 1);
    let c = accepted(&s).unwrap();
    assert_eq!(c["reason"], "Accepted");
    assert_eq!(c["observedGeneration"], 1);
    assert!(s["policyVersion"].as_u64().unwrap() > 0);
    assert!(policies(&cp).contains(&"default/orders".to_owned()));
    let status: Value =
        serde_json::from_str(&cp.moat_ok(&["policy", "status", "-o", "json"])).unwrap();
    assert_eq!(
        status["policies"][0]["managed_by"], "AccessPolicy default/orders",
        "{status}"
    );

    // Enforced on what the app receives: GET passes, DELETE never reaches it.
    let client = h1_client();
    let url = |path: &str| format!("http://{}{path}", frontend.upstream("orders"));
    let (status, _, _) = get(&client, "GET", &url("/orders/1"), &[]).await.unwrap();
    assert_eq!(status, 200);
    let (status, headers, _) = get(&client, "DELETE", &url("/orders/1"), &[])
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert_eq!(headers["x-moat-deny-reason"], "route-not-allowed");
    assert!(seen.lock().unwrap().iter().all(|r| r.method == "GET"));

    // The CLI cannot change or delete what the resource declares, and says who owns it.
    let file = cp.scratch().join("orders.yaml");
    std::fs::write(
        &file,
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: orders }\nspec:\n  target: orders\n  rules:\n    - from: [intruder]\n",
    )
    .unwrap();
    for args in [
        vec!["policy", "apply", "-f", file.to_str().unwrap()],
        vec!["policy", "delete", "orders"],
    ] {
        let out = cp.moat(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("managed by the Kubernetes AccessPolicy default/orders"),
            "{args:?}: {err}"
        );
    }

    // A new spec is a new generation: observed, and enforced.
    api.apply(AP, "default", "orders", orders_spec(&["GET", "DELETE"]));
    let s = status_when(&api, "default", "orders", |s| s["observedGeneration"] == 2);
    assert_eq!(accepted(&s).unwrap()["status"], "True");
    let start = std::time::Instant::now();
    while get(&client, "DELETE", &url("/orders/2"), &[])
        .await
        .unwrap()
        .0
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new generation was never enforced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.lock().unwrap().iter().any(|r| r.method == "DELETE"));

    // An invalid resource is refused with the exact error; nothing is stored.
    api.apply(
        AP,
        "default",
        "broken",
        json!({ "target": "orders", "rules": [{ "from": ["Not An Identity"] }] }),
    );
    let message = refusal(&api, "default", "broken");
    assert!(
        message.contains("AccessPolicy default/broken") && message.contains("Not An Identity"),
        "{message}"
    );
    assert!(message.contains("rules[0].from"), "{message}");
    assert!(!policies(&cp).contains(&"default/broken".to_owned()));

    // A resource speaks for its own namespace only: one written in `dev` cannot open
    // default/orders to a caller of its choosing.
    api.apply(
        AP,
        "dev",
        "open-orders",
        json!({ "target": "default/orders", "rules": [{ "from": ["dev/attacker"] }] }),
    );
    let message = refusal(&api, "dev", "open-orders");
    assert!(
        message.contains("outside the resource's namespace dev"),
        "{message}"
    );
    assert!(!policies(&cp).contains(&"dev/open-orders".to_owned()));

    // A policy applied with the CLI is not the controller's to remove.
    std::fs::write(
        &file,
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: cli-only }\nspec:\n  target: payments\n  rules:\n    - from: [orders]\n",
    )
    .unwrap();
    cp.moat_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);

    // A watch gap: orders is deleted and payments created while no watch is open, and the
    // history is compacted, so the controller's watch gets 410 Expired and lists again.
    let lists = |api: &KubeApi| {
        api.requests()
            .iter()
            .filter(|r| {
                r.method == "GET"
                    && r.target.contains("/accesspolicies")
                    && !r.target.contains("watch=true")
            })
            .count()
    };
    let lists_before = lists(&api);
    api.hold().await;
    api.delete(AP, "default", "orders");
    api.apply(
        AP,
        "shop",
        "payments",
        json!({ "target": "shop/payments", "rules": [{ "from": ["shop/orders"] }] }),
    );
    api.release(true);
    let synced = eventually(Duration::from_secs(30), || {
        let p = policies(&cp);
        (!p.contains(&"default/orders".to_owned()) && p.contains(&"shop/payments".to_owned()))
            .then_some(p)
    })
    .expect("the re-list after the gap was not reconciled");
    assert!(
        synced.contains(&"default/cli-only".to_owned()),
        "{synced:?}"
    );
    assert!(
        lists(&api) > lists_before,
        "the controller did not list again after 410"
    );
    status_when(&api, "shop", "payments", |s| {
        accepted(s).is_some_and(|c| c["status"] == "True")
    });
    // Not resurrected later either, and enforced as gone: orders has no policy now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!policies(&cp).contains(&"default/orders".to_owned()));
    let start = std::time::Instant::now();
    loop {
        let (status, headers, _) = get(&client, "GET", &url("/orders/3"), &[]).await.unwrap();
        if status == 403 && headers["x-moat-deny-reason"] == "no-policy" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "orders' policy was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deleting a resource deletes its policy.
    api.delete(AP, "shop", "payments");
    eventually(Duration::from_secs(15), || {
        (!policies(&cp).contains(&"shop/payments".to_owned())).then_some(())
    })
    .expect("a deleted resource's policy stayed");

    // A MeshConfig resource sets the mesh's posture, and its deletion restores the default.
    api.apply(
        "meshconfigs",
        "",
        "mesh",
        json!({ "defaultPosture": "allow-authenticated" }),
    );
    let posture = || {
        let v: Value =
            serde_json::from_str(&cp.moat_ok(&["policy", "status", "-o", "json"])).unwrap();
        v["default_posture"].as_str().map(str::to_owned)
    };
    eventually(Duration::from_secs(15), || {
        (posture().as_deref() == Some("allow-authenticated")).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the MeshConfig resource was not applied: {:?}",
            api.get("meshconfigs", "", "mesh")
        )
    });
    let mesh = api.get("meshconfigs", "", "mesh").unwrap();
    assert_eq!(
        accepted(&mesh["status"]).unwrap()["status"],
        "True",
        "{mesh}"
    );
    api.delete("meshconfigs", "", "mesh");
    eventually(Duration::from_secs(15), || {
        (posture().as_deref() == Some("deny")).then_some(())
    })
    .expect("deleting the MeshConfig resource did not restore the default posture");

    // Every call carried the service-account token; status went through the status
    // subresource as merge patches.
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer sa-token-of-moat-control"))
    );
    let patches: Vec<_> = requests.iter().filter(|r| r.method == "PATCH").collect();
    assert!(!patches.is_empty());
    assert!(patches.iter().all(|r| r.target.contains("/status")
        && r.content_type.as_deref() == Some("application/merge-patch+json")));
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.target.contains("watch=true")),
        "the controller never watched"
    );
}
