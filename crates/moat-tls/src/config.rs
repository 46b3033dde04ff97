//! Credentials and the rustls client/server configs built from them.

use std::sync::Arc;

use moat_identity::{CertInfo, SpiffeId, TrustBundle, Usage, VerifiedPeer, verify_chain};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::{ClientConfig, ServerConfig};

use crate::provider::{SuiteOrder, VERSIONS, provider, provider_ordered};
use crate::verifier::{SpiffeClientVerifier, SpiffeServerVerifier};

/// ALPN for gRPC and mesh HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN a sidecar uses to say "opaque TCP follows" to another sidecar.
pub const ALPN_TCP: &[u8] = b"moat-tcp";
/// ALPN for HTTP/1.1 clients that reach an inbound listener directly.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a credential or config was refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("certificate chain does not verify against the trust bundle: {0}")]
    Chain(#[from] moat_identity::VerifyError),
    #[error("private key does not match the certificate or is unusable: {0}")]
    Key(String),
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("could not build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A workload's certificate chain and private key, checked against a bundle at construction.
#[derive(Debug)]
pub struct Credential {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    peer: VerifiedPeer,
}

impl Clone for Credential {
    fn clone(&self) -> Self {
        Credential {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            peer: self.peer.clone(),
        }
    }
}

impl Credential {
    /// Validates `chain` (leaf first) against `bundle` now, and `key` against the leaf. Our own
    /// certificate defines our trust domain: the one every peer we accept must share.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: &TrustBundle,
    ) -> Result<Self, CredentialError> {
        use moat_identity::VerifyError;
        let leaf = chain.first().ok_or(VerifyError::NoCertificate)?;
        let own = moat_identity::CertInfo::from_der(leaf)
            .map_err(VerifyError::from)?
            .spiffe_id
            .map_err(VerifyError::NoSpiffeId)?;
        let peer = verify_chain(
            &chain,
            bundle,
            own.trust_domain(),
            UnixTime::now(),
            Usage::Client,
        )?;
        let signing = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        certified
            .keys_match()
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        Ok(Credential { chain, key, peer })
    }

    /// A credential for a key generated here and the chain the CA issued for it.
    pub fn issued(
        chain: Vec<CertificateDer<'static>>,
        key: &moat_identity::WorkloadKey,
        bundle: &TrustBundle,
    ) -> Result<Self, CredentialError> {
        Self::new(chain, private_key(key)?, bundle)
    }

    /// Reads PEM chain and key text.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        bundle: &TrustBundle,
    ) -> Result<Self, CredentialError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CredentialError::Pem {
                what: "certificate chain",
                detail: e.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CredentialError::Pem {
            what: "private key",
            detail: e.to_string(),
        })?;
        Self::new(chain, key, bundle)
    }

    /// The SPIFFE ID the credential proves.
    pub fn id(&self) -> &SpiffeId {
        &self.peer.id
    }

    /// Serial (hex) and NotAfter of the leaf.
    pub fn leaf(&self) -> &VerifiedPeer {
        &self.peer
    }

    /// A copy of the private key, for building another config.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// This certificate's key's signature over
    /// [`moat_identity::verify::renewal_message`]`(connection_serial, own serial)`: the proof a
    /// proxy sends with a renewed certificate on a mesh stream opened with `connection_serial`.
    pub fn sign_renewal(&self, connection_serial: &str) -> Result<Vec<u8>, CredentialError> {
        use rustls::SignatureScheme as S;
        let key = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let signer = key
            .choose_scheme(&[
                S::ECDSA_NISTP256_SHA256,
                S::ECDSA_NISTP384_SHA384,
                S::ED25519,
            ])
            .ok_or_else(|| CredentialError::Key("no signature scheme for this key".into()))?;
        let message = moat_identity::verify::renewal_message(connection_serial, &self.peer.serial);
        signer
            .sign(&message)
            .map_err(|e| CredentialError::Key(e.to_string()))
    }
}

/// `key`'s private half in the form rustls takes.
pub fn private_key(
    key: &moat_identity::WorkloadKey,
) -> Result<PrivateKeyDer<'static>, CredentialError> {
    PrivateKeyDer::try_from(key.private_key_der()).map_err(|e| CredentialError::Key(e.to_string()))
}

/// Whether a server asks its clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a valid mesh certificate.
    Required,
    /// Clients may connect without one (token bootstrap); one that is presented must be valid.
    Optional,
}

/// A TLS 1.3 server config presenting `cred`, verifying clients against `bundle`, offering
/// `alpn` in preference order, with the default suite order.
pub fn server_config(
    cred: &Credential,
    bundle: Arc<TrustBundle>,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CredentialError> {
    server_config_ordered(cred, bundle, client_auth, alpn, SuiteOrder::default())
}

/// [`server_config`] choosing the cipher suite by `order`, whatever order the client offers.
pub fn server_config_ordered(
    cred: &Credential,
    bundle: Arc<TrustBundle>,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    order: SuiteOrder,
) -> Result<Arc<ServerConfig>, CredentialError> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        bundle,
        cred.peer.id.trust_domain().clone(),
        client_auth == ClientAuth::Required,
    ));
    let mut cfg = ServerConfig::builder_with_provider(provider_ordered(order))
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cred.chain.clone(), cred.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The server's order decides, so a mesh-wide preference holds even while some clients
    // still run with the old one.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// A TLS 1.3 client config that accepts only a server proving `expected` under `bundle`, and
/// presents `cred` when given, offering `alpn`, with the default suite order.
pub fn client_config(
    cred: Option<&Credential>,
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, CredentialError> {
    client_config_ordered(cred, bundle, expected, alpn, SuiteOrder::default())
}

/// [`client_config`] offering the cipher suites in `order`.
pub fn client_config_ordered(
    cred: Option<&Credential>,
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
    alpn: &[u8],
    order: SuiteOrder,
) -> Result<Arc<ClientConfig>, CredentialError> {
    let builder = ClientConfig::builder_with_provider(provider_ordered(order))
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        // Not a weakening: the SPIFFE verifier checks the chain against the bundle and requires
        // the exact expected ID; it only replaces DNS-name matching, which the mesh does not use.
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, expected)));
    let mut cfg = match cred {
        Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// The SPIFFE ID and leaf facts of a peer whose chain the handshake already verified, from the
/// certificates rustls kept. `None` when the peer presented no certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<VerifiedPeer> {
    let leaf = certs?.first()?;
    let info = CertInfo::from_der(leaf).ok()?;
    Some(VerifiedPeer {
        id: info.spiffe_id.ok()?,
        serial: info.serial,
        not_after: info.not_after,
    })
}
