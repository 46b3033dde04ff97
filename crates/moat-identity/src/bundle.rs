//! Trust bundles: the set of root certificates a mesh member trusts. A bundle may hold several
//! roots at once; that is how roots rotate without downtime.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use sha2::{Digest, Sha256};

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle is empty: it must hold at least one root certificate")]
    Empty,
    #[error("trust bundle PEM is malformed: {0}")]
    Pem(String),
    #[error("root certificate {index} is not a usable trust anchor: {source}")]
    Anchor {
        index: usize,
        #[source]
        source: webpki::Error,
    },
}

/// The roots a mesh member trusts, with their parsed trust anchors ready for verification.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER roots; refuses an empty set or a root webpki cannot use.
    pub fn from_der(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|source| BundleError::Anchor { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle { roots, anchors })
    }

    /// Parses every `CERTIFICATE` block of a PEM document.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        Self::from_der(roots)
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Parsed trust anchors, in the same order as [`roots`](Self::roots).
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle as a PEM document.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c))
            .collect()
    }

    /// SHA-256 fingerprints of the roots, lowercase hex.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|c| sha256_hex(c)).collect()
    }

    /// Whether `cert` (DER) is one of the roots.
    pub fn contains(&self, cert: &[u8]) -> bool {
        self.roots.iter().any(|r| r.as_ref() == cert)
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Wraps DER bytes in a PEM block with the given label (64-column base64 lines, `\n` line ends).
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let block = pem::Pem::new(label, der);
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
