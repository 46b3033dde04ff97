//! Real `moat-control` replicas holding 10,000 proxy streams: their memory, and how long a
//! change takes to reach every proxy it concerns. With `MOAT_BENCH_CONTROL_PLANES=3`, three
//! replicas share a real 3-member etcd cluster (Debian's `etcd-server`), the proxies are spread
//! over them, every change is made through the first replica (so most proxies learn it through
//! another one), and at the end the last replica is killed (`kill -9`): its proxies reconnect to
//! the others as `moat-proxy` does (after 250 ms ± 25 %), and the bench measures how long until
//! every one of them holds a first snapshot from a survivor, and the survivors' CPU meanwhile.
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
//! Writes `bench/results/control_plane.md` (one replica, embedded store) or
//! `bench/results/control_plane_ha.md` (replicas on etcd).
//!
//! The simulated proxies share one process and the machine's cores with the replicas they
//! measure, which real sidecars do not: each has its own CPU for its side of a handshake and its
//! table. So that the storm measures the survivors rather than this process, at most
//! [`reconnecting`] simulated proxies reconnect at a time (the others wait their turn, which
//! counts in their delay), and this process allocates with jemalloc, as the binaries do (with
//! glibc malloc, ten thousand tables of 10,000 endpoints spent most of its CPU in malloc).

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_api::v1::{
    Ack, ApplyPoliciesRequest, PolicySource, ProxyMessage, Snapshot, proxy_message,
};
use moat_test_util::ControlPlane;
use moat_test_util::mesh::{Admin, MeshStream};
use moat_wire::table::ServiceTable;

const REPLICAS: usize = 10;
const ROUNDS: usize = 5;
/// Connections being set up at once.
const CONNECTING: usize = 64;
const GIVE_UP: Duration = Duration::from_secs(300);

/// What a round waits for each concerned proxy to have.
#[derive(Clone, Debug)]
enum Goal {
    /// Every service's every endpoint: `n` in all.
    Table(usize),
    Posture(String),
    /// A policy of that name (new in the round).
    Policy(String),
    /// Service (SPIFFE ID) and the new endpoint it lists. Looked up by service: scanning each
    /// proxy's whole table for the address made this process the bottleneck of the round (the
    /// rounds before 2026-12-02's run 10 found it faster the earlier its service sorted).
    Endpoint {
        service: String,
        address: String,
    },
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

/// Whether `goal` holds for a proxy holding `table` after `snap`.
fn reached(goal: &Goal, snap: &Snapshot, table: &ServiceTable) -> bool {
    match goal {
        Goal::Table(n) => table.endpoints() == *n,
        Goal::Posture(p) => snap.mesh.as_ref().is_some_and(|m| &m.default_posture == p),
        Goal::Policy(name) => snap.policies.iter().any(|p| &p.name == name),
        Goal::Endpoint { service, address } => {
            table.get(service).is_some_and(|eps| eps.contains(address))
        }
    }
}

/// One simulated proxy: fold snapshots into `table` (kept across its streams, as `moat-proxy`
/// does), acknowledge, note when the probe's goal holds. Returns when the stream ends.
async fn proxy(idx: usize, stream: MeshStream, probes: Probes, table: &mut Option<ServiceTable>) {
    let MeshStream { tx, mut inbound } = stream;
    while let Ok(Some(mut snap)) = inbound.message().await {
        ServiceTable::fold(table, &mut snap).expect("a snapshot that folds");
        let Some(held) = table.as_ref() else { continue };
        if snap.continued {
            continue; // more parts follow; moat-proxy applies and acknowledges at the last
        }
        {
            let mut guard = probes.lock().unwrap();
            if let Some(p) = guard.as_mut()
                && p.hits[idx].is_none()
                && p.only.as_ref().is_none_or(|r| r.contains(&idx))
                && reached(&p.goal, &snap, held)
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

/// The inbound address simulated proxy `idx` announces: the loopback address its stream comes
/// from ([`source`]), the only one the control plane lets it announce.
fn address(idx: usize) -> String {
    format!("{}:8443", source(idx))
}

/// The survivors' `moat_mesh_first_snapshots_total` and `moat_mesh_resent_buckets_total`, as
/// "full / resumed first snapshots, buckets resent" per replica.
async fn survivors_counters(cps: &[ControlPlane]) -> String {
    let read = |text: &str, series: &str| moat_test_util::metric_sum(text, series) as u64;
    cps.iter()
        .map(|cp| {
            let text = cp.admin_get("/metrics").map(|(_, t)| t).unwrap_or_default();
            format!(
                "{} full / {} resumed, {} buckets",
                read(&text, "moat_mesh_first_snapshots_total{table=\"full\"}"),
                read(&text, "moat_mesh_first_snapshots_total{table=\"resumed\"}"),
                read(&text, "moat_mesh_resent_buckets_total"),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
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

/// Simulated proxies reconnecting at once after their replica died (see the module's doc):
/// `MOAT_BENCH_RECONNECTING`, 256 unless set. 64 until run 6 of 2026-12-02, when the survivors
/// spent 2.3 s of CPU each on the storm and this process was what the orphans waited for.
fn reconnecting() -> usize {
    std::env::var("MOAT_BENCH_RECONNECTING")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(256)
}

/// Control-plane replicas: 1 (embedded store) unless `MOAT_BENCH_CONTROL_PLANES` says more (on
/// etcd).
fn control_planes() -> usize {
    std::env::var("MOAT_BENCH_CONTROL_PLANES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The loopback address simulated proxy `idx` connects from: each its own, as each sidecar has
/// its own pod address (the control plane bounds pending handshakes per source address).
fn source(idx: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 1, (idx / 250) as u8, (idx % 250 + 1) as u8).into()
}

/// When a proxy was re-attached, and how many endpoints its table listed then.
type Reattached = Arc<Mutex<Vec<Option<(Instant, usize)>>>>;

/// What every roaming proxy shares: the replicas' admin clients, the probe, where each notes
/// its re-attachment, and the turns to reconnect (see [`reconnecting`]).
#[derive(Clone)]
struct Roaming {
    admins: Arc<Vec<Admin>>,
    probes: Probes,
    reattached: Reattached,
    gate: Arc<tokio::sync::Semaphore>,
}

/// A simulated proxy of replica-set index `idx` on control plane `home`, which reconnects as
/// `moat-proxy` does when its stream ends: to another replica at random, after 250 ms ± 25 % doubling
/// with every attempt that brings no snapshot (up to 15 s), announcing the table it holds. It
/// says when it holds a first snapshot again in `reattached`.
async fn roaming_proxy(
    idx: usize,
    cred: Arc<moat_tls::config::Credential>,
    mut home: usize,
    first: MeshStream,
    shared: Roaming,
) {
    let Roaming {
        admins,
        probes,
        reattached,
        gate,
    } = shared;
    let mut stream = Some(first);
    let mut table = None;
    let first_step = Duration::from_millis(250);
    let mut step = first_step;
    loop {
        if let Some(s) = stream.take() {
            proxy(idx, s, probes.clone(), &mut table).await;
            step = first_step;
        }
        // As moat-proxy: another replica, at random.
        home = (home + 1 + rand::random_range(0..admins.len() - 1)) % admins.len();
        let jitter = 0.75 + rand::random::<f64>() * 0.5;
        tokio::time::sleep(step.mul_f64(jitter)).await;
        step = (step * 2).min(Duration::from_secs(15));
        // Held until this attempt ends (see `reconnecting`).
        let Ok(turn) = gate.acquire().await else {
            return;
        };
        let digests = table
            .as_ref()
            .map(ServiceTable::digests)
            .unwrap_or_default();
        match admins[home]
            .mesh_stream_from(&cred, &address(idx), digests, Some(source(idx)))
            .await
        {
            Ok(mut s) => {
                // Re-attached once the survivor's first snapshot (all its parts) arrives.
                let first = loop {
                    match s.inbound.message().await {
                        Ok(Some(mut part)) => {
                            ServiceTable::fold(&mut table, &mut part)
                                .expect("a snapshot that folds");
                            if !part.continued {
                                break Some(part);
                            }
                        }
                        _ => break None,
                    }
                };
                let Some(first) = first else { continue };
                drop(turn);
                let endpoints = table.as_ref().map_or(0, ServiceTable::endpoints);
                reattached.lock().unwrap()[idx].get_or_insert_with(|| (Instant::now(), endpoints));
                let ack = Ack {
                    version: first.version,
                    applied: true,
                    ..Ack::default()
                };
                let _ =
                    s.tx.send(ProxyMessage {
                        message: Some(proxy_message::Message::Ack(ack)),
                    })
                    .await;
                stream = Some(s);
            }
            Err(_) => continue,
        }
    }
}

fn main() {
    let (services, proxies, planes) = (services(), proxies(), control_planes());
    let rt = moat_bench::runtime();
    rt.block_on(async {
        let etcd = (planes > 1).then(|| moat_test_util::etcd::EtcdCluster::start(3).unwrap());
        let mut cps: Vec<ControlPlane> = match &etcd {
            None => vec![ControlPlane::start().unwrap()],
            Some(etcd) => (0..planes)
                .map(|_| ControlPlane::start_with(&["--store", &etcd.store_url()]).unwrap())
                .collect(),
        };
        let pids: Vec<u32> = cps.iter().map(|c| c.pid().unwrap()).collect();
        let mut admin = Admin::connect(&cps[0]).await.unwrap();
        let admins: Arc<Vec<Admin>> = Arc::new(
            cps.iter()
                .map(|cp| {
                    let mut a = admin.clone();
                    a.url = cp.url();
                    a
                })
                .collect(),
        );
        let mut creds = Vec::with_capacity(services);
        for svc in 0..services {
            creds.push(Arc::new(
                admin.credential(&format!("bench/svc-{svc:04}")).await.unwrap(),
            ));
        }
        let usage_all = || pids.iter().map(|p| usage(*p)).collect::<Vec<_>>();
        let idle_empty = usage_all();

        // Ramp: every proxy connects (CONNECTING at a time), to replica idx % planes, and must
        // list every endpoint.
        let probes: Probes = Arc::new(Mutex::new(None));
        let reattached: Reattached = Arc::new(Mutex::new(vec![None; proxies]));
        let creds = Arc::new(creds);
        let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(reconnecting()));
        let (ramp, connect_ms) = round(&probes, Goal::Table(proxies), None, async {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut workers = Vec::new();
            for _ in 0..CONNECTING {
                let (next, creds, probes) = (next.clone(), creds.clone(), probes.clone());
                let (admins, reattached, retried, gate) =
                    (admins.clone(), reattached.clone(), retried.clone(), gate.clone());
                workers.push(tokio::spawn(async move {
                    loop {
                        let idx = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if idx >= proxies {
                            return;
                        }
                        let cred = creds[idx / REPLICAS].clone();
                        let home = idx % admins.len();
                        // On a machine this loaded a handshake can pass the control plane's 5 s
                        // deadline; the proxy tries again, as moat-proxy would (each retry is
                        // counted and reported; a proxy still out after a minute is a failure).
                        let mut attempts = 0;
                        let stream = loop {
                            match admins[home]
                                .mesh_stream_from(&cred, &address(idx), Vec::new(), Some(source(idx)))
                                .await
                            {
                                Ok(s) => break s,
                                Err(e) if attempts < 60 => {
                                    attempts += 1;
                                    retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    eprintln!("proxy {idx}: {e}; trying again");
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                                Err(e) => panic!("proxy {idx} cannot connect: {e}"),
                            }
                        };
                        if admins.len() > 1 {
                            tokio::spawn(roaming_proxy(
                                idx,
                                cred,
                                home,
                                stream,
                                Roaming {
                                    admins: admins.clone(),
                                    probes: probes.clone(),
                                    reattached: reattached.clone(),
                                    gate: gate.clone(),
                                },
                            ));
                        } else {
                            let probes = probes.clone();
                            tokio::spawn(async move { proxy(idx, stream, probes, &mut None).await });
                        }
                    }
                }));
            }
            for w in workers {
                w.await.unwrap();
            }
        })
        .await;
        let ramp_s = (connect_ms + ramp[ramp.len() - 1]) / 1000.0;
        let ramped = usage_all();
        eprintln!("{proxies} proxies hold the whole table {ramp_s:.1} s after the last connected");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let idle = usage_all();

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

            // A new replica of one service joins (on the last control plane); everyone must
            // learn its address.
            let from = std::net::IpAddr::from([127, 250, 0, (r + 1) as u8]);
            let addr = format!("{from}:8443");
            let cred = admin.credential(&format!("bench/svc-{svc:04}")).await.unwrap();
            let extra = Arc::new(Mutex::new(None));
            // Connected inside the round: the control plane may send the new endpoint to the
            // others as soon as the proxy announces it, before the stream call returns.
            let goal = Goal::Endpoint {
                service: cred.id().to_string(),
                address: addr.clone(),
            };
            let (d, _) = round(&probes, goal, None, async {
                let stream = admins[admins.len() - 1]
                    .mesh_stream_from(&cred, &addr, Vec::new(), Some(from))
                    .await
                    .unwrap();
                let extra = extra.clone();
                tokio::spawn(async move { proxy(0, stream, extra, &mut None).await });
            })
            .await;
            eprintln!("round {r}: new endpoint on all {proxies} after {:.0} ms", d[d.len() - 1]);
            joined.extend(d);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let end = usage_all();
        for v in [&mut mesh_wide, &mut one_service, &mut joined, &mut change_ms] {
            v.sort_by(f64::total_cmp);
        }

        // Replicas only: the last one dies; its proxies move to the others.
        let mut storm = String::new();
        if planes > 1 {
            let victim = planes - 1;
            let orphans: Vec<usize> = (0..proxies).filter(|i| i % planes == victim).collect();
            let before: Vec<(f64, f64, f64)> = pids[..victim].iter().map(|p| usage(*p)).collect();
            let harness_before = usage(std::process::id()).2;
            let killed = Instant::now();
            cps[victim].kill9();
            // Reported even when not every proxy makes it in time.
            let (all_back, back) = loop {
                let back = {
                    let r = reattached.lock().unwrap();
                    orphans.iter().filter(|i| r[**i].is_some()).count()
                };
                if back == orphans.len() || killed.elapsed() >= GIVE_UP {
                    break (killed.elapsed(), back);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let (mut delays, complete): (Vec<f64>, usize) = {
                let r = reattached.lock().unwrap();
                let back: Vec<(Instant, usize)> = orphans.iter().filter_map(|i| r[*i]).collect();
                (
                    back.iter().map(|(t, _)| (*t - killed).as_secs_f64() * 1000.0).collect(),
                    // Every proxy's own endpoint is still listed (the dead replica's for the
                    // orphan grace), so a correctly resumed table lists them all.
                    back.iter().filter(|(_, n)| *n >= proxies).count(),
                )
            };
            let harness_cpu = usage(std::process::id()).2 - harness_before;
            let resent = survivors_counters(&cps[..victim]).await;
            delays.sort_by(f64::total_cmp);
            let after: Vec<(f64, f64, f64)> = pids[..victim].iter().map(|p| usage(*p)).collect();
            let cpu: Vec<String> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| format!("{:.1} s", a.2 - b.2))
                .collect();
            let rss: Vec<String> = after.iter().map(|a| format!("{:.0} MB", a.0)).collect();
            eprintln!("{back} of {} orphaned proxies re-attached {all_back:?} after the kill", orphans.len());
            storm = format!(
                "\n## A replica killed\n\n\
                 Control plane {} of {planes} is killed (`kill -9`) with its {} proxies connected; each \
                 reconnects to another replica at random after 250 ms ± 25 %, doubling per fruitless attempt up to 15 s (`moat-proxy`'s backoff), \
                 announcing the digests of the table it holds, and is re-attached when the survivor's \
                 first snapshot (only the table buckets that differ) has arrived. At most {} of them \
                 reconnect at a time (`MOAT_BENCH_RECONNECTING`), standing in for each sidecar's own CPU.\n\n\
                 | measure | value |\n|---|---|\n\
                 | orphaned proxies re-attached | {back} of {} |\n\
                 | of them, holding all {proxies} endpoints once re-attached | {complete} |\n\
                 | survivors' first snapshots and buckets resent (of 64 each), whole run | {resent} |\n\
                 | the last of them re-attached (or the bench gave up), after the kill | {:.1} s |\n\
                 | re-attach delay p10 / p50 / p99 | {:.0} ms / {:.0} ms / {:.0} ms |\n\
                 | survivors' CPU until then | {} |\n\
                 | the simulated proxies' CPU until then (one process for all {proxies}) | {harness_cpu:.1} s |\n\
                 | survivors' RSS after | {} |\n",
                victim + 1,
                orphans.len(),
                reconnecting(),
                orphans.len(),
                all_back.as_secs_f64(),
                moat_bench::pct(&delays, 0.1),
                moat_bench::pct(&delays, 0.5),
                moat_bench::pct(&delays, 0.99),
                cpu.join(", "),
                rss.join(", "),
            );
        }

        let cpus = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_default();
        let mb = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
            v.iter().map(|u| format!("{:.0} MB", f(u))).collect::<Vec<_>>().join(", ")
        };
        let cpu = |a: &[(f64, f64, f64)], b: &[(f64, f64, f64)]| {
            a.iter().zip(b).map(|(a, b)| b.2 - a.2).sum::<f64>()
        };
        let (setup, file, targets) = if planes == 1 {
            (
                "one `moat-control` (release, embedded store)".to_owned(),
                "results/control_plane.md",
                format!("Targets (issue: performance): {proxies} proxies in < 500 MB; policy convergence p99 < 1 s."),
            )
        } else {
            (
                format!("{planes} `moat-control` replicas (release) on a 3-member etcd cluster (Debian's etcd-server) on the same machine; proxy i on replica i mod {planes}; every change applied through replica 1"),
                "results/control_plane_ha.md",
                format!("Targets (issue: HA): {proxies} proxies over {planes} replicas, each < 250 MB; cross-replica convergence p99 < 1 s; every orphaned proxy re-attached < 10 s after a replica's death."),
            )
        };
        let table = format!(
            "# control_plane — latest run\n\n\
             - Command: `{}cargo bench -p moat-bench --bench control_plane`\n\
             - Machine: {cpus}, {} cores; the control plane and the simulated proxies share them.\n\
             - Setup: {setup}, and {proxies} simulated proxies in one \
             process: {services} services × {REPLICAS} replicas, one mTLS connection (from its own loopback address, as each sidecar has its own) and one `Mesh.Stream` \
             each, announcing its own address, folding incremental service tables and acknowledging \
             every snapshot.\n\
             - Delays are from the admin call returning (the change is stored) until each concerned \
             proxy has received the snapshot carrying it; {ROUNDS} rounds of each change.\n\n\
             ## Memory and CPU\n\n\
             | measure | value |\n|---|---|\n\
             | control plane RSS before any proxy | {} |\n\
             | control plane RSS, {proxies} proxies connected, idle | {} |\n\
             | control plane RSS after the rounds | {} |\n\
             | control plane peak RSS (VmHWM) | {} |\n\
             | ramp: last proxy holding all {proxies} endpoints, after the first connected | {ramp_s:.1} s |\n\
             | ramp: connections tried again (a handshake past the control plane's 5 s deadline) | {} |\n\
             | control plane CPU during the ramp | {:.1} s |\n\
             | control plane CPU during the rounds | {:.1} s |\n\n\
             ## Convergence\n\n\
             | change | samples | p50 | p99 | max |\n|---|---|---|---|---|\n\
             {}{}{}{}\n{storm}\n\
             {targets}\n",
            if planes == 1 { String::new() } else { format!("MOAT_BENCH_CONTROL_PLANES={planes} ") },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            mb(&idle_empty, |u| u.0),
            mb(&idle, |u| u.0),
            mb(&end, |u| u.0),
            mb(&end, |u| u.1),
            retried.load(std::sync::atomic::Ordering::Relaxed),
            cpu(&idle_empty, &ramped),
            cpu(&ramped, &end),
            row(&format!("MeshConfig `defaultPosture` → all {proxies} proxies"), &mesh_wide),
            row(&format!("one service's AccessPolicy → its {REPLICAS} replicas"), &one_service),
            row(&format!("a new endpoint → all {proxies} proxies' tables"), &joined),
            row("the admin apply call itself (stored, durable)", &change_ms),
        );
        print!("{table}");
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        std::fs::write(&out, table).unwrap();
        // Stop the control planes now; leave the streams to the process exit.
        cps.clear();
        drop(etcd);
        std::process::exit(0);
    });
}
