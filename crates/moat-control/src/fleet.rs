//! The fleet across replicas. Each replica publishes a summary of every proxy connected to it
//! under `live/<replica>/<spiffe id>|<address>`, written under its lease (`replica`), and
//! follows `live/`. What the other replicas published joins its registry as remote proxies: their
//! endpoints enter the service table (a proxy learns about a service whichever replica each
//! side is connected to), and `moat status`, the APPLIED column, the revocation lookup and the
//! CA-rotation gates count the whole fleet. A replica that dies takes its summaries with it when
//! its lease ends; its proxies are published again by the replicas they reconnect to.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_identity::SpiffeId;
use moat_store::{EventKind, Op, Txn};

use crate::mesh_state::MeshState;
use crate::orphans::Orphans;
use crate::registry::ProxyEntry;
use crate::replica::Replica;

const LIVE: &str = "live/";
/// Summaries are published at most this often (and at once when a proxy connects or leaves).
const PUBLISH_EVERY: Duration = Duration::from_millis(500);
/// Writes per store transaction (etcd allows 128 by default).
const BATCH: usize = 100;

/// What other replicas need to know about one proxy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
struct Summary {
    id: String,
    address: String,
    replica: String,
    proxy_version: String,
    cert_serial: String,
    cert_not_after: i64,
    cert_issuer: String,
    cert_refresh_after: i64,
    remote: String,
    connected_unix_ms: i64,
    last_error: Option<String>,
    applied_policies: Vec<(String, u64)>,
    applied_bundle: Vec<String>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Summary {
    fn of(p: &ProxyEntry, replica: &str) -> Self {
        Summary {
            id: p.id.to_string(),
            address: p.inbound_address.clone(),
            replica: replica.to_owned(),
            proxy_version: p.proxy_version.clone(),
            cert_serial: p.cert_serial.clone(),
            cert_not_after: p.cert_not_after,
            cert_issuer: p.cert_issuer.clone(),
            cert_refresh_after: p.cert_refresh_after,
            remote: p.remote.clone(),
            connected_unix_ms: unix_ms(p.connected_at),
            last_error: p.last_error.clone(),
            applied_policies: p.applied_policies.clone(),
            applied_bundle: p.applied_bundle.clone(),
        }
    }

    /// A fingerprint of what was published, to tell whether it changed.
    fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    fn key(&self) -> String {
        format!("{LIVE}{}/{}|{}", self.replica, self.id, self.address)
    }

    fn entry(self) -> Option<ProxyEntry> {
        let at =
            UNIX_EPOCH + Duration::from_millis(u64::try_from(self.connected_unix_ms).unwrap_or(0));
        // Snapshot versions are per replica; what was applied is in the two lists below.
        Some(ProxyEntry {
            proxy_version: self.proxy_version,
            cert_serial: self.cert_serial,
            cert_not_after: self.cert_not_after,
            cert_issuer: self.cert_issuer,
            cert_refresh_after: self.cert_refresh_after,
            last_error: self.last_error,
            applied_policies: self.applied_policies,
            applied_bundle: self.applied_bundle,
            ..ProxyEntry::connected(
                self.id.parse::<SpiffeId>().ok()?,
                self.address,
                format!("{} (via replica {})", self.remote, self.replica),
                at,
            )
        })
    }
}

/// Publishes this replica's proxies: a summary is written when it changes and deleted when
/// its proxy is gone, and all are written again under a new lease after the old one was lost.
/// What was published is remembered by fingerprint only.
pub async fn publish(state: Arc<MeshState>, replica: Arc<Replica>) {
    let store = state.store().clone();
    let mut generation = state.generations();
    let mut leases = replica.leases();
    let mut published: HashMap<String, u64> = HashMap::new();
    loop {
        let mut now: HashMap<String, u64> = HashMap::with_capacity(published.len());
        let mut ops: Vec<Op> = Vec::new();
        for s in state
            .registry()
            .entries()
            .map(|p| Summary::of(p, replica.id()))
        {
            let (key, digest) = (s.key(), s.digest());
            if published.get(&key) != Some(&digest)
                && let Ok(value) = serde_json::to_vec(&s)
            {
                ops.push(Op::PutLeased(key.clone(), value, replica.lease()));
            }
            now.insert(key, digest);
        }
        ops.extend(
            published
                .keys()
                .filter(|k| !now.contains_key(*k))
                .map(|k| Op::Delete(k.clone())),
        );
        let mut failed = false;
        if !ops.is_empty() {
            tracing::debug!(writes = ops.len(), "publishing this replica's proxies");
        }
        while !ops.is_empty() {
            let batch: Vec<Op> = ops.drain(..ops.len().min(BATCH)).collect();
            let txn = Txn {
                success: batch,
                ..Txn::default()
            };
            if let Err(e) = store.txn(txn).await {
                tracing::warn!(error = %e, "cannot publish this replica's proxies; retrying");
                failed = true;
                break;
            }
        }
        // After a failure, everything is written again next time.
        published = if failed { HashMap::new() } else { now };
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { return },
            changed = leases.changed() => {
                if changed.is_err() {
                    return;
                }
                published.clear();
            }
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
        }
        // Let a burst of changes (many proxies connecting) fold into one write.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keeps `state`'s remote proxies equal to what the other replicas published: one read of
/// `live/`, then the watch's changes applied one by one (a read again only after a lag), and
/// the registry updated once per burst. The proxies of a replica that died (its registration is
/// gone with its lease) keep their endpoints while they reconnect ([`Orphans`]).
pub async fn follow(state: Arc<MeshState>, replica: Arc<Replica>) {
    let store = state.store().clone();
    let mine = format!("{LIVE}{}/", replica.id());
    let mut changes = store.watch_retrying(LIVE).await;
    let mut orphans = Orphans::default();
    let mut reread = true;
    // Whether the remote endpoints changed since the last bump.
    let mut changed = false;
    loop {
        if reread {
            match store.range(LIVE, 0, false).await {
                Ok(kvs) => {
                    let remote: HashMap<String, ProxyEntry> = kvs
                        .into_iter()
                        .filter(|kv| !kv.key.starts_with(&mine))
                        .filter_map(|kv| Some((kv.key, entry_of(&kv.value)?)))
                        .collect();
                    // A replica that died while the watch lagged: its proxies leave with this
                    // read, not one deletion at a time, and are orphans all the same.
                    let left = state.registry().remote_missing_from(&remote);
                    let dead = gone_replicas(store.as_ref(), left.iter().map(|(k, _)| k)).await;
                    let now = std::time::Instant::now();
                    let mut reg = state.registry();
                    changed |= reg.set_remote(remote);
                    for (key, p) in left {
                        if replica_of(&key).is_some_and(|r| dead.contains(r)) {
                            orphans.died(p.id, p.inbound_address, now);
                        }
                    }
                    changed |= reg.set_orphans(orphans.endpoints());
                    reread = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the other replicas' proxies");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        {
            let mut reg = state.registry();
            let given_up = orphans.settle(std::time::Instant::now(), reg.serves());
            if given_up > 0 {
                tracing::info!(
                    given_up,
                    "gave up orphaned endpoints: their proxies did not reconnect to any replica in time"
                );
            }
            changed |= reg.set_orphans(orphans.endpoints());
        }
        tracing::debug!(
            orphans = orphans.len(),
            endpoints_changed = changed,
            "followed the other replicas' proxies"
        );
        if std::mem::take(&mut changed) {
            state.bump();
        }
        // Wait for a change (or an orphan's grace to end), then take the rest of the burst (up
        // to 200 ms of it) before the next bump. Each change goes into the registry as it comes.
        let grace_ends = orphans.next_deadline().map(tokio::time::Instant::from_std);
        let mut burst_until = None;
        // Deletions wait for the end of the burst: whether each is a death (its replica is
        // gone) must be known before its endpoint leaves, so that a dead replica's endpoints
        // become orphans in the same step and the service table does not change.
        let mut deleted: HashSet<String> = HashSet::new();
        loop {
            let next = match (burst_until, grace_ends) {
                (None, None) => Ok(changes.next().await),
                (None, Some(at)) => tokio::time::timeout_at(at, changes.next()).await,
                (Some(until), _) => {
                    let wait = Duration::from_millis(20)
                        .min(until - tokio::time::Instant::now().min(until));
                    tokio::time::timeout(wait, changes.next()).await
                }
            };
            if next.is_err() {
                break;
            }
            burst_until.get_or_insert(tokio::time::Instant::now() + Duration::from_millis(200));
            match next {
                Err(_) => break,
                Ok(Ok(None)) => return,
                Ok(Err(_lagged)) => {
                    reread = true;
                    break;
                }
                Ok(Ok(Some(e))) => {
                    if e.key.starts_with(&mine) {
                        continue;
                    }
                    match (e.kind, entry_of(&e.value)) {
                        (EventKind::Put, Some(p)) => {
                            deleted.remove(&e.key);
                            changed |= state.registry().put_remote(e.key, p);
                        }
                        // Deleted, or unreadable (as good as gone).
                        _ => {
                            deleted.insert(e.key);
                        }
                    }
                }
            }
        }
        // A deletion by a replica that is gone (its lease ended) is a death, not a goodbye.
        let dead = gone_replicas(store.as_ref(), deleted.iter()).await;
        let now = std::time::Instant::now();
        let mut reg = state.registry();
        for key in &deleted {
            let Some((p, c)) = reg.delete_remote(key) else {
                continue;
            };
            changed |= c;
            if replica_of(key).is_some_and(|r| dead.contains(r)) {
                orphans.died(p.id, p.inbound_address, now);
            }
        }
        changed |= reg.set_orphans(orphans.endpoints());
    }
}

/// Of the replicas that published `keys`, those that are gone (asked once each).
async fn gone_replicas<'a>(
    store: &dyn moat_store::Store,
    keys: impl Iterator<Item = &'a String>,
) -> HashSet<String> {
    let mut asked: HashSet<&str> = HashSet::new();
    let mut gone = HashSet::new();
    for r in keys.filter_map(|k| replica_of(k)) {
        if asked.insert(r) && crate::replica::is_gone(store, r).await {
            gone.insert(r.to_owned());
        }
    }
    gone
}

/// The replica that published `key` (`live/<replica>/…`).
fn replica_of(key: &str) -> Option<&str> {
    key.strip_prefix(LIVE)?.split_once('/').map(|(r, _)| r)
}

fn entry_of(value: &[u8]) -> Option<ProxyEntry> {
    serde_json::from_slice::<Summary>(value).ok()?.entry()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(replica: &str, name: &str, address: &str) -> (String, Vec<u8>) {
        let s = Summary {
            id: format!("spiffe://example.org/ns/shop/sa/{name}"),
            address: address.into(),
            replica: replica.into(),
            proxy_version: "0.1.0".into(),
            cert_serial: "0a".into(),
            cert_not_after: 10,
            cert_issuer: "ff".into(),
            cert_refresh_after: 5,
            remote: "10.0.0.9:40000".into(),
            connected_unix_ms: 1_000,
            last_error: None,
            applied_policies: Vec::new(),
            applied_bundle: Vec::new(),
        };
        (s.key(), serde_json::to_vec(&s).unwrap())
    }

    /// A replica that dies while this one's watch lags behind leaves its proxies as orphans
    /// (which the CA rotation's gates wait for), as a death seen event by event does: the
    /// re-read that follows the lag is where their summaries vanish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // the follower is meant to wait at the lock meanwhile
    async fn a_replica_that_dies_while_the_watch_lags_leaves_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn moat_store::Store> =
            Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let me = Replica::join(store.clone(), "me:7443".into())
            .await
            .unwrap();
        let state = MeshState::new(
            crate::policies::PolicySet::default(),
            store.clone(),
            me.clone(),
        );
        let (orders, value) = summary("doomed", "orders", "10.0.0.7:15006");
        store
            .put("replicas/doomed", b"d:7443".to_vec())
            .await
            .unwrap();
        store
            .put("replicas/busy", b"b:7443".to_vec())
            .await
            .unwrap();
        store.put(&orders, value).await.unwrap();
        tokio::spawn(follow(state.clone(), me));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !listed_in(&state.registry()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "orders never listed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The follower is held at the registry while more than its watch keeps is written, and
        // `doomed` dies (its registration and summaries go, as with its lease) among them.
        let (busy, value) = summary("busy", "payments", "10.0.0.8:15006");
        {
            let _held = state.registry();
            for _ in 0..1_100 {
                store.put(&busy, value.clone()).await.unwrap();
            }
            store
                .txn(Txn {
                    success: vec![
                        Op::Delete("replicas/doomed".into()),
                        Op::Delete(orders.clone()),
                    ],
                    ..Txn::default()
                })
                .await
                .unwrap();
            store.put(&busy, value.clone()).await.unwrap();
        }
        let awaited = "spiffe://example.org/ns/shop/sa/orders at 10.0.0.7:15006: not reconnected since its control-plane replica died";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (gone, missing) = {
                let reg = state.registry();
                (!listed_in(&reg), reg.awaited())
            };
            if gone && missing.iter().any(|m| m == awaited) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "orders was not kept as an orphan: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn listed_in(reg: &crate::registry::Registry) -> bool {
        reg.fleet().any(|p| p.inbound_address == "10.0.0.7:15006")
    }

    #[test]
    fn summaries_round_trip() {
        let s = Summary {
            id: "spiffe://moat.local/ns/default/sa/orders".into(),
            address: "10.0.0.7:15006".into(),
            replica: "ab12".into(),
            proxy_version: "0.1.0".into(),
            cert_serial: "0a".into(),
            cert_not_after: 10,
            cert_issuer: "ff".into(),
            cert_refresh_after: 5,
            remote: "10.0.0.7:40000".into(),
            connected_unix_ms: 1_000,
            last_error: None,
            applied_policies: vec![("default/orders".into(), 2)],
            applied_bundle: vec!["aa".into()],
        };
        assert_eq!(
            s.key(),
            "live/ab12/spiffe://moat.local/ns/default/sa/orders|10.0.0.7:15006"
        );
        let e = s.clone().entry().unwrap();
        assert_eq!(Summary::of(&e, "ab12").applied_policies, s.applied_policies);
        assert_eq!(e.applied_bundle, s.applied_bundle);
        assert_eq!(e.id.to_string(), s.id);
    }
}
