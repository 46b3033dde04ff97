//! `moat tap` at the sidecar. The control plane lists the taps open on this proxy's service in
//! every snapshot; while one is open, each call the inbound side decides on is matched against
//! them and, if it matches, queued as an event for the mesh stream. With none open the data
//! path pays one relaxed atomic load per call and builds nothing. A tap can never slow the data
//! path: each tap admits at most its `max_per_second` events a second, the queue is bounded,
//! and whatever does not fit is counted as dropped (and reported with the next events) instead
//! of waited for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moat_api::v1::{TapEvent, TapEvents, TapFilter};
use tokio::sync::mpsc;

/// Events waiting for the mesh stream, across every tap.
const QUEUE: usize = 1024;

/// The most events one message to the control plane carries.
pub const BATCH: usize = 256;

/// One call as the sidecar decided it: what a tap event and a span report.
#[derive(Debug)]
pub struct Call<'a> {
    /// `http` or `tcp`.
    pub protocol: &'static str,
    pub peer: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// The `grpc-status` of a gRPC answer without a body (a refusal), if any.
    pub grpc_status: Option<&'a str>,
    pub decision: &'a str,
    pub reason: &'a str,
    pub policy: Option<&'a str>,
    pub latency: Duration,
    pub request_id: &'a str,
}

/// One open tap, with this second's budget.
#[derive(Debug)]
struct Open {
    filter: TapFilter,
    window: Instant,
    sent: u32,
    dropped: u64,
}

impl Open {
    fn matches(&self, c: &Call<'_>) -> bool {
        let f = &self.filter;
        (f.from.is_empty() || f.from == c.peer)
            && (f.decision.is_empty() || f.decision == c.decision)
            && (f.method.is_empty() || f.method == c.method)
            && (f.path_prefix.is_empty() || under(c.path, &f.path_prefix))
    }

    /// Takes one event from this second's budget; counts it as dropped when there is none.
    fn admit(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.sent = 0;
        }
        if self.sent < self.filter.max_per_second {
            self.sent += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// Whether `path` is `prefix` or below it, segment-wise.
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// The taps open on this proxy and the events queued for them.
#[derive(Debug)]
pub struct Tap {
    active: AtomicBool,
    open: Mutex<Vec<Open>>,
    queue: mpsc::Sender<TapEvent>,
    /// Taken by the mesh stream for as long as it runs.
    pub events: tokio::sync::Mutex<mpsc::Receiver<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        let (queue, events) = mpsc::channel(QUEUE);
        Tap {
            active: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
            queue,
            events: tokio::sync::Mutex::new(events),
        }
    }
}

impl Tap {
    /// Whether any tap is open: the only tap work the data path does otherwise.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// How many taps are open (`/config`).
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the open taps with `filters` (from a snapshot; none when the stream ends). A tap
    /// that stays open keeps its budget and its count of dropped events.
    pub fn set(&self, filters: Vec<TapFilter>) {
        let mut open = self.lock();
        let mut before: HashMap<u64, Open> = open.drain(..).map(|o| (o.filter.id, o)).collect();
        for filter in filters {
            let kept = before.remove(&filter.id);
            open.push(match kept {
                Some(mut o) => {
                    o.filter = filter;
                    o
                }
                None => Open {
                    filter,
                    window: Instant::now(),
                    sent: 0,
                    dropped: 0,
                },
            });
        }
        self.active.store(!open.is_empty(), Ordering::Relaxed);
    }

    /// Queues `call` for every open tap it matches and has budget for. Cheap when no tap is
    /// open; never waits.
    pub fn offer(&self, call: &Call<'_>) {
        if !self.active() {
            return;
        }
        let now = Instant::now();
        let mut open = self.lock();
        let taps: Vec<u64> = open
            .iter_mut()
            .filter(|o| o.matches(call))
            .filter_map(|o| o.admit(now).then_some(o.filter.id))
            .collect();
        if taps.is_empty() {
            return;
        }
        let event = TapEvent {
            time_unix_micros: unix_micros(),
            protocol: call.protocol.to_owned(),
            peer: call.peer.to_owned(),
            target: String::new(),
            proxy: String::new(),
            port: u32::from(call.port),
            method: call.method.to_owned(),
            path: call.path.to_owned(),
            status: u32::from(call.status),
            grpc_status: call.grpc_status.unwrap_or_default().to_owned(),
            decision: call.decision.to_owned(),
            reason: call.reason.to_owned(),
            policy: call.policy.unwrap_or_default().to_owned(),
            latency_micros: call.latency.as_micros() as u64,
            request_id: call.request_id.to_owned(),
            taps,
        };
        if let Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) =
            self.queue.try_send(event)
        {
            for o in open.iter_mut().filter(|o| e.taps.contains(&o.filter.id)) {
                o.dropped += 1;
            }
        }
    }

    /// The next message for the control plane: `first` and whatever else is queued (up to
    /// [`BATCH`]), with the drops counted since the previous one.
    pub fn batch(&self, first: TapEvent, more: &mut mpsc::Receiver<TapEvent>) -> TapEvents {
        let mut events = vec![first];
        while events.len() < BATCH {
            match more.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let dropped = self
            .lock()
            .iter_mut()
            .filter(|o| o.dropped > 0)
            .map(|o| (o.filter.id, std::mem::take(&mut o.dropped)))
            .collect();
        TapEvents { events, dropped }
    }
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(peer: &'a str, decision: &'a str, path: &'a str) -> Call<'a> {
        Call {
            protocol: "http",
            peer,
            port: 80,
            method: "GET",
            path,
            status: 200,
            grpc_status: None,
            decision,
            reason: "allowed",
            policy: None,
            latency: Duration::from_millis(1),
            request_id: "r",
        }
    }

    fn filter(id: u64, f: impl FnOnce(&mut TapFilter)) -> TapFilter {
        let mut t = TapFilter {
            id,
            max_per_second: 100,
            ..TapFilter::default()
        };
        f(&mut t);
        t
    }

    #[test]
    fn nothing_is_queued_without_an_open_tap() {
        let tap = Tap::default();
        assert!(!tap.active());
        tap.offer(&call("a", "allow", "/"));
        assert!(tap.events.try_lock().unwrap().try_recv().is_err());
    }

    #[test]
    fn each_event_names_the_taps_it_matched() {
        let tap = Tap::default();
        tap.set(vec![
            filter(1, |_| {}),
            filter(2, |f| f.decision = "deny".into()),
            filter(3, |f| f.path_prefix = "/orders".into()),
            filter(4, |f| f.from = "b".into()),
        ]);
        tap.offer(&call("a", "deny", "/orders/1"));
        tap.offer(&call("a", "allow", "/ordersx"));
        let mut rx = tap.events.try_lock().unwrap();
        assert_eq!(rx.try_recv().unwrap().taps, [1, 2, 3]);
        assert_eq!(rx.try_recv().unwrap().taps, [1]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn past_its_rate_a_tap_counts_drops_and_reports_them_once() {
        let tap = Tap::default();
        tap.set(vec![filter(7, |f| f.max_per_second = 2)]);
        for _ in 0..5 {
            tap.offer(&call("a", "allow", "/"));
        }
        let mut rx = tap.events.try_lock().unwrap();
        let first = rx.try_recv().unwrap();
        let batch = tap.batch(first, &mut rx);
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.dropped.get(&7), Some(&3));
        // Re-listing the same tap keeps its budget; closing every tap stops the work.
        tap.set(vec![filter(7, |f| f.max_per_second = 2)]);
        tap.offer(&call("a", "allow", "/"));
        assert!(rx.try_recv().is_err());
        tap.set(Vec::new());
        assert!(!tap.active());
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        assert!(under("/orders", "/orders"));
        assert!(under("/orders/1", "/orders/"));
        assert!(!under("/ordersx", "/orders"));
        assert!(under("/anything", "/"));
    }
}
