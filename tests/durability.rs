//! Nothing acknowledged is lost, and no CA key is ever on disk in the clear: `kill -9` and
//! restart on the same data directory, scan the files, and start with the wrong KEK.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use moat_test_util::{ControlPlane, files_under};

#[test]
fn kill_dash_nine_and_restart_keeps_root_tokens_and_audit() {
    let mut cp = ControlPlane::start().unwrap();
    let ca_before = cp.moat_ok(&["ca", "show"]);
    // Every acknowledged token creation must survive, including the last one before the kill.
    let tokens: Vec<String> = (0..15)
        .map(|i| token(&cp, &format!("svc-{i}"), &["--uses", "2"]))
        .collect();
    let audit_before = cp.moat_ok(&["audit", "--limit", "1000"]);
    cp.kill9();
    cp.restart().unwrap();

    assert_eq!(
        cp.moat_ok(&["ca", "show"]),
        ca_before,
        "same root and intermediate after restart"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["token", "list", "-o", "json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), tokens.len());
    let audit_after = cp.moat_ok(&["audit", "--limit", "1000"]);
    for line in audit_before.lines() {
        assert!(audit_after.contains(line), "audit entry lost: {line}");
    }
    // The tokens still work after the restart.
    let out = cp.scratch().join("svc-14");
    let request = cert_request(&cp, &cp.url(), "svc-14", &tokens[14], &out);
    assert!(request.status.success(), "{}", stderr(&request));
}

/// PKCS#8 DER prefix of an ECDSA P-256 private key.
const P256_PKCS8_PREFIX: &[u8] = &[
    0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
    0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04,
];

#[test]
fn no_ca_key_in_clear_and_a_wrong_or_missing_kek_refuses_to_start() {
    let mut cp = ControlPlane::start().unwrap();
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "x",
        "--out",
        cp.scratch().join("x").to_str().unwrap(),
    ]);
    cp.kill9();

    let admin_key = cp.admin_dir().join("key.pem");
    let files = files_under(cp.data_dir());
    assert!(files.iter().any(|f| f.ends_with("moat.redb")), "{files:?}");
    for f in &files {
        // The admin credential's own key is the CLI's client key, not a CA key.
        if f == &admin_key {
            continue;
        }
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"PRIVATE KEY"),
            "PEM private key in {}",
            f.display()
        );
        assert!(
            !bytes
                .windows(P256_PKCS8_PREFIX.len())
                .any(|w| w == P256_PKCS8_PREFIX),
            "DER private key in {}",
            f.display()
        );
        let kek = moat_test_util::TEST_KEK.as_bytes();
        assert!(
            !bytes.windows(kek.len()).any(|w| w == kek),
            "the KEK is stored in {}",
            f.display()
        );
    }

    // The wrong KEK: a clear error and no start.
    let wrong = cp.scratch().join("wrong-kek");
    moat_test_util::write_secret(&wrong, "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=").unwrap();
    let out = cp.serve_command(&wrong).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("key-encryption key is not the one"),
        "{}",
        stderr(&out)
    );

    // A KEK that is not 32 bytes.
    moat_test_util::write_secret(&wrong, "c2hvcnQ=").unwrap();
    let out = cp.serve_command(&wrong).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("must be 32 bytes"),
        "{}",
        stderr(&out)
    );

    // The right KEK in a file others can read (0644): refused, with the chmod that fixes it.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(&wrong, moat_test_util::TEST_KEK).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cp.serve_command(&wrong).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mode 0644") && stderr(&out).contains("chmod 600"),
        "{}",
        stderr(&out)
    );

    // No KEK at all (and no --dev): usage error.
    let out = std::process::Command::new(moat_test_util::bin("moat-control"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(cp.data_dir())
        .env_remove("MOAT_KEK")
        .env_remove("MOAT_KEK_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no key-encryption key"),
        "{}",
        stderr(&out)
    );

    // The right KEK still opens it.
    cp.restart().unwrap();
    cp.moat_ok(&["ca", "show"]);
}
