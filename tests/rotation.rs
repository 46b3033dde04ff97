//! CA rotation over the real binaries: a root rotation under steady load while the fleet is
//! re-keyed over and over, and a rotation interrupted between steps that resumes where it
//! stopped (also across a control-plane restart).

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use moat_identity::{TrustBundle, Usage};
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy, bin, eventually};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, UnixTime};

/// What a proxy's `/config` says about its trust: the roots it trusts and its chain.
struct ProxyTrust {
    bundle: Vec<String>,
    chain: Vec<CertificateDer<'static>>,
}

fn trust_of(p: &Proxy) -> ProxyTrust {
    let v: serde_json::Value = serde_json::from_str(&p.admin_get("/config").unwrap().1).unwrap();
    let chain =
        CertificateDer::pem_slice_iter(v["certificate"]["chain_pem"].as_str().unwrap().as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
    let bundle = v["bundle_sha256"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    ProxyTrust { bundle, chain }
}

/// The roots (with their fingerprints) the control plane's CA holds right now.
fn roots(cp: &ControlPlane) -> Vec<(String, CertificateDer<'static>)> {
    let pem = cp.moat_ok(&["ca", "bundle"]);
    let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
    bundle
        .fingerprints()
        .into_iter()
        .zip(bundle.roots().iter().cloned())
        .collect()
}

/// The fingerprint of the root `chain` verifies to, among `candidates`.
fn chain_root(
    chain: &[CertificateDer<'static>],
    candidates: &[(String, CertificateDer<'static>)],
) -> Option<String> {
    candidates.iter().find_map(|(fp, der)| {
        let only = TrustBundle::from_der(vec![der.clone()]).ok()?;
        moat_identity::verify_chain(chain, &only, &td(), UnixTime::now(), Usage::Client)
            .is_ok()
            .then(|| fp.clone())
    })
}

/// No proxy trusts only one root while holding a certificate from the other.
fn assert_consistent(proxies: &[&Proxy], known_roots: &[(String, CertificateDer<'static>)]) {
    for p in proxies {
        let t = trust_of(p);
        let root = chain_root(&t.chain, known_roots)
            .unwrap_or_else(|| panic!("{}: chain verifies to no known root", p.identity));
        assert!(
            t.bundle.contains(&root),
            "{} holds a certificate from {root} but trusts only {:?}",
            p.identity,
            t.bundle
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_load_with_fleet_rekeys_loses_no_request() {
    let cp = ControlPlane::start().unwrap();
    // frontend → orders → payments, and frontend → payments.
    let three_services = [
        common::allow("orders", &["frontend"]),
        common::allow("payments", &["frontend", "orders"]),
    ]
    .join("---\n");
    apply_policy(&cp, &three_services);
    let payments = Proxy::builder(&cp, "payments")
        .app(http_echo().await)
        .start()
        .unwrap();
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .upstreams(&["payments"])
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders", "payments"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders", "payments"]);
    wait_for_services(&orders, &["payments"]);
    let old_roots = roots(&cp);
    assert_eq!(old_roots.len(), 1);

    // 3 × 70 req/s for 60 s across the three services.
    let urls = [
        format!("http://{}/orders/1", frontend.upstream("orders")),
        format!("http://{}/pay", frontend.upstream("payments")),
        format!("http://{}/pay", orders.upstream("payments")),
    ];
    let traffic: Vec<_> = urls
        .into_iter()
        .map(|u| tokio::spawn(async move { load(&u, 70, Duration::from_secs(60)).await }))
        .collect();

    // `moat cert rotate --all` every few seconds for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let rekeys = {
        let (stop, url, admin) = (stop.clone(), cp.url(), cp.admin_dir());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(3));
                let out = std::process::Command::new(bin("moat"))
                    .args(["--control-plane", &url, "--credentials"])
                    .arg(&admin)
                    .args(["cert", "rotate", "--all", "--timeout", "30s"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "cert rotate failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                rounds += 1;
            }
            rounds
        })
    };

    tokio::time::sleep(Duration::from_secs(8)).await;
    let out =
        tokio::task::block_in_place(|| cp.moat_ok(&["ca", "rotate-root", "--timeout", "40s"]));
    for step in [
        "✓ step 1",
        "✓ step 2",
        "✓ step 3",
        "root rotation complete: 3 proxies",
    ] {
        assert!(out.contains(step), "{out}");
    }

    let mut failures = Vec::new();
    let mut ok = 0;
    for t in traffic {
        let (n, f) = t.await.unwrap();
        ok += n;
        failures.extend(f);
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = rekeys.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 200 * 60, "only {ok} requests in 60 s");
    assert!(rounds >= 10, "only {rounds} fleet re-keys");

    // Every proxy's chain ends at the new root, and the old root is in no bundle.
    let new_roots = roots(&cp);
    assert_eq!(new_roots.len(), 1);
    assert_ne!(new_roots[0].0, old_roots[0].0);
    let new_fp = new_roots[0].0.clone();
    let both: Vec<_> = old_roots.iter().chain(&new_roots).cloned().collect();
    for p in [&payments, &orders, &frontend] {
        let t = eventually(Duration::from_secs(10), || {
            let t = trust_of(p);
            (t.bundle == [new_fp.clone()]).then_some(t)
        })
        .unwrap_or_else(|| panic!("{} still trusts {:?}", p.identity, trust_of(p).bundle));
        assert_eq!(
            chain_root(&t.chain, &both),
            Some(new_fp.clone()),
            "{}",
            p.identity
        );
    }
    // The CLI's own credential followed: it still talks to the control plane.
    let status: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["bundle_sha256"], serde_json::json!([new_fp]));
    assert!(
        status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["bundle_current"] == true),
        "{status}"
    );
    assert!(cp.moat_ok(&["audit"]).contains("ca.rotate-root"));
}

fn phase(cp: &ControlPlane) -> String {
    let out = cp.moat_ok(&["ca", "rotate-root", "--status"]);
    out.lines()
        .find_map(|l| l.strip_prefix("phase"))
        .unwrap()
        .trim()
        .to_owned()
}

fn metric(cp: &ControlPlane, line_prefix: &str) -> Option<f64> {
    let (status, text) = cp.admin_get("/metrics")?;
    assert_eq!(status, 200);
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_root_rotation_resumes_and_never_splits_trust() {
    // A warning horizon longer than the root's life: the control plane must warn at start.
    let mut cp = ControlPlane::start_with(&["--ca-expiry-warning", "4000d"]).unwrap();
    apply_policy(&cp, MESH_POLICY);
    let (orders, frontend) = echo_pair(&cp, "orders", "frontend").await;
    wait_for_services(&frontend, &["orders"]);
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let traffic = tokio::spawn({
        let url = url.clone();
        async move { load(&url, 50, Duration::from_secs(20)).await }
    });
    assert!(cp.log_text().contains("expires soon"), "{}", cp.log_text());
    assert_eq!(phase(&cp), "none");
    assert_eq!(metric(&cp, "moat_root_rotation_phase "), Some(0.0));
    assert!(metric(&cp, "moat_certificates_issued_total{via=\"token\"}").unwrap() >= 2.0);
    assert!(
        metric(
            &cp,
            "moat_ca_certificate_expiry_timestamp_seconds{kind=\"root\""
        )
        .is_some()
    );
    assert!(metric(&cp, "moat_proxy_last_seen_age_seconds{").is_some());
    let old = roots(&cp);

    // Killed right after step 1: both roots trusted, issuance unchanged.
    let out = tokio::task::block_in_place(|| run_rotation_until(&cp, "✓ step 1"));
    assert!(!out.contains("✓ step 2"), "{out}");
    assert_eq!(phase(&cp), "trusting-new-root");
    assert_eq!(metric(&cp, "moat_root_rotation_phase "), Some(1.0));
    let mid = roots(&cp);
    assert_eq!(mid.len(), 2);
    assert_consistent(&[&orders, &frontend], &mid);
    // Another CA change is refused meanwhile, with the way out.
    let refused = cp.moat(&["ca", "rotate-intermediate"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("a root rotation is in progress"),
        "{}",
        stderr(&refused)
    );

    // The state is in the store: a control-plane crash does not lose the rotation.
    tokio::task::block_in_place(|| cp.restart()).unwrap();
    assert_eq!(phase(&cp), "trusting-new-root");

    // Resumed, and killed again right after step 2.
    let out = tokio::task::block_in_place(|| run_rotation_until(&cp, "✓ step 2"));
    assert!(
        out.contains("resuming the root rotation in phase trusting-new-root"),
        "{out}"
    );
    assert!(
        !out.contains("✓ step 1"),
        "resuming must not start another rotation: {out}"
    );
    assert_eq!(phase(&cp), "issuing-from-new-root");
    let during = roots(&cp);
    assert_eq!(during.len(), 2);
    assert_eq!(during[0].0, mid[1].0, "the new root issues and comes first");
    assert_consistent(&[&orders, &frontend], &during);

    // Resumed to the end.
    let out =
        tokio::task::block_in_place(|| cp.moat_ok(&["ca", "rotate-root", "--timeout", "30s"]));
    assert!(
        out.contains("resuming") && out.contains("✓ step 3"),
        "{out}"
    );
    assert!(out.contains("root rotation complete: 2 proxies"), "{out}");
    assert_eq!(phase(&cp), "none");
    let after = roots(&cp);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0, mid[1].0);
    assert_ne!(after[0].0, old[0].0);
    for p in [&orders, &frontend] {
        eventually(Duration::from_secs(10), || {
            (trust_of(p).bundle == [after[0].0.clone()]).then_some(())
        })
        .unwrap();
    }
    assert_consistent(&[&orders, &frontend], &after);

    // The intermediate alone: every proxy moves to the new one, the root stays.
    let before: Vec<_> = [&orders, &frontend]
        .iter()
        .map(|p| trust_of(p).chain[1].clone())
        .collect();
    let out = tokio::task::block_in_place(|| cp.moat_ok(&["ca", "rotate-intermediate"]));
    assert!(
        out.contains("intermediate rotation complete: 2 proxies"),
        "{out}"
    );
    for (p, old_int) in [&orders, &frontend].iter().zip(before) {
        assert_ne!(trust_of(p).chain[1], old_int, "{}", p.identity);
    }
    assert_eq!(roots(&cp)[0].0, after[0].0);

    let (ok, failures) = traffic.await.unwrap();
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 500, "{ok}");
    // The request still goes through after all of it.
    let (status, _, _) = get(&h1_client(), "GET", &url, &[]).await.unwrap();
    assert_eq!(status, 200);
}
