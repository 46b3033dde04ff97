//! Fleet health from the operator's seat: `moat status` over the real binaries.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use moat_test_util::apps::http_echo;
use moat_test_util::mesh::Admin;
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_proxy_with_its_certificate_snapshot_and_bundle() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let (orders, frontend) = echo_pair(&cp, "orders", "frontend").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_rotate_rekeys_the_fleet_while_traffic_flows() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, MESH_POLICY);
    let (orders, frontend) = echo_pair(&cp, "orders", "frontend").await;
    wait_for_services(&frontend, &["orders"]);
    let serial = |p: &Proxy| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&p.admin_get("/config").unwrap().1).unwrap();
        v["certificate"]["serial"].as_str().unwrap().to_owned()
    };
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let traffic = tokio::spawn(async move { load(&url, 100, Duration::from_secs(8)).await });
    let mut seen = vec![(serial(&orders), serial(&frontend))];
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let out = tokio::task::block_in_place(|| {
            cp.moat_ok(&["cert", "rotate", "--all", "--timeout", "20s"])
        });
        assert!(out.contains("all 2 rotated"), "{out}");
        seen.push((serial(&orders), serial(&frontend)));
    }
    let (ok, failures) = traffic.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(ok >= 700, "{ok}");
    // Every round gave both proxies a new certificate.
    for w in seen.windows(2) {
        assert_ne!(w[0].0, w[1].0);
        assert_ne!(w[0].1, w[1].1);
    }
    // One identity alone: only its proxies rotate.
    let before = (serial(&orders), serial(&frontend));
    let out = cp.moat_ok(&["cert", "rotate", "--identity", "orders"]);
    assert!(out.contains("all 1 rotated"), "{out}");
    assert_ne!(serial(&orders), before.0);
    assert_eq!(serial(&frontend), before.1);
    // Nothing to rotate is an error that says so.
    let out = cp.moat(&["cert", "rotate", "--identity", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no connected proxy matches"),
        "{}",
        stderr(&out)
    );
    assert!(cp.moat_ok(&["audit"]).contains("cert.rotate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_mesh_and_names_each_failing_check() {
    let cp = ControlPlane::start_with(&["--min-cert-ttl", "5s"]).unwrap();
    apply_policy(&cp, MESH_POLICY);
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let healthy = eventually(Duration::from_secs(15), || {
        let out = cp.moat(&["check"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let healthy = healthy
        .unwrap_or_else(|| String::from_utf8_lossy(&cp.moat(&["check"]).stdout).into_owned());
    assert!(
        healthy.contains("all checks passed") && healthy.contains("outage budget"),
        "{healthy}"
    );

    // The root expires inside a 20-year horizon.
    let out = cp.moat(&["check", "--horizon", "20years"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("FAIL root expiry")),
        "{text}"
    );

    // A proxy whose renewals fail is flagged once it is past its renewal point: restarted with
    // a longer minimum lifetime, the control plane refuses the 20 s one this proxy asks for.
    let stuck = Proxy::builder(&cp, "ledger")
        .app(http_echo().await)
        .args(&["--cert-ttl", "20s"])
        .start()
        .unwrap();
    let serial = {
        let v: serde_json::Value =
            serde_json::from_str(&stuck.admin_get("/config").unwrap().1).unwrap();
        v["certificate"]["serial"].as_str().unwrap().to_owned()
    };
    let mut cp = cp;
    cp.restart_with(&["--min-cert-ttl", "1m"]).unwrap();
    let text = eventually(Duration::from_secs(30), || {
        let out = cp.moat(&["check"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code() == Some(1)
            && text.lines().any(|l| {
                l.starts_with("FAIL proxy certificate")
                    && l.contains("/sa/ledger")
                    && l.contains("past its renewal point")
            }))
        .then_some(text)
    })
    .unwrap_or_else(|| String::from_utf8_lossy(&cp.moat(&["check"]).stdout).into_owned());
    assert!(text.contains("past its renewal point"), "{text}");
    // Only ledger fails that check; orders renews fine.
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok   proxy certificate") && l.contains("/sa/orders")),
        "{text}"
    );

    // A proxy whose certificate is revoked is cut off: its stream is closed, its reconnections
    // refused, and check names it.
    cp.moat_ok(&["revoke", "--serial", &serial]);
    let text = eventually(Duration::from_secs(15), || {
        let text = String::from_utf8_lossy(&cp.moat(&["check"]).stdout).into_owned();
        text.lines()
            .any(|l| {
                l.starts_with("FAIL proxy connected")
                    && l.contains("/sa/ledger")
                    && l.contains("cut off")
            })
            .then_some(text)
    })
    .unwrap_or_else(|| String::from_utf8_lossy(&cp.moat(&["check"]).stdout).into_owned());
    assert!(text.contains("cut off"), "{text}");

    // A proxy that shuts down on purpose (SIGTERM) says goodbye and is simply gone; one that is
    // killed is reported as disconnected.
    drop(stuck);
    eventually(Duration::from_secs(10), || {
        let out = cp.moat(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["proxies"].as_array()?.len() == 1).then_some(())
    })
    .unwrap();
    let mut leaving = Proxy::builder(&cp, "ledger")
        .app(http_echo().await)
        .start()
        .unwrap();
    leaving.sigterm();
    leaving.wait_exit(Duration::from_secs(15)).unwrap();
    let mut crashed = Proxy::builder(&cp, "ledger")
        .app(http_echo().await)
        .start()
        .unwrap();
    crashed.kill9();
    let text = eventually(Duration::from_secs(10), || {
        let out = cp.moat(&["check"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("disconnected").then_some(text)
    })
    .unwrap();
    let flagged: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("FAIL proxy connected") && l.contains("disconnected"))
        .collect();
    // `stuck` was killed too (dropping a harness proxy is kill -9); `leaving` said goodbye.
    let named = |p: &Proxy| flagged.iter().any(|l| l.contains(&p.inbound.to_string()));
    assert!(named(&crashed) && !named(&leaving), "{text}");
    assert_eq!(flagged.len(), 2, "{text}");
    let status: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(
        status["disconnected"].as_array().unwrap().len(),
        2,
        "{status}"
    );

    // A proxy that stops answering (hung) is reported as not connected.
    let pid = orders.pid().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let out = cp.moat(&["check", "--stale-after", "3s"]);
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL proxy connected") && l.contains("/sa/orders")),
        "{text}"
    );
    assert!(stderr(&out).contains("check(s) failed"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_cuts_an_identity_off_everywhere_and_undo_restores_it() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cp = ControlPlane::start().unwrap();
    apply_policy(
        &cp,
        &[
            common::allow("orders", &["frontend", "payments"]),
            common::allow("ledger", &["frontend"]),
        ]
        .join("---\n"),
    );
    let _orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let _ledger = Proxy::builder(&cp, "ledger")
        .app(moat_test_util::apps::tcp_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders", "ledger"])
        .start()
        .unwrap();
    let payments = Proxy::builder(&cp, "payments")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders", "ledger"]);
    wait_for_services(&payments, &["orders"]);
    let fe_url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let pay_url = format!("http://{}/orders/1", payments.upstream("orders"));
    assert_eq!(get(&h1_client(), "GET", &fe_url, &[]).await.unwrap().0, 200);
    let mut tcp = tokio::net::TcpStream::connect(frontend.upstream("ledger"))
        .await
        .unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();

    let revoked_at = std::time::Instant::now();
    let out = cp.moat_ok(&[
        "revoke",
        "--identity",
        "frontend",
        "--reason",
        "test: key leaked",
    ]);
    assert!(
        out.contains("revoked identity spiffe://moat.local/ns/default/sa/frontend"),
        "{out}"
    );
    // Its open connection is closed …
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "frontend's open connection stayed up");
    eprintln!(
        "open connection closed {:?} after `moat revoke` was sent",
        revoked_at.elapsed()
    );
    // … new ones are refused, while other callers are unaffected.
    let refused = eventually(Duration::from_secs(5), || {
        let status = blocking_status(&fe_url);
        (status != 200).then_some(status)
    });
    assert!(refused.is_some(), "frontend still reaches orders");
    assert_eq!(
        get(&h1_client(), "GET", &pay_url, &[]).await.unwrap().0,
        200
    );
    // It cannot renew.
    let out = cp.moat(&[
        "cert",
        "rotate",
        "--identity",
        "frontend",
        "--timeout",
        "4s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The control plane closed its stream and refuses it, saying why.
    let told = eventually(Duration::from_secs(10), || {
        frontend.log_text().contains("revoked").then_some(())
    });
    assert!(told.is_some(), "{}", frontend.log_text());
    assert!(
        cp.moat_ok(&["revoke", "--list"])
            .contains("test: key leaked")
    );

    // Undo restores it.
    cp.moat_ok(&["revoke", "--undo", "--identity", "frontend"]);
    let back = eventually(Duration::from_secs(10), || {
        let status = blocking_status(&fe_url);
        (status == 200).then_some(())
    });
    assert!(back.is_some(), "frontend did not come back after --undo");
    assert!(!cp.moat_ok(&["revoke", "--list"]).contains("frontend"));

    // Bad input is refused with a reason.
    for (args, want) in [
        (
            &["revoke", "--serial", "not-hex"][..],
            "not a certificate serial",
        ),
        (
            &["revoke", "--undo", "--identity", "frontend"][..],
            "is not revoked",
        ),
    ] {
        let out = cp.moat(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(cp.moat(&["revoke"]).status.code(), Some(2));
}

/// The status of a GET, from synchronous code running inside the async test (`eventually`).
fn blocking_status(url: &str) -> u16 {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                get(&h1_client(), "GET", url, &[])
                    .await
                    .map(|r| r.0)
                    .unwrap_or(0)
            })
        })
        .join()
        .unwrap()
    })
}

/// The services a proxy's `/config` lists: identity → endpoints.
fn table_of(p: &Proxy) -> Option<serde_json::Map<String, serde_json::Value>> {
    let (_, body) = p.admin_get("/config")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["services"].as_object().cloned()
}

fn endpoints_of(table: &serde_json::Map<String, serde_json::Value>, name: &str) -> Vec<String> {
    table
        .get(&id(name).to_string())
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A service table larger than one message reaches a real proxy in parts, which it applies as
/// one snapshot; later changes arrive as deltas that add and remove endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_service_table_arrives_in_parts_and_changes_as_deltas() {
    let cp = ControlPlane::start().unwrap();
    let mut admin = Admin::connect(&cp).await.unwrap();
    // 80 services × 3 endpoints, announced over in-process streams: ≈ 10 KiB of table. Each
    // announces the loopback address its stream comes from, as the control plane requires.
    let from = |i: u8, r: u8| std::net::IpAddr::from([127, 9, i, r]);
    let mut held = Vec::new();
    for i in 0..80 {
        let cred = admin
            .credential(&format!("fleet/svc-{i:02}"))
            .await
            .unwrap();
        for r in 1..=3 {
            let address = format!("127.9.{i}.{r}:8443");
            held.push(
                admin
                    .mesh_stream_from(&cred, &address, Vec::new(), Some(from(i, r)))
                    .await
                    .unwrap()
                    .keep_acking(),
            );
        }
    }
    let proxy = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let table = eventually(Duration::from_secs(10), || {
        table_of(&proxy).filter(|t| t.len() == 81)
    })
    .unwrap_or_else(|| panic!("{:?}", table_of(&proxy)));
    assert_eq!(
        endpoints_of(&table, "fleet/svc-42"),
        ["127.9.42.1:8443", "127.9.42.2:8443", "127.9.42.3:8443"]
    );
    assert!(
        cp.log_text().matches("refused").count() == 0 && !proxy.log_text().contains("refused"),
        "{}",
        proxy.log_text()
    );

    // One endpoint leaves, another joins, one whole service goes.
    held.pop().unwrap().abort(); // svc-79's third
    for _ in 0..3 {
        held.remove(0).abort(); // all of svc-00
    }
    let cred = admin.credential("fleet/svc-05").await.unwrap();
    let _joined = admin
        .mesh_stream_from(&cred, "127.9.99.1:8443", Vec::new(), Some(from(99, 1)))
        .await
        .unwrap()
        .keep_acking();
    let table = eventually(Duration::from_secs(10), || {
        table_of(&proxy).filter(|t| {
            t.len() == 80
                && endpoints_of(t, "fleet/svc-79").len() == 2
                && endpoints_of(t, "fleet/svc-05").len() == 4
        })
    })
    .unwrap_or_else(|| panic!("{:?}", table_of(&proxy)));
    assert!(endpoints_of(&table, "fleet/svc-00").is_empty());
    assert!(endpoints_of(&table, "fleet/svc-05").contains(&"127.9.99.1:8443".to_owned()));
    // Every snapshot the proxy got, it applied: sent and applied versions meet.
    let applied = eventually(Duration::from_secs(10), || {
        let v: serde_json::Value =
            serde_json::from_str(&cp.moat_ok(&["status", "-o", "json"])).ok()?;
        let p = v["proxies"]
            .as_array()?
            .iter()
            .find(|p| p["identity"] == id("orders").to_string())?
            .clone();
        (p["snapshot_applied"] == p["snapshot_sent"]).then_some(p)
    });
    assert!(applied.is_some(), "{}", cp.moat_ok(&["status"]));
}
