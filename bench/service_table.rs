//! The service table a proxy holds, at the control-plane bench's size (1,000 services × 10
//! endpoints): what a reconnecting proxy computes before it can announce itself
//! (`ServiceTable::digests`, the 64 bucket digests of its table), and what the control plane
//! computes per table change (`table_digests` over the same services). `digests_cold` takes the
//! digests of one of 256 copies of the table in turn, as the control-plane bench's process does
//! for its 10,000 simulated proxies (a sidecar's own table has often left the caches by the time
//! its stream breaks, too). Baseline in the same run: one SHA-256 over as many bytes as the
//! table's strings and lengths (`sha256_floor`).
//!
//! The control plane's side: `view_build_one_change` builds a `MeshView` (the table, its buckets
//! and their digests) on top of the last one when one service's endpoints changed, as the view
//! after a proxy joins; `view_build_from_nothing` builds the same view with no previous one
//! (every bucket sorted and hashed), its baseline in the same run.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use moat_api::v1 as pb;
use moat_api::v1::MeshSettings;
use moat_control::mesh_view::{MeshView, ViewInputs};
use moat_control::policies::PolicySet;
use moat_identity::SpiffeId;
use moat_wire::table::{ServiceTable, table_digests};
use sha2::{Digest, Sha256};

const SERVICES: usize = 1000;
const REPLICAS: usize = 10;
const COLD_COPIES: usize = 256;

fn services() -> Vec<pb::Service> {
    (0..SERVICES)
        .map(|s| pb::Service {
            spiffe_id: format!("spiffe://moat.local/ns/bench/sa/svc-{s:04}"),
            endpoints: (0..REPLICAS)
                .map(|r| {
                    let i = s * REPLICAS + r;
                    format!("127.1.{}.{}:{}", i / 250, i % 250 + 1, 20000 + i % 1000)
                })
                .collect(),
        })
        .collect()
}

/// The bytes the bucket digests hash, in one piece: every string with its u32 length.
fn encoding(services: &[pb::Service]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    for s in services {
        put(s.spiffe_id.as_bytes());
        put(&(s.endpoints.len() as u32).to_be_bytes());
        for e in &s.endpoints {
            put(e.as_bytes());
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let services = services();
    let mut table = None;
    let mut whole = pb::Snapshot {
        services: services.clone(),
        ..pb::Snapshot::default()
    };
    ServiceTable::fold(&mut table, &mut whole).expect("a table");
    let table = table.expect("a table");
    let bytes = encoding(&services);

    let mut g = c.benchmark_group("service_table");
    g.bench_function("digests", |b| b.iter(|| table.digests()));
    // Each copy allocated on its own, as each simulated proxy folds its own.
    let copies: Vec<ServiceTable> = (0..COLD_COPIES)
        .map(|_| {
            let mut t = None;
            let mut whole = pb::Snapshot {
                services: services.clone(),
                ..pb::Snapshot::default()
            };
            ServiceTable::fold(&mut t, &mut whole).expect("a table");
            t.expect("a table")
        })
        .collect();
    let mut next = 0;
    g.bench_function("digests_cold", |b| {
        b.iter(|| {
            next = (next + 1) % COLD_COPIES;
            copies[next].digests()
        })
    });
    g.bench_function("table_digests", |b| {
        b.iter(|| {
            table_digests(
                services
                    .iter()
                    .map(|s| (s.spiffe_id.as_str(), s.endpoints.as_slice())),
            )
        })
    });
    g.bench_function("sha256_floor", |b| b.iter(|| Sha256::digest(&bytes)));

    let table: BTreeMap<SpiffeId, Vec<String>> = services
        .iter()
        .map(|s| (s.spiffe_id.parse().expect("an ID"), s.endpoints.clone()))
        .collect();
    let inputs = |generation: u64, table: &BTreeMap<SpiffeId, Vec<String>>| ViewInputs {
        generation,
        services: table.clone(),
        bundle_der: Vec::new(),
        bundle_fingerprints: Vec::new(),
        policies: Arc::new(PolicySet::default()),
        mesh: MeshSettings::default(),
        revoked: (Vec::new(), Vec::new()),
    };
    let last = MeshView::build(inputs(1, &table), None);
    let mut joined = table.clone();
    if let Some(eps) = joined.values_mut().nth(SERVICES / 2) {
        eps.push("10.250.0.1:8443".to_owned());
    }
    g.bench_function("view_build_one_change", |b| {
        b.iter_batched(
            || inputs(2, &joined),
            |i| MeshView::build(i, Some(&last)),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("view_build_from_nothing", |b| {
        b.iter_batched(
            || inputs(2, &joined),
            |i| MeshView::build(i, None),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
