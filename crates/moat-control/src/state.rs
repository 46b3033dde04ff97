//! What every gRPC handler shares: the CA, tokens, the audit log, policies, the live mesh state
//! and who is admin.

use std::sync::Arc;

use moat_ca::CertTtl;
use moat_identity::SpiffeId;
use tonic::Status;

use crate::audit::{AuditLog, Outcome};
use crate::listener::ConnInfo;
use crate::mesh_state::MeshState;
use crate::policies::Policies;
use crate::tokens::Tokens;

/// Shared control-plane state.
#[derive(Debug)]
pub struct ControlPlane {
    pub ca: Arc<crate::ca::CaManager>,
    /// The control plane's own certificates, reissued when the CA changes.
    pub self_certs: Arc<crate::self_cert::SelfCerts>,
    pub tokens: Tokens,
    pub audit: AuditLog,
    pub policies: Policies,
    pub revocations: crate::revocations::Revocations,
    pub mesh: Arc<MeshState>,
    pub default_ttl: CertTtl,
    /// The shortest certificate lifetime a caller may ask for.
    pub min_ttl: std::time::Duration,
    /// The longest certificate lifetime issued; a longer request is issued for this long.
    pub max_ttl: std::time::Duration,
    pub admins: Vec<SpiffeId>,
    pub metrics: crate::metrics::Metrics,
}

impl ControlPlane {
    /// Who the caller is, for audit: its SPIFFE ID, else its address.
    pub fn actor<T>(req: &tonic::Request<T>) -> String {
        match req.extensions().get::<ConnInfo>() {
            Some(ConnInfo { peer: Some(p), .. }) => p.verified.id.to_string(),
            Some(ConnInfo { remote, .. }) => remote.to_string(),
            None => "unknown".to_owned(),
        }
    }

    /// Requires an admin identity; a refusal is audited.
    pub async fn require_admin<T>(
        &self,
        req: &tonic::Request<T>,
        action: &str,
    ) -> Result<SpiffeId, Status> {
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.peer.as_ref());
        let (refusal, class, key) = match peer {
            Some(p) if self.admins.contains(&p.verified.id) => return Ok(p.verified.id.clone()),
            Some(p) => (
                Status::permission_denied(format!(
                    "{} is not an admin identity of this control plane",
                    p.verified.id
                )),
                "not-admin",
                p.verified.id.to_string(),
            ),
            None => (
                Status::unauthenticated(
                    "admin calls need mutual TLS with an admin certificate: pass --credentials DIR (the control plane writes one to <data-dir>/admin)",
                ),
                "unauthenticated",
                String::new(),
            ),
        };
        self.metrics
            .admin_refused
            .get_or_create(&crate::metrics::RefusedLabels { reason: class })
            .inc();
        // Sampled: strangers can make these calls as fast as they like.
        self.audit_refusal(
            &format!("admin|{class}|{key}|{action}"),
            &Self::actor(req),
            action,
            "",
            refusal.message(),
        )
        .await;
        Err(refusal)
    }

    /// Audits a refusal that anyone may provoke: the first of its `kind` in a sampling window
    /// is written (with how many like it were left out since the last one), the rest only
    /// counted. A store failure is logged.
    pub async fn audit_refusal(
        &self,
        kind: &str,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) {
        let written = self
            .audit
            .record_sampled(kind, actor, action, target, detail)
            .await;
        log_audit_failure(written, actor, action);
    }

    /// Appends to the audit log; a store failure is logged, since the caller's answer is already
    /// decided.
    pub async fn audit_or_log(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: &str,
    ) {
        let written = self
            .audit
            .record(actor, action, target, outcome, detail)
            .await;
        log_audit_failure(written, actor, action);
    }
}

/// The caller's answer is already decided when the audit log cannot be written: say so loudly.
fn log_audit_failure(written: Result<(), moat_store::StoreError>, actor: &str, action: &str) {
    if let Err(e) = written {
        tracing::error!(error = %e, actor, action, "cannot write the audit log");
    }
}
