//! Connections to the control plane that completed a handshake without a client certificate:
//! a sidecar's token bootstrap, and what anyone who reaches the port can open. They are bounded
//! per source address and overall, and a newcomer is never turned away for them: it takes the
//! place of an older one.
//!
//! - A source at its own bound gives up its oldest connection to its newest.
//! - At the overall bound, the source holding the most gives up its oldest when it would still
//!   hold more than the newcomer's source; otherwise the oldest connection anywhere goes.
//!
//! A stranger holding every place from many addresses therefore cannot keep a bootstrapping
//! sidecar out (its first connection pushes out one of the stranger's, and it needs only
//! milliseconds for its call); to close a sidecar's connection mid-call the stranger would have
//! to complete as many handshakes as there are places within those milliseconds. Refusing the
//! newcomer instead, as the control plane once did, let sixteen addresses holding 32 idle
//! connections each keep every new sidecar out for as long as they cared to reconnect.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

/// The places for connections without a client certificate at one listener.
#[derive(Debug)]
pub struct Places {
    per_source: usize,
    total: usize,
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
    /// Places for at most `per_source` connections from one source and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Places {
            per_source: per_source.max(1),
            total: total.max(1),
            open: Mutex::default(),
        })
    }

    /// A place for a new connection from `source`, pushing out older ones as the module says.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Place {
        let (take, taken) = oneshot::channel();
        let (id, evicted) = self.lock().admit(self.per_source, self.total, source, take);
        Place {
            owner: self.clone(),
            id,
            evicted,
            taken: Some(taken),
        }
    }

    /// How many connections hold a place now.
    pub fn open(&self) -> usize {
        self.lock().by_age.len()
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

/// The connections holding a place: oldest first, and per source. Dropping an entry's sender
/// tells its connection that its place was taken.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl Open {
    /// Registers a connection from `source` (after pushing out older ones as the module says):
    /// its id, and how many were pushed out.
    fn admit(
        &mut self,
        per_source: usize,
        total: usize,
        source: IpAddr,
        take: oneshot::Sender<()>,
    ) -> (u64, u64) {
        let mut evicted = 0;
        let own = self.by_source.get(&source).map_or(0, VecDeque::len);
        if own >= per_source
            && let Some(oldest) = self.by_source.get(&source).and_then(|q| q.front().copied())
        {
            self.remove(oldest);
            evicted += 1;
        }
        if self.by_age.len() >= total {
            let own = self.by_source.get(&source).map_or(0, VecDeque::len);
            // The busiest source pays first (the one with the oldest connection among equals)
            // while it would still hold more than the newcomer's source; otherwise age decides.
            let victim = self
                .by_source
                .values()
                .filter_map(|q| Some((q.len(), q.front().copied()?)))
                .max_by_key(|&(len, oldest)| (len, std::cmp::Reverse(oldest)))
                .filter(|&(len, _)| len > own + 1)
                .map(|(_, oldest)| oldest)
                .or_else(|| self.by_age.keys().next().copied());
            if let Some(victim) = victim {
                self.remove(victim);
                evicted += 1;
            }
        }
        let id = self.next;
        self.next += 1;
        self.by_age.insert(id, (source, take));
        self.by_source.entry(source).or_default().push_back(id);
        (id, evicted)
    }

    /// Forgets connection `id` (closed or pushed out); a no-op when already gone.
    fn remove(&mut self, id: u64) {
        let Some((source, _take)) = self.by_age.remove(&id) else {
            return;
        };
        if let Some(q) = self.by_source.get_mut(&source) {
            // Connections mostly end in the order they began.
            if q.front() == Some(&id) {
                q.pop_front();
            } else {
                q.retain(|&x| x != id);
            }
            if q.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// Whether `place` was taken, without waiting.
    fn taken(place: &mut Place) -> bool {
        let waker = std::task::Waker::noop();
        place
            .poll_evicted(&mut Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn a_source_at_its_bound_gives_up_its_oldest() {
        let places = Places::new(2, 10);
        let mut first = places.admit(ip(1));
        let mut second = places.admit(ip(1));
        let mut other = places.admit(ip(2));
        let third = places.admit(ip(1));
        assert_eq!(third.evicted(), 1);
        assert!(taken(&mut first));
        assert!(!taken(&mut second));
        assert!(!taken(&mut other));
        assert_eq!(places.open(), 3);
        // Taken stays taken.
        assert!(taken(&mut first));
        drop(first);
        assert_eq!(places.open(), 3);
    }

    #[test]
    fn strangers_holding_every_place_from_many_addresses_make_room_for_a_newcomer() {
        // 16 addresses with 32 each fill 512 places.
        let places = Places::new(32, 512);
        let mut strangers: Vec<Place> = (0..32)
            .flat_map(|_| (1..=16).map(ip))
            .map(|source| places.admit(source))
            .collect();
        assert!(strangers.iter().all(|p| p.evicted() == 0));
        assert_eq!(places.open(), 512);
        // A sidecar from its own address gets in; one stranger's oldest (10.0.0.1's) goes.
        let mut sidecar = places.admit(ip(100));
        assert_eq!(sidecar.evicted(), 1);
        assert!(taken(&mut strangers[0]));
        assert_eq!(strangers.iter_mut().map(taken).filter(|t| *t).count(), 1);
        // A stranger coming back from that address (31 now) finds no source holding more than
        // it would: the oldest connection of all goes (10.0.0.2's first), not the sidecar's.
        let back = places.admit(ip(1));
        assert_eq!(back.evicted(), 1);
        assert!(!taken(&mut sidecar));
        assert!(taken(&mut strangers[1]), "10.0.0.2's oldest");
        assert_eq!(places.open(), 512);
    }

    #[test]
    fn among_equal_sources_the_oldest_goes() {
        let places = Places::new(4, 3);
        let mut a = places.admit(ip(1));
        let mut b = places.admit(ip(2));
        let mut c = places.admit(ip(3));
        let d = places.admit(ip(4));
        assert_eq!(d.evicted(), 1);
        assert!(taken(&mut a));
        assert!(!taken(&mut b) && !taken(&mut c));
        assert_eq!(places.open(), 3);
    }

    #[test]
    fn a_place_given_up_is_free_again() {
        let places = Places::new(1, 1);
        drop(places.admit(ip(1)));
        assert_eq!(places.open(), 0);
        let mut kept = places.admit(ip(2));
        assert_eq!(kept.evicted(), 0);
        assert!(!taken(&mut kept));
    }

    #[tokio::test]
    async fn a_taken_place_wakes_its_connection() {
        let places = Places::new(1, 10);
        let mut first = places.admit(ip(1));
        let waiting = tokio::spawn(async move { poll_fn(|cx| first.poll_evicted(cx)).await });
        tokio::task::yield_now().await;
        let _second = places.admit(ip(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the first connection learns its place was taken")
            .expect("the task ran");
    }
}
