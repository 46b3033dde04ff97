//! TLS handshakes a listener has accepted but not finished, bounded per source address and
//! overall, with a deadline (decision 27). Both moat listeners that strangers can reach use it:
//! the control plane's gRPC port and a sidecar's inbound.
//!
//! A connection is admitted without waiting for a slot: one that finds its source at the limit
//! evicts the oldest handshake pending from that source whose client is not at work (no hello,
//! or one older than [`Limits::at_work`]), else the oldest; one that finds the listener at its
//! limit evicts the oldest not at work of the source holding the most, else the oldest not at
//! work anywhere, else the busiest source's oldest. Strangers holding connections idle therefore lose
//! them to callers that complete a handshake at once, instead of keeping those callers out.
//! When every pending handshake is a caller at work from its own address (a reconnection
//! storm), the newcomer is turned away ([`Handshakes::admit`] gives `None`) rather than push out
//! a handshake half done.
//!
//! The bounds are only worth something below the process's limit on open files:
//! [`raise_open_file_limit`] raises it as far as the system lets, and [`Limits::within`] keeps
//! a listener's bounds to half of what it allows.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::by_source::BySource;

/// How many handshakes one listener lets wait, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes pending at once from one source address.
    pub per_source: usize,
    /// Handshakes pending at once, in all.
    pub total: usize,
    /// How long a client may take to complete its handshake.
    pub deadline: Duration,
    /// How long after its hello a client counts as a caller at work, not to be evicted while
    /// a stranger's connection could go instead. A hello costs nothing to send, so this is
    /// the time an honest client needs for its next flight, not the whole deadline.
    pub at_work: Duration,
}

impl Limits {
    /// These limits, with the listener's total held to half of `open_files` (the process's
    /// limit on open files) and a source's to that total: a bound the process cannot reach
    /// before it runs out of files keeps nobody out.
    pub fn within(self, open_files: u64) -> Limits {
        let half = usize::try_from(open_files / 2).unwrap_or(usize::MAX).max(1);
        let total = self.total.min(half).max(1);
        Limits {
            total,
            per_source: self.per_source.min(total),
            ..self
        }
    }

    /// Logs, at start-up, the process's limit on open files and what these limits let wait
    /// under it: the line an operator looks for when strangers' connections are evicted.
    pub fn log(&self, open_files: u64) {
        tracing::info!(
            open_files,
            pending_handshakes = self.total,
            pending_per_source = self.per_source,
            "open-file limit"
        );
    }
}

/// Raises the soft limit on open files toward the hard one, up to 1,048,576 (a process starts
/// at the soft one, often 1,024), and returns the limit now in force: the soft limit as it was
/// when it cannot be raised, 1,024 when the system does not say.
pub fn raise_open_file_limit() -> u64 {
    rlimit::increase_nofile_limit(1 << 20).unwrap_or_else(|e| {
        let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
        tracing::warn!(error = %e, ?soft, "could not raise the open-file limit");
        soft.unwrap_or(1024)
    })
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
    evicted: u64,
    cancelled: oneshot::Receiver<()>,
}

/// How an admitted handshake ended.
#[derive(Debug)]
pub enum Outcome<IO> {
    /// Complete: the client's certificate (if any) is verified by the server config.
    Done(Box<TlsStream<IO>>),
    /// The client or the TLS layer failed the handshake.
    Failed(std::io::Error),
    /// The client did not finish within [`Limits::deadline`].
    TimedOut,
    /// Closed to make room for a newer connection.
    Evicted,
}

impl Handshakes {
    /// A listener's pending handshakes, none yet, bounded by `limits`.
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
        let source = source_of(source);
        let admitted = self
            .lock()
            .admit(&self.limits, source, cancel, Instant::now());
        match admitted {
            Admitted::Yes { id, evicted } => Some(Slot {
                owner: self.clone(),
                id,
                evicted,
                cancelled,
            }),
            Admitted::Busy => None,
        }
    }

    /// The limits this listener was given.
    pub fn limits(&self) -> Limits {
        self.limits
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
    pub async fn handshake<IO>(mut self, io: IO, config: Arc<ServerConfig>) -> Outcome<IO>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let owner = self.owner.clone();
        let id = self.id;
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
            owner.lock().said_hello(id, Instant::now());
            start.into_stream(config).await
        };
        tokio::select! {
            // A handshake that completes as it is evicted is kept.
            biased;
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
        self.owner.lock().remove(self.id);
    }
}

/// Handshakes in progress: oldest first, and per source. Dropping an entry's sender cancels
/// that handshake.
#[derive(Debug, Default)]
struct Pending(BySource<Handshake>);

#[derive(Debug)]
struct Handshake {
    /// Dropped to cancel the handshake.
    _cancel: oneshot::Sender<()>,
    /// When the client's hello arrived: a caller at work for a while, not a connection held
    /// idle.
    hello: Option<Instant>,
}

impl Handshake {
    /// Whether the client sent its hello less than `at_work` before `now`.
    fn at_work(&self, at_work: Duration, now: Instant) -> bool {
        self.hello
            .is_some_and(|t| now.saturating_duration_since(t) < at_work)
    }
}

/// Where a connection comes from, as the bounds count it: its address, an IPv4-mapped IPv6
/// one as IPv4. Not an IPv6 /64: every pod on a node commonly shares one, and its calling
/// sidecars would then share one bound; a stranger with many addresses still meets the
/// overall bound, where its idle connections are the first to go.
fn source_of(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
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
    /// Registers a handshake from `source`, evicting one pending from that source when it is at
    /// its limit: the oldest not at work, else the oldest. At the listener's limit the source
    /// holding the most pending handshakes loses its oldest (a caller with one handshake in
    /// flight is never the one to go while a stranger holds many); when every source holds
    /// one, the oldest handshake not at work goes; when all of them are at work, the newcomer
    /// is refused.
    fn admit(
        &mut self,
        limits: &Limits,
        source: IpAddr,
        cancel: oneshot::Sender<()>,
        now: Instant,
    ) -> Admitted {
        let mut evicted = 0;
        let idle = |h: &Handshake| !h.at_work(limits.at_work, now);
        let handshakes = &mut self.0;
        if handshakes.count(&source) >= limits.per_source {
            let oldest = oldest_of(handshakes, handshakes.of(&source), idle)
                .or_else(|| handshakes.of(&source).next());
            if let Some(oldest) = oldest {
                handshakes.remove(oldest);
                evicted += 1;
            }
        }
        if handshakes.len() >= limits.total {
            // The source holding the most (when it holds more than one) gives up a handshake
            // not at work, else anyone's oldest not at work goes, else the busiest source's
            // oldest: a caller at work keeps its handshake while a stranger's idle one is left.
            let busiest = handshakes
                .sources()
                .max_by_key(|q| q.len())
                .filter(|q| q.len() > 1);
            let victim = busiest
                .and_then(|q| oldest_of(handshakes, q.iter().copied(), idle))
                .or_else(|| handshakes.iter().find(|(_, h)| idle(h)).map(|(id, _)| id))
                .or_else(|| busiest.and_then(|q| q.front().copied()));
            match victim {
                Some(id) => {
                    handshakes.remove(id);
                    evicted += 1;
                }
                None => return Admitted::Busy,
            }
        }
        let id = handshakes.push(
            source,
            Handshake {
                _cancel: cancel,
                hello: None,
            },
        );
        Admitted::Yes { id, evicted }
    }

    /// Notes that handshake `id`'s hello arrived at `now`.
    fn said_hello(&mut self, id: u64, now: Instant) {
        if let Some(h) = self.0.get_mut(id) {
            h.hello = Some(now);
        }
    }

    /// Forgets handshake `id` (done, failed or evicted); a no-op when already gone.
    fn remove(&mut self, id: u64) {
        self.0.remove(id);
    }
}

/// The oldest of `ids` whose handshake is `idle`.
fn oldest_of(
    handshakes: &BySource<Handshake>,
    mut ids: impl Iterator<Item = u64>,
    idle: impl Fn(&Handshake) -> bool,
) -> Option<u64> {
    ids.find(|&id| handshakes.get(id).is_some_and(&idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_source: 64,
        total: 1024,
        deadline: Duration::from_secs(5),
        at_work: Duration::from_secs(1),
    };

    fn admit_at(p: &mut Pending, ip: IpAddr, now: Instant) -> (u64, u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        match p.admit(&LIMITS, ip, tx, now) {
            Admitted::Yes { id, evicted } => (id, evicted, rx),
            Admitted::Busy => panic!("{ip} refused"),
        }
    }

    fn admit(p: &mut Pending, ip: IpAddr) -> (u64, u64, oneshot::Receiver<()>) {
        admit_at(p, ip, Instant::now())
    }

    /// Whether the handshake behind `rx` was told to stop (its entry, and sender, are gone).
    fn stopped(rx: &mut oneshot::Receiver<()>) -> bool {
        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed))
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
        assert!(stopped(&mut cancels[0]));
        assert!(!stopped(&mut cancels[1]));
        assert_eq!(p.0.count(&a), LIMITS.per_source);
        // Another source is not affected.
        assert_eq!(admit(&mut p, b).1, 0);
        let (id, _, _rx) = admit(&mut p, b);
        p.remove(id);
        p.remove(id);
        assert_eq!(p.0.count(&b), 1);
        assert_eq!(p.0.len(), LIMITS.per_source + 1);
    }

    /// A stranger sharing a caller's address: at the source's limit its silent connection goes,
    /// not the caller's older handshake under way; once the caller's hello is older than
    /// `at_work`, it is fair game again.
    #[test]
    fn a_full_source_loses_a_silent_handshake_before_one_at_work() {
        let mut p = Pending::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let now = Instant::now();
        let (caller, _, mut caller_rx) = admit_at(&mut p, a, now);
        p.said_hello(caller, now);
        let mut keep = Vec::new();
        for _ in 1..LIMITS.per_source {
            keep.push(admit_at(&mut p, a, now));
        }
        let (_, evicted, _rx) = admit_at(&mut p, a, now);
        assert_eq!(evicted, 1);
        assert!(p.0.get(caller).is_some(), "the caller at work went");
        assert!(!stopped(&mut caller_rx));
        assert!(stopped(&mut keep[0].2), "the oldest silent one went");
        assert!(!stopped(&mut keep[1].2));

        // Every other one says hello now; the caller's hello is stale a while later.
        for (id, _, _) in &keep[1..] {
            p.said_hello(*id, now + LIMITS.at_work);
        }
        let later = now + LIMITS.at_work + Duration::from_millis(1);
        let (_, evicted, _rx) = admit_at(&mut p, a, later);
        assert_eq!(evicted, 1);
        assert!(p.0.get(caller).is_none(), "a stale hello is not at work");
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
        assert_eq!(p.0.len(), LIMITS.total);
        assert!(!stopped(&mut caller_rx));
        assert_eq!(p.0.count(&caller), 1);
    }

    /// Strangers spread over many addresses, one silent connection each, and one caller with
    /// several handshakes at work: at the listener's limit the strangers' connections go, not
    /// the caller's, though the caller's address holds the most.
    #[test]
    fn at_the_listeners_limit_idle_connections_go_before_a_caller_at_work() {
        let mut p = Pending::default();
        let now = Instant::now();
        let caller: IpAddr = [10, 9, 9, 9].into();
        let mut at_work = Vec::new();
        for _ in 0..20 {
            let (id, _, rx) = admit_at(&mut p, caller, now);
            p.said_hello(id, now);
            at_work.push(rx);
        }
        let mut strangers = Vec::new();
        for i in 0..LIMITS.total * 2 {
            let ip: IpAddr = [10, 4, (i / 256) as u8, (i % 256) as u8].into();
            strangers.push(admit_at(&mut p, ip, now).2);
        }
        assert_eq!(p.0.len(), LIMITS.total);
        assert!(at_work.iter_mut().all(|rx| !stopped(rx)));
        assert_eq!(p.0.count(&caller), 20);
    }

    #[test]
    fn the_listener_as_a_whole_is_bounded() {
        let mut p = Pending::default();
        let mut keep = Vec::new();
        for i in 0..LIMITS.total + 10 {
            let ip: IpAddr = [10, 1, (i / 256) as u8, (i % 256) as u8].into();
            keep.push(admit(&mut p, ip).2);
        }
        assert_eq!(p.0.len(), LIMITS.total);
        assert_eq!(
            p.0.sources()
                .map(std::collections::VecDeque::len)
                .sum::<usize>(),
            LIMITS.total
        );
    }

    /// A reconnection storm: one handshake per address, each past its hello. A silent
    /// connection goes first; then newcomers wait their turn instead of pushing out callers
    /// whose handshakes are under way, until those hellos are older than `at_work` (a hello
    /// from many addresses, then nothing, is what a stranger can afford).
    #[test]
    fn a_full_listener_of_callers_at_work_turns_newcomers_away() {
        let mut p = Pending::default();
        let ip = |i: usize| -> IpAddr { [10, 3, (i / 256) as u8, (i % 256) as u8].into() };
        let now = Instant::now();
        let mut keep = Vec::new();
        let (silent, _, mut silent_rx) = admit_at(&mut p, ip(0), now);
        for i in 1..LIMITS.total {
            let (id, evicted, rx) = admit_at(&mut p, ip(i), now);
            assert_eq!(evicted, 0);
            p.said_hello(id, now);
            keep.push(rx);
        }
        let (id, evicted, _rx) = admit_at(&mut p, ip(LIMITS.total), now);
        assert_eq!(evicted, 1);
        assert!(p.0.get(silent).is_none());
        assert!(stopped(&mut silent_rx), "the silent one was told to stop");
        p.said_hello(id, now);
        let (tx, _rx) = oneshot::channel();
        assert_eq!(
            p.admit(&LIMITS, ip(LIMITS.total + 1), tx, now),
            Admitted::Busy
        );
        assert_eq!(p.0.len(), LIMITS.total);
        assert!(keep.iter_mut().all(|rx| !stopped(rx)));
        let stale = now + LIMITS.at_work;
        let (_, evicted, _rx) = admit_at(&mut p, ip(LIMITS.total + 1), stale);
        assert_eq!(evicted, 1);
        assert!(stopped(&mut keep[0]), "the oldest stale hello went");
        assert!(!stopped(&mut keep[1]));
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_the_ipv4_one() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(source_of(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(source_of(ip("10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(source_of(ip("2001:db8::1")), ip("2001:db8::1"));
    }

    #[test]
    fn the_bounds_stay_below_the_open_file_limit() {
        assert_eq!(LIMITS.within(1 << 20), LIMITS);
        let tight = LIMITS.within(1024);
        assert_eq!((tight.total, tight.per_source), (512, 64));
        let tighter = LIMITS.within(100);
        assert_eq!((tighter.total, tighter.per_source), (50, 50));
        assert_eq!(LIMITS.within(0).total, 1);
    }

    fn server_config() -> Arc<ServerConfig> {
        Arc::new(
            ServerConfig::builder_with_provider(crate::provider::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new())),
        )
    }

    /// A slot gives its place back however its handshake ends, and an evicted one ends at once.
    #[tokio::test]
    async fn a_slot_is_released_on_every_ending() {
        let limits = Limits {
            per_source: 1,
            ..LIMITS
        };
        let listener = Handshakes::new(limits);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let first = listener.admit(ip).unwrap();
        let (_client, server) = tokio::io::duplex(64);
        let waiting = tokio::spawn(first.handshake(server, server_config()));
        tokio::task::yield_now().await;
        let second = listener.admit(ip).unwrap();
        assert_eq!(second.evicted(), 1);
        assert!(matches!(waiting.await.unwrap(), Outcome::Evicted));
        assert_eq!(listener.lock().0.len(), 1);

        // Not TLS: failed, and the place is free again.
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(
            second.handshake(server, server_config()).await,
            Outcome::Failed(_)
        ));
        assert!(listener.lock().0.is_empty());
        assert!(listener.lock().0.sources().next().is_none());

        // Dropped without running: released too.
        drop(listener.admit(ip).unwrap());
        assert!(listener.lock().0.is_empty());
    }
}
