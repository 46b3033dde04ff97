//! The trusted issuers' key sets as the whole mesh uses them. Only the leader reads them from
//! their sources (`jwks`), and writes each checked key set under `jwks/<slot>` in the store;
//! every replica follows that prefix into its [`KeySets`], from which its snapshots and its
//! Kubernetes token checks read. So one replica fetches, every replica serves the same keys,
//! and a new leader starts from the stored ones.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use moat_policy::MeshConfig;
use moat_store::{Op, Store, StoreError, Txn};

use crate::jwks::JwksCache;

/// Store prefix of the key sets: `jwks/<slot>` holds the JWKS JSON.
pub const PREFIX: &str = "jwks/";

/// The key sets in force on this replica, by slot (an issuer's `iss`, or
/// [`crate::jwks::KUBERNETES`]).
#[derive(Debug, Default)]
pub struct KeySets {
    sets: RwLock<HashMap<String, String>>,
}

impl KeySets {
    /// The checked JWKS JSON of `slot`, if the leader ever read one.
    pub fn get(&self, slot: &str) -> Option<String> {
        self.sets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
            .cloned()
    }

    /// Replaces every key set; returns whether any changed.
    pub fn replace(&self, sets: HashMap<String, String>) -> bool {
        let mut cur = self.sets.write().unwrap_or_else(|e| e.into_inner());
        let changed = *cur != sets;
        *cur = sets;
        changed
    }
}

/// Every stored key set, by slot.
pub async fn load(store: &dyn Store) -> Result<HashMap<String, String>, StoreError> {
    Ok(store
        .range(PREFIX, 0, false)
        .await?
        .into_iter()
        .filter_map(|kv| {
            let slot = kv.key.strip_prefix(PREFIX)?.to_owned();
            Some((slot, String::from_utf8(kv.value).ok()?))
        })
        .collect())
}

/// Stores what `cache` read for the issuers `mesh` trusts, and deletes the stored key sets of
/// issuers it no longer trusts. An issuer whose source cannot be read now keeps its stored key
/// set (the last good one), as the cache does.
pub async fn publish(
    store: &dyn Store,
    cache: &JwksCache,
    mesh: &MeshConfig,
) -> Result<(), StoreError> {
    let stored = load(store).await?;
    let wanted: BTreeSet<String> = crate::jwks::slot_names(mesh).into_iter().collect();
    for (slot, json) in cache.entries() {
        if wanted.contains(&slot) && stored.get(&slot) != Some(&json) {
            store
                .put(&format!("{PREFIX}{slot}"), json.into_bytes())
                .await?;
        }
    }
    let gone: Vec<Op> = stored
        .keys()
        .filter(|slot| !wanted.contains(*slot))
        .map(|slot| Op::Delete(format!("{PREFIX}{slot}")))
        .collect();
    if !gone.is_empty() {
        store
            .txn(Txn {
                success: gone,
                ..Txn::default()
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn the_store_holds_the_trusted_issuers_key_sets_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let jwks = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"k1","alg":"EdDSA"}]}"#;
        let config = |issuers: &[&str]| MeshConfig {
            jwt_issuers: issuers
                .iter()
                .map(|i| moat_policy::JwtIssuer {
                    issuer: i.to_string(),
                    jwks: moat_policy::JwksSource::Inline(jwks.to_owned()),
                    algorithms: vec![moat_policy::JwtAlgorithm::EdDSA],
                    clock_skew: std::time::Duration::from_secs(30),
                })
                .collect(),
            ..MeshConfig::default()
        };
        let cache = JwksCache::default();
        let both = config(&["https://a.example", "https://b.example"]);
        assert!(cache.sync(&both).await);
        publish(store.as_ref(), &cache, &both).await.unwrap();
        let stored = load(store.as_ref()).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert!(stored["https://a.example"].contains("Ed25519"));
        let sets = KeySets::default();
        assert!(sets.replace(stored.clone()));
        assert!(!sets.replace(stored), "the same sets again change nothing");
        assert!(sets.get("https://b.example").is_some());

        // b is no longer trusted: its stored key set goes, a's stays.
        let one = config(&["https://a.example"]);
        cache.sync(&one).await;
        publish(store.as_ref(), &cache, &one).await.unwrap();
        let stored = load(store.as_ref()).await.unwrap();
        assert_eq!(stored.keys().collect::<Vec<_>>(), ["https://a.example"]);
    }
}
