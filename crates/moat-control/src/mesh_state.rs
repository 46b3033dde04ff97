//! The mesh's live state on this replica: the proxies connected here and elsewhere (the
//! registry), the policies, revocations, rotation commands, key sets and taps in force, and the
//! views built from them. Everything in it follows the store (`mesh_follow`); a change moves the
//! generation on, [`publish_views`] turns the newest generation into one shared
//! [`MeshView`], and each stream (`mesh_svc`) diffs its proxy's snapshot from that. Nothing here
//! speaks gRPC.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use moat_api::v1::{MeshSettings, Snapshot};
use moat_identity::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

use crate::mesh_view::{MeshView, ViewInputs};
use crate::policies::PolicySet;
use crate::registry::{ProxyEntry, Registry};

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
    pub jwks: crate::key_sets::KeySets,
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
    pub fn count(&self, snap: &Snapshot) {
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
            jwks: crate::key_sets::KeySets::default(),
            revoked: RwLock::new((Vec::new(), Vec::new())),
            taps: crate::tap::Taps::default(),
            view: watch::channel(None).0,
            first_snapshots: FirstSnapshots::default(),
        })
    }

    /// A new stream's number (registry key).
    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The newest view, and each one after it.
    pub fn views(&self) -> watch::Receiver<Option<Arc<MeshView>>> {
        self.view.subscribe()
    }

    /// A proxy's stream opened: it is in the registry. Returns the generation from which views
    /// list it. A proxy the service table lists already (it moved here from a replica that
    /// died, or its previous stream is still open) changes no view: nothing is bumped, so a
    /// storm of reconnections does not wake every stream for each of them (the fleet summaries
    /// still go out within `fleet`'s publishing period).
    ///
    /// With `per_host`, a proxy whose identity already has that many streams here from the same
    /// source address is not joined: `Err` with the count.
    pub fn join(
        &self,
        stream: u64,
        entry: ProxyEntry,
        per_host: Option<(std::net::IpAddr, usize)>,
    ) -> Result<u64, usize> {
        let listed = {
            let mut reg = self.registry();
            if let Some((host, max)) = per_host {
                let open = reg.streams_from(&entry.id, host);
                if open >= max {
                    return Err(open);
                }
            }
            let listed = reg.lists(&entry.id, &entry.inbound_address);
            reg.upsert(stream, entry);
            listed
        };
        Ok(if listed {
            *self.generation.borrow()
        } else {
            self.bump()
        })
    }

    /// Remembers a served proxy's endpoint in the store, for the tables served while a
    /// restarted control plane warms up. Called once its first snapshot is sent, so that a
    /// reconnecting proxy does not wait for the store's write.
    pub async fn remember(&self, id: &SpiffeId, address: &str) {
        if let Err(e) = self.store.put(&endpoint_key(id, address), Vec::new()).await {
            tracing::warn!(error = %e, "cannot remember the endpoint");
        }
    }

    /// A proxy's stream ended: out of the registry, and its endpoint forgotten unless another
    /// of its streams (here or on another replica) still serves it.
    pub async fn leave(&self, stream: u64, id: &SpiffeId, address: &str) {
        let elsewhere = {
            let mut reg = self.registry();
            reg.remove(stream);
            reg.serves_elsewhere(stream, id, address)
        };
        if !elsewhere {
            let forget = moat_store::Txn {
                success: vec![moat_store::Op::Delete(endpoint_key(id, address))],
                ..moat_store::Txn::default()
            };
            if let Err(e) = self.store.txn(forget).await {
                tracing::warn!(error = %e, "cannot forget the endpoint");
            }
        }
        self.bump();
    }

    /// Sets the revoked identities and serials (each sorted); returns whether they changed.
    pub fn set_revoked(&self, ids: Vec<String>, serials: Vec<String>) -> bool {
        let mut cur = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        let changed = cur.0 != ids || cur.1 != serials;
        *cur = (ids, serials);
        changed
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
    pub fn rotation_of(&self, id: &SpiffeId) -> u64 {
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

/// The longest a new view waits for streams still busy with the previous one (a proxy that
/// reads slowly must not hold up the rest of the mesh).
const DRAIN_WAIT: Duration = Duration::from_millis(100);

/// Builds a [`MeshView`] for the newest generation whenever it moves on. Changes that arrive
/// while a view is built, or while the streams are still sending the previous one, are folded
/// into the next, so a burst of changes (thousands of proxies connecting) costs a few builds and
/// broadcasts, not one per change.
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
            cipher_preference: set.mesh.cipher_preference.as_str().to_owned(),
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

impl MeshState {
    /// Notes what a stream's newest snapshot held, to learn what the proxy applied when it
    /// acknowledges it.
    pub fn record_sent(&self, stream: u64, snap: &Snapshot, view: &MeshView) {
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::mesh_view::{Base, next_snapshot};

    async fn state() -> (tempfile::TempDir, Arc<MeshState>, Arc<crate::ca::CaManager>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn moat_store::Store> =
            Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let td: moat_identity::TrustDomain = "example.org".parse().unwrap();
        let (kek, _) = moat_ca::Kek::generate().unwrap();
        let (ca, _) = moat_ca::CertificateAuthority::generate(&td, &kek).unwrap();
        let ca = Arc::new(crate::ca::CaManager::new(ca, kek, store.clone()));
        let replica = crate::replica::Replica::join(store.clone(), "cp:7443".into())
            .await
            .unwrap();
        let state = MeshState::new(PolicySet::default(), store, replica);
        (dir, state, ca)
    }

    fn sid(name: &str) -> SpiffeId {
        format!("spiffe://example.org/ns/shop/sa/{name}")
            .parse()
            .unwrap()
    }

    fn entry(name: &str, address: &str) -> ProxyEntry {
        ProxyEntry::connected(
            sid(name),
            address.into(),
            "127.0.0.1:1".into(),
            SystemTime::now(),
        )
    }

    /// The newest view at or past `generation`.
    async fn view_at(
        views: &mut watch::Receiver<Option<Arc<MeshView>>>,
        generation: u64,
    ) -> Arc<MeshView> {
        let v = views
            .wait_for(|v| v.as_ref().is_some_and(|v| v.generation >= generation))
            .await
            .unwrap();
        let v = v.clone().unwrap();
        v.handled();
        v
    }

    /// How many endpoints the store remembers.
    async fn remembered(state: &MeshState) -> usize {
        state
            .store()
            .range("endpoints/", 0, false)
            .await
            .unwrap()
            .len()
    }

    #[tokio::test]
    async fn an_identity_gets_a_bounded_number_of_streams_from_one_address() {
        let (_dir, state, _ca) = state().await;
        let host: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        for n in 0..3 {
            let address = format!("127.0.0.1:{}", 7000 + n);
            state
                .join(n, entry("orders", &address), Some((host, 3)))
                .unwrap();
        }
        assert_eq!(
            state.join(9, entry("orders", "127.0.0.1:7009"), Some((host, 3))),
            Err(3)
        );
        // Another identity at the same address has its own count; a stream that leaves frees
        // its place.
        state
            .join(10, entry("payments", "127.0.0.1:7010"), Some((host, 3)))
            .unwrap();
        state.leave(0, &sid("orders"), "127.0.0.1:7000").await;
        state
            .join(11, entry("orders", "127.0.0.1:7011"), Some((host, 3)))
            .unwrap();
    }

    #[tokio::test]
    async fn joins_leaves_and_revocations_reach_the_views_in_order() {
        let (_dir, state, ca) = state().await;
        let mut views = state.views();
        tokio::spawn(publish_views(state.clone(), ca));

        let g = state
            .join(1, entry("orders", "10.0.0.1:7143"), None)
            .unwrap();
        state
            .join(2, entry("orders", "10.0.0.2:7143"), None)
            .unwrap();
        let g2 = state
            .join(3, entry("payments", "10.0.0.3:7143"), None)
            .unwrap();
        assert!(g2 > g);
        let v = view_at(&mut views, g2).await;
        let first = next_snapshot(Base::Nothing, &v, &[], 0, &[]).unwrap();
        let table: Vec<(&str, usize)> = first
            .services
            .iter()
            .map(|s| (s.spiffe_id.as_str(), s.endpoints.len()))
            .collect();
        assert_eq!(
            table,
            [
                ("spiffe://example.org/ns/shop/sa/orders", 2),
                ("spiffe://example.org/ns/shop/sa/payments", 1)
            ]
        );
        assert!(v.lists(&sid("payments"), "10.0.0.3:7143"));
        assert!(!v.lists(&sid("payments"), "10.0.0.1:7143"));
        // The endpoints are remembered for the next start's warm-up (once served).
        for (id, address) in [
            ("orders", "10.0.0.1:7143"),
            ("orders", "10.0.0.2:7143"),
            ("payments", "10.0.0.3:7143"),
        ] {
            state.remember(&sid(id), address).await;
        }
        assert_eq!(remembered(&state).await, 3);
        // A second stream for an endpoint the table lists changes no view; its leaving keeps
        // the endpoint (the first stream still serves it).
        assert_eq!(
            state.join(4, entry("orders", "10.0.0.1:7143"), None),
            Ok(g2)
        );
        state.leave(4, &sid("orders"), "10.0.0.1:7143").await;
        assert_eq!(remembered(&state).await, 3);

        // One orders proxy leaves: the next view changes only that service.
        state.leave(2, &sid("orders"), "10.0.0.2:7143").await;
        let g3 = state.bump();
        let v3 = view_at(&mut views, g3).await;
        let sent = crate::mesh_view::Sent {
            view: v,
            policies: Vec::new(),
            rotation: 0,
            taps: Vec::new(),
        };
        let delta = next_snapshot(Base::Sent(&sent), &v3, &[], 0, &[]).unwrap();
        assert!(delta.services_incremental);
        assert_eq!(delta.services.len(), 1);
        assert_eq!(delta.services[0].endpoints, ["10.0.0.1:7143"]);
        assert_eq!(remembered(&state).await, 2);

        // A revocation is in force at once and reaches the next view.
        assert!(state.set_revoked(vec![sid("payments").to_string()], Vec::new()));
        assert!(!state.set_revoked(vec![sid("payments").to_string()], Vec::new()));
        assert!(state.is_revoked(&sid("payments"), None));
        let g4 = state.bump();
        let v4 = view_at(&mut views, g4).await;
        assert_eq!(v4.revoked_identities, [sid("payments").to_string()]);
    }
}
