//! `moat.v1.Mesh`: one stream per proxy. The proxy's identity is its mTLS certificate; its first
//! message announces where it listens. Whenever anything changes (a proxy joins or leaves, a
//! policy is applied) the shared generation moves on and every stream sends its proxy a new
//! snapshot, if what that proxy needs actually changed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use moat_api::v1::mesh_server::Mesh;
use moat_api::v1::{MeshSettings, ProxyMessage, Snapshot, proxy_message};
use moat_identity::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::listener::ConnInfo;
use crate::mesh_view::{Base, MeshView, PART_BUDGET, Sent, ViewInputs, into_parts, next_snapshot};
use crate::policies::{Policies, PolicySet};
use crate::registry::{ProxyEntry, Registry};

const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a restart, how long endpoints remembered in the store stay in the service table while
/// their proxies reconnect (proxies retry with at most 15 s of backoff, plus jitter).
const WARM_UP: Duration = Duration::from_secs(30);
/// Store prefix of announced endpoints: `endpoints/<spiffe id>|<address>`.
const ENDPOINTS: &str = "endpoints/";

fn endpoint_key(id: &SpiffeId, address: &str) -> String {
    format!("{ENDPOINTS}{id}|{address}")
}

/// Mesh-wide live state shared by every stream.
#[derive(Debug)]
pub struct MeshState {
    pub registry: Mutex<Registry>,
    pub policies: RwLock<Arc<PolicySet>>,
    generation: watch::Sender<u64>,
    next_stream: AtomicU64,
    store: Arc<dyn moat_store::Store>,
    /// This control-plane replica (its lease holds the endpoints of its proxies).
    replica: Arc<crate::replica::Replica>,
    /// Revoked identities (full SPIFFE IDs) and serials, as pushed to proxies.
    revoked: RwLock<(Vec<String>, Vec<String>)>,
    /// Trusted token issuers' key sets, pushed in snapshots.
    pub jwks: crate::jwks::JwksCache,
    /// Rotation commands: per identity, and for everyone.
    rotations: Mutex<(u64, std::collections::HashMap<SpiffeId, u64>)>,
    /// The open taps (`moat tap`), listed in the snapshots of the proxies they watch.
    pub taps: crate::tap::Taps,
    /// The newest view (see [`publish_views`]); `None` until the first is built.
    view: watch::Sender<Option<Arc<MeshView>>>,
    /// How the streams' first snapshots went (exported as metrics).
    pub first_snapshots: FirstSnapshots,
}

/// How the streams' first snapshots went: the whole service table, or resumed from the table
/// the proxy announced.
#[derive(Clone, Debug, Default)]
pub struct FirstSnapshots {
    /// By `table`: `full` or `resumed`.
    pub by_table: Family<TableLabels, Counter>,
    /// Buckets resent to resumed proxies.
    pub resent_buckets: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: &'static str,
}

impl FirstSnapshots {
    fn count(&self, snap: &Snapshot) {
        let table = if snap.services_incremental {
            self.resent_buckets
                .inc_by(snap.services_reset_buckets.len() as u64);
            "resumed"
        } else {
            "full"
        };
        self.by_table.get_or_create(&TableLabels { table }).inc();
    }
}

impl MeshState {
    /// Empty state at generation 1.
    pub fn new(
        policies: PolicySet,
        store: Arc<dyn moat_store::Store>,
        replica: Arc<crate::replica::Replica>,
    ) -> Arc<Self> {
        let (generation, _) = watch::channel(1);
        Arc::new(MeshState {
            registry: Mutex::new(Registry::default()),
            policies: RwLock::new(Arc::new(policies)),
            generation,
            next_stream: AtomicU64::new(1),
            store,
            replica,
            rotations: Mutex::new((0, std::collections::HashMap::new())),
            jwks: crate::jwks::JwksCache::default(),
            revoked: RwLock::new((Vec::new(), Vec::new())),
            taps: crate::tap::Taps::default(),
            view: watch::channel(None).0,
            first_snapshots: FirstSnapshots::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn moat_store::Store> {
        &self.store
    }

    /// This replica.
    pub fn replica(&self) -> &Arc<crate::replica::Replica> {
        &self.replica
    }

    /// Changes whenever something that may change a snapshot or the registry changed.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Loads the endpoints announced before this start and serves them for the warm-up period.
    pub async fn warm_up(self: &Arc<Self>) -> Result<(), moat_store::StoreError> {
        let remembered: Vec<(SpiffeId, String)> = self
            .store
            .range(ENDPOINTS, 0, false)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let (id, addr) = kv.key.strip_prefix(ENDPOINTS)?.rsplit_once('|')?;
                Some((id.parse().ok()?, addr.to_owned()))
            })
            .collect();
        if remembered.is_empty() {
            return Ok(());
        }
        tracing::info!(endpoints = remembered.len(), warm_up = ?WARM_UP, "serving remembered endpoints while proxies reconnect");
        self.registry().set_warm(remembered);
        let state = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(WARM_UP).await;
            state.registry().end_warm();
            state.bump();
        });
        Ok(())
    }

    /// Tells the proxies of `id` (or, with `None`, all proxies) to re-key and renew now, on
    /// every replica (`rotations`). Returns how many proxies of the fleet that reaches.
    pub async fn rotate(&self, id: Option<&SpiffeId>) -> Result<u32, moat_store::StoreError> {
        crate::rotations::request(self.store.as_ref(), id).await?;
        // In force here at once; the other replicas follow the store.
        if self.set_rotations(crate::rotations::load(self.store.as_ref()).await?) {
            self.bump();
        }
        Ok(self
            .registry()
            .fleet()
            .filter(|p| id.is_none_or(|id| &p.id == id))
            .count() as u32)
    }

    /// Sets the rotation counters; returns whether they changed.
    pub fn set_rotations(&self, counters: crate::rotations::Counters) -> bool {
        let mut r = self.rotations.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *r != counters;
        *r = counters;
        changed
    }

    /// Whether `id`, or the certificate `serial`, is revoked.
    pub fn is_revoked(&self, id: &SpiffeId, serial: Option<&str>) -> bool {
        let r = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        let id = id.to_string();
        r.0.contains(&id) || serial.is_some_and(|s| r.1.iter().any(|x| x == s))
    }

    fn revoked_lists(&self) -> (Vec<String>, Vec<String>) {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The rotation generation a proxy of `id` is at.
    fn rotation_of(&self, id: &SpiffeId) -> u64 {
        let r = self.rotations.lock().unwrap_or_else(|e| e.into_inner());
        r.0 + r.1.get(id).copied().unwrap_or(0)
    }

    /// Marks that something changed: every stream re-evaluates its snapshot. Returns the new
    /// generation: views built at it or later include the change.
    pub fn bump(&self) -> u64 {
        let mut at = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            at = *g;
        });
        at
    }

    /// The registry, locked.
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain data behind; keep serving with it.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the policy set (after a store change) and bumps the generation.
    pub fn set_policies(&self, set: PolicySet) {
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.bump();
    }

    /// The policies and mesh config in force.
    pub fn current_policies(&self) -> Arc<PolicySet> {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Builds a [`MeshView`] for the newest generation whenever it moves on. Changes that arrive
/// while a view is built, or while the streams are still sending the previous one, are folded
/// into the next, so a burst of changes (thousands of proxies connecting) costs a few builds and
/// broadcasts, not one per change.
/// The longest a new view waits for streams still busy with the previous one (a proxy that
/// reads slowly must not hold up the rest of the mesh).
const DRAIN_WAIT: Duration = Duration::from_millis(100);

pub async fn publish_views(state: Arc<MeshState>, ca: Arc<crate::ca::CaManager>) {
    let mut generation = state.generation.subscribe();
    loop {
        let at = *generation.borrow_and_update();
        let inputs = state.view_inputs(at, &ca);
        let previous = state.view.borrow().clone();
        let view = Arc::new(MeshView::build(inputs, previous.as_deref()));
        view.expect(state.view.receiver_count());
        state.view.send_replace(Some(view.clone()));
        view.drained(DRAIN_WAIT).await;
        if generation.changed().await.is_err() {
            return;
        }
    }
}

impl MeshState {
    fn view_inputs(&self, generation: u64, ca: &crate::ca::CaManager) -> ViewInputs {
        let set = self.current_policies();
        let ca = ca.current();
        let mesh = MeshSettings {
            default_posture: set.mesh.default_posture.as_str().to_owned(),
            // An issuer whose keys were never read is left out: its tokens are refused.
            jwt_issuers: set
                .mesh
                .jwt_issuers
                .iter()
                .filter_map(|i| {
                    Some(moat_api::v1::JwtIssuer {
                        issuer: i.issuer.clone(),
                        jwks_json: self.jwks.get(&i.issuer)?,
                        algorithms: i.algorithms.iter().map(|a| a.as_str().to_owned()).collect(),
                        clock_skew_seconds: i.clock_skew.as_secs() as u32,
                    })
                })
                .collect(),
        };
        ViewInputs {
            generation,
            services: self.registry().services(),
            bundle_der: ca.bundle().roots().iter().map(|c| c.to_vec()).collect(),
            bundle_fingerprints: ca.bundle().fingerprints(),
            policies: set,
            mesh,
            revoked: self.revoked_lists(),
        }
    }
}

/// Keeps `state`'s policies in step with the store: reload on every change under `policies/`
/// or `meshconfig`.
pub async fn follow_policies(policies: Policies, state: Arc<MeshState>) {
    let (mut a, mut b) = policies.changes().await;
    loop {
        match policies.load().await {
            Ok(set) => {
                // Key sets first, so the snapshot that introduces an issuer carries its keys.
                state.jwks.sync(&set.mesh).await;
                state.set_policies(set);
            }
            Err(e) => tracing::error!(error = %e, "cannot load policies; keeping the previous set"),
        }
        // Any event, or a lag (which means events were missed), triggers a full reload.
        let more = tokio::select! {
            r = a.next() => !matches!(r, Ok(None)),
            r = b.next() => !matches!(r, Ok(None)),
        };
        if !more {
            return;
        }
    }
}

/// The most counters one report may carry.
const MAX_REPORTED_COUNTERS: usize = 10_000;

/// The most kinds of observed call one report may carry (the proxy keeps at most
/// `moat_proxy::observe::MAX_OBSERVED`).
const MAX_REPORTED_CALLS: usize = 4096;

/// The most edges one report may carry (a proxy keeps at most 1,024 callers).
const MAX_REPORTED_EDGES: usize = 1024;

/// Validates a report's edges.
fn edges_from_proto(r: &moat_api::v1::Report) -> Result<Vec<crate::registry::EdgeReport>, String> {
    if r.edges.len() > MAX_REPORTED_EDGES {
        return Err(format!(
            "{} edges; the limit is {MAX_REPORTED_EDGES}",
            r.edges.len()
        ));
    }
    let buckets = moat_metrics::EDGE_LATENCY_BOUNDS_MS.len() + 1;
    r.edges
        .iter()
        .map(|e| {
            if e.latency_buckets.len() != buckets {
                return Err(format!(
                    "an edge has {} latency buckets, not {buckets}",
                    e.latency_buckets.len()
                ));
            }
            if e.peer.len() > 2048
                || e.denied.len() > 64
                || e.denied.iter().any(|d| d.reason.len() > 64)
            {
                return Err("an edge's peer or denial reasons are too long".into());
            }
            Ok(crate::registry::EdgeReport {
                peer: e.peer.clone(),
                requests: e.requests,
                failures: e.failures,
                denied: e
                    .denied
                    .iter()
                    .map(|d| (d.reason.clone(), d.count))
                    .collect(),
                buckets: e.latency_buckets.clone(),
            })
        })
        .collect()
}

/// Validates a report's observed calls.
fn observed_from_proto(
    r: &moat_api::v1::Report,
) -> Result<Vec<(crate::registry::ObservedKey, u64)>, String> {
    if r.observed.len() > MAX_REPORTED_CALLS {
        return Err(format!(
            "{} observed calls; the limit is {MAX_REPORTED_CALLS}",
            r.observed.len()
        ));
    }
    r.observed
        .iter()
        .map(|c| {
            let port = u16::try_from(c.port).map_err(|_| format!("bad port {}", c.port))?;
            if c.peer.len() > 2048 || c.method.len() > 32 || c.path.len() > 8192 {
                return Err("an observed call's peer, method or path is too long".to_owned());
            }
            Ok((
                crate::registry::ObservedKey {
                    peer: c.peer.clone(),
                    port,
                    method: c.method.clone(),
                    path: c.path.clone(),
                },
                c.count,
            ))
        })
        .collect()
}

/// Validates a proxy's report.
fn hits_from_proto(r: moat_api::v1::Report) -> Result<Vec<crate::registry::RuleHits>, String> {
    if r.counters.len() > MAX_REPORTED_COUNTERS {
        return Err(format!(
            "{} counters; the limit is {MAX_REPORTED_COUNTERS}",
            r.counters.len()
        ));
    }
    r.counters
        .into_iter()
        .map(|c| {
            let decision = c
                .decision
                .parse::<moat_policy::eval::Effect>()
                .map_err(|e| e.to_string())?
                .as_str();
            let rule = match c.rule {
                -1 => None,
                r if r >= 0 => Some(r as u32),
                r => return Err(format!("bad rule index {r}")),
            };
            if c.policy.len() > 512 {
                return Err("policy name too long".into());
            }
            Ok(crate::registry::RuleHits {
                policy: c.policy,
                version: c.version,
                rule,
                decision,
                count: c.count,
            })
        })
        .collect()
}

/// Keeps the revocation lists in step with the store, and drops expired entries every minute.
pub async fn follow_revocations(
    revocations: crate::revocations::Revocations,
    state: Arc<MeshState>,
) {
    let mut changes = revocations.changes().await;
    loop {
        match revocations.list().await {
            Ok(list) => {
                let mut ids: Vec<String> = list
                    .iter()
                    .filter(|r| r.kind == crate::revocations::RevocationKind::Identity)
                    .map(|r| r.value.clone())
                    .collect();
                let mut serials: Vec<String> = list
                    .iter()
                    .filter(|r| r.kind == crate::revocations::RevocationKind::Serial)
                    .map(|r| r.value.clone())
                    .collect();
                ids.sort();
                serials.sort();
                let changed = {
                    let mut cur = state.revoked.write().unwrap_or_else(|e| e.into_inner());
                    let changed = *cur != (ids.clone(), serials.clone());
                    *cur = (ids, serials);
                    changed
                };
                if changed {
                    state.bump();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load revocations; keeping the previous list")
            }
        }
        tokio::select! {
            r = changes.next() => if matches!(r, Ok(None)) { return },
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// The Mesh service.
#[derive(Clone, Debug)]
pub struct MeshService {
    pub ca: Arc<crate::ca::CaManager>,
    pub state: Arc<MeshState>,
}

fn check_address(a: &str) -> Result<(), Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "announce.inbound_address {a:?} {why}: announce the host:port other sidecars can reach (set --advertise on the proxy)"
        ))
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("has no valid port")),
        Ok(_) => {}
    }
    if host.is_empty() || a.len() > 261 {
        return Err(bad("has no host"));
    }
    if let Ok(sa) = a.parse::<SocketAddr>()
        && sa.ip().is_unspecified()
    {
        return Err(bad("is a wildcard address"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Mesh for MeshService {
    type StreamStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Snapshot, Status>> + Send + 'static>,
    >;

    async fn stream(
        &self,
        req: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let Some((peer, remote)) = conn.and_then(|c| c.peer.map(|p| (p, c.remote))) else {
            return Err(Status::unauthenticated(
                "the mesh stream needs mutual TLS with the proxy's certificate",
            ));
        };
        let id = peer.verified.id.clone();
        let tls_serial = peer.verified.serial.clone();
        let mut inbound = req.into_inner();
        let announce = match tokio::time::timeout(ANNOUNCE_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(ProxyMessage {
                message: Some(proxy_message::Message::Announce(a)),
            }))) => a,
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::deadline_exceeded("no announce within 10 s")),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message on the mesh stream must be an announce",
                ));
            }
        };
        check_address(&announce.inbound_address)?;
        // The table the proxy holds from an earlier stream, if any: the first snapshot resends
        // only the buckets that differ.
        let resume = moat_wire::table::digests_from_proto(&announce.table_digests)
            .map_err(|e| Status::invalid_argument(format!("{e} (upgrade the proxy)")))?;
        // What the proxy says of its certificate must be what it proved: the registry (and
        // from it status, rotation gating and revocation bookkeeping) keeps only verified facts.
        if !announce.cert_serial.is_empty() && announce.cert_serial != peer.verified.serial {
            return Err(Status::invalid_argument(format!(
                "the announce names certificate {}, but this connection presented {}",
                announce.cert_serial, peer.verified.serial
            )));
        }
        if announce.cert_not_after_unix != 0
            && announce.cert_not_after_unix != peer.verified.not_after
        {
            return Err(Status::invalid_argument(format!(
                "the announce says the certificate expires at {}, but the one presented expires at {}",
                announce.cert_not_after_unix, peer.verified.not_after
            )));
        }
        let stream_id = self.state.next_stream.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        self.state.registry().upsert(
            stream_id,
            ProxyEntry {
                id: id.clone(),
                inbound_address: announce.inbound_address.clone(),
                proxy_version: announce.proxy_version.clone(),
                cert_serial: peer.verified.serial.clone(),
                cert_not_after: peer.verified.not_after,
                cert_issuer: peer.issuer_sha256.clone(),
                cert_refresh_after: announce.cert_refresh_after_unix,
                remote: remote.to_string(),
                connected_at: now,
                last_seen: now,
                applied_version: 0,
                last_error: None,
                sent: None,
                applied_policies: Vec::new(),
                applied_bundle: Vec::new(),
                hits: Vec::new(),
                observed: Default::default(),
                edges: Vec::new(),
                left: false,
            },
        );
        tracing::info!(%id, address = %announce.inbound_address, %remote, "proxy connected");
        if let Err(e) = self
            .state
            .store
            .put(&endpoint_key(&id, &announce.inbound_address), Vec::new())
            .await
        {
            tracing::warn!(error = %e, "cannot remember the endpoint");
        }
        // The first snapshot comes from a view that already holds this proxy's endpoint.
        let joined = self.state.bump();
        let address = announce.inbound_address.clone();

        // One message in flight per stream: while the proxy is slow to take it, later changes
        // fold into the next diff instead of queueing. Boxed: the channel's slots are
        // allocated in blocks, and 10,000 streams' worth of whole snapshots add up.
        let (tx, rx) = mpsc::channel::<Box<Snapshot>>(1);
        let svc = self.clone();
        tokio::spawn(async move {
            let mut views = svc.state.view.subscribe();
            let mut last: Option<Sent> = None;
            loop {
                // A stream whose certificate is revoked now ends; the proxy's reconnection is
                // refused by the caller check.
                if svc.state.is_revoked(&id, Some(&tls_serial)) {
                    tracing::info!(%id, serial = %tls_serial, "closing the mesh stream of a revoked certificate");
                    break;
                }
                let view = views.borrow_and_update().clone();
                let early = |v: &MeshView| last.is_none() && v.generation < joined;
                if let Some(view) = view.as_ref().filter(|v| early(v)) {
                    view.handled();
                } else if let Some(view) = view {
                    let policies = view.policies_for(&id);
                    let rotation = svc.state.rotation_of(&id);
                    let taps = svc.state.taps.filters_for(&id);
                    let base = match (&last, &resume) {
                        (Some(sent), _) => Base::Sent(sent),
                        (None, Some(digests)) => Base::Announced(digests),
                        (None, None) => Base::Nothing,
                    };
                    match next_snapshot(base, &view, policies, rotation, &taps) {
                        Some(snap) => {
                            if last.is_none() {
                                svc.state.first_snapshots.count(&snap);
                                if resume.is_some() {
                                    tracing::info!(%id, buckets_resent = snap.services_reset_buckets.len(), services = snap.services.len(), "resumed the proxy's service table");
                                }
                            }
                            svc.state.record_sent(stream_id, &snap, &view);
                            let mut gone = false;
                            for part in into_parts(snap, PART_BUDGET) {
                                gone = tx.send(Box::new(part)).await.is_err();
                                if gone {
                                    break;
                                }
                            }
                            view.handled();
                            if gone {
                                break;
                            }
                            last = Some(Sent {
                                policies: policies.to_vec(),
                                view,
                                rotation,
                                taps,
                            });
                        }
                        // Nothing this proxy needs changed: diff the next view against this one
                        // (and let the older one go).
                        None => {
                            view.handled();
                            if let Some(last) = last.as_mut() {
                                last.view = view;
                            }
                        }
                    }
                }
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { break },
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => svc.on_message(stream_id, &id, m),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(%id, error = %e, "mesh stream failed");
                            break;
                        }
                    },
                    () = tx.closed() => break,
                }
            }
            let elsewhere = {
                let mut reg = svc.state.registry();
                reg.remove(stream_id);
                reg.serves_elsewhere(stream_id, &id, &address)
            };
            if !elsewhere {
                let forget = moat_store::Txn {
                    success: vec![moat_store::Op::Delete(endpoint_key(&id, &address))],
                    ..moat_store::Txn::default()
                };
                if let Err(e) = svc.state.store.txn(forget).await {
                    tracing::warn!(error = %e, "cannot forget the endpoint");
                }
            }
            svc.state.bump();
            tracing::info!(%id, "proxy disconnected");
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|part| Ok(*part)),
        )))
    }
}

impl MeshState {
    /// Notes what a stream's newest snapshot held, to learn what the proxy applied when it
    /// acknowledges it.
    fn record_sent(&self, stream: u64, snap: &Snapshot, view: &MeshView) {
        let policies = snap
            .policies
            .iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), p.version))
            .collect();
        if let Some(e) = self.registry().get_mut(stream) {
            e.sent = Some(crate::registry::SentSnapshot {
                version: snap.version,
                policies,
                bundle: view.bundle_fingerprints.clone(),
            });
        }
    }
}

impl MeshService {
    /// The facts of the certificate an ack reports, from the chain it carries.
    fn verify_renewed(
        &self,
        id: &SpiffeId,
        ack: &moat_api::v1::Ack,
    ) -> Result<(moat_identity::VerifiedPeer, String), String> {
        let chain: Vec<rustls_pki_types::CertificateDer<'_>> = ack
            .cert_chain_der
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
            .collect();
        let ca = self.ca.current();
        let verified = moat_identity::verify::verify_chain(
            &chain,
            ca.bundle(),
            ca.trust_domain(),
            rustls_pki_types::UnixTime::now(),
            moat_identity::verify::Usage::Client,
        )
        .map_err(|e| format!("the acknowledged certificate does not verify: {e}"))?;
        if &verified.id != id || verified.serial != ack.cert_serial {
            return Err(format!(
                "the acknowledged chain is {} serial {}, not {id} serial {}",
                verified.id, verified.serial, ack.cert_serial
            ));
        }
        let issuer = ack
            .cert_chain_der
            .get(1)
            .map(|c| moat_identity::bundle::sha256_hex(c))
            .unwrap_or_default();
        Ok((verified, issuer))
    }

    fn on_message(&self, stream: u64, id: &SpiffeId, m: ProxyMessage) {
        if let Some(proxy_message::Message::Tap(batch)) = m.message {
            let proxy = self
                .state
                .registry()
                .get_mut(stream)
                .map(|e| e.inbound_address.clone())
                .unwrap_or_default();
            if self.state.taps.deliver(id, &proxy, batch) {
                self.state.bump();
            }
            return;
        }
        let mut reg = self.state.registry();
        let Some(entry) = reg.get_mut(stream) else {
            return;
        };
        entry.last_seen = SystemTime::now();
        match m.message {
            Some(proxy_message::Message::Ack(ack)) => {
                if ack.applied {
                    entry.applied_version = ack.version;
                    entry.last_error = None;
                    if let Some(sent) = &entry.sent
                        && sent.version == ack.version
                    {
                        entry.applied_policies = sent.policies.clone();
                        entry.applied_bundle = sent.bundle.clone();
                    }
                } else {
                    tracing::warn!(%id, version = ack.version, error = %ack.error, "proxy refused a snapshot");
                    entry.last_error = Some(ack.error.clone());
                }
                if !ack.cert_serial.is_empty() {
                    entry.cert_refresh_after = ack.cert_refresh_after_unix;
                }
                if !ack.cert_serial.is_empty() && ack.cert_serial != entry.cert_serial {
                    // A renewed certificate counts once the proxy shows it: a chain that
                    // verifies under the mesh's roots, for this identity, with that serial.
                    match self.verify_renewed(id, &ack) {
                        Ok((verified, issuer)) => {
                            entry.cert_serial = verified.serial;
                            entry.cert_not_after = verified.not_after;
                            entry.cert_issuer = issuer;
                        }
                        Err(why) => {
                            tracing::warn!(%id, serial = %ack.cert_serial, error = %why, "ignored a certificate the proxy did not prove");
                            entry.last_error = Some(why);
                        }
                    }
                }
            }
            Some(proxy_message::Message::Report(r)) => {
                match (
                    observed_from_proto(&r),
                    edges_from_proto(&r),
                    hits_from_proto(r),
                ) {
                    (Ok(observed), Ok(edges), Ok(hits)) => {
                        entry.hits = hits;
                        entry.edges = edges;
                        entry.observe(observed, moat_identity::clock::unix_now());
                    }
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        tracing::warn!(%id, error = %e, "ignored a malformed report")
                    }
                }
            }
            Some(proxy_message::Message::Leave(_)) => {
                tracing::info!(%id, "proxy is leaving (shutting down)");
                entry.left = true;
            }
            Some(proxy_message::Message::Announce(_) | proxy_message::Message::Tap(_)) | None => {
                tracing::warn!(%id, "unexpected message on the mesh stream; ignored");
            }
        }
    }
}
