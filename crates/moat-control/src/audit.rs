//! The audit log: every admin action and every refused certificate request, appended to the
//! store under `audit/<unix-ms>-<sequence>-<random>` so that keys sort by time, and by order of
//! writing within a millisecond. Refusals that anyone can provoke go under `audit-sampled/`,
//! with the same key form, so that however long a flood of them lasts it can push out only
//! older ones like it, never an admin's action; readers see the two merged by time.
//!
//! Two bounds keep it useful under abuse. Refusals that anyone can provoke (admin calls without
//! an admin certificate, refused `Certify` calls) are sampled: the first of each kind in a
//! [`SAMPLE_WINDOW`] is written, with how many like it were left out since the previous one;
//! the rest are only counted (metrics). A kind includes what the caller asked for (a `Certify`
//! names any identity it likes), so at most [`MAX_WRITTEN_PER_WINDOW`] refusals are written per
//! window whatever their kinds; past it, new kinds share one entry. And a [`Retention`] bound
//! (entries and age) is applied to each of the two parts by [`AuditLog::prune`], which the
//! control plane runs every minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_store::{Op, Store, StoreError, Txn};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "audit/";
/// Where the sampled refusals (see [`AuditLog::record_sampled`]) are kept.
const SAMPLED_PREFIX: &str = "audit-sampled/";
/// Refusals of one kind are written at most once per window.
pub const SAMPLE_WINDOW: Duration = Duration::from_secs(60);
/// Kinds tracked at once; past it, new kinds share one window.
const MAX_SAMPLED_KINDS: usize = 4096;
/// Refusals written per [`SAMPLE_WINDOW`], whatever their kinds: past it, a new kind is counted
/// in the shared `*` kind, so a caller varying what it asks for cannot write an entry per call
/// and push real actions out of the log's retention bound.
pub const MAX_WRITTEN_PER_WINDOW: u64 = 60;
/// Entries read or deleted per store call while pruning.
const PRUNE_PAGE: usize = 512;

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
    pub const ALL: [Outcome; 2] = [Outcome::Ok, Outcome::Refused];

    /// `ok` or `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
        }
    }
}

/// A word that is not an [`Outcome`].
#[derive(Debug, thiserror::Error)]
#[error("outcome {0:?}: use \"ok\" or \"refused\" (or leave it empty)")]
pub struct NotAnOutcome(String);

impl std::str::FromStr for Outcome {
    type Err = NotAnOutcome;

    fn from_str(s: &str) -> Result<Self, NotAnOutcome> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| NotAnOutcome(s.to_owned()))
    }
}

/// How much of the audit log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many entries are kept, of the actions and of the sampled refusals
    /// each.
    pub max_entries: usize,
    /// Entries older than this are removed.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_entries: 100_000,
            max_age: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Which entries a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Leave out read-only actions (`*.list`, `*.show`, `*.history`, `*.get`, `*.status`)
    /// that succeeded; refusals are always kept.
    pub changes_only: bool,
    /// Only this outcome.
    pub outcome: Option<Outcome>,
    /// Only actions starting with this (`policy.`, `cert.issue`).
    pub action_prefix: String,
    /// Only this actor (exact).
    pub actor: String,
}

impl Filter {
    fn keeps(&self, e: &AuditEntry) -> bool {
        (!self.changes_only || e.outcome == Outcome::Refused || !is_read_only(&e.action))
            && self.outcome.is_none_or(|o| o == e.outcome)
            && e.action.starts_with(&self.action_prefix)
            && (self.actor.is_empty() || self.actor == e.actor)
    }
}

/// Whether an action only reads.
pub fn is_read_only(action: &str) -> bool {
    [".list", ".show", ".history", ".get", ".status"]
        .iter()
        .any(|s| action.ends_with(s))
}

/// The sampling windows of refusal kinds.
#[derive(Debug, Default)]
struct Sampler {
    windows: HashMap<String, (Instant, u64)>,
    /// When the current window of the overall budget began, and how many were written in it.
    written: Option<(Instant, u64)>,
}

impl Sampler {
    /// `Some(n)` when a refusal of `kind` should be written now, `n` being how many of that
    /// kind were left out since the last one written; `None` when it is only counted.
    fn admit(&mut self, kind: &str, now: Instant) -> Option<u64> {
        if !self.windows.contains_key(kind) && self.windows.len() >= MAX_SAMPLED_KINDS {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < SAMPLE_WINDOW);
        }
        let kind = if self.windows.contains_key(kind) || self.windows.len() < MAX_SAMPLED_KINDS {
            kind
        } else {
            "*"
        };
        let written = match self.written {
            Some((start, n)) if now.duration_since(start) < SAMPLE_WINDOW => n,
            _ => {
                self.written = Some((now, 0));
                0
            }
        };
        let due = self
            .windows
            .get(kind)
            .is_none_or(|(start, _)| now.duration_since(*start) >= SAMPLE_WINDOW);
        let kind = if due && written >= MAX_WRITTEN_PER_WINDOW {
            "*"
        } else {
            kind
        };
        let admitted = self.admit_kind(kind, now);
        if admitted.is_some()
            && let Some((_, n)) = &mut self.written
        {
            *n += 1;
        }
        admitted
    }

    /// [`Sampler::admit`] for `kind` as chosen.
    fn admit_kind(&mut self, kind: &str, now: Instant) -> Option<u64> {
        match self.windows.get_mut(kind) {
            Some((start, left_out)) if now.duration_since(*start) < SAMPLE_WINDOW => {
                *left_out += 1;
                None
            }
            Some((start, left_out)) => {
                let n = *left_out;
                (*start, *left_out) = (now, 0);
                Some(n)
            }
            None => {
                self.windows.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// Appends and reads audit entries.
#[derive(Clone, Debug)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    retention: Retention,
    sampler: Arc<Mutex<Sampler>>,
    /// How many entries the store holds under [`PREFIX`] and [`SAMPLED_PREFIX`], once counted
    /// (the first prune counts them): later prunes read only what they delete.
    count: Arc<Mutex<[Option<usize>; 2]>>,
}

/// The two parts of the log, by where they are kept: the index of each one's count.
const PARTS: [&str; 2] = [PREFIX, SAMPLED_PREFIX];

/// The time an entry's key (under `prefix`) carries.
fn key_time(prefix: &str, key: &str) -> Option<i64> {
    key.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

impl AuditLog {
    /// An audit log in `store`, kept within `retention`.
    pub fn new(store: Arc<dyn Store>, retention: Retention) -> Self {
        AuditLog {
            store,
            retention,
            sampler: Arc::default(),
            count: Arc::default(),
        }
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
        self.append(0, actor, action, target, outcome, detail).await
    }

    /// Appends an entry to the part `part` of [`PARTS`].
    async fn append(
        &self,
        part: usize,
        actor: &str,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: &str,
    ) -> Result<(), StoreError> {
        let time_unix_ms = moat_identity::clock::unix_now_ms();
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
        // Within one millisecond, entries keep the order they were written in (the sequence);
        // the random part keeps keys apart across processes.
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let suffix: u32 = rand::rng().random();
        let key = format!("{}{time_unix_ms:015}-{seq:016x}-{suffix:08x}", PARTS[part]);
        // Serialising a plain struct of strings and integers cannot fail.
        self.store
            .put(&key, serde_json::to_vec(&entry).unwrap_or_default())
            .await?;
        self.adjust_count(part, |c| c + 1);
        Ok(())
    }

    fn adjust_count(&self, part: usize, f: impl FnOnce(usize) -> usize) {
        if let Ok(mut c) = self.count.lock()
            && let Some(n) = c[part].as_mut()
        {
            *n = f(*n);
        }
    }

    /// Records a refusal of `kind` if it is the first of its kind in the sampling window (its
    /// detail then says how many like it were left out since the previous entry), apart from
    /// the actions (see the module's notes).
    pub async fn record_sampled(
        &self,
        kind: &str,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let admitted = match self.sampler.lock() {
            Ok(mut s) => s.admit(kind, Instant::now()),
            // A poisoned sampler must not cost the audit trail: write.
            Err(_) => Some(0),
        };
        match admitted {
            None => {
                tracing::debug!(target: "moat::audit", actor, action, detail, "refusal counted, not written (sampled)");
                Ok(())
            }
            Some(0) => {
                self.append(1, actor, action, target, Outcome::Refused, detail)
                    .await
            }
            Some(n) => {
                let detail = format!(
                    "{detail} ({n} more like this since the previous entry were counted, not written)"
                );
                self.append(1, actor, action, target, Outcome::Refused, &detail)
                    .await
            }
        }
    }

    /// The newest `limit` entries that `filter` keeps, of both parts, oldest first, looking at
    /// no more than `scan` entries of each.
    pub async fn newest(
        &self,
        limit: usize,
        filter: &Filter,
        scan: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let unfiltered = *filter == Filter::default();
        let fetch = if unfiltered { limit } else { scan.max(limit) };
        let mut found = Vec::new();
        for prefix in PARTS {
            for kv in self.store.range(prefix, fetch, true).await? {
                // Keys after the prefix sort by time, then by order of writing.
                let order = kv.key[prefix.len()..].to_owned();
                found.push((order, kv.value));
            }
        }
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        let mut out: Vec<AuditEntry> = found
            .iter()
            .filter_map(|(_, value)| serde_json::from_slice(value).ok())
            .filter(|e| filter.keeps(e))
            .take(limit)
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Removes entries beyond the retention bound (oldest first), in each part; returns how
    /// many.
    pub async fn prune(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for part in 0..PARTS.len() {
            removed += self.prune_part(part).await?;
        }
        Ok(removed)
    }

    async fn prune_part(&self, part: usize) -> Result<usize, StoreError> {
        let prefix = PARTS[part];
        let cutoff = moat_identity::clock::unix_now_ms()
            .saturating_sub(self.retention.max_age.as_millis() as i64);
        let mut removed = 0;
        // Too old.
        loop {
            let page = self.store.range(prefix, PRUNE_PAGE, false).await?;
            let old: Vec<String> = page
                .iter()
                .take_while(|kv| key_time(prefix, &kv.key).is_some_and(|t| t < cutoff))
                .map(|kv| kv.key.clone())
                .collect();
            let done = old.len() < page.len() || page.len() < PRUNE_PAGE;
            removed += self.delete(part, old).await?;
            if done {
                break;
            }
        }
        // Too many: the oldest beyond the bound.
        let known = self.count.lock().ok().and_then(|c| c[part]);
        let count = match known {
            Some(n) => n,
            None => {
                let n = self.store.range(prefix, 0, false).await?.len();
                if let Ok(mut c) = self.count.lock() {
                    c[part] = Some(n);
                }
                n
            }
        };
        let mut excess = count.saturating_sub(self.retention.max_entries);
        while excess > 0 {
            let page = self
                .store
                .range(prefix, excess.min(PRUNE_PAGE), false)
                .await?;
            if page.is_empty() {
                break;
            }
            let n = self
                .delete(part, page.into_iter().map(|kv| kv.key).collect())
                .await?;
            excess -= n.min(excess);
            removed += n;
        }
        Ok(removed)
    }

    async fn delete(&self, part: usize, keys: Vec<String>) -> Result<usize, StoreError> {
        let n = keys.len();
        if n > 0 {
            self.store
                .txn(Txn {
                    success: keys.into_iter().map(Op::Delete).collect(),
                    ..Txn::default()
                })
                .await?;
            self.adjust_count(part, |c| c.saturating_sub(n));
        }
        Ok(n)
    }
}

/// Prunes `log` every minute, forever.
pub async fn retention_loop(log: AuditLog) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        match log.prune().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "pruned the audit log to its retention bound"),
            Err(e) => tracing::warn!(error = %e, "cannot prune the audit log"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_kind_is_written_once_per_window() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        assert_eq!(s.admit("admin|unauthenticated", t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(
                s.admit("admin|unauthenticated", t0 + Duration::from_millis(i)),
                None
            );
        }
        // Another kind has its own window.
        assert_eq!(s.admit("certify|token", t0), Some(0));
        // The next window's first entry says how many were left out.
        assert_eq!(
            s.admit("admin|unauthenticated", t0 + SAMPLE_WINDOW),
            Some(1000)
        );
        assert_eq!(s.admit("admin|unauthenticated", t0 + SAMPLE_WINDOW), None);
    }

    #[test]
    fn a_flood_of_distinct_kinds_writes_a_bounded_number_per_window() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        // What an anonymous caller gets by naming a new identity in every Certify call.
        let written = |s: &mut Sampler, at: Instant, round: u32| {
            (0..10_000)
                .filter(|i| {
                    s.admit(
                        &format!("certify|token|spiffe://x/ns/a/sa/r{round}-{i}"),
                        at,
                    )
                    .is_some()
                })
                .count() as u64
        };
        assert_eq!(written(&mut s, t0, 0), MAX_WRITTEN_PER_WINDOW + 1);
        // A kind seen before keeps its own window; the next window has a fresh budget.
        assert_eq!(written(&mut s, t0 + Duration::from_secs(1), 1), 0);
        let next = written(&mut s, t0 + SAMPLE_WINDOW, 2);
        assert!(next <= MAX_WRITTEN_PER_WINDOW + 1, "{next}");
    }

    #[test]
    fn kinds_are_bounded() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        for i in 0..MAX_SAMPLED_KINDS + 100 {
            s.admit(&format!("k{i}"), t0);
        }
        assert!(s.windows.len() <= MAX_SAMPLED_KINDS + 1);
    }

    fn entry(action: &str, outcome: Outcome, actor: &str) -> AuditEntry {
        AuditEntry {
            time_unix_ms: 0,
            actor: actor.into(),
            action: action.into(),
            target: String::new(),
            outcome,
            detail: String::new(),
        }
    }

    #[test]
    fn filters() {
        let changes = Filter {
            changes_only: true,
            ..Filter::default()
        };
        assert!(changes.keeps(&entry("policy.apply", Outcome::Ok, "a")));
        assert!(!changes.keeps(&entry("policy.list", Outcome::Ok, "a")));
        assert!(!changes.keeps(&entry("ca.show", Outcome::Ok, "a")));
        assert!(changes.keeps(&entry("token.list", Outcome::Refused, "a")));
        let refused_by_b = Filter {
            outcome: Some(Outcome::Refused),
            actor: "b".into(),
            action_prefix: "cert.".into(),
            ..Filter::default()
        };
        assert!(refused_by_b.keeps(&entry("cert.issue", Outcome::Refused, "b")));
        assert!(!refused_by_b.keeps(&entry("cert.issue", Outcome::Ok, "b")));
        assert!(!refused_by_b.keeps(&entry("cert.issue", Outcome::Refused, "a")));
        assert!(!refused_by_b.keeps(&entry("token.create", Outcome::Refused, "b")));
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_within_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let log = AuditLog::new(
            store.clone(),
            Retention {
                max_entries: 5,
                max_age: Duration::from_secs(3600),
            },
        );
        // Two entries from long ago.
        for t in [1_000i64, 2_000] {
            store
                .put(
                    &format!("{PREFIX}{t:015}-00000000"),
                    serde_json::to_vec(&entry("old", Outcome::Ok, "a")).unwrap(),
                )
                .await
                .unwrap();
        }
        for i in 0..8 {
            log.record("a", &format!("n{i}"), "", Outcome::Ok, "")
                .await
                .unwrap();
        }
        assert_eq!(log.prune().await.unwrap(), 5);
        let left = log.newest(100, &Filter::default(), 0).await.unwrap();
        let actions: Vec<&str> = left.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["n3", "n4", "n5", "n6", "n7"]);
    }

    /// However many refusals anyone can provoke are written, they push out only older ones
    /// like them: the admins' actions stay, and readers see both in the order written.
    #[tokio::test]
    async fn sampled_refusals_never_push_out_actions() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let log = AuditLog::new(
            store,
            Retention {
                max_entries: 3,
                max_age: Duration::from_secs(3600),
            },
        );
        log.record("admin", "policy.apply", "", Outcome::Ok, "")
            .await
            .unwrap();
        // Each a new kind, so each is written; more than the bound.
        for i in 0..6 {
            log.record_sampled(&format!("k{i}"), "anonymous", &format!("r{i}"), "", "")
                .await
                .unwrap();
        }
        log.record("admin", "token.create", "", Outcome::Ok, "")
            .await
            .unwrap();
        assert_eq!(log.prune().await.unwrap(), 3, "the three oldest refusals");
        let left = log.newest(100, &Filter::default(), 0).await.unwrap();
        let actions: Vec<&str> = left.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["policy.apply", "r3", "r4", "r5", "token.create"]);
        let refused = Filter {
            outcome: Some(Outcome::Refused),
            ..Filter::default()
        };
        assert_eq!(log.newest(2, &refused, 100).await.unwrap().len(), 2);
    }
}
