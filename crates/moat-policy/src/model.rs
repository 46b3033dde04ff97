//! Validated policy types. Every value here has passed validation; the evaluator never
//! re-checks.

use std::fmt;
use std::str::FromStr;

use moat_identity::SpiffeId;

/// The verified claims of an end-user token.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// A policy value that is not valid: what is wrong, what was written, and how to write it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{problem} {value:?}: {hint}")]
pub struct InvalidValue {
    /// What is wrong, e.g. `invalid method`.
    pub problem: &'static str,
    /// The value as written.
    pub value: String,
    /// How to write it.
    pub hint: &'static str,
}

impl InvalidValue {
    fn new(problem: &'static str, value: &str, hint: &'static str) -> Self {
        InvalidValue {
            problem,
            value: value.to_owned(),
            hint,
        }
    }
}

/// A policy's name (DNS-label style, like a Kubernetes object name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyName(String);

impl FromStr for PolicyName {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.']);
        if ok {
            Ok(PolicyName(s.to_owned()))
        } else {
            Err(InvalidValue::new(
                "invalid name",
                s,
                "use lowercase letters, digits, '-' and '.', at most 253",
            ))
        }
    }
}

impl PolicyName {
    /// The name as written, as its `Display` writes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The store revision at which a policy was applied; grows with every change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyVersion(pub u64);

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Enforce denies; audit only reports what it would deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Enforce, Mode::Audit];

    /// `enforce` or `audit`: the word on the wire and in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl FromStr for Mode {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        word(
            &Mode::ALL,
            Mode::as_str,
            s,
            "unknown mode",
            "use enforce or audit",
        )
    }
}

/// The one of `all` that `as_str` spells `s`.
pub(crate) fn word<T: Copy>(
    all: &[T],
    as_str: fn(T) -> &'static str,
    s: &str,
    what: &'static str,
    hint: &'static str,
) -> Result<T, InvalidValue> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == s)
        .ok_or_else(|| InvalidValue {
            problem: what,
            value: s.to_owned(),
            hint,
        })
}

/// An HTTP method: an upper-case token (letters, `-`, `_`). Methods are case-sensitive (RFC 9110),
/// so `GET` never matches a request sent as `get`. `*` is not a method: leave `methods` empty
/// for any.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Method(String);

impl FromStr for Method {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.chars()
                .all(|c| c.is_ascii_uppercase() || c == '-' || c == '_');
        if ok {
            Ok(Method(s.to_owned()))
        } else {
            Err(InvalidValue::new(
                "invalid method",
                s,
                "write an uppercase HTTP method such as GET or POST",
            ))
        }
    }
}

impl Method {
    /// The method token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A path pattern: exact (`/orders`), or a prefix ending in `/*` (`/orders/*` matches `/orders/1`
/// and `/orders/1/items`, not `/orders` itself), or `*` for any path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathPattern {
    Any,
    Exact(String),
    /// The prefix including its trailing `/`.
    Prefix(String),
}

impl FromStr for PathPattern {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        if s == "*" {
            return Ok(PathPattern::Any);
        }
        if !s.starts_with('/') {
            return Err(InvalidValue::new(
                "invalid path pattern",
                s,
                "it must start with '/' (or be '*')",
            ));
        }
        if s.chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '?' || c == '#')
        {
            return Err(InvalidValue::new(
                "invalid path pattern",
                s,
                "no spaces, control characters, '?' or '#'",
            ));
        }
        match s.find('*') {
            None => Ok(PathPattern::Exact(s.to_owned())),
            Some(i) if i == s.len() - 1 && s.ends_with("/*") => {
                Ok(PathPattern::Prefix(s[..i].to_owned()))
            }
            Some(_) => Err(InvalidValue::new(
                "invalid path pattern",
                s,
                "'*' is allowed only as a final '/*' segment",
            )),
        }
    }
}

impl PathPattern {
    /// Whether `path` (without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(p) => p == path,
            PathPattern::Prefix(p) => path.len() > p.len() && path.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Any => f.write_str("*"),
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// One L7 alternative: any listed method (or any, when empty) on any listed path (or any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoute {
    pub methods: Vec<Method>,
    pub paths: Vec<PathPattern>,
}

impl HttpRoute {
    /// Whether a request matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m.as_str() == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

/// One allow rule: callers, optional ports, optional HTTP routes, an optional end-user token
/// requirement and an optional rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<SpiffeId>,
    /// Empty: any port.
    pub ports: Vec<u16>,
    /// Empty: any request. Non-empty: a request must match one route.
    pub http: Vec<HttpRoute>,
    /// A verified JWT the request must carry (HTTP only: a rule with one never admits opaque TCP).
    pub jwt: Option<JwtRequirement>,
    /// Requests this rule admits are throttled by the inbound sidecar.
    pub rate_limit: Option<RateLimit>,
}

/// What a rule asks of the end-user token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtRequirement {
    /// Accepted `iss` values (each must be a trusted issuer of the mesh config).
    pub issuers: Vec<String>,
    /// Accepted audiences: the token's `aud` must name at least one.
    pub audiences: Vec<String>,
    /// Claim name → values that must all be present. A claim holding a string matches a value
    /// exactly or, split at spaces (OAuth `scope`), by membership; a list claim by membership.
    pub claims: std::collections::BTreeMap<String, Vec<String>>,
}

/// What a rate limit counts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// Each calling identity has its own bucket.
    Client,
    /// Each route (method and path) has its own bucket, shared by all callers.
    Route,
    /// Each (caller, route) pair has its own bucket.
    ClientAndRoute,
}

impl FromStr for RateKey {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        word(
            &RateKey::ALL,
            RateKey::as_str,
            s,
            "unknown rate key",
            "use client, route or client-and-route",
        )
    }
}

impl RateKey {
    pub const ALL: [RateKey; 3] = [RateKey::Client, RateKey::Route, RateKey::ClientAndRoute];

    /// `client`, `route` or `client-and-route`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateKey::Client => "client",
            RateKey::Route => "route",
            RateKey::ClientAndRoute => "client-and-route",
        }
    }
}

/// A token bucket: `requests_per_second` refill, `burst` capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
    pub per: RateKey,
}

/// A JWT signature algorithm moat accepts. Shared-secret algorithms (HS*) and `none` never are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    RS256,
    ES256,
    EdDSA,
}

impl JwtAlgorithm {
    pub const ALL: [JwtAlgorithm; 3] = [
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ];

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }
}

impl FromStr for JwtAlgorithm {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        JwtAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                InvalidValue::new("unsupported algorithm", s, "use RS256, ES256 or EdDSA")
            })
    }
}

/// Where an issuer's signing keys (a JWKS document) come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// The JWKS JSON itself.
    Inline(String),
    /// A file on the control plane's host, re-read every `refresh`.
    File {
        path: String,
        refresh: std::time::Duration,
    },
    /// An HTTPS URL the control plane fetches every `refresh` (server verified against
    /// `ca_file` when given, else the system roots), presenting the token in `token_file` (read
    /// at every fetch) as a bearer token when given: the Kubernetes API server serves its
    /// service-account keys only to authenticated callers.
    Url {
        url: String,
        ca_file: Option<String>,
        token_file: Option<String>,
        refresh: std::time::Duration,
    },
}

/// A token issuer the mesh trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtIssuer {
    /// The `iss` value.
    pub issuer: String,
    pub jwks: JwksSource,
    pub algorithms: Vec<JwtAlgorithm>,
    /// Tolerance for `exp` and `nbf`.
    pub clock_skew: std::time::Duration,
}

/// An allow-list for one target service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    pub name: PolicyName,
    /// The namespace the policy object lives in (`default` when not given).
    pub namespace: String,
    pub target: SpiffeId,
    pub mode: Mode,
    pub rules: Vec<Rule>,
    /// Assigned by the control plane when stored; 0 for a policy read from a file.
    pub version: PolicyVersion,
}

impl AccessPolicy {
    /// `namespace/name`, the policy's key. Built on every request a policy decides, so without
    /// the formatting machinery and in one allocation of the exact size.
    pub fn key(&self) -> String {
        let name = self.name.as_str();
        let mut key = String::with_capacity(self.namespace.len() + 1 + name.len());
        key.push_str(&self.namespace);
        key.push('/');
        key.push_str(name);
        key
    }

    /// Whether `key` is this policy's [`key`](Self::key), compared without building it.
    pub fn has_key(&self, key: &str) -> bool {
        key.strip_prefix(self.namespace.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            == Some(self.name.as_str())
    }
}

/// What happens to a service with no policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DefaultPosture {
    /// Zero trust: deny everything.
    #[default]
    Deny,
    /// Migration aid: allow any caller with a valid mesh certificate.
    AllowAuthenticated,
}

impl FromStr for DefaultPosture {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        word(
            &DefaultPosture::ALL,
            DefaultPosture::as_str,
            s,
            "unknown default posture",
            "use deny or allow-authenticated",
        )
    }
}

impl DefaultPosture {
    pub const ALL: [DefaultPosture; 2] = [DefaultPosture::Deny, DefaultPosture::AllowAuthenticated];

    /// `deny` or `allow-authenticated`.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPosture::Deny => "deny",
            DefaultPosture::AllowAuthenticated => "allow-authenticated",
        }
    }
}

/// Mesh-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MeshConfig {
    pub default_posture: DefaultPosture,
    /// End-user token issuers rules may require.
    pub jwt_issuers: Vec<JwtIssuer>,
    /// The Kubernetes service-account token issuer whose tokens prove pod identities.
    pub kubernetes: Option<ServiceAccountIssuer>,
    /// Which AES-GCM suite sidecars prefer between themselves.
    pub cipher_preference: CipherPreference,
}

/// The TLS 1.3 cipher suite sidecars put first when they talk to each other. Both suites stay
/// enabled either way; the preference decides which one a handshake picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CipherPreference {
    /// TLS_AES_256_GCM_SHA384: a symmetric cipher as strong as ML-KEM-768's key exchange.
    #[default]
    Aes256Gcm,
    /// TLS_AES_128_GCM_SHA256: a cheaper handshake where the CPU hashes SHA-256 in hardware but
    /// SHA-384 in software.
    Aes128Gcm,
}

impl FromStr for CipherPreference {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        word(
            &CipherPreference::ALL,
            CipherPreference::as_str,
            s,
            "unknown cipher preference",
            "use aes-256-gcm or aes-128-gcm",
        )
    }
}

impl CipherPreference {
    pub const ALL: [CipherPreference; 2] =
        [CipherPreference::Aes256Gcm, CipherPreference::Aes128Gcm];

    /// `aes-256-gcm` or `aes-128-gcm`.
    pub fn as_str(self) -> &'static str {
        match self {
            CipherPreference::Aes256Gcm => "aes-256-gcm",
            CipherPreference::Aes128Gcm => "aes-128-gcm",
        }
    }
}

/// A cluster's service-account token issuer: projected tokens for `audience`, signed by its keys,
/// prove `ns/<namespace>/sa/<service account>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountIssuer {
    pub issuer: JwtIssuer,
    /// The audience the projected token must carry (`moat`).
    pub audience: String,
}

impl MeshConfig {
    /// The trusted issuer whose `iss` is `issuer`.
    pub fn issuer(&self, issuer: &str) -> Option<&JwtIssuer> {
        self.jwt_issuers.iter().find(|i| i.issuer == issuer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `has_key` agrees with `key` on the key itself and on every near miss.
    #[test]
    fn a_key_is_recognised_without_being_built() {
        let mut p = AccessPolicy {
            name: "api".parse().unwrap(),
            namespace: "shop".to_owned(),
            target: "spiffe://mesh.test/ns/shop/sa/api".parse().unwrap(),
            mode: Mode::Enforce,
            rules: Vec::new(),
            version: PolicyVersion(7),
        };
        assert_eq!(p.key(), "shop/api");
        assert!(p.has_key("shop/api"));
        for other in [
            "shop/ap",
            "shop/apix",
            "sho/api",
            "shop//api",
            "shopapi",
            "shop/",
            "/api",
            "",
        ] {
            assert!(!p.has_key(other), "{other}");
        }
        p.namespace = "sh/op".to_owned();
        assert!(p.has_key(&p.key()));
    }
}
