//! CA rotation across the fleet: when each step of a root rotation may be taken (every
//! connected proxy acknowledged the previous one), taking it, and what the fleet looks like
//! meanwhile. The steps themselves are `moat_ca::rotation`; the state is in the store, so any
//! call resumes a rotation wherever an earlier one (or a control-plane restart) left it.

use moat_api::v1::CaRotationStatus;
use moat_ca::RotationPhase;
use moat_identity::bundle::sha256_hex;
use tonic::Status;

use crate::ca::CaChangeError;
use std::sync::Arc;

use crate::state::ControlPlane;

/// The fleet, measured against the CA in force.
struct Fleet {
    bundle: Vec<String>,
    intermediate: String,
    proxies: u32,
    on_bundle: u32,
    on_intermediate: u32,
    /// `id at address` of proxies not on the current bundle, and of those not on the current
    /// intermediate.
    behind_bundle: Vec<String>,
    behind_intermediate: Vec<String>,
}

fn fleet(cp: &ControlPlane) -> Fleet {
    let ca = cp.ca.current();
    let bundle = ca.bundle().fingerprints();
    let intermediate = sha256_hex(ca.intermediate());
    let mut f = Fleet {
        bundle,
        intermediate,
        proxies: 0,
        on_bundle: 0,
        on_intermediate: 0,
        behind_bundle: Vec::new(),
        behind_intermediate: Vec::new(),
    };
    // The whole fleet, whichever replica each proxy is connected to: a step must not be taken
    // while a proxy on another replica is behind.
    // One look at the registry: a proxy away at one look and back at another would be counted
    // by neither.
    let registry = cp.mesh.registry();
    for p in registry.fleet() {
        f.proxies += 1;
        let who = format!("{} at {}", p.id, p.inbound_address);
        if p.applied_bundle == f.bundle {
            f.on_bundle += 1;
        } else {
            let why = match &p.last_error {
                Some(e) => format!("{who}: refused the bundle: {e}"),
                None => format!("{who}: has not acknowledged the bundle"),
            };
            f.behind_bundle.push(why);
        }
        if p.cert_issuer == f.intermediate {
            f.on_intermediate += 1;
        } else {
            f.behind_intermediate.push(format!(
                "{who}: certificate {} is from another intermediate",
                p.cert_serial
            ));
        }
    }
    // Proxies known to be away count until they are back or given up: after a control-plane
    // restart, those connected before (until the warm-up ends); after another replica died,
    // its proxies (until they reconnect to a survivor or `Orphans` gives them up). A step must
    // not be taken behind their backs: a proxy that comes back holding a certificate from a
    // root the bundle no longer has is refused by every peer.
    for why in registry.awaited() {
        f.proxies += 1;
        f.behind_bundle.push(why.clone());
        f.behind_intermediate.push(why);
    }
    f.behind_bundle.sort();
    f.behind_intermediate.sort();
    f
}

fn change_status(e: CaChangeError) -> Status {
    match e {
        CaChangeError::Ca(moat_ca::CaError::Rotation(m)) => Status::failed_precondition(m),
        CaChangeError::Conflict => Status::aborted(e.to_string()),
        CaChangeError::Store(_) => Status::unavailable(format!("{e}; try again")),
        e => Status::internal(e.to_string()),
    }
}

/// Tells every proxy, on every replica, to renew under the CA now in force.
async fn renew_all(cp: &ControlPlane) -> Result<(), Status> {
    cp.mesh.rotate(None).await.map(|_| ()).map_err(|e| {
        Status::unavailable(format!(
            "the CA changed, but the proxies could not be told to renew: {e}; run `moat rotate --all`"
        ))
    })
}

/// Puts the stored CA in force here if another replica changed it (before handing out a
/// command given under that CA).
pub async fn catch_up(cp: &ControlPlane) {
    match cp.ca.reload().await {
        Ok(true) => {
            tracing::info!(roots = ?cp.ca.current().bundle().fingerprints(), "the CA changed in the store; following it");
            if let Err(e) = propagate(cp) {
                tracing::error!(error = %e.message(), "cannot follow the CA change");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot read the CA from the store"),
    }
}

/// Puts every CA change committed to the store in force here, whichever replica made it: the
/// CA this process signs with, its own certificates and the bundle its proxies get. A lag
/// (missed changes) reloads the same way.
pub async fn follow_store(cp: Arc<ControlPlane>) {
    let mut changes = cp.ca.changes().await;
    loop {
        if let Ok(None) = changes.next().await {
            return;
        }
        catch_up(&cp).await;
    }
}

/// After a CA change: the control plane's own certificates follow, and every proxy gets a
/// snapshot with the new bundle.
fn propagate(cp: &ControlPlane) -> Result<(), Status> {
    cp.self_certs.reissue_all().map_err(|e| {
        tracing::error!(error = %e, "cannot reissue the control plane's certificates under the new CA");
        Status::internal(format!(
            "the CA changed but the control plane's own certificates could not follow: {e}"
        ))
    })?;
    cp.mesh.bump();
    Ok(())
}

/// Starts (`start`), advances (`advance`) or only describes the root rotation.
pub async fn root(
    cp: &ControlPlane,
    start: bool,
    advance: bool,
) -> Result<CaRotationStatus, Status> {
    let (state, _) = cp.ca.state().await.map_err(change_status)?;
    let mut taken = String::new();
    match state.root_rotation.as_ref().map(|r| r.phase) {
        None if start => {
            cp.ca
                .change(|s, kek| s.begin_root_rotation(kek).map(Some))
                .await
                .map_err(change_status)?;
            propagate(cp)?;
            taken = "step 1: the new root is in the trust bundle".into();
        }
        Some(RotationPhase::Trusting) if advance => {
            let f = fleet(cp);
            if f.on_bundle == f.proxies {
                cp.ca
                    .change(|s, kek| s.issue_under_new_root(kek).map(Some))
                    .await
                    .map_err(change_status)?;
                propagate(cp)?;
                renew_all(cp).await?;
                taken = "step 2: issuing from the new root; every proxy told to renew".into();
            }
        }
        Some(RotationPhase::Issuing) if advance => {
            let f = fleet(cp);
            if f.on_intermediate == f.proxies {
                cp.ca
                    .change(|s, _| s.finish_root_rotation().map(Some))
                    .await
                    .map_err(change_status)?;
                propagate(cp)?;
                taken = "step 3: the old root is out of the trust bundle".into();
            }
        }
        _ => {}
    }
    if !taken.is_empty() {
        tracing::info!(step = %taken, "root rotation");
    }
    status(cp, taken).await
}

/// Who asks for an intermediate rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requested {
    /// `moat ca rotate-intermediate`: refused during a root rotation, so the operator finishes
    /// one CA change before starting another.
    ByOperator,
    /// The control plane itself, because the intermediate is due: allowed in any phase (the
    /// issuing root stays the same), since expiry does not wait for a rotation to finish.
    Automatic,
}

/// Starts an intermediate rotation (`start`), or only describes how far the fleet is.
pub async fn intermediate(
    cp: &ControlPlane,
    start: bool,
    requested: Requested,
) -> Result<CaRotationStatus, Status> {
    let mut taken = String::new();
    if start && requested == Requested::ByOperator {
        let (state, _) = cp.ca.state().await.map_err(change_status)?;
        if let Some(r) = &state.root_rotation {
            return Err(Status::failed_precondition(format!(
                "a root rotation is in progress ({}); finish it with `moat ca rotate-root` first",
                r.phase.as_str()
            )));
        }
    }
    if start {
        cp.ca
            .change(|s, kek| s.rotate_intermediate(kek).map(Some))
            .await
            .map_err(change_status)?;
        propagate(cp)?;
        renew_all(cp).await?;
        taken = "issuing from a new intermediate; every proxy told to renew".into();
        tracing::info!("rotated the intermediate");
    }
    status(cp, taken).await
}

async fn status(cp: &ControlPlane, step_taken: String) -> Result<CaRotationStatus, Status> {
    let (state, _) = cp.ca.state().await.map_err(change_status)?;
    let f = fleet(cp);
    let rotation = state.root_rotation.as_ref();
    let (waiting_for, waiting) = match rotation.map(|r| r.phase) {
        Some(RotationPhase::Trusting) => (
            "every proxy to acknowledge the bundle with both roots (then step 2 switches issuance)",
            f.behind_bundle,
        ),
        Some(RotationPhase::Issuing) => (
            "every proxy to hold a certificate from the new root (then step 3 retires the old root)",
            f.behind_intermediate,
        ),
        None if f.on_bundle < f.proxies => (
            "every proxy to acknowledge the current bundle",
            f.behind_bundle,
        ),
        None if f.on_intermediate < f.proxies => (
            "every proxy to renew from the current intermediate",
            f.behind_intermediate,
        ),
        None => ("", Vec::new()),
    };
    Ok(CaRotationStatus {
        phase: rotation
            .map(|r| r.phase.as_str())
            .unwrap_or("none")
            .to_owned(),
        step_taken,
        old_root_sha256: rotation
            .map(|r| r.old_root_sha256.clone())
            .unwrap_or_default(),
        new_root_sha256: rotation
            .map(|r| r.new_root_sha256.clone())
            .unwrap_or_default(),
        started_unix: rotation.map(|r| r.started_unix).unwrap_or_default(),
        phase_unix: rotation.map(|r| r.phase_unix).unwrap_or_default(),
        bundle_sha256: f.bundle,
        intermediate_sha256: f.intermediate,
        proxies: f.proxies,
        on_current_bundle: f.on_bundle,
        on_current_intermediate: f.on_intermediate,
        waiting_for: waiting_for.to_owned(),
        waiting,
    })
}

/// The audit actor for changes the control plane makes by itself.
const AUTOMATIC: &str = "moat-control (automatic)";

/// Writes the audit entry for an automatic intermediate rotation.
pub async fn record_automatic(cp: &ControlPlane, expired: bool, when: &str) {
    let target = sha256_hex(cp.ca.current().intermediate());
    let detail = if expired {
        format!("{when}: the previous intermediate had expired")
    } else {
        format!("{when}: the previous intermediate had passed its rotation point")
    };
    cp.audit_or_log(
        AUTOMATIC,
        "ca.rotate-intermediate",
        &target,
        crate::audit::Outcome::Ok,
        &detail,
    )
    .await;
}

/// Replaces the intermediate once it has lived `at` of its life, checking every `every`. A
/// rotation changes no trust (the root stays), so it needs no fleet step: every proxy is told to
/// renew, and certificates from the previous intermediate stay valid until they expire. A CA
/// that cannot issue any more while running (its root expired) is logged loudly; the next start
/// enters recovery mode.
pub async fn auto_rotate_loop(
    cp: std::sync::Arc<ControlPlane>,
    at: moat_ca::RotateAt,
    every: std::time::Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let state = match cp.ca.state().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the CA state to check its lifetime");
                continue;
            }
        };
        match state.health(moat_identity::clock::unix_now(), at) {
            Ok(moat_ca::Health::Issuing { .. }) => {}
            Ok(moat_ca::Health::RotateIntermediate { expired, not_after }) => {
                match intermediate(&cp, true, Requested::Automatic).await {
                    Ok(_) => {
                        tracing::info!(
                            previous_not_after = not_after,
                            "rotated the intermediate automatically"
                        );
                        record_automatic(&cp, expired, "while running").await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e.message(), "automatic intermediate rotation failed; retrying at the next check");
                    }
                }
            }
            Ok(moat_ca::Health::Stuck(why)) => {
                tracing::error!(reason = %why, "the CA cannot issue certificates");
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the CA certificates"),
        }
    }
}
