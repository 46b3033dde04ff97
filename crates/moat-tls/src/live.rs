//! Live TLS state, the one implementation both binaries use: validate a new credential, build
//! the server config for it, publish the result on a watch. Connections read the current
//! generation at accept or dial; nothing ever mutates a published generation, so rotation never
//! touches a live connection's config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use moat_identity::{SpiffeId, TrustBundle};
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

use crate::config::{
    ClientAuth, Credential, CredentialError, client_config_ordered, server_config_ordered,
};
use crate::provider::SuiteOrder;

/// What a generation's server config asks of callers and offers them.
#[derive(Clone, Copy, Debug)]
pub struct Serving {
    pub client_auth: ClientAuth,
    /// ALPN protocols offered to callers, in preference order.
    pub alpn: &'static [&'static [u8]],
}

/// Outbound configs are cached per (expected server identity, ALPN, endpoint): each endpoint has
/// its own session tickets, which only it can resume (see `crate::tickets`).
type ClientKey = (SpiffeId, &'static [u8], String);

/// Outbound configs kept per generation; past this many endpoints the cache starts over (the
/// configs are rebuilt on use, and their tickets are lost).
const CLIENT_CONFIGS: usize = 1024;

/// One published generation of TLS material.
#[derive(Debug)]
pub struct TlsState {
    pub credential: Credential,
    pub bundle: Arc<TrustBundle>,
    pub server: Arc<ServerConfig>,
    /// When the credential should be renewed (Unix seconds), as the CA advised.
    pub refresh_after: i64,
    /// The cipher-suite order of every config of this generation.
    pub order: SuiteOrder,
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl TlsState {
    /// Re-checks `credential` against the bundle it will be served with, then builds the server
    /// config.
    fn build(
        credential: Credential,
        bundle: Arc<TrustBundle>,
        refresh_after: i64,
        serving: Serving,
        order: SuiteOrder,
    ) -> Result<Self, CredentialError> {
        let credential = Credential::new(credential.chain().to_vec(), credential.key(), &bundle)?;
        let server = server_config_ordered(
            &credential,
            bundle.clone(),
            serving.client_auth,
            serving.alpn,
            order,
        )?;
        Ok(TlsState {
            credential,
            bundle,
            server,
            refresh_after,
            order,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The client config that presents this generation's credential and accepts only a server
    /// proving `expected`, offering `alpn`, for connections to `endpoint`. Built once per
    /// generation and endpoint and then cached, so a rotation changes every outbound config at
    /// once, and each endpoint's session tickets stay with the connections to it.
    pub fn client_for(
        &self,
        expected: &SpiffeId,
        alpn: &'static [u8],
        endpoint: &str,
    ) -> Result<Arc<ClientConfig>, CredentialError> {
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = (expected.clone(), alpn, endpoint.to_owned());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let mut cfg = Arc::unwrap_or_clone(client_config_ordered(
            Some(&self.credential),
            self.bundle.clone(),
            expected.clone(),
            alpn,
            self.order,
        )?);
        cfg.resumption =
            rustls::client::Resumption::store(Arc::new(crate::tickets::Tickets::default()));
        let cfg = Arc::new(cfg);
        if cache.len() >= CLIENT_CONFIGS {
            cache.clear();
        }
        cache.insert(key, cfg.clone());
        Ok(cfg)
    }

    /// SHA-256 (hex) of the intermediate that issued the credential; empty if the chain has
    /// none.
    pub fn issuer_sha256(&self) -> String {
        self.credential
            .chain()
            .get(1)
            .map(|c| moat_identity::bundle::sha256_hex(c))
            .unwrap_or_default()
    }
}

/// What connections hold: the current generation, `None` before the first credential arrives.
pub type TlsWatch = watch::Receiver<Option<Arc<TlsState>>>;

/// The owner side of live TLS state. Hand [`LiveTls::subscribe`] receivers to listeners.
#[derive(Debug)]
pub struct LiveTls {
    tx: watch::Sender<Option<Arc<TlsState>>>,
    serving: Serving,
}

impl LiveTls {
    /// Live state with no generation yet: until the first [`LiveTls::publish`], listeners
    /// refuse every handshake.
    pub fn empty(serving: Serving) -> Self {
        let (tx, _) = watch::channel(None);
        LiveTls { tx, serving }
    }

    /// Validates `credential` against `bundle`, builds its configs (in the current generation's
    /// suite order) and publishes them as the new generation. On error nothing is published and
    /// the old generation stays in force.
    pub fn publish(
        &self,
        credential: Credential,
        bundle: TrustBundle,
        refresh_after: i64,
    ) -> Result<Arc<TlsState>, CredentialError> {
        let order = self.current().map(|s| s.order).unwrap_or_default();
        self.publish_ordered(credential, bundle, refresh_after, order)
    }

    /// [`LiveTls::publish`] with the suite order `order`, which later publications keep.
    pub fn publish_ordered(
        &self,
        credential: Credential,
        bundle: TrustBundle,
        refresh_after: i64,
        order: SuiteOrder,
    ) -> Result<Arc<TlsState>, CredentialError> {
        let state = Arc::new(TlsState::build(
            credential,
            Arc::new(bundle),
            refresh_after,
            self.serving,
            order,
        )?);
        self.tx.send_replace(Some(state.clone()));
        Ok(state)
    }

    /// The current generation.
    pub fn current(&self) -> Option<Arc<TlsState>> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every new generation.
    pub fn subscribe(&self) -> TlsWatch {
        self.tx.subscribe()
    }
}
