//! The types of the [`Store`](crate::Store) contract.

use tokio::sync::{broadcast, mpsc};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store at {0} is already open by another process: is another moat-control running on this data directory?"
    )]
    Locked(String),
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The store cannot be reached or has no quorum. The text says whether a write may have
    /// been applied regardless.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (since its last deletion).
    pub create_revision: u64,
    /// The revision that last wrote it.
    pub mod_revision: u64,
}

/// A condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's mod revision equals this (0 = the key is absent).
    ModRevision(String, u64),
}

/// A lease: keys written under it are deleted when it expires, i.e. when its holder stopped
/// renewing it (a control-plane replica that died). 0 is no lease.
pub type LeaseId = i64;

/// A write of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put(String, Vec<u8>),
    /// A put whose key lives only as long as the lease.
    PutLeased(String, Vec<u8>, LeaseId),
    Delete(String),
}

/// A compare-and-swap transaction.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (and so `success` was applied).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: u64,
}

/// The kind of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub key: String,
    /// The new value (empty for a delete).
    pub value: Vec<u8>,
    pub revision: u64,
}

/// Changes under one prefix. A watcher that falls too far behind gets [`WatchStream::next`]
/// = `Err(lagged)` and must re-read with `range`.
#[derive(Debug)]
pub struct WatchStream {
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// The embedded store's in-process broadcast of committed batches, filtered here.
    Batches {
        prefix: String,
        rx: broadcast::Receiver<std::sync::Arc<Vec<Event>>>,
        pending: std::collections::VecDeque<Event>,
    },
    /// A backend task that already filters (etcd's server-side prefix watch).
    Events(mpsc::Receiver<Result<Event, Lagged>>),
}

/// The watcher missed events and must resynchronise from a `range` read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("watch fell behind by {0} transactions; re-read the range")]
pub struct Lagged(pub u64);

impl WatchStream {
    pub(crate) fn batches(
        prefix: &str,
        rx: broadcast::Receiver<std::sync::Arc<Vec<Event>>>,
    ) -> Self {
        WatchStream {
            source: Source::Batches {
                prefix: prefix.to_owned(),
                rx,
                pending: Default::default(),
            },
        }
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn events(rx: mpsc::Receiver<Result<Event, Lagged>>) -> Self {
        WatchStream {
            source: Source::Events(rx),
        }
    }

    /// The next matching event; `Ok(None)` once the store is gone.
    pub async fn next(&mut self) -> Result<Option<Event>, Lagged> {
        match &mut self.source {
            Source::Batches {
                prefix,
                rx,
                pending,
            } => loop {
                if let Some(e) = pending.pop_front() {
                    return Ok(Some(e));
                }
                match rx.recv().await {
                    Ok(batch) => pending.extend(
                        batch
                            .iter()
                            .filter(|e| e.key.starts_with(prefix.as_str()))
                            .cloned(),
                    ),
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                    Err(broadcast::error::RecvError::Lagged(n)) => return Err(Lagged(n)),
                }
            },
            Source::Events(rx) => rx.recv().await.transpose(),
        }
    }
}
