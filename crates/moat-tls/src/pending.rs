//! TLS handshakes a listener has accepted but not finished, bounded per source address and
//! overall, with a deadline (decision 27). Both moat listeners that strangers can reach use it:
//! the control plane's gRPC port and a sidecar's inbound.
//!
//! A connection is admitted without waiting for a slot: one that finds its source at the limit
//! evicts the oldest handshake still pending from that source; one that finds the listener at
//! its limit evicts the oldest of the source holding the most, or, when every source holds one,
//! the oldest whose client never said hello. Strangers holding connections idle therefore lose
//! them to callers that complete a handshake at once, instead of keeping those callers out.
//! When every pending handshake is a caller at work from its own address (a reconnection
//! storm), the newcomer is turned away ([`Handshakes::admit`] gives `None`) rather than push out
//! a handshake half done.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

/// How many handshakes one listener lets wait, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes pending at once from one source address.
    pub per_source: usize,
    /// Handshakes pending at once, in all.
    pub total: usize,
    /// How long a client may take to complete its handshake.
    pub deadline: Duration,
}

/// The handshakes pending at one listener.
#[derive(Debug)]
pub struct Handshakes {
    limits: Limits,
    pending: Mutex<Pending>,
}

/// One admitted connection's place among the pending handshakes; it gives the place up when
/// dropped, and learns through `cancelled` when a newer connection evicted it.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Handshakes>,
    id: u64,
    source: IpAddr,
    evicted: u64,
    cancelled: oneshot::Receiver<()>,
}

/// How an admitted handshake ended.
#[derive(Debug)]
pub enum Outcome {
    /// Complete: the client's certificate (if any) is verified by the server config.
    Done(Box<TlsStream<TcpStream>>),
    /// The client or the TLS layer failed the handshake.
    Failed(std::io::Error),
    /// The client did not finish within [`Limits::deadline`].
    TimedOut,
    /// Closed to make room for a newer connection.
    Evicted,
}

impl Handshakes {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Handshakes {
            limits,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Registers a connection from `source`, evicting older ones as the module says; `None`
    /// when the listener is full of callers at work and the connection should be closed now.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let (cancel, cancelled) = oneshot::channel();
        match self.lock().admit(&self.limits, source, cancel) {
            Admitted::Yes { id, evicted } => Some(Slot {
                owner: self.clone(),
                id,
                source,
                evicted,
                cancelled,
            }),
            Admitted::Busy => None,
        }
    }

    /// Handshakes pending now.
    pub fn pending(&self) -> usize {
        self.lock().by_age.len()
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent maps.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Slot {
    /// Older handshakes this admission closed.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Runs the server side of the handshake on `tcp` with `config`, until it completes, fails,
    /// runs out of time, or is evicted; the slot is given up either way.
    pub async fn handshake(mut self, tcp: TcpStream, config: Arc<ServerConfig>) -> Outcome {
        let owner = self.owner.clone();
        let id = self.id;
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
            owner.lock().said_hello(id);
            start.into_stream(config).await
        };
        tokio::select! {
            r = tokio::time::timeout(self.owner.limits.deadline, handshake) => match r {
                Ok(Ok(stream)) => Outcome::Done(Box::new(stream)),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::TimedOut,
            },
            _ = &mut self.cancelled => Outcome::Evicted,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.lock().remove(self.id, self.source);
    }
}

/// Handshakes in progress: oldest first, and per source. Dropping an entry's sender cancels
/// that handshake.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    by_age: BTreeMap<u64, Handshake>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

#[derive(Debug)]
struct Handshake {
    source: IpAddr,
    /// Dropped to cancel the handshake.
    _cancel: oneshot::Sender<()>,
    /// The client's hello arrived: a caller at work, not a connection held idle.
    hello: bool,
}

/// What [`Pending::admit`] did with a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    /// Registered as `id`, after evicting `evicted` older handshakes.
    Yes { id: u64, evicted: u64 },
    /// The listener is full of callers that each said hello from their own address: the
    /// newcomer waits its turn (it is closed and tries again) rather than push out one of them.
    Busy,
}

impl Pending {
    /// Registers a handshake from `source`, evicting the oldest pending one of that source when
    /// it is at its limit. At the listener's limit the source holding the most pending
    /// handshakes loses its oldest (a caller with one handshake in flight is never the one to go
    /// while a stranger holds many); when every source holds one, the oldest handshake whose
    /// hello never came goes; when all of them are at work, the newcomer is refused.
    fn admit(&mut self, limits: &Limits, source: IpAddr, cancel: oneshot::Sender<()>) -> Admitted {
        let mut evicted = 0;
        if self
            .by_source
            .get(&source)
            .is_some_and(|q| q.len() >= limits.per_source)
            && let Some(oldest) = self.by_source.get(&source).and_then(|q| q.front().copied())
        {
            self.remove(oldest, source);
            evicted += 1;
        }
        if self.by_age.len() >= limits.total {
            let busiest = self
                .by_source
                .iter()
                .max_by_key(|(_, q)| q.len())
                .filter(|(_, q)| q.len() > 1)
                .and_then(|(ip, q)| Some((*ip, *q.front()?)));
            let silent = || {
                self.by_age
                    .iter()
                    .find(|(_, h)| !h.hello)
                    .map(|(id, h)| (h.source, *id))
            };
            match busiest.or_else(silent) {
                Some((ip, oldest)) => {
                    self.remove(oldest, ip);
                    evicted += 1;
                }
                None => return Admitted::Busy,
            }
        }
        let id = self.next;
        self.next += 1;
        self.by_age.insert(
            id,
            Handshake {
                source,
                _cancel: cancel,
                hello: false,
            },
        );
        self.by_source.entry(source).or_default().push_back(id);
        Admitted::Yes { id, evicted }
    }

    /// Notes that handshake `id`'s hello arrived.
    fn said_hello(&mut self, id: u64) {
        if let Some(h) = self.by_age.get_mut(&id) {
            h.hello = true;
        }
    }

    /// Forgets handshake `id` (done, failed or evicted); a no-op when already gone.
    fn remove(&mut self, id: u64, source: IpAddr) {
        self.by_age.remove(&id);
        if let Some(q) = self.by_source.get_mut(&source) {
            q.retain(|&x| x != id);
            if q.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_source: 64,
        total: 1024,
        deadline: Duration::from_secs(5),
    };

    fn admit(p: &mut Pending, ip: IpAddr) -> (u64, u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        match p.admit(&LIMITS, ip, tx) {
            Admitted::Yes { id, evicted } => (id, evicted, rx),
            Admitted::Busy => panic!("{ip} refused"),
        }
    }

    #[test]
    fn the_oldest_pending_handshake_of_a_full_source_makes_room() {
        let mut p = Pending::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let mut cancels = Vec::new();
        for _ in 0..LIMITS.per_source {
            let (_, evicted, rx) = admit(&mut p, a);
            assert_eq!(evicted, 0);
            cancels.push(rx);
        }
        let (_, evicted, _rx) = admit(&mut p, a);
        assert_eq!(evicted, 1);
        // The first one was told to stop (its sender is gone); the others were not.
        assert!(cancels[0].try_recv().is_err());
        assert!(matches!(
            cancels[1].try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert_eq!(p.by_source[&a].len(), LIMITS.per_source);
        // Another source is not affected.
        assert_eq!(admit(&mut p, b).1, 0);
        let (id, _, _rx) = admit(&mut p, b);
        p.remove(id, b);
        p.remove(id, b);
        assert_eq!(p.by_source[&b].len(), 1);
        assert_eq!(p.by_age.len(), LIMITS.per_source + 1);
    }

    #[test]
    fn at_the_listeners_limit_the_busiest_source_gives_way() {
        let mut p = Pending::default();
        let caller: IpAddr = [10, 9, 9, 9].into();
        let (_, _, mut caller_rx) = admit(&mut p, caller);
        let mut keep = Vec::new();
        for i in 0..LIMITS.total * 2 {
            let ip: IpAddr = [10, 2, 0, (i % 20) as u8].into();
            keep.push(admit(&mut p, ip).2);
        }
        assert_eq!(p.by_age.len(), LIMITS.total);
        assert!(matches!(
            caller_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert_eq!(p.by_source[&caller].len(), 1);
    }

    #[test]
    fn the_listener_as_a_whole_is_bounded() {
        let mut p = Pending::default();
        let mut keep = Vec::new();
        for i in 0..LIMITS.total + 10 {
            let ip: IpAddr = [10, 1, (i / 256) as u8, (i % 256) as u8].into();
            keep.push(admit(&mut p, ip).2);
        }
        assert_eq!(p.by_age.len(), LIMITS.total);
        assert_eq!(
            p.by_source.values().map(VecDeque::len).sum::<usize>(),
            LIMITS.total
        );
    }

    /// A reconnection storm: one handshake per address, each past its hello. A silent
    /// connection goes first; then newcomers wait their turn instead of pushing out callers
    /// whose handshakes are under way.
    #[test]
    fn a_full_listener_of_callers_at_work_turns_newcomers_away() {
        let mut p = Pending::default();
        let ip = |i: usize| -> IpAddr { [10, 3, (i / 256) as u8, (i % 256) as u8].into() };
        let mut keep = Vec::new();
        let (silent, _, mut silent_rx) = admit(&mut p, ip(0));
        for i in 1..LIMITS.total {
            let (id, evicted, rx) = admit(&mut p, ip(i));
            assert_eq!(evicted, 0);
            p.said_hello(id);
            keep.push(rx);
        }
        let (id, evicted, _rx) = admit(&mut p, ip(LIMITS.total));
        assert_eq!(evicted, 1);
        assert!(!p.by_age.contains_key(&silent));
        assert!(
            silent_rx.try_recv().is_err(),
            "the silent one was told to stop"
        );
        p.said_hello(id);
        let (tx, _rx) = oneshot::channel();
        assert_eq!(p.admit(&LIMITS, ip(LIMITS.total + 1), tx), Admitted::Busy);
        assert_eq!(p.by_age.len(), LIMITS.total);
        for rx in &mut keep {
            assert!(matches!(
                rx.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ));
        }
    }
}
