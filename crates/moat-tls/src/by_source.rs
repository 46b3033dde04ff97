//! Entries kept in the order they came and per source address: what the bounds that make room
//! by age look through. The pending handshakes of a listener ([`crate::pending`]) and the
//! control plane's connections without a client certificate keep theirs in one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;

/// Entries by age (ids grow with each one added) and by source address. An entry removed by id
/// leaves both; a source with no entry left keeps none.
#[derive(Debug)]
pub struct BySource<V> {
    next: u64,
    by_age: BTreeMap<u64, (IpAddr, V)>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl<V> Default for BySource<V> {
    fn default() -> Self {
        BySource {
            next: 0,
            by_age: BTreeMap::new(),
            by_source: HashMap::new(),
        }
    }
}

impl<V> BySource<V> {
    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.by_age.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.by_age.is_empty()
    }

    /// Adds `value` from `source`; returns its id, greater than every id given before.
    pub fn push(&mut self, source: IpAddr, value: V) -> u64 {
        let id = self.next;
        self.next += 1;
        self.by_age.insert(id, (source, value));
        self.by_source.entry(source).or_default().push_back(id);
        id
    }

    /// Removes entry `id`, returning its value; `None` when it is already gone.
    pub fn remove(&mut self, id: u64) -> Option<V> {
        let (source, value) = self.by_age.remove(&id)?;
        if let Some(q) = self.by_source.get_mut(&source) {
            // Entries mostly end in the order they came.
            if q.front() == Some(&id) {
                q.pop_front();
            } else {
                q.retain(|&x| x != id);
            }
            if q.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(value)
    }

    /// Entry `id`'s value.
    pub fn get(&self, id: u64) -> Option<&V> {
        self.by_age.get(&id).map(|(_, v)| v)
    }

    /// Entry `id`'s value, to change.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut V> {
        self.by_age.get_mut(&id).map(|(_, v)| v)
    }

    /// The ids of `source`'s entries, oldest first (none when it has none).
    pub fn of(&self, source: &IpAddr) -> impl Iterator<Item = u64> + '_ {
        self.by_source.get(source).into_iter().flatten().copied()
    }

    /// How many entries `source` has.
    pub fn count(&self, source: &IpAddr) -> usize {
        self.by_source.get(source).map_or(0, VecDeque::len)
    }

    /// Every entry, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.by_age.iter().map(|(id, (_, v))| (*id, v))
    }

    /// Each source's ids, oldest first.
    pub fn sources(&self) -> impl Iterator<Item = &VecDeque<u64>> {
        self.by_source.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_both_orders_and_an_empty_source_is_forgotten() {
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let mut e = BySource::default();
        let first = e.push(a, "a1");
        let second = e.push(b, "b1");
        let third = e.push(a, "a2");
        assert!(first < second && second < third);
        assert_eq!(e.of(&a).collect::<Vec<_>>(), [first, third]);
        assert_eq!(
            e.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            ["a1", "b1", "a2"]
        );
        // Out of order, and twice.
        assert_eq!(e.remove(third), Some("a2"));
        assert_eq!(e.remove(third), None);
        assert_eq!((e.count(&a), e.len()), (1, 2));
        assert_eq!(e.remove(second), Some("b1"));
        assert_eq!(e.count(&b), 0);
        assert_eq!(e.sources().count(), 1);
        if let Some(v) = e.get_mut(first) {
            *v = "changed";
        }
        assert_eq!(e.get(first), Some(&"changed"));
        assert_eq!(e.remove(first), Some("changed"));
        assert!(e.is_empty() && e.sources().next().is_none());
    }
}
