//! The evaluator: pure, allocation-light, shared by proxy, control plane and CLI.
//!
//! Order: the target's enforce-mode policies decide (allow if any rule matches, else deny). When
//! the target has only audit-mode policies, the request is allowed and the deny it would have
//! had is reported as `would_deny`. With no policy at all, the mesh's default posture decides.
//! A rule matches when the caller is in `from`, the port is in `ports` (or `ports` is empty)
//! and what is being authorized passes the rule's L7 parts ([`Traffic`]): an HTTP request must
//! match one `http` route (or `http` is empty) and carry a verified end-user token that meets
//! the rule's `jwt` requirement (if any); an opaque TCP connection is admitted only by a rule
//! with neither `http` nor `jwt` (detection never widens access: `protocol-not-allowed`); the
//! connection-level check before an HTTP connection's first request ignores both, since every
//! request is checked again.

use moat_identity::SpiffeId;

use crate::model::{AccessPolicy, DefaultPosture, MeshConfig, Mode, PolicyVersion};

/// What is being authorized.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub peer: &'a SpiffeId,
    pub port: u16,
    pub traffic: Traffic<'a>,
}

/// The kind of traffic being authorized.
#[derive(Clone, Copy, Debug)]
pub enum Traffic<'a> {
    /// An HTTP connection before its first request: identity and port only (each request is
    /// checked as it comes).
    Connection,
    /// An opaque TCP connection (not detected as HTTP, or on an opaque port): it can carry no
    /// route and no token, so only a rule without `http` and `jwt` admits it.
    Opaque,
    /// One HTTP request. `path` must be canonical ([`crate::target::canonical_path`]).
    Request {
        method: &'a str,
        path: &'a str,
        jwt: Jwt<'a>,
    },
}

/// The end-user token of a request.
#[derive(Clone, Copy, Debug)]
pub enum Jwt<'a> {
    /// None presented.
    Missing,
    /// Presented but not verified; the reason says why.
    Invalid(Reason),
    /// Verified: its claims.
    Valid(&'a crate::model::Claims),
}

/// Stable, machine-readable reason codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    AllowAuthenticated,
    NoPolicy,
    IdentityNotAllowed,
    PortNotAllowed,
    RouteNotAllowed,
    /// The caller's identity or certificate is revoked. Not produced by [`evaluate`]: the proxy
    /// checks revocations first.
    Revoked,
    JwtMissing,
    JwtMalformed,
    /// `iss` names no issuer the mesh trusts.
    JwtIssuerUnknown,
    /// `alg` is `none`, a shared-secret algorithm, or not allowed for the issuer.
    JwtAlgorithmNotAllowed,
    /// No key of the issuer matches the token's `kid` and algorithm.
    JwtUnknownKid,
    JwtBadSignature,
    JwtExpired,
    JwtNotYetValid,
    /// Verified, but from an issuer the rule does not accept.
    JwtIssuerNotAllowed,
    /// Verified, but for another audience.
    JwtAudienceNotAllowed,
    /// Verified and acceptable, but its claims (e.g. scopes) do not allow this.
    JwtClaimsNotAllowed,
    /// Allowed, but over the rule's rate limit. Not produced by [`evaluate`]: the proxy's token
    /// buckets decide it after the allow.
    RateLimited,
    /// Allowed, but the caller already has the most requests in flight at this sidecar that one
    /// identity may hold (across all its connections). Not produced by [`evaluate`].
    CallerBusy,
    /// Opaque TCP (or an undetected protocol) where the caller's rules for the port constrain
    /// HTTP.
    ProtocolNotAllowed,
    /// The request's path cannot be made canonical (an encoded `/`, a control character, ...):
    /// refused before any rule is looked at. Not produced by [`evaluate`].
    InvalidPath,
    /// The request's method is never forwarded ([`crate::target::is_forwarded_method`]:
    /// CONNECT), whatever the rules say. Not produced by [`evaluate`].
    MethodNotSupported,
}

impl Reason {
    /// The code used in logs, metrics, 403 bodies and `moat policy explain`.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::AllowAuthenticated => "allow-authenticated",
            Reason::NoPolicy => "no-policy",
            Reason::IdentityNotAllowed => "identity-not-allowed",
            Reason::PortNotAllowed => "port-not-allowed",
            Reason::RouteNotAllowed => "route-not-allowed",
            Reason::Revoked => "revoked",
            Reason::JwtMissing => "jwt-missing",
            Reason::JwtMalformed => "jwt-malformed",
            Reason::JwtIssuerUnknown => "jwt-issuer-unknown",
            Reason::JwtAlgorithmNotAllowed => "jwt-algorithm-not-allowed",
            Reason::JwtUnknownKid => "jwt-unknown-kid",
            Reason::JwtBadSignature => "jwt-bad-signature",
            Reason::JwtExpired => "jwt-expired",
            Reason::JwtNotYetValid => "jwt-not-yet-valid",
            Reason::JwtIssuerNotAllowed => "jwt-issuer-not-allowed",
            Reason::JwtAudienceNotAllowed => "jwt-audience-not-allowed",
            Reason::JwtClaimsNotAllowed => "jwt-claims-not-allowed",
            Reason::RateLimited => "rate-limited",
            Reason::CallerBusy => "caller-busy",
            Reason::ProtocolNotAllowed => "protocol-not-allowed",
            Reason::InvalidPath => "invalid-path",
            Reason::MethodNotSupported => "method-not-supported",
        }
    }

    /// Whether this denial is about the end-user token being absent or unacceptable (HTTP 401),
    /// as opposed to what it allows (403).
    pub fn is_unauthenticated(self) -> bool {
        matches!(
            self,
            Reason::JwtMissing
                | Reason::JwtMalformed
                | Reason::JwtIssuerUnknown
                | Reason::JwtAlgorithmNotAllowed
                | Reason::JwtUnknownKid
                | Reason::JwtBadSignature
                | Reason::JwtExpired
                | Reason::JwtNotYetValid
                | Reason::JwtIssuerNotAllowed
                | Reason::JwtAudienceNotAllowed
        )
    }

    /// How far a request got through a rule (for picking the most telling deny reason).
    fn progress(self) -> u8 {
        match self {
            Reason::IdentityNotAllowed => 1,
            Reason::PortNotAllowed => 2,
            Reason::RouteNotAllowed | Reason::ProtocolNotAllowed => 3,
            r if r.is_unauthenticated() => 4,
            Reason::JwtClaimsNotAllowed => 5,
            _ => 0,
        }
    }
}

/// Why one rule did or did not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTrace {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub version: PolicyVersion,
    pub mode: Mode,
    /// 0-based index in `spec.rules`.
    pub rule: usize,
    /// `Reason::Allowed` when it matched, otherwise why not.
    pub outcome: Reason,
}

/// What a decision amounts to, as metrics, access logs, the CLI and the proxies' reports to the
/// control plane name it: the one spelling of these words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    Allow,
    /// Allowed in audit mode; enforcement would have denied it.
    WouldDeny,
    Deny,
}

impl Effect {
    pub const ALL: [Effect; 3] = [Effect::Allow, Effect::WouldDeny, Effect::Deny];

    /// `allow`, `would-deny` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::WouldDeny => "would-deny",
            Effect::Deny => "deny",
        }
    }
}

impl std::str::FromStr for Effect {
    type Err = crate::model::InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::model::word(
            &Effect::ALL,
            Effect::as_str,
            s,
            "unknown decision",
            "use allow, would-deny or deny",
        )
    }
}

/// The verdict with its explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What the proxy does.
    pub allowed: bool,
    /// Why: `allowed` / `allow-authenticated` when allowed, the deny reason otherwise.
    pub reason: Reason,
    /// In audit mode: the deny reason the request would have had under enforcement.
    pub would_deny: Option<Reason>,
    /// The policy (key, version) that allowed, or that denied when a policy denied.
    pub policy: Option<(String, PolicyVersion)>,
    /// The matching rule's index within `policy`.
    pub rule: Option<usize>,
    /// Whether a rule that allowed the request (of the policies that decided) required an
    /// end-user token, so that the request's token passed that rule's issuer, audience and
    /// claim checks. Only then may the token's subject be passed to the app as the verified
    /// user.
    pub token_checked: bool,
    /// Every rule considered, in order.
    pub trace: Vec<RuleTrace>,
}

impl Decision {
    /// What it amounts to: allowed, allowed but denied under enforcement (audit), or denied.
    pub fn effect(&self) -> Effect {
        match (self.allowed, self.would_deny) {
            (true, Some(_)) => Effect::WouldDeny,
            (true, None) => Effect::Allow,
            (false, _) => Effect::Deny,
        }
    }

    /// A denial decided before any policy is looked at (a revoked caller, an invalid path).
    pub fn refused(reason: Reason) -> Decision {
        Decision {
            allowed: false,
            reason,
            would_deny: None,
            policy: None,
            rule: None,
            token_checked: false,
            trace: Vec::new(),
        }
    }
}

fn rule_outcome(rule: &crate::Rule, input: &Input<'_>) -> Reason {
    if !rule.from.iter().any(|f| f == input.peer) {
        return Reason::IdentityNotAllowed;
    }
    if !rule.ports.is_empty() && !rule.ports.contains(&input.port) {
        return Reason::PortNotAllowed;
    }
    match input.traffic {
        Traffic::Connection => Reason::Allowed,
        Traffic::Opaque if !rule.http.is_empty() || rule.jwt.is_some() => {
            Reason::ProtocolNotAllowed
        }
        Traffic::Opaque => Reason::Allowed,
        Traffic::Request { method, path, jwt } => {
            if !rule.http.is_empty() && !rule.http.iter().any(|r| r.matches(method, path)) {
                return Reason::RouteNotAllowed;
            }
            match (&rule.jwt, jwt) {
                (None, _) => Reason::Allowed,
                (Some(_), Jwt::Missing) => Reason::JwtMissing,
                (Some(_), Jwt::Invalid(r)) => r,
                (Some(req), Jwt::Valid(claims)) => jwt_outcome(req, claims),
            }
        }
    }
}

/// The values a claim holds, as strings: a string is itself and its space-separated words
/// (OAuth `scope`), a list its string/number members, a number or boolean its text.
fn claim_values(v: &serde_json::Value) -> Vec<String> {
    use serde_json::Value as V;
    let scalar = |v: &V| match v {
        V::String(s) => Some(s.clone()),
        V::Number(n) => Some(n.to_string()),
        V::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        V::String(s) => std::iter::once(s.clone())
            .chain(s.split_whitespace().map(str::to_owned))
            .collect(),
        V::Array(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other).into_iter().collect(),
    }
}

fn jwt_outcome(req: &crate::model::JwtRequirement, claims: &crate::model::Claims) -> Reason {
    let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
    if !req.issuers.iter().any(|i| i == iss) {
        return Reason::JwtIssuerNotAllowed;
    }
    // `aud` is one string or a list of them, compared exactly.
    let aud: Vec<&str> = match claims.get("aud") {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(v)) => v.iter().filter_map(|a| a.as_str()).collect(),
        _ => Vec::new(),
    };
    if !req.audiences.iter().any(|a| aud.contains(&a.as_str())) {
        return Reason::JwtAudienceNotAllowed;
    }
    for (name, wanted) in &req.claims {
        let held = claims.get(name).map(claim_values).unwrap_or_default();
        if !wanted.iter().all(|w| held.contains(w)) {
            return Reason::JwtClaimsNotAllowed;
        }
    }
    Reason::Allowed
}

/// Verdict of one group of policies (all enforce, or all audit).
struct GroupVerdict<'p> {
    allowed: Option<(&'p AccessPolicy, usize)>,
    /// Whether a rule that allowed the request (not only the first) asked for a token.
    token_checked: bool,
    deny: Reason,
    deny_policy: Option<&'p AccessPolicy>,
}

fn judge<'p>(
    policies: impl Iterator<Item = &'p AccessPolicy>,
    input: &Input<'_>,
    mut trace: Option<&mut Vec<RuleTrace>>,
) -> Option<GroupVerdict<'p>> {
    let mut any = false;
    let mut best = GroupVerdict {
        allowed: None,
        token_checked: false,
        deny: Reason::IdentityNotAllowed,
        deny_policy: None,
    };
    for p in policies {
        any = true;
        if best.deny_policy.is_none() {
            best.deny_policy = Some(p);
        }
        for (i, rule) in p.rules.iter().enumerate() {
            let outcome = rule_outcome(rule, input);
            if let Some(trace) = trace.as_deref_mut() {
                trace.push(RuleTrace {
                    policy: p.key(),
                    version: p.version,
                    mode: p.mode,
                    rule: i,
                    outcome,
                });
            }
            if outcome == Reason::Allowed {
                best.token_checked |= rule.jwt.is_some();
                if best.allowed.is_none() {
                    best.allowed = Some((p, i));
                }
            } else if outcome.progress() > best.deny.progress() {
                best.deny = outcome;
                best.deny_policy = Some(p);
            }
        }
    }
    any.then_some(best)
}

/// Evaluates `input` against the policies whose target is the local service, recording every
/// rule considered in [`Decision::trace`] (for explanations).
pub fn evaluate(policies: &[AccessPolicy], mesh: &MeshConfig, input: &Input<'_>) -> Decision {
    let mut trace = Vec::new();
    let mut d = decide_with(policies, mesh, input, Some(&mut trace));
    d.trace = trace;
    d
}

/// Like [`evaluate`] without the trace: the per-request path.
pub fn decide(policies: &[AccessPolicy], mesh: &MeshConfig, input: &Input<'_>) -> Decision {
    decide_with(policies, mesh, input, None)
}

/// The rules whose rate limits a request that `d` allowed takes a token from: every rule with a
/// limit, in the policies of the mode that decided (enforce, or audit when no policy enforces),
/// that admits the request with its canonical path or with that path as servers commonly read it
/// ([`crate::server_path`]). Not only the rule that allowed it, so neither an overlapping rule
/// without a limit (`/api/*` beside a limited `/api/login`) nor a spelling the limited rule's
/// pattern does not match but the app serves as the same resource (`/api/login;x=1`,
/// `/api/login/`) gets around a limit. Empty when no rule decided (`allow-authenticated`, or an
/// audit policy that would deny).
pub fn limiting_rules<'p>(
    policies: &'p [AccessPolicy],
    d: &Decision,
    input: &Input<'_>,
) -> Vec<(&'p AccessPolicy, usize)> {
    let Some((key, version)) = d.policy.as_ref().filter(|_| d.allowed && d.rule.is_some()) else {
        return Vec::new();
    };
    let Some(mode) = policies
        .iter()
        .find(|p| p.version == *version && p.has_key(key))
        .map(|p| p.mode)
    else {
        return Vec::new();
    };
    let mut limited = policies
        .iter()
        .filter(|p| p.mode == mode)
        .flat_map(|p| p.rules.iter().enumerate().map(move |(i, r)| (p, i, r)))
        .filter(|(_, _, r)| r.rate_limit.is_some())
        .peekable();
    // The common case, no limit at all: nothing more to work out per request.
    if limited.peek().is_none() {
        return Vec::new();
    }
    let read = match input.traffic {
        Traffic::Request { method, path, jwt } => {
            let server = crate::server_path(path);
            (server != path).then(|| (method, server.into_owned(), jwt))
        }
        Traffic::Connection | Traffic::Opaque => None,
    };
    let admits = |rule: &crate::Rule| {
        rule_outcome(rule, input) == Reason::Allowed
            || read.as_ref().is_some_and(|&(method, ref path, jwt)| {
                let as_read = Input {
                    traffic: Traffic::Request {
                        method,
                        path: path.as_str(),
                        jwt,
                    },
                    ..*input
                };
                rule_outcome(rule, &as_read) == Reason::Allowed
            })
    };
    limited
        .filter(|(_, _, r)| admits(r))
        .map(|(p, i, _)| (p, i))
        .collect()
}

fn decide_with(
    policies: &[AccessPolicy],
    mesh: &MeshConfig,
    input: &Input<'_>,
    mut trace: Option<&mut Vec<RuleTrace>>,
) -> Decision {
    let enforce = judge(
        policies.iter().filter(|p| p.mode == Mode::Enforce),
        input,
        trace.as_deref_mut(),
    );
    let audit = judge(
        policies.iter().filter(|p| p.mode == Mode::Audit),
        input,
        trace,
    );
    let trace = Vec::new();
    let key = |p: &AccessPolicy| (p.key(), p.version);
    let allow = |(policy, rule): (&AccessPolicy, usize), token_checked, trace| Decision {
        allowed: true,
        reason: Reason::Allowed,
        would_deny: None,
        policy: Some(key(policy)),
        rule: Some(rule),
        token_checked,
        trace,
    };
    match (enforce, audit) {
        (Some(v), _) => match v.allowed {
            Some(a) => allow(a, v.token_checked, trace),
            None => Decision {
                allowed: false,
                reason: v.deny,
                would_deny: None,
                policy: v.deny_policy.map(key),
                rule: None,
                token_checked: false,
                trace,
            },
        },
        (None, Some(v)) => match v.allowed {
            Some(a) => allow(a, v.token_checked, trace),
            None => Decision {
                allowed: true,
                reason: Reason::Allowed,
                would_deny: Some(v.deny),
                policy: v.deny_policy.map(key),
                rule: None,
                token_checked: false,
                trace,
            },
        },
        (None, None) => match mesh.default_posture {
            DefaultPosture::Deny => Decision {
                allowed: false,
                reason: Reason::NoPolicy,
                would_deny: None,
                policy: None,
                rule: None,
                token_checked: false,
                trace,
            },
            DefaultPosture::AllowAuthenticated => Decision {
                allowed: true,
                reason: Reason::AllowAuthenticated,
                would_deny: None,
                policy: None,
                rule: None,
                token_checked: false,
                trace,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each word of the wire's enumerations parses back to what wrote it, and an unknown word is
    /// refused with its kind.
    #[test]
    fn wire_words_round_trip() {
        use crate::model::{DefaultPosture, JwtAlgorithm, Mode, RateKey};
        for e in Effect::ALL {
            assert_eq!(e.as_str().parse::<Effect>(), Ok(e));
        }
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        for k in RateKey::ALL {
            assert_eq!(k.as_str().parse::<RateKey>(), Ok(k));
        }
        for p in DefaultPosture::ALL {
            assert_eq!(p.as_str().parse::<DefaultPosture>(), Ok(p));
        }
        for a in JwtAlgorithm::ALL {
            assert_eq!(a.as_str().parse::<JwtAlgorithm>(), Ok(a));
        }
        let err = "maybe".parse::<Effect>().unwrap_err();
        assert_eq!(
            (err.problem, err.value.as_str()),
            ("unknown decision", "maybe")
        );
    }
    use crate::{Document, parse_documents};
    use moat_identity::TrustDomain;

    fn policies(yaml: &str) -> Vec<AccessPolicy> {
        parse_documents(yaml, "t", &TrustDomain::default_domain())
            .unwrap()
            .into_iter()
            .filter_map(|d| match d {
                Document::AccessPolicy(p) => Some(p),
                Document::MeshConfig(_) => None,
            })
            .collect()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse_with_default(s, &TrustDomain::default_domain()).unwrap()
    }

    const ORDERS: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      ports: [8080]
      http: [{ methods: [GET], paths: ["/orders", "/orders/*"] }]
    - from: [admin]
"#;

    fn check(
        ps: &[AccessPolicy],
        mesh: &MeshConfig,
        who: &str,
        port: u16,
        http: Option<(&str, &str)>,
    ) -> Decision {
        let peer = id(who);
        let input = Input {
            peer: &peer,
            port,
            traffic: match http {
                Some((method, path)) => Traffic::Request {
                    method,
                    path,
                    jwt: Jwt::Missing,
                },
                None => Traffic::Connection,
            },
        };
        let d = evaluate(ps, mesh, &input);
        // The per-request path decides the same, without the trace.
        let fast = decide(ps, mesh, &input);
        assert!(fast.trace.is_empty());
        assert_eq!(
            (
                fast.allowed,
                fast.reason,
                fast.would_deny,
                &fast.policy,
                fast.rule
            ),
            (d.allowed, d.reason, d.would_deny, &d.policy, d.rule)
        );
        d
    }

    /// A request takes a token from every limited rule that admits it or a spelling of its path
    /// that servers read as the same: an unlimited rule listed first, or `;x=1`, `/` and `//`
    /// spellings that the limited rule's exact pattern does not match, do not get around it.
    #[test]
    fn every_limited_rule_that_admits_a_request_limits_it() {
        let ps = policies(
            r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: api }
spec:
  target: api
  rules:
    - from: [frontend]
      http: [{ paths: ["/api/*"] }]
    - from: [frontend]
      http: [{ methods: [POST], paths: ["/api/login"] }]
      rateLimit: { requestsPerSecond: 1 }
    - from: [frontend]
      http: [{ paths: ["/api/search/*"] }]
      rateLimit: { requestsPerSecond: 5, per: client }
    - from: [admin]
      rateLimit: { requestsPerSecond: 9 }
"#,
        );
        let mesh = MeshConfig::default();
        let limits = |who: &str, method: &str, path: &str| {
            let d = check(&ps, &mesh, who, 80, Some((method, path)));
            assert!(d.allowed, "{method} {path}");
            let peer = id(who);
            let input = Input {
                peer: &peer,
                port: 80,
                traffic: Traffic::Request {
                    method,
                    path,
                    jwt: Jwt::Missing,
                },
            };
            limiting_rules(&ps, &d, &input)
                .into_iter()
                .map(|(p, i)| (p.key(), i))
                .collect::<Vec<_>>()
        };
        let login = vec![("default/api".to_owned(), 1)];
        for path in [
            "/api/login",
            "/api/login;x=1",
            "/api/login/",
            "/api//login;a/",
        ] {
            assert_eq!(limits("frontend", "POST", path), login, "{path}");
        }
        assert_eq!(limits("frontend", "GET", "/api/login"), vec![]);
        assert_eq!(limits("frontend", "POST", "/api/login2"), vec![]);
        assert_eq!(
            limits("frontend", "GET", "/api/search//x"),
            vec![("default/api".to_owned(), 2)]
        );
        assert_eq!(
            limits("admin", "POST", "/api/login"),
            vec![("default/api".to_owned(), 3)]
        );
        // Nothing decided by a rule, nothing limited.
        let open = MeshConfig {
            default_posture: DefaultPosture::AllowAuthenticated,
            ..MeshConfig::default()
        };
        let peer = id("frontend");
        let input = Input {
            peer: &peer,
            port: 80,
            traffic: Traffic::Request {
                method: "POST",
                path: "/api/login",
                jwt: Jwt::Missing,
            },
        };
        let d = decide(&[], &open, &input);
        assert!(d.allowed && limiting_rules(&ps, &d, &input).is_empty());
    }

    #[test]
    fn the_table() {
        let ps = policies(ORDERS);
        let mesh = MeshConfig::default();
        type Case<'a> = (&'a str, u16, Option<(&'a str, &'a str)>, bool, Reason);
        let cases: &[Case<'_>] = &[
            (
                "frontend",
                8080,
                Some(("GET", "/orders")),
                true,
                Reason::Allowed,
            ),
            (
                "frontend",
                8080,
                Some(("GET", "/orders/1")),
                true,
                Reason::Allowed,
            ),
            (
                "frontend",
                8080,
                Some(("GET", "/orders/1/items")),
                true,
                Reason::Allowed,
            ),
            (
                "frontend",
                8080,
                Some(("DELETE", "/orders/1")),
                false,
                Reason::RouteNotAllowed,
            ),
            (
                "frontend",
                8080,
                Some(("GET", "/ordersx")),
                false,
                Reason::RouteNotAllowed,
            ),
            (
                "frontend",
                8080,
                Some(("GET", "/")),
                false,
                Reason::RouteNotAllowed,
            ),
            (
                "frontend",
                9090,
                Some(("GET", "/orders")),
                false,
                Reason::PortNotAllowed,
            ),
            ("frontend", 8080, None, true, Reason::Allowed),
            ("frontend", 9090, None, false, Reason::PortNotAllowed),
            (
                "payments",
                8080,
                Some(("GET", "/orders")),
                false,
                Reason::IdentityNotAllowed,
            ),
            ("payments", 8080, None, false, Reason::IdentityNotAllowed),
            (
                "admin",
                1,
                Some(("DELETE", "/anything")),
                true,
                Reason::Allowed,
            ),
        ];
        for (who, port, http, allowed, reason) in cases {
            let d = check(&ps, &mesh, who, *port, *http);
            assert_eq!(
                (d.allowed, d.reason),
                (*allowed, *reason),
                "{who} {port} {http:?}: {d:?}"
            );
            assert_eq!(d.trace.len(), 2);
        }
        let d = check(&ps, &mesh, "admin", 1, None);
        assert_eq!(
            (d.policy.unwrap().0, d.rule),
            ("default/orders".to_owned(), Some(1))
        );
    }

    #[test]
    fn default_posture_and_audit_mode() {
        let none: Vec<AccessPolicy> = Vec::new();
        let deny = check(&none, &MeshConfig::default(), "a", 1, None);
        assert_eq!((deny.allowed, deny.reason), (false, Reason::NoPolicy));
        let open = MeshConfig {
            default_posture: DefaultPosture::AllowAuthenticated,
            ..MeshConfig::default()
        };
        let allow = check(&none, &open, "a", 1, None);
        assert_eq!(
            (allow.allowed, allow.reason),
            (true, Reason::AllowAuthenticated)
        );

        let audit =
            policies(&ORDERS.replace("  target: orders", "  target: orders\n  mode: audit"));
        let d = check(
            &audit,
            &MeshConfig::default(),
            "payments",
            8080,
            Some(("GET", "/orders")),
        );
        assert!(d.allowed);
        assert_eq!(d.would_deny, Some(Reason::IdentityNotAllowed));
        let d = check(
            &audit,
            &MeshConfig::default(),
            "frontend",
            8080,
            Some(("GET", "/orders")),
        );
        assert_eq!((d.allowed, d.would_deny), (true, None));

        // An enforce policy next to an audit one decides alone.
        let mut both = policies(ORDERS);
        both.extend(audit);
        let d = check(&both, &MeshConfig::default(), "payments", 8080, None);
        assert!(!d.allowed);
        assert_eq!(d.trace.len(), 4);
    }

    /// Detection never widens access: opaque TCP passes only a rule with no L7 part, and
    /// methods are case-sensitive.
    #[test]
    fn opaque_traffic_needs_a_rule_without_http() {
        let ps = policies(ORDERS);
        let mesh = MeshConfig::default();
        let decide_opaque = |who: &str, port| {
            let peer = id(who);
            evaluate(
                &ps,
                &mesh,
                &Input {
                    peer: &peer,
                    port,
                    traffic: Traffic::Opaque,
                },
            )
        };
        let d = decide_opaque("frontend", 8080);
        assert_eq!((d.allowed, d.reason), (false, Reason::ProtocolNotAllowed));
        let d = decide_opaque("admin", 8080);
        assert_eq!((d.allowed, d.reason), (true, Reason::Allowed));
        let d = decide_opaque("payments", 8080);
        assert_eq!((d.allowed, d.reason), (false, Reason::IdentityNotAllowed));
        let d = check(&ps, &mesh, "frontend", 8080, Some(("get", "/orders")));
        assert_eq!((d.allowed, d.reason), (false, Reason::RouteNotAllowed));
    }

    /// A token counts as checked only when the rule that allowed the request asked for one: a
    /// valid token on a route whose rule has no `jwt` was never held to any rule's issuers,
    /// audiences or claims, and one that fails them on an audited route is only would-deny.
    #[test]
    fn a_token_is_checked_only_by_a_rule_that_asks_for_one() {
        let mut ps = policies(
            r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      http: [{ methods: [GET], paths: ["/public/*"] }]
    - from: [frontend]
      http: [{ methods: [GET], paths: ["/account/*"] }]
      jwt: { issuers: [https://id.example], audiences: [orders] }
"#,
        );
        let mesh = MeshConfig::default();
        let peer = id("frontend");
        let claims = |aud: &str| -> crate::model::Claims {
            serde_json::from_value(serde_json::json!({
                "iss": "https://id.example", "aud": aud, "sub": "alice"
            }))
            .unwrap()
        };
        let (orders, billing) = (claims("orders"), claims("billing"));
        let decide_with = |ps: &[AccessPolicy], path, claims| {
            decide(
                ps,
                &mesh,
                &Input {
                    peer: &peer,
                    port: 8080,
                    traffic: Traffic::Request {
                        method: "GET",
                        path,
                        jwt: Jwt::Valid(claims),
                    },
                },
            )
        };
        let d = decide_with(&ps, "/account/1", &orders);
        assert_eq!((d.allowed, d.token_checked), (true, true));
        // A broader rule without `jwt` allowing first does not hide one that checked the token.
        let mut broad = ps.clone();
        broad[0].rules[0].http[0].paths = vec!["/*".parse().unwrap()];
        let d = decide_with(&broad, "/account/1", &orders);
        assert_eq!((d.rule, d.token_checked), (Some(0), true));
        let d = decide_with(&broad, "/account/1", &billing);
        assert_eq!((d.rule, d.token_checked), (Some(0), false));
        // Another service's token, on a route that does not ask for one: allowed, unchecked.
        let d = decide_with(&ps, "/public/1", &billing);
        assert_eq!((d.allowed, d.rule, d.token_checked), (true, Some(0), false));
        let d = decide_with(&ps, "/account/1", &billing);
        assert_eq!(
            (d.allowed, d.reason, d.token_checked),
            (false, Reason::JwtAudienceNotAllowed, false)
        );
        ps[0].mode = Mode::Audit;
        let d = decide_with(&ps, "/account/1", &billing);
        assert_eq!(
            (d.allowed, d.would_deny, d.token_checked),
            (true, Some(Reason::JwtAudienceNotAllowed), false)
        );
        let d = decide_with(&ps, "/account/1", &orders);
        assert_eq!(
            (d.allowed, d.would_deny, d.token_checked),
            (true, None, true)
        );
    }
}
