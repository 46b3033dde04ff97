//! The moat control plane: the mesh's certificate authority and its gRPC API.
//!
//! `serve` brings the store (`store_config`), the CA (`ca`, unsealed with the KEK from
//! `kek_source`) and the control plane's own certificates (`self_cert`) up, joins the replicas
//! (`replica`: lease and leader election), then serves `Identity` (`identity_svc`), `Admin`
//! (`admin_svc`) and `Mesh` (`mesh_svc`) over TLS 1.3 (`listener`), every call first passing
//! the caller check (`caller`). Join tokens live in `tokens`, the audit log in `audit`, and what
//! the handlers share in `state`. The binary in `main.rs` only parses flags.
//!
//! The mesh's state flows one way, the same on every replica: the store is the only source of
//! truth; watches bring its changes in (`mesh_follow` for policies, revocations and key sets
//! (`key_sets`, read by the leader with `jwks`), `fleet` for the other replicas' proxies,
//! `rotations`, `ca_rotation`); they land in the live
//! state (`mesh_state`, with the proxy `registry`); each change becomes one shared view built by
//! pure code (`mesh_view`), and every stream diffs its proxy's snapshot from it. Messages from
//! proxies are checked at the gRPC edge (`mesh_proto`).

pub mod admin_http;
pub mod admin_svc;
pub mod anonymous;
pub mod audit;
pub mod ca;
pub mod ca_rotation;
pub mod caller;
pub mod fleet;
pub mod identity_svc;
pub mod jwks;
pub mod kek_source;
pub mod key_sets;
pub mod kube_api;
pub mod kube_bundle;
pub mod kube_policies;
pub mod listener;
pub mod mesh_follow;
pub mod mesh_proto;
pub mod mesh_state;
pub mod mesh_svc;
pub mod mesh_view;
pub mod metrics;
pub mod offline;
pub mod orphans;
pub mod policies;
pub mod recovery;
pub mod registry;
pub mod replica;
pub mod revocations;
pub mod rotations;
pub mod self_cert;
pub mod state;
pub mod store_config;
pub mod tap;
pub mod tokens;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use moat_api::v1::admin_server::AdminServer;
use moat_api::v1::identity_server::IdentityServer;
use moat_api::v1::mesh_server::MeshServer;
use moat_ca::CertTtl;
use moat_identity::{SpiffeId, TrustDomain};
use moat_store::{EmbeddedStore, Store};
use tonic::service::interceptor::InterceptedService;

/// The largest gRPC message the control plane decodes. CSRs are checked against their own,
/// much smaller limit so that an oversized one is answered with `InvalidArgument`.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Everything `moat-control serve` needs, parsed from flags and environment by the binary.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Where the state lives: the embedded file in `data_dir`, or etcd.
    pub store: store_config::StoreConfig,
    pub listen: SocketAddr,
    /// The process's limit on open files, which the gRPC port's pending handshakes stay under
    /// (`moat_tls::pending::raise_open_file_limit`, at start-up).
    pub open_files: u64,
    pub trust_domain: TrustDomain,
    pub kek: kek_source::KekSource,
    pub import: ca::ImportPaths,
    pub default_ttl: CertTtl,
    /// The shortest lifetime a caller may request (default 5 min).
    pub min_ttl: std::time::Duration,
    /// The longest lifetime issued: a longer request gets this (default 24 h).
    pub max_ttl: std::time::Duration,
    /// Admin identities, short forms resolved.
    pub admins: Vec<SpiffeId>,
    /// Plain-HTTP admin port (`/live`, `/ready`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Warn while the root or intermediate expires within this.
    pub ca_expiry_warning: std::time::Duration,
    /// The fraction of its life after which the intermediate is replaced automatically.
    pub rotate_at: moat_ca::RotateAt,
    /// How often the CA's certificates are checked against that point.
    pub ca_check_interval: std::time::Duration,
    /// The sidecar-injection admission webhook, when enabled.
    pub webhook: Option<webhook::WebhookConfig>,
    /// Publish the trust bundle as a ConfigMap in every namespace (on Kubernetes).
    pub publish_bundle: Option<kube_bundle::KubeConfig>,
    /// Run the policy controller against this API server: AccessPolicy and MeshConfig
    /// resources become policies (`kube_policies`).
    pub watch_policies: Option<kube_api::ApiServer>,
    /// How much of the audit log is kept.
    pub audit_retention: audit::Retention,
    /// Take a sidecar's announced inbound address whatever host it names; by default it must be
    /// the IP address the sidecar's connection comes from (`mesh_proto::check_announced_source`).
    pub announce_any_address: bool,
}

/// The default admin identity in `td`: `moat-system/moat-admin`.
pub fn default_admin_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::new(
        td.clone(),
        "moat-system"
            .parse()
            .unwrap_or_else(|_| unreachable!("valid namespace literal")),
        "moat-admin"
            .parse()
            .unwrap_or_else(|_| unreachable!("valid service account literal")),
    )
}

/// Runs the control plane until `shutdown` resolves. Prints `listening on ADDR` on stdout once
/// the gRPC listener is bound, then `admin listening on ADDR` (tests and scripts read them when
/// a port was 0).
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let kek = cfg.kek.load(&cfg.data_dir)?;
    let mut shutdown = std::pin::pin!(shutdown);
    let (store, ca, start) = loop {
        let store = cfg.store.open(&cfg.data_dir).await?;
        match ca::load_or_init(&store, &cfg.trust_domain, &kek, &cfg.import, cfg.rotate_at).await {
            Ok((ca, start)) => break (store, ca, start),
            // Another replica created (or changed) the CA at the same moment: load theirs.
            Err(ca::CaStartError::Conflict(why)) if cfg.store.shared() => {
                tracing::info!(why, "the CA changed while starting; reading it again");
            }
            Err(e @ ca::CaStartError::Stuck(_)) if cfg.store.shared() => {
                return Err(anyhow::anyhow!(
                    "{e}. The offline repair commands (moat-control ca ...) work on the embedded store only; with etcd, restore an etcd snapshot taken before the CA expired"
                ));
            }
            Err(e @ ca::CaStartError::Stuck(_)) => {
                // Release the store so the offline command can open it.
                drop(store);
                let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
                    .await
                    .with_context(|| format!("cannot listen on {} (--admin)", cfg.admin_listen))?;
                moat_log::startup(format_args!(
                    "recovery mode: admin listening on {}",
                    admin.local_addr()?
                ));
                let data_dir = cfg.data_dir.clone();
                let at = cfg.rotate_at;
                let repaired = move || {
                    let data_dir = data_dir.clone();
                    Box::pin(async move { ca_can_issue(&data_dir, at).await })
                        as std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
                };
                if !recovery::wait(admin, e.to_string(), repaired, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    match start {
        ca::Start::Created => {
            tracing::info!(trust_domain = %ca.trust_domain(), roots = ?ca.bundle().fingerprints(), "initialised the certificate authority");
        }
        ca::Start::Loaded | ca::Start::Rotated { .. } => {
            tracing::info!(trust_domain = %ca.trust_domain(), roots = ?ca.bundle().fingerprints(), "loaded the certificate authority");
        }
    }
    let td = ca.trust_domain().clone();
    let ca = Arc::new(ca::CaManager::new(ca, kek, store.clone()));

    let admin_id = cfg
        .admins
        .first()
        .cloned()
        .unwrap_or_else(|| default_admin_id(&td));
    let admin_dir = self_cert::admin_dir(&cfg.data_dir);
    let self_certs = self_cert::SelfCerts::start(
        ca.clone(),
        SpiffeId::control_plane(&td),
        Some((admin_dir.clone(), admin_id.clone())),
    )?;
    tracing::info!(dir = %admin_dir.display(), id = %admin_id, "wrote the admin credential for the CLI");
    tokio::spawn(self_certs.clone().renew_loop());

    let replica = replica::Replica::join(store.clone(), cfg.listen.to_string())
        .await
        .context("cannot register this replica in the store")?;
    tracing::info!(
        replica = replica.id(),
        leader = replica.is_leader(),
        "joined the control plane"
    );
    let policies = policies::Policies::new(store.clone(), td.clone());
    let mesh = mesh_state::MeshState::new(
        policies
            .load()
            .await
            .context("cannot load the stored policies")?,
        store.clone(),
        replica.clone(),
    );
    // Before any stream starts: a proxy reads a counter larger than its stream's first as a
    // command to renew.
    mesh.set_rotations(
        rotations::load(store.as_ref())
            .await
            .context("cannot read the rotation commands")?,
    );
    mesh.warm_up()
        .await
        .context("cannot read remembered endpoints")?;
    tokio::spawn(mesh_state::publish_views(mesh.clone(), ca.clone()));
    tokio::spawn(mesh_follow::follow_policies(policies.clone(), mesh.clone()));
    if cfg.store.shared() {
        tokio::spawn(fleet::publish(mesh.clone(), replica.clone()));
        tokio::spawn(fleet::follow(mesh.clone(), replica.clone()));
    }
    tokio::spawn(mesh_follow::follow_key_sets(mesh.clone()));
    let leader_mesh = mesh.clone();
    tokio::spawn(replica.clone().while_leader("key-set refresh", move || {
        mesh_follow::refresh_jwks(leader_mesh.clone())
    }));
    if let Some(server) = &cfg.watch_policies {
        let client = server
            .client()
            .context("--watch-policies: cannot reach the Kubernetes API server")?;
        tracing::info!(api = %server.url, "watching AccessPolicy and MeshConfig resources (on the leader)");
        let controller = kube_policies::Controller::new(client, policies.clone(), mesh.clone());
        tokio::spawn(
            replica
                .clone()
                .while_leader("policy controller", move || controller.clone().run()),
        );
    }
    let revocations = revocations::Revocations::new(store.clone());
    tokio::spawn(mesh_follow::follow_revocations(
        revocations.clone(),
        mesh.clone(),
    ));
    {
        let revocations = revocations.clone();
        tokio::spawn(replica.clone().while_leader("renewal pruning", move || {
            let revocations = revocations.clone();
            async move {
                loop {
                    tokio::time::sleep(revocations::LINEAGE_PRUNE_EVERY).await;
                    match revocations.prune_lineage().await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(pruned = n, "dropped the renewals of expired certificates"),
                        Err(e) => tracing::warn!(error = %e, "cannot prune the renewals of expired certificates"),
                    }
                }
            }
        }));
    }
    let mut metrics = metrics::Metrics::default();
    metrics.register_mesh(&mesh.first_snapshots);
    let state = Arc::new(state::ControlPlane {
        ca: ca.clone(),
        self_certs: self_certs.clone(),
        tokens: tokens::Tokens::new(store.clone()),
        audit: audit::AuditLog::new(store.clone(), cfg.audit_retention),
        policies,
        revocations,
        mesh: mesh.clone(),
        default_ttl: cfg.default_ttl,
        min_ttl: cfg.min_ttl,
        max_ttl: cfg.max_ttl,
        admins: cfg.admins.clone(),
        metrics,
    });

    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = tcp.local_addr()?;
    moat_log::startup(format_args!("listening on {addr}"));
    let admin_tcp = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin)", cfg.admin_listen))?;
    moat_log::startup(format_args!(
        "admin listening on {}",
        admin_tcp.local_addr()?
    ));
    tokio::spawn(admin_http::serve(admin_tcp, state.clone()));
    if let Some(k) = cfg.publish_bundle.clone() {
        let ca = ca.clone();
        tokio::spawn(
            replica
                .clone()
                .while_leader("trust-bundle publishing", move || {
                    kube_bundle::publish_loop(k.clone(), ca.clone())
                }),
        );
    }
    if let Some(w) = cfg.webhook.clone() {
        let tcp = tokio::net::TcpListener::bind(w.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--webhook)", w.listen))?;
        moat_log::startup(format_args!("webhook listening on {}", tcp.local_addr()?));
        let ca = ca.clone();
        tokio::spawn(async move {
            if let Err(e) = webhook::serve(tcp, ca, w).await {
                tracing::error!(error = %format!("{e:#}"), "the injection webhook stopped");
            }
        });
    }
    // What must happen once in the mesh runs on the leader replica only.
    let audit = state.audit.clone();
    tokio::spawn(replica.clone().while_leader("audit retention", move || {
        audit::retention_loop(audit.clone())
    }));
    if let ca::Start::Rotated { expired } = start {
        ca_rotation::record_automatic(&state, expired, "at start").await;
    }
    tokio::spawn(ca_rotation::follow_store(state.clone()));
    tokio::spawn(rotations::follow(state.clone()));
    let (cp, at, every) = (state.clone(), cfg.rotate_at, cfg.ca_check_interval);
    tokio::spawn(replica.clone().while_leader("CA rotation checks", move || {
        ca_rotation::auto_rotate_loop(cp.clone(), at, every)
    }));
    let (cp, horizon) = (state.clone(), cfg.ca_expiry_warning);
    tokio::spawn(replica.clone().while_leader("CA expiry warnings", move || {
        admin_http::warn_expiry(cp.clone(), horizon)
    }));
    tracing::info!(%addr, "control plane serving");
    let incoming = listener::incoming(
        tcp,
        listener::Bounds {
            open_files: cfg.open_files,
            // Behind NAT, one address is many sidecars.
            per_identity_and_source: !cfg.announce_any_address,
        },
        self_certs.live().subscribe(),
        state.metrics.handshake_failures.clone(),
        state.metrics.handshakes_pending.clone(),
    );

    // Every service behind the same caller check (expired or revoked certificates).
    let check = |service| caller::check(state.clone(), service);
    tonic::transport::Server::builder()
        .timeout(std::time::Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .add_service(InterceptedService::new(
            IdentityServer::new(identity_svc::IdentityService(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            check("moat.v1.Identity"),
        ))
        .add_service(InterceptedService::new(
            MeshServer::new(mesh_svc::MeshService {
                ca: ca.clone(),
                state: mesh,
                announce_any_address: cfg.announce_any_address,
            })
            .max_decoding_message_size(MAX_MESSAGE),
            check("moat.v1.Mesh"),
        ))
        .add_service(InterceptedService::new(
            AdminServer::new(admin_svc::AdminService(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            check("moat.v1.Admin"),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("gRPC server failed")?;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Recovery mode's check: whether the stored CA can issue again (the offline command ran). A
/// store still held by that command reads as "not yet".
async fn ca_can_issue(data_dir: &std::path::Path, at: moat_ca::RotateAt) -> bool {
    let Ok(store) = EmbeddedStore::open(data_dir) else {
        return false;
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let Ok((state, _)) = ca::read_state(&store).await else {
        return false;
    };
    let now = moat_identity::clock::unix_now();
    !matches!(
        state.health(now, at),
        Ok(moat_ca::Health::Stuck(_)) | Err(_)
    )
}
