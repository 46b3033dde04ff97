//! End-user tokens: an issuer's key set (JWKS) and the verification of a bearer token against
//! the issuers a mesh trusts. The signature, `exp` and `nbf` checks are jsonwebtoken's; this
//! module decides which issuer, key and algorithm may be used, and names every failure with a
//! reason code. What a *rule* asks of a verified token (issuer, audience, claims) is the
//! evaluator's business.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::eval::Reason;
use crate::model::JwtAlgorithm;

pub use crate::model::Claims;

/// The largest bearer token looked at.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Why a JWKS document was refused: a bad key set is never applied.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is {0} bytes; the limit is {MAX_JWKS_BYTES}")]
    TooLarge(usize),
    #[error("not a JWKS document ({{\"keys\": [...]}}): {0}")]
    NotJwks(serde_json::Error),
    #[error("{key} is a symmetric key (kty oct): shared secrets are never accepted")]
    Symmetric { key: String },
    #[error("{key} uses an unsupported key type or curve: use RSA, EC P-256 or Ed25519")]
    UnsupportedKey { key: String },
    #[error("{key} is a {} key but the issuer allows only {allowed}", alg.as_str())]
    NotAllowed {
        key: String,
        alg: JwtAlgorithm,
        allowed: String,
    },
    #[error("{key} is unusable: {source}")]
    Unusable {
        key: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error("the JWKS holds no signature key")]
    NoKey,
}

/// One usable verification key.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: JwtAlgorithm,
    key: DecodingKey,
}

/// An issuer's verification keys, checked.
#[derive(Clone)]
pub struct Jwks {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self
            .keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.alg.as_str()))
            .collect();
        f.debug_struct("Jwks").field("keys", &kids).finish()
    }
}

fn to_jose(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

impl Jwks {
    /// Parses a JWKS document, keeping the signature keys usable with one of `algorithms`.
    /// Refuses a document that is not JWKS, holds a key that cannot be used (symmetric, another
    /// curve, malformed), or leaves no usable key: a bad key set must never be applied.
    pub fn parse(json: &str, algorithms: &[JwtAlgorithm]) -> Result<Jwks, JwksError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge(json.len()));
        }
        let set: JwkSet = serde_json::from_str(json).map_err(JwksError::NotJwks)?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = || match &jwk.common.key_id {
                Some(kid) => format!("key {i} (kid {kid:?})"),
                None => format!("key {i}"),
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => JwtAlgorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    JwtAlgorithm::ES256
                }
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    JwtAlgorithm::EdDSA
                }
                AlgorithmParameters::OctetKey(_) => {
                    return Err(JwksError::Symmetric { key: name() });
                }
                _ => return Err(JwksError::UnsupportedKey { key: name() }),
            };
            if !algorithms.contains(&alg) {
                return Err(JwksError::NotAllowed {
                    key: name(),
                    alg,
                    allowed: algorithms
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|source| JwksError::Unusable {
                key: name(),
                source,
            })?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err(JwksError::NoKey);
        }
        Ok(Jwks { keys })
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// An issuer a proxy verifies tokens of.
#[derive(Clone, Debug)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub algorithms: Vec<JwtAlgorithm>,
    pub clock_skew: Duration,
    pub keys: Jwks,
}

fn part(token: &str, i: usize) -> Result<Map<String, Value>, Reason> {
    let seg = token.split('.').nth(i).ok_or(Reason::JwtMalformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(seg.trim_end_matches('='))
        .map_err(|_| Reason::JwtMalformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Reason::JwtMalformed),
    }
}

/// Verifies `token` (the bearer value) against `issuers`: the issuer named by `iss` must be
/// trusted, the header's algorithm allowed for it, the key found (by `kid`, else the issuer's
/// keys of that algorithm), the signature valid, `exp` present and not passed and `nbf` (if any)
/// reached, both within the issuer's clock skew. Returns the claims.
pub fn verify(token: &str, issuers: &[TrustedIssuer]) -> Result<Claims, Reason> {
    if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
        return Err(Reason::JwtMalformed);
    }
    let header = part(token, 0)?;
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some(a) => a
            .parse::<JwtAlgorithm>()
            .map_err(|_| Reason::JwtAlgorithmNotAllowed)?,
        None => return Err(Reason::JwtMalformed),
    };
    let unverified = part(token, 1)?;
    let iss = unverified
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(Reason::JwtMalformed)?;
    let issuer = issuers
        .iter()
        .find(|i| i.issuer == iss)
        .ok_or(Reason::JwtIssuerUnknown)?;
    if !issuer.algorithms.contains(&alg) {
        return Err(Reason::JwtAlgorithmNotAllowed);
    }
    let kid = header.get("kid").and_then(Value::as_str);
    let candidates: Vec<&Key> = issuer
        .keys
        .keys
        .iter()
        .filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
        .collect();
    if candidates.is_empty() {
        return Err(Reason::JwtUnknownKid);
    }
    let mut validation = Validation::new(to_jose(alg));
    validation.leeway = issuer.clock_skew.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp"]);
    let mut failure = Reason::JwtBadSignature;
    for k in candidates {
        match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                failure = match e.kind() {
                    K::ExpiredSignature => Reason::JwtExpired,
                    K::ImmatureSignature => Reason::JwtNotYetValid,
                    K::InvalidSignature => Reason::JwtBadSignature,
                    K::InvalidAlgorithm => Reason::JwtAlgorithmNotAllowed,
                    K::MissingRequiredClaim(_) | K::InvalidClaimFormat(_) | K::Json(_) => {
                        Reason::JwtMalformed
                    }
                    _ => Reason::JwtBadSignature,
                };
                // A time or shape failure means the signature held: no other key will do better.
                if failure != Reason::JwtBadSignature {
                    break;
                }
            }
        }
    }
    Err(failure)
}
