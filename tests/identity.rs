//! Workload identity end to end: the real `moat-control` and `moat` binaries over real sockets
//! with real TLS. Join token → CSR → chain; renewal over mTLS; refusals with precise statuses.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use moat_api::v1::{CertifyRequest, certify_request};
use moat_identity::{CertInfo, ValidatedCsr, WorkloadKey, csr::csr_for};
use moat_test_util::{ControlPlane, files_under};
use moat_tls::Credential;
use rcgen::{
    KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, RsaKeySize, SanType,
};
use rustls::pki_types::PrivateKeyDer;
use sha2::Digest as _;
use tonic::Code;

fn token_request(csr: &[u8], token: &str) -> CertifyRequest {
    CertifyRequest {
        csr_der: csr.to_vec(),
        ttl_seconds: 0,
        credential: Some(certify_request::Credential::JoinToken(token.to_owned())),
    }
}

fn openssl_text(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(pem)
        .output()
        .expect("openssl must be installed for this test (.ci/run installs it)");
    assert!(out.status.success(), "openssl failed: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

use std::path::Path;

fn assert_one_hour_p256_leaf(pem: &Path, spiffe: &str) {
    let text = openssl_text(pem);
    assert!(text.contains(&format!("URI:{spiffe}")), "{text}");
    assert!(
        text.contains("NIST CURVE: P-256") || text.contains("prime256v1"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        !text.contains("DNS:") && !text.contains("IP Address:"),
        "{text}"
    );
    let chain = std::fs::read(pem).unwrap();
    let leaf = rustls::pki_types::pem::PemObject::pem_slice_iter(&chain)
        .next()
        .map(|c: Result<rustls::pki_types::CertificateDer<'static>, _>| c.unwrap())
        .unwrap();
    let info = CertInfo::from_der(&leaf).unwrap();
    assert_eq!(info.uri_sans, vec![spiffe.to_owned()]);
    // One hour, plus the one-minute back-dating for clock skew.
    assert_eq!(info.not_after - info.not_before, 3600 + 60);
}

#[test]
fn join_token_yields_a_verified_one_hour_p256_spiffe_certificate() {
    let cp = ControlPlane::start().unwrap();
    let tok = token(&cp, "shop/orders", &[]);
    let out = cp.scratch().join("orders");
    let anchors = cp.admin_dir().join("bundle.pem");
    let request = cert_request(&cp, &cp.url(), "shop/orders", &tok, &out);
    assert!(request.status.success(), "{}", stderr(&request));
    let spiffe = "spiffe://moat.local/ns/shop/sa/orders";
    assert_one_hour_p256_leaf(&out.join("cert.pem"), spiffe);
    // The chain verifies against the bundle, and the key on disk matches the leaf.
    let cred = credential(&out, &bundle(&cp));
    assert_eq!(cred.id().to_string(), spiffe);
    let inspected = cp.moat_ok(&[
        "cert",
        "inspect",
        out.join("cert.pem").to_str().unwrap(),
        "--bundle",
        anchors.to_str().unwrap(),
    ]);
    assert!(
        inspected.contains(&format!("verified     {spiffe}")),
        "{inspected}"
    );

    // `moat cert issue` (admin) produces the same kind of certificate.
    let issued = cp.scratch().join("gateway");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "edge/gateway",
        "--out",
        issued.to_str().unwrap(),
    ]);
    assert_one_hour_p256_leaf(
        &issued.join("cert.pem"),
        "spiffe://moat.local/ns/edge/sa/gateway",
    );
}

#[tokio::test]
async fn renewal_over_mtls_needs_the_same_identity_and_a_new_key() {
    let cp = ControlPlane::start().unwrap();
    let tok = token(&cp, "shop/orders", &[]);
    let key = WorkloadKey::generate(&id("shop/orders")).unwrap();
    let first = identity_client(&cp, None)
        .await
        .certify(token_request(key.csr_der(), &tok))
        .await
        .unwrap()
        .into_inner();
    let chain = first.chain_der.iter().map(|c| c.clone().into()).collect();
    let cred = Credential::new(
        chain,
        PrivateKeyDer::try_from(key.private_key_der()).unwrap(),
        &bundle(&cp),
    )
    .unwrap();
    let mut client = identity_client(&cp, Some(&cred)).await;

    let renew = |csr: &[u8]| CertifyRequest {
        csr_der: csr.to_vec(),
        ttl_seconds: 0,
        credential: None,
    };
    // Another identity: refused.
    let other = WorkloadKey::generate(&id("shop/payments")).unwrap();
    let err = client.certify(renew(other.csr_der())).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("shop/sa/payments"), "{err:?}");
    // The same key again: refused.
    let err = client.certify(renew(key.csr_der())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("new key pair"), "{err:?}");
    // A fresh key for the same identity: a new certificate with a new serial.
    let fresh = WorkloadKey::generate(&id("shop/orders")).unwrap();
    let second = client
        .certify(renew(fresh.csr_der()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.spiffe_id, "spiffe://moat.local/ns/shop/sa/orders");
    assert_ne!(second.serial, first.serial);
    let new_leaf = CertInfo::from_der(&second.chain_der[0]).unwrap();
    let csr = ValidatedCsr::from_der(fresh.csr_der()).unwrap();
    assert_eq!(new_leaf.spki_der, csr.spki_der);

    // Without a token and without a client certificate there is nothing to go on.
    let fresh = WorkloadKey::generate(&id("shop/orders")).unwrap();
    let err = identity_client(&cp, None)
        .await
        .certify(renew(fresh.csr_der()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // The CLI renews a credential directory in place.
    let dir = cp.scratch().join("cli-renew");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "shop/cli",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let before = credential(&dir, &bundle(&cp)).leaf().serial.clone();
    cp.moat_ok(&["cert", "renew", "--dir", dir.to_str().unwrap()]);
    let after = credential(&dir, &bundle(&cp)).leaf().serial.clone();
    assert_ne!(before, after);
}

#[tokio::test]
async fn an_expired_certificate_cannot_renew() {
    // Bring our own root (with its key) so the test can mint a leaf that the mesh trusts but
    // that has already expired.
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root = root_params.self_signed(&root_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (root_pem, root_key_pem) = (dir.path().join("root.pem"), dir.path().join("root.key"));
    std::fs::write(&root_pem, root.pem()).unwrap();
    std::fs::write(&root_key_pem, root_key.serialize_pem()).unwrap();
    let cp = ControlPlane::start_with(&[
        "--import-root-cert",
        root_pem.to_str().unwrap(),
        "--import-root-key",
        root_key_pem.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        bundle(&cp).contains(root.der()),
        "the imported root is the trust anchor"
    );

    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = vec![SanType::URI(
        "spiffe://moat.local/ns/shop/sa/orders".try_into().unwrap(),
    )];
    leaf_params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    leaf_params.not_before = now - Duration::from_secs(7200);
    leaf_params.not_after = now - Duration::from_secs(60);
    let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), &root_key).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

    // Build the expired credential by hand (Credential::new would refuse it, rightly).
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.into())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(moat_tls::SpiffeServerVerifier::new(
            std::sync::Arc::new(bundle(&cp)),
            control_id(),
        )))
        .with_client_auth_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(cp.url().trim_start_matches("https://"))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("moat.invalid".try_into().unwrap(), tcp)
        .await
        .unwrap();
    // TLS 1.3: the server judges the client certificate after the client's flight; its verdict
    // arrives as an alert on the first read.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let err = tls.read(&mut buf).await.unwrap_err();
    assert!(err.to_string().contains("CertificateExpired"), "{err}");
    let logged = moat_test_util::eventually(Duration::from_secs(5), || {
        let log = cp.log_text();
        (log.contains("TLS handshake refused") && log.contains("Expired")).then_some(())
    });
    assert!(logged.is_some(), "{}", cp.log_text());
}

#[tokio::test]
async fn refused_tokens_get_precise_statuses_and_tokens_are_never_stored_in_clear() {
    let cp = ControlPlane::start().unwrap();
    let csr = |who: &str| WorkloadKey::generate(&id(who)).unwrap();
    let mut client = identity_client(&cp, None).await;

    let unknown = client
        .certify(token_request(
            csr("orders").csr_der(),
            "moat_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(unknown.message().contains("not recognised"), "{unknown:?}");

    let short = token(&cp, "orders", &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = client
        .certify(token_request(csr("orders").csr_der(), &short))
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{expired:?}");

    let revoked_tok = token(&cp, "orders", &[]);
    // A token's id is the first 16 hex digits of its SHA-256.
    let digest = sha2::Sha256::digest(revoked_tok.as_bytes());
    let rid = digest
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let listed = cp.moat_ok(&["token", "list"]);
    assert!(listed.contains(&rid), "{listed}");
    cp.moat_ok(&["token", "revoke", &rid]);
    let revoked = client
        .certify(token_request(csr("orders").csr_der(), &revoked_tok))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::PermissionDenied);
    assert!(revoked.message().contains("revoked"), "{revoked:?}");

    let once = token(&cp, "orders", &["--uses", "1"]);
    client
        .certify(token_request(csr("orders").csr_der(), &once))
        .await
        .unwrap();
    let exhausted = client
        .certify(token_request(csr("orders").csr_der(), &once))
        .await
        .unwrap_err();
    assert_eq!(exhausted.code(), Code::ResourceExhausted);
    assert!(exhausted.message().contains("used up"), "{exhausted:?}");

    let bound = token(&cp, "orders", &[]);
    let wrong = client
        .certify(token_request(csr("payments").csr_der(), &bound))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    assert!(wrong.message().contains("bound to"), "{wrong:?}");

    // No token text, nor its secret part, appears in any file of the data directory.
    for tok in [&short, &revoked_tok, &once, &bound] {
        let secret = tok.trim_start_matches("moat_").as_bytes();
        for f in files_under(cp.data_dir()) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "token found in clear in {}",
                f.display()
            );
        }
    }
    // Every refusal is in the audit log.
    let audit = cp.moat_ok(&["audit", "--limit", "100"]);
    for needle in [
        "not recognised",
        "expired",
        "revoked",
        "used up",
        "bound to",
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("refused") && l.contains("certify") && l.contains(needle)),
            "{needle}: {audit}"
        );
    }
}

/// Anyone can call Certify and name any identity in the CSR, and each refusal kind (reason,
/// identity, message) is sampled on its own: naming a new identity in every call would write an
/// audit entry per call and push real admin actions out of the log's retention bound. At most
/// 60 refusals a minute are written whatever their kinds. (Before, 1,000 such calls wrote
/// 1,000 entries.)
#[tokio::test]
async fn naming_a_new_identity_in_every_refused_call_cannot_flood_the_audit_log() {
    let cp = ControlPlane::start().unwrap();
    cp.moat_ok(&["token", "create", "--identity", "last-real-action"]);
    let mut client = identity_client(&cp, None).await;
    for i in 0..1000 {
        let key = WorkloadKey::generate(&id(&format!("flood-{i}"))).unwrap();
        let err = client
            .certify(token_request(
                key.csr_der(),
                "moat_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let audit = cp.moat_ok(&["audit", "--limit", "5000"]);
    let refusals = audit
        .lines()
        .filter(|l| l.contains("refused") && l.contains("certify"))
        .count();
    assert!((2..=61).contains(&refusals), "{refusals} written:\n{audit}");
    assert!(
        audit.lines().any(|l| l.contains("last-real-action")),
        "{audit}"
    );
}

#[tokio::test]
async fn bad_csrs_are_invalid_argument_and_the_server_keeps_serving() {
    let cp = ControlPlane::start().unwrap();
    let tok = token(&cp, "orders", &["--uses", "10"]);
    let mut client = identity_client(&cp, None).await;
    let orders = id("orders");

    let rsa = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut extra = rcgen::CertificateParams::new(vec!["orders.example.com".to_owned()]).unwrap();
    extra
        .subject_alt_names
        .push(SanType::URI(orders.to_string().try_into().unwrap()));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"\x30\x82garbage bytes".to_vec(),
            "not a DER PKCS#10",
        ),
        ("empty", Vec::new(), "csr is empty"),
        ("rsa", csr_for(&rsa, &orders).unwrap(), "RSA"),
        ("p384", csr_for(&p384, &orders).unwrap(), "P-384"),
        (
            "extra sans",
            extra.serialize_request(&p256).unwrap().der().to_vec(),
            "exactly one subject alternative name",
        ),
        ("oversized", vec![0x30; 1024 * 1024], "the limit is"),
    ];
    // Hammer the server with all of them concurrently while a good caller is served.
    let mut tasks = Vec::new();
    for (name, der, want) in cases {
        let mut c = client.clone();
        let tok = tok.clone();
        tasks.push(tokio::spawn(async move {
            let err = c.certify(token_request(&der, &tok)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
            assert!(err.message().contains(want), "{name}: {err:?}");
        }));
    }
    let good = WorkloadKey::generate(&orders).unwrap();
    let ok = client
        .certify(token_request(good.csr_der(), &tok))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, orders.to_string());
    for t in tasks {
        t.await.unwrap();
    }
    // Refused CSRs did not consume the token's uses; the server still serves.
    let again = WorkloadKey::generate(&orders).unwrap();
    client
        .certify(token_request(again.csr_der(), &tok))
        .await
        .unwrap();
    let tokens: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["token", "list", "-o", "json"])).unwrap();
    assert_eq!(tokens[0]["uses"], 2);
    // A TTL outside 5 min..24 h is refused too.
    let mut req = token_request(again.csr_der(), &tok);
    req.ttl_seconds = 60;
    assert_eq!(
        client.certify(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// `--max-cert-ttl` caps every certificate the control plane issues: a Certify (the same path
/// renews a sidecar) or an admin's `moat cert issue` asking for longer gets the cap, not a
/// refusal; a start whose cap is below the default or the minimum is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_outlives_max_cert_ttl() {
    let cp =
        ControlPlane::start_with(&["--max-cert-ttl", "10m", "--default-cert-ttl", "10m"]).unwrap();
    let lifetime = |der: &[u8]| {
        let info = CertInfo::from_der(der).unwrap();
        info.not_after - info.not_before
    };
    let tok = token(&cp, "orders", &[]);
    let key = WorkloadKey::generate(&id("orders")).unwrap();
    let mut req = token_request(key.csr_der(), &tok);
    req.ttl_seconds = 3600;
    let resp = identity_client(&cp, None)
        .await
        .certify(req)
        .await
        .unwrap()
        .into_inner();
    // Ten minutes, plus the one-minute back-dating for clock skew.
    assert_eq!(lifetime(&resp.chain_der[0]), 600 + 60);

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().display().to_string();
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "orders",
        "--ttl",
        "2h",
        "--out",
        &dir,
    ]);
    let pem = std::fs::read(out.path().join("cert.pem")).unwrap();
    let leaf = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .map(|c: Result<rustls::pki_types::CertificateDer<'static>, _>| c.unwrap())
        .unwrap();
    assert_eq!(lifetime(&leaf), 600 + 60);

    let data = tempfile::tempdir().unwrap();
    let refused = Command::new(moat_test_util::bin("moat-control"))
        .args(["serve", "--dev", "--data-dir"])
        .arg(data.path())
        .args(["--max-cert-ttl", "10m"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let err = stderr(&refused);
    assert!(
        err.contains("--max-cert-ttl 10m is below --min-cert-ttl 5m or --default-cert-ttl 1h"),
        "{err}"
    );
}
