//! Helpers shared by the end-to-end scenarios: gRPC clients that dial the real control plane the
//! way a sidecar does, and credential loading.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use moat_api::v1::identity_client::IdentityClient;
use moat_identity::{SpiffeId, TrustBundle, TrustDomain};
use moat_test_util::ControlPlane;
use moat_tls::Credential;
use tonic::transport::Channel;

pub fn td() -> TrustDomain {
    TrustDomain::default_domain()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse_with_default(s, &td()).unwrap()
}

pub fn control_id() -> SpiffeId {
    id("moat-system/moat-control")
}

pub fn bundle(cp: &ControlPlane) -> TrustBundle {
    TrustBundle::from_pem(&std::fs::read(cp.admin_dir().join("bundle.pem")).unwrap()).unwrap()
}

/// Loads a credential directory written by the control plane or `moat cert ...`.
pub fn credential(dir: &Path, bundle: &TrustBundle) -> Credential {
    Credential::from_pem(
        &std::fs::read(dir.join("cert.pem")).unwrap(),
        &std::fs::read(dir.join("key.pem")).unwrap(),
        bundle,
    )
    .unwrap()
}

/// An Identity client, optionally presenting `cred`.
pub async fn identity_client(
    cp: &ControlPlane,
    cred: Option<&Credential>,
) -> IdentityClient<Channel> {
    let channel = moat_tls::connect::channel(&cp.url(), bundle(cp), control_id(), cred)
        .await
        .unwrap();
    IdentityClient::new(channel)
}

/// Creates a join token with the CLI; returns the token text.
pub fn token(cp: &ControlPlane, identity: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--identity", identity];
    args.extend_from_slice(extra);
    cp.moat_ok(&args).trim().to_owned()
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `moat cert request` against `url` with a join token, trusting the control plane's
/// bundle; writes the credential to `out`.
pub fn cert_request(
    cp: &ControlPlane,
    url: &str,
    identity: &str,
    token: &str,
    out: &Path,
) -> std::process::Output {
    let token_file = out.with_extension("token");
    std::fs::write(&token_file, token).unwrap();
    std::process::Command::new(moat_test_util::bin("moat"))
        .args([
            "--control-plane",
            url,
            "cert",
            "request",
            "--identity",
            identity,
            "--token-file",
        ])
        .arg(&token_file)
        .arg("--trust-anchors")
        .arg(cp.admin_dir().join("bundle.pem"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}
