//! The CA proper: generate or import a root and an issuing intermediate, seal their keys, load
//! them back, and sign validated CSRs into SPIFFE leaf certificates.

use std::time::Duration;

use moat_identity::bundle::{der_to_pem, sha256_hex};
use moat_identity::{CertInfo, SpiffeId, TrustBundle, TrustDomain, Usage, WorkloadKey};
use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm, SigningKey, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use zeroize::{Zeroize as _, Zeroizing};

use crate::state::CaState;
use crate::{CertTtl, Kek, KekError, Sealed};

/// How long a generated root lives.
pub(crate) const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
/// How long a generated intermediate lives.
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 86400);
/// How far NotBefore is back-dated, for clock skew between mesh members.
const BACKDATE: Duration = Duration::from_secs(60);

/// Which CA key a sealed value holds; part of the label it is sealed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyRole {
    Root,
    Intermediate,
}

impl KeyRole {
    /// The label values were sealed under before keys were bound to their certificates.
    pub(crate) fn legacy_label(self) -> &'static str {
        match self {
            KeyRole::Root => "moat/ca/root-key",
            KeyRole::Intermediate => "moat/ca/intermediate-key",
        }
    }

    /// The sealing label: the role and the SHA-256 of the certificate the key belongs to, so a
    /// sealed key cannot be moved to another role or paired with another generation's
    /// certificate (the AES-GCM tag fails).
    fn label(self, cert_der: &[u8]) -> String {
        let role = match self {
            KeyRole::Root => "root",
            KeyRole::Intermediate => "intermediate",
        };
        format!("moat/ca/{role}-key/{}", sha256_hex(cert_der))
    }
}

/// A CA private key whose encoded form is wiped from memory when it is dropped.
#[derive(Debug)]
pub(crate) struct CaKey(pub(crate) KeyPair);

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl CaKey {
    pub(crate) fn generate() -> Result<Self, CaError> {
        Ok(CaKey(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?))
    }

    /// Parses PKCS#8 PEM (operator material or an unsealed key).
    pub(crate) fn from_pem(what: &'static str, pem: &str) -> Result<Self, CaError> {
        KeyPair::from_pem(pem).map(CaKey).map_err(|e| CaError::Pem {
            what,
            detail: format!(
                "{e} (keys must be PKCS#8: convert with `openssl pkcs8 -topk8 -nocrypt`)"
            ),
        })
    }

    /// Seals the key under `kek` for `role`, bound to the certificate `cert_der`.
    pub(crate) fn seal(
        &self,
        kek: &Kek,
        role: KeyRole,
        cert_der: &[u8],
    ) -> Result<Sealed, CaError> {
        let pem = Zeroizing::new(self.0.serialize_pem());
        Ok(kek.seal(pem.as_bytes(), &role.label(cert_der))?)
    }

    /// Opens a key sealed for `role` and the certificate `cert_der` (or, for a value written
    /// before binding, under the role's old label).
    pub(crate) fn open(
        kek: &Kek,
        sealed: &Sealed,
        role: KeyRole,
        cert_der: &[u8],
        what: &'static str,
    ) -> Result<Self, CaError> {
        let plain = if sealed.bound {
            kek.open(sealed, &role.label(cert_der))?
        } else {
            kek.open(sealed, role.legacy_label())?
        };
        let pem = std::str::from_utf8(&plain)
            .map_err(|_| CaError::Import(format!("sealed {what} is not PEM")))?;
        Self::from_pem(what, pem)
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// Why the CA could not be built, loaded or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Kek(#[from] KekError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("{0}")]
    Import(String),
    #[error("the CA's own self-check failed (a leaf it signs does not verify): {0}")]
    SelfCheck(String),
    #[error("the issuing intermediate has expired (NotAfter {0}); rotate the intermediate")]
    IssuerExpired(i64),
    #[error("requested identity {id} is outside this CA's trust domain {domain}")]
    ForeignDomain { id: String, domain: String },
    #[error("{0}")]
    Rotation(String),
    #[error("requester public key is unusable: {0}")]
    PublicKey(String),
}

/// Operator-supplied CA material (bring your own root or intermediate), PEM text.
#[derive(Clone, Debug, Default)]
pub struct ByoPem {
    pub root_cert: String,
    /// Give the root key to let moat create its own intermediate under your root.
    pub root_key: Option<String>,
    /// Or give an intermediate (signed by the root) and its key to issue with directly.
    pub intermediate_cert: Option<String>,
    pub intermediate_key: Option<String>,
}

/// Facts about one CA certificate, for `moat ca show`.
#[derive(Clone, Debug)]
pub struct CaCertInfo {
    pub subject: String,
    pub sha256: String,
    pub not_before: i64,
    pub not_after: i64,
    pub pem: String,
}

/// A freshly signed leaf.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub id: SpiffeId,
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// When the holder should renew: half-life with ±10 % jitter, Unix seconds.
    pub refresh_after: i64,
}

/// A loaded, ready-to-sign CA.
#[derive(Debug)]
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    bundle: TrustBundle,
    issuer: Issuer<'static, CaKey>,
    intermediate: CertificateDer<'static>,
    intermediate_not_after: i64,
}

pub(crate) fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

pub(crate) fn pem_cert(what: &'static str, pem: &str) -> Result<CertificateDer<'static>, CaError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Pem {
        what,
        detail: e.to_string(),
    })
}

pub(crate) fn ca_params(
    cn: String,
    now: OffsetDateTime,
    lifetime: Duration,
    path_len: u8,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "moat");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    // Signing certificates only: digitalSignature is for leaves (X.509-SVID profile).
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - BACKDATE;
    p.not_after = now + lifetime;
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

/// A short random tag that keeps successive roots and intermediates apart by name, so chain
/// building never confuses an old CA with its replacement.
pub(crate) fn generation_tag() -> String {
    let tag: [u8; 4] = rand::rng().random();
    hex::encode(tag)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    // Positive and without a leading zero byte, so it encodes as exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn intermediate_under(
    td: &TrustDomain,
    root: &Issuer<'_, &CaKey>,
    now: OffsetDateTime,
    root_not_after: i64,
) -> Result<(CaKey, CertificateDer<'static>), CaError> {
    let key = CaKey::generate()?;
    let mut params = ca_params(
        format!("moat intermediate CA {td} {}", generation_tag()),
        now,
        INTERMEDIATE_LIFETIME,
        0,
    );
    let root_end = OffsetDateTime::from_unix_timestamp(root_not_after).unwrap_or(params.not_after);
    params.not_after = params.not_after.min(root_end);
    let cert = params.signed_by(&key, root)?;
    Ok((key, cert.der().clone()))
}

impl CertificateAuthority {
    /// Creates a new root and intermediate for `trust_domain`; returns the CA and the state to
    /// persist (keys sealed under `kek`).
    pub fn generate(trust_domain: &TrustDomain, kek: &Kek) -> Result<(Self, CaState), CaError> {
        let now = OffsetDateTime::now_utc();
        let root_key = CaKey::generate()?;
        let root_params = ca_params(
            format!("moat root CA {trust_domain} {}", generation_tag()),
            now,
            ROOT_LIFETIME,
            1,
        );
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params.clone(), &root_key);
        let (int_key, int_der) =
            intermediate_under(trust_domain, &root_issuer, now, unix(root_params.not_after))?;
        let state = CaState {
            trust_domain: trust_domain.to_string(),
            roots_pem: vec![root_cert.pem()],
            root_key: Some(root_key.seal(kek, KeyRole::Root, root_cert.der())?),
            intermediate_pem: der_to_pem("CERTIFICATE", &int_der),
            intermediate_key: int_key.seal(kek, KeyRole::Intermediate, &int_der)?,
            next_root_key: None,
            root_rotation: None,
        };
        let ca = Self::load(&state, kek)?;
        Ok((ca, state))
    }

    /// Builds a CA from operator PEM: either the root with its key (moat creates an
    /// intermediate under it) or the root plus an intermediate and the intermediate's key.
    pub fn import(
        trust_domain: &TrustDomain,
        byo: &ByoPem,
        kek: &Kek,
    ) -> Result<(Self, CaState), CaError> {
        let root_der = pem_cert("root certificate", &byo.root_cert)?;
        let root_info =
            CertInfo::from_der(&root_der).map_err(|e| CaError::Import(e.to_string()))?;
        if !root_info.is_ca {
            return Err(CaError::Import(
                "the root certificate is not a CA certificate (basicConstraints CA:TRUE missing)"
                    .into(),
            ));
        }
        let state = match (&byo.root_key, &byo.intermediate_cert, &byo.intermediate_key) {
            (Some(root_key_pem), None, None) => {
                let root_key = CaKey::from_pem("root key", root_key_pem)?;
                let root_issuer = Issuer::from_ca_cert_der(&root_der, &root_key)?;
                let (int_key, int_der) = intermediate_under(
                    trust_domain,
                    &root_issuer,
                    OffsetDateTime::now_utc(),
                    root_info.not_after,
                )?;
                CaState {
                    trust_domain: trust_domain.to_string(),
                    roots_pem: vec![der_to_pem("CERTIFICATE", &root_der)],
                    root_key: Some(root_key.seal(kek, KeyRole::Root, &root_der)?),
                    intermediate_pem: der_to_pem("CERTIFICATE", &int_der),
                    intermediate_key: int_key.seal(kek, KeyRole::Intermediate, &int_der)?,
                    next_root_key: None,
                    root_rotation: None,
                }
            }
            (None, Some(int_pem), Some(int_key_pem)) => {
                let int_der = pem_cert("intermediate certificate", int_pem)?;
                let int_key = CaKey::from_pem("intermediate key", int_key_pem)?;
                CaState {
                    trust_domain: trust_domain.to_string(),
                    roots_pem: vec![der_to_pem("CERTIFICATE", &root_der)],
                    root_key: None,
                    intermediate_pem: der_to_pem("CERTIFICATE", &int_der),
                    intermediate_key: int_key.seal(kek, KeyRole::Intermediate, &int_der)?,
                    next_root_key: None,
                    root_rotation: None,
                }
            }
            _ => {
                return Err(CaError::Import(
                    "give either the root certificate and its key, or the root certificate plus an intermediate certificate and its key".into(),
                ));
            }
        };
        // `load` proves the pieces fit: a leaf signed by the intermediate must verify to the root.
        let ca = Self::load(&state, kek)?;
        Ok((ca, state))
    }

    /// Unseals and checks persisted CA state. Fails with [`KekError::WrongKey`] under the wrong
    /// KEK, and with [`CaError::SelfCheck`] when the intermediate does not chain to the root or
    /// its key does not match its certificate.
    pub fn load(state: &CaState, kek: &Kek) -> Result<Self, CaError> {
        let trust_domain: TrustDomain = state
            .trust_domain
            .parse()
            .map_err(|e: moat_identity::IdError| CaError::Import(e.to_string()))?;
        let roots = state
            .roots_pem
            .iter()
            .map(|p| pem_cert("root certificate", p))
            .collect::<Result<Vec<_>, _>>()?;
        let bundle = TrustBundle::from_der(roots).map_err(|e| CaError::Import(e.to_string()))?;
        let intermediate = pem_cert("intermediate certificate", &state.intermediate_pem)?;
        let key = CaKey::open(
            kek,
            &state.intermediate_key,
            KeyRole::Intermediate,
            &intermediate,
            "intermediate key",
        )?;
        // Opened only to prove the KEK also unlocks them and they belong to their roots; root
        // keys are not kept in memory.
        state.open_root_key(kek)?;
        state.open_next_root_key(kek)?;
        let info = CertInfo::from_der(&intermediate).map_err(|e| CaError::Import(e.to_string()))?;
        if !info.is_ca {
            return Err(CaError::Import(
                "the intermediate certificate is not a CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&intermediate, key)?;
        let ca = CertificateAuthority {
            trust_domain,
            bundle,
            issuer,
            intermediate,
            intermediate_not_after: info.not_after,
        };
        ca.self_check()?;
        Ok(ca)
    }

    fn self_check(&self) -> Result<(), CaError> {
        let id = SpiffeId::parse_with_default("moat-system/ca-self-check", &self.trust_domain)
            .map_err(|e| CaError::SelfCheck(e.to_string()))?;
        let wk = WorkloadKey::generate(&id).map_err(|e| CaError::SelfCheck(e.to_string()))?;
        let csr = moat_identity::ValidatedCsr::from_der(wk.csr_der())
            .map_err(|e| CaError::SelfCheck(e.to_string()))?;
        let leaf = self.issue(&csr.spki_der, &id, CertTtl::MIN_TTL)?;
        moat_identity::verify_chain(
            &leaf.chain,
            &self.bundle,
            &self.trust_domain,
            UnixTime::now(),
            Usage::Client,
        )
        .map_err(|e| CaError::SelfCheck(e.to_string()))?;
        Ok(())
    }

    /// Signs a leaf for `id` over the requester's public key (`spki_der`, from a validated CSR).
    /// The leaf's only SAN is the SPIFFE ID; EKU server+client; NotBefore back-dated 60 s;
    /// NotAfter is `ttl` from now but never beyond the intermediate's.
    pub fn issue(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        ttl: CertTtl,
    ) -> Result<IssuedCert, CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignDomain {
                id: id.to_string(),
                domain: self.trust_domain.to_string(),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, id.namespace().as_str());
        dn.push(DnType::CommonName, id.service_account().as_str());
        let (leaf, serial, not_after, refresh_after) = self.sign_leaf(
            spki_der,
            dn,
            vec![SanType::URI(id.to_string().try_into()?)],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            ttl,
        )?;
        Ok(IssuedCert {
            id: id.clone(),
            chain: vec![leaf, self.intermediate.clone()],
            serial,
            not_after,
            refresh_after,
        })
    }

    /// Signs a TLS server certificate for DNS names (not a workload identity): what the
    /// Kubernetes API server checks when it calls the control plane's admission webhook.
    /// Returns the chain (leaf, intermediate) and the refresh time.
    pub fn issue_dns_server(
        &self,
        spki_der: &[u8],
        dns_names: &[String],
        ttl: CertTtl,
    ) -> Result<(Vec<CertificateDer<'static>>, i64), CaError> {
        let first = dns_names
            .first()
            .ok_or_else(|| CaError::Import("a server certificate needs a DNS name".into()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "moat");
        dn.push(DnType::CommonName, first.as_str());
        let sans = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.as_str().try_into()?)))
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let (leaf, _, _, refresh_after) = self.sign_leaf(
            spki_der,
            dn,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            ttl,
        )?;
        Ok((vec![leaf, self.intermediate.clone()], refresh_after))
    }

    /// Signs a leaf: back-dated 60 s, NotAfter `ttl` from now but never beyond the
    /// intermediate's. Returns the DER, the serial (hex), NotAfter and the refresh time.
    fn sign_leaf(
        &self,
        spki_der: &[u8],
        dn: DistinguishedName,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        ttl: CertTtl,
    ) -> Result<(CertificateDer<'static>, String, i64, i64), CaError> {
        let now = OffsetDateTime::now_utc();
        if unix(now) >= self.intermediate_not_after {
            return Err(CaError::IssuerExpired(self.intermediate_not_after));
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::PublicKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        // X.509-SVID leaf profile: basicConstraints cA=false (critical), digitalSignature only,
        // and a subject key identifier (rcgen writes one with explicit basicConstraints).
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.not_before = now - BACKDATE;
        let issuer_end =
            OffsetDateTime::from_unix_timestamp(self.intermediate_not_after).unwrap_or(now);
        params.not_after = (now + ttl.get()).min(issuer_end);
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let lifetime = unix(params.not_after) - unix(now);
        // Renew at half-life, spread by ±10 % so a fleet started together does not renew together.
        let jitter = rand::rng().random_range(-lifetime / 10..=lifetime / 10);
        Ok((
            leaf.der().clone(),
            serial_hex,
            unix(params.not_after),
            unix(now) + lifetime / 2 + jitter,
        ))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Every root the mesh trusts.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The issuing intermediate, DER.
    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.intermediate
    }

    /// Facts about the roots, for display.
    pub fn roots_info(&self) -> Vec<CaCertInfo> {
        self.bundle
            .roots()
            .iter()
            .filter_map(|c| ca_cert_info(c))
            .collect()
    }

    /// Facts about the intermediate, for display.
    pub fn intermediate_info(&self) -> Option<CaCertInfo> {
        ca_cert_info(&self.intermediate)
    }
}

fn ca_cert_info(der: &CertificateDer<'_>) -> Option<CaCertInfo> {
    let info = CertInfo::from_der(der).ok()?;
    Some(CaCertInfo {
        subject: info.subject,
        sha256: sha256_hex(der),
        not_before: info.not_before,
        not_after: info.not_after,
        pem: der_to_pem("CERTIFICATE", der),
    })
}
