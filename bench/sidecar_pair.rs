//! Requests per second, latency and memory through a moat sidecar pair, against a direct
//! connection measured in the same run.
//!
//! Topology: load generator → frontend sidecar (plain in, mTLS out) → orders sidecar (mTLS in,
//! plain out) → HTTP echo app. The load generator and the app run in this process; the control
//! plane and both sidecars are the real release binaries. Variants run interleaved, three rounds
//! each, and the medians are written to `bench/results/sidecar_pair.md`.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_test_util::{ControlPlane, Proxy, apply_policy, apps::http_echo};

const CONNECTIONS: usize = 32;
const DURATION: Duration = Duration::from_secs(8);
const ROUNDS: usize = 3;

struct Run {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    errors: usize,
}

async fn drive(target: SocketAddr) -> Run {
    let url: http::Uri = format!("http://{target}/orders/1").parse().unwrap();
    let end = Instant::now() + DURATION;
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            // One client per worker: one keep-alive connection each.
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build_http();
            let mut lat = Vec::new();
            let mut errors = 0;
            while Instant::now() < end {
                let t = Instant::now();
                match client.get(url.clone()).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Run {
        rps: all.len() as f64 / DURATION.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let rt = moat_bench::runtime();
    rt.block_on(async {
        let app = http_echo().await;
        let cp = ControlPlane::start().unwrap();
        apply_policy(
            &cp,
            "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: orders }\nspec:\n  target: orders\n  rules:\n    - from: [frontend]\n      http: [{ methods: [GET], paths: [\"/orders/*\"] }]\n",
        );
        let orders = Proxy::builder(&cp, "orders").app(app).start().unwrap();
        let frontend = Proxy::builder(&cp, "frontend").app(app).upstreams(&["orders"]).start().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let pids = [orders.pid().unwrap(), frontend.pid().unwrap()];
        let idle: Vec<u64> = pids.iter().map(|p| rss_kib(*p, "VmRSS")).collect();

        let mut direct = Vec::new();
        let mut moat = Vec::new();
        for round in 0..ROUNDS {
            let d = drive(app).await;
            let m = drive(frontend.upstream("orders")).await;
            eprintln!(
                "round {round}: direct {:.0} req/s p50 {} us p99 {} us | moat {:.0} req/s p50 {} us p99 {} us errors {}",
                d.rps, d.p50_us, d.p99_us, m.rps, m.p50_us, m.p99_us, m.errors
            );
            assert_eq!(m.errors + d.errors, 0, "requests failed");
            direct.push(d);
            moat.push(m);
        }
        let peak: Vec<u64> = pids.iter().map(|p| rss_kib(*p, "VmHWM")).collect();
        let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let (d_rps, m_rps) = (med(&direct, |r| r.rps), med(&moat, |r| r.rps));
        let (d_p50, m_p50) = (med(&direct, |r| r.p50_us as f64), med(&moat, |r| r.p50_us as f64));
        let (d_p99, m_p99) = (med(&direct, |r| r.p99_us as f64), med(&moat, |r| r.p99_us as f64));
        let table = format!(
            "# sidecar_pair — latest run\n\n\
             - Command: `cargo bench -p moat-bench --bench sidecar_pair`\n\
             - Machine: the project's 2-core Linux VM; load generator and echo app in the bench process \
             (2 worker threads), each sidecar on its default single worker thread, no CPU pinning.\n\
             - Load: HTTP/1.1 keep-alive, {CONNECTIONS} connections, closed loop, {} s per round, {ROUNDS} rounds \
             interleaved (direct, moat), medians.\n\n\
             | variant | req/s | p50 | p99 |\n|---|---|---|---|\n\
             | direct (app, no proxy) | {d_rps:.0} | {d_p50:.0} µs | {d_p99:.0} µs |\n\
             | moat pair (mTLS, HTTP/2 between sidecars) | {m_rps:.0} | {m_p50:.0} µs | {m_p99:.0} µs |\n\
             | ratio moat/direct | {:.2} | {:.2} | {:.2} |\n\n\
             | sidecar | idle RSS | peak RSS |\n|---|---|---|\n\
             | orders (inbound) | {} KiB | {} KiB |\n| frontend (outbound) | {} KiB | {} KiB |\n",
            DURATION.as_secs(),
            m_rps / d_rps,
            m_p50 / d_p50,
            m_p99 / d_p99,
            idle[0],
            peak[0],
            idle[1],
            peak[1],
        );
        print!("{table}");
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/sidecar_pair.md");
        std::fs::write(&out, table).unwrap();
        eprintln!("wrote {}", out.display());
    });
}
