//! The embedded backend: one redb file. redb commits are durable (fsync) before they return, and
//! a file left by a crash is recovered on open, so nothing acknowledged is lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use crate::model::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, StoreError, Txn, TxnResult, WatchStream,
};

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// Keys written under a lease, and the lease. Leases belong to the process that granted them,
/// so these keys are deleted when the store is opened again.
const LEASED: TableDefinition<'_, &str, i64> = TableDefinition::new("leased");
const REVISION: &str = "revision";
/// Value header: create revision and mod revision, big-endian u64 each.
const HEADER: usize = 16;

/// The default store: a single redb file, `moat.redb`, in the data directory.
///
/// Leases exist so that the control plane has one code path for both backends; only one process
/// uses this store, so they are kept in memory and expire lazily: a lease not renewed in time
/// is reported expired (and its keys deleted) when it is next renewed, and every leased key is
/// deleted when the store is opened again.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    leases: Arc<std::sync::Mutex<Leases>>,
}

#[derive(Debug, Default)]
struct Leases {
    next: LeaseId,
    /// Each live lease: its time to live and when it expires.
    live: std::collections::HashMap<LeaseId, (std::time::Duration, std::time::Instant)>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < HEADER {
        return Err(StoreError::Corrupt(format!(
            "value of {key:?} is truncated"
        )));
    }
    let (head, value) = raw.split_at(HEADER);
    let mut create = [0u8; 8];
    let mut modr = [0u8; 8];
    create.copy_from_slice(&head[..8]);
    modr.copy_from_slice(&head[8..]);
    Ok(KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision: u64::from_be_bytes(create),
        mod_revision: u64::from_be_bytes(modr),
    })
}

fn encode(create: u64, modr: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&create.to_be_bytes());
    out.extend_from_slice(&modr.to_be_bytes());
    out.extend_from_slice(value);
    out
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/moat.redb`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let path = dir.join("moat.redb");
        // The store holds sealed CA keys, token hashes and the audit log: owner-only, whether
        // it is new or was left readable by an older version.
        {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .and_then(|_| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        }
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Locked(path.display().to_string())
            }
            other => StoreError::Io(format!("{}: {other}", path.display())),
        })?;
        let w = db.begin_write().map_err(io)?;
        {
            let mut kv = w.open_table(KV).map_err(io)?;
            w.open_table(META).map_err(io)?;
            // The leases of the last process that had this store ended with it.
            let mut leased = w.open_table(LEASED).map_err(io)?;
            let keys: Vec<String> = leased
                .iter()
                .map_err(io)?
                .map(|item| item.map(|(k, _)| k.value().to_owned()).map_err(io))
                .collect::<Result<_, _>>()?;
            for key in keys {
                kv.remove(key.as_str()).map_err(io)?;
                leased.remove(key.as_str()).map_err(io)?;
            }
        }
        w.commit().map_err(io)?;
        let (events, _) = broadcast::channel(1024);
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
            events,
            leases: Default::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
    }
}

fn apply(db: &Database, txn: Txn) -> Result<(TxnResult, Vec<Event>), StoreError> {
    let w = db.begin_write().map_err(io)?;
    let mut events = Vec::new();
    let result = {
        let mut kv = w.open_table(KV).map_err(io)?;
        let mut meta = w.open_table(META).map_err(io)?;
        let mut leased = w.open_table(LEASED).map_err(io)?;
        let current = meta
            .get(REVISION)
            .map_err(io)?
            .map(|g| g.value())
            .unwrap_or(0);
        let mut succeeded = true;
        for c in &txn.compares {
            let Compare::ModRevision(key, want) = c;
            let have = match kv.get(key.as_str()).map_err(io)? {
                Some(g) => decode(key, g.value())?.mod_revision,
                None => 0,
            };
            if have != *want {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let writes = ops
            .iter()
            .any(|op| matches!(op, Op::Put(..) | Op::PutLeased(..) | Op::Delete(_)));
        let revision = if writes { current + 1 } else { current };
        for op in ops {
            match op {
                Op::Put(key, value) | Op::PutLeased(key, value, _) => {
                    match op {
                        Op::PutLeased(_, _, lease) => {
                            leased.insert(key.as_str(), *lease).map_err(io)?;
                        }
                        _ => {
                            leased.remove(key.as_str()).map_err(io)?;
                        }
                    }
                    let create = match kv.get(key.as_str()).map_err(io)? {
                        Some(g) => decode(key, g.value())?.create_revision,
                        None => revision,
                    };
                    kv.insert(key.as_str(), encode(create, revision, value).as_slice())
                        .map_err(io)?;
                    events.push(Event {
                        kind: EventKind::Put,
                        key: key.clone(),
                        value: value.clone(),
                        revision,
                    });
                }
                Op::Delete(key) => {
                    leased.remove(key.as_str()).map_err(io)?;
                    if kv.remove(key.as_str()).map_err(io)?.is_some() {
                        events.push(Event {
                            kind: EventKind::Delete,
                            key: key.clone(),
                            value: Vec::new(),
                            revision,
                        });
                    }
                }
            }
        }
        if writes {
            meta.insert(REVISION, revision).map_err(io)?;
        }
        TxnResult {
            succeeded,
            revision,
        }
    };
    w.commit().map_err(io)?;
    Ok((result, events))
}

#[async_trait::async_trait]
impl crate::Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let r = db.begin_read().map_err(io)?;
            let kv = r.open_table(KV).map_err(io)?;
            kv.get(key.as_str())
                .map_err(io)?
                .map(|g| decode(&key, g.value()))
                .transpose()
        })
        .await
    }

    async fn range(
        &self,
        prefix: &str,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let r = db.begin_read().map_err(io)?;
            let kv = r.open_table(KV).map_err(io)?;
            let iter = kv.range(prefix.as_str()..).map_err(io)?;
            let mut out = Vec::new();
            let matching = iter.map_while(|item| match item {
                Ok((k, v)) if k.value().starts_with(prefix.as_str()) => {
                    Some(decode(k.value(), v.value()))
                }
                Ok(_) => None,
                Err(e) => Some(Err(io(e))),
            });
            if reverse {
                let all = matching.collect::<Result<Vec<_>, _>>()?;
                let take = if limit == 0 {
                    all.len()
                } else {
                    limit.min(all.len())
                };
                out.extend(all.into_iter().rev().take(take));
            } else {
                for item in matching {
                    out.push(item?);
                    if limit != 0 && out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let (result, events) = self.blocking(move |db| apply(db, txn)).await?;
        if !events.is_empty() {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(Arc::new(events));
        }
        Ok(result)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        Ok(WatchStream::batches(prefix, self.events.subscribe()))
    }

    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError> {
        let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        l.next += 1;
        let id = l.next;
        l.live.insert(id, (ttl, std::time::Instant::now() + ttl));
        Ok(id)
    }

    async fn renew_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let expired = {
            let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            match l.live.get_mut(&lease) {
                Some((ttl, until)) if *until > now => {
                    *until = now + *ttl;
                    return Ok(true);
                }
                Some(_) => {
                    l.live.remove(&lease);
                    true
                }
                None => false,
            }
        };
        if expired {
            // Its keys go now.
            let keys = self
                .blocking(move |db| {
                    let r = db.begin_read().map_err(io)?;
                    let leased = r.open_table(LEASED).map_err(io)?;
                    let mut keys = Vec::new();
                    for item in leased.iter().map_err(io)? {
                        let (k, v) = item.map_err(io)?;
                        if v.value() == lease {
                            keys.push(k.value().to_owned());
                        }
                    }
                    Ok(keys)
                })
                .await?;
            if !keys.is_empty() {
                self.txn(Txn {
                    success: keys.into_iter().map(Op::Delete).collect(),
                    ..Txn::default()
                })
                .await?;
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[test]
    fn the_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat.redb");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn revisions_cas_range_and_watch() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let mut w = s.watch("tokens/").await.unwrap();
        assert_eq!(s.put("tokens/a", b"1".to_vec()).await.unwrap(), 1);
        assert_eq!(s.put("tokens/b", b"2".to_vec()).await.unwrap(), 2);
        s.put("other/x", b"3".to_vec()).await.unwrap();
        let a = s.get("tokens/a").await.unwrap().unwrap();
        assert_eq!((a.create_revision, a.mod_revision), (1, 1));

        // CAS against a stale revision fails and applies the failure branch (none here).
        let stale = Txn {
            compares: vec![Compare::ModRevision("tokens/a".into(), 7)],
            success: vec![Op::Put("tokens/a".into(), b"x".to_vec())],
            ..Txn::default()
        };
        assert!(!s.txn(stale).await.unwrap().succeeded);
        let fresh = Txn {
            compares: vec![Compare::ModRevision("tokens/a".into(), 1)],
            success: vec![Op::Put("tokens/a".into(), b"y".to_vec())],
            ..Txn::default()
        };
        let r = s.txn(fresh).await.unwrap();
        assert!(r.succeeded);
        let a = s.get("tokens/a").await.unwrap().unwrap();
        assert_eq!(
            (a.value.as_slice(), a.create_revision, a.mod_revision),
            (&b"y"[..], 1, r.revision)
        );

        let keys: Vec<_> = s
            .range("tokens/", 0, false)
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        assert_eq!(keys, ["tokens/a", "tokens/b"]);
        let last: Vec<_> = s
            .range("tokens/", 1, true)
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        assert_eq!(last, ["tokens/b"]);

        let seen: Vec<_> = [w.next().await, w.next().await, w.next().await]
            .into_iter()
            .map(|e| e.unwrap().unwrap().key)
            .collect();
        assert_eq!(seen, ["tokens/a", "tokens/b", "tokens/a"]);
    }

    #[tokio::test]
    async fn data_survives_reopen_and_second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.put("k", b"v".to_vec()).await.unwrap();
            let err = EmbeddedStore::open(dir.path()).unwrap_err();
            assert!(matches!(err, StoreError::Locked(_)), "{err}");
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v");
        assert_eq!(s.put("k2", vec![]).await.unwrap(), 2);
    }
}
