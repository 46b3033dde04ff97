//! How this replica's live state follows the store: the policies and mesh config, the
//! revocation lists, and the token issuers' key sets. Each loop reloads on a change (or a lag,
//! which means changes were missed) and moves the mesh generation on only when something
//! changed, so every replica's streams learn a change the same way, whichever replica wrote it.
//! The leader also reads the key sets from their sources into the store ([`refresh_jwks`]).

use std::sync::Arc;
use std::time::Duration;

use crate::mesh_state::MeshState;
use crate::policies::Policies;

/// Keeps `state`'s policies in step with the store: reload on every change under `policies/`
/// or `meshconfig`.
pub async fn follow_policies(policies: Policies, state: Arc<MeshState>) {
    let (mut a, mut b) = policies.changes().await;
    loop {
        match policies.load().await {
            Ok(set) => state.set_policies(set),
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
                if state.set_revoked(ids, serials) {
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

/// On the leader: reads the key sets of the issuers the mesh config trusts — new issuers at
/// once, the rest when their refresh is due (checked every second) — and stores them, so every
/// replica serves them. Until an issuer's key set is stored, snapshots leave the issuer out and
/// its tokens are refused.
pub async fn refresh_jwks(state: Arc<MeshState>) {
    let cache = crate::jwks::JwksCache::default();
    let mut generations = state.generations();
    let mut seen: Option<Arc<crate::policies::PolicySet>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // What was read is not in the store yet (the last write failed).
    let mut unstored = false;
    loop {
        // A new mesh config is read at once; otherwise what is due, every second.
        tokio::select! {
            _ = tick.tick() => {}
            changed = generations.changed() => {
                if changed.is_err() {
                    return;
                }
                if seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &state.current_policies())) {
                    continue;
                }
            }
        }
        let set = state.current_policies();
        let read_new = cache.sync(&set.mesh).await;
        // The store is written only when a key set or the trusted issuers changed, or the last
        // write failed; not every second.
        let new_config = !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &set));
        if !read_new && !new_config && !unstored {
            continue;
        }
        unstored = true;
        if let Err(e) = crate::key_sets::publish(state.store().as_ref(), &cache, &set.mesh).await {
            tracing::warn!(error = %e, "cannot store the issuers' key sets; trying again in a second");
            continue;
        }
        unstored = false;
        seen = Some(set);
    }
}

/// Keeps this replica's key sets in step with the store.
pub async fn follow_key_sets(state: Arc<MeshState>) {
    let mut changes = state.store().watch_retrying(crate::key_sets::PREFIX).await;
    loop {
        match crate::key_sets::load(state.store().as_ref()).await {
            Ok(sets) => {
                if state.jwks.replace(sets) {
                    state.bump();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the issuers' key sets; keeping the previous ones")
            }
        }
        if matches!(changes.next().await, Ok(None)) {
            return;
        }
    }
}
