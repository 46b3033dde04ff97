//! Certificate signing requests. Workloads generate their key pair locally ([`WorkloadKey`]) and
//! send only the CSR; the CA accepts a CSR only after [`ValidatedCsr::from_der`] has proved it
//! well-formed, self-signed by an ECDSA P-256 key, and asking for exactly one SPIFFE ID.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::SpiffeId;

/// The largest CSR the mesh accepts. A P-256 CSR with one SPIFFE ID is about 300 bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// Why a CSR was refused. Each message says what was wrong and what the mesh expects instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("csr is empty")]
    Empty,
    #[error("csr is {0} bytes; the limit is {MAX_CSR_LEN}")]
    TooLarge(usize),
    #[error("csr is not a DER PKCS#10 request: {0}")]
    Malformed(String),
    #[error("csr has {0} trailing bytes after the request")]
    Trailing(usize),
    #[error("csr key is {0}; the mesh accepts only ECDSA P-256 keys")]
    UnsupportedKey(String),
    #[error("csr is signed with {0}; the mesh accepts only ecdsa-with-SHA256")]
    UnsupportedSignature(String),
    #[error("csr signature does not verify with its own public key")]
    BadSignature,
    #[error("csr must carry exactly one subject alternative name, the SPIFFE ID; found {0}")]
    Sans(String),
    #[error("csr SPIFFE ID is invalid: {0}")]
    BadId(String),
}

/// A CSR that passed every check: the public key to certify and the identity it asks for.
#[derive(Clone, Debug)]
pub struct ValidatedCsr {
    /// The DER SubjectPublicKeyInfo of the requester's key.
    pub spki_der: Vec<u8>,
    /// The one SPIFFE ID the CSR asks for.
    pub id: SpiffeId,
}

impl ValidatedCsr {
    /// Parses and checks a DER CSR.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.is_empty() {
            return Err(CsrError::Empty);
        }
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge(der.len()));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Trailing(rest.len()));
        }
        let info = &csr.certification_request_info;
        check_key(&info.subject_pki)?;
        let sig_alg = csr.signature_algorithm.algorithm.to_id_string();
        if sig_alg != OID_ECDSA_SHA256 {
            return Err(CsrError::UnsupportedSignature(sig_alg));
        }
        UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_ASN1,
            info.subject_pki.subject_public_key.data.as_ref(),
        )
        .verify(info.raw, csr.signature_value.data.as_ref())
        .map_err(|_| CsrError::BadSignature)?;
        let id = requested_id(&csr)?;
        Ok(ValidatedCsr {
            spki_der: info.subject_pki.raw.to_vec(),
            id,
        })
    }
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (alg.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256)) => Ok(()),
        (OID_EC_PUBLIC_KEY, Some(OID_P384)) => Err(CsrError::UnsupportedKey("ECDSA P-384".into())),
        (OID_EC_PUBLIC_KEY, Some(OID_P521)) => Err(CsrError::UnsupportedKey("ECDSA P-521".into())),
        (OID_EC_PUBLIC_KEY, other) => Err(CsrError::UnsupportedKey(format!(
            "ECDSA on curve {}",
            other.unwrap_or("(unnamed)")
        ))),
        (OID_RSA, _) => Err(CsrError::UnsupportedKey("RSA".into())),
        (OID_ED25519, _) => Err(CsrError::UnsupportedKey("Ed25519".into())),
        (other, _) => Err(CsrError::UnsupportedKey(format!("algorithm {other}"))),
    }
}

fn requested_id(csr: &X509CertificationRequest<'_>) -> Result<SpiffeId, CsrError> {
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter().cloned());
        }
    }
    match names.as_slice() {
        [GeneralName::URI(uri)] => uri
            .parse::<SpiffeId>()
            .map_err(|e| CsrError::BadId(e.to_string())),
        [] => Err(CsrError::Sans("none".into())),
        many => Err(CsrError::Sans(
            many.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// A freshly generated ECDSA P-256 key pair and the CSR it signed for one SPIFFE ID. The key stays
/// with the workload; only [`csr_der`](Self::csr_der) goes to the control plane.
#[derive(Debug)]
pub struct WorkloadKey {
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl WorkloadKey {
    /// Generates a new key pair and a CSR for `id`.
    pub fn generate(id: &SpiffeId) -> Result<Self, CsrError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CsrError::Malformed(format!("key generation failed: {e}")))?;
        let csr_der = csr_for(&key, id)?;
        Ok(WorkloadKey { key, csr_der })
    }

    /// The CSR, DER.
    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// The private key, PKCS#8 DER.
    pub fn private_key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The private key, PKCS#8 PEM.
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Builds a DER CSR for `id` signed by `key` (any key rcgen can sign with; tests use this to
/// produce CSRs the CA must refuse).
pub fn csr_for(key: &KeyPair, id: &SpiffeId) -> Result<Vec<u8>, CsrError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CsrError::BadId(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .map(|csr| csr.der().to_vec())
        .map_err(|e| CsrError::Malformed(format!("could not build csr: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519};

    fn id() -> SpiffeId {
        "spiffe://moat.local/ns/shop/sa/orders".parse().unwrap()
    }

    #[test]
    fn generated_csr_validates_and_names_the_identity() {
        let wk = WorkloadKey::generate(&id()).unwrap();
        let v = ValidatedCsr::from_der(wk.csr_der()).unwrap();
        assert_eq!(v.id, id());
        assert!(!v.spki_der.is_empty());
    }

    #[test]
    fn wrong_key_types_are_refused() {
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = csr_for(&p384, &id()).unwrap();
        assert_eq!(
            ValidatedCsr::from_der(&csr).unwrap_err(),
            CsrError::UnsupportedKey("ECDSA P-384".into())
        );
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let csr = csr_for(&ed, &id()).unwrap();
        assert_eq!(
            ValidatedCsr::from_der(&csr).unwrap_err(),
            CsrError::UnsupportedKey("Ed25519".into())
        );
    }

    #[test]
    fn tampered_csr_fails_signature_check() {
        let wk = WorkloadKey::generate(&id()).unwrap();
        let mut der = wk.csr_der().to_vec();
        // Flip a byte inside the SPIFFE ID (still parses, no longer matches the signature).
        let pos = der.windows(6).position(|w| w == b"orders").unwrap();
        der[pos] = b'x';
        assert_eq!(
            ValidatedCsr::from_der(&der).unwrap_err(),
            CsrError::BadSignature
        );
    }

    #[test]
    fn extra_or_missing_sans_are_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(id().to_string().try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().der().to_vec();
        assert!(matches!(
            ValidatedCsr::from_der(&csr),
            Err(CsrError::Sans(_))
        ));

        let none = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        assert_eq!(
            ValidatedCsr::from_der(none.der()).unwrap_err(),
            CsrError::Sans("none".into())
        );
    }

    #[test]
    fn garbage_empty_and_oversized_are_refused() {
        assert_eq!(ValidatedCsr::from_der(&[]).unwrap_err(), CsrError::Empty);
        assert!(matches!(
            ValidatedCsr::from_der(b"not a csr at all"),
            Err(CsrError::Malformed(_))
        ));
        assert_eq!(
            ValidatedCsr::from_der(&vec![0x30; MAX_CSR_LEN + 1]).unwrap_err(),
            CsrError::TooLarge(MAX_CSR_LEN + 1)
        );
        let wk = WorkloadKey::generate(&id()).unwrap();
        let mut der = wk.csr_der().to_vec();
        der.extend_from_slice(b"junk");
        assert_eq!(
            ValidatedCsr::from_der(&der).unwrap_err(),
            CsrError::Trailing(4)
        );
    }
}
