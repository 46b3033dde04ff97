//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// Why an identity string was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error(
        "empty identity: write `name`, `namespace/name` or `spiffe://<domain>/ns/<ns>/sa/<name>`"
    )]
    Empty,
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error(
        "invalid namespace {0:?}: use a DNS label (lowercase letters, digits, '-', at most 63)"
    )]
    Namespace(String),
    #[error(
        "invalid service account {0:?}: use lowercase letters, digits, '-' and '.', at most 253"
    )]
    ServiceAccount(String),
    #[error(
        "invalid SPIFFE ID {0:?}: a workload ID has the form spiffe://<domain>/ns/<namespace>/sa/<name>"
    )]
    Path(String),
    #[error("invalid identity {0:?}: write `name`, `namespace/name` or a full spiffe:// ID")]
    ShortForm(String),
}

fn is_dns_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// A SPIFFE trust domain, e.g. `moat.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The mesh default, `moat.local`.
    pub fn default_domain() -> Self {
        TrustDomain("moat.local".to_owned())
    }

    /// The trust domain as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.chars().all(|c| is_dns_char(c) || c == '.' || c == '_')
            && !s.starts_with(['.', '-'])
            && !s.ends_with(['.', '-']);
        if ok {
            Ok(TrustDomain(s.to_owned()))
        } else {
            Err(IdError::TrustDomain(s.to_owned()))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Kubernetes-style namespace (a DNS label). Outside Kubernetes it defaults to `default`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(String);

impl Namespace {
    /// The namespace as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Namespace {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars().all(is_dns_char)
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(Namespace(s.to_owned()))
        } else {
            Err(IdError::Namespace(s.to_owned()))
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service account (outside Kubernetes: the service name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount(String);

impl ServiceAccount {
    /// The service account as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceAccount {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.chars().all(|c| is_dns_char(c) || c == '.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.']);
        if ok {
            Ok(ServiceAccount(s.to_owned()))
        } else {
            Err(IdError::ServiceAccount(s.to_owned()))
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SPIFFE ID of a workload. `Display` gives the full URI; `FromStr` accepts only the full
/// URI. Operators' short forms go through [`SpiffeId::parse_with_default`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: Namespace,
    service_account: ServiceAccount,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Builds an ID from its parts.
    pub fn new(trust_domain: TrustDomain, namespace: Namespace, sa: ServiceAccount) -> Self {
        SpiffeId {
            trust_domain,
            namespace,
            service_account: sa,
        }
    }

    /// The control plane's own identity in `td`, `moat-system/moat-control`: what every client
    /// of the control plane (sidecars, the CLI) requires it to prove, and what it is issued.
    pub fn control_plane(td: &TrustDomain) -> Self {
        SpiffeId::new(
            td.clone(),
            Namespace("moat-system".to_owned()),
            ServiceAccount("moat-control".to_owned()),
        )
    }

    /// Parses any form an operator may write: `orders` (namespace `default`), `shop/orders`, or a
    /// full `spiffe://` ID. Short forms take `trust_domain`; a full ID keeps its own domain.
    pub fn parse_with_default(s: &str, trust_domain: &TrustDomain) -> Result<Self, IdError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.starts_with(SCHEME) {
            return s.parse();
        }
        if s.contains("://") {
            return Err(IdError::ShortForm(s.to_owned()));
        }
        let (ns, sa) = match s.split_once('/') {
            None => ("default", s),
            Some((ns, sa)) if !sa.contains('/') => (ns, sa),
            Some(_) => return Err(IdError::ShortForm(s.to_owned())),
        };
        Ok(SpiffeId {
            trust_domain: trust_domain.clone(),
            namespace: ns.parse()?,
            service_account: sa.parse()?,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &ServiceAccount {
        &self.service_account
    }

    /// The shortest form that names this ID unambiguously inside `home`: `orders` for namespace
    /// `default`, `shop/orders` otherwise, and the full URI for another trust domain.
    pub fn short_form(&self, home: &TrustDomain) -> String {
        if &self.trust_domain != home {
            self.to_string()
        } else if self.namespace.as_str() == "default" {
            self.service_account.to_string()
        } else {
            format!("{}/{}", self.namespace, self.service_account)
        }
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdError::Path(s.to_owned()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| IdError::Path(s.to_owned()))?;
        let trust_domain: TrustDomain = domain.parse()?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Ok(SpiffeId {
                trust_domain,
                namespace: ns.parse()?,
                service_account: sa.parse()?,
            }),
            _ => Err(IdError::Path(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::default_domain()
    }

    #[test]
    fn short_forms_resolve_to_full_ids() {
        let full = "spiffe://moat.local/ns/shop/sa/orders";
        for form in ["shop/orders", full, " shop/orders "] {
            let id = SpiffeId::parse_with_default(form, &td()).unwrap();
            assert_eq!(id.to_string(), full, "{form}");
        }
        let bare = SpiffeId::parse_with_default("orders", &td()).unwrap();
        assert_eq!(bare.to_string(), "spiffe://moat.local/ns/default/sa/orders");
        assert_eq!(bare.short_form(&td()), "orders");
    }

    #[test]
    fn the_control_planes_identity_is_a_valid_id() {
        let id = SpiffeId::control_plane(&td());
        assert_eq!(
            id.to_string(),
            "spiffe://moat.local/ns/moat-system/sa/moat-control"
        );
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "spiffe://moat.local/ns/default/sa/orders",
            "spiffe://example.org/ns/moat-system/sa/moat-control",
            "spiffe://a_b.c/ns/x1/sa/svc.v2",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        }
    }

    #[test]
    fn foreign_domain_keeps_its_domain() {
        let id = SpiffeId::parse_with_default("spiffe://other.org/ns/a/sa/b", &td()).unwrap();
        assert_eq!(id.trust_domain().as_str(), "other.org");
        assert_eq!(id.short_form(&td()), "spiffe://other.org/ns/a/sa/b");
    }

    #[test]
    fn bad_identities_are_refused_with_a_reason() {
        let cases = [
            ("", IdError::Empty),
            ("a/b/c", IdError::ShortForm("a/b/c".into())),
            ("Orders", IdError::ServiceAccount("Orders".into())),
            ("shop!/orders", IdError::Namespace("shop!".into())),
            (
                "http://x/ns/a/sa/b",
                IdError::ShortForm("http://x/ns/a/sa/b".into()),
            ),
            (
                "spiffe://moat.local/orders",
                IdError::Path("spiffe://moat.local/orders".into()),
            ),
            (
                "spiffe://moat.local/ns/a/sa/b/extra",
                IdError::Path("spiffe://moat.local/ns/a/sa/b/extra".into()),
            ),
            (
                "spiffe://Bad Domain/ns/a/sa/b",
                IdError::TrustDomain("Bad Domain".into()),
            ),
            ("-x", IdError::ServiceAccount("-x".into())),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse_with_default(input, &td()),
                Err(want),
                "{input:?}"
            );
        }
        let long_ns = "n".repeat(64);
        assert!(SpiffeId::parse_with_default(&format!("{long_ns}/a"), &td()).is_err());
    }

    #[test]
    fn trust_domain_round_trips_and_validates() {
        let td: TrustDomain = "prod.example.com".parse().unwrap();
        assert_eq!(td.to_string(), "prod.example.com");
        for bad in ["", "UPPER", "a/b", ".lead", "trail-", "sp ace"] {
            assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?}");
        }
    }
}
