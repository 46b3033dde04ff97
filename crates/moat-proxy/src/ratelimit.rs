//! Token buckets for the rules' rate limits. A bucket belongs to one rule of one policy version
//! and, as the rule says, to one caller, one route (method and path), or one of each. Bounded:
//! buckets that have refilled are dropped when the table is full, and when nothing can be
//! dropped, new keys share one overflow bucket per rule (throttled together, never unthrottled).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moat_policy::{RateKey, RateLimit};

/// The most buckets kept.
const MAX_BUCKETS: usize = 100_000;

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
}

impl Bucket {
    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(limit.requests_per_second))
            .min(f64::from(limit.burst));
        self.last = now;
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
    buckets: Mutex<HashMap<Key, Bucket>>,
}

impl Limiter {
    /// Takes a token for `req` under `limit`; `Err` carries how long until one is available.
    pub fn admit(&self, req: &Request<'_>, limit: &RateLimit) -> Result<(), Duration> {
        let now = Instant::now();
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
            route: route.map(|(m, p)| format!("{m} {p}")),
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| {
                let full = b.tokens
                    + now.saturating_duration_since(b.last).as_secs_f64()
                        * f64::from(limit.requests_per_second);
                full < f64::from(limit.burst)
            });
            if buckets.len() >= MAX_BUCKETS {
                key.client = None;
                key.route = Some("<overflow>".into());
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            last: now,
        });
        bucket.refill(limit, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / f64::from(limit.requests_per_second);
            Err(Duration::from_secs_f64(wait))
        }
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
}
