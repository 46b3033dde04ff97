//! What the control plane tells this proxy, as domain types. `from_proto` is the gRPC edge: it
//! validates every field and refuses (NACKs) a snapshot it cannot fully understand, so the proxy
//! keeps the last good one.

use std::collections::HashMap;

use moat_api::v1 as pb;
use moat_identity::{SpiffeId, TrustBundle};
use moat_policy::{AccessPolicy, DefaultPosture, HttpRoute, MeshConfig, Mode, PolicyVersion, Rule};
use rustls_pki_types::CertificateDer;

/// One applied snapshot.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: u64,
    pub bundle: TrustBundle,
    /// Policies whose target is this proxy's identity.
    pub policies: Vec<AccessPolicy>,
    pub mesh: MeshConfig,
    /// Service identity → inbound endpoints.
    pub services: HashMap<SpiffeId, Vec<String>>,
}

fn id(s: &str, what: &str) -> Result<SpiffeId, String> {
    s.parse().map_err(|e| format!("{what}: {e}"))
}

fn policy(p: pb::Policy, me: &SpiffeId) -> Result<AccessPolicy, String> {
    let key = format!("{}/{}", p.namespace, p.name);
    let target = id(&p.target, &format!("policy {key} target"))?;
    if &target != me {
        return Err(format!(
            "policy {key} targets {target}, not this proxy ({me})"
        ));
    }
    let mode = match p.mode.as_str() {
        "enforce" => Mode::Enforce,
        "audit" => Mode::Audit,
        other => return Err(format!("policy {key}: unknown mode {other:?}")),
    };
    let rules = p
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let from = r
                .from
                .iter()
                .map(|f| id(f, &format!("policy {key} rule {i} from")))
                .collect::<Result<Vec<_>, _>>()?;
            let ports = r
                .ports
                .iter()
                .map(|p| {
                    u16::try_from(*p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(format!("policy {key} rule {i}: bad port {p}"))
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
                            .map(|m| m.parse())
                            .collect::<Result<_, String>>()?,
                        paths: h
                            .paths
                            .iter()
                            .map(|p| p.parse())
                            .collect::<Result<_, String>>()?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Rule { from, ports, http })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(AccessPolicy {
        name: p.name.parse()?,
        namespace: p.namespace,
        target,
        mode,
        rules,
        version: PolicyVersion(p.version),
    })
}

/// Validates a snapshot for the proxy with identity `me`.
pub fn from_proto(s: pb::Snapshot, me: &SpiffeId) -> Result<Snapshot, String> {
    let bundle = TrustBundle::from_der(
        s.trust_bundle_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    )
    .map_err(|e| format!("trust bundle: {e}"))?;
    let policies = s
        .policies
        .into_iter()
        .map(|p| policy(p, me))
        .collect::<Result<Vec<_>, _>>()?;
    let default_posture = match s.mesh.map(|m| m.default_posture).as_deref() {
        None | Some("") | Some("deny") => DefaultPosture::Deny,
        Some("allow-authenticated") => DefaultPosture::AllowAuthenticated,
        Some(other) => return Err(format!("unknown default posture {other:?}")),
    };
    let mut services = HashMap::new();
    for svc in s.services {
        let sid = id(&svc.spiffe_id, "service")?;
        services.insert(sid, svc.endpoints);
    }
    Ok(Snapshot {
        version: s.version,
        bundle,
        policies,
        mesh: MeshConfig { default_posture },
        services,
    })
}
