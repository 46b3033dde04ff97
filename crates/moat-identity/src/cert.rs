//! Facts about one certificate, parsed with x509-parser: what `moat cert inspect` prints and
//! what the verifiers need beyond the chain check (the SPIFFE ID, serial, expiry).

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::SpiffeId;
use crate::bundle::sha256_hex;

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertInfoError {
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("trailing bytes after the certificate")]
    Trailing,
}

/// A certificate serial number as the mesh writes it everywhere (revocation lists, logs, the
/// CLI): lowercase hex, 1 to 64 digits. Parsing accepts either case.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

/// Text that is not a certificate serial.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a certificate serial (hex digits, at most 64)")]
pub struct NotASerial(pub String);

impl std::str::FromStr for Serial {
    type Err = NotASerial;
    fn from_str(s: &str) -> Result<Self, NotASerial> {
        if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(NotASerial(s.to_owned()));
        }
        Ok(Serial(s.to_ascii_lowercase()))
    }
}

impl Serial {
    /// The lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The lowercase hex digits, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a certificate carries no usable SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSpiffeId {
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; SPIFFE allows one")]
    Several(usize),
    #[error(transparent)]
    Invalid(#[from] crate::IdError),
}

/// The facts of one certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub is_ca: bool,
    /// Whether keyUsage grants keyCertSign or cRLSign (signing rights a leaf must not carry).
    pub signs_certificates: bool,
    /// e.g. `ECDSA P-256`, `RSA 2048`.
    pub key_algorithm: String,
    /// The workload SPIFFE ID, or why there is none (no URI SAN, several, or not a workload ID).
    pub spiffe_id: Result<SpiffeId, NoSpiffeId>,
    /// Every URI SAN, as written.
    pub uri_sans: Vec<String>,
    /// Every SAN that is not a URI (DNS names, IPs, emails), rendered.
    pub other_sans: Vec<String>,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
    /// The DER SubjectPublicKeyInfo (to tell whether two certificates share a key).
    pub spki_der: Vec<u8>,
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertInfoError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| CertInfoError::Parse(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertInfoError::Trailing);
        }
        let mut uri_sans = Vec::new();
        let mut other_sans = Vec::new();
        let mut is_ca = false;
        let mut signs_certificates = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                            other => other_sans.push(other.to_string()),
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                ParsedExtension::KeyUsage(ku) => {
                    signs_certificates = ku.key_cert_sign() || ku.crl_sign();
                }
                _ => {}
            }
        }
        let spiffe_id = match uri_sans.as_slice() {
            [one] => one.parse::<SpiffeId>().map_err(NoSpiffeId::from),
            [] => Err(NoSpiffeId::NoUriSan),
            several => Err(NoSpiffeId::Several(several.len())),
        };
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: hex::encode(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca,
            signs_certificates,
            key_algorithm: key_algorithm(&cert),
            spiffe_id,
            uri_sans,
            other_sans,
            sha256: sha256_hex(der),
            spki_der: cert.public_key().raw.to_vec(),
        })
    }
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = cert
                .public_key()
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| match oid.to_id_string().as_str() {
                    "1.2.840.10045.3.1.7" => "P-256".to_owned(),
                    "1.3.132.0.34" => "P-384".to_owned(),
                    "1.3.132.0.35" => "P-521".to_owned(),
                    other => other.to_owned(),
                })
                .unwrap_or_else(|| format!("{} bits", point.key_size()));
            format!("ECDSA {curve}")
        }
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(_) => cert.public_key().algorithm.algorithm.to_id_string(),
        Err(e) => format!("unreadable key ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_hex_lowercased_and_bounded() {
        assert_eq!("0aBc".parse::<Serial>().unwrap().as_str(), "0abc");
        for bad in ["", "xyz", "12 34", &"1".repeat(65)] {
            assert_eq!(bad.parse::<Serial>(), Err(NotASerial(bad.to_owned())));
        }
        assert!("f".repeat(64).parse::<Serial>().is_ok());
    }
}
