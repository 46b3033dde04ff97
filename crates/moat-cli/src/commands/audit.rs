//! `moat audit`.

use moat_api::v1::ListAuditRequest;

use super::admin;
use crate::Global;
use crate::connect::status;
use crate::output::Output;
use crate::table::Table;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// How many of the newest entries.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Include read-only calls that succeeded (listings, `ca show`, histories); by default only
    /// actions that change something, and refusals, are shown.
    #[arg(long)]
    reads: bool,
    /// Only entries with this outcome.
    #[arg(long, value_parser = ["ok", "refused"])]
    outcome: Option<String>,
    /// Only actions starting with this, e.g. `policy.` or `cert.issue`.
    #[arg(long, default_value = "")]
    action: String,
    /// Only entries by this actor (a SPIFFE ID, `token:<id>`, or an address), exactly.
    #[arg(long, default_value = "")]
    actor: String,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

pub async fn run(global: &Global, args: AuditArgs) -> anyhow::Result<()> {
    let entries = admin(global)
        .await?
        .list_audit(ListAuditRequest {
            limit: args.limit,
            changes_only: !args.reads,
            outcome: args.outcome.unwrap_or_default(),
            action_prefix: args.action,
            actor: args.actor,
        })
        .await
        .map_err(|s| status("audit", s))?
        .into_inner()
        .entries;
    let data: Vec<_> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "time_unix_ms": e.time_unix_ms,
                "outcome": e.outcome,
                "action": e.action,
                "actor": e.actor,
                "target": e.target,
                "detail": e.detail,
            })
        })
        .collect();
    args.output.print(&data.into(), || {
        let mut table = Table::new(&["TIME", "OUTCOME", "ACTION", "ACTOR", "TARGET", "DETAIL"]);
        for e in &entries {
            let t = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(e.time_unix_ms.max(0) as u64);
            table.row([
                humantime::format_rfc3339_millis(t).to_string(),
                e.outcome.clone(),
                e.action.clone(),
                e.actor.clone(),
                e.target.clone(),
                e.detail.clone(),
            ]);
        }
        table.print();
    })
}
