//! Access policies to their protobuf form and back. The control plane encodes with
//! [`policy_to_proto`]; the proxy and the CLI decode with [`policy_from_proto`], which validates
//! every field the way the policy documents are validated, so a snapshot a proxy cannot fully
//! understand is refused rather than half-applied. The words of the wire's enumerations (mode,
//! rate key, default posture, JWT algorithm) are spelled once, by the domain types' `as_str` and
//! `FromStr` in moat-policy.

use moat_api::v1 as pb;
use moat_identity::{IdError, SpiffeId};
use moat_policy::{
    AccessPolicy, HttpRoute, InvalidValue, JwtRequirement, Mode, PolicyVersion, RateKey, RateLimit,
    Rule,
};

/// A protobuf message that does not make a valid domain value: where in it, and why.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{at}: {source}")]
    Identity { at: String, source: IdError },
    #[error("{at}: {source}")]
    Invalid { at: String, source: InvalidValue },
    #[error("{at}: {problem}")]
    Incomplete { at: String, problem: &'static str },
    #[error("{at}: bad port {port}")]
    Port { at: String, port: u32 },
}

/// Proto form of a policy.
pub fn policy_to_proto(p: &AccessPolicy) -> pb::Policy {
    pb::Policy {
        namespace: p.namespace.clone(),
        name: p.name.to_string(),
        version: p.version.0,
        target: p.target.to_string(),
        mode: p.mode.as_str().to_owned(),
        rules: p.rules.iter().map(rule_to_proto).collect(),
    }
}

fn rule_to_proto(r: &Rule) -> pb::PolicyRule {
    pb::PolicyRule {
        from: r.from.iter().map(|f| f.to_string()).collect(),
        ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
        http: r
            .http
            .iter()
            .map(|h| pb::HttpRoute {
                methods: h.methods.iter().map(|m| m.as_str().to_owned()).collect(),
                paths: h.paths.iter().map(|p| p.to_string()).collect(),
            })
            .collect(),
        jwt: r.jwt.as_ref().map(|j| pb::JwtRequirement {
            issuers: j.issuers.clone(),
            audiences: j.audiences.clone(),
            claims: j
                .claims
                .iter()
                .map(|(name, values)| pb::ClaimRequirement {
                    name: name.clone(),
                    values: values.clone(),
                })
                .collect(),
        }),
        rate_limit: r.rate_limit.map(|l| pb::RateLimit {
            requests_per_second: l.requests_per_second,
            burst: l.burst,
            per: l.per.as_str().to_owned(),
        }),
    }
}

/// The policy a proto message describes, every field validated.
pub fn policy_from_proto(p: pb::Policy) -> Result<AccessPolicy, WireError> {
    let key = format!("{}/{}", p.namespace, p.name);
    let target = p
        .target
        .parse::<SpiffeId>()
        .map_err(|source| WireError::Identity {
            at: format!("policy {key} target"),
            source,
        })?;
    let mode = p
        .mode
        .parse::<Mode>()
        .map_err(|source| WireError::Invalid {
            at: format!("policy {key}"),
            source,
        })?;
    let rules = p
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| rule_from_proto(r, &format!("policy {key} rule {i}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccessPolicy {
        name: p
            .name
            .parse()
            .map_err(|source| WireError::Invalid { at: key, source })?,
        namespace: p.namespace,
        target,
        mode,
        rules,
        version: PolicyVersion(p.version),
    })
}

/// One rule; `at` names it in errors.
fn rule_from_proto(r: pb::PolicyRule, at: &str) -> Result<Rule, WireError> {
    let incomplete = |problem| WireError::Incomplete {
        at: at.to_owned(),
        problem,
    };
    let invalid = |source| WireError::Invalid {
        at: at.to_owned(),
        source,
    };
    if r.from.is_empty() {
        return Err(incomplete("names no caller"));
    }
    let from = r
        .from
        .iter()
        .map(|f| {
            f.parse::<SpiffeId>().map_err(|source| WireError::Identity {
                at: format!("{at} from"),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = r
        .ports
        .iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| WireError::Port {
                    at: at.to_owned(),
                    port: *p,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let http = r
        .http
        .into_iter()
        .map(|h| {
            Ok(HttpRoute {
                methods: h
                    .methods
                    .iter()
                    .map(|m| m.parse().map_err(invalid))
                    .collect::<Result<_, _>>()?,
                paths: h
                    .paths
                    .iter()
                    .map(|p| p.parse().map_err(invalid))
                    .collect::<Result<_, _>>()?,
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let jwt = r
        .jwt
        .map(|j| {
            if j.issuers.is_empty() || j.audiences.is_empty() {
                return Err(incomplete(
                    "a token requirement needs issuers and audiences",
                ));
            }
            Ok(JwtRequirement {
                issuers: j.issuers,
                audiences: j.audiences,
                claims: j.claims.into_iter().map(|c| (c.name, c.values)).collect(),
            })
        })
        .transpose()?;
    let rate_limit = r
        .rate_limit
        .map(|l| {
            let per = l.per.parse::<RateKey>().map_err(invalid)?;
            if l.requests_per_second == 0 || l.burst == 0 {
                return Err(incomplete("a rate limit needs a rate and a burst"));
            }
            Ok(RateLimit {
                requests_per_second: l.requests_per_second,
                burst: l.burst,
                per,
            })
        })
        .transpose()?;
    Ok(Rule {
        from,
        ports,
        http,
        jwt,
        rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_policy::{Document, parse_documents};

    /// Every field a policy can carry, through the wire and back, unchanged.
    #[test]
    fn a_policy_survives_the_round_trip() {
        let td: moat_identity::TrustDomain = "moat.local".parse().unwrap();
        let yaml = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders-in, namespace: shop }
spec:
  target: shop/orders
  mode: audit
  rules:
    - from: [frontend, spiffe://moat.local/ns/ops/sa/admin]
      ports: [8080, 9090]
      http:
        - methods: [GET, POST]
          paths: [/orders, /orders/*]
        - paths: ["*"]
      jwt:
        issuers: [https://id.example]
        audiences: [orders]
        claims: { scope: [read, write] }
      rateLimit: { requestsPerSecond: 50, burst: 100, per: client-and-route }
    - from: [shop/payments]
"#;
        let docs = parse_documents(yaml, "test", &td).unwrap();
        let Some(Document::AccessPolicy(mut p)) = docs.into_iter().next() else {
            panic!("not a policy");
        };
        p.version = PolicyVersion(42);
        let back = policy_from_proto(policy_to_proto(&p)).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn a_malformed_policy_is_refused_with_where_and_why() {
        let td: moat_identity::TrustDomain = "moat.local".parse().unwrap();
        let good = policy_to_proto(&AccessPolicy {
            name: "p".parse().unwrap(),
            namespace: "default".into(),
            target: SpiffeId::parse_with_default("orders", &td).unwrap(),
            mode: Mode::Enforce,
            rules: vec![],
            version: PolicyVersion(1),
        });
        let mut loud = good.clone();
        loud.mode = "loud".into();
        let err = policy_from_proto(loud).unwrap_err();
        assert!(
            matches!(&err, WireError::Invalid { source, .. } if source.problem == "unknown mode"),
            "{err}"
        );
        let mut no_caller = good.clone();
        no_caller.rules.push(pb::PolicyRule::default());
        let err = policy_from_proto(no_caller).unwrap_err();
        assert!(
            matches!(&err, WireError::Incomplete { at, .. } if at == "policy default/p rule 0"),
            "{err}"
        );
        let mut bad_port = good;
        bad_port.rules.push(pb::PolicyRule {
            from: vec!["spiffe://moat.local/ns/default/sa/frontend".into()],
            ports: vec![70_000],
            ..Default::default()
        });
        let err = policy_from_proto(bad_port).unwrap_err();
        assert!(matches!(err, WireError::Port { port: 70_000, .. }), "{err}");
    }
}
