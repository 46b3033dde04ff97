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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_command_prints_json_and_yaml_that_parse() {
    let cp = ControlPlane::start().unwrap();
    moat_test_util::apply_policy(&cp, MESH_POLICY);
    let _orders = moat_test_util::Proxy::builder(&cp, "orders")
        .app(moat_test_util::apps::http_echo().await)
        .start()
        .unwrap();
    token(&cp, "orders", &[]);
    cp.moat_ok(&["revoke", "--identity", "intruder", "--reason", "test"]);
    let admin = cp.admin_dir();
    let cert = admin.join("cert.pem").display().to_string();
    let bundle = admin.join("bundle.pem").display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["token", "list"],
        vec!["ca", "show"],
        vec!["cert", "inspect", &cert, "--bundle", &bundle],
        vec!["audit"],
        vec!["policy", "get"],
        vec!["policy", "history", "default/orders"],
        vec!["policy", "status"],
        vec![
            "policy", "explain", "--from", "frontend", "--to", "orders", "--method", "GET",
            "--path", "/",
        ],
        vec!["status"],
        vec!["check"],
        vec!["revoke", "--list"],
        vec!["version"],
        vec!["version", "--client"],
    ];
    for cmd in &commands {
        let json = cp.moat(&[cmd.as_slice(), &["-o", "json"]].concat());
        let text = String::from_utf8_lossy(&json.stdout);
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("moat {cmd:?} -o json: {e}\n{text}\n{}", stderr(&json)));
        assert!(v.is_object() || v.is_array(), "moat {cmd:?}: {v}");
        if cmd[0] != "check" {
            assert!(json.status.success(), "moat {cmd:?}: {}", stderr(&json));
        }
        let yaml = cp.moat(&[cmd.as_slice(), &["-o", "yaml"]].concat());
        let text = String::from_utf8_lossy(&yaml.stdout);
        if cmd[..] == ["policy", "get"] {
            // The policy documents themselves, one YAML document each.
            use serde::Deserialize as _;
            let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
                .map(|d| serde_json::Value::deserialize(d).unwrap())
                .collect();
            assert!(docs.iter().any(|d| d["kind"] == "AccessPolicy"), "{text}");
            continue;
        }
        let y: serde_json::Value = serde_yaml_ng::from_str(&text)
            .unwrap_or_else(|e| panic!("moat {cmd:?} -o yaml: {e}\n{text}"));
        assert_eq!(y.is_array(), v.is_array(), "moat {cmd:?}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(v["client"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["control_plane"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["control_plane"]["trust_domain"], "moat.local");
    let v: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["revoke", "--list", "-o", "json"])).unwrap();
    assert_eq!(
        v[0]["value"], "spiffe://moat.local/ns/default/sa/intruder",
        "{v}"
    );
    let out = cp.moat(&["check", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["checks"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["name"] == "control plane reachable" && c["ok"] == true)),
        "{v}"
    );
    assert_eq!(v["failed"] == 0, out.status.success(), "{v}");
    let v: serde_json::Value = serde_json::from_str(
        &cp.moat_ok(&["cert", "inspect", &cert, "--bundle", &bundle, "-o", "json"]),
    )
    .unwrap();
    assert_eq!(
        v["verified"]["spiffe_id"], v["certificates"][0]["spiffe_id"],
        "{v}"
    );
}

#[test]
fn shell_completions_cover_the_commands() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef moat"),
        ("fish", "complete -c moat"),
    ] {
        let out = moat(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}:\n{script}");
        for cmd in ["policy", "revoke", "version"] {
            assert!(script.contains(cmd), "{shell} lacks {cmd}");
        }
    }
    assert_eq!(moat(&["completion", "tcsh"]).status.code(), Some(2));
}

/// Every line `moat-control` and `moat-proxy` write with `--log-format json` is a JSON log
/// event, the start-up lines and the final error included; nothing goes to stdout.
#[test]
fn with_json_logs_every_line_of_both_binaries_is_json() {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    moat_test_util::write_secret(&kek, moat_test_util::TEST_KEK).unwrap();
    let data = dir.path().join("data");
    let mut control = Command::new(bin("moat-control"))
        .arg("--log-format")
        .arg("json")
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--kek-file")
        .arg(&kek)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the control plane's log until it says where it listens.
    let mut lines = BufReader::new(control.stderr.take().unwrap()).lines();
    let mut cp_lines = Vec::new();
    let url = loop {
        let line = lines.next().expect("the control plane stopped").unwrap();
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        cp_lines.push(line);
        if let Some(addr) = event["fields"]["message"]
            .as_str()
            .and_then(|m| m.strip_prefix("listening on "))
        {
            break format!("https://{addr}");
        }
    };
    let token = dir.path().join("token");
    std::fs::write(&token, "not-a-token").unwrap();
    let proxy = Command::new(bin("moat-proxy"))
        .args([
            "--log-format",
            "json",
            "--identity",
            "orders",
            "--control-plane",
            &url,
        ])
        .args([
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--app",
            "127.0.0.1:9",
        ])
        .arg("--token-file")
        .arg(&token)
        .arg("--trust-anchors")
        .arg(data.join("admin/bundle.pem"))
        .output()
        .unwrap();
    assert_eq!(proxy.status.code(), Some(1), "{}", stderr(&proxy));
    assert!(
        proxy.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&proxy.stdout)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&proxy.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused our token")),
        "{last}"
    );
    let _ = control.kill();
    let out = control.wait_with_output().unwrap();
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    for line in lines.map_while(Result::ok) {
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}
