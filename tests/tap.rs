//! `moat tap` over the real binaries: a tap on a service shows the calls both of its sidecar
//! replicas decide on, allowed and denied, with the reason and policy; filters narrow it; it
//! ends at its limit; the sidecars stop tapping once no tap is open; and only an admin may tap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy, bin, eventually};

const POLICY: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      http:
        - methods: [GET]
          paths: ["/orders/*"]
"#;

/// Starts `moat tap` with `args` against `cp`, stdout piped.
fn tap(cp: &ControlPlane, args: &[&str]) -> Child {
    Command::new(bin("moat"))
        .arg("tap")
        .args(args)
        .env("MOAT_CONTROL_PLANE", cp.url())
        .env("MOAT_CREDENTIALS", cp.admin_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// How many taps `p` serves now.
fn taps_open(p: &Proxy) -> Option<u64> {
    let (_, body) = p.admin_get("/config")?;
    serde_json::from_str::<serde_json::Value>(&body).ok()?["taps_open"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_shows_live_calls_from_every_replica_of_a_service() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, POLICY);
    let app = http_echo().await;
    let orders = [
        Proxy::builder(&cp, "orders").app(app).start().unwrap(),
        Proxy::builder(&cp, "orders").app(app).start().unwrap(),
    ];
    let frontend = Proxy::builder(&cp, "frontend")
        .app(app)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    let both = eventually(Duration::from_secs(15), || {
        let (_, body) = frontend.admin_get("/config")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["services"][id("orders").to_string()].as_array()?.len() == 2).then_some(())
    });
    assert!(
        both.is_some(),
        "frontend never learned both orders replicas"
    );
    // No tap open: the sidecars serve none (and so do no tap work).
    for o in &orders {
        assert_eq!(taps_open(o), Some(0));
    }

    let client = h1_client();
    let url = |path: &str| format!("http://{}{path}", frontend.upstream("orders"));
    let mut child = tap(&cp, &["--to", "orders", "--limit", "40", "-o", "json"]);
    // The tap reaches both replicas through their snapshots.
    let tapped = eventually(Duration::from_secs(10), || {
        orders.iter().all(|o| taps_open(o) == Some(1)).then_some(())
    });
    assert!(tapped.is_some(), "the sidecars never learned of the tap");
    // Traffic until the tap has its 40 calls and ends: allowed GETs and refused DELETEs.
    let start = Instant::now();
    let mut i = 0;
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the tap did not end at its limit"
        );
        let (method, expect) = if i % 2 == 0 {
            ("GET", 200)
        } else {
            ("DELETE", 403)
        };
        let (status, _, body) = get(&client, method, &url(&format!("/orders/{i}")), &[])
            .await
            .unwrap();
        assert_eq!(status, expect, "{method}: {body}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 sidecars connected"), "{stderr}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 40, "{stderr}");
    let proxies: BTreeSet<&str> = events.iter().filter_map(|e| e["proxy"].as_str()).collect();
    assert_eq!(proxies.len(), 2, "events from {proxies:?}");
    for e in &events {
        assert_eq!(e["from"], id("frontend").to_string());
        assert_eq!(e["to"], id("orders").to_string());
        assert!(e["request_id"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(e["path"].as_str().unwrap().starts_with("/orders/"));
        match e["method"].as_str().unwrap() {
            "GET" => {
                assert_eq!(
                    (&e["status"], &e["decision"]),
                    (&200.into(), &"allow".into())
                );
                assert!(e["policy"].as_str().unwrap().starts_with("default/orders@"));
            }
            "DELETE" => {
                assert_eq!(
                    (&e["status"], &e["decision"]),
                    (&403.into(), &"deny".into())
                );
                assert_eq!(e["reason"], "route-not-allowed", "{e}");
            }
            m => panic!("unexpected method {m}"),
        }
    }
    // The tap closed: the sidecars are told and stop tapping.
    let closed = eventually(Duration::from_secs(10), || {
        orders.iter().all(|o| taps_open(o) == Some(0)).then_some(())
    });
    assert!(
        closed.is_some(),
        "the sidecars kept tapping after the tap ended"
    );

    // Filters: only the denials, as text lines.
    let mut child = tap(
        &cp,
        &["--to", "orders", "--decision", "deny", "--limit", "3"],
    );
    eventually(Duration::from_secs(10), || {
        orders.iter().all(|o| taps_open(o) == Some(1)).then_some(())
    })
    .expect("the sidecars never learned of the second tap");
    let reader = BufReader::new(child.stdout.take().unwrap());
    let lines = tokio::task::spawn_blocking(move || {
        reader.lines().map_while(Result::ok).collect::<Vec<_>>()
    });
    for i in 0..20 {
        let path = format!("/orders/x{i}");
        get(&client, "GET", &url(&path), &[]).await.unwrap();
        get(&client, "DELETE", &url(&path), &[]).await.unwrap();
    }
    let lines = tokio::time::timeout(Duration::from_secs(20), lines)
        .await
        .expect("the filtered tap did not end at its limit")
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert!(
            l.contains(" frontend -> orders ")
                && l.contains(" DELETE /orders/x")
                && l.contains(" 403 deny route-not-allowed (default/orders@"),
            "{l}"
        );
    }

    // Only an admin may tap.
    let dir = cp.scratch().join("w");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "frontend",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let out = Command::new(bin("moat"))
        .args(["--control-plane", &cp.url(), "--credentials"])
        .arg(&dir)
        .args(["tap", "--to", "orders", "--limit", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not an admin identity"), "{stderr}");
    // A bad filter says what is wrong.
    let out = cp.moat(&["tap", "--to", "orders", "--path", "/a/../orders"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a canonical path"), "{stderr}");
}

/// A tap streams for as long as its caller likes, but not past the admin certificate that
/// opened it (decision 48): the caller check saw that certificate only when the call began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_ends_when_the_admin_certificate_that_opened_it_expires() {
    let cp = ControlPlane::start_with(&[
        "--min-cert-ttl",
        "1s",
        "--admin-identity",
        "moat-system/moat-admin",
        "--admin-identity",
        "ops/oncall",
    ])
    .unwrap();
    // A 6 s admin certificate, obtained with a join token as any workload's would be.
    let cred = short_credential(&cp, "ops/oncall", 6).await;
    let not_after = cred.leaf().not_after;
    let channel = moat_tls::connect::channel(&cp.url(), bundle(&cp), control_id(), Some(&cred))
        .await
        .unwrap();
    let mut tap = moat_api::v1::admin_client::AdminClient::new(channel)
        .tap(moat_api::v1::TapRequest {
            target: "orders".into(),
            ..moat_api::v1::TapRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    tap.message()
        .await
        .unwrap()
        .expect("the tap's first message");
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tap.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the tap outlived its certificate")
    .expect("the tap ended without saying why");
    assert!(
        moat_identity::clock::unix_now() >= not_after,
        "the tap ended before its certificate expired"
    );
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("has expired"), "{ended:?}");
}
