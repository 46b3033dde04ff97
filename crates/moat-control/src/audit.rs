//! The audit log: every admin action and every refused certificate request, appended to the
//! store under `audit/<unix-ms>-<random>` so that keys sort by time.

use std::sync::Arc;

use moat_store::{Store, StoreError};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "audit/";

/// One audit entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub time_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// Whether the audited action happened.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Refused,
}

impl Outcome {
    /// `ok` or `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
        }
    }
}

/// Appends and reads audit entries.
#[derive(Clone, Debug)]
pub struct AuditLog {
    store: Arc<dyn Store>,
}

impl AuditLog {
    /// An audit log in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        AuditLog { store }
    }

    /// Appends an entry; it is durable when this returns. Also emitted as a log line.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: &str,
    ) -> Result<(), StoreError> {
        let time_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let entry = AuditEntry {
            time_unix_ms,
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome,
            detail: detail.to_owned(),
        };
        tracing::info!(
            target: "moat::audit",
            actor, action, target, outcome = outcome.as_str(), detail,
            "audit"
        );
        let suffix: u32 = rand::rng().random();
        let key = format!("{PREFIX}{time_unix_ms:015}-{suffix:08x}");
        // Serialising a plain struct of strings and integers cannot fail.
        self.store
            .put(&key, serde_json::to_vec(&entry).unwrap_or_default())
            .await?;
        Ok(())
    }

    /// The newest `limit` entries, oldest first.
    pub async fn newest(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out: Vec<AuditEntry> = self
            .store
            .range(PREFIX, limit, true)
            .await?
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        out.reverse();
        Ok(out)
    }
}
