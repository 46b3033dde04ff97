//! The endpoints of proxies whose control-plane replica died, kept in the service table while
//! those proxies reconnect to the survivors.
//!
//! A replica's death does not stop its sidecars, only their stream: they reconnect within
//! seconds and their endpoints come back. Dropping the endpoints when the dead replica's lease
//! ends and adding them back one reconnection at a time would make every reconnection a change
//! of every proxy's table, which under a storm of thousands is most of the survivors' work. So
//! the endpoints stay while the storm makes progress: until none has come back for [`QUIET`], or
//! at the latest [`PATIENCE`] after the death. An endpoint whose proxy really went away with the
//! replica is then at worst tried and skipped by the sidecars that dial it (their pools mark it
//! failed and move to the next endpoint).

use std::time::{Duration, Instant};

use moat_identity::SpiffeId;

/// How long the orphans of a death are kept without any of them coming back.
pub const QUIET: Duration = Duration::from_secs(30);
/// The longest an orphan is kept, however slowly the others come back.
pub const PATIENCE: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Orphan {
    id: SpiffeId,
    address: String,
    /// When its [`PATIENCE`] ends.
    until: Instant,
}

/// The orphaned endpoints still awaited.
#[derive(Debug, Default)]
pub struct Orphans {
    awaited: Vec<Orphan>,
    /// When the orphans are given up unless one comes back before.
    quiet_until: Option<Instant>,
}

impl Orphans {
    /// A proxy serving `id` at `address` lost its replica at `now`.
    pub fn died(&mut self, id: SpiffeId, address: String, now: Instant) {
        self.awaited.push(Orphan {
            id,
            address,
            until: now + PATIENCE,
        });
        self.quiet_until = self.quiet_until.max(Some(now + QUIET));
    }

    /// Drops the orphans that a connected proxy serves again (`served`): each of those is
    /// progress, which gives the rest [`QUIET`] more. Then drops all of them if none came back
    /// for [`QUIET`], and those whose [`PATIENCE`] ended. Returns how many were given up.
    pub fn settle(&mut self, now: Instant, served: impl Fn(&SpiffeId, &str) -> bool) -> usize {
        let before = self.awaited.len();
        self.awaited.retain(|o| !served(&o.id, &o.address));
        if self.awaited.len() < before {
            self.quiet_until = Some(now + QUIET);
        }
        let back = before - self.awaited.len();
        if self.quiet_until.is_some_and(|q| q <= now) {
            self.awaited.clear();
        }
        self.awaited.retain(|o| o.until > now);
        if self.awaited.is_empty() {
            self.quiet_until = None;
        }
        before - back - self.awaited.len()
    }

    /// The endpoints still awaited.
    pub fn endpoints(&self) -> Vec<(SpiffeId, String)> {
        self.awaited
            .iter()
            .map(|o| (o.id.clone(), o.address.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.awaited.len()
    }

    pub fn is_empty(&self) -> bool {
        self.awaited.is_empty()
    }

    /// When [`Orphans::settle`] may next give some up.
    pub fn next_deadline(&self) -> Option<Instant> {
        let patience = self.awaited.iter().map(|o| o.until).min();
        match (self.quiet_until, patience) {
            (Some(q), Some(p)) => Some(q.min(p)),
            (q, p) => q.or(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn id(n: usize) -> SpiffeId {
        format!("spiffe://moat.local/ns/default/sa/s{n}")
            .parse()
            .unwrap()
    }

    fn addr(n: usize) -> String {
        format!("10.0.0.{n}:15006")
    }

    /// `n` orphans died at `at`.
    fn orphans(n: usize, at: Instant) -> Orphans {
        let mut o = Orphans::default();
        for i in 0..n {
            o.died(id(i), addr(i), at);
        }
        o
    }

    fn served(back: &HashSet<usize>) -> impl Fn(&SpiffeId, &str) -> bool + '_ {
        move |who, at| back.iter().any(|&i| *who == id(i) && at == addr(i))
    }

    #[test]
    fn orphans_stay_while_their_proxies_keep_coming_back() {
        let t0 = Instant::now();
        let mut o = orphans(21, t0);
        let mut back = HashSet::new();
        // One comes back every 14 s: never QUIET without progress, so the rest stay...
        for i in 0..20 {
            back.insert(i);
            let now = t0 + Duration::from_secs(14 * (i as u64 + 1));
            assert_eq!(o.settle(now, served(&back)), 0, "at {i}");
            assert_eq!(o.len(), 20 - i);
            assert_eq!(o.endpoints()[0].1, addr(i + 1));
        }
        // ...until PATIENCE after the death, whatever the progress.
        assert_eq!(o.next_deadline(), Some(t0 + PATIENCE));
        assert_eq!(o.settle(t0 + PATIENCE, served(&back)), 1);
        assert!(o.is_empty());
        assert_eq!(o.next_deadline(), None);
    }

    #[test]
    fn orphans_are_given_up_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut o = orphans(3, t0);
        assert_eq!(o.next_deadline(), Some(t0 + QUIET));
        let none = HashSet::new();
        assert_eq!(
            o.settle(t0 + QUIET - Duration::from_secs(1), served(&none)),
            0
        );
        assert_eq!(o.len(), 3);
        let back = HashSet::from([0]);
        let now = t0 + Duration::from_secs(29);
        assert_eq!(o.settle(now, served(&back)), 0);
        assert_eq!(o.len(), 2);
        assert_eq!(o.next_deadline(), Some(now + QUIET));
        assert_eq!(o.settle(now + QUIET, served(&back)), 2);
        assert!(o.is_empty());
    }

    #[test]
    fn a_second_death_extends_the_quiet_spell_but_not_the_first_ones_patience() {
        let t0 = Instant::now();
        let mut o = orphans(2, t0);
        let t1 = t0 + Duration::from_secs(20);
        o.died(id(5), addr(5), t1);
        assert_eq!(o.next_deadline(), Some(t1 + QUIET));
        // The second death's orphans wait their own QUIET: the first ones are not dropped at
        // t0 + QUIET.
        let none = HashSet::new();
        assert_eq!(o.settle(t0 + QUIET, served(&none)), 0);
        assert_eq!(o.settle(t1 + QUIET, served(&none)), 3);
    }
}
