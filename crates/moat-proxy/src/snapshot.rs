//! What the control plane tells this proxy, as domain types. `from_proto` is the gRPC edge: it
//! validates every field and refuses (NACKs) a snapshot it cannot fully understand, so the proxy
//! keeps the last good one.

use std::collections::{HashMap, HashSet};

use moat_api::v1 as pb;
use moat_identity::{Serial, SpiffeId, TrustBundle};
use moat_policy::jwt::{Jwks, TrustedIssuer};
use moat_policy::{AccessPolicy, CipherPreference, DefaultPosture, JwtAlgorithm, MeshConfig};
use rustls_pki_types::CertificateDer;

/// One applied snapshot.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: u64,
    pub bundle: TrustBundle,
    /// Policies whose target is this proxy's identity.
    pub policies: Vec<AccessPolicy>,
    pub mesh: MeshConfig,
    /// End-user token issuers with their keys.
    pub issuers: Vec<TrustedIssuer>,
    /// Service identity → inbound endpoints.
    pub services: HashMap<SpiffeId, Vec<String>>,
    /// Rotation command generation: when it grows, re-key and renew now.
    pub rotate_generation: u64,
    /// Revoked identities and certificate serials (lowercase hex).
    pub revoked_identities: HashSet<SpiffeId>,
    pub revoked_serials: HashSet<String>,
}

impl Snapshot {
    /// Whether `id`, or the certificate with `serial`, is revoked.
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.revoked_identities.contains(id) || self.revoked_serials.contains(serial)
    }
}

/// Why a snapshot was refused (NACKed, keeping the last good one): where in it, and what was
/// wrong there.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("service changes need the stream's table (mesh_client folds them in)")]
    Incremental,
    #[error("trust bundle: {0}")]
    Bundle(#[from] moat_identity::BundleError),
    #[error(transparent)]
    Policy(#[from] moat_wire::WireError),
    #[error("policy {policy} targets {target}, not this proxy ({me})")]
    NotForUs {
        policy: String,
        target: String,
        me: String,
    },
    #[error("{at}: {source}")]
    Identity {
        at: &'static str,
        source: moat_identity::IdError,
    },
    #[error("{at}: {source}")]
    Invalid {
        at: String,
        source: moat_policy::InvalidValue,
    },
    #[error("issuer {issuer}: {source}")]
    Keys {
        issuer: String,
        source: moat_policy::jwt::JwksError,
    },
    #[error("revoked serial: {0}")]
    Serial(#[from] moat_identity::NotASerial),
}

fn id(s: &str, at: &'static str) -> Result<SpiffeId, SnapshotError> {
    s.parse()
        .map_err(|source| SnapshotError::Identity { at, source })
}

/// A policy of the snapshot, which must be one of this proxy's (`me`).
fn policy(p: pb::Policy, me: &SpiffeId) -> Result<AccessPolicy, SnapshotError> {
    let policy = moat_wire::policy_from_proto(p)?;
    if &policy.target != me {
        return Err(SnapshotError::NotForUs {
            policy: policy.key(),
            target: policy.target.to_string(),
            me: me.to_string(),
        });
    }
    Ok(policy)
}

/// One end-user token issuer with its keys.
fn issuer(i: pb::JwtIssuer) -> Result<TrustedIssuer, SnapshotError> {
    let algorithms = i
        .algorithms
        .iter()
        .map(|a| a.parse::<JwtAlgorithm>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SnapshotError::Invalid {
            at: format!("issuer {}", i.issuer),
            source,
        })?;
    let keys = Jwks::parse(&i.jwks_json, &algorithms).map_err(|source| SnapshotError::Keys {
        issuer: i.issuer.clone(),
        source,
    })?;
    Ok(TrustedIssuer {
        issuer: i.issuer,
        algorithms,
        clock_skew: std::time::Duration::from_secs(u64::from(i.clock_skew_seconds.min(300))),
        keys,
    })
}

/// Validates a snapshot for the proxy with identity `me`.
pub fn from_proto(s: pb::Snapshot, me: &SpiffeId) -> Result<Snapshot, SnapshotError> {
    if s.services_incremental {
        return Err(SnapshotError::Incremental);
    }
    let bundle = TrustBundle::from_der(
        s.trust_bundle_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    )?;
    let policies = s
        .policies
        .into_iter()
        .map(|p| policy(p, me))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = s.mesh.unwrap_or_default();
    // Unset is the zero-trust default.
    let default_posture = match settings.default_posture.as_str() {
        "" => DefaultPosture::Deny,
        word => word.parse().map_err(|source| SnapshotError::Invalid {
            at: "mesh".to_owned(),
            source,
        })?,
    };
    // Unset is the stronger suite.
    let cipher_preference = match settings.cipher_preference.as_str() {
        "" => CipherPreference::Aes256Gcm,
        word => word.parse().map_err(|source| SnapshotError::Invalid {
            at: "mesh.cipher_preference".to_owned(),
            source,
        })?,
    };
    let issuers = settings
        .jwt_issuers
        .into_iter()
        .map(issuer)
        .collect::<Result<Vec<_>, _>>()?;
    let mut services = HashMap::new();
    for svc in s.services {
        let sid = id(&svc.spiffe_id, "service")?;
        services.insert(sid, svc.endpoints);
    }
    Ok(Snapshot {
        version: s.version,
        bundle,
        policies,
        mesh: MeshConfig {
            default_posture,
            cipher_preference,
            ..MeshConfig::default()
        },
        issuers,
        services,
        rotate_generation: s.rotate_generation,
        revoked_identities: s
            .revoked_identities
            .iter()
            .map(|r| id(r, "revoked identity"))
            .collect::<Result<_, _>>()?,
        revoked_serials: s
            .revoked_serials
            .iter()
            .map(|r| r.parse::<moat_identity::Serial>().map(Serial::into_string))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_policy::{Mode, PolicyVersion};

    fn me() -> SpiffeId {
        "spiffe://moat.local/ns/default/sa/orders".parse().unwrap()
    }

    fn policy(target: &str, mode: &str, from: &str, path: &str) -> pb::Policy {
        pb::Policy {
            namespace: "default".into(),
            name: "orders".into(),
            version: 7,
            target: target.into(),
            mode: mode.into(),
            rules: vec![pb::PolicyRule {
                from: vec![from.into()],
                ports: vec![8080],
                http: vec![pb::HttpRoute {
                    methods: vec!["GET".into()],
                    paths: vec![path.into()],
                }],
                jwt: None,
                rate_limit: None,
            }],
        }
    }

    fn snapshot(policies: Vec<pb::Policy>, bundle: Vec<Vec<u8>>) -> pb::Snapshot {
        pb::Snapshot {
            version: 3,
            trust_bundle_der: bundle,
            policies,
            mesh: None,
            rotate_generation: 0,
            revoked_identities: vec![],
            revoked_serials: vec![],
            services: vec![pb::Service {
                spiffe_id: "spiffe://moat.local/ns/default/sa/payments".into(),
                endpoints: vec!["127.0.0.1:7143".into()],
            }],
            ..pb::Snapshot::default()
        }
    }

    fn root() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_good_snapshot_converts() {
        let me_str = me().to_string();
        let s = from_proto(
            snapshot(
                vec![policy(
                    &me_str,
                    "audit",
                    "spiffe://moat.local/ns/default/sa/frontend",
                    "/orders/*",
                )],
                vec![root()],
            ),
            &me(),
        )
        .unwrap();
        assert_eq!(s.version, 3);
        assert_eq!(s.policies[0].mode, Mode::Audit);
        assert_eq!(s.policies[0].version, PolicyVersion(7));
        assert_eq!(s.services.len(), 1);
    }

    #[test]
    fn anything_not_understood_is_refused() {
        let me_str = me().to_string();
        let frontend = "spiffe://moat.local/ns/default/sa/frontend";
        type Refused = fn(&SnapshotError) -> bool;
        let bundle: Refused = |e| matches!(e, SnapshotError::Bundle(_));
        let cases: [(pb::Snapshot, Refused); 6] = [
            (snapshot(vec![], vec![]), bundle),
            (snapshot(vec![], vec![b"junk".to_vec()]), bundle),
            (
                snapshot(
                    vec![policy(
                        "spiffe://moat.local/ns/default/sa/other",
                        "enforce",
                        frontend,
                        "/",
                    )],
                    vec![root()],
                ),
                |e| matches!(e, SnapshotError::NotForUs { .. }),
            ),
            (
                snapshot(vec![policy(&me_str, "loud", frontend, "/")], vec![root()]),
                |e| {
                    matches!(e, SnapshotError::Policy(moat_wire::WireError::Invalid { source, .. })
                        if source.problem == "unknown mode")
                },
            ),
            (
                snapshot(
                    vec![policy(&me_str, "enforce", "frontend", "/")],
                    vec![root()],
                ),
                |e| {
                    matches!(e, SnapshotError::Policy(moat_wire::WireError::Identity { at, .. })
                        if at.ends_with("from"))
                },
            ),
            (
                snapshot(
                    vec![policy(&me_str, "enforce", frontend, "no-slash")],
                    vec![root()],
                ),
                |e| {
                    matches!(e, SnapshotError::Policy(moat_wire::WireError::Invalid { source, .. })
                        if source.problem == "invalid path pattern")
                },
            ),
        ];
        for (i, (snap, refused_for)) in cases.into_iter().enumerate() {
            let err = from_proto(snap, &me()).unwrap_err();
            assert!(refused_for(&err), "case {i}: {err}");
        }
        let mut bad_posture = snapshot(vec![], vec![root()]);
        bad_posture.mesh = Some(pb::MeshSettings {
            default_posture: "open".into(),
            ..Default::default()
        });
        // A key set the proxy cannot use is refused like any other bad field.
        let mut bad_keys = snapshot(vec![], vec![root()]);
        bad_keys.mesh = Some(pb::MeshSettings {
            jwt_issuers: vec![pb::JwtIssuer {
                issuer: "https://id.example".into(),
                jwks_json: r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into(),
                algorithms: vec!["RS256".into()],
                clock_skew_seconds: 30,
            }],
            ..Default::default()
        });
        let err = from_proto(bad_keys, &me()).unwrap_err();
        assert!(
            matches!(
                &err,
                SnapshotError::Keys {
                    source: moat_policy::jwt::JwksError::Symmetric { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = from_proto(bad_posture, &me()).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Invalid { source, .. }
                if source.problem == "unknown default posture"),
            "{err}"
        );
        // A suite name the proxy does not know is refused, not read as the default.
        let mut bad_cipher = snapshot(vec![], vec![root()]);
        bad_cipher.mesh = Some(pb::MeshSettings {
            cipher_preference: "chacha20".into(),
            ..Default::default()
        });
        let err = from_proto(bad_cipher, &me()).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Invalid { at, source }
                if at == "mesh.cipher_preference" && source.problem == "unknown cipher preference"),
            "{err}"
        );
    }
}
