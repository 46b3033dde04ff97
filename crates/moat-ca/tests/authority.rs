//! The CA end to end in memory: generate, sign, verify, seal, reload, import.

// Test helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use moat_ca::{ByoPem, CaError, CertTtl, CertificateAuthority, Kek, KekError};
use moat_identity::{
    CertInfo, SpiffeId, TrustDomain, Usage, ValidatedCsr, VerifyError, WorkloadKey, issuer_sha256,
    verify_chain,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::UnixTime;

fn td() -> TrustDomain {
    TrustDomain::default_domain()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse_with_default(s, &td()).unwrap()
}

fn sign(ca: &CertificateAuthority, who: &SpiffeId, ttl: CertTtl) -> moat_ca::IssuedCert {
    let wk = WorkloadKey::generate(who).unwrap();
    let csr = ValidatedCsr::from_der(wk.csr_der()).unwrap();
    ca.issue(&csr.spki_der, &csr.id, ttl).unwrap()
}

#[test]
fn issued_leaf_is_a_one_hour_p256_spiffe_certificate_that_verifies() {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let orders = id("shop/orders");
    let leaf = sign(&ca, &orders, CertTtl::DEFAULT);
    let info = CertInfo::from_der(&leaf.chain[0]).unwrap();
    assert_eq!(info.uri_sans, vec![orders.to_string()]);
    assert!(info.other_sans.is_empty());
    assert_eq!(info.key_algorithm, "ECDSA P-256");
    assert!(!info.is_ca);
    // 1 h plus the 60 s back-dating.
    assert_eq!(info.not_after - info.not_before, 3600 + 60);
    assert!(
        leaf.refresh_after > info.not_before + 60 + 1440
            && leaf.refresh_after < info.not_after - 1440
    );
    for usage in [Usage::Client, Usage::Server] {
        let peer = verify_chain(&leaf.chain, ca.bundle(), &td(), UnixTime::now(), usage).unwrap();
        assert_eq!(peer.id, orders);
        assert_eq!(peer.serial, leaf.serial);
    }
}

/// A leaf's issuer is the certificate whose key signed it, wherever the peer put it: a chain
/// that lists the next intermediate (handed out with every certificate) before the one that
/// signed the leaf still verifies, and must not make the leaf count as the next one's.
#[test]
fn a_leafs_issuer_is_the_certificate_that_signed_it() {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, state) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let leaf = sign(&ca, &id("orders"), CertTtl::DEFAULT);
    let next = CertificateAuthority::load(&state.rotate_intermediate(&kek).unwrap(), &kek).unwrap();
    let (old, new) = (ca.intermediate().clone(), next.intermediate().clone());
    assert_ne!(old, new);
    let lying = [leaf.chain[0].clone(), new.clone(), old.clone()];
    verify_chain(&lying, next.bundle(), &td(), UnixTime::now(), Usage::Client).unwrap();
    let sha = |c: &rustls_pki_types::CertificateDer<'_>| moat_identity::bundle::sha256_hex(c);
    assert_eq!(
        issuer_sha256(&lying[0], &lying[1..], Usage::Client),
        sha(&old)
    );
    assert_eq!(
        issuer_sha256(&leaf.chain[0], std::slice::from_ref(&new), Usage::Client),
        ""
    );
    let renewed = sign(&next, &id("orders"), CertTtl::DEFAULT);
    assert_eq!(
        issuer_sha256(&renewed.chain[0], &[old, new.clone()], Usage::Client),
        sha(&new)
    );
}

#[test]
fn verification_refuses_expired_foreign_and_chainless_leaves() {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let (other, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let leaf = sign(&ca, &id("orders"), CertTtl::DEFAULT);

    let later = UnixTime::since_unix_epoch(Duration::from_secs(leaf.not_after as u64 + 1));
    let err = verify_chain(&leaf.chain, ca.bundle(), &td(), later, Usage::Client).unwrap_err();
    assert!(matches!(err, VerifyError::Expired), "{err}");

    let err = verify_chain(
        &leaf.chain,
        other.bundle(),
        &td(),
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::UnknownIssuer), "{err}");

    let err = verify_chain(
        &leaf.chain[..1],
        ca.bundle(),
        &td(),
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::UnknownIssuer), "{err}");

    let err = verify_chain(&[], ca.bundle(), &td(), UnixTime::now(), Usage::Client).unwrap_err();
    assert!(matches!(err, VerifyError::NoCertificate));
}

#[test]
fn foreign_trust_domain_is_not_signed() {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let foreign: SpiffeId = "spiffe://evil.org/ns/default/sa/x".parse().unwrap();
    let wk = WorkloadKey::generate(&foreign).unwrap();
    let csr = ValidatedCsr::from_der(wk.csr_der()).unwrap();
    assert!(matches!(
        ca.issue(&csr.spki_der, &csr.id, CertTtl::DEFAULT),
        Err(CaError::ForeignDomain { .. })
    ));
}

#[test]
fn state_reloads_under_the_same_kek_only_and_holds_no_plaintext_key() {
    let (kek, text) = Kek::generate().unwrap();
    let (ca, state) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let json = serde_json_like(&state);
    assert!(!json.contains("PRIVATE KEY"));

    let again = CertificateAuthority::load(&state, &Kek::parse(&text).unwrap()).unwrap();
    assert_eq!(again.bundle().fingerprints(), ca.bundle().fingerprints());
    let leaf = sign(&again, &id("orders"), CertTtl::DEFAULT);
    verify_chain(
        &leaf.chain,
        ca.bundle(),
        &td(),
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap();

    let (wrong, _) = Kek::generate().unwrap();
    let err = CertificateAuthority::load(&state, &wrong).unwrap_err();
    assert!(matches!(err, CaError::Kek(KekError::WrongKey)), "{err}");
}

fn serde_json_like(state: &moat_ca::CaState) -> String {
    format!("{state:?}")
}

fn operator_root() -> (String, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key)
}

#[test]
fn bring_your_own_root_with_key() {
    let (kek, _) = Kek::generate().unwrap();
    let (root_pem, root_key) = operator_root();
    let byo = ByoPem {
        root_cert: root_pem.clone(),
        root_key: Some(root_key.serialize_pem()),
        ..ByoPem::default()
    };
    let (ca, _) = CertificateAuthority::import(&td(), &byo, &kek).unwrap();
    let leaf = sign(&ca, &id("orders"), CertTtl::DEFAULT);
    let bundle = moat_identity::TrustBundle::from_pem(root_pem.as_bytes()).unwrap();
    verify_chain(&leaf.chain, &bundle, &td(), UnixTime::now(), Usage::Server).unwrap();
}

#[test]
fn bring_your_own_intermediate_and_mismatches_are_caught() {
    let (kek, _) = Kek::generate().unwrap();
    let (root_pem, root_key) = operator_root();
    let root_issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, &root_key).unwrap();
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let int = params.signed_by(&int_key, &root_issuer).unwrap();

    let good = ByoPem {
        root_cert: root_pem.clone(),
        intermediate_cert: Some(int.pem()),
        intermediate_key: Some(int_key.serialize_pem()),
        ..ByoPem::default()
    };
    let (ca, state) = CertificateAuthority::import(&td(), &good, &kek).unwrap();
    assert!(state.root_key.is_none());
    let leaf = sign(&ca, &id("orders"), CertTtl::DEFAULT);
    verify_chain(
        &leaf.chain,
        ca.bundle(),
        &td(),
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap();

    // The intermediate's key does not match its certificate.
    let wrong_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mismatched = ByoPem {
        intermediate_key: Some(wrong_key.serialize_pem()),
        ..good.clone()
    };
    let err = CertificateAuthority::import(&td(), &mismatched, &kek).unwrap_err();
    assert!(matches!(err, CaError::SelfCheck(_)), "{err}");

    // The intermediate is not under this root.
    let (other_root, _) = operator_root();
    let unrelated = ByoPem {
        root_cert: other_root,
        ..good.clone()
    };
    let err = CertificateAuthority::import(&td(), &unrelated, &kek).unwrap_err();
    assert!(matches!(err, CaError::SelfCheck(_)), "{err}");

    // Incomplete material and garbage PEM.
    let err = CertificateAuthority::import(
        &td(),
        &ByoPem {
            root_cert: root_pem,
            ..ByoPem::default()
        },
        &kek,
    )
    .unwrap_err();
    assert!(err.to_string().contains("give either"), "{err}");
    let err = CertificateAuthority::import(
        &td(),
        &ByoPem {
            root_cert: "junk".into(),
            ..ByoPem::default()
        },
        &kek,
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Pem { .. }), "{err}");
}

#[test]
fn leaves_follow_the_svid_profile_and_cas_do_not_carry_digital_signature() {
    use x509_parser::prelude::{FromDer as _, ParsedExtension, X509Certificate};
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let leaf = sign(&ca, &id("orders"), CertTtl::DEFAULT);
    let (_, cert) = X509Certificate::from_der(&leaf.chain[0]).unwrap();
    let bc = cert
        .extensions()
        .iter()
        .find(|e| matches!(e.parsed_extension(), ParsedExtension::BasicConstraints(_)))
        .expect("the leaf carries basicConstraints");
    assert!(bc.critical, "basicConstraints is critical");
    let ParsedExtension::BasicConstraints(b) = bc.parsed_extension() else {
        unreachable!()
    };
    assert!(!b.ca, "cA=false");
    assert!(
        cert.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::SubjectKeyIdentifier(_)
        )),
        "the leaf carries a subject key identifier"
    );
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());

    for der in [&leaf.chain[1], &ca.bundle().roots()[0]] {
        let (_, c) = X509Certificate::from_der(der).unwrap();
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    }
}

#[test]
fn verification_refuses_other_trust_domains_and_leaves_that_can_sign() {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let leaf = sign(&ca, &id("orders"), CertTtl::DEFAULT);
    // The same root, but a relying party in another trust domain.
    let other: TrustDomain = "other.mesh".parse().unwrap();
    let err = verify_chain(
        &leaf.chain,
        ca.bundle(),
        &other,
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::ForeignTrustDomain { .. }),
        "{err}"
    );

    // A leaf holding keyCertSign, signed by a CA the bundle trusts.
    let (root_pem, root_key) = operator_root();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, &root_key).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id("orders").to_string().try_into().unwrap(),
    )];
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let bad = params.signed_by(&key, &issuer).unwrap();
    let bundle = moat_identity::TrustBundle::from_pem(root_pem.as_bytes()).unwrap();
    let err = verify_chain(
        &[bad.der().clone()],
        &bundle,
        &td(),
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::LeafSignsCertificates), "{err}");
}

#[test]
fn sealed_keys_are_bound_to_their_role_and_certificate() {
    let (kek, _) = Kek::generate().unwrap();
    let (_, state) = CertificateAuthority::generate(&td(), &kek).unwrap();
    assert!(!state.has_unbound_keys());
    // The root key moved into the intermediate's slot does not open.
    let swapped = moat_ca::CaState {
        intermediate_key: state.root_key.clone().unwrap(),
        ..state.clone()
    };
    let err = CertificateAuthority::load(&swapped, &kek).unwrap_err();
    assert!(matches!(err, CaError::Kek(KekError::WrongKey)), "{err}");
    // Nor does an older intermediate's key paired with the current certificate.
    let next = state.rotate_intermediate(&kek).unwrap();
    let mixed = moat_ca::CaState {
        intermediate_key: state.intermediate_key.clone(),
        ..next.clone()
    };
    let err = CertificateAuthority::load(&mixed, &kek).unwrap_err();
    assert!(matches!(err, CaError::Kek(KekError::WrongKey)), "{err}");
    CertificateAuthority::load(&next, &kek).unwrap();
}
