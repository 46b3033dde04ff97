//! The operator's side: exit codes and messages of `moat` and `moat-control`, and a CLI that
//! refuses to talk to an impostor control plane.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use moat_ca::{CertTtl, CertificateAuthority, Kek};
use moat_identity::{ValidatedCsr, WorkloadKey};
use moat_test_util::{ControlPlane, bin};
use moat_tls::{ClientAuth, Credential};
use rustls::pki_types::PrivateKeyDer;

fn moat(args: &[&str]) -> std::process::Output {
    Command::new(bin("moat")).args(args).output().unwrap()
}

#[test]
fn bad_flags_are_usage_errors_with_exit_2() {
    for args in [
        &["bogus"][..],
        &["token", "create"][..],
        &["token", "create", "--identity", "a", "--ttl", "soon"][..],
        &["token", "create", "--identity", "a", "--uses", "0"][..],
        &["cert", "issue", "--identity", "a"][..],
        &["token", "list", "-o", "xml"][..],
    ] {
        let out = moat(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "moat {args:?}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("error:") && (err.contains("Usage") || err.contains("--help")),
            "moat {args:?}: {err}"
        );
    }
    for args in [
        &["serve"][..],
        &[
            "serve",
            "--data-dir",
            "/tmp/x",
            "--listen",
            "not-an-address",
        ][..],
        &["serve", "--data-dir", "/tmp/x", "--default-cert-ttl", "1m"][..],
        &[
            "serve",
            "--data-dir",
            "/tmp/x",
            "--trust-domain",
            "Bad Domain",
        ][..],
    ] {
        let out = Command::new(bin("moat-control"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "moat-control {args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn failures_say_what_went_wrong_with_exit_1() {
    let cp = ControlPlane::start().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["token", "create", "--identity", "Not/Valid!"],
            "invalid namespace",
        ),
        (
            vec![
                "token",
                "create",
                "--identity",
                "spiffe://other.org/ns/a/sa/b",
            ],
            "outside this mesh's trust domain",
        ),
        (vec!["token", "revoke", "nothex"], "not a token id"),
        (
            vec!["token", "revoke", "0123456789abcdef"],
            "no join token with id",
        ),
        (vec!["cert", "inspect", "/nonexistent.pem"], "cannot read"),
        (
            vec![
                "cert",
                "issue",
                "--identity",
                "a",
                "--ttl",
                "1m",
                "--out",
                "/tmp/moat-x",
            ],
            "outside the accepted range",
        ),
    ];
    for (args, want) in cases {
        let out = cp.moat(&args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "moat {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(want),
            "moat {args:?}: {}",
            stderr(&out)
        );
    }
    // A credentials directory that is not there.
    let out = Command::new(bin("moat"))
        .args([
            "--credentials",
            "/nonexistent",
            "--control-plane",
            &cp.url(),
            "token",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--credentials"), "{}", stderr(&out));
    // A control plane that is not listening.
    let out = Command::new(bin("moat"))
        .args(["--control-plane", "https://127.0.0.1:1", "token", "list"])
        .env("MOAT_CREDENTIALS", cp.admin_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
    // A workload credential is not an admin credential.
    let dir = cp.scratch().join("w");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "shop/orders",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let out = Command::new(bin("moat"))
        .args([
            "--control-plane",
            &cp.url(),
            "--credentials",
            dir.to_str().unwrap(),
            "token",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not an admin identity"),
        "{}",
        stderr(&out)
    );
}

/// A TLS server that holds a certificate for the control plane's SPIFFE ID from another CA.
/// Returns its address and a handle reporting, per connection, whether the handshake completed.
async fn impostor() -> (String, tokio::task::JoinHandle<Vec<bool>>) {
    let (kek, _) = Kek::generate().unwrap();
    let (ca, _) = CertificateAuthority::generate(&td(), &kek).unwrap();
    let wk = WorkloadKey::generate(&control_id()).unwrap();
    let csr = ValidatedCsr::from_der(wk.csr_der()).unwrap();
    let leaf = ca.issue(&csr.spki_der, &csr.id, CertTtl::DEFAULT).unwrap();
    let cred = Credential::new(
        leaf.chain,
        PrivateKeyDer::try_from(wk.private_key_der()).unwrap(),
        ca.bundle(),
    )
    .unwrap();
    let config = moat_tls::server_config(
        &cred,
        Arc::new(ca.bundle().clone()),
        ClientAuth::Optional,
        &[moat_tls::ALPN_H2],
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = tokio::spawn(async move {
        let mut completed = Vec::new();
        // One connection per CLI invocation below.
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(config.clone())
                .accept(tcp)
                .await;
            completed.push(tls.is_ok());
        }
        completed
    });
    (addr, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_an_impostor_before_sending_its_token_or_credential() {
    let cp = ControlPlane::start().unwrap();
    let tok = token(&cp, "shop/orders", &[]);
    let (addr, handle) = impostor().await;
    let url = format!("https://{addr}");

    let out_dir = cp.scratch().join("never");
    let request = cert_request(&cp, &url, "shop/orders", &tok, &out_dir);
    assert_eq!(request.status.code(), Some(1), "{}", stderr(&request));
    assert!(
        stderr(&request).contains("UnknownIssuer"),
        "{}",
        stderr(&request)
    );
    assert!(!out_dir.exists());

    let admin = Command::new(bin("moat"))
        .args(["--control-plane", &url, "token", "list"])
        .env("MOAT_CREDENTIALS", cp.admin_dir())
        .output()
        .unwrap();
    assert_eq!(admin.status.code(), Some(1), "{}", stderr(&admin));

    // The impostor never completed a handshake, so it never received a byte of application
    // data: no token, no request. (TLS 1.3 clients send their certificate only after verifying
    // the server, so the admin certificate was not sent either.)
    assert_eq!(handle.await.unwrap(), vec![false, false]);

    // The token is still unused and works against the real control plane.
    let ok = cert_request(&cp, &cp.url(), "shop/orders", &tok, &out_dir);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

/// The subcommands `moat <path> --help` lists.
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let help = String::from_utf8(moat(&args).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_is_documented() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md")).unwrap();
    let mut missing = Vec::new();
    let top = subcommands(&[]);
    assert!(top.len() >= 4, "{top:?}");
    for cmd in &top {
        let subs = subcommands(&[cmd]);
        let paths: Vec<String> = if subs.is_empty() {
            vec![format!("moat {cmd}")]
        } else {
            subs.iter().map(|s| format!("moat {cmd} {s}")).collect()
        };
        for p in paths {
            if !doc.contains(&format!("## `{p}`")) {
                missing.push(p);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/cli.md lacks a section for: {missing:?}"
    );
}
