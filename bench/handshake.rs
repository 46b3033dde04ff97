//! CPU per mTLS handshake, both ends in one thread, over memory: what a new sidecar-to-sidecar
//! connection costs in TLS alone (the sockets and the kernel are `bench/run-compare`'s part).
//!
//! Each suite order of the MeshConfig's `cipherPreference` is measured as a full handshake
//! (certificates, X25519MLKEM768, ECDSA signatures on both sides) and as a resumed one (the
//! session ticket path sidecars take between the same pair). The ratio between the orders is
//! the number docs/decisions.md quotes for the AES-128 option.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_ca::{CertTtl, CertificateAuthority, Kek};
use moat_identity::{SpiffeId, TrustDomain, ValidatedCsr, WorkloadKey};
use moat_tls::{ClientAuth, Credential, SuiteOrder, client_config_ordered, server_config_ordered};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection};

fn credential(ca: &CertificateAuthority, who: &str) -> Credential {
    let id = SpiffeId::parse_with_default(who, &TrustDomain::default_domain()).unwrap();
    let wk = WorkloadKey::generate(&id).unwrap();
    let csr = ValidatedCsr::from_der(wk.csr_der()).unwrap();
    let leaf = ca.issue(&csr.spki_der, &csr.id, CertTtl::DEFAULT).unwrap();
    let key = PrivateKeyDer::try_from(wk.private_key_der()).unwrap();
    Credential::new(leaf.chain, key, ca.bundle()).unwrap()
}

/// Runs one handshake to completion, moving bytes between the two ends in memory.
fn handshake(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) {
    let name = ServerName::try_from("moat.invalid").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut wire = Vec::with_capacity(16 * 1024);
    while c.is_handshaking() || s.is_handshaking() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
}

fn bench(c: &mut Criterion) {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&TrustDomain::default_domain(), &kek).unwrap();
    let bundle = Arc::new(ca.bundle().clone());
    let orders = credential(&ca, "shop/orders");
    let frontend = credential(&ca, "shop/frontend");
    let expected =
        SpiffeId::parse_with_default("shop/orders", &TrustDomain::default_domain()).unwrap();
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    for (label, order) in [
        ("aes256", SuiteOrder::Aes256First),
        ("aes128", SuiteOrder::Aes128First),
    ] {
        let server = server_config_ordered(
            &orders,
            bundle.clone(),
            ClientAuth::Required,
            &[moat_tls::ALPN_TCP],
            order,
        )
        .unwrap();
        let resuming = client_config_ordered(
            Some(&frontend),
            bundle.clone(),
            expected.clone(),
            moat_tls::ALPN_TCP,
            order,
        )
        .unwrap();
        let mut full = (*resuming).clone();
        full.resumption = rustls::client::Resumption::disabled();
        let full = Arc::new(full);
        g.bench_function(format!("full/{label}"), |b| {
            b.iter(|| handshake(&server, &full))
        });
        handshake(&server, &resuming);
        g.bench_function(format!("resumed/{label}"), |b| {
            b.iter(|| handshake(&server, &resuming))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
