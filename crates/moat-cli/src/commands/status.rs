//! `moat status`: every connected proxy, like a proxy-status view.

use moat_api::v1::ListProxiesRequest;

use super::{admin, time};
use crate::Global;
use crate::connect::status;
use crate::output::Output;
use crate::table::Table;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

pub async fn run(global: &Global, args: StatusArgs) -> anyhow::Result<()> {
    let resp = admin(global)
        .await?
        .list_proxies(ListProxiesRequest {})
        .await
        .map_err(|s| status("status", s))?
        .into_inner();
    if !args.output.is_table() {
        let proxies: Vec<_> = resp
            .proxies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "identity": p.spiffe_id, "address": p.inbound_address, "version": p.proxy_version,
                    "cert_serial": p.cert_serial, "cert_expires": time(p.cert_not_after_unix),
                    "cert_not_after_unix": p.cert_not_after_unix,
                    "snapshot_applied": p.snapshot_applied, "snapshot_sent": p.snapshot_sent,
                    "bundle_current": p.bundle_current, "policies": p.policies,
                    "connected_unix_ms": p.connected_unix_ms, "last_seen_unix_ms": p.last_seen_unix_ms,
                    "last_seen_seconds_ago": (moat_identity::clock::unix_now_ms() - p.last_seen_unix_ms).max(0) / 1000,
                    "last_error": p.last_error, "remote": p.remote_address,
                })
            })
            .collect();
        let disconnected: Vec<_> = resp
            .disconnected
            .iter()
            .map(|d| {
                serde_json::json!({
                    "identity": d.spiffe_id, "address": d.inbound_address,
                    "cert_serial": d.cert_serial, "cert_not_after_unix": d.cert_not_after_unix,
                    "disconnected_unix_ms": d.disconnected_unix_ms,
                })
            })
            .collect();
        let data = serde_json::json!({"default_posture": resp.default_posture, "bundle_sha256": resp.bundle_sha256, "proxies": proxies, "disconnected": disconnected});
        return args.output.print(&data, || {});
    }
    println!("default posture: {}", resp.default_posture);
    if resp.default_posture == moat_policy::DefaultPosture::AllowAuthenticated.as_str() {
        println!(
            "WARNING: services without a policy accept any authenticated caller (migration mode)"
        );
    }
    println!("proxies: {}", resp.proxies.len());
    let mut table = Table::new(&[
        "IDENTITY",
        "ADDRESS",
        "CERT",
        "CERT EXPIRES",
        "SNAPSHOT",
        "BUNDLE",
        "LAST SEEN",
        "POLICIES",
    ])
    .right(&[4, 6]);
    for p in &resp.proxies {
        let snapshot = if p.snapshot_applied == p.snapshot_sent {
            p.snapshot_applied.to_string()
        } else {
            format!("{}/{}", p.snapshot_applied, p.snapshot_sent)
        };
        table.row([
            p.spiffe_id.clone(),
            p.inbound_address.clone(),
            p.cert_serial.get(..8).unwrap_or(&p.cert_serial).to_owned(),
            time(p.cert_not_after_unix),
            snapshot,
            if p.bundle_current { "ok" } else { "stale" }.to_owned(),
            format!(
                "{}s",
                (moat_identity::clock::unix_now_ms() - p.last_seen_unix_ms).max(0) / 1000
            ),
            p.policies.join(","),
        ]);
        if !p.last_error.is_empty() {
            table.detail(format!("    last NACK: {}", p.last_error));
        }
    }
    table.print();
    for d in &resp.disconnected {
        println!(
            "DISCONNECTED {} {} ({} s ago, without shutting down)",
            d.spiffe_id,
            d.inbound_address,
            (moat_identity::clock::unix_now_ms() - d.disconnected_unix_ms).max(0) / 1000
        );
    }
    Ok(())
}
