//! Requests in flight per caller identity, across every connection the caller has to this
//! sidecar's inbound. One identity (every replica of a service shares one) can hold at most
//! `limit` requests at the app at once however many connections it opens, so it cannot take the
//! app's whole capacity from the other callers; over the limit, a request is answered 429
//! `caller-busy` without reaching the app.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every caller with a request in flight, and how many.
#[derive(Debug)]
pub struct CallerRequests {
    limit: usize,
    counts: Mutex<HashMap<Arc<str>, usize>>,
}

/// One request's place in its caller's count, given back when dropped (when the response ends
/// or is reset).
#[derive(Debug)]
pub struct Slot {
    owner: Arc<CallerRequests>,
    caller: Arc<str>,
}

impl CallerRequests {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(CallerRequests {
            limit,
            counts: Mutex::default(),
        })
    }

    /// A place for one more request of `caller`, or `None` if it already has `limit` in flight.
    pub fn try_acquire(self: &Arc<Self>, caller: &Arc<str>) -> Option<Slot> {
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

impl Drop for Slot {
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
        let requests = CallerRequests::new(2);
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
