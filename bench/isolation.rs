//! One caller under attack by another: the latency a well-behaved caller sees while another
//! caller attacks the same sidecar, against the same caller's latency without an attack,
//! measured in the same run (issue 20; the tests in tests/isolation.rs check that every request
//! succeeds, this measures what the attack costs in time).
//!
//! Topology: control plane, sidecar `b` in front of an in-process app (`/small`: 2 bytes,
//! `/big`: 20 MB), sidecar `a` with an outbound listener for `b`. The well-behaved caller is
//! `c` straight to b's inbound (path "inbound") or a local client of `a` (path "outbound"); the
//! attacker comes the same way. Attacks, each sustained for the whole measurement: a zero
//! window with three 20 MB responses held, a delayed rapid reset (100 streams reset 50 ms after
//! sending, reconnecting whenever the sidecar closes the connection), and 6 × 128 stream slots
//! held with request bodies that never finish. Per condition: `/small` over one HTTP/2
//! connection for 4 s (p50, p99) and one 20 MB fetch; three rounds interleaved, medians;
//! results in `bench/results/isolation.md`.

// A benchmark that cannot set up has nothing to measure: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use moat_test_util::mesh::Admin;
use moat_test_util::{ControlPlane, Proxy, apply_policy};

const MEASURE: Duration = Duration::from_secs(4);
const ROUNDS: usize = 3;

/// A connection the bench drives.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    None,
    ZeroWindow,
    DelayedReset,
    HeldSlots,
}

struct Mesh {
    b: Proxy,
    a: Proxy,
    bundle: Arc<moat_identity::TrustBundle>,
    attacker: moat_tls::Credential,
    caller: moat_tls::Credential,
    _cp: ControlPlane,
}

impl Mesh {
    async fn open(&self, path: Path, attacker: bool) -> Box<dyn Io> {
        match path {
            Path::Inbound => {
                let cred = if attacker {
                    &self.attacker
                } else {
                    &self.caller
                };
                let cfg = moat_tls::client_config(
                    Some(cred),
                    self.bundle.clone(),
                    moat_identity::SpiffeId::parse_with_default("b", cred.id().trust_domain())
                        .unwrap(),
                    moat_tls::ALPN_H2,
                )
                .unwrap();
                let tcp = tokio::net::TcpStream::connect(self.b.inbound)
                    .await
                    .unwrap();
                Box::new(
                    tokio_rustls::TlsConnector::from(cfg)
                        .connect("moat.invalid".try_into().unwrap(), tcp)
                        .await
                        .unwrap(),
                )
            }
            Path::Outbound => Box::new(
                tokio::net::TcpStream::connect(self.a.upstream("b"))
                    .await
                    .unwrap(),
            ),
        }
    }
}

fn request(path: &str) -> http::Request<()> {
    http::Request::get(format!("https://b{path}"))
        .body(())
        .unwrap()
}

/// Starts `attack` through `path`; it runs until the returned handle is aborted.
async fn start(m: &Arc<Mesh>, path: Path, attack: Attack) -> Option<tokio::task::JoinHandle<()>> {
    let m = m.clone();
    let handle = match attack {
        Attack::None => return None,
        Attack::ZeroWindow => {
            let io = m.open(path, true).await;
            let (send, conn) = h2::client::Builder::new()
                .initial_window_size(0)
                .handshake::<_, Bytes>(io)
                .await
                .unwrap();
            tokio::spawn(async move {
                let driver = tokio::spawn(conn);
                let mut held = Vec::new();
                for _ in 0..3 {
                    if let Ok(mut s) = send.clone().ready().await
                        && let Ok((r, _)) = s.send_request(request("/big"), true)
                    {
                        held.push(r);
                    }
                }
                let _ = driver.await;
                drop(held);
            })
        }
        Attack::DelayedReset => tokio::spawn(async move {
            loop {
                let io = m.open(path, true).await;
                let Ok((send, conn)) = h2::client::Builder::new()
                    .max_concurrent_reset_streams(100_000)
                    .handshake::<_, Bytes>(io)
                    .await
                else {
                    continue;
                };
                let driver = tokio::spawn(conn);
                'conn: loop {
                    let mut batch = Vec::new();
                    for _ in 0..100 {
                        let Ok(mut s) = send.clone().ready().await else {
                            break 'conn;
                        };
                        match s.send_request(request("/slow"), true) {
                            Ok((r, _)) => batch.push(r),
                            Err(_) => break 'conn,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(batch);
                }
                driver.abort();
            }
        }),
        Attack::HeldSlots => {
            let mut held = Vec::new();
            let mut drivers = Vec::new();
            for _ in 0..6 {
                let io = m.open(path, true).await;
                let (send, conn) = h2::client::handshake(io).await.unwrap();
                drivers.push(tokio::spawn(conn));
                for _ in 0..128 {
                    let Ok(Ok(mut s)) =
                        tokio::time::timeout(Duration::from_millis(100), send.clone().ready())
                            .await
                    else {
                        break;
                    };
                    let req = http::Request::post("https://b/upload").body(()).unwrap();
                    if let Ok(stream) = s.send_request(req, false) {
                        held.push(stream);
                    }
                }
            }
            tokio::spawn(async move {
                for d in drivers {
                    let _ = d.await;
                }
                drop(held);
            })
        }
    };
    // Let the attack take hold before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Some(handle)
}

struct Run {
    p50_us: f64,
    p99_us: f64,
    big_ms: f64,
    errors: usize,
}

async fn measure(m: &Mesh, path: Path) -> Run {
    let io = m.open(path, false).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    // The body's length, or what went wrong (printed, so that an error can be traced).
    let mut fetch = async |path: &str| -> Result<usize, String> {
        h2.ready().await.map_err(|e| format!("connection: {e}"))?;
        let req = http::Request::get(format!("http://b{path}"))
            .body(Empty::new())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            let r = h2
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = r.status();
            let body = r.into_body().collect().await;
            let body = body.map_err(|e| format!("{status}, body: {e}"))?.to_bytes();
            if status != 200 {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            Ok(body.len())
        })
        .await
        .map_err(|_| "no answer within 30 s".to_owned())?
    };
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut failed = |what: &str, why: String| {
        errors += 1;
        eprintln!("  {what} failed: {why}");
    };
    let end = Instant::now() + MEASURE;
    while Instant::now() < end {
        let t = Instant::now();
        match fetch("/small").await {
            Ok(2) => lat.push(t.elapsed().as_micros() as f64),
            Ok(n) => failed("/small", format!("{n} bytes")),
            Err(why) => failed("/small", why),
        }
    }
    let t = Instant::now();
    let big_ms = match fetch("/big").await {
        Ok(moat_test_util::apps::BULK) => t.elapsed().as_secs_f64() * 1000.0,
        Ok(n) => {
            failed("/big", format!("{n} bytes"));
            f64::NAN
        }
        Err(why) => {
            failed("/big", why);
            f64::NAN
        }
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p| {
        if lat.is_empty() {
            f64::NAN
        } else {
            moat_bench::pct(&lat, p)
        }
    };
    Run {
        p50_us: q(0.5),
        p99_us: q(0.99),
        big_ms,
        errors,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rt = moat_bench::runtime();
    rt.block_on(async {
        let (addr, _) = moat_test_util::apps::bulk_http().await;
        let cp = ControlPlane::start().unwrap();
        apply_policy(
            &cp,
            "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: b }\nspec:\n  target: b\n  rules:\n    - from: [a, c, mallory]\n",
        );
        let b = Proxy::builder(&cp, "b").app(addr).start().unwrap();
        let a = Proxy::builder(&cp, "a").app(addr).upstreams(&["b"]).start().unwrap();
        let mut admin = Admin::connect(&cp).await.unwrap();
        let attacker = admin.credential("mallory").await.unwrap();
        let caller = admin.credential("c").await.unwrap();
        let (_, bundle) = moat_tls::cred_dir::load(&cp.admin_dir()).unwrap();
        // Let a learn b's endpoint.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = Arc::new(Mesh {
            b,
            a,
            bundle: Arc::new(bundle),
            attacker,
            caller,
            _cp: cp,
        });
        let attacks = [
            Attack::None,
            Attack::ZeroWindow,
            Attack::DelayedReset,
            Attack::HeldSlots,
        ];
        let mut results: Vec<((Path, Attack), Vec<Run>)> = Vec::new();
        for round in 0..ROUNDS {
            for path in [Path::Inbound, Path::Outbound] {
                for attack in attacks {
                    let running = start(&m, path, attack).await;
                    let r = measure(&m, path).await;
                    if let Some(h) = running {
                        h.abort();
                    }
                    eprintln!(
                        "round {round} {path:?} {attack:?}: p50 {:.0} us p99 {:.0} us, 20 MB in {:.0} ms, errors {}",
                        r.p50_us, r.p99_us, r.big_ms, r.errors
                    );
                    match results.iter_mut().find(|(k, _)| *k == (path, attack)) {
                        Some((_, v)) => v.push(r),
                        None => results.push(((path, attack), vec![r])),
                    }
                    // Let the sidecars drop what the attack left behind.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let mut table = format!(
            "# isolation — latest run\n\n\
             - Command: `cargo bench -p moat-bench --bench isolation`\n\
             - Machine: the project's 2-core Linux VM; app, callers and attackers in the bench process \
             (2 worker threads), each sidecar on its default single worker thread, no CPU pinning.\n\
             - Per condition: `/small` over one HTTP/2 connection, closed loop, {} s; then one 20 MB \
             fetch on it. {ROUNDS} rounds interleaved, medians. Ratios: under attack / no attack on \
             the same path, same run.\n\n\
             | path | attack | p50 | p99 | 20 MB | errors | p50 ratio | p99 ratio | 20 MB ratio |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            MEASURE.as_secs()
        );
        for path in [Path::Inbound, Path::Outbound] {
            let base = &results.iter().find(|(k, _)| *k == (path, Attack::None)).unwrap().1;
            let (b50, b99, bbig) = (
                med(base, |r| r.p50_us),
                med(base, |r| r.p99_us),
                med(base, |r| r.big_ms),
            );
            for attack in attacks {
                let runs = &results.iter().find(|(k, _)| *k == (path, attack)).unwrap().1;
                let (p50, p99, big) = (
                    med(runs, |r| r.p50_us),
                    med(runs, |r| r.p99_us),
                    med(runs, |r| r.big_ms),
                );
                let errors: usize = runs.iter().map(|r| r.errors).sum();
                table.push_str(&format!(
                    "| {path:?} | {attack:?} | {p50:.0} µs | {p99:.0} µs | {big:.0} ms | {errors} | {:.2} | {:.2} | {:.2} |\n",
                    p50 / b50,
                    p99 / b99,
                    big / bbig
                ));
            }
        }
        print!("{table}");
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/isolation.md");
        std::fs::write(&out, table).unwrap();
        eprintln!("wrote {}", out.display());
    });
}
