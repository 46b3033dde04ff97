//! Persistence for the control plane. [`Store`] is what a key-value store with revisions,
//! transactions and watches offers (the shape of etcd's API). [`EmbeddedStore`] is the default
//! backend, one crash-safe redb file under the data directory, for one control-plane process;
//! `EtcdStore` (cargo feature `etcd`) puts the same contract on an etcd cluster so that several
//! replicas share it. A write is acknowledged only after it is durable.

mod embedded;
#[cfg(feature = "etcd")]
mod etcd;
mod model;

pub use embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdStore, EtcdTls, EtcdUrlError};
pub use model::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, StoreError, Txn, TxnResult, WatchStream,
};

/// A revisioned key-value store with transactions and prefix watches.
///
/// Every successful write transaction advances one store-wide revision; each key records the
/// revision that created it and the one that last modified it.
#[async_trait::async_trait]
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// One key, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix`, in key order, at most `limit` (0 = no limit); with
    /// `reverse`, the last keys first.
    async fn range(
        &self,
        prefix: &str,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// Applies `txn.success` atomically if every compare holds, else `txn.failure`. Returns once
    /// the outcome is durable.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;

    /// Events for keys starting with `prefix`, from now on: every change committed after this
    /// returns is delivered, in revision order.
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError>;

    /// Grants a lease that expires `ttl` after it was granted or last renewed.
    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease. `Ok(false)`: it had already expired, and its keys are gone.
    async fn renew_lease(&self, lease: LeaseId) -> Result<bool, StoreError>;

    /// [`Store::watch`], retried with backoff (up to 2 s apart) while the store is unavailable,
    /// for the loops that must follow a prefix for the life of the process.
    async fn watch_retrying(&self, prefix: &str) -> WatchStream {
        let mut wait = std::time::Duration::from_millis(100);
        loop {
            match self.watch(prefix).await {
                Ok(w) => return w,
                Err(e) => {
                    tracing::warn!(prefix, error = %e, "cannot watch the store; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
            }
        }
    }

    /// Unconditional put; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let r = self
            .txn(Txn {
                success: vec![Op::Put(key.to_owned(), value)],
                ..Txn::default()
            })
            .await?;
        Ok(r.revision)
    }
}
