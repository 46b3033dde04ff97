//! Connections to the control plane that completed a handshake without a client certificate:
//! a sidecar's token bootstrap, and what anyone who reaches the port can open. They are bounded
//! per source address and overall (decision 49). At a bound a newcomer takes the place of an
//! older connection that is not at work. A connection is at work while a `Certify` runs on it
//! ([`Place::at_work`], held by the handler) and for a short grace after its handshake, the
//! time a bootstrapping sidecar takes to send that call ([`crate::listener::ANONYMOUS_GRACE`]):
//!
//! - a source at its own bound gives up its oldest connection not at work;
//! - at the overall bound, the source holding the most (of those with one not at work) gives
//!   up its oldest not at work while it would still hold at least as many as the newcomer's
//!   source; otherwise the oldest not at work anywhere goes;
//! - when every candidate is at work, the newcomer is turned away (and its sidecar tries again
//!   after its backoff) rather than cut a bootstrap short: a join token is spent when the
//!   certificate is issued, so a call cut after that could not be made again, however long the
//!   store takes to answer.
//!
//! Strangers holding every place with idle connections, from as many addresses as they like,
//! therefore cannot keep a bootstrapping sidecar out, and a `Certify` of theirs ends in
//! milliseconds (its request is read whole before it runs): to keep every place at work they
//! would have to open a new connection for each place every grace period. Refusing every
//! newcomer at the bound, as the control plane once did, let sixteen addresses holding 32 idle
//! connections each keep every new sidecar out for as long as they cared to reconnect.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use moat_tls::by_source::BySource;
use tokio::sync::oneshot;

/// The places for connections without a client certificate at one listener.
#[derive(Debug)]
pub struct Places {
    per_source: usize,
    total: usize,
    grace: Duration,
    open: Mutex<Open>,
}

/// One connection's place; given up when dropped. [`Place::poll_evicted`] says when a newer
/// connection took it.
#[derive(Debug)]
pub struct Place {
    owner: Arc<Places>,
    id: u64,
    /// Older connections this one's admission pushed out.
    evicted: u64,
    /// Resolves (with an error: the sender is dropped) once this place is taken.
    taken: Option<oneshot::Receiver<()>>,
    /// Calls at work on the connection, shared with its entry.
    calls: Arc<Calls>,
}

/// How many calls that must not be cut short run on one connection.
#[derive(Debug, Default)]
pub struct Calls(AtomicUsize);

impl Calls {
    /// Marks a call at work until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> AtWork {
        self.0.fetch_add(1, Ordering::Relaxed);
        AtWork(self.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// A call at work on a connection without a client certificate; it keeps the connection's
/// place until dropped.
#[derive(Debug)]
pub struct AtWork(Arc<Calls>);

impl Drop for AtWork {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Places {
    /// Places for at most `per_source` connections from one source and `total` in all, a
    /// connection counting as at work for `grace` after its handshake, and while a call holds
    /// [`Place::at_work`].
    pub fn new(per_source: usize, total: usize, grace: Duration) -> Arc<Self> {
        Arc::new(Places {
            per_source: per_source.max(1),
            total: total.max(1),
            grace,
            open: Mutex::default(),
        })
    }

    /// A place for a new connection from `source`, taking older ones' as the module says;
    /// `None` when every candidate is at work and the newcomer should be closed.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Place> {
        let (take, taken) = oneshot::channel();
        let limits = Limits {
            per_source: self.per_source,
            total: self.total,
            grace: self.grace,
        };
        let calls = Arc::new(Calls::default());
        let entry = Entry {
            since: Instant::now(),
            calls: calls.clone(),
            _take: take,
        };
        let (id, evicted) = self.lock().admit(&limits, source, entry)?;
        Some(Place {
            owner: self.clone(),
            id,
            evicted,
            taken: Some(taken),
            calls,
        })
    }

    /// How many connections hold a place now.
    pub fn open(&self) -> usize {
        self.lock().0.len()
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent maps.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Place {
    /// How many older connections this one's admission pushed out.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The count a call that must not be cut short enters ([`Calls::enter`]).
    pub fn at_work(&self) -> Arc<Calls> {
        self.calls.clone()
    }

    /// Ready once a newer connection has taken this place (and stays ready).
    pub fn poll_evicted(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(taken) = self.taken.as_mut() else {
            return Poll::Ready(());
        };
        match Pin::new(taken).poll(cx) {
            Poll::Ready(_) => {
                // A oneshot receiver must not be polled again once it has answered.
                self.taken = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.owner.lock().remove(self.id);
    }
}

/// The bounds [`Open::admit`] keeps.
struct Limits {
    per_source: usize,
    total: usize,
    grace: Duration,
}

/// One connection holding a place.
#[derive(Debug)]
struct Entry {
    /// When it was admitted (its handshake had just completed).
    since: Instant,
    calls: Arc<Calls>,
    /// Dropped to tell the connection its place was taken.
    _take: oneshot::Sender<()>,
}

impl Entry {
    fn at_work(&self, grace: Duration, now: Instant) -> bool {
        self.calls.any() || now.saturating_duration_since(self.since) < grace
    }
}

/// The connections holding a place: oldest first, and per source.
#[derive(Debug, Default)]
struct Open(BySource<Entry>);

impl Open {
    /// Registers `entry`, a connection from `source` (after taking older ones' places as the
    /// module says): its id, and how many were pushed out; `None` when it must be turned away.
    fn admit(&mut self, limits: &Limits, source: IpAddr, entry: Entry) -> Option<(u64, u64)> {
        let open = &mut self.0;
        let now = entry.since;
        let idle = |id: u64| open.get(id).is_some_and(|e| !e.at_work(limits.grace, now));
        let mut victims = Vec::new();
        if open.count(&source) >= limits.per_source {
            victims.push(open.of(&source).find(|&id| idle(id))?);
        }
        if open.len() - victims.len() >= limits.total {
            let own = open.count(&source) - victims.len();
            // The source holding the most (of those with one not at work; the one with the oldest
            // among equals) pays first while it would keep at least as many as the newcomer's
            // source; otherwise the oldest not at work anywhere goes.
            let busiest = open
                .sources()
                .filter(|q| q.len() > own + 1)
                .filter_map(|q| Some((q.len(), q.iter().copied().find(|&id| idle(id))?)))
                .max_by_key(|&(len, oldest)| (len, std::cmp::Reverse(oldest)))
                .map(|(_, oldest)| oldest);
            let victim = busiest.or_else(|| open.iter().map(|(id, _)| id).find(|&id| idle(id)));
            victims.push(victim?);
        }
        for &id in &victims {
            open.remove(id);
        }
        Some((open.push(source, entry), victims.len() as u64))
    }

    /// Forgets connection `id` (closed or pushed out); a no-op when already gone.
    fn remove(&mut self, id: u64) {
        self.0.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    const GRACE: Duration = Duration::from_secs(1);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// One connection of the test: its id when admitted, its calls, and its receiver.
    struct Conn {
        id: Option<u64>,
        evicted: u64,
        calls: Arc<Calls>,
        taken: oneshot::Receiver<()>,
    }

    impl Conn {
        /// Whether its place was taken (its sender is gone).
        fn taken(&mut self) -> bool {
            matches!(
                self.taken.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            )
        }
    }

    fn admit(open: &mut Open, bounds: (usize, usize), source: IpAddr, at: Instant) -> Conn {
        let (take, taken) = oneshot::channel();
        let limits = Limits {
            per_source: bounds.0,
            total: bounds.1,
            grace: GRACE,
        };
        let calls = Arc::new(Calls::default());
        let entry = Entry {
            since: at,
            calls: calls.clone(),
            _take: take,
        };
        let admitted = open.admit(&limits, source, entry);
        Conn {
            id: admitted.map(|(id, _)| id),
            evicted: admitted.map_or(0, |(_, n)| n),
            calls,
            taken,
        }
    }

    #[test]
    fn a_source_at_its_bound_gives_up_its_oldest_not_at_work() {
        let t0 = Instant::now();
        let mut open = Open::default();
        let mut first = admit(&mut open, (2, 10), ip(1), t0);
        let mut second = admit(&mut open, (2, 10), ip(1), t0 + Duration::from_millis(1));
        let mut other = admit(&mut open, (2, 10), ip(2), t0);
        // Both of 10.0.0.1's are in their grace: its third waits its turn.
        let early = admit(&mut open, (2, 10), ip(1), t0 + GRACE / 2);
        assert!(early.id.is_none());
        assert!(!first.taken() && !second.taken());
        // Past it, the oldest gives way, unless a call is at work on it.
        let _certify = first.calls.enter();
        let later = t0 + GRACE + Duration::from_millis(5);
        let third = admit(&mut open, (2, 10), ip(1), later);
        assert_eq!((third.id.is_some(), third.evicted), (true, 1));
        assert!(!first.taken(), "a call at work was cut short");
        assert!(second.taken());
        assert!(!other.taken());
        assert_eq!(open.0.len(), 3);
    }

    /// Strangers holding every place with idle connections from 16 addresses (32 each) cannot
    /// keep a sidecar out; its `Certify`, however long it runs, is never cut short by strangers
    /// coming back, from their own addresses or from hundreds of new ones.
    #[test]
    fn strangers_holding_every_place_make_room_but_never_cut_a_bootstrap_short() {
        let t0 = Instant::now();
        let t1 = t0 + GRACE + Duration::from_secs(1);
        let mut open = Open::default();
        let mut strangers: Vec<Conn> = (0..32)
            .flat_map(|_| (1..=16).map(ip))
            .map(|source| admit(&mut open, (32, 512), source, t0))
            .collect();
        assert!(strangers.iter().all(|c| c.id.is_some() && c.evicted == 0));
        assert_eq!(open.0.len(), 512);
        // A sidecar from its own address gets in; 10.0.0.1's oldest goes.
        let mut sidecar = admit(&mut open, (32, 512), ip(100), t1);
        assert_eq!((sidecar.id.is_some(), sidecar.evicted), (true, 1));
        assert!(strangers[0].taken());
        assert_eq!(
            strangers.iter_mut().map(Conn::taken).filter(|t| *t).count(),
            1
        );
        let _certify = sidecar.calls.enter();
        // Long after its grace, strangers keep coming: every one of theirs goes in turn, the
        // sidecar's never while its call runs.
        let t2 = t1 + Duration::from_secs(60);
        for n in 0..1200u32 {
            let source = IpAddr::from([10, 1, (n / 256) as u8, (n % 256) as u8]);
            let back = admit(&mut open, (32, 512), source, t2 + GRACE * (n / 256));
            assert!(back.id.is_some() || n >= 511, "newcomer {n} turned away");
            if back.id.is_none() {
                break;
            }
        }
        assert!(!sidecar.taken(), "a bootstrap at work was cut short");
        assert_eq!(open.0.len(), 512);
    }

    #[test]
    fn when_every_place_is_at_work_the_newcomer_is_turned_away() {
        let t0 = Instant::now();
        let mut open = Open::default();
        let mut a = admit(&mut open, (4, 3), ip(1), t0);
        let mut b = admit(&mut open, (4, 3), ip(2), t0);
        let mut c = admit(&mut open, (4, 3), ip(3), t0);
        let refused = admit(&mut open, (4, 3), ip(4), t0 + GRACE / 2);
        assert!(refused.id.is_none());
        assert!(!a.taken() && !b.taken() && !c.taken());
        // Among equal sources not at work, the oldest goes.
        let d = admit(&mut open, (4, 3), ip(4), t0 + GRACE);
        assert_eq!(d.evicted, 1);
        assert!(a.taken());
        assert!(!b.taken() && !c.taken());
        assert_eq!(open.0.len(), 3);
    }

    #[test]
    fn a_place_given_up_is_free_again() {
        let places = Places::new(1, 1, GRACE);
        drop(places.admit(ip(1)));
        assert_eq!(places.open(), 0);
        let kept = places.admit(ip(2)).expect("a free place");
        assert_eq!(kept.evicted(), 0);
        assert!(
            places.admit(ip(3)).is_none(),
            "the one there is in its grace"
        );
    }

    #[tokio::test]
    async fn a_taken_place_wakes_its_connection() {
        let places = Places::new(1, 10, Duration::ZERO);
        let mut first = places.admit(ip(1)).expect("a free place");
        let waiting = tokio::spawn(async move { poll_fn(|cx| first.poll_evicted(cx)).await });
        tokio::task::yield_now().await;
        let second = places.admit(ip(1)).expect("the first is not at work");
        assert_eq!(second.evicted(), 1);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the first connection learns its place was taken")
            .expect("the task ran");
    }
}
