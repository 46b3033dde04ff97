//! Who may call at all: every request to the control plane passes [`check`] before any handler
//! sees it, so no handler can forget it. A caller that presented a certificate is refused when
//! that certificate has expired since its TLS session began (a resumed session skips chain
//! verification, so the handshake alone does not catch it) or when its identity or serial is
//! revoked — an admin included: a revoked admin credential can do nothing, not even lift its
//! own revocation; another admin identity has to. Callers without a certificate (bootstrap with
//! a token) pass; the handlers decide what they may do.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::listener::ConnInfo;
use crate::state::ControlPlane;

/// The interceptor for `service` (its name goes into the audit log as the refused action:
/// interceptors do not see the method).
pub fn check(
    cp: Arc<ControlPlane>,
    service: &'static str,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        let Some(conn) = req.extensions().get::<ConnInfo>() else {
            return Ok(req);
        };
        let Some(peer) = conn.peer.as_ref() else {
            return Ok(req);
        };
        let v = &peer.verified;
        let (status, reason) = if v.not_after <= moat_identity::clock::unix_now() {
            (
                Status::unauthenticated(format!(
                    "the certificate presented (serial {}) expired at {} (Unix seconds): bootstrap again with a join token",
                    v.serial, v.not_after
                )),
                "certificate-expired",
            )
        } else if cp.mesh.is_revoked(&v.id, Some(&v.serial)) {
            (
                Status::permission_denied(format!(
                    "{} (or the certificate presented, serial {}) is revoked; another admin identity can lift it with `moat revoke --undo`",
                    v.id, v.serial
                )),
                "revoked",
            )
        } else {
            return Ok(req);
        };
        cp.metrics.refused_caller(reason);
        let action = service;
        let (cp, actor, remote) = (cp.clone(), v.id.to_string(), conn.remote);
        let kind = format!("caller|{reason}|{actor}|{action}");
        let detail = status.message().to_owned();
        // Interceptors are not async: the (sampled) audit entry is written beside the answer.
        tokio::spawn(async move {
            cp.audit_refusal(&kind, &actor, action, &remote.to_string(), &detail)
                .await;
        });
        Err(status)
    }
}
