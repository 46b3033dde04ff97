//! Prometheus metrics, all prefixed `moat_`, labelled by direction, peer identity, target and
//! decision. Served as text on the admin port's `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Labels of the request-duration histogram: every series is one edge (caller → target) and
/// decision, so the label set is bounded by the mesh's identities, never by requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub peer: String,
    pub target: String,
    pub decision: &'static str,
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
    /// `namespace/name` of the policy whose rule's limit applied (no version: a series per
    /// version would accumulate with every change).
    pub policy: String,
}

/// Labels of a failed handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub reason: String,
}

/// Labels of a completed handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeKindLabels {
    pub direction: &'static str,
    /// `full`, `full-retry` (after a HelloRetryRequest) or `resumed` (a session ticket).
    pub kind: &'static str,
}

/// Labels of a mesh connection opened to another sidecar.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `h2` (shared by HTTP of every version) or `tcp` (opaque).
    pub protocol: &'static str,
}

/// Labels of a per-rule counter. The policy's version is not one of them: the series would
/// accumulate with every policy change, and a rule keeps its index across small edits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub policy: String,
    /// The rule index, or `none` when no rule matched.
    pub rule: String,
    pub decision: &'static str,
}

/// Key of a reported rule counter: (policy, rule or -1, decision).
pub type RuleKey = (String, i32, &'static str);

/// A rule's count for reporting, with the newest policy version that counted into it.
#[derive(Debug, Default)]
pub struct RuleTotal {
    count: AtomicU64,
    version: AtomicU64,
}

impl RuleTotal {
    fn add(&self, version: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.version.fetch_max(version, Ordering::Relaxed);
    }
}

type HistogramFamily = Family<DurationLabels, Histogram, fn() -> Histogram>;

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
    handshakes: Family<HandshakeKindLabels, Counter>,
    /// Connections the proxy closed, by direction and reason (see the help text below).
    pub connections_closed: Family<HandshakeLabels, Counter>,
    /// Mesh connections opened to other sidecars, by protocol.
    pub upstream_connections: Family<UpstreamLabels, Counter>,
    /// Inbound TLS handshakes admitted and not finished (each a [`moat_metrics::Held`]).
    pub handshakes_pending: Gauge,
    cert_expiry: Gauge,
    cert_refresh: Gauge,
    pub snapshot_version: Gauge,
    pub control_plane_connected: Gauge,
    pub rule_hits: Family<RuleLabels, Counter>,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    /// The same counts, for reporting to the control plane.
    rule_totals: Mutex<HashMap<RuleKey, Arc<RuleTotal>>>,
    /// Calls admitted while the allow-list only watched, also reported.
    pub observed: crate::observe::Observed,
    /// Inbound requests by caller, also reported (`moat edges`).
    pub edges: crate::edges::Edges,
    /// The taps open on this proxy (`moat tap`) and their queued events.
    pub tap: crate::tap::Tap,
    snapshot_seen: AtomicBool,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moat");
        moat_metrics::build_info(&mut registry, "proxy", env!("CARGO_PKG_VERSION"));
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(latency);
        let tcp_connections = Family::<TrafficLabels, Counter>::default();
        let tcp_bytes = Family::<BytesLabels, Counter>::default();
        let authz = Family::<TrafficLabels, Counter>::default();
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        let handshakes = Family::<HandshakeKindLabels, Counter>::default();
        let connections_closed = Family::<HandshakeLabels, Counter>::default();
        let upstream_connections = Family::<UpstreamLabels, Counter>::default();
        let handshakes_pending = Gauge::default();
        let cert_expiry = Gauge::default();
        let cert_refresh = Gauge::default();
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
            "HTTP request duration, by direction, edge (peer, target) and decision",
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
            "tls_handshakes",
            "Completed mTLS handshakes by direction and kind (full, full-retry: after a HelloRetryRequest, resumed: with a session ticket, which skips certificates and signatures)",
            handshakes.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the proxy closed, by direction (inbound, outbound: local clients, upstream: shared mesh connections) and reason (header-read-timeout, too-many-resets, response-stalled, request-stalled, idle, policy, reset-budget: local clients gave up on too many requests on a shared mesh connection, which takes no new ones; spare: a shared mesh connection a burst opened, closed once idle; too-many-connections: the caller identity already held --max-connections-per-caller inbound connections; certificate-expired: the certificate an inbound connection's caller presented expired, HTTP closed gracefully, opaque TCP at once, or on an outbound opaque TCP connection the server's did; revoked: the server's certificate of an outbound opaque TCP connection was revoked)",
            connections_closed.clone(),
        );
        registry.register(
            "upstream_connections",
            "Mesh connections this sidecar opened to other sidecars, by protocol (h2: HTTP of every version, shared by local clients; tcp: one per opaque connection)",
            upstream_connections.clone(),
        );
        registry.register(
            "tls_handshakes_pending",
            "Inbound TLS handshakes accepted and not finished yet; bounded per source address and in all, and what the bound closes is counted in moat_tls_handshake_failures_total (evicted, busy)",
            handshakes_pending.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "NotAfter of the proxy's certificate",
            cert_expiry.clone(),
        );
        registry.register(
            "certificate_refresh_timestamp_seconds",
            "When the proxy's certificate is due for renewal (Unix seconds); a renewal moves it ahead, so one in the past means renewal is failing",
            cert_refresh.clone(),
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
            handshakes,
            connections_closed,
            upstream_connections,
            handshakes_pending,
            cert_expiry,
            cert_refresh,
            snapshot_version,
            control_plane_connected,
            rule_hits,
            rate_limited,
            rule_totals: Mutex::new(HashMap::new()),
            observed: crate::observe::Observed::default(),
            edges: crate::edges::Edges::default(),
            tap: crate::tap::Tap::default(),
            snapshot_seen: AtomicBool::new(false),
        }
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: moat_metrics::Format) -> String {
        moat_metrics::encode(&self.registry, format)
    }

    /// Records the certificate of a newly published TLS generation.
    pub fn certificate(&self, tls: &moat_tls::TlsState) {
        self.cert_expiry.set(tls.credential.leaf().not_after);
        self.cert_refresh.set(tls.refresh_after);
    }

    /// Counts a connection the proxy closed, by why.
    pub fn connection_closed(&self, direction: &'static str, reason: &'static str) {
        self.connections_closed
            .get_or_create(&HandshakeLabels {
                direction,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a completed handshake by its kind.
    pub fn handshake_done(&self, direction: &'static str, kind: Option<rustls::HandshakeKind>) {
        let kind = match kind {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            Some(rustls::HandshakeKind::FullWithHelloRetryRequest) => "full-retry",
            _ => "full",
        };
        self.handshakes
            .get_or_create(&HandshakeKindLabels { direction, kind })
            .inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, direction: &'static str, reason: String) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { direction, reason })
            .inc();
    }

    /// Counts a decision against the policy rule that made it (nothing when no policy did).
    pub fn count_rule(&self, d: &Decision) {
        if let Some((policy, version)) = &d.policy {
            let (rule, decision) = rule_outcome(d);
            let (counter, total) = self.rule_handles(&(policy.clone(), rule, decision));
            counter.inc();
            total.add(version.0);
        }
    }

    /// The exported counter and the reported total of one rule key.
    fn rule_handles(&self, key: &RuleKey) -> (Counter, Arc<RuleTotal>) {
        let (policy, rule, decision) = key;
        let counter = self
            .rule_hits
            .get_or_create(&RuleLabels {
                policy: policy.clone(),
                rule: if *rule < 0 {
                    "none".into()
                } else {
                    rule.to_string()
                },
                decision,
            })
            .clone();
        let total = self
            .rule_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        (counter, total)
    }

    /// Every rule counter so far: its key, the newest policy version counted, the count.
    pub fn rule_counters(&self) -> Vec<(RuleKey, u64, u64)> {
        self.rule_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.version.load(Ordering::Relaxed),
                    v.count.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Counters for the requests of one connection (inbound: one caller; outbound: one target).
    pub fn for_connection(
        &self,
        direction: &'static str,
        peer: String,
        target: String,
    ) -> ConnCounters {
        ConnCounters {
            edge: (direction == "inbound")
                .then(|| self.edges.of(&peer))
                .flatten(),
            direction,
            peer,
            target,
            cache: Mutex::new(CounterCache::default()),
        }
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

/// The rule index (-1: none matched) and decision label a rule counter counts `d` under.
fn rule_outcome(d: &Decision) -> (i32, &'static str) {
    (d.rule.map(|r| r as i32).unwrap_or(-1), d.effect().as_str())
}

/// How many distinct outcomes a connection keeps resolved counters for (beyond, it starts over).
const CACHED_OUTCOMES: usize = 32;

/// One connection's request counters, each resolved once per distinct outcome instead of
/// building and hashing its label set per request.
#[derive(Debug)]
pub struct ConnCounters {
    direction: &'static str,
    peer: String,
    target: String,
    /// Inbound: the caller's edge.
    edge: Option<Arc<crate::edges::Edge>>,
    cache: Mutex<CounterCache>,
}

#[derive(Debug, Default)]
struct CounterCache {
    authz: Vec<((&'static str, &'static str), Counter)>,
    requests: Vec<((&'static str, &'static str, u16), Counter)>,
    durations: Vec<(&'static str, Histogram)>,
    rules: Vec<(RuleKey, Counter, Arc<RuleTotal>)>,
}

/// The entry of `cache` for `key`, made with `make` on first use.
fn cached<K: PartialEq, V: Clone>(cache: &mut Vec<(K, V)>, key: K, make: impl FnOnce() -> V) -> V {
    if let Some((_, v)) = cache.iter().find(|(k, _)| *k == key) {
        return v.clone();
    }
    if cache.len() >= CACHED_OUTCOMES {
        cache.clear();
    }
    let v = make();
    cache.push((key, v.clone()));
    v
}

impl ConnCounters {
    fn cache(&self) -> std::sync::MutexGuard<'_, CounterCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an authorization decision.
    pub fn authz(&self, m: &Metrics, decision: &'static str, reason: &'static str) {
        let c = cached(&mut self.cache().authz, (decision, reason), || {
            m.authz
                .get_or_create(&TrafficLabels {
                    direction: self.direction,
                    peer: self.peer.clone(),
                    target: self.target.clone(),
                    decision,
                    reason,
                })
                .clone()
        });
        c.inc();
    }

    /// Counts a finished request and its duration.
    pub fn request(
        &self,
        m: &Metrics,
        decision: &'static str,
        reason: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let mut cache = self.cache();
        let duration = cached(&mut cache.durations, decision, || {
            m.request_duration
                .get_or_create(&DurationLabels {
                    direction: self.direction,
                    peer: self.peer.clone(),
                    target: self.target.clone(),
                    decision,
                })
                .clone()
        });
        let c = cached(&mut cache.requests, (decision, reason, status), || {
            m.requests
                .get_or_create(&RequestLabels {
                    direction: self.direction,
                    peer: self.peer.clone(),
                    target: self.target.clone(),
                    decision,
                    reason,
                    status,
                })
                .clone()
        });
        drop(cache);
        c.inc();
        duration.observe(elapsed.as_secs_f64());
        if let Some(edge) = &self.edge {
            edge.record((decision == "deny").then_some(reason), status, elapsed);
        }
    }

    /// Counts a decision against the policy rule that made it.
    pub fn rule(&self, m: &Metrics, d: &Decision) {
        let Some((policy, version)) = d.policy.as_ref() else {
            return;
        };
        let (rule, decision) = rule_outcome(d);
        let mut cache = self.cache();
        let hit = cache
            .rules
            .iter()
            .find(|(k, _, _)| k.0 == *policy && k.1 == rule && k.2 == decision);
        let (counter, total) = match hit {
            Some((_, c, t)) => (c.clone(), t.clone()),
            None => {
                let key = (policy.clone(), rule, decision);
                let (c, t) = m.rule_handles(&key);
                if cache.rules.len() >= CACHED_OUTCOMES {
                    cache.rules.clear();
                }
                cache.rules.push((key, c.clone(), t.clone()));
                (c, t)
            }
        };
        drop(cache);
        counter.inc();
        total.add(version.0);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
