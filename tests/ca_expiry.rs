//! CA expiry can never brick the mesh, tried with the clock of every real process moved forward
//! by libfaketime: a control plane that was down while its intermediate expired comes back,
//! replaces it before serving, and the sidecars (whose certificates expired too) get new ones
//! without a restart; a control plane whose root expired waits in recovery mode until the
//! offline `moat-control ca rotate-root` repairs it.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use moat_test_util::{Clock, ControlPlane, Proxy, apply_policy, eventually, http_get};

/// The intermediate's SHA-256 as `moat ca show` prints it.
fn intermediate_sha(cp: &ControlPlane) -> String {
    let out = cp.moat_ok(&["ca", "show"]);
    let mut lines = out.lines().skip_while(|l| !l.starts_with("intermediate"));
    lines.next().expect("an intermediate line");
    lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no sha256 line after the intermediate:\n{out}"))
        .to_owned()
}

#[test]
fn a_year_later_the_expired_intermediate_is_replaced_and_sidecars_recover_without_restart() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clock = Clock::new().unwrap();
    let mut cp = ControlPlane::start_env(&[], clock.env()).unwrap();
    apply_policy(&cp, &common::allow("b", &["a"]));
    let app = rt.block_on(moat_test_util::apps::http_echo());
    let b = Proxy::builder(&cp, "b").app(app).start().unwrap();
    let a = Proxy::builder(&cp, "a")
        .app(app)
        .upstreams(&["b"])
        .start()
        .unwrap();
    let to_b = a.upstream("b");
    let reaches_b = || {
        http_get(&to_b, "/hello")
            .filter(|(s, body)| *s == 200 && body.contains(&id("a").to_string()))
    };
    eventually(Duration::from_secs(30), reaches_b).expect("a reaches b before the clock moves");
    let before = intermediate_sha(&cp);
    let pids = (a.pid(), b.pid());

    // The control plane is down while a year passes: the intermediate (one year) expires.
    cp.kill9();
    clock.set("+366d").unwrap();
    cp.restart().unwrap();
    assert!(
        cp.log_text()
            .contains("passed its rotation point while the control plane was down"),
        "{}",
        cp.log_text()
    );
    let after = intermediate_sha(&cp);
    assert_ne!(before, after, "a new intermediate issues");
    let audit = cp.moat_ok(&["audit", "--action", "ca.rotate-intermediate"]);
    assert!(audit.contains("moat-control (automatic)"), "{audit}");
    cp.moat_ok(&["token", "list"]);

    // The sidecars' own certificates expired with it: they cannot renew with them, and their
    // join tokens have expired as well. Fresh tokens in their token files (what the kubelet
    // does for a service-account token) are all they need.
    for p in [&a, &b] {
        std::fs::write(p.token_file(), token(&cp, &p.identity, &[])).unwrap();
    }
    let a_year_on = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 365 * 86_400;
    for p in [&a, &b] {
        eventually(Duration::from_secs(90), || {
            p.log_text()
                .contains("obtained a new one with the token file")
                .then_some(())
        })
        .unwrap_or_else(|| panic!("{} re-obtains a certificate:\n{}", p.identity, p.log_text()));
        let metrics = p.metrics();
        let expiry: u64 = metrics
            .lines()
            .find(|l| l.starts_with("moat_certificate_expiry_timestamp_seconds"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no certificate expiry metric:\n{metrics}"));
        assert!(
            expiry > a_year_on,
            "{}: a certificate for the new year",
            p.identity
        );
    }
    eventually(Duration::from_secs(30), reaches_b).expect("a reaches b with the new certificates");
    assert_eq!((a.pid(), b.pid()), pids, "no sidecar restarted");
}

#[test]
fn an_expired_root_waits_in_recovery_mode_until_the_offline_command_replaces_it() {
    let clock = Clock::new().unwrap();
    let mut cp = ControlPlane::start_env(&[], clock.env()).unwrap();
    let old_root = cp.moat_ok(&["ca", "show"]);
    cp.kill9();
    // Past the root's ten years.
    clock.set("+3660d").unwrap();
    let mut serve = cp
        .serve_command(&cp.kek_file())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let admin: std::net::SocketAddr = first
        .strip_prefix("recovery mode: admin listening on ")
        .unwrap_or_else(|| panic!("recovery mode expected, got {first:?}"))
        .parse()
        .unwrap();
    assert_eq!(http_get(&admin, "/live").unwrap().0, 200);
    let (status, why) = http_get(&admin, "/ready").unwrap();
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("moat-control ca rotate-root"), "{why}");
    assert!(
        http_get(&admin, "/metrics")
            .unwrap()
            .1
            .contains("moat_control_recovery_mode 1")
    );

    // The offline command, while the control plane waits (it does not hold the store).
    let mut offline = std::process::Command::new(moat_test_util::bin("moat-control"));
    offline
        .args(["ca", "rotate-root", "--data-dir"])
        .arg(cp.data_dir())
        .arg("--kek-file")
        .arg(cp.kek_file())
        .env_remove("MOAT_KEK")
        .envs(cp.env().iter().map(|(k, v)| (k, v)));
    let out = eventually(Duration::from_secs(20), || {
        let out = offline.output().unwrap();
        out.status.success().then_some(out)
    })
    .expect("the offline rotate-root succeeds");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("replaced the root and the intermediate"),
        "{said}"
    );
    assert!(
        said.contains("BEGIN CERTIFICATE"),
        "the new bundle is printed: {said}"
    );

    // The waiting control plane notices and starts serving.
    let next = lines.next().unwrap().unwrap();
    assert!(next.starts_with("listening on "), "{next}");
    let _ = serve.kill();
    let _ = serve.wait();
    cp.restart().unwrap();
    let new_root = cp.moat_ok(&["ca", "show"]);
    assert_ne!(old_root, new_root);
    // The CLI's credential was reissued under the new root: admin calls work.
    cp.moat_ok(&["token", "list"]);

    // Offline commands explain what they need.
    let out = std::process::Command::new(moat_test_util::bin("moat-control"))
        .args(["ca", "status", "--data-dir"])
        .arg(cp.scratch())
        .arg("--kek-file")
        .arg(cp.kek_file())
        .env_remove("MOAT_KEK")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("holds no control-plane store"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_running_control_plane_rotates_the_intermediate_at_two_thirds_of_its_life() {
    let clock = Clock::new().unwrap();
    let cp = ControlPlane::start_env(&["--ca-check-interval", "1s"], clock.env()).unwrap();
    let before = intermediate_sha(&cp);
    // 200 days in: a third of the way from two thirds; nothing happens.
    clock.set("+200d").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !cp.log_text()
            .contains("rotated the intermediate automatically")
    );
    // 250 days in: past two thirds of the year; the running control plane replaces it.
    clock.set("+250d").unwrap();
    eventually(Duration::from_secs(20), || {
        cp.log_text()
            .contains("rotated the intermediate automatically")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no automatic rotation:\n{}", cp.log_text()));
    // Once, not at every check.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cp.log_text()
            .matches("rotated the intermediate automatically")
            .count(),
        1
    );
    // The admin credential followed the new intermediate, so the CLI still works, and shows it.
    assert_ne!(intermediate_sha(&cp), before);
    let audit = cp.moat_ok(&["audit", "--action", "ca.rotate-intermediate"]);
    assert!(
        audit.contains("moat-control (automatic)") && audit.contains("while running"),
        "{audit}"
    );
}
