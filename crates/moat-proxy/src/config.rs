//! The proxy's settings, built by `main` from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use moat_identity::{SpiffeId, TrustDomain};

/// The control-plane replicas this proxy may use, and the one it uses now. A proxy starts at a
/// random one (so that a fleet spreads over the replicas) and moves to a random other one when
/// a connection or a call fails (so that the proxies of a replica that died spread over the
/// survivors instead of all landing on the next in the list). A single DNS name resolving to several replicas also works: each
/// connection tries the addresses it resolves to in turn.
#[derive(Clone, Debug)]
pub struct ControlPlanes {
    urls: Arc<[String]>,
    current: Arc<std::sync::atomic::AtomicUsize>,
}

impl ControlPlanes {
    /// `urls` must not be empty.
    pub fn new(urls: Vec<String>) -> Self {
        let start = if urls.len() > 1 {
            rand::random_range(0..urls.len())
        } else {
            0
        };
        ControlPlanes {
            urls: urls.into(),
            current: Arc::new(start.into()),
        }
    }

    /// The replica to use now.
    pub fn current(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.urls.get(i % self.urls.len().max(1)).map_or("", |u| u)
    }

    /// `url` failed: the next call uses another replica, chosen at random (unless another
    /// caller moved on already).
    pub fn failed(&self, url: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.urls.len();
        let i = self.current.load(Relaxed);
        if n > 1 && self.urls.get(i % n).is_some_and(|u| u == url) {
            let next = (i + 1 + rand::random_range(0..n - 1)) % n;
            let _ = self.current.compare_exchange(i, next, Relaxed, Relaxed);
        }
    }

    /// Every replica, as configured.
    pub fn all(&self) -> &[String] {
        &self.urls
    }
}

/// Everything the proxy needs to run.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub control_plane: ControlPlanes,
    pub trust_domain: TrustDomain,
    pub identity: SpiffeId,
    /// How the first certificate is obtained.
    pub bootstrap: Bootstrap,
    pub trust_anchors: PathBuf,
    pub inbound: SocketAddr,
    /// What other sidecars dial; defaults to `inbound` when that is not a wildcard. A port 0
    /// here is replaced by the inbound listener's bound port.
    pub advertise: String,
    /// Where inbound traffic goes; `None` in transparent mode, where each connection goes to
    /// the port its caller dialled (carried in the mesh connection's server name).
    pub app: Option<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    /// The listener for outbound connections redirected by the interception rules.
    pub transparent: Option<SocketAddr>,
    /// What to do with an intercepted connection to an address outside the mesh.
    pub unknown_destinations: Unknown,
    pub admin: SocketAddr,
    /// Where to write every listener's bound address (JSON) once bound; for ports given as 0.
    pub addresses_file: Option<PathBuf>,
    /// The app's probes the admin port performs in the kubelet's place.
    pub app_probes: crate::app_probe::AppProbes,
    pub drain_timeout: Duration,
    /// Requested certificate lifetime (`None`: the control plane's default).
    pub cert_ttl: Option<Duration>,
    /// Ports carried as opaque TCP without protocol detection: outbound listener ports, and the
    /// app port for inbound clients that do not say (by ALPN) what they carry. Needed for
    /// server-first protocols (SMTP, MySQL, …), which would otherwise wait out detection.
    pub opaque_ports: Vec<u16>,
    /// Timeouts of served HTTP connections (inbound and outbound).
    pub limits: crate::conn_guard::ConnLimits,
    /// Requests one caller identity may have in flight at the app through this sidecar's
    /// inbound, across all its connections (`callers`).
    pub requests_per_caller: usize,
    /// Mesh connections one caller identity may hold open to this sidecar's inbound (`callers`).
    pub connections_per_caller: usize,
    /// The process's limit on open files, which the inbound's pending handshakes stay under
    /// (`moat_tls::pending::raise_open_file_limit`, at start-up).
    pub open_files: u64,
    /// Span export (`--otlp-endpoint`); `None`: no spans.
    pub tracing: Option<crate::trace::TraceConfig>,
}

/// What happens to an intercepted outbound connection whose destination is not a mesh endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// Connect to it directly (plaintext, as the app asked).
    Passthrough,
    /// Close it.
    Deny,
}

/// The credential for the first certificate, as a file path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// A join token from `moat token create`.
    JoinToken(PathBuf),
    /// A Kubernetes projected service-account token.
    ServiceAccount(PathBuf),
}

impl Bootstrap {
    /// The file holding the credential.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Bootstrap::JoinToken(p) | Bootstrap::ServiceAccount(p) => p,
        }
    }
}

/// An explicit outbound listener: `name=127.0.0.1:9001` sends what arrives on the address to the
/// service `name` (any identity form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub service: String,
    pub listen: SocketAddr,
}

/// A `--upstream` value that is not `SERVICE=ADDR`, or names no identity.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("--upstream {0:?}: write SERVICE=ADDR, e.g. orders=127.0.0.1:9001")]
    NoEquals(String),
    #[error("--upstream {0:?}: the service name is empty")]
    NoService(String),
    #[error("--upstream {value:?}: {addr:?} is not an IP:port ({source})")]
    Address {
        value: String,
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error("--upstream {service}: {source}")]
    Identity {
        service: String,
        source: moat_identity::IdError,
    },
}

impl FromStr for Upstream {
    type Err = UpstreamError;
    fn from_str(s: &str) -> Result<Self, UpstreamError> {
        let (service, addr) = s
            .split_once('=')
            .ok_or_else(|| UpstreamError::NoEquals(s.to_owned()))?;
        if service.is_empty() {
            return Err(UpstreamError::NoService(s.to_owned()));
        }
        let listen = addr.parse().map_err(|source| UpstreamError::Address {
            value: s.to_owned(),
            addr: addr.to_owned(),
            source,
        })?;
        Ok(Upstream {
            service: service.to_owned(),
            listen,
        })
    }
}

impl Upstream {
    /// The service's identity, short forms resolved in `td`.
    pub fn identity(&self, td: &TrustDomain) -> Result<SpiffeId, UpstreamError> {
        SpiffeId::parse_with_default(&self.service, td).map_err(|source| UpstreamError::Identity {
            service: self.service.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_planes_move_to_a_random_other_one_after_a_failure() {
        let urls: Vec<String> = ["https://a", "https://b", "https://c"]
            .iter()
            .map(|u| u.to_string())
            .collect();
        let cps = ControlPlanes::new(urls.clone());
        let first = cps.current().to_owned();
        cps.failed(&first);
        let second = cps.current().to_owned();
        assert_ne!(first, second);
        // A stale report about the first one does not skip the second.
        cps.failed(&first);
        assert_eq!(cps.current(), second);
        // The proxies of a replica that died spread over both survivors.
        let mut landed = std::collections::HashMap::new();
        for _ in 0..300 {
            let cps = ControlPlanes::new(urls.clone());
            while cps.current() != "https://c" {
                cps.failed(cps.current().to_owned().as_str());
            }
            cps.failed("https://c");
            *landed.entry(cps.current().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(landed.len(), 2, "{landed:?}");
        assert!(landed.values().all(|n| *n > 90), "{landed:?}");
        let one = ControlPlanes::new(vec!["https://only".into()]);
        one.failed("https://only");
        assert_eq!(one.current(), "https://only");
    }

    #[test]
    fn upstream_parses_and_explains() {
        let u: Upstream = "shop/orders=127.0.0.1:9001".parse().unwrap();
        assert_eq!(u.service, "shop/orders");
        assert_eq!(u.listen.port(), 9001);
        for bad in [
            "orders",
            "=127.0.0.1:1",
            "orders=localhost",
            "orders=1.2.3.4",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
    }
}
