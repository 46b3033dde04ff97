//! The `Mesh.Stream` messages a proxy sends, checked and turned into the registry's terms at the
//! gRPC edge: an announce must agree with the connection it came on, a report's counters are
//! bounded, and anything malformed is refused with a message that names the field.

use moat_api::v1::{Announce, Report};
use moat_identity::VerifiedPeer;
use moat_wire::table::BucketDigest;
use tonic::Status;

use crate::registry::{EdgeReport, ObservedKey, RuleHits};

/// What a proxy's announce says, checked against the certificate its connection presented.
#[derive(Debug)]
pub struct Announced {
    /// Where other sidecars reach the proxy's inbound listener.
    pub inbound_address: String,
    pub proxy_version: String,
    /// When the proxy will renew its certificate (Unix seconds).
    pub cert_refresh_after: i64,
    /// The digests of the service table the proxy holds from an earlier stream, if any.
    pub resume: Option<Vec<BucketDigest>>,
}

impl Announced {
    /// Checks `a`, sent on a connection that presented `verified`. What the proxy says of its
    /// certificate must be what it proved: the registry (and from it status, rotation gating and
    /// revocation bookkeeping) keeps only verified facts.
    pub fn check(a: Announce, verified: &VerifiedPeer) -> Result<Announced, Status> {
        check_address(&a.inbound_address)?;
        if a.proxy_version.len() > MAX_VERSION_LEN
            || !a.proxy_version.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Status::invalid_argument(format!(
                "announce.proxy_version must be at most {MAX_VERSION_LEN} visible ASCII characters (it is {} bytes): announce the proxy's release, as moat-proxy does",
                a.proxy_version.len()
            )));
        }
        if !a.cert_serial.is_empty() && a.cert_serial != verified.serial {
            return Err(Status::invalid_argument(format!(
                "the announce names certificate {}, but this connection presented {}",
                a.cert_serial, verified.serial
            )));
        }
        if a.cert_not_after_unix != 0 && a.cert_not_after_unix != verified.not_after {
            return Err(Status::invalid_argument(format!(
                "the announce says the certificate expires at {}, but the one presented expires at {}",
                a.cert_not_after_unix, verified.not_after
            )));
        }
        let resume = moat_wire::table::digests_from_proto(&a.table_digests)
            .map_err(|e| Status::invalid_argument(format!("{e} (upgrade the proxy)")))?;
        Ok(Announced {
            inbound_address: a.inbound_address,
            proxy_version: a.proxy_version,
            cert_refresh_after: a.cert_refresh_after_unix,
            resume,
        })
    }
}

/// Checks that an announced inbound address names the IP address the announcing connection
/// came from, `source`. The control plane lists whatever a proxy announces as an endpoint of the
/// proxy's service; without this, one certificate could list another pod's address under its
/// own service (a transparent-mode caller picks the service by the address it dials, so every
/// connection to that pod could be dialled as the wrong one and refused). Behind NAT, or with
/// DNS names, the control plane's `--announce-any-address` turns the check off.
pub fn check_announced_source(a: &str, source: std::net::IpAddr) -> Result<(), Status> {
    let source = source.to_canonical();
    let advertise = match source {
        std::net::IpAddr::V4(ip) => format!("{ip}:PORT"),
        std::net::IpAddr::V6(ip) => format!("[{ip}]:PORT"),
    };
    let refuse = |why: String| {
        Status::permission_denied(format!(
            "announce.inbound_address {a:?} {why}: announce the IP address this sidecar connects to the control plane from (--advertise {advertise} on the proxy); where sidecars reach the control plane through NAT or announce DNS names, start the control plane with --announce-any-address"
        ))
    };
    match a.parse::<std::net::SocketAddr>() {
        Ok(sa) if sa.ip().to_canonical() == source => Ok(()),
        Ok(sa) => Err(refuse(format!(
            "is not this sidecar's address: its connection comes from {source}, not {}",
            sa.ip()
        ))),
        Err(_) => {
            let unbracketed = a
                .rsplit_once(':')
                .is_some_and(|(host, _)| host.parse::<std::net::Ipv6Addr>().is_ok());
            Err(refuse(if unbracketed {
                "is an IPv6 address without brackets (write [ADDRESS]:PORT)".to_owned()
            } else {
                "names a host, not an IP address".to_owned()
            }))
        }
    }
}

/// The longest release string a proxy may announce: it is stored with every live proxy and
/// shown by `moat status`.
pub const MAX_VERSION_LEN: usize = 64;

/// The most of a proxy's reason for refusing a snapshot that is kept (`Ack.error`): enough for
/// any message the proxy writes; the rest is cut, so that no proxy can make the live-proxy
/// records the replicas share outgrow what the store takes in one write.
pub const MAX_ACK_ERROR_LEN: usize = 1024;

/// `error`, cut to [`MAX_ACK_ERROR_LEN`] bytes at a character boundary, with `…` when cut.
pub fn bounded_ack_error(error: &str) -> String {
    if error.len() <= MAX_ACK_ERROR_LEN {
        return error.to_owned();
    }
    let mut end = MAX_ACK_ERROR_LEN;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &error[..end])
}

/// Checks an announced inbound address.
fn check_address(a: &str) -> Result<(), Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "announce.inbound_address {a:?} {why}: announce the host:port other sidecars can reach (set --advertise on the proxy)"
        ))
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("has no valid port")),
        Ok(_) => {}
    }
    if host.is_empty() || a.len() > 261 {
        return Err(bad("has no host"));
    }
    if let Ok(sa) = a.parse::<std::net::SocketAddr>()
        && sa.ip().is_unspecified()
    {
        return Err(bad("is a wildcard address"));
    }
    Ok(())
}

/// The most counters one report may carry.
const MAX_REPORTED_COUNTERS: usize = 10_000;

/// The most kinds of observed call one report may carry (the proxy keeps at most
/// `moat_proxy::observe::MAX_OBSERVED`).
const MAX_REPORTED_CALLS: usize = 4096;

/// The most edges one report may carry (a proxy keeps at most 1,024 callers).
const MAX_REPORTED_EDGES: usize = 1024;

/// Refuses a report carrying `len` items of a kind (`what`) when the limit is `limit`.
fn at_most(len: usize, limit: usize, what: &str) -> Result<(), String> {
    if len > limit {
        return Err(format!("{len} {what}; the limit is {limit}"));
    }
    Ok(())
}

/// Validates a report's edges.
pub fn edges_from_proto(r: &Report) -> Result<Vec<EdgeReport>, String> {
    at_most(r.edges.len(), MAX_REPORTED_EDGES, "edges")?;
    let buckets = moat_metrics::EDGE_LATENCY_BOUNDS_MS.len() + 1;
    r.edges
        .iter()
        .map(|e| {
            if e.latency_buckets.len() != buckets {
                return Err(format!(
                    "an edge has {} latency buckets, not {buckets}",
                    e.latency_buckets.len()
                ));
            }
            if e.peer.len() > 2048
                || e.denied.len() > 64
                || e.denied.iter().any(|d| d.reason.len() > 64)
            {
                return Err("an edge's peer or denial reasons are too long".into());
            }
            Ok(EdgeReport {
                peer: e.peer.clone(),
                requests: e.requests,
                failures: e.failures,
                denied: e
                    .denied
                    .iter()
                    .map(|d| (d.reason.clone(), d.count))
                    .collect(),
                buckets: e.latency_buckets.clone(),
            })
        })
        .collect()
}

/// Validates a report's observed calls.
pub fn observed_from_proto(r: &Report) -> Result<Vec<(ObservedKey, u64)>, String> {
    at_most(r.observed.len(), MAX_REPORTED_CALLS, "observed calls")?;
    r.observed
        .iter()
        .map(|c| {
            let port = u16::try_from(c.port).map_err(|_| format!("bad port {}", c.port))?;
            if c.peer.len() > 2048 || c.method.len() > 32 || c.path.len() > 8192 {
                return Err("an observed call's peer, method or path is too long".to_owned());
            }
            Ok((
                ObservedKey {
                    peer: c.peer.clone(),
                    port,
                    method: c.method.clone(),
                    path: c.path.clone(),
                },
                c.count,
            ))
        })
        .collect()
}

/// Validates a proxy's report.
pub fn hits_from_proto(r: Report) -> Result<Vec<RuleHits>, String> {
    at_most(r.counters.len(), MAX_REPORTED_COUNTERS, "counters")?;
    r.counters
        .into_iter()
        .map(|c| {
            let decision = c
                .decision
                .parse::<moat_policy::eval::Effect>()
                .map_err(|e| e.to_string())?
                .as_str();
            let rule = match c.rule {
                -1 => None,
                r if r >= 0 => Some(r as u32),
                r => return Err(format!("bad rule index {r}")),
            };
            if c.policy.len() > 512 {
                return Err("policy name too long".into());
            }
            Ok(RuleHits {
                policy: c.policy,
                version: c.version,
                rule,
                decision,
                count: c.count,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> VerifiedPeer {
        VerifiedPeer {
            id: "spiffe://example.org/ns/shop/sa/orders".parse().unwrap(),
            serial: "0a1b".into(),
            not_after: 1_900_000_000,
        }
    }

    fn announce() -> Announce {
        Announce {
            inbound_address: "10.0.0.1:7143".into(),
            proxy_version: "0.1.0".into(),
            cert_serial: "0a1b".into(),
            cert_not_after_unix: 1_900_000_000,
            ..Announce::default()
        }
    }

    #[test]
    fn versions_and_refusals_are_bounded() {
        let mut a = announce();
        a.proxy_version = "9".repeat(MAX_VERSION_LEN + 1);
        let e = Announced::check(a, &peer()).unwrap_err();
        assert!(e.message().contains("at most 64"), "{}", e.message());
        let mut a = announce();
        a.proxy_version = "0.1.0\x1b[2J".into();
        assert!(Announced::check(a, &peer()).is_err());
        assert_eq!(bounded_ack_error("short"), "short");
        let long = "é".repeat(MAX_ACK_ERROR_LEN);
        let cut = bounded_ack_error(&long);
        assert!(cut.len() <= MAX_ACK_ERROR_LEN + "…".len() && cut.ends_with('…'));
    }

    #[test]
    fn an_announced_address_must_be_the_announcing_connections() {
        use std::net::IpAddr;
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        for (address, source) in [
            ("10.0.0.1:7143", v4),
            ("10.0.0.1:7143", mapped),
            ("[::ffff:10.0.0.1]:7143", v4),
            ("[fd00::1]:7143", v6),
        ] {
            check_announced_source(address, source).unwrap();
        }
        for (address, source, want) in [
            ("10.0.0.2:7143", v4, "comes from 10.0.0.1, not 10.0.0.2"),
            ("orders:7143", v4, "names a host"),
            ("fd00::1:7143", v6, "without brackets"),
            ("[fd00::2]:7143", v6, "--advertise [fd00::1]:PORT"),
            ("10.0.0.1:7143", v6, "comes from fd00::1"),
        ] {
            let e = check_announced_source(address, source).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains(want), "{address}: {}", e.message());
            assert!(e.message().contains("--announce-any-address"));
        }
    }

    #[test]
    fn an_announce_must_agree_with_the_certificate_and_name_a_reachable_address() {
        let ok = Announced::check(announce(), &peer()).unwrap();
        assert_eq!(ok.inbound_address, "10.0.0.1:7143");
        assert!(ok.resume.is_none());
        let refused = |a: Announce| {
            Announced::check(a, &peer())
                .unwrap_err()
                .message()
                .to_owned()
        };
        let m = refused(Announce {
            cert_serial: "ffff".into(),
            ..announce()
        });
        assert!(
            m.contains("names certificate ffff") && m.contains("presented 0a1b"),
            "{m}"
        );
        let m = refused(Announce {
            cert_not_after_unix: 5,
            ..announce()
        });
        assert!(m.contains("expires at 5"), "{m}");
        for bad in ["0.0.0.0:7143", "10.0.0.1", "10.0.0.1:0", ":7143"] {
            let m = refused(Announce {
                inbound_address: bad.into(),
                ..announce()
            });
            assert!(m.contains("--advertise"), "{bad}: {m}");
        }
        let m = refused(Announce {
            table_digests: vec![vec![0; 32]; 2],
            ..announce()
        });
        assert!(
            m.contains("has 2 entries") && m.contains("upgrade the proxy"),
            "{m}"
        );
        let resumed = Announced::check(
            Announce {
                table_digests: vec![vec![7; 32]; moat_wire::table::BUCKETS],
                ..announce()
            },
            &peer(),
        )
        .unwrap();
        assert_eq!(resumed.resume.unwrap()[3], [7; 32]);
    }

    #[test]
    fn reports_over_their_bounds_are_refused_with_the_count() {
        let r = Report {
            edges: vec![Default::default(); MAX_REPORTED_EDGES + 1],
            ..Report::default()
        };
        let e = edges_from_proto(&r).unwrap_err();
        assert_eq!(e, "1025 edges; the limit is 1024");
    }
}
