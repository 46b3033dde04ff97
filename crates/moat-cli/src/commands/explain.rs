//! `moat policy explain` and `moat policy test`: the proxy's own evaluator, run here against the
//! live policies (fetched from the control plane) or policy files, with its full trace.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use moat_api::v1::ListPoliciesRequest;
use moat_identity::{SpiffeId, TrustDomain};
use moat_policy::eval::{Decision, Input, Jwt, Reason, Traffic, evaluate};
use moat_policy::{
    AccessPolicy, DefaultPosture, Document, MeshConfig, PolicyVersion, parse_documents,
};
use serde::Deserialize;

use super::admin;
use super::policy_files::sources;
use crate::Global;
use crate::connect::status;
use crate::output::Output;

/// What to evaluate against.
#[derive(Debug)]
pub struct PolicySet {
    pub policies: Vec<AccessPolicy>,
    pub mesh: MeshConfig,
    pub trust_domain: TrustDomain,
}

impl PolicySet {
    /// The live set from the control plane (the same canonical documents the proxies get).
    pub async fn live(global: &Global) -> anyhow::Result<Self> {
        let dir = crate::creds::CredDir::load(&global.credentials)?;
        let td = dir.credential.id().trust_domain().clone();
        let resp = admin(global)
            .await?
            .list_policies(ListPoliciesRequest {})
            .await
            .map_err(|s| status("policy explain", s))?
            .into_inner();
        let mut policies = Vec::new();
        for (doc, p) in resp.documents.iter().zip(&resp.policies) {
            let parsed = parse_documents(doc, "control plane", &td)
                .map_err(|e| anyhow::anyhow!("{}", e[0]))?;
            for d in parsed {
                if let Document::AccessPolicy(mut ap) = d {
                    ap.version = PolicyVersion(p.version);
                    policies.push(ap);
                }
            }
        }
        // A word this CLI does not know explains as the zero-trust default.
        let default_posture = resp.default_posture.parse().unwrap_or(DefaultPosture::Deny);
        Ok(PolicySet {
            policies,
            mesh: MeshConfig {
                default_posture,
                ..MeshConfig::default()
            },
            trust_domain: td,
        })
    }

    /// A set from files (offline).
    pub fn from_files(path: &std::path::Path, td: &TrustDomain) -> anyhow::Result<Self> {
        let mut policies = Vec::new();
        let mut mesh = MeshConfig::default();
        for (name, text) in sources(path)? {
            let docs = parse_documents(&text, &name, td).map_err(|errs| {
                for e in &errs {
                    eprintln!("{e}");
                }
                anyhow::anyhow!("{} invalid document(s) in {name}", errs.len())
            })?;
            for d in docs {
                match d {
                    Document::AccessPolicy(p) => policies.push(p),
                    Document::MeshConfig(m) => mesh = m,
                }
            }
        }
        Ok(PolicySet {
            policies,
            mesh,
            trust_domain: td.clone(),
        })
    }

    /// Evaluates one connection or request from `from` to `to`, the way the callee's sidecar
    /// does: a CONNECT is refused with `method-not-supported`, a request's path is made
    /// canonical first (the same function), and one that cannot be is refused with
    /// `invalid-path`.
    pub fn decide(&self, from: &SpiffeId, to: &SpiffeId, port: u16, what: &Query<'_>) -> Decision {
        self.decide_with_limits(from, to, port, what).0
    }

    /// [`decide`](Self::decide), and the rate limits an allowed request takes a token from
    /// (`moat_policy::limiting_rules`), each as `policy@version rule N: R/s, burst B, per K`.
    pub fn decide_with_limits(
        &self,
        from: &SpiffeId,
        to: &SpiffeId,
        port: u16,
        what: &Query<'_>,
    ) -> (Decision, Vec<String>) {
        let for_target: Vec<AccessPolicy> = self
            .policies
            .iter()
            .filter(|p| &p.target == to)
            .cloned()
            .collect();
        let canonical;
        let traffic = match what {
            Query::Connection => Traffic::Connection,
            Query::Opaque => Traffic::Opaque,
            Query::Request {
                method,
                path,
                claims,
            } => {
                if !moat_policy::is_forwarded_method(method) {
                    return (Decision::refused(Reason::MethodNotSupported), Vec::new());
                }
                canonical = match moat_policy::canonical_path(path) {
                    Ok(c) => c,
                    Err(_) => return (Decision::refused(Reason::InvalidPath), Vec::new()),
                };
                Traffic::Request {
                    method,
                    path: &canonical,
                    jwt: match claims {
                        Some(c) => Jwt::Valid(c),
                        None => Jwt::Missing,
                    },
                }
            }
        };
        let input = Input {
            peer: from,
            port,
            traffic,
        };
        let d = evaluate(&for_target, &self.mesh, &input);
        let limits = moat_policy::limiting_rules(&for_target, &d, &input)
            .into_iter()
            .filter_map(|(p, i)| {
                let l = p.rules.get(i)?.rate_limit.as_ref()?;
                Some(format!(
                    "{}@{} rule {i}: {}/s, burst {}, per {}",
                    p.key(),
                    p.version,
                    l.requests_per_second,
                    l.burst,
                    l.per.as_str()
                ))
            })
            .collect();
        (d, limits)
    }
}

/// What `explain` and `test` evaluate.
#[derive(Debug)]
pub enum Query<'a> {
    /// An HTTP connection before its first request (identity and port only).
    Connection,
    /// An opaque TCP connection.
    Opaque,
    /// One HTTP request; `path` as sent (it is made canonical), `claims` of a verified token.
    Request {
        method: &'a str,
        path: &'a str,
        claims: Option<&'a moat_policy::jwt::Claims>,
    },
}

impl<'a> Query<'a> {
    fn new(
        tcp: bool,
        http: Option<(&'a str, &'a str)>,
        claims: Option<&'a moat_policy::jwt::Claims>,
    ) -> Self {
        match (tcp, http) {
            (true, _) => Query::Opaque,
            (false, Some((method, path))) => Query::Request {
                method,
                path,
                claims,
            },
            (false, None) => Query::Connection,
        }
    }
}

/// Parses `--jwt-claims`: a JSON object of the claims of a token taken as verified.
fn claims(text: &str) -> anyhow::Result<moat_policy::jwt::Claims> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => bail!(
            "--jwt-claims must be a JSON object such as '{{\"iss\":\"https://id.example\",\"aud\":\"orders\",\"scope\":\"orders.read\"}}'"
        ),
        Err(e) => bail!("--jwt-claims is not JSON: {e}"),
    }
}

/// What `moat policy explain` evaluates.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// Caller identity.
    #[arg(long)]
    from: String,
    /// Callee identity.
    #[arg(long)]
    to: String,
    /// The port the caller reached (the callee's app port).
    #[arg(long)]
    port: Option<u16>,
    /// HTTP method (with --path).
    #[arg(long)]
    method: Option<String>,
    /// HTTP path (with --method), as sent: it is made canonical the way the sidecar does.
    #[arg(long)]
    path: Option<String>,
    /// Evaluate an opaque TCP connection (not HTTP), which only a rule without `http` or `jwt`
    /// admits.
    #[arg(long, conflicts_with_all = ["method", "path", "jwt_claims"])]
    tcp: bool,
    /// The claims of the request's end-user token, taken as verified (JSON object); without it
    /// an HTTP request carries no token.
    #[arg(long, requires = "method")]
    jwt_claims: Option<String>,
    /// Evaluate these policy files instead of the live policies.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Trust domain for short forms when --file is used.
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
    trust_domain: TrustDomain,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

fn describe(d: &Decision, limits: &[String]) -> serde_json::Value {
    serde_json::json!({
        "rate_limits": limits,
        "allowed": d.allowed,
        "decision": d.effect().as_str(),
        "reason": d.reason.code(),
        "would_deny": d.would_deny.map(|r| r.code()),
        "policy": d.policy.as_ref().map(|(k, _)| k),
        "version": d.policy.as_ref().map(|(_, v)| v.0),
        "rule": d.rule,
        "trace": d.trace.iter().map(|t| serde_json::json!({
            "policy": t.policy, "version": t.version.0, "mode": t.mode.as_str(), "rule": t.rule, "outcome": t.outcome.code(),
        })).collect::<Vec<_>>(),
    })
}

/// `moat policy explain`.
pub async fn explain(global: &Global, args: ExplainArgs) -> anyhow::Result<()> {
    let ExplainArgs {
        from,
        to,
        port,
        method,
        path,
        tcp,
        jwt_claims,
        file,
        trust_domain,
        output,
    } = args;
    if method.is_some() != path.is_some() {
        bail!("give --method and --path together (or neither, for a connection-level check)");
    }
    let claims = jwt_claims.as_deref().map(claims).transpose()?;
    let set = match &file {
        Some(f) => PolicySet::from_files(f, &trust_domain)?,
        None => PolicySet::live(global).await?,
    };
    let td = &set.trust_domain;
    let from = SpiffeId::parse_with_default(&from, td).context("--from")?;
    let to = SpiffeId::parse_with_default(&to, td).context("--to")?;
    let http = method.as_deref().zip(path.as_deref());
    let (d, limits) = set.decide_with_limits(
        &from,
        &to,
        port.unwrap_or(0),
        &Query::new(tcp, http, claims.as_ref()),
    );
    if !output.is_table() {
        return output.print(&describe(&d, &limits), || {});
    }
    let verdict = match (d.allowed, d.would_deny) {
        (true, Some(r)) => format!("ALLOW (audit mode: would deny, {})", r.code()),
        (true, None) => format!("ALLOW ({})", d.reason.code()),
        (false, _) => format!("DENY ({})", d.reason.code()),
    };
    println!(
        "{from} -> {to}{}",
        port.map(|p| format!(" port {p}")).unwrap_or_default()
    );
    if let Some((m, p)) = http {
        match moat_policy::canonical_path(p) {
            Ok(c) if c == p => println!("request  {m} {p}"),
            Ok(c) => println!("request  {m} {p} (canonical: {c})"),
            Err(e) => println!("request  {m} {p:?} (refused: {e})"),
        }
    }
    if tcp {
        println!("traffic  opaque TCP");
    }
    println!("decision {verdict}");
    match (&d.policy, d.rule) {
        (Some((k, v)), Some(r)) => println!("matched  {k}@{v} rule {r}"),
        (Some((k, v)), None) => println!("policy   {k}@{v}"),
        (None, _) => println!(
            "policy   none protects {to} (default posture {})",
            set.mesh.default_posture.as_str()
        ),
    }
    for l in &limits {
        println!("limited  {l}");
    }
    if port.is_none()
        && d.trace
            .iter()
            .any(|t| t.outcome == moat_policy::Reason::PortNotAllowed)
    {
        println!("note     no --port given: rules that name ports do not match");
    }
    for t in &d.trace {
        println!(
            "  {}@{} rule {} ({}): {}",
            t.policy,
            t.version,
            t.rule,
            t.mode.as_str(),
            t.outcome.code()
        );
    }
    Ok(())
}

/// One golden case of `moat policy test`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    from: String,
    to: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    /// An opaque TCP connection rather than an HTTP request.
    #[serde(default)]
    tcp: bool,
    /// The claims of a verified end-user token the request carries.
    #[serde(default)]
    jwt_claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// `allow` or `deny`.
    expect: Expect,
    /// Optional expected reason code.
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    cases: Vec<Case>,
}

/// `moat policy test`: exits non-zero naming every case whose outcome differs.
pub fn test(
    cases: &std::path::Path,
    policies: &std::path::Path,
    td: &TrustDomain,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(cases)
        .with_context(|| format!("cannot read {}", cases.display()))?;
    let cases: Cases = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not a valid case table", cases.display()))?;
    if cases.cases.is_empty() {
        bail!("the case table has no cases");
    }
    let set = PolicySet::from_files(policies, td)?;
    let mut failed = Vec::new();
    for c in &cases.cases {
        if c.method.is_some() != c.path.is_some() {
            bail!("case {:?}: give method and path together", c.name);
        }
        if c.tcp && (c.method.is_some() || c.jwt_claims.is_some()) {
            bail!(
                "case {:?}: a tcp case has no method, path or jwt_claims",
                c.name
            );
        }
        let from = SpiffeId::parse_with_default(&c.from, td)
            .with_context(|| format!("case {:?}: from", c.name))?;
        let to = SpiffeId::parse_with_default(&c.to, td)
            .with_context(|| format!("case {:?}: to", c.name))?;
        let d = set.decide(
            &from,
            &to,
            c.port.unwrap_or(0),
            &Query::new(
                c.tcp,
                c.method.as_deref().zip(c.path.as_deref()),
                c.jwt_claims.as_ref(),
            ),
        );
        let got = if d.allowed {
            Expect::Allow
        } else {
            Expect::Deny
        };
        let reason = d.would_deny.unwrap_or(d.reason).code();
        let ok = got == c.expect && c.reason.as_deref().is_none_or(|r| r == reason);
        println!(
            "{} {}  ({:?}, {reason})",
            if ok { "PASS" } else { "FAIL" },
            c.name,
            got
        );
        if !ok {
            failed.push(c.name.clone());
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} cases failed: {}",
            failed.len(),
            cases.cases.len(),
            failed.join(", ")
        );
    }
    println!("{} cases passed", cases.cases.len());
    Ok(())
}
