//! From observed traffic to a least-privilege allow-list (`moat policy suggest`). While a
//! service's allow-list only watches ([`Watching::records`]: its policy is in audit mode, or
//! there is none and the mesh admits any authenticated caller), its sidecars count every call
//! they admit by caller, port, method and canonical path. [`suggest`] turns those counts into an
//! enforcing AccessPolicy that admits exactly them: one rule per caller and port, routes grouped
//! by method, path segments that look like identifiers (`/orders/123`, `/users/9f8e…`) and
//! directories with many distinct entries generalised to a prefix (`/orders/*`), comments
//! counting the calls behind each rule and path, and a warning for callers seen only a few
//! times. Pure: the caller fetches the counts and prints the result.

use std::collections::{BTreeMap, BTreeSet};

use moat_identity::SpiffeId;

use crate::model::{AccessPolicy, DefaultPosture, Mode};

/// How a service's allow-list treats calls now, as far as recording them goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watching {
    /// Its policies are all in audit mode: calls are recorded.
    Audit,
    /// No policy and the mesh admits any authenticated caller: calls are recorded.
    AllowAuthenticated,
    /// A policy enforces: nothing is recorded.
    Enforce,
    /// No policy and the mesh denies: nothing is admitted, nothing is recorded.
    Deny,
}

impl Watching {
    /// The state of the service `policies` target (every one of them), under `posture`.
    pub fn of<'a>(
        policies: impl IntoIterator<Item = &'a AccessPolicy>,
        posture: DefaultPosture,
    ) -> Watching {
        let mut any = false;
        for p in policies {
            any = true;
            if p.mode == Mode::Enforce {
                return Watching::Enforce;
            }
        }
        match (any, posture) {
            (true, _) => Watching::Audit,
            (false, DefaultPosture::AllowAuthenticated) => Watching::AllowAuthenticated,
            (false, DefaultPosture::Deny) => Watching::Deny,
        }
    }

    /// Whether the sidecars record the calls they admit.
    pub fn records(self) -> bool {
        matches!(self, Watching::Audit | Watching::AllowAuthenticated)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Watching::Audit => "audit",
            Watching::AllowAuthenticated => "allow-authenticated",
            Watching::Enforce => "enforce",
            Watching::Deny => "deny",
        }
    }
}

/// Calls of one kind, as the sidecars counted them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedCall {
    /// The caller's SPIFFE ID.
    pub peer: String,
    pub port: u16,
    /// HTTP method; empty for an opaque TCP connection.
    pub method: String,
    /// Canonical path; empty for opaque TCP.
    pub path: String,
    pub count: u64,
}

/// A suggested policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    /// One AccessPolicy document, with comments.
    pub yaml: String,
    /// What to look at before applying it.
    pub warnings: Vec<String>,
    pub rules: usize,
}

/// Where to put the suggested policy: `namespace/name` (the policy now watching the service,
/// so that applying the suggestion replaces it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

impl PolicyKey {
    /// The key a policy for `target` gets when none exists: its namespace and service account.
    pub fn for_target(target: &SpiffeId) -> PolicyKey {
        PolicyKey {
            namespace: target.namespace().as_str().to_owned(),
            name: target.service_account().as_str().to_owned(),
        }
    }
}

/// More distinct entries than this under one directory are taken for identifiers and
/// generalised to the directory's prefix.
const MAX_DISTINCT_CHILDREN: usize = 8;

/// Whether a path segment looks like an identifier rather than a name: a number, a UUID, a long
/// hex string or any long segment with digits in it.
fn looks_like_id(segment: &str) -> bool {
    let digits = segment.chars().filter(char::is_ascii_digit).count();
    let hex = segment.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    (!segment.is_empty() && digits == segment.len())
        || (hex && segment.len() >= 8 && digits > 0)
        || (segment.len() >= 20 && digits > 0)
}

/// A path pattern for one observed path: up to its first identifier-like segment, as a prefix.
fn generalise(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match segments.iter().position(|s| looks_like_id(s)) {
        Some(i) => {
            format!(
                "/{}",
                segments[..i]
                    .iter()
                    .map(|s| format!("{s}/"))
                    .collect::<String>()
            ) + "*"
        }
        None => path.to_owned(),
    }
}

/// The patterns of one caller's paths on one port, each with the methods and count behind it.
fn patterns(calls: &[&ObservedCall]) -> BTreeMap<String, (BTreeSet<String>, u64)> {
    let mut out: BTreeMap<String, (BTreeSet<String>, u64)> = BTreeMap::new();
    for c in calls {
        let e = out.entry(generalise(&c.path)).or_default();
        e.0.insert(c.method.clone());
        e.1 += c.count;
    }
    // Directories with many distinct exact entries hold identifiers too.
    let mut children: BTreeMap<String, usize> = BTreeMap::new();
    for p in out.keys().filter(|p| !p.ends_with('*')) {
        if let Some((dir, _)) = p.rsplit_once('/') {
            *children.entry(format!("{dir}/*")).or_default() += 1;
        }
    }
    for (prefix, n) in children {
        if n > MAX_DISTINCT_CHILDREN {
            out.entry(prefix).or_default();
        }
    }
    // An exact path below a prefix pattern is covered by it: fold it in.
    let prefixes: Vec<String> = out.keys().filter(|p| p.ends_with("/*")).cloned().collect();
    let covered: Vec<String> = out
        .keys()
        .filter(|p| {
            prefixes
                .iter()
                .any(|pre| *p != pre && p.starts_with(&pre[..pre.len() - 1]))
        })
        .cloned()
        .collect();
    for p in covered {
        if let Some((methods, count)) = out.remove(&p)
            && let Some(pre) = prefixes
                .iter()
                .filter(|pre| p.starts_with(&pre[..pre.len() - 1]))
                .min_by_key(|pre| pre.len())
            && let Some(e) = out.get_mut(pre)
        {
            e.0.extend(methods);
            e.1 += count;
        }
    }
    out
}

/// A YAML double-quoted scalar (JSON's string syntax is YAML's).
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The enforcing policy for `target` that admits exactly `calls`, at `key`. Callers with fewer
/// than `min_calls` calls get a warning (they may be one-offs, or the observation too short).
pub fn suggest(
    target: &SpiffeId,
    key: &PolicyKey,
    calls: &[ObservedCall],
    min_calls: u64,
) -> Suggestion {
    // A method no sidecar forwards (CONNECT) admits nothing, and `apply` refuses a rule naming
    // it; a sidecar observes none today, one of an older build may have.
    let calls: Vec<&ObservedCall> = calls
        .iter()
        .filter(|c| c.method.is_empty() || crate::target::is_forwarded_method(&c.method))
        .collect();
    let mut by_peer: BTreeMap<&str, Vec<&ObservedCall>> = BTreeMap::new();
    for c in &calls {
        by_peer.entry(c.peer.as_str()).or_default().push(c);
    }
    let total: u64 = calls.iter().map(|c| c.count).sum();
    let mut warnings = Vec::new();
    let mut rules = Vec::new();
    for (peer, calls) in &by_peer {
        let n: u64 = calls.iter().map(|c| c.count).sum();
        if n < min_calls {
            warnings.push(format!(
                "only {} from {peer}: a one-off, or too short an observation? Review its rule",
                plural(n, "call")
            ));
        }
        let tcp: BTreeMap<u16, u64> =
            calls
                .iter()
                .filter(|c| c.method.is_empty())
                .fold(BTreeMap::new(), |mut m, c| {
                    *m.entry(c.port).or_default() += c.count;
                    m
                });
        if !tcp.is_empty() {
            let ports: Vec<String> = tcp.keys().map(u16::to_string).collect();
            let count: u64 = tcp.values().sum();
            rules.push(format!(
                "    # {peer}: {} (opaque TCP: a rule without http admits everything on its ports)\n    - from: [{}]\n      ports: [{}]\n",
                plural(count, "connection"),
                quoted(peer),
                ports.join(", ")
            ));
        }
        let mut by_port: BTreeMap<u16, Vec<&ObservedCall>> = BTreeMap::new();
        for c in calls.iter().filter(|c| !c.method.is_empty()) {
            by_port.entry(c.port).or_default().push(c);
        }
        for (port, calls) in by_port {
            let count: u64 = calls.iter().map(|c| c.count).sum();
            // Routes: the patterns that share a method set.
            let mut routes: BTreeMap<BTreeSet<String>, Vec<(String, u64)>> = BTreeMap::new();
            for (pattern, (methods, n)) in patterns(&calls) {
                routes.entry(methods).or_default().push((pattern, n));
            }
            let mut rule = format!(
                "    # {peer}: {}\n    - from: [{}]\n      ports: [{port}]\n      http:\n",
                plural(count, "request"),
                quoted(peer)
            );
            for (methods, paths) in routes {
                let methods: Vec<&str> = methods.iter().map(String::as_str).collect();
                rule.push_str(&format!(
                    "        - methods: [{}]\n          paths:\n",
                    methods.join(", ")
                ));
                for (pattern, n) in paths {
                    rule.push_str(&format!(
                        "            - {}   # {}\n",
                        quoted(&pattern),
                        plural(n, "request")
                    ));
                }
            }
            rules.push(rule);
        }
    }
    let mut yaml = format!(
        "# Suggested by `moat policy suggest` from {} to {target} while its allow-list only\n# watched. It admits exactly what was seen and enforces: review it, then apply it.\napiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  target: {}\n  mode: enforce\n",
        plural(total, "observed call"),
        key.name,
        key.namespace,
        quoted(&target.to_string()),
    );
    if rules.is_empty() {
        warnings.push(format!(
            "no calls to {target} were observed: the policy admits nobody"
        ));
        yaml.push_str("  rules: []\n");
    } else {
        yaml.push_str("  rules:\n");
        for r in &rules {
            yaml.push_str(r);
        }
    }
    Suggestion {
        yaml,
        warnings,
        rules: rules.len(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use moat_identity::TrustDomain;

    use super::*;
    use crate::{Document, Traffic, evaluate};

    fn call(peer: &str, method: &str, path: &str, count: u64) -> ObservedCall {
        ObservedCall {
            peer: format!("spiffe://moat.local/ns/shop/sa/{peer}"),
            port: 8080,
            method: method.into(),
            path: path.into(),
            count,
        }
    }

    #[test]
    fn identifiers_and_crowded_directories_become_prefixes() {
        for (path, want) in [
            ("/orders", "/orders"),
            ("/orders/123", "/orders/*"),
            ("/orders/123/items", "/orders/*"),
            (
                "/users/9f8e7d6c-1234-4bcd-8e9f-0a1b2c3d4e5f/cart",
                "/users/*",
            ),
            ("/v1/health", "/v1/health"),
            ("/moat.test.Echo/Say", "/moat.test.Echo/Say"),
            ("/123", "/*"),
        ] {
            assert_eq!(generalise(path), want, "{path}");
        }
        let many: Vec<ObservedCall> = (0..12)
            .map(|i| call("a", "GET", &format!("/products/item-{i}"), 1))
            .collect();
        let refs: Vec<&ObservedCall> = many.iter().collect();
        let p = patterns(&refs);
        assert_eq!(p.keys().collect::<Vec<_>>(), ["/products/*"], "{p:?}");
        assert_eq!(p["/products/*"].1, 12);
    }

    /// The suggestion parses as a policy, admits every observed call and nothing else.
    #[test]
    fn the_suggestion_admits_exactly_what_was_seen() {
        let target: SpiffeId = "spiffe://moat.local/ns/shop/sa/orders".parse().unwrap();
        let calls = vec![
            call("frontend", "GET", "/orders/1", 30),
            call("frontend", "GET", "/orders/2", 12),
            call("frontend", "POST", "/orders", 5),
            call("frontend", "GET", "/health", 40),
            call("cart", "GET", "/orders/7", 2),
            // Recorded by an older sidecar: never forwarded, so never suggested.
            call("frontend", "CONNECT", "/orders/1", 9),
            call("tunnel", "CONNECT", "/", 50),
            ObservedCall {
                peer: "spiffe://moat.local/ns/shop/sa/ledger".into(),
                port: 5432,
                method: String::new(),
                path: String::new(),
                count: 3,
            },
        ];
        let key = PolicyKey::for_target(&target);
        let s = suggest(&target, &key, &calls, 10);
        assert_eq!(s.rules, 3, "{}", s.yaml);
        assert!(s.yaml.contains("# 42 requests"), "{}", s.yaml);
        assert!(
            !s.yaml.contains("CONNECT") && !s.yaml.contains("tunnel"),
            "{}",
            s.yaml
        );
        // cart (2 calls) and ledger (3) are under 10.
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
        let docs =
            crate::parse_new_documents(&s.yaml, "suggestion", &TrustDomain::default_domain())
                .unwrap_or_else(|e| panic!("{e:?}\n{}", s.yaml));
        let [Document::AccessPolicy(policy)] = &docs[..] else {
            panic!("{docs:?}");
        };
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(
            (policy.namespace.as_str(), policy.name.to_string().as_str()),
            ("shop", "orders")
        );
        let mesh = crate::MeshConfig::default();
        let allowed = |peer: &str, port: u16, traffic: Traffic<'_>| {
            let caller: SpiffeId = format!("spiffe://moat.local/ns/shop/sa/{peer}")
                .parse()
                .unwrap();
            let input = crate::eval::Input {
                peer: &caller,
                port,
                traffic,
            };
            evaluate(std::slice::from_ref(policy), &mesh, &input).allowed
        };
        let get = |path| Traffic::Request {
            method: "GET",
            path,
            jwt: crate::eval::Jwt::Missing,
        };
        assert!(allowed("frontend", 8080, get("/orders/99")));
        assert!(allowed("frontend", 8080, get("/health")));
        assert!(allowed("cart", 8080, get("/orders/8")));
        assert!(allowed("ledger", 5432, Traffic::Opaque));
        assert!(!allowed("frontend", 8080, get("/admin")));
        assert!(!allowed("cart", 8080, get("/health")));
        assert!(!allowed("frontend", 9090, get("/health")));
        assert!(!allowed("stranger", 8080, get("/orders/1")));
        assert!(!allowed(
            "frontend",
            8080,
            Traffic::Request {
                method: "DELETE",
                path: "/orders/1",
                jwt: crate::eval::Jwt::Missing
            }
        ));
    }

    #[test]
    fn watching_follows_the_mode_and_the_posture() {
        assert_eq!(
            Watching::of(std::iter::empty(), DefaultPosture::AllowAuthenticated),
            Watching::AllowAuthenticated
        );
        assert_eq!(
            Watching::of(std::iter::empty(), DefaultPosture::Deny),
            Watching::Deny
        );
        assert!(!Watching::Deny.records() && !Watching::Enforce.records());
        assert!(Watching::Audit.records() && Watching::AllowAuthenticated.records());
    }
}
