//! CSR verification + signing on one core: the control plane's cost per certificate.
//!
//! `validate_and_sign` is what `Identity.Certify` does per request after the token check:
//! parse the CSR, check its key and SANs, verify its signature, sign a leaf. The two halves are
//! measured too so the cost can be attributed. Baseline for ratios: `p256_sign_only`, one bare
//! ECDSA P-256 signature with the same provider.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_ca::{CertTtl, CertificateAuthority, Kek};
use moat_identity::{SpiffeId, TrustDomain, ValidatedCsr, WorkloadKey};

fn bench(c: &mut Criterion) {
    let td = TrustDomain::default_domain();
    let (kek, _) = Kek::generate().expect("kek");
    let (ca, _) = CertificateAuthority::generate(&td, &kek).expect("ca");
    let id = SpiffeId::parse_with_default("shop/orders", &td).expect("id");
    let key = WorkloadKey::generate(&id).expect("key");
    let csr = key.csr_der().to_vec();

    let mut g = c.benchmark_group("ca");
    g.throughput(Throughput::Elements(1));
    g.bench_function("validate_and_sign", |b| {
        b.iter(|| {
            let v = ValidatedCsr::from_der(&csr).expect("csr");
            ca.issue(&v.spki_der, &v.id, CertTtl::DEFAULT)
                .expect("issue")
        })
    });
    g.bench_function("validate_only", |b| {
        b.iter(|| ValidatedCsr::from_der(&csr).expect("csr"))
    });
    let v = ValidatedCsr::from_der(&csr).expect("csr");
    g.bench_function("sign_only", |b| {
        b.iter(|| {
            ca.issue(&v.spki_der, &v.id, CertTtl::DEFAULT)
                .expect("issue")
        })
    });

    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .expect("key");
    let raw = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
    )
    .expect("key");
    let msg = [7u8; 400];
    g.bench_function("p256_sign_only", |b| {
        b.iter(|| raw.sign(&rng, &msg).expect("sign"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
