//! `moat revoke`: revoke an identity or one certificate, lift a revocation, or list them.

use moat_api::v1::{ListRevocationsRequest, RevokeRequest};

use super::{admin, time};
use crate::Global;
use crate::connect::status;
use crate::output::Output;
use crate::table::Table;

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("what").args(["identity", "serial", "list"]).required(true))]
pub struct RevokeArgs {
    /// Revoke every certificate of this identity, and refuse its renewals, until undone.
    #[arg(long)]
    identity: Option<String>,
    /// Revoke one certificate by serial (hex, as `moat status` shows).
    #[arg(long)]
    serial: Option<String>,
    /// Why (kept with the revocation and in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
    /// Lift the revocation instead.
    #[arg(long)]
    undo: bool,
    /// List revocations in force.
    #[arg(long)]
    list: bool,
    /// How `--list` prints.
    #[arg(short = 'o', long, value_enum, default_value_t, requires = "list")]
    output: Output,
}

pub async fn run(global: &Global, args: RevokeArgs) -> anyhow::Result<()> {
    let mut client = admin(global).await?;
    if args.list {
        let list = client
            .list_revocations(ListRevocationsRequest {})
            .await
            .map_err(|s| status("revoke", s))?
            .into_inner()
            .revocations;
        let data: Vec<_> = list
            .iter()
            .map(|r| {
                serde_json::json!({
                    "kind": r.kind,
                    "value": r.value,
                    "since_unix_ms": r.time_unix_ms,
                    // 0: until undone.
                    "until_unix": r.expires_unix,
                    "reason": r.reason,
                })
            })
            .collect();
        return args.output.print(&data.into(), || {
            let mut table = Table::new(&["KIND", "VALUE", "SINCE", "UNTIL", "REASON"]);
            for r in &list {
                let since = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(r.time_unix_ms.max(0) as u64);
                let until = if r.expires_unix == 0 {
                    "undone".to_owned()
                } else {
                    time(r.expires_unix)
                };
                table.row([
                    r.kind.clone(),
                    r.value.clone(),
                    humantime::format_rfc3339_seconds(since).to_string(),
                    until,
                    r.reason.clone(),
                ]);
            }
            table.print();
        });
    }
    let resp = client
        .revoke(RevokeRequest {
            identity: args.identity.unwrap_or_default(),
            serial: args.serial.unwrap_or_default(),
            reason: args.reason,
            undo: args.undo,
        })
        .await
        .map_err(|s| status("revoke", s))?
        .into_inner();
    let r = resp.revocation.unwrap_or_default();
    if args.undo {
        println!(
            "lifted the revocation of {} {}; pushed to {} proxies",
            r.kind, r.value, resp.proxies
        );
    } else {
        println!(
            "revoked {} {}; pushed to {} proxies",
            r.kind, r.value, resp.proxies
        );
    }
    Ok(())
}
