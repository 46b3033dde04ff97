//! What callers do while this sidecar's allow-list only watches: its policy is in audit mode, or
//! there is none and the mesh allows any authenticated caller. Each admitted call is counted by
//! (caller identity, app port, method, canonical path), or (caller, port) for opaque TCP, and
//! reported to the control plane with the rule counters, for `moat policy suggest`. Nothing is
//! recorded under an enforcing policy, so the enforcing path pays only the check. The table is
//! bounded: past [`MAX_OBSERVED`] kinds of call, new kinds are counted as dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use moat_policy::suggest::Watching;

use crate::snapshot::Snapshot;

/// The most kinds of call one sidecar keeps (a path is part of the kind, so a caller walking
/// unbounded paths cannot grow the table past this).
pub const MAX_OBSERVED: usize = 4096;

/// One kind of call.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Call {
    pub peer: String,
    pub port: u16,
    /// Empty for opaque TCP.
    pub method: String,
    /// Canonical; empty for opaque TCP.
    pub path: String,
}

/// The calls seen while watching, with counts.
#[derive(Debug, Default)]
pub struct Observed {
    calls: Mutex<HashMap<Call, u64>>,
    dropped: AtomicU64,
}

/// Whether the allow-list in `snap` only watches: its policy is in audit mode, or no policy
/// targets this sidecar and the posture admits any authenticated caller.
pub fn watching(snap: &Snapshot) -> bool {
    Watching::of(&snap.policies, snap.mesh.default_posture).records()
}

impl Observed {
    /// Counts one admitted call.
    pub fn record(&self, peer: &str, port: u16, method: &str, path: &str) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let key = Call {
            peer: peer.to_owned(),
            port,
            method: method.to_owned(),
            path: path.to_owned(),
        };
        if let Some(n) = calls.get_mut(&key) {
            *n += 1;
        } else if calls.len() < MAX_OBSERVED {
            calls.insert(key, 1);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every kind of call seen so far, with its count.
    pub fn calls(&self) -> Vec<(Call, u64)> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Calls not kept because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn calls_are_counted_by_kind_and_the_table_is_bounded() {
        let o = Observed::default();
        o.record("a", 80, "GET", "/x");
        o.record("a", 80, "GET", "/x");
        o.record("a", 80, "", "");
        for i in 0..MAX_OBSERVED + 10 {
            o.record("b", 80, "GET", &format!("/{i}"));
        }
        let calls = o.calls();
        assert_eq!(calls.len(), MAX_OBSERVED);
        let x = calls
            .iter()
            .find(|(c, _)| c.peer == "a" && c.path == "/x")
            .unwrap();
        assert_eq!(x.1, 2);
        assert_eq!(o.dropped(), 12);
    }
}
