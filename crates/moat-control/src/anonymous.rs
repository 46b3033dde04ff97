//! Connections to the control plane that completed a handshake without a client certificate:
//! a sidecar's token bootstrap, and what anyone who reaches the port can open. They are bounded
//! per source address and overall (decision 49). At a bound a newcomer takes the place of an
//! older connection that is no longer at work — past its first seconds after the handshake
//! ([`crate::listener::ANONYMOUS_AT_WORK`]), time enough for the one `Certify` a bootstrap
//! makes:
//!
//! - a source at its own bound gives up its oldest connection not at work;
//! - at the overall bound, the source holding the most gives up its oldest not at work while
//!   it would still hold more than the newcomer's source; otherwise the oldest not at work
//!   anywhere goes;
//! - when every candidate is at work, the newcomer is turned away (and its sidecar tries again
//!   after its backoff) rather than cut a bootstrap short: a join token is spent when the
//!   certificate is issued, so a call cut after that could not be made again.
//!
//! Strangers holding every place with idle connections, from as many addresses as they like,
//! therefore cannot keep a bootstrapping sidecar out: to keep every place at work they would
//! have to complete a new handshake for each place every few seconds (512 every 5 s), and even
//! then a bootstrap already under way is never cut. Refusing every newcomer at the bound,
//! as the control plane once did, let sixteen addresses holding 32 idle connections each keep
//! every new sidecar out for as long as they cared to reconnect.

use std::net::IpAddr;
use std::pin::Pin;
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
    at_work: Duration,
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
}

impl Places {
    /// Places for at most `per_source` connections from one source and `total` in all, a
    /// connection counting as at work for `at_work` after its handshake.
    pub fn new(per_source: usize, total: usize, at_work: Duration) -> Arc<Self> {
        Arc::new(Places {
            per_source: per_source.max(1),
            total: total.max(1),
            at_work,
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
            at_work: self.at_work,
        };
        let (id, evicted) = self.lock().admit(&limits, source, take, Instant::now())?;
        Some(Place {
            owner: self.clone(),
            id,
            evicted,
            taken: Some(taken),
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
    at_work: Duration,
}

/// The connections holding a place: oldest first, and per source, each with when it was
/// admitted. Dropping an entry's sender tells its connection that its place was taken.
#[derive(Debug, Default)]
struct Open(BySource<(Instant, oneshot::Sender<()>)>);

impl Open {
    /// Registers a connection from `source` at `now` (after taking older ones' places as the
    /// module says): its id, and how many were pushed out; `None` when it must be turned away.
    fn admit(
        &mut self,
        limits: &Limits,
        source: IpAddr,
        take: oneshot::Sender<()>,
        now: Instant,
    ) -> Option<(u64, u64)> {
        let open = &mut self.0;
        let idle = |id: u64| {
            open.get(id)
                .is_some_and(|(since, _)| now.saturating_duration_since(*since) >= limits.at_work)
        };
        let mut victims = Vec::new();
        if open.count(&source) >= limits.per_source {
            victims.push(open.of(&source).find(|&id| idle(id))?);
        }
        if open.len() - victims.len() >= limits.total {
            let own = open.count(&source) - victims.len();
            // The busiest source pays first (the one with the oldest connection among equals)
            // while it would still hold more than the newcomer's source; otherwise the oldest
            // not at work anywhere goes.
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
        Some((open.push(source, (now, take)), victims.len() as u64))
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

    const AT_WORK: Duration = Duration::from_secs(2);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// One connection of the test: its id when admitted, and its receiver.
    struct Conn {
        id: Option<u64>,
        evicted: u64,
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

    fn admit(
        open: &mut Open,
        per_source: usize,
        total: usize,
        source: IpAddr,
        at: Instant,
    ) -> Conn {
        let (take, taken) = oneshot::channel();
        let limits = Limits {
            per_source,
            total,
            at_work: AT_WORK,
        };
        let admitted = open.admit(&limits, source, take, at);
        Conn {
            id: admitted.map(|(id, _)| id),
            evicted: admitted.map_or(0, |(_, n)| n),
            taken,
        }
    }

    #[test]
    fn a_source_at_its_bound_gives_up_its_oldest_not_at_work() {
        let t0 = Instant::now();
        let later = t0 + AT_WORK;
        let mut open = Open::default();
        let mut first = admit(&mut open, 2, 10, ip(1), t0);
        let mut second = admit(&mut open, 2, 10, ip(1), t0 + Duration::from_millis(1));
        let mut other = admit(&mut open, 2, 10, ip(2), t0);
        // Both of 10.0.0.1's are at work: its third waits its turn.
        let early = admit(&mut open, 2, 10, ip(1), t0 + Duration::from_secs(1));
        assert!(early.id.is_none());
        assert!(!first.taken() && !second.taken());
        // Once they are not, the oldest gives way.
        let third = admit(&mut open, 2, 10, ip(1), later + Duration::from_millis(1));
        assert_eq!((third.id.is_some(), third.evicted), (true, 1));
        assert!(first.taken());
        assert!(!second.taken() && !other.taken());
        assert_eq!(open.0.len(), 3);
    }

    /// Strangers holding every place with idle connections from 16 addresses (32 each) cannot
    /// keep a sidecar out; the sidecar's connection, at work, is not the one to go when a
    /// stranger comes back; strangers who refresh every place cannot cut it short either.
    #[test]
    fn strangers_holding_every_place_make_room_but_never_cut_a_bootstrap_short() {
        let t0 = Instant::now();
        let t1 = t0 + AT_WORK + Duration::from_secs(1);
        let mut open = Open::default();
        let mut strangers: Vec<Conn> = (0..32)
            .flat_map(|_| (1..=16).map(ip))
            .map(|source| admit(&mut open, 32, 512, source, t0))
            .collect();
        assert!(strangers.iter().all(|c| c.id.is_some() && c.evicted == 0));
        assert_eq!(open.0.len(), 512);
        // A sidecar from its own address gets in; 10.0.0.1's oldest goes.
        let mut sidecar = admit(&mut open, 32, 512, ip(100), t1);
        assert_eq!((sidecar.id.is_some(), sidecar.evicted), (true, 1));
        assert!(strangers[0].taken());
        assert_eq!(
            strangers.iter_mut().map(Conn::taken).filter(|t| *t).count(),
            1
        );
        // Strangers coming back, from their own addresses or from 510 new ones, take each
        // other's places, never the sidecar's while it is at work.
        for n in 0..600u32 {
            let source = IpAddr::from([10, 1, (n / 256) as u8, (n % 256) as u8]);
            let back = admit(&mut open, 32, 512, source, t1);
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
        let mut a = admit(&mut open, 4, 3, ip(1), t0);
        let mut b = admit(&mut open, 4, 3, ip(2), t0);
        let mut c = admit(&mut open, 4, 3, ip(3), t0);
        let refused = admit(&mut open, 4, 3, ip(4), t0 + Duration::from_secs(1));
        assert!(refused.id.is_none());
        assert!(!a.taken() && !b.taken() && !c.taken());
        // Among equal sources not at work, the oldest goes.
        let d = admit(&mut open, 4, 3, ip(4), t0 + AT_WORK);
        assert_eq!(d.evicted, 1);
        assert!(a.taken());
        assert!(!b.taken() && !c.taken());
        assert_eq!(open.0.len(), 3);
    }

    #[test]
    fn a_place_given_up_is_free_again() {
        let places = Places::new(1, 1, AT_WORK);
        drop(places.admit(ip(1)));
        assert_eq!(places.open(), 0);
        let kept = places.admit(ip(2)).expect("a free place");
        assert_eq!(kept.evicted(), 0);
        assert!(places.admit(ip(3)).is_none(), "the one there is at work");
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
