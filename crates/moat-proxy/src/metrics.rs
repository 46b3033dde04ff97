//! Prometheus metrics, all prefixed `moat_`, labelled by direction, peer identity, target and
//! decision. Served as text on the admin port's `/metrics`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use moat_policy::eval::Decision;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request or TCP connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub direction: &'static str,
    pub peer: String,
    pub target: String,
    pub decision: &'static str,
    pub reason: &'static str,
}

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub peer: String,
    pub target: String,
    pub decision: &'static str,
    pub reason: &'static str,
    pub status: u16,
}

/// Labels with only a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Labels of a byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    /// `to_app`/`from_app` on inbound, `to_peer`/`from_peer` on outbound.
    pub flow: &'static str,
}

/// Labels of a rate-limited request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub peer: String,
    /// `namespace/name@version` of the policy whose rule's limit applied.
    pub policy: String,
}

/// Labels of a failed handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub reason: String,
}

/// Labels of a per-rule counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub policy: String,
    pub version: String,
    /// The rule index, or `none` when no rule matched.
    pub rule: String,
    pub decision: &'static str,
}

/// Key of a reported rule counter: (policy, version, rule or -1, decision).
pub type RuleKey = (String, u64, i32, &'static str);

type HistogramFamily = Family<DirectionLabels, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub tcp_connections: Family<TrafficLabels, Counter>,
    pub tcp_bytes: Family<BytesLabels, Counter>,
    pub authz: Family<TrafficLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub cert_expiry: Gauge,
    pub snapshot_version: Gauge,
    pub control_plane_connected: Gauge,
    pub rule_hits: Family<RuleLabels, Counter>,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    /// The same counts, for reporting to the control plane.
    rule_totals: Mutex<HashMap<RuleKey, u64>>,
    snapshot_seen: AtomicBool,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moat");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(latency);
        let tcp_connections = Family::<TrafficLabels, Counter>::default();
        let tcp_bytes = Family::<BytesLabels, Counter>::default();
        let authz = Family::<TrafficLabels, Counter>::default();
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        let cert_expiry = Gauge::default();
        let snapshot_version = Gauge::default();
        let control_plane_connected = Gauge::default();
        let rule_hits = Family::<RuleLabels, Counter>::default();
        let rate_limited = Family::<RateLimitedLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rule's rate limit, by calling identity",
            rate_limited.clone(),
        );
        registry.register(
            "policy_rule_hits",
            "Authorization decisions per policy rule (rule=none: no rule matched)",
            rule_hits.clone(),
        );
        registry.register("requests", "HTTP requests handled", requests.clone());
        registry.register(
            "request_duration_seconds",
            "HTTP request duration",
            request_duration.clone(),
        );
        registry.register(
            "tcp_connections",
            "Opaque TCP connections handled",
            tcp_connections.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Bytes forwarded on opaque TCP connections",
            tcp_bytes.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions by reason",
            authz.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Refused or failed TLS handshakes by reason",
            handshake_failures.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "NotAfter of the proxy's certificate",
            cert_expiry.clone(),
        );
        registry.register(
            "snapshot_version",
            "Version of the applied control-plane snapshot",
            snapshot_version.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the mesh stream is up",
            control_plane_connected.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            tcp_connections,
            tcp_bytes,
            authz,
            handshake_failures,
            cert_expiry,
            snapshot_version,
            control_plane_connected,
            rule_hits,
            rate_limited,
            rule_totals: Mutex::new(HashMap::new()),
            snapshot_seen: AtomicBool::new(false),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, direction: &'static str, reason: String) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { direction, reason })
            .inc();
    }

    /// Counts a decision against the policy rule that made it (nothing when no policy did).
    pub fn count_rule(&self, d: &Decision) {
        let Some((policy, version)) = &d.policy else {
            return;
        };
        let decision = match (d.allowed, d.would_deny) {
            (true, Some(_)) => "would-deny",
            (true, None) => "allow",
            (false, _) => "deny",
        };
        let rule = d.rule.map(|r| r as i32).unwrap_or(-1);
        self.rule_hits
            .get_or_create(&RuleLabels {
                policy: policy.clone(),
                version: version.to_string(),
                rule: if rule < 0 {
                    "none".into()
                } else {
                    rule.to_string()
                },
                decision,
            })
            .inc();
        *self
            .rule_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((policy.clone(), version.0, rule, decision))
            .or_default() += 1;
    }

    /// Every rule counter so far.
    pub fn rule_counters(&self) -> Vec<(RuleKey, u64)> {
        self.rule_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Records that a snapshot was applied on the current mesh stream.
    pub fn mark_snapshot(&self) {
        self.snapshot_seen.store(true, Ordering::Relaxed);
    }

    /// Whether a snapshot arrived since the last call (the reconnect backoff resets then).
    pub fn reset_backoff(&self) -> bool {
        self.snapshot_seen.swap(false, Ordering::Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
