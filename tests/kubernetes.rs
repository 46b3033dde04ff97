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

/// The API server serves its service-account keys (`/openid/v1/jwks`) only to an authenticated
/// caller under the default RBAC: an HTTPS server that answers like it (401 without the bearer
/// token, the keys with it) checks that the control plane presents the token in
/// `jwks.tokenFile`, re-read at each fetch, and says what to configure when it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_keys_are_fetched_with_the_control_planes_service_account_token() {
    use std::sync::{Arc, Mutex};
    let cp = ControlPlane::start().unwrap();
    let cluster = Signer::rsa("cluster-1");
    let keys = jwks(&[&cluster]);
    /// Each request's path and Authorization header.
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let (addr, ca_pem) = https_server(move |req| {
        log.lock()
            .unwrap()
            .push((req.path.clone(), req.authorization.clone()));
        match req.authorization.as_deref() {
            Some("Bearer sa-token-2") => (200, keys.clone()),
            _ => (
                401,
                r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#.to_owned(),
            ),
        }
    })
    .await;
    let ca_file = cp.scratch().join("cluster-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let token_file = cp.scratch().join("sa-token");
    let mesh = |token: Option<&std::path::Path>| {
        let file = cp.scratch().join("mesh.yaml");
        let token = token
            .map(|t| format!(", tokenFile: {}", t.display()))
            .unwrap_or_default();
        std::fs::write(
            &file,
            format!(
                "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  kubernetes:\n    issuer: {CLUSTER}\n    jwks: {{ url: \"https://{addr}/openid/v1/jwks\", caFile: {}{token} }}\n",
                ca_file.display()
            ),
        )
        .unwrap();
        cp.moat(&["policy", "apply", "-f", &file.display().to_string()])
    };

    // Anonymous: refused, and the answer says which field to set.
    let out = mesh(None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("401") && err.contains("jwks.tokenFile"),
        "{err}"
    );
    // A stale token: refused with what to check.
    std::fs::write(&token_file, "sa-token-1\n").unwrap();
    let err = stderr(&mesh(Some(&token_file)));
    assert!(
        err.contains("jwks.tokenFile") && err.contains("current"),
        "{err}"
    );
    // The kubelet rotated the token: the next fetch reads the new one and succeeds.
    std::fs::write(&token_file, "sa-token-2\n").unwrap();
    let out = mesh(Some(&token_file));
    assert!(out.status.success(), "{}", stderr(&out));
    let good = sa_token(&cluster, "shop", "orders", serde_json::json!({}));
    assert_eq!(
        certify_once_keys_are_read(&cp, "shop/orders", &good).await,
        "spiffe://moat.local/ns/shop/sa/orders"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(p, _)| p == "/openid/v1/jwks"), "{seen:?}");
    assert_eq!(
        seen.iter().map(|(_, a)| a.as_deref()).collect::<Vec<_>>()[..3],
        [None, Some("Bearer sa-token-1"), Some("Bearer sa-token-2")],
        "{seen:?}"
    );
}

/// [`certify`] once the control plane holds the cluster's keys. The leader reads them into the
/// store just after the MeshConfig lands; until then the answer is Unavailable, "try again",
/// which a sidecar's bootstrap retries (any other refusal fails the test).
async fn certify_once_keys_are_read(cp: &ControlPlane, identity: &str, token: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match certify(cp, identity, token).await {
            Ok(id) => return id,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
                assert!(e.message().contains("try again"), "{}", e.message());
                assert!(
                    std::time::Instant::now() < deadline,
                    "the keys were never read"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
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
        certify_once_keys_are_read(&cp, "shop/orders", &good).await,
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

/// The workspace root (this package lives in `tests/`).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `kubernetes-validate --strict` on `files`; panics with its report unless all pass.
fn validate(files: &[std::path::PathBuf]) {
    let out = std::process::Command::new("kubernetes-validate")
        .arg("--strict")
        .arg("--quiet")
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubernetes-validate ({e}): install it with `pip install kubernetes-validate` (.ci/run does)")
        });
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_install_and_injected_workloads_validate_against_kubernetes_schemas() {
    let cp = ControlPlane::start().unwrap();
    let scratch = cp.scratch().to_path_buf();
    let mut files: Vec<_> = std::fs::read_dir(root().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let app = root().join("examples/kubernetes/app.yaml");
    files.push(app.clone());

    // `moat install`, plain and with the webhook's CA bundle.
    let plain = cp.moat_ok(&["install", "--trust-domain", "corp.example"]);
    assert!(plain.contains("--trust-domain=corp.example"), "{plain}");
    let bundle = cp.admin_dir().join("bundle.pem");
    let with_ca = cp.moat_ok(&[
        "install",
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--webhook-failure-policy",
        "Ignore",
    ]);
    // Both injection webhooks (namespace opt-in, pod opt-in) get the bundle and the policy.
    assert_eq!(with_ca.matches("caBundle:").count(), 2, "{with_ca}");
    assert_eq!(
        with_ca.matches("failurePolicy: Ignore").count(),
        2,
        "{with_ca}"
    );
    assert_eq!(plain.matches("failurePolicy: Fail").count(), 2, "{plain}");
    // Injection is opt-in: neither webhook is called for a pod of a namespace that did not
    // opt in unless the pod itself did.
    let hooks: Vec<serde_json::Value> = plain
        .split("\n---\n")
        .filter_map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d["kind"] == "MutatingWebhookConfiguration")
        .flat_map(|d| d["webhooks"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(hooks.len(), 2);
    // Every object, and the control plane's pod template, carries the standard labels, with
    // this release's version and `moat install` as its manager.
    let objects: Vec<serde_json::Value> = plain
        .split("\n---\n")
        .filter_map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    assert!(objects.len() >= 10, "{plain}");
    for o in &objects {
        let mut metas = vec![&o["metadata"]];
        if o["kind"] == "Deployment" {
            metas.push(&o["spec"]["template"]["metadata"]);
        }
        for meta in metas {
            let labels = &meta["labels"];
            for key in ["name", "instance", "component", "part-of"] {
                assert!(
                    labels[format!("app.kubernetes.io/{key}")].is_string(),
                    "{} {}: no app.kubernetes.io/{key}",
                    o["kind"],
                    o["metadata"]["name"]
                );
            }
            assert_eq!(
                labels["app.kubernetes.io/version"],
                env!("CARGO_PKG_VERSION"),
                "{o}"
            );
            assert_eq!(
                labels["app.kubernetes.io/managed-by"], "moat-install",
                "{o}"
            );
        }
    }
    // The manifests as kustomize applies them carry the same version.
    for file in [
        "namespace.yaml",
        "crds.yaml",
        "control-plane.yaml",
        "webhook.yaml",
    ] {
        let text = std::fs::read_to_string(root().join("deploy").join(file)).unwrap();
        let versions = text.matches("app.kubernetes.io/version").count();
        let current = text
            .matches(&format!(
                "app.kubernetes.io/version: \"{}\"",
                env!("CARGO_PKG_VERSION")
            ))
            .count();
        assert!(
            versions > 0 && versions == current,
            "{file}: a stale version label"
        );
    }
    for hook in &hooks {
        let selects_enabled = |selector: &serde_json::Value| {
            selector["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| {
                    e["key"] == "moat.dev/inject"
                        && e["operator"] == "In"
                        && e["values"] == serde_json::json!(["enabled"])
                })
        };
        assert!(
            selects_enabled(&hook["namespaceSelector"]) || selects_enabled(&hook["objectSelector"]),
            "{hook}"
        );
    }
    for (name, text) in [("install.yaml", &plain), ("install-ca.yaml", &with_ca)] {
        let p = scratch.join(name);
        std::fs::write(&p, text).unwrap();
        files.push(p);
    }
    // --ha: 3 control-plane replicas, one per node, on the bundled 3-member etcd (or yours),
    // always over TLS with a client certificate; at least 2 kept through disruptions.
    let docs = |text: &str| -> Vec<serde_json::Value> {
        text.split("\n---\n")
            .filter_map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).ok())
            .filter(|d| d.is_object())
            .collect()
    };
    let ha = cp.moat_ok(&["install", "--ha"]);
    let external = cp.moat_ok(&[
        "install",
        "--ha",
        "--etcd-endpoints",
        "etcd-a.db.svc:2379,etcd-b.db.svc:2379",
        "--etcd-tls-secret",
        "db-etcd-client",
    ]);
    for (text, store, secret, bundled) in [
        (
            &ha,
            "--store=etcd://moat-etcd-0.moat-etcd.moat-system.svc:2379,moat-etcd-1.moat-etcd.moat-system.svc:2379,moat-etcd-2.moat-etcd.moat-system.svc:2379",
            "moat-etcd-tls",
            true,
        ),
        (
            &external,
            "--store=etcd://etcd-a.db.svc:2379,etcd-b.db.svc:2379",
            "db-etcd-client",
            false,
        ),
    ] {
        let objects = docs(text);
        let find = |kind: &str, name: &str| {
            objects
                .iter()
                .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
                .cloned()
        };
        let d = find("Deployment", "moat-control").unwrap();
        assert_eq!(d["spec"]["replicas"], 3);
        assert_eq!(
            d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                [0]["topologyKey"],
            "kubernetes.io/hostname"
        );
        let args: Vec<&str> = d["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        for want in [
            store,
            "--etcd-ca=/etc/moat/etcd/ca.crt",
            "--etcd-cert=/etc/moat/etcd/tls.crt",
            "--etcd-key=/etc/moat/etcd/tls.key",
        ] {
            assert!(args.contains(&want), "{want} not in {args:?}");
        }
        assert!(text.contains(&format!("secretName: {secret}")), "{text}");
        assert_eq!(
            find("PodDisruptionBudget", "moat-control").unwrap()["spec"]["minAvailable"],
            2
        );
        assert!(find("PersistentVolumeClaim", "moat-control-data").is_none());
        let etcd = find("StatefulSet", "moat-etcd");
        assert_eq!(etcd.is_some(), bundled);
        if let Some(etcd) = etcd {
            assert_eq!(etcd["spec"]["replicas"], 3);
            assert_eq!(
                find("PodDisruptionBudget", "moat-etcd").unwrap()["spec"]["minAvailable"],
                2
            );
            assert!(find("NetworkPolicy", "moat-etcd").is_some());
            let etcd_args = etcd["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
            assert!(etcd_args.contains("--client-cert-auth=true"), "{etcd_args}");
            assert!(
                etcd_args.contains("--peer-client-cert-auth=true"),
                "{etcd_args}"
            );
        }
    }
    let bad = cp.moat(&["install", "--ha", "--etcd-endpoints", "http://x"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("HOST:PORT"), "{}", stderr(&bad));
    for (name, text) in [
        ("install-ha.yaml", &ha),
        ("install-ha-external.yaml", &external),
    ] {
        let p = scratch.join(name);
        std::fs::write(&p, text).unwrap();
        files.push(p);
    }
    files.push(root().join("deploy/ha/etcd.yaml"));

    // `moat inject` on the example app: every workload injected, Services untouched, and a
    // second run changes nothing.
    let injected = cp.moat(&["inject", "-f", app.to_str().unwrap()]);
    assert!(injected.status.success(), "{}", stderr(&injected));
    let injected_text = String::from_utf8(injected.stdout.clone()).unwrap();
    assert_eq!(
        stderr(&injected).matches(": injected").count(),
        3,
        "{}",
        stderr(&injected)
    );
    let p = scratch.join("injected.yaml");
    std::fs::write(&p, &injected_text).unwrap();
    files.push(p.clone());
    let again = cp.moat(&["inject", "-f", p.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8(again.stdout.clone()).unwrap(),
        injected_text
    );
    assert_eq!(stderr(&again).matches("already injected").count(), 3);
    validate(&files);

    // The example allow-lists are valid moat documents.
    cp.moat_ok(&[
        "policy",
        "validate",
        "-f",
        root()
            .join("examples/kubernetes/policies.yaml")
            .to_str()
            .unwrap(),
    ]);
    // Bad input to inject says what is wrong.
    let bad = scratch.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: batch/v1\nkind: Job\nmetadata: { name: j }\nspec: { template: { metadata: { labels: { moat.dev/inject: enabled } }, spec: { containers: 3 } } }\n").unwrap();
    let out = cp.moat(&["inject", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Job j") && stderr(&out).contains("containers must be a list"),
        "{}",
        stderr(&out)
    );
}

/// POSTs `body` to the webhook over TLS, trusting the mesh roots for the Service's DNS name.
async fn post_review(cp: &ControlPlane, body: &[u8]) -> (u16, serde_json::Value) {
    let mut roots = rustls::RootCertStore::empty();
    for r in bundle(cp).roots() {
        roots.add(r.clone()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(cp.webhook_addr())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("moat-control.moat-system.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/inject")
        .header("host", "moat-control.moat-system.svc")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    use http_body_util::BodyExt as _;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn admission_review(uid: &str, object: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": object["kind"] },
            "operation": "CREATE",
            "namespace": "shop",
            "object": object,
        },
    }))
    .unwrap()
}

/// `moat inject` on one object of namespace `shop`, beside the Namespace document that opts
/// `shop` in (the webhook is called only for opted-in pods); the object as injected, as JSON.
fn cli_inject(cp: &ControlPlane, object: &serde_json::Value) -> serde_json::Value {
    let file = cp.scratch().join(format!("obj-{}.yaml", rand_suffix()));
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { moat.dev/inject: enabled } }\n---\n";
    std::fs::write(
        &file,
        format!("{namespace}{}", serde_yaml_ng::to_string(object).unwrap()),
    )
    .unwrap();
    let out = cp.moat(&["inject", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let last = text.split("\n---\n").last().unwrap();
    serde_yaml_ng::from_str(last).unwrap()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_patches_give_the_same_pod_as_moat_inject() {
    let cp = ControlPlane::start_with(&["--webhook", "127.0.0.1:0"]).unwrap();
    assert!(!cp.webhook_addr().is_empty(), "{}", cp.log_text());
    let app_text = std::fs::read_to_string(root().join("examples/kubernetes/app.yaml")).unwrap();
    let deployment: serde_json::Value = app_text
        .split("\n---\n")
        .filter_map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).ok())
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let job = serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": { "name": "migrate", "namespace": "shop" },
        "spec": { "template": { "metadata": { "annotations": { "moat.dev/opaque-ports": "5432" } },
            "spec": { "restartPolicy": "Never", "serviceAccountName": "orders",
                "initContainers": [{ "name": "wait", "image": "busybox" }],
                "containers": [{ "name": "migrate", "image": "migrate:1" }] } } },
    });
    let cronjob = serde_json::json!({
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": { "name": "nightly", "namespace": "shop" },
        "spec": { "schedule": "0 3 * * *", "jobTemplate": { "spec": { "template": { "spec": {
            "restartPolicy": "OnFailure", "containers": [{ "name": "report", "image": "report:1" }] } } } } },
    });
    let opted_out = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "debug", "namespace": "shop", "annotations": { "moat.dev/inject": "disabled" } },
        "spec": { "containers": [{ "name": "sh", "image": "busybox" }] },
    });
    let plain_pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "containers": [{ "name": "web", "image": "nginx" }] },
    });
    let already = cli_inject(&cp, &plain_pod);
    // A node agent in the node's network namespace: interception rules would rewrite the
    // node's own traffic, so it is never injected, and whoever creates it is told why.
    let node_agent = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": { "name": "node-agent", "namespace": "shop" },
        "spec": { "selector": { "matchLabels": { "app": "node-agent" } }, "template": {
            "metadata": { "labels": { "app": "node-agent" } },
            "spec": { "hostNetwork": true, "containers": [{ "name": "agent", "image": "agent:1" }] } } },
    });

    for (i, object) in [
        &deployment,
        &job,
        &cronjob,
        &plain_pod,
        &opted_out,
        &already,
        &node_agent,
    ]
    .into_iter()
    .enumerate()
    {
        let uid = format!("uid-{i}");
        let (status, review) = post_review(&cp, &admission_review(&uid, object)).await;
        assert_eq!(status, 200, "{review}");
        let response = &review["response"];
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(response["uid"], uid.as_str());
        assert_eq!(response["allowed"], true, "{review}");
        let mut patched = object.clone();
        if let Some(patch) = response["patch"].as_str() {
            assert_eq!(response["patchType"], "JSONPatch");
            let ops: json_patch::Patch = serde_json::from_slice(
                &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, patch).unwrap(),
            )
            .unwrap();
            json_patch::patch(&mut patched, &ops).unwrap();
        }
        assert_eq!(patched, cli_inject(&cp, object), "object {i}");
        if *object == node_agent {
            assert!(
                response["warnings"][0]
                    .as_str()
                    .is_some_and(|w| w.contains("hostNetwork")),
                "{review}"
            );
        }
        let changed = patched != *object;
        assert_eq!(
            changed,
            i < 4,
            "object {i}: only the first four need a sidecar"
        );
    }

    // Malformed input: a clear AdmissionReview error, and the webhook keeps serving.
    for (body, want) in [
        (b"{not json".to_vec(), "not JSON"),
        (br#"{"kind":"Pod"}"#.to_vec(), "not an AdmissionReview"),
        (
            br#"{"kind":"AdmissionReview","request":{}}"#.to_vec(),
            "request.uid",
        ),
    ] {
        let (status, review) = post_review(&cp, &body).await;
        assert_eq!(status, 400, "{review}");
        assert_eq!(review["response"]["allowed"], false);
        let msg = review["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{msg}");
    }
    let broken = serde_json::json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "x" }, "spec": { "containers": 3 } });
    let (status, review) = post_review(&cp, &admission_review("bad", &broken)).await;
    assert_eq!(status, 200);
    assert_eq!(review["response"]["allowed"], false);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("containers must be a list"),
        "{review}"
    );
    let (status, _) = post_review(&cp, &admission_review("after", &plain_pod)).await;
    assert_eq!(status, 200);
}

/// The trust bundle in every namespace and in the injector webhook's caBundle, over kube-rs
/// against the API-server stand-in (tests/common/kube_api.rs): ConfigMaps appear in every
/// namespace (and at once in a new one), are not rewritten while unchanged, and follow a root
/// rotation; the webhook configuration gets the mesh roots as its caBundle, so a fresh install
/// needs no second apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_is_published_to_every_namespace_and_the_webhook_and_follows_a_root_rotation()
 {
    use base64::Engine as _;
    let api = common::kube_api::KubeApi::start().await;
    api.put("namespaces", "", "shop", serde_json::json!({}));
    api.put("namespaces", "", "default", serde_json::json!({}));
    // The webhook configuration as `moat install` writes it without --ca-bundle.
    let install = tokio::task::block_in_place(|| {
        let out = std::process::Command::new(moat_test_util::bin("moat"))
            .args(["install", "--trust-domain", "moat.local"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let webhook: serde_json::Value = install
        .split("---\n")
        .map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).unwrap())
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert!(webhook["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    let name = webhook["metadata"]["name"].as_str().unwrap().to_owned();
    api.put(
        "mutatingwebhookconfigurations",
        "",
        &name,
        serde_json::json!({ "webhooks": webhook["webhooks"] }),
    );
    let files = tempfile::tempdir().unwrap();
    let (token, ca) = (files.path().join("token"), files.path().join("ca.crt"));
    std::fs::write(&token, "sa-token-of-moat-control").unwrap();
    std::fs::write(&ca, &api.ca_pem).unwrap();
    let cp = ControlPlane::start_with(&[
        "--publish-bundle",
        "moat-ca-root",
        "--webhook-configuration",
        &name,
        "--kube-api",
        &api.url(),
        "--kube-token-file",
        token.to_str().unwrap(),
        "--kube-ca-file",
        ca.to_str().unwrap(),
        "--publish-interval",
        "1s",
    ])
    .unwrap();
    let published = |namespaces: &[&str], want: &str| {
        moat_test_util::eventually(Duration::from_secs(15), || {
            namespaces
                .iter()
                .all(|ns| {
                    api.get("configmaps", ns, "moat-ca-root")
                        .is_some_and(|cm| cm["data"]["bundle.pem"] == want)
                })
                .then_some(())
        })
        .is_some()
    };
    let in_webhook = |want: &str| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(want);
        moat_test_util::eventually(Duration::from_secs(15), || {
            let w = api.get("mutatingwebhookconfigurations", "", &name)?;
            w["webhooks"]
                .as_array()?
                .iter()
                .all(|h| h["clientConfig"]["caBundle"] == b64.as_str())
                .then_some(())
        })
        .is_some()
    };
    let bundle = cp.moat_ok(&["ca", "bundle"]);
    assert!(
        published(&["shop", "default"], &bundle),
        "{}",
        cp.log_text()
    );
    assert!(in_webhook(&bundle), "{}", cp.log_text());
    // A namespace created later gets its ConfigMap from the watch.
    api.put("namespaces", "", "payments", serde_json::json!({}));
    assert!(published(&["payments"], &bundle), "{}", cp.log_text());
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer sa-token-of-moat-control"))
    );
    assert!(requests.iter().any(|r| r.target.starts_with("/api/v1/namespaces?") && r.target.contains("watch=true")));
    // Unchanged: no more writes.
    let writes = |api: &common::kube_api::KubeApi| {
        api.requests().iter().filter(|r| r.method != "GET").count()
    };
    let before = writes(&api);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(writes(&api), before);

    // A root rotation changes the bundle; the ConfigMaps and the webhook follow.
    let out =
        tokio::task::block_in_place(|| cp.moat_ok(&["ca", "rotate-root", "--timeout", "30s"]));
    assert!(out.contains("root rotation complete"), "{out}");
    let rotated = cp.moat_ok(&["ca", "bundle"]);
    assert_ne!(rotated, bundle);
    assert!(
        published(&["shop", "default", "payments"], &rotated),
        "{}",
        cp.log_text()
    );
    assert!(in_webhook(&rotated), "{}", cp.log_text());
}

/// `--control-plane` is where the CLI connects; `moat inject` connects nowhere, so passing it
/// there is a usage error naming the flag meant (`--control-plane-url`), which does reach the
/// injected sidecar.
#[test]
fn inject_refuses_the_cli_s_own_control_plane_flag_and_names_the_one_it_takes() {
    let file = std::env::temp_dir().join(format!("moat-inject-flag-{}.yaml", rand_suffix()));
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata: { name: web, labels: { moat.dev/inject: enabled } }\nspec: { containers: [{ name: web, image: nginx }] }\n",
    )
    .unwrap();
    let url = "https://moat-control.mesh.svc:7443";
    // `moat inject <flag> URL -f FILE`, without the environment's control-plane address.
    let inject_with = |flag: &str| {
        std::process::Command::new(moat_test_util::bin("moat"))
            .args(["inject", flag, url, "-f", file.to_str().unwrap()])
            .env_remove("MOAT_CONTROL_PLANE")
            .output()
            .unwrap()
    };
    let wrong = inject_with("--control-plane");
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert!(
        stderr(&wrong).contains("--control-plane-url"),
        "{}",
        stderr(&wrong)
    );
    assert!(
        wrong.stdout.is_empty(),
        "nothing is written on a usage error"
    );
    let right = inject_with("--control-plane-url");
    assert!(right.status.success(), "{}", stderr(&right));
    let pod: serde_json::Value = serde_yaml_ng::from_slice(&right.stdout).unwrap();
    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "moat-proxy")
        .unwrap();
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--control-plane", url]),
        "{args:?}"
    );
    let _ = std::fs::remove_file(&file);
}

/// After injection the kubelet's probes reach the sidecar's admin port (an app port only admits
/// mutual TLS): the sidecar performs each original probe against the app on loopback and answers
/// with its outcome, performs nothing else, and the probe JSON `moat inject` writes is what the
/// sidecar takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_probes_are_answered_by_the_sidecar_from_the_app_itself() {
    use moat_test_util::apps::recording_http;
    let cp = ControlPlane::start().unwrap();
    let (app, seen) = recording_http().await;
    let closed = moat_test_util::ReservedPort::loopback();
    // A second container serving the gRPC health protocol: the server as a whole and
    // `orders.v1.Orders` are SERVING, `reports.v1.Reports` is NOT_SERVING.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders.v1.Orders", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(
            "reports.v1.Reports",
            tonic_health::ServingStatus::NotServing,
        )
        .await;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_port = grpc.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    // What injection writes for a pod whose probes name the app's port.
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{ name: p, labels: {{ moat.dev/inject: enabled }} }}\nspec:\n  containers:\n    - name: app\n      image: app\n      ports: [{{ name: http, containerPort: {} }}]\n      readinessProbe: {{ httpGet: {{ path: /ready, port: http, httpHeaders: [{{ name: X-Probe, value: kubelet }}] }} }}\n      livenessProbe: {{ tcpSocket: {{ port: {} }} }}\n      startupProbe: {{ tcpSocket: {{ port: {} }} }}\n    - name: api\n      image: api\n      livenessProbe: {{ grpc: {{ port: {grpc_port} }} }}\n      readinessProbe: {{ grpc: {{ port: {grpc_port}, service: orders.v1.Orders }} }}\n      startupProbe: {{ grpc: {{ port: {grpc_port}, service: reports.v1.Reports }} }}\n",
        app.port(),
        app.port(),
        closed.port()
    );
    let file = cp.scratch().join("pod.yaml");
    std::fs::write(&file, pod).unwrap();
    let injected: serde_json::Value =
        serde_yaml_ng::from_str(&cp.moat_ok(&["inject", "-f", &file.display().to_string()]))
            .unwrap();
    let sidecar = &injected["spec"]["initContainers"][1];
    let probes = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MOAT_APP_PROBES")
        .and_then(|e| e["value"].as_str())
        .unwrap()
        .to_owned();
    let app_container = &injected["spec"]["containers"][0];
    assert_eq!(
        app_container["readinessProbe"]["httpGet"]["path"],
        "/app-health/app/readyz"
    );
    assert_eq!(app_container["readinessProbe"]["httpGet"]["port"], 7191);
    // The probes as they were are kept on the pod, so injection can be seen and undone.
    let kept: serde_json::Value = serde_json::from_str(
        injected["metadata"]["annotations"]["moat.dev/original-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(kept["app"]["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(kept["api"]["livenessProbe"]["grpc"]["port"], grpc_port);

    let proxy = Proxy::builder(&cp, "shop/app")
        .app(app)
        .args(&["--app-probes", &probes])
        .start()
        .unwrap();
    // HTTP: the app's answer, and the app received the original probe.
    assert_eq!(proxy.admin_get("/app-health/app/readyz").unwrap().0, 200);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].method.as_str(), got[0].path()), ("GET", "/ready"));
    assert!(
        got[0]
            .headers
            .iter()
            .any(|(k, v)| k == "x-probe" && v == "kubelet"),
        "{got:?}"
    );
    // TCP: open port passes, closed port fails.
    assert_eq!(proxy.admin_get("/app-health/app/livez").unwrap().0, 200);
    assert_eq!(proxy.admin_get("/app-health/app/startupz").unwrap().0, 503);
    // gRPC: the app's health service answers; SERVING passes, NOT_SERVING fails.
    let api = &injected["spec"]["containers"][1];
    assert_eq!(
        api["livenessProbe"]["httpGet"]["path"],
        "/app-health/api/livez"
    );
    assert!(api["livenessProbe"].get("grpc").is_none(), "{api}");
    assert_eq!(proxy.admin_get("/app-health/api/livez").unwrap().0, 200);
    assert_eq!(proxy.admin_get("/app-health/api/readyz").unwrap().0, 200);
    assert_eq!(proxy.admin_get("/app-health/api/startupz").unwrap().0, 503);
    // Nothing else is reachable this way.
    assert_eq!(proxy.admin_get("/app-health/app/other").unwrap().0, 404);
    assert_eq!(
        proxy
            .admin_get("/app-health/app/readyz/../../admin")
            .unwrap()
            .0,
        404
    );
    assert_eq!(seen.lock().unwrap().len(), 1);

    // A malformed probe list is refused at start with what is wrong.
    let out = std::process::Command::new(moat_test_util::bin("moat-proxy"))
        .args([
            "--identity",
            "x",
            "--token-file",
            "/dev/null",
            "--trust-anchors",
            "/dev/null",
        ])
        .args([
            "--app",
            "127.0.0.1:1",
            "--app-probes",
            "{\"/config\": {\"tcp\": {\"port\": 1}}}",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--app-probes"), "{}", stderr(&out));
}
