//! Rotation commands ("re-key and renew now", from `moat rotate` or a CA rotation step) for one
//! identity or for every proxy. They are counters in the store (`rotations/all`,
//! `rotations/<spiffe id>`), raised with a compare-and-swap, so a command given through any
//! replica reaches the proxies of every replica: each follows the counters into its snapshots
//! (a proxy renews when its stream's counter grows).

use std::collections::HashMap;
use std::sync::Arc;

use moat_identity::SpiffeId;
use moat_store::{Compare, Op, Store, StoreError, Txn};

use crate::state::ControlPlane;

const PREFIX: &str = "rotations/";
const ALL: &str = "rotations/all";

/// The counters: for everyone, and per identity.
pub type Counters = (u64, HashMap<SpiffeId, u64>);

fn counter(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raises the counter of `id` (or, with `None`, everyone's).
pub async fn request(store: &dyn Store, id: Option<&SpiffeId>) -> Result<(), StoreError> {
    let key = id.map_or_else(|| ALL.to_owned(), |id| format!("{PREFIX}id/{id}"));
    loop {
        let (n, rev) = match store.get(&key).await? {
            Some(kv) => (counter(&kv.value), kv.mod_revision),
            None => (0, 0),
        };
        let done = store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![Op::Put(key.clone(), (n + 1).to_string().into_bytes())],
                ..Txn::default()
            })
            .await?;
        if done.succeeded {
            return Ok(());
        }
    }
}

/// The counters as stored.
pub async fn load(store: &dyn Store) -> Result<Counters, StoreError> {
    let mut out: Counters = (0, HashMap::new());
    for kv in store.range(PREFIX, 0, false).await? {
        if kv.key == ALL {
            out.0 = counter(&kv.value);
        } else if let Some(id) = kv
            .key
            .strip_prefix(PREFIX)
            .and_then(|k| k.strip_prefix("id/"))
            .and_then(|id| id.parse().ok())
        {
            out.1.insert(id, counter(&kv.value));
        }
    }
    Ok(out)
}

/// Puts the stored counters in force here, whichever replica raised them. The CA is brought
/// up to date first, so that proxies told to renew get certificates from the CA the command
/// was given under.
pub async fn follow(cp: Arc<ControlPlane>) {
    let store = cp.mesh.store().clone();
    let mut changes = store.watch_retrying(PREFIX).await;
    loop {
        match load(store.as_ref()).await {
            Ok(counters) => {
                crate::ca_rotation::catch_up(&cp).await;
                if cp.mesh.set_rotations(counters) {
                    cp.mesh.bump();
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the rotation commands"),
        }
        if let Ok(None) = changes.next().await {
            return;
        }
    }
}
