//! Seed inputs that reach deep into each parser (valid documents, a CSR, a snapshot the proxy
//! accepts, the attacks the canonicaliser must stop), written into the corpora by `fuzz/run`.

use moat_api::v1 as pb;

const PATHS: &[&str] = &[
    "/p/x",
    "/p/a/../b",
    "/p/../admin",
    "/p/%2e%2e/admin",
    "/p/%2E%2E/admin",
    "/p/..%2fadmin",
    "/p/./../admin",
    "/p/x/../../admin",
    "/p/x;/../../admin",
    "/p/.%2e/admin",
    "/p/..;/admin",
    "/p/..%3B/admin",
    "/p/%252e%252e/admin",
    "/p//x/./y?q=1",
    "/p/%41%7e%5f",
];

const FIRST_BYTES: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: b\r\n\r\n",
    b"get /admin HTTP/1.1\r\n",
    b"PROPFIND /admin HTTP/1.1\r\n",
    b"GET http://b/p/../admin HTTP/1.0\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    b"\x16\x03\x01\x02\0\x01\0\x01\xfc\x03\x03",
    b"get key\r\n",
    b"EHLO mail\r\n",
    b"*1\r\n$4\r\nPING\r\n",
];

/// Tokens signed, before the key was thrown away, by the key of [`crate::FUZZ_JWKS`]; they
/// expire in 2100. One with a `kid`, one without.
pub const SIGNED_TOKENS: [&str; 2] = [
    "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImZ1enoifQ.eyJpc3MiOiJodHRwczovL2Z1enoubW9hdC5pbnZhbGlkIiwic3ViIjoiYWxpY2UiLCJhdWQiOlsib3JkZXJzIl0sImV4cCI6NDEwMjQ0NDgwMCwibmJmIjowLCJzY29wZSI6Im9yZGVycy5yZWFkIG9yZGVycy53cml0ZSJ9.mEJIvvcwDcsAnfDoBnbukEsktpBUWXkOkBIE-byjFyufD3ifTzTEzQ5mbB3mBvkHjWQO4S9WCDwAPQif-dZNEg",
    "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodHRwczovL2Z1enoubW9hdC5pbnZhbGlkIiwic3ViIjoiYm9iIiwiYXVkIjoib3JkZXJzIiwiZXhwIjo0MTAyNDQ0ODAwfQ.ris703GX_q9OupIxt_UVnjFY8rK3jN-ehn6fPDJ_-6xgrLdCnxS4XzXPjj-FMSQCSB24M3Oop4P2972QHz8Qpw",
];

/// Tokens every verifier must refuse: `alg: none`, and HS256 "signed" with a guessable secret.
const REFUSED_TOKENS: [&str; 2] = [
    "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL2Z1enoubW9hdC5pbnZhbGlkIiwiZXhwIjo0MTAyNDQ0ODAwfQ.",
    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImZ1enoifQ.eyJpc3MiOiJodHRwczovL2Z1enoubW9hdC5pbnZhbGlkIiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2ln",
];

const POLICY_YAML: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: b, namespace: shop }
spec:
  target: shop/b
  mode: audit
  rules:
    - from: [a, spiffe://moat.local/ns/x/sa/y]
      ports: [8080, 9090]
      http: [{ methods: [GET, M-SEARCH], paths: ["/p/*", "/exact", "*"] }]
      jwt: { issuers: ["https://fuzz.moat.invalid"], audiences: [orders], claims: { scope: [read] } }
      rateLimit: { requestsPerSecond: 5, burst: 10, per: client-and-route }
---
apiVersion: moat.dev/v1
kind: MeshConfig
metadata: { name: mesh }
spec:
  defaultPosture: allow-authenticated
  cipherPreference: aes-128-gcm
  jwtIssuers:
    - issuer: https://fuzz.moat.invalid
      jwks: { inline: 'JWKS' }
      algorithms: [ES256]
      clockSkew: 10s
"#;

const POLICY_JSON: &str = r#"{"apiVersion":"moat.dev/v1","kind":"AccessPolicy","metadata":{"name":"c"},"spec":{"target":"c","rules":[{"from":["a"],"http":[{"methods":["POST"],"paths":["/moat.test.Echo/*"]}]}]}}"#;

fn bundle_der() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap_or_else(|e| panic!("params: {e}"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .self_signed(&key)
        .unwrap_or_else(|e| panic!("root: {e}"))
        .der()
        .to_vec()
}

fn snapshot() -> Vec<u8> {
    use prost::Message as _;
    let me = crate::snapshot_identity().to_string();
    let s = pb::Snapshot {
        version: 7,
        trust_bundle_der: vec![bundle_der()],
        policies: vec![pb::Policy {
            namespace: "default".into(),
            name: "b".into(),
            version: 7,
            target: me.clone(),
            mode: "enforce".into(),
            rules: vec![pb::PolicyRule {
                from: vec!["spiffe://moat.local/ns/default/sa/a".into()],
                ports: vec![8080],
                http: vec![pb::HttpRoute {
                    methods: vec!["GET".into()],
                    paths: vec!["/p/*".into()],
                }],
                jwt: Some(pb::JwtRequirement {
                    issuers: vec![crate::FUZZ_ISSUER.into()],
                    audiences: vec!["orders".into()],
                    claims: vec![pb::ClaimRequirement {
                        name: "scope".into(),
                        values: vec!["read".into()],
                    }],
                }),
                rate_limit: Some(pb::RateLimit {
                    requests_per_second: 5,
                    burst: 10,
                    per: "route".into(),
                }),
            }],
        }],
        mesh: Some(pb::MeshSettings {
            default_posture: "deny".into(),
            cipher_preference: "aes-128-gcm".into(),
            jwt_issuers: vec![pb::JwtIssuer {
                issuer: crate::FUZZ_ISSUER.into(),
                jwks_json: crate::FUZZ_JWKS.into(),
                algorithms: vec!["ES256".into()],
                clock_skew_seconds: 30,
            }],
        }),
        services: vec![pb::Service {
            spiffe_id: "spiffe://moat.local/ns/default/sa/c".into(),
            endpoints: vec!["127.0.0.1:7143".into()],
        }],
        rotate_generation: 1,
        revoked_identities: vec!["spiffe://moat.local/ns/default/sa/evil".into()],
        revoked_serials: vec!["44e01c1d".into()],
        ..pb::Snapshot::default()
    };
    s.encode_to_vec()
}

/// Every seed, as (target, input).
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    out.extend(
        PATHS
            .iter()
            .map(|p| ("canonical_path", p.as_bytes().to_vec())),
    );
    out.extend(FIRST_BYTES.iter().map(|b| ("detect", b.to_vec())));
    let key = moat_identity::csr::WorkloadKey::generate(&crate::snapshot_identity())
        .unwrap_or_else(|e| panic!("csr: {e}"));
    out.push(("csr", key.csr_der().to_vec()));
    out.push((
        "policy_document",
        POLICY_YAML.replace("JWKS", crate::FUZZ_JWKS).into_bytes(),
    ));
    out.push(("policy_document", POLICY_JSON.as_bytes().to_vec()));
    out.push(("snapshot", snapshot()));
    out.extend(
        SIGNED_TOKENS
            .iter()
            .chain(&REFUSED_TOKENS)
            .map(|t| ("jwt", t.as_bytes().to_vec())),
    );
    out
}
