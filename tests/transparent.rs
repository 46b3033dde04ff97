//! Transparent interception for real: three network namespaces ("pods") on a bridge, each with
//! an app, the interception rules (`moat-proxy init`) and a sidecar running as its own uid, as an
//! injected pod has them. Apps call each other's plain addresses; the mesh carries it over mTLS
//! with the allow-list enforced, and a capture on the bridge sees no application payload.
//!
//! Needs root (network namespaces, iptables) and `ip`, `iptables`, `tcpdump`, `curl` and
//! `setpriv`; CI runs it as root and it fails, saying what is missing, when it cannot run.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use moat_test_util::{ControlPlane, apply_policy, bin, eventually};

const POLICY: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      ports: [8080]
      http: [{ methods: [GET], paths: ["/orders/*"] }]
---
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: payments }
spec:
  target: payments
  rules:
    - from: [orders]
      ports: [8080]
      http: [{ methods: [POST], paths: ["/demo.Payments/Charge"] }]
"#;

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails loudly when the machine cannot run this scenario.
fn require_root_and_tools() {
    let uid = run(&["id", "-u"]);
    assert_eq!(
        uid.trim(),
        "0",
        "transparent interception needs root (network namespaces, iptables); CI runs the tests as root"
    );
    for tool in ["ip", "iptables", "tcpdump", "curl", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install iproute2 iptables tcpdump curl util-linux (.ci/run does)"
        );
    }
}

/// The bridge, namespaces and veths; removed on drop.
struct Net {
    bridge: String,
    namespaces: Vec<String>,
    /// `10.<n>.0`
    prefix: String,
}

impl Net {
    fn new(names: &[&str]) -> Net {
        let tag = std::process::id() % 10_000;
        let n = 100 + std::process::id() % 150;
        let net = Net {
            bridge: format!("mbr{tag}"),
            namespaces: names.iter().map(|s| format!("moat{tag}{s}")).collect(),
            prefix: format!("10.{n}.0"),
        };
        let br = net.bridge.as_str();
        run(&["ip", "link", "add", br, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", net.prefix),
            "dev",
            br,
        ]);
        run(&["ip", "link", "set", br, "up"]);
        for (i, ns) in net.namespaces.iter().enumerate() {
            let (host, peer) = (format!("mv{tag}{i}"), format!("mp{tag}{i}"));
            run(&["ip", "netns", "add", ns]);
            run(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ]);
            run(&["ip", "link", "set", &peer, "netns", ns]);
            run(&["ip", "link", "set", &host, "master", br]);
            run(&["ip", "link", "set", &host, "up"]);
            let ip = net.ip(i);
            for cmd in [
                vec!["ip", "addr", "add", &format!("{ip}/24"), "dev", &peer],
                vec!["ip", "link", "set", &peer, "up"],
                vec!["ip", "link", "set", "lo", "up"],
            ] {
                let mut full = vec!["ip", "netns", "exec", ns];
                full.extend(cmd);
                run(&full);
            }
        }
        net
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 2)
    }

    /// A command inside namespace `i`.
    fn exec(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.namespaces[i]]).args(args);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Child processes killed on drop.
#[derive(Default)]
struct Procs(Vec<(String, Child, PathBuf)>);

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command, logs: &Path) {
        let log = logs.join(format!("{name}.log"));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.0.push((name.to_owned(), child, log));
    }

    fn logs(&self) -> String {
        self.0
            .iter()
            .map(|(n, _, l)| {
                format!(
                    "--- {n}\n{}",
                    std::fs::read_to_string(l).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn curl(net: &Net, i: usize, url: &str) -> (String, String) {
    let out = net
        .exec(i, &["curl", "-s", "-m", "10", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (body.to_owned(), code.to_owned())
}

#[test]
fn pods_call_plain_addresses_and_the_mesh_carries_them_over_mtls() {
    require_root_and_tools();
    let net = Net::new(&["a", "b", "c"]);
    let bridge: std::net::IpAddr = format!("{}.1", net.prefix).parse().unwrap();
    let cp = ControlPlane::start_listening(bridge, &[]).unwrap();
    apply_policy(&cp, POLICY);

    // Files the sidecars (uid 1337) may read.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bundle = shared.path().join("bundle.pem");
    std::fs::copy(cp.admin_dir().join("bundle.pem"), &bundle).unwrap();
    std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut procs = Procs::default();
    let roles: [(&str, Vec<String>); 3] = [
        (
            "frontend",
            vec![
                "frontend".into(),
                "--orders".into(),
                format!("{}:8080", net.ip(1)),
                "--payments".into(),
                format!("{}:8080", net.ip(2)),
            ],
        ),
        (
            "orders",
            vec![
                "orders".into(),
                "--payments".into(),
                format!("{}:8080", net.ip(2)),
            ],
        ),
        ("payments", vec!["payments".into()]),
    ];
    for (i, (name, app_args)) in roles.iter().enumerate() {
        // The app, knowing nothing of the mesh.
        let mut app = net.exec(
            i,
            &[
                bin("moat-demo-app").to_str().unwrap(),
                "--listen",
                "0.0.0.0:8080",
            ],
        );
        app.args(app_args);
        procs.spawn(&format!("{name}-app"), app, shared.path());
        // The init container's job.
        let out = net
            .exec(i, &[bin("moat-proxy").to_str().unwrap(), "init"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "moat-proxy init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The sidecar, as uid 1337.
        let token = shared.path().join(format!("{name}.token"));
        std::fs::write(&token, token_for(&cp, name)).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let advertise = format!("{}:7143", net.ip(i));
        let proxy = net.exec(
            i,
            &[
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                bin("moat-proxy").to_str().unwrap(),
                "--control-plane",
                &cp.url(),
                "--identity",
                name,
                "--token-file",
                token.to_str().unwrap(),
                "--trust-anchors",
                bundle.to_str().unwrap(),
                "--inbound",
                "0.0.0.0:7143",
                "--advertise",
                &advertise,
                "--transparent",
                "0.0.0.0:7140",
                // Every interface, as injected: the kubelet probes it from outside the pod.
                "--admin",
                "0.0.0.0:7191",
            ],
        );
        procs.spawn(&format!("{name}-proxy"), proxy, shared.path());
    }
    for i in 0..3 {
        let ready = eventually(Duration::from_secs(30), || {
            (curl(&net, i, "http://127.0.0.1:7191/ready").1 == "200").then_some(())
        });
        assert!(ready.is_some(), "sidecar {i} not ready:\n{}", procs.logs());
    }
    // Every sidecar knows the other two services.
    eventually(Duration::from_secs(15), || {
        let (body, _) = curl(&net, 0, "http://127.0.0.1:7191/config");
        (body.contains("sa/orders") && body.contains("sa/payments")).then_some(())
    })
    .unwrap_or_else(|| panic!("no service table:\n{}", procs.logs()));
    // From outside the pod (another namespace; as uid 1337, which the interception lets
    // through, like the kubelet's probes that do not pass a sidecar): probes are answered, the
    // mesh table is not.
    let from_outside = |path: &str| {
        let url = format!("http://{}:7191{path}", net.ip(0));
        let out = net
            .exec(
                1,
                &[
                    "setpriv",
                    "--reuid=1337",
                    "--regid=1337",
                    "--clear-groups",
                    "curl",
                    "-s",
                    "-m",
                    "10",
                    "-w",
                    "\n%{http_code}",
                    &url,
                ],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(from_outside("/ready").ends_with("\n200"));
    let config = from_outside("/config");
    assert!(
        config.ends_with("\n403") && config.contains("kubectl port-forward"),
        "{config}"
    );
    assert!(!config.contains("sa/orders"), "{config}");

    // Capture everything on the bridge while the apps talk.
    let pcap = shared.path().join("bridge.pcap");
    let mut tcpdump = Command::new("tcpdump")
        .args([
            "-i",
            &net.bridge,
            "-U",
            "-s",
            "0",
            "-w",
            pcap.to_str().unwrap(),
            "tcp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    // frontend → orders (HTTP) → payments (gRPC), each to the other's plain pod address.
    let start = Instant::now();
    let (body, code) = eventually(Duration::from_secs(20), || {
        let r = curl(&net, 0, "http://127.0.0.1:8080/");
        (r.1 == "200").then_some(r)
    })
    .unwrap_or_else(|| panic!("the storefront did not answer:\n{}", procs.logs()));
    assert_eq!(code, "200");
    assert!(
        body.contains("spiffe://moat.local/ns/default/sa/frontend"),
        "orders saw frontend's verified identity: {body}"
    );
    assert!(
        body.contains("spiffe://moat.local/ns/default/sa/orders"),
        "payments saw orders' verified identity: {body}"
    );
    // frontend → payments directly: the allow-list refuses it.
    let (denied, _) = curl(&net, 0, "http://127.0.0.1:8080/pay-directly");
    assert!(
        denied.contains("identity-not-allowed"),
        "{denied}\n{}",
        procs.logs()
    );
    // frontend may GET orders but not DELETE them.
    let (cancel, _) = curl(&net, 0, "http://127.0.0.1:8080/cancel");
    assert!(cancel.contains("route-not-allowed"), "{cancel}");
    let _ = start;

    std::thread::sleep(Duration::from_millis(1000));
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    let capture = std::fs::read(&pcap).unwrap();
    assert!(
        capture.len() > 4000,
        "the capture saw almost nothing ({} bytes)",
        capture.len()
    );
    let text = String::from_utf8_lossy(&capture);
    for secret in [
        "GET /orders",
        "/demo.Payments",
        "x-moat-peer-id",
        "\"order\"",
        "DELETE",
        "spiffe://moat.local/ns/default/sa/frontend\"",
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} crossed the bridge in clear"
        );
    }

    // A caller outside the mesh reaching a pod's app port directly is refused by its sidecar.
    let direct = Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}:8080/orders/1", net.ip(1)),
        ])
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&direct.stdout),
        "200",
        "plaintext reached the app"
    );
    drop(procs);
}

fn token_for(cp: &ControlPlane, identity: &str) -> String {
    token(cp, identity, &[])
}
