//! The key-encryption key (KEK) and AES-256-GCM sealing of CA private keys at rest. The KEK is
//! never stored beside what it protects: it comes from a file or the environment.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a KEK could not be read or a sealed value opened.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error(
        "key-encryption key must be 32 bytes written as base64 or hex (generate one with `openssl rand -base64 32`); got {0}"
    )]
    Format(String),
    #[error(
        "cannot decrypt the CA keys: the key-encryption key is not the one they were sealed with (or the data is corrupt)"
    )]
    WrongKey,
    #[error("sealed value is malformed: {0}")]
    Malformed(String),
    #[error("the system random generator failed")]
    Random,
}

/// A 256-bit key-encryption key.
pub struct Kek(LessSafeKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// Parses a KEK written as base64 or hex (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, KekError> {
        let text = text.trim();
        let bytes = Zeroizing::new(
            if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
                hex::decode(text).map_err(|e| KekError::Format(e.to_string()))?
            } else {
                B64.decode(text)
                    .map_err(|_| KekError::Format("text that is neither base64 nor hex".into()))?
            },
        );
        if bytes.len() != 32 {
            return Err(KekError::Format(format!("{} bytes", bytes.len())));
        }
        Self::from_bytes(&bytes)
    }

    /// Generates a new random KEK and returns it with its base64 text form.
    pub fn generate() -> Result<(Self, String), KekError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| KekError::Random)?;
        Ok((
            Self::from_bytes(bytes.as_ref())?,
            B64.encode(bytes.as_ref()),
        ))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, KekError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| KekError::Format(format!("{} bytes", bytes.len())))?;
        Ok(Kek(LessSafeKey::new(key)))
    }

    /// Encrypts `plaintext`, binding it to `label` (authenticated, not secret) so that a sealed
    /// value cannot be swapped for another: the CA labels each key with its role and the
    /// certificate it belongs to.
    pub fn seal(&self, plaintext: &[u8], label: &str) -> Result<Sealed, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KekError::Random)?;
        let mut data = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(label.as_bytes()),
                &mut data,
            )
            .map_err(|_| KekError::Random)?;
        Ok(Sealed {
            alg: "AES-256-GCM".to_owned(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(data),
            bound: true,
        })
    }

    /// Decrypts a value sealed under this KEK with the same `label`. The plaintext is wiped
    /// from memory when dropped.
    pub fn open(&self, sealed: &Sealed, label: &str) -> Result<Zeroizing<Vec<u8>>, KekError> {
        if sealed.alg != "AES-256-GCM" {
            return Err(KekError::Malformed(format!(
                "unknown algorithm {}",
                sealed.alg
            )));
        }
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| KekError::Malformed("bad nonce".into()))?;
        let mut data = Zeroizing::new(
            B64.decode(&sealed.ciphertext)
                .map_err(|_| KekError::Malformed("bad ciphertext".into()))?,
        );
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(label.as_bytes()),
                data.as_mut(),
            )
            .map_err(|_| KekError::WrongKey)?;
        Ok(Zeroizing::new(plain.to_vec()))
    }
}

/// A value sealed with AES-256-GCM under a [`Kek`]; safe to store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    pub alg: String,
    pub nonce: String,
    pub ciphertext: String,
    /// Sealed under a label that names the key's role and certificate. Values written before
    /// that (label = role only) read as `false` and are resealed when the CA loads them.
    #[serde(default)]
    pub bound: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_wrong_key_or_label_fails() {
        let (kek, text) = Kek::generate().unwrap();
        let sealed = kek.seal(b"secret key bytes", "ca/root").unwrap();
        assert!(!sealed.ciphertext.contains("secret"));
        assert_eq!(
            kek.open(&sealed, "ca/root").unwrap().as_slice(),
            b"secret key bytes"
        );
        assert!(matches!(
            kek.open(&sealed, "ca/other"),
            Err(KekError::WrongKey)
        ));
        let (other, _) = Kek::generate().unwrap();
        assert!(matches!(
            other.open(&sealed, "ca/root"),
            Err(KekError::WrongKey)
        ));
        let again = Kek::parse(&text).unwrap();
        assert_eq!(
            again.open(&sealed, "ca/root").unwrap().as_slice(),
            b"secret key bytes"
        );
    }

    #[test]
    fn kek_text_forms() {
        assert!(Kek::parse(&"ab".repeat(32)).is_ok());
        for bad in ["", "short", &"zz".repeat(32), "AAAA"] {
            assert!(
                matches!(Kek::parse(bad), Err(KekError::Format(_))),
                "{bad:?}"
            );
        }
    }
}
