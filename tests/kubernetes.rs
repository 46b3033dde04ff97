//! Kubernetes integration over the real binaries: service-account token attestation (a projected
//! token signed by the cluster's key proves `ns/<namespace>/sa/<name>`).

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::tokens::{Signer, jwks, now};
use common::*;
use moat_api::v1::{CertifyRequest, certify_request};
use moat_identity::{SpiffeId, WorkloadKey};
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy};

const CLUSTER: &str = "https://kubernetes.default.svc.cluster.local";

fn sa_token(signer: &Signer, ns: &str, sa: &str, overrides: serde_json::Value) -> String {
    let mut c = serde_json::json!({
        "iss": CLUSTER,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": ["moat"],
        "iat": now(), "nbf": now(), "exp": now() + 600,
        "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": sa, "uid": "b6b4a9f2" } },
    });
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    signer.sign(&c)
}

/// Certify over the real gRPC API with a service-account token and a fresh CSR for `identity`.
async fn certify(cp: &ControlPlane, identity: &str, token: &str) -> Result<String, tonic::Status> {
    let id = SpiffeId::parse_with_default(identity, &td()).unwrap();
    let key = WorkloadKey::generate(&id).unwrap();
    identity_client(cp, None)
        .await
        .certify(CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: 0,
            credential: Some(certify_request::Credential::KubernetesToken(
                token.to_owned(),
            )),
        })
        .await
        .map(|r| r.into_inner().spiffe_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_prove_pod_identity_and_bad_ones_are_refused() {
    let cp = ControlPlane::start().unwrap();
    let cluster = Signer::rsa("cluster-1");
    let good = sa_token(&cluster, "shop", "orders", serde_json::json!({}));

    // Before the mesh trusts the cluster, a token is refused with what to configure.
    let e = certify(&cp, "shop/orders", &good).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("spec.kubernetes"), "{}", e.message());

    let jwks_file = cp.scratch().join("sa-jwks.json");
    std::fs::write(&jwks_file, jwks(&[&cluster])).unwrap();
    apply_policy(
        &cp,
        &format!(
            "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  kubernetes:\n    issuer: {CLUSTER}\n    jwks: {{ file: {} }}\n",
            jwks_file.display()
        ),
    );

    // Accepted: the certificate is for ns/shop/sa/orders.
    assert_eq!(
        certify(&cp, "shop/orders", &good).await.unwrap(),
        "spiffe://moat.local/ns/shop/sa/orders"
    );

    // Refused, each with the reason.
    let stranger = Signer::rsa("cluster-1"); // same kid, another key
    let unknown_kid = Signer::rsa("elsewhere");
    let cases: Vec<(&str, String, &str, tonic::Code)> = vec![
        (
            "another audience",
            sa_token(
                &cluster,
                "shop",
                "orders",
                serde_json::json!({"aud": ["https://kubernetes.default.svc"]}),
            ),
            "not \"moat\"",
            tonic::Code::Unauthenticated,
        ),
        (
            "expired",
            sa_token(
                &cluster,
                "shop",
                "orders",
                serde_json::json!({"exp": now() - 120}),
            ),
            "jwt-expired",
            tonic::Code::Unauthenticated,
        ),
        (
            "signed by an unknown key",
            sa_token(&stranger, "shop", "orders", serde_json::json!({})),
            "jwt-bad-signature",
            tonic::Code::Unauthenticated,
        ),
        (
            "an unknown kid",
            sa_token(&unknown_kid, "shop", "orders", serde_json::json!({})),
            "jwt-unknown-kid",
            tonic::Code::Unauthenticated,
        ),
        (
            "another issuer",
            sa_token(
                &cluster,
                "shop",
                "orders",
                serde_json::json!({"iss": "https://other-cluster"}),
            ),
            "jwt-issuer-unknown",
            tonic::Code::Unauthenticated,
        ),
        (
            "not a service account",
            sa_token(
                &cluster,
                "shop",
                "orders",
                serde_json::json!({"sub": "alice"}),
            ),
            "is not a service account",
            tonic::Code::Unauthenticated,
        ),
        (
            "another service account than the CSR",
            sa_token(&cluster, "shop", "payments", serde_json::json!({})),
            "proves spiffe://moat.local/ns/shop/sa/payments",
            tonic::Code::PermissionDenied,
        ),
    ];
    for (name, token, want, code) in &cases {
        let e = certify(&cp, "shop/orders", token).await.unwrap_err();
        assert_eq!(e.code(), *code, "{name}: {}", e.message());
        assert!(e.message().contains(want), "{name}: {}", e.message());
    }
    // Refusals are audited; issuances counted by how they were proved.
    let audit = cp.moat_ok(&["audit", "--limit", "50"]);
    assert!(audit.contains("jwt-unknown-kid"), "{audit}");
    let metrics = cp.admin_get("/metrics").unwrap().1;
    assert!(
        metrics.contains("moat_certificates_issued_total{via=\"service-account\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("moat_certificates_refused_total{reason=\"service-account-token\"}"),
        "{metrics}"
    );

    // A real sidecar bootstraps from the projected token file like in a pod.
    let proxy = Proxy::launch_with_token(
        &cp,
        "shop/orders",
        "--k8s-token-file",
        &good,
        http_echo().await,
        &[],
        &[],
    )
    .unwrap();
    proxy.wait_ready(Duration::from_secs(30)).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&proxy.admin_get("/config").unwrap().1).unwrap();
    assert_eq!(config["identity"], "spiffe://moat.local/ns/shop/sa/orders");
    // And a sidecar with a token for another identity does not start.
    let mut wrong = Proxy::launch_with_token(
        &cp,
        "shop/payments",
        "--k8s-token-file",
        &good,
        http_echo().await,
        &[],
        &[],
    )
    .unwrap();
    let status = wrong
        .wait_exit(Duration::from_secs(20))
        .expect("it should exit");
    assert!(!status.success());
    assert!(wrong.log_text().contains("proves"), "{}", wrong.log_text());
}
