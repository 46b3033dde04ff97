//! `moat tap --to SERVICE`: the calls a service's sidecars decide on, live (Admin `Tap`). The
//! control plane tells every connected sidecar of the service to send the calls that match the
//! filters, at most `--max-rate` a second each, over its mesh stream; sidecars do no tap work
//! while no tap is open. One line per call; `-o json` prints one JSON object per line (for
//! `jq`), `-o yaml` one document per call.

use std::io::Write as _;

use anyhow::Context as _;
use moat_api::v1::{TapEvent, TapRequest};
use serde_json::{Value, json};

use super::admin;
use crate::Global;
use crate::connect::status;
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct TapArgs {
    /// The service: `orders`, `shop/orders` or a SPIFFE ID.
    #[arg(long)]
    to: String,
    /// Only calls from this caller (`frontend`, `shop/frontend` or a SPIFFE ID).
    #[arg(long)]
    from: Option<String>,
    /// Only calls with this decision.
    #[arg(long, value_parser = ["allow", "deny", "would-deny"])]
    decision: Option<String>,
    /// Only requests whose canonical path is this prefix or below it (e.g. /orders).
    #[arg(long)]
    path: Option<String>,
    /// Only requests with this HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// Stop after this many calls (default: until interrupted).
    #[arg(long)]
    limit: Option<u64>,
    /// Per sidecar, at most this many calls a second (the rest are counted, not shown; 1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_rate: u32,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

pub async fn run(global: &Global, args: TapArgs) -> anyhow::Result<()> {
    let mut stream = admin(global)
        .await?
        .tap(TapRequest {
            target: args.to.clone(),
            from: args.from.unwrap_or_default(),
            decision: args.decision.unwrap_or_default(),
            path_prefix: args.path.unwrap_or_default(),
            method: args.method.unwrap_or_default(),
            limit: args.limit.unwrap_or(0),
            max_per_second: args.max_rate,
        })
        .await
        .map_err(|s| status("tap", s))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    let mut dropped = 0;
    while let Some(msg) = stream.message().await.map_err(|s| status("tap", s))? {
        if !msg.target.is_empty() {
            eprintln!(
                "tapping {} ({} sidecar{} connected; sidecars that connect later are tapped too); ctrl-c to stop",
                msg.target,
                msg.proxies,
                if msg.proxies == 1 { "" } else { "s" }
            );
        }
        if msg.dropped > 0 {
            dropped += msg.dropped;
            eprintln!(
                "({} matching calls not shown: over --max-rate, or this terminal read too slowly)",
                msg.dropped
            );
        }
        for e in &msg.events {
            match args.output {
                Output::Table => writeln!(out, "{}", line(e)),
                Output::Json => writeln!(out, "{}", serde_json::to_string(&event_json(e))?),
                Output::Yaml => write!(out, "---\n{}", serde_yaml_ng::to_string(&event_json(e))?),
            }
            .context("cannot write to stdout")?;
        }
        out.flush().context("cannot write to stdout")?;
    }
    if dropped > 0 {
        eprintln!("{dropped} matching calls were not shown");
    }
    Ok(())
}

/// The time of an event, RFC 3339 with milliseconds (UTC).
fn time(micros: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A SPIFFE ID in its short form within the target's trust domain (`orders`, `shop/orders`).
fn short(id: &str, home: Option<&moat_identity::SpiffeId>) -> String {
    match (id.parse::<moat_identity::SpiffeId>(), home) {
        (Ok(s), Some(home)) => s.short_form(home.trust_domain()),
        _ => id.to_owned(),
    }
}

fn line(e: &TapEvent) -> String {
    let what = if e.protocol == "tcp" {
        format!("TCP :{}", e.port)
    } else if !e.grpc_status.is_empty() {
        format!(
            "{} {} {} grpc-status {}",
            e.method, e.path, e.status, e.grpc_status
        )
    } else {
        format!("{} {} {}", e.method, e.path, e.status)
    };
    let why = match (e.decision.as_str(), e.policy.as_str()) {
        ("allow", "") => "allow".to_owned(),
        (d, "") => format!("{d} {}", e.reason),
        ("allow", p) => format!("allow ({p})"),
        (d, p) => format!("{d} {} ({p})", e.reason),
    };
    let id = if e.request_id.is_empty() {
        String::new()
    } else {
        format!(" id={}", e.request_id)
    };
    let home = e.target.parse::<moat_identity::SpiffeId>().ok();
    format!(
        "{} {} -> {} [{}] {what} {why} {:.1}ms{id}",
        time(e.time_unix_micros),
        short(&e.peer, home.as_ref()),
        short(&e.target, home.as_ref()),
        e.proxy,
        e.latency_micros as f64 / 1000.0,
    )
}

fn event_json(e: &TapEvent) -> Value {
    json!({
        "time": time(e.time_unix_micros),
        "protocol": e.protocol,
        "from": e.peer,
        "to": e.target,
        "proxy": e.proxy,
        "port": e.port,
        "method": e.method,
        "path": e.path,
        "status": e.status,
        // null unless a gRPC answer without a body carried it (every refusal does).
        "grpc_status": (!e.grpc_status.is_empty()).then_some(&e.grpc_status),
        "decision": e.decision,
        "reason": e.reason,
        "policy": e.policy,
        "latency_ms": e.latency_micros as f64 / 1000.0,
        "request_id": e.request_id,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_line_says_who_called_what_and_why_it_was_decided() {
        let e = TapEvent {
            time_unix_micros: 1_764_600_000_123_000,
            protocol: "http".into(),
            peer: "spiffe://mesh.local/ns/default/sa/intruder".into(),
            target: "spiffe://mesh.local/ns/default/sa/orders".into(),
            proxy: "127.0.0.1:7001".into(),
            method: "DELETE".into(),
            path: "/orders/1".into(),
            status: 403,
            decision: "deny".into(),
            reason: "route-not-allowed".into(),
            policy: "default/orders@3".into(),
            latency_micros: 250,
            request_id: "ab12".into(),
            ..TapEvent::default()
        };
        assert_eq!(
            line(&e),
            "2025-12-01T14:40:00.123Z intruder -> orders [127.0.0.1:7001] DELETE /orders/1 403 deny route-not-allowed (default/orders@3) 0.2ms id=ab12"
        );
        let grpc = TapEvent {
            path: "/demo.Payments/Charge".into(),
            method: "POST".into(),
            status: 200,
            grpc_status: "7".into(),
            ..e.clone()
        };
        assert!(
            line(&grpc).contains(" POST /demo.Payments/Charge 200 grpc-status 7 deny "),
            "{}",
            line(&grpc)
        );
        assert_eq!(event_json(&grpc)["grpc_status"], "7");
        let j = event_json(&e);
        assert_eq!(j["decision"], "deny");
        assert_eq!(j["from"], "spiffe://mesh.local/ns/default/sa/intruder");
    }
}
