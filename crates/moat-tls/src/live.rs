//! Live TLS state: validate a new credential, build new configs, publish them on a watch.
//! Connections read the current value at accept; nothing ever mutates a published config.

use std::sync::Arc;

use moat_identity::TrustBundle;
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::config::{ClientAuth, Credential, CredentialError, server_config};

/// One published generation of TLS material.
#[derive(Debug)]
pub struct TlsState {
    pub credential: Credential,
    pub bundle: Arc<TrustBundle>,
    pub server: Arc<ServerConfig>,
}

/// The owner side of live TLS state. Clone the receiver from [`LiveTls::subscribe`].
#[derive(Debug)]
pub struct LiveTls {
    tx: watch::Sender<Arc<TlsState>>,
    client_auth: ClientAuth,
}

impl LiveTls {
    /// Builds the first generation.
    pub fn new(
        credential: Credential,
        bundle: TrustBundle,
        client_auth: ClientAuth,
    ) -> Result<Self, CredentialError> {
        let state = build(credential, Arc::new(bundle), client_auth)?;
        let (tx, _) = watch::channel(Arc::new(state));
        Ok(LiveTls { tx, client_auth })
    }

    /// Validates and publishes a new credential and bundle. On error the old generation stays.
    pub fn publish(
        &self,
        credential: Credential,
        bundle: TrustBundle,
    ) -> Result<(), CredentialError> {
        let state = build(credential, Arc::new(bundle), self.client_auth)?;
        self.tx.send_replace(Arc::new(state));
        Ok(())
    }

    /// The current generation.
    pub fn current(&self) -> Arc<TlsState> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every new generation.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TlsState>> {
        self.tx.subscribe()
    }
}

fn build(
    credential: Credential,
    bundle: Arc<TrustBundle>,
    client_auth: ClientAuth,
) -> Result<TlsState, CredentialError> {
    // Re-check the credential against the bundle it will be served with.
    let credential = Credential::new(credential.chain().to_vec(), credential.key(), &bundle)?;
    let server = server_config(&credential, bundle.clone(), client_auth, &[crate::ALPN_H2])?;
    Ok(TlsState {
        credential,
        bundle,
        server,
    })
}
