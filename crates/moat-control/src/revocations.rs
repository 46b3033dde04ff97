//! Revocations: identities (until lifted) and single certificates (until they would have
//! expired anyway), stored under `revocations/<kind>/<value>` and pushed to every proxy.

use std::sync::Arc;

use moat_store::{Op, Store, StoreError, Txn};
use serde::{Deserialize, Serialize};

/// Store prefix of revocations.
pub const PREFIX: &str = "revocations/";

/// One revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// `identity` or `serial`.
    pub kind: String,
    /// A full SPIFFE ID, or a serial in lowercase hex.
    pub value: String,
    pub reason: String,
    pub actor: String,
    pub time_unix_ms: i64,
    /// When it drops off the list; 0 keeps it until undone.
    pub expires_unix: i64,
}

/// Revocation operations over the store.
#[derive(Clone, Debug)]
pub struct Revocations {
    store: Arc<dyn Store>,
}

fn key(kind: &str, value: &str) -> String {
    format!("{PREFIX}{kind}/{value}")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Revocations {
    /// Revocations in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Revocations { store }
    }

    /// Stores a revocation; acknowledged once durable.
    pub async fn revoke(&self, r: Revocation) -> Result<Revocation, StoreError> {
        // Serialising plain strings and integers cannot fail.
        self.store
            .put(
                &key(&r.kind, &r.value),
                serde_json::to_vec(&r).unwrap_or_default(),
            )
            .await?;
        Ok(r)
    }

    /// Lifts a revocation; `Ok(false)` when there was none.
    pub async fn undo(&self, kind: &str, value: &str) -> Result<bool, StoreError> {
        let k = key(kind, value);
        if self.store.get(&k).await?.is_none() {
            return Ok(false);
        }
        self.store
            .txn(Txn {
                success: vec![Op::Delete(k)],
                ..Txn::default()
            })
            .await?;
        Ok(true)
    }

    /// Every revocation still in force (expired ones are dropped from the store).
    pub async fn list(&self) -> Result<Vec<Revocation>, StoreError> {
        let now = now_unix();
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for kv in self.store.range(PREFIX, 0, false).await? {
            match serde_json::from_slice::<Revocation>(&kv.value) {
                Ok(r) if r.expires_unix != 0 && r.expires_unix <= now => {
                    expired.push(Op::Delete(kv.key))
                }
                Ok(r) => live.push(r),
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "unreadable revocation; ignored")
                }
            }
        }
        if !expired.is_empty() {
            self.store
                .txn(Txn {
                    success: expired,
                    ..Txn::default()
                })
                .await?;
        }
        Ok(live)
    }

    /// Changes under `revocations/`.
    pub fn changes(&self) -> moat_store::WatchStream {
        self.store.watch(PREFIX)
    }
}
