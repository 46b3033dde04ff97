//! `moat.v1.Identity`: first issuance with a join token, renewal over mTLS.

use std::sync::Arc;
use std::time::Duration;

use moat_api::v1::identity_server::Identity;
use moat_api::v1::{CertifyRequest, CertifyResponse, certify_request};
use moat_ca::{CertTtl, IssuedCert};
use moat_identity::{CsrError, ValidatedCsr};
use tonic::{Request, Response, Status};

use crate::audit::Outcome;
use crate::listener::ConnInfo;
use crate::state::ControlPlane;
use crate::tokens::TokenError;

/// A certify request after edge validation.
#[derive(Debug)]
pub struct CertifyInput {
    pub csr: ValidatedCsr,
    /// `None`: the control plane's default. Checked against the configured range by the handler.
    pub ttl: Option<Duration>,
    pub join_token: Option<String>,
}

impl TryFrom<CertifyRequest> for CertifyInput {
    type Error = Status;
    fn try_from(req: CertifyRequest) -> Result<Self, Status> {
        let csr = ValidatedCsr::from_der(&req.csr_der).map_err(csr_status)?;
        let ttl = match req.ttl_seconds {
            0 => None,
            s => Some(Duration::from_secs(u64::from(s))),
        };
        let join_token = req.credential.map(|c| match c {
            certify_request::Credential::JoinToken(t) => t,
        });
        Ok(CertifyInput {
            csr,
            ttl,
            join_token,
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
        self.0
            .audit_or_log(actor, "certify", target, Outcome::Refused, status.message())
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
        match (
            &input.join_token,
            conn.as_ref().and_then(|c| c.peer.as_ref()),
        ) {
            (Some(token), _) => match cp.tokens.redeem(token, &input.csr.id).await {
                Ok(rec) => actor = format!("token:{}", rec.id),
                Err(e) => return Err(self.refuse(&actor, &target, "token", token_status(e)).await),
            },
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
        let ttl = match input.ttl {
            None => cp.default_ttl,
            Some(d) => match CertTtl::within(d, cp.min_ttl) {
                Ok(t) => t,
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
        tracing::info!(id = %issued.id, serial = %issued.serial, %actor, renewal = input.join_token.is_none(), "issued certificate");
        cp.metrics.issued(if input.join_token.is_some() {
            "token"
        } else {
            "renewal"
        });
        Ok(Response::new(certify_response(&ca, issued)))
    }
}
