//! Every field of the policy documents is described in docs/policy.md. The field list comes from
//! the canonical serialiser, so a new field fails this test until it is documented.

// Test helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use moat_identity::TrustDomain;
use moat_policy::{Document, access_policy_yaml, mesh_config_yaml, parse_documents};

const FULL: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders, namespace: shop }
spec:
  target: shop/orders
  mode: audit
  rules:
    - from: [shop/frontend]
      ports: [8080]
      http: [{ methods: [GET], paths: ["/orders/*"] }]
      jwt: { issuers: [https://id.example], audiences: [orders], claims: { scope: [orders.read] } }
      rateLimit: { requestsPerSecond: 10, burst: 20, per: client }
---
apiVersion: moat.dev/v1
kind: MeshConfig
metadata: { name: mesh }
spec:
  defaultPosture: allow-authenticated
  cipherPreference: aes-128-gcm
  jwtIssuers:
    - issuer: https://id.example
      jwks: { inline: '{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}' }
      algorithms: [EdDSA]
      clockSkew: 30s
    - issuer: https://login.example
      jwks: { url: https://login.example/jwks.json, caFile: /etc/moat/ca.pem, refresh: 5m }
    - issuer: https://files.example
      jwks: { file: /etc/moat/jwks.json }
  kubernetes:
    issuer: https://kubernetes.default.svc.cluster.local
    jwks: { file: /var/run/secrets/cluster/jwks.json }
    audience: moat
"#;

fn keys(v: &serde_yaml_ng::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml_ng::Value::Mapping(m) => {
            for (k, v) in m {
                if let Some(k) = k.as_str() {
                    out.push(k.to_owned());
                }
                keys(v, out);
            }
        }
        serde_yaml_ng::Value::Sequence(s) => s.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn every_policy_field_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policy.md"))
        .unwrap();
    let mut fields = Vec::new();
    for d in parse_documents(FULL, "full", &TrustDomain::default_domain()).unwrap() {
        let text = match &d {
            Document::AccessPolicy(p) => access_policy_yaml(p),
            Document::MeshConfig(m) => mesh_config_yaml(m),
        };
        keys(&serde_yaml_ng::from_str(&text).unwrap(), &mut fields);
    }
    fields.sort();
    fields.dedup();
    assert!(fields.len() >= 14, "{fields:?}");
    let missing: Vec<_> = fields
        .iter()
        .filter(|f| {
            !doc.contains(&format!("`{f}`"))
                && !doc.contains(&format!(".{f}`"))
                && !doc.contains(&format!("{f}:"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/policy.md does not describe: {missing:?}"
    );
}
