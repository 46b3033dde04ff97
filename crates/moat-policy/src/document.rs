//! Policy documents (YAML or JSON; several YAML documents per file separated by `---`) into
//! validated [`AccessPolicy`] and [`MeshConfig`] values. Unknown fields are refused; identities go
//! through the one identity parser; path patterns and methods are checked. Every error names the
//! source, the document, and the line (syntax, unknown fields) or the field path (values).

use std::fmt;

use moat_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{
    AccessPolicy, CipherPreference, DefaultPosture, HttpRoute, InvalidValue, JwksSource,
    JwtAlgorithm, JwtIssuer, JwtRequirement, MeshConfig, Mode, PolicyName, PolicyVersion, RateKey,
    RateLimit, Rule,
};

/// Default and bounds of a JWKS refresh interval.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(86400);
/// Default and bound of an issuer's clock skew.
const DEFAULT_SKEW: Duration = Duration::from_secs(30);
const MAX_SKEW: Duration = Duration::from_secs(300);
/// Bounds of a rate limit.
const MAX_RATE: u32 = 1_000_000;

/// The largest policy input accepted, per file.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;
/// The API version of every moat document.
pub const API_VERSION: &str = "moat.dev/v1";

/// One parsed document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Document {
    AccessPolicy(AccessPolicy),
    MeshConfig(MeshConfig),
}

/// A refused document, with where the problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    /// The file name (or `<input>`).
    pub source: String,
    /// 1-based document number within the source.
    pub document: usize,
    /// 1-based line in the source, when known.
    pub line: Option<usize>,
    /// Field path such as `spec.rules[0].from[1]`, when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": document {}", self.document)?;
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for DocumentError {}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AccessPolicyDoc {
    api_version: String,
    kind: String,
    metadata: MetadataDoc,
    spec: AccessPolicySpec,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MetadataDoc {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum ModeDoc {
    Enforce,
    Audit,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AccessPolicySpec {
    target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<ModeDoc>,
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    from: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    http: Vec<HttpDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jwt: Option<JwtDoc>,
    #[serde(default, rename = "rateLimit", skip_serializing_if = "Option::is_none")]
    rate_limit: Option<RateLimitDoc>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct JwtDoc {
    issuers: Vec<String>,
    audiences: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    claims: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize, Serialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum RateKeyDoc {
    Client,
    Route,
    ClientAndRoute,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RateLimitDoc {
    requests_per_second: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per: Option<RateKeyDoc>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JwtIssuerDoc {
    issuer: String,
    jwks: JwksDoc,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    algorithms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clock_skew: Option<String>,
}

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JwksDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HttpDoc {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshConfigDoc {
    api_version: String,
    kind: String,
    metadata: MetadataDoc,
    spec: MeshConfigSpec,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PostureDoc {
    Deny,
    AllowAuthenticated,
}

#[derive(Deserialize, Serialize)]
enum CipherDoc {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    #[serde(rename = "aes-128-gcm")]
    Aes128Gcm,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshConfigSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default_posture: Option<PostureDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cipher_preference: Option<CipherDoc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    jwt_issuers: Vec<JwtIssuerDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubernetesDoc>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubernetesDoc {
    issuer: String,
    jwks: JwksDoc,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    algorithms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clock_skew: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audience: Option<String>,
}

/// Splits YAML text into documents at `---` lines; returns each with its first line number.
fn split(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Parses every document in `text`. `source` names the input in errors; short identity forms
/// resolve in `trust_domain`. Returns all errors found, not just the first.
pub fn parse_documents(
    text: &str,
    source: &str,
    trust_domain: &TrustDomain,
) -> Result<Vec<Document>, Vec<DocumentError>> {
    parse(text, source, trust_domain, false)
}

/// [`parse_documents`], and with `new` the checks of [`parse_new_documents`] on each document
/// that parsed, so one run reports every document's errors, whichever kind they are.
fn parse(
    text: &str,
    source: &str,
    trust_domain: &TrustDomain,
    new: bool,
) -> Result<Vec<Document>, Vec<DocumentError>> {
    let err = |document: usize, line: Option<usize>, field: Option<String>, message: String| {
        DocumentError {
            source: source.to_owned(),
            document,
            line,
            field,
            message,
        }
    };
    if text.len() > MAX_INPUT_BYTES {
        return Err(vec![err(
            0,
            None,
            None,
            format!(
                "input is {} bytes; the limit is {MAX_INPUT_BYTES}",
                text.len()
            ),
        )]);
    }
    let docs = split(text);
    if docs.is_empty() {
        return Err(vec![err(
            0,
            None,
            None,
            "no documents: the input is empty".into(),
        )]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (n, (first_line, doc)) in docs.iter().enumerate() {
        let n = n + 1;
        let yaml_err = |e: serde_yaml_ng::Error| {
            let line = e.location().map(|l| first_line + l.line() - 1);
            err(n, line, None, e.to_string())
        };
        let probe: Probe = match serde_yaml_ng::from_str(doc) {
            Ok(p) => p,
            Err(e) => {
                errors.push(yaml_err(e));
                continue;
            }
        };
        match probe.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                errors.push(err(
                    n,
                    Some(*first_line),
                    Some("apiVersion".into()),
                    format!("unsupported apiVersion {other:?}; use {API_VERSION}"),
                ));
                continue;
            }
            None => {
                errors.push(err(
                    n,
                    Some(*first_line),
                    Some("apiVersion".into()),
                    format!("missing; use {API_VERSION}"),
                ));
                continue;
            }
        }
        let parsed = match probe.kind.as_deref() {
            Some("AccessPolicy") => serde_yaml_ng::from_str::<AccessPolicyDoc>(doc)
                .map_err(|e| vec![yaml_err(e)])
                .and_then(|d| {
                    access_policy(d, trust_domain).map_err(|(f, m)| vec![err(n, None, Some(f), m)])
                })
                .map(Document::AccessPolicy),
            Some("MeshConfig") => serde_yaml_ng::from_str::<MeshConfigDoc>(doc)
                .map_err(|e| vec![yaml_err(e)])
                .and_then(|d| mesh_config(d).map_err(|(f, m)| vec![err(n, None, Some(f), m)]))
                .map(Document::MeshConfig),
            Some(other) => Err(vec![err(
                n,
                Some(*first_line),
                Some("kind".into()),
                format!("unknown kind {other:?}; expected AccessPolicy or MeshConfig"),
            )]),
            None => Err(vec![err(
                n,
                Some(*first_line),
                Some("kind".into()),
                "missing; expected AccessPolicy or MeshConfig".into(),
            )]),
        };
        match parsed {
            Ok(d) => {
                if new {
                    errors.extend(check_new_document(n, &d, source));
                }
                out.push(d);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Parses documents that are about to be stored: `moat policy apply` and `validate`, the control
/// plane's `Apply` and the resources its Kubernetes controller stores. On top of
/// [`parse_documents`], it refuses what a stored policy may still hold but new input must not:
/// a rule that names a method sidecars never forward (CONNECT), which would read as an
/// allowance that no request can use. Policies already stored are read with
/// [`parse_documents`], so one stored before this check still loads.
pub fn parse_new_documents(
    text: &str,
    source: &str,
    trust_domain: &TrustDomain,
) -> Result<Vec<Document>, Vec<DocumentError>> {
    parse(text, source, trust_domain, true)
}

/// What [`parse_new_documents`] adds to [`parse_documents`], for documents already parsed from
/// `source` (all of them, in order: the n-th is the source's n-th document).
pub fn check_new_documents(docs: &[Document], source: &str) -> Result<(), Vec<DocumentError>> {
    let errors: Vec<DocumentError> = docs
        .iter()
        .enumerate()
        .flat_map(|(n, doc)| check_new_document(n + 1, doc, source))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// What new input may not hold in `doc`, the `n`-th document (from 1) of `source`.
fn check_new_document(n: usize, doc: &Document, source: &str) -> Vec<DocumentError> {
    let Document::AccessPolicy(p) = doc else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for (i, r) in p.rules.iter().enumerate() {
        for (k, h) in r.http.iter().enumerate() {
            for (j, m) in h.methods.iter().enumerate() {
                if !crate::target::is_forwarded_method(m.as_str()) {
                    errors.push(DocumentError {
                        source: source.to_owned(),
                        document: n,
                        line: None,
                        field: Some(format!("spec.rules[{i}].http[{k}].methods[{j}]")),
                        message: format!(
                            "{} is never forwarded: sidecars refuse it before any rule is looked at (method-not-supported); remove it, and carry tunnelled traffic as opaque TCP with a rule without `http` on its port",
                            m.as_str()
                        ),
                    });
                }
            }
        }
    }
    errors
}

type FieldError = (String, String);

fn access_policy(d: AccessPolicyDoc, td: &TrustDomain) -> Result<AccessPolicy, FieldError> {
    let name: PolicyName = d
        .metadata
        .name
        .parse()
        .map_err(|m: InvalidValue| ("metadata.name".to_owned(), m.to_string()))?;
    let namespace = match d.metadata.namespace {
        None => "default".to_owned(),
        Some(ns) => ns
            .parse::<moat_identity::Namespace>()
            .map(|n| n.to_string())
            .map_err(|e| ("metadata.namespace".to_owned(), e.to_string()))?,
    };
    let target = identity(&d.spec.target, td).map_err(|m| ("spec.target".to_owned(), m))?;
    let mut rules = Vec::with_capacity(d.spec.rules.len());
    for (i, r) in d.spec.rules.into_iter().enumerate() {
        let at = |f: &str| format!("spec.rules[{i}].{f}");
        if r.from.is_empty() {
            return Err((at("from"), "must name at least one caller identity".into()));
        }
        let from = r
            .from
            .iter()
            .enumerate()
            .map(|(j, s)| identity(s, td).map_err(|m| (at(&format!("from[{j}]")), m)))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(j) = r.ports.iter().position(|p| *p == 0) {
            return Err((
                at(&format!("ports[{j}]")),
                "port 0 is not a port; use 1..65535".into(),
            ));
        }
        let mut http = Vec::with_capacity(r.http.len());
        for (k, h) in r.http.into_iter().enumerate() {
            let methods = h
                .methods
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    m.parse().map_err(|e: InvalidValue| {
                        (at(&format!("http[{k}].methods[{j}]")), e.to_string())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let paths = h
                .paths
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    p.parse().map_err(|e: InvalidValue| {
                        (at(&format!("http[{k}].paths[{j}]")), e.to_string())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            http.push(HttpRoute { methods, paths });
        }
        let jwt = r
            .jwt
            .map(|j| jwt_requirement(j, &|f: &str| at(&format!("jwt.{f}"))))
            .transpose()?;
        let rate_limit = r
            .rate_limit
            .map(|l| rate_limit(l, &|f: &str| at(&format!("rateLimit.{f}"))))
            .transpose()?;
        rules.push(Rule {
            from,
            ports: r.ports,
            http,
            jwt,
            rate_limit,
        });
    }
    Ok(AccessPolicy {
        name,
        namespace,
        target,
        mode: match d.spec.mode {
            None | Some(ModeDoc::Enforce) => Mode::Enforce,
            Some(ModeDoc::Audit) => Mode::Audit,
        },
        rules,
        version: PolicyVersion::default(),
    })
}

fn identity(s: &str, td: &TrustDomain) -> Result<SpiffeId, String> {
    SpiffeId::parse_with_default(s, td).map_err(|e| e.to_string())
}

fn plain(s: &str, what: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "invalid {what} {s:?}: non-empty, at most {max} characters, no spaces"
        ));
    }
    Ok(())
}

fn jwt_requirement(j: JwtDoc, at: &dyn Fn(&str) -> String) -> Result<JwtRequirement, FieldError> {
    if j.issuers.is_empty() {
        return Err((at("issuers"), "must name at least one issuer".into()));
    }
    if j.audiences.is_empty() {
        return Err((
            at("audiences"),
            "must name at least one audience (the token's `aud` must be meant for this service)"
                .into(),
        ));
    }
    for (i, s) in j.issuers.iter().enumerate() {
        plain(s, "issuer", 512).map_err(|m| (at(&format!("issuers[{i}]")), m))?;
    }
    for (i, s) in j.audiences.iter().enumerate() {
        plain(s, "audience", 512).map_err(|m| (at(&format!("audiences[{i}]")), m))?;
    }
    for (name, values) in &j.claims {
        plain(name, "claim name", 128).map_err(|m| (at(&format!("claims.{name}")), m))?;
        if values.is_empty() || values.iter().any(|v| v.is_empty() || v.len() > 512) {
            return Err((
                at(&format!("claims.{name}")),
                "list the required values (each non-empty, at most 512 characters)".into(),
            ));
        }
    }
    Ok(JwtRequirement {
        issuers: j.issuers,
        audiences: j.audiences,
        claims: j.claims,
    })
}

fn rate_limit(l: RateLimitDoc, at: &dyn Fn(&str) -> String) -> Result<RateLimit, FieldError> {
    if l.requests_per_second == 0 || l.requests_per_second > MAX_RATE {
        return Err((
            at("requestsPerSecond"),
            format!("must be between 1 and {MAX_RATE}"),
        ));
    }
    let burst = l.burst.unwrap_or(l.requests_per_second);
    if burst == 0 || burst > MAX_RATE.saturating_mul(10) {
        return Err((
            at("burst"),
            format!("must be between 1 and {}", MAX_RATE * 10),
        ));
    }
    Ok(RateLimit {
        requests_per_second: l.requests_per_second,
        burst,
        per: match l.per {
            None | Some(RateKeyDoc::Client) => RateKey::Client,
            Some(RateKeyDoc::Route) => RateKey::Route,
            Some(RateKeyDoc::ClientAndRoute) => RateKey::ClientAndRoute,
        },
    })
}

fn duration(s: &str, lo: Duration, hi: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (write e.g. 30s, 5m)"))?;
    if d < lo || d > hi {
        return Err(format!(
            "{s:?} is out of range: between {} and {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        ));
    }
    Ok(d)
}

fn jwt_issuer(d: JwtIssuerDoc, at: &dyn Fn(&str) -> String) -> Result<JwtIssuer, FieldError> {
    plain(&d.issuer, "issuer", 512).map_err(|m| (at("issuer"), m))?;
    let algorithms = if d.algorithms.is_empty() {
        JwtAlgorithm::ALL.to_vec()
    } else {
        d.algorithms
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse()
                    .map_err(|m: InvalidValue| (at(&format!("algorithms[{i}]")), m.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let clock_skew = match &d.clock_skew {
        None => DEFAULT_SKEW,
        Some(s) => duration(s, Duration::ZERO, MAX_SKEW).map_err(|m| (at("clockSkew"), m))?,
    };
    let j = d.jwks;
    let refresh = match &j.refresh {
        None => DEFAULT_REFRESH,
        Some(s) => duration(s, MIN_REFRESH, MAX_REFRESH).map_err(|m| (at("jwks.refresh"), m))?,
    };
    let jwks = match (j.inline, j.file, j.url) {
        (Some(json), None, None) => {
            if j.ca_file.is_some() || j.token_file.is_some() || j.refresh.is_some() {
                return Err((
                    at("jwks"),
                    "caFile, tokenFile and refresh apply to url (and refresh to file), not inline"
                        .into(),
                ));
            }
            crate::jwt::Jwks::parse(&json, &algorithms)
                .map_err(|m| (at("jwks.inline"), m.to_string()))?;
            JwksSource::Inline(json)
        }
        (None, Some(path), None) => {
            if j.ca_file.is_some() {
                return Err((at("jwks.caFile"), "caFile applies to url only".into()));
            }
            if j.token_file.is_some() {
                return Err((at("jwks.tokenFile"), "tokenFile applies to url only".into()));
            }
            if !path.starts_with('/') {
                return Err((
                    at("jwks.file"),
                    format!("{path:?} must be an absolute path on the control plane's host"),
                ));
            }
            JwksSource::File { path, refresh }
        }
        (None, None, Some(url)) => {
            if !url.starts_with("https://") || url.len() > 2048 || url.contains(char::is_whitespace)
            {
                return Err((at("jwks.url"), format!("{url:?} must be an https:// URL")));
            }
            if let Some(path) = &j.token_file
                && !path.starts_with('/')
            {
                return Err((
                    at("jwks.tokenFile"),
                    format!("{path:?} must be an absolute path on the control plane's host"),
                ));
            }
            JwksSource::Url {
                url,
                ca_file: j.ca_file,
                token_file: j.token_file,
                refresh,
            }
        }
        _ => {
            return Err((
                at("jwks"),
                "give exactly one of inline (the JWKS JSON), file or url".into(),
            ));
        }
    };
    Ok(JwtIssuer {
        issuer: d.issuer,
        jwks,
        algorithms,
        clock_skew,
    })
}

fn mesh_config(d: MeshConfigDoc) -> Result<MeshConfig, FieldError> {
    let mut jwt_issuers: Vec<JwtIssuer> = Vec::with_capacity(d.spec.jwt_issuers.len());
    for (i, doc) in d.spec.jwt_issuers.into_iter().enumerate() {
        let at = |f: &str| format!("spec.jwtIssuers[{i}].{f}");
        let issuer = jwt_issuer(doc, &at)?;
        if jwt_issuers.iter().any(|o| o.issuer == issuer.issuer) {
            return Err((at("issuer"), format!("{:?} is listed twice", issuer.issuer)));
        }
        jwt_issuers.push(issuer);
    }
    let kubernetes = match d.spec.kubernetes {
        None => None,
        Some(k) => {
            let at = |f: &str| format!("spec.kubernetes.{f}");
            let audience = k.audience.unwrap_or_else(|| "moat".to_owned());
            plain(&audience, "audience", 512).map_err(|m| (at("audience"), m))?;
            let issuer = jwt_issuer(
                JwtIssuerDoc {
                    issuer: k.issuer,
                    jwks: k.jwks,
                    algorithms: k.algorithms,
                    clock_skew: k.clock_skew,
                },
                &at,
            )?;
            Some(crate::model::ServiceAccountIssuer { issuer, audience })
        }
    };
    Ok(MeshConfig {
        default_posture: match d.spec.default_posture {
            None | Some(PostureDoc::Deny) => DefaultPosture::Deny,
            Some(PostureDoc::AllowAuthenticated) => DefaultPosture::AllowAuthenticated,
        },
        jwt_issuers,
        kubernetes,
        cipher_preference: match d.spec.cipher_preference {
            None | Some(CipherDoc::Aes256Gcm) => CipherPreference::Aes256Gcm,
            Some(CipherDoc::Aes128Gcm) => CipherPreference::Aes128Gcm,
        },
    })
}

/// Checks that every issuer a rule of `policies` requires is one `mesh` trusts.
pub fn check_issuers<'p>(
    policies: impl IntoIterator<Item = &'p AccessPolicy>,
    mesh: &MeshConfig,
) -> Result<(), String> {
    for p in policies {
        for (i, r) in p.rules.iter().enumerate() {
            for iss in r.jwt.iter().flat_map(|j| &j.issuers) {
                if mesh.issuer(iss).is_none() {
                    return Err(format!(
                        "policy {} rule {i} requires tokens from {iss:?}, which the MeshConfig does not list under jwtIssuers: add the issuer (with its JWKS) first",
                        p.key()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The canonical YAML document of a policy (full SPIFFE IDs), which parses back to an equal
/// policy (version aside). The control plane stores this form.
pub fn access_policy_yaml(p: &AccessPolicy) -> String {
    let doc = AccessPolicyDoc {
        api_version: API_VERSION.to_owned(),
        kind: "AccessPolicy".to_owned(),
        metadata: MetadataDoc {
            name: p.name.to_string(),
            namespace: Some(p.namespace.clone()),
        },
        spec: AccessPolicySpec {
            target: p.target.to_string(),
            mode: Some(match p.mode {
                Mode::Enforce => ModeDoc::Enforce,
                Mode::Audit => ModeDoc::Audit,
            }),
            rules: p
                .rules
                .iter()
                .map(|r| RuleDoc {
                    from: r.from.iter().map(|f| f.to_string()).collect(),
                    ports: r.ports.clone(),
                    http: r
                        .http
                        .iter()
                        .map(|h| HttpDoc {
                            methods: h.methods.iter().map(|m| m.as_str().to_owned()).collect(),
                            paths: h.paths.iter().map(|p| p.to_string()).collect(),
                        })
                        .collect(),
                    jwt: r.jwt.as_ref().map(|j| JwtDoc {
                        issuers: j.issuers.clone(),
                        audiences: j.audiences.clone(),
                        claims: j.claims.clone(),
                    }),
                    rate_limit: r.rate_limit.map(|l| RateLimitDoc {
                        requests_per_second: l.requests_per_second,
                        burst: Some(l.burst),
                        per: Some(match l.per {
                            RateKey::Client => RateKeyDoc::Client,
                            RateKey::Route => RateKeyDoc::Route,
                            RateKey::ClientAndRoute => RateKeyDoc::ClientAndRoute,
                        }),
                    }),
                })
                .collect(),
        },
    };
    // Serialising plain strings, integers and enums to YAML cannot fail.
    serde_yaml_ng::to_string(&doc).unwrap_or_default()
}

/// The canonical YAML document of a mesh config.
pub fn mesh_config_yaml(m: &MeshConfig) -> String {
    let doc = MeshConfigDoc {
        api_version: API_VERSION.to_owned(),
        kind: "MeshConfig".to_owned(),
        metadata: MetadataDoc {
            name: "mesh".to_owned(),
            namespace: None,
        },
        spec: MeshConfigSpec {
            default_posture: Some(match m.default_posture {
                DefaultPosture::Deny => PostureDoc::Deny,
                DefaultPosture::AllowAuthenticated => PostureDoc::AllowAuthenticated,
            }),
            cipher_preference: Some(match m.cipher_preference {
                CipherPreference::Aes256Gcm => CipherDoc::Aes256Gcm,
                CipherPreference::Aes128Gcm => CipherDoc::Aes128Gcm,
            }),
            kubernetes: m.kubernetes.as_ref().map(|k| {
                let i = issuer_doc(&k.issuer);
                KubernetesDoc {
                    issuer: i.issuer,
                    jwks: i.jwks,
                    algorithms: i.algorithms,
                    clock_skew: i.clock_skew,
                    audience: Some(k.audience.clone()),
                }
            }),
            jwt_issuers: m.jwt_issuers.iter().map(issuer_doc).collect(),
        },
    };
    serde_yaml_ng::to_string(&doc).unwrap_or_default()
}

fn issuer_doc(i: &JwtIssuer) -> JwtIssuerDoc {
    let refresh = |r: &Duration| Some(humantime::format_duration(*r).to_string());
    JwtIssuerDoc {
        issuer: i.issuer.clone(),
        jwks: match &i.jwks {
            JwksSource::Inline(json) => JwksDoc {
                inline: Some(json.clone()),
                ..JwksDoc::default()
            },
            JwksSource::File { path, refresh: r } => JwksDoc {
                file: Some(path.clone()),
                refresh: refresh(r),
                ..JwksDoc::default()
            },
            JwksSource::Url {
                url,
                ca_file,
                token_file,
                refresh: r,
            } => JwksDoc {
                url: Some(url.clone()),
                ca_file: ca_file.clone(),
                token_file: token_file.clone(),
                refresh: refresh(r),
                ..JwksDoc::default()
            },
        },
        algorithms: i.algorithms.iter().map(|a| a.as_str().to_owned()).collect(),
        clock_skew: Some(humantime::format_duration(i.clock_skew).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::default_domain()
    }

    const ORDERS: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders, namespace: shop }
spec:
  target: shop/orders
  mode: audit
  rules:
    - from: [shop/frontend]
      ports: [8080]
      http:
        - { methods: [GET], paths: ["/orders", "/orders/*"] }
---
apiVersion: moat.dev/v1
kind: MeshConfig
metadata: { name: mesh }
spec: { defaultPosture: allow-authenticated }
"#;

    #[test]
    fn parses_policies_and_mesh_config() {
        let docs = parse_documents(ORDERS, "orders.yaml", &td()).unwrap();
        let Document::AccessPolicy(p) = &docs[0] else {
            panic!()
        };
        assert_eq!(p.key(), "shop/orders");
        assert_eq!(
            p.target.to_string(),
            "spiffe://moat.local/ns/shop/sa/orders"
        );
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(
            p.rules[0].from[0].to_string(),
            "spiffe://moat.local/ns/shop/sa/frontend"
        );
        assert_eq!(p.rules[0].ports, vec![8080]);
        assert_eq!(
            docs[1],
            Document::MeshConfig(MeshConfig {
                default_posture: DefaultPosture::AllowAuthenticated,
                ..MeshConfig::default()
            })
        );
        // JSON is YAML too.
        let json = r#"{"apiVersion":"moat.dev/v1","kind":"AccessPolicy","metadata":{"name":"a"},
            "spec":{"target":"a","rules":[{"from":["b"]}]}}"#;
        assert_eq!(parse_documents(json, "a.json", &td()).unwrap().len(), 1);
    }

    fn one_error(text: &str) -> DocumentError {
        let mut errs = parse_documents(text, "p.yaml", &td()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.remove(0)
    }

    #[test]
    fn new_documents_may_not_name_a_method_never_forwarded() {
        let mesh =
            "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: { name: mesh }\nspec: {}\n---\n";
        let tunnel = format!("{mesh}{}", ORDERS.replace("[GET]", "[GET, CONNECT]"));
        // A policy stored before the check still loads; new input is refused, by document and field.
        assert!(parse_documents(&tunnel, "p.yaml", &td()).is_ok());
        let errs = parse_new_documents(&tunnel, "p.yaml", &td()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].document, 2, "{errs:?}");
        assert_eq!(
            errs[0].field.as_deref(),
            Some("spec.rules[0].http[0].methods[1]")
        );
        assert!(
            errs[0].message.contains("CONNECT is never forwarded"),
            "{errs:?}"
        );
        assert_eq!(
            parse_new_documents(ORDERS, "p.yaml", &td()).unwrap().len(),
            2
        );
        // One run reports a document that does not parse and one that names CONNECT.
        let both = format!("{}\n---\n{tunnel}", "apiVersion: moat.dev/v1\nkind: [");
        let errs = parse_new_documents(&both, "p.yaml", &td()).unwrap_err();
        let documents: Vec<usize> = errs.iter().map(|e| e.document).collect();
        assert_eq!(documents, [1, 3], "{errs:?}");
        assert!(
            errs[1].message.contains("CONNECT is never forwarded"),
            "{errs:?}"
        );
    }

    #[test]
    fn errors_name_line_or_field() {
        let unknown = ORDERS.replace("      ports: [8080]", "      portz: [8080]");
        let e = one_error(&unknown);
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.message.contains("unknown field `portz`"), "{e}");

        let bad_id = ORDERS.replace("[shop/frontend]", "[shop/Front!]");
        let e = one_error(&bad_id);
        assert_eq!(e.field.as_deref(), Some("spec.rules[0].from[0]"), "{e}");

        let bad_path = ORDERS.replace("\"/orders/*\"", "\"/ord*ers\"");
        let e = one_error(&bad_path);
        assert_eq!(
            e.field.as_deref(),
            Some("spec.rules[0].http[0].paths[1]"),
            "{e}"
        );

        let bad_kind = ORDERS.replace("kind: AccessPolicy", "kind: AccessPolcy");
        let e = one_error(&bad_kind);
        assert_eq!(e.field.as_deref(), Some("kind"), "{e}");

        let bad_mode = ORDERS.replace("mode: audit", "mode: loud");
        assert!(
            one_error(&bad_mode)
                .message
                .contains("unknown variant `loud`")
        );

        // A suite the mesh does not know is refused with the ones it does.
        let bad_cipher = "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: { name: mesh }\nspec:\n  cipherPreference: aes-192-gcm\n";
        let msg = one_error(bad_cipher).message;
        assert!(
            msg.contains("unknown variant `aes-192-gcm`") && msg.contains("aes-128-gcm"),
            "{msg}"
        );

        let bad_method = ORDERS.replace("[GET]", "[get]");
        assert!(one_error(&bad_method).message.contains("uppercase"));

        assert!(one_error("").message.contains("empty"));
        assert!(one_error("# only a comment\n").message.contains("empty"));
        assert!(
            one_error(&"x".repeat(MAX_INPUT_BYTES + 1))
                .message
                .contains("the limit")
        );
        assert!(
            one_error("apiVersion: v0\nkind: AccessPolicy\n")
                .message
                .contains("unsupported apiVersion")
        );
        assert!(one_error("{{{").line.is_some());
        let e = one_error(&ORDERS.replace("[8080]", "[0]"));
        assert_eq!(e.field.as_deref(), Some("spec.rules[0].ports[0]"));
    }

    #[test]
    fn canonical_yaml_round_trips() {
        for d in parse_documents(ORDERS, "o", &td()).unwrap() {
            let text = match &d {
                Document::AccessPolicy(p) => access_policy_yaml(p),
                Document::MeshConfig(m) => mesh_config_yaml(m),
            };
            assert_eq!(
                parse_documents(&text, "again", &td()).unwrap(),
                vec![d],
                "{text}"
            );
        }
    }

    #[test]
    fn every_error_of_a_set_is_reported() {
        let two = format!(
            "{}\n---\n{}",
            ORDERS.replace("mode: audit", "mode: loud"),
            "kind: Nope\napiVersion: moat.dev/v1\n"
        );
        let errs = parse_documents(&two, "p.yaml", &td()).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[1].document, 3);
    }
}
