//! End-user tokens and rate limits at the inbound sidecar, over the real binaries, with tokens
//! signed in the test by keys generated in the test.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::tokens::{Signer, jwks, now};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moat_test_util::apps::http_echo;
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};

const ISSUER: &str = "https://id.moat.test";

fn claims(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "iss": ISSUER, "aud": "orders", "sub": "alice", "scope": "orders.read profile",
        "exp": now() + 300, "iat": now(),
    });
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn mesh_config(jwks_file: &Path) -> String {
    format!(
        r#"
apiVersion: moat.dev/v1
kind: MeshConfig
metadata: {{ name: mesh }}
spec:
  jwtIssuers:
    - issuer: {ISSUER}
      jwks: {{ file: {}, refresh: 1s }}
      algorithms: [RS256, ES256, EdDSA]
      clockSkew: 30s
"#,
        jwks_file.display()
    )
}

const ORDERS_NEEDS_A_TOKEN: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      jwt:
        issuers: [https://id.moat.test]
        audiences: [orders]
        claims: { scope: [orders.read] }
"#;

/// (status, x-moat-deny-reason, www-authenticate, body) of GET `url` with `token`.
async fn call(
    url: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, String, String, String) {
    let client = h1_client();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    let (status, h, body) = get(&client, "GET", url, &headers).await.unwrap();
    let header = |n: &str| {
        h.get(n)
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    (
        status,
        header("x-moat-deny-reason"),
        header("www-authenticate"),
        body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_at_the_sidecar_and_each_failure_has_its_reason() {
    let cp = ControlPlane::start().unwrap();
    let (rsa, ec, ed) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"), Signer::ed("ed-1"));
    let jwks_file = cp.scratch().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&rsa, &ec, &ed])).unwrap();
    apply_policy(
        &cp,
        &format!("{}---{ORDERS_NEEDS_A_TOKEN}", mesh_config(&jwks_file)),
    );
    let (orders, frontend) = echo_pair(&cp, "orders", "frontend").await;
    wait_for_services(&frontend, &["orders"]);
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));

    // Valid tokens of each algorithm: 200, and the app sees the verified subject and its issuer,
    // not forged ones.
    for s in [&rsa, &ec, &ed] {
        let t = s.sign(&claims(serde_json::json!({})));
        let (status, _, _, body) = eventually(Duration::from_secs(10), || {
            let r = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(call(
                    &url,
                    Some(&t),
                    &[
                        ("x-moat-user", "mallory"),
                        ("x-moat-user-issuer", "https://evil.test"),
                    ],
                ))
            });
            (r.0 == 200).then_some(r)
        })
        .unwrap_or_else(|| panic!("{:?} token refused", s.alg));
        assert_eq!(status, 200);
        assert!(
            body.contains(&format!("user=alice issuer={ISSUER} bearer=true")),
            "{body}"
        );
    }

    // Missing: 401 with a bare challenge.
    let (status, reason, challenge, _) = call(&url, None, &[("x-moat-user", "mallory")]).await;
    assert_eq!((status, reason.as_str()), (401, "jwt-missing"));
    assert_eq!(challenge, r#"Bearer realm="moat""#);

    // Each way a token can be wrong, with its own reason.
    let valid = rsa.sign(&claims(serde_json::json!({})));
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = {
        let mut c = claims(serde_json::json!({}));
        c["sub"] = "root".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let alg_none = {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        format!("{h}.{}.", parts[1])
    };
    let hs256_confusion = {
        // The RSA public key (as published) used as an HMAC secret.
        let secret = serde_json::to_vec(&rsa.jwk).unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &header,
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(&secret),
        )
        .unwrap()
    };
    let unknown_kid = {
        let other = Signer::ec("nobody");
        other.sign(&claims(serde_json::json!({})))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", rsa.sign(&claims(serde_json::json!({"exp": now() - 120})))
            , "jwt-expired"),
        ("not yet valid", rsa.sign(&claims(serde_json::json!({"nbf": now() + 120}))), "jwt-not-yet-valid"),
        ("wrong audience", rsa.sign(&claims(serde_json::json!({"aud": "payments"}))), "jwt-audience-not-allowed"),
        ("wrong issuer", rsa.sign(&claims(serde_json::json!({"iss": "https://evil.test"}))), "jwt-issuer-unknown"),
        ("unknown kid", unknown_kid, "jwt-unknown-kid"),
        ("alg none", alg_none, "jwt-algorithm-not-allowed"),
        ("HS256 with the RSA key", hs256_confusion, "jwt-algorithm-not-allowed"),
        ("tampered payload", tampered, "jwt-bad-signature"),
        ("no exp", rsa.sign(&serde_json::json!({"iss": ISSUER, "aud": "orders", "sub": "alice", "scope": "orders.read"})), "jwt-malformed"),
        ("garbage", "not.a.token".to_owned(), "jwt-malformed"),
    ];
    for (name, token, want) in &cases {
        let (status, reason, challenge, body) = call(&url, Some(token), &[]).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(&reason, want, "{name}");
        assert!(
            challenge.contains(r#"error="invalid_token""#) && challenge.contains(want),
            "{name}: {challenge}"
        );
    }

    // A valid token next to a forged one in a second Authorization header: the sidecar
    // verifies one, the app might read the other, so neither is taken and nothing reaches the
    // app (its echo would be the body).
    let root = Signer::ec("forger").sign(&claims(serde_json::json!({"sub": "root"})));
    let (valid_bearer, forged) = (format!("Bearer {valid}"), format!("Bearer {root}"));
    for second in [forged.as_str(), "Basic YWxpY2U6eA=="] {
        let headers = [
            ("authorization", valid_bearer.as_str()),
            ("authorization", second),
        ];
        let (status, reason, _, body) = call(&url, None, &headers).await;
        assert_eq!((status, reason.as_str()), (401, "jwt-malformed"), "{body}");
        assert!(!body.contains("method="), "the app answered: {body}");
    }

    // The right token without the scope: 403, insufficient scope.
    let no_scope = rsa.sign(&claims(serde_json::json!({"scope": "profile"})));
    let (status, reason, challenge, _) = call(&url, Some(&no_scope), &[]).await;
    assert_eq!((status, reason.as_str()), (403, "jwt-claims-not-allowed"));
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    // A scope list claim works as well as a space-separated one.
    let list_scope = rsa.sign(&claims(serde_json::json!({"scope": ["orders.read"]})));
    assert_eq!(call(&url, Some(&list_scope), &[]).await.0, 200);

    // The reasons show in the sidecar's metrics...
    let metrics = orders.metrics();
    for (_, _, want) in &cases {
        assert!(
            metrics.contains(&format!("reason=\"{want}\"")),
            "{want} not counted"
        );
    }
    // ...and `moat policy explain` evaluates claims offline the same way.
    let explain = |c: &str| {
        let out = cp.moat(&[
            "policy",
            "explain",
            "--from",
            "frontend",
            "--to",
            "orders",
            "--method",
            "GET",
            "--path",
            "/orders/1",
            "--jwt-claims",
            c,
            "-o",
            "json",
        ]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", stderr(&out)))
    };
    let ok = explain(&claims(serde_json::json!({})).to_string());
    assert_eq!(ok["allowed"], true, "{ok}");
    let denied = explain(&claims(serde_json::json!({"scope": "profile"})).to_string());
    assert_eq!(denied["reason"], "jwt-claims-not-allowed", "{denied}");
    let bad = cp.moat(&[
        "policy",
        "explain",
        "--from",
        "frontend",
        "--to",
        "orders",
        "--method",
        "GET",
        "--path",
        "/",
        "--jwt-claims",
        "[1]",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("must be a JSON object"),
        "{}",
        stderr(&bad)
    );

    // JWKS rotation: the issuer publishes a new key and retires the old ones; the new key's
    // tokens are accepted within one refresh, the old key's refused, and nothing restarted.
    let pid = (orders.pid(), frontend.pid());
    let rotated = Signer::rsa("rsa-2");
    std::fs::write(&jwks_file, jwks(&[&rotated])).unwrap();
    let fresh = rotated.sign(&claims(serde_json::json!({})));
    let accepted = eventually(Duration::from_secs(10), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(call(&url, Some(&fresh), &[]))
        });
        (r.0 == 200).then_some(())
    });
    assert!(accepted.is_some(), "the new key's tokens were not accepted");
    let (status, reason, _, _) = call(&url, Some(&valid), &[]).await;
    assert_eq!((status, reason.as_str()), (401, "jwt-unknown-kid"));
    assert_eq!((orders.pid(), frontend.pid()), pid);
}

/// The app hears of an end user (`x-moat-user`) only from a token that the rule allowing the
/// request held to its issuers, audiences and claims. A caller allowed on a route without a
/// `jwt` part, sending a token signed by a trusted issuer but minted for another service, is
/// served as a caller with no user. (Before, any valid signature named the user on any route
/// of a sidecar with one `jwt` rule: the app received `user=alice` here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_token_the_allowing_rule_checked_names_the_user() {
    let cp = ControlPlane::start().unwrap();
    let signer = Signer::ec("ec-1");
    let jwks_file = cp.scratch().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&signer])).unwrap();
    let policy = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      http: [{ methods: [GET], paths: ["/public/*"] }]
    - from: [frontend]
      http: [{ methods: [GET], paths: ["/account/*"] }]
      jwt: { issuers: [https://id.moat.test], audiences: [orders] }
"#;
    apply_policy(&cp, &format!("{}---{policy}", mesh_config(&jwks_file)));
    let (_orders, frontend) = echo_pair(&cp, "orders", "frontend").await;
    wait_for_services(&frontend, &["orders"]);
    let base = format!("http://{}", frontend.upstream("orders"));
    let for_orders = signer.sign(&claims(serde_json::json!({})));
    let for_billing = signer.sign(&claims(serde_json::json!({"aud": "billing"})));

    // The rule that asks for a token: its own audience names the user, another's is refused.
    let account = format!("{base}/account/1");
    let (status, _, _, body) = eventually(Duration::from_secs(10), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(call(&account, Some(&for_orders), &[]))
        });
        (r.0 == 200).then_some(r)
    })
    .expect("the right token was refused on /account");
    assert_eq!(status, 200);
    assert!(body.contains("user=alice "), "{body}");
    let (status, reason, _, _) = call(&account, Some(&for_billing), &[]).await;
    assert_eq!((status, reason.as_str()), (401, "jwt-audience-not-allowed"));

    // The rule without one: served, and the app hears of no user, whichever token came.
    let public = format!("{base}/public/1");
    for token in [&for_billing, &for_orders] {
        let (status, _, _, body) = call(&public, Some(token), &[("x-moat-user", "mallory")]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("method=GET path=/public/1 "), "{body}");
        assert!(
            body.contains("user= issuer= "),
            "the app was told of a user: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_issuer_configuration_is_refused_at_apply_and_nothing_changes() {
    let cp = ControlPlane::start().unwrap();
    let signer = Signer::ec("ec-1");
    let good = cp.scratch().join("good.json");
    std::fs::write(&good, jwks(&[&signer])).unwrap();
    apply_policy(&cp, &mesh_config(&good));
    let before = cp.moat_ok(&["policy", "get", "-o", "yaml"]);
    assert!(
        before.contains("kind: MeshConfig") && before.contains(ISSUER),
        "{before}"
    );

    let write = |name: &str, text: &str| {
        let p = cp.scratch().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let with_inline = |jwks: &str| {
        format!(
            "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  jwtIssuers:\n    - issuer: {ISSUER}\n      jwks: {{ inline: '{jwks}' }}\n"
        )
    };
    let symmetric = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
    let missing = cp.scratch().join("nope.json");
    let cases: Vec<(String, &str)> = vec![
        (with_inline("not json"), "not a JWKS document"),
        (with_inline(r#"{"keys":[]}"#), "holds no signature key"),
        (with_inline(symmetric), "symmetric key"),
        (mesh_config(&missing), "cannot read"),
        (
            format!(
                "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  jwtIssuers:\n    - issuer: {ISSUER}\n      jwks: {{ url: https://127.0.0.1:1/jwks.json }}\n"
            ),
            "cannot connect",
        ),
        (
            format!(
                "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  jwtIssuers:\n    - issuer: {ISSUER}\n      jwks: {{ url: http://id.example/jwks.json }}\n"
            ),
            "must be an https:// URL",
        ),
        (
            format!(
                "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  jwtIssuers:\n    - issuer: {ISSUER}\n      jwks: {{ file: {} }}\n      algorithms: [HS256]\n",
                good.display()
            ),
            "unsupported algorithm",
        ),
        (
            ORDERS_NEEDS_A_TOKEN.replace("https://id.moat.test", "https://unknown.test"),
            "does not list under jwtIssuers",
        ),
        (
            ORDERS_NEEDS_A_TOKEN.replace("        audiences: [orders]\n", ""),
            "missing field `audiences`",
        ),
        (
            format!("{ORDERS_NEEDS_A_TOKEN}      rateLimit: {{ requestsPerSecond: 0 }}\n"),
            "must be between 1 and",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let file = write(&format!("bad-{i}.yaml"), text);
        let out = cp.moat(&["policy", "apply", "-f", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "case {i} was applied:\n{text}");
        assert!(stderr(&out).contains(want), "case {i}: {}", stderr(&out));
    }
    assert_eq!(
        cp.moat_ok(&["policy", "get", "-o", "yaml"]),
        before,
        "something was applied"
    );
    // The offline validator catches what it can see without the control plane.
    let file = write("offline.yaml", &with_inline(symmetric));
    let out = cp.moat(&["policy", "validate", "-f", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("symmetric key"), "{}", stderr(&out));
}

const LEDGER_RATE_LIMITED: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: ledger }
spec:
  target: ledger
  rules:
    - from: [frontend, orders]
      rateLimit: { requestsPerSecond: 20, burst: 10, per: client }
"#;

/// Sends GET `url` at `rps` for `duration`; returns (accepted, refused with 429 and a
/// Retry-After, anything else).
async fn drive(url: &str, rps: u32, duration: Duration) -> (usize, usize, Vec<String>) {
    let client = h1_client();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps)));
    let end = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let (c, u) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move { get(&c, "GET", &u, &[]).await }));
    }
    let (mut ok, mut limited, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok((200, _, _)) => ok += 1,
            Ok((429, h, _))
                if h.get("retry-after").is_some()
                    && h.get("x-moat-deny-reason")
                        .is_some_and(|r| r == "rate-limited") =>
            {
                limited += 1
            }
            Ok((s, _, b)) => other.push(format!("{s}: {b}")),
            Err(e) => other.push(e),
        }
    }
    (ok, limited, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_per_client_and_spare_other_clients() {
    let cp = ControlPlane::start().unwrap();
    apply_policy(&cp, LEDGER_RATE_LIMITED);
    let _ledger = Proxy::builder(&cp, "ledger")
        .app(http_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["ledger"])
        .start()
        .unwrap();
    let orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .upstreams(&["ledger"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["ledger"]);
    wait_for_services(&orders, &["ledger"]);
    let noisy = format!("http://{}/entries", frontend.upstream("ledger"));
    let quiet = format!("http://{}/entries", orders.upstream("ledger"));
    // frontend at 3× its limit; orders well under it, at the same time.
    let (noisy, quiet) = tokio::join!(
        drive(&noisy, 60, Duration::from_secs(10)),
        drive(&quiet, 10, Duration::from_secs(10)),
    );
    let (ok, limited, other) = noisy;
    assert!(other.is_empty(), "{:?}", &other[..other.len().min(3)]);
    // 20/s for 10 s plus a burst of 10 (and a request's worth of slack for timing at the edges).
    assert!(ok <= 20 * 10 + 10 + 20, "{ok} accepted");
    assert!(
        ok >= 20 * 10 * 8 / 10,
        "only {ok} accepted: the limit throttles too hard"
    );
    assert!(limited >= 300, "{limited} refused");
    let (ok, limited, other) = quiet;
    assert_eq!((limited, other.len()), (0, 0), "{other:?}");
    assert!(ok >= 90, "{ok}");
    let m = _ledger.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("moat_rate_limited_total{") && l.contains("sa/frontend")),
        "{m}"
    );
    assert!(
        !m.lines()
            .any(|l| l.starts_with("moat_rate_limited_total{") && l.contains("sa/orders"))
    );
}

/// An HTTPS server on 127.0.0.1 answering every request with the current `body`; returns its
/// address and the PEM of the CA that signed its certificate.
async fn https_jwks(
    body: std::sync::Arc<std::sync::Mutex<String>>,
) -> (std::net::SocketAddr, String) {
    https_server(move |_| (200, body.lock().unwrap().clone())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_is_fetched_over_https_and_key_rotation_needs_no_restart() {
    let cp = ControlPlane::start().unwrap();
    let (old, new) = (Signer::rsa("2026-a"), Signer::ed("2026-b"));
    let served = std::sync::Arc::new(std::sync::Mutex::new(jwks(&[&old])));
    let (addr, ca_pem) = https_jwks(served.clone()).await;
    let ca_file = cp.scratch().join("jwks-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mesh = format!(
        "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  jwtIssuers:\n    - issuer: {ISSUER}\n      jwks: {{ url: \"https://{addr}/.well-known/jwks.json\", caFile: {}, refresh: 1s }}\n",
        ca_file.display()
    );
    // Without the CA the server is not trusted: refused at apply.
    let untrusted = cp.scratch().join("untrusted.yaml");
    std::fs::write(
        &untrusted,
        mesh.replace(&format!(", caFile: {}", ca_file.display()), ""),
    )
    .unwrap();
    let out = cp.moat(&["policy", "apply", "-f", untrusted.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("TLS with"), "{}", stderr(&out));

    apply_policy(&cp, &format!("{mesh}---{ORDERS_NEEDS_A_TOKEN}"));
    let _orders = Proxy::builder(&cp, "orders")
        .app(http_echo().await)
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let accepted = |token: String| {
        let url = url.clone();
        eventually(Duration::from_secs(10), move || {
            let r = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(call(&url, Some(&token), &[]))
            });
            (r.0 == 200).then_some(())
        })
        .is_some()
    };
    assert!(accepted(old.sign(&claims(serde_json::json!({})))));
    // The issuer adds a new key and retires the old one.
    *served.lock().unwrap() = jwks(&[&new]);
    assert!(accepted(new.sign(&claims(serde_json::json!({})))));
    let (status, reason, _, _) =
        call(&url, Some(&old.sign(&claims(serde_json::json!({})))), &[]).await;
    assert_eq!((status, reason.as_str()), (401, "jwt-unknown-kid"));
}
