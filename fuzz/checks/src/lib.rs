//! The properties moat's fuzz targets check, one function per target, each taking the raw
//! input bytes and panicking when a property fails. cargo-fuzz (`fuzz/`, nightly) drives them
//! with libFuzzer; `tests/replay.rs` runs every committed corpus file through them on stable,
//! so a regression on an input the fuzzer once found fails the normal test run.
//!
//! Beyond "no panic", each checks what the parser promises: the canonical path is idempotent,
//! has no dot segments and never leaves a prefix it matched, even as a lenient app reads it;
//! detection never changes its mind as more bytes arrive; a validated CSR names one SPIFFE ID;
//! a parsed policy document round-trips through its canonical form; a token that verifies came
//! from the trusted issuer; a snapshot the proxy accepts holds only valid identities.

use std::sync::OnceLock;

pub mod seeds;

use moat_identity::{SpiffeId, TrustDomain};
use moat_policy::{Document, PathPattern};

/// What a lenient app might make of a path it receives: decode every escape, read `\` as `/`,
/// drop `;` parameters, resolve dot segments and merge slashes.
pub fn as_a_lenient_app_reads_it(path: &str) -> String {
    let mut bytes = Vec::with_capacity(path.len());
    let b = path.as_bytes();
    let hex = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            bytes.push(h << 4 | l);
            i += 3;
            continue;
        }
        bytes.push(b[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Canonicalisation and matching: the result is canonical (idempotent), has no dot segments,
/// and whatever `/p/*` admits stays under `/p/` even for a lenient app.
pub fn canonical_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = moat_policy::canonical_path(raw) else {
        return;
    };
    assert!(c.starts_with('/'), "{raw:?} -> {c:?}");
    assert_eq!(
        moat_policy::canonical_path(&c).as_deref(),
        Ok(c.as_ref()),
        "not idempotent: {raw:?}"
    );
    assert!(
        !c.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} -> {c:?} keeps a dot segment"
    );
    let prefix = PathPattern::Prefix("/p/".to_owned());
    if prefix.matches(&c) {
        let seen = as_a_lenient_app_reads_it(&c);
        assert!(
            seen.starts_with("/p/") || seen == "/p",
            "{raw:?} -> {c:?} matches /p/* but an app reads {seen:?}"
        );
    }
}

/// Protocol detection: a decision, once made, holds whatever bytes follow.
pub fn detect(data: &[u8]) {
    use moat_proxy::detect::classify;
    let full = classify(data);
    for end in 1..data.len() {
        if let Some(p) = classify(&data[..end]) {
            assert_eq!(
                Some(p),
                full,
                "{:?} decided {p:?} after {end} bytes, {full:?} after all",
                String::from_utf8_lossy(data)
            );
            break;
        }
    }
}

/// CSR validation: an accepted CSR asks for exactly one valid SPIFFE ID.
pub fn csr(data: &[u8]) {
    if let Ok(csr) = moat_identity::csr::ValidatedCsr::from_der(data) {
        let text = csr.id.to_string();
        assert_eq!(text.parse::<SpiffeId>().ok().as_ref(), Some(&csr.id));
        assert!(!csr.spki_der.is_empty());
    }
}

fn trust_domain() -> TrustDomain {
    TrustDomain::default_domain()
}

/// Policy documents (YAML or JSON): whatever parses round-trips through its canonical form.
pub fn policy_document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = moat_policy::parse_documents(text, "fuzz", &trust_domain()) else {
        return;
    };
    for d in docs {
        let canonical = match &d {
            Document::AccessPolicy(p) => moat_policy::access_policy_yaml(p),
            Document::MeshConfig(m) => moat_policy::mesh_config_yaml(m),
        };
        let again = moat_policy::parse_documents(&canonical, "canonical", &trust_domain());
        assert_eq!(
            again.as_ref().ok(),
            Some(&vec![d]),
            "{text:?} -> {canonical}"
        );
    }
}

/// The issuer the JWT target trusts. Only its public key is here: the fuzzer cannot sign, so a
/// token that verifies can only be one of the seeds signed before the key was thrown away.
pub const FUZZ_ISSUER: &str = "https://fuzz.moat.invalid";
pub const FUZZ_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"fuzz","alg":"ES256","use":"sig","x":"-TafUq75T2VjMNziA7yFXXFR0YosgMktr6SlJwhkiSY","y":"rTC2LMab2-3wiojxPGPp9dG9azYe3sg5oxig5fEhca0"}]}"#;

/// The trusted issuer of the JWT target (the fuzz JWKS, ES256).
pub fn trusted_issuers() -> &'static [moat_policy::jwt::TrustedIssuer] {
    static ISSUERS: OnceLock<Vec<moat_policy::jwt::TrustedIssuer>> = OnceLock::new();
    ISSUERS.get_or_init(|| {
        let algorithms = vec![moat_policy::JwtAlgorithm::ES256];
        match moat_policy::jwt::Jwks::parse(FUZZ_JWKS, &algorithms) {
            Ok(keys) => vec![moat_policy::jwt::TrustedIssuer {
                issuer: FUZZ_ISSUER.to_owned(),
                algorithms,
                clock_skew: std::time::Duration::from_secs(30),
                keys,
            }],
            Err(e) => panic!("the fuzz JWKS does not parse: {e}"),
        }
    })
}

/// JWT verification: a token that verifies names the trusted issuer and has an expiry.
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = moat_policy::jwt::verify(token, trusted_issuers()) {
        assert_eq!(
            claims.get("iss").and_then(|v| v.as_str()),
            Some(FUZZ_ISSUER)
        );
        assert!(claims.get("exp").is_some_and(serde_json::Value::is_number));
    }
}

/// The snapshot a proxy receives: decoded and converted without panicking; an accepted one
/// holds only policies for this proxy and valid identities.
pub fn snapshot(data: &[u8]) {
    use prost::Message as _;
    let Ok(pb) = moat_api::v1::Snapshot::decode(data) else {
        return;
    };
    let me = snapshot_identity();
    if let Ok(s) = moat_proxy::snapshot::from_proto(pb, &me) {
        for p in &s.policies {
            assert_eq!(p.target, me, "a snapshot kept another service's policy");
            for r in &p.rules {
                assert!(!r.from.is_empty(), "a rule with no caller");
            }
        }
    }
}

/// The identity of the proxy the snapshot target pretends to be.
pub fn snapshot_identity() -> SpiffeId {
    SpiffeId::parse_with_default("default/b", &trust_domain())
        .unwrap_or_else(|e| panic!("a fixed identity does not parse: {e}"))
}
