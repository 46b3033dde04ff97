//! Revocations: identities (until lifted) and single certificates (until they would have
//! expired anyway), stored under `revocations/<kind>/<value>` and pushed to every proxy. A
//! certificate's revocation reaches the certificates renewed from it, and from those in turn:
//! each renewal over mTLS is recorded under `lineage/<parent serial>/<child serial>` until the
//! child expires.

use std::sync::Arc;

use moat_store::{Compare, Op, Store, StoreError, Txn};
use serde::{Deserialize, Serialize};

/// Store prefix of revocations.
pub const PREFIX: &str = "revocations/";
/// Store prefix of renewals: `lineage/<parent serial>/<child serial>` = the child's NotAfter
/// (Unix seconds, decimal).
const LINEAGE: &str = "lineage/";
/// How often the leader drops renewals whose certificate has expired.
pub const LINEAGE_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// Who revokes the certificates renewed from a revoked one, in the list.
const LINEAGE_ACTOR: &str = "moat-control";

/// What a revocation names: every certificate of an identity, or one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevocationKind {
    Identity,
    Serial,
}

impl RevocationKind {
    /// Its word in the store's keys and on the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Identity => "identity",
            RevocationKind::Serial => "serial",
        }
    }
}

impl std::fmt::Display for RevocationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub kind: RevocationKind,
    /// A full SPIFFE ID, or a serial in lowercase hex.
    pub value: String,
    pub reason: String,
    pub actor: String,
    pub time_unix_ms: i64,
    /// When it drops off the list; 0 keeps it until undone.
    pub expires_unix: i64,
    /// For a certificate revoked because it was renewed from a revoked one: the serial whose
    /// revocation reached it. Lifting that revocation lifts this one too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached_from: Option<String>,
}

/// Hex digits in a serial of a certificate moat issues (16 bytes).
pub const SERIAL_HEX_DIGITS: usize = 32;

/// Why a serial an operator typed names no one certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    #[error("{0:?} is not a certificate serial: give hex digits, as `moat status` shows them")]
    NotHex(String),
    #[error(
        "no known certificate has a serial starting with {0}: give the full {SERIAL_HEX_DIGITS}-digit serial (`moat status -o json` shows it)"
    )]
    Unknown(String),
    #[error("{given} matches several certificates; give more digits: {}", .candidates.join(", "))]
    Ambiguous {
        given: String,
        candidates: Vec<String>,
    },
}

/// The full serial `given` names: itself when it has all the digits of a moat serial, else the
/// one serial among `known` it is a prefix of. A short prefix never stands for itself: that
/// would revoke nothing while the operator believes a certificate is cut off.
pub fn resolve_serial<'a>(
    given: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Result<String, SerialError> {
    let serial = given
        .trim()
        .parse::<moat_identity::Serial>()
        .map_err(|_| SerialError::NotHex(given.to_owned()))?
        .into_string();
    if serial.len() >= SERIAL_HEX_DIGITS {
        return Ok(serial);
    }
    let mut candidates: Vec<String> = known
        .into_iter()
        .filter(|k| k.starts_with(&serial))
        .map(str::to_owned)
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    match candidates.len() {
        0 => Err(SerialError::Unknown(serial)),
        1 => Ok(candidates.remove(0)),
        _ => Err(SerialError::Ambiguous {
            given: serial,
            candidates,
        }),
    }
}

/// The most identity revocations in force at once: identities are few, and a list this long
/// means something else is wrong (revoke the namespace's policy instead).
pub const MAX_IDENTITY_REVOCATIONS: usize = 10_000;
/// The most serial revocations in force at once. Each ends with its certificate (at most 24 h
/// plus a margin), so only a burst of revocations within a day can reach this.
pub const MAX_SERIAL_REVOCATIONS: usize = 100_000;

/// Why a revocation was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{max} {kind} revocations are already in force, the most the control plane keeps: lift ones no longer needed (`moat revoke --list`, `moat revoke --undo`); serial revocations also lapse when their certificate expires"
    )]
    Full { kind: RevocationKind, max: usize },
}

/// Kept past the longest certificate lifetime, for clock skew between hosts.
const SERIAL_REVOCATION_MARGIN_SECS: i64 = 300;

/// The revocation of `child`, renewed from `parent`, for the revocation of `root`.
fn renewed_from(root: &str, parent: &str, child: &str, not_after: i64) -> Revocation {
    Revocation {
        kind: RevocationKind::Serial,
        value: child.to_owned(),
        reason: format!("renewed from {parent}, which the revocation of {root} reaches"),
        actor: LINEAGE_ACTOR.to_owned(),
        time_unix_ms: moat_identity::clock::unix_now_ms(),
        expires_unix: not_after + SERIAL_REVOCATION_MARGIN_SECS,
        reached_from: Some(root.to_owned()),
    }
}

/// What an operator asks to revoke, or to lift.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every certificate of an identity, until lifted.
    Identity(moat_identity::SpiffeId),
    /// One certificate, by its serial or a prefix of it (as `moat status` shows it).
    Serial(String),
}

/// Why an operator's revocation request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("{0} {1} is not revoked")]
    NotRevoked(RevocationKind, String),
    #[error(
        "serial {0} is revoked because the revocation of serial {1} reaches it (it was renewed from that certificate or its renewals): lift {1} instead"
    )]
    Reached(String, String),
    #[error(transparent)]
    Revoke(#[from] RevokeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Revocation operations over the store.
#[derive(Clone, Debug)]
pub struct Revocations {
    store: Arc<dyn Store>,
    /// The most identity and serial revocations in force at once.
    limits: (usize, usize),
}

fn key(kind: RevocationKind, value: &str) -> String {
    format!("{PREFIX}{kind}/{value}")
}

impl Revocations {
    /// Revocations in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Revocations {
            store,
            limits: (MAX_IDENTITY_REVOCATIONS, MAX_SERIAL_REVOCATIONS),
        }
    }

    /// Stores a revocation; acknowledged once durable. A new one beyond the bound for its kind
    /// is refused; renewing one already in force is not.
    pub async fn revoke(&self, r: Revocation) -> Result<Revocation, RevokeError> {
        if self.store.get(&key(r.kind, &r.value)).await?.is_none() {
            let max = match r.kind {
                RevocationKind::Identity => self.limits.0,
                RevocationKind::Serial => self.limits.1,
            };
            let in_force = self
                .list()
                .await?
                .iter()
                .filter(|x| x.kind == r.kind)
                .count();
            if in_force >= max {
                return Err(RevokeError::Full { kind: r.kind, max });
            }
        }
        // Serialising plain strings and integers cannot fail.
        self.store
            .put(
                &key(r.kind, &r.value),
                serde_json::to_vec(&r).unwrap_or_default(),
            )
            .await?;
        Ok(r)
    }

    /// Carries out an operator's request: revokes `target` (by `actor`, for `reason`), or lifts
    /// its revocation with `undo`. A serial prefix names the one certificate it starts among
    /// `connected` (the fleet's current serials), or, when lifting, among the revoked serials.
    /// A serial revocation lasts until every certificate the CA issued until now has expired
    /// anyway; what any proxy reports never shortens it. Returns what was stored or lifted.
    pub async fn request(
        &self,
        target: Target,
        undo: bool,
        connected: &[String],
        reason: &str,
        actor: &str,
    ) -> Result<Revocation, RequestError> {
        let (kind, value, expires_unix) = match target {
            Target::Identity(id) => (RevocationKind::Identity, id.to_string(), 0),
            Target::Serial(prefix) => {
                let revoked: Vec<String> = if undo {
                    self.list()
                        .await?
                        .into_iter()
                        .filter(|v| v.kind == RevocationKind::Serial)
                        .map(|v| v.value)
                        .collect()
                } else {
                    Vec::new()
                };
                let known = connected.iter().chain(&revoked).map(String::as_str);
                let serial = resolve_serial(&prefix, known)?;
                let now = moat_identity::clock::unix_now();
                let longest = moat_ca::CertTtl::MAX.as_secs() as i64;
                (
                    RevocationKind::Serial,
                    serial,
                    now + longest + SERIAL_REVOCATION_MARGIN_SECS,
                )
            }
        };
        if undo {
            if kind == RevocationKind::Serial {
                let lifted = self.lift_serial(&value).await?;
                if !lifted.is_empty() {
                    tracing::info!(serial = %value, renewed = ?lifted, "lifted the revocations of the certificates renewed from it");
                }
            } else if !self.undo(kind, &value).await? {
                return Err(RequestError::NotRevoked(kind, value));
            }
            return Ok(Revocation {
                kind,
                value,
                reason: String::new(),
                actor: actor.to_owned(),
                time_unix_ms: moat_identity::clock::unix_now_ms(),
                expires_unix: 0,
                reached_from: None,
            });
        }
        let done = self
            .revoke(Revocation {
                kind,
                value,
                reason: reason.to_owned(),
                actor: actor.to_owned(),
                time_unix_ms: moat_identity::clock::unix_now_ms(),
                expires_unix,
                reached_from: None,
            })
            .await?;
        if kind == RevocationKind::Serial {
            let renewed = self.revoke_renewals(&done.value).await?;
            if !renewed.is_empty() {
                tracing::info!(serial = %done.value, renewed = ?renewed, "revoked the certificates renewed from a revoked one");
            }
        }
        Ok(done)
    }

    /// Records that `child` (expiring at `child_not_after`) was renewed over mTLS by the holder
    /// of `parent`, so that revoking `parent` reaches it. Returns `Ok(false)`, having revoked
    /// `child` too, when `parent` is revoked by now: a revocation made on another replica, or
    /// while this renewal ran, looked for the renewals it had to revoke before this one was
    /// recorded, and the certificate must not be handed out.
    pub async fn record_renewal(
        &self,
        parent: &str,
        child: &str,
        child_not_after: i64,
    ) -> Result<bool, RevokeError> {
        self.store
            .put(
                &format!("{LINEAGE}{parent}/{child}"),
                child_not_after.to_string().into_bytes(),
            )
            .await?;
        let Some(revoked) = self.store.get(&key(RevocationKind::Serial, parent)).await? else {
            return Ok(true);
        };
        // The revocation that reaches `parent` reaches `child` too, and lifting it lifts both.
        let root = serde_json::from_slice::<Revocation>(&revoked.value)
            .ok()
            .and_then(|r| r.reached_from)
            .unwrap_or_else(|| parent.to_owned());
        self.revoke(renewed_from(&root, parent, child, child_not_after))
            .await?;
        Ok(false)
    }

    /// Every unexpired certificate renewed from `serial`, and from those in turn, as (child,
    /// parent, the child's NotAfter), parents before their children.
    async fn reach(&self, serial: &str) -> Result<Vec<(String, String, i64)>, StoreError> {
        let now = moat_identity::clock::unix_now();
        let (mut queue, mut found) = (vec![serial.to_owned()], Vec::<(String, String, i64)>::new());
        while let Some(parent) = queue.pop() {
            let prefix = format!("{LINEAGE}{parent}/");
            for kv in self.store.range(&prefix, 0, false).await? {
                let child = kv.key.strip_prefix(&prefix).unwrap_or_default().to_owned();
                let not_after = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(i64::MAX);
                if child.is_empty()
                    || child == serial
                    || not_after <= now
                    || found.iter().any(|(c, _, _)| *c == child)
                {
                    continue;
                }
                found.push((child.clone(), parent.clone(), not_after));
                queue.push(child);
            }
        }
        Ok(found)
    }

    /// Revokes every unexpired certificate renewed from `serial`, and from those in turn;
    /// returns the serials it revoked. Each is a serial revocation of its own (`moat revoke
    /// --list` names the one it came from), lasting until the certificate would have expired.
    /// One already revoked keeps its own revocation (an operator's stays an operator's).
    async fn revoke_renewals(&self, serial: &str) -> Result<Vec<String>, RevokeError> {
        let mut revoked = Vec::new();
        for (child, parent, not_after) in self.reach(serial).await? {
            if self
                .store
                .get(&key(RevocationKind::Serial, &child))
                .await?
                .is_none()
            {
                self.revoke(renewed_from(serial, &parent, &child, not_after))
                    .await?;
                revoked.push(child);
            }
        }
        Ok(revoked)
    }

    /// Drops the renewals whose certificate has expired (nothing is left to revoke); returns
    /// how many.
    pub async fn prune_lineage(&self) -> Result<usize, StoreError> {
        let now = moat_identity::clock::unix_now();
        let expired: Vec<Op> = self
            .store
            .range(LINEAGE, 0, false)
            .await?
            .into_iter()
            .filter(|kv| {
                std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_none_or(|not_after| not_after <= now)
            })
            .map(|kv| Op::Delete(kv.key))
            .collect();
        let n = expired.len();
        for batch in expired.chunks(100) {
            self.store
                .txn(Txn {
                    success: batch.to_vec(),
                    ..Txn::default()
                })
                .await?;
        }
        Ok(n)
    }

    /// Lifts a revocation; `Ok(false)` when there was none.
    pub async fn undo(&self, kind: RevocationKind, value: &str) -> Result<bool, StoreError> {
        let k = key(kind, value);
        if self.store.get(&k).await?.is_none() {
            return Ok(false);
        }
        self.store
            .txn(Txn {
                success: vec![Op::Delete(k)],
                ..Txn::default()
            })
            .await?;
        Ok(true)
    }

    /// Lifts the revocation of `serial` and those it reached (recorded with
    /// [`Revocation::reached_from`]); returns the serials of those. Refused when another
    /// revocation in force reaches `serial` itself. What another revocation still reaches stays
    /// revoked, rewritten in place as reached from that one (never absent meanwhile), and an
    /// operator's own revocation of a renewal stays. Every write is conditional on what was
    /// read, so a revocation made meanwhile on another replica is never removed; `serial`'s own
    /// goes last, so a lift cut short can be asked again.
    async fn lift_serial(&self, serial: &str) -> Result<Vec<String>, RequestError> {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let stored: Vec<(String, u64, Revocation)> = self
                .store
                .range(&key(RevocationKind::Serial, ""), 0, false)
                .await?
                .into_iter()
                .filter_map(|kv| {
                    let r = serde_json::from_slice::<Revocation>(&kv.value).ok()?;
                    Some((kv.key, kv.mod_revision, r))
                })
                .collect();
            let Some((own_key, own_revision, _)) =
                stored.iter().find(|(_, _, r)| r.value == serial)
            else {
                return Err(RequestError::NotRevoked(
                    RevocationKind::Serial,
                    serial.to_owned(),
                ));
            };
            // What the other revocations that no renewal put there still reach.
            let mut still: Vec<(String, String, String, i64)> = Vec::new();
            for (_, _, root) in stored
                .iter()
                .filter(|(_, _, r)| r.reached_from.is_none() && r.value != serial)
            {
                for (child, parent, not_after) in self.reach(&root.value).await? {
                    if !still.iter().any(|(c, ..)| *c == child) {
                        still.push((child, root.value.clone(), parent, not_after));
                    }
                }
            }
            if let Some((_, root, ..)) = still.iter().find(|(c, ..)| c == serial) {
                return Err(RequestError::Reached(serial.to_owned(), root.clone()));
            }
            let mut ops: Vec<(Compare, Op)> = Vec::new();
            let mut lifted = Vec::new();
            for (k, revision, r) in &stored {
                if r.reached_from.as_deref() != Some(serial) {
                    continue;
                }
                let compare = Compare::ModRevision(k.clone(), *revision);
                match still.iter().find(|(c, ..)| *c == r.value) {
                    Some((child, root, parent, not_after)) => {
                        let again = renewed_from(root, parent, child, *not_after);
                        // Serialising plain strings and integers cannot fail.
                        let value = serde_json::to_vec(&again).unwrap_or_default();
                        ops.push((compare, Op::Put(k.clone(), value)));
                    }
                    None => {
                        ops.push((compare, Op::Delete(k.clone())));
                        lifted.push(r.value.clone());
                    }
                }
            }
            ops.push((
                Compare::ModRevision(own_key.clone(), *own_revision),
                Op::Delete(own_key.clone()),
            ));
            let mut conflict = false;
            for batch in ops.chunks(64) {
                let done = self
                    .store
                    .txn(Txn {
                        compares: batch.iter().map(|(c, _)| c.clone()).collect(),
                        success: batch.iter().map(|(_, o)| o.clone()).collect(),
                        failure: Vec::new(),
                    })
                    .await?;
                if !done.succeeded {
                    conflict = true;
                    break;
                }
            }
            if !conflict {
                return Ok(lifted);
            }
        }
        Err(RequestError::Store(StoreError::Unavailable(format!(
            "the revocations kept changing while the lift of {serial} was worked out ({ATTEMPTS} tries); ask again"
        ))))
    }

    /// Every revocation still in force (expired ones are dropped from the store).
    pub async fn list(&self) -> Result<Vec<Revocation>, StoreError> {
        let now = moat_identity::clock::unix_now();
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for kv in self.store.range(PREFIX, 0, false).await? {
            match serde_json::from_slice::<Revocation>(&kv.value) {
                Ok(r) if r.expires_unix != 0 && r.expires_unix <= now => {
                    expired.push(Op::Delete(kv.key))
                }
                Ok(r) => live.push(r),
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "unreadable revocation; ignored")
                }
            }
        }
        if !expired.is_empty() {
            self.store
                .txn(Txn {
                    success: expired,
                    ..Txn::default()
                })
                .await?;
        }
        Ok(live)
    }

    /// Changes under `revocations/`.
    pub async fn changes(&self) -> moat_store::WatchStream {
        self.store.watch_retrying(PREFIX).await
    }
}

#[cfg(test)]
mod serial_tests {
    use super::*;

    const A: &str = "44e01c1d00000000000000000000000a";
    const B: &str = "44e01c1d00000000000000000000000b";
    const C: &str = "51aa000000000000000000000000000c";

    #[test]
    fn a_serial_is_full_or_a_unique_prefix() {
        assert_eq!(resolve_serial(A, []).unwrap(), A);
        assert_eq!(resolve_serial(&A.to_uppercase(), []).unwrap(), A);
        assert_eq!(resolve_serial("51aa", [A, B, C]).unwrap(), C);
        assert_eq!(resolve_serial("51AA", [A, C, C]).unwrap(), C);
        let e = resolve_serial("44e01c1d", [A, B, C]).unwrap_err();
        assert!(matches!(&e, SerialError::Ambiguous { candidates, .. } if candidates == &[A, B]));
        assert!(e.to_string().contains(A), "{e}");
        assert_eq!(
            resolve_serial("44e01c1d", [C]).unwrap_err(),
            SerialError::Unknown("44e01c1d".into())
        );
        assert!(matches!(
            resolve_serial("xyz", [A]),
            Err(SerialError::NotHex(_))
        ));
        assert!(matches!(
            resolve_serial("", [A]),
            Err(SerialError::NotHex(_))
        ));
    }
}

#[cfg(test)]
mod bound_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn serial(value: &str, expires_unix: i64) -> Revocation {
        Revocation {
            reached_from: None,
            kind: RevocationKind::Serial,
            value: value.into(),
            reason: String::new(),
            actor: "test".into(),
            time_unix_ms: 0,
            expires_unix,
        }
    }

    #[tokio::test]
    async fn the_list_is_bounded_and_expired_entries_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let r = Revocations {
            limits: (1, 2),
            ..Revocations::new(store)
        };
        let later = moat_identity::clock::unix_now() + 3600;
        r.revoke(serial("aa", later)).await.unwrap();
        r.revoke(serial("bb", moat_identity::clock::unix_now() + 1))
            .await
            .unwrap();
        let e = r.revoke(serial("cc", later)).await.unwrap_err();
        assert!(matches!(e, RevokeError::Full { max: 2, .. }), "{e}");
        assert!(e.to_string().contains("moat revoke --undo"), "{e}");
        // Revoking one already in force again is not a new entry.
        r.revoke(serial("aa", later)).await.unwrap();
        // Once one lapses with its certificate, there is room again.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        r.revoke(serial("cc", later)).await.unwrap();
        assert_eq!(r.list().await.unwrap().len(), 2);
    }

    /// Revoking a serial reaches what was renewed from it, and from that in turn, while it
    /// lives: not the certificate it was renewed from, nor one already expired. A renewal
    /// recorded after its parent's revocation is revoked too, and refused. Expired renewals are
    /// pruned.
    #[tokio::test]
    async fn a_serial_revocation_reaches_its_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let r = Revocations::new(store);
        let later = moat_identity::clock::unix_now() + 3600;
        let serials = |n: usize| format!("{n:032x}");
        // 1 → 2 → 3 → 4, 2 → 5 (expired), and 0 → 1.
        for (parent, child, not_after) in [
            (0, 1, later),
            (1, 2, later),
            (2, 3, later),
            (3, 4, later),
            (2, 5, 1),
        ] {
            assert!(
                r.record_renewal(&serials(parent), &serials(child), not_after)
                    .await
                    .unwrap()
            );
        }
        r.request(Target::Serial(serials(2)), false, &[], "leaked", "admin")
            .await
            .unwrap();
        let list = r.list().await.unwrap();
        let revoked: Vec<&str> = list.iter().map(|x| x.value.as_str()).collect();
        assert_eq!(revoked.len(), 3, "{list:?}");
        for n in [2, 3, 4] {
            assert!(revoked.contains(&serials(n).as_str()), "{n}: {list:?}");
        }
        let four = list.iter().find(|x| x.value == serials(4)).unwrap();
        assert_eq!(four.actor, "moat-control");
        assert!(
            four.reason
                .contains(&format!("renewed from {}", serials(3))),
            "{four:?}"
        );
        assert_eq!(four.expires_unix, later + SERIAL_REVOCATION_MARGIN_SECS);
        // A renewal that ran across the revocation is recorded, revoked and refused.
        assert!(
            !r.record_renewal(&serials(4), &serials(6), later)
                .await
                .unwrap()
        );
        assert!(
            r.list()
                .await
                .unwrap()
                .iter()
                .any(|x| x.value == serials(6))
        );
        assert_eq!(r.prune_lineage().await.unwrap(), 1);
        assert_eq!(r.prune_lineage().await.unwrap(), 0);
        // Lifting the revocation of 2 lifts what it reached: 3, 4 and 6 (recorded after it).
        let left = |r: Revocations| async move {
            let mut v: Vec<(String, Option<String>)> = r
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|x| (x.value, x.reached_from))
                .collect();
            v.sort();
            v
        };
        let op = |n: usize, undo: bool| {
            let r = r.clone();
            async move {
                r.request(Target::Serial(serials(n)), undo, &[], "leaked", "admin")
                    .await
                    .unwrap();
            }
        };
        op(2, true).await;
        assert_eq!(left(r.clone()).await, vec![]);
        // 3 cannot be lifted while 2 reaches it; lifting 2 leaves 3 and what 3 reaches.
        op(3, false).await;
        op(2, false).await;
        let refused = |n: usize, root: usize| {
            let r = r.clone();
            async move {
                let e = r
                    .request(Target::Serial(serials(n)), true, &[], "", "admin")
                    .await
                    .unwrap_err();
                assert!(
                    matches!(&e, RequestError::Reached(s, by) if *s == serials(n) && *by == serials(root)),
                    "{e}"
                );
            }
        };
        refused(3, 2).await;
        op(2, true).await;
        let from_3 = Some(serials(3));
        assert_eq!(
            left(r.clone()).await,
            vec![
                (serials(3), None),
                (serials(4), from_3.clone()),
                (serials(6), from_3.clone()),
            ]
        );
        refused(6, 3).await;
        op(3, true).await;
        assert_eq!(left(r.clone()).await, vec![]);
        // An operator's own revocation of a renewal stays when 2 is lifted, and so does what it
        // reaches.
        op(2, false).await;
        op(4, false).await;
        op(2, true).await;
        assert_eq!(
            left(r.clone()).await,
            vec![(serials(4), None), (serials(6), Some(serials(4)))]
        );
    }

    /// An operator's request: a serial prefix resolves among the fleet's serials (and, to lift
    /// one, the revoked ones), a serial revocation outlives every certificate issued so far, and
    /// lifting what is not revoked says so.
    #[tokio::test]
    async fn requests_resolve_prefixes_and_bound_serial_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let r = Revocations::new(store);
        let a = format!("ab{}", "0".repeat(SERIAL_HEX_DIGITS - 2));
        let b = format!("cd{}", "1".repeat(SERIAL_HEX_DIGITS - 2));
        let connected = vec![a.clone(), b.clone()];
        let before = moat_identity::clock::unix_now();
        let stored = r
            .request(
                Target::Serial("ab".into()),
                false,
                &connected,
                "lost",
                "admin",
            )
            .await
            .unwrap();
        assert_eq!(
            (stored.kind, stored.value.as_str()),
            (RevocationKind::Serial, a.as_str())
        );
        assert_eq!(
            (stored.reason.as_str(), stored.actor.as_str()),
            ("lost", "admin")
        );
        let longest = moat_ca::CertTtl::MAX.as_secs() as i64;
        assert!(stored.expires_unix >= before + longest + SERIAL_REVOCATION_MARGIN_SECS);

        // Unknown and ambiguous prefixes are refused, nothing stored.
        let e = r
            .request(Target::Serial("ee".into()), false, &connected, "", "admin")
            .await
            .unwrap_err();
        assert!(
            matches!(e, RequestError::Serial(SerialError::Unknown(_))),
            "{e}"
        );
        assert_eq!(r.list().await.unwrap().len(), 1);

        // Lifting by prefix finds the revoked serial even when no proxy holds it any more.
        let lifted = r
            .request(Target::Serial("ab".into()), true, &[], "", "admin")
            .await
            .unwrap();
        assert_eq!(lifted.value, a);
        assert!(r.list().await.unwrap().is_empty());

        let id: moat_identity::SpiffeId =
            "spiffe://moat.local/ns/default/sa/orders".parse().unwrap();
        let e = r
            .request(Target::Identity(id.clone()), true, &[], "", "admin")
            .await
            .unwrap_err();
        assert!(matches!(e, RequestError::NotRevoked(..)), "{e}");
        assert_eq!(e.to_string(), format!("identity {id} is not revoked"));
        let stored = r
            .request(
                Target::Identity(id.clone()),
                false,
                &[],
                "compromised",
                "admin",
            )
            .await
            .unwrap();
        assert_eq!((stored.value, stored.expires_unix), (id.to_string(), 0));
    }
}
