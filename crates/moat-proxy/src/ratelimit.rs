//! Token buckets for the rules' rate limits. A bucket belongs to one rule of one policy version
//! and, as the rule says, to one caller, one route (method and path), or one of each. A route's
//! path is keyed as servers commonly read it ([`moat_policy::server_path`]): spellings of one
//! path that the canonical target keeps apart (`//`, `;params`, a trailing `/`) share its
//! bucket. A request takes a token from every limited rule that admits it
//! ([`moat_policy::limiting_rules`]), all or none ([`Limiter::admit_all`]). Bounded:
//! buckets that have refilled (each under its own rule's limit) are dropped when the table is
//! full, and when nothing can be dropped, new keys share one overflow bucket per rule
//! (throttled together, never unthrottled). Looking for buckets to drop is a pass over the whole
//! table under its lock; one that frees less than a sixteenth of it is not repeated for
//! [`SWEEP_PAUSE`], so a caller sending a new path with every request cannot buy a pass each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moat_policy::{RateKey, RateLimit};

/// The most buckets kept.
const MAX_BUCKETS: usize = 100_000;

/// How long a full table that a pass could not free (a sixteenth of it) waits before the next.
const SWEEP_PAUSE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    policy: String,
    version: u64,
    rule: usize,
    client: Option<String>,
    route: Option<String>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// The limit of the rule the bucket belongs to (a rule's limit is fixed for its policy
    /// version, which is part of the key).
    rate: u32,
    burst: u32,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        self.tokens = self.full_at(now);
        self.last = now;
    }

    /// The tokens the bucket holds at `now`.
    fn full_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * f64::from(self.rate)).min(f64::from(self.burst))
    }
}

/// What a request is counted as.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `namespace/name` and version of the policy whose rule admitted it.
    pub policy: &'a str,
    pub version: u64,
    pub rule: usize,
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
}

/// Every bucket of this proxy.
#[derive(Debug, Default)]
pub struct Limiter {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    buckets: HashMap<Key, Bucket>,
    /// Before this, a full table sends new keys to the overflow bucket without a pass.
    sweep_after: Option<Instant>,
    /// Passes made, for the tests.
    sweeps: u64,
}

impl Table {
    /// The bucket key of `req` under `limit`: its own, or its rule's overflow bucket when the
    /// table is full and has no room for a new one.
    fn key_for(&mut self, req: &Request<'_>, limit: &RateLimit, now: Instant) -> Key {
        let (client, route) = match limit.per {
            RateKey::Client => (Some(req.client), None),
            RateKey::Route => (None, Some((req.method, req.path))),
            RateKey::ClientAndRoute => (Some(req.client), Some((req.method, req.path))),
        };
        let mut key = Key {
            policy: req.policy.to_owned(),
            version: req.version,
            rule: req.rule,
            client: client.map(str::to_owned),
            route: route.map(|(m, p)| format!("{m} {}", moat_policy::server_path(p))),
        };
        if !self.buckets.contains_key(&key) && !self.room(now) {
            key.client = None;
            key.route = Some("<overflow>".into());
        }
        key
    }

    /// Makes room for a new key when the table is full and a pass may be made; whether there is
    /// room now.
    fn room(&mut self, now: Instant) -> bool {
        if self.buckets.len() < MAX_BUCKETS {
            return true;
        }
        if self.sweep_after.is_some_and(|at| now < at) {
            return false;
        }
        self.sweeps += 1;
        self.buckets
            .retain(|_, b| b.full_at(now) < f64::from(b.burst));
        let freed_enough = self.buckets.len() <= MAX_BUCKETS - MAX_BUCKETS / 16;
        self.sweep_after = (!freed_enough).then(|| now + SWEEP_PAUSE);
        self.buckets.len() < MAX_BUCKETS
    }
}

impl Limiter {
    /// Takes a token for `req` under `limit`; `Err` carries how long until one is available.
    /// The tests' shorthand for one rule: requests go through [`admit_all`](Self::admit_all).
    #[cfg(test)]
    pub fn admit(&self, req: &Request<'_>, limit: &RateLimit) -> Result<(), Duration> {
        self.admit_all(&[(*req, limit)]).map_err(|(_, wait)| wait)
    }

    /// Takes a token from the bucket of each `(request, limit)`, or from none when one of them
    /// has none to give: `Err` carries the index of the first such and how long until it has
    /// one. All or nothing, so a request refused by one rule does not spend another's tokens.
    pub fn admit_all(&self, reqs: &[(Request<'_>, &RateLimit)]) -> Result<(), (usize, Duration)> {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        // Keys first: making room may drop refilled buckets, which must not be ones this call
        // has already looked at.
        let keys: Vec<Key> = reqs
            .iter()
            .map(|(req, limit)| table.key_for(req, limit, now))
            .collect();
        let mut refused = None;
        for (i, ((_, limit), key)) in reqs.iter().zip(&keys).enumerate() {
            let bucket = table.buckets.entry(key.clone()).or_insert(Bucket {
                tokens: f64::from(limit.burst),
                last: now,
                rate: limit.requests_per_second,
                burst: limit.burst,
            });
            bucket.refill(now);
            if bucket.tokens < 1.0 && refused.is_none() {
                let wait = (1.0 - bucket.tokens) / f64::from(limit.requests_per_second);
                refused = Some((i, Duration::from_secs_f64(wait)));
            }
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
        for key in &keys {
            if let Some(bucket) = table.buckets.get_mut(key) {
                bucket.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(client: &'a str, path: &'a str) -> Request<'a> {
        Request {
            policy: "default/orders",
            version: 1,
            rule: 0,
            client,
            method: "GET",
            path,
        }
    }

    #[test]
    fn burst_then_refusal_then_refill_per_client() {
        let limit = RateLimit {
            requests_per_second: 10,
            burst: 3,
            per: RateKey::Client,
        };
        let l = Limiter::default();
        for _ in 0..3 {
            assert!(l.admit(&req("a", "/x"), &limit).is_ok());
        }
        let wait = l.admit(&req("a", "/y"), &limit).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another client has its own bucket.
        assert!(l.admit(&req("b", "/x"), &limit).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.admit(&req("a", "/x"), &limit).is_ok());
    }

    #[test]
    fn per_route_buckets_are_shared_by_callers() {
        let limit = RateLimit {
            requests_per_second: 1,
            burst: 1,
            per: RateKey::Route,
        };
        let l = Limiter::default();
        assert!(l.admit(&req("a", "/x"), &limit).is_ok());
        assert!(l.admit(&req("b", "/x"), &limit).is_err());
        assert!(l.admit(&req("b", "/other"), &limit).is_ok());
    }

    /// Spellings of one path that servers commonly serve as one resource share its bucket.
    #[test]
    fn spellings_of_a_route_share_its_bucket() {
        let limit = RateLimit {
            requests_per_second: 1,
            burst: 1,
            per: RateKey::Route,
        };
        let l = Limiter::default();
        assert!(l.admit(&req("a", "/orders/1"), &limit).is_ok());
        for spelling in ["/orders//1", "/orders/1;a", "/orders/1/", "//orders/1;b/"] {
            assert!(l.admit(&req("a", spelling), &limit).is_err(), "{spelling}");
        }
        assert!(l.admit(&req("a", "/orders/2"), &limit).is_ok());
        assert_eq!(moat_policy::server_path("/"), "/");
        assert_eq!(moat_policy::server_path("/a;x/b/"), "/a/b");
    }

    /// Tokens are taken from every bucket or from none: a request that one rule refuses spends
    /// nothing of another's.
    #[test]
    fn admit_all_takes_from_every_bucket_or_none() {
        let roomy = RateLimit {
            requests_per_second: 1,
            burst: 2,
            per: RateKey::Client,
        };
        let tight = RateLimit {
            requests_per_second: 1,
            burst: 1,
            per: RateKey::Client,
        };
        let l = Limiter::default();
        let second = Request {
            rule: 1,
            ..req("a", "/x")
        };
        assert!(
            l.admit_all(&[(req("a", "/x"), &roomy), (second, &tight)])
                .is_ok()
        );
        let (refused, _) = l
            .admit_all(&[(req("a", "/x"), &roomy), (second, &tight)])
            .unwrap_err();
        assert_eq!(refused, 1);
        // The roomy bucket still holds the token the refused request did not take.
        assert!(l.admit(&req("a", "/x"), &roomy).is_ok());
        assert!(l.admit(&req("a", "/x"), &roomy).is_err());
    }

    /// When the table is full, a bucket is dropped only when it has refilled under its own
    /// rule's limit, not under the limit of the request that needs the room: a generous rule's
    /// caller down to 10 of 1,000 tokens does not get a fresh burst because a strict rule's
    /// request (burst 1) came by.
    #[test]
    fn a_full_table_drops_buckets_by_their_own_limits() {
        let generous = RateLimit {
            requests_per_second: 1,
            burst: 1000,
            per: RateKey::Client,
        };
        let l = full_of_draining_buckets();
        let strict = RateLimit {
            requests_per_second: 1,
            burst: 1,
            per: RateKey::Client,
        };
        assert!(l.admit(&req("newcomer", "/"), &strict).is_ok());
        let generous_caller = Request {
            rule: 1,
            ..req("c0", "/")
        };
        let admitted = (0..20)
            .filter(|_| l.admit(&generous_caller, &generous).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    /// A limiter whose table is full of rule 1's buckets (burst 1,000, 1/s), each down to 10
    /// tokens: none can be dropped for 990 s.
    fn full_of_draining_buckets() -> Limiter {
        let l = Limiter::default();
        {
            let mut t = l.table.lock().unwrap();
            let now = Instant::now();
            for i in 0..MAX_BUCKETS {
                t.buckets.insert(
                    Key {
                        policy: "default/orders".into(),
                        version: 1,
                        rule: 1,
                        client: Some(format!("c{i}")),
                        route: None,
                    },
                    Bucket {
                        tokens: 10.0,
                        last: now,
                        rate: 1,
                        burst: 1000,
                    },
                );
            }
        }
        l
    }

    /// A caller sending a new path with every request to a full table gets the overflow bucket,
    /// and one pass over the table per second at most, not one per request.
    #[test]
    fn new_keys_to_a_full_table_do_not_each_buy_a_pass_over_it() {
        let l = full_of_draining_buckets();
        let per_route = RateLimit {
            requests_per_second: 1_000_000,
            burst: 1_000_000,
            per: RateKey::Route,
        };
        for i in 0..1000 {
            let path = format!("/new/{i}");
            assert!(l.admit(&req("attacker", &path), &per_route).is_ok());
        }
        let t = l.table.lock().unwrap();
        // One pass, or two on a machine slow enough to take a second over this loop; without
        // the pause there would be 1,000.
        assert!(t.sweeps <= 2, "{} passes over the full table", t.sweeps);
        assert_eq!(
            t.buckets.len(),
            MAX_BUCKETS + 1,
            "the newcomers share one bucket"
        );
    }
}
