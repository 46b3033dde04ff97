//! Counts of what each caller holds — an open connection, a request in flight — with a limit
//! per caller: a caller is an identity, a source address, or `()` for a bound over everyone.
//! A place is taken with [`PerCaller::try_acquire`] and given back when its [`Slot`] is dropped,
//! however the work ends; a caller that holds nothing keeps no entry. The sidecar bounds its
//! inbound (per caller identity) and admin port (per source address) with it, the control plane
//! a certificate holder's connections (per identity and source address).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Every caller that holds something (a request in flight, an open connection), and how many.
/// A caller is an identity unless said otherwise (`K`).
#[derive(Debug)]
pub struct PerCaller<K: Hash + Eq + Clone = Arc<str>> {
    limit: usize,
    counts: Mutex<HashMap<K, usize>>,
}

/// One place in its caller's count, given back when dropped (when the response ends or is
/// reset, when the connection closes).
#[derive(Debug)]
pub struct Slot<K: Hash + Eq + Clone = Arc<str>> {
    owner: Arc<PerCaller<K>>,
    caller: K,
}

impl<K: Hash + Eq + Clone> PerCaller<K> {
    /// Counts in which each caller may hold at most `limit`.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerCaller {
            limit,
            counts: Mutex::default(),
        })
    }

    /// A place for one more of `caller`'s, or `None` if it already holds `limit`.
    pub fn try_acquire(self: &Arc<Self>, caller: &K) -> Option<Slot<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(caller.clone()).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            caller: caller.clone(),
        })
    }
}

impl<K: Hash + Eq + Clone> PerCaller<K> {
    /// How many callers hold a place now.
    pub fn holders(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_at_most_its_limit_and_others_are_not_counted_against_it() {
        let requests = PerCaller::new(2);
        let (a, b): (Arc<str>, Arc<str>) =
            ("spiffe://t/ns/x/sa/a".into(), "spiffe://t/ns/x/sa/b".into());
        let first = requests.try_acquire(&a).expect("first");
        let second = requests.try_acquire(&a).expect("second");
        assert!(
            requests.try_acquire(&a).is_none(),
            "a third is over the limit"
        );
        assert!(
            requests.try_acquire(&b).is_some(),
            "another caller has its own count"
        );
        drop(first);
        let third = requests.try_acquire(&a).expect("a place came back");
        drop((second, third));
        assert!(
            requests.counts.lock().unwrap().is_empty(),
            "no entry is kept for idle callers"
        );
    }
}
