//! Talking to a control plane as the CLI and as proxies do, in-process: for tests and benches
//! that need many more proxies than it is reasonable to run as processes.

use moat_api::v1::admin_client::AdminClient;
use moat_api::v1::mesh_client::MeshClient;
use moat_api::v1::{Ack, Announce, IssueCertificateRequest, ProxyMessage, proxy_message};
use moat_identity::{SpiffeId, TrustBundle, WorkloadKey};
use moat_tls::config::Credential;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::ControlPlane;

/// An admin session with a running control plane.
#[derive(Debug, Clone)]
pub struct Admin {
    pub client: AdminClient<Channel>,
    pub bundle: TrustBundle,
    /// The control plane's identity.
    pub control: SpiffeId,
    pub url: String,
}

impl Admin {
    /// Connects with the control plane's admin credential.
    pub async fn connect(cp: &ControlPlane) -> anyhow::Result<Admin> {
        let (cred, bundle) = moat_tls::cred_dir::load(&cp.admin_dir())?;
        let control = SpiffeId::control_plane(cred.id().trust_domain());
        let channel =
            moat_tls::connect::channel(&cp.url(), bundle.clone(), control.clone(), Some(&cred))
                .await?;
        Ok(Admin {
            client: AdminClient::new(channel),
            bundle,
            control,
            url: cp.url(),
        })
    }

    /// A certificate for `identity` (`ns/sa` or `sa`) with a fresh key.
    pub async fn credential(&mut self, identity: &str) -> anyhow::Result<Credential> {
        let td = self.control.trust_domain().clone();
        let id = SpiffeId::parse_with_default(identity, &td)?;
        let key = WorkloadKey::generate(&id)?;
        let resp = self
            .client
            .issue_certificate(IssueCertificateRequest {
                csr_der: key.csr_der().to_vec(),
                ttl_seconds: 3600,
            })
            .await?
            .into_inner();
        let chain = resp
            .chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.private_key_der()));
        Ok(Credential::new(chain, key, &self.bundle)?)
    }

    /// A `Mesh.Stream` as `cred`'s proxy, announcing `address`.
    pub async fn mesh_stream(
        &self,
        cred: &Credential,
        address: &str,
    ) -> anyhow::Result<MeshStream> {
        self.mesh_stream_resuming(cred, address, Vec::new()).await
    }

    /// A `Mesh.Stream` as `cred`'s proxy, announcing `address` and a service table held from
    /// an earlier stream by its `table_digests` (empty: none).
    pub async fn mesh_stream_resuming(
        &self,
        cred: &Credential,
        address: &str,
        table_digests: Vec<Vec<u8>>,
    ) -> anyhow::Result<MeshStream> {
        self.mesh_stream_from(cred, address, table_digests, None)
            .await
    }

    /// [`Admin::mesh_stream_resuming`], connecting from the local address `source` when given.
    pub async fn mesh_stream_from(
        &self,
        cred: &Credential,
        address: &str,
        table_digests: Vec<Vec<u8>>,
        source: Option<std::net::IpAddr>,
    ) -> anyhow::Result<MeshStream> {
        let channel = moat_tls::connect::channel_from(
            &self.url,
            self.bundle.clone(),
            self.control.clone(),
            Some(cred),
            source,
        )
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(ProxyMessage {
            message: Some(proxy_message::Message::Announce(Announce {
                inbound_address: address.to_owned(),
                proxy_version: "simulated".into(),
                table_digests,
                ..Announce::default()
            })),
        })
        .await?;
        let inbound = MeshClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(MeshStream { tx, inbound })
    }
}

/// A proxy's end of `Mesh.Stream`, without the proxy.
#[derive(Debug)]
pub struct MeshStream {
    pub tx: tokio::sync::mpsc::Sender<ProxyMessage>,
    pub inbound: tonic::Streaming<moat_api::v1::Snapshot>,
}

impl MeshStream {
    /// Acknowledges every snapshot until the stream ends: an endpoint that stays in the
    /// service table while the returned task runs.
    pub fn keep_acking(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(Some(s)) = self.inbound.message().await {
                if s.continued {
                    continue;
                }
                let ack = Ack {
                    version: s.version,
                    applied: true,
                    ..Ack::default()
                };
                let msg = ProxyMessage {
                    message: Some(proxy_message::Message::Ack(ack)),
                };
                if self.tx.send(msg).await.is_err() {
                    return;
                }
            }
        })
    }
}
