//! rustls verifiers that authenticate peers by SPIFFE ID against a trust bundle, using the one
//! chain check in moat-identity.

use std::sync::Arc;

use moat_identity::{SpiffeId, TrustBundle, TrustDomain, Usage, VerifyError, verify_chain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

fn to_rustls(e: VerifyError) -> Error {
    let ce = match e {
        VerifyError::Expired => CertificateError::Expired,
        VerifyError::NotYetValid => CertificateError::NotValidYet,
        VerifyError::UnknownIssuer => CertificateError::UnknownIssuer,
        VerifyError::WrongUsage(_) => CertificateError::InvalidPurpose,
        VerifyError::Malformed(_) => CertificateError::BadEncoding,
        VerifyError::NoCertificate => return Error::NoCertificatesPresented,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(ce)
}

fn algs() -> WebPkiSupportedAlgorithms {
    crate::provider::provider().signature_verification_algorithms
}

fn chain<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut v = Vec::with_capacity(1 + intermediates.len());
    v.push(end_entity.clone());
    v.extend(intermediates.iter().cloned());
    v
}

/// Server side: verifies client certificates against the bundle, accepting only identities in
/// the server's own trust domain. With `mandatory == false` a client may connect without a
/// certificate (the control plane's token bootstrap); a client that does present one must
/// present a valid one.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: TrustDomain,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier for clients in `trust_domain` certified under `bundle`.
    pub fn new(bundle: Arc<TrustBundle>, trust_domain: TrustDomain, mandatory: bool) -> Self {
        SpiffeClientVerifier {
            bundle,
            trust_domain,
            mandatory,
            algs: algs(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_chain(
            &chain(end_entity, intermediates),
            &self.bundle,
            &self.trust_domain,
            now,
            Usage::Client,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side: verifies the server's chain against the bundle and requires its SPIFFE ID to be
/// exactly `expected`. The TLS server name is ignored: in the mesh, identity is the SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts only `expected`, certified under `bundle`.
    pub fn new(bundle: Arc<TrustBundle>, expected: SpiffeId) -> Self {
        SpiffeServerVerifier {
            bundle,
            expected,
            algs: algs(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let peer = verify_chain(
            &chain(end_entity, intermediates),
            &self.bundle,
            self.expected.trust_domain(),
            now,
            Usage::Server,
        )
        .map_err(to_rustls)?;
        if peer.id != self.expected {
            tracing::warn!(expected = %self.expected, presented = %peer.id, "server presented the wrong identity");
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.to_string(),
                    presented: peer.id.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The server proved an identity, but not the one we meant to talk to.
#[derive(Debug, thiserror::Error)]
#[error("server is {presented}, not the expected {expected}")]
pub struct WrongIdentity {
    pub expected: String,
    pub presented: String,
}
