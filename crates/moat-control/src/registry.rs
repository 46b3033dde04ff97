//! The live registry of connected proxies, built from what each proxy announces on its Mesh
//! stream, and the outbound service table derived from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use moat_identity::SpiffeId;

/// One connected proxy.
#[derive(Clone, Debug)]
pub struct ProxyEntry {
    pub id: SpiffeId,
    pub inbound_address: String,
    pub proxy_version: String,
    pub cert_serial: String,
    pub cert_not_after: i64,
    /// SHA-256 of the intermediate that issued the proxy's certificate.
    pub cert_issuer: String,
    /// When the proxy is due to renew (Unix seconds).
    pub cert_refresh_after: i64,
    pub remote: String,
    pub connected_at: SystemTime,
    pub last_seen: SystemTime,
    /// The last snapshot version the proxy applied (0: none yet).
    pub applied_version: u64,
    /// The last NACK, if the newest snapshot was refused.
    pub last_error: Option<String>,
    /// The newest snapshot sent.
    pub sent: Option<SentSnapshot>,
    /// The (policy key, version) pairs of the newest snapshot the proxy acknowledged.
    pub applied_policies: Vec<(String, u64)>,
    /// The root fingerprints of the newest snapshot the proxy acknowledged.
    pub applied_bundle: Vec<String>,
    /// The proxy's latest cumulative authorization counters.
    pub hits: Vec<RuleHits>,
    /// What callers did while its allow-list only watched: each kind of call, its cumulative
    /// count, and when that count last grew (Unix seconds).
    pub observed: HashMap<ObservedKey, (u64, i64)>,
    /// Its inbound requests by caller.
    pub edges: Vec<EdgeReport>,
    /// The proxy said goodbye (it is shutting down on purpose).
    pub left: bool,
}

/// How long a proxy whose stream broke without a goodbye is reported as disconnected.
pub const DISCONNECTED_RETENTION: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// The most disconnected proxies remembered, of one identity and in all: a certificate that
/// opens and drops streams, announcing another port each time, would otherwise grow the list
/// (and `moat status`'s answer, past what the CLI reads) without end. The oldest go first.
pub const DISCONNECTED_PER_IDENTITY: usize = 256;
/// See [`DISCONNECTED_PER_IDENTITY`].
pub const DISCONNECTED_MAX: usize = 4096;

/// A proxy whose stream broke without a goodbye and that has not reconnected.
#[derive(Clone, Debug)]
pub struct Disconnected {
    pub id: SpiffeId,
    pub inbound_address: String,
    pub cert_serial: String,
    pub cert_not_after: i64,
    pub at: SystemTime,
}

/// What a sent snapshot held, to learn what the proxy applied when it acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentSnapshot {
    pub version: u64,
    /// (policy key, version) pairs.
    pub policies: Vec<(String, u64)>,
    /// Root fingerprints of the bundle.
    pub bundle: Vec<String>,
}

/// One caller's requests to a proxy's service, as the proxy reported them (cumulative).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeReport {
    pub peer: String,
    pub requests: u64,
    pub failures: u64,
    /// Refusals by reason code.
    pub denied: Vec<(String, u64)>,
    /// Latency counts per bucket (`moat_metrics::EDGE_LATENCY_BOUNDS_MS`, then the rest).
    pub buckets: Vec<u64>,
}

/// One edge (caller → service) summed over the service's proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeSum {
    pub report: EdgeReport,
    /// Proxies of the service that reported it.
    pub proxies: u32,
}

/// One kind of call a watching proxy admitted: caller, app port, method and canonical path
/// (both empty for opaque TCP).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObservedKey {
    pub peer: String,
    pub port: u16,
    pub method: String,
    pub path: String,
}

impl ProxyEntry {
    /// A proxy of `id` listening on `inbound_address`, connected from `remote` at `at`, with
    /// nothing known yet of its certificate and nothing applied, reported or observed.
    pub fn connected(
        id: SpiffeId,
        inbound_address: String,
        remote: String,
        at: SystemTime,
    ) -> ProxyEntry {
        ProxyEntry {
            id,
            inbound_address,
            proxy_version: String::new(),
            cert_serial: String::new(),
            cert_not_after: 0,
            cert_issuer: String::new(),
            cert_refresh_after: 0,
            remote,
            connected_at: at,
            last_seen: at,
            applied_version: 0,
            last_error: None,
            sent: None,
            applied_policies: Vec::new(),
            applied_bundle: Vec::new(),
            hits: Vec::new(),
            observed: HashMap::new(),
            edges: Vec::new(),
            left: false,
        }
    }

    /// Takes a report's cumulative call counts, noting `now` for each that grew.
    pub fn observe(&mut self, calls: Vec<(ObservedKey, u64)>, now: i64) {
        let mut next = HashMap::with_capacity(calls.len());
        for (key, count) in calls {
            let seen = match self.observed.get(&key) {
                Some((before, at)) if *before >= count => *at,
                _ => now,
            };
            next.insert(key, (count, seen));
        }
        self.observed = next;
    }
}

/// One authorization counter a proxy reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHits {
    pub policy: String,
    pub version: u64,
    /// The matching rule, or `None` when no rule matched.
    pub rule: Option<u32>,
    /// `allow`, `deny` or `would-deny`.
    pub decision: &'static str,
    pub count: u64,
}

/// Connected proxies by stream id.
#[derive(Debug, Default)]
pub struct Registry {
    proxies: HashMap<u64, ProxyEntry>,
    /// How many streams of `proxies` serve each endpoint.
    local: HashMap<(SpiffeId, String), usize>,
    /// How many streams of `proxies` each identity has from each source address.
    from_host: HashMap<(SpiffeId, IpAddr), usize>,
    /// Endpoints remembered from before a control-plane restart, served until the warm-up ends
    /// so that the first proxies to reconnect are not told that the others are gone.
    warm: HashSet<(SpiffeId, String)>,
    /// Proxies connected to the other control-plane replicas, by the store key their replica
    /// published them under (`fleet`): their endpoints, certificates and what they applied.
    remote: HashMap<String, ProxyEntry>,
    /// How many entries of `remote` list each endpoint: a proxy that moved is listed by its new
    /// replica at once and by the old one until that one's lease ends.
    remote_endpoints: HashMap<(SpiffeId, String), usize>,
    /// Endpoints of proxies whose replica died, kept while they reconnect elsewhere (`fleet`).
    orphans: Vec<(SpiffeId, String)>,
    /// By (identity, address).
    disconnected: HashMap<(SpiffeId, String), Disconnected>,
}

/// The address a proxy's stream comes from, as [`Registry::streams_from`] counts it.
fn source_host(p: &ProxyEntry) -> Option<IpAddr> {
    p.remote
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

impl Registry {
    /// Adds or replaces the entry of stream `stream`.
    pub fn upsert(&mut self, stream: u64, entry: ProxyEntry) {
        let key = (entry.id.clone(), entry.inbound_address.clone());
        self.disconnected.remove(&key);
        *self.local.entry(key).or_default() += 1;
        if let Some(host) = source_host(&entry) {
            *self.from_host.entry((entry.id.clone(), host)).or_default() += 1;
        }
        if let Some(old) = self.proxies.insert(stream, entry) {
            self.uncount_local(&old);
        }
    }

    /// Counts `p`'s endpoint out of the local streams.
    fn uncount_local(&mut self, p: &ProxyEntry) {
        let key = (p.id.clone(), p.inbound_address.clone());
        if let Some(n) = self.local.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.local.remove(&key);
            }
        }
        if let Some(host) = source_host(p) {
            let key = (p.id.clone(), host);
            if let Some(n) = self.from_host.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.from_host.remove(&key);
                }
            }
        }
    }

    /// How many streams `id` has open here from the source address `host`.
    pub fn streams_from(&self, id: &SpiffeId, host: IpAddr) -> usize {
        self.from_host
            .get(&(id.clone(), host.to_canonical()))
            .copied()
            .unwrap_or(0)
    }

    /// Removes stream `stream`. Unless the proxy said goodbye or another stream serves the same
    /// endpoint, it is remembered as disconnected.
    pub fn remove(&mut self, stream: u64) {
        let Some(p) = self.proxies.remove(&stream) else {
            return;
        };
        self.uncount_local(&p);
        if p.left || self.serves_elsewhere(stream, &p.id, &p.inbound_address) {
            return;
        }
        let key = (p.id.clone(), p.inbound_address.clone());
        self.disconnected.insert(
            key,
            Disconnected {
                id: p.id.clone(),
                inbound_address: p.inbound_address,
                cert_serial: p.cert_serial,
                cert_not_after: p.cert_not_after,
                at: SystemTime::now(),
            },
        );
        self.bound_disconnected(&p.id);
    }

    /// Keeps the disconnected list within [`DISCONNECTED_PER_IDENTITY`] for `id` and
    /// [`DISCONNECTED_MAX`] in all, dropping the oldest.
    fn bound_disconnected(&mut self, id: &SpiffeId) {
        let oldest = |list: &HashMap<(SpiffeId, String), Disconnected>, of: Option<&SpiffeId>| {
            list.iter()
                .filter(|(k, _)| of.is_none_or(|id| &k.0 == id))
                .min_by_key(|(_, d)| d.at)
                .map(|(k, _)| k.clone())
        };
        while self.disconnected.keys().filter(|k| &k.0 == id).count() > DISCONNECTED_PER_IDENTITY {
            match oldest(&self.disconnected, Some(id)) {
                Some(k) => self.disconnected.remove(&k),
                None => break,
            };
        }
        while self.disconnected.len() > DISCONNECTED_MAX {
            match oldest(&self.disconnected, None) {
                Some(k) => self.disconnected.remove(&k),
                None => break,
            };
        }
    }

    /// Proxies disconnected without a goodbye within [`DISCONNECTED_RETENTION`], oldest first.
    pub fn disconnected(&mut self) -> Vec<Disconnected> {
        let now = SystemTime::now();
        self.disconnected.retain(|_, d| {
            now.duration_since(d.at)
                .is_ok_and(|age| age < DISCONNECTED_RETENTION)
                || now < d.at
        });
        let mut out: Vec<_> = self.disconnected.values().cloned().collect();
        out.sort_by_key(|d| d.at);
        out
    }

    /// Sets the endpoints remembered from before a restart.
    pub fn set_warm(&mut self, endpoints: Vec<(SpiffeId, String)>) {
        self.warm = endpoints.into_iter().collect();
    }

    /// The proxies the mesh is known to be missing, each as `id at address: why`, sorted: those
    /// remembered from before a restart (until the warm-up ends) and those of a replica that
    /// died (until they are given up, see `Orphans`), while no proxy connected here or to
    /// another replica serves the endpoint.
    pub fn awaited(&self) -> Vec<String> {
        let serves = self.serves();
        let restart = self
            .warm
            .iter()
            .map(|e| (e, "not reconnected since the control plane restarted"));
        let death = self
            .orphans
            .iter()
            .map(|e| (e, "not reconnected since its control-plane replica died"));
        // One reason per endpoint (the restart's, when both hold).
        let mut missing: BTreeMap<&(SpiffeId, String), &str> = BTreeMap::new();
        for (e, why) in restart.chain(death) {
            if !serves(&e.0, &e.1) {
                missing.entry(e).or_insert(why);
            }
        }
        missing
            .into_iter()
            .map(|((id, addr), why)| format!("{id} at {addr}: {why}"))
            .collect()
    }

    fn local_endpoints(&self) -> HashSet<(&SpiffeId, &str)> {
        self.proxies
            .values()
            .map(|p| (&p.id, p.inbound_address.as_str()))
            .collect()
    }

    /// The proxies of other replicas that [`Self::set_remote`] with `proxies` would drop, by
    /// store key.
    pub fn remote_missing_from(
        &self,
        proxies: &HashMap<String, ProxyEntry>,
    ) -> Vec<(String, ProxyEntry)> {
        self.remote
            .iter()
            .filter(|(key, _)| !proxies.contains_key(*key))
            .map(|(key, p)| (key.clone(), p.clone()))
            .collect()
    }

    /// Replaces the proxies connected to other replicas, by store key (after reading them all
    /// again); returns whether their endpoints changed (which changes the service table).
    pub fn set_remote(&mut self, proxies: HashMap<String, ProxyEntry>) -> bool {
        let before = std::mem::take(&mut self.remote_endpoints);
        self.remote = proxies;
        for p in self.remote.values() {
            *self
                .remote_endpoints
                .entry((p.id.clone(), p.inbound_address.clone()))
                .or_default() += 1;
        }
        before.len() != self.remote_endpoints.len()
            || before
                .keys()
                .any(|k| !self.remote_endpoints.contains_key(k))
    }

    /// Another replica published (or published again) a proxy under `key`; returns whether the
    /// service table changes.
    pub fn put_remote(&mut self, key: String, entry: ProxyEntry) -> bool {
        let added = self.count_remote(&entry);
        let removed = match self.remote.insert(key, entry) {
            Some(old) => self.uncount_remote(&old),
            None => false,
        };
        added || removed
    }

    /// Another replica's proxy under `key` is gone; returns it, and whether the service table
    /// changes.
    pub fn delete_remote(&mut self, key: &str) -> Option<(ProxyEntry, bool)> {
        let old = self.remote.remove(key)?;
        let changed = self.uncount_remote(&old);
        Some((old, changed))
    }

    /// Counts `p`'s endpoint in; true when no other entry listed it (and it is no orphan).
    fn count_remote(&mut self, p: &ProxyEntry) -> bool {
        let n = self
            .remote_endpoints
            .entry((p.id.clone(), p.inbound_address.clone()))
            .or_default();
        *n += 1;
        *n == 1 && !self.orphaned(&p.id, &p.inbound_address)
    }

    /// Counts `p`'s endpoint out; true when no other entry lists it (and it is no orphan).
    fn uncount_remote(&mut self, p: &ProxyEntry) -> bool {
        let key = (p.id.clone(), p.inbound_address.clone());
        match self.remote_endpoints.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.remote_endpoints.remove(&key);
                !self.orphaned(&p.id, &p.inbound_address)
            }
            None => false,
        }
    }

    /// Whether `(id, address)` is among the orphans (kept sorted by `set_orphans`).
    fn orphaned(&self, id: &SpiffeId, address: &str) -> bool {
        self.orphans
            .binary_search_by(|(i, a)| (i, a.as_str()).cmp(&(id, address)))
            .is_ok()
    }

    /// Sets the endpoints of dead replicas' proxies; returns whether the service table changes
    /// (an orphan that came or went counts only if no connected proxy serves its endpoint).
    pub fn set_orphans(&mut self, mut endpoints: Vec<(SpiffeId, String)>) -> bool {
        endpoints.sort();
        endpoints.dedup();
        if self.orphans == endpoints {
            return false;
        }
        let old = std::mem::replace(&mut self.orphans, endpoints);
        let (before, after): (HashSet<_>, HashSet<_>) =
            (old.iter().collect(), self.orphans.iter().collect());
        let serves = self.serves();
        before
            .symmetric_difference(&after)
            .any(|e| !self.warm.contains(*e) && !serves(&e.0, &e.1))
    }

    /// Whether a connected proxy, here or on another replica, serves an identity at an address.
    pub fn serves(&self) -> impl Fn(&SpiffeId, &str) -> bool + '_ {
        move |id, address| {
            let key = (id.clone(), address.to_owned());
            self.local.contains_key(&key) || self.remote_endpoints.contains_key(&key)
        }
    }

    /// Every proxy of the mesh: those connected here, then those connected to other replicas
    /// (a proxy that moved here is counted once; one listed by two other replicas, by its newest
    /// connection).
    pub fn fleet(&self) -> impl Iterator<Item = &ProxyEntry> {
        let local = self.local_endpoints();
        let mut newest: HashMap<(&SpiffeId, &str), &ProxyEntry> = HashMap::new();
        for r in self.remote.values() {
            let key = (&r.id, r.inbound_address.as_str());
            if local.contains(&key) {
                continue;
            }
            newest
                .entry(key)
                .and_modify(|e| {
                    if r.connected_at > e.connected_at {
                        *e = r;
                    }
                })
                .or_insert(r);
        }
        self.proxies.values().chain(newest.into_values())
    }

    /// Ends the warm-up: from now on only connected proxies are endpoints.
    pub fn end_warm(&mut self) {
        self.warm.clear();
    }

    /// Whether the service table lists `address` for `id`: a proxy connected here or to another
    /// replica serves it, or it is remembered (warm-up) or orphaned.
    pub fn lists(&self, id: &SpiffeId, address: &str) -> bool {
        let key = (id.clone(), address.to_owned());
        self.orphaned(id, address)
            || self.remote_endpoints.contains_key(&key)
            || self.local.contains_key(&key)
            || self.warm.contains(&key)
    }

    /// Whether another live stream than `stream` serves `(id, address)`.
    pub fn serves_elsewhere(&self, stream: u64, id: &SpiffeId, address: &str) -> bool {
        let own = self
            .proxies
            .get(&stream)
            .is_some_and(|p| &p.id == id && p.inbound_address == address);
        let streams = self
            .local
            .get(&(id.clone(), address.to_owned()))
            .copied()
            .unwrap_or(0);
        streams > usize::from(own)
    }

    /// Mutable access to one stream's entry.
    pub fn get_mut(&mut self, stream: u64) -> Option<&mut ProxyEntry> {
        self.proxies.get_mut(&stream)
    }

    /// Every proxy connected to this replica.
    pub fn entries(&self) -> impl Iterator<Item = &ProxyEntry> {
        self.proxies.values()
    }

    /// How many connected proxies of `target` there are in the whole fleet, and how many
    /// applied `key@version`.
    pub fn rollout(&self, target: &SpiffeId, key: &str, version: u64) -> (u32, u32) {
        let of_target = self.fleet().filter(|p| &p.id == target);
        let (mut total, mut applied) = (0, 0);
        for p in of_target {
            total += 1;
            if p.applied_policies
                .iter()
                .any(|(k, v)| k == key && *v == version)
            {
                applied += 1;
            }
        }
        (total, applied)
    }

    /// What `target`'s connected proxies observed, summed over them, with the latest time each
    /// kind of call grew, keeping those seen at or after `since` (Unix seconds); and how many
    /// proxies of `target` are connected.
    pub fn observed(
        &self,
        target: &SpiffeId,
        since: i64,
    ) -> (BTreeMap<ObservedKey, (u64, i64)>, usize) {
        let mut out: BTreeMap<ObservedKey, (u64, i64)> = BTreeMap::new();
        let mut proxies = 0;
        for p in self.proxies.values().filter(|p| p.id == *target) {
            proxies += 1;
            for (key, (count, seen)) in &p.observed {
                if *seen < since {
                    continue;
                }
                let e = out.entry(key.clone()).or_default();
                e.0 += count;
                e.1 = e.1.max(*seen);
            }
        }
        (out, proxies)
    }

    /// Every edge (caller, service) summed over the service's connected proxies.
    pub fn edges(&self) -> BTreeMap<(String, SpiffeId), EdgeSum> {
        let mut out: BTreeMap<(String, SpiffeId), EdgeSum> = BTreeMap::new();
        for p in self.proxies.values() {
            for e in &p.edges {
                let sum = out.entry((e.peer.clone(), p.id.clone())).or_default();
                sum.proxies += 1;
                let r = &mut sum.report;
                r.peer.clone_from(&e.peer);
                r.requests += e.requests;
                r.failures += e.failures;
                if r.buckets.len() < e.buckets.len() {
                    r.buckets.resize(e.buckets.len(), 0);
                }
                for (total, n) in r.buckets.iter_mut().zip(&e.buckets) {
                    *total += n;
                }
                for (reason, n) in &e.denied {
                    match r.denied.iter_mut().find(|(known, _)| known == reason) {
                        Some((_, total)) => *total += n,
                        None => r.denied.push((reason.clone(), *n)),
                    }
                }
            }
        }
        out
    }

    /// Counters of `policy` (any version) summed over connected proxies, by (rule, decision).
    pub fn hits(&self, policy: &str) -> BTreeMap<(Option<u32>, &'static str), u64> {
        let mut out = BTreeMap::new();
        for h in self
            .proxies
            .values()
            .flat_map(|p| &p.hits)
            .filter(|h| h.policy == policy)
        {
            *out.entry((h.rule, h.decision)).or_default() += h.count;
        }
        out
    }

    /// The service table: identity → sorted, de-duplicated endpoints.
    pub fn services(&self) -> BTreeMap<SpiffeId, Vec<String>> {
        let mut table: BTreeMap<SpiffeId, Vec<String>> = BTreeMap::new();
        for p in self.proxies.values() {
            table
                .entry(p.id.clone())
                .or_default()
                .push(p.inbound_address.clone());
        }
        for (id, addr) in self.warm.iter().chain(&self.orphans) {
            table.entry(id.clone()).or_default().push(addr.clone());
        }
        for (id, addr) in self.remote_endpoints.keys() {
            table.entry(id.clone()).or_default().push(addr.clone());
        }
        for eps in table.values_mut() {
            eps.sort();
            eps.dedup();
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn proxy(id: &str, address: &str, secs: u64) -> ProxyEntry {
        ProxyEntry::connected(
            format!("spiffe://moat.local/ns/default/sa/{id}")
                .parse()
                .unwrap(),
            address.to_owned(),
            "10.9.9.9:5000".to_owned(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        )
    }

    fn endpoints(reg: &Registry) -> Vec<String> {
        reg.services().into_values().flatten().collect()
    }

    /// A certificate that opens and drops streams, announcing another port each time, fills
    /// at most its share of the disconnected list, and the list as a whole stays bounded.
    #[test]
    fn the_disconnected_list_is_bounded_per_identity_and_in_all() {
        let mut reg = Registry::default();
        let mut stream = 0;
        let mut churn = |reg: &mut Registry, id: &str, n: usize| {
            for port in 0..n {
                stream += 1;
                reg.upsert(stream, proxy(id, &format!("10.0.0.1:{}", 1000 + port), 1));
                reg.remove(stream);
            }
        };
        churn(&mut reg, "steady", 3);
        churn(&mut reg, "churner", 1000);
        let list = reg.disconnected();
        let of = |name: &str| {
            list.iter()
                .filter(|d| d.id.to_string().ends_with(name))
                .count()
        };
        assert_eq!(of("/steady"), 3);
        assert_eq!(of("/churner"), DISCONNECTED_PER_IDENTITY);
        for i in 0..20 {
            churn(&mut reg, &format!("many{i}"), DISCONNECTED_PER_IDENTITY);
        }
        assert_eq!(reg.disconnected().len(), DISCONNECTED_MAX);
    }

    /// A proxy that moves between replicas is listed twice for a while (its old replica's
    /// entry lives until that replica's lease ends): the service table changes only when the
    /// last listing goes, and the fleet counts it once, by its newest connection.
    #[test]
    fn remote_proxies_change_the_table_only_when_their_last_listing_goes() {
        let mut reg = Registry::default();
        assert!(reg.put_remote("live/a/x".into(), proxy("x", "10.0.0.1:15006", 1)));
        assert!(!reg.put_remote("live/a/x".into(), proxy("x", "10.0.0.1:15006", 1)));
        assert!(!reg.put_remote("live/b/x".into(), proxy("x", "10.0.0.1:15006", 2)));
        assert_eq!(endpoints(&reg), ["10.0.0.1:15006"]);
        let fleet: Vec<_> = reg.fleet().collect();
        assert_eq!(fleet.len(), 1);
        assert_eq!(fleet[0].connected_at, proxy("x", "", 2).connected_at);

        let (gone, changed) = reg.delete_remote("live/a/x").unwrap();
        assert_eq!(gone.inbound_address, "10.0.0.1:15006");
        assert!(!changed, "still listed by replica b");
        assert!(reg.delete_remote("live/a/x").is_none());
        // Re-published with a new address: the old one leaves, the new one comes.
        assert!(reg.put_remote("live/b/x".into(), proxy("x", "10.0.0.2:15006", 3)));
        assert_eq!(endpoints(&reg), ["10.0.0.2:15006"]);
        assert!(reg.delete_remote("live/b/x").unwrap().1);
        assert!(endpoints(&reg).is_empty());
        assert_eq!(reg.fleet().count(), 0);
    }

    /// Reading everything again replaces what was followed, and says whether the endpoints
    /// differ; a proxy connected here and listed by another replica counts once.
    #[test]
    fn a_full_read_replaces_the_remote_proxies() {
        let mut reg = Registry::default();
        reg.put_remote("live/a/x".into(), proxy("x", "10.0.0.1:15006", 1));
        let same: HashMap<String, ProxyEntry> =
            [("live/c/x".to_owned(), proxy("x", "10.0.0.1:15006", 5))].into();
        assert!(!reg.set_remote(same));
        let other: HashMap<String, ProxyEntry> = [
            ("live/c/x".to_owned(), proxy("x", "10.0.0.1:15006", 5)),
            ("live/c/y".to_owned(), proxy("y", "10.0.0.3:15006", 5)),
        ]
        .into();
        assert!(reg.set_remote(other));
        reg.upsert(7, proxy("y", "10.0.0.3:15006", 9));
        assert_eq!(reg.fleet().count(), 2);
        assert_eq!(endpoints(&reg), ["10.0.0.1:15006", "10.0.0.3:15006"]);
        assert!(reg.awaited().is_empty());
        reg.set_warm(vec![
            (proxy("y", "", 0).id, "10.0.0.3:15006".into()),
            (proxy("z", "", 0).id, "10.0.0.4:15006".into()),
        ]);
        assert_eq!(
            reg.awaited(),
            [
                "spiffe://moat.local/ns/default/sa/z at 10.0.0.4:15006: not reconnected since the control plane restarted"
            ]
        );
    }

    /// An orphan changes the table only while no connected proxy serves its endpoint: one that
    /// reconnected (here or elsewhere) can leave the orphans without a change.
    #[test]
    fn orphans_change_the_table_only_where_nobody_serves_them() {
        let mut reg = Registry::default();
        let x = proxy("x", "10.0.0.1:15006", 1);
        let y = proxy("y", "10.0.0.2:15006", 1);
        let orphans = vec![
            (x.id.clone(), x.inbound_address.clone()),
            (y.id.clone(), y.inbound_address.clone()),
        ];
        assert!(reg.set_orphans(orphans.clone()));
        assert!(!reg.set_orphans(orphans.clone()));
        assert_eq!(endpoints(&reg), ["10.0.0.1:15006", "10.0.0.2:15006"]);
        // A CA rotation waits for them (`awaited`) until each is back, wherever it reconnects.
        let died = |p: &ProxyEntry| {
            format!(
                "{} at {}: not reconnected since its control-plane replica died",
                p.id, p.inbound_address
            )
        };
        assert_eq!(reg.awaited(), [died(&x), died(&y)]);
        // x reconnected to another replica, y here: neither's leaving the orphans is a change.
        assert!(!reg.put_remote("live/b/x".into(), x.clone()));
        assert_eq!(reg.awaited(), [died(&y)]);
        reg.upsert(3, y.clone());
        assert!(reg.awaited().is_empty());
        {
            let serves = reg.serves();
            assert!(serves(&x.id, "10.0.0.1:15006") && serves(&y.id, "10.0.0.2:15006"));
            assert!(!serves(&x.id, "10.0.0.2:15006"));
        }
        assert!(!reg.set_orphans(orphans[1..].to_vec()));
        assert!(!reg.set_orphans(Vec::new()));
        assert_eq!(endpoints(&reg), ["10.0.0.1:15006", "10.0.0.2:15006"]);
        // Given up while nobody serves it: a change.
        assert!(reg.set_orphans(vec![(proxy("z", "", 0).id, "10.0.0.9:15006".into())]));
        assert!(reg.set_orphans(Vec::new()));
    }
}
