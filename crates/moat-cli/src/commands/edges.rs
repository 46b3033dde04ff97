//! `moat edges` and `moat top`: per edge (caller → service), the request rate, success rate,
//! p50/p99 latency and denials by reason, from the counters the sidecars report to the control
//! plane (Admin `ListEdges`; no Prometheus server needed). The counters are cumulative and
//! travel with the sidecars' reports every 5 s, so rates are the difference of two readings
//! over a window of at least 10 s. Every edge listed is mutual TLS: an inbound sidecar admits
//! nothing else (a plaintext or unauthenticated client is refused at the handshake and counted
//! in `moat_tls_handshake_failures_total`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moat_api::v1::{EdgeCounters, ListEdgesRequest, ListEdgesResponse};
use moat_identity::SpiffeId;
use serde_json::{Value, json};

use super::{admin, duration};
use crate::Global;
use crate::connect::status;
use crate::output::Output;
use crate::table::Table;

/// The sidecars report every 5 s: a shorter window would often see no report at all.
const MIN_WINDOW: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct EdgesArgs {
    /// Rates over this window (at least 10s: the sidecars report every 5 s).
    #[arg(long, default_value = "10s", value_parser = window)]
    window: Duration,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Rates over this sliding window (at least 10s).
    #[arg(long, default_value = "10s", value_parser = window)]
    window: Duration,
    /// How often the screen refreshes.
    #[arg(long, default_value = "2s", value_parser = duration)]
    interval: Duration,
    /// Stop after this many refreshes (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    iterations: u32,
}

fn window(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < MIN_WINDOW {
        return Err("must be at least 10s: the sidecars report their counters every 5 s".into());
    }
    Ok(d)
}

/// One edge over a window.
#[derive(Clone, Debug)]
struct EdgeStats {
    from: String,
    to: String,
    requests: u64,
    rps: f64,
    /// Share of answered requests that were not 5xx; `None` without requests.
    success: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// Per-second denials by reason.
    denied: Vec<(String, f64)>,
}

type Reading = BTreeMap<(String, String), EdgeCounters>;

async fn reading(global: &Global) -> anyhow::Result<(Reading, Vec<f64>)> {
    let ListEdgesResponse {
        edges,
        bucket_bounds_ms,
    } = admin(global)
        .await?
        .list_edges(ListEdgesRequest {})
        .await
        .map_err(|s| status("edges", s))?
        .into_inner();
    let by_edge = edges
        .into_iter()
        .map(|e| ((e.peer.clone(), e.target.clone()), e))
        .collect();
    Ok((by_edge, bucket_bounds_ms))
}

/// The `q` quantile (0..1) of the bucket counts `b` with upper bounds `bounds`, interpolated
/// within its bucket; the unbounded last bucket answers with the last bound.
fn quantile(b: &[u64], bounds: &[f64], q: f64) -> Option<f64> {
    let total: u64 = b.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, n) in b.iter().enumerate() {
        if *n > 0 && (seen + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let Some(upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let into = (rank - seen as f64) / *n as f64;
            return Some(lower + (upper - lower) * into.clamp(0.0, 1.0));
        }
        seen += n;
    }
    bounds.last().copied()
}

/// The difference of two readings over `secs` seconds.
fn stats(before: &Reading, after: &Reading, bounds: &[f64], secs: f64) -> Vec<EdgeStats> {
    let none = EdgeCounters::default();
    after
        .iter()
        .map(|(key, a)| {
            let b = before.get(key).unwrap_or(&none);
            let requests = a.requests.saturating_sub(b.requests);
            let failures = a.failures.saturating_sub(b.failures);
            let buckets: Vec<u64> = a
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(b.latency_buckets.get(i).copied().unwrap_or(0)))
                .collect();
            let denied = a
                .denied
                .iter()
                .filter_map(|d| {
                    let was = b
                        .denied
                        .iter()
                        .find(|x| x.reason == d.reason)
                        .map_or(0, |x| x.count);
                    let n = d.count.saturating_sub(was);
                    (n > 0).then(|| (d.reason.clone(), n as f64 / secs))
                })
                .collect();
            EdgeStats {
                from: key.0.clone(),
                to: key.1.clone(),
                requests,
                rps: requests as f64 / secs,
                success: (requests > 0).then(|| 1.0 - failures as f64 / requests as f64),
                p50_ms: quantile(&buckets, bounds, 0.50),
                p99_ms: quantile(&buckets, bounds, 0.99),
                denied,
            }
        })
        .collect()
}

fn json_of(stats: &[EdgeStats], secs: f64) -> Value {
    json!({
        "window_seconds": secs,
        "edges": stats.iter().map(|s| json!({
            "from": s.from,
            "to": s.to,
            "mtls": true,
            "requests": s.requests,
            "rps": s.rps,
            "success_rate": s.success,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
            "denied_per_second": s.denied.iter().map(|(r, n)| (r.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A SPIFFE ID in its short form within its own trust domain.
fn short(id: &str) -> String {
    id.parse::<SpiffeId>()
        .map(|s| s.short_form(s.trust_domain()))
        .unwrap_or_else(|_| id.to_owned())
}

fn table_of(stats: &[EdgeStats]) -> Table {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}ms"));
    let mut table = Table::new(&[
        "FROM", "TO", "RPS", "SUCCESS", "P50", "P99", "SECURED", "DENIED/S",
    ])
    .right(&[2, 3, 4, 5]);
    for s in stats {
        table.row([
            short(&s.from),
            short(&s.to),
            format!("{:.1}", s.rps),
            s.success
                .map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0)),
            ms(s.p50_ms),
            ms(s.p99_ms),
            "mTLS".to_owned(),
            if s.denied.is_empty() {
                "-".to_owned()
            } else {
                s.denied
                    .iter()
                    .map(|(r, n)| format!("{r}:{n:.1}"))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ]);
    }
    table
}

/// `moat edges`.
pub async fn edges(global: &Global, args: EdgesArgs) -> anyhow::Result<()> {
    let (before, _) = reading(global).await?;
    let start = Instant::now();
    tokio::time::sleep(args.window).await;
    let (after, bounds) = reading(global).await?;
    let secs = start.elapsed().as_secs_f64();
    let stats = stats(&before, &after, &bounds, secs);
    args.output.print(&json_of(&stats, secs), || {
        if stats.is_empty() {
            println!("no edges yet: sidecars report what their callers did every 5 s");
        } else {
            table_of(&stats).print();
        }
    })
}

/// `moat top`: `moat edges` refreshing in place.
pub async fn top(global: &Global, args: TopArgs) -> anyhow::Result<()> {
    let mut samples: Vec<(Instant, Reading)> = Vec::new();
    let mut shown = 0u32;
    loop {
        let (now, bounds) = reading(global).await?;
        let at = Instant::now();
        samples.retain(|(t, _)| at.duration_since(*t) <= args.window + args.interval);
        samples.push((at, now));
        let (first_at, first) = &samples[0];
        let (_, last) = &samples[samples.len() - 1];
        let secs = at.duration_since(*first_at).as_secs_f64();
        // Clear the screen and start at the top.
        print!("\x1b[2J\x1b[H");
        println!(
            "moat top: requests per edge over the last {secs:.0} s (refreshing every {}; Ctrl-C to stop)\n",
            humantime::format_duration(args.interval)
        );
        if secs > 0.0 {
            table_of(&stats(first, last, &bounds, secs)).print();
        } else {
            println!("measuring…");
        }
        shown += 1;
        if args.iterations != 0 && shown >= args.iterations {
            return Ok(());
        }
        tokio::time::sleep(args.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let bounds = [1.0, 2.0, 5.0];
        assert_eq!(quantile(&[0, 0, 0, 0], &bounds, 0.5), None);
        assert_eq!(quantile(&[10, 0, 0, 0], &bounds, 0.5), Some(0.5));
        assert_eq!(quantile(&[0, 10, 0, 0], &bounds, 0.99), Some(1.0 + 0.99));
        assert_eq!(quantile(&[0, 0, 0, 4], &bounds, 0.5), Some(5.0));
    }
}
