//! `moat tap` at the control plane: the open taps, and the routing of the events the sidecars
//! send for them. A tap is opened by an Admin `Tap` call and lives as long as that call's
//! response stream; while it is open, every snapshot to the proxies of its service lists it
//! (see `next_snapshot`), so replicas that connect later are tapped too. A proxy's events reach
//! only taps on the proxy's own service, and a client that reads slowly loses events (counted)
//! instead of holding up the mesh stream.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use moat_api::v1::{TapEvent, TapEvents, TapFilter, TapRequest, TapResponse};
use moat_identity::SpiffeId;
use tokio::sync::mpsc;

/// The most events one proxy message may carry (a proxy sends at most 256).
const MAX_EVENTS: usize = 1024;

/// One open tap.
#[derive(Debug)]
struct Open {
    target: SpiffeId,
    filter: TapFilter,
    tx: mpsc::Sender<TapResponse>,
    /// 0: no limit.
    limit: u64,
    delivered: u64,
    /// Events lost since the client last got a message.
    dropped: u64,
}

/// Every open tap.
#[derive(Debug, Default)]
pub struct Taps {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Open>>,
}

impl Taps {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a tap on `target`'s proxies; its events go to `tx`. Returns its id. The caller
    /// bumps the mesh generation so the proxies learn of it.
    pub fn open(
        &self,
        target: SpiffeId,
        mut filter: TapFilter,
        limit: u64,
        tx: mpsc::Sender<TapResponse>,
    ) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        filter.id = id;
        self.lock().insert(
            id,
            Open {
                target,
                filter,
                tx,
                limit,
                delivered: 0,
                dropped: 0,
            },
        );
        id
    }

    /// Closes tap `id`; whether it was open.
    pub fn close(&self, id: u64) -> bool {
        self.lock().remove(&id).is_some()
    }

    /// The taps `id`'s proxies must serve, in opening order.
    pub fn filters_for(&self, id: &SpiffeId) -> Vec<TapFilter> {
        self.lock()
            .values()
            .filter(|o| &o.target == id)
            .map(|o| o.filter.clone())
            .collect()
    }

    /// Routes the events a proxy of `target`, listening at `proxy`, sent. Returns whether a
    /// tap reached its limit and closed (the caller bumps the generation so proxies stop).
    pub fn deliver(&self, target: &SpiffeId, proxy: &str, batch: TapEvents) -> bool {
        if batch.events.len() > MAX_EVENTS {
            tracing::warn!(%target, events = batch.events.len(), "ignored an oversized tap message");
            return false;
        }
        let mut open = self.lock();
        let mut per_tap: BTreeMap<u64, Vec<TapEvent>> = BTreeMap::new();
        for mut event in batch.events {
            if !plausible(&event) {
                continue;
            }
            let taps = std::mem::take(&mut event.taps);
            event.target = target.to_string();
            event.proxy = proxy.to_owned();
            for id in taps {
                // A proxy feeds only taps on its own service.
                if open.get(&id).is_some_and(|o| &o.target == target) {
                    per_tap.entry(id).or_default().push(event.clone());
                }
            }
        }
        for (id, lost) in batch.dropped {
            if let Some(o) = open.get_mut(&id).filter(|o| &o.target == target) {
                o.dropped += lost;
            }
        }
        let mut finished = Vec::new();
        for (id, o) in open.iter_mut() {
            let mut events = per_tap.remove(id).unwrap_or_default();
            if events.is_empty() && o.dropped == 0 {
                continue;
            }
            if o.limit > 0 {
                events.truncate((o.limit - o.delivered) as usize);
            }
            let n = events.len() as u64;
            let msg = TapResponse {
                events,
                dropped: o.dropped,
                ..TapResponse::default()
            };
            match o.tx.try_send(msg) {
                Ok(()) => {
                    o.delivered += n;
                    o.dropped = 0;
                }
                Err(mpsc::error::TrySendError::Full(_)) => o.dropped += n,
                Err(mpsc::error::TrySendError::Closed(_)) => finished.push(*id),
            }
            if o.limit > 0 && o.delivered >= o.limit {
                finished.push(*id);
            }
        }
        for id in &finished {
            open.remove(id);
        }
        !finished.is_empty()
    }
}

/// Events a second per sidecar when a tap asks for no rate, and the most it may ask for.
pub const DEFAULT_RATE: u32 = 100;
pub const MAX_RATE: u32 = 1000;

/// The filter a tap request asks for (`from` already resolved to an identity), or what is wrong
/// with it.
pub fn filter_of(r: &TapRequest, from: Option<&SpiffeId>) -> Result<TapFilter, String> {
    let decision = match r.decision.as_str() {
        "" | "allow" | "deny" | "would-deny" => r.decision.clone(),
        other => {
            return Err(format!(
                "decision {other:?} is not one of allow, deny, would-deny"
            ));
        }
    };
    if !r.path_prefix.is_empty() {
        let canonical = moat_policy::canonical_path(&r.path_prefix)
            .map_err(|e| format!("path prefix {:?}: {e}", r.path_prefix))?;
        if canonical != r.path_prefix.as_str() || r.path_prefix.len() > 1024 {
            return Err(format!(
                "path prefix {:?} is not a canonical path: write it as requests are matched, e.g. {canonical:?}",
                r.path_prefix
            ));
        }
    }
    if r.method.len() > 32 || !r.method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!(
            "method {:?} is not an HTTP method (e.g. GET, POST)",
            r.method
        ));
    }
    let max_per_second = match r.max_per_second {
        0 => DEFAULT_RATE,
        n if n <= MAX_RATE => n,
        n => {
            return Err(format!(
                "{n} events a second is over the limit of {MAX_RATE}"
            ));
        }
    };
    Ok(TapFilter {
        id: 0,
        from: from.map(ToString::to_string).unwrap_or_default(),
        decision,
        path_prefix: r.path_prefix.clone(),
        method: r.method.to_ascii_uppercase(),
        max_per_second,
    })
}

/// Whether an event's fields are within the sizes a sidecar produces.
fn plausible(e: &TapEvent) -> bool {
    e.peer.len() <= 2048
        && e.path.len() <= 8192
        && e.method.len() <= 32
        && e.protocol.len() <= 8
        && e.decision.len() <= 16
        && e.reason.len() <= 64
        && e.policy.len() <= 600
        && e.request_id.len() <= 128
        && e.taps.len() <= 64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id(s: &str) -> SpiffeId {
        format!("spiffe://mesh.test/ns/default/sa/{s}")
            .parse()
            .unwrap()
    }

    fn event(taps: &[u64]) -> TapEvent {
        TapEvent {
            peer: id("frontend").to_string(),
            decision: "allow".into(),
            taps: taps.to_vec(),
            ..TapEvent::default()
        }
    }

    #[test]
    fn events_reach_the_taps_they_matched_on_the_proxy_s_own_service() {
        let taps = Taps::default();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        let a = taps.open(id("orders"), TapFilter::default(), 0, tx1);
        let b = taps.open(id("payments"), TapFilter::default(), 0, tx2);
        assert_eq!(taps.filters_for(&id("orders"))[0].id, a);
        // orders' proxy claims a match for the payments tap too: it does not get there.
        let batch = TapEvents {
            events: vec![event(&[a, b])],
            dropped: [(a, 2)].into(),
        };
        assert!(!taps.deliver(&id("orders"), "10.0.0.1:7001", batch));
        let got = rx1.try_recv().unwrap();
        assert_eq!(got.events.len(), 1);
        assert_eq!(got.dropped, 2);
        assert_eq!(got.events[0].proxy, "10.0.0.1:7001");
        assert_eq!(got.events[0].target, id("orders").to_string());
        assert!(got.events[0].taps.is_empty());
        assert!(rx2.try_recv().is_err());
    }

    #[test]
    fn a_request_with_a_bad_field_says_which() {
        let r = |f: fn(&mut TapRequest)| {
            let mut r = TapRequest::default();
            f(&mut r);
            filter_of(&r, None)
        };
        assert_eq!(r(|_| {}).unwrap().max_per_second, DEFAULT_RATE);
        assert_eq!(r(|r| r.method = "get".into()).unwrap().method, "GET");
        assert!(
            r(|r| r.decision = "denied".into())
                .unwrap_err()
                .contains("allow, deny")
        );
        let e = r(|r| r.path_prefix = "/a/../b".into()).unwrap_err();
        assert!(e.contains("\"/b\""), "{e}");
        assert!(r(|r| r.method = "G T".into()).is_err());
        assert!(r(|r| r.max_per_second = 5000).unwrap_err().contains("1000"));
    }

    #[test]
    fn a_tap_closes_at_its_limit() {
        let taps = Taps::default();
        let (tx, mut rx) = mpsc::channel(8);
        let a = taps.open(id("orders"), TapFilter::default(), 3, tx);
        let batch = |n: usize| TapEvents {
            events: (0..n).map(|_| event(&[a])).collect(),
            dropped: Default::default(),
        };
        assert!(!taps.deliver(&id("orders"), "p", batch(2)));
        assert!(taps.deliver(&id("orders"), "p", batch(2)));
        assert_eq!(rx.try_recv().unwrap().events.len(), 2);
        assert_eq!(rx.try_recv().unwrap().events.len(), 1);
        assert!(taps.filters_for(&id("orders")).is_empty());
        // The sender is gone with the tap: the client's stream ends.
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_slow_client_loses_events_and_is_told_how_many() {
        let taps = Taps::default();
        let (tx, mut rx) = mpsc::channel(1);
        let a = taps.open(id("orders"), TapFilter::default(), 0, tx);
        let one = || TapEvents {
            events: vec![event(&[a])],
            dropped: Default::default(),
        };
        taps.deliver(&id("orders"), "p", one());
        taps.deliver(&id("orders"), "p", one());
        assert_eq!(rx.try_recv().unwrap().dropped, 0);
        taps.deliver(&id("orders"), "p", one());
        let got = rx.try_recv().unwrap();
        assert_eq!((got.events.len(), got.dropped), (1, 1));
    }
}
