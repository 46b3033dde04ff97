//! Token helpers shared by the end-user token and service-account scenarios: signing keys
//! generated in the test (RSA, P-256, Ed25519), their JWKS, and signed tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// A signing key of the test's token service.
pub struct Signer {
    pub kid: String,
    pub alg: Algorithm,
    pub key: EncodingKey,
    /// The public half, as published in the JWKS.
    pub jwk: Jwk,
}

/// The RSAPrivateKey (PKCS#1) inside a PKCS#8 document, which is what jsonwebtoken signs with.
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    // SEQUENCE { INTEGER version, SEQUENCE algorithm, OCTET STRING privateKey }
    fn element(d: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = d[0];
        let (len, header) = match d[1] {
            l if l < 0x80 => (usize::from(l), 2),
            0x81 => (usize::from(d[2]), 3),
            0x82 => (usize::from(d[2]) << 8 | usize::from(d[3]), 4),
            _ => panic!("unexpected DER length"),
        };
        (tag, &d[header..header + len], &d[header + len..])
    }
    let (_, seq, _) = element(pkcs8);
    let (_, _, rest) = element(seq);
    let (_, _, rest) = element(rest);
    let (tag, key, _) = element(rest);
    assert_eq!(tag, 0x04);
    key.to_vec()
}

fn with_kid(mut jwk: Jwk, kid: &str) -> Jwk {
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

impl Signer {
    pub fn rsa(kid: &str) -> Self {
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = kp.as_der().unwrap();
        let key = EncodingKey::from_rsa_der(&pkcs1_of(pkcs8.as_ref()));
        let jwk = with_kid(Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap(), kid);
        Signer {
            kid: kid.into(),
            alg: Algorithm::RS256,
            key,
            jwk,
        }
    }

    pub fn ec(kid: &str) -> Self {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key = EncodingKey::from_ec_der(doc.as_ref());
        let jwk = with_kid(Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap(), kid);
        Signer {
            kid: kid.into(),
            alg: Algorithm::ES256,
            key,
            jwk,
        }
    }

    pub fn ed(kid: &str) -> Self {
        let doc = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).unwrap();
        let key = EncodingKey::from_ed_der(doc.as_ref());
        let jwk = with_kid(Jwk::from_encoding_key(&key, Algorithm::EdDSA).unwrap(), kid);
        Signer {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            key,
            jwk,
        }
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

pub fn jwks(signers: &[&Signer]) -> String {
    serde_json::to_string(&JwkSet {
        keys: signers.iter().map(|s| s.jwk.clone()).collect(),
    })
    .unwrap()
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
