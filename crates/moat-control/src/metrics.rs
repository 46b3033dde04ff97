//! The control plane's Prometheus metrics, prefixed `moat_`: certificates issued and refused
//! (by reason) are counted as they happen; CA expiry, revocations, rotation progress and each
//! proxy's last-seen age are read from the live state at every scrape.

use std::time::SystemTime;

use moat_identity::bundle::sha256_hex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::ControlPlane;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// `token`, `renewal` or `admin`.
    pub via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaCertLabels {
    /// `root` or `intermediate`.
    pub kind: &'static str,
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    pub identity: String,
    pub address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgressLabels {
    /// `bundle` (acknowledged the current bundle) or `intermediate` (holds a certificate from
    /// the current intermediate).
    pub on: &'static str,
}

/// Every control-plane metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub issued: Family<IssuedLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    /// TLS handshakes on the gRPC port that never completed, by reason.
    pub handshake_failures: Family<RefusedLabels, Counter>,
    /// TLS handshakes on the gRPC port admitted and not finished (each a
    /// [`moat_metrics::Held`]).
    pub handshakes_pending: Gauge,
    /// Admin calls refused before any work, by reason (`unauthenticated`, `not-admin`).
    pub admin_refused: Family<RefusedLabels, Counter>,
    /// Calls refused before any handler because of the caller's certificate.
    callers_refused: Family<RefusedLabels, Counter>,
    ca_not_after: Family<CaCertLabels, Gauge>,
    revocations: Family<KindLabels, Gauge>,
    rotation_phase: Gauge,
    leader: Gauge,
    proxies: Gauge,
    proxies_current: Family<ProgressLabels, Gauge>,
    last_seen_age: Family<ProxyLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moat");
        moat_metrics::build_info(&mut registry, "control-plane", env!("CARGO_PKG_VERSION"));
        registry.register(
            "control_recovery_mode",
            "Whether the control plane waits for an offline CA repair (1) instead of serving",
            Gauge::<i64>::default(),
        );
        let m = Metrics {
            issued: Family::default(),
            refused: Family::default(),
            handshake_failures: Family::default(),
            handshakes_pending: Gauge::default(),
            admin_refused: Family::default(),
            callers_refused: Family::default(),
            ca_not_after: Family::default(),
            revocations: Family::default(),
            rotation_phase: Gauge::default(),
            leader: Gauge::default(),
            proxies: Gauge::default(),
            proxies_current: Family::default(),
            last_seen_age: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "certificates_issued",
            "Workload certificates issued",
            m.issued.clone(),
        );
        registry.register(
            "certificates_refused",
            "Certificate requests refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the gRPC port that did not complete: refused, timeout, evicted to make room for newer ones, busy (every pending one was a caller at work); anonymous-busy: completed without a client certificate while every place for such connections (32 per source address, 512 in all) was held by one at work (a Certify running on it, or in its first second); anonymous-evicted: connections without a client certificate closed to make room for a newer one; identity-busy: completed with a certificate whose identity already held 64 connections from the same address",
            m.handshake_failures.clone(),
        );
        registry.register(
            "tls_handshakes_pending",
            "TLS handshakes on the gRPC port accepted and not finished yet; bounded per source address and in all, and what the bound closes is counted in moat_tls_handshake_failures_total (evicted, busy)",
            m.handshakes_pending.clone(),
        );
        registry.register(
            "admin_calls_refused",
            "Admin calls refused for want of an admin identity: unauthenticated (no certificate) or not-admin",
            m.admin_refused.clone(),
        );
        registry.register(
            "callers_refused",
            "Calls refused before any handler: the caller's certificate has expired (over a resumed session) or is revoked",
            m.callers_refused.clone(),
        );
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "NotAfter (Unix seconds) of each trusted root and of the issuing intermediate",
            m.ca_not_after.clone(),
        );
        registry.register(
            "revocations",
            "Revocations in force, by kind",
            m.revocations.clone(),
        );
        registry.register(
            "root_rotation_phase",
            "Root rotation: 0 none, 1 new root trusted, 2 issuing from the new root",
            m.rotation_phase.clone(),
        );
        registry.register(
            "replica_leader",
            "1 on the replica that runs the once-only work (CA rotation checks, publishing, the policy controller), else 0",
            m.leader.clone(),
        );
        registry.register(
            "proxies_connected",
            "Proxies with a live mesh stream to this replica",
            m.proxies.clone(),
        );
        registry.register(
            "proxies_current",
            "Connected proxies on the current bundle / intermediate (rotation progress)",
            m.proxies_current.clone(),
        );
        registry.register(
            "proxy_last_seen_age_seconds",
            "Seconds since each connected proxy last sent anything",
            m.last_seen_age.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Registers the mesh streams' counters, which the mesh state owns.
    pub fn register_mesh(&mut self, first: &crate::mesh_state::FirstSnapshots) {
        self.registry.register(
            "mesh_first_snapshots",
            "First snapshots of mesh streams: table=full (the whole service table) or table=resumed (only the buckets that differ from the table the proxy announced)",
            first.by_table.clone(),
        );
        self.registry.register(
            "mesh_resent_buckets",
            "Service-table buckets resent to proxies that resumed their table (of 64 each)",
            first.resent_buckets.clone(),
        );
    }

    /// Counts an issued certificate.
    pub fn issued(&self, via: &'static str) {
        self.issued.get_or_create(&IssuedLabels { via }).inc();
    }

    /// Counts a refused certificate request.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Counts a call refused for its caller's certificate (`certificate-expired`, `revoked`).
    pub fn refused_caller(&self, reason: &'static str) {
        self.callers_refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }

    /// Reads the live state into the gauges and renders everything in `format`.
    pub async fn render(&self, cp: &ControlPlane, format: moat_metrics::Format) -> String {
        let ca = cp.ca.current();
        self.ca_not_after.clear();
        for r in ca.roots_info() {
            self.ca_not_after
                .get_or_create(&CaCertLabels {
                    kind: "root",
                    sha256: r.sha256,
                })
                .set(r.not_after);
        }
        if let Some(i) = ca.intermediate_info() {
            self.ca_not_after
                .get_or_create(&CaCertLabels {
                    kind: "intermediate",
                    sha256: i.sha256,
                })
                .set(i.not_after);
        }
        self.revocations.clear();
        if let Ok(list) = cp.revocations.list().await {
            for r in list {
                self.revocations
                    .get_or_create(&KindLabels {
                        kind: r.kind.as_str().to_owned(),
                    })
                    .inc();
            }
        }
        if let Ok((state, _)) = cp.ca.state().await {
            self.rotation_phase
                .set(match state.root_rotation.map(|r| r.phase) {
                    None => 0,
                    Some(moat_ca::RotationPhase::Trusting) => 1,
                    Some(moat_ca::RotationPhase::Issuing) => 2,
                });
        }
        self.leader.set(i64::from(cp.mesh.replica().is_leader()));
        let bundle = ca.bundle().fingerprints();
        let intermediate = sha256_hex(ca.intermediate());
        let now = SystemTime::now();
        self.last_seen_age.clear();
        let (mut total, mut on_bundle, mut on_intermediate) = (0, 0, 0);
        for p in cp.mesh.registry().entries() {
            total += 1;
            on_bundle += i64::from(p.applied_bundle == bundle);
            on_intermediate += i64::from(p.cert_issuer == intermediate);
            let age = now
                .duration_since(p.last_seen)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            self.last_seen_age
                .get_or_create(&ProxyLabels {
                    identity: p.id.to_string(),
                    address: p.inbound_address.clone(),
                })
                .set(age);
        }
        self.proxies.set(total);
        self.proxies_current
            .get_or_create(&ProgressLabels { on: "bundle" })
            .set(on_bundle);
        self.proxies_current
            .get_or_create(&ProgressLabels { on: "intermediate" })
            .set(on_intermediate);
        moat_metrics::encode(&self.registry, format)
    }
}
