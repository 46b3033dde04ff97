//! How this replica's live state follows the store: the policies and mesh config, the
//! revocation lists, and the token issuers' key sets. Each loop reloads on a change (or a lag,
//! which means changes were missed) and moves the mesh generation on only when something
//! changed, so every replica's streams learn a change the same way, whichever replica wrote it.

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
            Ok(set) => {
                // Key sets first, so the snapshot that introduces an issuer carries its keys.
                state.jwks.sync(&set.mesh).await;
                state.set_policies(set);
            }
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

/// Keeps the key-set cache current with the mesh config in force, checking every second what
/// is due.
pub async fn refresh_jwks(state: Arc<MeshState>) {
    loop {
        let mesh = state.current_policies().mesh.clone();
        if state.jwks.sync(&mesh).await {
            state.bump();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
