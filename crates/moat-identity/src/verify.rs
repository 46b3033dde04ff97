//! Chain and SPIFFE-ID verification: the single check behind every TLS handshake in the mesh
//! (through moat-tls's rustls verifiers) and behind tooling such as `moat cert inspect`.

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::cert::{CertInfo, CertInfoError};
use crate::{SpiffeId, TrustBundle, TrustDomain};

/// Which side of a connection the certificate authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client (EKU clientAuth).
    Client,
    /// A TLS server (EKU serverAuth).
    Server,
}

/// Why a presented chain was refused. The variants double as stable reason codes.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate was presented")]
    NoCertificate,
    #[error("certificate is malformed: {0}")]
    Malformed(#[from] CertInfoError),
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("certificate is not signed by a root in the trust bundle")]
    UnknownIssuer,
    #[error("certificate is not valid for {0:?} use")]
    WrongUsage(Usage),
    #[error("certificate chain is invalid: {0}")]
    Chain(webpki::Error),
    #[error("certificate carries no SPIFFE ID: {0}")]
    NoSpiffeId(crate::cert::NoSpiffeId),
    #[error("certificate names {id}, which is outside the trust domain {expected}")]
    ForeignTrustDomain { id: String, expected: String },
    #[error(
        "the end-entity certificate may sign certificates (keyUsage keyCertSign or cRLSign); a workload certificate must not"
    )]
    LeafSignsCertificates,
}

impl VerifyError {
    /// A short, stable, machine-readable reason (for logs and metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::NoCertificate => "no-certificate",
            VerifyError::Malformed(_) => "malformed-certificate",
            VerifyError::Expired => "certificate-expired",
            VerifyError::NotYetValid => "certificate-not-yet-valid",
            VerifyError::UnknownIssuer => "unknown-issuer",
            VerifyError::WrongUsage(_) => "wrong-key-usage",
            VerifyError::Chain(_) => "invalid-chain",
            VerifyError::NoSpiffeId(_) => "no-spiffe-id",
            VerifyError::ForeignTrustDomain { .. } => "foreign-trust-domain",
            VerifyError::LeafSignsCertificates => "leaf-signs-certificates",
        }
    }
}

/// What a verified chain proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// The peer's SPIFFE ID, from the leaf's only URI SAN.
    pub id: SpiffeId,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// The leaf's NotAfter, Unix seconds.
    pub not_after: i64,
}

/// Verifies `chain` (leaf first, then intermediates) against `bundle` at `now` for `usage`, and
/// extracts the SPIFFE ID. The leaf must carry exactly one URI SAN, it must be a workload SPIFFE
/// ID in `trust_domain` (a root shared with another mesh must not let that mesh's identities in),
/// and the leaf must not hold certificate-signing rights; checking which ID is acceptable is the
/// caller's job.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    trust_domain: &TrustDomain,
    now: UnixTime,
    usage: Usage,
) -> Result<VerifiedPeer, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| VerifyError::Malformed(CertInfoError::Parse(e.to_string())))?;
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        SIG_ALGS,
        bundle.anchors(),
        intermediates,
        now,
        eku,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => VerifyError::Expired,
        webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid,
        // A name match whose signature fails is, to the caller, still an issuer it does not trust.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            VerifyError::UnknownIssuer
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => VerifyError::WrongUsage(usage),
        other => VerifyError::Chain(other),
    })?;
    let info = CertInfo::from_der(leaf)?;
    if info.signs_certificates {
        return Err(VerifyError::LeafSignsCertificates);
    }
    let id = info.spiffe_id.clone().map_err(VerifyError::NoSpiffeId)?;
    if id.trust_domain() != trust_domain {
        return Err(VerifyError::ForeignTrustDomain {
            id: id.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    Ok(VerifiedPeer {
        id,
        serial: info.serial,
        not_after: info.not_after,
    })
}

/// Which of `presented` (what a peer sent after its leaf) signed `leaf`, as SHA-256 (hex) of its
/// DER; empty when none did (a leaf the root signed directly). The leaf is checked against each
/// as its only trust anchor, so the answer is the certificate whose key made the leaf's
/// signature, not whichever the peer put second: a chain may carry more than its path (the next
/// intermediate, which every certificate response hands out, verifies nothing about the leaf).
/// For a leaf whose chain was verified just now; `usage` is the leaf's.
pub fn issuer_sha256(
    leaf: &CertificateDer<'_>,
    presented: &[CertificateDer<'_>],
    usage: Usage,
) -> String {
    let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else {
        return String::new();
    };
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    let now = UnixTime::now();
    presented
        .iter()
        .find(|candidate| {
            webpki::anchor_from_trusted_cert(candidate).is_ok_and(|anchor| {
                ee.verify_for_usage(SIG_ALGS, &[anchor], &[], now, eku, None, None)
                    .is_ok()
            })
        })
        .map(|issuer| crate::bundle::sha256_hex(issuer))
        .unwrap_or_default()
}

/// Signature algorithms accepted in mesh chains: ECDSA (the mesh's own certificates) plus RSA
/// and Ed25519 so that bring-your-own roots from an existing PKI keep working.
static SIG_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ED25519,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// What a proxy signs with a renewed certificate's key to show, on a mesh stream whose
/// connection presented `connection_serial`, that it holds the key of `new_serial`: bound to
/// the stream's connection, so a signature seen elsewhere cannot be replayed on another stream.
pub fn renewal_message(connection_serial: &str, new_serial: &str) -> Vec<u8> {
    let mut m = b"moat mesh renewal v1\0".to_vec();
    m.extend_from_slice(connection_serial.as_bytes());
    m.push(0);
    m.extend_from_slice(new_serial.as_bytes());
    m
}

/// Whether `proof` is the signature of `leaf`'s key over [`renewal_message`] (ECDSA P-256 or
/// P-384, or Ed25519, as the key is).
pub fn renewal_proof_valid(
    leaf: &CertificateDer<'_>,
    connection_serial: &str,
    new_serial: &str,
    proof: &[u8],
) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let message = renewal_message(connection_serial, new_serial);
    [
        webpki::aws_lc_rs::ECDSA_P256_SHA256,
        webpki::aws_lc_rs::ECDSA_P384_SHA384,
        webpki::aws_lc_rs::ED25519,
    ]
    .into_iter()
    .any(|alg| cert.verify_signature(alg, &message, proof).is_ok())
}
