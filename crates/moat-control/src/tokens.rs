//! Join tokens: high-entropy secrets bound to one identity, stored only as a SHA-256 hash under
//! `tokens/<id>`, where the id is the first 16 hex digits of that hash. Consuming a use is a
//! compare-and-swap on the stored record, so concurrent redemptions cannot overspend a token.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use moat_identity::SpiffeId;
use moat_store::{Compare, Op, Store, StoreError, Txn};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "tokens/";
const TOKEN_PREFIX: &str = "moat_";
/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);
/// The most uses one token may grant.
pub const MAX_USES: u32 = 100_000;

/// A stored token (never the token itself).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the token text, hex.
    pub hash: String,
    pub spiffe_id: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    pub max_uses: u32,
    pub uses: u32,
    pub revoked: bool,
}

/// Why a token could not be redeemed or managed. Each maps to its own gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "join token is not recognised: check you copied the whole token, or create a new one with `moat token create`"
    )]
    Unknown,
    #[error(
        "join token {id} expired at {expired_unix} (unix); create a new one with `moat token create`"
    )]
    Expired { id: String, expired_unix: i64 },
    #[error("join token {id} has been revoked")]
    Revoked { id: String },
    #[error(
        "join token {id} is used up ({max_uses} of {max_uses} uses); create a new one with `moat token create --uses N`"
    )]
    Exhausted { id: String, max_uses: u32 },
    #[error("join token {id} is bound to {bound}, but the CSR asks for {asked}")]
    WrongIdentity {
        id: String,
        bound: String,
        asked: String,
    },
    #[error("no join token with id {0}")]
    NoSuchId(String),
    #[error("invalid token request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored token record is corrupt: {0}")]
    Corrupt(String),
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Token operations over the store.
#[derive(Clone, Debug)]
pub struct Tokens {
    store: Arc<dyn Store>,
}

impl Tokens {
    /// Token operations over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Tokens { store }
    }

    /// Creates a token for `id`. Returns the token text (shown once) and its record.
    pub async fn create(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        max_uses: u32,
    ) -> Result<(String, TokenRecord), TokenError> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(TokenError::Invalid(format!(
                "ttl {}s is outside 1s..{}s (30 days)",
                ttl.as_secs(),
                MAX_TOKEN_TTL.as_secs()
            )));
        }
        if max_uses == 0 || max_uses > MAX_USES {
            return Err(TokenError::Invalid(format!(
                "uses {max_uses} is outside 1..{MAX_USES}"
            )));
        }
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let hash = hash(&token);
        let now = moat_identity::clock::unix_now();
        let record = TokenRecord {
            id: hash[..16].to_owned(),
            hash,
            spiffe_id: id.to_string(),
            created_unix: now,
            expires_unix: now + ttl.as_secs() as i64,
            max_uses,
            uses: 0,
            revoked: false,
        };
        let key = format!("{PREFIX}{}", record.id);
        let done = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.clone(), 0)],
                success: vec![Op::Put(key, encode(&record))],
                ..Txn::default()
            })
            .await?;
        if !done.succeeded {
            // 64 bits of hash prefix colliding with a live token: vanishingly unlikely.
            return Err(TokenError::Invalid("token id collision; try again".into()));
        }
        Ok((token, record))
    }

    /// Redeems one use of `token` for a CSR asking for `asked`.
    pub async fn redeem(&self, token: &str, asked: &SpiffeId) -> Result<TokenRecord, TokenError> {
        let token = token.trim();
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return Err(TokenError::Unknown);
        }
        let hash = hash(token);
        let key = format!("{PREFIX}{}", &hash[..16]);
        self.update(&key, TokenError::Unknown, |rec| {
            if !constant_time_eq(rec.hash.as_bytes(), hash.as_bytes()) {
                return Err(TokenError::Unknown);
            }
            if rec.revoked {
                return Err(TokenError::Revoked { id: rec.id.clone() });
            }
            if moat_identity::clock::unix_now() >= rec.expires_unix {
                return Err(TokenError::Expired {
                    id: rec.id.clone(),
                    expired_unix: rec.expires_unix,
                });
            }
            if rec.uses >= rec.max_uses {
                return Err(TokenError::Exhausted {
                    id: rec.id.clone(),
                    max_uses: rec.max_uses,
                });
            }
            if rec.spiffe_id != asked.to_string() {
                return Err(TokenError::WrongIdentity {
                    id: rec.id.clone(),
                    bound: rec.spiffe_id.clone(),
                    asked: asked.to_string(),
                });
            }
            rec.uses += 1;
            Ok(())
        })
        .await
    }

    /// Read-check-write of one record as a compare-and-swap, retried while other writers race.
    /// `missing` is the error when the record does not exist.
    async fn update(
        &self,
        key: &str,
        missing: TokenError,
        mut change: impl FnMut(&mut TokenRecord) -> Result<(), TokenError>,
    ) -> Result<TokenRecord, TokenError> {
        loop {
            let Some(kv) = self.store.get(key).await? else {
                return Err(missing);
            };
            let mut rec = decode(&kv.value)?;
            change(&mut rec)?;
            let done = self
                .store
                .txn(Txn {
                    compares: vec![Compare::ModRevision(key.to_owned(), kv.mod_revision)],
                    success: vec![Op::Put(key.to_owned(), encode(&rec))],
                    ..Txn::default()
                })
                .await?;
            if done.succeeded {
                return Ok(rec);
            }
        }
    }

    /// Every token record, oldest id first.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        self.store
            .range(PREFIX, 0, false)
            .await?
            .iter()
            .map(|kv| decode(&kv.value))
            .collect()
    }

    /// Marks a token revoked (idempotent).
    pub async fn revoke(&self, id: &str) -> Result<TokenRecord, TokenError> {
        if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(TokenError::Invalid(format!(
                "{id:?} is not a token id (16 hex digits, as `moat token list` shows)"
            )));
        }
        let key = format!("{PREFIX}{}", id.to_ascii_lowercase());
        self.update(&key, TokenError::NoSuchId(id.to_owned()), |rec| {
            rec.revoked = true;
            Ok(())
        })
        .await
    }
}

fn encode(rec: &TokenRecord) -> Vec<u8> {
    // Serialising a plain struct of strings and integers cannot fail.
    serde_json::to_vec(rec).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Result<TokenRecord, TokenError> {
    serde_json::from_slice(bytes).map_err(|e| TokenError::Corrupt(e.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_identity::TrustDomain;
    use moat_store::EmbeddedStore;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse_with_default(s, &TrustDomain::default_domain()).unwrap()
    }

    #[tokio::test]
    async fn token_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        let (token, rec) = tokens
            .create(&id("shop/orders"), Duration::from_secs(60), 2)
            .await
            .unwrap();
        assert!(token.starts_with("moat_") && token.len() > 40);

        // Never stored in clear.
        let listed = tokens.list().await.unwrap();
        assert_eq!(listed, vec![rec.clone()]);
        assert!(
            !serde_json::to_string(&listed)
                .unwrap()
                .contains(&token[5..])
        );

        assert!(matches!(
            tokens.redeem(&token, &id("shop/payments")).await,
            Err(TokenError::WrongIdentity { .. })
        ));
        tokens.redeem(&token, &id("shop/orders")).await.unwrap();
        tokens.redeem(&token, &id("shop/orders")).await.unwrap();
        assert!(matches!(
            tokens.redeem(&token, &id("shop/orders")).await,
            Err(TokenError::Exhausted { max_uses: 2, .. })
        ));
        assert!(matches!(
            tokens.redeem("moat_nope", &id("shop/orders")).await,
            Err(TokenError::Unknown)
        ));
        assert!(matches!(
            tokens.redeem("garbage", &id("shop/orders")).await,
            Err(TokenError::Unknown)
        ));

        let (t2, r2) = tokens
            .create(&id("a"), Duration::from_secs(60), 1)
            .await
            .unwrap();
        tokens.revoke(&r2.id).await.unwrap();
        assert!(matches!(
            tokens.redeem(&t2, &id("a")).await,
            Err(TokenError::Revoked { .. })
        ));
        assert!(matches!(
            tokens.revoke("zz").await,
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            tokens.revoke("0123456789abcdef").await,
            Err(TokenError::NoSuchId(_))
        ));
        assert!(tokens.create(&id("a"), Duration::ZERO, 1).await.is_err());
        assert!(
            tokens
                .create(&id("a"), Duration::from_secs(60), 0)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn concurrent_redemptions_never_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        let (token, _) = tokens
            .create(&id("orders"), Duration::from_secs(60), 3)
            .await
            .unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (t, k) = (tokens.clone(), token.clone());
                tokio::spawn(async move { t.redeem(&k, &id("orders")).await.is_ok() })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 3);
    }
}
