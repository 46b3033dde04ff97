//! Bad input on the newer entry points: `moat-proxy` flags, the `Mesh.Stream` RPC, policy
//! documents through the CLI and through the Admin API directly. Each is refused with a message
//! that says what was wrong, and nothing is half-applied.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use moat_api::v1::admin_client::AdminClient;
use moat_api::v1::mesh_client::MeshClient;
use moat_api::v1::{Announce, ApplyPoliciesRequest, PolicySource, ProxyMessage, proxy_message};
use moat_test_util::{ControlPlane, bin};
use tonic::Code;

/// The flags a proxy needs, for `identity` in front of `app`, then `extra`.
fn proxy_args<'a>(identity: &'a str, app: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let base = [
        "--identity",
        identity,
        "--token-file",
        "t",
        "--trust-anchors",
        "b",
        "--app",
        app,
    ];
    base.iter().chain(extra).copied().collect()
}

#[test]
fn proxy_flags_are_checked_before_anything_starts() {
    let cases = [
        (
            proxy_args("orders", "127.0.0.1:1", &["--upstream", "payments"]),
            "write SERVICE=ADDR",
        ),
        (proxy_args("orders", "127.0.0.1:1", &[]), "wildcard address"),
        (
            proxy_args("Bad!", "127.0.0.1:1", &["--inbound", "127.0.0.1:0"]),
            "--identity",
        ),
        (proxy_args("orders", "nowhere", &[]), "invalid value"),
        (
            proxy_args(
                "orders",
                "127.0.0.1:1",
                &["--inbound", "127.0.0.1:0", "--cpu-scheduling", "fifo"],
            ),
            "[possible values: batch, normal]",
        ),
        (vec!["--identity", "orders"], "required"),
    ];
    for (args, want) in cases {
        let out = Command::new(bin("moat-proxy"))
            .args(&args)
            .env_remove("MOAT_UPSTREAMS")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}

/// Each thread's scheduling policy and nice value, as the kernel records them
/// (`/proc/PID/task/TID/stat`, fields 41 and 19).
fn policies_and_nice(pid: u32) -> Vec<(u32, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        // A thread that ended since the listing is skipped.
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .map(|stat| {
            // The fields after the command name, which may hold spaces: field 3 first.
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            (
                fields[41 - 3].parse().unwrap(),
                fields[19 - 3].parse().unwrap(),
            )
        })
        .collect()
}

/// A sidecar's threads run under SCHED_BATCH (policy 3) unless `--cpu-scheduling normal` says
/// otherwise (decision 50), and keep the nice value the sidecar was started with.
#[test]
fn sidecar_threads_run_under_the_scheduling_policy_asked_for() {
    let cp = ControlPlane::start().unwrap();
    let batch = moat_test_util::Proxy::builder(&cp, "a").start().unwrap();
    let normal = moat_test_util::Proxy::builder(&cp, "b")
        .args(&["--cpu-scheduling", "normal"])
        .start()
        .unwrap();
    // A child inherits the nice value of the thread that starts it: this one, a notch above
    // the test's own, is started from a thread of its own.
    let base = rustix::process::getpriority_process(None).unwrap();
    let above = (base + 5).min(19);
    let niced = std::thread::scope(|s| {
        s.spawn(|| {
            rustix::process::setpriority_process(None, above).unwrap();
            moat_test_util::Proxy::builder(&cp, "c").start().unwrap()
        })
        .join()
        .unwrap()
    });
    for (proxy, want) in [
        (&batch, (3, base)),
        (&normal, (0, base)),
        (&niced, (3, above)),
    ] {
        let threads = policies_and_nice(proxy.pid().unwrap());
        assert!(!threads.is_empty());
        assert!(
            threads.iter().all(|t| *t == want),
            "{}: {threads:?}, want {want:?} for every thread",
            proxy.identity
        );
    }
    for proxy in [&batch, &normal, &niced] {
        assert!(
            !proxy.log_text().contains("cpu-scheduling"),
            "{}",
            proxy.log_text()
        );
    }
}

#[test]
fn a_bad_log_filter_is_refused_not_ignored() {
    // A typo must not silently turn logging off (a bare word would be read as a target name).
    let proxy = proxy_args("orders", "127.0.0.1:1", &["--inbound", "127.0.0.1:0"]);
    let dir = tempfile::tempdir().unwrap();
    let control = [
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    for (name, args) in [("moat-proxy", &proxy[..]), ("moat-control", &control[..])] {
        for (filter, want) in [
            ("inf", "`inf` is not a level"),
            ("info,moat=loud", "error parsing level filter"),
        ] {
            let out = Command::new(bin(name))
                .args(args)
                .env("MOAT_LOG", filter)
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(2),
                "{name} {filter}: {}",
                stderr(&out)
            );
            let err = stderr(&out);
            assert!(
                err.contains("MOAT_LOG") && err.contains(want) && err.contains("e.g. `info"),
                "{name} {filter}: {err}"
            );
        }
    }
}

#[test]
fn a_refused_join_token_stops_the_proxy_with_the_reason() {
    let cp = ControlPlane::start().unwrap();
    let token = cp.scratch().join("bad.token");
    std::fs::write(&token, "moat_notarealtokenatallnotarealtokenatall1234").unwrap();
    let out = Command::new(bin("moat-proxy"))
        .args([
            "--control-plane",
            &cp.url(),
            "--identity",
            "orders",
            "--app",
            "127.0.0.1:1",
        ])
        .args([
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--token-file",
        ])
        .arg(&token)
        .arg("--trust-anchors")
        .arg(cp.admin_dir().join("bundle.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("join token is not recognised"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn the_mesh_stream_refuses_strangers_and_bad_announcements() {
    let cp = ControlPlane::start().unwrap();
    let b = bundle(&cp);
    // No client certificate: no stream.
    let anon = moat_tls::connect::channel(&cp.url(), b.clone(), control_id(), None)
        .await
        .unwrap();
    let msg = |m| ProxyMessage { message: Some(m) };
    let announce = |addr: &str| {
        msg(proxy_message::Message::Announce(Announce {
            inbound_address: addr.to_owned(),
            ..Announce::default()
        }))
    };
    let err = MeshClient::new(anon)
        .stream(tokio_stream::iter(vec![announce("127.0.0.1:7143")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let dir = cp.scratch().join("orders");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "orders",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let cred = credential(&dir, &b);
    for (bad, code, want) in [
        ("0.0.0.0:7143", Code::InvalidArgument, "wildcard"),
        ("127.0.0.1", Code::InvalidArgument, "no port"),
        ("127.0.0.1:0", Code::InvalidArgument, "no valid port"),
        (":80", Code::InvalidArgument, "no host"),
        // Another host's address (another pod's, say), or a name: the stream comes from
        // 127.0.0.1, so only that address is this sidecar's to announce.
        (
            "127.0.0.2:7143",
            Code::PermissionDenied,
            "its connection comes from 127.0.0.1, not 127.0.0.2",
        ),
        (
            "10.1.2.3:7143",
            Code::PermissionDenied,
            "--advertise 127.0.0.1:PORT",
        ),
        (
            "orders.internal:7143",
            Code::PermissionDenied,
            "names a host",
        ),
    ] {
        let ch = moat_tls::connect::channel(&cp.url(), b.clone(), control_id(), Some(&cred))
            .await
            .unwrap();
        let err = MeshClient::new(ch)
            .stream(tokio_stream::iter(vec![announce(bad)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{bad}: {err:?}");
        assert!(err.message().contains(want), "{bad}: {err:?}");
    }
    // Nothing refused was listed.
    let status = cp.moat_ok(&["status", "-o", "json"]);
    for bad in ["127.0.0.2:7143", "10.1.2.3:7143", "orders.internal:7143"] {
        assert!(!status.contains(bad), "{bad} listed: {status}");
    }
    // The first message must be an announce.
    let ch = moat_tls::connect::channel(&cp.url(), b.clone(), control_id(), Some(&cred))
        .await
        .unwrap();
    let ack = msg(proxy_message::Message::Ack(moat_api::v1::Ack::default()));
    let err = MeshClient::new(ch)
        .stream(tokio_stream::iter(vec![ack]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A good announce gets a first snapshot with the bundle.
    let ch = moat_tls::connect::channel(&cp.url(), b.clone(), control_id(), Some(&cred))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(announce("127.0.0.1:7143")).await.unwrap();
    let mut snaps = MeshClient::new(ch)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = snaps.message().await.unwrap().unwrap();
    assert!(first.version > 0 && !first.trust_bundle_der.is_empty());
    assert!(
        first
            .services
            .iter()
            .any(|s| s.spiffe_id.ends_with("/sa/orders"))
    );
}

/// A sidecar keeps one mesh stream. One certificate holder opening many from its address, each
/// announcing another port, would list that many endpoints in every table: past 16 streams of
/// one identity from one address the next is refused, saying why, while another address (another
/// pod of the same service) is still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_gets_sixteen_mesh_streams_from_one_address() {
    let cp = ControlPlane::start().unwrap();
    let mut admin = moat_test_util::mesh::Admin::connect(&cp).await.unwrap();
    let cred = admin.credential("orders").await.unwrap();
    let mut held = Vec::new();
    for n in 0..16 {
        let address = format!("127.0.0.1:{}", 20_000 + n);
        held.push(
            admin
                .mesh_stream(&cred, &address)
                .await
                .unwrap()
                .keep_acking(),
        );
    }
    let err = match admin.mesh_stream(&cred, "127.0.0.1:20016").await {
        Ok(_) => panic!("a 17th stream from one address was taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("already has 16 mesh streams open from 127.0.0.1"),
        "{err}"
    );
    let other: std::net::IpAddr = [127, 0, 0, 2].into();
    let _other = admin
        .mesh_stream_from(&cred, "127.0.0.2:20000", Vec::new(), Some(other))
        .await
        .unwrap()
        .keep_acking();
    // One that ends frees its place.
    held.pop().unwrap().abort();
    let back = tokio::task::block_in_place(|| {
        moat_test_util::eventually(std::time::Duration::from_secs(10), || {
            tokio::runtime::Handle::current()
                .block_on(admin.mesh_stream(&cred, "127.0.0.1:20017"))
                .ok()
        })
    });
    assert!(back.is_some(), "the place never came back");
}

/// `--advertise` takes an IP address alone, as the injector passes the pod's IP, and adds the
/// inbound port; an IPv6 one is bracketed, so the control plane parses it (and refuses it here
/// only because the stream comes from 127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advertised_ip_alone_gets_the_inbound_port() {
    let cp = ControlPlane::start().unwrap();
    let b = moat_test_util::Proxy::builder(&cp, "b")
        .args(&["--advertise", "127.0.0.1"])
        .start()
        .unwrap();
    let (_, body) = b.admin_get("/config").unwrap();
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["advertise"], b.inbound.to_string(), "{config}");
    let app: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let v6 = moat_test_util::Proxy::launch(
        &cp,
        "c",
        &token(&cp, "c", &[]),
        app,
        &[],
        &["--advertise", "::1"],
    )
    .unwrap();
    let refused = tokio::task::block_in_place(|| {
        moat_test_util::eventually(std::time::Duration::from_secs(20), || {
            let log = v6.log_text();
            log.contains("is not this sidecar's address").then_some(log)
        })
    })
    .unwrap_or_else(|| panic!("{}", v6.log_text()));
    assert!(refused.contains("\"[::1]:"), "{refused}");
    assert!(!refused.contains("without brackets"), "{refused}");
}

/// Where sidecars reach the control plane through NAT, the address a stream comes from is not
/// the sidecar's: `--announce-any-address` takes the address a sidecar announces as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_any_address_takes_the_address_a_sidecar_announces() {
    let cp = ControlPlane::start_with(&["--announce-any-address"]).unwrap();
    let mut admin = moat_test_util::mesh::Admin::connect(&cp).await.unwrap();
    let cred = admin.credential("orders").await.unwrap();
    let _stream = admin
        .mesh_stream(&cred, "orders.internal:7143")
        .await
        .unwrap()
        .keep_acking();
    let listed = tokio::task::block_in_place(|| {
        moat_test_util::eventually(std::time::Duration::from_secs(10), || {
            let status = cp.moat_ok(&["status", "-o", "json"]);
            status.contains("orders.internal:7143").then_some(())
        })
    });
    assert!(
        listed.is_some(),
        "{}",
        cp.moat_ok(&["status", "-o", "json"])
    );
}

#[tokio::test]
async fn invalid_policy_sets_are_refused_whole() {
    let cp = ControlPlane::start().unwrap();
    let good = "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: a }\nspec:\n  target: a\n  rules: [{ from: [b] }]\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown field",
            good.replace("rules:", "rulez:"),
            "unknown field `rulez`",
        ),
        (
            "bad identity",
            good.replace("from: [b]", "from: [B!]"),
            "spec.rules[0].from[0]",
        ),
        (
            "bad path",
            good.replace("{ from: [b] }", "{ from: [b], http: [{ paths: [nope] }] }"),
            "must start with '/'",
        ),
        (
            "a method never forwarded",
            good.replace(
                "{ from: [b] }",
                "{ from: [b], http: [{ methods: [GET, CONNECT] }] }",
            ),
            "spec.rules[0].http[0].methods[1]: CONNECT is never forwarded",
        ),
        (
            "wrong kind",
            good.replace("AccessPolicy", "Policy"),
            "unknown kind",
        ),
        ("empty", String::new(), "empty"),
        ("10 MB", "#".repeat(10 * 1024 * 1024), "the limit is"),
    ];
    // Offline validation names the file and the problem; apply refuses the whole set.
    for (name, text, want) in &cases {
        let bad = cp.scratch().join("bad.yaml");
        std::fs::write(&bad, text).unwrap();
        let out = cp.moat(&["policy", "validate", "-f", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want) && stderr(&out).contains("bad.yaml"),
            "{name}: {}",
            stderr(&out)
        );
        let dir = cp.scratch().join(format!("set-{}", name.replace(' ', "-")));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("1-good.yaml"), good).unwrap();
        std::fs::write(dir.join("2-bad.yaml"), text).unwrap();
        let out = cp.moat(&["policy", "apply", "-f", dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
    }
    assert!(
        !cp.moat_ok(&["policy", "get"]).contains("default/a"),
        "nothing of a refused set is stored"
    );

    // The control plane checks again on its own (a client that skips local validation).
    let admin_dir = cp.admin_dir();
    let b = bundle(&cp);
    let ch = moat_tls::connect::channel(
        &cp.url(),
        b.clone(),
        control_id(),
        Some(&credential(&admin_dir, &b)),
    )
    .await
    .unwrap();
    let mut admin = AdminClient::new(ch);
    let case = |name: &str| {
        let (_, text, _) = cases.iter().find(|(n, _, _)| *n == name).unwrap();
        text.clone()
    };
    let source = |name: &str, text: String| PolicySource {
        name: name.into(),
        text,
    };
    for (sources, want) in [
        (
            vec![
                source("good.yaml", good.into()),
                source("evil.yaml", case("unknown field")),
            ],
            ["evil.yaml", "rulez"],
        ),
        (
            vec![source("tunnel.yaml", case("a method never forwarded"))],
            ["tunnel.yaml", "CONNECT is never forwarded"],
        ),
    ] {
        let err = admin
            .apply_policies(ApplyPoliciesRequest { sources })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(want.iter().all(|w| err.message().contains(w)), "{err:?}");
    }
    let err = admin
        .apply_policies(ApplyPoliciesRequest { sources: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!cp.moat_ok(&["policy", "get"]).contains("default/a"));

    // And the good one alone applies, shows, and deletes; deleting twice is an error.
    let f = cp.scratch().join("good.yaml");
    std::fs::write(&f, good).unwrap();
    assert!(
        cp.moat_ok(&["policy", "apply", "-f", f.to_str().unwrap()])
            .contains("applied default/a")
    );
    assert!(
        cp.moat_ok(&["policy", "get", "a", "-o", "yaml"])
            .contains("spiffe://moat.local/ns/default/sa/b")
    );
    cp.moat_ok(&["policy", "delete", "a"]);
    let out = cp.moat(&["policy", "delete", "a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no policy default/a"),
        "{}",
        stderr(&out)
    );
}

fn run_bin(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin(name))
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

#[test]
fn interception_and_kubernetes_flags_are_checked() {
    // `moat-proxy init`: a plan it can show, and bad flags refused with the reason.
    let plan = run_bin(
        "moat-proxy",
        &["init", "--dry-run", "--skip-outbound-ports", "53"],
    );
    assert!(plan.status.success(), "{}", stderr(&plan));
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("--uid-owner 1337 -j RETURN") && text.contains("--dport 53 -j RETURN"),
        "{text}"
    );
    let same = run_bin(
        "moat-proxy",
        &[
            "init",
            "--dry-run",
            "--inbound-port",
            "7140",
            "--outbound-port",
            "7140",
        ],
    );
    assert_eq!(same.status.code(), Some(1));
    assert!(stderr(&same).contains("must differ"), "{}", stderr(&same));
    let uid = run_bin("moat-proxy", &["init", "--proxy-uid", "nobody"]);
    assert_eq!(uid.status.code(), Some(2));
    assert!(stderr(&uid).contains("--proxy-uid"), "{}", stderr(&uid));
    // A sidecar needs --app or --transparent; both kinds of token at once are refused.
    let base = [
        "--identity",
        "orders",
        "--trust-anchors",
        "b",
        "--advertise",
        "127.0.0.1:1",
    ];
    let mut no_app = base.to_vec();
    no_app.extend(["--token-file", "t"]);
    let out = run_bin("moat-proxy", &no_app);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--app"), "{}", stderr(&out));
    let mut both = base.to_vec();
    both.extend([
        "--token-file",
        "t",
        "--k8s-token-file",
        "k",
        "--app",
        "127.0.0.1:1",
    ]);
    let out = run_bin("moat-proxy", &both);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );

    // The control plane: publishing the bundle outside a pod without --kube-api says so.
    let dir = tempfile::tempdir().unwrap();
    let out = run_bin(
        "moat-control",
        &[
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--publish-bundle",
            "moat-ca-root",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("KUBERNETES_SERVICE_HOST"),
        "{}",
        stderr(&out)
    );

    // The CLI: missing files for install and inject.
    let out = run_bin(
        "moat",
        &["install", "--ca-bundle", "/nonexistent/bundle.pem"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read /nonexistent/bundle.pem"),
        "{}",
        stderr(&out)
    );
    let out = run_bin("moat", &["inject", "-f", "/nonexistent/app.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read /nonexistent/app.yaml"),
        "{}",
        stderr(&out)
    );
    let not_k8s = dir.path().join("list.yaml");
    std::fs::write(&not_k8s, "- just\n- a list\n").unwrap();
    let out = run_bin("moat", &["inject", "-f", not_k8s.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a Kubernetes object"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_control_plane_admin_port_answers_garbage_and_keeps_serving() {
    use std::io::{Read as _, Write as _};
    let cp = ControlPlane::start().unwrap();
    let (status, _) = cp.admin_get("/nope").unwrap();
    assert_eq!(status, 404);
    assert_eq!(cp.admin_get("/live").unwrap().0, 200);
    let addr = cp.admin_addr();
    for garbage in [
        &b"\x16\x03\x01\x00\xff not http\r\n\r\n"[..],
        &[b'A'; 70_000][..],
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = s.write_all(garbage);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }
    assert_eq!(cp.admin_get("/ready").unwrap().0, 200);
    assert!(
        cp.admin_get("/metrics")
            .unwrap()
            .1
            .contains("moat_root_rotation_phase")
    );
}

/// The audit-log bounds and the audit listing's filters refuse what makes no sense, saying why.
#[test]
fn audit_bounds_and_filters_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (flag, value, want) in [
        ("--audit-retention", "10m", "at least 1h"),
        ("--audit-retention", "soon", "30d"),
        ("--audit-max-entries", "5", "100"),
    ] {
        let out = run_bin(
            "moat-control",
            &["serve", "--data-dir", data, "--dev", flag, value],
        );
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(
            stderr(&out).contains(want),
            "{flag} {value}: {}",
            stderr(&out)
        );
    }
    let out = run_bin("moat", &["audit", "--outcome", "maybe"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
}
