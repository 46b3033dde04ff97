//! `moat demo` as a newcomer runs it: the narration's checks pass on a working mesh, fail when
//! enforcement is broken, and Ctrl-C leaves no process and no listening port behind.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::stderr;
use moat_test_util::bin;

/// The demo as built by the harness (it must not try to build again from inside the test).
fn demo() -> Command {
    let mut c = Command::new(bin("moat"));
    c.arg("demo")
        .env_remove("CARGO")
        .env_remove("CARGO_MANIFEST_DIR");
    c
}

#[test]
fn the_demo_passes_every_check_and_exits_0() {
    let out = demo().arg("--no-wait").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    assert!(stdout.contains("All checks held."), "{stdout}");
    assert!(!stdout.contains('✗'), "{stdout}");
    for step in [
        "Zero trust",
        "call chain",
        "intruder",
        "directly",
        "live policy change",
        "observed traffic",
        "moat tap --to payments --decision deny",
        "frontend -> payments",
        "grpc-status 7 deny identity-not-allowed",
        "rotation",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
}

#[test]
fn breaking_enforcement_makes_the_demo_fail() {
    let out = demo()
        .args(["--no-wait", "--break-enforcement"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", stderr(&out));
    assert!(
        stdout.contains("✗ refused by payments' sidecar"),
        "{stdout}"
    );
    assert!(stdout.contains("Some checks FAILED"), "{stdout}");
}

#[test]
fn ctrl_c_leaves_no_process_and_no_port_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = demo()
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("demo.stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let start = Instant::now();
    let mut seen = String::new();
    loop {
        let Some(line) = lines.next() else {
            let err = std::fs::read_to_string(dir.path().join("demo.stderr")).unwrap_or_default();
            panic!("the demo ended before it was up:\n{seen}\nstderr:\n{err}");
        };
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Press Ctrl-C") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{seen}");
    }
    assert!(seen.contains("Try it yourself"), "{seen}");
    let pids: Vec<u32> = std::fs::read_to_string(dir.path().join("pids"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let ports: Vec<std::net::SocketAddr> = std::fs::read_to_string(dir.path().join("ports"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 7, "control plane + 3 apps + 3 sidecars");
    assert!(
        pids.iter()
            .all(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    );

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    for _ in lines.by_ref() {}
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for p in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "process {p} is still running"
        );
    }
    for port in &ports {
        assert!(
            std::net::TcpStream::connect_timeout(port, Duration::from_millis(200)).is_err(),
            "{port} is still listening"
        );
    }
}
