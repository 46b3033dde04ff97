//! This process as one replica of the control plane. Every replica is a full peer on the
//! shared store; what must happen once in the mesh (CA rotation checks, expiry warnings, audit
//! retention, Kubernetes publishing and the policy controller) runs on the elected leader only.
//!
//! A replica holds a store lease that it renews every [`RENEW_EVERY`]; what only lives as long
//! as the replica (its entry under `replicas/`, its proxies' endpoints under `live/`, and the
//! `leader` key while it leads) is written under that lease, so when the replica dies the store
//! drops all of it within [`LEASE_TTL`]. Leadership is the `leader` key, created with a
//! compare-and-swap on its absence: the first replica to write it leads until its lease ends.
//! On the embedded store there is one process, which always leads.

use std::sync::Arc;
use std::time::Duration;

use moat_store::{Compare, LeaseId, Op, Store, StoreError, Txn};
use tokio::sync::watch;

/// How long a replica's registrations outlive its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is renewed and leadership is checked.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

const REPLICAS: &str = "replicas/";
const LEADER: &str = "leader";

/// This replica.
#[derive(Debug)]
pub struct Replica {
    id: String,
    /// The address proxies and the CLI reach this replica at (for `replicas/`).
    address: String,
    store: Arc<dyn Store>,
    /// The lease in force; a new one after the old one was lost.
    lease: watch::Sender<LeaseId>,
    leader: watch::Sender<bool>,
}

/// One replica, as registered in the store.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub id: String,
    pub address: String,
    pub started_unix: i64,
}

impl Replica {
    /// Takes a lease, registers under it, and keeps both (and the leadership election) going
    /// for the life of the process.
    pub async fn join(store: Arc<dyn Store>, address: String) -> Result<Arc<Self>, StoreError> {
        let id = hex::encode(rand::random::<[u8; 6]>());
        let lease = store.grant_lease(LEASE_TTL).await?;
        let replica = Arc::new(Replica {
            id,
            address,
            store,
            lease: watch::channel(lease).0,
            leader: watch::channel(false).0,
        });
        replica.register(lease).await?;
        replica.campaign(lease).await;
        tokio::spawn(replica.clone().keep());
        Ok(replica)
    }

    /// This replica's id (random, new at every start).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lease to write this replica's registrations under.
    pub fn lease(&self) -> LeaseId {
        *self.lease.borrow()
    }

    /// Changes when the lease was lost and replaced: registrations must be written again.
    pub fn leases(&self) -> watch::Receiver<LeaseId> {
        self.lease.subscribe()
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    async fn register(&self, lease: LeaseId) -> Result<(), StoreError> {
        let info = ReplicaInfo {
            id: self.id.clone(),
            address: self.address.clone(),
            started_unix: moat_identity::clock::unix_now(),
        };
        let value = serde_json::to_vec(&info).map_err(|e| StoreError::Io(e.to_string()))?;
        self.store
            .txn(Txn {
                success: vec![Op::PutLeased(
                    format!("{REPLICAS}{}", self.id),
                    value,
                    lease,
                )],
                ..Txn::default()
            })
            .await?;
        Ok(())
    }

    /// Becomes leader if nobody is; otherwise checks that it still is.
    async fn campaign(&self, lease: LeaseId) {
        let claimed = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(LEADER.to_owned(), 0)],
                success: vec![Op::PutLeased(
                    LEADER.to_owned(),
                    self.id.as_bytes().to_vec(),
                    lease,
                )],
                ..Txn::default()
            })
            .await;
        let leads = match claimed {
            Ok(r) if r.succeeded => true,
            Ok(_) => match self.store.get(LEADER).await {
                Ok(kv) => kv.is_some_and(|kv| kv.value == self.id.as_bytes()),
                // Unknown: keep what we had until the lease says otherwise.
                Err(_) => self.is_leader(),
            },
            Err(_) => self.is_leader(),
        };
        self.leader.send_if_modified(|l| {
            let changed = *l != leads;
            if changed {
                tracing::info!(replica = %self.id, leader = leads, "leadership changed");
            }
            *l = leads;
            changed
        });
    }

    /// Renews the lease (a new one when it was lost) and runs the election, forever.
    async fn keep(self: Arc<Self>) {
        let mut renewed_at = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let lease = self.lease();
            match self.store.renew_lease(lease).await {
                Ok(true) => renewed_at = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!(replica = %self.id, "the store let this replica's lease expire; registering again");
                    self.leader.send_replace(false);
                    match self.store.grant_lease(LEASE_TTL).await {
                        Ok(new) => {
                            if let Err(e) = self.register(new).await {
                                tracing::warn!(error = %e, "cannot register this replica");
                            }
                            renewed_at = tokio::time::Instant::now();
                            self.lease.send_replace(new);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot take a new lease"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew this replica's lease");
                    // Past its time to live the lease is gone, and with it the leadership:
                    // stop acting as leader before another replica starts.
                    if renewed_at.elapsed() >= LEASE_TTL - RENEW_EVERY {
                        self.leader
                            .send_if_modified(|l| std::mem::replace(l, false));
                    }
                    continue;
                }
            }
            self.campaign(self.lease()).await;
        }
    }

    /// Runs `job` whenever this replica leads, and stops it when it no longer does.
    pub async fn while_leader<F, Fut>(self: Arc<Self>, what: &'static str, job: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut leader = self.leader.subscribe();
        loop {
            if leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            tracing::info!(job = what, "leader: starting");
            let running = tokio::spawn(job());
            let lost = leader.wait_for(|l| !*l).await.is_err();
            running.abort();
            if lost {
                return;
            }
            tracing::info!(job = what, "no longer leader: stopped");
        }
    }
}

/// The replicas registered now.
pub async fn replicas(store: &dyn Store) -> Result<Vec<ReplicaInfo>, StoreError> {
    Ok(store
        .range(REPLICAS, 0, false)
        .await?
        .into_iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// Whether replica `id` is gone (its registration ended with its lease), asked when its
/// proxies' summaries are deleted. A store that cannot say counts as "gone": the proxies are then
/// kept as orphans, which the CA rotation's gates wait for (at most 30 s with none coming back),
/// where "not gone" would forget them and let a rotation retire the root their certificates chain
/// to while they are away.
pub async fn is_gone(store: &dyn Store, id: &str) -> bool {
    match store.get(&format!("{REPLICAS}{id}")).await {
        Ok(found) => found.is_none(),
        Err(e) => {
            tracing::warn!(replica = id, error = %e, "the store cannot say whether a replica is gone; its proxies are kept as orphans");
            true
        }
    }
}

/// The id of the replica that leads now, if any.
pub async fn leader(store: &dyn Store) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(LEADER)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica whose registration the store cannot read (etcd down) counts as gone, so its
    /// proxies are kept as orphans rather than forgotten.
    #[cfg(feature = "etcd")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_the_store_cannot_answer_for_counts_as_gone() {
        let mut etcd =
            tokio::task::block_in_place(|| moat_test_util::etcd::EtcdCluster::start(1)).unwrap();
        let cfg = moat_store::EtcdConfig::parse(&etcd.store_url()).unwrap();
        let store = moat_store::EtcdStore::connect(&cfg).await.unwrap();
        store
            .put(&format!("{REPLICAS}alive"), b"a:7443".to_vec())
            .await
            .unwrap();
        assert!(!is_gone(&store, "alive").await);
        assert!(is_gone(&store, "departed").await);
        tokio::task::block_in_place(|| etcd.kill(0));
        assert!(store.get(&format!("{REPLICAS}alive")).await.is_err());
        assert!(is_gone(&store, "alive").await);
    }

    #[tokio::test]
    async fn one_leader_and_a_handover_when_its_lease_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let a = Replica::join(store.clone(), "a:7443".into()).await.unwrap();
        let b = Replica::join(store.clone(), "b:7443".into()).await.unwrap();
        assert!(a.is_leader());
        assert!(!b.is_leader());
        assert_eq!(
            leader(store.as_ref()).await.unwrap().as_deref(),
            Some(a.id())
        );
        let mut ids: Vec<_> = replicas(store.as_ref())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.address)
            .collect();
        ids.sort();
        assert_eq!(ids, ["a:7443", "b:7443"]);

        // a's lease is revoked as if it had died: b takes over.
        store
            .txn(Txn {
                success: vec![Op::Delete(LEADER.into())],
                ..Txn::default()
            })
            .await
            .unwrap();
        b.campaign(b.lease()).await;
        assert!(b.is_leader());
        a.campaign(a.lease()).await;
        assert!(!a.is_leader(), "a sees that b leads now");
    }
}
