//! `moat.v1.Admin`: the operator API. Every call needs an admin identity and is audited.

use std::sync::Arc;
use std::time::Duration;

use moat_api::v1::admin_server::Admin;
use moat_api::v1::{
    ApplyPoliciesRequest, ApplyPoliciesResponse, AuditEntry, CaCertificate, CaRotationStatus,
    CertifyResponse, CreateTokenRequest, CreateTokenResponse, DeletePolicyRequest,
    DeletePolicyResponse, EdgeCounters, IssueCertificateRequest, ListAuditRequest,
    ListAuditResponse, ListEdgesRequest, ListEdgesResponse, ListPoliciesRequest,
    ListPoliciesResponse, ListProxiesRequest, ListProxiesResponse, ListRevocationsRequest,
    ListRevocationsResponse, ListTokensRequest, ListTokensResponse, ObservedCall,
    ObservedTrafficRequest, ObservedTrafficResponse, PolicyHistoryRequest, PolicyHistoryResponse,
    PolicyRevision, PolicyRollout, ProxyStatus, ReasonCount, Revocation as RevocationProto,
    RevokeRequest, RevokeResponse, RevokeTokenRequest, RevokeTokenResponse,
    RotateCertificatesRequest, RotateCertificatesResponse, RotateIntermediateRequest,
    RotateRootRequest, ShowCaRequest, ShowCaResponse, TapRequest, TapResponse, TokenInfo,
    VersionRequest, VersionResponse,
};
use moat_ca::{CaCertInfo, CertTtl};
use moat_identity::{SpiffeId, ValidatedCsr};
use tonic::{Request, Response, Status};

use crate::audit::Outcome;

/// How many of the newest audit entries a filtered listing looks through.
const AUDIT_SCAN: usize = 20_000;
use crate::identity_svc::{certify_response, token_status};
use crate::policies::PolicyError;
use crate::state::ControlPlane;
use crate::tokens::TokenRecord;
use moat_wire::policy_to_proto;

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_AUDIT_LIMIT: u32 = 10_000;

/// A tap's events until the admin certificate that opened it expires or is revoked (decision
/// 48): the caller check saw it valid when the call began, and a tap may stream for hours.
/// Expiry is seen on time; revocation with the next event, or within the 30 s the expiry wait
/// reads the clock in. The stream then ends with `UNAUTHENTICATED` saying why.
struct WhileCertified<S> {
    events: S,
    mesh: Arc<crate::mesh_state::MeshState>,
    id: SpiffeId,
    serial: String,
    expiry: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ended: bool,
}

impl<T, S> tokio_stream::Stream for WhileCertified<S>
where
    S: tokio_stream::Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        let why = if self.expiry.as_mut().poll(cx).is_ready() {
            Some("has expired")
        } else if self.mesh.is_revoked(&self.id, Some(&self.serial)) {
            Some("has been revoked")
        } else {
            None
        };
        if let Some(why) = why {
            self.ended = true;
            return Poll::Ready(Some(Err(Status::unauthenticated(format!(
                "the admin certificate that opened this tap (serial {}) {why}: tap again with a valid one",
                self.serial
            )))));
        }
        std::pin::Pin::new(&mut self.events).poll_next(cx)
    }
}

/// An open tap, closed (and its proxies told) when dropped with its response stream.
#[derive(Debug)]
struct OpenTap {
    mesh: Arc<crate::mesh_state::MeshState>,
    id: u64,
}

impl Drop for OpenTap {
    fn drop(&mut self) {
        if self.mesh.taps.close(self.id) {
            self.mesh.bump();
        }
    }
}

/// The Admin service.
#[derive(Clone, Debug)]
pub struct AdminService(pub Arc<ControlPlane>);

fn token_info(r: TokenRecord) -> TokenInfo {
    TokenInfo {
        id: r.id,
        spiffe_id: r.spiffe_id,
        created_unix: r.created_unix,
        expires_unix: r.expires_unix,
        max_uses: r.max_uses,
        uses: r.uses,
        revoked: r.revoked,
    }
}

fn ca_cert(c: CaCertInfo) -> CaCertificate {
    CaCertificate {
        subject: c.subject,
        sha256_fingerprint: c.sha256,
        not_before_unix: c.not_before,
        not_after_unix: c.not_after,
        pem: c.pem,
    }
}

impl AdminService {
    fn identity(&self, s: &str) -> Result<SpiffeId, Status> {
        let id = SpiffeId::parse_with_default(s, self.0.ca.current().trust_domain())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if id.trust_domain() != self.0.ca.current().trust_domain() {
            return Err(Status::invalid_argument(format!(
                "{id} is outside this mesh's trust domain {}",
                self.0.ca.current().trust_domain()
            )));
        }
        Ok(id)
    }

    /// Audits the outcome of an admin call and passes it through.
    async fn audited<T>(
        &self,
        actor: &SpiffeId,
        action: &str,
        target: &str,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let (outcome, detail) = match &result {
            Ok(_) => (Outcome::Ok, String::new()),
            Err(s) => (Outcome::Refused, s.message().to_owned()),
        };
        self.0
            .audit_or_log(&actor.to_string(), action, target, outcome, &detail)
            .await;
        result
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let actor = self.0.require_admin(&req, "token.create").await?;
        let r = req.into_inner();
        let result = async {
            let id = self.identity(&r.identity)?;
            let ttl = match r.ttl_seconds {
                0 => DEFAULT_TOKEN_TTL,
                s => Duration::from_secs(s),
            };
            let uses = r.max_uses.max(1);
            let (token, rec) = self
                .0
                .tokens
                .create(&id, ttl, uses)
                .await
                .map_err(token_status)?;
            Ok(CreateTokenResponse {
                token,
                info: Some(token_info(rec)),
            })
        }
        .await;
        let target = result
            .as_ref()
            .ok()
            .and_then(|r| r.info.as_ref())
            .map(|i| format!("{} ({})", i.spiffe_id, i.id))
            .unwrap_or(r.identity);
        self.audited(&actor, "token.create", &target, result)
            .await
            .map(Response::new)
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let actor = self.0.require_admin(&req, "token.list").await?;
        let result = self
            .0
            .tokens
            .list()
            .await
            .map(|l| ListTokensResponse {
                tokens: l.into_iter().map(token_info).collect(),
            })
            .map_err(token_status);
        self.audited(&actor, "token.list", "", result)
            .await
            .map(Response::new)
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let actor = self.0.require_admin(&req, "token.revoke").await?;
        let id = req.into_inner().id;
        let result = self
            .0
            .tokens
            .revoke(&id)
            .await
            .map(|r| RevokeTokenResponse {
                info: Some(token_info(r)),
            })
            .map_err(token_status);
        self.audited(&actor, "token.revoke", &id, result)
            .await
            .map(Response::new)
    }

    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let actor = self.0.require_admin(&req, "version.show").await?;
        let resp = VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            trust_domain: self.0.ca.current().trust_domain().to_string(),
        };
        self.audited(&actor, "version.show", "", Ok(resp))
            .await
            .map(Response::new)
    }

    async fn show_ca(
        &self,
        req: Request<ShowCaRequest>,
    ) -> Result<Response<ShowCaResponse>, Status> {
        let actor = self.0.require_admin(&req, "ca.show").await?;
        let ca = self.0.ca.current();
        let resp = ShowCaResponse {
            trust_domain: ca.trust_domain().to_string(),
            roots: ca.roots_info().into_iter().map(ca_cert).collect(),
            intermediate: ca.intermediate_info().map(ca_cert),
            bundle_pem: ca.bundle().to_pem(),
            default_ttl_seconds: self.0.default_ttl.get().as_secs() as u32,
        };
        self.audited(&actor, "ca.show", "", Ok(resp))
            .await
            .map(Response::new)
    }

    async fn issue_certificate(
        &self,
        req: Request<IssueCertificateRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let actor = self.0.require_admin(&req, "cert.issue").await?;
        let r = req.into_inner();
        let csr =
            ValidatedCsr::from_der(&r.csr_der).map_err(|e| Status::invalid_argument(e.to_string()));
        let target = csr.as_ref().map(|c| c.id.to_string()).unwrap_or_default();
        let result = (|| {
            let csr = csr?;
            let ttl = match r.ttl_seconds {
                0 => self.0.default_ttl,
                s => CertTtl::new(Duration::from_secs(u64::from(s)))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
                    .capped(self.0.max_ttl),
            };
            let ca = self.0.ca.current();
            let issued = ca
                .issue(&csr.spki_der, &csr.id, ttl)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            self.0.metrics.issued("admin");
            Ok(certify_response(&ca, issued))
        })();
        self.audited(&actor, "cert.issue", &target, result)
            .await
            .map(Response::new)
    }

    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.0.require_admin(&req, "audit.list").await?;
        let r = req.into_inner();
        let limit = r.limit;
        let outcome = match r.outcome.as_str() {
            "" => Ok(None),
            word => word
                .parse::<Outcome>()
                .map(Some)
                .map_err(|e| Status::invalid_argument(e.to_string())),
        };
        let result = if limit > MAX_AUDIT_LIMIT {
            Err(Status::invalid_argument(format!(
                "limit {limit} is above {MAX_AUDIT_LIMIT}"
            )))
        } else if let Err(e) = outcome {
            Err(e)
        } else {
            let limit = if limit == 0 { 100 } else { limit as usize };
            let filter = crate::audit::Filter {
                changes_only: r.changes_only,
                outcome: outcome.ok().flatten(),
                action_prefix: r.action_prefix,
                actor: r.actor,
            };
            self.0
                .audit
                .newest(limit, &filter, AUDIT_SCAN)
                .await
                .map(|entries| ListAuditResponse {
                    entries: entries
                        .into_iter()
                        .map(|e| AuditEntry {
                            time_unix_ms: e.time_unix_ms,
                            actor: e.actor,
                            action: e.action,
                            target: e.target,
                            outcome: e.outcome.as_str().to_owned(),
                            detail: e.detail,
                        })
                        .collect(),
                })
                .map_err(|e| Status::unavailable(e.to_string()))
        };
        // Reading the log is not itself logged, so that reading it does not grow it.
        result.map(Response::new)
    }

    async fn apply_policies(
        &self,
        req: Request<ApplyPoliciesRequest>,
    ) -> Result<Response<ApplyPoliciesResponse>, Status> {
        let actor = self.0.require_admin(&req, "policy.apply").await?;
        let sources: Vec<(String, String)> = req
            .into_inner()
            .sources
            .into_iter()
            .map(|s| (s.name, s.text))
            .collect();
        let names = sources
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let result = self
            .0
            .policies
            .apply(&sources, &actor.to_string())
            .await
            .map(|(policies, mesh)| ApplyPoliciesResponse {
                policies: policies.iter().map(policy_to_proto).collect(),
                default_posture: mesh
                    .map(|m| m.default_posture.as_str().to_owned())
                    .unwrap_or_default(),
            })
            .map_err(policy_status);
        self.audited(&actor, "policy.apply", &names, result)
            .await
            .map(Response::new)
    }

    async fn list_policies(
        &self,
        req: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let actor = self.0.require_admin(&req, "policy.list").await?;
        let owners: std::collections::HashMap<String, crate::policies::Owner> =
            match self.0.policies.owned().await {
                Ok(o) => o.into_iter().collect(),
                Err(e) => return Err(policy_status(e)),
            };
        let result = self
            .0
            .policies
            .load()
            .await
            .map(|set| {
                let registry = self.0.mesh.registry();
                ListPoliciesResponse {
                    policies: set.policies.iter().map(policy_to_proto).collect(),
                    default_posture: set.mesh.default_posture.as_str().to_owned(),
                    mesh_document: moat_policy::mesh_config_yaml(&set.mesh),
                    documents: set
                        .policies
                        .iter()
                        .map(moat_policy::access_policy_yaml)
                        .collect(),
                    rollout: set
                        .policies
                        .iter()
                        .map(|p| {
                            let (proxies, applied) =
                                registry.rollout(&p.target, &p.key(), p.version.0);
                            let counters = registry
                                .hits(&p.key())
                                .into_iter()
                                .map(|((rule, decision), count)| moat_api::v1::RuleCounter {
                                    policy: p.key(),
                                    version: p.version.0,
                                    rule: rule.map(|r| r as i32).unwrap_or(-1),
                                    decision: decision.to_owned(),
                                    count,
                                })
                                .collect();
                            PolicyRollout {
                                proxies,
                                applied,
                                counters,
                                managed_by: owners
                                    .get(&p.key())
                                    .map(|o| format!("{} {}", o.kind, o.resource))
                                    .unwrap_or_default(),
                            }
                        })
                        .collect(),
                }
            })
            .map_err(policy_status);
        self.audited(&actor, "policy.list", "", result)
            .await
            .map(Response::new)
    }

    async fn delete_policy(
        &self,
        req: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let actor = self.0.require_admin(&req, "policy.delete").await?;
        let name = req.into_inner().name;
        let result = self
            .0
            .policies
            .delete(&name, &actor.to_string())
            .await
            .map(|()| DeletePolicyResponse {})
            .map_err(policy_status);
        self.audited(&actor, "policy.delete", &name, result)
            .await
            .map(Response::new)
    }

    async fn list_edges(
        &self,
        req: Request<ListEdgesRequest>,
    ) -> Result<Response<ListEdgesResponse>, Status> {
        let actor = self.0.require_admin(&req, "edges.list").await?;
        let edges = self
            .0
            .mesh
            .registry()
            .edges()
            .into_iter()
            .map(|((_, target), sum)| EdgeCounters {
                peer: sum.report.peer,
                requests: sum.report.requests,
                failures: sum.report.failures,
                denied: sum
                    .report
                    .denied
                    .into_iter()
                    .map(|(reason, count)| ReasonCount { reason, count })
                    .collect(),
                latency_buckets: sum.report.buckets,
                target: target.to_string(),
                proxies: sum.proxies,
            })
            .collect();
        let resp = ListEdgesResponse {
            edges,
            bucket_bounds_ms: moat_metrics::EDGE_LATENCY_BOUNDS_MS.to_vec(),
        };
        self.audited(&actor, "edges.list", "", Ok(resp))
            .await
            .map(Response::new)
    }

    async fn observed_traffic(
        &self,
        req: Request<ObservedTrafficRequest>,
    ) -> Result<Response<ObservedTrafficResponse>, Status> {
        let actor = self.0.require_admin(&req, "traffic.observed.list").await?;
        let r = req.into_inner();
        let target = self.identity(&r.target)?;
        let since = match r.since_seconds {
            0 => i64::MIN,
            s => moat_identity::clock::unix_now() - i64::from(s),
        };
        let result = self
            .0
            .policies
            .load()
            .await
            .map_err(policy_status)
            .map(|set| {
                let targeting: Vec<_> =
                    set.policies.iter().filter(|p| p.target == target).collect();
                let watching = moat_policy::suggest::Watching::of(
                    targeting.iter().copied(),
                    set.mesh.default_posture,
                );
                let (calls, proxies) = self.0.mesh.registry().observed(&target, since);
                ObservedTrafficResponse {
                    target: target.to_string(),
                    calls: calls
                        .into_iter()
                        .map(|(k, (count, seen))| ObservedCall {
                            peer: k.peer,
                            port: u32::from(k.port),
                            method: k.method,
                            path: k.path,
                            count,
                            last_seen_unix: seen,
                        })
                        .collect(),
                    proxies: proxies as u32,
                    watching: watching.as_str().to_owned(),
                    policy: match &targeting[..] {
                        [one] => one.key(),
                        _ => String::new(),
                    },
                }
            });
        self.audited(&actor, "traffic.observed.list", &target.to_string(), result)
            .await
            .map(Response::new)
    }

    type TapStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<TapResponse, Status>> + Send + 'static>,
    >;

    async fn tap(&self, req: Request<TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        use tokio_stream::StreamExt as _;
        let actor = self.0.require_admin(&req, "traffic.tap").await?;
        let certificate = req
            .extensions()
            .get::<crate::listener::ConnInfo>()
            .and_then(|c| c.peer.as_ref())
            .map(|p| (p.verified.serial.clone(), p.verified.not_after))
            .ok_or_else(|| Status::unauthenticated("a tap needs an admin certificate"))?;
        let r = req.into_inner();
        let target = self.identity(&r.target)?;
        let from = match r.from.as_str() {
            "" => None,
            f => Some(self.identity(f)?),
        };
        let filter = crate::tap::filter_of(&r, from.as_ref()).map_err(Status::invalid_argument);
        let filter = self
            .audited(&actor, "traffic.tap", &target.to_string(), filter)
            .await?;
        let mesh = &self.0.mesh;
        let proxies = mesh.registry().entries().filter(|p| p.id == target).count() as u32;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let first = TapResponse {
            target: target.to_string(),
            proxies,
            ..TapResponse::default()
        };
        tx.try_send(first)
            .map_err(|_| Status::internal("cannot start the tap stream"))?;
        let id = mesh.taps.open(target, filter, r.limit, tx);
        mesh.bump();
        // Held by the response stream: the tap closes when the client goes away.
        let open = OpenTap {
            mesh: mesh.clone(),
            id,
        };
        let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |m| {
            let _open = &open;
            Ok(m)
        });
        let (serial, not_after) = certificate;
        Ok(Response::new(Box::pin(WhileCertified {
            events,
            mesh: mesh.clone(),
            id: actor,
            serial,
            expiry: Box::pin(moat_tls::expiry::expired(not_after)),
            ended: false,
        })))
    }

    async fn policy_history(
        &self,
        req: Request<PolicyHistoryRequest>,
    ) -> Result<Response<PolicyHistoryResponse>, Status> {
        let actor = self.0.require_admin(&req, "policy.history").await?;
        let name = req.into_inner().name;
        let result = self
            .0
            .policies
            .history(&name)
            .await
            .map(|revs| PolicyHistoryResponse {
                revisions: revs
                    .into_iter()
                    .map(|r| PolicyRevision {
                        version: r.version,
                        time_unix_ms: r.time_unix_ms,
                        actor: r.actor,
                        change: r.change,
                        document: r.document,
                    })
                    .collect(),
            })
            .map_err(policy_status);
        self.audited(&actor, "policy.history", &name, result)
            .await
            .map(Response::new)
    }

    async fn list_proxies(
        &self,
        req: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        self.0.require_admin(&req, "proxy.list").await?;
        let bundle = self.0.ca.current().bundle().fingerprints();
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        let mut proxies: Vec<ProxyStatus> = self
            .0
            .mesh
            .registry()
            .fleet()
            .map(|p| ProxyStatus {
                spiffe_id: p.id.to_string(),
                inbound_address: p.inbound_address.clone(),
                proxy_version: p.proxy_version.clone(),
                cert_serial: p.cert_serial.clone(),
                cert_not_after_unix: p.cert_not_after,
                snapshot_applied: p.applied_version,
                snapshot_sent: p.sent.as_ref().map(|s| s.version).unwrap_or(0),
                bundle_current: p.applied_bundle == bundle,
                policies: p
                    .applied_policies
                    .iter()
                    .map(|(k, v)| format!("{k}@{v}"))
                    .collect(),
                connected_unix_ms: ms(p.connected_at),
                last_seen_unix_ms: ms(p.last_seen),
                last_error: p.last_error.clone().unwrap_or_default(),
                remote_address: p.remote.clone(),
                cert_refresh_after_unix: p.cert_refresh_after,
            })
            .collect();
        let disconnected = self
            .0
            .mesh
            .registry()
            .disconnected()
            .into_iter()
            .map(|d| moat_api::v1::DisconnectedProxy {
                spiffe_id: d.id.to_string(),
                inbound_address: d.inbound_address,
                cert_serial: d.cert_serial,
                cert_not_after_unix: d.cert_not_after,
                disconnected_unix_ms: ms(d.at),
            })
            .collect();
        proxies.sort_by(|a, b| {
            (&a.spiffe_id, &a.inbound_address).cmp(&(&b.spiffe_id, &b.inbound_address))
        });
        let posture = self
            .0
            .mesh
            .policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .mesh
            .default_posture;
        // Read-only and frequent (dashboards, cron): not audited, like audit.list.
        Ok(Response::new(ListProxiesResponse {
            proxies,
            bundle_sha256: bundle,
            default_posture: posture.as_str().to_owned(),
            server_time_unix_ms: ms(std::time::SystemTime::now()),
            disconnected,
        }))
    }

    async fn rotate_certificates(
        &self,
        req: Request<RotateCertificatesRequest>,
    ) -> Result<Response<RotateCertificatesResponse>, Status> {
        let actor = self.0.require_admin(&req, "cert.rotate").await?;
        let r = req.into_inner();
        let (target, result) = match (r.all, r.identity.is_empty()) {
            (true, true) => ("all".to_owned(), Ok(None)),
            (false, false) => (r.identity.clone(), self.identity(&r.identity).map(Some)),
            _ => (
                r.identity.clone(),
                Err(Status::invalid_argument(
                    "give either an identity or `all`, not both or neither",
                )),
            ),
        };
        let result = match result {
            Ok(id) => self
                .0
                .mesh
                .rotate(id.as_ref())
                .await
                .map(|proxies| RotateCertificatesResponse { proxies })
                .map_err(|e| Status::unavailable(e.to_string())),
            Err(e) => Err(e),
        };
        self.audited(&actor, "cert.rotate", &target, result)
            .await
            .map(Response::new)
    }

    async fn rotate_root(
        &self,
        req: Request<RotateRootRequest>,
    ) -> Result<Response<CaRotationStatus>, Status> {
        let actor = self.0.require_admin(&req, "ca.rotate-root").await?;
        let r = req.into_inner();
        let result = crate::ca_rotation::root(&self.0, r.start, r.advance).await;
        // Progress polls are not audited; steps taken and refusals are.
        match &result {
            Ok(s) if s.step_taken.is_empty() => result.map(Response::new),
            Ok(s) => {
                let target = s.new_root_sha256.clone();
                let detail = s.step_taken.clone();
                self.0
                    .audit_or_log(
                        &actor.to_string(),
                        "ca.rotate-root",
                        &target,
                        Outcome::Ok,
                        &detail,
                    )
                    .await;
                result.map(Response::new)
            }
            Err(_) => self
                .audited(&actor, "ca.rotate-root", "", result)
                .await
                .map(Response::new),
        }
    }

    async fn rotate_intermediate(
        &self,
        req: Request<RotateIntermediateRequest>,
    ) -> Result<Response<CaRotationStatus>, Status> {
        let actor = self.0.require_admin(&req, "ca.rotate-intermediate").await?;
        let start = req.into_inner().start;
        let result = crate::ca_rotation::intermediate(
            &self.0,
            start,
            crate::ca_rotation::Requested::ByOperator,
        )
        .await;
        if start || result.is_err() {
            let target = result
                .as_ref()
                .map(|s| s.intermediate_sha256.clone())
                .unwrap_or_default();
            return self
                .audited(&actor, "ca.rotate-intermediate", &target, result)
                .await
                .map(Response::new);
        }
        result.map(Response::new)
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        use crate::revocations::{RequestError, RevokeError, Target};
        let actor = self.0.require_admin(&req, "revoke").await?;
        let r = req.into_inner();
        let action = if r.undo { "revoke.undo" } else { "revoke" };
        let named = if r.identity.is_empty() {
            r.serial.clone()
        } else {
            r.identity.clone()
        };
        let result = async {
            let target = match (r.identity.is_empty(), r.serial.is_empty()) {
                (false, true) => Target::Identity(self.identity(&r.identity)?),
                (true, false) => Target::Serial(r.serial.clone()),
                _ => {
                    return Err(Status::invalid_argument(
                        "give exactly one of an identity or a serial",
                    ));
                }
            };
            let (connected, proxies) = {
                let registry = self.0.mesh.registry();
                let serials: Vec<String> =
                    registry.fleet().map(|p| p.cert_serial.clone()).collect();
                let n = serials.len() as u32;
                (serials, n)
            };
            let done = self
                .0
                .revocations
                .request(target, r.undo, &connected, &r.reason, &actor.to_string())
                .await
                .map_err(|e| match e {
                    RequestError::Serial(_) => Status::invalid_argument(e.to_string()),
                    RequestError::NotRevoked(..) => Status::not_found(e.to_string()),
                    RequestError::Reached(..) => Status::failed_precondition(e.to_string()),
                    RequestError::Revoke(RevokeError::Full { .. }) => {
                        Status::resource_exhausted(e.to_string())
                    }
                    RequestError::Revoke(RevokeError::Store(_)) | RequestError::Store(_) => {
                        Status::unavailable(format!("{e}; try again"))
                    }
                })?;
            let revocation = if r.undo {
                // What was lifted: its kind and value.
                RevocationProto {
                    kind: done.kind.as_str().into(),
                    value: done.value,
                    ..RevocationProto::default()
                }
            } else {
                revocation_proto(done)
            };
            Ok(RevokeResponse {
                revocation: Some(revocation),
                proxies,
            })
        }
        .await;
        self.audited(&actor, action, &named, result)
            .await
            .map(Response::new)
    }

    async fn list_revocations(
        &self,
        req: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        self.0.require_admin(&req, "revoke.list").await?;
        let list = self
            .0
            .revocations
            .list()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ListRevocationsResponse {
            revocations: list.into_iter().map(revocation_proto).collect(),
        }))
    }
}

fn policy_status(e: PolicyError) -> Status {
    match e {
        PolicyError::Invalid(_) | PolicyError::Request(_) => {
            Status::invalid_argument(e.to_string())
        }
        PolicyError::NotFound(_) => Status::not_found(e.to_string()),
        PolicyError::Owned { .. } => Status::failed_precondition(e.to_string()),
        PolicyError::Store(_) | PolicyError::Corrupt { .. } => {
            tracing::error!(error = %e, "policy store failure");
            Status::unavailable(format!(
                "the control plane cannot use its policy store: {e}"
            ))
        }
    }
}

fn revocation_proto(r: crate::revocations::Revocation) -> RevocationProto {
    RevocationProto {
        kind: r.kind.as_str().into(),
        value: r.value,
        reason: r.reason,
        actor: r.actor,
        time_unix_ms: r.time_unix_ms,
        expires_unix: r.expires_unix,
    }
}
