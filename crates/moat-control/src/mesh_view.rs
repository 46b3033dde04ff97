//! What every proxy's snapshot is made of, computed once per change rather than once per stream.
//!
//! A change (a proxy joins or leaves, a policy or the CA or a revocation changes) moves the
//! mesh generation on; one task turns the newest generation into a [`MeshView`] — changes that
//! arrive while it builds are folded into the next build — and every stream diffs the new view
//! against the one it last sent ([`next_snapshot`]). The service table is shared between views
//! entry by entry (an unchanged service keeps its `Arc`), so a stream finds what changed by
//! pointer and sends only that: with 10,000 proxies, one joining costs each stream one service,
//! not the whole table.
//!
//! A proxy that reconnects (after a replica died, say) announces the digests of the table it
//! holds ([`moat_wire::table`]); its first snapshot then carries only the buckets whose digest
//! differs from this view's, so a replica's death does not make the survivors resend the whole
//! table to each of its proxies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use moat_api::v1::{MeshSettings, Policy, Service, Snapshot};
use moat_identity::SpiffeId;
use moat_wire::table::{self, BUCKETS, BucketDigest, bucket_of};
use tokio::sync::Notify;

use crate::policies::PolicySet;

/// Everything the snapshots of one generation are made of.
#[derive(Debug)]
pub struct MeshView {
    /// The mesh generation this view was built at; snapshots carry it as their version.
    pub generation: u64,
    /// Service identity → its table entry.
    pub services: BTreeMap<SpiffeId, Arc<Service>>,
    /// The same entries by table bucket, and each bucket's digest.
    buckets: Vec<Vec<Arc<Service>>>,
    digests: Vec<BucketDigest>,
    pub bundle_der: Vec<Vec<u8>>,
    pub bundle_fingerprints: Vec<String>,
    pub policies: Arc<PolicySet>,
    /// `policies` in wire form by target, converted once per policy change.
    by_target: Arc<HashMap<SpiffeId, Vec<Policy>>>,
    pub mesh: MeshSettings,
    pub revoked_identities: Vec<String>,
    pub revoked_serials: Vec<String>,
    /// What the last builds changed, oldest first, for streams that are a few views behind.
    history: Vec<Build>,
    /// Streams that have not dealt with this view yet (counted when it is published).
    pending: AtomicUsize,
    drained: Notify,
}

/// One build's effect on the service table.
#[derive(Debug, Clone)]
struct Build {
    /// The generation of the view it started from, and of the view it made.
    from: u64,
    to: u64,
    /// Services added, changed or removed.
    changed: Arc<Vec<SpiffeId>>,
}

/// How many builds a view remembers.
const HISTORY: usize = 64;

/// The inputs of a view, as read from the mesh state at one generation.
#[derive(Debug)]
pub struct ViewInputs {
    pub generation: u64,
    pub services: BTreeMap<SpiffeId, Vec<String>>,
    pub bundle_der: Vec<Vec<u8>>,
    pub bundle_fingerprints: Vec<String>,
    pub policies: Arc<PolicySet>,
    pub mesh: MeshSettings,
    pub revoked: (Vec<String>, Vec<String>),
}

impl MeshView {
    /// Builds a view, reusing `previous`'s entry for every service whose endpoints are unchanged.
    pub fn build(inputs: ViewInputs, previous: Option<&MeshView>) -> MeshView {
        let mut changed = Vec::new();
        let services: BTreeMap<SpiffeId, Arc<Service>> = inputs
            .services
            .into_iter()
            .map(|(id, endpoints)| {
                let entry = match previous.and_then(|p| p.services.get(&id)) {
                    Some(old) if old.endpoints == endpoints => old.clone(),
                    _ => {
                        changed.push(id.clone());
                        Arc::new(Service {
                            spiffe_id: id.to_string(),
                            endpoints,
                        })
                    }
                };
                (id, entry)
            })
            .collect();
        let mut history = Vec::new();
        if let Some(p) = previous {
            changed.extend(
                p.services
                    .keys()
                    .filter(|id| !services.contains_key(*id))
                    .cloned(),
            );
        }
        let (buckets, digests) = match previous {
            Some(p) => rebucket(p, &services, &changed),
            None => by_bucket(&services),
        };
        if let Some(p) = previous {
            let keep = p.history.len().saturating_sub(HISTORY - 1);
            history.extend_from_slice(&p.history[keep..]);
            history.push(Build {
                from: p.generation,
                to: inputs.generation,
                changed: Arc::new(changed),
            });
        }
        let by_target = match previous {
            Some(p) if Arc::ptr_eq(&p.policies, &inputs.policies) => p.by_target.clone(),
            _ => {
                let mut map: HashMap<SpiffeId, Vec<Policy>> = HashMap::new();
                for p in &inputs.policies.policies {
                    map.entry(p.target.clone())
                        .or_default()
                        .push(moat_wire::policy_to_proto(p));
                }
                Arc::new(map)
            }
        };
        MeshView {
            generation: inputs.generation,
            services,
            buckets,
            digests,
            bundle_der: inputs.bundle_der,
            bundle_fingerprints: inputs.bundle_fingerprints,
            policies: inputs.policies,
            by_target,
            mesh: inputs.mesh,
            revoked_identities: inputs.revoked.0,
            revoked_serials: inputs.revoked.1,
            history,
            pending: AtomicUsize::new(0),
            drained: Notify::new(),
        }
    }

    /// Sets how many streams are to deal with this view (before publishing it).
    pub fn expect(&self, streams: usize) {
        self.pending.store(streams, Ordering::SeqCst);
    }

    /// A stream has dealt with this view (sent its snapshot, or found nothing to send).
    pub fn handled(&self) {
        if self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            == Ok(1)
        {
            self.drained.notify_one();
        }
    }

    /// Waits until every stream expected has dealt with this view, or `limit` passed. Building
    /// the next view only then batches the changes that arrive meanwhile: under a burst the
    /// builds follow the pace at which the streams take them.
    pub async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let woken = self.drained.notified();
                if self.pending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                woken.await;
            }
        })
        .await;
    }

    /// The services `self` changed since `old` (whether or not it was built from it): those
    /// added or changed, and the identities removed.
    fn changes_since(&self, old: &MeshView) -> (Vec<Service>, Vec<String>) {
        if old.generation == self.generation {
            return (Vec::new(), Vec::new());
        }
        // Usually `old` is one of the last builds: only the services they touched can differ.
        if let Some(start) = self.history.iter().position(|b| b.from == old.generation)
            && self.history.last().is_some_and(|b| b.to == self.generation)
        {
            let mut touched: Vec<&SpiffeId> = self.history[start..]
                .iter()
                .flat_map(|b| b.changed.iter())
                .collect();
            touched.sort();
            touched.dedup();
            let (mut changed, mut removed) = (Vec::new(), Vec::new());
            for id in touched {
                match (old.services.get(id), self.services.get(id)) {
                    (Some(o), Some(n)) if Arc::ptr_eq(o, n) => {}
                    (_, Some(n)) => changed.push(Service::clone(n)),
                    (Some(_), None) => removed.push(id.to_string()),
                    (None, None) => {}
                }
            }
            return (changed, removed);
        }
        diff(&old.services, &self.services)
    }
}

/// `services` cut into table buckets, each in byte order of the IDs, with its digest.
fn by_bucket(
    services: &BTreeMap<SpiffeId, Arc<Service>>,
) -> (Vec<Vec<Arc<Service>>>, Vec<BucketDigest>) {
    let mut buckets = vec![Vec::new(); BUCKETS];
    for s in services.values() {
        buckets[bucket_of(&s.spiffe_id)].push(s.clone());
    }
    let digests = buckets.iter_mut().map(|b| sort_and_digest(b)).collect();
    (buckets, digests)
}

/// [`by_bucket`] for a view built from `previous`, where only the services in `changed` (added,
/// changed or removed) differ: every other bucket, and its digest, is `previous`'s.
fn rebucket(
    previous: &MeshView,
    services: &BTreeMap<SpiffeId, Arc<Service>>,
    changed: &[SpiffeId],
) -> (Vec<Vec<Arc<Service>>>, Vec<BucketDigest>) {
    // Each changed ID in its wire form, from the entry that has it (the new one, or the old one
    // of a removed service), with its new entry if it has one.
    type Touched<'a> = (&'a str, Option<&'a Arc<Service>>);
    let mut by_bucket: Vec<Vec<Touched<'_>>> = vec![Vec::new(); BUCKETS];
    for id in changed {
        let now = services.get(id);
        if let Some(entry) = now.or_else(|| previous.services.get(id)) {
            let name = entry.spiffe_id.as_str();
            by_bucket[bucket_of(name)].push((name, now));
        }
    }
    let mut buckets = previous.buckets.clone();
    let mut digests = previous.digests.clone();
    for (b, touched) in by_bucket.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        let gone: HashSet<&str> = touched.iter().map(|(name, _)| *name).collect();
        let mut now: Vec<Arc<Service>> = previous.buckets[b]
            .iter()
            .filter(|s| !gone.contains(s.spiffe_id.as_str()))
            .cloned()
            .collect();
        now.extend(touched.iter().filter_map(|(_, entry)| entry.cloned()));
        digests[b] = sort_and_digest(&mut now);
        buckets[b] = now;
    }
    (buckets, digests)
}

/// Sorts one bucket by ID and returns its digest.
fn sort_and_digest(bucket: &mut [Arc<Service>]) -> BucketDigest {
    table::sort_and_digest(bucket, |s| (s.spiffe_id.as_str(), s.endpoints.as_slice()))
}

impl MeshView {
    /// Whether the service table lists `address` as an endpoint of `id`.
    pub fn lists(&self, id: &SpiffeId, address: &str) -> bool {
        self.services
            .get(id)
            .is_some_and(|s| s.endpoints.iter().any(|e| e == address))
    }

    /// The policies protecting `target`, in wire form.
    pub fn policies_for(&self, target: &SpiffeId) -> &[Policy] {
        self.by_target.get(target).map_or(&[], Vec::as_slice)
    }
}

/// What a stream last sent, to diff the next view against.
#[derive(Debug)]
pub struct Sent {
    pub view: Arc<MeshView>,
    pub policies: Vec<Policy>,
    pub rotation: u64,
    pub taps: Vec<moat_api::v1::TapFilter>,
}

/// What a stream's next snapshot builds on.
#[derive(Clone, Copy, Debug)]
pub enum Base<'a> {
    /// Nothing: the first snapshot of a stream whose proxy holds no table.
    Nothing,
    /// The first snapshot of a stream whose proxy holds a table with these bucket digests.
    Announced(&'a [BucketDigest]),
    /// What this stream sent last.
    Sent(&'a Sent),
}

/// The snapshot that brings a proxy from `base` to `view`, with its identity's `policies`,
/// rotation generation and open `taps`; `None` when nothing it needs changed.
pub fn next_snapshot(
    base: Base<'_>,
    view: &MeshView,
    policies: &[Policy],
    rotation: u64,
    taps: &[moat_api::v1::TapFilter],
) -> Option<Snapshot> {
    let mut services_reset_buckets = Vec::new();
    let (services, services_removed, services_incremental) = match base {
        Base::Nothing => (
            view.services.values().map(|s| (**s).clone()).collect(),
            Vec::new(),
            false,
        ),
        Base::Announced(digests) => {
            let mut services = Vec::new();
            for (b, entries) in view.buckets.iter().enumerate() {
                if digests.get(b) != view.digests.get(b) {
                    services_reset_buckets.push(b as u32);
                    services.extend(entries.iter().map(|s| Service::clone(s)));
                }
            }
            (services, Vec::new(), true)
        }
        Base::Sent(last) => {
            let (changed, removed) = view.changes_since(&last.view);
            let same = changed.is_empty()
                && removed.is_empty()
                && last.policies == policies
                && last.rotation == rotation
                && last.taps == taps
                && last.view.bundle_fingerprints == view.bundle_fingerprints
                && last.view.mesh == view.mesh
                && last.view.revoked_identities == view.revoked_identities
                && last.view.revoked_serials == view.revoked_serials;
            if same {
                return None;
            }
            (changed, removed, true)
        }
    };
    Some(Snapshot {
        version: view.generation,
        trust_bundle_der: view.bundle_der.clone(),
        policies: policies.to_vec(),
        mesh: Some(view.mesh.clone()),
        services,
        rotate_generation: rotation,
        revoked_identities: view.revoked_identities.clone(),
        revoked_serials: view.revoked_serials.clone(),
        services_incremental,
        services_removed,
        continued: false,
        taps: taps.to_vec(),
        services_reset_buckets,
    })
}

/// How many bytes of service changes one message carries at most (a single larger service
/// still goes whole).
pub const PART_BUDGET: usize = 4096;

/// Cuts `snap` into messages whose service changes fit `budget` bytes: every part but the last
/// is `continued` and carries only service changes; the last carries the rest.
pub fn into_parts(mut snap: Snapshot, budget: usize) -> Vec<Snapshot> {
    use prost::Message as _;
    let mut parts = Vec::new();
    // The first part starts the table (or resets the buckets that differ) before any service.
    let mut part = Snapshot {
        version: snap.version,
        services_incremental: snap.services_incremental,
        services_reset_buckets: std::mem::take(&mut snap.services_reset_buckets),
        continued: true,
        ..Snapshot::default()
    };
    let mut size = 0;
    let mut cut = |part: &mut Snapshot, size: &mut usize, add: usize| {
        if *size > 0 && *size + add > budget {
            let next = Snapshot {
                version: snap.version,
                services_incremental: true,
                continued: true,
                ..Snapshot::default()
            };
            parts.push(std::mem::replace(part, next));
            *size = 0;
        }
        *size += add;
    };
    for id in std::mem::take(&mut snap.services_removed) {
        cut(&mut part, &mut size, id.len() + 4);
        part.services_removed.push(id);
    }
    for svc in std::mem::take(&mut snap.services) {
        cut(&mut part, &mut size, svc.encoded_len() + 4);
        part.services.push(svc);
    }
    // The last part: its own share of the services and everything else.
    snap.services = part.services;
    snap.services_removed = part.services_removed;
    snap.services_incremental = part.services_incremental;
    snap.services_reset_buckets = part.services_reset_buckets;
    parts.push(snap);
    parts
}

/// The services of `new` that are not the same entry in `old`, and the identities of `old` that
/// `new` lacks. Both maps are sorted, so this is one merge pass with pointer comparisons.
fn diff(
    old: &BTreeMap<SpiffeId, Arc<Service>>,
    new: &BTreeMap<SpiffeId, Arc<Service>>,
) -> (Vec<Service>, Vec<String>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((oid, _)), None) => {
                removed.push(oid.to_string());
                o.next();
            }
            (None, Some((_, ns))) => {
                changed.push(Service::clone(ns));
                n.next();
            }
            (Some((oid, os)), Some((nid, ns))) => match oid.cmp(nid) {
                std::cmp::Ordering::Less => {
                    removed.push(oid.to_string());
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push(Service::clone(ns));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(os, ns) {
                        changed.push(Service::clone(ns));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_wire::table::ServiceTable;

    fn sid(name: &str) -> SpiffeId {
        format!("spiffe://example.org/ns/default/sa/{name}")
            .parse()
            .unwrap()
    }

    fn inputs(generation: u64, services: &[(&str, &[&str])]) -> ViewInputs {
        ViewInputs {
            generation,
            services: services
                .iter()
                .map(|(n, eps)| (sid(n), eps.iter().map(|e| e.to_string()).collect()))
                .collect(),
            bundle_der: vec![vec![1, 2, 3]],
            bundle_fingerprints: vec!["aa".into()],
            policies: Arc::new(PolicySet::default()),
            mesh: MeshSettings::default(),
            revoked: (Vec::new(), Vec::new()),
        }
    }

    fn sent(view: MeshView) -> Sent {
        Sent {
            view: Arc::new(view),
            policies: Vec::new(),
            rotation: 0,
            taps: Vec::new(),
        }
    }

    #[test]
    fn a_view_built_on_the_last_has_the_buckets_of_one_built_from_nothing() {
        // Each build adds, changes and removes services; the buckets it carries over must be
        // exactly what sorting the whole table again gives.
        let names: Vec<String> = (0..300).map(|i| format!("svc-{i:03}")).collect();
        let table = |step: usize| -> Vec<(String, Vec<String>)> {
            names
                .iter()
                .enumerate()
                .filter(|(i, _)| !(i + step).is_multiple_of(7))
                .map(|(i, n)| {
                    let eps = (0..1 + (i * step) % 3)
                        .map(|k| format!("10.0.{k}.{}:8443", (i + step) % 5))
                        .collect();
                    (n.clone(), eps)
                })
                .collect()
        };
        let mut last: Option<MeshView> = None;
        for step in 0..6 {
            let t = table(step);
            let pairs: Vec<(&str, Vec<&str>)> = t
                .iter()
                .map(|(n, e)| (n.as_str(), e.iter().map(String::as_str).collect()))
                .collect();
            let refs: Vec<(&str, &[&str])> =
                pairs.iter().map(|(n, e)| (*n, e.as_slice())).collect();
            let built = MeshView::build(inputs(step as u64 + 1, &refs), last.as_ref());
            let fresh = MeshView::build(inputs(step as u64 + 1, &refs), None);
            assert_eq!(built.digests, fresh.digests, "step {step}");
            let ids = |v: &MeshView| -> Vec<Vec<String>> {
                v.buckets
                    .iter()
                    .map(|b| b.iter().map(|s| format!("{s:?}")).collect())
                    .collect()
            };
            assert_eq!(ids(&built), ids(&fresh), "step {step}");
            last = Some(built);
        }
    }

    #[test]
    fn the_first_snapshot_is_the_whole_table() {
        let v = MeshView::build(
            inputs(3, &[("a", &["10.0.0.1:1"]), ("b", &["10.0.0.2:1"])]),
            None,
        );
        let s = next_snapshot(Base::Nothing, &v, &[], 0, &[]).unwrap();
        assert!(!s.services_incremental);
        assert_eq!(s.version, 3);
        assert_eq!(s.services.len(), 2);
    }

    #[test]
    fn later_snapshots_carry_only_what_changed() {
        let v1 = MeshView::build(
            inputs(
                1,
                &[
                    ("a", &["10.0.0.1:1"]),
                    ("b", &["10.0.0.2:1"]),
                    ("c", &["10.0.0.3:1"]),
                ],
            ),
            None,
        );
        let v2 = MeshView::build(
            inputs(
                2,
                &[
                    ("a", &["10.0.0.1:1"]),
                    ("b", &["10.0.0.2:1", "10.0.0.9:1"]),
                    ("d", &["10.0.0.4:1"]),
                ],
            ),
            Some(&v1),
        );
        assert!(Arc::ptr_eq(
            &v1.services[&sid("a")],
            &v2.services[&sid("a")]
        ));
        let s = next_snapshot(Base::Sent(&sent(v1)), &v2, &[], 0, &[]).unwrap();
        assert!(s.services_incremental);
        let ids: Vec<_> = s.services.iter().map(|s| s.spiffe_id.as_str()).collect();
        assert_eq!(ids, [sid("b").to_string(), sid("d").to_string()]);
        assert_eq!(s.services[0].endpoints, ["10.0.0.2:1", "10.0.0.9:1"]);
        assert_eq!(s.services_removed, [sid("c").to_string()]);
        // The rest is complete in every snapshot.
        assert_eq!(s.trust_bundle_der, [vec![1, 2, 3]]);
    }

    #[test]
    fn a_stream_several_views_behind_gets_every_change_between() {
        let v1 = MeshView::build(inputs(1, &[("a", &["1:1"]), ("b", &["2:1"])]), None);
        let v2 = MeshView::build(
            inputs(2, &[("a", &["1:1"]), ("b", &["2:1"]), ("c", &["3:1"])]),
            Some(&v1),
        );
        let v3 = MeshView::build(inputs(3, &[("b", &["2:1"]), ("c", &["3:1"])]), Some(&v2));
        let v4 = MeshView::build(
            inputs(4, &[("b", &["2:1", "2:2"]), ("c", &["3:1"])]),
            Some(&v3),
        );
        let s = next_snapshot(Base::Sent(&sent(v1)), &v4, &[], 0, &[]).unwrap();
        let ids: Vec<_> = s.services.iter().map(|s| s.spiffe_id.clone()).collect();
        assert_eq!(ids, [sid("b").to_string(), sid("c").to_string()]);
        assert_eq!(s.services_removed, [sid("a").to_string()]);
        // Past the remembered builds, the whole tables are compared: same answer.
        let mut far = MeshView::build(inputs(1, &[("a", &["1:1"]), ("b", &["2:1"])]), None);
        let old = MeshView::build(inputs(1, &[("a", &["1:1"]), ("b", &["2:1"])]), None);
        for g in 2..(HISTORY as u64 + 5) {
            far = MeshView::build(
                inputs(g, &[("b", &["2:1"]), ("c", &[&format!("3:{g}")])]),
                Some(&far),
            );
        }
        let s = next_snapshot(Base::Sent(&sent(old)), &far, &[], 0, &[]).unwrap();
        assert_eq!(s.services.len(), 2);
        assert_eq!(s.services_removed, [sid("a").to_string()]);
    }

    #[test]
    fn a_large_table_goes_in_parts_that_rebuild_it() {
        let eps: Vec<String> = (0..20).map(|i| format!("10.0.0.{i}:8443")).collect();
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        let names: Vec<String> = (0..50).map(|i| format!("svc-{i:02}")).collect();
        let table: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), &eps[..])).collect();
        let v = MeshView::build(inputs(7, &table), None);
        let whole = next_snapshot(Base::Nothing, &v, &[], 2, &[]).unwrap();
        let parts = into_parts(whole.clone(), PART_BUDGET);
        assert!(parts.len() > 3, "{} parts", parts.len());
        let (last, rest) = parts.split_last().unwrap();
        assert!(!last.continued && last.services_incremental);
        assert_eq!((last.version, last.rotate_generation), (7, 2));
        assert_eq!(last.trust_bundle_der, whole.trust_bundle_der);
        assert!(
            !rest[0].services_incremental,
            "the first part starts a new table"
        );
        for p in rest {
            assert!(p.continued && p.trust_bundle_der.is_empty() && p.version == 7);
            assert!(prost::Message::encoded_len(p) <= PART_BUDGET + 64);
        }
        let mut rebuilt: Vec<Service> = parts.into_iter().flat_map(|p| p.services).collect();
        rebuilt.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        assert_eq!(rebuilt, whole.services);
        // A small snapshot stays one message.
        let one = into_parts(
            next_snapshot(
                Base::Nothing,
                &MeshView::build(inputs(1, &[("a", &["1:1"])]), None),
                &[],
                0,
                &[],
            )
            .unwrap(),
            PART_BUDGET,
        );
        assert_eq!(one.len(), 1);
        assert!(!one[0].continued && !one[0].services_incremental);
    }

    /// What a proxy holds after folding `parts` into `table`.
    fn fold_all(table: &mut Option<ServiceTable>, parts: Vec<Snapshot>) {
        for mut p in parts {
            ServiceTable::fold(table, &mut p).unwrap();
        }
    }

    #[test]
    fn a_reconnecting_proxy_gets_only_the_buckets_that_differ_from_any_replica() {
        let eps = ["10.0.0.1:8443", "10.0.0.2:8443"];
        let names: Vec<String> = (0..300).map(|i| format!("svc-{i:03}")).collect();
        let table_of = |skip: usize, extra: &str| -> Vec<(String, Vec<String>)> {
            names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(i, n)| {
                    let mut e: Vec<String> = eps.iter().map(|s| s.to_string()).collect();
                    if i == 7 {
                        e.push(extra.to_owned());
                    }
                    (n.clone(), e)
                })
                .collect()
        };
        let view_of = |generation, rows: &[(String, Vec<String>)]| {
            let rows: Vec<(&str, Vec<&str>)> = rows
                .iter()
                .map(|(n, e)| (n.as_str(), e.iter().map(String::as_str).collect()))
                .collect();
            let rows: Vec<(&str, &[&str])> = rows.iter().map(|(n, e)| (*n, &e[..])).collect();
            MeshView::build(inputs(generation, &rows), None)
        };
        // The proxy's table came from replica A.
        let a = view_of(40, &table_of(usize::MAX, "10.0.0.3:8443"));
        let mut held = None;
        let first = next_snapshot(Base::Nothing, &a, &[], 0, &[]).unwrap();
        fold_all(&mut held, into_parts(first, PART_BUDGET));
        let digests = moat_wire::table::digests_from_proto(&held.as_ref().unwrap().digests())
            .unwrap()
            .unwrap();

        // Replica B, built on its own with other generation numbers, holds the same table:
        // nothing of it is resent.
        let b = view_of(9, &table_of(usize::MAX, "10.0.0.3:8443"));
        let s = next_snapshot(Base::Announced(&digests), &b, &[], 0, &[]).unwrap();
        assert!(s.services_incremental && s.services.is_empty());
        assert!(s.services_reset_buckets.is_empty());
        assert_eq!(s.trust_bundle_der, [vec![1, 2, 3]], "the rest is complete");

        // Replica C lacks one service and changed another: two buckets at most are resent,
        // and the proxy ends up with C's table exactly.
        let c = view_of(12, &table_of(100, "10.0.0.4:8443"));
        let s = next_snapshot(Base::Announced(&digests), &c, &[], 0, &[]).unwrap();
        assert!(
            s.services_reset_buckets.len() <= 2,
            "{:?}",
            s.services_reset_buckets
        );
        assert!(
            s.services.len() < 30,
            "{} services resent",
            s.services.len()
        );
        fold_all(&mut held, into_parts(s, 512));
        let mut want = next_snapshot(Base::Nothing, &c, &[], 0, &[])
            .unwrap()
            .services;
        let mut got = held.unwrap().to_proto();
        // The proxy's table lists bucket by bucket; the same services in any order.
        want.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        got.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_view_is_drained_when_every_stream_dealt_with_it() {
        let v = MeshView::build(inputs(1, &[]), None);
        v.expect(2);
        v.handled();
        let t = std::time::Instant::now();
        v.drained(Duration::from_millis(50)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "one stream is still behind"
        );
        v.handled();
        v.handled(); // a stream that joined after publishing: no underflow
        tokio::time::timeout(Duration::from_secs(5), v.drained(Duration::from_secs(60)))
            .await
            .unwrap();
    }

    #[test]
    fn nothing_is_sent_when_nothing_this_proxy_needs_changed() {
        let v1 = MeshView::build(inputs(1, &[("a", &["10.0.0.1:1"])]), None);
        let v2 = MeshView::build(inputs(2, &[("a", &["10.0.0.1:1"])]), Some(&v1));
        let last = sent(v1);
        assert!(next_snapshot(Base::Sent(&last), &v2, &[], 0, &[]).is_none());
        // Its own policies, a rotation command, a new bundle or revocation each make one.
        let p = Policy {
            name: "p".into(),
            ..Policy::default()
        };
        assert!(next_snapshot(Base::Sent(&last), &v2, &[p], 0, &[]).is_some());
        assert!(next_snapshot(Base::Sent(&last), &v2, &[], 1, &[]).is_some());
        // So does a tap opening on its service.
        let tap = moat_api::v1::TapFilter {
            id: 1,
            ..Default::default()
        };
        assert!(next_snapshot(Base::Sent(&last), &v2, &[], 0, &[tap]).is_some());
        let sends = |i: ViewInputs| {
            let view = MeshView::build(i, Some(&v2));
            next_snapshot(Base::Sent(&last), &view, &[], 0, &[]).is_some()
        };
        let mut i = inputs(3, &[("a", &["10.0.0.1:1"])]);
        i.bundle_fingerprints.push("bb".into());
        assert!(sends(i));
        let mut i = inputs(4, &[("a", &["10.0.0.1:1"])]);
        i.revoked.1.push("0a".into());
        assert!(sends(i));
    }
}
