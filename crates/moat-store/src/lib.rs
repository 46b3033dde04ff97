//! Persistence for the control plane. [`Store`] is deliberately what a key-value store with
//! revisions, transactions and watches offers (the shape of etcd's API), so that an etcd backend
//! can follow; [`EmbeddedStore`] is the default backend, one crash-safe redb file under the data
//! directory. A write is acknowledged only after it is durable on disk.

mod embedded;
mod model;

pub use embedded::EmbeddedStore;
pub use model::{Compare, Event, EventKind, KeyValue, Op, StoreError, Txn, TxnResult, WatchStream};

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

    /// Events for keys starting with `prefix`, from now on.
    fn watch(&self, prefix: &str) -> WatchStream;

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
