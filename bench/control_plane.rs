//! One real `moat-control` holding 10,000 proxy streams: its memory, and how long a change
//! takes to reach every proxy it concerns.
//!
//! This process simulates the proxies: 1,000 services × 10 replicas, each replica its own mTLS
//! connection (certificates issued by the control plane for each service) and its own
//! `Mesh.Stream`, announcing its own address, folding incremental service tables and
//! acknowledging every snapshot as `moat-proxy` does. Measured:
//! - ramp: from the first connection until every proxy's table lists all 10,000 endpoints;
//! - the control plane's RSS once all are connected and idle, and its peak;
//! - per round, from the admin call returning (the change is stored) until each concerned proxy
//!   has received the snapshot that carries it: a MeshConfig change (all 10,000), one service's
//!   AccessPolicy (its 10 replicas), and a new endpoint joining (all 10,000).
//!
//! Writes `bench/results/control_plane.md`.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_api::v1::{
    Ack, ApplyPoliciesRequest, PolicySource, ProxyMessage, Snapshot, proxy_message,
};
use moat_test_util::ControlPlane;
use moat_test_util::mesh::{Admin, MeshStream};

const REPLICAS: usize = 10;
const ROUNDS: usize = 5;
/// Connections being set up at once.
const CONNECTING: usize = 64;
const GIVE_UP: Duration = Duration::from_secs(120);

/// What a round waits for each concerned proxy to have.
#[derive(Clone, Debug)]
enum Goal {
    /// Every service's every endpoint: `n` in all.
    Table(usize),
    Posture(String),
    /// A policy of that name (new in the round).
    Policy(String),
    Endpoint(String),
}

struct Probe {
    goal: Goal,
    /// Which proxies the goal concerns (by index); `None`: all.
    only: Option<std::ops::Range<usize>>,
    start: Instant,
    hits: Vec<Option<Duration>>,
    done: usize,
}

type Probes = Arc<Mutex<Option<Probe>>>;

/// Whether `goal` holds for a proxy holding `table` (with `endpoints` in all) after `snap`.
fn reached(
    goal: &Goal,
    snap: &Snapshot,
    table: &BTreeMap<String, Vec<String>>,
    endpoints: usize,
) -> bool {
    match goal {
        Goal::Table(n) => endpoints == *n,
        Goal::Posture(p) => snap.mesh.as_ref().is_some_and(|m| &m.default_posture == p),
        Goal::Policy(name) => snap.policies.iter().any(|p| &p.name == name),
        Goal::Endpoint(a) => table.values().any(|eps| eps.contains(a)),
    }
}

/// One simulated proxy: fold snapshots, acknowledge, note when the probe's goal holds.
async fn proxy(idx: usize, stream: MeshStream, probes: Probes) {
    let MeshStream { tx, mut inbound } = stream;
    let mut table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut endpoints = 0;
    while let Ok(Some(mut snap)) = inbound.message().await {
        if !snap.services_incremental {
            table.clear();
            endpoints = 0;
        }
        for r in &snap.services_removed {
            endpoints -= table.remove(r).map_or(0, |e| e.len());
        }
        for s in std::mem::take(&mut snap.services) {
            endpoints += s.endpoints.len();
            endpoints -= table
                .insert(s.spiffe_id, s.endpoints)
                .map_or(0, |e| e.len());
        }
        if snap.continued {
            continue; // more parts follow; moat-proxy applies and acknowledges at the last
        }
        {
            let mut guard = probes.lock().unwrap();
            if let Some(p) = guard.as_mut()
                && p.hits[idx].is_none()
                && p.only.as_ref().is_none_or(|r| r.contains(&idx))
                && reached(&p.goal, &snap, &table, endpoints)
            {
                p.hits[idx] = Some(p.start.elapsed());
                p.done += 1;
            }
        }
        let ack = Ack {
            version: snap.version,
            applied: true,
            ..Ack::default()
        };
        if tx
            .send(ProxyMessage {
                message: Some(proxy_message::Message::Ack(ack)),
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Sets the probe, runs `change` (returns when the change is stored), and waits until every
/// concerned proxy reached the goal. Returns the per-proxy delays measured from `change`
/// returning, and how long `change` itself took.
async fn round<F: std::future::Future<Output = ()>>(
    probes: &Probes,
    goal: Goal,
    only: Option<std::ops::Range<usize>>,
    change: F,
) -> (Vec<f64>, f64) {
    let expect = only.as_ref().map_or(proxies(), |r| r.len());
    *probes.lock().unwrap() = Some(Probe {
        goal: goal.clone(),
        only,
        start: Instant::now(),
        hits: vec![None; proxies()],
        done: 0,
    });
    let asked = Instant::now();
    change.await;
    let stored = Instant::now();
    let change_ms = (stored - asked).as_secs_f64() * 1000.0;
    loop {
        let done = probes.lock().unwrap().as_ref().unwrap().done;
        if done >= expect {
            break;
        }
        assert!(
            stored.elapsed() < GIVE_UP,
            "{goal:?}: only {done} of {expect} proxies after {GIVE_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let probe = probes.lock().unwrap().take().unwrap();
    let since = stored - probe.start;
    let mut out: Vec<f64> = probe
        .hits
        .into_iter()
        .flatten()
        .map(|d| d.saturating_sub(since).as_secs_f64() * 1000.0)
        .collect();
    out.sort_by(f64::total_cmp);
    (out, change_ms)
}

/// (RSS, peak RSS) in MB, and CPU seconds, of process `pid`.
fn usage(pid: u32) -> (f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |field: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0, ticks / 100.0)
}

fn address(idx: usize) -> String {
    format!(
        "10.{}.{}.{}:8443",
        1 + idx / 62_500,
        (idx / 250) % 250,
        1 + idx % 250
    )
}

async fn apply(admin: &mut Admin, text: String) {
    admin
        .client
        .apply_policies(ApplyPoliciesRequest {
            sources: vec![PolicySource {
                name: "bench.yaml".into(),
                text,
            }],
        })
        .await
        .expect("apply");
}

fn row(what: &str, samples: &[f64]) -> String {
    format!(
        "| {what} | {} | {:.0} ms | {:.0} ms | {:.0} ms |\n",
        samples.len(),
        moat_bench::pct(samples, 0.5),
        moat_bench::pct(samples, 0.99),
        samples[samples.len() - 1]
    )
}

/// Services simulated: 1,000 (10,000 proxies) unless `MOAT_BENCH_SERVICES` says otherwise
/// (for quick looks; the committed results use the default).
fn services() -> usize {
    static SERVICES: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        std::env::var("MOAT_BENCH_SERVICES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000)
    });
    *SERVICES
}

fn proxies() -> usize {
    services() * REPLICAS
}

fn main() {
    let (services, proxies) = (services(), proxies());
    let rt = moat_bench::runtime();
    rt.block_on(async {
        let cp = ControlPlane::start().unwrap();
        let pid = cp.pid().unwrap();
        let mut admin = Admin::connect(&cp).await.unwrap();
        let mut creds = Vec::with_capacity(services);
        for svc in 0..services {
            creds.push(admin.credential(&format!("bench/svc-{svc:04}")).await.unwrap());
        }
        let (idle_rss_empty, _, cpu_start) = usage(pid);

        // Ramp: every proxy connects (CONNECTING at a time) and must list every endpoint.
        let probes: Probes = Arc::new(Mutex::new(None));
        let (ramp, connect_ms) = round(&probes, Goal::Table(proxies), None, async {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let creds = Arc::new(creds);
            let mut workers = Vec::new();
            for _ in 0..CONNECTING {
                let (next, creds, probes) = (next.clone(), creds.clone(), probes.clone());
                let admin = admin.clone();
                workers.push(tokio::spawn(async move {
                    loop {
                        let idx = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if idx >= proxies {
                            return;
                        }
                        let cred = &creds[idx / REPLICAS];
                        let stream = admin.mesh_stream(cred, &address(idx)).await.expect("connect");
                        tokio::spawn(proxy(idx, stream, probes.clone()));
                    }
                }));
            }
            for w in workers {
                w.await.unwrap();
            }
        })
        .await;
        let ramp_s = (connect_ms + ramp[ramp.len() - 1]) / 1000.0;
        let (_, _, cpu_ramped) = usage(pid);
        eprintln!("{proxies} proxies hold the whole table {ramp_s:.1} s after the last connected");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (rss_idle, _, _) = usage(pid);

        let (mut mesh_wide, mut one_service, mut joined) = (Vec::new(), Vec::new(), Vec::new());
        let mut change_ms = Vec::new();
        for r in 0..ROUNDS {
            let posture = if r % 2 == 0 { "allow-authenticated" } else { "deny" };
            let text = format!(
                "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  defaultPosture: {posture}\n"
            );
            let (d, c) = round(&probes, Goal::Posture(posture.into()), None, apply(&mut admin, text)).await;
            eprintln!("round {r}: mesh config on all {proxies} after {:.0} ms", d[d.len() - 1]);
            mesh_wide.extend(d);
            change_ms.push(c);

            let svc = (r * 97) % services;
            let name = format!("svc-{svc:04}");
            let text = format!(
                "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: {name}, namespace: bench }}\nspec:\n  target: bench/{name}\n  rules: [{{ from: [bench/svc-{:04}] }}]\n",
                (svc + 1) % services
            );
            let replicas = svc * REPLICAS..(svc + 1) * REPLICAS;
            let (d, c) = round(&probes, Goal::Policy(name), Some(replicas), apply(&mut admin, text)).await;
            eprintln!("round {r}: policy on its {REPLICAS} replicas after {:.0} ms", d[d.len() - 1]);
            one_service.extend(d);
            change_ms.push(c);

            // A new replica of one service joins; everyone must learn its address.
            let addr = format!("10.250.0.{}:8443", r + 1);
            let cred = admin.credential(&format!("bench/svc-{svc:04}")).await.unwrap();
            let stream = admin.mesh_stream(&cred, &addr).await.unwrap();
            let extra = Arc::new(Mutex::new(None));
            let (d, _) = round(&probes, Goal::Endpoint(addr.clone()), None, async {
                tokio::spawn(proxy(0, stream, extra.clone()));
            })
            .await;
            eprintln!("round {r}: new endpoint on all {proxies} after {:.0} ms", d[d.len() - 1]);
            joined.extend(d);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (rss_end, rss_peak, cpu_end) = usage(pid);
        for v in [&mut mesh_wide, &mut one_service, &mut joined, &mut change_ms] {
            v.sort_by(f64::total_cmp);
        }
        let cpus = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_default();
        let table = format!(
            "# control_plane — latest run\n\n\
             - Command: `cargo bench -p moat-bench --bench control_plane`\n\
             - Machine: {cpus}, {} cores; the control plane and the simulated proxies share them.\n\
             - Setup: one `moat-control` (release, embedded store) and {proxies} simulated proxies in one \
             process: {services} services × {REPLICAS} replicas, one mTLS connection and one `Mesh.Stream` \
             each, announcing its own address, folding incremental service tables and acknowledging \
             every snapshot.\n\
             - Delays are from the admin call returning (the change is stored) until each concerned \
             proxy has received the snapshot carrying it; {ROUNDS} rounds of each change.\n\n\
             ## Memory and CPU\n\n\
             | measure | value |\n|---|---|\n\
             | control plane RSS before any proxy | {idle_rss_empty:.0} MB |\n\
             | control plane RSS, {proxies} proxies connected, idle | {rss_idle:.0} MB |\n\
             | control plane RSS after the rounds | {rss_end:.0} MB |\n\
             | control plane peak RSS (VmHWM) | {rss_peak:.0} MB |\n\
             | ramp: last proxy holding all {proxies} endpoints, after the first connected | {ramp_s:.1} s |\n\
             | control plane CPU during the ramp | {:.1} s |\n\
             | control plane CPU during the rounds | {:.1} s |\n\n\
             ## Convergence\n\n\
             | change | samples | p50 | p99 | max |\n|---|---|---|---|---|\n\
             {}{}{}{}\n\
             Targets (issue: performance): {proxies} proxies in < 500 MB; policy convergence p99 < 1 s.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_ramped - cpu_start,
            cpu_end - cpu_ramped,
            row(&format!("MeshConfig `defaultPosture` → all {proxies} proxies"), &mesh_wide),
            row(&format!("one service's AccessPolicy → its {REPLICAS} replicas"), &one_service),
            row(&format!("a new endpoint → all {proxies} proxies' tables"), &joined),
            row("the admin apply call itself (stored, durable)", &change_ms),
        );
        print!("{table}");
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/control_plane.md");
        std::fs::write(&out, table).unwrap();
        // Stop the control plane now; leave the 10,000 streams to the process exit.
        drop(cp);
        std::process::exit(0);
    });
}
