//! `moat.v1.Identity`: first issuance with a join token, renewal over mTLS.

use std::sync::Arc;
use std::time::Duration;

use moat_api::v1::identity_server::Identity;
use moat_api::v1::{CertifyRequest, CertifyResponse, certify_request};
use moat_ca::{CertTtl, IssuedCert};
use moat_identity::{CsrError, ValidatedCsr};
use tonic::{Request, Response, Status};

use crate::listener::ConnInfo;
use crate::state::ControlPlane;
use crate::tokens::TokenError;

/// A certify request after edge validation.
#[derive(Debug)]
pub struct CertifyInput {
    pub csr: ValidatedCsr,
    /// `None`: the control plane's default. Checked against the configured range by the handler.
    pub ttl: Option<Duration>,
    /// `None`: a renewal over mutual TLS.
    pub credential: Option<certify_request::Credential>,
}

impl TryFrom<CertifyRequest> for CertifyInput {
    type Error = Status;
    fn try_from(req: CertifyRequest) -> Result<Self, Status> {
        let csr = ValidatedCsr::from_der(&req.csr_der).map_err(csr_status)?;
        let ttl = match req.ttl_seconds {
            0 => None,
            s => Some(Duration::from_secs(u64::from(s))),
        };
        Ok(CertifyInput {
            csr,
            ttl,
            credential: req.credential,
        })
    }
}

fn csr_status(e: CsrError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The gRPC status for a token that cannot be redeemed.
pub fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Unknown | TokenError::Expired { .. } => Status::unauthenticated(e.to_string()),
        TokenError::Revoked { .. } | TokenError::WrongIdentity { .. } => {
            Status::permission_denied(e.to_string())
        }
        TokenError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
        TokenError::NoSuchId(_) => Status::not_found(e.to_string()),
        TokenError::Invalid(_) => Status::invalid_argument(e.to_string()),
        TokenError::Store(_) | TokenError::Corrupt(_) => {
            tracing::error!(error = %e, "token store failure");
            Status::unavailable("the control plane cannot read its store; try again")
        }
    }
}

/// Verifies a Kubernetes projected service-account token against the cluster's issuer keys
/// (MeshConfig `spec.kubernetes`) and checks that it proves `wanted`. Returns the actor name
/// (`k8s:<namespace>/<service account>`).
fn service_account(
    cp: &ControlPlane,
    token: &str,
    wanted: &moat_identity::SpiffeId,
) -> Result<String, Status> {
    let policies = cp.mesh.current_policies();
    let Some(k8s) = &policies.mesh.kubernetes else {
        return Err(Status::unauthenticated(
            "this control plane does not accept Kubernetes service-account tokens: set MeshConfig spec.kubernetes (issuer and JWKS of the cluster's service-account signer)",
        ));
    };
    let Some(json) = cp.mesh.jwks.get(crate::jwks::KUBERNETES) else {
        return Err(Status::unavailable(
            "the cluster's service-account keys have not been read yet; try again",
        ));
    };
    let keys = moat_policy::jwt::Jwks::parse(&json, &k8s.issuer.algorithms)
        .map_err(|e| Status::internal(format!("the cluster's service-account keys: {e}")))?;
    let issuer = moat_policy::jwt::TrustedIssuer {
        issuer: k8s.issuer.issuer.clone(),
        algorithms: k8s.issuer.algorithms.clone(),
        clock_skew: k8s.issuer.clock_skew,
        keys,
    };
    let claims = moat_policy::jwt::verify(token, &[issuer]).map_err(|r| {
        Status::unauthenticated(format!(
            "the service-account token is not acceptable: {}",
            r.code()
        ))
    })?;
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.as_str()],
        Some(serde_json::Value::Array(v)) => v.iter().filter_map(|a| a.as_str()).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&k8s.audience.as_str()) {
        return Err(Status::unauthenticated(format!(
            "the service-account token is for audience {audiences:?}, not {:?}: project a token with `audience: {}`",
            k8s.audience, k8s.audience
        )));
    }
    let sub = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("");
    let Some((ns, sa)) = sub
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(Status::unauthenticated(format!(
            "the token's subject {sub:?} is not a service account (system:serviceaccount:NS:NAME)"
        )));
    };
    let proved = moat_identity::SpiffeId::new(
        wanted.trust_domain().clone(),
        ns.parse()
            .map_err(|e| Status::unauthenticated(format!("token namespace {ns:?}: {e}")))?,
        sa.parse()
            .map_err(|e| Status::unauthenticated(format!("token service account {sa:?}: {e}")))?,
    );
    if &proved != wanted {
        return Err(Status::permission_denied(format!(
            "the service-account token proves {proved}, but the CSR asks for {wanted}"
        )));
    }
    Ok(format!("k8s:{ns}/{sa}"))
}

/// The response for a freshly issued certificate.
pub fn certify_response(ca: &moat_ca::CertificateAuthority, issued: IssuedCert) -> CertifyResponse {
    CertifyResponse {
        spiffe_id: issued.id.to_string(),
        chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
        trust_bundle_der: ca.bundle().roots().iter().map(|c| c.to_vec()).collect(),
        refresh_after_unix: issued.refresh_after,
        not_after_unix: issued.not_after,
        serial: issued.serial,
    }
}

/// The Identity service.
#[derive(Clone, Debug)]
pub struct IdentityService(pub Arc<ControlPlane>);

impl IdentityService {
    async fn refuse(
        &self,
        actor: &str,
        target: &str,
        reason: &'static str,
        status: Status,
    ) -> Status {
        self.0.metrics.refused(reason);
        // Sampled per reason, identity and message: anyone can call Certify, so a flood of
        // the same refusal must not grow the audit log one row per call, while each distinct
        // refusal (an expired token, a revoked one, ...) is still written.
        self.0
            .audit_refusal(
                &format!("certify|{reason}|{target}|{}", status.message()),
                actor,
                "certify",
                target,
                status.message(),
            )
            .await;
        status
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let cp = &self.0;
        let conn = req.extensions().get::<ConnInfo>().cloned();
        // A bootstrap's connection keeps its place while this runs: cut after the token is
        // spent, the call could not be made again.
        let _at_work = conn
            .as_ref()
            .and_then(|c| c.at_work.as_ref())
            .map(|c| c.enter());
        let mut actor = ControlPlane::actor(&req);
        let input = match CertifyInput::try_from(req.into_inner()) {
            Ok(i) => i,
            Err(status) => return Err(self.refuse(&actor, "", "bad-request", status).await),
        };
        let target = input.csr.id.to_string();
        let serial = conn
            .as_ref()
            .and_then(|c| c.peer.as_ref())
            .map(|p| p.verified.serial.clone());
        if cp.mesh.is_revoked(&input.csr.id, serial.as_deref()) {
            let status = Status::permission_denied(format!(
                "{} (or the certificate presented) is revoked; an admin can lift it with `moat revoke --undo`",
                input.csr.id
            ));
            return Err(self.refuse(&actor, &target, "revoked", status).await);
        }
        // Checked before the credential, so that a refused request never uses up a join token.
        let ttl = match input.ttl {
            None => cp.default_ttl,
            Some(d) => match CertTtl::within(d, cp.min_ttl) {
                Ok(t) => t.capped(cp.max_ttl),
                Err(e) => {
                    return Err(self
                        .refuse(
                            &actor,
                            &target,
                            "ttl",
                            Status::invalid_argument(e.to_string()),
                        )
                        .await);
                }
            },
        };
        match (
            &input.credential,
            conn.as_ref().and_then(|c| c.peer.as_ref()),
        ) {
            (Some(certify_request::Credential::JoinToken(token)), _) => {
                match cp.tokens.redeem(token, &input.csr.id).await {
                    Ok(rec) => actor = format!("token:{}", rec.id),
                    Err(e) => {
                        return Err(self.refuse(&actor, &target, "token", token_status(e)).await);
                    }
                }
            }
            (Some(certify_request::Credential::KubernetesToken(token)), _) => {
                match service_account(cp, token, &input.csr.id) {
                    Ok(who) => actor = who,
                    Err(status) => {
                        return Err(self
                            .refuse(&actor, &target, "service-account-token", status)
                            .await);
                    }
                }
            }
            (None, Some(peer)) => {
                if peer.verified.id != input.csr.id {
                    let status = Status::permission_denied(format!(
                        "renewal is only for your own identity: you are {}, the CSR asks for {}",
                        peer.verified.id, input.csr.id
                    ));
                    return Err(self.refuse(&actor, &target, "wrong-identity", status).await);
                }
                if peer.spki_der == input.csr.spki_der {
                    let status = Status::invalid_argument(
                        "renewal must use a new key pair: the CSR reuses the key of your current certificate",
                    );
                    return Err(self.refuse(&actor, &target, "same-key", status).await);
                }
            }
            (None, None) => {
                let status = Status::unauthenticated(
                    "no credential: present a join token, or renew over mutual TLS with your current certificate",
                );
                return Err(self.refuse(&actor, &target, "no-credential", status).await);
            }
        }
        let ca = cp.ca.current();
        let issued = match ca.issue(&input.csr.spki_der, &input.csr.id, ttl) {
            Ok(i) => i,
            Err(e @ moat_ca::CaError::ForeignDomain { .. }) => {
                return Err(self
                    .refuse(
                        &actor,
                        &target,
                        "foreign-domain",
                        Status::invalid_argument(e.to_string()),
                    )
                    .await);
            }
            Err(e) => {
                tracing::error!(error = %e, "signing failed");
                return Err(self
                    .refuse(
                        &actor,
                        &target,
                        "signing-failed",
                        Status::internal(format!("signing failed: {e}")),
                    )
                    .await);
            }
        };
        // A renewal is recorded before it is handed out, so that revoking the certificate it
        // was renewed with reaches it (and it is refused when that happened meanwhile).
        if let (None, Some(parent)) = (&input.credential, serial.as_deref()) {
            match cp
                .revocations
                .record_renewal(parent, &issued.serial, issued.not_after)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    let status = Status::permission_denied(format!(
                        "the certificate presented ({parent}) was revoked while this renewal ran; an admin can lift it with `moat revoke --undo`"
                    ));
                    return Err(self.refuse(&actor, &target, "revoked", status).await);
                }
                Err(e) => {
                    let status = Status::unavailable(format!(
                        "cannot record the renewal, so a revocation could not reach it: {e}; try again"
                    ));
                    return Err(self.refuse(&actor, &target, "store", status).await);
                }
            }
        }
        tracing::info!(id = %issued.id, serial = %issued.serial, %actor, renewal = input.credential.is_none(), "issued certificate");
        cp.metrics.issued(match &input.credential {
            Some(certify_request::Credential::JoinToken(_)) => "token",
            Some(certify_request::Credential::KubernetesToken(_)) => "service-account",
            None => "renewal",
        });
        Ok(Response::new(certify_response(&ca, issued)))
    }
}
