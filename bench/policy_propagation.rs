//! How long a policy change takes to reach every affected proxy: 50 real `moat-proxy`
//! processes of one service behind a real `moat-control`; each round applies a new version of
//! the service's policy with the CLI and, from the moment `moat policy apply` returns, polls every
//! proxy's `/config` (keep-alive, every 2 ms) until it lists the new version. Writes the
//! distribution to `bench/results/policy_propagation.md`.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_test_util::{ControlPlane, Proxy, apps::tcp_echo};

const PROXIES: usize = 50;
const ROUNDS: usize = 10;
const POLL: Duration = Duration::from_millis(2);

fn policy(caller: &str) -> String {
    format!(
        "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: orders }}\nspec:\n  target: orders\n  rules: [{{ from: [{caller}] }}]\n"
    )
}

fn main() {
    let rt = moat_bench::runtime();
    rt.block_on(async {
        let app = tcp_echo().await;
        let cp = ControlPlane::start().unwrap();
        let proxies: Vec<Proxy> = (0..PROXIES).map(|_| Proxy::builder(&cp, "orders").app(app).start().unwrap()).collect();
        eprintln!("{PROXIES} proxies ready");
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut per_proxy = Vec::new();
        let mut last_proxy = Vec::new();
        for round in 0..ROUNDS {
            let file = cp.scratch().join("orders.yaml");
            std::fs::write(&file, policy(if round % 2 == 0 { "frontend" } else { "payments" })).unwrap();
            let out = cp.moat_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
            let applied = Instant::now();
            let version: u64 = out
                .split("(version ")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap();
            let needle = format!("default/orders@{version}");
            let waits: Vec<_> = proxies
                .iter()
                .map(|p| {
                    let url: http::Uri = format!("http://{}/config", p.admin).parse().unwrap();
                    let (client, needle) = (client.clone(), needle.clone());
                    tokio::spawn(async move {
                        loop {
                            if let Ok(r) = client.get(url.clone()).await
                                && let Ok(b) = r.into_body().collect().await
                                && String::from_utf8_lossy(&b.to_bytes()).contains(&needle)
                            {
                                return applied.elapsed();
                            }
                            assert!(applied.elapsed() < Duration::from_secs(30), "{needle} never arrived");
                            tokio::time::sleep(POLL).await;
                        }
                    })
                })
                .collect();
            let mut round_max = Duration::ZERO;
            for w in waits {
                let d = w.await.unwrap();
                per_proxy.push(d.as_secs_f64() * 1000.0);
                round_max = round_max.max(d);
            }
            eprintln!("round {round}: version {version} on all {PROXIES} proxies after {round_max:?}");
            last_proxy.push(round_max.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        per_proxy.sort_by(|a, b| a.total_cmp(b));
        last_proxy.sort_by(|a, b| a.total_cmp(b));
        let table = format!(
            "# policy_propagation — latest run\n\n\
             - Command: `cargo bench -p moat-bench --bench policy_propagation`\n\
             - Setup: one `moat-control` and {PROXIES} `moat-proxy` processes of the same service (release \
             binaries) on the project's 2-core VM; {ROUNDS} rounds, each a new version of that service's policy \
             applied with `moat policy apply`.\n\
             - Measured from `moat policy apply` returning (the change is stored) until a proxy's `/config` lists \
             the new version (polled every {} ms over keep-alive HTTP, so figures include up to that much \
             polling delay).\n\n\
             | measure | p50 | p99 | max |\n|---|---|---|---|\n\
             | each proxy ({} samples) | {:.1} ms | {:.1} ms | {:.1} ms |\n\
             | last of the {PROXIES} proxies, per round ({} samples) | {:.1} ms | {:.1} ms | {:.1} ms |\n\n\
             Target (issue: allow-lists): p99 under 1 s across 50 proxies.\n",
            POLL.as_millis(),
            per_proxy.len(),
            moat_bench::pct(&per_proxy, 0.5),
            moat_bench::pct(&per_proxy, 0.99),
            per_proxy[per_proxy.len() - 1],
            last_proxy.len(),
            moat_bench::pct(&last_proxy, 0.5),
            moat_bench::pct(&last_proxy, 0.99),
            last_proxy[last_proxy.len() - 1],
        );
        print!("{table}");
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/policy_propagation.md");
        std::fs::write(&out, table).unwrap();
        drop(proxies);
    });
}
